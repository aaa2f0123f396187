"""Write the session logs of tests/data/session_logs_82d2293 (run at commit 82d2293).

    python tests/data/session_logs_82d2293/make_logs.py OUT_FOLDER

writes OUT_FOLDER/state (a state folder: session.key and sessions/<id>/log, one log
with a torn last record) and OUT_FOLDER/expected.json: what that code made of it, each
log replayed record by record ("replayed") and the store opened on it ("opened").
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from llmwsd.config import SessionsConfig
from llmwsd.engines.interface import Failed, Finished, Started, TokenText
from llmwsd.errors import Interrupted
from llmwsd.sessions.files import HEADER_SIZE, RECORD_LENGTH, SessionFiles
from llmwsd.sessions.registry import SessionStore
from llmwsd.sessions.session import Session
from llmwsd.settings import GenerationSettings

LIMITS = {"max_buffered_events": 8, "max_history_messages": 4, "idle_ttl": 30 * 86400}


def state_of(session: Session) -> dict[str, Any]:
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


def generate(session: Session, user: str, pieces: list[str], system: str = "", end: str = "done"):
    running = session.begin_generation(user, system)
    session.on_generation_event(running, Started(len(user.split()), 64))
    for piece in pieces:
        session.on_generation_event(running, TokenText(piece))
    if end == "done":
        session.on_generation_event(running, Finished(len(pieces), "stop", 12.3, 4.5))
    elif end == "failed":
        session.on_generation_event(running, Failed(Interrupted("the engine failed")))
    return running


async def write(state: Path) -> dict[str, str]:
    store = SessionStore(GenerationSettings(), SessionsConfig(**LIMITS), state)
    await store.open()
    names = {}
    # Every kind of record: settings, system, begin, events, messages, acks, reset, touch.
    a = store.create(token_id="t1", address="10.0.0.1")
    a.touch()
    a.set_settings(a.settings.merge({"temperature": 0.2, "stop": ["x"], "seed": 7}))
    generate(a, "My name is Alice", ["Hello", " Alice"], system="be brief")
    generate(a, "q2", ["a2"])
    generate(a, "q3", ["a3"])  # the history cap drops the first exchange
    a.ack(3)
    refused = a.begin_generation("refused", "be verbose")
    a.abandon_generation(refused)  # the system text is put back
    generate(a, "q4", ["part"], end="failed")
    failed_early = a.begin_generation("q5", "")
    a.on_generation_event(failed_early, Failed(Interrupted("failed before it started")))
    running = a.begin_generation("q6", "")
    a.append_event({"type": "queued", "request_id": running.request_id, "position": 1})
    a.on_generation_event(running, Started(1, 64))
    a.on_generation_event(running, TokenText("queued answer"))
    a.on_generation_event(running, Finished(1, "stop", 1.0, 1.0))
    a.ack(None)
    a.reset()
    generate(a, "after the reset", ["fresh"])
    names["a"] = a.id
    # Compacted: enough acknowledged turns for the log to be rewritten as a snapshot.
    b = store.create(address="10.0.0.2")
    for i in range(40):
        generate(b, f"question {i}", [f"answer {i}"])
        b.ack(None)
    generate(b, "the last one", ["kept", " after"])
    names["b"] = b.id
    # Cut off by the stop, mid-answer: ends `interrupted` when opened.
    c = store.create()
    generate(c, "Tell me a story", ["Once", " upon"], end="none")
    names["c"] = c.id
    # Compacted mid-generation, then more tokens, then cut off.
    d = store.create()
    running = generate(d, "Count", ["1", " 2"], end="none")
    store._write_snapshot(d)
    d.on_generation_event(running, TokenText(" 3"))
    names["d"] = d.id
    # Its last record is torn below.
    e = store.create()
    generate(e, "hello", ["one", " two"])
    names["e"] = e.id
    # More events than the buffer holds, none acknowledged.
    f = store.create()
    generate(f, "count to ten", [str(n) for n in range(10)])
    names["f"] = f.id
    await store.close()
    log = state / "sessions" / e.id / "log"
    data = log.read_bytes()
    offset, last = HEADER_SIZE, HEADER_SIZE
    while offset < len(data):
        last = offset
        offset += RECORD_LENGTH.size + RECORD_LENGTH.unpack_from(data, offset)[0]
    log.write_bytes(data[: last + (len(data) - last) // 2])
    return names


async def expected(state: Path, names: dict[str, str]) -> dict[str, Any]:
    replayed = {}
    files = SessionFiles(state)
    store = SessionStore(GenerationSettings(), SessionsConfig(**LIMITS))
    for session_id, records in files.open():
        session = Session(store, session_id, GenerationSettings())
        for record in records:
            session.replay(record)
        replayed[session_id] = state_of(session)
    files.close()
    store = SessionStore(GenerationSettings(), SessionsConfig(**LIMITS), state)
    await store.open()
    opened = {s.id: state_of(s) for s in store.list()}
    await store.close()
    return {"names": names, "written_at": time.time(), "replayed": replayed, "opened": opened}


async def main(out: Path) -> None:
    out.mkdir(parents=True)
    names = await write(out / "state")
    (out / "state" / "sessions" / ".lock").unlink()
    shutil.copytree(out / "state", out / "scratch")
    result = await expected(out / "scratch", names)
    shutil.rmtree(out / "scratch")
    (out / "expected.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
