"""The bench's clients: llmws over WebSocket, OpenAI's chat API over HTTP (vLLM's server,
llmws's); many at once."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import websockets

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List some facts about the Moon.",
    "Write a poem about autumn leaves.",
    "Explain what a computer network is.",
    "Describe a busy market in the morning.",
    "Tell me about the history of tea.",
]
REQUEST_NUMBERS = itertools.count(1)
QUESTION = "Question"  # the first word of a prompt (servers.py: another for llmws's OpenAI API)
ATTENTION = "sdpa"
# What generate() does by default with this model's generation config.
SETTINGS = {"do_sample": False, "repetition_penalty": 1.0}


def new_conversation(
    prompt: str, numbers: Iterator[int] = REQUEST_NUMBERS, opening: str = QUESTION
) -> str:
    """``prompt`` as nobody asked it before (see bench.py's docstring)."""
    return f"{opening} {next(numbers)}. {prompt}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Client(Protocol):
    async def open(self) -> None: ...

    async def ask(self, user: str, new_tokens: int) -> dict[str, float]: ...

    async def close(self) -> None: ...


class WebSocketClient:
    """One llmws client: a WebSocket connection, a new conversation per request.

    ``config``: more of each request's config, on top of SETTINGS and the token counts
    (a ``format``, say); ``opening``: what every answer must begin with (as much of it as
    the answer has), else a RuntimeError.
    """

    def __init__(self, url: str, config: dict[str, Any] | None = None, opening: str = "") -> None:
        self.url = url
        self.config = config or {}
        self.opening = opening
        self.ws: websockets.ClientConnection | None = None

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None)
        await self.ws.send("{}")
        json.loads(await self.ws.recv())  # welcome

    async def ask(self, user: str, new_tokens: int) -> dict[str, float]:
        assert self.ws is not None
        config = {
            **SETTINGS,
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            **self.config,
        }
        request = {"type": "inference", "prompt": {"system": "", "user": user}, "config": config}
        started = time.perf_counter()
        await self.ws.send(json.dumps(request))
        first = None
        prompt_tokens = 0
        begun = ""  # the answer's first characters, as many as the opening has
        while True:
            event = json.loads(await self.ws.recv())
            if event["type"] == "start":
                prompt_tokens = event["tokens_in"]
            if event["type"] == "token":
                if first is None:
                    first = time.perf_counter()
                if len(begun) < len(self.opening):
                    begun += event["data"]
            if event["type"] in ("done", "error"):
                break
        if event["type"] == "error":
            raise RuntimeError(f"the daemon answered an error: {event}")
        if not (begun.startswith(self.opening) or self.opening.startswith(begun)):
            raise RuntimeError(f"an answer began {begun!r}, not {self.opening!r}")
        finished = time.perf_counter()
        return {
            "tokens": event["total_tokens"],
            "prompt_tokens": prompt_tokens,
            "ttft": (first or finished) - started,
            "started": started,
            "finished": finished,
        }

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class ChatCompletionsClient:
    """One client of an OpenAI-compatible server: a keep-alive HTTP connection, streaming chat.

    ``health`` is the GET that opens the connection before the clients ask (vLLM's
    ``/health``); ``model`` None leaves the field out; ``server`` names it in errors.
    """

    def __init__(
        self, base: str, model: str | None, health: str = "/health", server: str = "vLLM's server"
    ) -> None:
        import aiohttp

        self.base = base
        self.model = model
        self.health = health
        self.server = server
        self.connections = 0
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._connected)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=3600),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            trace_configs=[trace],
        )

    async def _connected(self, *_: Any) -> None:
        self.connections += 1

    async def open(self) -> None:
        async with self.session.get(self.base + self.health) as response:
            response.raise_for_status()
            await response.read()

    async def ask(self, user: str, new_tokens: int) -> dict[str, float]:
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": user}],
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "temperature": 0.0,
            "repetition_penalty": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model is not None:
            body["model"] = self.model
        started = time.perf_counter()
        first = None
        usage: dict[str, int] = {}
        async with self.session.post(self.base + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(
                    f"{self.server} answered {response.status}: {(await response.text())[:500]}"
                )
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(
                    c.get("delta", {}).get("content") for c in chunk.get("choices", ())
                ):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
        finished = time.perf_counter()
        if not usage:
            raise RuntimeError(f"{self.server} streamed no chunk with usage")
        if self.connections != 1:
            raise RuntimeError(f"a client opened {self.connections} connections instead of 1")
        return {
            "tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"],
            "ttft": (first or finished) - started,
            "started": started,
            "finished": finished,
        }

    async def close(self) -> None:
        await self.session.close()


async def concurrent(
    make_client: Callable[[], Client], prompts: Iterator[str], clients: int, new_tokens: int
) -> dict[str, Any]:
    """``clients`` connections that ask at the same moment; aggregate tokens/s and TTFT."""
    opened = [make_client() for _ in range(clients)]
    try:
        await asyncio.gather(*(c.open() for c in opened))
        users = [next(prompts) for _ in opened]
        results = await asyncio.gather(
            *(c.ask(user, new_tokens) for c, user in zip(opened, users, strict=True))
        )
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results)
    ttfts = [r["ttft"] for r in results]
    tokens = [r["tokens"] for r in results]
    if any(t != new_tokens for t in tokens):
        raise RuntimeError(f"asked for {new_tokens} tokens each, got {tokens}")
    return {
        "tokens_per_s": sum(tokens) / wall,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": percentile(ttfts, 0.9),
        "prompt_tokens": [r["prompt_tokens"] for r in results],
    }
