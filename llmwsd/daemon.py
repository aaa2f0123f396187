"""The daemon: lifecycle and wiring. Start, reload, shut down; nothing else.

The parts, from the top down: the frontends (the public port, the admin socket)
call the service (:mod:`llmwsd.service`: the model slot and its changes, the
generation path, the reports), which drives the engine and the sessions.

Start-up order: the port, folders, the admin socket, sessions, the model (READY=1
only once it is loaded), then serve until SIGTERM/SIGINT. :meth:`Daemon.shutdown`
is the one idempotent way out: stop listening, close clients with 1001, let
running generations finish within ``[server] drain_timeout``, free the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import signal
import time
from typing import Any

from llmwsd.auth import Authenticator
from llmwsd.catalogue import models
from llmwsd.config import Config, load_config
from llmwsd.engines.loader import load_engine
from llmwsd.errors import ConfigError, LLMWSError
from llmwsd.frontends.admin.server import AdminServer
from llmwsd.frontends.websocket.server import PublicServer
from llmwsd.metrics import Metrics
from llmwsd.service import defaults
from llmwsd.service.generation import GenerationService
from llmwsd.service.health import HealthMonitor
from llmwsd.service.model_changes import EngineLoader, ModelChanges
from llmwsd.service.model_slot import ModelSlot, ModelState
from llmwsd.service.reports import Reports
from llmwsd.service.services import Services
from llmwsd.sessions.registry import SessionStore
from llmwsd.systemd import Notifier

log = logging.getLogger("llmwsd")

# systemd's start timeout is extended by this much, again and again, while a model loads.
LOAD_TIMEOUT_EXTENSION_S = 90.0


class Daemon:
    def __init__(
        self,
        config: Config,
        engine_loader: EngineLoader = load_engine,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.defaults = defaults.resolve(config, {})
        self.sessions = SessionStore(self.defaults.settings, config.sessions, config.state_dir)
        # Every model change comes back here: new sessions get that model's defaults.
        self.slot = ModelSlot(config.limits, self._refresh_defaults)
        self.models = ModelChanges(self.slot, lambda: self.config, engine_loader, self._status)
        self.health_monitor = HealthMonitor(lambda: self.slot.engine, config.engine.stuck_timeout)
        self.reports = Reports(
            self.slot,
            self.sessions,
            lambda: self.config,
            lambda: self.defaults,
            self.health_monitor,
        )
        self.metrics = Metrics(self.reports.live_figures)
        self.generation = GenerationService(self.slot, config.limits, self.metrics)
        api = config.api
        services = Services(
            config=lambda: self.config,
            defaults=lambda: self.defaults,
            sessions=self.sessions,
            slot=self.slot,
            models=self.models,
            generation=self.generation,
            reports=self.reports,
            metrics=self.metrics,
            auth=Authenticator(api.tokens_file, api.admin_tokens_file, api.max_auth_failures),
        )
        self.server = PublicServer(services)
        self.admin = AdminServer(services, self.reload, self._listen_address)
        self._stop_requested = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None

    def _refresh_defaults(self, recommended: dict[str, Any]) -> None:
        fresh = defaults.resolve(self.config, recommended)
        if fresh != self.defaults:
            log.info("generation defaults for new sessions: %s", fresh.describe())
        self.defaults = fresh
        self.sessions.default_settings = fresh.settings

    def _listen_address(self) -> str:
        return f"{self.server.scheme}://{self.config.server.host}:{self.server.port}/"

    def _status(self, text: str | None) -> None:
        self.notifier.status(text if text is not None else self.reports.status_line())

    # -- lifecycle -------------------------------------------------------------------

    def prepare_folders(self) -> None:
        for folder in (self.config.state_dir / "models", self.config.runtime_dir):
            folder.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        """Everything up to READY=1: the port, folders, the admin socket, sessions, the model."""
        # The port first, before anything is written: a busy one stops here, leaving no trace.
        await self.bind_port()
        self.prepare_folders()
        self.models.pulls.open()
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
        self.health_monitor.start()
        self.notifier.start_watchdog(alive=self.health_monitor.alive)
        await self.load_initial_model()
        self.notifier.ready(self.reports.status_line())
        self._status_task = asyncio.create_task(self._refresh_status())
        log.info(
            "ready: %s; the web page is at %s", self.reports.status_line(), self.server.page_url
        )

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
        drain = self.config.server.drain_timeout
        draining_since = time.monotonic()
        await self.server.close(drain)  # HTTP requests finish first, within the drain timeout
        await self.admin.close()
        await self.models.pulls.close()  # their staging stays: pulled again, they resume
        self.slot.close()
        engine = self.slot.vacate(ModelState.NONE)
        if engine is not None:
            drain = max(0.0, drain - (time.monotonic() - draining_since))
            log.info("draining running generations (up to %g s)", drain)
            await engine.drain(drain)
            await engine.close()
        await self.sessions.close()
        self.notifier.stop_watchdog()
        await self.health_monitor.close()
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
            self._refresh_defaults(self.slot.recommended)
            self.sessions.config = self.config.sessions  # read at every use: safe to swap
            log.info("configuration reloaded from %s", self.config.source or "defaults")
            report["needs_restart"] = needs_restart
        self.admin.reload()
        try:
            self.server.reload_credentials()
        except (OSError, ValueError, LLMWSError) as e:
            log.error("reload: keeping the previous tokens and TLS files: %s", e)
            report["error"] = report["error"] or str(e)
        self.notifier.ready(self.reports.status_line())
        return report

    # -- the model -------------------------------------------------------------------

    async def load_initial_model(self) -> None:
        remembered = models.remembered_model(self.config.state_dir)
        path = await asyncio.to_thread(models.select_model, self.config, remembered)
        if path is None:
            self.slot.vacate(ModelState.NONE)
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
            engine = await self.models.loader(self.config, path)
        except Exception as e:
            self.slot.vacate(ModelState.FAILED, f"{path.name} failed to load: {e}")
            log.error("loading %s failed; serving without a model", path, exc_info=True)
            return
        finally:
            extender.cancel()
        await self.slot.serve(engine)
        info = engine.info
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

    async def _refresh_status(self) -> None:
        last = ""
        while True:
            line = self.reports.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            await asyncio.sleep(2)


class StartFailed(Exception):
    """The daemon could not start; the reason (its ``__cause__``) is logged already."""
