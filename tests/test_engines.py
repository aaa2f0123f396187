"""Both engines behind the same daemon: what a client and an operator see on each.

``real_daemon`` runs every test here once per engine (tests/conftest.py: ENGINES);
the tests of one engine's own parts (vLLM's KV-cache blocks, its engine process,
its configuration) start their own daemons.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import psutil
import pytest

from llmwsd.config import parse_config
from llmwsd.engines.vllm import arguments
from llmwsd.errors import ConfigError
from tests.conftest import (
    DEFAULT_MODEL,
    LLMWSD,
    REAL,
    ROOT,
    VLLM_TEST_BLOCKS,
    RunningDaemon,
    answer_text,
    engine_sections,
    eventually,
    recv_json,
    recv_until,
    vllm_processes,
    write_config,
)
from tests.test_admin import link_model
from tests.test_faults import ask, connect, ctl, request
from tests.test_memory import scrape

pytestmark = pytest.mark.slow
LLMWSCTL = [sys.executable, "-m", "llmwsctl.cli"]
LONG = {"user": "Write a very long story about a dragon and a knight."}
UP_TO_400 = {"max_new_tokens": 400}


async def figures(ws: Any) -> dict[str, Any]:
    return (await request(ws, "get_resources"))["engine"]


async def idle_figures(ws: Any) -> dict[str, Any]:
    """The engine's figures once nothing runs (an earlier test's answer may still)."""
    for _ in range(int(REAL)):
        engine = await figures(ws)
        if engine["admitted"] == 0:
            return engine
        await asyncio.sleep(1)
    raise AssertionError(f"the engine still runs something: {engine}")


async def test_the_welcome_and_status_say_which_engine_serves(real_daemon: RunningDaemon):
    ws, welcome = await connect(real_daemon.url)
    assert welcome["capabilities"]["engine"] == real_daemon.engine
    status = json.loads(ctl(real_daemon, "status").stdout)
    assert status["engine"] == real_daemon.engine and status["engine_failure"] is None
    shown = subprocess.run(
        [*LLMWSCTL, "--socket", str(real_daemon.admin_socket), "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    assert f", {real_daemon.engine} engine (context" in shown
    await ws.close()


async def test_cancel_frees_the_slot(real_daemon: RunningDaemon):
    ws, _ = await connect(real_daemon.url)
    await idle_figures(ws)
    await ws.send(
        json.dumps({"type": "inference", "prompt": LONG, "config": {"max_new_tokens": 400}})
    )
    await recv_until(ws, {"token"}, timeout=REAL)
    assert (await figures(ws))["admitted"] == 1
    await ws.send(json.dumps({"type": "cancel"}))
    events = await recv_until(ws, {"done"}, timeout=REAL)
    assert events[-1]["finish_reason"] == "cancelled"
    engine = await figures(ws)  # its reservation went with its done
    assert engine["admitted"] == 0 and engine["reserved_bytes"] == 0, engine
    # The slot serves the next question whole.
    done = await ask(ws, "What is the capital of France?", max_new_tokens=16)
    assert done[-1]["type"] == "done" and done[-1]["finish_reason"] in ("stop", "length")
    await ws.close()


async def test_a_prompt_over_the_context_is_refused_before_any_token(real_daemon: RunningDaemon):
    ws, welcome = await connect(real_daemon.url)
    max_context = welcome["capabilities"]["max_context"]
    before = await figures(ws)
    prompt = {"user": "Paris " * (max_context + 10)}
    await ws.send(json.dumps({"type": "inference", "prompt": prompt}))
    error = await recv_json(ws, 60, "the refusal")
    assert (error["type"], error["code"]) == ("error", "context_too_long"), error
    assert error["max_context"] == max_context and error["input_length"] > max_context
    assert (await figures(ws))["steps"] == before["steps"]  # nothing ran for it
    await ws.close()


async def test_metrics_count_each_engines_answers(real_daemon: RunningDaemon):
    before = await asyncio.to_thread(scrape, real_daemon.port)
    ws, _ = await connect(real_daemon.url)
    done = await ask(ws, "Name a river.", max_new_tokens=12)
    start = next(e for e in done if e["type"] == "start")
    after = await asyncio.to_thread(scrape, real_daemon.port)

    def gained(name: str) -> float:
        return sum(after[name].values()) - sum(before.get(name, {}).values())

    assert gained("llmws_generated_tokens_total") == done[-1]["total_tokens"]
    assert gained("llmws_prompt_tokens_total") == start["tokens_in"]
    assert after["llmws_max_context_tokens"][()] > 0
    await ws.close()


# -- vLLM's own parts --------------------------------------------------------------------


async def test_vllm_admission_queues_what_its_kv_blocks_cannot_hold(
    real_daemon: RunningDaemon,
):
    if real_daemon.engine != "vllm":
        pytest.skip("the transformers engine's: tests/test_memory.py, third request waits")
    clients = [await connect(real_daemon.url) for _ in range(3)]
    engine = await idle_figures(clients[0][0])
    blocks = engine["memory"]
    assert (blocks["kv_blocks"], blocks["block_size"]) == (VLLM_TEST_BLOCKS, 128)
    # 2000 new tokens and the prompt: 16 blocks each, so two of them fit in 36, not three.
    config = {"max_new_tokens": 2000}
    for ws, _ in clients:
        await ws.send(json.dumps({"type": "inference", "prompt": LONG, "config": config}))
    for ws, _ in clients[:2]:
        await recv_until(ws, {"token"}, timeout=REAL)
    third = clients[2][0]
    queued = await recv_until(third, {"queued"}, timeout=REAL)
    assert queued[-1]["position"] == 1
    # The first cancelled: the third starts.
    await clients[0][0].send(json.dumps({"type": "cancel"}))
    await recv_until(clients[0][0], {"done"}, timeout=REAL)
    started = await recv_until(third, {"token"}, timeout=REAL)
    assert any(e["type"] == "start" for e in started)
    for ws, _ in clients[1:]:
        await ws.send(json.dumps({"type": "cancel"}))
        await recv_until(ws, {"done"}, timeout=REAL)
        await ws.close()
    await clients[0][0].close()


async def test_vllm_engine_process_dying_ends_streams_and_fails_health(daemon_factory):
    daemon = daemon_factory(**engine_sections("vllm"))
    ws, _ = await connect(daemon.url)
    await ws.send(
        json.dumps({"type": "inference", "prompt": LONG, "config": {"max_new_tokens": 400}})
    )
    received = await recv_until(ws, {"token"}, timeout=REAL)
    engine_processes = vllm_processes(daemon)
    assert engine_processes, "vLLM runs its engine in child processes"
    for process in engine_processes:
        process.kill()
    received += await recv_until(ws, {"error"}, timeout=REAL)
    error = received[-1]
    assert error["code"] == "interrupted" and "vLLM engine died" in error["message"]
    assert answer_text(received)  # what was produced before stays the answer's part
    await eventually(lambda: not daemon.healthy(), 30, "/healthz answering 503")
    status = json.loads(ctl(daemon, "status").stdout)
    assert status["engine_stuck"] is True and "died" in status["engine_failure"]
    # Refused at once from here on; SIGTERM still ends the daemon cleanly.
    done = await ask(ws, "Hello?", timeout=60)
    assert done[-1]["type"] == "error" and done[-1]["code"] == "interrupted"
    await ws.close()
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0


async def test_vllm_switch_under_load_breaks_no_stream(daemon_factory, tmp_path):
    models = tmp_path / "models"
    link_model(DEFAULT_MODEL, models / DEFAULT_MODEL.name)
    link_model(DEFAULT_MODEL, models / "smol-copy")
    daemon = daemon_factory(
        **engine_sections("vllm"),
        models={"dirs": [str(models)]},
        model={"path": str(models / DEFAULT_MODEL.name)},
    )
    engine_processes = vllm_processes(daemon)
    clients = [await connect(daemon.url) for _ in range(2)]
    for ws, _ in clients:
        await ws.send(json.dumps({"type": "inference", "prompt": LONG, "config": UP_TO_400}))
        await recv_until(ws, {"token"}, timeout=REAL)
    # Read on meanwhile: a client that stops reading stops hearing the server's pongs.
    answers = [
        asyncio.create_task(recv_until(ws, {"done", "error"}, timeout=2 * REAL))
        for ws, _ in clients
    ]
    switch = [*LLMWSCTL, "--socket", str(daemon.admin_socket), "switch", "smol-copy"]
    # Loading a vLLM engine takes tens of seconds (minutes on a busy machine).
    switched = await asyncio.to_thread(
        subprocess.run, switch, capture_output=True, text=True, cwd=ROOT, timeout=REAL
    )
    assert switched.returncode == 0, switched.stderr + daemon.log()[-3000:]
    for (ws, _), answer in zip(clients, answers, strict=True):
        events = await answer  # the old engine let them finish (drain) before it went
        assert events[-1]["type"] == "done", events[-1]
        await ws.close()
    status = json.loads(ctl(daemon, "status").stdout)
    assert (status["model"], status["engine"]) == ("smol-copy", "vllm")
    ws, _ = await connect(daemon.url)
    done = await ask(ws, "Name a river.", max_new_tokens=8)
    assert done[-1]["type"] == "done"
    await ws.close()
    # The old engine's processes are gone with it (or are zombies till the next spawn).
    _, alive = await asyncio.to_thread(psutil.wait_procs, engine_processes, 60)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive


def test_an_unknown_vllm_key_stops_the_start_naming_it(tmp_path):
    engine_sections("vllm")  # vLLM installed
    path = write_config(tmp_path, engine={"backend": "vllm", "vllm": {"tensor_paralel_size": 2}})
    result = subprocess.run(
        [*LLMWSD, "--config", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 2
    # llmwsd's one line, last (importing vLLM may log its own warnings before it).
    said = [line for line in result.stderr.splitlines() if line.startswith("llmwsd:")]
    assert len(said) == 1 and result.stderr.splitlines()[-1] == said[0], result.stderr
    assert "'tensor_paralel_size'" in said[0] and "[engine.vllm]" in said[0]


def test_keys_llmws_sets_and_bad_cache_sizes_are_refused():
    for table, said in (
        ({"model": "/elsewhere"}, "set by llmws"),
        ({"kv_cache_space_gb": 0.5}, "whole number of GiB"),
        ({"kv_cache_space_gb": True}, "whole number of GiB"),
    ):
        config = parse_config({"engine": {"backend": "vllm", "vllm": table}})
        with pytest.raises(ConfigError, match=said):
            arguments.check(config)
    config = parse_config({"engine": {"backend": "vllm", "vllm": {"max_model_len": 0}}})
    assert arguments.passed_arguments(config) == {}  # 0: the model's own


def test_a_backend_not_installed_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", None)
    config = parse_config({"engine": {"backend": "vllm"}})
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        arguments.check(config)
    with pytest.raises(ConfigError, match="backend must be transformers or vllm"):
        parse_config({"engine": {"backend": "llama.cpp"}})
