"""Changing the daemon's models: switch the served model, delete a downloaded one.

The admin socket calls these, and so will the public port's ``switch_model`` and
``delete_model`` where the operator allows them, which is why they live here.
One change runs at a time; a second is refused with ``busy`` rather than queued
behind a load that can take minutes. Names are checked with
:func:`llmwsd.models.validate_model_name` before any filesystem call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmwsd import models
from llmwsd.errors import Busy, Forbidden, InternalError

if TYPE_CHECKING:
    from llmwsd.app import Daemon

log = logging.getLogger("llmwsd.models")

Progress = Callable[[dict[str, Any]], None]


def _no_progress(data: dict[str, Any]) -> None:
    """The progress callback of callers that show none."""


class ModelManager:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._lock = asyncio.Lock()

    async def switch(self, name: Any, progress: Progress = _no_progress) -> dict[str, Any]:
        """Load the new model beside the old one; swap only once it loaded, then retire the old."""
        name = models.validate_model_name(name)
        daemon = self.daemon
        if daemon.model_state == "loading":
            raise Busy("the first model is still loading: retry when `llmwsctl status` says ready")
        async with self._exclusive("switch"):
            entry = await asyncio.to_thread(models.find, daemon.config, name)
            old = daemon.engine
            if old is not None and Path(old.info.path).resolve() == entry.path.resolve():
                return {"model": name, "previous": name, "changed": False}
            previous = old.info.name if old is not None else None
            progress({"stage": "loading", "model": name, "message": f"loading {name}"})
            daemon.notifier.status(f"switching to {name}")
            started = time.monotonic()
            try:
                new = await daemon.engine_loader(daemon.config, entry.path)
            except Exception as e:
                log.error("switch: loading %s failed", entry.path, exc_info=True)
                daemon.notifier.status(daemon.status_line())
                still = f"still serving {previous}" if previous else "no model is loaded"
                reason = " ".join(str(e).split())  # transformers spreads some over many lines
                raise InternalError(f"loading {name} failed: {reason}; {still}") from e
            load_s = round(time.monotonic() - started, 1)
            daemon.engine, daemon.model_state, daemon.model_error = new, "ready", ""
            log.info("switched to %s (was %s), loaded in %.1f s", name, previous, load_s)
            if old is not None:
                drain = daemon.config.server.drain_timeout
                progress(
                    {"stage": "draining", "model": previous, "message": f"unloading {previous}"}
                )
                await old.drain(drain)
                await old.close()
            daemon.notifier.status(daemon.status_line())
            return {"model": name, "previous": previous, "changed": True, "load_s": load_s}

    async def remove(self, name: Any) -> dict[str, Any]:
        """Delete a downloaded model: rename it out of the catalogue first, so it goes at once."""
        name = models.validate_model_name(name)
        daemon = self.daemon
        async with self._exclusive("rm"):
            entry = await asyncio.to_thread(models.find, daemon.config, name)
            downloads = daemon.config.state_dir / "models"
            if entry.path.parent.resolve() != downloads.resolve():
                raise Forbidden(
                    f"{name} is in {entry.source}, not in {downloads}: llmwsctl rm only deletes "
                    "downloaded models; delete that folder yourself"
                )
            engine = daemon.engine
            if engine is not None and Path(engine.info.path).resolve() == entry.path.resolve():
                raise Busy(f"{name} is the loaded model: switch to another one first")
            # A leading dot hides it from the catalogue (models.is_model_folder).
            doomed = downloads / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
            entry.path.rename(doomed)
            await asyncio.to_thread(shutil.rmtree, doomed)
            log.info("removed model %s (%s)", name, entry.path)
            return {"removed": name, "path": str(entry.path), "size_bytes": entry.size_bytes}

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str) -> AsyncIterator[None]:
        """One model change at a time; a second one is refused rather than queued."""
        if self._lock.locked():
            raise Busy(f"another model change is running; retry {what} when it is done")
        async with self._lock:
            yield
