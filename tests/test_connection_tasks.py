"""A connection answers cancel, ack and ping while an earlier message waits, and a cancel wins.

An inference's admission (waiting out a switch, fitting the context, the memory
queue) and model changes run beside the connection's message loop: in-process
daemons with the fake engine, whose loader can be held back by an Event.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

from llmwsd.config import Config
from llmwsd.daemon import Daemon
from llmwsd.frontends.websocket import connection
from tests.conftest import (
    FAST,
    REAL,
    RunningDaemon,
    answer_text,
    eventually,
    recv_json,
    recv_until,
    ws_url,
)
from tests.fake_engine import FakeEngine

OTHER = "other-model"


class HeldLoader:
    """The fake engine's loader, except that loading OTHER waits until ``release``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.loading = asyncio.Event()

    async def __call__(self, config: Config, path: Path) -> FakeEngine:
        if path.name == OTHER:
            self.loading.set()
            await self.gate.wait()
        return FakeEngine(path)

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
async def managed(fake_daemon_factory: Any, tmp_path: Path) -> tuple[Daemon, str, HeldLoader]:
    """A daemon whose public port allows model changes, an admin token, a held loader."""
    daemon = await fake_daemon_factory(
        api={
            "allow_model_management": True,
            "tokens_file": str(tmp_path / "tokens.json"),
            "admin_tokens_file": str(tmp_path / "admin.json"),
        }
    )
    other = tmp_path / "models" / OTHER
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"")
    _, token = daemon.server.gate.auth.admin.add("admin")
    loader = HeldLoader()
    daemon.models.loader = loader
    return daemon, token, loader


async def connect(daemon: Daemon, **hello: Any) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(ws_url(daemon), open_timeout=FAST)
    await ws.send(json.dumps(hello))
    welcome = await recv_json(ws, what="welcome")
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def send(ws: websockets.ClientConnection, kind: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": kind, **fields}))


async def ask(ws: websockets.ClientConnection, user: str, **config: Any) -> None:
    fields: dict[str, Any] = {"prompt": {"system": "", "user": user}}
    if config:
        fields["config"] = config
    await send(ws, "inference", **fields)


async def recv_all(ws: websockets.ClientConnection, kinds: set[str]) -> list[dict[str, Any]]:
    """Messages until one of each type in ``kinds`` came (their order is not the test's)."""
    received: list[dict[str, Any]] = []
    while not kinds <= {m["type"] for m in received}:
        received += await recv_until(ws, kinds - {m["type"] for m in received})
    return received


async def quick_answers_come(ws: websockets.ClientConnection) -> None:
    """A ping and an ack are answered now (nothing else is due meanwhile)."""
    await send(ws, "ping")
    assert (await recv_json(ws, what="pong"))["type"] == "pong"
    await send(ws, "ack")
    assert (await recv_json(ws, what="ack_received"))["type"] == "ack_received"


async def switch_held(
    daemon: Daemon, ws: websockets.ClientConnection, loader: HeldLoader, unload_first: bool
) -> None:
    """Ask for a switch to OTHER and return once its load is under way (and held)."""
    if unload_first:
        # No room for both models: drain and unload the old one, then load the new one.
        daemon.models._fits_beside = lambda entry, old: False  # type: ignore[method-assign]
    await send(ws, "switch_model", model=OTHER)
    logs = await recv_until(ws, {"log"})
    assert logs[-1]["message"].startswith("loading" if not unload_first else "not enough"), logs
    await asyncio.wait_for(loader.loading.wait(), FAST)
    if unload_first:
        await recv_until(ws, {"log"})  # "loading other-model"
        assert daemon.slot.engine is None


async def test_ping_and_ack_are_answered_while_a_switch_loads(managed) -> None:
    daemon, token, loader = managed
    ws, _ = await connect(daemon, token=token)
    await switch_held(daemon, ws, loader, unload_first=False)
    await quick_answers_come(ws)
    loader.release()
    switched = (await recv_until(ws, {"model_switched"}))[-1]
    assert switched["model"] == OTHER and switched["changed"] is True
    await ws.close()


async def test_an_inference_waits_for_a_switch_that_unloaded_first(managed) -> None:
    daemon, token, loader = managed
    ws, welcome = await connect(daemon, token=token)
    await switch_held(daemon, ws, loader, unload_first=True)
    await ask(ws, "after the switch")
    await quick_answers_come(ws)  # while the inference waits for the new model
    # A config sent after the inference leaves that inference's settings alone.
    await send(ws, "config", max_new_tokens=1)
    assert (await recv_json(ws, what="config_ack"))["config"]["max_new_tokens"] == 1
    loader.release()
    events = await recv_all(ws, {"done", "model_switched"})
    assert answer_text(events) == "echo: after the switch"
    start = next(e for e in events if e["type"] == "start")
    # The session's settings when the inference came.
    assert start["max_tokens"] == welcome["config"]["max_new_tokens"] > 1
    assert [r.messages[-1]["content"] for r in daemon.slot.engine.submitted] == ["after the switch"]
    await ws.close()


async def test_a_cancel_while_waiting_for_a_switch_ends_it_before_the_engine(managed) -> None:
    daemon, token, loader = managed
    ws, welcome = await connect(daemon, token=token)
    await switch_held(daemon, ws, loader, unload_first=True)
    await ask(ws, "never asked")
    await send(ws, "cancel")
    answers = await recv_until(ws, {"done"})
    assert {"type": "cancel_ack", "cancelled": True, "request_id": "r1"} in answers
    done = answers[-1]
    assert (done["request_id"], done["finish_reason"]) == ("r1", "cancelled")
    assert done["total_tokens"] == 0
    assert not any(e["type"] == "start" for e in answers)
    session = daemon.sessions.get(welcome["session_id"])
    assert session is not None and session.running is None
    loader.release()
    await recv_until(ws, {"model_switched"})
    assert daemon.slot.engine.submitted == []  # type: ignore[union-attr]
    await ws.close()
    # A client resuming from the start sees the same end: the done is in the buffer.
    ws, resumed = await connect(daemon, token=token, session_id=welcome["session_id"], last_seq=0)
    assert resumed["resumed"] is True
    replayed = await recv_until(ws, {"done"})
    assert replayed[-1] == done
    await ws.close()


async def test_a_cancel_right_after_an_inference_always_wins(fake_daemon_factory: Any) -> None:
    # Twenty quick turns are 60 messages: more than the default burst, so no limit here.
    daemon = await fake_daemon_factory(limits={"messages_per_second": 1000, "message_burst": 1000})
    daemon.slot.engine.token_delay = 0.05
    ws, _ = await connect(daemon)
    for turn in range(1, 21):
        await ask(ws, "a b c d e f g h i j k l m n o p")
        await send(ws, "cancel")
        answers = await recv_until(ws, {"done", "error"})
        request_id = f"r{turn}"
        assert {"type": "cancel_ack", "cancelled": True, "request_id": request_id} in answers
        done = answers[-1]
        assert (done["type"], done["request_id"]) == ("done", request_id), answers
        assert done["finish_reason"] == "cancelled"
        await send(ws, "ack")
        await recv_until(ws, {"ack_received"})
    await ws.close()


async def test_a_second_inference_right_after_the_first_is_busy(fake_daemon: Daemon) -> None:
    ws, _ = await connect(fake_daemon)
    await ask(ws, "first")
    await ask(ws, "second")
    answers = await recv_until(ws, {"done"})
    errors = [a for a in answers if a["type"] == "error"]
    assert [(e["code"], "seq" in e) for e in errors] == [("busy", False)]
    assert answer_text(answers) == "echo: first"
    await ws.close()


async def test_closing_mid_switch_leaves_no_task_and_the_switch_goes_on(managed) -> None:
    daemon, token, loader = managed
    before = asyncio.all_tasks()
    ws, welcome = await connect(daemon, token=token)
    session = daemon.sessions.get(welcome["session_id"])
    assert session is not None
    conn = session.owner
    await switch_held(daemon, ws, loader, unload_first=False)
    await ws.close()
    await eventually(lambda: session.owner is None, FAST, "the server to see the close")
    assert not conn._waiting and not conn._model_tasks
    loader.release()
    await eventually(
        lambda: daemon.slot.engine is not None and daemon.slot.engine.info.name == OTHER,
        FAST,
        "the switch to finish without its client",
    )
    await eventually(
        lambda: not (asyncio.all_tasks() - before - {asyncio.current_task()}),
        FAST,
        "every task the connection started to end",
    )


async def test_waiting_handlers_are_bounded(managed, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, token, loader = managed
    monkeypatch.setattr(connection, "MAX_WAITING_HANDLERS", 2)
    ws, _ = await connect(daemon, token=token)
    await switch_held(daemon, ws, loader, unload_first=True)
    await ask(ws, "waits")
    await send(ws, "delete_model", model_name=OTHER)
    error = await recv_json(ws, what="the refusal")
    assert error["code"] == "busy" and "still waiting" in error["message"], error
    await quick_answers_come(ws)  # the connection is fine
    loader.release()
    events = await recv_all(ws, {"done", "model_switched"})
    assert answer_text(events) == "echo: waits"
    await ws.close()


@pytest.mark.slow
async def test_a_cancel_right_after_an_inference_on_the_real_model(
    real_daemon: RunningDaemon,
) -> None:
    async with websockets.connect(real_daemon.url, open_timeout=FAST) as ws:
        await ws.send("{}")
        assert (await recv_json(ws, REAL, "welcome"))["type"] == "welcome"
        await ask(ws, "Write a long story about a lighthouse keeper.", max_new_tokens=200)
        await send(ws, "cancel")
        answers = await recv_until(ws, {"done", "error"}, timeout=REAL)
        ack = next(a for a in answers if a["type"] == "cancel_ack")
        assert ack == {"type": "cancel_ack", "cancelled": True, "request_id": ack["request_id"]}
        done = answers[-1]
        assert done["type"] == "done" and done["finish_reason"] == "cancelled", answers
        assert done["request_id"] == ack["request_id"]
