"""The real llmwsd with the real default model: answers, modes, bad input, lifecycle, systemd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets

from tests.conftest import (
    LLMWSD,
    REAL,
    ROOT,
    RunningDaemon,
    answer_text,
    collect,
    recv_json,
    recv_until,
    within,
)


async def connect(daemon: RunningDaemon, **hello):
    ws = await websockets.connect(daemon.url, max_size=None, open_timeout=30)
    await ws.send(json.dumps(hello))
    welcome = await recv_json(ws, 30, "welcome")
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def ask(ws, user: str, **config) -> list[dict]:
    message = {"type": "inference", "prompt": {"system": "", "user": user}}
    if config:
        message["config"] = config
    await ws.send(json.dumps(message))
    return await recv_until(ws, {"done", "error"}, timeout=REAL)


async def test_paris(real_daemon: RunningDaemon):
    ws, welcome = await connect(real_daemon)
    assert welcome["model"] == "SmolLM2-135M-Instruct"
    assert welcome["capabilities"]["device"] == "cpu"
    events = await ask(ws, "What is the capital of France?")
    start, done = events[0], events[-1]
    assert start["type"] == "start" and start["tokens_in"] > 5 and start["max_tokens"] == 64
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["total_tokens"] >= len([e for e in events if e["type"] == "token"])
    assert done["tokens_per_s"] > 0 and done["ttft_ms"] > 0
    assert "Paris" in answer_text(events)
    await ws.close()


async def test_legacy_text_prompt(real_daemon: RunningDaemon):
    system, user = "You are helpful", "What is the capital of France?"

    async def as_json() -> str:
        ws, _ = await connect(real_daemon)
        message = {"type": "inference", "prompt": {"system": system, "user": user}}
        await ws.send(json.dumps(message))
        events = await recv_until(ws, {"done", "error"}, timeout=REAL)
        await ws.close()
        assert events[-1]["type"] == "done", events[-1]
        return answer_text(events)

    await as_json()  # both runs below then reuse the prompt's cached prefix alike
    async with websockets.connect(real_daemon.url) as ws:
        await ws.send(f"<|system|>{system}<|end|>\n<|user|>{user}<|end|>\n<|assistant|>\n")
        frames = await collect(ws, REAL, "text answer ending in a close")
    assert all(isinstance(f, str) for f in frames) and ws.close_code == 1000
    # The same messages reached the model: the greedy answer is the JSON client's, exactly.
    assert "".join(frames) == await as_json()
    assert "Paris" in "".join(frames)


async def test_bad_input_keeps_serving(real_daemon: RunningDaemon):
    ws, _ = await connect(real_daemon)
    for frame, code in [
        ("{oops", "invalid_json"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "inference", "prompt": {}}', "bad_request"),
        (
            '{"type": "inference", "prompt": {"user": "hi"}, "config": {"temperature": "hot"}}',
            "bad_request",
        ),
    ]:
        await ws.send(frame)
        error = await recv_json(ws, 30, f"error for {frame!r}")
        assert error["type"] == "error" and error["code"] == code, error
    await ws.send(json.dumps({"type": "ping"}))
    assert await recv_json(ws, 30, "pong") == {"type": "pong"}
    # A 20 MB frame is over [server] max_message_size: closed with 1009 ("message too big").
    await ws.send("x" * (20 * 1024 * 1024))
    await asyncio.wait_for(ws.wait_closed(), 30)
    assert ws.close_code == 1009
    ws2, _ = await connect(real_daemon)
    events = await ask(ws2, "What is the capital of France?")
    assert "Paris" in answer_text(events)
    await ws2.close()


async def test_silent_client_is_closed_1008(real_daemon: RunningDaemon):
    async with websockets.connect(real_daemon.url) as ws:
        await asyncio.wait_for(ws.wait_closed(), 30)
    assert ws.close_code == 1008
    assert "first frame" in ws.close_reason


async def test_ping_answered_while_another_client_generates(real_daemon: RunningDaemon):
    busy, _ = await connect(real_daemon)
    await busy.send(
        json.dumps(
            {
                "type": "inference",
                "prompt": {"user": "Write a long story about a dragon."},
                "config": {"max_new_tokens": 200, "min_new_tokens": 200},
            }
        )
    )
    await recv_until(busy, {"token"}, timeout=REAL)
    other, _ = await connect(real_daemon)
    await other.send(json.dumps({"type": "ping"}))
    assert await recv_json(other, 5, "pong during the long answer") == {"type": "pong"}
    # The long answer was still running when the pong came back.
    await busy.send(json.dumps({"type": "get_status"}))
    rest = await recv_until(busy, {"status"}, timeout=30)
    assert not any(e["type"] == "done" for e in rest)
    await busy.send(json.dumps({"type": "cancel"}))
    events = await recv_until(busy, {"done"}, timeout=30)
    assert events[-1]["finish_reason"] == "cancelled", events[-1]
    await busy.close()
    await other.close()


def test_healthz_and_page(real_daemon: RunningDaemon):
    with urllib.request.urlopen(real_daemon.http + "/healthz", timeout=30) as r:
        assert json.load(r) == {"status": "ok", "model": "SmolLM2-135M-Instruct"}
    with urllib.request.urlopen(real_daemon.http + "/", timeout=30) as r:
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert r.read() == (ROOT / "share" / "web" / "index.html").read_bytes()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(real_daemon.http + "/../../etc/passwd", timeout=30)
    assert e.value.code == 404


async def test_sigterm_mid_generation_exits_0(daemon_factory):
    daemon = daemon_factory(server={"drain_timeout": 5.0})
    ws, _ = await connect(daemon)
    await ws.send(
        json.dumps(
            {
                "type": "inference",
                "prompt": {"user": "Tell me a long story."},
                "config": {"max_new_tokens": 400, "min_new_tokens": 400},
            }
        )
    )
    await recv_until(ws, {"token"}, timeout=REAL)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.proc.wait, 60)
    assert code == 0, daemon.log()
    # The drain is bounded: 5 s of drain plus start-up of the shutdown, not the whole answer.
    assert time.monotonic() - started < 30
    await within(ws.wait_closed(), 10, "close of the connection after the exit")
    assert ws.close_code == 1001
    assert "draining" in daemon.log()


def test_readiness_is_notified_after_the_model_loaded(daemon_factory, tmp_path: Path):
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(120)
    daemon = daemon_factory(wait=False, env={"NOTIFY_SOCKET": str(path)})
    received = []
    while not any("READY=1" in m for m in received):
        received.append(listener.recv(4096).decode())
        if "READY=1" in received[-1]:
            # At READY=1 the model is loaded and the socket answers.
            with urllib.request.urlopen(daemon.http + "/healthz", timeout=30) as r:
                assert json.load(r) == {"status": "ok", "model": "SmolLM2-135M-Instruct"}
    assert any(m.startswith("STATUS=loading SmolLM2-135M-Instruct") for m in received)
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in received)
    assert "STATUS=serving SmolLM2-135M-Instruct on cpu, 0 sessions" in received[-1]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    listener.settimeout(5)
    rest = []
    try:
        while True:
            rest.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in rest)
    listener.close()


def test_journal_priorities(daemon_factory):
    daemon = daemon_factory(env={"JOURNAL_STREAM": "8:12345"})
    daemon.stop()
    lines = daemon.log().splitlines()
    assert any(line.startswith("<6>llmwsd: ready: serving") for line in lines), lines
    assert not (daemon.folder / "log" / "llmwsd.log").exists()


def test_no_model_serves_and_says_so(daemon_factory, tmp_path: Path):
    empty = tmp_path / "empty-models"
    empty.mkdir()
    daemon = daemon_factory(wait=False, models={"dirs": [str(empty)]})

    async def check():
        for _ in range(300):
            try:
                ws, welcome = await connect(daemon)
                break
            except OSError:
                await asyncio.sleep(0.1)
        assert welcome["model"] is None
        events = await ask(ws, "hello")
        assert events[-1]["code"] == "no_model"
        await ws.close()

    asyncio.run(check())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(daemon.http + "/healthz", timeout=30)
    assert e.value.code == 503
    assert "no model found" in daemon.log()


def run_check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLMWSD, "--config", str(config), "--check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_good(tmp_path: Path):
    result = run_check_config(ROOT / "etc" / "llmws" / "llmws.toml")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nprot = 1\n", "unknown key 'prot'"),
        ('[server]\nport = "8765"\n', "key 'port': expected int, got str"),
        ("[server]\nport = 99999\n", "key 'port' must be between 0 and 65535"),
        ("[bogus]\nx = 1\n", "unknown key 'bogus'"),
        ("[server\n", "invalid TOML"),
        ('[model]\ndtype = "int3"\n', "dtype must be"),
        ("[generation_defaults]\ndo_sample = 1\n", "key 'do_sample': expected bool"),
        ("[engine]\nprefix_cache_mb = -1.0\n", "key 'prefix_cache_mb' must be between 0"),
        ("[sessions]\nmax_per_client = 0\n", "key 'max_per_client' must be between 1"),
    ],
)
def test_check_config_bad(tmp_path: Path, text: str, expected: str):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_check_config(config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and expected in lines[0], result.stderr


def test_unreadable_config_exits_2_before_binding(tmp_path: Path):
    missing = run_check_config(tmp_path / "missing.toml")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 1\nwhat = 2\n")
    result = subprocess.run(
        [*LLMWSD, "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "unknown key 'what'" in result.stderr


def test_daemon_mode_detaches_with_pidfile(tmp_path: Path):
    daemon = RunningDaemon(tmp_path)
    result = subprocess.run(
        [*LLMWSD, "--config", str(daemon.config_path), "--daemon"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon.env,
    )
    assert result.returncode == 0, result.stderr
    pidfile = tmp_path / "run" / "llmwsd.pid"
    for _ in range(600):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    try:
        daemon.wait_ready()
        log_file = tmp_path / "log" / "llmwsd.log"
        assert "ready: serving" in log_file.read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        if not pidfile.exists():
            break
        time.sleep(0.1)
    assert not pidfile.exists()
