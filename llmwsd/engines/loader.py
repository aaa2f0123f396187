"""The one way the daemon gets an engine: ``[engine] backend`` decides which.

Neither engine is imported before a model is loaded (both import torch): the
transformers engine (``"transformers"``, the default) or vLLM (``"vllm"``).
"""

from __future__ import annotations

from pathlib import Path

from llmwsd.config import Config
from llmwsd.engines.interface import EngineLike


async def load_engine(config: Config, path: Path) -> EngineLike:
    if config.engine.backend == "vllm":
        from llmwsd.engines.vllm.engine import VllmEngine

        return await VllmEngine.load(config, path)
    from llmwsd.engines.transformers.engine import Engine

    return await Engine.load(config, path)


def check_backend(config: Config) -> None:
    """Before the port opens: the backend installed and its table's keys known (ConfigError)."""
    if config.engine.backend == "vllm":
        from llmwsd.engines.vllm import arguments

        arguments.check(config)
