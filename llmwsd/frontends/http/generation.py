"""What every HTTP API does with a generation: settings from a body, the run, the stream.

A request the client waits for (a chat completion, a completion, a message, an unstored
response) runs as one :class:`Generation` through the same GenerationService the
WebSocket path uses; a stored response is a session's turn (responses.py). Server-sent
events go out through :class:`EventStream`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmwsd.engines.chat_template import RAW_PROMPT_ROLE
from llmwsd.engines.interface import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Started,
    TokenText,
)
from llmwsd.errors import BadRequest
from llmwsd.frontends.http.server import STREAMING
from llmwsd.protocol.http_api import ContentPart
from llmwsd.settings import GenerationSettings

if TYPE_CHECKING:
    from llmwsd.service.admission import Ticket
    from llmwsd.service.services import Services


def text_of(content: str | Sequence[ContentPart] | None, where: str) -> str:
    """A message's text: the string, or its text parts joined; images and files refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for i, part in enumerate(content):
        if part.type not in ("text", "input_text", "output_text") or part.text is None:
            raise BadRequest(
                f"{where}.content[{i}]: llmws takes text only, not {part.type!r} parts "
                "(images, audio and files are not supported)",
                param=f"{where}.content",
            )
        pieces.append(part.text)
    return "".join(pieces)


def settings_from(services: Services, **fields: Any) -> GenerationSettings:
    """The served defaults with a request's fields (None: not given), checked by merge."""
    changes = {key: value for key, value in fields.items() if value is not None}
    return services.defaults().settings.merge(changes)


def output_format(kind: str, schema: dict[str, Any] | None, param: str) -> dict[str, Any] | None:
    """OpenAI's text / json_object / json_schema as llmws's ``format`` (None: free text)."""
    if kind == "json_object":
        return {"type": "json"}
    if kind == "json_schema":
        if schema is None:
            raise BadRequest(f"{param}: a json_schema format needs its schema", param=param)
        return {"type": "json_schema", "schema": schema}
    return None


def raw_prompt(text: str) -> list[dict[str, str]]:
    """A completion's prompt, as the one message the engines tokenize without a template."""
    return [{"role": RAW_PROMPT_ROLE, "content": text}]


@dataclass
class Answer:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str  # "stop" or "length"


class Generation:
    """One generation a client waits for: its events, in order, until its last."""

    def __init__(self, ticket: Ticket, events: asyncio.Queue[GenerationEvent]) -> None:
        self._ticket = ticket
        self._events = events
        self.tokens_in = 0

    @classmethod
    async def start(
        cls,
        services: Services,
        messages: list[dict[str, Any]],
        settings: GenerationSettings,
        who: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        """Admit it; a refusal (no_model, context_too_long, busy) is raised before any compute."""
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        request = GenerationRequest(messages, settings, tools=tools)
        ticket = await services.generation.submit(request, events.put_nowait, who=who)
        return cls(ticket, events)

    async def events(self) -> AsyncIterator[GenerationEvent]:
        while True:
            event = await self._events.get()
            if isinstance(event, Started):
                self.tokens_in = event.tokens_in
            yield event
            if isinstance(event, Finished | Failed):
                return

    def cancel(self) -> None:
        """Stop it (a no-op once it ended): the client left, or the request is over."""
        self._ticket.cancel()

    async def answer(self) -> Answer:
        """Wait for the whole answer; an error it ends with is raised."""
        pieces: list[str] = []
        async for event in self.events():
            if isinstance(event, TokenText):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                return Answer(
                    "".join(pieces), self.tokens_in, event.total_tokens, event.finish_reason
                )
        raise AssertionError("a generation's events end with Finished or Failed")


class EventStream:
    """A response of server-sent events: ``event:`` (Anthropic names them) and ``data:``."""

    def __init__(self) -> None:
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold the stream back
            }
        )

    async def open(self, request: web.BaseRequest) -> EventStream:
        request[STREAMING] = True
        await self.response.prepare(request)
        return self

    async def send(self, data: dict[str, Any], event: str | None = None) -> None:
        named = f"event: {event}\n" if event else ""
        await self.response.write(f"{named}data: {json.dumps(data)}\n\n".encode())

    async def done(self) -> None:
        """OpenAI's end of a stream."""
        await self.response.write(b"data: [DONE]\n\n")
