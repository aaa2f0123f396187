"""OpenAI's models, chat completions and completions: requests in, chunks out.

A thin front: the body becomes the same GenerationRequest the WebSocket path makes
(generation.py), and the engine's events become OpenAI's objects and chunks.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmwsd.engines.interface import Failed, Finished, TokenText
from llmwsd.errors import BadRequest, Interrupted, LLMWSError, NotFound, Unsupported
from llmwsd.frontends.http import tools
from llmwsd.frontends.http.errors import openai_error
from llmwsd.frontends.http.generation import (
    Answer,
    EventStream,
    Generation,
    output_format,
    raw_prompt,
    settings_from,
)
from llmwsd.frontends.http.server import Call, Route, route
from llmwsd.frontends.http.tools import CallWatch, ToolCall, ToolUse
from llmwsd.protocol.http_api import ChatCompletionRequest, CompletionRequest, Sampling
from llmwsd.settings import GenerationSettings

if TYPE_CHECKING:
    from llmwsd.service.services import Services

FINISH_REASONS = ("stop", "length")
NO_TOOLS = ToolUse()


def served_model(services: Services, asked: str | None) -> str:
    """The loaded model's name, which a request may name or leave out; NotFound for another."""
    engine, _ = services.slot.require()
    name = engine.info.name
    if asked in (None, "", name):
        return name
    raise NotFound(
        f"the model {asked[:200]!r} is not served here: this llmwsd serves {name!r} "
        "(llmwsctl models lists the others; llmwsctl switch loads one)",
        param="model",
        api_code="model_not_found",
    )


def check_prompt_size(
    services: Services, messages: list[dict[str, Any]], use: ToolUse = NO_TOOLS
) -> None:
    limit = services.config().limits.max_prompt_chars
    size = sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""))) for m in messages)
    size += use.prompt_chars()
    if size > limit:
        raise BadRequest(
            f"the prompt has {size} characters; at most {limit} are taken "
            "([limits] max_prompt_chars)",
            param="messages",
        )


def sampling_settings(
    services: Services, body: Sampling, max_tokens: int | None, fmt: dict[str, Any] | None = None
) -> GenerationSettings:
    """Chat's and completions' fields as llmws's settings, checked by their one table."""
    if body.n != 1:
        raise Unsupported("n must be 1: llmws makes one choice per request", param="n")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(body, penalty):
            raise Unsupported(
                f"{penalty} is not supported by llmws's engines: use repetition_penalty",
                param=penalty,
            )
    return settings_from(
        services,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=0 if body.top_k == -1 else body.top_k,  # vLLM's -1: off
        min_new_tokens=body.min_tokens,
        repetition_penalty=body.repetition_penalty,
        stop=body.stop,
        seed=body.seed,
        format=fmt,
    )


def usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }


def finish_reason(reason: str) -> str:
    """stop or length; a generation the server cancelled (a shutdown) is an error."""
    if reason not in FINISH_REASONS:
        raise Interrupted("the server stopped before this answer was complete")
    return reason


class OpenAiApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [
            route("GET", "/v1/models", self.models, "models"),
            route("GET", "/v1/models/{model}", self.model, "models"),
            route("POST", "/v1/chat/completions", self.chat_completions, "chat_completions"),
            route("POST", "/v1/completions", self.completions, "completions"),
        ]

    # -- models ------------------------------------------------------------------------

    async def _model_list(self) -> list[dict[str, Any]]:
        entries = await self.services.reports.list_models()

        def created(path: str) -> int:
            try:
                return int(os.stat(path).st_mtime)
            except OSError:
                return 0

        stamps = await asyncio.to_thread(lambda: [created(e["path"]) for e in entries])
        models = [
            {
                "id": entry["name"],
                "object": "model",
                "created": stamp,
                "owned_by": "llmws",
                "loaded": entry["loaded"],
            }
            for entry, stamp in zip(entries, stamps, strict=True)
        ]
        engine = self.services.slot.engine
        if engine is not None and not any(m["loaded"] for m in models):
            models.insert(
                0,
                {
                    "id": engine.info.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llmws",
                    "loaded": True,
                },
            )
        return models

    async def models(self, call: Call) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": await self._model_list()})

    async def model(self, call: Call) -> web.StreamResponse:
        for model in await self._model_list():
            if model["id"] == call.params["model"]:
                return web.json_response(model)
        raise NotFound(
            f"no model {call.params['model']!r}", param="model", api_code="model_not_found"
        )

    # -- chat completions --------------------------------------------------------------

    async def chat_completions(self, call: Call) -> web.StreamResponse:
        body = call.body(ChatCompletionRequest)
        if body.functions:
            raise Unsupported(
                "functions (the old API) are not supported: use tools", param="functions"
            )
        if body.logprobs:
            raise Unsupported("logprobs are not supported", param="logprobs")
        use = tools.from_openai(body)
        messages = tools.chat_messages(body.messages)
        wanted = body.response_format
        fmt = (
            None
            if wanted is None
            else output_format(
                wanted.type,
                wanted.json_schema.json_schema if wanted.json_schema else None,
                "response_format",
            )
        )
        if fmt is not None and use.forced:
            raise BadRequest(
                "response_format and a tool_choice that forces a call cannot both be enforced",
                param="response_format",
            )
        await tools.check(self.services, use)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._run(call, body, messages, max_tokens, True, fmt or use.format(), use)

    async def completions(self, call: Call) -> web.StreamResponse:
        body = call.body(CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise Unsupported("prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        for field, default in (
            ("echo", False),
            ("logprobs", None),
            ("suffix", None),
            ("best_of", 1),
        ):
            if getattr(body, field) not in (None, default):
                raise Unsupported(f"{field} is not supported", param=field)
        return await self._run(call, body, raw_prompt(prompt), body.max_tokens, chat=False)

    async def _run(
        self,
        call: Call,
        body: Sampling,
        messages: list[dict[str, Any]],
        max_tokens: int | None,
        chat: bool,
        fmt: dict[str, Any] | None = None,
        use: ToolUse = NO_TOOLS,
    ) -> web.StreamResponse:
        model = served_model(self.services, body.model)
        check_prompt_size(self.services, messages, use)
        settings = sampling_settings(self.services, body, max_tokens, fmt)
        generation = await Generation.start(
            self.services, messages, settings, call.who, use.rendered()
        )
        reply = Reply(model, chat, use)
        try:
            if body.stream:
                include_usage = (
                    body.stream_options is not None and body.stream_options.include_usage
                )
                return await reply.stream(call.request, generation, include_usage)
            return web.json_response(reply.whole(await generation.answer()))
        finally:
            generation.cancel()  # no-op when it ended; stops it when the client left


class Reply:
    """One answer as OpenAI's objects: ``chat.completion`` or ``text_completion``."""

    def __init__(self, model: str, chat: bool, use: ToolUse = NO_TOOLS) -> None:
        self.model = model
        self.chat = chat
        self.use = use
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **more,
        }

    def whole(self, answer: Answer) -> dict[str, Any]:
        reason = finish_reason(answer.finish_reason)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            tool_call = self.use.parse(answer.text)
            if tool_call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [wire(tool_call)]}
                reason = "tool_calls"
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": answer.text}
        choice |= {"finish_reason": reason, "logprobs": None}
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, [choice], usage=usage(answer.tokens_in, answer.tokens_out))

    def chunk(
        self,
        text: str | None,
        reason: str | None = None,
        delta: dict[str, Any] | None = None,
        **more: Any,
    ) -> dict[str, Any]:
        if self.chat:
            if delta is None:
                delta = {} if text is None else {"content": text}
                if text == "" and reason is None:
                    delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"finish_reason": reason, "logprobs": None}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [choice], **more)

    async def stream(
        self, request: web.BaseRequest, generation: Generation, include_usage: bool
    ) -> web.StreamResponse:
        stream = await EventStream().open(request)
        more: dict[str, Any] = {"usage": None} if include_usage else {}
        if self.chat:
            await stream.send(self.chunk("", **more))
        watch = CallWatch(self.use)  # passes all on but for a chat with tools
        async for event in generation.events():
            try:
                if isinstance(event, TokenText) and event.text:
                    text = watch.feed(event.text)
                    if text:
                        await stream.send(self.chunk(text, **more))
                elif isinstance(event, Finished):
                    reason = finish_reason(event.finish_reason)
                    text, tool_call = watch.end()
                    if text:
                        await stream.send(self.chunk(text, **more))
                    if tool_call is not None:
                        for delta in call_deltas(tool_call):
                            await stream.send(self.chunk(None, delta=delta, **more))
                        reason = "tool_calls"
                    await stream.send(self.chunk(None, reason, **more))
                    if include_usage:
                        kind = "chat.completion.chunk" if self.chat else "text_completion"
                        tally = usage(generation.tokens_in, event.total_tokens)
                        await stream.send(self._object(kind, [], usage=tally))
                elif isinstance(event, Failed):
                    raise event.error
            except LLMWSError as e:  # after the 200 went out: the error is the stream's last event
                await stream.send(openai_error(e))
                break
        await stream.done()
        return stream.response


def wire(call: ToolCall) -> dict[str, Any]:
    """A call as a message's ``tool_calls`` entry: the arguments as JSON text."""
    function = {"name": call.name, "arguments": call.arguments_json()}
    return {"id": call.id, "type": "function", "function": function}


def call_deltas(call: ToolCall) -> list[dict[str, Any]]:
    """A call as stream deltas: its id and name (arguments ""), then the arguments' pieces."""
    first = wire(call)
    first["function"]["arguments"] = ""
    deltas = [{"tool_calls": [{"index": 0, **first}]}]
    deltas += [
        {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in call.pieces()
    ]
    return deltas
