"""A stuck engine is seen (/healthz, status, watchdog), its answers end; the loop never blocks.

The engine here is tests/fake_engine.py, wedged the way a hung engine thread is: its
steps stop while the event loop runs on. tests/test_engine.py does the same to the
real engine's thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from llmwsd import auth, resources
from llmwsd.daemon import Daemon
from llmwsd.engines.interface import (
    EventStream,
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Heartbeat,
    Started,
    TokenText,
)
from llmwsd.errors import Interrupted
from llmwsd.protocol import admin as adminproto
from llmwsd.service import health
from llmwsd.settings import GenerationSettings
from llmwsd.systemd import Notifier
from tests.conftest import FAST, eventually, recv_until, within
from tests.fake_engine import FakeEngine
from tests.test_memory import connect
from tests.test_protocol import http_exchange

STUCK_AFTER = 0.3  # seconds: short, so that the tests see it soon


def request(words: int = 50) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": "w " * words}], GenerationSettings())


class Events:
    """One request's events, as its callback received them."""

    def __init__(self) -> None:
        self.received: list[GenerationEvent] = []

    def __call__(self, event: GenerationEvent) -> None:
        self.received.append(event)

    @property
    def ends(self) -> list[GenerationEvent]:
        return [e for e in self.received if isinstance(e, Finished | Failed)]


# -- the heartbeat ---------------------------------------------------------------------------


def test_only_a_busy_engine_can_be_stuck() -> None:
    assert not Heartbeat(age_s=3600, busy=False).stuck(60)  # idle, waiting for work: alive
    assert not Heartbeat(age_s=59, busy=True).stuck(60)  # a long step
    assert Heartbeat(age_s=61, busy=True).stuck(60)


def test_a_stream_delivers_nothing_after_its_last_event() -> None:
    events = Events()
    stream = EventStream(events)
    stream(Started(3, 10))
    stream(Failed(Interrupted("stuck")))
    stream(TokenText("late"))
    stream(Finished(1, "cancelled", 0, 0))
    assert [type(e) for e in events.received] == [Started, Failed] and stream.ended


async def test_health_of_a_fake_engine_that_wedges() -> None:
    engine = FakeEngine(token_delay=0.005)
    monitor = health.HealthMonitor(lambda: engine, STUCK_AFTER)
    assert monitor.healthz("ready", "") == (True, {"status": "ok", "model": "fake-model"})
    assert monitor.figures()["engine_stuck"] is False and monitor.alive()
    events = Events()
    engine.submit(request(), events)
    await eventually(lambda: any(isinstance(e, TokenText) for e in events.received), FAST, "token")
    engine.wedge()
    await eventually(lambda: not monitor.alive(), FAST, "the wedged engine seen as stuck")
    ready, body = monitor.healthz("ready", "")
    assert not ready and body["status"] == "stuck" and body["engine"] == "stuck", body
    assert body["heartbeat_age_s"] >= STUCK_AFTER and body["model"] == "fake-model"
    figures = monitor.figures()
    assert figures["engine_stuck"] and figures["engine_busy"], figures
    assert figures["engine_heartbeat_age_s"] >= STUCK_AFTER

    assert monitor.check() is True
    (end,) = events.ends
    assert isinstance(end, Failed) and end.error.code == "interrupted", end
    assert monitor.check() is True and len(events.ends) == 1  # abandoned once, not each look
    # While stuck, new requests are refused at once instead of queueing behind the hang.
    refused = Events()
    engine.submit(request(), refused)
    await eventually(lambda: refused.ends, FAST, "refusal of a request to a stuck engine")
    assert isinstance(refused.ends[0], Failed) and refused.ends[0].error.code == "interrupted"

    engine.release()  # it comes back: what the stuck step still sends goes nowhere
    await eventually(lambda: not engine.tasks, FAST, "the released engine's steps ending")
    assert len(events.ends) == 1 and monitor.alive() and monitor.check() is False
    served = Events()
    engine.submit(request(3), served)
    await eventually(lambda: served.ends, FAST, "an answer after the recovery")
    assert isinstance(served.ends[0], Finished), served.received


async def test_healthz_without_an_engine_says_why() -> None:
    ready, body = health.healthz(None, "loading", "the model is loading", STUCK_AFTER)
    assert not ready
    assert body == {"status": "loading", "model": None, "reason": "the model is loading"}
    assert health.figures(None, STUCK_AFTER) == {
        "engine_heartbeat_age_s": None,
        "engine_busy": False,
        "engine_stuck": False,
        "engine_failure": None,
    }


async def test_a_dead_engine_is_out_of_service_at_once() -> None:
    engine = FakeEngine()
    monitor = health.HealthMonitor(lambda: engine, STUCK_AFTER)
    assert monitor.alive()
    engine.failure = "the vLLM engine died: gone"  # idle, and its last turn just now
    ready, body = monitor.healthz("ready", "")
    assert not ready
    assert (body["status"], body["engine"], body["reason"]) == ("dead", "dead", engine.failure)
    assert not monitor.alive()  # the watchdog stops: systemd restarts the daemon
    assert monitor.figures()["engine_failure"] == engine.failure
    assert monitor.figures()["engine_stuck"] is True


async def test_an_idle_engine_is_never_stuck() -> None:
    engine = FakeEngine()
    engine.wedge()  # no work: the wedge is never reached
    await asyncio.sleep(STUCK_AFTER * 2)
    assert not health.is_stuck(engine, STUCK_AFTER)


# -- the watchdog ----------------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: a datagram socket the test reads."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return received

    def close(self) -> None:
        self.sock.close()


async def test_the_watchdog_pings_only_while_the_engine_is_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = NotifySocket(tmp_path)
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # a ping every 20 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    engine = FakeEngine(token_delay=0.005)
    monitor = health.HealthMonitor(lambda: engine, STUCK_AFTER)
    notifier = Notifier(str(listener.path))
    notifier.start_watchdog(alive=monitor.alive)
    try:
        await eventually(lambda: "WATCHDOG=1" in listener.drain(), FAST, "a watchdog ping")
        engine.submit(request(), Events())
        engine.wedge()
        await eventually(lambda: not monitor.alive(), FAST, "the engine seen as stuck")
        listener.drain()
        # Several intervals with a stuck engine: not one ping.
        for _ in range(10):
            await asyncio.sleep(0.02)
            assert monitor.alive() or "WATCHDOG=1" not in listener.drain()
        engine.release()
        await eventually(lambda: "WATCHDOG=1" in listener.drain(), FAST, "pings after recovery")
    finally:
        notifier.stop_watchdog()
        engine.release()
        listener.close()


async def test_the_watchdog_waits_for_the_service_manager_not_the_loop(tmp_path: Path) -> None:
    """A service manager that reads nothing fills the socket's queue: notify drops, not blocks."""
    listener = NotifySocket(tmp_path)
    notifier = Notifier(str(listener.path))

    def flood() -> None:
        for _ in range(1000):  # far more than a datagram queue holds (net.unix.max_dgram_qlen)
            notifier.notify("WATCHDOG=1")

    try:
        await within(asyncio.to_thread(flood), FAST, "notifications to a full queue")
    finally:
        listener.close()


# -- in the daemon ---------------------------------------------------------------------------


async def test_a_stuck_engine_ends_the_stream_with_interrupted(fake_daemon: Daemon) -> None:
    monitor = health.HealthMonitor(lambda: fake_daemon.slot.engine, STUCK_AFTER)
    monitor.start()
    try:
        ws = await connect(fake_daemon)
        await ws.send(
            json.dumps({"type": "inference", "prompt": {"system": "", "user": "w " * 200}})
        )
        await recv_until(ws, {"token"})
        engine = fake_daemon.slot.engine
        assert isinstance(engine, FakeEngine)
        engine.wedge()
        events = await recv_until(ws, {"error", "done"}, timeout=FAST)
        assert events[-1]["type"] == "error" and events[-1]["code"] == "interrupted", events[-1]
        ready, body = monitor.healthz(fake_daemon.slot.state, "")
        assert not ready and body["engine"] == "stuck"
        assert monitor.figures()["engine_stuck"]
        engine.release()
        await eventually(monitor.alive, FAST, "the engine alive again")
        # The stuck step's late events went nowhere: the next answer comes whole.
        await ws.send(json.dumps({"type": "inference", "prompt": {"system": "", "user": "hi"}}))
        events = await recv_until(ws, {"done", "error"})
        assert events[-1]["type"] == "done", events
        assert all(e["type"] != "error" for e in events)
        await ws.close()
    finally:
        engine.release()
        await monitor.close()


async def test_healthz_answers_503_for_a_stuck_engine(fake_daemon_factory: Any) -> None:
    daemon = await fake_daemon_factory(engine={"stuck_timeout": STUCK_AFTER})
    engine = daemon.slot.engine
    assert isinstance(engine, FakeEngine)
    engine.submit(request(), Events())
    engine.wedge()
    get = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{daemon.server.port}\r\n\r\n".encode()
    try:

        async def answer() -> tuple[int | None, dict[str, str], bytes]:
            while True:
                status, headers, body = await http_exchange(daemon.server.port, get)
                if status != 200:
                    return status, headers, body
                await asyncio.sleep(0.05)

        status, _, body = await within(answer(), FAST, "/healthz turning 503")
        assert status == 503 and json.loads(body)["engine"] == "stuck"
    finally:
        engine.release()


# -- nothing blocks the loop -----------------------------------------------------------------


def blocking_nvml(entered: threading.Event, release: threading.Event) -> types.ModuleType:
    """An NVML whose init hangs until released, as a sick driver's can."""

    def init() -> None:
        entered.set()
        release.wait(FAST)

    return types.SimpleNamespace(nvmlInit=init, nvmlDeviceGetCount=lambda: 0)  # type: ignore[return-value]


async def test_the_resources_report_never_waits_for_nvml() -> None:
    entered, release = threading.Event(), threading.Event()
    loads = []

    def load() -> types.ModuleType:
        loads.append(1)
        return blocking_nvml(entered, release)

    monitor = resources.ResourceMonitor(resources.GpuMonitor(load), refresh_after=0)
    try:
        first = monitor.latest("cpu")  # at once, with the host's figures
        assert first["gpus"] == [] and first["host"]["ram_total_gb"] > 0
        assert first["total_gb"] > 0
        await within(asyncio.to_thread(entered.wait, FAST), FAST, "NVML asked in a thread")
        for _ in range(20):  # asked again and again while NVML hangs: one thread waits, once
            assert monitor.latest("cpu")["gpus"] == [] and monitor.latest_gpus() == []
        assert len(loads) == 1
    finally:
        release.set()
    await eventually(
        lambda: monitor.latest("cpu")["gpu_status"] == "no NVIDIA GPU (NVML sees none)",
        FAST,
        "the measured report",
    )


async def test_fresh_figures_wait_for_nvml_only_so_long() -> None:
    entered, release = threading.Event(), threading.Event()
    monitor = resources.ResourceMonitor(
        resources.GpuMonitor(lambda: blocking_nvml(entered, release)), wait_at_most=0.2
    )
    try:
        report = await within(monitor.refresh("cpu"), FAST, "a report while NVML hangs")
        assert report["gpus"] == [] and "NVML is not answering" in report["gpu_status"]
        assert report["host"]["ram_total_gb"] > 0
    finally:
        release.set()
    monitor.wait_at_most = FAST
    report = await within(monitor.refresh("cpu"), FAST, "a report once NVML answers")
    assert report["gpu_status"] == "no NVIDIA GPU (NVML sees none)"


class HangingNvml:
    """The machine's GPU monitor made to hang in every NVML query, for a while."""

    def __init__(self) -> None:
        self.entered, self.release, self.returned = (threading.Event() for _ in range(3))

    def report(self) -> tuple[list[dict[str, Any]], str]:
        self.entered.set()
        self.release.wait(2.0)  # long enough to tell; short, since a blocked loop waits it out
        self.returned.set()
        return [], "no NVIDIA GPU"


@pytest.fixture
def hanging_nvml(monkeypatch: pytest.MonkeyPatch):
    hanging = HangingNvml()
    monkeypatch.setattr(resources.GPUS, "report", hanging.report)
    monkeypatch.setattr(resources, "MONITOR", resources.ResourceMonitor(resources.GPUS, 0))
    yield hanging
    hanging.release.set()


async def test_a_hanging_nvml_delays_no_welcome(fake_daemon: Daemon, hanging_nvml) -> None:
    ws = await within(connect(fake_daemon), FAST, "welcome while NVML hangs")
    await ws.close()
    assert not hanging_nvml.returned.is_set()


async def test_a_hanging_nvml_delays_no_metrics_scrape(fake_daemon: Daemon, hanging_nvml) -> None:
    get = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{fake_daemon.server.port}\r\n\r\n"
    status, _, _ = await within(
        http_exchange(fake_daemon.server.port, get.encode()), FAST, "/metrics while NVML hangs"
    )
    assert status == 200 and not hanging_nvml.returned.is_set()


async def test_token_add_fsyncs_off_the_loop(fake_daemon_factory: Any, tmp_path: Path, monkeypatch):
    daemon = await fake_daemon_factory(api={"tokens_file": str(tmp_path / "tokens.json")})
    entered, release, synced = threading.Event(), threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(FAST)
            synced.set()
        real_fsync(fd)

    monkeypatch.setattr(auth.os, "fsync", slow_fsync)
    from llmwsctl.adminclient import AdminClient

    def add() -> dict[str, Any]:
        with AdminClient.connect(str(daemon.admin.path)) as client:
            return client.call(adminproto.TOKEN_ADD, {"name": "alice"})

    adding = asyncio.create_task(asyncio.to_thread(add))
    try:
        await within(asyncio.to_thread(entered.wait, FAST), FAST, "the token file's fsync")
        get = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{daemon.server.port}\r\n\r\n".encode()
        status, _, _ = await within(http_exchange(daemon.server.port, get), FAST, "/healthz")
        assert status == 200 and not synced.is_set()  # answered while the fsync waited
    finally:
        release.set()
    added = await within(adding, FAST, "the token added")
    assert added["name"] == "alice" and added["token"].startswith(auth.TOKEN_PREFIX)
    assert [e.name for e in daemon.server.gate.auth.access.entries] == ["alice"]
