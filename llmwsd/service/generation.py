"""The generation path: fit a turn into the context, admit it, run it on the engine.

Frontends call down into here; nothing here knows about sockets. A session's turn
(:meth:`GenerationService.start_turn`) has its history fitted and tokenized once
(:mod:`llmwsd.service.context`); any request (:meth:`GenerationService.submit`) gets
its token budget, waits for a switch in progress to settle, and is admitted by the
serving model's admission control. Every outcome is counted and logged on one line.
"""

from __future__ import annotations

import asyncio
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
    GenerationRequest,
)
from llmwsd.errors import Busy, LLMWSError
from llmwsd.metrics import Metrics
from llmwsd.protocol import messages
from llmwsd.service import context
from llmwsd.service.admission import QueuedCallback, Ticket
from llmwsd.service.model_slot import ModelSlot
from llmwsd.sessions.session import RunningGeneration, Session
from llmwsd.settings import GenerationSettings

log = logging.getLogger("llmwsd")

# Tokenizing takes a moment; a switch swapping the model in meanwhile means once more.
MAX_TOKENIZE_ATTEMPTS = 3


class GenerationService:
    def __init__(self, slot: ModelSlot, limits: LimitsConfig, metrics: Metrics) -> None:
        self.slot = slot
        self.limits = limits
        self.metrics = metrics

    def start_turn(
        self, session: Session, prompt: dict[str, str], overrides: Any = None
    ) -> asyncio.Task[None]:
        """Reserve ``session`` for one turn now; the returned task admits and submits it.

        What the turn takes from the session (its settings, the history, the system
        message, whether another turn runs: Busy) is taken here, synchronously, so a
        message handled after this one cannot change it. The task waits out a switch,
        fits the context and goes through admission; a refusal is its exception, and
        leaves the session as it was. A cancel before the turn has a ticket cancels the
        task, and the turn ends ``cancelled`` without reaching the engine. The task is
        no connection's: like the turn itself, it goes on when the client leaves.
        """
        settings = session.settings.merge(overrides) if overrides is not None else session.settings
        running = session.begin_generation(prompt["user"], prompt["system"])
        history = session.history()
        task = asyncio.create_task(self._admit(session, running, history, prompt["user"], settings))
        running.attach_cancel(task.cancel)

        def settle(task: asyncio.Task[None]) -> None:
            # A cancelled task may not have run a line (a cancel right after the inference).
            if not task.cancelled():
                task.exception()  # the caller answers it; retrieved here if the caller left
            elif running.cancel_requested:
                session.on_generation_event(running, Finished(0, "cancelled", 0.0, 0.0))
            else:
                session.abandon_generation(running)

        task.add_done_callback(settle)
        return task

    async def _admit(
        self,
        session: Session,
        running: RunningGeneration,
        history: list[dict[str, str]],
        user: str,
        settings: GenerationSettings,
    ) -> None:
        """The waiting part of :meth:`start_turn`: its events flow into the session."""

        def on_event(event: GenerationEvent) -> None:
            session.on_generation_event(running, event)

        def on_queued(position: int) -> None:
            queued = messages.Queued(request_id=running.request_id, position=position)
            session.append_event(queued.to_wire())

        try:
            await self.slot.wait_settled()  # during a switch that had to unload first
            engine, _ = self.slot.require()
            turns, dropped, ids = await asyncio.to_thread(
                context.fit_history, engine, history, user, settings
            )
            running.dropped_turns = dropped
            request = GenerationRequest(turns, settings, running.request_id, ids)
            who = f"session {session.id} {running.request_id}"
            ticket = await self.submit(request, on_event, on_queued, who, tokenized_by=engine)
        except Exception:
            session.abandon_generation(running)
            raise
        granted = ticket.request.settings.max_new_tokens
        if granted < settings.max_new_tokens:
            running.requested_max_tokens = settings.max_new_tokens
        running.attach_cancel(ticket.cancel)

    async def submit(
        self,
        request: GenerationRequest,
        on_event: EventCallback,
        on_queued: QueuedCallback | None = None,
        who: str = "a request",
        tokenized_by: EngineLike | None = None,
    ) -> Ticket:
        """Admit ``request`` (now, or after the memory queue) and run it on the engine.

        Refusals (no_model, context_too_long, busy) are raised before any compute. A
        ``max_new_tokens`` that does not fit is lowered in the returned ticket's
        request when ``[limits] on_overflow`` is "truncate". A request comes with its
        prompt's ids from ``tokenized_by``, or is tokenized here, once per model.
        """
        await self.slot.wait_settled()
        try:
            engine, admission = self.slot.require()
            ids = request.prompt_ids
            for _ in range(MAX_TOKENIZE_ATTEMPTS):
                if ids is not None and tokenized_by is engine:
                    break
                # The model changed since (a switch swapped it in): its own tokenizer counts.
                ids = await asyncio.to_thread(engine.tokenize, request.messages, request.tools)
                tokenized_by = engine
                engine, admission = self.slot.require()
            else:
                raise Busy("the model kept changing while the request was counted: retry")
            assert ids is not None
            if request.settings.format is not None:  # one it cannot enforce: before any token
                await asyncio.to_thread(engine.prepare_format, request.settings.format)
            request = context.with_budget(
                request, ids, engine.info.max_context, self.limits.on_overflow
            )
            observe = self.metrics.track()
            outcome = log_outcome(who, len(ids))

            def deliver(event: GenerationEvent) -> None:
                observe(event)
                outcome(event)
                on_event(event)

            return admission.submit(request, deliver, on_queued or (lambda _: None))
        except LLMWSError as e:
            self.metrics.refused(e)
            log.info("%s: refused (%s)", who, e.code)
            raise


def log_outcome(who: str, tokens_in: int) -> Callable[[GenerationEvent], None]:
    """One log line when a request ends: its size, speed and outcome, never its text."""

    def observe(event: GenerationEvent) -> None:
        if isinstance(event, Finished):
            log.info(
                "%s: %s, %d tokens in, %d out, %.1f tokens/s, first token after %.0f ms",
                who,
                event.finish_reason,
                tokens_in,
                event.total_tokens,
                event.tokens_per_s,
                event.ttft_ms,
            )
        elif isinstance(event, Failed):
            log.info("%s: ended with %s, %d tokens in", who, event.error.code, tokens_in)

    return observe
