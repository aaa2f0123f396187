"""Faults: kill -9 mid-generation, a full state folder, a model folder that vanishes, the
admin socket removed, clients that never read.

Each test checks that the daemon keeps serving and that sessions keep what they had.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets
from websockets.frames import Frame, Opcode

from llmwsd.config import parse_config
from llmwsd.daemon import Daemon
from llmwsd.sessions.files import load_key, read_log
from tests.conftest import (
    DEFAULT_MODEL,
    ENGINES,
    FAST,
    REAL,
    ROOT,
    RunningDaemon,
    answer_text,
    engine_sections,
    eventually,
    recv_json,
    recv_until,
    skip_or_fail,
    ws_url,
)
from tests.fake_engine import FakeEngine

LLMWSCTL = str(ROOT / ".venv" / "bin" / "llmwsctl")
GREEDY = {"do_sample": False}


async def connect(url: str, **hello: Any) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(url, max_size=None, open_timeout=30)
    await ws.send(json.dumps(hello))
    first = await recv_json(ws, 30, "welcome or refusal")
    return ws, first


async def ask(ws: Any, user: str, timeout: float = REAL, **config: Any) -> list[dict[str, Any]]:
    prompt = {"user": user}
    await ws.send(json.dumps({"type": "inference", "prompt": prompt, "config": config}))
    return await recv_until(ws, {"done", "error"}, timeout=timeout)


async def request(ws: Any, kind: str) -> dict[str, Any]:
    """Send a direct request; its answer (generation events in between are skipped)."""
    await ws.send(json.dumps({"type": kind}))
    what = f"answer to {kind}"
    while "seq" in (answer := await recv_json(ws, 30, what)) and answer["type"] != "ack_received":
        pass
    return answer


def logged_seq(daemon: RunningDaemon, session_id: str) -> int:
    """The newest event seq in a session's log on disk: what a kill -9 cannot take back."""
    path = daemon.folder / "state" / "sessions" / session_id / "log"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    seqs = [0]
    for record in read_log(data, load_key(daemon.folder / "state"), session_id).records:
        if record["kind"] == "event":
            seqs.append(record["event"].get("seq", 0))
        elif record["kind"] == "snapshot":
            seqs += [event.get("seq", 0) for event in record["events"]]
    return max(seqs)


def assert_contiguous(events: list[dict[str, Any]], after: int) -> None:
    seqs = [e["seq"] for e in events if "seq" in e]
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), seqs


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def ctl(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    sock = daemon.folder / "run" / "admin.sock"
    return subprocess.run(
        [LLMWSCTL, "--socket", str(sock), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def require_model() -> None:
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.fail("the default model is missing: run `make model`")


# -- kill -9 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_kill_9_during_several_generations(daemon_factory, engine: str) -> None:
    """Four sessions generate at once; kill -9; after the restart each resumes intact."""
    daemon = daemon_factory(
        **engine_sections(engine),
        generation_defaults={"do_sample": False, "max_new_tokens": 300},
    )
    # vLLM's engine processes go with the daemon, however it ends.
    children = psutil.Process(daemon.proc.pid).children(recursive=True)
    clients = []
    for _ in range(4):
        ws, welcome = await connect(daemon.url)
        done = await ask(ws, "What is the capital of France?", max_new_tokens=12)
        assert done[-1]["type"] == "done"
        clients.append({"ws": ws, "id": welcome["session_id"], "first": answer_text(done)})
    for i, client in enumerate(clients):
        prompt = {"user": f"Write a long story about dragon number {i}."}
        await client["ws"].send(json.dumps({"type": "inference", "prompt": prompt}))
    for client in clients:
        events = await recv_until(client["ws"], {"token"}, timeout=REAL)
        events += await recv_until(client["ws"], {"token"}, timeout=REAL)
        client["last_seq"] = events[-1]["seq"]
    # Tokens are written to the log just behind the stream: kill once those received are.
    await eventually(
        lambda: all(logged_seq(daemon, c["id"]) >= c["last_seq"] for c in clients),
        30,
        "the tokens received written to each session's log",
        interval=0.05,
    )
    daemon.stop(signal.SIGKILL)
    for client in clients:
        await client["ws"].close()
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 60)
    assert not alive, f"left behind by the killed daemon: {alive}"

    daemon.start()
    for client in clients:
        ws, welcome = await connect(
            daemon.url, session_id=client["id"], last_seq=client["last_seq"]
        )
        assert welcome["resumed"] is True
        rest = await recv_until(ws, {"done", "error"}, timeout=60)  # replayed from the log
        # The rest of the answer without a gap; `interrupted` after the restart's seq jump.
        assert_contiguous(rest[:-1], client["last_seq"])
        assert rest[-1]["seq"] > max([client["last_seq"], *(e["seq"] for e in rest[:-1])])
        assert rest[-1]["type"] == "error" and rest[-1]["code"] == "interrupted", rest[-1]
        history = (await request(ws, "history"))["messages"]
        assert history[:2] == [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": client["first"]},
        ]
        assert history[2]["content"].startswith("Write a long story about dragon")
        assert history[3]["role"] == "assistant" and history[3]["content"]
        # And the session goes on.
        done = await ask(ws, "What is the capital of France?", max_new_tokens=12)
        assert done[-1]["type"] == "done"
        await ws.close()


# -- a full state folder -----------------------------------------------------------------------


@pytest.fixture
def small_state_folder(tmp_path: Path):
    """A 4 MiB tmpfs as the in-process daemon's state folder (root only)."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs as the state folder needs root")
    folder = tmp_path / "state"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        skip_or_fail(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder``; return the filler file."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            for _ in range(1024):  # bounded: far more than the 4 MiB there are
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


async def test_a_full_state_folder(small_state_folder: Path, fake_daemon_factory) -> None:
    daemon = await fake_daemon_factory()
    url = ws_url(daemon)
    alice, welcome = await connect(url)
    assert (await ask(alice, "before the disk filled", FAST))[-1]["type"] == "done"
    filler = fill(small_state_folder)

    # New sessions are refused, with a reason, and the connection closes with 1013.
    bob, first = await connect(url)
    assert first["type"] == "error" and first["code"] == "busy", first
    full = "the server's state folder is full: no new session can be stored; try again later"
    assert first["message"] == full
    await asyncio.wait_for(bob.wait_closed(), 10)
    assert (bob.close_code, bob.close_reason) == (1013, full[:120])
    # The daemon keeps serving: the connected session chats on (in memory), HTTP answers.
    assert (await request(alice, "ping"))["type"] == "pong"
    done = await ask(alice, "while the disk is full", FAST)
    assert answer_text(done) == "echo: while the disk is full"
    health = f"http://127.0.0.1:{daemon.server.port}/healthz"
    # In a thread: the daemon answers on this very event loop.
    with await asyncio.to_thread(urllib.request.urlopen, health, timeout=10) as r:
        assert (r.status, json.load(r)) == (200, {"status": "ok", "model": "fake-model"})

    # Room again: new sessions work, and what alice said while full reaches the disk.
    filler.unlink()
    carol, welcome_carol = await connect(url)
    assert welcome_carol["type"] == "welcome"
    assert (await ask(alice, "after the disk was freed", FAST))[-1]["type"] == "done"
    expected = (await request(alice, "history"))["messages"]
    for ws in (alice, carol):
        await ws.close()
    await daemon.shutdown()
    restarted = await fake_daemon_factory()
    again, resumed = await connect(ws_url(restarted), session_id=welcome["session_id"])
    assert resumed["resumed"] is True
    assert (await request(again, "history"))["messages"] == expected
    await again.close()


# -- a model folder that disappears ------------------------------------------------------------


async def test_the_model_folder_disappears_while_loaded(daemon_factory, tmp_path: Path) -> None:
    require_model()
    models = tmp_path / "models"
    folder = models / "vanishing"
    folder.mkdir(parents=True)
    for path in DEFAULT_MODEL.iterdir():  # a folder of links: cheap to make and remove
        (folder / path.name).symlink_to(path)
    daemon = daemon_factory(models={"dirs": [str(models)]})
    ws, welcome = await connect(daemon.url)
    assert welcome["model"] == "vanishing"
    assert "Paris" in answer_text(await ask(ws, "What is the capital of France?", **GREEDY))

    shutil.rmtree(folder)
    # The loaded model keeps answering; the catalogue no longer lists it; nothing crashed.
    assert "Paris" in answer_text(await ask(ws, "What is the capital of France?", **GREEDY))
    assert (await request(ws, "list_models"))["models"] == []
    assert (await request(ws, "recheck_model"))["models"] == []
    status = await request(ws, "get_status")
    assert (status["type"], status["model"], status["model_state"]) == (
        "status",
        "vanishing",
        "ready",
    )
    daemon.proc.send_signal(signal.SIGHUP)
    assert (await request(ws, "ping"))["type"] == "pong"
    assert ctl(daemon, "status").returncode == 0
    await ws.close()
    assert daemon.proc.poll() is None
    assert daemon.healthy()


# -- the admin socket --------------------------------------------------------------------------


async def test_the_admin_socket_is_recreated_on_reload(daemon_factory) -> None:
    require_model()
    daemon = daemon_factory()
    sock = daemon.folder / "run" / "admin.sock"
    assert ctl(daemon, "status").returncode == 0

    sock.unlink()
    gone = ctl(daemon, "status")
    assert gone.returncode == 3 and str(sock) in gone.stderr, gone.stderr  # "not running"
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_until(sock.is_socket, 10, "the admin socket is back")
    status = ctl(daemon, "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == daemon.proc.pid
    assert oct(sock.stat().st_mode & 0o777) == oct(0o660)

    # Replaced by a stale socket file (nobody listens on it): ours comes back too.
    sock.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: ctl(daemon, "status").returncode == 0, 10, "status answers")
    assert daemon.log().count("creating it again") == 2
    # At stop, the daemon removes the socket it made.
    daemon.stop()
    assert not sock.exists()


# -- clients that never read -------------------------------------------------------------------


def ws_frame(text: str) -> bytes:
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=True)


def silent_client(port: int, messages: list[dict[str, Any]]) -> socket.socket:
    """A WebSocket client that says its piece and then never reads (a small receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: not one byte of the frames after it
    assert response.startswith(b"HTTP/1.1 101"), response
    for message in messages:
        sock.sendall(ws_frame(json.dumps(message)))
    return sock


async def test_a_client_that_never_reads(tmp_path: Path) -> None:
    """The server's buffer for it stays bounded, the keepalive closes it with a reason, and
    the session keeps every event for a later resume."""
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "ping_interval": 1.0, "ping_timeout": 2.0},
            "paths": {
                "state_dir": str(tmp_path / "state"),
                "runtime_dir": str(tmp_path / "run"),
                "log_dir": str(tmp_path / "log"),
            },
            "models": {"dirs": [str(tmp_path / "models")]},
            "limits": {"max_prompt_chars": 1_000_000},
        }
    )
    model = tmp_path / "models" / "fake-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    daemon = Daemon(config, engine_loader=FakeEngine.loader(token_delay=0.002))
    await daemon.start()
    try:
        words = [f"{i:04d}" + "w" * 400 for i in range(1500)]  # ~600 KB of answer
        inference = {
            "type": "inference",
            "prompt": {"user": " ".join(words)},
            "config": {"max_new_tokens": 2000},  # the whole echo, past the 512 default
        }
        sock = await asyncio.to_thread(silent_client, daemon.server.port, [{}, inference])
        assert daemon.server.server is not None
        await wait_until(lambda: len(daemon.sessions) == 1, 10, "the session exists")
        session = daemon.sessions.list()[0]
        server_ws = next(iter(daemon.server.server.connections))
        largest = 0
        deadline = time.monotonic() + 60
        while server_ws.state.name != "CLOSED" and time.monotonic() < deadline:
            largest = max(largest, server_ws.transport.get_write_buffer_size())
            await asyncio.sleep(0.005)
        # Far less than the answer waited in the server's buffer; the rest was never sent.
        assert largest < 256 * 1024, largest
        assert server_ws.protocol.close_sent is not None
        assert server_ws.protocol.close_sent.code == 1011
        assert "ping" in server_ws.protocol.close_sent.reason
        sock.close()
        await wait_until(lambda: session.owner is None, 10, "the session is released")

        ws, welcome = await connect(ws_url(daemon), session_id=session.id, last_seq=0)
        assert welcome["resumed"] is True
        events = await recv_until(ws, {"done"}, timeout=120)
        assert_contiguous(events, 0)
        assert answer_text(events) == "echo: " + " ".join(words)
        await ws.close()
    finally:
        await daemon.shutdown()
