"""Prometheus metrics, served at GET /metrics on the public port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The daemon's metrics, in a registry of its own (tests start several daemons)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmws_requests", "Generation requests by outcome", ["outcome"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "llmws_prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.generated_tokens = Counter(
            "llmws_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.ttft = Histogram(
            "llmws_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.connections = Gauge(
            "llmws_connections", "Open WebSocket connections", registry=self.registry
        )
        self.sessions = Gauge("llmws_sessions", "Sessions held", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
