"""The session log: a session rebuilt from its log is the session that wrote it.

Every change is a record that :meth:`Session.apply` makes, live and on replay
(one code path). Checked across generated sequences of operations, through an
in-memory :class:`SessionLogs` (after every operation) and the encrypted files
(at the end); and logs written before that change (commit 82d2293) still load
to what they loaded to then.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Set
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmwsd.config import SessionsConfig
from llmwsd.engines.interface import Failed, Finished, Started, TokenText
from llmwsd.errors import Busy, Interrupted
from llmwsd.sessions.files import SessionFiles
from llmwsd.sessions.registry import SessionStore
from llmwsd.sessions.session import Session
from llmwsd.sessions.store import Record
from llmwsd.settings import GenerationSettings

FIXTURE = Path(__file__).parent / "data" / "session_logs_82d2293"
# Small caps, so that sequences reach them: the buffer drops events, the history exchanges.
LIMITS = {"max_buffered_events": 6, "max_history_messages": 4}
# What the logs of 82d2293 were written with.
OLD_LIMITS = {"max_buffered_events": 8, "max_history_messages": 4, "idle_ttl": 30 * 86400}


def state_of(session: Session) -> dict[str, Any]:
    """All a session keeps but its times of activity (touches are written once a minute)."""
    running = session.running
    return {
        "token_id": session.token_id,
        "address": session.address,
        "created_at": session.created_at,
        "system": session.system,
        "messages": session.messages,
        "settings": session.settings.to_dict(),
        "events": session.events,
        "next_seq": session.next_seq,
        "requests": session.requests,
        "acked_through": session.acked_through,
        "dropped_through": session.dropped_through,
        "running": None
        if running is None
        else {
            "request_id": running.request_id,
            "user": running.user_text,
            "pieces": running.pieces,
        },
    }


def replayed(store: SessionStore, session_id: str, records: list[Record]) -> Session:
    """The session ``records`` rebuild, as the store's open() does before its restart fixes."""
    session = Session(store, session_id, GenerationSettings())
    for record in records:
        session.apply(record)
    return session


class MemoryLogs:
    """A SessionLogs that keeps each session's records in a list, encoded as they would be."""

    def __init__(self) -> None:
        self.logs: dict[str, list[str]] = {}
        self.failed: Set[str] = frozenset()
        self.location = "memory"

    def records(self, session_id: str) -> list[Record]:
        return [json.loads(r) for r in self.logs[session_id]]

    def load(self) -> list[tuple[str, list[Record]]]:
        return [(session_id, self.records(session_id)) for session_id in self.logs]

    def append(self, session_id: str, record: Record, durable: bool) -> None:
        self.logs[session_id].append(json.dumps(record))

    def rewrite(self, session_id: str, snapshot: Record) -> None:
        self.logs[session_id] = [json.dumps(snapshot)]

    def remove(self, session_id: str) -> None:
        del self.logs[session_id]

    def out_of_room(self) -> bool:
        return False

    def close(self) -> None:
        pass


# -- operations on a session, as the connection and the engine make them ---------------------

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)
generations = st.fixed_dictionaries(
    {
        "user": texts,
        "system": st.sampled_from(["", "be brief", "be verbose"]),
        "queued": st.booleans(),
        "pieces": st.lists(texts, max_size=4),
        # done; cancelled by the client; drained by a shutdown; failed; failed before any
        # event; refused before it started; still running.
        "end": st.sampled_from(
            ["done", "cancelled", "drained", "failed", "failed_early", "refused", "running"]
        ),
    }
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("generate"), generations),
        st.tuples(
            st.just("settings"),
            st.fixed_dictionaries(
                {},
                optional={
                    "temperature": st.floats(0, 2),
                    "top_k": st.integers(0, 100),
                    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
                    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
                },
            ),
        ),
        st.tuples(st.just("ack"), st.one_of(st.none(), st.integers(0, 40))),
        st.tuples(st.just("reset"), st.none()),
        st.tuples(st.just("touch"), st.none()),
        st.tuples(st.just("compact"), st.none()),
        st.tuples(st.just("end_interrupted"), st.none()),
    ),
    max_size=16,
)


def run(store: SessionStore, session: Session, name: str, argument: Any) -> None:
    if name == "generate":
        generate(session, argument)
    elif name == "settings":
        session.set_settings(session.settings.merge(argument))
    elif name == "ack":
        session.ack(argument)
    elif name == "reset":
        session.reset()
    elif name == "touch":
        session._touch_recorded = 0.0  # as if a minute had passed: written down
        session.touch()
    elif name == "compact":
        store._write_snapshot(session)
    elif name == "end_interrupted":
        session.end_interrupted()  # what a restart does with a generation cut off


def generate(session: Session, g: dict[str, Any]) -> None:
    try:
        running = session.begin_generation(g["user"], g["system"])
    except Busy:
        return  # one is still running
    if g["end"] == "refused":
        session.abandon_generation(running)
        return
    if g["end"] == "failed_early":
        session.on_generation_event(running, Failed(Interrupted("the engine failed")))
        return
    if g["queued"]:
        session.append_event({"type": "queued", "request_id": running.request_id, "position": 1})
    session.on_generation_event(running, Started(3, 64))
    for piece in g["pieces"]:
        session.on_generation_event(running, TokenText(piece))
    if g["end"] == "cancelled":
        running.request_cancel()
    if g["end"] in ("done", "cancelled", "drained"):
        reason = "stop" if g["end"] == "done" else "cancelled"
        session.on_generation_event(running, Finished(len(g["pieces"]), reason, 1.0, 2.0))
    elif g["end"] == "failed":
        session.on_generation_event(running, Failed(Interrupted("the engine failed")))


hypothesis_settings = settings(
    max_examples=60,
    deadline=None,
    database=None,  # no .hypothesis folder in the working tree
    suppress_health_check=[HealthCheck.too_slow],
)


@hypothesis_settings
@given(operations)
def test_a_session_replayed_from_its_log_is_the_live_session(steps: list[tuple[str, Any]]):
    logs = MemoryLogs()
    store = SessionStore(GenerationSettings(), SessionsConfig(**LIMITS), logs=logs)
    session = store.create(token_id="t1", address="10.0.0.1")
    for name, argument in steps:
        run(store, session, name, argument)
        again = replayed(store, session.id, logs.records(session.id))
        assert state_of(again) == state_of(session), name


@settings(hypothesis_settings, max_examples=15)
@given(operations)
def test_the_encrypted_files_replay_to_the_live_session(steps: list[tuple[str, Any]]):
    with tempfile.TemporaryDirectory() as folder:
        files = SessionFiles(Path(folder))
        assert files.load() == []
        store = SessionStore(GenerationSettings(), SessionsConfig(**LIMITS), logs=files)
        session = store.create(address="10.0.0.1")
        for name, argument in steps:
            run(store, session, name, argument)
        expected = json.loads(json.dumps(state_of(session)))  # what JSON keeps of it
        files.close()
        files = SessionFiles(Path(folder))
        [(session_id, records)] = files.load()
        files.close()
        assert state_of(replayed(store, session_id, records)) == expected


def test_a_live_touch_and_its_replay_agree_on_the_time():
    logs = MemoryLogs()
    store = SessionStore(GenerationSettings(), logs=logs)
    session = store.create()
    session.last_active -= 7200
    session._touch_recorded = 0.0
    session.touch()
    again = replayed(store, session.id, logs.records(session.id))
    assert again.last_active == session.last_active


# -- logs written by commit 82d2293, before one apply() --------------------------------------


@pytest.fixture
def old_state(tmp_path: Path, monkeypatch) -> tuple[Path, dict[str, Any]]:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE / "state", state)
    (state / "session.key").chmod(0o600)
    expected = json.loads((FIXTURE / "expected.json").read_text())

    class WhenWritten:  # so that the logs have not expired since
        @staticmethod
        def time() -> float:
            return expected["written_at"]

    monkeypatch.setattr("llmwsd.sessions.session.time", WhenWritten)
    monkeypatch.setattr("llmwsd.sessions.registry.time", WhenWritten)
    return state, expected


def test_logs_of_82d2293_replay_record_by_record_as_they_did(old_state):
    state, expected = old_state
    files = SessionFiles(state)
    store = SessionStore(GenerationSettings(), SessionsConfig(**OLD_LIMITS))
    loaded = {i: state_of(replayed(store, i, records)) for i, records in files.open()}
    files.close()
    assert loaded == expected["replayed"]
    assert set(loaded) == set(expected["names"].values())  # the torn one too


async def test_logs_of_82d2293_open_as_they_did(old_state):
    state, expected = old_state
    store = SessionStore(GenerationSettings(), SessionsConfig(**OLD_LIMITS), state)
    await store.open()
    opened = {s.id: state_of(s) for s in store.list()}
    await store.close()
    assert json.loads(json.dumps(opened)) == expected["opened"]
    # Cut off by the stop: ended `interrupted`, their part kept.
    for name in ("c", "d", "e"):
        session = expected["opened"][expected["names"][name]]
        assert session["events"][-1]["code"] == "interrupted", name
        assert session["messages"][-1]["role"] == "assistant", name
