"""Anthropic's Messages API: ``POST /v1/messages``, whole or streamed, for text.

The stream is Anthropic's: ``message_start``, ``content_block_start``, one
``content_block_delta`` per piece of text, ``content_block_stop``, ``message_delta``
(the stop reason and the output tokens), ``message_stop``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmwsd.engines.interface import Failed, Finished, TokenText
from llmwsd.errors import LLMWSError, Unsupported
from llmwsd.frontends.http.errors import anthropic_error
from llmwsd.frontends.http.generation import EventStream, Generation, settings_from, text_of
from llmwsd.frontends.http.openai import check_prompt_size, finish_reason, served_model
from llmwsd.frontends.http.server import Call, Route, route
from llmwsd.protocol.http_api import MessagesRequest

if TYPE_CHECKING:
    from llmwsd.service.services import Services

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class AnthropicApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [route("POST", "/v1/messages", self.messages, "messages", api="anthropic")]

    async def messages(self, call: Call) -> web.StreamResponse:
        body = call.body(MessagesRequest)
        if body.tools:
            raise Unsupported("tools are not supported yet", param="tools")
        model = served_model(self.services, body.model)
        system = text_of(body.system, "system")
        turns = [{"role": "system", "content": system}] if system else []
        turns += [
            {"role": m.role, "content": text_of(m.content, f"messages[{i}]")}
            for i, m in enumerate(body.messages)
        ]
        check_prompt_size(self.services, turns)
        settings = settings_from(
            self.services,
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop_sequences or None,
        )
        generation = await Generation.start(self.services, turns, settings, call.who)
        message = Message(model)
        try:
            if body.stream:
                return await message.stream(call.request, generation)
            answer = await generation.answer()
            reason = finish_reason(Finished(answer.tokens_out, answer.finish_reason, 0, 0))
            return web.json_response(
                message.whole(
                    answer.text, STOP_REASONS[reason], answer.tokens_in, answer.tokens_out
                )
            )
        finally:
            generation.cancel()


class Message:
    def __init__(self, model: str) -> None:
        self.model = model
        self.id = "msg_" + uuid.uuid4().hex

    def whole(
        self, text: str, stop_reason: str | None, tokens_in: int, tokens_out: int
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}] if stop_reason else [],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }

    async def stream(self, request: web.BaseRequest, generation: Generation) -> web.StreamResponse:
        stream = await EventStream().open(request)

        async def send(kind: str, **data: Any) -> None:
            await stream.send({"type": kind, **data}, event=kind)

        started = False
        async for event in generation.events():
            try:
                if not started and not isinstance(event, Failed):
                    started = True
                    await send(
                        "message_start", message=self.whole("", None, generation.tokens_in, 0)
                    )
                    await send(
                        "content_block_start", index=0, content_block={"type": "text", "text": ""}
                    )
                if isinstance(event, TokenText) and event.text:
                    await send(
                        "content_block_delta",
                        index=0,
                        delta={"type": "text_delta", "text": event.text},
                    )
                elif isinstance(event, Finished):
                    reason = STOP_REASONS[finish_reason(event)]
                    await send("content_block_stop", index=0)
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
