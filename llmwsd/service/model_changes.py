"""Changing the daemon's models: switch the served model, pull new ones, delete downloaded ones.

The admin socket calls these, and so does the public port's ``switch_model``,
``download_model`` and ``delete_model`` where the operator allows them, which is
why they live here. One switch or delete runs at a time; a second is refused
with ``busy`` rather than queued behind a load that can take minutes (pulls run
beside them, see :mod:`llmwsd.catalogue.pull`). Names are checked with
:func:`llmwsd.catalogue.models.validate_model_name` before any filesystem call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from llmwsd.catalogue import models
from llmwsd.catalogue.pull import Pulls
from llmwsd.config import Config
from llmwsd.engines import memory
from llmwsd.engines.interface import EngineLike
from llmwsd.engines.memory import PagedKVCache
from llmwsd.errors import Busy, Forbidden, InternalError
from llmwsd.service.model_slot import ModelSlot, ModelState

log = logging.getLogger("llmwsd.models")

Progress = Callable[[dict[str, Any]], None]
EngineLoader = Callable[[Config, Path], Awaitable[EngineLike]]
# What the service manager is told while a change runs; None: back to the usual status.
StatusCallback = Callable[[str | None], None]

# A model in memory takes about its size on disk; this much more is asked for before
# loading it beside the current one (activations, allocator slack, the warm-up probe).
LOAD_HEADROOM = 1.2


def free_memory(device: str) -> int:
    """Bytes free for another model on ``device``: GPU memory, or available RAM (cgroup too)."""
    return memory.available_bytes(device)[0]


def _no_progress(data: dict[str, Any]) -> None:
    """The progress callback of callers that show none."""


class ModelChanges:
    def __init__(
        self,
        slot: ModelSlot,
        config: Callable[[], Config],
        loader: EngineLoader,
        status: StatusCallback,
    ) -> None:
        self.slot = slot
        self.config = config  # read at each use: a reload may change [models]
        self.loader = loader
        self.status = status
        self.pulls = Pulls(config)
        self._lock = asyncio.Lock()

    # -- switch ----------------------------------------------------------------------

    async def switch(
        self, name: Any = None, progress: Progress = _no_progress, path: Any = None
    ) -> dict[str, Any]:
        """Serve another model: by ``name``, or by ``path`` (a catalogue folder, WS ``model_path``).

        Loaded beside the old one when memory allows, swapped once it loaded, the old
        one drained and closed. Otherwise: stop admitting, drain, unload, load (and
        reload the old one if the new one fails). Either way a failed load leaves the
        old model serving.
        """
        if path is None:
            name = models.validate_model_name(name)
        if self.slot.state == ModelState.LOADING:
            raise Busy("the first model is still loading: retry when `llmwsctl status` says ready")
        async with self._exclusive("switch"):
            if path is None:
                entry = await asyncio.to_thread(models.find, self.config(), name)
            else:
                entry = await asyncio.to_thread(models.find_by_path, self.config(), path)
                name = entry.name
            old = self.slot.engine
            if old is not None and Path(old.info.path).resolve() == entry.path.resolve():
                return {"model": name, "previous": name, "changed": False}
            previous = old.info.name if old is not None else None
            self.status(f"switching to {name}")
            try:
                if old is None or self._fits_beside(entry, old):
                    result = await self._load_beside(entry, old, progress)
                else:
                    result = await self._unload_then_load(entry, old, progress)
            finally:
                self.status(None)
            result["previous"] = previous
            result["remembered"] = self._remember(name)
            return result

    def _fits_beside(self, entry: models.ModelEntry, old: EngineLike) -> bool:
        """Whether the new model's weights fit in memory while the old one still serves."""
        need = entry.size_bytes * LOAD_HEADROOM
        if old.info.dtype == "float32" and entry.dtype in ("bfloat16", "float16"):
            need *= 2  # 16-bit weights are widened on a CPU without native bf16
        if isinstance(old.info.memory, PagedKVCache):
            # vLLM takes its whole KV cache at start: the new engine will take as much.
            need += old.info.memory.budget_bytes
        free = free_memory(old.info.device)
        fits = need <= free
        if not fits:
            log.info(
                "switch: %s needs about %.0f MB, %.0f MB free: unloading %s first",
                entry.name,
                need / 1e6,
                free / 1e6,
                old.info.name,
            )
        return fits

    async def _load_beside(
        self, entry: models.ModelEntry, old: EngineLike | None, progress: Progress
    ) -> dict[str, Any]:
        new, load_s = await self._load(entry, progress, old.info.name if old else None)
        await self.slot.serve(new)
        log.info("switched to %s, loaded beside the old model in %.1f s", entry.name, load_s)
        if old is not None:
            progress(
                {
                    "stage": "draining",
                    "model": old.info.name,
                    "message": f"unloading {old.info.name}",
                }
            )
            await old.drain(self.config().server.drain_timeout)
            await old.close()
        return {"model": entry.name, "changed": True, "load_s": load_s, "unloaded_first": False}

    async def _unload_then_load(
        self, entry: models.ModelEntry, old: EngineLike, progress: Progress
    ) -> dict[str, Any]:
        drain = self.config().server.drain_timeout
        self.slot.unsettle()  # new requests wait from here on, and so do the queued ones
        try:
            progress(
                {
                    "stage": "draining",
                    "model": old.info.name,
                    "message": f"not enough memory for both: draining {old.info.name} "
                    f"(up to {drain:g} s), then unloading it",
                }
            )
            await old.drain(drain)
            self.slot.vacate(ModelState.SWITCHING)
            await old.close()
            try:
                new, load_s = await self._load(entry, progress, old.info.name)
            except InternalError as e:
                progress({"stage": "loading", "message": f"reloading {old.info.name}"})
                try:
                    await self.slot.serve(await self.loader(self.config(), Path(old.info.path)))
                except Exception:
                    log.error("switch: reloading %s failed", old.info.path, exc_info=True)
                    error = f"{e.message}; reloading {old.info.name} failed too"
                    self.slot.vacate(ModelState.FAILED, error)
                    raise InternalError(error) from e
                raise
            await self.slot.serve(new)
            log.info("switched to %s after unloading the old model, in %.1f s", entry.name, load_s)
            return {"model": entry.name, "changed": True, "load_s": load_s, "unloaded_first": True}
        finally:
            self.slot.settle()

    async def _load(
        self, entry: models.ModelEntry, progress: Progress, serving: str | None
    ) -> tuple[EngineLike, float]:
        progress({"stage": "loading", "model": entry.name, "message": f"loading {entry.name}"})
        started = time.monotonic()
        try:
            engine = await self.loader(self.config(), entry.path)
        except Exception as e:
            log.error("switch: loading %s failed", entry.path, exc_info=True)
            still = f"still serving {serving}" if serving else "no model is loaded"
            reason = " ".join(str(e).split())  # transformers spreads some over many lines
            raise InternalError(f"loading {entry.name} failed: {reason}; {still}") from e
        return engine, round(time.monotonic() - started, 1)

    def _remember(self, name: str) -> bool:
        """Keep the choice for the next start, unless ``[model] path`` decides that."""
        config = self.config()
        if config.model.path:
            log.info("[model] path pins the model served at start; not remembering %s", name)
            return False
        try:
            models.remember_model(config.state_dir, name)
        except OSError as e:
            log.error("could not remember the model choice: %s", e, exc_info=True)
            return False
        return True

    # -- remove ----------------------------------------------------------------------

    async def remove(
        self, name: Any, force: bool = False, progress: Progress = _no_progress
    ) -> dict[str, Any]:
        """Delete a model folder: renamed out of the catalogue first, so it goes at once.

        Without ``force`` only downloaded models (``<state_dir>/models``) that are not
        loaded; with it, also other model folders, and the loaded model (switched
        away from first when another model exists, else unloaded).
        """
        name = models.validate_model_name(name)
        if self._lock.locked():
            raise Busy("another model change is running; retry rm when it is done")
        config = self.config()
        entry = await asyncio.to_thread(models.find, config, name)
        downloads = config.state_dir / "models"
        if entry.path.parent.resolve() != downloads.resolve() and not force:
            raise Forbidden(
                f"{name} is in {entry.source}, not in {downloads}: llmwsctl rm only deletes "
                "downloaded models unless --force"
            )
        engine = self.slot.engine
        if engine is not None and Path(engine.info.path).resolve() == entry.path.resolve():
            if not force:
                raise Busy(f"{name} is the loaded model: switch to another one first, or --force")
            await self._leave(entry, progress)
        async with self._exclusive("rm"):
            engine = self.slot.engine
            if engine is not None and Path(engine.info.path).resolve() == entry.path.resolve():
                raise Busy(f"{name} was loaded again meanwhile; nothing removed")
            # A leading dot hides it from the catalogue (models.is_model_folder).
            doomed = entry.path.parent / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
            entry.path.rename(doomed)
            await asyncio.to_thread(shutil.rmtree, doomed)
            log.info("removed model %s (%s)", name, entry.path)
            return {"removed": name, "path": str(entry.path), "size_bytes": entry.size_bytes}

    async def _leave(self, entry: models.ModelEntry, progress: Progress) -> None:
        """Stop serving ``entry`` for rm --force: switch to another model that loads, or unload."""
        others = [
            e
            for e in await asyncio.to_thread(models.scan, self.config().model_dirs)
            if e.path.resolve() != entry.path.resolve()
        ]
        for other in others:
            try:
                await self.switch(other.name, progress)
                return
            except InternalError as e:  # that one does not load: try the next
                progress({"stage": "loading", "message": e.message})
        async with self._exclusive("rm"):
            engine = self.slot.vacate(ModelState.NONE)
            if engine is not None:
                progress({"stage": "draining", "message": f"unloading {engine.info.name}"})
                await engine.drain(self.config().server.drain_timeout)
                await engine.close()
            self.status(None)
            log.info("unloaded %s to delete it; no other model to serve", entry.name)

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str) -> AsyncIterator[None]:
        """One model change at a time; a second one is refused rather than queued."""
        if self._lock.locked():
            raise Busy(f"another model change is running; retry {what} when it is done")
        async with self._lock:
            yield
