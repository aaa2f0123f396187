"""The Python client library for llmwsd's JSON WebSocket protocol, with automatic resume.

``Client`` keeps the original LLMWS clients' method names (``connect``, ``inference``,
``get_resources``, ``list_models``, ``switch_model``, ``download_model``,
``disconnect``) so their examples (llm.py, ``LLMWSEnhancedClient``) run unchanged
apart from the import.

Resume: every generation event carries a per-session ``seq``. The client
remembers the last one it saw; when the connection drops, it reconnects with
``session_id`` and ``last_seq`` (backing off between tries, up to
``resume_timeout`` seconds) and the server replays exactly what was missed, so
an answer streams on without a gap or a duplicate.

Request/reply pairing: requests are sent one at a time under a lock, so the
next reply without a ``seq`` belongs to the request in flight. Generation
events travel separately, matched to the running answer by ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from llmwsd.errors import Busy, EventsDropped, LLMWSError, Unauthorized
from llmwsd.protocol import messages, wire
from llmwsd.protocol.close_codes import CloseCode

__all__ = [
    "DEFAULT_URL",
    "Client",
    "ConnectionLost",
    "LLMWSEnhancedClient",
    "LLMWSError",
    "SessionLost",
]

log = logging.getLogger("llmwsctl.client")

DEFAULT_URL = "ws://127.0.0.1:8765"

M = TypeVar("M", bound=messages.Message)


class ConnectionLost(LLMWSError):
    """The server cannot be reached, or the connection dropped and could not be resumed
    within ``resume_timeout``."""

    code = "connection_lost"


class SessionLost(LLMWSError):
    """The session cannot continue here: it expired on the server or moved to another client."""

    code = "session_lost"


class _Resumed(Exception):
    """Internal: the connection dropped and came back while a reply was awaited."""


class _Generation:
    """One answer being received: its events in seq order, or the error that ended it."""

    def __init__(self) -> None:
        self.request_id: str | None = None  # known from its first event
        self.taken = False  # the server answered the ping sent after the inference
        self.queue: asyncio.Queue[dict[str, Any] | LLMWSError] = asyncio.Queue()
        self.finished = False


def normalize_url(url: str) -> str:
    """Accept ``host:port`` as the original LLMWS page does, and ws:// or wss:// URLs."""
    return url if "://" in url else f"ws://{url}"


class Client:
    """An asyncio client for one llmwsd session.

    ``url`` and ``token`` default to the environment's ``LLMWS_URL`` and
    ``LLMWS_TOKEN`` (then ws://127.0.0.1:8765 and none). ``resume_timeout``
    bounds how long the client keeps trying to reconnect after the connection
    drops; past it, the waiting call raises :class:`ConnectionLost`.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        resume_timeout: float = 60.0,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = normalize_url(url or os.environ.get("LLMWS_URL") or DEFAULT_URL)
        self.token = token or os.environ.get("LLMWS_TOKEN") or None
        self.resume_timeout = resume_timeout
        self.open_timeout = open_timeout
        self.session_id: str | None = None
        self.welcome: dict[str, Any] = {}
        self.last_seq = 0  # the highest generation event seq received in this session
        self.last_done: dict[str, Any] | None = None  # the `done` event of the latest answer
        # Events of answers this client did not ask for (replayed from an earlier client).
        self.backlog: deque[dict[str, Any]] = deque(maxlen=1000)
        # Messages nobody waits for: subscribed resources, download logs, ...
        self.notifications: deque[dict[str, Any]] = deque(maxlen=1000)
        self._ws: ClientConnection | None = None
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: dropped
        self._lock = asyncio.Lock()
        self._generation: _Generation | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # Cleared while a dropped connection is being resumed; set once it is back or lost.
        self._settled = asyncio.Event()
        self._failure: LLMWSError | None = None  # why the last resume gave up
        self._closing = False

    # -- connecting ------------------------------------------------------------------

    async def connect(self, session_id: str | None = None) -> dict[str, Any]:
        """Open a session (a new one, or ``session_id`` to resume it); return the welcome.

        An unknown or expired ``session_id`` starts a new session: compare
        ``session_id`` afterwards, or read ``welcome["resumed"]``.
        """
        if self._ws is not None:
            raise RuntimeError("already connected: disconnect() first")
        session_id = wire.parse_session_id(session_id)
        self._closing = False
        self.last_seq = 0
        ws, welcome, received = await self._open(session_id, None)
        self._adopt(ws, welcome, received)
        self._settled.set()
        self._supervisor = asyncio.create_task(self._supervise())
        if welcome.resumed:
            # The server replays what an earlier client left unacknowledged; a round
            # trip makes sure it has been read (into `backlog`) before we ask anything.
            await self._request(messages.Ping(), messages.Pong)
        return self.welcome

    async def disconnect(self) -> None:
        """Close the connection; the session stays on the server until it expires."""
        self._closing = True
        self._fail_generation(ConnectionLost("disconnected while an answer was streaming"))
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    close = disconnect

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def _open(
        self, session_id: str | None, last_seq: int | None
    ) -> tuple[ClientConnection, messages.Welcome, dict[str, Any]]:
        """Connect, say hello, and read the welcome (or the error that refuses us)."""
        hello = messages.Hello(session_id=session_id, last_seq=last_seq, token=self.token)
        try:
            ws = await websockets.connect(
                self.url, open_timeout=self.open_timeout, max_size=64 * 2**20
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
            raise ConnectionLost(f"cannot connect to {self.url}: {e}") from e
        try:
            await ws.send(wire.encode_message(hello.to_wire()))
            first = wire.decode_message(await asyncio.wait_for(ws.recv(), self.open_timeout))
            kind = first.get("type")
            if kind == messages.Welcome.TYPE:
                return ws, messages.Welcome.from_wire(first), first
        except (ConnectionClosed, TimeoutError, LLMWSError) as e:
            await ws.close()
            raise ConnectionLost(f"{self.url} did not welcome us: {e}") from e
        await ws.close()
        if kind == messages.Error.TYPE:
            raise messages.Error.from_wire(first).exception()
        raise LLMWSError(f"expected a welcome from the server, got {kind!r}")

    def _adopt(
        self, ws: ClientConnection, welcome: messages.Welcome, received: dict[str, Any]
    ) -> None:
        if welcome.session_id != self.session_id:
            self.last_seq = 0  # seqs count per session
        self._ws = ws
        self.welcome = received  # as sent: with the fields a newer server may add
        self.session_id = welcome.session_id

    # -- the connection's life: read, and reconnect when it drops ---------------------

    async def _supervise(self) -> None:
        """Read the connection; when it drops, resume at once if a call is waiting on it."""
        while True:
            ws = self._ws
            assert ws is not None
            await self._read(ws)
            if self._closing:
                return
            waiting = self._generation is not None or self._lock.locked()
            log.info(
                "connection to %s closed (%s %s)%s",
                self.url,
                ws.close_code,
                ws.close_reason,
                ": resuming" if waiting else "",
            )
            if not waiting:
                # Idle (servers close idle connections): the next call reconnects.
                self._ws = None
                return
            self._settled.clear()
            self._replies.put_nowait(None)  # wake a waiting request so it can resend
            try:
                # Close codes after which reconnecting cannot help: moved, or refused.
                if ws.close_code == CloseCode.TAKEN_OVER:
                    raise SessionLost(f"session {self.session_id} was taken over by another client")
                if ws.close_code == CloseCode.POLICY:
                    raise ConnectionLost(f"the server closed the connection: {ws.close_reason}")
                await self._reconnect()
            except LLMWSError as e:
                self._give_up(e)
                return
            self._settled.set()

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                try:
                    message = wire.decode_message(frame)
                except LLMWSError:
                    log.warning("ignoring a frame that is not a JSON object: %.80r", frame)
                    continue
                if messages.is_generation_event(message):
                    self._on_event(message)
                elif message.get("code") == EventsDropped.code:
                    # No request's answer: the server's buffer cap lost events of an answer,
                    # so the running one (if any) cannot be whole.
                    if self._generation is not None:
                        self._fail_generation(messages.Error.from_wire(message).exception())
                    else:
                        self.notifications.append(message)
                elif not self._refused_late(message):
                    self._replies.put_nowait(message)

    def _refused_late(self, message: dict[str, Any]) -> bool:
        """Route an error that refuses the inference after its ping was answered.

        The server admits an inference beside later messages (it may wait for a
        switch, fit the context, queue for memory), so its refusal can follow the pong.
        """
        generation = self._generation
        if generation is None or generation.request_id is not None:
            return False
        if message.get("type") == "pong":
            generation.taken = True
        elif message.get("type") == "error" and generation.taken:
            generation.finished = True  # nothing runs on the server to cancel
            generation.queue.put_nowait(messages.Error.from_wire(message).exception())
            return True
        return False

    def _on_event(self, event: dict[str, Any]) -> None:
        seq = event["seq"]
        if seq <= self.last_seq:
            return  # a replay overlapping what we already have
        self.last_seq = seq
        generation = self._generation
        if generation is not None and generation.request_id in (None, event.get("request_id")):
            generation.request_id = event.get("request_id")
            generation.queue.put_nowait(event)
        else:
            self.backlog.append(event)

    async def _reconnect(self) -> None:
        """Reconnect to the same session with ``last_seq``, backing off, until resume_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.resume_timeout
        delay = 0.1
        while True:
            try:
                ws, welcome, received = await self._open(self.session_id, self.last_seq)
            except Unauthorized:
                raise  # trying again cannot help
            except LLMWSError as e:
                if loop.time() + delay > deadline:
                    raise ConnectionLost(
                        f"lost the connection to {self.url} and could not resume session "
                        f"{self.session_id} within {self.resume_timeout:g} s: {e}"
                    ) from e
                log.debug("reconnecting to %s failed (%s); retrying in %.1f s", self.url, e, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 2.0)
                continue
            lost = self.session_id
            self._adopt(ws, welcome, received)
            if not welcome.resumed:
                # The server forgot the session (expired, or restarted without it): the
                # conversation goes on in a new session, but a running answer is gone.
                log.warning("session %s is gone; continuing in session %s", lost, self.session_id)
                self._fail_generation(SessionLost(f"session {lost} is gone from the server"))
            return

    def _give_up(self, error: LLMWSError) -> None:
        log.warning("%s", error.message)
        self._fail_generation(error)
        self._ws = None  # the old connection is already closed
        self._failure = error
        self._settled.set()

    def _fail_generation(self, error: LLMWSError) -> None:
        if self._generation is not None:
            self._generation.queue.put_nowait(error)

    async def _wait_settled(self) -> None:
        """Wait out a resume in progress; raise why it failed, if it did."""
        await self._settled.wait()
        if self._ws is None:
            raise self._failure or ConnectionLost(f"not connected to {self.url}")

    async def _ensure_connected(self) -> None:
        """Before a call: wait out a resume in progress; after a failed one, try once more."""
        await self._settled.wait()
        if self._ws is None:
            if self.session_id is None or self._closing:
                raise RuntimeError("not connected: call connect() first")
            await self._reconnect()
            self._failure = None
            self._supervisor = asyncio.create_task(self._supervise())

    # -- requests --------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        if self._ws is None:
            raise ConnectionLost(f"not connected to {self.url}")
        with contextlib.suppress(ConnectionClosed):  # the supervisor notices and resumes
            await self._ws.send(wire.encode_message(message))

    def _set_aside_unsolicited(self) -> None:
        """Before a request (lock held): whatever is queued belongs to no request."""
        while not self._replies.empty():
            message = self._replies.get_nowait()
            if message is not None:  # None: a drop that has been dealt with
                self.notifications.append(message)

    async def _exchange(
        self,
        outgoing: list[messages.Message],
        reply_type: type[M],
        on_other: Callable[[dict[str, Any]], None] | None = None,
    ) -> M:
        """Send ``outgoing`` and return the reply of type ``reply_type``; hold the lock.

        An ``error`` reply raises it. Raises ``_Resumed`` when the connection
        dropped and came back, since the messages may not have arrived.
        """
        for message in outgoing:
            await self._send(message.to_wire())
        while True:
            reply = await self._replies.get()
            if reply is None:
                await self._wait_settled()
                raise _Resumed
            if reply.get("type") == messages.Error.TYPE:
                raise messages.Error.from_wire(reply).exception()
            if reply.get("type") == reply_type.TYPE:
                return reply_type.from_wire(reply)
            (on_other or self.notifications.append)(reply)

    async def _request(self, message: messages.Message, reply_type: type[M]) -> M:
        """One request and its reply; resent after a resume (every request but inference
        is safe to repeat)."""
        async with self._lock:
            await self._ensure_connected()
            self._set_aside_unsolicited()
            while True:
                with contextlib.suppress(_Resumed):
                    return await self._exchange([message], reply_type)

    async def ping(self) -> None:
        await self._request(messages.Ping(), messages.Pong)

    async def get_resources(self) -> dict[str, Any]:
        """Device and memory figures (``device``, ``free_gb``, ``total_gb``, ...)."""
        return (await self._request(messages.GetResources(), messages.Resources)).report

    async def get_status(self) -> dict[str, Any]:
        status = await self._request(messages.GetStatus(), messages.Status)
        return dataclasses.asdict(status)

    async def list_models(self) -> list[dict[str, Any]]:
        return (await self._request(messages.ListModels(), messages.ModelsList)).models

    async def switch_model(self, path: str) -> dict[str, Any]:
        """Load another model: a folder path, or a name from :meth:`list_models`.

        Returns the ``model_switched`` message (``model``, ``changed``, ...).
        """
        switch = (
            messages.SwitchModel(model_path=path)
            if "/" in path
            else messages.SwitchModel(model=path)
        )
        return (await self._request(switch, messages.ModelSwitched)).to_wire()

    async def download_model(
        self,
        repo: str,
        target_dir: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Download ``repo`` (URL or ``org/name``) into ``target_dir``; return ``download_done``.

        ``on_progress`` receives the server's ``log`` and ``download_progress`` messages.
        """
        message = messages.DownloadModel(repo=repo, target_dir=target_dir)
        async with self._lock:  # held throughout, so the final error cannot be mistaken
            await self._ensure_connected()
            self._set_aside_unsolicited()
            try:
                await self._exchange([message], messages.DownloadStarted, on_progress)
                done = await self._exchange([], messages.DownloadDone, on_progress)
                return done.to_wire()
            except _Resumed:
                # The download's messages went to the lost connection and are not buffered.
                raise ConnectionLost(
                    "the connection dropped during the download; it may go on on the server: "
                    "see list_models()"
                ) from None

    async def delete_model(self, name: str) -> dict[str, Any]:
        """Returns the ``model_deleted`` message (``removed``, ``path``, ``size_bytes``)."""
        deleted = await self._request(messages.DeleteModel(model_name=name), messages.ModelDeleted)
        return deleted.to_wire()

    async def set_config(self, **settings: Any) -> dict[str, Any]:
        """Change this session's generation settings; return all of them as merged.

        The only call that changes the session: they hold for every later answer,
        whereas the ``settings`` of :meth:`inference`, :meth:`stream` and
        :meth:`events` apply to that one answer (the inference's ``config``).
        """
        return (await self._request(messages.Config(data=settings), messages.ConfigAck)).config

    async def reset(self) -> None:
        """Forget the conversation (the session and its settings stay)."""
        await self._request(messages.Reset(), messages.ResetDone)

    async def history(self) -> list[dict[str, str]]:
        return (await self._request(messages.GetHistory(), messages.History)).messages

    async def cancel(self) -> bool:
        """Stop the running answer; it ends with ``finish_reason`` "cancelled"."""
        return (await self._request(messages.Cancel(), messages.CancelAck)).cancelled

    async def subscribe_resources(self, interval: float) -> None:
        """Have ``resources`` reports sent every ``interval`` s into :attr:`notifications`."""
        await self._request(messages.SubscribeResources(interval=interval), messages.Subscribed)

    # -- answers ---------------------------------------------------------------------

    async def events(
        self, prompt: str, system: str = "", **settings: Any
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The protocol events of one answer: ``start``, ``token``..., then ``done`` or ``error``.

        ``settings`` apply to this answer only. The ``done`` is acknowledged so
        the server can drop its buffer.
        """
        generation = await self._start(prompt, system, settings)
        try:
            while True:
                event = await generation.queue.get()
                if isinstance(event, LLMWSError):
                    raise event
                if event["type"] in (messages.Done.TYPE, messages.Error.TYPE):
                    # Settle the answer before handing out its last event: the caller
                    # may stop reading right there (an error raises in stream()).
                    generation.finished = True
                    self._generation = None
                    if event["type"] == messages.Done.TYPE:
                        self.last_done = event
                    await self._acknowledge(event["seq"])
                    yield event
                    return
                yield event
        finally:
            if self._generation is generation:
                self._generation = None
            if not generation.finished and self._ws is not None:
                # Abandoned mid-answer (break, cancellation): stop it on the server too.
                await self._send(messages.Cancel().to_wire())

    async def _acknowledge(self, seq: int) -> None:
        """Let the server drop its buffer up to ``seq``; the answer is complete either way."""
        try:
            await self._request(messages.Ack(seq=seq), messages.AckReceived)
        except LLMWSError as e:
            log.warning("could not acknowledge event %d: %s", seq, e.message)

    async def stream(
        self, prompt: str, system: str = "", **settings: Any
    ) -> AsyncGenerator[str, None]:
        """The answer's text, piece by piece; a server error raises its exception."""
        async with contextlib.aclosing(self.events(prompt, system, **settings)) as events:
            async for event in events:
                typed = messages.GENERATION_EVENTS[event["type"]].from_wire(event)
                if isinstance(typed, messages.Token):
                    yield typed.data
                elif isinstance(typed, messages.Error):
                    raise typed.exception()

    async def inference(self, prompt: str, system: str = "", **settings: Any) -> str:
        """The whole answer to ``prompt`` as one string (the original clients' API)."""
        return "".join([piece async for piece in self.stream(prompt, system, **settings)])

    async def _start(self, prompt: str, system: str, settings: dict[str, Any]) -> _Generation:
        """Send the inference and return once the server has accepted it."""
        message = messages.Inference(
            prompt=messages.Prompt(system=system, user=prompt), config=settings or None
        )
        ping = messages.Ping()
        async with self._lock:
            await self._ensure_connected()
            if self._generation is not None:
                raise Busy("an answer is still streaming on this client: read it or cancel it")
            self._set_aside_unsolicited()
            generation = _Generation()
            self._generation = generation
            # The server answers in order: an error before the pong rejects the inference,
            # a pong alone means it was accepted (its events follow with seqs).
            pending, resent = [message, ping], False
            try:
                while True:
                    try:
                        await self._exchange(pending, messages.Pong)
                    except _Resumed:
                        pending = [ping]  # first read the replay: did the inference arrive?
                        continue
                    except Busy:
                        if resent:
                            break  # the first copy did arrive, and is running
                        raise
                    if pending == [ping] and generation.request_id is None:
                        pending, resent = [message, ping], True
                        generation.taken = False
                        continue
                    break
            except BaseException:
                self._generation = None
                raise
        return generation


# The original LLMWS enhanced client's name for it.
LLMWSEnhancedClient = Client
