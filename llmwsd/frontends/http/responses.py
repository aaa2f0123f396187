"""OpenAI's Responses API for text, with background responses that resume.

A stored response (``store``, the default) is one turn of an llmws session: its
events are the session's, kept in its encrypted log, so a response goes on whatever
its client does (``background``), survives a restart, and streams again from any
point: ``GET /v1/responses/{id}?stream=true&starting_after=N`` gives exactly the
events after sequence number N. A sequence number is the event's ``seq`` in the
session; the one event that has no seq, ``response.created``, is number 0.

``previous_response_id`` continues that response's conversation in its session (from
its latest response: llmws keeps one line of history per session, not a tree). The
response id names the session and the turn: ``resp_<session>_<turn>``.

Each session event is one Responses event: ``queued`` → ``response.queued``, ``start``
→ ``response.in_progress``, ``token`` → ``response.output_text.delta``, ``done`` →
``response.completed`` (``response.incomplete`` when cut by max_output_tokens or
cancelled), ``error`` → ``response.failed``; the last carries the whole response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmwsd.engines.interface import Failed, Finished, Started, TokenText
from llmwsd.errors import BadRequest, NotFound, Unsupported
from llmwsd.frontends.http.generation import (
    EventStream,
    Generation,
    output_format,
    settings_from,
    text_of,
)
from llmwsd.frontends.http.openai import check_prompt_size, served_model
from llmwsd.frontends.http.server import Call, Route, route
from llmwsd.protocol import messages
from llmwsd.protocol.http_api import ResponseRequest
from llmwsd.sessions.session import Session

if TYPE_CHECKING:
    from llmwsd.service.services import Services

Event = dict[str, Any]  # a session event, as the WebSocket protocol has it (with its seq)
ENDS = ("done", "error")


def response_id(session_id: str, request_id: str) -> str:
    return f"resp_{uuid.UUID(session_id).hex}_{request_id.lstrip('r')}"


def parse_response_id(value: str) -> tuple[str, str]:
    """The session and request ids in a response id; NotFound for anything else."""
    prefix, _, rest = value.partition("_")
    hex_id, _, turn = rest.partition("_")
    try:
        if prefix != "resp" or not turn.isdigit():
            raise ValueError
        return str(uuid.UUID(hex=hex_id)), f"r{int(turn)}"
    except ValueError:
        raise NotFound(f"no response {value[:100]!r}", param="response_id") from None


class ResponseView:
    """A response as OpenAI's object, made from its events alone (live or replayed)."""

    def __init__(self, rid: str, model: str, created_at: float, background: bool) -> None:
        self.id = rid
        self.model = model
        self.created_at = int(created_at)
        self.background = background
        self.item_id = "msg_" + rid.removeprefix("resp_")

    def object(self, events: Iterable[Event], answer: str | None = None) -> dict[str, Any]:
        """The response after ``events``; ``answer``: its whole text, where the session's
        buffer no longer holds all of its tokens."""
        status, text, tokens_in, tokens_out = "queued", [], 0, 0
        error = incomplete = None
        for event in events:
            kind = event["type"]
            if kind == "start":
                status, tokens_in = "in_progress", event["tokens_in"]
            elif kind == "token":
                text.append(event["data"])
            elif kind == "done":
                tokens_out = event["total_tokens"]
                status = {"stop": "completed", "length": "incomplete"}.get(
                    event["finish_reason"], "cancelled"
                )
                if status == "incomplete":
                    incomplete = {"reason": "max_output_tokens"}
            elif kind == "error":
                status = "failed"
                error = {"code": event["code"], "message": event["message"]}
        ended = status not in ("queued", "in_progress")
        if answer is not None:
            text = [answer]
        output = []
        if text or (ended and status != "failed"):
            output.append(
                {
                    "type": "message",
                    "id": self.item_id,
                    "status": "completed"
                    if status == "completed"
                    else "incomplete"
                    if ended
                    else "in_progress",
                    "role": "assistant",
                    "content": [
                        {
                            "type": "output_text",
                            "text": "".join(text),
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": self.background,
            "model": self.model,
            "output": output,
            "error": error,
            "incomplete_details": incomplete,
            "usage": {
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "total_tokens": tokens_in + tokens_out,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
            if ended
            else None,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
        }

    def stream_event(self, event: Event, so_far: list[Event]) -> dict[str, Any]:
        """The Responses event for one session event; ``so_far`` ends with it."""
        kind = event["type"]
        if kind == "error" and "seq" not in event:  # events_dropped: OpenAI's error event
            return {
                "type": "error",
                "code": event["code"],
                "message": event["message"],
                "param": None,
                "sequence_number": event["last_seq"],
            }
        number = event["seq"]
        if kind == "token":
            return {
                "type": "response.output_text.delta",
                "item_id": self.item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": event["data"],
                "logprobs": [],
                "sequence_number": number,
            }
        whole = self.object(so_far)
        name = {
            "queued": "response.queued",
            "start": "response.in_progress",
            "error": "response.failed",
        }.get(kind) or (
            "response.completed" if whole["status"] == "completed" else "response.incomplete"
        )
        return {"type": name, "response": whole, "sequence_number": number}

    def created(self) -> dict[str, Any]:
        return {"type": "response.created", "response": self.object([]), "sequence_number": 0}


def conversation(body: ResponseRequest) -> tuple[str, list[dict[str, str]], str]:
    """The request's system text, the turns before its last, and its last user text."""
    if isinstance(body.input, str):
        return body.instructions or "", [], body.input
    system = [body.instructions] if body.instructions else []
    turns = []
    for i, item in enumerate(body.input):
        text = text_of(item.content, f"input[{i}]")
        if item.role in ("system", "developer"):
            system.append(text)
        else:
            turns.append({"role": item.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("input must end with a user message", param="input")
    return "\n\n".join(system), turns[:-1], turns[-1]["content"]


class ResponsesApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [
            route("POST", "/v1/responses", self.create, "responses"),
            route("GET", "/v1/responses/{response_id}", self.retrieve, "responses"),
            route("POST", "/v1/responses/{response_id}/cancel", self.cancel, "responses"),
        ]

    # -- creating ----------------------------------------------------------------------

    async def create(self, call: Call) -> web.StreamResponse:
        body = call.body(ResponseRequest)
        if body.tools:
            raise Unsupported("tools are not supported yet", param="tools")
        if body.background and not body.store:
            raise BadRequest(
                "a background response must be stored (store: true)", param="background"
            )
        model = served_model(self.services, body.model)
        system, before, user = conversation(body)
        check_prompt_size(self.services, [{"content": system}, *before, {"content": user}])
        overrides = {
            key: value
            for key, value in (
                ("max_new_tokens", body.max_output_tokens),
                ("temperature", body.temperature),
                ("top_p", body.top_p),
                ("format", self._format(body)),
            )
            if value is not None
        }
        if not body.store:
            return await self._unstored(call, body, model, system, before, user, overrides)
        session = self._session_for(call, body.previous_response_id)
        try:
            if before:
                session.add_history(before)
            turn = self.services.generation.start_turn(
                session, {"user": user, "system": system}, overrides
            )
            request_id = session.running.request_id if session.running else ""
            await turn  # admitted (or queued for memory); a refusal is raised here
        except BaseException:
            if body.previous_response_id is None:
                self.services.sessions.drop(session.id)  # a refused first turn leaves nothing
            raise
        view = self._view(session, request_id, body.background)
        try:
            if body.stream:
                return await self._stream(call, session, request_id, view, None)
            if body.background:
                return web.json_response(self._whole(session, request_id, view))
            async for _ in self._follow(session, request_id, None):
                pass  # until it ends
            return web.json_response(self._whole(session, request_id, view))
        finally:
            running = session.running
            if not body.background and running is not None and running.request_id == request_id:
                running.request_cancel()  # the client left a response it waited for

    @staticmethod
    def _format(body: ResponseRequest) -> dict[str, Any] | None:
        wanted = body.text.format if body.text else None
        if wanted is None:
            return None
        return output_format(wanted.type, wanted.json_schema, "text.format")

    def _session_for(self, call: Call, previous: str | None) -> Session:
        assert call.identity is not None
        if previous is None:
            return self.services.sessions.create(call.identity.token_id, call.address)
        session, request_id = self._find(call, previous)
        if session.requests != int(request_id.lstrip("r")):
            raise BadRequest(
                "previous_response_id must be its conversation's latest response "
                "(llmws continues a conversation, it does not branch it)",
                param="previous_response_id",
            )
        return session

    async def _unstored(
        self,
        call: Call,
        body: ResponseRequest,
        model: str,
        system: str,
        before: list[dict[str, str]],
        user: str,
        overrides: dict[str, Any],
    ) -> web.StreamResponse:
        """store: false: a generation of its own, not kept, so neither retrievable nor resumable."""
        if body.previous_response_id is not None:
            self._find(call, body.previous_response_id)  # it must exist, but is not continued
            raise Unsupported(
                "previous_response_id with store: false is not supported",
                param="previous_response_id",
            )
        turns = ([{"role": "system", "content": system}] if system else []) + before
        turns.append({"role": "user", "content": user})
        settings = settings_from(self.services, **overrides)
        generation = await Generation.start(self.services, turns, settings, call.who)
        view = ResponseView("resp_" + uuid.uuid4().hex, model, time.time(), False)
        try:
            events = self._as_session_events(generation)
            if body.stream:
                return await self._send(call, view, events, None)
            return web.json_response(view.object([e async for e in events]))
        finally:
            generation.cancel()

    @staticmethod
    async def _as_session_events(generation: Generation) -> AsyncIterator[Event]:
        """A generation's events as a session would hold them, numbered from 1."""
        numbers = itertools.count(1)
        async for event in generation.events():
            seq = next(numbers)
            if isinstance(event, Started):
                yield {"type": "start", "tokens_in": event.tokens_in, "seq": seq}
            elif isinstance(event, TokenText):
                yield {"type": "token", "data": event.text, "seq": seq}
            elif isinstance(event, Finished):
                yield {
                    "type": "done",
                    "total_tokens": event.total_tokens,
                    "finish_reason": event.finish_reason,
                    "seq": seq,
                }
            elif isinstance(event, Failed):
                yield {
                    "type": "error",
                    "code": event.error.code,
                    "message": event.error.message,
                    "seq": seq,
                }

    # -- reading -----------------------------------------------------------------------

    def _find(self, call: Call, rid: str) -> tuple[Session, str]:
        session_id, request_id = parse_response_id(rid)
        session = self.services.sessions.get(session_id)
        assert call.identity is not None
        if (
            session is None
            or session.token_id != call.identity.token_id  # another token's: as if unknown
            or int(request_id.lstrip("r")) > session.requests
        ):
            raise NotFound(f"no response {rid[:100]!r}", param="response_id")
        return session, request_id

    @staticmethod
    def _events_of(session: Session, request_id: str) -> list[Event]:
        return [e for e in session.events_after(None) if e.get("request_id") == request_id]

    def _whole(self, session: Session, request_id: str, view: ResponseView) -> dict[str, Any]:
        """A stored response as it is now. Its text is its token events; once the session's
        buffer ([sessions] max_buffered_events) dropped the first of them, the latest
        response's text is the conversation's last answer, which the session keeps whole."""
        events = self._events_of(session, request_id)
        answer = None
        if (
            not any(e["type"] == "start" for e in events)
            and self._ended(session, request_id)
            and session.requests == int(request_id.lstrip("r"))
            and session.messages
            and session.messages[-1]["role"] == "assistant"
        ):
            answer = session.messages[-1]["content"]
        return view.object(events, answer)

    async def _follow(
        self, session: Session, request_id: str, after: int | None
    ) -> AsyncIterator[Event]:
        """The turn's events after seq ``after``, buffered then live, until its last."""
        if self._ended(session, request_id):
            lost = session.lost_after(after or 0)
            if lost is not None:
                yield messages.Error.from_exception(lost).to_wire()
            for event in self._events_of(session, request_id):
                if after is None or event["seq"] > after:
                    yield event
            return
        async for event in session.stream_from(after):
            if event.get("code") == "events_dropped":
                yield event  # the buffer cap dropped some of them: said, not skipped
                continue
            if event.get("request_id") != request_id:
                continue
            yield event
            if event["type"] in ENDS:
                return

    def _ended(self, session: Session, request_id: str) -> bool:
        return session.running is None or session.running.request_id != request_id

    def _view(self, session: Session, request_id: str, background: bool = True) -> ResponseView:
        engine = self.services.slot.engine
        model = engine.info.name if engine is not None else ""
        return ResponseView(
            response_id(session.id, request_id), model, session.created_at, background
        )

    async def retrieve(self, call: Call) -> web.StreamResponse:
        session, request_id = self._find(call, call.params["response_id"])
        view = self._view(session, request_id)
        query = call.request.query
        if query.get("stream", "false").lower() != "true":
            return web.json_response(self._whole(session, request_id, view))
        after = query.get("starting_after")
        try:
            start = int(after) if after is not None else None
        except ValueError:
            raise BadRequest("starting_after must be an integer", param="starting_after") from None
        return await self._stream(call, session, request_id, view, start)

    async def cancel(self, call: Call) -> web.StreamResponse:
        session, request_id = self._find(call, call.params["response_id"])
        running = session.running
        if running is not None and running.request_id == request_id:
            running.request_cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    async for _ in self._follow(session, request_id, None):
                        pass
        return web.json_response(self._whole(session, request_id, self._view(session, request_id)))

    # -- streaming ---------------------------------------------------------------------

    async def _stream(
        self, call: Call, session: Session, request_id: str, view: ResponseView, after: int | None
    ) -> web.StreamResponse:
        earlier = [] if after is None else self._events_of(session, request_id)
        seen = [e for e in earlier if e["seq"] <= after] if after is not None else []
        return await self._send(call, view, self._follow(session, request_id, after), after, seen)

    @staticmethod
    async def _send(
        call: Call,
        view: ResponseView,
        events: AsyncIterator[Event],
        after: int | None,
        seen: list[Event] | None = None,
    ) -> web.StreamResponse:
        """The events as server-sent events; ``seen``: the turn's events up to ``after``,
        which the whole response in the last event includes."""
        stream = await EventStream().open(call.request)
        if after is None or after < 0:
            await stream.send(view.created(), event="response.created")
        so_far = list(seen or [])
        async for event in events:
            if "seq" in event:  # not an events_dropped notice
                so_far.append(event)
            message = view.stream_event(event, so_far)
            await stream.send(message, event=message["type"])
        return stream.response
