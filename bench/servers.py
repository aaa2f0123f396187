"""The servers the bench measures: llmwsd on either engine, vLLM's own OpenAI server.

llmwsd on its transformers engine is also measured through its OpenAI API (``POST
/v1/chat/completions`` on the WebSocket port: :meth:`Llmws.measure_openai`), and llmwsd
on either engine with answers constrained to a JSON schema (:meth:`Llmws.measure_json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent

from bench.clients import (  # noqa: E402
    ATTENTION,
    PROMPTS,
    QUESTION,
    SETTINGS,
    ChatCompletionsClient,
    Client,
    WebSocketClient,
    concurrent,
    new_conversation,
)
from tests.conftest import DEFAULT_MODEL, RunningDaemon, free_port  # noqa: E402

# Both vLLMs: the same KV cache (GiB) and context; the rest is vLLM's defaults, which are
# the same in process and in its server on CPU (max_num_seqs 128, 2048 batched tokens).
VLLM_KV_CACHE_GB = 1
VLLM_MAX_MODEL_LEN = 2048
START_TIMEOUT = 900.0  # s: vLLM compiles the model at every start (~70 s, more when busy)
# llmws's OpenAI API is asked the prompts just asked (or about to be) over WebSocket, but
# opening with this word instead of QUESTION: one token as well, so the prompts have the
# same token counts, and its prefix cache holds no more of them than of new conversations.
OPENAI_OPENING = "Request"
# The GET that opens each client's keep-alive connection to llmws's OpenAI API: under /v1/,
# since a connection whose first request is not is the WebSocket server's, closed after it.
LLMWS_OPENAI_HEALTH = "/v1/models"
# The constrained answers' format: a JSON object whose one string cannot close within any
# budget the bench asks for, so that every answer has exactly its new tokens (a format
# decides when an answer may end: min_new_tokens gives way to it).
JSON_FORMAT = {
    "type": "json_schema",
    "schema": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 100000}},
        "required": ["text"],
    },
}
# How each of them begins, checked by the client (after it xgrammar puts ': "', its
# separator, today: not part of the check).
JSON_ANSWER_OPENING = '{"text"'
# Their prompts: those asked (or about to be) without a format, opening with this word
# (one token, as OPENAI_OPENING is).
JSON_OPENING = "Task"


def tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (vLLM's engine and worker processes)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of resident memory (VmHWM), summed over the tree."""
    total = 0
    for process in tree(pid):
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        total += int(hwm.split()[1]) * 1024
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for process in tree(pid):
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def stop_tree(proc: subprocess.Popen[bytes], descendants: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL after 60 s; then whatever of its descendants outlived it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


class Server:
    """One server measured: started once, asked the same sequence of prompts as the others."""

    name = ""

    def __init__(self) -> None:
        self.asked = 0  # the prompts numbered 1 to this were asked of this server
        self.start_s = 0.0

    def prompts(self, first: int | None = None, opening: str = QUESTION) -> Iterator[str]:
        """New conversations numbered from the first never asked, or again from ``first``."""
        numbers = itertools.count(self.asked + 1 if first is None else first)
        for i in itertools.count():
            prompt = new_conversation(PROMPTS[i % len(PROMPTS)], numbers, opening)
            if first is None:
                self.asked += 1
            yield prompt

    def client(self) -> Client:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def measure(self, clients: int, new_tokens: int) -> dict[str, Any]:
        return self.measure_with(self.client, clients, new_tokens)

    def measure_with(
        self,
        make_client: Callable[[], Client],
        clients: int,
        new_tokens: int,
        first: int | None = None,
        opening: str = QUESTION,
    ) -> dict[str, Any]:
        """``clients`` of ``make_client`` asking at once the prompts :meth:`prompts` yields."""
        # A fresh prompt iterator per call: each starts at PROMPTS[0], as every server's does.
        prompts = self.prompts(first, opening)
        return asyncio.run(concurrent(make_client, prompts, clients, new_tokens))


class Llmws(Server):
    """llmwsd on one of its engines."""

    def __init__(self, name: str, folder: Path, dtype: str) -> None:
        super().__init__()
        self.name = name
        engine: dict[str, Any] = {"attention": ATTENTION}
        if name == "vllm":
            vllm = {"kv_cache_space_gb": VLLM_KV_CACHE_GB, "max_model_len": VLLM_MAX_MODEL_LEN}
            engine = {"backend": "vllm", "vllm": vllm}
        folder.mkdir()
        self.daemon = RunningDaemon(
            folder,
            model={"dtype": dtype},
            engine=engine,
            server={"max_message_size": 1 << 20},
            limits={"max_connections_per_address": 1024},
            sessions={"max_per_client": 1024},
            generation_defaults=SETTINGS,
        )
        self._descendants: list[psutil.Process] = []

    def client(self) -> Client:
        return WebSocketClient(self.daemon.url)

    def openai_client(self) -> Client:
        return ChatCompletionsClient(
            self.daemon.http, DEFAULT_MODEL.name, health=LLMWS_OPENAI_HEALTH, server="llmws"
        )

    def json_client(self) -> Client:
        return WebSocketClient(self.daemon.url, {"format": JSON_FORMAT}, JSON_ANSWER_OPENING)

    def measure_openai(self, clients: int, new_tokens: int, first: int) -> dict[str, Any]:
        """:meth:`measure` through the OpenAI API, asking the prompts numbered from ``first``
        (those :meth:`measure` asks or asked) with OPENAI_OPENING for their first word."""
        return self.measure_with(self.openai_client, clients, new_tokens, first, OPENAI_OPENING)

    def measure_json(self, clients: int, new_tokens: int, first: int) -> dict[str, Any]:
        """:meth:`measure` with every answer in JSON_FORMAT, asking the prompts numbered from
        ``first`` with JSON_OPENING for their first word."""
        return self.measure_with(self.json_client, clients, new_tokens, first, JSON_OPENING)

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def start(self) -> None:
        started = time.monotonic()
        self.daemon.start(timeout=START_TIMEOUT)
        self.start_s = time.monotonic() - started
        self._descendants = tree(self.pid)[1:]

    def stop(self) -> None:
        if self.daemon.proc is not None:
            self._descendants = list({*self._descendants, *tree(self.pid)[1:]})
            stop_tree(self.daemon.proc, self._descendants)


class VllmServer(Server):
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)."""

    name = "vllm-server"

    def __init__(self, folder: Path, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "vllm-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._descendants: list[psutil.Process] = []

    def client(self) -> Client:
        return ChatCompletionsClient(self.base, str(DEFAULT_MODEL))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GB),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        command = [
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
            *("--model", str(DEFAULT_MODEL), "--dtype", self.dtype),
            *("--max-model-len", str(VLLM_MAX_MODEL_LEN)),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            "--disable-uvicorn-access-log",
        ]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
            )
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() - started > START_TIMEOUT:
                raise TimeoutError(f"vLLM's server not ready after {START_TIMEOUT} s")
            time.sleep(0.5)
        self.start_s = time.monotonic() - started
        self._descendants = tree(self.pid)[1:]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc is not None:
            self._descendants = list({*self._descendants, *tree(self.pid)[1:]})
            stop_tree(self.proc, self._descendants)
