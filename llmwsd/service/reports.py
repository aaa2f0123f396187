"""What the daemon tells about itself: health, status, resources, the welcome, the models.

Read by the public port (welcome, get_status, get_resources, /healthz, /metrics),
the admin socket (status, resources, models) and the service manager's status
line. Reports only read; blocking parts (NVML, the model folders) run in worker
threads, and the welcome and /metrics take the latest resources measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmwsd import __version__, resources
from llmwsd.catalogue import models
from llmwsd.config import Config
from llmwsd.protocol import messages
from llmwsd.protocol.wire import PROTOCOL_VERSION
from llmwsd.service.defaults import Defaults
from llmwsd.service.health import HealthMonitor
from llmwsd.service.model_slot import ModelSlot
from llmwsd.sessions.registry import SessionStore
from llmwsd.sessions.session import Session


class Reports:
    def __init__(
        self,
        slot: ModelSlot,
        sessions: SessionStore,
        config: Callable[[], Config],
        defaults: Callable[[], Defaults],
        health: HealthMonitor,
    ) -> None:
        self.slot = slot
        self.sessions = sessions
        self.config = config
        self.defaults = defaults
        self.health_monitor = health
        self.started_at = time.time()

    def health(self) -> tuple[bool, dict[str, Any]]:
        return self.health_monitor.healthz(self.slot.state.value, self.slot.no_model_reason())

    def status_line(self) -> str:
        n = len(self.sessions)
        sessions = f"{n} session{'s' if n != 1 else ''}"
        engine = self.slot.engine
        if engine is None:
            return f"no model ({self.slot.state.value}), {sessions}"
        return f"serving {engine.info.name} on {engine.info.device}, {sessions}"

    def engine_figures(self) -> dict[str, Any]:
        """The engine's live figures; empty without a model."""
        engine, admission = self.slot.engine, self.slot.admission
        if engine is None or admission is None:
            return {}
        stats = engine.stats()
        admitted = admission.stats()
        memory = engine.info.memory
        return {
            "model": engine.info.name,
            "engine": engine.info.engine,
            "device": engine.info.device,
            "dtype": engine.info.dtype,
            "max_context": engine.info.max_context,
            "kv_bytes_per_token": memory.layout.bytes_per_token if memory else None,
            **stats,
            **admitted,
            # Waiting for memory (admission) or for a batch slot (the engine).
            "queued": stats.get("queued", 0) + admitted["waiting_for_memory"],
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
            "gpus": resources.latest_gpus(),
        }

    def status(self) -> dict[str, Any]:
        engine = self.engine_figures()
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "model": engine.get("model"),
            "model_state": self.slot.state.value,
            "engine": engine.get("engine"),
            "device": engine.get("device"),
            "max_context": engine.get("max_context"),
            "sessions": len(self.sessions),
            "queue": engine.get("queued", 0),
            "active": engine.get("active", 0),
            "memory": resources.host_report(),
            "context_limit": engine.get("memory"),
            **self.health_monitor.figures(),
        }

    def device(self) -> str:
        engine = self.slot.engine
        return engine.info.device if engine is not None else "cpu"

    async def resources(self) -> dict[str, Any]:
        report = await resources.MONITOR.refresh(self.device())
        engine = self.engine_figures()
        if engine:
            report["engine"] = engine
        return report

    def welcome(self, session: Session, resumed: bool) -> messages.Welcome:
        engine = self.slot.engine
        return messages.Welcome(
            protocol=PROTOCOL_VERSION,
            server=f"llmwsd/{__version__}",
            session_id=session.id,
            resumed=resumed,
            # The newest event's seq at this moment: what a resuming client's replay ends at.
            last_seq=session.next_seq - 1,
            model=engine.info.name if engine else None,
            model_state=self.slot.state.value,
            capabilities=engine.info.capabilities() if engine else {"device": self.device()},
            resources=resources.latest(self.device()),
            config=session.settings.to_dict(),
            # Where each default of a new session comes from: llmws, the model or the config.
            defaults_from=self.defaults().sources,
        )

    async def list_models(self) -> list[dict[str, Any]]:
        entries = await asyncio.to_thread(models.scan, self.config().model_dirs)
        engine = self.slot.engine
        loaded = Path(engine.info.path) if engine is not None else None
        return [entry.to_dict(loaded) for entry in entries]
