"""What the log tells an operator: where the page is, and one line per request without its text."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time

import websockets

from llmwsd.daemon import Daemon
from tests.conftest import LLMWSD, RunningDaemon, free_port, recv_json, recv_until, ws_url


async def test_every_request_ends_with_one_log_line_without_its_text(
    fake_daemon: Daemon, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="llmwsd")
    secret = "the-words-of-the-prompt-3c9a"
    async with websockets.connect(ws_url(fake_daemon)) as ws:
        await ws.send("{}")
        session_id = (await recv_json(ws, timeout=5))["session_id"]
        await ws.send(json.dumps({"type": "inference", "prompt": {"user": f"{secret} two"}}))
        done = (await recv_until(ws, {"done"}, timeout=5))[-1]
        too_long = " ".join(["word"] * 5000)
        await ws.send(json.dumps({"type": "inference", "prompt": {"user": too_long}}))
        assert (await recv_json(ws, timeout=5))["code"] == "context_too_long"
    async with websockets.connect(ws_url(fake_daemon)) as ws:
        await ws.send(f"<|user|>{secret}<|end|>")
        frames = [frame async for frame in ws]
    assert "".join(frames) == f"echo: {secret}"
    lines = [r.getMessage() for r in caplog.records if r.name == "llmwsd"]
    ended = [line for line in lines if ": stop, " in line]
    assert ended[0].startswith(f"session {session_id} r1: stop, 6 tokens in, 3 out, ")
    assert "tokens/s, first token after" in ended[0]
    assert done["total_tokens"] == 3
    assert (
        ended[1].startswith("127.0.0.1:")
        and ": text-mode request: stop, 5 tokens in, 2 out" in (ended[1])
    )
    assert len(ended) == 2
    assert f"session {session_id} r2: refused (context_too_long)" in lines
    assert not any(secret in r.getMessage() for r in caplog.records)


async def test_ready_says_where_the_page_is(fake_daemon_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llmwsd")
    daemon = await fake_daemon_factory()
    port = daemon.server.port
    lines = [r.getMessage() for r in caplog.records if r.name == "llmwsd"]
    ready = [line for line in lines if line.startswith("ready: ")]
    assert ready == [
        f"ready: serving fake-model on cpu, 0 sessions; the web page is at http://127.0.0.1:{port}/"
    ]


def test_a_busy_port_is_one_line_and_leaves_nothing_on_disk(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = RunningDaemon(tmp_path, server={"host": "127.0.0.1", "port": port})
        daemon.start(wait=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 2
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or line.startswith("<3>")]
    assert len(errors) == 1, lines
    assert errors[0].endswith(
        f"cannot start: port {port} is in use on 127.0.0.1 (another llmwsd?): choose another "
        f"with llmwsd --port, or [server] port (or host) in {daemon.config_path}"
    )
    assert "Traceback" not in daemon.log()
    # The reason comes before the shutdown's last words.
    stopped = [i for i, line in enumerate(lines) if line.endswith("stopped")]
    assert stopped and stopped[-1] > lines.index(errors[0])
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists()


def test_port_on_the_command_line_wins_over_the_file(tmp_path) -> None:
    (tmp_path / "no-models").mkdir()
    daemon = RunningDaemon(tmp_path, models={"dirs": [str(tmp_path / "no-models")]})
    port = free_port()
    proc = subprocess.Popen(
        [*LLMWSD, "--config", str(daemon.config_path), "--port", str(port)],
        stderr=daemon.log_path.open("ab"),
    )
    try:
        deadline = time.monotonic() + 60
        while f"the web page is at http://127.0.0.1:{port}/" not in daemon.log():
            assert proc.poll() is None and time.monotonic() < deadline, "no ready line"
            time.sleep(0.2)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
