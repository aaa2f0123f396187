"""The HTTP APIs on the real default model, on both engines, through the official SDKs.

What the model says is checked only where it is sure (greedy: France → Paris); the rest
checks what the daemon gave the model and counted (usage against the tokenizer).
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from llmwsd.auth import TokenStore
from tests.conftest import DEFAULT_MODEL, ENGINES, RunningDaemon, engine_sections
from tests.test_admin import ctl_json

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a cat who sails the sea."}]


def sdk(daemon: RunningDaemon, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def template_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return len(encoded["input_ids"])


def test_models_and_chat_completions(real_daemon: RunningDaemon, tokenizer: Any) -> None:
    client = sdk(real_daemon)
    listed = {m.id: m for m in client.models.list().data}
    assert listed[DEFAULT_MODEL.name].model_extra["loaded"] is True
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL.name, messages=FRANCE, temperature=0, max_tokens=24
    )
    answer = whole.choices[0].message.content
    assert "Paris" in answer
    assert whole.usage.prompt_tokens == template_length(tokenizer, FRANCE)
    assert whole.usage.completion_tokens >= len(tokenizer(answer)["input_ids"]) - 1
    pieces, usage = [], None
    for chunk in client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        pieces += [c.delta.content or "" for c in chunk.choices]
    assert "".join(pieces) == answer
    assert usage == whole.usage


def test_completions_take_the_prompt_as_it_is(real_daemon: RunningDaemon, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    done = sdk(real_daemon).completions.create(
        model=DEFAULT_MODEL.name, prompt=prompt, max_tokens=5, temperature=0
    )
    assert done.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in sdk(real_daemon).completions.create(
            model=DEFAULT_MODEL.name, prompt=prompt, max_tokens=5, temperature=0, stream=True
        )
    )
    assert streamed == done.choices[0].text


def test_a_prompt_over_the_context_says_both_numbers(real_daemon: RunningDaemon) -> None:
    max_context = ctl_json(real_daemon.admin_socket, "status")["max_context"]
    words = [{"role": "user", "content": "word " * (max_context + 100)}]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(real_daemon).chat.completions.create(model=DEFAULT_MODEL.name, messages=words)
    error = refused.value.body
    assert error["code"] == "context_length_exceeded"
    numbers = [int(n) for n in re.findall(r"\d+", error["message"])]
    assert max_context in numbers
    assert any(n > max_context + 100 for n in numbers), error  # the prompt's tokens


# This SDK has no sampling arguments; the API takes temperature (0 to 1) all the same.
GREEDY = {"temperature": 0}


def test_anthropic_messages(real_daemon: RunningDaemon) -> None:
    client = anthropic.Anthropic(base_url=real_daemon.http, api_key="none", max_retries=0)
    message = client.messages.create(
        model=DEFAULT_MODEL.name, max_tokens=24, messages=FRANCE, extra_body=GREEDY
    )
    assert "Paris" in message.content[0].text
    with client.messages.stream(
        model=DEFAULT_MODEL.name, max_tokens=24, messages=FRANCE, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert final.usage.output_tokens == message.usage.output_tokens


def test_a_client_that_hangs_up_cancels_its_generation(real_daemon: RunningDaemon) -> None:
    body = json.dumps(
        {"messages": STORY, "stream": True, "max_tokens": 2000, "min_tokens": 2000}
    ).encode()
    with socket.create_connection(("127.0.0.1", real_daemon.port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:  # it is generating
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        assert ctl_json(real_daemon.admin_socket, "status")["active"] == 1
    # hung up mid-stream
    deadline = time.monotonic() + 60
    while ctl_json(real_daemon.admin_socket, "status")["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ctl_json(real_daemon.admin_socket, "status")["active"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_background_response_resumes_exactly_also_after_a_restart(
    engine: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    _, token = TokenStore(tokens).add("reader")
    sections = engine_sections(engine)
    daemon = RunningDaemon(tmp_path, api={"tokens_file": str(tokens)}, **sections)
    daemon.start(timeout=300)
    try:
        with pytest.raises(openai.AuthenticationError):
            sdk(daemon, "llmws_wrong").models.list()
        client = sdk(daemon, token)
        created = client.responses.create(
            model=DEFAULT_MODEL.name,
            input=STORY,
            background=True,
            max_output_tokens=60,
            temperature=0,
        )
        seen = []
        with client.responses.retrieve(created.id, stream=True) as stream:
            for event in stream:
                seen.append(event)
                if len(seen) == 8:
                    break  # the connection is cut mid-answer
        cut = seen[-1].sequence_number
        rest = list(client.responses.retrieve(created.id, stream=True, starting_after=cut))
        assert rest[0].sequence_number == cut + 1
        assert rest[-1].type in ("response.completed", "response.incomplete")
        deltas = [e.delta for e in seen + rest if e.type == "response.output_text.delta"]
        done = client.responses.retrieve(created.id)
        assert "".join(deltas) == done.output_text and done.usage.output_tokens == 60
        daemon.stop()
        daemon.start(timeout=300)
        client = sdk(daemon, token)
        again = client.responses.retrieve(created.id)
        assert again.output_text == done.output_text and again.status == done.status
        replay = list(client.responses.retrieve(created.id, stream=True, starting_after=cut))
        assert [(e.type, e.sequence_number) for e in replay] == [
            (e.type, e.sequence_number) for e in rest
        ]
        follow = client.responses.create(
            model=DEFAULT_MODEL.name,
            input="What is the capital of France?",
            previous_response_id=created.id,
            max_output_tokens=8,
        )
        assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > 60
    finally:
        daemon.stop()
