"""The model slot: the engine that serves, its admission control, and the state around it.

One object owns everything that changes when a model loads, switches or goes away:
the engine, its :class:`~llmwsd.service.admission.Admission`, the state clients are
told (:class:`ModelState`), the last load's error, and whether requests may start
now or must wait for a switch that had to unload the old model first. Requests
still waiting for memory when the engine changes move to the new one (tokenized
again for it) instead of starting on the old, draining engine.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmwsd.config import LimitsConfig
from llmwsd.engines.interface import EngineLike, Failed
from llmwsd.errors import Interrupted, LLMWSError, NoModel
from llmwsd.service import context
from llmwsd.service.admission import Admission, Ticket
from llmwsd.service.defaults import model_recommendation

log = logging.getLogger("llmwsd.models")


class ModelState(enum.StrEnum):
    LOADING = "loading"  # the first model is loading
    READY = "ready"
    SWITCHING = "switching"  # the old model is unloaded, the next one is loading
    NONE = "none"  # no model to serve
    FAILED = "failed"  # the last load failed and nothing serves


NO_MODEL_REASONS = {
    ModelState.LOADING: "the model is still loading; retry in a moment",
    ModelState.SWITCHING: "the server is switching models; retry in a moment",
    ModelState.NONE: "no model is loaded: add one to a model folder or pull one with llmwsctl",
}


class ModelSlot:
    def __init__(self, limits: LimitsConfig, on_change: Callable[[dict[str, Any]], None]) -> None:
        self.limits = limits
        self.state = ModelState.LOADING
        self.error = ""  # why the last load failed, while state is FAILED
        self._engine: EngineLike | None = None
        # The serving model's own sampling settings (its generation_config.json).
        self.recommended: dict[str, Any] = {}
        self._admission: Admission | None = None
        self._on_change = on_change  # told the new model's recommended settings ({}: none)
        # Cleared while no engine can take requests during a switch: new requests wait
        # on it and are then served by the new model.
        self._settled = asyncio.Event()
        self._settled.set()
        self._closed = False  # shutting down: no engine is served any more

    @property
    def engine(self) -> EngineLike | None:
        return self._engine

    @property
    def admission(self) -> Admission | None:
        return self._admission

    def require(self) -> tuple[EngineLike, Admission]:
        """The serving engine and its admission; NoModel saying why there is none."""
        if self._engine is None or self._admission is None:
            raise NoModel(self.no_model_reason())
        return self._engine, self._admission

    def no_model_reason(self) -> str:
        if self.state == ModelState.FAILED:
            return self.error
        return NO_MODEL_REASONS.get(self.state, NO_MODEL_REASONS[ModelState.NONE])

    async def wait_settled(self) -> None:
        await self._settled.wait()

    def unsettle(self) -> None:
        """From now on new requests wait (a switch that must unload first)."""
        self._settled.clear()
        if self._admission is not None:
            self._admission.hold()  # waiting requests wait for the next engine

    async def serve(self, engine: EngineLike) -> EngineLike | None:
        """Serve ``engine`` from now on; the previous engine, still to drain and close.

        After :meth:`close` (shutting down) a model that finished loading is closed
        instead: a switch still running then fails ``interrupted``.
        """
        if self._closed:
            await engine.close()
            raise Interrupted("the daemon is shutting down")
        admission = Admission(engine, self.limits)
        moving = self._admission.hand_over() if self._admission is not None else []
        # Tokenized again for the new model, in order, before anyone new can queue.
        retargeted = [await self._retarget(ticket, engine) for ticket in moving]
        recommended = await asyncio.to_thread(model_recommendation, Path(engine.info.path))
        previous, self._engine, self._admission = self._engine, engine, admission
        self.recommended = recommended
        self.state, self.error = ModelState.READY, ""
        for ticket in retargeted:
            if ticket is not None:
                admission.adopt(ticket)
        self._on_change(recommended)
        return previous

    async def _retarget(self, ticket: Ticket, engine: EngineLike) -> Ticket | None:
        if ticket.state == "done":
            return None  # cancelled while it waited for the switch
        try:
            ids = await asyncio.to_thread(
                engine.tokenize, ticket.request.messages, ticket.request.tools
            )
            request = context.with_budget(
                ticket.request, ids, engine.info.max_context, self.limits.on_overflow
            )
        except LLMWSError as e:
            ticket.deliver(Failed(e))
            return None
        except Exception as e:
            log.error("cannot move request %s to the new model", ticket.request_id, exc_info=True)
            ticket.deliver(Failed(NoModel(f"the model changed and the request failed: {e}")))
            return None
        ticket.retarget(request)
        return ticket

    def vacate(self, state: ModelState, error: str = "") -> EngineLike | None:
        """Serve nothing from now on (``state`` says why); the engine that served, if any.

        Requests waiting for memory stay held for the next engine while a switch is
        under way (:meth:`unsettle`), and fail once it settles without one.
        """
        previous, self._engine = self._engine, None
        self.recommended = {}
        self.state, self.error = state, error
        if self._settled.is_set():
            self._fail_waiting(NoModel(self.no_model_reason()))
        self._on_change(self.recommended)
        return previous

    def settle(self) -> None:
        if self._engine is None:
            self._fail_waiting(NoModel(self.no_model_reason()))
        self._settled.set()

    def close(self) -> None:
        """Shutting down: whoever still waits for memory will not start, nor will a model."""
        self._closed = True
        self._fail_waiting(Interrupted("the daemon is shutting down"))

    def _fail_waiting(self, reason: LLMWSError) -> None:
        if self._admission is not None:
            self._admission.close(reason)
            if self._engine is None:
                self._admission = None
