"""A fast stand-in for the transformers engine, for protocol tests.

It answers every prompt with "echo: <user text>" one word per token, with a
configurable delay per token, and honours cancel and max_new_tokens. ``wedge()``
makes its steps block, as a hung engine thread's would, until ``release()``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

from llmwsd.config import Config
from llmwsd.engines.interface import (
    EventCallback,
    EventStream,
    Failed,
    Finished,
    GenerationRequest,
    Heartbeat,
    ModelInfo,
    Started,
    TokenText,
)
from llmwsd.errors import BadRequest, Interrupted, LLMWSError


class FakeHandle:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    def __init__(
        self, path: Path = Path("/models/fake-model"), token_delay: float = 0.01, max_context=4096
    ):
        self.info = ModelInfo(path.name, str(path), "cpu", "float32", max_context, "sdpa")
        self.token_delay = token_delay
        self.tasks: set[asyncio.Task[None]] = set()
        self.submitted: list[GenerationRequest] = []
        self.closed = False
        self._ids = itertools.count(1)
        self._streams: dict[asyncio.Task[None], tuple[EventStream, FakeHandle]] = {}
        self._unwedged = asyncio.Event()
        self._unwedged.set()
        self._turned_at = time.monotonic()
        self.failure: str | None = None  # set: the engine says it died (Heartbeat.failure)
        self._abandoned_at: float | None = None  # refusing until the next step after it

    def wedge(self) -> None:
        """Make every step block, as a hung engine thread's does."""
        self._unwedged.clear()

    def release(self) -> None:
        self._unwedged.set()

    @classmethod
    def loader(cls, **kwargs: Any):
        async def load(config: Config, path: Path) -> FakeEngine:
            return cls(path, **kwargs)

        return load

    def tokenize(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        words = sum(len(m["content"].split()) + 4 for m in messages)
        return list(range(words + sum(len(json.dumps(t).split()) for t in tools or [])))

    def answer(self, request: GenerationRequest) -> list[str]:
        words = ["echo:", *request.messages[-1]["content"].split()]
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def prepare_format(self, fmt: Any) -> None:
        if fmt.type == "regex" and fmt.pattern == "(":  # stands for one a library refuses
            raise BadRequest("format (regex) cannot be enforced: the parenthesis is not closed")

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> FakeHandle:
        self.submitted.append(request)
        handle = FakeHandle(request.request_id or f"fake{next(self._ids)}")
        stream = EventStream(on_event)
        loop = asyncio.get_running_loop()
        if self._abandoned_at is not None and self._abandoned_at >= self._turned_at:
            loop.call_soon(stream, Failed(Interrupted("the engine is not responding")))
            return handle
        if not self.tasks:
            self._turned_at = time.monotonic()  # an idle engine's clock starts with work
        task = loop.create_task(self._run(request, stream, handle))
        self.tasks.add(task)
        self._streams[task] = (stream, handle)
        task.add_done_callback(self._ended)
        return handle

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._streams.pop(task, None)

    async def _run(self, request: GenerationRequest, on_event: EventCallback, handle: FakeHandle):
        # No context check here: admission enforces it, and its tests must see that.
        ids = request.prompt_ids
        tokens_in = len(ids if ids is not None else self.tokenize(request.messages))
        started = time.monotonic()
        on_event(Started(tokens_in, request.settings.max_new_tokens))
        pieces = self.answer(request)[: request.settings.max_new_tokens]
        reason = "stop" if len(pieces) < request.settings.max_new_tokens else "length"
        sent = 0
        for piece in pieces:
            await asyncio.sleep(self.token_delay)
            await self._unwedged.wait()
            self._turned_at = time.monotonic()
            if handle.cancelled:
                reason = "cancelled"
                break
            on_event(TokenText(piece))
            sent += 1
        elapsed = time.monotonic() - started
        on_event(Finished(sent, reason, self.token_delay * 1000, sent / max(elapsed, 1e-6)))

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.tasks), "queued": 0}

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(time.monotonic() - self._turned_at, bool(self.tasks), self.failure)

    def abandon(self, error: LLMWSError) -> int:
        ended = [(s, h) for s, h in self._streams.values() if not s.ended]
        self._abandoned_at = time.monotonic()
        for stream, handle in ended:
            handle.cancel()
            stream(Failed(error))
        return len(ended)

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)

    async def close(self) -> None:
        self.closed = True
        for task in self.tasks:
            task.cancel()
