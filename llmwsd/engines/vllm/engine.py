"""The vLLM engine: llmws's requests run by vLLM's v1 ``AsyncLLM``, in this process.

vLLM schedules, batches and pages the KV cache itself, in its engine process
(and its workers: tensor and pipeline parallel, a Ray cluster). llmws keeps
what is around it: the prompt goes in as the token ids the service counted
(the model's chat template, :mod:`llmwsd.engines.chat_template`), vLLM returns
token ids, and llmws turns them into text with the same detokenizer and stop
strings as the transformers engine, so that a client cannot tell the engines
apart but by speed.

Each request is one task on the event loop reading ``AsyncLLM.generate``;
cancelling the task aborts the request in vLLM. A dead engine process
(``EngineDeadError``) ends the running streams with ``interrupted`` after what
they produced, and the heartbeat says so (:attr:`Heartbeat.failure`): /healthz
answers 503 and the watchdog stops, so systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmwsd.config import Config
from llmwsd.engines.chat_template import end_token_ids, template_ids
from llmwsd.engines.detokenize import AnswerText
from llmwsd.engines.grammar import Grammars
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
    new_token_budget,
)
from llmwsd.engines.memory import PagedKVCache, kv_layout, max_context_of
from llmwsd.engines.vllm import arguments
from llmwsd.engines.vllm.sampling import sampling_params
from llmwsd.errors import Busy, ContextTooLong, InternalError, Interrupted, LLMWSError
from llmwsd.settings import OutputFormat

log = logging.getLogger(__name__)

TOKENS_PER_S_WINDOW = 10.0  # seconds of recent output the reported speed is measured over
SHUTDOWN_TIMEOUT_S = 60.0  # how long close() waits for vLLM's processes to stop
HEALTH_CHECK_EVERY_S = 5.0
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class GenerationHandle:
    """The caller's grip on a submitted request: cancelling aborts it in vLLM."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.task is not None:
                self.task.cancel()


@dataclass(eq=False)
class _Generation:
    request: GenerationRequest
    stream: EventStream
    handle: GenerationHandle
    submitted_at: float
    generated: int = 0
    first_token_at: float | None = None


class VllmEngine:
    """Serves generation requests from one model through vLLM."""

    def __init__(self, llm: Any, tokenizer: Any, prompt_tokenizer: Any, info: ModelInfo) -> None:
        self.info = info
        self._llm = llm
        self._tokenizer = tokenizer  # the event loop's (detokenizing)
        self._prompt_tokenizer = prompt_tokenizer  # worker threads' (tokenize)
        self._prompt_lock = threading.Lock()  # tokenizers are not thread-safe
        self._end_ids = end_token_ids(tokenizer, _generation_config(Path(info.path)))
        self._end_id_set = set(self._end_ids)
        self._vocab_size = len(tokenizer)
        # Formats are compiled here to be checked before admission; vLLM compiles its own.
        self._grammars = Grammars(prompt_tokenizer, self._vocab_size, self._end_ids)
        self._live: dict[_Generation, None] = {}
        self._draining = False
        self._closed = False
        self._failure: str | None = None
        self._heard_at = time.monotonic()
        self._recent: deque[tuple[float, int]] = deque()
        self._outputs = 0
        self._health_task: asyncio.Task[None] | None = None

    @classmethod
    async def load(cls, config: Config, path: Path) -> VllmEngine:
        """Start vLLM's engine for the folder ``path`` (it compiles the model: minutes)."""
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        path = Path(path)
        arguments.set_environment(config)
        args = arguments.engine_args(config, path)
        log.info("starting vLLM for %s (%s)", path, _describe(arguments.passed_arguments(config)))
        started = time.monotonic()
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        try:
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
            prompt_tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
            info = _model_info(llm, path)
        except BaseException:
            llm.shutdown()
            raise
        engine = cls(llm, tokenizer, prompt_tokenizer, info)
        engine._health_task = asyncio.get_running_loop().create_task(engine._watch_health())
        assert info.memory is not None
        log.info("vLLM up in %.0f s: %s", time.monotonic() - started, info.memory.describe())
        return engine

    # -- the interface ---------------------------------------------------------------

    def tokenize(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        with self._prompt_lock:
            return template_ids(self._prompt_tokenizer, messages, tools)

    def prepare_format(self, fmt: OutputFormat) -> None:
        self._grammars.compile(fmt)

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> GenerationHandle:
        handle = GenerationHandle(request.request_id or uuid.uuid4().hex)
        generation = _Generation(request, EventStream(on_event), handle, time.monotonic())
        loop = asyncio.get_running_loop()
        refusal: LLMWSError | None = None
        if self._closed:
            refusal = Interrupted("the model is unloaded")
        elif self._draining:
            refusal = Busy("the daemon is shutting down")
        elif self._failure is not None:
            refusal = Interrupted(self._failure)
        if refusal is not None:
            loop.call_soon(generation.stream, Failed(refusal))
            return handle
        if not self._live:
            self._heard_at = generation.submitted_at  # an idle engine's clock starts now
        self._live[generation] = None
        handle.task = loop.create_task(self._run(generation), name=f"vllm-{handle.request_id}")
        return handle

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(time.monotonic() - self._heard_at, bool(self._live), self._failure)

    def abandon(self, error: LLMWSError) -> int:
        ended = [g for g in self._live if not g.stream.ended]
        for generation in ended:
            generation.stream(Failed(error))
            generation.handle.cancel()  # its task aborts the request; its events are dropped
        return len(ended)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - TOKENS_PER_S_WINDOW:
            self._recent.popleft()
        tokens = sum(n for _, n in self._recent)
        span = min(max(now - self._recent[0][0], 1.0), TOKENS_PER_S_WINDOW) if tokens else 1.0
        active = len(self._live)
        return {
            "active": active,
            "queued": 0,  # vLLM's own queue is inside its scheduler; admission's is llmws's
            "batch_size": active,
            "max_batch_size": self.info.extra.get("max_batch_size", 0),
            "tokens_per_s": round(tokens / span, 2) if active else 0.0,
            "steps": self._outputs,
            "prefix_cache": None,
        }

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let the running ones finish for ``timeout`` s, cancel the rest."""
        self._draining = True
        tasks = [g.handle.task for g in self._live if g.handle.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for generation in list(self._live):
                generation.handle.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)

    async def close(self) -> None:
        """End what still runs (``interrupted``) and stop vLLM's processes."""
        if self._closed:
            return
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
        self.abandon(Interrupted("the model was unloaded"))
        # shutdown() joins vLLM's processes: in a thread, and not forever.
        stopper = asyncio.ensure_future(asyncio.to_thread(self._llm.shutdown))
        done, _ = await asyncio.wait({stopper}, timeout=SHUTDOWN_TIMEOUT_S)
        if not done:
            log.error("vLLM did not shut down within %g s; leaving it", SHUTDOWN_TIMEOUT_S)

    # -- one request -----------------------------------------------------------------

    async def _run(self, generation: _Generation) -> None:
        try:
            await self._generate(generation)
        except asyncio.CancelledError:
            self._finish(generation, "cancelled")
        except ContextTooLong as e:
            generation.stream(Failed(e))
        except Exception as e:
            self._failed(generation, e)
        finally:
            self._live.pop(generation, None)

    async def _generate(self, generation: _Generation) -> None:
        from vllm.inputs import TokensPrompt

        request = generation.request
        settings = request.settings
        prompt = request.prompt_ids
        if prompt is None:
            prompt = await asyncio.to_thread(self.tokenize, request.messages, request.tools)
        # The service budgeted the request already; this holds direct callers to it.
        budget = new_token_budget(
            len(prompt), settings.max_new_tokens, self.info.max_context, "truncate"
        )
        generation.stream(Started(len(prompt), budget))
        params = sampling_params(settings, budget, self._end_ids, self._vocab_size)
        text = AnswerText(self._tokenizer, settings.stop)
        outputs = self._llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt)),
            params,
            generation.handle.request_id,
        )
        try:
            async for output in outputs:
                completion = output.outputs[0]
                self._heard(len(completion.token_ids))
                for token in completion.token_ids:
                    if self._take_token(generation, token, text):
                        return  # a stop string: the rest is not wanted
                if output.finished:
                    reason = completion.finish_reason
                    if reason not in ("stop", "length"):  # "abort": vLLM ended it, not we
                        why = f"vLLM ended the answer ({reason}); see the log"
                        generation.stream(Failed(Interrupted(why)))
                        return
                    self._finish(generation, reason, text)
                    return
        finally:
            await outputs.aclose()  # an unfinished request is aborted in vLLM

    def _take_token(self, generation: _Generation, token: int, text: AnswerText) -> bool:
        """Stream one token's text; True when a stop string ended the answer."""
        generation.generated += 1
        if generation.first_token_at is None:
            generation.first_token_at = time.monotonic()
        if token in self._end_id_set:
            return False  # its output says finished, with reason stop
        self._emit_text(generation, text.push(token))
        if text.stopped:
            self._finish(generation, "stop")
        return text.stopped

    def _emit_text(self, generation: _Generation, text: str) -> None:
        if text:
            generation.stream(TokenText(text))

    def _finish(self, generation: _Generation, reason: str, text: AnswerText | None = None) -> None:
        """End the answer; ``text``: the text held back comes first."""
        if text is not None:
            self._emit_text(generation, text.flush())
        at = generation.submitted_at
        generation.stream(
            Finished.measured(generation.generated, reason, at, generation.first_token_at, at)
        )

    def _failed(self, generation: _Generation, error: Exception) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(error, EngineDeadError):
            generation.stream(Failed(self._died(error)))
            return
        log.error("request %s failed in vLLM", generation.handle.request_id, exc_info=error)
        reason = " ".join(str(error).split())
        generation.stream(Failed(InternalError(f"generation failed: {reason}")))

    def _heard(self, tokens: int) -> None:
        now = time.monotonic()
        self._heard_at = now
        self._outputs += 1
        self._recent.append((now, tokens))

    # -- health ----------------------------------------------------------------------

    def _died(self, error: Exception) -> Interrupted:
        """The engine process is gone (``error`` says how): the error its requests end with.

        The first report is kept: later ones are its echoes."""
        if self._failure is None:
            self._failure = f"the vLLM engine died: {error}"
            log.error("%s; /healthz answers 503 and the watchdog stops", self._failure)
        return Interrupted(self._failure)

    async def _watch_health(self) -> None:
        """Ask vLLM every few seconds whether its engine process lives."""
        while not self._closed:
            try:
                await self._llm.check_health()
            except Exception as e:
                self.abandon(self._died(e))
                return
            await asyncio.sleep(HEALTH_CHECK_EVERY_S)


def _generation_config(path: Path) -> Any:
    from transformers import GenerationConfig

    with contextlib.suppress(OSError):
        return GenerationConfig.from_pretrained(path)
    return None


def _describe(passed: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(passed.items())) or "vLLM's defaults"


def _model_info(llm: Any, path: Path) -> ModelInfo:
    """What vLLM made of the model: its context, dtype, device and KV-cache blocks."""
    from vllm.platforms import current_platform

    config = llm.vllm_config
    model_config = config.model_config
    dtype = str(model_config.dtype).removeprefix("torch.")
    hf_config = model_config.hf_config
    layout = kv_layout(hf_config.get_text_config(), DTYPE_BYTES.get(dtype, 2))
    model_max = int(getattr(model_config, "max_model_len", 0) or 0)
    blocks = int(config.cache_config.num_gpu_blocks or 0)
    block_size = int(config.cache_config.block_size)
    capacity = PagedKVCache(layout, blocks, block_size, model_max, max_context_of(hf_config))
    parallel = config.parallel_config
    return ModelInfo(
        name=path.name,
        path=str(path),
        device=current_platform.device_type,
        dtype=dtype,
        max_context=model_max,
        attention="paged",
        extra={
            "max_batch_size": int(config.scheduler_config.max_num_seqs),
            "tensor_parallel_size": int(parallel.tensor_parallel_size),
            "pipeline_parallel_size": int(parallel.pipeline_parallel_size),
        },
        memory=capacity,
        engine="vllm",
    )
