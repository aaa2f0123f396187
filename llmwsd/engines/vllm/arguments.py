"""``[engine.vllm]`` to vLLM's engine arguments, checked before the daemon opens its port.

Every key of the table but ``kv_cache_space_gb`` is one of vLLM's engine arguments
(``AsyncEngineArgs``: ``tensor_parallel_size``, ``pipeline_parallel_size``,
``distributed_executor_backend``, ``gpu_memory_utilization``, ``max_model_len``,
``enforce_eager``…) and is passed on as it is. ``kv_cache_space_gb`` is the KV
cache of vLLM's CPU build (``VLLM_CPU_KVCACHE_SPACE``). llmws sets the model (the
folder it serves) and the dtype (``[model] dtype``) itself.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from llmwsd.config import Config
from llmwsd.errors import ConfigError

# llmws's own keys of [engine.vllm], not vLLM's engine arguments.
KV_CACHE_SPACE_KEY = "kv_cache_space_gb"
DEFAULT_KV_CACHE_SPACE_GB = 4
# Set by llmws: the model is the folder served (`llmwsctl switch`), the dtype [model] dtype.
SET_BY_LLMWS = {"model": "the model served", "dtype": "[model] dtype", "tokenizer": "the model"}
# Keys whose 0 or "" in the file means "vLLM's default" (TOML has no null).
UNSET_WHEN_EMPTY = frozenset({"max_model_len", "distributed_executor_backend"})

INSTALL_HINT = (
    "vLLM is not installed: on a CPU `make vllm` in a source tree, or see the README's "
    "'The vLLM engine' (pip install 'llmws[vllm]' on CUDA machines)"
)


def engine_argument_names() -> frozenset[str]:
    """The keys vLLM's AsyncEngineArgs takes (ConfigError when vLLM is not installed)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError as e:
        raise ConfigError(f'[engine] backend = "vllm": {INSTALL_HINT} ({e})') from None
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def kv_cache_space_gb(config: Config) -> Any:
    """``kv_cache_space_gb`` as the file says it (checked by :func:`check`)."""
    return config.engine.vllm.get(KV_CACHE_SPACE_KEY, DEFAULT_KV_CACHE_SPACE_GB)


def passed_arguments(config: Config) -> dict[str, Any]:
    """The [engine.vllm] keys that go to vLLM, with "unset" values dropped."""
    table = config.engine.vllm
    return {
        key: value
        for key, value in table.items()
        if key != KV_CACHE_SPACE_KEY and not (key in UNSET_WHEN_EMPTY and value in (0, ""))
    }


def check(config: Config) -> None:
    """Every [engine.vllm] key one vLLM knows and llmws leaves to it; else one ConfigError."""
    known = engine_argument_names()
    where = f"{config.source or 'the configuration'}: [engine.vllm]"
    for key in config.engine.vllm:
        if key in SET_BY_LLMWS:
            raise ConfigError(f"{where} key {key!r} is set by llmws ({SET_BY_LLMWS[key]})")
        if key != KV_CACHE_SPACE_KEY and key not in known:
            raise ConfigError(
                f"{where} unknown key {key!r}: not one of vLLM's engine arguments "
                "(vllm.engine.arg_utils.AsyncEngineArgs)"
            )
    space = kv_cache_space_gb(config)
    if isinstance(space, bool) or not isinstance(space, int) or space < 1:
        # VLLM_CPU_KVCACHE_SPACE is whole GiB; num_gpu_blocks_override sets fewer blocks.
        raise ConfigError(
            f"{where} key {KV_CACHE_SPACE_KEY!r} must be a whole number of GiB, 1 or more"
        )


def engine_args(config: Config, path: Path) -> Any:
    """vLLM's AsyncEngineArgs for serving the folder ``path``."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    dtype: Any = config.model.dtype  # auto, bfloat16, float16 or float32: vLLM's names too
    return AsyncEngineArgs(model=str(path), dtype=dtype, **passed_arguments(config))


def set_environment(config: Config) -> None:
    """What vLLM reads from the environment: the CPU build's KV cache, how workers start.

    The operator's environment wins (a unit's Environment=).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_space_gb(config)))
    # The daemon has threads: its engine processes are spawned, never forked from it.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # vLLM's usage statistics would phone home; a daemon on a closed network must not try.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # vLLM logs to stdout by default; llmwsd's own lines go to stderr: the same stream.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
