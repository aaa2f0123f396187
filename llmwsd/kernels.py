"""Which CPU kernels a decoding step runs on: oneDNN's or torch's own.

On CPU, torch hands bf16 matrix products to oneDNN. Its kernels win for
prefills and larger batches, but a decoding step of one or two rows ran faster
on torch's own (30 vs 52 ms a step for the default model on the development
machine; 74 vs 92 ms the other way round at 8 rows). Where the crossover lies
depends on the CPU, so the engine times both at load and decodes batches up to
that size without oneDNN.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)

CALIBRATION_PROMPT_TOKENS = 16
CALIBRATION_STEPS = 2


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Run the block with oneDNN on or off (a process-wide flag: engine thread only)."""
    before = bool(torch.backends.mkldnn.enabled)
    # The documented switch; typeshed sees the descriptor, not the flag behind it.
    torch.backends.mkldnn.enabled = enabled  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before  # type: ignore[assignment]


def _step_seconds(model: Any, rows: int, use_onednn: bool) -> float:
    """The best of a few decoding steps of ``rows`` rows (after one untimed step)."""
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config().vocab_size)
    with onednn(use_onednn):
        cache = DynamicCache(config=model.config)
        prompt = torch.randint(0, vocab, (rows, CALIBRATION_PROMPT_TOKENS), device=device)
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
