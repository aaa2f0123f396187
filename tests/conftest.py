"""Fixtures: an in-process daemon with the fake engine, and a real llmwsd subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import psutil
import pytest
import websockets

from llmwsd.config import parse_config
from llmwsd.daemon import Daemon
from llmwsd.protocol import admin as adminproto
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
LLMWSD = [sys.executable, "-m", "llmwsd.main"]

# How long a test waits on the server before it fails, saying what it waited for. The fake
# engine answers in milliseconds: anything it does not send within FAST seconds is a bug
# (a broken resume, a lost event), not a slow machine. The real model on a slow, shared
# machine gets REAL seconds for an answer.
FAST = 10.0
REAL = 240.0

T = TypeVar("T")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip for a missing prerequisite (root, tmpfs, git-lfs, chromium...), except in CI.

    CI runs as root with everything installed (``make test-deps``): a test that cannot run
    there is a broken setup, and must fail rather than disappear into the skip count.
    """
    __tracebackhide__ = True  # reported at the caller's line, which says what is missing
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


def _describe(received: list[dict[str, Any]]) -> str:
    if not received:
        return "nothing"
    shown = [json.dumps(m)[:200] for m in received[-5:]]
    earlier = f"{len(received) - 5} earlier messages, then " if len(received) > 5 else ""
    return earlier + ", ".join(shown)


@contextlib.asynccontextmanager
async def deadline(timeout: float, what: str) -> AsyncIterator[None]:
    """Run the block for at most ``timeout`` s; past it, fail saying what was awaited."""
    limit = asyncio.timeout(timeout)
    try:
        async with limit:
            yield
    except TimeoutError:
        if not limit.expired():
            raise  # the block's own TimeoutError
        raise AssertionError(f"no {what} within {timeout:g} s") from None


async def within(awaitable: Awaitable[T], timeout: float, what: str) -> T:
    """Await ``awaitable`` for at most ``timeout`` s; past it, fail saying what was awaited."""
    async with deadline(timeout, what):
        return await awaitable


async def collect(items: AsyncIterable[T], timeout: float, what: str) -> list[T]:
    """Everything ``items`` yields until it ends, within ``timeout`` s."""

    async def gather() -> list[T]:
        return [item async for item in items]

    return await within(gather(), timeout, what)


async def eventually(
    condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``condition`` until it returns something true (returned); fail after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)
    return value


class Clock:
    """A monotonic clock that moves only when a test sets ``now`` (monkeypatched in as ``time``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """A value in TOML: JSON's scalars and arrays are TOML's; a dict is an inline table."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def write_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """A TOML config whose folders live under ``folder``; ``sections`` override keys."""
    base: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": free_port(), "hello_timeout": 5.0},
        "paths": {
            "state_dir": str(folder / "state"),
            "runtime_dir": str(folder / "run"),
            "log_dir": str(folder / "log"),
        },
        "models": {"dirs": [str(DEFAULT_MODEL.parent)]},
        "generation_defaults": {"do_sample": False, "max_new_tokens": 64},
        # A short activation probe keeps each test daemon's start quick; test_memory
        # measures with the real default.
        "memory": {"probe_tokens": 64},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path = folder / "llmws.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class RunningDaemon:
    """An llmwsd subprocess started with a test config."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None, **sections: Any):
        self.folder = folder
        self.config_path = write_config(folder, **sections)
        text = self.config_path.read_text()
        self.port = int(text.split("port = ", 1)[1].split()[0])
        inherited = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "llmwsd.stderr"
        self.engine = sections.get("engine", {}).get("backend", "transformers")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_socket(self) -> Path:
        return self.folder / "run" / adminproto.SOCKET_NAME

    def start(self, wait: bool = True, timeout: float = 120) -> RunningDaemon:
        self.proc = subprocess.Popen(
            [*LLMWSD, "--config", str(self.config_path)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
        )
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:  # not ready (or the test's timeout): no daemon left behind
                self.stop(signal.SIGKILL)
                raise
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"llmwsd exited {self.proc.returncode}:\n{self.log()}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise TimeoutError(f"llmwsd not ready after {timeout} s:\n{self.log()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.http + "/healthz", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"llmwsd {self.proc.pid} outlived SIGKILL by 30 s") from None


# The engines every real-daemon test runs on ([engine] backend), and how each is set up.
ENGINES = ("transformers", "vllm")
# vLLM without torch.compile starts in ~20 s instead of ~90 (the tests measure no speed); a
# small KV cache (36 blocks of 128 tokens) lets the admission tests fill it.
VLLM_TEST_BLOCKS = 36
VLLM_TEST_ENGINE = {
    "backend": "vllm",
    "vllm": {
        "enforce_eager": True,
        "kv_cache_space_gb": 1,
        "num_gpu_blocks_override": VLLM_TEST_BLOCKS,
        "max_model_len": 2048,
    },
}
ENGINE_SECTIONS: dict[str, dict[str, Any]] = {"transformers": {}, "vllm": VLLM_TEST_ENGINE}


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_sections(engine: str) -> dict[str, Any]:
    """The config sections that run ``engine``; the test skips (fails in CI) without it."""
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.fail("the default model is missing: run `make model`")
    if engine == "vllm" and not vllm_installed():
        skip_or_fail("vLLM is not installed: run `make vllm`")
    return {"engine": ENGINE_SECTIONS[engine]} if ENGINE_SECTIONS[engine] else {}


def vllm_processes(daemon: RunningDaemon) -> list[psutil.Process]:
    """vLLM's engine and workers (VLLM::EngineCore, VLLM::Worker), not multiprocessing's
    resource tracker, which stays for the daemon's life."""
    assert daemon.proc is not None
    below = psutil.Process(daemon.proc.pid).children(recursive=True)
    return [p for p in below if p.name().startswith("VLLM")]


@pytest.fixture(scope="session", params=ENGINES)
def real_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningDaemon]:
    """One llmwsd per engine with the real default model, shared by the tests that only
    talk to it: each of them runs on both engines."""
    sections = engine_sections(request.param)
    daemon = RunningDaemon(tmp_path_factory.mktemp(f"real-daemon-{request.param}"), **sections)
    yield daemon.start(timeout=300)
    daemon.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path):
    """Start llmwsd subprocesses with custom settings; all are stopped at the end."""
    started: list[RunningDaemon] = []

    def start(wait: bool = True, env: dict[str, str] | None = None, **sections: Any):
        folder = tmp_path / f"daemon{len(started)}"
        folder.mkdir()
        daemon = RunningDaemon(folder, env=env, **sections)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL)


@pytest.fixture
async def fake_daemon_factory(tmp_path: Path) -> AsyncIterator[Any]:
    """Start in-process daemons with the fake engine; ``sections`` override config keys."""
    model = tmp_path / "models" / "fake-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    started: list[Daemon] = []

    async def start(**sections: dict[str, Any]) -> Daemon:
        data: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": 0, "hello_timeout": 1.0},
            "paths": {
                "state_dir": str(tmp_path / "state"),
                "runtime_dir": str(tmp_path / "run"),
                "log_dir": str(tmp_path / "log"),
            },
            "models": {"dirs": [str(tmp_path / "models")]},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        daemon = Daemon(parse_config(data), engine_loader=FakeEngine.loader())
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.shutdown()


@pytest.fixture
async def fake_daemon(fake_daemon_factory: Any) -> Daemon:
    """An in-process daemon on a free port, with the fake engine and one fake model folder."""
    return await fake_daemon_factory()


def ws_url(daemon: Daemon) -> str:
    return f"ws://127.0.0.1:{daemon.server.port}/"


async def recv_json(
    ws: websockets.ClientConnection, timeout: float = FAST, what: str = "message"
) -> dict[str, Any]:
    """The next message; fails after ``timeout`` s naming ``what`` it waited for."""
    return json.loads(await within(ws.recv(), timeout, what))


async def recv_until(
    ws: websockets.ClientConnection, kinds: set[str], timeout: float = FAST
) -> list[dict[str, Any]]:
    """Receive messages until one whose type is in ``kinds``; return them all.

    Fails after ``timeout`` s in all, saying what was awaited and what came instead.
    """
    received: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                received.append(json.loads(await ws.recv()))
                if received[-1].get("type") in kinds:
                    return received
    except TimeoutError:
        wanted = " or ".join(sorted(kinds))
        raise AssertionError(
            f"no {wanted} within {timeout:g} s; got {_describe(received)}"
        ) from None


def answer_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e.get("type") == "token")


@pytest.fixture
def sock(served: RunningDaemon) -> Path:
    """The admin socket of the module's ``served`` daemon."""
    return served.admin_socket
