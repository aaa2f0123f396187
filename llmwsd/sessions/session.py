"""Sessions: a conversation plus the buffer of generation events its client has not acknowledged.

A generation writes its events into its session, never straight to a socket,
so a client that reads slowly, disconnects or reconnects elsewhere loses
nothing: whichever connection owns the session streams the buffer from its
``last_seq``.

Every change to a session is a record (a JSON object): a method builds it and
:meth:`Session.apply` makes the change, then the registry (registry.py) appends
the record to the session's log (store.py: the interface; files.py: the
encrypted files). At start the same :meth:`Session.apply` rebuilds each session
from its log, so a change and its replay cannot drift apart.

The buffer always holds a contiguous run of seqs: acks and the buffer cap only
ever drop its oldest events.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmwsd.engines.interface import Failed, Finished, GenerationEvent, Started, TokenText
from llmwsd.errors import Busy, EventsDropped, Interrupted
from llmwsd.protocol import messages
from llmwsd.sessions.store import Record
from llmwsd.settings import GenerationSettings

if TYPE_CHECKING:  # the registry makes sessions: it imports this module
    from llmwsd.sessions.registry import SessionStore

log = logging.getLogger("llmwsd.sessions")

# More events than the session writer can hold unwritten (it writes as soon as it wakes).
SEQ_GAP_AFTER_CRASH = 1000

# A session's activity is written down at most this often when nothing else is.
TOUCH_RECORD_INTERVAL = 60.0


@dataclass
class RunningGeneration:
    request_id: str
    user_text: str
    # What stops it now: its admission task's cancel() until it has a ticket, then the ticket's.
    cancel: Any = None
    pieces: list[str] = field(default_factory=list)
    dropped_turns: int = 0
    requested_max_tokens: int = 0  # set when max_new_tokens was lowered to fit the context
    on_disk: bool = False  # its "begin" record is written: a restart ends it `interrupted`
    cancel_requested: bool = False
    previous_system: str = ""  # put back when the generation is refused before it starts

    def request_cancel(self) -> None:
        """Cancel for the client or the operator; any other cancellation is an interruption."""
        self.cancel_requested = True
        if self.cancel is not None:
            self.cancel()

    def attach_cancel(self, cancel: Any) -> None:
        """What cancels it from now on; called at once when a cancel was requested already."""
        self.cancel = cancel
        if self.cancel_requested:
            cancel()


def client_of(token_id: str | None, address: str | None) -> str | None:
    """Whose session it is, for the per-client cap: its token, else its address."""
    if token_id is not None:
        return f"token {token_id}"
    return f"address {address}" if address is not None else None


class Session:
    """One client's conversation, settings and buffered generation events."""

    def __init__(
        self,
        store: SessionStore,
        session_id: str,
        settings: GenerationSettings,
        token_id: str | None = None,
        address: str | None = None,
    ) -> None:
        self.store = store
        self.id = session_id
        self.token_id = token_id  # the access token that made it; only that one may resume it
        self.address = address  # where it was made from
        self.created_at = time.time()
        self.last_active = self.created_at
        self.system = ""
        self.messages: list[dict[str, str]] = []  # user/assistant turns, oldest first
        self.settings = settings
        self.events: list[dict[str, Any]] = []  # unacknowledged generation events, by seq
        self.next_seq = 1
        self.requests = 0  # generations begun, for request ids
        self.acked_through = 0  # the highest seq the client acknowledged
        self.dropped_through = 0  # the highest seq the buffer cap dropped unacknowledged
        self.running: RunningGeneration | None = None
        self.owner: Any = None  # the connection streaming this session, if any
        self._touch_recorded = 0.0
        self._changed = asyncio.Event()

    @property
    def client(self) -> str | None:
        return client_of(self.token_id, self.address)

    # -- the event buffer -------------------------------------------------------------

    def append_event(self, message: dict[str, Any]) -> dict[str, Any]:
        """Give ``message`` the next seq, buffer it, and wake the streaming connection."""
        running = self.running
        if running is not None and not running.on_disk:
            # The generation's first event (queued, start or its error): from now on it is
            # on disk, and a restart ends it `interrupted` unless its log has its end.
            self._change(
                {"kind": "begin", "request_id": running.request_id, "user": running.user_text}
            )
        event = {**message, "seq": self.next_seq}
        self._change({"kind": "event", "event": event})
        self._wake()
        return event

    def _add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.next_seq = event["seq"] + 1
        excess = len(self.events) - self.store.config.max_buffered_events
        if excess > 0:
            if self.dropped_through <= self.acked_through:
                log.warning(
                    "session %s: %d events buffered and not acknowledged: dropping the oldest",
                    self.id,
                    len(self.events) - 1,
                )
            self.dropped_through = self.events[excess - 1]["seq"]
            del self.events[:excess]

    def _index_after(self, seq: int) -> int:
        """Where the events after ``seq`` start (seqs grow, with a gap after a crash)."""
        return bisect.bisect_right(self.events, seq, key=lambda event: event["seq"])

    def _drop_through(self, seq: int) -> None:
        del self.events[: self._index_after(seq)]

    def ack(self, seq: int | None) -> tuple[int, int]:
        """Drop buffered events up to ``seq`` (all when None, none past the newest).

        Returns the seq acknowledged and how many events were dropped.
        """
        through = self.next_seq - 1 if seq is None else min(seq, self.next_seq - 1)
        before = len(self.events)
        self._change({"kind": "ack", "seq": through})
        return through, before - len(self.events)

    def events_after(self, seq: int | None) -> list[dict[str, Any]]:
        if seq is None or not self.events:
            return list(self.events)
        return self.events[self._index_after(seq) :]

    def lost_after(self, seq: int) -> EventsDropped | None:
        """The error for events after ``seq`` that the buffer cap dropped before they were sent."""
        first, last = max(seq, self.acked_through) + 1, self.dropped_through
        if first > last:
            return None
        return EventsDropped(
            f"events {first} to {last} were dropped before this client received them: a "
            f"session keeps at most {self.store.config.max_buffered_events} unacknowledged "
            "events, so ack the ones you have received",
            first_seq=first,
            last_seq=last,
        )

    async def stream_from(self, last_seq: int | None) -> AsyncIterator[dict[str, Any]]:
        """Yield buffered events after ``last_seq`` (all when None), then live ones, forever.

        Events the buffer cap dropped before they were yielded are announced with
        an ``events_dropped`` error (it has no seq) in their place.
        """
        sent = last_seq
        while True:
            changed = self._changed
            lost = self.lost_after(sent) if sent is not None else None
            if lost is not None:
                sent = lost.details["last_seq"]
                yield messages.Error.from_exception(lost).to_wire()
            pending = self.events_after(sent)
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
        # Activity is written down at most once a minute; in between it is only in memory.
        touch: Record = {"kind": "touch"}
        write = time.time() - self._touch_recorded >= TOUCH_RECORD_INTERVAL
        self._change(touch, write)
        if write:
            self._touch_recorded = touch["t"]

    def set_settings(self, settings: GenerationSettings) -> None:
        self._change({"kind": "settings", "settings": settings.to_dict()})

    def reset(self) -> None:
        self._change({"kind": "reset"})

    def history(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(self.messages)

    def add_history(self, turns: list[dict[str, str]]) -> None:
        """Add user/assistant turns a client brings along (an HTTP API's conversation)."""
        for turn in turns:
            self._change({"kind": "message", "message": turn})

    def _add_message(self, message: dict[str, str]) -> None:
        """Remember ``message``; drop the oldest exchanges beyond the cap."""
        self.messages.append(message)
        while len(self.messages) > self.store.config.max_history_messages:
            del self.messages[:2]

    def begin_generation(self, user_text: str, system: str) -> RunningGeneration:
        """Reserve the session for one generation; a second one at a time is Busy."""
        if self.running is not None:
            raise Busy("a generation is already running in this session: cancel it or wait")
        previous_system = self.system
        if system:
            self._change({"kind": "system", "content": system})
        # Only reserved, in memory: its "begin" record waits for its first event, so that a
        # refusal leaves no trace.
        self.requests += 1
        self.running = RunningGeneration(
            f"r{self.requests}", user_text, previous_system=previous_system
        )
        return self.running

    def abandon_generation(self, running: RunningGeneration) -> None:
        """Undo :meth:`begin_generation` for a request refused before it started.

        A refusal (busy, context_too_long) must not change the session: the
        system message it brought is withdrawn and its request id is free again.
        """
        if self.running is not running:
            return
        self.running = None
        self.requests -= 1
        if self.system != running.previous_system:
            self._change({"kind": "system", "content": running.previous_system})

    def on_generation_event(self, running: RunningGeneration, event: GenerationEvent) -> None:
        """Turn an engine event into a buffered protocol event (runs on the event loop)."""
        request_id = running.request_id
        cancelled = isinstance(event, Finished) and event.finish_reason == "cancelled"
        if cancelled and not running.cancel_requested:  # the server's doing: a shutdown's drain
            event = Failed(
                Interrupted("the server stopped before this answer was complete; its part is kept")
            )
        message: messages.Message
        if isinstance(event, Started):
            message = messages.Start(
                request_id=request_id,
                tokens_in=event.tokens_in,
                max_tokens=event.max_tokens,
                dropped_turns=running.dropped_turns,
                max_tokens_requested=running.requested_max_tokens,
            )
        elif isinstance(event, TokenText):
            message = messages.Token(request_id=request_id, data=event.text)
        elif isinstance(event, Finished):
            message = messages.Done(
                request_id=request_id,
                total_tokens=event.total_tokens,
                finish_reason=event.finish_reason,
                ttft_ms=round(event.ttft_ms, 1),
                tokens_per_s=round(event.tokens_per_s, 1),
                history_dropped=self._finish(running),
            )
        else:
            self._finish(running, keep_turn=bool(running.pieces))
            message = messages.Error.from_exception(event.error, request_id=request_id)
        self.append_event(message.to_wire())

    def _finish(self, running: RunningGeneration, keep_turn: bool = True) -> int:
        """Keep the exchange; return how many old ones the history cap dropped for it.

        The generation itself ends with its last event (done or error), which follows.
        """
        dropped = 0
        if keep_turn:
            answer = "".join(running.pieces)
            for turn in (
                {"role": "user", "content": running.user_text},
                {"role": "assistant", "content": answer},
            ):
                before = len(self.messages)
                self._change({"kind": "message", "message": turn})
                dropped += (before + 1 - len(self.messages)) // 2  # the cap drops exchanges
        self.touch()
        return dropped

    def end_interrupted(self) -> None:
        """After a restart: end the generation that the daemon's stop cut off, keeping its part."""
        if self.running is not None:
            # A crash can lose the last token records after their events reached the client,
            # whose last_seq is then ahead of the log: jump past any seq it may have seen, so
            # the `interrupted` error is never taken for one it already has.
            self.next_seq += SEQ_GAP_AFTER_CRASH
            error = Interrupted(
                "the server restarted while generating this answer; the part produced before "
                "is kept in the conversation"
            )
            self.on_generation_event(self.running, Failed(error))

    # -- persistence ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole session as one record: what a compacted log starts with."""
        running = self.running if self.running is not None and self.running.on_disk else None
        return {
            "kind": "snapshot",
            "created_at": self.created_at,
            "last_active": self.last_active,
            "token_id": self.token_id,
            "address": self.address,
            "system": self.system,
            "messages": self.messages,
            "settings": self.settings.to_dict(),
            "events": self.events,
            "next_seq": self.next_seq,
            "requests": self.requests,
            "acked_through": self.acked_through,
            "dropped_through": self.dropped_through,
            "running": None
            if running is None
            else {
                "request_id": running.request_id,
                "user": running.user_text,
                "pieces": running.pieces,
            },
        }

    def _change(self, record: Record, write: bool = True) -> None:
        """Make the change ``record`` describes and (``write``) append it to the log."""
        record["t"] = time.time()
        self.apply(record)
        if write:
            self.store.record(self, record)

    def apply(self, record: Record) -> None:
        """Make the change one record describes: live, as it is made, and on replay.

        The only code that changes a session's logged state, so that what is
        replayed is what was done.
        """
        kind = record["kind"]
        self.last_active = max(self.last_active, record.get("t", 0.0))
        if kind == "snapshot":
            self.created_at = record["created_at"]
            self.last_active = record["last_active"]
            self.token_id = record.get("token_id")
            self.address = record.get("address")
            self.system = record["system"]
            self.messages = list(record["messages"])
            self.settings = GenerationSettings().merge(record["settings"])
            self.events = list(record["events"])
            self.next_seq = record["next_seq"]
            self.requests = record["requests"]
            self.acked_through = record["acked_through"]
            self.dropped_through = record["dropped_through"]
            running = record["running"]
            self.running = (
                None
                if running is None
                else RunningGeneration(
                    running["request_id"], running["user"], pieces=running["pieces"], on_disk=True
                )
            )
        elif kind == "event":
            event = record["event"]
            self._add_event(event)
            running = self.running
            if running is not None and event.get("request_id") == running.request_id:
                if event["type"] == "token":
                    running.pieces.append(event["data"])
                elif event["type"] in ("done", "error"):
                    self.running = None
        elif kind == "begin":
            self.requests = max(self.requests, int(record["request_id"].lstrip("r")))
            running = self.running
            if running is None or running.on_disk:  # replayed: the log's own generation
                running = self.running = RunningGeneration(record["request_id"], record["user"])
            running.on_disk = True  # live: the one begin_generation reserved
        elif kind == "ack":
            self._drop_through(record["seq"])
            self.acked_through = max(self.acked_through, record["seq"])
        elif kind == "message":
            self._add_message(record["message"])
        elif kind == "system":
            self.system = record["content"]
        elif kind == "settings":
            self.settings = GenerationSettings().merge(record["settings"])
        elif kind == "reset":
            self.system = ""
            self.messages.clear()
        elif kind != "touch":
            raise ValueError(f"unknown record kind {kind!r}")

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
