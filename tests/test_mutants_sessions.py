"""llmwsd.sessions, a session and the registry: what a client is told, what survives a restart.

Written against the mutants `make mutate` found alive (docs/testing.md). The store is
driven directly, as the engine and the connection would; a restart is a second store
opened on the same state folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from llmwsd.config import SessionsConfig
from llmwsd.engines.interface import Failed, Finished, Started, TokenText
from llmwsd.errors import Busy, Interrupted, NotFound
from llmwsd.sessions.registry import SessionStore
from llmwsd.sessions.session import Session, client_of
from llmwsd.settings import GenerationSettings
from tests.conftest import FAST, eventually, within


async def open_store(state_dir: Path, **limits: Any) -> SessionStore:
    store = SessionStore(GenerationSettings(), SessionsConfig(**limits), state_dir)
    await store.open()
    return store


async def restart(store: SessionStore, state_dir: Path, **limits: Any) -> SessionStore:
    await store.close()
    return await open_store(state_dir, **limits)


def generate(session: Session, user: str, pieces: list[str], system: str = "") -> None:
    running = session.begin_generation(user, system)
    session.on_generation_event(running, Started(3, 64))
    for piece in pieces:
        session.on_generation_event(running, TokenText(piece))
    session.on_generation_event(running, Finished(len(pieces), "stop", 12.345, 6.789))


async def first_streamed(session: Session, last_seq: int | None) -> dict[str, Any]:
    return await within(anext(session.stream_from(last_seq)), FAST, f"an event after {last_seq}")


def test_whose_session_it_is():
    assert client_of("t1", "10.0.0.1") == "token t1"
    assert client_of(None, "10.0.0.1") == "address 10.0.0.1"
    assert client_of(None, None) is None


async def test_the_per_client_cap_counts_by_address_without_tokens():
    store = SessionStore(GenerationSettings(), SessionsConfig(max_per_client=1))
    first = store.create(address="10.0.0.1")
    assert first.address == "10.0.0.1" and first.client == "address 10.0.0.1"
    first.owner = object()  # connected: it cannot make room
    with pytest.raises(Busy) as refused:
        store.create(address="10.0.0.1")
    assert refused.value.message == (
        "this client's 1 sessions are all in use (connected or generating); try again later"
    )
    store.create(address="10.0.0.2")  # another client is not held back


async def test_the_session_cap_says_so():
    store = SessionStore(GenerationSettings(), SessionsConfig(max_sessions=1))
    store.create().owner = object()
    with pytest.raises(Busy) as refused:
        store.create()
    assert refused.value.message == (
        "all 1 sessions are in use (connected or generating); try again later"
    )


async def test_a_full_state_folder_refuses_new_sessions(tmp_path: Path, monkeypatch):
    store = await open_store(tmp_path)
    monkeypatch.setattr(store.logs, "out_of_room", lambda: True)
    with pytest.raises(Busy) as refused:
        store.create()
    assert refused.value.message == (
        "the server's state folder is full: no new session can be stored; try again later"
    )
    await store.close()


async def test_dropping_sessions_in_memory_and_unknown_ones():
    store = SessionStore(GenerationSettings())
    session = store.create()
    assert store.drop(session.id) is session
    assert len(store) == 0
    long_id = "x" * 100
    with pytest.raises(NotFound) as missing:
        store.drop(long_id)
    assert missing.value.message == "no session " + "x" * 64
    await store.close()  # never opened: nothing to stop


async def test_close_stops_the_sweeper(tmp_path: Path):
    store = await open_store(tmp_path)
    sweeper = store._sweeper
    await store.close()
    assert sweeper is not None and sweeper.done()


async def test_a_fresh_session_streams_from_seq_1_with_nothing_lost():
    store = SessionStore(GenerationSettings(), SessionsConfig(max_buffered_events=3))
    session = store.create()
    generate(session, "q", ["a"])  # start, token, done: the buffer is exactly full
    assert [e["seq"] for e in session.events] == [1, 2, 3]
    assert (await first_streamed(session, 0))["seq"] == 1


async def test_one_event_over_the_buffer_cap_drops_the_oldest_and_says_which():
    store = SessionStore(GenerationSettings(), SessionsConfig(max_buffered_events=3))
    session = store.create()
    generate(session, "q", ["a", "b"])  # seqs 1..4
    assert [e["seq"] for e in session.events] == [2, 3, 4]
    lost = await first_streamed(session, 0)
    assert lost["code"] == "events_dropped"
    assert (lost["first_seq"], lost["last_seq"]) == (1, 1)
    assert lost["message"] == (
        "events 1 to 1 were dropped before this client received them: a session keeps at "
        "most 3 unacknowledged events, so ack the ones you have received"
    )


async def test_acking_everything_acknowledges_the_newest_seq():
    session = SessionStore(GenerationSettings()).create()
    generate(session, "q", ["a"])
    assert session.ack(None) == (3, 3)
    assert session.events == []


async def test_start_and_done_carry_what_the_client_reads():
    session = SessionStore(GenerationSettings()).create()
    generate(session, "q", ["a"])
    start, _, done = session.events
    assert start == {
        "type": "start",
        "request_id": "r1",
        "tokens_in": 3,
        "max_tokens": 64,
        "dropped_turns": 0,
        "seq": 1,
    }
    assert done == {
        "type": "done",
        "request_id": "r1",
        "total_tokens": 1,
        "finish_reason": "stop",
        "ttft_ms": 12.3,
        "tokens_per_s": 6.8,
        "seq": 3,
    }


async def test_a_second_generation_at_once_is_busy():
    session = SessionStore(GenerationSettings()).create()
    session.begin_generation("q", "")
    with pytest.raises(Busy) as refused:
        session.begin_generation("q2", "")
    assert refused.value.message == (
        "a generation is already running in this session: cancel it or wait"
    )


async def test_a_shutdown_drain_is_an_interruption_with_its_reason():
    session = SessionStore(GenerationSettings()).create()
    running = session.begin_generation("q", "")
    session.on_generation_event(running, Started(1, 64))
    session.on_generation_event(running, Finished(0, "cancelled", 0.0, 0.0))
    assert session.events[-1]["code"] == "interrupted"
    assert session.events[-1]["message"] == (
        "the server stopped before this answer was complete; its part is kept"
    )


async def test_a_refused_request_leaves_the_session_as_it_was_also_after_a_restart(
    tmp_path: Path,
):
    store = await open_store(tmp_path)
    session = store.create()
    generate(session, "q1", ["a1"], system="be brief")
    refused = session.begin_generation("q2", "be verbose")
    session.abandon_generation(refused)
    assert session.system == "be brief" and session.running is None
    generate(session, "q3", ["a3"])
    assert session.events[-1]["request_id"] == "r2"  # the refused one's id is free again
    store = await restart(store, tmp_path)
    restored = store.get(session.id)
    assert restored.history()[0] == {"role": "system", "content": "be brief"}
    generate(restored, "q4", ["a4"])
    assert restored.events[-1]["request_id"] == "r3"
    await store.close()


async def test_a_reset_survives_a_restart(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    generate(session, "q1", ["a1"], system="be brief")
    session.reset()
    assert session.history() == []
    store = await restart(store, tmp_path)
    restored = store.get(session.id)
    assert restored is not None and restored.history() == []
    await store.close()


async def test_who_made_a_session_survives_a_restart_and_a_compaction(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create(token_id="t1", address="10.0.0.1")
    other = store.create(address="10.0.0.2")
    store._write_snapshot(session)
    store = await restart(store, tmp_path)
    restored = store.get(session.id)
    assert (restored.token_id, restored.address) == ("t1", "10.0.0.1")
    assert (store.get(other.id).token_id, store.get(other.id).address) == (None, "10.0.0.2")
    await store.close()


async def test_a_generation_cut_off_after_a_compaction_keeps_its_part(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    running = session.begin_generation("Tell me a story", "")
    session.on_generation_event(running, Started(4, 64))
    session.on_generation_event(running, TokenText("Once"))
    session.on_generation_event(running, TokenText(" upon"))
    store._write_snapshot(session)  # what a compaction writes mid-generation
    store = await restart(store, tmp_path)
    restored = store.get(session.id)
    error = restored.events[-1]
    assert (error["type"], error["code"], error["request_id"]) == ("error", "interrupted", "r1")
    assert error["message"] == (
        "the server restarted while generating this answer; the part produced before is "
        "kept in the conversation"
    )
    assert restored.messages == [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Once upon"},
    ]
    generate(restored, "Go on", ["ok"])
    assert restored.events[-1]["request_id"] == "r2"
    await store.close()


async def test_a_generation_cut_off_before_any_event_leaves_no_trace(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    session.begin_generation("q", "be brief")  # nothing sent to the client yet
    store._write_snapshot(session)
    store = await restart(store, tmp_path)
    assert store.get(session.id).events == []
    await store.close()


async def test_a_failed_generation_is_not_interrupted_again_by_a_restart(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    running = session.begin_generation("q", "")
    session.on_generation_event(running, Started(1, 64))
    session.on_generation_event(running, Failed(Interrupted("the engine failed")))
    store = await restart(store, tmp_path)
    restored = store.get(session.id)
    assert [e["type"] for e in restored.events] == ["start", "error"]
    assert restored.running is None
    await store.close()


async def test_activity_after_the_last_snapshot_counts_after_a_restart(tmp_path: Path):
    store = await open_store(tmp_path, idle_ttl=3600)
    session = store.create()
    session.last_active -= 7200  # idle for two hours, as its snapshot says
    store._write_snapshot(session)
    generate(session, "q", ["a"])  # then active again: these records carry the time
    store = await restart(store, tmp_path, idle_ttl=3600)
    restored = store.get(session.id)
    assert restored is not None  # not expired
    assert restored.last_active >= time.time() - 60
    await store.close()


async def test_the_operator_s_summary_of_a_session():
    store = SessionStore(GenerationSettings())
    session = store.create()
    generate(session, "q", ["a"])
    session.created_at -= 30.26
    session.last_active -= 5.74
    session.owner = object()
    summary = session.summary()
    assert summary["id"] == session.id
    assert (summary["age_s"], summary["idle_s"]) == (30.3, 5.7)  # tenths of seconds
    assert isinstance(summary["age_s"], float) and isinstance(summary["idle_s"], float)
    assert (summary["messages"], summary["buffered_events"]) == (2, 3)
    assert (summary["connected"], summary["generating"]) == (True, False)
    session.owner = None
    session.begin_generation("q2", "")
    assert session.summary()["connected"] is False and session.summary()["generating"] is True
    assert sorted(summary) == sorted(
        ["id", "age_s", "idle_s", "messages", "buffered_events", "connected", "generating"]
    )


async def test_a_refused_first_request_leaves_r1_free():
    session = SessionStore(GenerationSettings()).create()
    session.abandon_generation(session.begin_generation("q", ""))
    generate(session, "q", ["a"])
    generate(session, "q", ["b"])
    session.abandon_generation(session.begin_generation("q", ""))
    generate(session, "q", ["c"])
    assert [e["request_id"] for e in session.events if e["type"] == "done"] == ["r1", "r2", "r3"]


async def test_a_generation_cut_off_keeps_the_question_too(tmp_path: Path):
    store = await open_store(tmp_path)
    session = store.create()
    running = session.begin_generation("Tell me a story", "")
    session.on_generation_event(running, Started(4, 64))
    session.on_generation_event(running, TokenText("Once"))
    store = await restart(store, tmp_path)
    assert store.get(session.id).messages == [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Once"},
    ]
    await store.close()


async def test_a_session_whose_log_does_not_replay_costs_only_itself(tmp_path: Path):
    store = await open_store(tmp_path)
    sessions = [store.create() for _ in range(3)]
    broken = min(sessions, key=lambda s: s.id)  # the first one loaded
    store.record(broken, {"kind": "from a newer version"})
    store = await restart(store, tmp_path)
    assert {s.id for s in store.list()} == {s.id for s in sessions} - {broken.id}
    await store.close()


async def test_a_sweep_at_the_session_cap_drops_nothing():
    store = SessionStore(GenerationSettings(), SessionsConfig(max_sessions=2))
    kept = {store.create().id, store.create().id}
    assert store.sweep() == 0
    assert {s.id for s in store.list()} == kept


async def test_the_sweeper_expires_idle_sessions_as_it_goes(tmp_path: Path):
    store = await open_store(tmp_path, idle_ttl=0.2, sweep_interval=0.05)
    session = store.create()
    await eventually(lambda: store.get(session.id) is None, FAST, "the sweeper to expire it")
    await store.close()
