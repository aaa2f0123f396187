"""What the machine has: the host's CPU and memory, and each NVIDIA GPU through NVML.

NVML comes from the ``nvidia-ml-py`` package (module ``pynvml``) and needs the
driver's libnvidia-ml. Without either there is no GPU to report, which is an
answer ("no NVIDIA GPU"), never an exception. The engine's own figures are added
by the daemon (:meth:`llmwsd.daemon.Daemon.resources`).

NVML calls can block (``nvmlInit`` takes a while, a sick driver longer), so the
event loop never makes them: :data:`MONITOR` keeps the latest report, measured
in a worker thread, and :func:`latest` answers from it at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import psutil

log = logging.getLogger("llmwsd.resources")

GIB = 1024**3
# A report older than this is measured again, in a thread, when next asked for.
REFRESH_AFTER_S = 5.0
# How long a request for fresh figures waits for NVML before it takes the latest.
REFRESH_WAIT_S = 5.0


def _gb(n: float) -> float:
    return round(n / GIB, 3)


def host_report() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        # Since the previous call (the first, at import, primes it): the load between two reports.
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "ram_total_gb": _gb(memory.total),
        "ram_available_gb": _gb(memory.available),
        "ram_used_gb": _gb(memory.total - memory.available),
        "rss_gb": _gb(resident_bytes()),
    }


def resident_bytes() -> int:
    """The daemon's resident memory and its child processes' (vLLM's engine and workers
    hold the model and the KV cache; a pull's git)."""
    daemon = psutil.Process(os.getpid())
    total = daemon.memory_info().rss
    for child in daemon.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may end while counted
            total += child.memory_info().rss
    return total


class GpuMonitor:
    """Per-GPU figures from NVML; initialized once, on first use."""

    def __init__(self, load_nvml: Callable[[], ModuleType] | None = None) -> None:
        self._load_nvml = load_nvml or (lambda: importlib.import_module("pynvml"))
        self._lock = threading.Lock()
        self._nvml: ModuleType | None = None
        self._unavailable: str | None = None  # why there is no GPU report, once known

    def _init(self) -> ModuleType | None:
        with self._lock:
            if self._nvml is None and self._unavailable is None:
                try:
                    nvml = self._load_nvml()
                except ImportError:
                    self._unavailable = "no NVIDIA GPU (the nvidia-ml-py package is not installed)"
                    log.info("%s", self._unavailable)
                else:
                    try:
                        nvml.nvmlInit()
                    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, …
                        # A CPU-only host, as a rule: NVML's words are for the log, not the page.
                        self._unavailable = "no NVIDIA GPU"
                        log.info("no NVIDIA GPU: NVML did not start (%s)", e)
                    else:
                        self._nvml = nvml
            return self._nvml

    def report(self) -> tuple[list[dict[str, Any]], str]:
        """Every GPU's figures, and a one-line summary ("no NVIDIA GPU" without one)."""
        nvml = self._init()
        if nvml is None:
            return [], self._unavailable or "no NVIDIA GPU"
        try:
            gpus = [self._gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as e:  # a GPU fallen off the bus, a driver reloaded
            log.warning("NVML query failed", exc_info=True)
            return [], f"GPU figures unavailable (NVML: {e})"
        if not gpus:
            return [], "no NVIDIA GPU (NVML sees none)"
        return gpus, f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"

    @staticmethod
    def _gpu(nvml: ModuleType, index: int) -> dict[str, Any]:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)

        def optional(query: Callable[[], Any]) -> Any:
            # Not every board reports every figure (NVMLError_NotSupported): leave it out.
            try:
                return query()
            except Exception:
                return None

        utilization = optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        temperature = optional(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        power_mw = optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        capability = optional(lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
        return {
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_used_gb": _gb(memory.used),
            "memory_total_gb": _gb(memory.total),
            "memory_free_gb": _gb(memory.free),
            "memory_used_bytes": int(memory.used),
            "memory_total_bytes": int(memory.total),
            "utilization_percent": utilization,
            "temperature_c": temperature,
            "power_w": round(power_mw / 1000, 1) if power_mw is not None else None,
            "compute_capability": f"{capability[0]}.{capability[1]}" if capability else None,
        }


GPUS = GpuMonitor()
psutil.cpu_percent(interval=None)  # prime the CPU figure: its first call has nothing to compare


def report(device: str, gpus: GpuMonitor = GPUS) -> dict[str, Any]:
    """One resources report, measured now: it blocks on NVML (not for the event loop).

    The top-level ``device``/``total_gb``/``free_gb`` are what old clients read:
    the model's GPU when it runs on one, else the host's RAM.
    """
    return _assemble(device, Measured(host_report(), *gpus.report()))


@dataclass(frozen=True)
class Measured:
    """The machine's figures at one moment, for any device."""

    host: dict[str, Any]
    gpus: list[dict[str, Any]]
    gpu_status: str
    at: float = field(default_factory=time.monotonic)


def _assemble(device: str, measured: Measured) -> dict[str, Any]:
    host, gpu_list, gpu_status = measured.host, measured.gpus, measured.gpu_status
    total, free = host["ram_total_gb"], host["ram_available_gb"]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        model_gpu = next((g for g in gpu_list if g["index"] == index), None)
        if model_gpu is not None:
            total, free = model_gpu["memory_total_gb"], model_gpu["memory_free_gb"]
    return {
        "device": device,
        "total_gb": total,
        "free_gb": free,
        "host": host,
        "gpus": gpu_list,
        "gpu_status": gpu_status,
    }


class ResourceMonitor:
    """The latest report, for the event loop: NVML is asked only in a worker thread.

    One measurement runs at a time, in a thread of its own: a hung NVML call holds
    that thread, never the loop, nor a pile of threads (nor the loop's executor,
    which the daemon's file work shares). :meth:`latest` answers at once from the
    newest measurement (before the first, a host-only one) and starts another when
    that is older than ``refresh_after`` seconds; :meth:`refresh` waits for one.
    """

    def __init__(
        self,
        gpus: GpuMonitor = GPUS,
        refresh_after: float = REFRESH_AFTER_S,
        wait_at_most: float = REFRESH_WAIT_S,
    ) -> None:
        self.gpus = gpus
        self.refresh_after = refresh_after
        self.wait_at_most = wait_at_most
        self._lock = threading.Lock()
        self._measured: Measured | None = None
        self._measuring: concurrent.futures.Future[Measured] | None = None

    def latest(self, device: str) -> dict[str, Any]:
        """The newest report for ``device``, at once."""
        measured = self._latest() or self._host_only("GPU figures are being measured")
        return _assemble(device, measured)

    def latest_gpus(self) -> list[dict[str, Any]]:
        """The newest per-GPU figures (/metrics), at once; empty before the first."""
        measured = self._latest()
        return measured.gpus if measured is not None else []

    def _latest(self) -> Measured | None:
        """The newest measurement; starts another when it is due."""
        with self._lock:
            measured = self._measured
            if measured is None or time.monotonic() - measured.at > self.refresh_after:
                self._measure_soon()
        return measured

    async def refresh(self, device: str) -> dict[str, Any]:
        """A report measured now (or by the measurement under way), without blocking the loop.

        Past ``wait_at_most`` seconds (NVML hangs) it is the latest one, saying so.
        """
        with self._lock:
            measuring = self._measure_soon()
        try:
            measured = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(measuring)), self.wait_at_most
            )
        except TimeoutError:
            measured = self._measured or self._host_only("GPU figures unavailable")
            measured = replace(
                measured, gpu_status=f"{measured.gpu_status} (NVML is not answering)"
            )
        return _assemble(device, measured)

    @staticmethod
    def _host_only(gpu_status: str) -> Measured:
        return Measured(host_report(), [], gpu_status)  # psutil reads /proc: cheap

    def _measure_soon(self) -> concurrent.futures.Future[Measured]:
        """The measurement under way, or a new one (holding ``_lock``)."""
        if self._measuring is None:
            self._measuring = concurrent.futures.Future()
            threading.Thread(target=self._measure, name="llmws-resources", daemon=True).start()
        return self._measuring

    def _measure(self) -> None:
        future = self._measuring
        assert future is not None
        try:
            measured = Measured(host_report(), *self.gpus.report())
        except Exception as e:  # psutil's calls: never seen failing, but not fatal
            log.warning("measuring the resources failed", exc_info=True)
            with self._lock:
                self._measuring = None
            future.set_exception(e)
            return
        with self._lock:
            self._measured = measured
            self._measuring = None
        future.set_result(measured)


MONITOR = ResourceMonitor()


def latest(device: str) -> dict[str, Any]:
    """The newest resources report for ``device``, without waiting (see ResourceMonitor)."""
    return MONITOR.latest(device)


def latest_gpus() -> list[dict[str, Any]]:
    return MONITOR.latest_gpus()
