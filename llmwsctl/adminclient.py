"""A small blocking client for llmwsd's admin socket (protocol in llmwsd.protocol.admin).

>>> with AdminClient.connect("/run/llmws/admin.sock") as admin:
...     print(admin.call("status")["model"])

Failed commands raise the daemon's error as the matching
:class:`~llmwsd.errors.LLMWSError` subclass; a daemon that is not running raises
:class:`NotRunning`, a socket this user may not open :class:`PermissionDenied`.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from llmwsd.errors import BadRequest, LLMWSError, Unsupported
from llmwsd.protocol import admin as adminproto

ProgressCallback = Callable[[dict[str, Any]], None]

CONNECT_TIMEOUT_S = 5.0


class NotRunning(LLMWSError):
    code = "not_running"

    def __init__(self, path: str, stale: bool = False) -> None:
        where = "stale socket" if stale else "no socket"
        super().__init__(
            f"llmwsd is not running ({where} at {path}); for a daemon with another "
            f"runtime_dir, give its socket: --socket PATH or {adminproto.SOCKET_ENV}=PATH"
        )
        self.path = path


class PermissionDenied(LLMWSError):
    code = "permission_denied"

    def __init__(self, path: str) -> None:
        group = socket_group(path)
        if group in (None, "root", "0"):
            # Joining root's group would hand out far more than the admin socket.
            advice = (
                "the daemon runs with group root, so run llmwsctl as root (sudo llmwsctl …); "
                "to let others in, run llmwsd with a group of its own (the packaged service "
                "runs as group llmws: sudo groupadd --system llmws) and join that group."
            )
        else:
            advice = (
                f"join the {group} group (sudo usermod -aG {group} $USER, then log in again) "
                "or run llmwsctl as root."
            )
        super().__init__(f"Permission denied on {path}: {advice}")
        self.path = path
        self.group = group


class ProtocolError(LLMWSError):
    code = "protocol_error"


def socket_group(path: str) -> str | None:
    """The group that may use ``path``: the socket's, else its folder's (which may hide it)."""
    for candidate in (Path(path), Path(path).parent):
        try:
            gid = candidate.stat().st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return None


# Where `make run` (etc/llmws/dev.toml's runtime_dir) puts the socket, seen from the checkout.
DEV_SOCKET = f"var/run/{adminproto.SOCKET_NAME}"


def default_socket_path() -> str:
    """$LLMWS_ADMIN_SOCKET, else the system daemon's socket, else a development daemon's.

    The development daemon's (``make run``, in the current folder) is used only when
    the system one is not there, so an installed service always wins.
    """
    if os.environ.get(adminproto.SOCKET_ENV):
        return os.environ[adminproto.SOCKET_ENV]
    if not os.path.exists(adminproto.DEFAULT_SOCKET) and os.path.exists(DEV_SOCKET):
        return DEV_SOCKET
    return adminproto.DEFAULT_SOCKET


class AdminClient:
    """One connection to the admin socket; calls run one at a time."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._lines = sock.makefile("rb")
        self._ids = itertools.count(1)
        self.server_version = ""

    @classmethod
    def connect(cls, path: str | None = None) -> AdminClient:
        """Connect and check the daemon's greeting (its admin protocol version)."""
        path = path or default_socket_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            raise NotRunning(path) from None
        except ConnectionRefusedError:
            sock.close()
            raise NotRunning(path, stale=True) from None
        except PermissionError:
            sock.close()
            raise PermissionDenied(path) from None
        client = cls(sock, path)
        try:
            client._check_greeting(client._read())
        except BaseException:
            client.close()
            raise
        return client

    def _check_greeting(self, message: dict[str, Any]) -> None:
        try:
            hello = adminproto.Greeting.from_wire(message)
        except BadRequest:
            raise ProtocolError(f"{self.path} is not an llmwsd admin socket") from None
        if hello.protocol != adminproto.ADMIN_PROTOCOL_VERSION:
            raise Unsupported(
                f"llmwsd {hello.version or '?'} speaks admin protocol "
                f"{hello.protocol}, this llmwsctl speaks "
                f"{adminproto.ADMIN_PROTOCOL_VERSION}: use the llmwsctl installed with llmwsd"
            )
        self.server_version = hello.version

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = 60.0,
    ) -> Any:
        """Send one command and return its result; progress lines go to ``on_progress``.

        ``timeout`` bounds the wait for each line (None: no bound, for switch and pull,
        which send progress while they work).
        """
        request_id = next(self._ids)
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(adminproto.encode(adminproto.request(request_id, cmd, args)))
        except BrokenPipeError:
            raise ProtocolError("llmwsd closed the admin connection") from None
        while True:
            answer = adminproto.Answer.from_wire(self._read())
            if answer.id != request_id:
                continue  # an answer to an earlier request that this client gave up on
            if answer.progress is not None:
                if on_progress is not None:
                    on_progress(answer.progress)
                continue
            if answer.error is not None:
                raise answer.error
            return answer.result

    def _read(self) -> dict[str, Any]:
        try:
            line = self._lines.readline(adminproto.MAX_RESPONSE_LINE)
        except TimeoutError:
            raise ProtocolError("llmwsd did not answer in time") from None
        except ConnectionError:
            line = b""
        if not line:
            raise ProtocolError("llmwsd closed the admin connection")
        if not line.endswith(b"\n"):
            raise ProtocolError("an answer from llmwsd was cut short or too long")
        return adminproto.decode(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._lines.close()
            self.sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
