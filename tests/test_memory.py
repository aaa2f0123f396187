"""Memory: the KV-cache formula, the measured estimate, admission control, resources, /metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoConfig, Gemma2Config, MistralConfig, Qwen2Config

from llmwsd import resources
from llmwsd.daemon import Daemon
from llmwsd.engines import memory
from llmwsd.engines.memory import KVLayout, MemoryEstimate
from llmwsd.engines.transformers import measure
from tests.conftest import (
    DEFAULT_MODEL,
    FAST,
    REAL,
    ROOT,
    RunningDaemon,
    recv_json,
    recv_until,
    ws_url,
)

# -- the KV cache per token, by hand ---------------------------------------------------


def test_kv_bytes_of_the_default_model() -> None:
    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    layout = memory.kv_layout(config, dtype_bytes=2)
    # 30 layers × 3 KV heads × head dim 64 × (K and V) × 2 bytes (bf16)
    assert layout.bytes_per_token == 30 * 3 * 64 * 2 * 2 == 23040
    assert layout.kv_bytes(8192) == 23040 * 8192
    assert memory.kv_layout(config, dtype_bytes=4).bytes_per_token == 46080


def test_kv_bytes_with_grouped_query_attention() -> None:
    # Qwen2-7B's shape: 28 attention heads share 4 KV heads; head dim = 3584 / 28 = 128.
    config = Qwen2Config(
        hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28
    )
    layout = memory.kv_layout(config, dtype_bytes=2)
    assert layout.bytes_per_token == 28 * 4 * 128 * 2 * 2 == 57344
    assert layout.kv_bytes(1000) == 57344 * 1000


def test_kv_bytes_with_a_sliding_window() -> None:
    # Mistral-7B v0.1: every layer attends to the last 4096 tokens only.
    config = MistralConfig(
        num_hidden_layers=32, num_key_value_heads=8, head_dim=128, sliding_window=4096
    )
    layout = memory.kv_layout(config, dtype_bytes=2)
    assert layout.bytes_per_token == 32 * 8 * 128 * 2 * 2 == 131072
    assert layout.kv_bytes(1000) == 131072 * 1000
    assert layout.kv_bytes(10000) == layout.kv_bytes(4096) == 131072 * 4096


def test_kv_bytes_with_mixed_full_and_sliding_layers() -> None:
    # Gemma-2: sliding and full layers alternate, 4 KV heads of 256.
    config = Gemma2Config(
        num_hidden_layers=26, num_key_value_heads=4, head_dim=256, sliding_window=4096
    )
    layout = memory.kv_layout(config, dtype_bytes=2)
    per_layer = 4 * 256 * 2 * 2
    assert (layout.full_layers, len(layout.windows)) == (13, 13)
    assert layout.kv_bytes(2000) == per_layer * 26 * 2000
    assert layout.kv_bytes(8192) == per_layer * (13 * 8192 + 13 * 4096)
    # Qwen2 with a window on its top layers only.
    qwen = Qwen2Config(
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=2,
        hidden_size=1024,
        use_sliding_window=True,
        sliding_window=1024,
        max_window_layers=20,
    )
    layout = memory.kv_layout(qwen, dtype_bytes=2)
    assert (layout.full_layers, layout.windows) == (20, (1024,) * 4)
    assert layout.kv_bytes(3000) == 2 * 64 * 2 * 2 * (20 * 3000 + 4 * 1024)


def estimate_for_tests(budget: int, kv_per_token: int = 2, activation: int = 0) -> MemoryEstimate:
    layout = KVLayout(kv_heads=1, head_dim=kv_per_token // 2, dtype_bytes=1, full_layers=1)
    estimate = MemoryEstimate(
        layout=layout,
        activation_bytes_per_token=activation,
        attention_bytes_per_token_squared=0,
        probe_tokens=16,
        device="cpu",
        available_bytes=budget,
        available_source="test",
        utilization=1.0,
        reserve_bytes=0,
        budget_bytes=budget,
        model_max=4096,
    )
    return dataclasses.replace(estimate, max_context=estimate.tokens_that_fit())


def test_a_batch_costs_its_rows_times_the_longest() -> None:
    estimate = estimate_for_tests(budget=10_000, kv_per_token=10, activation=3)
    # One left-padded cache: the short row is as long as the long one.
    assert estimate.batch_bytes([(100, 200), (10, 20)]) == 2 * (10 * 200 + 3 * 104)
    # The longest context that fits alone: 10 + 3 bytes for each of its padded tokens.
    assert estimate.max_context == 768 == memory.padded_length(768) <= 10_000 // 13
    assert estimate_for_tests(budget=40).max_context == 16  # 2 bytes a token, 16 at least
    # On CUDA the room the cache grows into is allocated at once, and counts.
    on_gpu = dataclasses.replace(estimate, device="cuda")
    assert on_gpu.batch_bytes([(100, 200)]) == 10 * memory.cache_room(200) + 3 * 104
    assert memory.cache_room(200) == 328 and memory.cache_room(4000) == 5000


def test_prompts_are_padded_to_few_lengths() -> None:
    assert [memory.padded_length(n) for n in (1, 16, 17, 100, 130, 257, 1000, 8191)] == [
        8, 16, 24, 104, 144, 288, 1024, 8192,
    ]  # fmt: skip
    lengths = {memory.padded_length(n) for n in range(1, 8193)}
    assert len(lengths) <= 64  # a few kernels' shapes, not thousands
    assert all(n <= memory.padded_length(n) <= max(n + 7, n * 9 // 8) for n in range(1, 8193))
    # Admission counts the padded prefill.
    estimate = estimate_for_tests(budget=10_000, kv_per_token=10, activation=3)
    assert estimate.batch_bytes([(100, 100)]) == 10 * 104 + 3 * 104


def test_cgroup_limits_lower_the_available_memory(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "llmws.service").mkdir(parents=True)
    membership.write_text("0::/llmws.service\n")
    (v2 / "llmws.service" / "memory.max").write_text("1000000\n")
    (v2 / "llmws.service" / "memory.current").write_text("600000\n")
    (v2 / "llmws.service" / "memory.stat").write_text("anon 500000\ninactive_file 100000\n")
    # limit − (usage − reclaimable page cache)
    assert memory.cgroup_available_bytes(v2, membership) == 1_000_000 - 500_000
    (v2 / "llmws.service" / "memory.max").write_text("max\n")
    assert memory.cgroup_available_bytes(v2, membership) is None
    # cgroup v1, inside a container: the cgroup's folder is the mount point.
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    membership.write_text("4:memory:/docker/abc\n1:cpu:/docker/abc\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("500000\n")
    assert memory.cgroup_available_bytes(v1, membership) == 1_500_000
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert memory.cgroup_available_bytes(v1, membership) is None


def test_a_short_prefill_takes_tensors_up_to_1_mib_from_the_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    thresholds: list[int] = []

    def mallopt(parameter: int, value: int) -> int:
        assert parameter == measure.M_MMAP_THRESHOLD
        thresholds.append(value)
        return 1

    monkeypatch.setattr(measure, "_glibc_function", lambda name: mallopt)
    monkeypatch.setattr(measure, "_large_allocations_mapped_apart", False)
    with measure.short_prefill_on_the_heap(8):
        assert thresholds == []  # the process never had large allocations mapped apart
    assert measure.map_large_allocations_apart()
    with measure.short_prefill_on_the_heap(measure.SHORT_PREFILL_TOKENS):
        assert thresholds == [256 * 1024]  # a long prefill stays mapped apart
    with pytest.raises(RuntimeError), measure.short_prefill_on_the_heap(100):
        assert thresholds[-1] == 1024 * 1024
        raise RuntimeError("the prefill failed")
    assert thresholds[-1] == 256 * 1024  # set back, even after a failure


@pytest.mark.slow
def test_predicted_peak_is_within_15_percent_of_the_measured_rss() -> None:
    """A fresh process: load (the estimate is measured), then one long prompt."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.peak_memory_probe", str(DEFAULT_MODEL), "700"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["prompt_tokens"] > 1500
    predicted, measured = figures["predicted"], figures["measured"]
    assert abs(predicted - measured) <= 0.15 * measured, figures


# -- admission control on the fake engine -------------------------------------------------


async def connect(daemon: Daemon) -> websockets.ClientConnection:
    ws = await websockets.connect(ws_url(daemon), open_timeout=FAST)
    await ws.send(json.dumps({}))
    assert (await recv_json(ws, what="welcome"))["type"] == "welcome"
    return ws


async def ask(ws: websockets.ClientConnection, words: int, **settings: Any) -> None:
    prompt = {"system": "", "user": " ".join(["word"] * words)}
    await ws.send(json.dumps({"type": "inference", "prompt": prompt, "config": settings}))


async def test_a_prompt_over_max_context_is_refused_before_compute(fake_daemon: Daemon) -> None:
    ws = await connect(fake_daemon)
    await ask(ws, 5000)
    error = await recv_json(ws)
    assert error["code"] == "context_too_long"
    assert error["max_context"] == 4096
    assert error["input_length"] == 5000 + 4  # the fake engine counts words + 4
    assert fake_daemon.slot.engine.submitted == []  # type: ignore[union-attr]
    await ws.close()


@pytest.mark.parametrize("on_overflow", ["truncate", "refuse"])
async def test_the_context_limit_at_its_exact_edge(fake_daemon_factory: Any, on_overflow) -> None:
    """Admission enforces the limit (the fake engine does not): max_context tokens is one
    too many, one fewer leaves room for exactly one new token."""
    daemon = await fake_daemon_factory(limits={"on_overflow": on_overflow})
    engine = daemon.slot.engine
    ws = await connect(daemon)
    await ask(ws, 4096 - 4)  # exactly max_context tokens
    error = await recv_json(ws, timeout=5)
    assert error["code"] == "context_too_long" and error["input_length"] == 4096
    await ask(ws, 4096 - 5, max_new_tokens=1)  # one token of room, asked for one
    start = (await recv_until(ws, {"start", "error"}, timeout=5))[-1]
    assert start["type"] == "start" and (start["tokens_in"], start["max_tokens"]) == (4095, 1)
    assert "max_tokens_requested" not in start
    await recv_until(ws, {"done"}, timeout=5)
    await ask(ws, 4096 - 5, max_new_tokens=2)  # one token of room, asked for two
    answer = (await recv_until(ws, {"start", "error"}, timeout=5))[-1]
    if on_overflow == "refuse":
        assert answer["code"] == "context_too_long" and answer["max_new_tokens"] == 2
    else:
        assert answer["type"] == "start" and answer["max_tokens"] == 1
        assert answer["max_tokens_requested"] == 2
        await recv_until(ws, {"done"}, timeout=5)
    assert [len(r.messages[-1]["content"].split()) for r in engine.submitted] == [4091] * (
        1 if on_overflow == "refuse" else 2
    )
    await ws.close()


async def test_max_new_tokens_is_lowered_to_fit_and_start_says_so(fake_daemon: Daemon) -> None:
    ws = await connect(fake_daemon)
    await ask(ws, 4000, max_new_tokens=2048)
    start = (await recv_until(ws, {"start"}))[-1]
    assert start["tokens_in"] == 4004
    assert start["max_tokens"] == 4096 - 4004
    assert start["max_tokens_requested"] == 2048
    await recv_until(ws, {"done"})
    await ws.close()


async def test_on_overflow_refuse(fake_daemon_factory: Any) -> None:
    daemon = await fake_daemon_factory(limits={"on_overflow": "refuse"})
    ws = await connect(daemon)
    await ask(ws, 4000, max_new_tokens=2048)
    error = await recv_json(ws)
    assert error["code"] == "context_too_long"
    assert (error["input_length"], error["max_context"], error["max_new_tokens"]) == (
        4004,
        4096,
        2048,
    )
    await ws.close()


async def test_requests_over_the_budget_queue_and_the_queue_is_bounded(
    fake_daemon_factory: Any,
) -> None:
    daemon = await fake_daemon_factory(limits={"max_queue": 1})
    # Each request: 10 prompt tokens + 30 new = 40 tokens at 2 bytes; two fit, not three.
    daemon.slot.engine.info.memory = estimate_for_tests(budget=2 * 80 + 79)
    sockets = [await connect(daemon) for _ in range(4)]
    for ws in sockets[:3]:
        await ask(ws, 6, max_new_tokens=30, min_new_tokens=30)
    first = [await recv_json(ws) for ws in sockets[:3]]
    assert [m["type"] for m in first] == ["start", "start", "queued"]
    assert first[2]["position"] == 1 and first[2]["request_id"] and "seq" in first[2]
    await ask(sockets[3], 6, max_new_tokens=30)
    busy = await recv_json(sockets[3])
    assert busy["code"] == "busy"
    assert daemon.reports.status()["queue"] == 1
    # The queued one starts once another is done, and is done after both.
    done_order = []

    async def until_done(i: int) -> list[dict[str, Any]]:
        events = await recv_until(sockets[i], {"done"})
        done_order.append(i)
        return events

    waited = await asyncio.gather(*(until_done(i) for i in range(3)))
    assert done_order[-1] == 2
    assert [m["type"] for m in waited[2]][:1] == ["start"]
    assert daemon.slot.admission.stats()["reserved_bytes"] == 0
    for ws in sockets:
        await ws.close()


async def test_a_queued_request_can_be_cancelled(fake_daemon: Daemon) -> None:
    fake_daemon.slot.engine.info.memory = estimate_for_tests(budget=80)  # type: ignore[union-attr]
    running, waiting = await connect(fake_daemon), await connect(fake_daemon)
    await ask(running, 6, max_new_tokens=30, min_new_tokens=30)
    await ask(waiting, 6, max_new_tokens=30)
    assert (await recv_json(waiting))["type"] == "queued"
    await waiting.send(json.dumps({"type": "cancel"}))
    messages = await recv_until(waiting, {"done"})
    assert messages[-1]["finish_reason"] == "cancelled"
    assert fake_daemon.slot.admission.stats()["waiting_for_memory"] == 0
    await recv_until(running, {"done"})
    assert fake_daemon.slot.admission.stats()["reserved_bytes"] == 0
    await running.close()
    await waiting.close()


# -- resources -----------------------------------------------------------------------------


def fake_nvml(fail_init: Exception | None = None) -> types.ModuleType:
    class NotSupported(Exception):
        pass

    def unsupported(*args: Any) -> Any:
        raise NotSupported("Not Supported")

    def init() -> None:
        if fail_init is not None:
            raise fail_init

    gib = 1024**3
    return types.SimpleNamespace(  # type: ignore[return-value]
        nvmlInit=init,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            used=10 * gib, total=80 * gib, free=70 * gib
        ),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42, memory=10),
        nvmlDeviceGetTemperature=lambda h, sensor: 55,
        nvmlDeviceGetPowerUsage=unsupported,
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        NVML_TEMPERATURE_GPU=0,
    )


def test_resources_without_nvml() -> None:
    def missing_package() -> types.ModuleType:
        raise ImportError("No module named 'pynvml'")

    for monitor in (
        resources.GpuMonitor(missing_package),
        resources.GpuMonitor(lambda: fake_nvml(RuntimeError("NVML Shared Library Not Found"))),
        resources.GpuMonitor(),  # the real package: this machine has no NVIDIA driver
    ):
        report = resources.report("cpu", monitor)
        assert report["gpus"] == []
        # What a user reads says what it means; NVML's own words go to the log only.
        assert report["gpu_status"].startswith("no NVIDIA GPU")
        assert "Shared Library" not in report["gpu_status"]
        assert report["device"] == "cpu" and report["total_gb"] > 0
        assert report["host"]["rss_gb"] > 0 and report["host"]["ram_available_gb"] > 0


def test_resources_per_gpu_from_nvml() -> None:
    report = resources.report("cuda:0", resources.GpuMonitor(fake_nvml))
    (gpu,) = report["gpus"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert (gpu["memory_used_gb"], gpu["memory_total_gb"]) == (10, 80)
    assert (gpu["utilization_percent"], gpu["temperature_c"]) == (42, 55)
    assert gpu["power_w"] is None  # not supported by this board: left out, no error
    assert gpu["compute_capability"] == "9.0"
    # On a GPU, the top-level figures old clients read are the GPU's.
    assert (report["total_gb"], report["free_gb"]) == (80, 70)
    assert report["gpu_status"] == "1 GPU"


# -- /metrics ------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def test_metrics_count_what_was_sent(fake_daemon: Daemon) -> None:
    ws = await connect(fake_daemon)
    done = []
    starts = []
    for words in (3, 5):
        await ask(ws, words)
        events = await recv_until(ws, {"done"})
        starts += [e for e in events if e["type"] == "start"]
        done.append(events[-1])
    await ask(ws, 5000)
    assert (await recv_json(ws))["code"] == "context_too_long"
    metrics = await asyncio.to_thread(scrape, fake_daemon.server.port)
    assert metrics["llmws_requests_total"] == {
        (("outcome", "stop"),): 2,
        (("outcome", "context_too_long"),): 1,
    }
    assert metrics["llmws_generated_tokens_total"][()] == sum(d["total_tokens"] for d in done)
    assert metrics["llmws_prompt_tokens_total"][()] == sum(s["tokens_in"] for s in starts)
    assert metrics["llmws_time_to_first_token_seconds_count"][()] == 2
    assert metrics["llmws_request_duration_seconds_count"][()] == 2
    assert metrics["llmws_requests_active"][()] == 0
    assert metrics["llmws_requests_queued"][()] == 0
    assert metrics["llmws_sessions"][()] == 1
    assert metrics["llmws_max_context_tokens"][()] == 4096
    assert "llmws_kv_usage_ratio" in metrics and "llmws_model_load_seconds" in metrics
    assert all(name.startswith("llmws_") for name in metrics)
    await ws.close()


# -- the real model ------------------------------------------------------------------------

# A budget that holds a couple of short requests, so the limits are reached quickly.
BUDGET_MB = 12.0

SIMULATED_OOM = """
import os, pathlib
import torch

trigger = pathlib.Path(os.environ["LLMWS_TEST_OOM_TRIGGER"])
real_sdpa = torch.nn.functional.scaled_dot_product_attention


def sdpa(*args, **kwargs):
    if trigger.exists():
        trigger.unlink()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return real_sdpa(*args, **kwargs)


torch.nn.functional.scaled_dot_product_attention = sdpa
"""


@pytest.fixture(scope="module")
def small_budget_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """The real model with a 12 MiB budget, and an allocation failure on demand."""
    folder = tmp_path_factory.mktemp("small-budget")
    (folder / "hooks").mkdir()
    (folder / "hooks" / "sitecustomize.py").write_text(SIMULATED_OOM)
    env = {"PYTHONPATH": str(folder / "hooks"), "LLMWS_TEST_OOM_TRIGGER": str(folder / "oom")}
    daemon = RunningDaemon(
        folder,
        env=env,
        memory={"budget_mb": BUDGET_MB, "probe_tokens": 512},  # the default probe
        limits={"max_queue": 4},
        generation_defaults={"do_sample": False, "max_new_tokens": 8},
    ).start(timeout=280)
    yield daemon
    daemon.stop()


async def real_connect(daemon: RunningDaemon) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(daemon.url, open_timeout=30)
    await ws.send(json.dumps({}))
    welcome = await recv_json(ws, 30, "welcome")
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def engine_figures(ws: websockets.ClientConnection) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "get_resources"}))
    report = await recv_json(ws, 30, "resources")
    assert report["type"] == "resources", report
    return report["engine"]


@pytest.mark.slow
async def test_real_prompt_over_max_context_gets_both_numbers_before_any_token(
    small_budget_daemon: RunningDaemon,
) -> None:
    ws, welcome = await real_connect(small_budget_daemon)
    max_context = welcome["capabilities"]["max_context"]
    before = await engine_figures(ws)
    assert before["memory"]["limited_by"] == "memory" and max_context == before["max_context"]
    prompt = {"user": "Tell me about " + "Paris " * (2 * max_context)}
    await ws.send(json.dumps({"type": "inference", "prompt": prompt}))
    error = await recv_json(ws, 30, "the refusal")
    assert error["type"] == "error" and error["code"] == "context_too_long", error
    assert error["max_context"] == max_context
    assert error["input_length"] > max_context
    after = await engine_figures(ws)
    assert after["steps"] == before["steps"]  # no forward pass ran for it
    await ws.close()


@pytest.mark.slow
async def test_real_prefix_cache_is_set_aside_and_counted(
    small_budget_daemon: RunningDaemon,
) -> None:
    ws, _ = await real_connect(small_budget_daemon)
    figures = (await engine_figures(ws))["memory"]
    # An eighth of the 12 MiB budget at most (64 MiB by default), taken from the budget.
    assert figures["prefix_cache_mb"] == BUDGET_MB / 8
    assert figures["budget_bytes"] == int(BUDGET_MB * 2**20) - int(BUDGET_MB / 8 * 2**20)
    before = await asyncio.to_thread(scrape, small_budget_daemon.port)
    for question in ("Name a river.", "Name a mountain."):
        await ws.send(json.dumps({"type": "inference", "prompt": {"user": question}}))
        await recv_until(ws, {"done"}, timeout=REAL)
    after = await asyncio.to_thread(scrape, small_budget_daemon.port)
    # The second question reused at least the chat template's system prompt.
    reused = "llmws_prefix_cache_reused_tokens_total"
    assert after[reused][()] - before[reused][()] >= 24
    assert 0 < after["llmws_prefix_cache_bytes"][()] <= BUDGET_MB / 8 * 2**20
    await ws.close()


@pytest.mark.slow
async def test_real_third_request_waits_for_memory(small_budget_daemon: RunningDaemon) -> None:
    ws, _ = await real_connect(small_budget_daemon)
    engine = await engine_figures(ws)
    figures = engine["memory"]
    kv, act = figures["kv_bytes_per_token"], figures["activation_bytes_per_token"]
    budget, max_context = figures["budget_bytes"], figures["max_context"]
    question = {"user": "Count from one to one hundred."}
    await ws.send(json.dumps({"type": "inference", "prompt": question}))
    prompt_tokens = (await recv_until(ws, {"start"}, timeout=REAL))[-1]["tokens_in"]
    await recv_until(ws, {"done"}, timeout=REAL)
    await ws.close()

    # The most new tokens such that two requests fit the budget together, not three.
    padded = memory.padded_length(prompt_tokens)

    def cost(new: int) -> int:
        return kv * max(prompt_tokens + new, padded) + act * padded

    new = min(max_context - prompt_tokens, (budget // 2 - act * padded) // kv - prompt_tokens)
    assert new >= 16 and 2 * cost(new) <= budget < 3 * cost(new), figures

    before = await asyncio.to_thread(scrape, small_budget_daemon.port)
    clients = [(await real_connect(small_budget_daemon))[0] for _ in range(3)]
    settings = {"max_new_tokens": new, "min_new_tokens": new}
    for ws in clients:
        await ws.send(json.dumps({"type": "inference", "prompt": question, "config": settings}))
    ends: dict[int, float] = {}
    events: dict[int, list[dict[str, Any]]] = {}

    async def follow(i: int) -> None:
        events[i] = await recv_until(clients[i], {"done", "error"}, timeout=280)
        ends[i] = time.monotonic()

    await asyncio.gather(*(follow(i) for i in range(3)))
    queued = [i for i in range(3) if events[i][0]["type"] == "queued"]
    assert len(queued) == 1, events
    (waiter,) = queued
    assert events[waiter][0]["position"] == 1
    assert all(events[i][-1]["type"] == "done" for i in range(3)), events
    assert all(events[i][-1]["total_tokens"] == new for i in range(3))
    assert ends[waiter] == max(ends.values())
    after = await engine_figures(clients[0])
    assert after["reserved_bytes"] == 0 and after["queued"] == 0
    metrics = await asyncio.to_thread(scrape, small_budget_daemon.port)
    length = (("outcome", "length"),)
    requests = metrics["llmws_requests_total"]
    assert requests[length] - before.get("llmws_requests_total", {}).get(length, 0) == 3
    for ws in clients:
        await ws.close()


@pytest.mark.slow
async def test_real_allocation_failure_ends_that_request_only(
    small_budget_daemon: RunningDaemon,
) -> None:
    ws, _ = await real_connect(small_budget_daemon)
    trigger = Path(small_budget_daemon.env["LLMWS_TEST_OOM_TRIGGER"])
    trigger.touch()
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "Hello"}}))
    failed = (await recv_until(ws, {"error", "done"}, timeout=REAL))[-1]
    assert failed["type"] == "error" and "out of memory" in failed["message"]
    assert not trigger.exists()
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "Hello"}}))
    answered = await recv_until(ws, {"error", "done"}, timeout=REAL)
    assert answered[-1]["type"] == "done", answered
    assert "".join(e["data"] for e in answered if e["type"] == "token")
    assert (await engine_figures(ws))["reserved_bytes"] == 0
    await ws.close()
