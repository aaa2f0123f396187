"""What the frontends may use: the service layer, never the daemon above it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmwsd.auth import Authenticator
from llmwsd.config import Config
from llmwsd.metrics import Metrics
from llmwsd.service.defaults import Defaults
from llmwsd.service.generation import GenerationService
from llmwsd.service.model_changes import ModelChanges
from llmwsd.service.model_slot import ModelSlot
from llmwsd.service.reports import Reports
from llmwsd.sessions.registry import SessionStore


@dataclass(frozen=True)
class Services:
    config: Callable[[], Config]  # the running configuration (a reload replaces it)
    defaults: Callable[[], Defaults]  # what a new session's settings start as
    sessions: SessionStore
    slot: ModelSlot
    models: ModelChanges
    generation: GenerationService
    reports: Reports
    metrics: Metrics
    auth: Authenticator  # the public port's tokens, which the admin socket manages
