"""The service layer's seams: the model slot's state, requests moving between engines, and
prompts tokenized once (in-process daemon, fake engine)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from llmwsd.daemon import Daemon
from llmwsd.errors import LLMWSError
from llmwsd.service import model_changes
from tests.conftest import FAST, eventually, recv_json, recv_until, ws_url
from tests.fake_engine import FakeEngine
from tests.test_admin import add_fake_model
from tests.test_memory import ask, connect, estimate_for_tests
from tests.test_protocol import http_exchange


def short_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_changes, "free_memory", lambda device: 0)


def gated_loader(release: asyncio.Event, loaded: list[FakeEngine], **engine: Any) -> Any:
    async def load(config: Any, path: Path) -> FakeEngine:
        await release.wait()
        loaded.append(FakeEngine(path, **engine))
        return loaded[-1]

    return load


async def switch_held_after_unloading(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Task[dict[str, Any]], asyncio.Event, list[FakeEngine]]:
    """A switch to "next-model" that had to unload first, its load held until ``release``."""
    add_fake_model(daemon, "next-model")
    short_of_memory(monkeypatch)
    release, loaded = asyncio.Event(), []
    daemon.models.loader = gated_loader(release, loaded)
    switch = asyncio.create_task(daemon.models.switch("next-model"))
    await eventually(lambda: daemon.slot.engine is None, FAST, "the old model unloaded")
    return switch, release, loaded


async def test_during_a_switch_that_unloaded_first_everyone_is_told_it_is_switching(
    fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch, release, _ = await switch_held_after_unloading(fake_daemon, monkeypatch)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    status, _, body = await http_exchange(fake_daemon.server.port, request)
    assert status == 503
    assert json.loads(body) == {
        "status": "switching",
        "model": None,
        "reason": "the server is switching models; retry in a moment",
    }
    async with websockets.connect(ws_url(fake_daemon), open_timeout=FAST) as ws:
        await ws.send("{}")
        assert (await recv_json(ws))["model_state"] == "switching"
    release.set()
    assert (await switch)["unloaded_first"] is True
    assert fake_daemon.slot.state == "ready"


@pytest.mark.parametrize("unload_first", [False, True])
async def test_a_request_waiting_for_memory_moves_to_the_new_model(
    fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch, unload_first: bool
) -> None:
    """It used to start on the old, draining engine and fail "the daemon is shutting down"."""
    add_fake_model(fake_daemon, "next-model")
    if unload_first:
        short_of_memory(monkeypatch)
    old = fake_daemon.slot.engine
    assert isinstance(old, FakeEngine)
    old.info.memory = estimate_for_tests(budget=80)  # one request of 40 tokens at a time
    old.token_delay = 0.02
    running, waiting = await connect(fake_daemon), await connect(fake_daemon)
    await ask(running, 6, max_new_tokens=30, min_new_tokens=30)
    assert (await recv_json(running))["type"] == "start"
    await ask(waiting, 6, max_new_tokens=30)
    assert (await recv_json(waiting))["type"] == "queued"
    release, loaded = asyncio.Event(), []
    fake_daemon.models.loader = gated_loader(release, loaded)
    switch = asyncio.create_task(fake_daemon.models.switch("next-model"))
    release.set()
    await switch
    events = await recv_until(waiting, {"done", "error"})
    assert events[-1]["type"] == "done", events[-1]
    assert [r.messages[-1]["content"] for r in loaded[0].submitted] == [" ".join(["word"] * 6)]
    assert len(old.submitted) == 1  # only the one that was running
    await recv_until(running, {"done", "error"})
    for ws in (running, waiting):
        await ws.close()


async def test_a_prompt_is_tokenized_once_and_its_ids_reach_the_engine(
    fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fake_daemon.slot.engine
    assert isinstance(engine, FakeEngine)
    calls: list[int] = []
    tokenize = engine.tokenize

    def counting(messages: list[dict[str, str]]) -> list[int]:
        calls.append(len(messages))
        return tokenize(messages)

    monkeypatch.setattr(engine, "tokenize", counting)
    ws = await connect(fake_daemon)
    await ask(ws, 3)
    events = await recv_until(ws, {"done"})
    start = next(e for e in events if e["type"] == "start")
    (request,) = engine.submitted
    assert calls == [1]
    assert request.prompt_ids is not None and len(request.prompt_ids) == start["tokens_in"] == 7
    await ws.close()


async def test_text_mode_waits_for_a_switch_instead_of_refusing(
    fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch, release, loaded = await switch_held_after_unloading(fake_daemon, monkeypatch)
    async with websockets.connect(ws_url(fake_daemon), open_timeout=FAST) as ws:
        await ws.send("hello there")
        await asyncio.sleep(0.2)
        release.set()
        frames = [frame async for frame in ws]
    await switch
    assert "".join(str(f) for f in frames) == "echo: hello there"
    assert [r.messages[-1]["content"] for r in loaded[0].submitted] == ["hello there"]


async def test_a_switch_that_outlives_the_shutdown_closes_its_model(fake_daemon: Daemon) -> None:
    """A switch from the public port goes on beside its connection; at shutdown the model it
    loads is closed instead of served."""
    add_fake_model(fake_daemon, "next-model")
    release, loaded = asyncio.Event(), []
    fake_daemon.models.loader = gated_loader(release, loaded)
    switch = asyncio.create_task(fake_daemon.models.switch("next-model"))
    await asyncio.sleep(0)
    await fake_daemon.shutdown()
    release.set()
    with pytest.raises(LLMWSError) as refused:
        await switch
    assert refused.value.code == "interrupted"
    assert fake_daemon.slot.engine is None
    (new,) = loaded
    assert new.closed
