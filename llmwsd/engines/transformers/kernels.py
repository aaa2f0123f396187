"""Which CPU kernels the model's matrix products run on.

On CPU, torch hands bf16 matrix products to oneDNN, which lays the weight out
for its kernels again at every call. The engine therefore lays every linear
layer's weight out once, at load (``PackedLinear``): a decoding step of 8 rows
took 40 instead of 49 ms for the default model on the development machine.
A step of one or two rows is bound by reading the weights, and torch's own
kernels did that faster (28 vs 31 ms a step at one row). Where the crossover
lies depends on the CPU, so the engine times both at load, decodes batches up
to that size on torch's kernels (which keep the weights in torch's layout, a
second copy), and drops that copy when oneDNN wins everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers import DynamicCache

from llmwsd.engines.transformers import measure

log = logging.getLogger(__name__)

CALIBRATION_PROMPT_TOKENS = 16
CALIBRATION_STEPS = 2
SECOND_COPY_SHARE = 0.125

# oneDNN's switch is one flag for the whole process, and torch reads it twice within
# one attention call (to lay a block out for oneDNN, then to run it): a model running
# in one thread while another flips it fails ("BFloat16 Brgemm VNNI format is only
# supported ..."). A switch loads the new model while the old one serves, so every
# forward of every model runs under this lock, with the flag it wants.
_FLAG_LOCK = threading.RLock()


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Run the block, a model's forward, with oneDNN on or off and no other forward."""
    with _FLAG_LOCK:
        before = bool(torch.backends.mkldnn.enabled)
        # The documented switch; typeshed sees the descriptor, not the flag behind it.
        torch.backends.mkldnn.enabled = enabled  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = before  # type: ignore[assignment]


class PackedLinear(nn.Module):
    """A linear layer whose weight oneDNN laid out once for its own kernels.

    With oneDNN switched off (``onednn(False)``) it runs on torch's kernels over
    the weight in torch's layout, as long as that copy is kept.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight: torch.Tensor | None = linear.weight
        self.bias = linear.bias
        # The same call torch's compiler uses to prepack weights for oneDNN.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and not torch.backends.mkldnn.enabled:
            return functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linear_layers(model: Any) -> int:
    """Replace the bf16 linear layers of a model on CPU with ``PackedLinear``; how many."""
    parameter = next(model.parameters())
    if (
        parameter.device.type != "cpu"
        or parameter.dtype != torch.bfloat16
        or not torch.backends.mkldnn.is_available()
        or not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return 0
    linears = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    try:
        with torch.inference_mode():
            packed = [PackedLinear(child) for _, _, child in linears]
    except RuntimeError:
        log.warning("cannot lay the weights out for oneDNN; using the plain ones", exc_info=True)
        return 0
    for (parent, name, _), layer in zip(linears, packed, strict=True):
        setattr(parent, name, layer)
    return len(packed)


def _torch_layout_bytes(model: Any) -> int:
    """Bytes of the torch-layout weights that only packed layers hold (not tied elsewhere)."""
    held = {
        id(m.weight): m.weight
        for m in model.modules()
        if isinstance(m, PackedLinear) and m.weight is not None
    }
    for module in model.modules():
        if not isinstance(module, PackedLinear):
            for parameter in module.parameters(recurse=False):
                held.pop(id(parameter), None)
    return sum(w.numel() * w.element_size() for w in held.values())


def _drop_torch_layout(model: Any) -> None:
    for layer in model.modules():
        if isinstance(layer, PackedLinear):
            layer.weight = None


def _step_seconds(model: Any, rows: int, use_onednn: bool) -> float:
    """The best of a few decoding steps of ``rows`` rows (after one untimed step)."""
    with onednn(use_onednn):
        cache = DynamicCache(config=model.config)
        prompt = measure.random_prompts(model, rows, CALIBRATION_PROMPT_TOKENS)
        model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        token = prompt[:, -1:]
        model(input_ids=token, cache=cache, use_cache=True)
        best = float("inf")
        for _ in range(CALIBRATION_STEPS):
            start = time.perf_counter()
            model(input_ids=token, cache=cache, use_cache=True)
            best = min(best, time.perf_counter() - start)
    return best


def plain_decoding_rows(model: Any, max_rows: int) -> int:
    """Up to how many rows a decoding step is faster without oneDNN (0: never, or not CPU)."""
    if next(model.parameters()).device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return 0
    fastest_plain = 0
    rows = 1
    with torch.inference_mode():
        while rows <= max_rows:
            with_onednn = _step_seconds(model, rows, True)
            plain = _step_seconds(model, rows, False)
            log.debug(
                "a step of %d rows: %.1f ms with oneDNN, %.1f ms without",
                rows,
                with_onednn * 1000,
                plain * 1000,
            )
            if plain >= with_onednn:
                break
            fastest_plain = rows
            rows *= 2
    return fastest_plain


def choose_kernels(model: Any, max_rows: int, available_bytes: int) -> int:
    """Lay the weights out for oneDNN where that pays; return up to how many rows a
    decoding step runs on torch's kernels instead (0: never).

    Keeping torch's layout for the small steps costs a second copy of the weights:
    only while that copy takes less than ``SECOND_COPY_SHARE`` of ``available_bytes``.
    """
    packed = pack_linear_layers(model)
    if packed:
        log.info("%d linear layers laid out once for oneDNN", packed)
    copy_bytes = _torch_layout_bytes(model)
    if copy_bytes > available_bytes * SECOND_COPY_SHARE:
        plain_rows = 0
    else:
        plain_rows = plain_decoding_rows(model, max_rows)
    if plain_rows:
        log.info(
            "decoding steps of %s run without oneDNN (faster here%s)",
            "1 row" if plain_rows == 1 else f"up to {plain_rows} rows",
            f"; keeps {copy_bytes / 2**20:.0f} MiB of weights in torch's layout too"
            if copy_bytes
            else "",
        )
    elif packed:
        _drop_torch_layout(model)
    return plain_rows
