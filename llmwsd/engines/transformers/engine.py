"""The inference engine: one thread owns the model and decodes all requests in one batch.

Continuous batching the way TGI's first Python server did it: every step the
engine thread takes the requests that arrived (tokenizes them, answers
``Started``), prefills the ones that fit into the batch, decodes one token for
every running request in a single forward pass, and drops the ones that
finished or were cancelled. The running requests share one left-padded KV cache
(:mod:`llmwsd.engines.transformers.batch`). On the 2-core development CPU this beat transformers'
own continuous batching (``generate_batch``, built for CUDA paged attention) by
about 1.6x for 8 prompts (bf16, greedy, 128 new tokens each).

The event loop only enqueues (:meth:`Engine.submit`) and receives events, which
the engine thread hands over with ``call_soon_threadsafe``, once per step and loop.
The thread notes each turn of its loop (:meth:`Engine.heartbeat`), so that the
daemon can tell a long step from a wedged one (llmwsd.service.health).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmwsd.config import Config
from llmwsd.engines.chat_template import end_token_ids, template_ids
from llmwsd.engines.detokenize import AnswerText
from llmwsd.engines.grammar import Grammars
from llmwsd.engines.interface import (
    EventCallback,
    EventStream,
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Heartbeat,
    ModelInfo,
    Started,
    TokenText,
    new_token_budget,
)
from llmwsd.engines.memory import MemoryEstimate
from llmwsd.engines.transformers import kernels, measure
from llmwsd.engines.transformers.batch import Batch, joined, prefill_groups, rows_can_join
from llmwsd.engines.transformers.loading import load_model
from llmwsd.engines.transformers.prefix_cache import PrefixCache
from llmwsd.engines.transformers.sampling import TokenSampler, choose_tokens
from llmwsd.errors import (
    BadRequest,
    Busy,
    ContextTooLong,
    InternalError,
    Interrupted,
    LLMWSError,
)
from llmwsd.settings import OutputFormat

log = logging.getLogger(__name__)

TOKENS_PER_S_WINDOW = 10.0  # seconds of recent steps the reported speed is measured over
# How long close() waits for the engine thread to finish its step and stop.
THREAD_STOP_TIMEOUT_S = 60.0
# The requests of a burst reach the engine within a millisecond or two: an idle
# engine waits until none came for BURST_QUIET_S (BURST_MAX_S at most), so that
# they share prefills instead of the first one or two going alone.
BURST_QUIET_S = 0.002
BURST_MAX_S = 0.02


# -- requests -------------------------------------------------------------------------


class GenerationHandle:
    """The caller's grip on a submitted request."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancelled = False

    def cancel(self) -> None:
        # A plain flag: the engine thread reads it at the start of every step.
        self.cancelled = True


@dataclass(eq=False)
class _Generation:
    """One request's state inside the engine thread."""

    request: GenerationRequest
    stream: EventStream
    loop: asyncio.AbstractEventLoop
    handle: GenerationHandle
    submitted_at: float
    prompt_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    sampler: TokenSampler | None = None
    text: AnswerText | None = None
    generated: list[int] = field(default_factory=list)
    admitted_at: float = 0.0
    first_token_at: float | None = None
    done: bool = False


Handover = list[tuple[_Generation, GenerationEvent]]


# -- the engine -----------------------------------------------------------------------


class Engine:
    """Serves generation requests from one model, batching their decoding steps."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_tokenizer: Any,
        info: ModelInfo,
        max_batch_size: int,
        plain_decoding_rows: int = 0,
    ) -> None:
        self.info = info
        self.max_batch_size = max_batch_size
        self._plain_decoding_rows = plain_decoding_rows  # see llmwsd.engines.transformers.kernels
        self._model = model
        self._tokenizer = tokenizer  # used by the engine thread only
        # Prompts are tokenized in worker threads, on a second instance: tokenizers are not
        # thread-safe, and the engine thread's detokenizers use the first.
        self._prompt_tokenizer = prompt_tokenizer
        self._prompt_lock = threading.Lock()
        self._device = next(model.parameters()).device
        self._vocab_size = int(model.config.get_text_config().vocab_size)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._end_ids = end_token_ids(tokenizer, model.generation_config)
        self._end_id_set = set(self._end_ids)
        self._grammars = Grammars(prompt_tokenizer, self._vocab_size, self._end_ids)
        self._rows_can_join = rows_can_join(model.config)
        estimate = info.memory
        self._prefix_cache = (
            PrefixCache(estimate.prefix_cache_bytes, estimate.layout.bytes_per_token)
            if isinstance(estimate, MemoryEstimate) and estimate.prefix_cache_bytes
            else None
        )
        # On CPU a prefill's cost grows with its rows, so a burst of newcomers is
        # prefilled in two groups and most of them start answering sooner. Rows that
        # cannot join a running batch come as one wave, prefilled at once.
        self._split_prefills = self._device.type != "cuda" and self._rows_can_join

        self._wakeup = threading.Condition()
        self._inbox: list[_Generation] = []  # guarded by _wakeup
        self._idle = threading.Event()
        self._idle.set()
        self._draining = False
        self._cancel_everything = False
        self._closing = False
        self._closed = False
        # The requests whose last event has not reached the event loop (see abandon).
        self._live_lock = threading.Lock()
        self._live: set[_Generation] = set()
        # The heartbeat: when the loop last turned (or work came to it idle), and how often.
        self._turned_at = time.monotonic()
        self._turns = 0
        self._abandoned_at_turn: int | None = None  # requests are refused until the next turn
        # Engine thread only:
        self._waiting: collections.deque[_Generation] = collections.deque()
        self._batch: Batch[_Generation] | None = None
        self._outbox: Handover = []
        # Statistics, read from other threads:
        self._stats_lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._steps = 0
        self._last_batch_size = 0

        self._thread = threading.Thread(target=self._run, name="llmws-engine", daemon=True)
        self._thread.start()

    @classmethod
    async def load(cls, config: Config, path: Path) -> Engine:
        """Load the model folder ``path`` in a worker thread and start the engine thread."""
        return await asyncio.to_thread(cls._load, config, Path(path))

    @classmethod
    def _load(cls, config: Config, path: Path) -> Engine:
        loaded = load_model(config, path)
        return cls(
            loaded.model,
            loaded.tokenizer,
            loaded.prompt_tokenizer,
            loaded.info,
            loaded.max_batch_size,
            loaded.plain_decoding_rows,
        )

    # -- the event loop's side -----------------------------------------------------

    def tokenize(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        with self._prompt_lock:
            return template_ids(self._prompt_tokenizer, messages, tools)

    def prepare_format(self, fmt: OutputFormat) -> None:
        self._grammars.compile(fmt)

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> GenerationHandle:
        """Queue ``request``; its events go to ``on_event`` on the calling event loop."""
        loop = asyncio.get_running_loop()
        handle = GenerationHandle(request.request_id or uuid.uuid4().hex)
        generation = _Generation(request, EventStream(on_event), loop, handle, time.monotonic())
        with self._live_lock:
            self._live.add(generation)
        with self._wakeup:
            refusal: LLMWSError | None = None
            if self._closing:
                refusal = Interrupted("the model is unloaded")
            elif self._draining:
                refusal = Busy("the daemon is shutting down")
            elif self._abandoned_at_turn == self._turns:
                refusal = Interrupted("the engine is not responding")
            else:
                if self._idle.is_set():
                    # An idle engine's last turn may be hours old: its clock starts now.
                    self._turned_at = generation.submitted_at
                self._inbox.append(generation)
                self._idle.clear()
                self._wakeup.notify()
        if refusal is not None:
            refused: Handover = [(generation, Failed(refusal))]
            loop.call_soon(self._deliver, refused)
        return handle

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(time.monotonic() - self._turned_at, busy=not self._idle.is_set())

    def abandon(self, error: LLMWSError) -> int:
        """Fail every request not ended yet, from the event loop (the thread is stuck)."""
        with self._live_lock:
            ended, self._live = [g for g in self._live if not g.stream.ended], set()
        with self._wakeup:
            self._abandoned_at_turn = self._turns
        by_loop: dict[asyncio.AbstractEventLoop, Handover] = {}
        for generation in ended:
            generation.handle.cancel()  # should the thread come back, it drops them
            by_loop.setdefault(generation.loop, []).append((generation, Failed(error)))
        for loop, items in by_loop.items():
            self._hand_over(loop, items)
        return len(ended)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._stats_lock:
            while self._recent and self._recent[0][0] < now - TOKENS_PER_S_WINDOW:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
            # Over the busy part of the window (an answer that began 2 s ago is not diluted).
            span = min(max(now - self._recent[0][0], 1.0), TOKENS_PER_S_WINDOW) if tokens else 1.0
            steps, batch_size = self._steps, self._last_batch_size
        batch = self._batch
        active = len(batch.rows) if batch is not None else 0
        return {
            "active": active,
            "queued": len(self._waiting) + len(self._inbox),
            "batch_size": batch_size,
            "max_batch_size": self.max_batch_size,
            "tokens_per_s": round(tokens / span, 2) if active else 0.0,  # idle: 0, not a memory
            "steps": steps,
            "prefix_cache": self._prefix_cache.stats() if self._prefix_cache is not None else None,
        }

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let the running ones finish for ``timeout`` s, cancel the rest."""
        with self._wakeup:
            self._draining = True
        if await asyncio.to_thread(self._idle.wait, timeout):
            return
        self._cancel_everything = True  # read by the engine thread at its next step
        # Cancelled rows leave at the next step; wait for it, but not forever.
        await asyncio.to_thread(self._idle.wait, 5.0)

    def _running_and_waiting(self) -> list[_Generation]:
        batch = self._batch
        return (list(batch.rows) if batch is not None else []) + list(self._waiting)

    async def close(self) -> None:
        """Stop the engine thread (requests still there fail) and free the model."""
        if self._closed:
            return
        self._closed = True
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join, THREAD_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            # A stuck step (see llmwsd.service.health): shutting down or switching away
            # must not hang on it. The thread and the model's memory stay until exit.
            log.error(
                "the engine thread did not stop within %g s; leaving it", THREAD_STOP_TIMEOUT_S
            )
            return
        self._model = None
        self._prefix_cache = None  # its keys and values go with the model
        # A full collection takes a while with a big heap: not on the loop, which may
        # be serving the model switched to.
        await asyncio.to_thread(self._free_memory)

    def _free_memory(self) -> None:
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _deliver(self, items: Handover) -> None:
        """Run on the event loop: hand each event to its request's stream."""
        for generation, event in items:
            try:
                generation.stream(event)
            except Exception:
                log.error(
                    "event callback of request %s failed",
                    generation.handle.request_id,
                    exc_info=True,
                )
            if generation.stream.ended:
                with self._live_lock:
                    self._live.discard(generation)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, items: Handover) -> None:
        try:
            loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:
            log.warning("event loop closed: %d generation events dropped", len(items))

    # -- the engine thread ---------------------------------------------------------

    def _beat(self) -> None:
        """The loop turned: the engine is alive (see heartbeat)."""
        self._turned_at = time.monotonic()
        self._turns += 1

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._inbox or self._waiting or self._batch or self._closing):
                        self._idle.set()
                        self._wakeup.wait()
                    self._beat()
                    if self._closing:
                        break
                    if self._batch is None and not self._waiting:
                        self._gather_burst()
                    arrived, self._inbox = self._inbox, []
                try:
                    self._step(arrived)
                except Exception:
                    # A bug outside the guarded model calls: end everything, keep serving.
                    log.error("engine step failed", exc_info=True)
                    for generation in arrived + self._running_and_waiting():
                        self._fail(generation, InternalError("the engine failed; see the log"))
                    self._waiting.clear()
                    self._batch = None
                self._flush_events()
            with self._wakeup:
                left, self._inbox = self._inbox + self._running_and_waiting(), []
            for generation in left:
                self._fail(generation, Interrupted("the model was unloaded"))
            self._batch = None
            self._waiting.clear()
            self._flush_events()
            self._idle.set()

    def _gather_burst(self) -> None:
        """Wait, holding ``_wakeup``, while requests keep arriving (see BURST_QUIET_S)."""
        deadline = time.monotonic() + BURST_MAX_S
        count = len(self._inbox)
        while count < self.max_batch_size and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wakeup.wait(min(BURST_QUIET_S, left))
            if len(self._inbox) == count:
                break
            count = len(self._inbox)

    def _step(self, arrived: list[_Generation]) -> None:
        for generation in arrived:
            self._admit(generation)
        self._end_cancelled()
        running = len(self._batch.rows) if self._batch is not None else 0
        room = self.max_batch_size - running if self._rows_can_join or not running else 0
        newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        tokens = len(newcomers)
        fresh: Batch[_Generation] | None = None
        for size in prefill_groups(len(newcomers), self._split_prefills):
            group, newcomers = newcomers[:size], newcomers[size:]
            fresh = joined(fresh, self._prefill(group))
            # Each group's first tokens go out now, not after the next group's prefill
            # or the running rows' step.
            self._flush_events()
            self._beat()  # a prefill is the longest thing a step does: each one counts
        if self._batch is not None:
            tokens += len(self._batch.rows)
            self._decode(self._batch)
        self._batch = joined(self._batch, fresh)
        with self._stats_lock:
            self._steps += 1
            self._last_batch_size = tokens
            self._recent.append((time.monotonic(), tokens))

    def _admit(self, generation: _Generation) -> None:
        """Tokenize a new request and answer Started (or Failed); queue it for the batch."""
        request = generation.request
        settings = request.settings
        try:
            prompt = request.prompt_ids or template_ids(
                self._tokenizer, request.messages, request.tools
            )
        except Exception as e:
            log.error("cannot apply the chat template", exc_info=True)
            self._fail(generation, InternalError(f"cannot apply the chat template: {e}"))
            return
        try:
            # The service budgeted the request already; this holds direct callers to it.
            budget = new_token_budget(
                len(prompt), settings.max_new_tokens, self.info.max_context, "truncate"
            )
        except ContextTooLong as e:
            self._fail(generation, e)
            return
        generation.prompt_ids = list(prompt)
        generation.max_new_tokens = budget
        try:
            grammar = self._grammars.matcher(settings.format) if settings.format else None
        except BadRequest as e:  # a direct caller's: the service compiled it before
            self._fail(generation, e)
            return
        generation.sampler = TokenSampler(
            settings, prompt, self._vocab_size, self._end_ids, self._device, grammar
        )
        generation.text = AnswerText(self._tokenizer, settings.stop)
        self._emit(generation, Started(len(prompt), generation.max_new_tokens))
        self._waiting.append(generation)

    def _end_cancelled(self) -> None:
        for generation in self._running_and_waiting():
            if generation.handle.cancelled or self._cancel_everything:
                self._finish(generation, "cancelled")
        self._waiting = collections.deque(g for g in self._waiting if not g.done)
        self._drop_done()

    def _drop_done(self) -> None:
        batch = self._batch
        if batch is not None:
            keep = [i for i, g in enumerate(batch.rows) if not g.done]
            if not keep:
                self._batch = None
            elif len(keep) < len(batch.rows):
                batch.keep(keep, trim=self._rows_can_join)

    def _prefill(self, newcomers: list[_Generation]) -> Batch[_Generation] | None:
        """Run the newcomers' prompts; return them as a batch with their first tokens."""
        now = time.monotonic()
        for generation in newcomers:
            generation.admitted_at = now
        try:
            prompts = [g.prompt_ids for g in newcomers]
            prefix_kv = self._cached_prefix(prompts)
            reused = 0 if prefix_kv is None else prefix_kv.shape[-2]
            new_tokens = len(prompts) * max(len(p) - reused for p in prompts)
            with kernels.onednn(True), measure.short_prefill_on_the_heap(new_tokens):
                batch, logits = Batch.prefill(
                    self._model, newcomers, prompts, self._pad_id, prefix_kv
                )
        except Exception as e:
            self._step_failed(newcomers, "prefill", e)
            return None
        self._remember_prompts(batch)
        self._advance(batch, logits)
        keep = [i for i, g in enumerate(batch.rows) if not g.done]
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch.keep(keep, trim=self._rows_can_join)
        return batch

    def _cached_prefix(self, prompts: list[list[int]]) -> torch.Tensor | None:
        """The KV of the first tokens every prompt shares with a cached one (None: none)."""
        if self._prefix_cache is None:
            return None
        found = [self._prefix_cache.longest(prompt) for prompt in prompts]
        reused = min(tokens for tokens, _ in found)
        if not reused:
            return None
        self._prefix_cache.count_reuse(reused, len(prompts))
        return torch.stack(
            [entry.kv[..., :reused, :] for _, entry in found if entry is not None], dim=2
        )

    def _remember_prompts(self, batch: Batch[_Generation]) -> None:
        """Keep the new prompts' KV for prompts that start the same way."""
        cache = self._prefix_cache
        if cache is None:
            return
        try:
            for index, generation in enumerate(batch.rows):
                prompt = generation.prompt_ids
                if cache.wants(prompt):
                    kv = batch.row_kv(index, len(prompt))
                    if kv is not None:
                        cache.add(list(prompt), kv)
        except Exception:
            # The answers go on; only later prompts miss the reuse.
            log.warning("cannot keep prompts in the prefix cache", exc_info=True)

    def _decode(self, batch: Batch[_Generation]) -> None:
        """One token for every running request."""
        try:
            with kernels.onednn(len(batch.rows) > self._plain_decoding_rows):
                logits = batch.decode(self._model)
        except Exception as e:
            # The cache may be half updated: every row of the batch is lost.
            self._batch = None
            self._step_failed(batch.rows, "decoding step", e)
            return
        self._advance(batch, logits)
        self._drop_done()

    def _step_failed(self, generations: list[_Generation], what: str, error: Exception) -> None:
        log.error("%s of %d requests failed", what, len(generations), exc_info=error)
        for generation in generations:
            self._fail(generation, InternalError(f"generation failed: {error}"))
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _advance(self, batch: Batch[_Generation], logits: torch.Tensor) -> None:
        """Sample every row's next token, stream its text, finish the rows that are done."""
        samplers: list[TokenSampler] = []
        for generation in batch.rows:
            assert generation.sampler is not None  # set at admission
            samplers.append(generation.sampler)
        picks = choose_tokens(samplers, logits, [len(g.generated) for g in batch.rows])
        tokens = []
        for generation, pick in zip(batch.rows, picks, strict=True):
            if isinstance(pick, Exception):
                log.error("sampling failed for %s", generation.handle.request_id, exc_info=pick)
                self._fail(generation, InternalError(f"sampling failed: {pick}"))
                pick = self._pad_id
            else:
                self._take_token(generation, pick)
            tokens.append(pick)
        batch.next_tokens = torch.tensor(tokens, device=self._device)

    def _take_token(self, generation: _Generation, token: int) -> None:
        assert generation.sampler and generation.text
        generation.generated.append(token)
        generation.sampler.accept(token)
        if generation.first_token_at is None:
            generation.first_token_at = time.monotonic()
        if token in self._end_id_set:
            self._finish(generation, "stop")
            return
        self._emit_text(generation, generation.text.push(token))
        if generation.text.stopped:
            self._finish(generation, "stop", flush=False)
            return
        if len(generation.generated) >= generation.max_new_tokens:
            self._finish(generation, "length")

    def _emit_text(self, generation: _Generation, text: str) -> None:
        if text:
            self._emit(generation, TokenText(text))

    def _finish(self, generation: _Generation, reason: str, flush: bool = True) -> None:
        """End a request with Finished; ``flush`` emits the text held back."""
        if generation.done:
            return
        if flush and reason != "cancelled" and generation.text is not None:
            self._emit_text(generation, generation.text.flush())
        generation.done = True
        self._emit(
            generation,
            Finished.measured(
                len(generation.generated),
                reason,
                generation.submitted_at,
                generation.first_token_at,
                generation.admitted_at or generation.submitted_at,
            ),
        )

    def _fail(self, generation: _Generation, error: LLMWSError) -> None:
        if not generation.done:
            generation.done = True
            self._emit(generation, Failed(error))

    def _emit(self, generation: _Generation, event: GenerationEvent) -> None:
        self._outbox.append((generation, event))

    def _flush_events(self) -> None:
        """Hand this step's events to their event loops, one call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, Handover] = {}
        for generation, event in self._outbox:
            by_loop.setdefault(generation.loop, []).append((generation, event))
        self._outbox = []
        for loop, items in by_loop.items():
            self._hand_over(loop, items)
