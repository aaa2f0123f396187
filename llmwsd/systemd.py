"""The sd_notify protocol, spoken directly over $NOTIFY_SOCKET (no libsystemd needed).

Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("llmwsd.systemd")


class Notifier:
    """Sends READY=1, STATUS=…, WATCHDOG=1 and friends to the service manager."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        payload = "\n".join(fields).encode()
        try:
            # Non-blocking: this runs on the event loop, and a full queue must not stall it.
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, kind) as sock:
                sock.sendto(payload, self.address)
        except OSError:
            log.warning("could not notify the service manager (%s)", fields[0], exc_info=True)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        self.notify("RELOADING=1", "STATUS=reloading configuration")

    def start_watchdog(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Ping at half of $WATCHDOG_USEC from the event loop while ``alive()`` says so.

        A stuck loop sends nothing, and neither does a daemon whose ``alive()`` is false
        (a stuck engine, llmwsd.service.health): systemd restarts it after WatchdogSec.
        """
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not self.address or (pid and pid != str(os.getpid())):
            return
        interval = int(usec) / 2e6
        loop = asyncio.get_running_loop()
        self._watchdog_task = loop.create_task(self._watchdog(interval, alive))

    async def _watchdog(self, interval: float, alive: Callable[[], bool]) -> None:
        while True:
            if alive():
                self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def stop_watchdog(self) -> None:
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
