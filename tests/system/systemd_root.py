"""A throwaway Debian 12 root that runs its own systemd as PID 1, for the system test.

The root is made with ``debootstrap --variant=minbase`` from the Debian mirror
that this machine's apt is configured with, and kept as a tarball in the cache
(``~/.cache/llmws`` or ``$LLMWS_CACHE``) when that is writable. It boots in new
PID, mount, cgroup, UTS, IPC and network namespaces (boot-systemd.sh), from a
cgroup of its own: the host's hostname, IPC objects, ports and cgroup v1
hierarchies stay untouched, and :meth:`SystemdRoot.close` ends every process
with ``cgroup.kill`` and so every mount with the mount namespace.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
# procps: /bin/kill, which the unit's ExecReload uses (every real server has it).
INCLUDE = "systemd,systemd-sysv,dbus,python3,adduser,procps"
BOOT_SCRIPT = Path(__file__).with_name("boot-systemd.sh")
# A clean environment for commands in the root: nothing of the host's leaks in.
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "DEBIAN_FRONTEND": "noninteractive",
}


class SystemdRootError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LLMWS_CACHE", Path.home() / ".cache" / "llmws"))


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "unshare", "nsenter", "chroot", "ip") if not shutil.which(t)]


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The first mirror apt uses for the main Debian suite (deb822 or one-line sources)."""
    sources = sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            lines = [line for line in stanza.splitlines() if ":" in line and line[0] != "#"]
            fields = {k.strip().lower(): v.split() for k, v in (ln.split(":", 1) for ln in lines)}
            if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []):
                return fields["uris"][0]
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = [w for w in line.split("#")[0].split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise SystemdRootError(f"no apt source for {SUITE} in {apt_dir}")


def _customize(root: Path) -> None:
    """Make the fresh root fit for booting as a container."""
    # No gettys: the container has no terminals worth a login prompt.
    for unit in ("getty.target", "console-getty.service"):
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (root / "etc/hostname").write_text("llmws-systest\n")
    # An empty machine-id lets systemd make a fresh one at each boot.
    (root / "etc/machine-id").write_text("")


def make_root(dest: Path) -> None:
    """Fill the empty folder ``dest`` with a bootable Debian root, from the cache when present."""
    recipe = SUITE + INCLUDE + inspect.getsource(_customize)
    key = hashlib.sha256(recipe.encode()).hexdigest()
    tarball = cache_dir() / f"{SUITE}-root-{key[:12]}.tar"
    if tarball.exists():
        subprocess.run(["tar", "-xpf", tarball, "--numeric-owner", "-C", dest], check=True)
        return
    mirror = debian_mirror()
    log.info("debootstrap %s from %s (no cached root at %s)", SUITE, mirror, tarball)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, dest, mirror],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    _customize(dest)
    try:
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["tar", "-cf", partial, "--numeric-owner", "-C", dest, "."], check=True)
        partial.rename(tarball)
        for stale in tarball.parent.glob(f"{SUITE}-root-*.tar"):
            if stale != tarball:
                stale.unlink()
    except (OSError, subprocess.CalledProcessError):
        # The cache only saves time; a read-only home must not fail the test.
        log.warning("could not cache the root at %s", tarball, exc_info=True)


def own_cgroup2() -> tuple[Path, Path]:
    """(mount point of cgroup2, this process's cgroup below it)."""
    mount_point = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                mount_point = Path(fields[4])
                break
    if mount_point is None:
        raise SystemdRootError("no cgroup2 file system is mounted")
    with open("/proc/self/cgroup") as f:
        own = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    return mount_point, Path(own.lstrip("/"))


def _die_with_parent() -> None:
    """Should the test process be killed outright, unshare gets SIGKILL, and with
    --kill-child so does the root's PID 1: the namespaces and their mounts go."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class SystemdRoot:
    """A booted root; use as a context manager so that it is always torn down."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self.pid: int | None = None  # systemd's PID on the host
        self._unshare: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None

    def __enter__(self) -> SystemdRoot:
        try:
            self.root.mkdir()
            make_root(self.root)
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _boot(self, timeout: float = 120) -> None:
        mount_point, own = own_cgroup2()
        self._cgroup = mount_point / own / f"llmws-systest-{os.getpid()}"
        self._cgroup.mkdir()
        self.console.touch()
        # The shell moves itself into the new cgroup before it becomes unshare.
        with self.console.open("ab") as console:
            self._unshare = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    'echo $$ > "$0/cgroup.procs" && exec "$@"',
                    self._cgroup,
                    *("unshare", "--pid", "--fork", "--mount", "--cgroup", "--uts", "--ipc"),
                    *("--net", "--kill-child", "sh", BOOT_SCRIPT, self.root, self.console),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while self.pid is None:
            if self._unshare.poll() is not None or time.monotonic() > deadline:
                raise SystemdRootError(f"systemd did not start: {self.console.read_text()}")
            time.sleep(0.1)
            children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
            for pid in children.read_text().split() if children.exists() else ():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    self.pid = int(pid)
        # The network namespace has only lo, and it starts down.
        lo_up = ["nsenter", "-t", str(self.pid), "-n", "ip", "link", "set", "lo", "up"]
        subprocess.run(lo_up, check=True)
        # is-system-running --wait waits for the boot, but not for systemd's socket.
        while True:
            result = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
            )
            state = result.stdout.strip()
            if state or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise SystemdRootError(f"systemd in the root is {state!r}")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout
            log.warning("root booted degraded; failed units:\n%s", failed)

    def run(
        self,
        args: Sequence[str],
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the root, in the booted system's namespaces, as root or ``user``."""
        if self.pid is None:
            raise SystemdRootError("the root is not booted")
        command = ["nsenter", "-t", str(self.pid), "-p", "-m", "-u", "-i", "-n"]
        command += ["chroot", str(self.root)]
        if user is not None:
            command += ["runuser", "-u", user, "--"]
        result = subprocess.run(
            [*command, *args],
            env=ROOT_ENV,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log.info("%s -> %d\n%s%s", " ".join(args), result.returncode, result.stdout, result.stderr)
        if check and result.returncode != 0:
            raise SystemdRootError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def close(self) -> None:
        """End every process and mount of the root, then delete it; safe to call twice."""
        if self._cgroup is not None and self._cgroup.exists():
            (self._cgroup / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 30
            while "populated 1" in (self._cgroup / "cgroup.events").read_text():
                if time.monotonic() > deadline:
                    raise SystemdRootError(f"processes left in {self._cgroup}")
                time.sleep(0.1)
            for dirpath, _, _ in os.walk(self._cgroup, topdown=False):
                os.rmdir(dirpath)
            self._cgroup = None
        if self._unshare is not None:
            self._unshare.wait(timeout=30)
            self._unshare = None
        self.pid = None
        # The mounts were only ever in the dead namespace; refuse to delete
        # anything if one showed up on the host all the same.
        with open("/proc/self/mountinfo") as f:
            leaked = [line.split()[4] for line in f if line.split()[4].startswith(str(self.root))]
        if leaked:
            raise SystemdRootError(f"mounts left under {self.root}: {leaked}")
        shutil.rmtree(self.workdir, ignore_errors=True)
