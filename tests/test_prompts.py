"""What a client's text becomes: legacy prompts as the model gets them, stop strings as cut.

Each test checks what was parsed and sent (the engine's messages, the streamed
text) against an oracle built independently of the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from llmwsd.daemon import Daemon
from llmwsd.engines.detokenize import StopStringFilter
from tests.conftest import RunningDaemon, answer_text, recv_json, recv_until, ws_url

SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# -- stop strings ----------------------------------------------------------------------------


def expected_cut(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """The oracle: after each piece, the text before the earliest stop string seen so far."""
    text = ""
    for piece in pieces:
        text += piece
        starts = [text.find(stop) for stop in stops if stop in text]
        if starts:
            return text[: min(starts)], True
    return text, False


def filtered(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    stream = StopStringFilter(stops)
    out = ""
    for piece in pieces:
        text, stopped = stream.push(piece)
        out += text
        if stopped:
            return out, True
    return out + stream.flush(), False


def test_the_earliest_stop_string_wins_whatever_its_place_in_the_list() -> None:
    text = ["The capital", " of France", " is Paris."]
    for stops in (["Paris", "capital"], ["capital", "Paris"], ["France", "of", "Paris"]):
        assert filtered(text, stops) == expected_cut(text, stops)
    assert filtered(text, ["Paris", "capital"]) == ("The ", True)
    assert filtered(["ab", "cd"], ["cd", "bc"]) == ("a", True)  # "bc" spans the two pieces
    assert filtered(["xyz"], ["z", "y", "xyz"]) == ("", True)


alphabet = st.text(alphabet="abc ", max_size=6)


@SETTINGS
@given(
    pieces=st.lists(alphabet, max_size=8),
    stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=4),
)
def test_stop_strings_cut_like_the_oracle(pieces: list[str], stops: list[str]) -> None:
    assert filtered(pieces, stops) == expected_cut(pieces, stops)


async def test_stop_strings_on_the_real_model(real_daemon: RunningDaemon) -> None:
    """Two pieces of a greedy answer as stops, the later one first: cut at the earlier."""

    async def ask(**config: Any) -> str:
        async with websockets.connect(real_daemon.url) as ws:
            await ws.send("{}")
            await recv_until(ws, {"welcome"}, timeout=10)
            prompt = {"user": "What is the capital of France?"}
            await ws.send(json.dumps({"type": "inference", "prompt": prompt, "config": config}))
            events = await recv_until(ws, {"done", "error"}, timeout=120)
        assert events[-1]["type"] == "done", events[-1]
        return answer_text(events)

    whole = await ask()
    words = whole.split()
    assert len(words) >= 4, whole
    early, late = words[1], words[-1]
    assert whole.find(early) < whole.find(late)
    assert await ask(stop=[late, early]) == whole[: whole.find(early)]


# -- legacy text prompts ----------------------------------------------------------------------

section_bodies = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="<|{"), max_size=20
)
sections = st.lists(st.tuples(st.sampled_from(["system", "user"]), section_bodies), max_size=5)


def joined(bodies: list[str]) -> str:
    return "\n".join(b.strip() for b in bodies if b.strip())


@SETTINGS
@given(parts=sections)
def test_legacy_prompts_with_several_sections_reach_the_model_whole(
    fake_daemon_on_loop: tuple[Daemon, asyncio.AbstractEventLoop], parts: list[tuple[str, str]]
) -> None:
    daemon, loop = fake_daemon_on_loop
    text = "".join(f"<|{role}|>{body}<|end|>\n" for role, body in parts) + "<|assistant|>\n"
    system = joined([b for role, b in parts if role == "system"])
    user = joined([b for role, b in parts if role == "user"])

    async def case() -> None:
        engine = daemon.slot.engine
        assert engine is not None
        before = len(engine.submitted)  # type: ignore[attr-defined]
        async with websockets.connect(ws_url(daemon)) as ws:
            await ws.send(text)
            frames = []
            with contextlib.suppress(ConnectionClosed):  # iteration ends so only on 1000
                async with asyncio.timeout(10):
                    frames += [frame async for frame in ws]
        if not user:
            assert (ws.close_code, ws.close_reason, frames) == (1008, "empty prompt", [])
            assert len(engine.submitted) == before  # type: ignore[attr-defined]
            return
        (request,) = engine.submitted[before:]  # type: ignore[attr-defined]
        expected = [{"role": "system", "content": system}] if system else []
        assert request.messages == [*expected, {"role": "user", "content": user}]
        assert "".join(frames) == "echo: " + " ".join(user.split())
        assert ws.close_code == 1000

    asyncio.run_coroutine_threadsafe(case(), loop).result(30)


@pytest.fixture
def fake_daemon_on_loop(tmp_path):
    """An in-process fake-engine daemon on a loop in its own thread (hypothesis is sync)."""
    import threading

    from llmwsd.config import parse_config
    from tests.fake_engine import FakeEngine

    model = tmp_path / "models" / "fake-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "paths": {k: str(tmp_path / k) for k in ("state_dir", "runtime_dir", "log_dir")},
            "models": {"dirs": [str(tmp_path / "models")]},
            "limits": {"messages_per_second": 1e6, "message_burst": 1_000_000},
        }
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    daemon = Daemon(config, engine_loader=FakeEngine.loader(token_delay=0))
    asyncio.run_coroutine_threadsafe(daemon.start(), loop).result(30)
    yield daemon, loop
    asyncio.run_coroutine_threadsafe(daemon.shutdown(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


async def test_a_json_legacy_prompt_string_reaches_the_model_the_same_way(
    fake_daemon: Daemon,
) -> None:
    text = "<|system|>Be brief<|end|><|user|>one<|end|><|system|>and kind<|end|><|user|>two<|end|>"
    async with websockets.connect(ws_url(fake_daemon)) as ws:
        await ws.send("{}")
        await recv_json(ws, timeout=10)
        await ws.send(json.dumps({"type": "inference", "prompt": text}))
        events = await recv_until(ws, {"done", "error"}, timeout=10)
    assert answer_text(events) == "echo: one two"
    (request,) = fake_daemon.slot.engine.submitted  # type: ignore[union-attr]
    assert request.messages == [
        {"role": "system", "content": "Be brief\nand kind"},
        {"role": "user", "content": "one\ntwo"},
    ]
