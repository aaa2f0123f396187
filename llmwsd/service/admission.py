"""Admission control: refuse what can never fit, queue what cannot fit yet.

Everything here runs on the event loop, before any compute. A request first
meets the context limit (:meth:`Admission.allowed_new_tokens`): a prompt that
leaves no room is ``context_too_long``; one that leaves less room than its
``max_new_tokens`` is refused or gets fewer (``[limits] on_overflow``). Then it
reserves its worst case in memory (:class:`~llmwsd.engines.memory.MemoryEstimate`):
while the running requests and it would not fit together, it waits in a bounded
FIFO queue and hears its position. Its reservation is released by its last
event (done, error, cancelled), whoever ended it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from llmwsd.config import LimitsConfig
from llmwsd.engines.interface import (
    EngineLike,
    EventCallback,
    Failed,
    Finished,
    GenerationEvent,
    GenerationHandle,
    GenerationRequest,
)
from llmwsd.engines.memory import MemoryEstimate
from llmwsd.errors import Busy, ContextTooLong, Interrupted

log = logging.getLogger("llmwsd.admission")

QueuedCallback = Callable[[int], None]  # called with the queue position, 1 = next


class Ticket:
    """One request's place: waiting for memory, running in the engine, then done."""

    def __init__(
        self,
        admission: Admission,
        request: GenerationRequest,
        prompt_tokens: int,
        on_event: EventCallback,
        on_queued: QueuedCallback,
    ) -> None:
        self.admission = admission
        self.request = request
        self.request_id = request.request_id
        # What it may grow to: the prompt plus every token it may generate.
        self.shape = (prompt_tokens, prompt_tokens + request.settings.max_new_tokens)
        self.on_event = on_event
        self.on_queued = on_queued
        self.state = "new"  # new, waiting, running, done
        self.position = 0
        self.handle: GenerationHandle | None = None

    def cancel(self) -> None:
        if self.state == "waiting":
            self.deliver(Finished(0, "cancelled", 0.0, 0.0))
        elif self.handle is not None:
            self.handle.cancel()

    def deliver(self, event: GenerationEvent) -> None:
        """Pass an event on; the last one releases the reservation first."""
        if isinstance(event, Finished | Failed):
            if self.state == "done":
                return
            self.admission.release(self)
        self.on_event(event)


class Admission:
    def __init__(
        self, engine: EngineLike, limits: LimitsConfig, estimate: MemoryEstimate | None
    ) -> None:
        self.engine = engine
        self.max_queue = limits.max_queue
        self.on_overflow = limits.on_overflow
        self.estimate = estimate  # None (a fake engine): no memory reservations
        self._running: dict[Ticket, None] = {}  # insertion-ordered set
        self._waiting: collections.deque[Ticket] = collections.deque()

    # -- the context limit -----------------------------------------------------------

    def allowed_new_tokens(self, input_length: int, max_new_tokens: int) -> int:
        """``max_new_tokens``, or fewer so that the answer fits; ContextTooLong when none fits."""
        max_context = self.engine.info.max_context
        if input_length >= max_context:
            raise ContextTooLong(input_length, max_context)
        room = max_context - input_length
        if max_new_tokens <= room:
            return max_new_tokens
        if self.on_overflow == "refuse":
            raise ContextTooLong(input_length, max_context, max_new_tokens)
        return room

    # -- memory reservations ---------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        prompt_tokens: int,
        on_event: EventCallback,
        on_queued: QueuedCallback,
    ) -> Ticket:
        """Start ``request`` now, or queue it until memory frees up (Busy: the queue is full)."""
        ticket = Ticket(self, request, prompt_tokens, on_event, on_queued)
        if not self._waiting and self._fits(ticket):
            self._start(ticket)
            return ticket
        if len(self._waiting) >= self.max_queue:
            raise Busy(
                f"the server is at its memory limit and {len(self._waiting)} requests are "
                "waiting: retry later"
            )
        ticket.state = "waiting"
        self._waiting.append(ticket)
        log.info("request %s waits for memory (position %d)", ticket.request_id, len(self._waiting))
        self._announce_positions()
        return ticket

    def _fits(self, ticket: Ticket) -> bool:
        if self.estimate is None:
            return True
        shapes = [t.shape for t in self._running] + [ticket.shape]
        return self.estimate.batch_bytes(shapes) <= self.estimate.budget_bytes

    def _start(self, ticket: Ticket) -> None:
        ticket.state = "running"
        self._running[ticket] = None
        try:
            ticket.handle = self.engine.submit(ticket.request, ticket.deliver)
        except Exception as e:
            log.error("submitting %s to the engine failed", ticket.request_id, exc_info=True)
            ticket.deliver(Failed(Interrupted(f"the engine did not take the request: {e}")))

    def release(self, ticket: Ticket) -> None:
        """The ticket is done: free its place and start whoever now fits, in order."""
        if ticket.state == "waiting":
            self._waiting.remove(ticket)
        elif ticket.state == "running":
            del self._running[ticket]
            while self._waiting and self._fits(self._waiting[0]):
                self._start(self._waiting.popleft())
        ticket.state = "done"
        self._announce_positions()

    def _announce_positions(self) -> None:
        for position, ticket in enumerate(self._waiting, 1):
            if ticket.position != position:
                ticket.position = position
                ticket.on_queued(position)

    def close(self) -> None:
        """Shutting down: whoever still waits will not start."""
        for ticket in list(self._waiting):
            ticket.deliver(Failed(Interrupted("the daemon is shutting down")))

    # -- reports ---------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        if self.estimate is None:
            return 0
        return self.estimate.batch_bytes(t.shape for t in self._running)

    def stats(self) -> dict[str, Any]:
        budget = self.estimate.budget_bytes if self.estimate is not None else 0
        reserved = self.reserved_bytes
        return {
            "admitted": len(self._running),
            "waiting_for_memory": len(self._waiting),
            "reserved_bytes": reserved,
            "kv_usage_ratio": round(reserved / budget, 4) if budget else 0.0,
        }
