"""Pulling models: from Hugging Face, from any git repository with git-lfs, or a local GGUF file.

Every pull has an id and a staging folder ``<state_dir>/pulls/<id>/`` beside the
models folder, holding ``pull.json`` (what was asked, and how it ended) and
``model/`` (the files so far). The model is renamed into
``<state_dir>/models/<name>`` only once every file is there and its config and
tokenizer load, so a cancelled or failed pull never leaves a half model in the
catalogue. A cancelled pull removes its staging folder; a failed one, or one cut
off by a restart, keeps it: ``llmwsctl pulls`` lists it, pulling the same source
again resumes from the files already there, ``llmwsctl pulls --clean`` removes it.

The transfers run in worker threads (huggingface_hub) or child processes (git,
git-lfs, the GGUF converter), never on the event loop; progress is counted in
bytes as it arrives and reported twice a second to whoever follows the pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

from llmwsd.catalogue import models
from llmwsd.catalogue.fetch import (
    Progress,
    Pull,
    PullStopped,
    Source,
    disk_full,
    fetch_git,
    fetch_huggingface,
    files_size,
    import_gguf,
    is_disk_full,
    load_record,
    parse_source,
    verify_model,
)
from llmwsd.config import Config
from llmwsd.errors import BadRequest, Busy, InternalError, LLMWSError, NotFound

log = logging.getLogger("llmwsd.pull")

REPORT_INTERVAL_S = 0.5  # progress to followers
LOG_INTERVAL_S = 10.0  # progress lines in the daemon's log
STOP_WAIT_S = 10.0  # how long shutdown waits for a pull's worker to notice


# -- the daemon's pulls -------------------------------------------------------------------

_PULL_ID = re.compile(r"[0-9a-f]{8}")


class Pulls:
    """Running pulls in memory, earlier ones from their staging folders in ``<state_dir>/pulls``."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config  # the daemon's, which a reload replaces
        self.root = config().state_dir / "pulls"
        self.running: dict[str, Pull] = {}
        self._slots = asyncio.Semaphore(config().models.max_parallel_pulls)

    @property
    def config(self) -> Config:
        return self._config()

    def open(self) -> None:
        """Say at start which pulls an earlier run left behind (they resume when pulled again)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for pull in self._on_disk():
            log.warning(
                "pull %s of %s (%s) was %s: `llmwsctl pull %s` resumes it, "
                "`llmwsctl pulls --clean` removes it",
                pull.id,
                pull.source.location,
                pull.name,
                pull.state,
                pull.source.location,
            )

    async def start(
        self, text: Any, name: Any = None, revision: Any = None, host_access: bool = True
    ) -> Pull:
        """Check the request, then run the pull in the background; the caller may follow it."""
        if name is not None:
            models.validate_model_name(name)
        source = parse_source(text, revision, host_access)
        if name is None:
            try:
                name = models.validate_model_name(source.default_name)
            except BadRequest:
                raise BadRequest(
                    f"{source.default_name[:80]!r} is not a usable model name: give one with --name"
                ) from None
        catalogue = await asyncio.to_thread(models.scan, self.config.model_dirs)
        for entry in catalogue:
            if entry.name == name:
                raise BadRequest(
                    f"a model named {name} already exists in {entry.source}: "
                    "pick another --name, or llmwsctl rm it first"
                )
        # No await from here until the pull is registered: a second one sees it.
        for other in self.running.values():
            if other.name == name:
                raise Busy(f"{name} is already being pulled (pull {other.id})")
        pull = self._resumable(source, name)
        if pull is None:
            pull_id = uuid.uuid4().hex[:8]
            pull = Pull(pull_id, source, name, self.root / pull_id)
            pull.folder.mkdir(parents=True)
        else:
            log.info("pull %s: resuming %s into %s", pull.id, source.location, name)
        pull.state, pull.stage, pull.error = "queued", "queued", None
        pull.message = "waiting for a free pull slot"
        pull.save()
        self.running[pull.id] = pull
        pull.task = asyncio.create_task(self._run(pull), name=f"pull-{pull.id}")
        return pull

    def _resumable(self, source: Source, name: str) -> Pull | None:
        for pull in self._on_disk():
            if pull.source == source and pull.name == name and pull.state != "done":
                return pull
        return None

    async def follow(self, pull: Pull, progress: Progress) -> dict[str, Any]:
        """Send ``pull``'s progress to ``progress`` until it ends; its result or its error."""
        pull.followers.append(progress)
        progress(pull.progress())
        try:
            assert pull.task is not None
            await asyncio.shield(pull.task)  # a follower that leaves does not stop the pull
        finally:
            with contextlib.suppress(ValueError):
                pull.followers.remove(progress)
        return self.outcome(pull)

    @staticmethod
    def outcome(pull: Pull) -> dict[str, Any]:
        if pull.state == "done" and pull.result is not None:
            return pull.result
        if pull.state == "cancelled":
            raise BadRequest(f"pull {pull.id} of {pull.name} was cancelled", id=pull.id)
        if pull.state == "interrupted":
            raise Busy(f"pull {pull.id} was interrupted by a shutdown; pull again to resume")
        error = pull.error or {"code": "internal", "message": "the pull failed"}
        failure = LLMWSError(str(error.get("message")), id=pull.id)
        failure.code = str(error.get("code", "internal"))  # type: ignore[misc]
        raise failure

    async def _run(self, pull: Pull) -> None:
        loop = asyncio.get_running_loop()

        def announce(progress: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._tell, pull, progress)

        pull.announce = announce
        reporter = asyncio.create_task(self._report(pull))
        try:
            async with self._slots:
                pull.state, pull.stage, pull.message = "running", "starting", "starting"
                await asyncio.to_thread(pull.save)
                await asyncio.to_thread(self._work, pull)
                pull.set_stage("verifying", "checking that the config and tokenizer load")
                await asyncio.to_thread(verify_model, pull.model_dir)
                pull.check_stop()
                pull.result = await asyncio.to_thread(self._install, pull)
            pull.state, pull.stage = "done", "done"
            pull.message = f"pulled into {pull.result['path']}"
            log.info("pull %s: %s is ready in %s", pull.id, pull.name, pull.result["path"])
        except (PullStopped, asyncio.CancelledError):
            if pull.stop_reason is None:
                raise  # a cancellation that nobody here asked for
            await self._stopped(pull)
        except LLMWSError as e:
            log.warning("pull %s of %s failed: %s", pull.id, pull.source.location, e.message)
            await self._failed(pull, e)
        except Exception as e:
            # Only our own words: the exception's text may quote a file of this host.
            log.error("pull %s of %s failed", pull.id, pull.source.location, exc_info=True)
            await self._failed(
                pull,
                disk_full(pull)
                if is_disk_full(e)
                else InternalError(f"the pull failed ({type(e).__name__}); see the daemon's log"),
            )
        finally:
            reporter.cancel()
            self.running.pop(pull.id, None)
            self._tell(pull, pull.progress())

    async def _failed(self, pull: Pull, error: LLMWSError) -> None:
        """Keep what was downloaded for a retry to resume; with nothing downloaded, keep nothing."""
        pull.state, pull.stage, pull.message = "failed", "failed", error.message
        pull.error = {"code": error.code, "message": error.message, **error.details}
        if await asyncio.to_thread(files_size, pull.model_dir):
            await asyncio.to_thread(pull.save)
        else:
            await asyncio.to_thread(shutil.rmtree, pull.folder, True)

    async def _stopped(self, pull: Pull) -> None:
        if pull.stop_reason == "shutdown":
            pull.state, pull.stage, pull.message = "interrupted", "interrupted", "interrupted"
            await asyncio.to_thread(pull.save)
            log.info("pull %s interrupted by the shutdown; it resumes when pulled again", pull.id)
            return
        pull.state, pull.stage, pull.message = "cancelled", "cancelled", "cancelled"
        await asyncio.to_thread(shutil.rmtree, pull.folder, True)
        log.info("pull %s of %s cancelled; its staging folder is removed", pull.id, pull.name)

    def _work(self, pull: Pull) -> None:
        if pull.source.kind == "huggingface":
            fetch_huggingface(
                pull, os.environ.get("HF_TOKEN") or self.config.models.hf_token or None
            )
        elif pull.source.kind == "git":
            fetch_git(pull)
        else:
            import_gguf(pull)

    def _install(self, pull: Pull) -> dict[str, Any]:
        """Rename the staged model into the models folder (one rename: it appears whole)."""
        dest = self.config.state_dir / "models" / pull.name
        if dest.exists():
            raise BadRequest(
                f"{dest} appeared during the pull: the download is kept in {pull.folder}"
            )
        pull.model_dir.rename(dest)
        shutil.rmtree(pull.folder)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        return {
            "id": pull.id,
            "name": pull.name,
            "path": str(dest),
            "source": pull.source.location,
            "size_bytes": size,
        }

    async def _report(self, pull: Pull) -> None:
        last: dict[str, Any] = {}
        logged = 0.0
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            progress = pull.progress()
            if progress != last:
                self._tell(pull, progress)
                last = progress
            if pull.stage == "downloading" and time.monotonic() - logged >= LOG_INTERVAL_S:
                logged = time.monotonic()
                log.info("pull %s: %s", pull.id, describe_progress(progress))
                # So that `llmwsctl pulls` after a crash says how far it got.
                await asyncio.to_thread(pull.save)

    @staticmethod
    def _tell(pull: Pull, progress: dict[str, Any]) -> None:
        for follower in list(pull.followers):
            try:
                follower(progress)
            except Exception:
                log.error("pull %s: a progress follower failed", pull.id, exc_info=True)
                pull.followers.remove(follower)

    def find(self, pull_id: Any) -> Pull:
        if not isinstance(pull_id, str) or not _PULL_ID.fullmatch(pull_id):
            raise BadRequest(f"invalid pull id {str(pull_id)[:40]!r}: see `llmwsctl pulls`")
        if pull_id in self.running:
            return self.running[pull_id]
        pull = load_record(self.root / pull_id)
        if pull is None:
            raise NotFound(f"no pull {pull_id}: see `llmwsctl pulls`")
        return pull

    async def cancel(self, pull_id: Any) -> dict[str, Any]:
        """Stop a running pull and remove its staging folder (an earlier run's: just remove it)."""
        pull = self.find(pull_id)
        if pull.id in self.running:
            pull.stop("cancel")
            if pull.state == "queued" and pull.task is not None:
                pull.task.cancel()  # still waiting for a slot: no worker to notice the stop
            assert pull.task is not None
            await asyncio.gather(asyncio.shield(pull.task), return_exceptions=True)
        else:
            await asyncio.to_thread(shutil.rmtree, pull.folder, True)
            pull.state = "cancelled"
        return pull.summary()

    def summaries(self) -> list[dict[str, Any]]:
        """Running pulls first, then those left by failures and restarts, oldest first."""
        running = [p.summary() | {"progress": p.progress()} for p in self.running.values()]
        left = [p.summary() for p in self._on_disk()]
        return sorted(running, key=lambda p: p["created"]) + left

    def _on_disk(self) -> list[Pull]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for folder in self.root.iterdir():
                if folder.name in self.running or not _PULL_ID.fullmatch(folder.name):
                    continue
                pull = load_record(folder)
                if pull is None:  # no readable pull.json: still listed, so it can be cleaned
                    pull = Pull(folder.name, Source("unknown", "?", None, "?"), "?", folder)
                    pull.state = "unknown"
                found.append(pull)
        return sorted(found, key=lambda p: p.created)

    async def clean(self) -> list[dict[str, Any]]:
        """Remove the staging folders of every pull that is not running."""
        removed = []
        for pull in self._on_disk():
            size = await asyncio.to_thread(files_size, pull.folder)
            await asyncio.to_thread(shutil.rmtree, pull.folder, True)
            removed.append({**pull.summary(), "freed_bytes": size})
            log.info("removed the staging folder of pull %s (%s)", pull.id, pull.name)
        return removed

    async def close(self) -> None:
        """At shutdown: stop the workers, keep the staging folders (pulled again, they resume)."""
        for pull in self.running.values():
            pull.stop("shutdown")
            if pull.state == "queued" and pull.task is not None:
                pull.task.cancel()
        tasks = [p.task for p in self.running.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)


def describe_progress(progress: dict[str, Any]) -> str:
    """One line for the log: ``45% 120.0/269.1 MB, 12.3 MB/s, ETA 12 s (model.safetensors)``."""
    done, total = progress.get("done") or 0, progress.get("total")
    text = f"{done / 1e6:.1f}"
    if total:
        text = f"{done * 100 // total}% {text}/{total / 1e6:.1f} MB"
    else:
        text += " MB"
    if progress.get("speed_bps"):
        text += f", {progress['speed_bps'] / 1e6:.1f} MB/s"
    if progress.get("eta_s") is not None:
        text += f", ETA {progress['eta_s']:.0f} s"
    if progress.get("file"):
        text += f" ({progress['file']})"
    return text
