"""Tool calls on the OpenAI and Anthropic HTTP APIs (docs/http-api.md#tools).

On the fake engine (it echoes and ignores formats; a test gives it the answer it needs):
the shapes, the errors, the streams' deltas, what reaches the engine. On the real model,
both engines, through the official SDKs: forced calls are valid calls whatever the tiny
model thinks, streamed too, and a tool's result goes back into the conversation.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import aiohttp
import anthropic
import jsonschema
import openai
import pytest

from llmwsd.daemon import Daemon
from llmwsd.engines.chat_template import TOOLS_INSTRUCTION, plain_messages, template_ids
from llmwsd.frontends.http.tools import Tool, ToolUse, call_schema, could_be_call, parse_call
from tests.conftest import DEFAULT_MODEL, FAST, REAL, RunningDaemon

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Adds two numbers", "parameters": ADD_PARAMETERS},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": "The weather now in a city",
    "input_schema": WEATHER_PARAMETERS,
}


# -- the shared logic -----------------------------------------------------------------------


def test_a_call_is_read_from_the_answer_or_it_is_text() -> None:
    names = {"get_weather"}
    call = parse_call(CALL_TEXT, names)
    assert call is not None and call.arguments == {"city": "Paris", "unit": "celsius"}
    for wrapped in (f"```json\n{CALL_TEXT}\n```", f"<tool_call>\n{CALL_TEXT}\n</tool_call>"):
        assert parse_call(wrapped, names) == call
    as_text = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'
    assert parse_call(as_text, names).arguments == {"city": "Rome"}  # type: ignore[union-attr]
    assert parse_call('{"name": "get_weather", "parameters": {}}', names) is not None
    for text in (
        "It is sunny in Paris.",
        '{"name": "other", "arguments": {}}',
        '{"name": "get_weather", "arguments": [1]}',
        '{"name": "get_weather", "arguments": {}, "more": 1}',
        '{"name": "get_weather", "arguments": {',
        "[1, 2]",
    ):
        assert parse_call(text, names) is None, text
    assert all(could_be_call(t) for t in ("", "  ", "{", ' {"na', "`", "``` json", "<tool"))
    assert not any(could_be_call(t) for t in ("It", " The {", "<b>"))


def test_the_format_that_forces_a_call() -> None:
    weather = Tool("get_weather", "", WEATHER_PARAMETERS)
    unit = {"enum": ["celsius", "fahrenheit"]}
    defined = Tool(
        "plan",
        "",
        {"type": "object", "properties": {"u": {"$ref": "#/$defs/U"}}, "$defs": {"U": unit}},
    )
    one = call_schema([weather])
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == WEATHER_PARAMETERS
    both = call_schema([weather, defined])
    assert [b["properties"]["name"]["const"] for b in both["anyOf"]] == ["get_weather", "plan"]
    assert both["$defs"] == {"1_U": unit}
    assert both["anyOf"][1]["properties"]["arguments"]["properties"]["u"] == {"$ref": "#/$defs/1_U"}
    jsonschema.validate({"name": "plan", "arguments": {"u": "celsius"}}, both)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "plan", "arguments": {"u": "kelvin"}}, both)
    use = ToolUse((weather, defined), "named", "plan")
    assert use.format() == {"type": "json_schema", "schema": call_schema([defined])}
    assert ToolUse((weather,), "auto").format() is None
    assert ToolUse((weather,), "none").rendered() is None


def test_tools_render_in_one_place_with_the_template_or_the_fallback() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)  # its template has no tools
    turns: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_2", "name": "get_weather"},
    ]
    plain = plain_messages(turns, [WEATHER])
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.\n\nYou can call these functions")
    assert json.dumps(WEATHER_PARAMETERS) in plain[0]["content"]
    assert json.loads(plain[2]["content"]) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert plain[3]["content"] == "Result of get_weather: 18 C\nResult of get_weather: sunny"
    assert template_ids(tokenizer, turns, [WEATHER]) == template_ids(tokenizer, plain)
    assert "To call one, answer with only a JSON object" in TOOLS_INSTRUCTION

    class ToolTemplate:  # a template that renders tools gets them, and the calls as they are
        chat_template = "{% for tool in tools %}...{% endfor %}"
        seen: ClassVar[dict[str, Any]] = {}

        def apply_chat_template(self, messages: Any, **kwargs: Any) -> dict[str, list[int]]:
            self.seen.update(messages=messages, **kwargs)
            return {"input_ids": [1, 2]}

    native = ToolTemplate()
    assert template_ids(native, turns, [WEATHER]) == [1, 2]
    assert native.seen["tools"] == [WEATHER] and native.seen["messages"] == turns


# -- on the fake engine ---------------------------------------------------------------------


def base(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.server.port}"


def fake_sdk(daemon: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base(daemon) + "/v1", api_key="none", max_retries=0, timeout=FAST
    )


def answers(daemon: Daemon, text: str) -> None:
    """Make the fake engine answer ``text``, a few characters a token."""
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    daemon.slot.engine.answer = lambda request: pieces  # type: ignore[union-attr]


async def test_an_openai_tool_call_whole_and_streamed(fake_daemon: Daemon) -> None:
    client = fake_sdk(fake_daemon)
    answers(fake_daemon, " " + CALL_TEXT)
    whole = await client.chat.completions.create(model="fake-model", messages=ASK, tools=[WEATHER])
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    request = fake_daemon.slot.engine.submitted[-1]  # type: ignore[union-attr]
    assert request.tools == [WEATHER] and request.settings.format is None  # auto

    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="fake-model", messages=ASK, tools=[WEATHER], stream=True
        )
    ]
    deltas = [c.choices[0].delta for c in chunks]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    assert len(calls) > 2 and all(c.index == 0 and c.id is None for c in calls[1:])
    arguments = "".join(c.function.arguments for c in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.content for d in deltas)


async def test_forced_calls_are_the_answers_format(fake_daemon: Daemon) -> None:
    client = fake_sdk(fake_daemon)
    engine = fake_daemon.slot.engine
    answers(fake_daemon, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    for choice, names in (
        ("required", ["get_weather", "add"]),
        ({"type": "function", "function": {"name": "add"}}, ["add"]),
    ):
        whole = await client.chat.completions.create(
            model="fake-model", messages=ASK, tools=[WEATHER, ADD], tool_choice=choice
        )
        assert whole.choices[0].message.tool_calls[0].function.name == "add"  # type: ignore[index]
        fmt = engine.submitted[-1].settings.format  # type: ignore[union-attr]
        schema = json.loads(fmt.schema)
        branches = schema.get("anyOf", [schema])
        assert [b["properties"]["name"]["const"] for b in branches] == names
    # none: the tools are not rendered and the answer is text
    answers(fake_daemon, CALL_TEXT)
    whole = await client.chat.completions.create(
        model="fake-model", messages=ASK, tools=[WEATHER], tool_choice="none"
    )
    assert whole.choices[0].message.content == CALL_TEXT
    assert whole.choices[0].finish_reason == "stop"
    assert engine.submitted[-1].tools is None  # type: ignore[union-attr]


async def test_a_text_answer_with_tools_streams_as_text(fake_daemon: Daemon) -> None:
    client = fake_sdk(fake_daemon)
    whole = await client.chat.completions.create(model="fake-model", messages=ASK, tools=[WEATHER])
    assert whole.choices[0].message.content == "echo: What is the weather in Paris?"
    assert whole.choices[0].finish_reason == "stop" and not whole.choices[0].message.tool_calls
    stream = await client.chat.completions.create(
        model="fake-model", messages=ASK, tools=[WEATHER], stream=True
    )
    pieces = [c.choices[0].delta.content or "" async for c in stream]
    assert pieces[1] == "echo:"  # passed on at once, not held
    assert "".join(pieces) == "echo: What is the weather in Paris?"
    # An answer that looks like a call and is none is text too, held until its end.
    answers(fake_daemon, '{"weather": "sunny"}')
    stream = await client.chat.completions.create(
        model="fake-model", messages=ASK, tools=[WEATHER], stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == '{"weather": "sunny"}'
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_the_results_go_back_into_the_conversation(fake_daemon: Daemon) -> None:
    client = fake_sdk(fake_daemon)
    arguments = '{"city": "Paris", "unit": "celsius"}'
    whole = await client.chat.completions.create(
        model="fake-model",
        tools=[WEATHER],
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_7",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_7", "content": "18 degrees"},
        ],
    )
    assert whole.choices[0].message.content == "echo: 18 degrees"
    turns = fake_daemon.slot.engine.submitted[-1].messages  # type: ignore[union-attr]
    assert turns[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris", "unit": "celsius"},
    }
    assert turns[2] == {
        "role": "tool",
        "content": "18 degrees",
        "tool_call_id": "call_7",
        "name": "get_weather",
    }


async def test_anthropic_tool_use_whole_and_streamed(fake_daemon: Daemon) -> None:
    client = anthropic.AsyncAnthropic(base_url=base(fake_daemon), api_key="none", max_retries=0)
    answers(fake_daemon, CALL_TEXT)
    message = await client.messages.create(
        model="fake-model", max_tokens=50, messages=ASK, tools=[ANTHROPIC_WEATHER]
    )
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather" and block.input == {"city": "Paris", "unit": "celsius"}
    request = fake_daemon.slot.engine.submitted[-1]  # type: ignore[union-attr]
    assert request.tools == [WEATHER] and request.settings.format is None

    events = []
    async with client.messages.stream(
        model="fake-model",
        max_tokens=50,
        messages=ASK,
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "any"},
    ) as stream:
        async for event in stream:
            events.append(event)
        final = await stream.get_final_message()
    kinds = [e.type for e in events if e.type != "input_json"]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert events[1].content_block.type == "tool_use"  # type: ignore[union-attr]
    partial = [e.delta.partial_json for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert len(partial) > 1 and json.loads("".join(partial)) == block.input
    assert "content_block_stop" in kinds and final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == block.input  # type: ignore[union-attr]
    fmt = fake_daemon.slot.engine.submitted[-1].settings.format  # type: ignore[union-attr]
    assert json.loads(fmt.schema)["properties"]["name"] == {"const": "get_weather"}

    # The call and its result go back: a tool_use block, a tool_result block.
    answers(fake_daemon, "It is mild.")
    reply = await client.messages.create(
        model="fake-model",
        max_tokens=50,
        tools=[ANTHROPIC_WEATHER],
        messages=[
            *ASK,
            {"role": "assistant", "content": [block.model_dump()]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": block.id, "content": "18 degrees"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
    )
    assert reply.content[0].text == "It is mild." and reply.stop_reason == "end_turn"  # type: ignore[union-attr]
    turns = fake_daemon.slot.engine.submitted[-1].messages  # type: ignore[union-attr]
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "user"]
    assert turns[1]["tool_calls"][0]["function"]["arguments"] == block.input
    assert turns[2]["name"] == "get_weather" and turns[2]["content"] == "18 degrees"
    assert turns[3]["content"] == "And tomorrow?"


async def test_malformed_tools_are_refused_by_name(fake_daemon: Daemon) -> None:
    chat = base(fake_daemon) + "/v1/chat/completions"
    messages_url = base(fake_daemon) + "/v1/messages"
    weather_call = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "x", "arguments": "[1]"}}
        ],
    }
    string_tool = {"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}
    async with aiohttp.ClientSession() as http:
        for body, words in (
            ({"tools": [string_tool]}, "tools[0] (s): its parameters must be"),
            (
                {"tools": [{"type": "function", "function": {"name": "a b"}}]},
                "tools.0.function.name",
            ),
            ({"tools": [{"type": "code", "function": {"name": "a"}}]}, "tools.0.type"),
            ({"tools": [WEATHER, WEATHER]}, "two tools are named 'get_weather'"),
            ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
            ({"tool_choice": "required"}, "'required' needs tools"),
            (
                {
                    "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "x"}},
                },
                "no tool named 'x'",
            ),
            (
                {
                    "tools": [WEATHER],
                    "tool_choice": "required",
                    "response_format": {"type": "json_object"},
                },
                "cannot both be enforced",
            ),
            ({"messages": [*ASK, {"role": "tool", "content": "18"}]}, "tool_call_id"),
            ({"messages": [*ASK, weather_call]}, "not a JSON object"),
            ({"functions": [{"name": "f"}]}, "functions"),
        ):
            async with http.post(chat, json={"messages": ASK, **body}) as r:
                answer = await r.json()
                assert r.status == 400, (body, answer)
                assert words in answer["error"]["message"], answer
        base_message = {"max_tokens": 10, "messages": ASK}
        for body, words in (
            ({"tools": [{"name": "w", "input_schema": {"type": "array"}}]}, "tools[0] (w)"),
            (
                {
                    "tools": [
                        {"type": "web_search_20250305", "name": "web_search", "input_schema": {}}
                    ]
                },
                "server tools",
            ),
            ({"tools": [ANTHROPIC_WEATHER], "tool_choice": {"type": "tool"}}, "names the tool"),
            ({"tool_choice": {"type": "any"}}, "needs tools"),
            (
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "w"}]}
                    ]
                },
                "not the user's",
            ),
        ):
            async with http.post(messages_url, json={**base_message, **body}) as r:
                answer = await r.json()
                assert r.status == 400, (body, answer)
                assert answer["type"] == "error" and words in answer["error"]["message"], answer
        assert fake_daemon.slot.engine.submitted == []  # type: ignore[union-attr]
        async with http.post(chat, json={"messages": ASK, "tools": [WEATHER]}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]


# -- on the real model, both engines --------------------------------------------------------


def sdk(daemon: RunningDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http + "/v1", api_key="none", max_retries=0, timeout=REAL)


def test_a_required_call_is_valid_whole_streamed_and_answered(real_daemon: RunningDaemon) -> None:
    from transformers import AutoTokenizer

    client = sdk(real_daemon)
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=100,
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)

    streamed = client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        stream=True,
        max_tokens=100,
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(
        json.loads("".join(c.function.arguments or "" for c in calls)), WEATHER_PARAMETERS
    )

    result = '{"temperature": 18, "unit": "celsius"}'
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    second = client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=turns,
        tools=[WEATHER],
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type]
    )
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    # The daemon rendered what chat_template renders, on either engine.
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    rendered = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.loads(call.function.arguments),
                    },
                }
            ],
        },
        {"role": "tool", "content": result, "tool_call_id": call.id, "name": "get_weather"},
    ]
    assert second.usage is not None
    assert second.usage.prompt_tokens == len(template_ids(tokenizer, rendered, [WEATHER]))


def test_a_named_call_and_a_malformed_tool(real_daemon: RunningDaemon) -> None:
    client = sdk(real_daemon)
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL.name,
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0,
        max_tokens=60,
    )
    [call] = whole.choices[0].message.tool_calls or []
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD_PARAMETERS)
    broken = {
        "type": "function",
        "function": {"name": "broken", "parameters": {"type": "object", "properties": 5}},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=DEFAULT_MODEL.name, messages=ASK, tools=[WEATHER, broken], max_tokens=5
        )
    assert "tools[1] (broken)" in refused.value.body["message"]  # type: ignore[index]
    again = client.chat.completions.create(
        model=DEFAULT_MODEL.name, messages=ASK, tools=[WEATHER], max_tokens=5
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_anthropic_any_tool_is_a_valid_tool_use(real_daemon: RunningDaemon) -> None:
    client = anthropic.Anthropic(base_url=real_daemon.http, api_key="none", max_retries=0)
    asked: dict[str, Any] = {
        "model": DEFAULT_MODEL.name,
        "max_tokens": 100,
        "messages": ASK,
        "tools": [ANTHROPIC_WEATHER],
        "tool_choice": {"type": "any"},
        "extra_body": {"temperature": 0},
    }
    message = client.messages.create(**asked)
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.name == "get_weather"
    jsonschema.validate(block.input, WEATHER_PARAMETERS)
    with client.messages.stream(**asked) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].type == "tool_use"
    assert final.content[0].input == block.input  # greedy: the same call  # type: ignore[union-attr]
