"""The daemon: owns the configuration, the engine, the sessions and the listeners.

Start-up order: folders, public socket, model (READY=1 only once it is
loaded), then serve until SIGTERM/SIGINT. :meth:`Daemon.shutdown` is the one
idempotent way out: stop listening, close clients with 1001, let running
generations finish within ``[server] drain_timeout``, free the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from llmwsd import __version__, resources
from llmwsd.catalogue import models
from llmwsd.config import Config, load_config
from llmwsd.engines.interface import (
    EngineLike,
    EventCallback,
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    GenerationSettings,
)
from llmwsd.errors import ConfigError, LLMWSError, NoModel
from llmwsd.frontends.admin.server import AdminServer
from llmwsd.frontends.websocket.server import PublicServer
from llmwsd.metrics import Metrics
from llmwsd.protocol.wire import PROTOCOL_VERSION
from llmwsd.service import defaults
from llmwsd.service.admission import Admission, QueuedCallback, Ticket
from llmwsd.service.model_changes import ModelManager
from llmwsd.sessions.session import RunningGeneration, Session, SessionStore
from llmwsd.systemd import Notifier

log = logging.getLogger("llmwsd")

EngineLoader = Callable[[Config, Path], Awaitable[EngineLike]]

# systemd's start timeout is extended by this much, again and again, while a model loads.
LOAD_TIMEOUT_EXTENSION_S = 90.0


async def load_transformers_engine(config: Config, path: Path) -> EngineLike:
    from llmwsd.engines.transformers.engine import (
        Engine,  # torch is imported only when a model is loaded
    )

    return await Engine.load(config, path)


class Daemon:
    def __init__(
        self,
        config: Config,
        engine_loader: EngineLoader = load_transformers_engine,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.engine_loader = engine_loader
        self.notifier = notifier or Notifier()
        self.metrics = Metrics(self.live_figures)
        self._engine: EngineLike | None = None
        self.defaults = defaults.resolve(config, {})
        self.sessions = SessionStore(self.defaults.settings, config.sessions, config.state_dir)
        self._admission: Admission | None = None
        self.model_state = "loading"  # loading, ready, none, failed
        self.model_error = ""
        self.started_at = time.time()
        self.server = PublicServer(self)
        self.admin = AdminServer(self)
        self.model_manager = ModelManager(self)
        self._stop_requested = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None

    @property
    def engine(self) -> EngineLike | None:
        return self._engine

    @engine.setter
    def engine(self, engine: EngineLike | None) -> None:
        """Every model change goes through here: new sessions get that model's defaults."""
        self._engine = engine
        self._refresh_defaults()

    @property
    def default_settings(self) -> GenerationSettings:
        return self.defaults.settings

    def _refresh_defaults(self) -> None:
        recommended = self._engine.info.recommended if self._engine is not None else {}
        fresh = defaults.resolve(self.config, recommended)
        if fresh != self.defaults:
            log.info("generation defaults for new sessions: %s", fresh.describe())
        self.defaults = fresh
        self.sessions.default_settings = fresh.settings

    # -- lifecycle -------------------------------------------------------------------

    def prepare_folders(self) -> None:
        for folder in (self.config.state_dir / "models", self.config.runtime_dir):
            folder.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        """Everything up to READY=1: the port, folders, the admin socket, sessions, the model."""
        # The port first, before anything is written: a busy one stops here, leaving no trace.
        await self.bind_port()
        self.prepare_folders()
        self.model_manager.pulls.open()
        # Then the admin socket: a second daemon on this runtime folder stops here.
        await self.admin.start()
        await self.sessions.open()  # before clients come, so that they can resume
        await self.server.start_serving()
        log.info(
            "listening on %s://%s:%d (state %s, runtime %s)",
            self.server.scheme,
            self.config.server.host,
            self.server.port,
            self.config.state_dir.resolve(),
            self.config.runtime_dir.resolve(),
        )
        self.notifier.start_watchdog()
        await self.load_initial_model()
        self.notifier.ready(self.status_line())
        self._status_task = asyncio.create_task(self._refresh_status())
        log.info("ready: %s; the web page is at %s", self.status_line(), self.server.page_url)

    async def bind_port(self) -> None:
        try:
            await self.server.bind()
        except OSError as e:
            server = self.config.server
            where = f"{server.host}:{server.port}"
            if e.errno == errno.EADDRINUSE:
                reason = f"port {server.port} is in use on {server.host} (another llmwsd?)"
            else:
                reason = f"cannot listen on {where} ({e.strerror or e})"
            raise ConfigError(
                f"{reason}: choose another with llmwsd --port, or [server] port (or host) "
                f"in {self.config.source or 'the configuration'}"
            ) from None

    async def run(self) -> None:
        """Serve until a stop signal, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            startup = asyncio.create_task(self.start())
            stop = asyncio.create_task(self._stop_requested.wait())
            await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
            if startup.done():
                try:
                    startup.result()
                except (OSError, LLMWSError) as e:
                    # Said first, so that the log's last words ("stopped") come after it.
                    log.error("cannot start: %s", e.message if isinstance(e, LLMWSError) else e)
                    raise StartFailed(str(e)) from e
                await stop
            else:
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await startup
        finally:
            await self.shutdown()

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        if sig is not None:
            log.info("received %s, shutting down", sig.name)
        self._stop_requested.set()

    async def shutdown(self) -> None:
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        if self._status_task is not None:
            self._status_task.cancel()
        await self.server.close()
        await self.admin.close()
        await self.model_manager.pulls.close()  # their staging stays: pulled again, they resume
        if self._admission is not None:
            self._admission.close()
        engine, self.engine = self.engine, None
        if engine is not None:
            drain = self.config.server.drain_timeout
            log.info("draining running generations (up to %g s)", drain)
            await engine.drain(drain)
            await engine.close()
        await self.sessions.close()
        self.notifier.stop_watchdog()
        log.info("stopped")

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and apply what is safe to change while running (SIGHUP).

        Returns what happened, for llmwsctl: ``source``, ``needs_restart`` (sections
        that changed but apply only at start) and ``error`` (the ConfigError, if any).
        """
        self.notifier.reloading()
        report: dict[str, Any] = {"source": self.config.source, "needs_restart": [], "error": None}
        try:
            new = load_config(self.config.source) if self.config.source else self.config
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e.message)
            report["error"] = e.message
        else:
            needs_restart = [
                name
                # Read once at start (the gate, admission and the listener keep them).
                for name in ("server", "paths", "model", "engine", "memory", "limits", "api")
                if getattr(new, name) != getattr(self.config, name)
            ]
            if needs_restart:
                log.warning(
                    "reload: [%s] changed; restart llmwsd to apply", "], [".join(needs_restart)
                )
            self.config = dataclasses.replace(
                self.config,
                generation_defaults=new.generation_defaults,
                models=new.models,
                sessions=new.sessions,
            )
            self._refresh_defaults()
            self.sessions.config = self.config.sessions  # read at every use: safe to swap
            log.info("configuration reloaded from %s", self.config.source or "defaults")
            report["needs_restart"] = needs_restart
        self.admin.reload()
        try:
            self.server.reload_credentials()
        except (OSError, ValueError, LLMWSError) as e:
            log.error("reload: keeping the previous tokens and TLS files: %s", e)
            report["error"] = report["error"] or str(e)
        self.notifier.ready(self.status_line())
        return report

    # -- the model -------------------------------------------------------------------

    async def load_initial_model(self) -> None:
        remembered = models.remembered_model(self.config.state_dir)
        path = await asyncio.to_thread(models.select_model, self.config, remembered)
        if path is None:
            self.model_state = "none"
            log.warning(
                "no model found in %s: serving without one",
                ", ".join(str(d) for d in self.config.model_dirs),
            )
            return
        self.notifier.status(f"loading {path.name}")
        self.notifier.extend_timeout(LOAD_TIMEOUT_EXTENSION_S)
        extender = asyncio.create_task(self._extend_start_timeout())
        started = time.monotonic()
        try:
            self.engine = await self.engine_loader(self.config, path)
        except Exception as e:
            self.model_state, self.model_error = "failed", f"{path.name} failed to load: {e}"
            log.error("loading %s failed; serving without a model", path, exc_info=True)
            return
        finally:
            extender.cancel()
        self.model_state = "ready"
        info = self.engine.info
        self.metrics.model_load_seconds.set(time.monotonic() - started)
        log.info(
            "loaded %s on %s (%s, %s attention, max context %d) in %.1f s",
            info.name,
            info.device,
            info.dtype,
            info.attention,
            info.max_context,
            time.monotonic() - started,
        )

    async def _extend_start_timeout(self) -> None:
        while True:
            await asyncio.sleep(LOAD_TIMEOUT_EXTENSION_S / 3)
            self.notifier.extend_timeout(LOAD_TIMEOUT_EXTENSION_S)

    def no_model_reason(self) -> str:
        if self.model_state == "loading":
            return "the model is still loading; retry in a moment"
        if self.model_state == "failed":
            return self.model_error
        return "no model is loaded: add one to a model folder or pull one with llmwsctl"

    def require_engine(self) -> EngineLike:
        if self.engine is None:
            raise NoModel(self.no_model_reason())
        return self.engine

    # -- generations -----------------------------------------------------------------

    def start_generation(
        self, session: Session, prompt: dict[str, str], overrides: Any = None
    ) -> asyncio.Task[None]:
        """Reserve ``session`` for one turn now; the returned task admits and submits it.

        What the turn takes from the session (its settings, the history, the system
        message, whether another turn runs: Busy) is taken here, synchronously, so a
        message handled after this one cannot change it. The task waits out a switch,
        fits the context and goes through admission; a refusal is its exception, and
        leaves the session as it was. A cancel before the turn has a ticket cancels the
        task, and the turn ends ``cancelled`` without reaching the engine. The task is
        no connection's: like the turn itself, it goes on when the client leaves.
        """
        settings = session.settings.merge(overrides) if overrides is not None else session.settings
        running = session.begin_generation(prompt["user"], prompt["system"])
        history = session.history()
        task = asyncio.create_task(self._admit(session, running, history, prompt["user"], settings))
        running.attach_cancel(task.cancel)

        def settle(task: asyncio.Task[None]) -> None:
            # A cancelled task may not have run a line (a cancel right after the inference).
            if not task.cancelled():
                task.exception()  # the caller answers it; retrieved here if the caller left
            elif running.cancel_requested:
                session.on_generation_event(running, Finished(0, "cancelled", 0.0, 0.0))
            else:
                session.abandon_generation(running)

        task.add_done_callback(settle)
        return task

    async def _admit(
        self,
        session: Session,
        running: RunningGeneration,
        history: list[dict[str, str]],
        user: str,
        settings: GenerationSettings,
    ) -> None:
        """The waiting part of :meth:`start_generation`: its events flow into the session."""

        def on_event(event: GenerationEvent) -> None:
            session.on_generation_event(running, event)

        def on_queued(position: int) -> None:
            message = {"type": "queued", "request_id": running.request_id, "position": position}
            session.append_event(message)

        try:
            await self.model_manager.wait_settled()  # during a switch that had to unload first
            engine = self.require_engine()
            messages, dropped, tokens = await asyncio.to_thread(
                fit_context, engine, history, user, settings
            )
            running.dropped_turns = dropped
            request = GenerationRequest(messages, settings, running.request_id)
            who = f"session {session.id} {running.request_id}"
            ticket = await self.submit(request, on_event, on_queued, tokens, who)
        except Exception:
            session.abandon_generation(running)
            raise
        granted = ticket.request.settings.max_new_tokens
        if granted < settings.max_new_tokens:
            running.requested_max_tokens = settings.max_new_tokens
        running.attach_cancel(ticket.cancel)

    @property
    def admission(self) -> Admission:
        """The loaded engine's admission control (a new engine starts with a fresh one)."""
        engine = self.require_engine()
        if self._admission is None or self._admission.engine is not engine:
            self._admission = Admission(engine, self.config.limits, engine.info.memory)
        return self._admission

    async def submit(
        self,
        request: GenerationRequest,
        on_event: EventCallback,
        on_queued: QueuedCallback | None = None,
        prompt_tokens: int | None = None,
        who: str = "a request",
    ) -> Ticket:
        """Admit ``request`` (now, or after the memory queue) and run it on the engine.

        Refusals (context_too_long, busy) are raised before any compute. A
        ``max_new_tokens`` that does not fit is lowered in the returned ticket's
        request when ``[limits] on_overflow`` is "truncate".
        """
        await self.model_manager.wait_settled()
        try:
            admission = self.admission
            if prompt_tokens is None:
                prompt_tokens = await asyncio.to_thread(
                    admission.engine.count_tokens, request.messages
                )
            settings = request.settings
            allowed = admission.allowed_new_tokens(prompt_tokens, settings.max_new_tokens)
            if allowed < settings.max_new_tokens:
                settings = dataclasses.replace(
                    settings,
                    max_new_tokens=allowed,
                    min_new_tokens=min(settings.min_new_tokens, allowed),
                )
                request = dataclasses.replace(request, settings=settings)
            observe = self.metrics.track()
            outcome = log_outcome(who, prompt_tokens)

            def deliver(event: GenerationEvent) -> None:
                observe(event)
                outcome(event)
                on_event(event)

            return admission.submit(request, prompt_tokens, deliver, on_queued or (lambda _: None))
        except LLMWSError as e:
            self.metrics.refused(e)
            log.info("%s: refused (%s)", who, e.code)
            raise

    # -- reports ---------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        if self.engine is not None:
            return True, {"status": "ok", "model": self.engine.info.name}
        return False, {"status": self.model_state, "model": None, "reason": self.no_model_reason()}

    def status_line(self) -> str:
        n = len(self.sessions)
        sessions = f"{n} session{'s' if n != 1 else ''}"
        if self.engine is None:
            return f"no model ({self.model_state}), {sessions}"
        return f"serving {self.engine.info.name} on {self.engine.info.device}, {sessions}"

    async def _refresh_status(self) -> None:
        last = ""
        while True:
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            await asyncio.sleep(2)

    def engine_figures(self) -> dict[str, Any]:
        """The engine's live figures; empty without a model."""
        engine = self.engine
        if engine is None:
            return {}
        stats = engine.stats()
        admission = self.admission.stats()
        memory = engine.info.memory
        return {
            "model": engine.info.name,
            "device": engine.info.device,
            "dtype": engine.info.dtype,
            "max_context": engine.info.max_context,
            "kv_bytes_per_token": memory.layout.bytes_per_token if memory else None,
            **stats,
            **admission,
            # Waiting for memory (admission) or for a batch slot (the engine).
            "queued": stats.get("queued", 0) + admission["waiting_for_memory"],
            "memory": memory.to_dict() if memory else None,
        }

    def live_figures(self) -> dict[str, Any]:
        """What /metrics reads at scrape time."""
        engine = self.engine_figures()
        return {
            "active": engine.get("active", 0),
            "queued": engine.get("queued", 0),
            "sessions": len(self.sessions),
            "max_context": engine.get("max_context", 0),
            "kv_usage_ratio": engine.get("kv_usage_ratio", 0.0),
            "prefix_cache": engine.get("prefix_cache"),
            "gpus": resources.GPUS.report()[0],
        }

    def status(self) -> dict[str, Any]:
        engine = self.engine_figures()
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "model": engine.get("model"),
            "model_state": self.model_state,
            "device": engine.get("device"),
            "max_context": engine.get("max_context"),
            "sessions": len(self.sessions),
            "queue": engine.get("queued", 0),
            "active": engine.get("active", 0),
            "memory": resources.host_report(),
            "context_limit": engine.get("memory"),
        }

    def device(self) -> str:
        return self.engine.info.device if self.engine is not None else "cpu"

    async def resources(self) -> dict[str, Any]:
        report = await asyncio.to_thread(resources.report, self.device())
        engine = self.engine_figures()
        if engine:
            report["engine"] = engine
        return report

    def welcome(self, session: Session, resumed: bool) -> dict[str, Any]:
        engine = self.engine
        return {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "server": f"llmwsd/{__version__}",
            "session_id": session.id,
            "resumed": resumed,
            # The newest event's seq at this moment: what a resuming client's replay ends at.
            "last_seq": session.next_seq - 1,
            "model": engine.info.name if engine else None,
            "model_state": self.model_state,
            "capabilities": engine.info.capabilities() if engine else {"device": self.device()},
            "resources": resources.report(self.device()),
            "config": session.settings.to_dict(),
            # Where each default of a new session comes from: llmws, the model or the config.
            "defaults_from": self.defaults.sources,
        }

    async def list_models(self) -> list[dict[str, Any]]:
        entries = await asyncio.to_thread(models.scan, self.config.model_dirs)
        loaded = Path(self.engine.info.path) if self.engine is not None else None
        return [entry.to_dict(loaded) for entry in entries]


class StartFailed(Exception):
    """The daemon could not start; the reason (its ``__cause__``) is logged already."""


def log_outcome(who: str, tokens_in: int) -> Callable[[GenerationEvent], None]:
    """One log line when a request ends: its size, speed and outcome, never its text."""

    def observe(event: GenerationEvent) -> None:
        if isinstance(event, Finished):
            log.info(
                "%s: %s, %d tokens in, %d out, %.1f tokens/s, first token after %.0f ms",
                who,
                event.finish_reason,
                tokens_in,
                event.total_tokens,
                event.tokens_per_s,
                event.ttft_ms,
            )
        elif isinstance(event, Failed):
            log.info("%s: ended with %s, %d tokens in", who, event.error.code, tokens_in)

    return observe


def fit_context(
    engine: EngineLike, history: list[dict[str, str]], user: str, settings: GenerationSettings
) -> tuple[list[dict[str, str]], int, int]:
    """The messages to send: drop the oldest turns (never the system message) until they fit.

    Room is left for the answer: up to max_new_tokens, but at most half the context,
    so a huge max_new_tokens does not erase the whole conversation. Returns the
    messages, how many turns were dropped, and the messages' length in tokens.
    """
    max_context = engine.info.max_context
    budget = max_context - min(settings.max_new_tokens, max_context // 2)
    system = [m for m in history if m["role"] == "system"]
    turns = [m for m in history if m["role"] != "system"]
    dropped = 0
    while True:
        messages = [*system, *turns, {"role": "user", "content": user}]
        tokens = engine.count_tokens(messages)
        if not turns or tokens <= budget:
            return messages, dropped, tokens
        # Drop a whole exchange (user + assistant) at a time.
        turns = turns[2:]
        dropped += 1
