"""Whether the daemon is healthy, from the engine's heartbeat: /healthz, status, the watchdog.

An engine with work whose loop has not turned for ``[engine] stuck_timeout``
seconds is stuck: a CUDA call that never returns, a deadlock in its thread. An
idle engine waiting for work is alive, however long ago its loop last turned.
A stuck engine makes /healthz answer 503, ``llmwsctl status`` say so, and the
systemd watchdog stop pinging, so that systemd restarts the daemon; its running
and queued requests end with ``interrupted`` at once, since its own thread
cannot end them (:meth:`HealthMonitor.check`). An engine that says it died (vLLM's
engine process gone: :attr:`~llmwsd.engines.interface.Heartbeat.failure`) counts
as stuck at once.

The functions are pure reads of the engine; :class:`HealthMonitor` holds the
setting and the one piece of state, which engine was last found stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from llmwsd.engines.interface import EngineLike
from llmwsd.errors import Interrupted

log = logging.getLogger("llmwsd.health")

# The monitor looks this often (a quarter of stuck_timeout when that is shorter), so a
# stuck engine is acted on at most this long after it counts as stuck.
CHECK_EVERY_S = 5.0
MIN_CHECK_EVERY_S = 0.05

EngineSource = Callable[[], EngineLike | None]


def is_stuck(engine: EngineLike | None, stuck_timeout: float) -> bool:
    return engine is not None and engine.heartbeat().stuck(stuck_timeout)


def healthz(
    engine: EngineLike | None, model_state: str, reason: str, stuck_timeout: float
) -> tuple[bool, dict[str, Any]]:
    """/healthz: (ready, body). 200 with a model whose engine is alive, else 503 with a reason.

    ``model_state`` and ``reason`` say why there is no engine (loading, none, failed).
    """
    if engine is None:
        return False, {"status": model_state, "model": None, "reason": reason}
    beat = engine.heartbeat()
    if beat.stuck(stuck_timeout):
        state = "dead" if beat.failure is not None else "stuck"
        return False, {
            "status": state,
            "model": engine.info.name,
            "engine": state,
            "heartbeat_age_s": round(beat.age_s, 1),
            "reason": beat.reason(),
        }
    return True, {"status": "ok", "model": engine.info.name}


def figures(engine: EngineLike | None, stuck_timeout: float) -> dict[str, Any]:
    """For ``llmwsctl status``: the heartbeat's age (idle or not), and whether it is stuck."""
    if engine is None:
        return {
            "engine_heartbeat_age_s": None,
            "engine_busy": False,
            "engine_stuck": False,
            "engine_failure": None,
        }
    beat = engine.heartbeat()
    return {
        "engine_heartbeat_age_s": round(beat.age_s, 1),
        "engine_busy": beat.busy,
        "engine_stuck": beat.stuck(stuck_timeout),
        "engine_failure": beat.failure,
    }


class HealthMonitor:
    """Looks at the engine every few seconds and acts when it turns stuck or comes back.

    Wiring: ``start()`` once the loop runs, ``alive`` as the watchdog's predicate,
    ``healthz``/``figures`` for the reports, ``close()`` at shutdown.
    """

    def __init__(self, engine: EngineSource, stuck_timeout: float) -> None:
        self.engine = engine
        self.stuck_timeout = stuck_timeout
        self.check_every = max(MIN_CHECK_EVERY_S, min(CHECK_EVERY_S, stuck_timeout / 4))
        self._stuck: EngineLike | None = None  # the engine last found stuck, till it recovers
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def alive(self) -> bool:
        """The watchdog's predicate: false while the engine is stuck."""
        return not is_stuck(self.engine(), self.stuck_timeout)

    def healthz(self, model_state: str, reason: str) -> tuple[bool, dict[str, Any]]:
        return healthz(self.engine(), model_state, reason, self.stuck_timeout)

    def figures(self) -> dict[str, Any]:
        return figures(self.engine(), self.stuck_timeout)

    def check(self) -> bool:
        """One look: end a newly stuck engine's requests, note a recovery; True if stuck."""
        engine = self.engine()
        beat = engine.heartbeat() if engine is not None else None
        if engine is None or beat is None or not beat.stuck(self.stuck_timeout):
            if self._stuck is not None and self._stuck is engine:
                log.warning("the engine is responding again")
            self._stuck = None
            return False
        if self._stuck is not engine:
            self._stuck = engine
            ended = engine.abandon(Interrupted(beat.reason()))
            why = "" if beat.failure else f" ([engine] stuck_timeout is {self.stuck_timeout:g} s)"
            log.error(
                "%s%s: %d request%s ended with interrupted; "
                "/healthz answers 503 and the watchdog stops, so systemd restarts llmwsd",
                beat.reason(),
                why,
                ended,
                "" if ended == 1 else "s",
            )
        return True

    async def _watch(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a bug here must not end the watching
                log.error("health check failed", exc_info=True)
            await asyncio.sleep(self.check_every)
