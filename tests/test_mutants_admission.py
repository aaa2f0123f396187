"""llmwsd.service.admission without a daemon: a stand-in engine and memory estimate.

Written against the mutants `make mutate` found alive (docs/testing.md).
"""

from __future__ import annotations

from typing import Any

import pytest

from llmwsd.config import LimitsConfig
from llmwsd.engines.interface import Failed, Finished, GenerationRequest, ModelInfo
from llmwsd.errors import Busy, Interrupted
from llmwsd.service.admission import Admission
from llmwsd.settings import GenerationSettings


class Handle:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Takes requests and holds them; ``refuse`` makes submit raise."""

    def __init__(self, memory: Any = None, refuse: bool = False) -> None:
        self.info = ModelInfo("m", "/m", "cpu", "float32", 4096, "sdpa", memory=memory)
        self.refuse = refuse
        self.callbacks: dict[str, Any] = {}

    def submit(self, request: GenerationRequest, on_event: Any) -> Handle:
        if self.refuse:
            raise RuntimeError("out of slots")
        self.callbacks[request.request_id] = on_event
        return Handle(request.request_id)


class Estimate:
    """Each request costs its longest length in bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes

    def batch_bytes(self, shapes: Any) -> int:
        return sum(longest for _, longest in shapes)


def request(request_id: str, prompt_tokens: int, max_new_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(
        [{"role": "user", "content": "hi"}],
        GenerationSettings(max_new_tokens=max_new_tokens),
        request_id,
        [0] * prompt_tokens,
    )


class Client:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.positions: list[int] = []

    def on_event(self, event: Any) -> None:
        self.events.append(event)

    def on_queued(self, position: int) -> None:
        self.positions.append(position)


def test_a_cancelled_queued_request_reports_nothing_generated():
    admission = Admission(Engine(Estimate(30)), LimitsConfig(max_queue=4))
    first, second = Client(), Client()
    admission.submit(request("r1", 10), first.on_event, first.on_queued)  # 20 of 30 bytes
    waiting = admission.submit(request("r2", 10), second.on_event, second.on_queued)
    assert second.positions == [1]
    waiting.cancel()
    assert second.events == [Finished(0, "cancelled", 0.0, 0.0)]


def test_a_request_ends_once_whoever_ends_it():
    engine = Engine()
    admission = Admission(engine, LimitsConfig())
    client = Client()
    admission.submit(request("r1", 5), client.on_event, client.on_queued)
    on_event = engine.callbacks["r1"]
    on_event(Finished(3, "stop", 1.0, 2.0))
    on_event(Finished(3, "stop", 1.0, 2.0))  # a late second end, e.g. a cancel's
    on_event(Failed(Busy("late")))
    assert client.events == [Finished(3, "stop", 1.0, 2.0)]
    assert admission.stats()["admitted"] == 0


def test_a_full_queue_says_how_many_wait():
    admission = Admission(Engine(Estimate(20)), LimitsConfig(max_queue=2))
    client = Client()
    admission.submit(request("r1", 10), client.on_event, client.on_queued)
    admission.submit(request("r2", 10), client.on_event, client.on_queued)
    admission.submit(request("r3", 10), client.on_event, client.on_queued)
    with pytest.raises(Busy) as refused:
        admission.submit(request("r4", 10), client.on_event, client.on_queued)
    assert refused.value.message == (
        "the server is at its memory limit and 2 requests are waiting: retry later"
    )


def test_a_request_the_engine_refuses_fails_interrupted_and_frees_its_place():
    admission = Admission(Engine(Estimate(100), refuse=True), LimitsConfig())
    client = Client()
    ticket = admission.submit(request("r1", 10), client.on_event, client.on_queued)
    [failed] = client.events
    assert isinstance(failed, Failed)
    assert failed.error.code == "interrupted"
    assert failed.error.message == "the engine did not take the request: out of slots"
    assert admission.stats()["admitted"] == 0 and admission.reserved_bytes == 0
    ticket.cancel()  # a client's cancel after the refusal changes nothing
    assert len(client.events) == 1


def test_whoever_waits_at_shutdown_is_told_so():
    admission = Admission(Engine(Estimate(20)), LimitsConfig())
    running, waiting = Client(), Client()
    admission.submit(request("r1", 10), running.on_event, running.on_queued)
    admission.submit(request("r2", 10), waiting.on_event, waiting.on_queued)
    admission.close(Interrupted("the daemon is shutting down"))
    assert running.events == []  # the engine's drain ends it
    [failed] = waiting.events
    assert isinstance(failed, Failed)
    assert failed.error.code == "interrupted"
    assert failed.error.message == "the daemon is shutting down"
    assert admission.stats()["waiting_for_memory"] == 0


def test_stats_report_the_reservations():
    admission = Admission(Engine(Estimate(300)), LimitsConfig())
    client = Client()
    admission.submit(request("r1", 90), client.on_event, client.on_queued)  # 100 bytes
    assert admission.stats() == {
        "admitted": 1,
        "waiting_for_memory": 0,
        "reserved_bytes": 100,
        "kv_usage_ratio": 0.3333,
    }
    without_estimate = Admission(Engine(), LimitsConfig())
    without_estimate.submit(request("r1", 90), client.on_event, client.on_queued)
    assert without_estimate.stats() == {
        "admitted": 1,
        "waiting_for_memory": 0,
        "reserved_bytes": 0,
        "kv_usage_ratio": 0.0,
    }
