"""Admission control: queue what cannot fit in memory yet.

Everything here runs on the event loop, before any compute. A request comes with
its prompt's ids and a max_new_tokens that fits the context
(:func:`llmwsd.service.context.with_budget`). It reserves its worst case in the
engine's capacity (:class:`~llmwsd.engines.memory.Capacity`: left-padded rows ×
the longest for the transformers engine, KV-cache blocks for vLLM): while the
running requests and it would not fit together, it waits in a bounded FIFO queue
and hears its position. Its reservation is released by its last event (done,
error, cancelled), whoever ended it. When the engine changes, the waiting requests
move to the next engine's admission (:class:`~llmwsd.service.model_slot.ModelSlot`).
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
from llmwsd.engines.memory import Capacity
from llmwsd.errors import Busy, Interrupted, LLMWSError

log = logging.getLogger("llmwsd.admission")

QueuedCallback = Callable[[int], None]  # called with the queue position, 1 = next


class Ticket:
    """One request's place: waiting for memory, running in the engine, then done."""

    def __init__(
        self,
        admission: Admission,
        request: GenerationRequest,
        on_event: EventCallback,
        on_queued: QueuedCallback,
    ) -> None:
        self.admission = admission
        self.request_id = request.request_id
        self.on_event = on_event
        self.on_queued = on_queued
        self.state = "new"  # new, waiting, running, done
        self.position = 0
        self.handle: GenerationHandle | None = None
        self.retarget(request)

    def retarget(self, request: GenerationRequest) -> None:
        """Take ``request`` (the same one, tokenized for another engine) as what to run."""
        assert request.prompt_ids is not None  # counted by the service
        self.request = request
        prompt = len(request.prompt_ids)
        # What it may grow to: the prompt plus every token it may generate.
        self.shape = (prompt, prompt + request.settings.max_new_tokens)

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
    def __init__(self, engine: EngineLike, limits: LimitsConfig) -> None:
        self.engine = engine
        self.max_queue = limits.max_queue
        self._running: dict[Ticket, None] = {}  # insertion-ordered set
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._held = False  # the engine is going: nobody else starts on it

    # -- memory reservations ---------------------------------------------------------

    def submit(
        self, request: GenerationRequest, on_event: EventCallback, on_queued: QueuedCallback
    ) -> Ticket:
        """Start ``request`` now, or queue it until memory frees up (Busy: the queue is full)."""
        ticket = Ticket(self, request, on_event, on_queued)
        if not self._waiting and self._fits(ticket):
            self._start(ticket)
            return ticket
        if len(self._waiting) >= self.max_queue:
            raise Busy(
                f"the server is at its memory limit and {len(self._waiting)} requests are "
                "waiting: retry later"
            )
        self._wait(ticket)
        return ticket

    def _wait(self, ticket: Ticket) -> None:
        ticket.state = "waiting"
        self._waiting.append(ticket)
        log.info("request %s waits for memory (position %d)", ticket.request_id, len(self._waiting))
        self._announce_positions()

    def adopt(self, ticket: Ticket) -> None:
        """Take over a ticket that waited in the previous engine's admission (in order)."""
        if ticket.state == "done":
            return  # cancelled while it moved
        ticket.admission = self
        if not self._waiting and self._fits(ticket):
            self._start(ticket)
        else:
            self._wait(ticket)  # already queued once: not refused for a full queue

    @property
    def estimate(self) -> Capacity | None:
        """The engine's capacity; None (a fake engine): no memory reservations."""
        return self.engine.info.memory

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
            if ticket in self._waiting:  # else it is moving to the next engine's admission
                self._waiting.remove(ticket)
        elif ticket.state == "running":
            del self._running[ticket]
            while not self._held and self._waiting and self._fits(self._waiting[0]):
                self._start(self._waiting.popleft())
        ticket.state = "done"
        self._announce_positions()

    def _announce_positions(self) -> None:
        for position, ticket in enumerate(self._waiting, 1):
            if ticket.position != position:
                ticket.position = position
                ticket.on_queued(position)

    def hold(self) -> None:
        """The engine is going away: whoever waits stays waiting, for the next one."""
        self._held = True

    def hand_over(self) -> list[Ticket]:
        """The waiting tickets, in order, for the next engine's admission; none left here."""
        self._held = True
        waiting, self._waiting = list(self._waiting), collections.deque()
        return waiting

    def close(self, reason: LLMWSError) -> None:
        """No engine will come for whoever still waits: they end with ``reason``."""
        self._held = True
        for ticket in list(self._waiting):
            ticket.deliver(Failed(reason))

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
