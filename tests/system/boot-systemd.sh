#!/bin/sh
# boot-systemd.sh ROOT CONSOLE: boot ROOT's systemd as PID 1 of a container.
#
# Runs inside `unshare --pid --fork --mount --cgroup`, started from a fresh
# cgroup of its own (see systemd_root.py): every mount made here lives and dies
# with that mount namespace, and systemd's cgroup tree is that cgroup's subtree.
set -eu

root=$1
console=$2

mount --make-rprivate /
# systemd sets up ProtectSystem= and friends by remounting below "/": the
# chroot's "/" must be a mount point of its own for that.
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"
# Only the unified hierarchy, rooted at our cgroup by the cgroup namespace:
# systemd then never touches the host's cgroup v1 hierarchies.
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"

# A private /dev with the basic nodes only (as systemd-nspawn does): the host's
# consoles and disks stay out of reach of the gettys and udev rules in ROOT.
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in null zero full random urandom tty; do
	touch "$root/dev/$node"
	mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
# systemd writes its own messages to /dev/console: keep them in a file.
touch "$root/dev/console"
mount --bind "$console" "$root/dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"

export container=llmws-systest
exec chroot "$root" /lib/systemd/systemd --system
