"""Loading a model for the engine: the load-time choices and the tokenizer helpers.

The choices (device, dtype, attention, batch size) are pure functions of what was
asked for and what the hardware has, so that every combination is testable without
a GPU; :func:`load_model` makes them, loads the folder and measures its memory.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmwsd.config import Config
from llmwsd.engines import memory
from llmwsd.engines.interface import ModelInfo
from llmwsd.engines.transformers import kernels, measure
from llmwsd.engines.transformers.batch import rows_can_join
from llmwsd.errors import ConfigError

log = logging.getLogger(__name__)

Capability = tuple[int, int]


# -- choices made at load time (pure, so that every combination is testable) ----------


def choose_device(requested: str, cuda_available: bool) -> str:
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested.startswith("cuda") and not cuda_available:
        raise ConfigError(f"[model] device is {requested!r} but no CUDA device is available")
    return requested


def choose_dtype(
    device: str, capability: Capability | None, requested: str, cpu_has_bf16: bool
) -> str:
    """The torch dtype name: bf16 where the hardware does it natively, else fp16/fp32."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if capability is not None and capability >= (8, 0) else "float16"
    return "bfloat16" if cpu_has_bf16 else "float32"


def choose_attention(
    requested: str, device: str, capability: Capability | None, flash_attn_importable: bool
) -> str:
    """flash_attention_2 when installed on an SM 8.0+ GPU, else PyTorch's SDPA."""
    if requested != "auto":
        return requested
    on_ampere = device.startswith("cuda") and capability is not None and capability >= (8, 0)
    return "flash_attention_2" if flash_attn_importable and on_ampere else "sdpa"


def choose_max_batch_size(configured: int, device: str) -> int:
    if configured > 0:
        return configured
    return 32 if device.startswith("cuda") else 8


def cpu_has_native_bf16() -> bool:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bool(torch.cpu._is_avx512_bf16_supported() or amx())


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


# -- loading --------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """What the engine is built from."""

    model: Any
    tokenizer: Any  # the engine thread's
    prompt_tokenizer: Any  # the worker threads' (tokenizers are not thread-safe)
    info: ModelInfo
    max_batch_size: int
    plain_decoding_rows: int  # see llmwsd.engines.transformers.kernels


def load_model(config: Config, path: Path) -> LoadedModel:
    """Load the model folder ``path`` as ``config`` asks, on this (a worker) thread."""
    cuda = torch.cuda.is_available()
    device = choose_device(config.model.device, cuda)
    capability = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
    dtype = choose_dtype(device, capability, config.model.dtype, cpu_has_native_bf16())
    attention = choose_attention(
        config.engine.attention, device, capability, flash_attn_importable()
    )
    log.info("loading %s on %s (%s, %s attention)", path, device, dtype, attention)
    if device == "cpu" and not measure.map_large_allocations_apart():
        log.warning("cannot tune the C allocator (not glibc): memory figures are rougher")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attention
    )
    model.to(torch.device(device)).eval()
    max_batch_size = choose_max_batch_size(config.engine.max_batch_size, device)
    parameters = sum(p.numel() for p in model.parameters())
    plain_rows = kernels.choose_kernels(model, max_batch_size, memory.available_bytes(device)[0])
    # After the layout work, so that the memory it took is not counted as free.
    # Cached prefixes are spliced into the shared cache: only where rows can join.
    with kernels.onednn(True):  # its probes are forwards (see kernels._FLAG_LOCK)
        estimate = measure.estimate(
            model,
            config.memory,
            device,
            memory.max_context_of(model.config),
            config.engine.prefix_cache_mb if rows_can_join(model.config) else 0.0,
        )
    info = ModelInfo(
        name=path.name,
        path=str(path),
        device=device,
        dtype=dtype,
        max_context=estimate.max_context,
        attention=attention,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        extra={
            "max_batch_size": max_batch_size,
            "parameters": parameters,
        },
        memory=estimate,
    )
    return LoadedModel(model, tokenizer, prompt_tokenizer, info, max_batch_size, plain_rows)
