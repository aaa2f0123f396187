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
not imported here: the measuring is the transformers engine's
(:mod:`llmwsd.engines.transformers.measure`); admission and the reports use this
module with any engine.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

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
    (the transformers engine's prefix cache), a new turn is often a few tokens long. On CPU,
    oneDNN and MKL keep kernels and buffers for every matrix shape they see, for
    good: unpadded, each new prompt length would add to the resident memory of a
    long-running daemon.
    """
    step = max(8, 1 << max(tokens.bit_length() - 4, 0))
    return -(-tokens // step) * step


def max_context_of(model_config: Any) -> int:
    """The model's own longest prompt plus answer, in tokens (measure.estimate may lower it)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class Capacity(Protocol):
    """What admission reserves requests against: an engine's memory for generations.

    ``batch_bytes`` is the worst case of running ``(prompt tokens, total tokens)``
    requests together; admission starts a request only while that stays within
    ``budget_bytes``. The transformers engine's is a :class:`MemoryEstimate`, vLLM's
    a :class:`PagedKVCache`.
    """

    @property
    def layout(self) -> KVLayout: ...

    @property
    def budget_bytes(self) -> int: ...

    @property
    def max_context(self) -> int: ...

    def batch_bytes(self, requests: Iterable[tuple[int, int]]) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class PagedKVCache:
    """A paged KV cache (vLLM's): ``blocks`` blocks of ``block_size`` tokens, per request.

    Each request holds the blocks its tokens fill, however long the others are, and
    the engine schedules within them itself; admission reserves every request's
    worst case, so that a running request is never preempted for lack of blocks.
    """

    layout: KVLayout
    blocks: int
    block_size: int
    max_context: int
    model_max: int

    @property
    def budget_bytes(self) -> int:
        return self.blocks * self.block_size * self.layout.bytes_per_token

    def batch_bytes(self, requests: Iterable[tuple[int, int]]) -> int:
        blocks = sum(-(-total // self.block_size) for _, total in requests)
        return blocks * self.block_size * self.layout.bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_context": self.max_context,
            "model_max_context": self.model_max,
            "limited_by": "model" if self.max_context >= self.model_max else "config",
            "kv_bytes_per_token": self.layout.bytes_per_token,
            "kv_layout": self.layout.describe(),
            "kv_blocks": self.blocks,
            "block_size": self.block_size,
            "budget_bytes": self.budget_bytes,
            "budget_gb": round(self.budget_bytes / GIB, 3),
        }

    def describe(self) -> str:
        return (
            f"max context {self.max_context} tokens (model maximum {self.model_max}): "
            f"paged KV cache of {self.blocks} blocks × {self.block_size} tokens = "
            f"{self.blocks * self.block_size} tokens, {self.layout.bytes_per_token} B/token "
            f"({self.layout.describe()}), {self.budget_bytes / GIB:.2f} GiB"
        )


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
