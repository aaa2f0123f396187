"""Measuring what a loaded transformers model needs: a prefill's peak, and the estimate.

The arithmetic and the estimate's type are engine-neutral (:mod:`llmwsd.engines.memory`);
this half runs the model, and tunes glibc's allocator so that what it measures holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from llmwsd.config import MemoryConfig
from llmwsd.engines.memory import (
    MIB,
    MemoryEstimate,
    attention_bytes_per_token_squared,
    available_bytes,
    kv_layout,
)

log = logging.getLogger("llmwsd.memory")

WARMUP_TOKENS = 16
PREFIX_CACHE_SHARE = 0.125  # of the memory budget, at most, for the prefix cache


def release_freed_memory() -> None:
    """Give freed memory back (Python's garbage, CUDA's cache, glibc's heap) before measuring."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:  # elsewhere nothing to do
        malloc_trim(0)


@functools.cache  # finding the C library runs ldconfig: ~4 ms, too slow for every prefill
def _glibc_function(name: str) -> Any:
    """A function of glibc's allocator (``malloc_trim``, ``mallopt``); None elsewhere."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        return getattr(ctypes.CDLL(libc_name), name)
    except (OSError, AttributeError):  # not glibc
        return None


# glibc's mallopt parameter, and the size from which every allocation gets its own mapping.
M_MMAP_THRESHOLD = -3
CPU_MMAP_THRESHOLD = 256 * 1024
_large_allocations_mapped_apart = False  # set by map_large_allocations_apart


def map_large_allocations_apart() -> bool:
    """Have glibc map every allocation of 256 KiB or more on its own; False elsewhere.

    For CPU engines. By default glibc raises its mmap threshold as large blocks
    are freed (up to 32 MiB) and serves tensors from its heaps, whose freed holes
    stay resident and are reused or not depending on timing: the peak RSS of one
    and the same generation varied from 132 to 191 MB here, the activation probe
    by ±30 %, and a long-running daemon's RSS crept up. Mapped apart, a tensor's
    memory goes back when it is freed, so RSS follows what is in use and the
    memory estimate holds (93 MB, ±1 %). The cost: fresh pages for every large
    tensor, a long prefill up to ~40 % slower on the development machine.
    """
    global _large_allocations_mapped_apart
    mallopt = _glibc_function("mallopt")
    _large_allocations_mapped_apart = mallopt is not None and bool(
        mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD)
    )
    return _large_allocations_mapped_apart


# A prefill of fewer new tokens than this may take tensors of up to SHORT_PREFILL_MMAP_THRESHOLD
# from the heap (see short_prefill_on_the_heap).
SHORT_PREFILL_TOKENS = 256
SHORT_PREFILL_MMAP_THRESHOLD = 1024 * 1024


@contextlib.contextmanager
def short_prefill_on_the_heap(new_tokens: int) -> Iterator[None]:
    """While a short prefill runs, serve its tensors of up to 1 MiB from glibc's heap.

    Does nothing unless :func:`map_large_allocations_apart` did (CPU engines). Mapped apart, the
    activations of every layer of a short prefill got fresh pages: eight 24-token
    prompts were prefilled in ~245 ms instead of ~155 ms here. What such a prefill
    leaves in the heap is a few MB at most, and long prompts, whose peak the memory
    estimate predicts, are still mapped apart (the threshold is set back after it).
    The threshold is the process's: a model loading beside a serving one measures its
    probes while no prefill runs (both hold ``kernels.onednn``).
    """
    if not _large_allocations_mapped_apart or new_tokens >= SHORT_PREFILL_TOKENS:
        yield
        return
    mallopt = _glibc_function("mallopt")
    mallopt(M_MMAP_THRESHOLD, SHORT_PREFILL_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD)


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


class PeakRSS:
    """The peak RSS increase of a block: ``with PeakRSS() as peak: …``, then ``peak.bytes``.

    Linux's high-water mark (VmHWM) is reset through /proc/self/clear_refs; where
    that is not allowed, a thread samples the RSS every millisecond instead.
    """

    def __enter__(self) -> PeakRSS:
        self.bytes = 0
        self._process = psutil.Process()
        self._before = self._process.memory_info().rss
        self._samples = [self._before]
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        if not _reset_high_water_mark():
            self._sampler = threading.Thread(target=self._sample, name="llmws-rss", daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._samples.append(self._process.memory_info().rss)

    def __exit__(self, *exc_info: object) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._samples)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.bytes = max(peak - self._before, 0)


def random_prompts(model: Any, rows: int, tokens: int) -> Any:
    """``rows`` prompts of ``tokens`` random token ids on the model's device, to measure with."""
    import torch

    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config().vocab_size)
    return torch.randint(0, vocab, (rows, tokens), device=device)


def measure_prefill_peak(model: Any, tokens: int) -> int:
    """Peak bytes above the baseline of one prefill of ``tokens`` tokens, KV cache included.

    The forward is the engine's prefill: a fresh DynamicCache, logits for the
    last position only.
    """
    import torch
    from transformers import DynamicCache

    input_ids = random_prompts(model, 1, tokens)
    device = input_ids.device
    attention_mask = torch.ones_like(input_ids)

    def prefill() -> Any:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=torch.arange(tokens, device=device)[None],
            past_key_values=DynamicCache(config=model.config),
            use_cache=True,
            logits_to_keep=1,
        )

    with torch.inference_mode():
        release_freed_memory()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            output = prefill()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with PeakRSS() as rss:
                output = prefill()
            peak = rss.bytes
        del output
    release_freed_memory()
    return max(peak, 0)


def estimate(
    model: Any, config: MemoryConfig, device: str, model_max: int, prefix_cache_mb: float = 0.0
) -> MemoryEstimate:
    """Measure what a loaded ``model`` can serve on ``device``; log how it was derived.

    ``prefix_cache_mb`` is set aside from the budget for the prefix cache, at most
    ``PREFIX_CACHE_SHARE`` of it.
    """
    dtype_bytes = int(model.dtype.itemsize)
    layout = kv_layout(model.config, dtype_bytes)
    attention = str(getattr(model.config, "_attn_implementation", "sdpa"))
    quadratic = attention_bytes_per_token_squared(model.config, attention, dtype_bytes)
    probe = max(1, min(config.probe_tokens, model_max))
    # The first forward allocates once for good (kernels, thread pools, buffers): a
    # short warm-up keeps that out of the per-token figure. The probe is then the first
    # of its length, so its memory is fresh from the system, not reused from the
    # warm-up's, and its peak RSS shows all of it.
    measure_prefill_peak(model, min(WARMUP_TOKENS, probe))
    peak = measure_prefill_peak(model, probe)
    activation = max(peak - layout.kv_bytes(probe) - quadratic * probe**2, 0) // probe
    available, source = available_bytes(device)
    utilization = config.gpu_utilization if device.startswith("cuda") else config.cpu_utilization
    reserve = int(config.reserve_mb * MIB)
    budget = max(int(available * utilization) - reserve, 0)
    if config.budget_mb:
        budget, source = min(budget, int(config.budget_mb * MIB)), f"{source}, [memory] budget_mb"
    prefix_cache = min(int(prefix_cache_mb * MIB), int(budget * PREFIX_CACHE_SHARE))
    result = MemoryEstimate(
        layout=layout,
        activation_bytes_per_token=activation,
        attention_bytes_per_token_squared=quadratic,
        probe_tokens=probe,
        device=device,
        available_bytes=available,
        available_source=source,
        utilization=utilization,
        reserve_bytes=reserve,
        budget_bytes=budget - prefix_cache,
        model_max=model_max,
        prefix_cache_bytes=prefix_cache,
    )
    result = replace(result, max_context=result.tokens_that_fit())
    if result.max_context == 0:
        log.error("no request fits in memory: %s", result.describe())
    else:
        log.info("%s", result.describe())
    return result
