"""Tool calls on the HTTP APIs: a request's tools, the format that forces a call, reading one.

What OpenAI's chat completions and Anthropic's messages share (docs/http-api.md#tools).
The tools are rendered into the prompt by the chat template, on either engine
(llmwsd.engines.chat_template): here they are OpenAI's function tools
(:meth:`ToolUse.rendered`), and the conversation's calls and results the template's
``tool_calls`` and ``tool`` turns. A call the client forces (OpenAI's ``required`` or a
named function, Anthropic's ``any`` or ``tool``) is the answer's format: a JSON schema of
``{"name": ..., "arguments": ...}`` over the tools, enforced token by token like any
format (:meth:`ToolUse.format`). Otherwise (``auto``) the answer is a call when it is
such an object naming a tool (:func:`parse_call`), and text when it is not.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmwsd.errors import BadRequest, Unsupported
from llmwsd.frontends.http.generation import text_of
from llmwsd.protocol.http_api import (
    AnthropicMessage,
    ChatCompletionRequest,
    ChatMessage,
    MessagesRequest,
)
from llmwsd.settings import OutputFormat

if TYPE_CHECKING:
    from llmwsd.service.services import Services

# A function without parameters takes no arguments.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

# Where a schema's own definitions are, and what a reference to one starts with.
DEFINITIONS = {"$defs": "#/$defs/", "definitions": "#/definitions/"}

# The pieces a streamed call's arguments go out in (OpenAI's and Anthropic's deltas).
ARGUMENT_PIECE = 24

# What an answer that is a call may be wrapped in: a code fence, a template's tags.
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
TAGS = re.compile(r"^<tool_call>\s*(.*?)\s*(?:</tool_call>)?$", re.DOTALL)
CALL_STARTS = ("{", "```", "<tool_call>")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def rendered(self) -> dict[str, Any]:
        """As the chat template takes it: OpenAI's function tool."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": function | {"parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def pieces(self) -> list[str]:
        """The arguments' JSON text in the pieces a stream sends."""
        text = self.arguments_json()
        return [text[i : i + ARGUMENT_PIECE] for i in range(0, len(text), ARGUMENT_PIECE)]


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and its choice: ``auto``, ``required``, ``none``, or one ``named``."""

    tools: tuple[Tool, ...] = ()
    choice: str = "auto"
    named: str | None = None
    id_prefix: str = field(default="call_", compare=False)

    @property
    def active(self) -> bool:
        """Whether the model is told of the tools and the answer may be a call."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice in ("required", "named")

    def rendered(self) -> list[dict[str, Any]] | None:
        """The tools for the prompt; None when there are none or the choice is ``none``."""
        return [tool.rendered() for tool in self.tools] if self.active else None

    def format(self) -> dict[str, Any] | None:
        """The answer's format (llmws's ``format``) when a call is forced, else None."""
        if not self.forced:
            return None
        chosen = [t for t in self.tools if self.choice == "required" or t.name == self.named]
        return {"type": "json_schema", "schema": call_schema(chosen)}

    def parse(self, text: str) -> ToolCall | None:
        """The call ``text`` is, with a new id, or None: it is text."""
        if not self.active:
            return None
        call = parse_call(text, {t.name for t in self.tools})
        if call is None:
            return None
        return ToolCall(call.name, call.arguments, self.id_prefix + uuid.uuid4().hex[:24])

    def prompt_chars(self) -> int:
        """What the tools add to the prompt, as characters (``[limits] max_prompt_chars``)."""
        return len(json.dumps(self.rendered())) if self.active else 0


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of a call of one of ``tools``: name (a const) and its arguments.

    Several tools are an ``anyOf``, so that the arguments are the named function's; each
    schema's ``$defs`` (or ``definitions``) move to the top, renamed apart, and their
    references with them.
    """
    branches: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        prefix = f"{i}_" if len(tools) > 1 else ""
        parameters = dict(tool.parameters)
        for key in DEFINITIONS:
            own = parameters.pop(key, None)
            if isinstance(own, dict):
                defs |= {prefix + name: _moved_refs(s, prefix) for name, s in own.items()}
        parameters = _moved_refs(parameters, prefix)
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return schema | {"$defs": defs} if defs else schema


def _moved_refs(schema: Any, prefix: str) -> Any:
    """``schema`` with its references to its definitions pointing to ``#/$defs/<prefix>...``."""
    if isinstance(schema, list):
        return [_moved_refs(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    moved = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str):
            for start in DEFINITIONS.values():
                if value.startswith(start):
                    value = "#/$defs/" + prefix + value[len(start) :]
                    break
            moved[key] = value
        else:
            moved[key] = _moved_refs(value, prefix)
    return moved


def parse_call(text: str, names: set[str]) -> ToolCall | None:
    """``text`` as ``{"name": ..., "arguments": {...}}`` naming one of ``names``, or None.

    The object may stand in a code fence or a template's ``<tool_call>`` tags, and its
    arguments be JSON text or be called ``parameters`` (as some models write them).
    """
    body = text.strip()
    for wrapper in (FENCE, TAGS):
        found = wrapper.match(body)
        if found:
            body = found.group(1)
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict) or not set(data) <= {"name", "arguments", "parameters"}:
        return None
    return ToolCall(data["name"], arguments)


def could_be_call(text: str) -> bool:
    """Whether an answer that begins with ``text`` may still turn out a call."""
    start = text.lstrip()
    return not start or any(start.startswith(p) or p.startswith(start) for p in CALL_STARTS)


class CallWatch:
    """A streamed answer's text, passed on while it cannot be a call and held while it may.

    A forced call is held whole; without tools everything is passed on at once.
    """

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.passing = not use.active
        self._held = ""

    def feed(self, piece: str) -> str:
        """What to send of ``piece`` now (maybe with what was held), as text."""
        if self.passing:
            return piece
        self._held += piece
        if self.use.forced or could_be_call(self._held):
            return ""
        self.passing = True
        held, self._held = self._held, ""
        return held

    def end(self) -> tuple[str, ToolCall | None]:
        """At the answer's end: the text still held, or the call it was."""
        held, self._held = self._held, ""
        call = None if self.passing else self.use.parse(held)
        return ("", call) if call else (held, None)


# -- the requests' tools -------------------------------------------------------------------


def _tools(specs: list[tuple[str, str | None, Any]]) -> tuple[Tool, ...]:
    """(name, description, parameters) as Tools, the parameters an object's schema."""
    tools: list[Tool] = []
    for i, (name, description, parameters) in enumerate(specs):
        if any(t.name == name for t in tools):
            raise BadRequest(f"tools[{i}]: two tools are named {name!r}", param="tools")
        parameters = NO_PARAMETERS if parameters is None else parameters
        kind = parameters.get("type", "object")
        if kind != "object":
            raise BadRequest(
                f"tools[{i}] ({name}): its parameters must be the JSON schema of an object "
                f"(type object), not of {json.dumps(kind)[:40]}",
                param="tools",
            )
        tools.append(Tool(name, description or "", parameters))
    return tuple(tools)


def _choose(tools: tuple[Tool, ...], choice: str, named: str | None, param: str) -> None:
    if choice != "auto" and choice != "none" and not tools:
        raise BadRequest(f"{param}: {choice!r} needs tools to call", param=param)
    if choice == "named" and not any(t.name == named for t in tools):
        raise BadRequest(f"{param}: there is no tool named {named!r}", param=param)


def from_openai(body: ChatCompletionRequest) -> ToolUse:
    """A chat completion's ``tools`` and ``tool_choice`` (auto when left out)."""
    tools = _tools(
        [(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    )
    wanted = body.tool_choice
    named = None if wanted is None or isinstance(wanted, str) else wanted.function.name
    choice: str = "named" if named is not None else str(wanted or "auto")
    _choose(tools, choice, named, "tool_choice")
    return ToolUse(tools, choice, named, "call_")


def from_anthropic(body: MessagesRequest) -> ToolUse:
    """A message's ``tools`` and ``tool_choice``: auto, any, tool (by name) or none."""
    for i, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise Unsupported(
                f"tools[{i}]: {tool.type[:60]!r} tools (Anthropic's server tools) are not "
                "supported: llmws calls only the client's tools",
                param="tools",
            )
    tools = _tools([(t.name, t.description, t.input_schema) for t in body.tools or []])
    wanted = body.tool_choice
    kind = wanted.type if wanted else "auto"
    choice = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}[kind]
    named = wanted.name if wanted else None
    if choice == "named" and not named:
        raise BadRequest("tool_choice: a choice of type tool names the tool", param="tool_choice")
    _choose(tools, choice, named, "tool_choice")
    return ToolUse(tools, choice, named, "toolu_")


async def check(services: Services, use: ToolUse) -> None:
    """Each tool's call compiled for the served model (cached), before any token: a schema
    the grammar cannot enforce is a BadRequest naming its tool."""
    if not use.tools:
        return
    engine, _ = services.slot.require()
    for i, tool in enumerate(use.tools):
        try:
            fmt = OutputFormat.from_wire({"type": "json_schema", "schema": call_schema([tool])})
            assert fmt is not None
            await asyncio.to_thread(engine.prepare_format, fmt)
        except BadRequest as e:
            reason = e.message.split("cannot be enforced: ", 1)[-1]
            raise BadRequest(
                f"tools[{i}] ({tool.name}): its parameters are not a JSON schema llmws can "
                f"enforce: {reason}",
                param="tools",
            ) from None


# -- the conversation's calls and results ---------------------------------------------------


def _template_call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """A chat completion's messages as the template's turns: text, an assistant's
    ``tool_calls`` (the arguments parsed) and ``tool`` results (named by their call)."""
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # a call's id: its function
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role == "function":
            raise Unsupported(f"{where}: function messages (the old API): use tool messages")
        role = "system" if message.role == "developer" else message.role
        turn: dict[str, Any] = {"role": role, "content": text_of(message.content, where)}
        if message.role == "tool":
            if not message.tool_call_id:
                raise BadRequest(f"{where}: a tool message needs its tool_call_id", param=where)
            name = names.get(message.tool_call_id) or message.name or ""
            turn |= {"tool_call_id": message.tool_call_id, "name": name}
        if message.tool_calls:
            if message.role != "assistant":
                raise BadRequest(f"{where}: only an assistant's message has tool_calls")
            calls = []
            for j, call in enumerate(message.tool_calls):
                text = call.function.arguments
                try:
                    arguments = json.loads(text) if text.strip() else {}
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise BadRequest(
                        f"{where}.tool_calls[{j}].function.arguments: not a JSON object",
                        param=f"{where}.tool_calls",
                    )
                names[call.id] = call.function.name
                calls.append(_template_call(call.id, call.function.name, arguments))
            turn["tool_calls"] = calls
        turns.append(turn)
    return turns


def anthropic_turns(messages: list[AnthropicMessage]) -> list[dict[str, Any]]:
    """Anthropic's messages as the template's turns: an assistant's ``tool_use`` blocks are
    its ``tool_calls``, a user's ``tool_result`` blocks ``tool`` turns before its text."""
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(message.content, str):
            turns.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            if block.type == "tool_use" and message.role == "assistant":
                if not block.id or not block.name:
                    raise BadRequest(f"{where}.content[{j}]: a tool_use has an id and a name")
                names[block.id] = block.name
                calls.append(_template_call(block.id, block.name, block.input or {}))
            elif block.type == "tool_result" and message.role == "user":
                if not block.tool_use_id:
                    raise BadRequest(f"{where}.content[{j}]: a tool_result has its tool_use_id")
                result = text_of(block.content, f"{where}.content[{j}]")
                turns.append(
                    {
                        "role": "tool",
                        "content": f"Error: {result}" if block.is_error else result,
                        "tool_call_id": block.tool_use_id,
                        "name": names.get(block.tool_use_id, ""),
                    }
                )
            elif block.type in ("tool_use", "tool_result"):
                raise BadRequest(
                    f"{where}.content[{j}]: a {block.type} block is not the {message.role}'s",
                    param=f"{where}.content",
                )
            else:
                texts.append(text_of([block], where))
        if texts or calls or message.role == "assistant":
            turn: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
            if calls:
                turn["tool_calls"] = calls
            turns.append(turn)
    return turns
