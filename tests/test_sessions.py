"""Sessions: conversation memory, resumable streams, encryption at rest, restarts, expiry.

The first half works on the session store and its files directly (fast); the
second half talks to real llmwsd subprocesses with the real model, greedy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from llmwsd.config import SessionsConfig
from llmwsd.engines.interface import Failed, Finished, Started, TokenText
from llmwsd.errors import Busy, ConfigError, Interrupted
from llmwsd.sessions.files import (
    HEADER_SIZE,
    RECORD_LENGTH,
    LogCorrupt,
    SessionFiles,
    load_key,
    read_log,
)
from llmwsd.sessions.registry import COMPACT_MIN_RECORDS, SessionStore
from llmwsd.sessions.session import SEQ_GAP_AFTER_CRASH, Session
from llmwsd.settings import GenerationSettings
from tests.conftest import (
    DEFAULT_MODEL,
    FAST,
    REAL,
    RunningDaemon,
    answer_text,
    eventually,
    recv_json,
    recv_until,
    within,
)
from tests.test_protocol import hello

# -- the store and its files, without a daemon -----------------------------------------------


async def open_store(state_dir: Path, **limits: Any) -> SessionStore:
    store = SessionStore(GenerationSettings(), SessionsConfig(**limits), state_dir)
    await store.open()
    return store


def generate(session: Session, user: str, pieces: list[str], finish: bool = True) -> None:
    """Feed ``session`` the events of one generation, as the engine would."""
    running = session.begin_generation(user, "")
    session.on_generation_event(running, Started(len(user.split()), 64))
    for piece in pieces:
        session.on_generation_event(running, TokenText(piece))
    if finish:
        session.on_generation_event(running, Finished(len(pieces), "stop", 1.0, 10.0))


def comparable(session: Session) -> dict[str, Any]:
    return {k: v for k, v in session.snapshot().items() if k != "last_active"}


def frame_offsets(data: bytes) -> list[int]:
    """Where each record of a log starts."""
    offsets, offset = [], HEADER_SIZE
    while offset < len(data):
        offsets.append(offset)
        offset += RECORD_LENGTH.size + RECORD_LENGTH.unpack_from(data, offset)[0]
    return offsets


async def test_sessions_replay_to_what_they_were(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    session.set_settings(session.settings.merge({"temperature": 0.2, "stop": ["x"]}))
    generate(session, "My name is Alice", ["Hello", " Alice", "!"])
    session.ack(2)
    generate(session, "And you?", ["I", " am", " a", " model"])
    cut_off = store.create()
    generate(cut_off, "Tell me a story", ["Once", " upon"], finish=False)
    expected = {s.id: comparable(s) for s in store.list()}
    await store.close()

    store = await open_store(tmp_path)
    assert set(expected) == {s.id for s in store.list()}
    assert comparable(store.get(session.id)) == expected[session.id]
    # The generation cut off by the stop ends with `interrupted`; its part stays.
    restored = store.get(cut_off.id)
    assert restored.running is None
    error = restored.events[-1]
    assert error["type"] == "error" and error["code"] == "interrupted"
    # Its seq jumps past any the crash may have lost after they reached the client.
    gap = SEQ_GAP_AFTER_CRASH
    assert error["request_id"] == "r1" and error["seq"] == restored.events[-2]["seq"] + 1 + gap
    assert restored.messages[-1] == {"role": "assistant", "content": "Once upon"}
    generate(restored, "Go on", ["ok"])
    assert restored.events[-1]["request_id"] == "r2"
    await store.close()


async def test_a_queued_generation_cut_off_ends_interrupted_too(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    running = session.begin_generation("wait for me", "")
    session.append_event({"type": "queued", "request_id": running.request_id, "position": 1})
    await store.close()
    store = await open_store(tmp_path)
    events = store.get(session.id).events
    assert [e["type"] for e in events] == ["queued", "error"]
    assert events[-1]["code"] == "interrupted" and events[-1]["request_id"] == "r1"
    assert store.get(session.id).messages == []  # nothing was produced
    await store.close()


async def test_only_a_requested_cancel_is_cancelled():
    store = SessionStore(GenerationSettings())  # in memory
    session = store.create()
    running = session.begin_generation("q", "")
    session.on_generation_event(running, Started(1, 64))
    session.on_generation_event(running, TokenText("part"))
    session.on_generation_event(running, Finished(1, "cancelled", 1.0, 1.0))  # a shutdown's drain
    assert session.events[-1]["type"] == "error" and session.events[-1]["code"] == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": "part"}
    running = session.begin_generation("q2", "")
    session.on_generation_event(running, Started(1, 64))
    running.request_cancel()  # the client's cancel
    session.on_generation_event(running, Finished(0, "cancelled", 1.0, 1.0))
    assert session.events[-1]["type"] == "done"
    assert session.events[-1]["finish_reason"] == "cancelled"


async def test_the_events_keep_their_keys_in_wire_order():
    """The web page and old clients read these frames: their keys, in this order."""
    store = SessionStore(GenerationSettings(), SessionsConfig(max_history_messages=2))
    session = store.create()
    generate(session, "q0", ["a0"])
    running = session.begin_generation("q1", "")
    running.dropped_turns, running.requested_max_tokens = 1, 100
    session.on_generation_event(running, Started(3, 64))
    session.on_generation_event(running, TokenText("a1"))
    session.on_generation_event(running, Finished(1, "stop", 1.04, 10.06))
    running = session.begin_generation("q2", "")
    session.on_generation_event(running, Failed(Interrupted("stopped")))
    keys = [list(event) for event in session.events]
    start, token, done = (
        ["type", "request_id", "tokens_in", "max_tokens", "dropped_turns"],
        ["type", "request_id", "data", "seq"],
        ["type", "request_id", "total_tokens", "finish_reason", "ttft_ms", "tokens_per_s"],
    )
    assert keys == [
        [*start, "seq"],
        token,
        [*done, "seq"],
        [*start, "max_tokens_requested", "seq"],
        token,
        [*done, "history_dropped", "seq"],
        ["type", "code", "message", "request_id", "seq"],
    ]
    assert session.events[5]["ttft_ms"] == 1.0 and session.events[5]["tokens_per_s"] == 10.1


async def test_acks_compact_the_log(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    log_path = tmp_path / "sessions" / session.id / "log"
    for i in range(COMPACT_MIN_RECORDS):
        generate(session, f"question {i}", ["answer"])
        session.ack(None)
    expected = comparable(session)
    await store.close()
    records = read_log(log_path.read_bytes(), store.logs.key, session.id).records
    # Rewritten as a snapshot at times, not the ~7 records per turn all appended.
    assert records[0]["kind"] == "snapshot" and records[0]["messages"]
    assert len(records) < 7 * COMPACT_MIN_RECORDS / 2
    store = await open_store(tmp_path)
    assert comparable(store.get(session.id)) == expected
    await store.close()


async def test_a_torn_last_record_is_dropped_at_every_offset(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    generate(session, "hello", ["one", " two"])
    await store.close()
    log_path = tmp_path / "sessions" / session.id / "log"
    data = log_path.read_bytes()
    last = frame_offsets(data)[-1]
    key = store.logs.key
    whole = read_log(data, key, session.id).records
    for cut in range(last, len(data)):
        log_path.write_bytes(data[:cut])
        files = SessionFiles(tmp_path)
        loaded = dict(files.open())
        files.close()
        assert loaded[session.id] == whole[:-1], cut
        assert log_path.stat().st_size == last  # truncated, so that appends follow good records
    # After the truncation the session goes on being written and read back.
    store = await open_store(tmp_path)
    generate(store.get(session.id), "again", ["three"])
    expected = comparable(store.get(session.id))
    await store.close()
    store = await open_store(tmp_path)
    assert comparable(store.get(session.id)) == expected
    await store.close()


async def test_a_changed_log_is_skipped_and_logged(tmp_path: Path, caplog):
    store = await open_store(tmp_path)
    kept, changed = store.create(), store.create()
    generate(changed, "secret question", ["secret", " answer"])
    await store.close()
    path = tmp_path / "sessions" / changed.id / "log"
    data = bytearray(path.read_bytes())
    data[frame_offsets(bytes(data))[1] + 20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt):
        read_log(bytes(data), store.logs.key, changed.id)
    # A log moved into another session's folder does not authenticate either.
    with pytest.raises(LogCorrupt):
        read_log((tmp_path / "sessions" / kept.id / "log").read_bytes(), store.logs.key, changed.id)
    store = await open_store(tmp_path)
    assert [s.id for s in store.list()] == [kept.id]
    assert any(changed.id in r.message and "skipped" in r.message for r in caplog.records)
    assert path.exists()  # left for the operator
    await store.close()


async def test_nothing_of_a_session_is_on_disk_in_plaintext(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    session.set_settings(session.settings.merge({"stop": ["STOPWORD-7d1e"], "seed": 424242}))
    running = session.begin_generation("QUESTION-1f2a about Alice", "SYSTEM-9b3c be brief")
    session.on_generation_event(running, Started(5, 64))
    for piece in ("ANSWER-", "5e6f", " Paris"):
        session.on_generation_event(running, TokenText(piece))
    session.on_generation_event(running, Finished(3, "stop", 1.0, 10.0))
    session.ack(2)
    await store.close()
    files = [p for p in (tmp_path / "sessions").rglob("*") if p.is_file()]
    assert [p.name for p in files if p.name != ".lock"] == ["log"]
    data = b"".join(p.read_bytes() for p in files)
    secrets = ["QUESTION-1f2a", "SYSTEM-9b3c", "ANSWER-", "5e6f", "STOPWORD-7d1e", "424242"]
    # The record's keys and kinds, and the session's own id, are not readable either.
    metadata = ['"kind"', "message", "request_id", "assistant", "settings", "seq", session.id]
    for text in secrets + metadata:
        for encoded in {text.encode(), text.encode("utf-16-le"), base64.b64encode(text.encode())}:
            assert encoded not in data, text
    assert store.logs.key not in data and base64.b64encode(store.logs.key) not in data


async def test_a_reordered_or_removed_record_is_refused(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    generate(session, "hello", ["one", " two", " three"])
    await store.close()
    data = (tmp_path / "sessions" / session.id / "log").read_bytes()
    key = store.logs.key
    starts = frame_offsets(data)
    frames = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]
    assert len(frames) >= 4 and read_log(data, key, session.id).records
    header = data[:HEADER_SIZE]
    swapped = header + b"".join([frames[0], frames[2], frames[1], *frames[3:]])
    removed = header + b"".join([frames[0], *frames[2:]])
    duplicated = header + b"".join([frames[0], frames[0], *frames[1:]])
    for changed in (swapped, removed, duplicated):
        with pytest.raises(LogCorrupt):
            read_log(changed, key, session.id)
    whole = read_log(data, key, session.id).records
    for at in range(HEADER_SIZE, len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x40
        try:
            contents = read_log(bytes(flipped), key, session.id)
        except (LogCorrupt, ValueError):
            continue
        # Only a flip in the last record's length passes, as a torn tail: never as records.
        assert contents.torn and contents.records == whole[: len(contents.records)], at
    # The tail alone (its first records cut) does not authenticate with its new indexes.
    with pytest.raises(LogCorrupt):
        read_log(header + b"".join(frames[1:]), key, session.id)


async def test_a_failed_write_is_repaired_by_a_rewrite(tmp_path: Path, caplog):
    store = await open_store(tmp_path)
    session = store.create()
    folder = tmp_path / "sessions" / session.id
    await eventually((folder / "log").exists, FAST, "the new session's log on disk")
    shutil.rmtree(folder)  # the disk lost it: the next appends fail
    generate(session, "hello", ["one"])
    await eventually(lambda: session.id in store.logs.failed, FAST, "the failed write noticed")
    assert sum("writing its file failed" in r.message for r in caplog.records) == 1
    session.set_settings(session.settings.merge({"top_k": 3}))  # written whole again
    expected = comparable(session)
    await store.close()
    store = await open_store(tmp_path)
    assert comparable(store.get(session.id)) == expected
    await store.close()


def test_the_key_file(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    key = load_key(tmp_path)
    path = tmp_path / "session.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(tmp_path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["session.key"]  # no temporary left
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "session.key").write_bytes(base64.b64encode(b"k" * 32))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert load_key(tmp_path) == b"k" * 32
    (credentials / "session.key").write_text("too short")
    with pytest.raises(ConfigError, match="32 bytes"):
        load_key(tmp_path)


async def test_a_second_store_on_the_same_folder_is_refused(tmp_path: Path):
    store = await open_store(tmp_path)
    with pytest.raises(ConfigError, match="in use by another llmwsd"):
        await open_store(tmp_path)
    await store.close()
    await (await open_store(tmp_path)).close()


async def test_folder_and_file_modes(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    await store.close()
    folder = tmp_path / "sessions" / session.id
    for path, mode in ((tmp_path / "sessions", 0o700), (folder, 0o700), (folder / "log", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) & ~mode == 0, path


async def test_buffer_cap_drops_the_oldest_and_a_late_resume_hears_of_it(tmp_path: Path):
    store = await open_store(tmp_path, max_buffered_events=5)
    session = store.create()
    generate(session, "count", ["1", "2", "3", "4", "5"])  # seqs 1..7: start, 5 tokens, done
    assert [e["seq"] for e in session.events] == [3, 4, 5, 6, 7]
    stream = session.stream_from(1)
    lost = await within(anext(stream), FAST, "events_dropped from stream_from(1)")
    assert lost["type"] == "error" and lost["code"] == "events_dropped"
    assert (lost["first_seq"], lost["last_seq"]) == (2, 2)
    replayed = [await within(anext(stream), FAST, f"buffered event {n}") for n in range(3, 8)]
    assert [e["seq"] for e in replayed] == [3, 4, 5, 6, 7]
    # A client that acknowledged past the dropped ones hears of no loss, from any last_seq.
    assert session.ack(4) == (4, 2)  # part of the buffer: 3 and 4 go, 5..7 stay
    assert [e["seq"] for e in session.events] == [5, 6, 7]
    for last_seq in (None, 1, 2, 4):
        stream = session.stream_from(last_seq)
        first = await within(anext(stream), FAST, f"event 5 from stream_from({last_seq})")
        assert first["seq"] == 5, (last_seq, first)
    assert session.ack(6) == (6, 2) and session.ack(3) == (3, 0)  # an older ack drops nothing
    assert [e["seq"] for e in session.events] == [7]
    await store.close()


async def test_history_cap_drops_the_oldest_exchange(tmp_path: Path):
    store = await open_store(tmp_path, max_history_messages=4)
    session = store.create()
    for i in range(3):
        generate(session, f"q{i}", [f"a{i}"])
    assert [m["content"] for m in session.messages] == ["q1", "a1", "q2", "a2"]
    assert session.events[-1]["history_dropped"] == 1
    await store.close()


async def test_session_cap_replaces_the_longest_idle_or_is_busy(tmp_path: Path):
    store = await open_store(tmp_path, max_sessions=2)
    first, second = store.create(), store.create()
    first.last_active -= 10
    third = store.create()
    assert {s.id for s in store.list()} == {second.id, third.id}
    second.owner = third.owner = object()  # both connected
    with pytest.raises(Busy):
        store.create()
    await store.close()
    assert not (tmp_path / "sessions" / first.id).exists()


class TwoHoursAgo:
    @staticmethod
    def time() -> float:
        return time.time() - 7200


async def test_sessions_that_expired_while_the_daemon_was_down_are_removed(
    tmp_path: Path, monkeypatch
):
    store = await open_store(tmp_path)
    with monkeypatch.context() as m:
        m.setattr("llmwsd.sessions.session.time", TwoHoursAgo)
        old = store.create()
        generate(old, "cut off", ["part"], finish=False)
    recent = store.create()
    await store.close()
    store = await open_store(tmp_path, idle_ttl=3600)
    assert [s.id for s in store.list()] == [recent.id]
    await store.close()
    assert not (tmp_path / "sessions" / old.id).exists()


async def test_no_free_session_slot_is_busy_and_closes_1013(fake_daemon_factory):
    daemon = await fake_daemon_factory(sessions={"max_sessions": 1})
    url = f"ws://127.0.0.1:{daemon.server.port}/"
    async with websockets.connect(url) as first:
        await first.send("{}")
        assert (await recv_json(first))["type"] == "welcome"
        async with websockets.connect(url) as second:
            await second.send("{}")
            error = await recv_json(second)
            assert error["type"] == "error" and error["code"] == "busy"
            await asyncio.wait_for(second.wait_closed(), 10)
            assert second.close_code == 1013
    # Once the first client left, its idle session makes room for a new one.
    await eventually(
        lambda: all(s.owner is None for s in daemon.sessions.list()),
        FAST,
        "the daemon to release the first client's session",
    )
    async with websockets.connect(url) as third:
        await third.send("{}")
        assert (await recv_json(third))["type"] == "welcome"


async def test_sweep_expires_idle_sessions_only(tmp_path: Path):
    store = await open_store(tmp_path, idle_ttl=60)
    idle, connected, fresh = store.create(), store.create(), store.create()
    idle.last_active = connected.last_active = time.time() - 120
    connected.owner = object()
    assert store.sweep() == 1
    assert {s.id for s in store.list()} == {connected.id, fresh.id}
    await store.close()
    assert not (tmp_path / "sessions" / idle.id).exists()


# -- the real daemon -----------------------------------------------------------------------

# Plain greedy: a repetition penalty would keep the model from saying "Alice" again.
GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 16}


async def connect(daemon: RunningDaemon, **hello: Any) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(daemon.url, max_size=None, open_timeout=30)
    await ws.send(json.dumps(hello))
    welcome = await recv_json(ws, 30, "welcome")
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def send(ws: Any, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def ask(ws: Any, user: str, system: str = "", **config: Any) -> list[dict[str, Any]]:
    prompt = {"system": system, "user": user}
    await send(ws, {"type": "inference", "prompt": prompt, "config": {**GREEDY, **config}})
    return await recv_until(ws, {"done", "error"}, timeout=REAL)


async def receive_tokens(ws: Any, count: int) -> list[dict[str, Any]]:
    """Events up to and including the ``count``-th token."""
    events: list[dict[str, Any]] = []
    while sum(e["type"] == "token" for e in events) < count:
        events.append(await recv_json(ws, REAL, f"token {count} of the answer"))
        assert events[-1]["type"] in ("queued", "start", "token"), events[-1]
    return events


def assert_contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def history(ws: Any) -> list[dict[str, str]]:
    await send(ws, {"type": "history"})
    reply = await recv_json(ws, 30, "history")
    assert reply["type"] == "history", reply
    return reply["messages"]


async def test_alice_across_a_reconnect(real_daemon: RunningDaemon):
    ws, welcome = await connect(real_daemon)
    # "Greet me by name" makes the 135M model take the name up; the question is the brief's.
    first = await ask(ws, "My name is Alice. Greet me by name.")
    await ws.close()  # the network goes away…
    session_id = welcome["session_id"]
    ws, welcome2 = await connect(real_daemon, session_id=session_id, last_seq=first[-1]["seq"])
    assert welcome2["resumed"] is True and welcome2["session_id"] == session_id
    events = await ask(ws, "What's my name?")
    assert events[0]["seq"] == first[-1]["seq"] + 1
    assert "Alice" in answer_text(events), answer_text(first) + " / " + answer_text(events)
    await ws.close()


async def test_resume_mid_stream_loses_and_repeats_nothing(real_daemon: RunningDaemon):
    prompt = "Write a short poem about the sea."
    # The uninterrupted run, in a session of its own, after a first one that puts the
    # prompt in the prefix cache: in bf16 a prompt prefilled whole may round differently.
    ws, reference = await connect(real_daemon)
    await ask(ws, prompt)
    await ws.close()
    ws, reference = await connect(real_daemon)
    whole = await ask(ws, prompt)
    assert whole[-1]["type"] == "done" and len(whole) >= 8
    await ws.close()

    ws, welcome = await connect(real_daemon)
    await send(ws, {"type": "inference", "prompt": {"user": prompt}, "config": GREEDY})
    before = await receive_tokens(ws, 5)
    await ws.close()  # mid-stream; the generation goes on
    ws, resumed = await connect(
        real_daemon, session_id=welcome["session_id"], last_seq=before[-1]["seq"]
    )
    assert resumed["resumed"] is True
    after = await recv_until(ws, {"done", "error"}, timeout=REAL)
    await ws.close()
    events = before + after
    assert_contiguous(events)
    assert {e["request_id"] for e in events} == {events[0]["request_id"]}
    assert answer_text(events) == answer_text(whole)

    # Without last_seq: the whole buffer, exactly as it was sent.
    ws, _ = await connect(real_daemon, session_id=reference["session_id"])
    replayed = await recv_until(ws, {"done"}, timeout=30)
    assert replayed == whole
    # ack, then resume: nothing replayed, the conversation kept.
    await send(ws, {"type": "ack", "seq": whole[-1]["seq"]})
    ack = await recv_json(ws, 30, "ack_received")
    assert ack == {"type": "ack_received", "seq": whole[-1]["seq"], "dropped": len(whole)}
    await ws.close()
    ws, _ = await connect(real_daemon, session_id=reference["session_id"], last_seq=0)
    await send(ws, {"type": "ping"})
    assert (await recv_json(ws, 30, "pong")) == {"type": "pong"}  # nothing came before it
    assert await history(ws) == [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer_text(whole)},
    ]
    await ws.close()


@pytest.fixture
def short_ttl_daemon(daemon_factory: Any, tmp_path: Path) -> RunningDaemon:
    """A daemon whose sessions expire after 2 s idle. Expiry needs no model: none is loaded."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    sessions = {"idle_ttl": 2.0, "sweep_interval": 0.5}
    daemon: RunningDaemon = daemon_factory(
        wait=False, models={"dirs": [str(empty)]}, sessions=sessions
    )
    deadline = time.monotonic() + 60
    while not (daemon.folder / "llmwsd.stderr").exists() or "listening" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    return daemon


def tree(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "", None, "x" * 10_000, 7])
async def test_bad_session_ids_never_reach_the_disk(real_daemon: RunningDaemon, bad_id):
    folder = real_daemon.folder
    before = tree(folder)
    ws, welcome = await connect(real_daemon, session_id=bad_id, last_seq=3)
    if bad_id is not None:
        error = await recv_json(ws, 30, "the bad session id's error")
        assert error["type"] == "error" and error["code"] == "bad_request", error
    assert welcome["resumed"] is False
    await send(ws, {"type": "ping"})
    assert (await recv_json(ws, 30, "pong")) == {"type": "pong"}
    await ws.close()
    # Session files are written a moment later (another case's may show up now): only
    # folders named by the server's own UUIDs, and their log, ever appear.
    for path in tree(folder) - before:
        assert path.parts[:2] == ("state", "sessions") and len(path.parts) in (3, 4), path
        assert str(uuid.UUID(path.parts[2])) == path.parts[2], path
        assert len(path.parts) == 3 or path.name in ("log", "log.new"), path


async def test_idle_sessions_expire(short_ttl_daemon: RunningDaemon):
    ws, welcome = await connect(short_ttl_daemon)
    ws_kept, kept = await connect(short_ttl_daemon)
    await ws.close()
    folder = short_ttl_daemon.folder / "state" / "sessions" / welcome["session_id"]
    await eventually(folder.exists, 10, "the session's folder written")
    await eventually(lambda: not folder.exists(), 10, "the idle session's folder swept")
    ws, again = await connect(short_ttl_daemon, session_id=welcome["session_id"])
    assert again["resumed"] is False and again["session_id"] != welcome["session_id"]
    await ws.close()
    # A connected session does not expire, however long it stays silent.
    await send(ws_kept, {"type": "history"})
    assert await recv_json(ws_kept, 30, "history") == {"type": "history", "messages": []}
    await ws_kept.close()
    ws, resumed = await connect(short_ttl_daemon, session_id=kept["session_id"])
    assert resumed["resumed"] is True
    await ws.close()


@pytest.fixture(scope="module")
def killed_and_restarted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """kill -9 a daemon mid-generation, change another session's file, start it again."""
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.fail("the default model is missing: run `make model`")
    daemon = RunningDaemon(tmp_path_factory.mktemp("killed"))
    daemon.start()
    prompt = "Please describe the ocean in detail."

    async def before_the_kill() -> dict[str, Any]:
        ws_other, other = await connect(daemon)
        await ask(ws_other, "Remember the word pineapple.", max_new_tokens=4)
        await ws_other.close()
        ws, welcome = await connect(daemon)
        # Long enough to be cut off: the kill comes right after the 5th token.
        config = {**GREEDY, "max_new_tokens": 64}
        await send(ws, {"type": "inference", "prompt": {"user": prompt}, "config": config})
        received = await receive_tokens(ws, 5)
        return {
            "session_id": welcome["session_id"],
            "other": other["session_id"],
            "received": received,
        }

    try:
        facts = asyncio.run(before_the_kill())
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(30)
        sessions = daemon.folder / "state" / "sessions"
        facts["files"] = {p: p.read_bytes() for p in sessions.rglob("*") if p.is_file()}
        facts["prompt"] = prompt
        changed = sessions / facts["other"] / "log"
        data = bytearray(changed.read_bytes())
        data[len(data) // 2] ^= 0x40
        changed.write_bytes(bytes(data))
        daemon.start()
        facts["daemon"] = daemon
        yield facts
    finally:
        daemon.stop()


async def test_a_generation_cut_off_by_kill_9_ends_interrupted(killed_and_restarted):
    facts, daemon = killed_and_restarted, killed_and_restarted["daemon"]
    ws, welcome = await connect(daemon, session_id=facts["session_id"])
    assert welcome["resumed"] is True
    events = await recv_until(ws, {"error", "done"}, timeout=30)  # replayed from the log
    assert events[-1]["type"] == "error" and events[-1]["code"] == "interrupted"
    assert events[-1]["message"]
    assert {e["request_id"] for e in events} == {facts["received"][0]["request_id"]}
    # What was produced is contiguous; the restart's `interrupted` comes after a gap in seq,
    # past any token the crash may have lost after sending it.
    assert_contiguous(events[:-1])
    assert events[-1]["seq"] > events[-2]["seq"] + 1
    # Tokens are written to the log just behind the stream, so the kill may have lost the
    # last one or two that the client had (the seq gap above covers them); what the log
    # kept is what was sent, the start and the first tokens at least.
    received, kept = facts["received"], events[:-1]
    common = min(len(kept), len(received))
    assert common >= 2 and kept[:common] == received[:common]
    partial = answer_text(events)
    assert partial.startswith(answer_text(received[:common]))
    assert await history(ws) == [
        {"role": "user", "content": facts["prompt"]},
        {"role": "assistant", "content": partial},
    ]
    await ws.close()


def test_session_files_are_not_plaintext(killed_and_restarted):
    files = killed_and_restarted["files"]
    assert files, "the sessions were on disk"
    for data in files.values():
        for secret in (b"ocean", b"pineapple", b"Please", b"request_id", b"token"):
            assert secret not in data


async def test_a_changed_file_is_skipped_with_a_log_line(killed_and_restarted):
    daemon, other = killed_and_restarted["daemon"], killed_and_restarted["other"]
    assert any(other in line and "skipped" in line for line in daemon.log().splitlines())
    ws, welcome = await connect(daemon, session_id=other)
    assert welcome["resumed"] is False
    await send(ws, {"type": "get_status"})
    status = await recv_json(ws, 30, "status")
    assert status["sessions"] == 2  # the cut-off one and this new one
    await ws.close()
    assert os.path.exists(daemon.folder / "state" / "sessions" / other / "log")


async def test_a_last_seq_past_the_end_is_clamped_and_said_in_welcome(fake_daemon):
    ws, welcome = await hello(fake_daemon)
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "a b c"}}))
    events = await recv_until(ws, {"done"}, timeout=FAST)
    await ws.close()
    far = 10**15
    ws, again = await hello(fake_daemon, session_id=welcome["session_id"], last_seq=far)
    assert again["resumed"] is True and again["last_seq"] == events[-1]["seq"]
    assert again["last_seq_clamped"] == far
    # Nothing replayed, and the next answer streams (it used to wait for seq 10**15 + 1).
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": "d e"}}))
    after = await recv_until(ws, {"done"}, timeout=FAST)
    assert after[0]["type"] == "start" and after[0]["seq"] == events[-1]["seq"] + 1
    assert answer_text(after) == "echo: d e"
    # An ack past the end acknowledges the newest event, and says which.
    await ws.send(json.dumps({"type": "ack", "seq": 2**53 - 1}))
    ack = await recv_json(ws, FAST, "ack_received")
    assert ack == {"type": "ack_received", "seq": after[-1]["seq"], "dropped": len(events + after)}
    await ws.close()
    ws, within = await hello(fake_daemon, session_id=welcome["session_id"], last_seq=1)
    assert "last_seq_clamped" not in within
    await ws.close()
