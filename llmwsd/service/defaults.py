"""Where a new session's generation settings come from, key by key.

Three layers, the later winning: llmws's own defaults (:class:`GenerationSettings`),
the model's recommendation (the sampling keys of its ``generation_config.json``,
which its authors tune), and the keys the operator sets in ``[generation_defaults]``.
So any configuration starts with settings the model answers well with, and an
operator's choice always holds. ``welcome`` and ``llmwsctl status`` say which
layer each key came from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmwsd.config import Config
from llmwsd.errors import BadRequest
from llmwsd.settings import GenerationSettings

log = logging.getLogger("llmwsd")

# The keys [generation_defaults] has; a model's generation_config.json may set them too.
KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample")
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class Defaults:
    settings: GenerationSettings
    sources: dict[str, str]  # key: "llmws", "model" or "config"

    def describe(self) -> str:
        """``temperature 0.2 (model), max_new_tokens 512 (llmws), …`` for the log."""
        values = self.settings.to_dict()
        return ", ".join(f"{key} {values[key]} ({self.sources[key]})" for key in KEYS)


def model_recommendation(model_path: Path | None) -> dict[str, Any]:
    """The settings a model's generation_config.json gives, each checked like a client's."""
    if model_path is None or not (model_path / GENERATION_CONFIG).is_file():
        return {}
    try:
        data = json.loads((model_path / GENERATION_CONFIG).read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: not readable (%s): its settings are not used", model_path, e)
        return {}
    if not isinstance(data, dict):
        return {}
    recommended = {}
    for key in KEYS:
        if key not in data:
            continue
        try:
            GenerationSettings().merge({key: data[key]})
        except BadRequest as e:
            log.warning("%s %s: %s; not used", model_path.name, GENERATION_CONFIG, e.message)
            continue
        recommended[key] = data[key]
    return recommended


def resolve(config: Config, recommended: dict[str, Any]) -> Defaults:
    """The three layers for ``config`` and a model's ``recommended`` settings."""
    sources = dict.fromkeys(KEYS, "llmws")
    values = dict(recommended)
    sources |= dict.fromkeys(values, "model")
    chosen = config.generation_defaults
    for key in config.generation_defaults_set:
        values[key] = getattr(chosen, key)
        sources[key] = "config"
    return Defaults(GenerationSettings().merge(values), sources)
