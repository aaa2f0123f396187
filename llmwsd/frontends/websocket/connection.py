"""A JSON-mode client connection: hello, welcome, message dispatch, event streaming.

Generation events reach the socket only through the session's buffer (see
sessions.py); direct answers (pong, config_ack, errors about a bad message)
are sent at once and carry no seq. Every bad message is answered with an
``error`` and the connection stays open.

Quick messages are handled in the order they come. The ones that wait (an
inference's admission, a model switch, download or delete) run beside the
message loop, so that a ``cancel``, ``ack`` or ``ping`` is answered meanwhile;
their answers (or errors) come when they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from llmwsd.auth import Identity
from llmwsd.errors import (
    BadRequest,
    Busy,
    Forbidden,
    InternalError,
    LLMWSError,
    RateLimited,
    Unsupported,
)
from llmwsd.frontends.websocket.security import MessageRate, client_address
from llmwsd.protocol import messages, wire
from llmwsd.protocol.close_codes import CloseCode
from llmwsd.sessions.session import Session

if TYPE_CHECKING:
    from llmwsd.catalogue.pull import Pull
    from llmwsd.service.services import Services

log = logging.getLogger("llmwsd.connection")

# Handlers waiting beside the message loop at once, per connection; one more is refused busy.
MAX_WAITING_HANDLERS = 4


# Each handler takes the message its type names (messages.CLIENT_MESSAGES), already checked.
Handler = Callable[[Any], Awaitable[None]]
ModelChange = messages.SwitchModel | messages.DownloadModel | messages.DeleteModel
T = TypeVar("T")

# Model changes asked for by connections that have closed since: they go on (held here).
_detached: set[asyncio.Task[Any]] = set()


def detached(work: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """Await ``work`` in a task of its own, which cancelling the awaiter does not stop.

    A switch must not stop half-way because the client that asked for it left.
    """
    task = asyncio.create_task(work)
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    return asyncio.shield(task)


class JsonConnection:
    def __init__(
        self,
        services: Services,
        ws: ServerConnection,
        peer: str,
        identity: Identity,
        rate: MessageRate,
    ) -> None:
        self.services = services
        self.ws = ws
        self.peer = peer
        self.address = client_address(ws)
        self.identity = identity
        self.rate = rate
        self.session: Session | None = None
        self._streamer: asyncio.Task[None] | None = None
        self._resources: asyncio.Task[None] | None = None
        self._model_tasks: set[asyncio.Task[None]] = set()  # switch logs, download forwarding
        self._waiting: set[asyncio.Task[None]] = set()  # handlers running beside the loop
        self._closing: asyncio.Task[None] | None = None
        self._closed = False
        self.handlers: dict[str, Handler] = {
            messages.Ping.TYPE: self.on_ping,
            messages.Config.TYPE: self.on_config,
            messages.Inference.TYPE: self.on_inference,
            messages.Cancel.TYPE: self.on_cancel,
            messages.Ack.TYPE: self.on_ack,
            messages.Reset.TYPE: self.on_reset,
            messages.GetHistory.TYPE: self.on_history,
            messages.GetResources.TYPE: self.on_get_resources,
            messages.SubscribeResources.TYPE: self.on_subscribe_resources,
            messages.GetStatus.TYPE: self.on_get_status,
            messages.ListModels.TYPE: self.on_list_models,
            messages.RecheckModel.TYPE: self.on_recheck_model,
            messages.SwitchModel.TYPE: self.on_model_management,
            messages.DownloadModel.TYPE: self.on_model_management,
            messages.DeleteModel.TYPE: self.on_model_management,
            messages.Train.TYPE: self.on_unsupported,
            messages.TrainStatus.TYPE: self.on_unsupported,
            messages.SaveSnapshot.TYPE: self.on_unsupported,
        }

    async def send(self, message: messages.Message) -> None:
        """The one place a direct answer becomes a frame (buffered events: :meth:`_stream`)."""
        await self.ws.send(wire.encode_message(message.to_wire()))

    async def send_error(self, error: LLMWSError, **extra: Any) -> None:
        await self.send(messages.Error.from_exception(error, **extra))

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, hello: dict[str, Any], hello_error: LLMWSError | None = None) -> None:
        """Welcome first, then the buffered events, then messages until the client leaves."""
        try:
            try:
                session, resumed, asked = self._attach(hello)
            except BadRequest as e:
                # A malformed hello: carry on with a fresh session and say why after the welcome.
                hello_error, hello = e, {}
                session, resumed, asked = self._attach({})
        except Busy as e:
            # Every session slot is in use: no session to welcome into (1013: try again later).
            await self.send_error(e)
            await self.ws.close(CloseCode.TRY_AGAIN_LATER, e.message[:120])
            return
        self.session = session
        log.info("%s: session %s (%s)", self.peer, session.id, "resumed" if resumed else "new")
        welcome = self.services.reports.welcome(session, resumed)
        # A last_seq past the session's newest event would wait forever for events it
        # claims to have: stream from the newest one instead, and say so.
        last_seq = asked if asked is None else min(asked, welcome.last_seq)
        if last_seq != asked:
            welcome = dataclasses.replace(welcome, last_seq_clamped=asked)
        await self.send(welcome)
        if hello_error is not None:
            await self.send_error(hello_error)
        self._streamer = asyncio.create_task(self._stream(session, last_seq))
        try:
            if "type" in hello:
                await self.dispatch(hello)
            await self._receive()
        except ConnectionClosed:
            pass
        finally:
            await self.close()

    async def _receive(self) -> None:
        """Handle frames until the client leaves or stays idle too long with nothing running."""
        idle_timeout = self.services.config().limits.idle_timeout or None
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    frame = await self.ws.recv()
            except TimeoutError:
                if self._waiting or (self.session is not None and self.session.running is not None):
                    continue  # waiting for an answer is not idleness
                await self.ws.close(CloseCode.NORMAL, f"idle for {idle_timeout:g} s")
                return
            await self.dispatch_frame(frame)

    def _attach(self, hello: dict[str, Any]) -> tuple[Session, bool, int | None]:
        asked = messages.Hello.from_wire(hello)
        session_id, last_seq = asked.session_id, asked.last_seq
        session = self.services.sessions.get(session_id) if session_id else None
        if session is not None and session.token_id != self.identity.token_id:
            # Another token's session: as good as unknown, without saying whether it exists.
            log.info("%s: refused to resume a session made with another token", self.peer)
            session = None
        resumed = session is not None
        if session is None:
            session = self.services.sessions.create(self.identity.token_id, self.address)
            last_seq = None
        previous = session.owner
        session.owner = self
        session.touch()
        if previous is not None and previous is not self:
            previous.detach(CloseCode.TAKEN_OVER, "session taken over by another connection")
        return session, resumed, last_seq

    def detach(self, code: int, reason: str) -> None:
        """Stop streaming this connection's session and close it with ``reason``."""
        log.info("%s: session %s: %s", self.peer, self.session and self.session.id, reason)
        self.session = None
        if self._streamer is not None:
            self._streamer.cancel()
        # Closing waits for the client's answer: do it beside the caller, not inside it.
        self._closing = asyncio.create_task(self.ws.close(code, reason))

    async def close(self) -> None:
        self._closed = True  # nothing new is spawned from here on
        for task in (self._streamer, self._resources, *self._waiting, *self._model_tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
        if self.session is not None and self.session.owner is self:
            self.session.owner = None
            self.session.touch()

    async def _stream(self, session: Session, last_seq: int | None) -> None:
        """Send the session's events after ``last_seq``, then live ones, in seq order."""
        with contextlib.suppress(ConnectionClosed):
            async for event in session.stream_from(last_seq):
                # The session buffers (and logs) its events on their wire form already.
                await self.ws.send(wire.encode_message(event))

    # -- dispatch --------------------------------------------------------------------

    async def dispatch_frame(self, frame: str | bytes) -> None:
        try:
            if not self.rate.allow():
                limits = self.services.config().limits
                raise RateLimited(
                    f"too many messages: at most {limits.messages_per_second:g} per second "
                    f"(bursts of {limits.message_burst}); this one was dropped"
                )
            message = wire.decode_message(frame)
        except LLMWSError as e:
            await self.send_error(e)
            return
        await self.dispatch(message)

    async def dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        async with self._errors_answered(kind):
            definition = messages.client_message_class(kind)
            if self.session is None:
                raise BadRequest("this connection no longer owns a session")
            self.session.touch()
            await self.handlers[definition.TYPE](definition.from_wire(message))

    @contextlib.asynccontextmanager
    async def _errors_answered(self, kind: Any) -> AsyncIterator[None]:
        """Answer what the block raises as an ``error``; the connection stays open."""
        try:
            yield
        except LLMWSError as e:
            await self.send_error(e)
        except ConnectionClosed:
            raise
        except Exception:
            log.error("%s: %s failed", self.peer, str(kind)[:64], exc_info=True)
            await self.send_error(
                InternalError(f"internal error while handling {str(kind)[:64]!r}")
            )

    def _make_room(self, kind: str) -> None:
        """Busy when this connection has as many handlers waiting as it may."""
        if len(self._waiting) >= MAX_WAITING_HANDLERS:
            raise Busy(
                f"{MAX_WAITING_HANDLERS} requests of this connection are still waiting; "
                f"send {kind} again once one is answered"
            )

    def _beside(self, kind: str, work: Callable[[], Awaitable[None]]) -> None:
        """Await ``work()`` beside the message loop (after :meth:`_make_room`).

        ``work`` is called in the task, so a task cancelled before it began (its
        connection closed at once) leaves nothing behind un-awaited.
        """

        async def run() -> None:
            with contextlib.suppress(ConnectionClosed):
                async with self._errors_answered(kind):
                    await work()

        task = asyncio.create_task(run())
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    @property
    def current(self) -> Session:
        assert self.session is not None  # dispatch checks it
        return self.session

    # -- handlers --------------------------------------------------------------------

    async def on_ping(self, request: messages.Ping) -> None:
        await self.send(messages.Pong())

    async def on_config(self, request: messages.Config) -> None:
        self.current.set_settings(self.current.settings.merge(request.data))
        await self.send(messages.ConfigAck(config=self.current.settings.to_dict()))

    async def on_inference(self, request: messages.Inference) -> None:
        prompt = {"system": request.prompt.system, "user": request.prompt.user}
        length = len(prompt["system"]) + len(prompt["user"])
        limit = self.services.config().limits.max_prompt_chars
        if length > limit:
            raise BadRequest(f"prompt too long: {length} characters, at most {limit}")
        self._make_room(request.TYPE)
        # Taken from the session now (busy, settings, history); admitted beside the loop.
        admitting = self.services.generation.start_turn(self.current, prompt, request.config)
        self._beside(request.TYPE, lambda: asyncio.shield(admitting))

    async def on_cancel(self, request: messages.Cancel) -> None:
        running = self.current.running
        if running is None or running.cancel is None:
            await self.send(messages.CancelAck(cancelled=False))
            return
        running.request_cancel()
        await self.send(messages.CancelAck(cancelled=True, request_id=running.request_id))

    async def on_ack(self, request: messages.Ack) -> None:
        through, dropped = self.current.ack(request.seq)
        await self.send(messages.AckReceived(seq=through, dropped=dropped))

    async def on_reset(self, request: messages.Reset) -> None:
        self.current.reset()
        await self.send(messages.ResetDone())

    async def on_history(self, request: messages.GetHistory) -> None:
        await self.send(messages.History(messages=self.current.history()))

    async def on_get_resources(self, request: messages.GetResources) -> None:
        await self.send(messages.Resources(report=await self.services.reports.resources()))

    async def on_subscribe_resources(self, request: messages.SubscribeResources) -> None:
        if self._resources is not None:
            self._resources.cancel()
            self._resources = None
        if request.interval:
            self._resources = asyncio.create_task(self._send_resources(float(request.interval)))
        await self.send(messages.Subscribed(interval=request.interval))

    async def _send_resources(self, interval: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.send(messages.Resources(report=await self.services.reports.resources()))
                await asyncio.sleep(interval)

    async def on_get_status(self, request: messages.GetStatus) -> None:
        await self.send(messages.Status(**self.services.reports.status()))

    async def on_list_models(self, request: messages.ListModels) -> None:
        await self.send(messages.ModelsList(models=await self.services.reports.list_models()))

    async def on_recheck_model(self, request: messages.RecheckModel) -> None:
        models = await self.services.reports.list_models()
        await self.send(messages.RecheckComplete(models=models))

    async def on_model_management(self, request: ModelChange) -> None:
        """switch/download/delete: only where the operator allows it, and with an admin token."""
        kind = request.TYPE
        if not self.services.config().api.allow_model_management:
            raise Forbidden(
                f"{kind} changes the server for everyone and is not allowed on the public "
                "port; the operator can use llmwsctl"
            )
        if not self.identity.admin:
            raise Forbidden(f"{kind} needs an admin token ([api] admin_tokens_file)")
        log.info("%s: %s by admin token %s", self.peer, kind, self.identity.token_id)
        self._make_room(kind)
        self._beside(kind, lambda: self._change_models(request))

    async def _change_models(self, request: ModelChange) -> None:
        manager = self.services.models
        if isinstance(request, messages.SwitchModel):

            def report(progress: dict[str, Any]) -> None:
                self._spawn(self.send(messages.Log(message=progress.get("message", ""))))

            if request.model_path is not None:
                switch = manager.switch(progress=report, path=request.model_path)
            else:
                switch = manager.switch(request.model, report)
            result = await detached(switch)
            await self.send(messages.ModelSwitched(result=result))
        elif isinstance(request, messages.DownloadModel):
            pull = await detached(
                manager.pulls.start(
                    request.repo,
                    request.target_dir,  # absent: the source's name; else it is checked
                    request.revision,
                    host_access=False,  # a remote client must not reach this host's files or keys
                )
            )
            await self.send(
                messages.DownloadStarted(id=pull.id, repo=pull.source.location, name=pull.name)
            )
            self._spawn(self._forward_download(pull))
        else:
            result = await detached(manager.remove(request.model_name, request.force))
            await self.send(messages.ModelDeleted(result=result))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            work.close()  # e.g. a switch's progress after its client left: nobody to tell
            return

        async def run() -> None:
            with contextlib.suppress(ConnectionClosed):
                await work

        task = asyncio.create_task(run())
        self._model_tasks.add(task)
        task.add_done_callback(self._model_tasks.discard)

    async def _forward_download(self, pull: Pull) -> None:
        """``log`` on each new stage, ``download_progress``, then ``download_done`` or ``error``."""
        updates: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def follow() -> dict[str, Any]:
            try:
                return await self.services.models.pulls.follow(pull, updates.put_nowait)
            finally:
                updates.put_nowait(None)

        outcome = asyncio.create_task(follow())
        # This connection may go first; the pull goes on and its outcome is logged there.
        outcome.add_done_callback(lambda task: task.cancelled() or task.exception())
        stage = None
        with contextlib.suppress(ConnectionClosed):
            while (progress := await updates.get()) is not None:
                if progress["message"] != stage:
                    stage = progress["message"]
                    await self.send(messages.Log(id=pull.id, message=stage))
                await self.send(messages.DownloadProgress(progress=progress))
            try:
                result = await outcome
            except LLMWSError as e:
                await self.send_error(e, id=pull.id)
            else:
                await self.send(messages.DownloadDone(result=result))

    async def on_unsupported(self, request: messages.Message) -> None:
        raise Unsupported(f"{request.TYPE} is not supported by llmwsd")
