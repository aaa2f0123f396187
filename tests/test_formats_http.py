"""Structured output through the official openai SDK, on the real model and both engines:
chat completions' response_format and the Responses API's text.format."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, RunningDaemon
from tests.test_formats import PERSON


def sdk(daemon: RunningDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http + "/v1", api_key="none", max_retries=0, timeout=240)


def test_chat_completions_response_format(real_daemon: RunningDaemon) -> None:
    client = sdk(real_daemon)
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for temperature in (0, 0.8):
        answer = client.chat.completions.create(
            model=DEFAULT_MODEL.name,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format=schema_format,
            max_tokens=400,
            temperature=temperature,
            seed=3,
        )
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    pieces = []
    for chunk in client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=[{"role": "user", "content": 'Answer as JSON like {"answer": 5}: 2 + 2?'}],
        response_format={"type": "json_object"},
        max_tokens=300,
        stream=True,
    ):
        pieces += [c.delta.content or "" for c in chunk.choices]
    assert isinstance(json.loads("".join(pieces)), dict)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=DEFAULT_MODEL.name,
            messages=[{"role": "user", "content": "hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}},
            },
        )
    assert refused.value.body["param"] == "format"
    again = client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
    )
    assert "Paris" in again.choices[0].message.content


def test_responses_text_format(real_daemon: RunningDaemon) -> None:
    done = sdk(real_daemon).responses.create(
        model=DEFAULT_MODEL.name,
        input="Describe a person as JSON.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
        max_output_tokens=400,
    )
    assert done.status == "completed"
    jsonschema.validate(json.loads(done.output_text), PERSON)
