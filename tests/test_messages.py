"""llmwsd.protocol.messages: every message type, its wire form, and docs/protocol.md's tables.

The typed messages must say exactly what the daemon sends today: the live test
below reads what an in-process daemon answers and checks that each frame, parsed
and written back, is the same object with its keys in the same order.
"""

from __future__ import annotations

import json
import re

import pytest
import websockets

from llmwsd.daemon import Daemon
from llmwsd.errors import BadRequest, ContextTooLong, DiskFull, EventsDropped, UnknownType
from llmwsd.protocol import admin as adminproto
from llmwsd.protocol import messages as m
from llmwsd.protocol import wire
from llmwsd.protocol.close_codes import CloseCode
from tests.conftest import FAST, ROOT, recv_json, recv_until, ws_url

SESSION = "0b6c1f9e-5c2a-4a8e-9a51-0c8a4d7f2b11"
REPORT = {"device": "cpu", "total_gb": 23.4, "free_gb": 21.0, "host": {}, "gpus": []}

SAMPLES: list[m.Message] = [
    # from the client
    m.Ping(),
    m.Config(data={"temperature": 0.5, "stop": ["\n\n"]}),
    m.Inference(prompt=m.Prompt(system="be brief", user="hello")),
    m.Inference(prompt=m.Prompt(system="", user="hi"), config={"max_new_tokens": 8}),
    m.Cancel(),
    m.Ack(),
    m.Ack(seq=41),
    m.Reset(),
    m.GetHistory(),
    m.GetResources(),
    m.SubscribeResources(interval=0.5),
    m.SubscribeResources(interval=0),
    m.GetStatus(),
    m.ListModels(),
    m.RecheckModel(),
    m.SwitchModel(model="SmolLM2-135M-Instruct"),
    m.SwitchModel(model_path="/var/lib/llmws/models/x"),
    m.DownloadModel(repo="org/name", target_dir="name", revision="main"),
    m.DeleteModel(model_name="name", force=True),
    m.Train(),
    m.TrainStatus(),
    m.SaveSnapshot(),
    # answers
    m.Welcome(
        protocol=1,
        server="llmwsd/0.1.0",
        session_id=SESSION,
        resumed=True,
        last_seq=44,
        model="SmolLM2-135M-Instruct",
        model_state="ready",
        capabilities={"device": "cpu", "max_context": 8192},
        resources=REPORT,
        config={"max_new_tokens": 512},
        defaults_from={"max_new_tokens": "llmws"},
        last_seq_clamped=90,
    ),
    m.Pong(),
    m.ConfigAck(config={"temperature": 0.5}),
    m.CancelAck(cancelled=False),
    m.CancelAck(cancelled=True, request_id="r3"),
    m.AckReceived(seq=41, dropped=12),
    m.ResetDone(),
    m.History(messages=[{"role": "system", "content": "be brief"}]),
    m.Resources(report=REPORT),
    m.Subscribed(interval=2),
    m.Status(
        version="0.1.0",
        uptime_s=12.5,
        model=None,
        model_state="none",
        device=None,
        max_context=None,
        sessions=1,
        queue=0,
        active=0,
        memory={"ram_used_gb": 1.0},
        context_limit=None,
    ),
    m.ModelsList(models=[{"name": "x", "loaded": True}]),
    m.RecheckComplete(models=[]),
    m.Log(message="loading x"),
    m.Log(id="p1", message="downloading"),
    m.ModelSwitched(result={"model": "x", "changed": True, "load_s": 1.5}),
    m.DownloadStarted(id="p1", repo="https://huggingface.co/org/name", name="name"),
    m.DownloadProgress(progress={"id": "p1", "stage": "downloading", "done": 5, "total": 9}),
    m.DownloadDone(result={"id": "p1", "name": "name", "size_bytes": 9}),
    m.ModelDeleted(result={"removed": "x", "path": "/m/x", "size_bytes": 9}),
    m.Error(code="bad_request", message="no"),
    # generation events
    m.Queued(request_id="r1", position=2, seq=1),
    m.Start(request_id="r1", tokens_in=10, max_tokens=20, dropped_turns=0, seq=2),
    m.Start(request_id="r1", tokens_in=9, max_tokens=5, dropped_turns=1, max_tokens_requested=50),
    m.Token(request_id="r1", data="Hel", seq=3),
    m.Done(
        request_id="r1",
        total_tokens=3,
        finish_reason="stop",
        ttft_ms=12.0,
        tokens_per_s=30.5,
        history_dropped=2,
        seq=4,
    ),
    m.Error(code="interrupted", message="cut off", request_id="r2", seq=1005),
    m.Error(code="events_dropped", message="gone", details={"first_seq": 1, "last_seq": 9}),
]


def through_json(message: dict) -> dict:
    return wire.decode_message(wire.encode_message(message))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_every_message_survives_the_wire(sample: m.Message):
    assert type(sample).from_wire(through_json(sample.to_wire())) == sample
    table = m.CLIENT_MESSAGES if type(sample) in m.CLIENT_MESSAGES.values() else m.SERVER_MESSAGES
    assert table[sample.TYPE] is type(sample)


def test_every_message_type_has_a_sample():
    sampled = {type(sample) for sample in SAMPLES}
    assert sampled == {*m.CLIENT_MESSAGES.values(), *m.SERVER_MESSAGES.values()}


@pytest.mark.parametrize(
    "hello",
    [m.Hello(), m.Hello(session_id=SESSION, last_seq=0, token="t0k")],
    ids=["empty", "full"],
)
def test_the_hello_survives_the_wire(hello: m.Hello):
    assert m.Hello.from_wire(through_json(hello.to_wire())) == hello


def test_defaults_are_left_off_the_wire():
    assert m.Hello().to_wire() == {}
    assert m.CancelAck(cancelled=False).to_wire() == {"type": "cancel_ack", "cancelled": False}
    assert m.Token(request_id="r1", data="x").to_wire() == {
        "type": "token",
        "request_id": "r1",
        "data": "x",
    }
    assert (
        "history_dropped"
        not in m.Done(
            request_id="r1", total_tokens=1, finish_reason="stop", ttft_ms=1.0, tokens_per_s=1.0
        ).to_wire()
    )


@pytest.mark.parametrize(
    "error",
    [
        ContextTooLong(9000, 8192, 512),
        EventsDropped("lost", first_seq=3, last_seq=7),
        DiskFull("full", needed_bytes=9, free_bytes=1),
        BadRequest("no"),
    ],
    ids=lambda e: e.code,
)
def test_an_error_message_is_its_exception(error):
    message = m.Error.from_exception(error, request_id="r4")
    assert message.to_wire() == {**error.to_message(), "request_id": "r4"}
    back = message.exception()
    details = {k: v for k, v in back.details.items() if k != "request_id"}
    assert (type(back), back.message, details) == (type(error), error.message, error.details)


def test_the_old_clients_config_without_data():
    assert m.Config.from_wire({"type": "config", "temperature": 0.1}) == m.Config(
        data={"temperature": 0.1}
    )


def test_an_inference_takes_a_legacy_prompt_string():
    parsed = m.Inference.from_wire({"type": "inference", "prompt": "<|user|>hi<|end|>"})
    assert parsed == m.Inference(prompt=m.Prompt(system="", user="hi"))


@pytest.mark.parametrize(
    "message",
    [
        {"type": "inference"},
        {"type": "inference", "prompt": {"user": "  "}},
        {"type": "inference", "prompt": {"user": "hi"}, "config": [1]},
        {"type": "config", "data": 7},
        {"type": "ack", "seq": -1},
        {"type": "subscribe_resources", "interval": 0.1},
        {"type": "subscribe_resources", "interval": True},
    ],
)
def test_bad_client_messages_are_bad_requests(message):
    with pytest.raises(BadRequest):
        m.parse_client_message(message)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "welcome"},
        {"type": "ack_received", "seq": "1", "dropped": 0},
        {"type": "cancel_ack", "cancelled": 1},
        {"type": "token", "request_id": "r1", "data": None, "seq": 1},
        {"type": "history", "messages": {}},
        {"type": "done", "request_id": "r1", "total_tokens": 1.5},
    ],
)
def test_server_messages_that_do_not_fit_are_refused(message):
    with pytest.raises(BadRequest):
        m.parse_server_message(message)


def test_fields_a_newer_peer_adds_are_ignored():
    parsed = m.parse_server_message({"type": "pong", "later": 1})
    assert parsed == m.Pong()


@pytest.mark.parametrize("message", [{}, {"type": "nope"}, {"type": 3}, {"type": "welcome"}])
def test_what_is_not_a_client_message_is_unknown_type(message):
    with pytest.raises(UnknownType):
        m.parse_client_message(message)


# -- docs/protocol.md lists the same messages -------------------------------------------


def doc_table_names(heading: str) -> set[str]:
    """The backticked names in the first column of the first table under ``## heading``."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header, rule
    assert rows, f"no table under {heading!r}"
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_the_reference_lists_every_client_message_and_no_other():
    assert doc_table_names("Messages from the client") == m.CLIENT_TYPES


def test_the_reference_lists_every_server_message_and_no_other():
    events = doc_table_names("Generation events and seq")
    assert events == m.GENERATION_TYPES
    assert doc_table_names("Messages from the server") | events == set(m.SERVER_MESSAGES)


def test_the_reference_lists_every_close_code():
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("\n## Close codes\n", 1)[1].split("\n## ", 1)[0]
    codes = {int(code) for code in re.findall(r"^\| (\d{4}) \|", section, re.MULTILINE)}
    assert codes == set(CloseCode)


# -- the admin socket's lines -----------------------------------------------------------


def admin_line(message: dict) -> dict:
    return adminproto.decode(adminproto.encode(message))


def test_an_admin_greeting_reads_back():
    hello = adminproto.Greeting.from_wire(admin_line(adminproto.greeting("0.1.0")))
    assert hello == adminproto.Greeting(protocol=adminproto.ADMIN_PROTOCOL_VERSION, version="0.1.0")
    with pytest.raises(BadRequest):
        adminproto.Greeting.from_wire({"hello": "sshd"})


def test_admin_answers_read_back():
    read = adminproto.Answer.from_wire
    assert read(admin_line(adminproto.ok(7, {"model": "x"}))) == adminproto.Answer(
        7, result={"model": "x"}
    )
    assert read(admin_line(adminproto.ok("a", None))) == adminproto.Answer("a")
    assert read(admin_line(adminproto.progress(7, {"stage": "loading"}))) == adminproto.Answer(
        7, progress={"stage": "loading"}
    )
    failed = read(admin_line(adminproto.failed(None, DiskFull("full", needed_bytes=9))))
    assert failed.id is None and isinstance(failed.error, DiskFull)
    assert (failed.error.message, failed.error.details) == ("full", {"needed_bytes": 9})


async def test_every_changing_admin_command_is_a_command(fake_daemon: Daemon):
    assert set(fake_daemon.admin.handlers) >= adminproto.CHANGING_COMMANDS


# -- what the daemon sends is what the messages write -----------------------------------


def same_frame(received: dict) -> None:
    """``received`` parses, and writes back as the same object, keys in the same order."""
    written = m.parse_server_message(received).to_wire()
    assert list(written.items()) == list(received.items())


async def test_what_the_daemon_sends_is_what_the_messages_write(fake_daemon: Daemon):
    ws = await websockets.connect(ws_url(fake_daemon), max_size=None, open_timeout=FAST)
    await ws.send(wire.encode_message(m.Hello().to_wire()))
    welcome = await recv_json(ws, what="welcome")
    same_frame(welcome)
    session_id = m.Welcome.from_wire(welcome).session_id
    connection = fake_daemon.sessions.get(session_id).owner
    assert set(connection.handlers) == m.CLIENT_TYPES

    async def exchange(message: m.Message, until: str) -> list[dict]:
        await ws.send(wire.encode_message(message.to_wire()))
        return await recv_until(ws, {until, "error"})

    received = [
        *await exchange(m.Ping(), "pong"),
        *await exchange(m.Config(data={"temperature": 0.3}), "config_ack"),
        *await exchange(m.Inference(prompt=m.Prompt(system="s", user="one two")), "done"),
        *await exchange(m.Ack(), "ack_received"),
        *await exchange(m.GetHistory(), "history"),
        *await exchange(m.GetResources(), "resources"),
        *await exchange(m.SubscribeResources(interval=0), "subscribed"),
        *await exchange(m.GetStatus(), "status"),
        *await exchange(m.ListModels(), "models_list"),
        *await exchange(m.RecheckModel(), "recheck_complete"),
        *await exchange(m.Cancel(), "cancel_ack"),
        *await exchange(m.Reset(), "reset_done"),
        *await exchange(m.SwitchModel(model="fake-model"), "model_switched"),  # forbidden
        *await exchange(m.Train(), "never"),  # unsupported
        *await exchange(m.Inference(prompt=m.Prompt(system="", user="x" * 200_000)), "never"),
    ]
    kinds = [message["type"] for message in received]
    assert {"pong", "config_ack", "start", "token", "done", "ack_received", "history"} <= set(kinds)
    assert kinds.count("error") == 3, received
    for message in received:
        same_frame(message)
    await ws.close()


async def test_unknown_types_are_refused_as_the_connection_refuses_them(fake_daemon: Daemon):
    ws = await websockets.connect(ws_url(fake_daemon), max_size=None, open_timeout=FAST)
    await ws.send("{}")
    await recv_json(ws, what="welcome")
    for message in ({"type": "nope"}, {"no": "type"}):
        await ws.send(json.dumps(message))
        answer = await recv_json(ws)
        with pytest.raises(UnknownType) as expected:
            m.parse_client_message(message)
        assert answer == expected.value.to_message()
    await ws.close()
