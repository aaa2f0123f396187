"""Sessions: a conversation plus the buffer of generation events its client has not acknowledged.

A generation writes its events into its session, never straight to a socket,
so a client that reads slowly, disconnects or reconnects elsewhere loses
nothing: whichever connection owns the session streams the buffer from its
``last_seq``. Every change goes through :meth:`SessionStore.record`, the seam
where persistence keeps a durable copy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmwsd.errors import Busy, NotFound
from llmwsd.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationSettings,
    Started,
    TokenText,
)

log = logging.getLogger("llmwsd.sessions")


@dataclass
class RunningGeneration:
    request_id: str
    user_text: str
    cancel: Any = None  # the engine handle's cancel(), once submitted
    pieces: list[str] = field(default_factory=list)
    dropped_turns: int = 0


class Session:
    """One client's conversation, settings and buffered generation events."""

    def __init__(self, store: SessionStore, session_id: str, settings: GenerationSettings) -> None:
        self.store = store
        self.id = session_id
        self.created_at = time.time()
        self.last_active = self.created_at
        self.system = ""
        self.messages: list[dict[str, str]] = []  # user/assistant turns, oldest first
        self.settings = settings
        self.events: list[dict[str, Any]] = []  # unacknowledged generation events, by seq
        self.next_seq = 1
        self.running: RunningGeneration | None = None
        self.owner: Any = None  # the connection streaming this session, if any
        self._request_numbers = itertools.count(1)
        self._changed = asyncio.Event()

    # -- the event buffer -------------------------------------------------------------

    def append_event(self, message: dict[str, Any]) -> dict[str, Any]:
        """Give ``message`` the next seq, buffer it, and wake the streaming connection."""
        event = {**message, "seq": self.next_seq}
        self.next_seq += 1
        self.events.append(event)
        self.store.record(self, {"kind": "event", "event": event})
        self._wake()
        return event

    def ack(self, seq: int | None) -> int:
        """Drop buffered events up to ``seq`` (all when None); return how many were dropped."""
        before = len(self.events)
        if seq is None:
            self.events.clear()
        else:
            self.events = [e for e in self.events if e["seq"] > seq]
        self.store.record(self, {"kind": "ack", "seq": seq})
        return before - len(self.events)

    async def stream_from(self, last_seq: int | None) -> AsyncIterator[dict[str, Any]]:
        """Yield buffered events after ``last_seq`` (all when None), then live ones, forever."""
        sent = -1 if last_seq is None else last_seq
        while True:
            changed = self._changed
            pending = [e for e in self.events if e["seq"] > sent]
            for event in pending:
                sent = event["seq"]
                yield event
            if not pending:
                await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the conversation -------------------------------------------------------------

    def touch(self) -> None:
        self.last_active = time.time()

    def set_settings(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.store.record(self, {"kind": "settings", "settings": settings.to_dict()})

    def reset(self) -> None:
        self.system = ""
        self.messages.clear()
        self.store.record(self, {"kind": "reset"})

    def history(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(self.messages)

    def begin_generation(self, user_text: str, system: str) -> RunningGeneration:
        """Reserve the session for one generation; a second one at a time is Busy."""
        if self.running is not None:
            raise Busy("a generation is already running in this session: cancel it or wait")
        if system:
            self.system = system
            self.store.record(self, {"kind": "system", "content": system})
        self.running = RunningGeneration(f"r{next(self._request_numbers)}", user_text)
        return self.running

    def on_generation_event(self, running: RunningGeneration, event: GenerationEvent) -> None:
        """Turn an engine event into a buffered protocol event (runs on the event loop)."""
        base = {"request_id": running.request_id}
        if isinstance(event, Started):
            self.append_event(
                {
                    "type": "start",
                    **base,
                    "tokens_in": event.tokens_in,
                    "max_tokens": event.max_tokens,
                    "dropped_turns": running.dropped_turns,
                }
            )
        elif isinstance(event, TokenText):
            running.pieces.append(event.text)
            self.append_event({"type": "token", **base, "data": event.text})
        elif isinstance(event, Finished):
            self._finish(running)
            self.append_event(
                {
                    "type": "done",
                    **base,
                    "total_tokens": event.total_tokens,
                    "finish_reason": event.finish_reason,
                    "ttft_ms": round(event.ttft_ms, 1),
                    "tokens_per_s": round(event.tokens_per_s, 1),
                }
            )
        elif isinstance(event, Failed):
            self._finish(running, keep_turn=bool(running.pieces))
            self.append_event({**event.error.to_message(), **base})

    def _finish(self, running: RunningGeneration, keep_turn: bool = True) -> None:
        if keep_turn:
            answer = "".join(running.pieces)
            for turn in (
                {"role": "user", "content": running.user_text},
                {"role": "assistant", "content": answer},
            ):
                self.messages.append(turn)
                self.store.record(self, {"kind": "message", "message": turn})
        if self.running is running:
            self.running = None
        self.touch()

    def summary(self) -> dict[str, Any]:
        now = time.time()
        return {
            "id": self.id,
            "age_s": round(now - self.created_at, 1),
            "idle_s": round(now - self.last_active, 1),
            "messages": len(self.messages),
            "buffered_events": len(self.events),
            "connected": self.owner is not None,
            "generating": self.running is not None,
        }


class SessionStore:
    """All sessions by id. ``record`` is called for every change (the persistence seam)."""

    def __init__(self, default_settings: GenerationSettings) -> None:
        self.default_settings = default_settings
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> Session:
        session = Session(self, str(uuid.uuid4()), self.default_settings)
        self._sessions[session.id] = session
        self.record(session, {"kind": "created", "created_at": session.created_at})
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def list(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.created_at)

    def drop(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"no session {session_id}")
        if session.running is not None and session.running.cancel is not None:
            session.running.cancel()
        self.record(session, {"kind": "dropped"})
        return session

    def record(self, session: Session, record: dict[str, Any]) -> None:
        """Keep ``record`` about ``session``; in memory, nothing more is kept."""
