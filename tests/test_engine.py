"""The engine on the real default model: batching, settings, streaming text, failures.

Most tests share one float32 engine (greedy results are then exact, batched or
not); each asks for a few tokens only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmwsd.config import Config, EngineConfig, ModelConfig
from llmwsd.engines.chat_template import template_ids
from llmwsd.engines.detokenize import IncrementalDetokenizer, StopStringFilter
from llmwsd.engines.interface import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Started,
    TokenText,
)
from llmwsd.engines.transformers import engine as engine_module
from llmwsd.engines.transformers import kernels
from llmwsd.engines.transformers.batch import Batch, prefill_groups
from llmwsd.engines.transformers.engine import Engine
from llmwsd.engines.transformers.loading import (
    choose_attention,
    choose_device,
    choose_dtype,
    choose_max_batch_size,
)
from llmwsd.engines.transformers.sampling import TokenSampler, choose_tokens
from llmwsd.errors import Busy, ConfigError, ContextTooLong, InternalError
from llmwsd.service import health
from llmwsd.settings import GenerationSettings, OutputFormat
from tests.conftest import REAL, eventually, skip_or_fail, within

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
PARIS = "What is the capital of France?"
GREEDY = GenerationSettings(do_sample=False, max_new_tokens=16)


def require_model() -> None:
    if not MODEL.is_dir():
        skip_or_fail(f"no default model at {MODEL}: run `make model` first")


@pytest.fixture(scope="module")
def engine():
    require_model()
    config = Config(model=ModelConfig(dtype="float32"))
    engine = Engine._load(config, MODEL)  # synchronously: the engine outlives each test's loop
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def tokenizer():
    require_model()
    return AutoTokenizer.from_pretrained(MODEL)


@dataclass
class Run:
    """What one request received, in order."""

    events: list[GenerationEvent] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, event: GenerationEvent) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TokenText))

    @property
    def end(self) -> Finished | Failed:
        end = self.events[-1]
        assert isinstance(end, Finished | Failed)
        return end

    @property
    def started(self) -> Started:
        assert isinstance(self.events[0], Started)
        return self.events[0]

    def check_shape(self) -> None:
        """Started, TokenText..., exactly one Finished; or a single Failed."""
        if isinstance(self.events[0], Failed):
            assert len(self.events) == 1
            return
        assert isinstance(self.events[0], Started)
        assert all(isinstance(e, TokenText) and e.text for e in self.events[1:-1])
        assert isinstance(self.events[-1], Finished | Failed)


def submit(engine: Engine, content: str, settings: GenerationSettings = GREEDY, **changes: Any):
    run = Run()
    request = GenerationRequest(
        [{"role": "user", "content": content}], dataclasses.replace(settings, **changes)
    )
    handle = engine.submit(request, run.on_event)
    return run, handle


async def wait_done(*runs: Run, what: str = "end of the answer") -> None:
    await within(asyncio.gather(*(r.done.wait() for r in runs)), REAL, what)


async def generate(engine: Engine, content: str, **changes: Any) -> Run:
    run, _ = submit(engine, content, **changes)
    await wait_done(run, what=f"end of the answer to {content[:40]!r}")
    run.check_shape()
    return run


# -- choices at load time --------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "capability", "cpu_bf16", "expected"),
    [
        ("cpu", None, True, "bfloat16"),
        ("cpu", None, False, "float32"),
        ("cuda", (7, 5), False, "float16"),
        ("cuda", (8, 0), False, "bfloat16"),
        ("cuda:1", (9, 0), True, "bfloat16"),
    ],
)
def test_choose_dtype_auto(device, capability, cpu_bf16, expected):
    assert choose_dtype(device, capability, "auto", cpu_bf16) == expected


@pytest.mark.parametrize("requested", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(
    ("device", "capability"), [("cpu", None), ("cuda", (7, 5)), ("cuda", (9, 0))]
)
def test_choose_dtype_override(requested, device, capability):
    assert choose_dtype(device, capability, requested, cpu_has_bf16=False) == requested


@pytest.mark.parametrize(
    ("device", "capability", "flash", "expected"),
    [
        ("cpu", None, False, "sdpa"),
        ("cpu", None, True, "sdpa"),
        ("cuda", (7, 5), False, "sdpa"),
        ("cuda", (7, 5), True, "sdpa"),
        ("cuda", (8, 0), False, "sdpa"),
        ("cuda", (8, 0), True, "flash_attention_2"),
        ("cuda", (9, 0), False, "sdpa"),
        ("cuda", (9, 0), True, "flash_attention_2"),
    ],
)
def test_choose_attention_auto(device, capability, flash, expected):
    assert choose_attention("auto", device, capability, flash) == expected


@pytest.mark.parametrize("requested", ["sdpa", "eager", "flash_attention_2"])
def test_choose_attention_override(requested):
    assert choose_attention(requested, "cpu", None, False) == requested
    assert choose_attention(requested, "cuda", (9, 0), True) == requested


def test_choose_device_and_batch_size():
    assert choose_device("auto", False) == "cpu"
    assert choose_device("auto", True) == "cuda"
    assert choose_device("cpu", True) == "cpu"
    assert choose_device("cuda:1", True) == "cuda:1"
    with pytest.raises(ConfigError):
        choose_device("cuda", False)
    assert choose_max_batch_size(0, "cpu") == 8
    assert choose_max_batch_size(0, "cuda:0") == 32
    assert choose_max_batch_size(3, "cuda") == 3


# -- text: incremental detokenization and stop strings --------------------------------


def test_detokenizer_never_splits_characters(tokenizer):
    text = "café 😀 déjà vu, 日本語 and  two  spaces"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens are partial bytes
    detokenizer = IncrementalDetokenizer(tokenizer)
    chunks = [detokenizer.push(i) for i in ids]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert detokenizer.flush() == ""
    assert "".join(chunks) == tokenizer.decode(ids) == text


def test_detokenizer_flushes_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 😀")
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer)
    chunks = [detokenizer.push(i) for i in ids[:cut]]
    assert "".join(chunks) + detokenizer.flush() == tokenizer.decode(ids[:cut])


def test_stop_string_filter_holds_back_partial_matches():
    stops = StopStringFilter(["</end>", "STOP"])
    assert stops.push("Hello </") == ("Hello ", False)
    assert stops.push("en") == ("", False)
    assert stops.push("ding") == ("</ending", False)
    assert stops.push(" ST") == (" ", False)
    assert stops.push("OP here") == ("", True)
    assert StopStringFilter(["ab"]).push("xxabyyab") == ("xx", True)
    tail = StopStringFilter(["abc"])
    assert tail.push("xab") == ("x", False)
    assert tail.flush() == "ab"


# -- sampling ----------------------------------------------------------------------


def sampler(prompt_ids=(), end_ids=(9,), **changes: Any) -> TokenSampler:
    settings = dataclasses.replace(GenerationSettings(), **changes)
    return TokenSampler(settings, list(prompt_ids), 10, list(end_ids), torch.device("cpu"))


def test_greedy_applies_repetition_penalty_and_min_new_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.8, 0, 0, 0, 0, 0, 0, 9.0]] * 3)
    rows = [
        sampler(do_sample=False, repetition_penalty=1.0),
        sampler(prompt_ids=[1], do_sample=False, repetition_penalty=1.1),
        sampler(do_sample=False, repetition_penalty=1.0, min_new_tokens=1),
    ]
    assert choose_tokens(rows, logits.clone(), [0, 5, 0]) == [9, 9, 1]
    assert choose_tokens(rows, logits.clone(), [0, 0, 1])[2] == 9  # the minimum is reached
    logits[:, 9] = 0.0
    assert choose_tokens(rows[:2], logits[:2].clone(), [0, 0]) == [1, 2]  # 5/1.1 < 4.8


def test_seeded_sampling_is_the_same_alone_and_batched():
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    settings = [
        {"seed": 1, "top_k": 3},
        {"seed": 2, "top_k": 0, "top_p": 0.9},
        {"seed": 3, "top_k": 0, "top_p": 1.0, "temperature": 2.0},
        {"seed": 4, "top_k": 6, "top_p": 0.5},
    ]
    alone = [sampler(repetition_penalty=1.0, **s) for s in settings]
    batched = [sampler(repetition_penalty=1.0, **s) for s in settings]
    for _ in range(20):
        one_by_one = [
            choose_tokens([alone[i]], logits[i : i + 1].clone(), [0])[0] for i in range(4)
        ]
        assert choose_tokens(batched, logits.clone(), [0] * 4) == one_by_one


def test_sampling_respects_top_k_top_p_and_reaches_every_candidate():
    logits = torch.tensor([[3.0, 2.99, 2.98, -9, -9, -9, -9, -9, -9, -9]])
    for settings in ({"top_k": 2}, {"top_k": 0, "top_p": 0.6}, {"top_k": 0, "top_p": 1.0}):
        row = sampler(seed=5, repetition_penalty=1.0, **settings)
        seen = {choose_tokens([row], logits.clone(), [0])[0] for _ in range(60)}
        assert seen == {0, 1} if settings.get("top_k") or settings["top_p"] < 1 else {0, 1, 2}


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.zeros(2, 10)
    logits[0] = float("nan")
    rows = [sampler(seed=1, top_k=0, top_p=0.5), sampler(do_sample=False)]
    bad, good = choose_tokens(rows, logits, [0, 0])
    assert isinstance(bad, Exception) and good == 0


# -- generation on the real model ----------------------------------------------------


def test_a_burst_is_prefilled_in_two_groups_the_first_just_over_half():
    assert prefill_groups(8, split=True) == [5, 3]
    assert prefill_groups(7, split=True) == [4, 3]
    assert prefill_groups(3, split=True) == [2, 1]
    assert prefill_groups(2, split=True) == [2] and prefill_groups(1, split=True) == [1]
    assert prefill_groups(8, split=False) == [8] and prefill_groups(0, split=True) == []


def test_the_onednn_switch_is_restored():
    assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), kernels.onednn(False):
        assert not torch.backends.mkldnn.enabled
        raise RuntimeError
    assert torch.backends.mkldnn.enabled


# A model decoding with oneDNN off (another model's engine) beside a long bf16 prompt.
FLAG_FLIPPED_BESIDE_A_PROMPT = """
import sys, threading, time, torch
from transformers import AutoModelForCausalLM
from llmwsd.engines.transformers import kernels
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
stop = threading.Event()
def other_engine():
    for _ in range(100_000):
        if stop.is_set():
            break
        with kernels.onednn(False):
            pass
        time.sleep(0.0001)
thread = threading.Thread(target=other_engine)
thread.start()
try:
    with torch.inference_mode():
        for _ in range(6):
            with kernels.onednn(True):
                model(input_ids=torch.randint(0, 1000, (1, 600)), logits_to_keep=1)
finally:
    stop.set()
    thread.join()
"""


def test_a_forward_never_sees_another_thread_switch_onednn():
    """A switch loads a model while the old one serves. Without kernels' lock, a CPU with
    AMX failed the prompt ("BFloat16 Brgemm VNNI format is only supported ...") or died
    of an illegal instruction, here every time."""
    require_model()
    ran = subprocess.run(
        [sys.executable, "-c", FLAG_FLIPPED_BESIDE_A_PROMPT, str(MODEL)],
        capture_output=True,
        text=True,
        timeout=REAL,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]


def test_weights_laid_out_for_onednn_give_the_same_logits(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    ids = torch.tensor([template_ids(tokenizer, [{"role": "user", "content": PARIS}])])
    embedding = model.get_input_embeddings().weight
    # Both forwards under the engine's lock, with oneDNN on: the flag is one for the whole
    # process, and another thread (an earlier test's engine) may switch it in between.
    with torch.inference_mode(), kernels.onednn(True):
        before = model(input_ids=ids).logits
        # No memory to spare for a second copy: every step runs on the packed weights.
        assert kernels.choose_kernels(model, max_rows=2, available_bytes=0) == 0
        after = model(input_ids=ids).logits
    packed = [m for m in model.modules() if isinstance(m, kernels.PackedLinear)]
    assert len(packed) == 211  # 30 layers × 7, and the output layer
    assert all(layer.weight is None for layer in packed)
    assert model.get_input_embeddings().weight is embedding  # tied to the output layer: kept
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.01)


async def test_paris_greedy_through_load():
    require_model()
    engine = await Engine.load(Config(engine=EngineConfig(max_batch_size=2)), MODEL)
    try:
        assert engine.info.name == "SmolLM2-135M-Instruct"
        assert engine.info.device == "cpu"
        assert engine.info.attention == "sdpa"
        assert 0 < engine.info.max_context <= 8192  # the model's own, or less for memory
        assert engine.max_batch_size == 2
        run = await generate(engine, PARIS)
        assert "Paris" in run.text
        assert run.end.finish_reason == "stop"
        assert run.started.tokens_in == len(engine.tokenize([{"role": "user", "content": PARIS}]))
        assert run.end.total_tokens > 0 and run.end.ttft_ms > 0 and run.end.tokens_per_s > 0
        stats = engine.stats()
        assert stats["active"] == 0 and stats["queued"] == 0 and stats["steps"] > 0
        # The same answer whichever kernels decode it (the kernels module chose at load).
        chosen = engine._plain_decoding_rows
        engine._plain_decoding_rows = 0 if chosen else engine.max_batch_size
        assert (await generate(engine, PARIS)).text == run.text
        engine._plain_decoding_rows = chosen

        # drain: running requests past the timeout are cancelled, new ones refused.
        long_run, _ = submit(engine, "Tell me a long story.", max_new_tokens=500)
        await engine.drain(0.3)
        await within(long_run.done.wait(), 10, "the long answer cancelled by the drain")
        assert long_run.end.finish_reason == "cancelled"
        refused = await generate(engine, PARIS)
        assert isinstance(refused.end, Failed) and isinstance(refused.end.error, Busy)
    finally:
        await engine.close()
        await engine.close()  # idempotent


async def test_paris_float32_equals_transformers_generate(engine, tokenizer):
    run = await generate(engine, PARIS, repetition_penalty=1.0)
    assert run.text == "The capital of France is Paris."
    model = engine._model
    prompt = template_ids(tokenizer, [{"role": "user", "content": PARIS}])
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert run.text == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


async def test_utf8_is_never_split(engine, tokenizer):
    content = "Repeat this text: 😀 Bonjour 😀"
    run = await generate(engine, content, repetition_penalty=1.0, max_new_tokens=12)
    tokens = [e.text for e in run.events if isinstance(e, TokenText)]
    assert all("\ufffd" not in t for t in tokens)
    assert any(not t.isascii() for t in tokens)
    prompt = template_ids(tokenizer, [{"role": "user", "content": content}])
    with torch.inference_mode():
        out = engine._model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert run.text == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


async def test_concurrent_requests_match_running_alone(engine):
    prompts = [
        (PARIS, {}),
        ("Write a haiku about the sea.", {"repetition_penalty": 1.0}),
        ("List three fruits.", {"repetition_penalty": 1.3}),
        ("Who wrote Hamlet?", {"temperature": 0.0, "do_sample": True}),
        ("Describe a cat.", {"do_sample": True, "seed": 7, "top_k": 20}),
        ("Why is the sky blue?", {"do_sample": True, "seed": 3, "top_p": 0.8, "top_k": 0}),
        ("What is 12 times 7?", {"do_sample": True, "seed": 5, "temperature": 1.2}),
        ("Name a color.", {"max_new_tokens": 5, "min_new_tokens": 5}),
    ]
    alone = [await generate(engine, p, **s) for p, s in prompts]
    together = await asyncio.gather(*(generate(engine, p, **s) for p, s in prompts))
    assert engine.stats()["batch_size"] >= 1
    for (prompt, _), a, t in zip(prompts, alone, together, strict=True):
        # Greedy rows are exact in float32; seeded sampling sees the same logits and generator.
        assert t.text == a.text, prompt
        assert t.end == dataclasses.replace(
            a.end, ttft_ms=t.end.ttft_ms, tokens_per_s=t.end.tokens_per_s
        )


async def test_prompts_that_start_alike_reuse_the_cached_beginning(engine, tokenizer):
    """Same answers (float32, exact) as prefilling every prompt whole."""
    first_turn = [{"role": "user", "content": PARIS}]
    prompts = ["Who wrote Hamlet?", "Name a color.", "Describe a cat.", PARIS]

    async def ask(messages: list[dict[str, str]]) -> Run:
        run = Run()
        engine.submit(GenerationRequest(messages, GREEDY), run.on_event)
        await wait_done(run)
        return run

    prefix_cache = engine._prefix_cache
    assert prefix_cache is not None and prefix_cache.max_bytes > 0
    engine._prefix_cache = None  # read by the engine thread at the next prefill
    try:
        whole = [await generate(engine, p) for p in prompts]
        answer = (await ask(first_turn)).text
        second_turn = [
            *first_turn,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And of Germany?"},
        ]
        whole_second_turn = (await ask(second_turn)).text
    finally:
        engine._prefix_cache = prefix_cache

    await generate(engine, PARIS)  # its beginning is now cached (if it was not before)
    before = prefix_cache.stats()
    reused = await asyncio.gather(*(generate(engine, p) for p in prompts))
    after = prefix_cache.stats()
    # At least the chat template's system prompt (24 tokens) of every prompt.
    assert after["hits"] - before["hits"] == len(prompts)
    assert after["reused_tokens"] - before["reused_tokens"] >= 24 * len(prompts)
    assert [r.text for r in reused] == [w.text for w in whole]
    assert 0 < after["bytes"] <= after["max_bytes"]

    # A session's next turn reuses the first turn's prompt.
    first_turn_tokens = len(template_ids(tokenizer, first_turn))
    assert (await ask(second_turn)).text == whole_second_turn
    assert prefix_cache.stats()["reused_tokens"] - after["reused_tokens"] >= first_turn_tokens


async def test_a_prompt_the_cache_cannot_keep_is_still_answered(engine, monkeypatch, caplog):
    def fail(*args: Any) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(Batch, "row_kv", fail)
    run = await generate(engine, "Spell the word zebra backwards, please.")
    assert run.end.finish_reason in ("stop", "length") and run.text
    assert "cannot keep prompts in the prefix cache" in caplog.text


async def test_newcomer_joins_running_batch(engine):
    order: list[tuple[str, GenerationEvent]] = []

    def tracked(name: str, run: Run):
        def on_event(event: GenerationEvent) -> None:
            order.append((name, event))
            run.on_event(event)

        return on_event

    runs = []
    for i in range(3):
        run = Run()
        settings = dataclasses.replace(GREEDY, max_new_tokens=40, min_new_tokens=40)
        request = GenerationRequest([{"role": "user", "content": f"Count to {i + 20}."}], settings)
        engine.submit(request, tracked(f"long{i}", run))
        runs.append(run)
    await eventually(
        lambda: sum(isinstance(e, TokenText) for e in runs[0].events) >= 5,
        REAL,
        "5 tokens of the first long answer",
    )
    late = Run()
    late_request = GenerationRequest([{"role": "user", "content": PARIS}], GREEDY)
    engine.submit(late_request, tracked("late", late))
    await wait_done(*runs, late, what="end of the four answers")
    first_late_token = next(
        i for i, (n, e) in enumerate(order) if n == "late" and isinstance(e, TokenText)
    )
    first_long_end = next(
        i for i, (n, e) in enumerate(order) if n != "late" and isinstance(e, Finished)
    )
    assert first_late_token < first_long_end
    assert all(r.end.total_tokens == 40 for r in runs)


async def test_cancel_frees_the_slot(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_batch_size", 1)
    long_run, long_handle = submit(engine, "Tell me a long story.", max_new_tokens=300)
    await eventually(
        lambda: any(isinstance(e, TokenText) for e in long_run.events),
        REAL,
        "the long answer's first token",
    )
    waiting, _ = submit(engine, PARIS)
    # Two steps later the engine has taken it from its inbox, and kept it waiting.
    steps = engine.stats()["steps"]
    await eventually(
        lambda: engine.stats()["steps"] >= steps + 2, REAL, "two more steps of the long answer"
    )
    assert engine.stats()["queued"] == 1 and engine.stats()["active"] == 1
    assert not engine._inbox and len(engine._waiting) == 1  # seen, and kept waiting
    assert not any(isinstance(e, TokenText) for e in waiting.events)
    long_handle.cancel()
    await wait_done(waiting, what="the waiting answer, once the slot is free")
    assert long_run.end.finish_reason == "cancelled" and long_run.end.total_tokens < 300
    assert "Paris" in waiting.text


async def test_stop_strings_cut_the_text(engine):
    run = await generate(engine, PARIS, stop=("Paris",))
    assert run.text == "The capital of France is "
    assert run.end.finish_reason == "stop"
    across_tokens = await generate(engine, PARIS, stop=("of Fr",))
    assert across_tokens.text == "The capital "


async def test_min_new_tokens_is_honoured(engine):
    run = await generate(engine, PARIS, min_new_tokens=12, max_new_tokens=12)
    assert run.text.startswith("The capital of France is Paris.")
    assert run.end.total_tokens == 12 and run.end.finish_reason == "length"


async def test_context_too_long_and_lowered_max_tokens(engine, monkeypatch):
    huge = "word " * engine.info.max_context
    run = await generate(engine, huge)
    assert isinstance(run.end, Failed) and isinstance(run.end.error, ContextTooLong)
    assert run.end.error.max_context == engine.info.max_context

    tokens_in = len(engine.tokenize([{"role": "user", "content": PARIS}]))
    monkeypatch.setattr(engine.info, "max_context", tokens_in + 3)
    run = await generate(engine, PARIS, max_new_tokens=100)
    assert run.started.max_tokens == 3
    assert run.end.total_tokens == 3 and run.end.finish_reason == "length"


async def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    forward = engine._model.forward
    calls = []

    def flaky_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine._model, "forward", flaky_forward)
    failed = await generate(engine, PARIS)
    assert isinstance(failed.end, Failed) and isinstance(failed.end.error, InternalError)
    assert len(failed.events) == 2  # Started, then Failed
    ok = await generate(engine, PARIS)
    assert "Paris" in ok.text


async def test_a_hung_step_is_seen_stuck_its_request_ends_and_the_engine_recovers(
    engine, monkeypatch
):
    """A forward that does not return (a CUDA hang): the loop side ends its request."""
    forward = engine._model.forward
    entered, release = threading.Event(), threading.Event()

    def hung_forward(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(REAL)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine._model, "forward", hung_forward)
    monitor = health.HealthMonitor(lambda: engine, 0.5)
    run, _ = submit(engine, PARIS)
    try:
        await within(asyncio.to_thread(entered.wait, REAL), REAL, "the step in the hung forward")
        await eventually(lambda: not monitor.alive(), REAL, "the engine seen as stuck")
        assert monitor.figures()["engine_stuck"] and monitor.check()
        await wait_done(run, what="the stuck request's end")
        assert [type(e) for e in run.events] == [Failed], run.events
        assert run.end.error.code == "interrupted"
        refused = await generate(engine, PARIS)  # not queued behind the hang
        assert isinstance(refused.end, Failed) and refused.end.error.code == "interrupted"
    finally:
        release.set()
    await eventually(lambda: not engine.heartbeat().busy, REAL, "the released engine idle")
    assert not monitor.check() and monitor.alive()
    assert [type(e) for e in run.events] == [Failed]  # what the hung step sent went nowhere
    ok = await generate(engine, PARIS)
    assert "Paris" in ok.text


async def test_close_collects_garbage_off_the_event_loop(engine, tokenizer, monkeypatch):
    """gc.collect (and on CUDA empty_cache) while a switched-to model serves: not on the loop."""
    collected_in = []
    monkeypatch.setattr(
        engine_module.gc, "collect", lambda: collected_in.append(threading.current_thread())
    )
    twin = Engine(engine._model, tokenizer, tokenizer, engine.info, 1)  # shares the weights
    await twin.close()
    assert collected_in and threading.current_thread() not in collected_in


async def test_close_does_not_hang_on_a_stuck_engine_thread(engine, tokenizer, monkeypatch, caplog):
    """Shutting down or switching away from a wedged engine ends; its thread is left."""
    twin = Engine(engine._model, tokenizer, tokenizer, engine.info, 1)  # shares the weights
    entered, release = threading.Event(), threading.Event()

    def hung_step(arrived: Any) -> None:
        entered.set()
        release.wait(REAL)

    monkeypatch.setattr(twin, "_step", hung_step)
    monkeypatch.setattr(engine_module, "THREAD_STOP_TIMEOUT_S", 0.2)
    submit(twin, PARIS)
    try:
        await within(asyncio.to_thread(entered.wait, REAL), REAL, "the step in the hung forward")
        await within(twin.close(), REAL, "close() of a stuck engine")
        assert twin._thread.is_alive()
        assert "the engine thread did not stop within 0.2 s; leaving it" in caplog.text
    finally:
        release.set()
    twin._thread.join(REAL)


async def test_a_raising_callback_does_not_hurt_others(engine):
    def broken(event: GenerationEvent) -> None:
        raise ValueError("client went away")

    engine.submit(GenerationRequest([{"role": "user", "content": PARIS}], GREEDY), broken)
    run = await generate(engine, PARIS)
    assert "Paris" in run.text


# -- fairness ---------------------------------------------------------------------------


def record_steps(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """After every engine step, the request ids in the running batch, in row order."""
    steps: list[list[str]] = []
    step = engine._step

    def recorded(arrived: Any) -> None:
        step(arrived)
        batch = engine._batch
        steps.append([g.handle.request_id for g in batch.rows] if batch is not None else [])

    monkeypatch.setattr(engine, "_step", recorded)
    return steps


def fixed_length(content: str, tokens: int, request_id: str) -> GenerationRequest:
    settings = dataclasses.replace(GREEDY, max_new_tokens=tokens, min_new_tokens=tokens)
    return GenerationRequest([{"role": "user", "content": content}], settings, request_id)


async def test_an_idle_engine_takes_a_burst_in_one_step(engine, monkeypatch):
    # Generous: the mechanism is under test, not a loaded machine's scheduling.
    monkeypatch.setattr(engine_module, "BURST_QUIET_S", 0.5)
    monkeypatch.setattr(engine_module, "BURST_MAX_S", 5.0)
    arrivals: list[int] = []
    step = engine._step

    def recorded(arrived: Any) -> None:
        arrivals.append(len(arrived))
        step(arrived)

    monkeypatch.setattr(engine, "_step", recorded)
    runs = [Run() for _ in range(4)]
    for i, run in enumerate(runs):
        engine.submit(fixed_length(f"Count to {i + 3}.", 2, f"burst{i}"), run.on_event)
        await asyncio.sleep(0.01)  # a burst spread over 40 ms, no gap of 0.5 s
    await wait_done(*runs, what="end of the burst's answers")
    assert arrivals[0] == 4, arrivals


async def test_a_newcomer_joins_the_step_after_a_slot_frees(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_batch_size", 2)
    steps = record_steps(engine, monkeypatch)
    runs = {name: Run() for name in ("long", "short", "newcomer")}
    engine.submit(fixed_length("Tell me a story.", 30, "long"), runs["long"].on_event)
    engine.submit(fixed_length("Count to ten.", 6, "short"), runs["short"].on_event)
    await eventually(
        lambda: steps and len(steps[-1]) == 2, REAL, "a step with both rows", interval=0.01
    )
    engine.submit(fixed_length(PARIS, 4, "newcomer"), runs["newcomer"].on_event)
    await wait_done(*runs.values(), what="end of the three answers")

    assert all(len(rows) <= 2 for rows in steps)
    # The short one leaves at the end of the step after which it was last seen; the newcomer
    # fills its slot in the next step.
    freed = max(i for i, rows in enumerate(steps) if "short" in rows) + 1
    assert steps[freed] == ["long"], steps
    assert steps[freed + 1] == ["long", "newcomer"], steps
    assert all(r.end.finish_reason == "length" for r in runs.values())


async def test_a_long_request_does_not_starve_short_ones(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_batch_size", 2)
    steps = record_steps(engine, monkeypatch)
    order: list[str] = []
    runs: dict[str, Run] = {}

    def track(name: str):
        def on_event(event: GenerationEvent) -> None:
            if isinstance(event, Finished):
                order.append(name)
            runs[name].on_event(event)

        return on_event

    names = ["long", "short1", "short2", "short3", "short4"]
    for name in names:
        runs[name] = Run()
        tokens = 40 if name == "long" else 4
        engine.submit(fixed_length(f"Say something, {name}.", tokens, name), track(name))
    await wait_done(*runs.values(), what="end of the five answers")

    # The short ones take turns in the free slot while the long one keeps going.
    assert order == ["short1", "short2", "short3", "short4", "long"]
    long_steps = [i for i, rows in enumerate(steps) if "long" in rows]
    assert long_steps == list(range(long_steps[0], long_steps[-1] + 1))  # never left out
    first_rows = [rows[-1] for rows in steps if len(rows) == 2]
    assert [name for i, name in enumerate(first_rows) if name not in first_rows[:i]] == names[1:]
    assert all(r.end.total_tokens == (40 if n == "long" else 4) for n, r in runs.items())


async def test_constrained_and_free_rows_in_one_batch(engine):
    """Half the rows with a format, half without: the free ones answer as they do alone
    (greedy, float32: exact), the constrained ones match their formats."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "big": {"type": "boolean"}},
        "required": ["city", "big"],
    }
    formats = [
        OutputFormat.from_wire({"type": "json_schema", "schema": schema}),
        OutputFormat.from_wire({"type": "regex", "pattern": r"\d{4}-\d{2}-\d{2}"}),
        OutputFormat.from_wire({"type": "choice", "choices": ["yes", "no"]}),
        OutputFormat.from_wire({"type": "json"}),
    ]
    free = [PARIS, "Write a haiku about the sea.", "Who wrote Hamlet?", "Name a color."]
    asks = [
        "Describe Paris as JSON.",
        "When was the Eiffel Tower built?",
        "Is water wet?",
        "A cat?",
    ]
    alone = [await generate(engine, p, max_new_tokens=24) for p in free]
    together = await asyncio.gather(
        *(generate(engine, p, max_new_tokens=24) for p in free),
        *(
            generate(engine, p, max_new_tokens=60, format=f)
            for p, f in zip(asks, formats, strict=True)
        ),
    )
    for a, t in zip(alone, together[:4], strict=True):
        assert t.text == a.text
    json_answer, date, choice, anything = (run.text for run in together[4:])
    jsonschema.validate(json.loads(json_answer), schema)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date)
    assert choice in ("yes", "no")
    assert isinstance(json.loads(anything), dict)
    assert all(run.end.finish_reason == "stop" for run in together[4:])
