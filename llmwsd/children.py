"""Processes the daemon starts die with it, even when it is killed with SIGKILL.

vLLM runs its engine (and workers) in processes started by ``multiprocessing``
with the spawn method; nothing in them notices that the daemon is gone, so a
``kill -9`` outside systemd (whose control group takes them all) would leave
them holding the model and the KV cache. Each spawned child imports the
daemon's main module before it runs (``multiprocessing.spawn.prepare``), and
inherits the daemon's environment, where :func:`mark_daemon` left its pid:
:mod:`llmwsd.main` then asks Linux to kill the child when its parent goes
(``PR_SET_PDEATHSIG``). The "parent" is the thread that started the child: for
vLLM's engine, one of the event loop's worker threads, which live as long as
the daemon.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
DAEMON_PID_VARIABLE = "LLMWSD_PID"


def mark_daemon() -> None:
    """In the daemon: its children (and theirs) can tell that they are (see above)."""
    os.environ[DAEMON_PID_VARIABLE] = str(os.getpid())


def is_daemon_child() -> bool:
    return os.environ.get(DAEMON_PID_VARIABLE, str(os.getpid())) != str(os.getpid())


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends; at once if that happened already."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: systemd's control group still takes it at a stop
    if os.getppid() != parent:  # the parent went before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
