"""Answers in a format (JSON schema, JSON, regex, choice) on the real model, both engines,
over the WebSocket API; the HTTP APIs' response_format and tools are in test_tools.py."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import pytest
import websockets

from tests.conftest import REAL, RunningDaemon, recv_json, recv_until

# Bounded strings and arrays: a sampled answer must end within its token budget.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city"],
        },
    },
    "required": ["name", "age", "pets", "address"],
}

SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


async def connect(daemon: RunningDaemon) -> tuple[websockets.ClientConnection, dict[str, Any]]:
    ws = await websockets.connect(daemon.url, max_size=None)
    await ws.send(json.dumps({}))
    return ws, await recv_json(ws, what="welcome")


async def answer(ws: websockets.ClientConnection, user: str, **config: Any) -> tuple[str, dict]:
    await ws.send(json.dumps({"type": "inference", "prompt": {"user": user}, "config": config}))
    events = await recv_until(ws, {"done", "error"}, timeout=REAL)
    assert events[-1]["type"] == "done", events[-1]
    return "".join(e["data"] for e in events if e["type"] == "token"), events[-1]


@pytest.mark.parametrize("settings", [{}, {**SAMPLED, "seed": 1}, {**SAMPLED, "seed": 2}])
async def test_a_json_schema_answer_always_validates(
    real_daemon: RunningDaemon, settings: dict[str, Any]
) -> None:
    ws, welcome = await connect(real_daemon)
    assert set(welcome["capabilities"]["formats"]) == {"json_schema", "json", "regex", "choice"}
    fmt = {"type": "json_schema", "schema": PERSON}
    text, done = await answer(
        ws, "Describe a person as JSON.", max_new_tokens=400, format=fmt, **settings
    )
    assert done["finish_reason"] == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    await ws.close()


async def test_regex_choice_and_any_json(real_daemon: RunningDaemon) -> None:
    ws, _ = await connect(real_daemon)
    date, _ = await answer(
        ws,
        "When did the Berlin wall fall?",
        format={"type": "regex", "pattern": r"\d{4}-\d{2}-\d{2}"},
    )
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date)
    # `format` may also stand beside the prompt, for this answer only.
    await ws.send(
        json.dumps(
            {
                "type": "inference",
                "prompt": {"user": "Is the sea salty?"},
                "format": {"type": "choice", "choices": ["yes", "no", "maybe so"]},
                "config": SAMPLED,
            }
        )
    )
    events = await recv_until(ws, {"done"}, timeout=REAL)
    assert "".join(e["data"] for e in events if e["type"] == "token") in ("yes", "no", "maybe so")
    anything, done = await answer(
        ws,
        'Answer with a JSON object like {"answer": 5}: what is 2 + 2?',
        max_new_tokens=300,
        format={"type": "json"},
    )
    assert done["finish_reason"] == "stop", anything
    assert isinstance(json.loads(anything), dict)
    # The session's settings did not keep any of them.
    free, _ = await answer(ws, "What is the capital of France?")
    assert "Paris" in free
    await ws.close()


async def test_a_format_that_cannot_be_enforced_is_refused_before_any_token(
    real_daemon: RunningDaemon,
) -> None:
    ws, _ = await connect(real_daemon)
    for fmt, words in (
        ({"type": "json_schema", "schema": {"type": "object", "properties": 5}}, "properties"),
        ({"type": "regex", "pattern": "(unclosed"}, "parenthesis"),
        ({"type": "xml"}, "format must be"),
        ({"type": "choice", "choices": []}, "choices"),
    ):
        await ws.send(
            json.dumps({"type": "inference", "prompt": {"user": "hi"}, "config": {"format": fmt}})
        )
        error = await recv_json(ws, timeout=REAL)
        assert error["type"] == "error" and error["code"] == "bad_request", error
        assert words in error["message"], error
    # The connection and the session are as they were: the next request works.
    text, _ = await answer(ws, "What is the capital of France?")
    assert "Paris" in text
    await ws.send(json.dumps({"type": "history"}))
    history = await recv_json(ws)
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
    await ws.close()


async def test_eight_at_once_half_of_them_constrained(real_daemon: RunningDaemon) -> None:
    """All right together (the transformers engine's free rows are also checked to answer as
    they do alone, exactly, in test_engine.py's float32 batch)."""
    date = {"type": "regex", "pattern": r"\d{4}-\d{2}-\d{2}"}
    person = {"type": "json_schema", "schema": PERSON}
    asks = [
        ("Describe a person as JSON.", {"format": person, "max_new_tokens": 400}),
        ("When did the Berlin wall fall?", {"format": date}),
        ("Is the sea salty?", {"format": {"type": "choice", "choices": ["yes", "no"]}}),
        ("Describe a cat as JSON.", {"format": person, "max_new_tokens": 400, **SAMPLED}),
        ("What is the capital of France?", {}),
        ("Name a color.", {}),
        ("Write a haiku about the sea.", SAMPLED),
        ("Who wrote Hamlet?", {}),
    ]
    sockets = [(await connect(real_daemon))[0] for _ in asks]
    results = await asyncio.gather(
        *(answer(ws, user, **config) for ws, (user, config) in zip(sockets, asks, strict=True))
    )
    texts = [text for text, _ in results]
    jsonschema.validate(json.loads(texts[0]), PERSON)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", texts[1])
    assert texts[2] in ("yes", "no")
    jsonschema.validate(json.loads(texts[3]), PERSON)
    assert "Paris" in texts[4] and all(texts[5:])
    for ws in sockets:
        await ws.close()
