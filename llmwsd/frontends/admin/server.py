"""The admin socket: llmwsctl's way into the daemon, a Unix socket for root and the daemon's group.

The socket is ``<runtime_dir>/admin.sock``, mode 0660, group the daemon's own.
The framing is in :mod:`llmwsd.protocol.admin`. One request runs at a time per
connection; a command keeps running when its client leaves (a half-done model
switch would help nobody), its answer is then dropped. Who sent each command
that changes something (SO_PEERCRED uid and pid) goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmwsd import __version__
from llmwsd.errors import (
    BadRequest,
    ConfigError,
    InternalError,
    LLMWSError,
    NotFound,
    UnknownType,
)
from llmwsd.protocol import admin as adminproto
from llmwsd.protocol.close_codes import CloseCode
from llmwsd.service.model_changes import Progress

if TYPE_CHECKING:
    from llmwsd.service.services import Services

log = logging.getLogger("llmwsd.admin")

Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class LineTooLong(Exception):
    """A request line over the limit; its bytes were read and dropped."""


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line (without its newline), None at end of stream, or LineTooLong.

    The reader's limit bounds the buffer; an oversized line is consumed piece
    by piece up to its newline so that the next request can still be read.
    """
    try:
        return (await reader.readuntil(b"\n"))[:-1]
    except asyncio.IncompleteReadError as e:
        return e.partial or None
    except asyncio.LimitOverrunError as e:
        consumed = e.consumed
    while True:
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            pass  # the client left mid-line; the caller sees the end of stream next
        except asyncio.LimitOverrunError as e:
            consumed = e.consumed
            continue
        raise LineTooLong


def peer_credentials(writer: asyncio.StreamWriter) -> str:
    """``uid N pid M`` of the connected process, for the log."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except (AttributeError, OSError):
        return "unknown peer"
    return f"uid {uid} pid {pid}"


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for a new socket: remove a stale one, refuse a live one.

    Raises OSError (the daemon's "cannot start") when another daemon answers on
    ``path`` or when something other than a socket is there.
    """
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise OSError(f"{path} exists and is not a socket: remove it or change [paths] runtime_dir")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale admin socket %s", path)
            path.unlink(missing_ok=True)
            return
        except OSError as e:
            raise OSError(f"cannot check the admin socket {path}: {e}") from e
    raise OSError(f"another llmwsd is already running: its admin socket {path} answers")


class AdminServer:
    def __init__(
        self,
        services: Services,
        reload: Callable[[], dict[str, Any]],
        listen: Callable[[], str],
    ) -> None:
        self.services = services
        self.reload_daemon = reload  # SIGHUP's work, for `llmwsctl reload`
        self.listen = listen  # the public port's address, for `llmwsctl status`
        self.path = services.config().runtime_dir / adminproto.SOCKET_NAME
        self.server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made
        self._connections: set[asyncio.Task[None]] = set()
        self._restoring: asyncio.Task[None] | None = None
        self.handlers: dict[str, Handler] = {
            adminproto.STATUS: self.on_status,
            adminproto.MODELS: self.on_models,
            adminproto.SWITCH: self.on_switch,
            adminproto.PULL: self.on_pull,
            adminproto.PULLS: self.on_pulls,
            adminproto.PULL_CANCEL: self.on_pull_cancel,
            adminproto.PULLS_CLEAN: self.on_pulls_clean,
            adminproto.RM: self.on_rm,
            adminproto.RESOURCES: self.on_resources,
            adminproto.SESSIONS: self.on_sessions,
            adminproto.SESSION_DROP: self.on_session_drop,
            adminproto.RELOAD: self.on_reload,
            adminproto.TOKENS: self.on_tokens,
            adminproto.TOKEN_ADD: self.on_token_add,
            adminproto.TOKEN_REVOKE: self.on_token_revoke,
        }

    # -- the socket ------------------------------------------------------------------

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        claim_socket_path(self.path)
        self.server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=adminproto.MAX_REQUEST_LINE
        )
        # bind() applied the umask, which can only have removed bits: 0660 never widens.
        os.chmod(self.path, 0o660)
        os.chown(self.path, -1, os.getegid())
        stat = self.path.stat()
        self._identity = (stat.st_dev, stat.st_ino)
        log.info("admin socket %s (mode 0660, gid %d)", self.path, os.getegid())

    def reload(self) -> None:
        """On reload (SIGHUP): listen again if our socket file was removed or replaced.

        A tmpfiles cleaner or an operator's ``rm`` can take the file away; the
        listening socket lives on unreachable, and llmwsctl needs a way back in.
        """
        if self.server is None or self._restoring is not None:
            return
        try:
            stat = self.path.stat()
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        log.warning("the admin socket %s was removed or replaced: creating it again", self.path)
        self._restoring = asyncio.create_task(self._restore())

    async def _restore(self) -> None:
        assert self.server is not None
        self.server.close()  # the lost file's listener; its open connections carry on
        try:
            await self._listen()
        except OSError as e:
            log.error("cannot create the admin socket %s again: %s", self.path, e)
        finally:
            self._restoring = None

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.server.wait_closed()
        self.server = None
        # Only our own socket: a newer daemon may have replaced it after a crash of ours.
        with contextlib.suppress(FileNotFoundError):
            stat = self.path.stat()
            if (stat.st_dev, stat.st_ino) == self._identity:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = peer_credentials(writer)
        try:
            await self._send(writer, adminproto.greeting(__version__))
            while (line := await self._next_request(reader, writer, peer)) is not None:
                if line.strip():
                    await self._answer(line, writer, peer)
        except ConnectionError:
            # Probes (claim_socket_path of a second daemon) and clients that left mid-line.
            log.debug("admin: %s disconnected", peer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _next_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bytes | None:
        """The next request line; oversized ones are answered here and skipped."""
        while True:
            try:
                return await read_line(reader)
            except LineTooLong:
                limit = adminproto.MAX_REQUEST_LINE
                log.warning("admin: %s sent a line over %d bytes", peer, limit)
                error = BadRequest(f"request line longer than {limit} bytes: skipped")
                await self._send(writer, adminproto.failed(None, error))

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(adminproto.encode(message))
        await writer.drain()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter, peer: str) -> None:
        request_id: adminproto.RequestId = None

        def progress(data: dict[str, Any]) -> None:
            # Never raises: a client that left must not abort the command.
            if not writer.is_closing():
                writer.write(adminproto.encode(adminproto.progress(request_id, data)))

        try:
            message = adminproto.decode(line)
            request_id = adminproto.request_id_of(message)
            request_id, cmd, args = adminproto.parse_request(message)
            handler = self.handlers.get(cmd)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise UnknownType(f"unknown command {cmd[:80]!r}; commands: {known}")
            if cmd in adminproto.CHANGING_COMMANDS:
                log.info("admin: %s %s by %s", cmd, _brief(args), peer)
            result = await handler(args, progress)
        except LLMWSError as e:
            log.warning("admin: %s: %s (%s)", peer, e.message, e.code)
            answer = adminproto.failed(request_id, e)
        except Exception:
            log.error("admin: request %r failed", line[:200], exc_info=True)
            answer = adminproto.failed(request_id, InternalError("internal error: see the log"))
        else:
            answer = adminproto.ok(request_id, result)
        try:
            await self._send(writer, answer)
        except ConnectionError:
            log.info("admin: %s left before its answer was sent", peer)

    # -- reports ---------------------------------------------------------------------

    async def on_status(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        slot = self.services.slot
        return {
            **self.services.reports.status(),
            "model_reason": slot.no_model_reason() if slot.engine is None else None,
            "pid": os.getpid(),
            "listen": self.listen(),
            "config": self.services.config().source,
        }

    async def on_models(self, args: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        return await self.services.reports.list_models()

    async def on_resources(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return await self.services.reports.resources()

    async def on_sessions(self, args: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        return [session.summary() for session in self.services.sessions.list()]

    # -- changes ---------------------------------------------------------------------

    async def on_session_drop(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        session_id = _string_arg(args, "id")
        session = self.services.sessions.drop(session_id)
        connected = session.owner is not None
        if connected:
            session.owner.detach(CloseCode.SESSION_DROPPED, "session dropped by the operator")
        return {"dropped": session.id, "was_connected": connected}

    async def on_reload(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        report = self.reload_daemon()
        if report.get("error"):
            raise ConfigError(f"{report['error']}; the running configuration is kept")
        return report

    async def on_tokens(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        auth = self.services.auth
        return {
            "required": auth.required,
            "tokens": [e.public() for store in (auth.access, auth.admin) for e in store.entries],
        }

    async def on_token_add(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        store = self.services.auth.store(admin=bool(args.get("admin")))
        entry, token = await asyncio.to_thread(store.add, _string_arg(args, "name"))
        # The plain token leaves the daemon this once; only its salted hash is kept.
        return {**entry.public(), "token": token}

    async def on_token_revoke(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = _string_arg(args, "name")
        auth = self.services.auth
        for store in (auth.access, auth.admin):
            if any(name in (e.name, e.id) for e in store.entries):
                return (await asyncio.to_thread(store.revoke, name)).public()
        if not (auth.access.enabled or auth.admin.enabled):
            raise auth.access.off()  # what `tokens add` says: there is nothing to revoke
        raise NotFound(f"no token called {name!r}")

    async def on_pull(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Start a pull; follow it to its end, or (``detach``) answer with its id at once."""
        pulls = self.services.models.pulls
        pull = await pulls.start(args.get("source"), args.get("name"), args.get("revision"))
        if args.get("detach"):
            return pull.summary()
        return await pulls.follow(pull, progress)

    async def on_pulls(self, args: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        return self.services.models.pulls.summaries()

    async def on_pull_cancel(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return await self.services.models.pulls.cancel(args.get("id"))

    async def on_pulls_clean(
        self, args: dict[str, Any], progress: Progress
    ) -> list[dict[str, Any]]:
        return await self.services.models.pulls.clean()

    async def on_switch(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return await self.services.models.switch(args.get("model"), progress)

    async def on_rm(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        force = args.get("force", False) is True
        return await self.services.models.remove(args.get("model"), force, progress)


def _string_arg(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f'"{key}" must be a non-empty string')
    return value


def _brief(args: dict[str, Any]) -> str:
    """Arguments for the log line, each value cut short; strings quoted, not booleans."""
    return " ".join(f"{k}={_log_value(v)}" for k, v in args.items()) or "(no arguments)"


def _log_value(value: Any) -> str:
    """``force=False``, ``max=3``, ``model='x'``: only strings (and the rest) are quoted."""
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return repr(str(value)[:80])
