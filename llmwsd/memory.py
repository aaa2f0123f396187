"""How many tokens fit: the KV cache's cost per token, measured activations, usable memory.

Like vLLM and TGI, the limit comes from what is left after loading the model,
not from a guess per parameter (see docs/memory.md):

* the KV cache holds, per token and layer, a key and a value for each
  key/value head: ``2 × kv_heads × head_dim × dtype bytes``, read from the
  model's own config. Grouped-query attention has fewer KV heads than attention
  heads; sliding-window and chunked layers keep at most their window.
* activations are measured: a prefill of ``[memory] probe_tokens`` tokens, the
  engine's way, after a short warm-up; its peak minus its KV cache, per prompt
  token.
* usable memory is the GPU memory free after loading × ``gpu_utilization``, or
  the available RAM (the cgroup's limit when lower) × ``cpu_utilization``, minus
  ``reserve_mb``, capped by ``budget_mb``.

The engine runs its requests in one left-padded batch, so ``n`` requests cost
``n ×`` the longest of them (:meth:`MemoryEstimate.batch_bytes`). torch is
imported only by the functions that measure, so the daemon's light modules can
use this one.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from llmwsd.config import MemoryConfig

log = logging.getLogger("llmwsd.memory")

MIB = 1024**2
GIB = 1024**3

# Layer types whose cache holds at most a window of tokens, and the config key of that window.
WINDOWED_LAYERS = {
    "sliding_attention": "sliding_window",
    "chunked_attention": "attention_chunk_size",
}
# Layer types without a KV cache of their own (MLP/MoE blocks, layers sharing another's KV).
CACHELESS_LAYERS = frozenset({"dummy", "mlp", "moe"})

WARMUP_TOKENS = 16
PREFIX_CACHE_SHARE = 0.125  # of the memory budget, at most, for the prefix cache

# cgroup v1 writes "no limit" as a page-rounded 2**63 - 1.
CGROUP_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class KVLayout:
    """The KV cache's shape per token: which layers keep every token, which a window."""

    kv_heads: int
    head_dim: int
    dtype_bytes: int
    full_layers: int
    windows: tuple[int, ...] = ()  # the window of each sliding or chunked layer

    @property
    def layer_bytes_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes  # a key and a value

    @property
    def bytes_per_token(self) -> int:
        """The cost of one more token while no window is full yet (every layer grows)."""
        return self.layer_bytes_per_token * (self.full_layers + len(self.windows))

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of one request's KV cache holding ``tokens`` tokens."""
        held = self.full_layers * tokens + sum(min(tokens, window) for window in self.windows)
        return self.layer_bytes_per_token * held

    def describe(self) -> str:
        shape = f"{self.kv_heads} KV heads × {self.head_dim} × 2 × {self.dtype_bytes} B"
        if not self.windows:
            return f"{self.full_layers} layers × {shape}"
        return (
            f"{self.full_layers} full + {len(self.windows)} windowed "
            f"({max(self.windows)} tokens) layers × {shape}"
        )


def kv_layout(model_config: Any, dtype_bytes: int) -> KVLayout:
    """The KV layout of a transformers config (a multimodal one: of its text model)."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    config = config or model_config
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        # What transformers' DynamicCache does: a sliding_window alone makes every layer slide.
        sliding = getattr(config, "sliding_window", None) is not None
        layer_types = ["sliding_attention" if sliding else "full_attention"] * layers
    full, windows = 0, []
    for layer_type in layer_types:
        window = getattr(config, WINDOWED_LAYERS.get(layer_type, ""), None)
        if layer_type in CACHELESS_LAYERS:
            continue
        if isinstance(window, int) and window > 0:
            windows.append(window)
        else:
            full += 1  # full attention, and any type we do not know: the safe side
    return KVLayout(kv_heads, head_dim, dtype_bytes, full, tuple(windows))


def attention_bytes_per_token_squared(model_config: Any, attention: str, dtype_bytes: int) -> int:
    """The prefill's memory that grows with the square of the prompt, per row.

    Eager attention materializes every head's score matrix (in the model's dtype,
    then a float32 softmax); SDPA and flash attention work in tiles, so nothing
    in them is quadratic.
    """
    if attention != "eager":
        return 0
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    heads = int((config or model_config).num_attention_heads)
    return heads * (2 * dtype_bytes + 4)


def cache_room(tokens: int) -> int:
    """Tokens of KV cache the engine allocates to hold ``tokens``.

    A quarter more (at least 128) to grow into, so that a decoding step writes
    its token in place instead of copying the layer's whole cache.
    """
    return tokens + max(128, tokens // 4)


def padded_length(tokens: int) -> int:
    """The length a prefill of ``tokens`` is left-padded to.

    A multiple of 8, or of an eighth of the length's octave from 128 tokens on
    (at most an eighth more work). Short rests matter: behind a cached prefix
    (:mod:`llmwsd.prefix_cache`), a new turn is often a few tokens long. On CPU,
    oneDNN and MKL keep kernels and buffers for every matrix shape they see, for
    good: unpadded, each new prompt length would add to the resident memory of a
    long-running daemon.
    """
    step = max(8, 1 << max(tokens.bit_length() - 4, 0))
    return -(-tokens // step) * step


@dataclass(frozen=True)
class MemoryEstimate:
    """Everything the context limit and admission control are derived from."""

    layout: KVLayout
    activation_bytes_per_token: int  # measured, per prompt token of a prefill
    attention_bytes_per_token_squared: int
    probe_tokens: int
    device: str
    available_bytes: int  # free GPU memory or available RAM after loading
    available_source: str  # where that figure came from
    utilization: float
    reserve_bytes: int
    budget_bytes: int  # what all running generations may use together
    model_max: int  # the model's own maximum context
    max_context: int = 0
    prefix_cache_bytes: int = 0  # set aside from the budget for the prefix cache

    def prefill_bytes(self, prompt_tokens: int) -> int:
        """Activation bytes of prefilling one prompt (the KV cache not included)."""
        return (
            self.activation_bytes_per_token * prompt_tokens
            + self.attention_bytes_per_token_squared * prompt_tokens**2
        )

    def batch_bytes(self, requests: Iterable[tuple[int, int]]) -> int:
        """Worst-case bytes of running these ``(prompt tokens, total tokens)`` requests at once.

        The engine keeps one left-padded cache, so every row is as long as the
        longest, and newcomers are prefilled together, padded to the longest prompt.
        """
        rows = list(requests)
        if not rows:
            return 0
        longest_prompt = padded_length(max(prompt for prompt, _ in rows))
        longest = max(max(total for _, total in rows), longest_prompt)
        if self.device.startswith("cuda"):
            # The room to grow is allocated at once; on CPU its pages stay untouched,
            # so not resident, until tokens are written into them.
            longest = cache_room(longest)
        return len(rows) * (self.layout.kv_bytes(longest) + self.prefill_bytes(longest_prompt))

    def tokens_that_fit(self) -> int:
        """The longest context one request can have within the budget (0: none)."""
        low, high = 0, self.model_max
        while low < high:  # the largest t with batch_bytes([(t, t)]) <= budget
            middle = (low + high + 1) // 2
            if self.batch_bytes([(middle, middle)]) <= self.budget_bytes:
                low = middle
            else:
                high = middle - 1
        return low

    @property
    def limited_by(self) -> str:
        return "model" if self.max_context >= self.model_max else "memory"

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_context": self.max_context,
            "model_max_context": self.model_max,
            "limited_by": self.limited_by,
            "kv_bytes_per_token": self.layout.bytes_per_token,
            "kv_layout": self.layout.describe(),
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "probe_tokens": self.probe_tokens,
            "available_gb": round(self.available_bytes / GIB, 3),
            "available_source": self.available_source,
            "utilization": self.utilization,
            "reserve_gb": round(self.reserve_bytes / GIB, 3),
            "budget_bytes": self.budget_bytes,
            "budget_gb": round(self.budget_bytes / GIB, 3),
            "prefix_cache_mb": round(self.prefix_cache_bytes / MIB, 1),
        }

    def describe(self) -> str:
        """The log line: the limit and every number it came from."""
        return (
            f"max context {self.max_context} tokens (limited by the {self.limited_by}; "
            f"model maximum {self.model_max}): KV cache {self.layout.bytes_per_token} B/token "
            f"({self.layout.describe()}), activations {self.activation_bytes_per_token} B/prompt "
            f"token (measured over {self.probe_tokens} tokens), budget "
            f"{self.budget_bytes / GIB:.2f} GiB = {self.available_bytes / GIB:.2f} GiB available "
            f"({self.available_source}) × {self.utilization:g} − "
            f"{self.reserve_bytes / GIB:.2f} GiB reserve"
            + (
                f" − {self.prefix_cache_bytes / MIB:.0f} MiB prefix cache"
                if self.prefix_cache_bytes
                else ""
            )
        )


# -- what is available -------------------------------------------------------------------


def cgroup_available_bytes(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> int | None:
    """What this process's memory cgroup still allows (limit − usage), None when unlimited.

    Page cache the kernel would reclaim (inactive files) does not count as usage.
    Inside a container the cgroup's own folder is the mount point, so that is tried too.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            files = ("memory.max", "memory.current", "inactive_file")
            folders = [root / path.lstrip("/"), root]
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            folders = [root / "memory" / path.lstrip("/"), root / "memory"]
        else:
            continue
        for folder in folders:
            available = _cgroup_folder_available(folder, *files)
            if available is not None:
                return available
    return None


def _cgroup_folder_available(folder: Path, limit: str, usage: str, inactive: str) -> int | None:
    try:
        limit_text = (folder / limit).read_text().strip()
        used = int((folder / usage).read_text())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or int(limit_text) >= CGROUP_V1_UNLIMITED:
        return None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        stat = (folder / "memory.stat").read_text()
        match = re.search(rf"^{inactive} (\d+)$", stat, re.MULTILINE)
        used -= int(match.group(1)) if match else 0
    return max(int(limit_text) - used, 0)


def available_bytes(device: str) -> tuple[int, str]:
    """Memory generations could still use on ``device``, and where the figure came from."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), "CUDA free memory"
    available, source = psutil.virtual_memory().available, "MemAvailable"
    in_cgroup = cgroup_available_bytes()
    if in_cgroup is not None and in_cgroup < available:
        available, source = in_cgroup, "cgroup limit"
    return int(available), source


# -- measuring a prefill -----------------------------------------------------------------


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
            cache=DynamicCache(config=model.config),
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


# -- the estimate ------------------------------------------------------------------------


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
