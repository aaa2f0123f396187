"""Anthropic's Messages API: ``POST /v1/messages``, whole or streamed, text and tool calls.

The stream is Anthropic's: ``message_start``, ``content_block_start``, one
``content_block_delta`` per piece of text, ``content_block_stop``, ``message_delta``
(the stop reason and the output tokens), ``message_stop``. A tool call is a
``tool_use`` block, its input in ``input_json_delta`` pieces (tools.py).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmwsd.engines.interface import Failed, Finished, TokenText
from llmwsd.errors import LLMWSError
from llmwsd.frontends.http import tools
from llmwsd.frontends.http.errors import anthropic_error
from llmwsd.frontends.http.generation import EventStream, Generation, settings_from, text_of
from llmwsd.frontends.http.openai import check_prompt_size, finish_reason, served_model
from llmwsd.frontends.http.server import Call, Route, route
from llmwsd.frontends.http.tools import CallWatch, ToolCall, ToolUse
from llmwsd.protocol.http_api import MessagesRequest

if TYPE_CHECKING:
    from llmwsd.service.services import Services

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
TOOL_USE = "tool_use"


class AnthropicApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [route("POST", "/v1/messages", self.messages, "messages", api="anthropic")]

    async def messages(self, call: Call) -> web.StreamResponse:
        body = call.body(MessagesRequest)
        use = tools.from_anthropic(body)
        model = served_model(self.services, body.model)
        system = text_of(body.system, "system")
        turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        turns += tools.anthropic_turns(body.messages)
        check_prompt_size(self.services, turns, use)
        await tools.check(self.services, use)
        settings = settings_from(
            self.services,
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop_sequences or None,
            format=use.format(),
        )
        generation = await Generation.start(
            self.services, turns, settings, call.who, use.rendered()
        )
        message = Message(model, use)
        try:
            if body.stream:
                return await message.stream(call.request, generation)
            answer = await generation.answer()
            reason = STOP_REASONS[finish_reason(answer.finish_reason)]
            tool_call = use.parse(answer.text)
            content = [{"type": "text", "text": answer.text}]
            if tool_call is not None:
                content, reason = [tool_use(tool_call)], TOOL_USE
            return web.json_response(
                message.whole(content, reason, answer.tokens_in, answer.tokens_out)
            )
        finally:
            generation.cancel()


def tool_use(call: ToolCall, streamed: bool = False) -> dict[str, Any]:
    """A call as a ``tool_use`` block (its input empty where a stream sends it in pieces)."""
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": {} if streamed else call.arguments,
    }


class Message:
    def __init__(self, model: str, use: ToolUse) -> None:
        self.model = model
        self.use = use
        self.id = "msg_" + uuid.uuid4().hex

    def whole(
        self,
        content: list[dict[str, Any]],
        stop_reason: str | None,
        tokens_in: int,
        tokens_out: int,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }

    async def stream(self, request: web.BaseRequest, generation: Generation) -> web.StreamResponse:
        stream = await EventStream().open(request)

        async def send(kind: str, **data: Any) -> None:
            await stream.send({"type": kind, **data}, event=kind)

        started = texting = False

        async def send_text(text: str) -> None:
            nonlocal texting
            if not texting:
                texting = True
                await send(
                    "content_block_start", index=0, content_block={"type": "text", "text": ""}
                )
            if text:
                await send(
                    "content_block_delta", index=0, delta={"type": "text_delta", "text": text}
                )

        watch = CallWatch(self.use)  # text is sent as it comes but while it may be a call
        async for event in generation.events():
            try:
                if not started and not isinstance(event, Failed):
                    started = True
                    await send(
                        "message_start", message=self.whole([], None, generation.tokens_in, 0)
                    )
                    if watch.passing:
                        await send_text("")
                if isinstance(event, TokenText) and event.text:
                    text = watch.feed(event.text)
                    if text:
                        await send_text(text)
                elif isinstance(event, Finished):
                    reason = STOP_REASONS[finish_reason(event.finish_reason)]
                    text, tool_call = watch.end()
                    if text or tool_call is None:
                        await send_text(text)
                    if texting:
                        await send("content_block_stop", index=0)
                    if tool_call is not None:
                        index = 1 if texting else 0
                        block = tool_use(tool_call, streamed=True)
                        await send("content_block_start", index=index, content_block=block)
                        for piece in tool_call.pieces():
                            delta = {"type": "input_json_delta", "partial_json": piece}
                            await send("content_block_delta", index=index, delta=delta)
                        await send("content_block_stop", index=index)
                        reason = TOOL_USE
                    await send(
                        "message_delta",
                        delta={"stop_reason": reason, "stop_sequence": None},
                        usage={"output_tokens": event.total_tokens},
                    )
                    await send("message_stop")
                elif isinstance(event, Failed):
                    raise event.error
            except LLMWSError as e:
                await stream.send(anthropic_error(e), event="error")
                break
        return stream.response
