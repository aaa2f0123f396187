"""Prometheus metrics, served at GET /metrics on the public port.

Counters and histograms are updated as requests go (:meth:`Metrics.track`);
the figures that are a state (active and queued requests, sessions, KV usage,
GPUs) are read when scraped, from the callable the daemon hands over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmwsd.engines.interface import Failed, Finished, GenerationEvent, Started
from llmwsd.errors import LLMWSError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; generations on a CPU take tens of seconds, on a GPU a few.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

LiveFigures = Callable[[], dict[str, Any]]


class LiveCollector(Collector):
    """The daemon's state at scrape time.

    ``figures()`` returns ``active``, ``queued``, ``sessions``, ``max_context``,
    ``kv_usage_ratio`` (reserved over budget), ``prefix_cache`` (the engine's figures, or
    None) and ``gpus`` (``resources.latest_gpus()``: read at once, measured in a thread).
    """

    def __init__(self, figures: LiveFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures()
        yield GaugeMetricFamily(
            "llmws_requests_active", "Requests admitted and running", value=f["active"]
        )
        yield GaugeMetricFamily(
            "llmws_requests_queued",
            "Requests waiting for memory or a batch slot",
            value=f["queued"],
        )
        yield GaugeMetricFamily("llmws_sessions", "Sessions held", value=f["sessions"])
        yield GaugeMetricFamily(
            "llmws_max_context_tokens",
            "The context limit of the loaded model (0: none loaded)",
            value=f["max_context"],
        )
        yield GaugeMetricFamily(
            "llmws_kv_usage_ratio",
            "Memory reserved by running requests (KV cache and activations) over the budget",
            value=f["kv_usage_ratio"],
        )
        prefixes = f.get("prefix_cache")
        if prefixes is not None:
            yield GaugeMetricFamily(
                "llmws_prefix_cache_bytes",
                "Keys and values of recent prompts kept for reuse",
                value=prefixes["bytes"],
            )
            yield CounterMetricFamily(
                "llmws_prefix_cache_reused_tokens",
                "Prompt tokens taken from the prefix cache instead of prefilled (since load)",
                value=prefixes["reused_tokens"],
            )
        used = GaugeMetricFamily(
            "llmws_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "llmws_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=["gpu"]
        )
        utilization = GaugeMetricFamily(
            "llmws_gpu_utilization_ratio", "GPU busy time over the last sample", labels=["gpu"]
        )
        for gpu in f["gpus"]:
            label = [str(gpu["index"])]
            used.add_metric(label, gpu["memory_used_bytes"])
            total.add_metric(label, gpu["memory_total_bytes"])
            if gpu["utilization_percent"] is not None:
                utilization.add_metric(label, gpu["utilization_percent"] / 100)
        yield from (used, total, utilization)


class Metrics:
    """The daemon's metrics, in a registry of its own (tests start several daemons)."""

    def __init__(self, figures: LiveFigures) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmws_requests",
            "Generation requests by outcome: stop, length, cancelled, or an error code",
            ["outcome"],
            registry=self.registry,
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
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "llmws_request_duration_seconds",
            "Time from request to its last event, queueing included",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.connections = Gauge(
            "llmws_connections", "Open WebSocket connections", registry=self.registry
        )
        self.http_requests = Counter(
            "llmws_http_requests",
            "Requests to the HTTP APIs by API (openai, anthropic), endpoint and status",
            ["api", "endpoint", "status"],
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "llmws_model_load_seconds",
            "How long loading the current model took",
            registry=self.registry,
        )
        self.registry.register(LiveCollector(figures))

    def track(self) -> Callable[[GenerationEvent], None]:
        """An observer of one request's events: its tokens, timings and outcome."""
        submitted = time.monotonic()

        def observe(event: GenerationEvent) -> None:
            if isinstance(event, Started):
                self.prompt_tokens.inc(event.tokens_in)
            elif isinstance(event, Finished):
                self.requests.labels(event.finish_reason).inc()
                self.generated_tokens.inc(event.total_tokens)
                if event.total_tokens:
                    self.ttft.observe(event.ttft_ms / 1000)
                self.duration.observe(time.monotonic() - submitted)
            elif isinstance(event, Failed):
                self.requests.labels(event.error.code).inc()
                self.duration.observe(time.monotonic() - submitted)

        return observe

    def refused(self, error: LLMWSError) -> None:
        """A request refused before it reached the engine (context_too_long, busy, …)."""
        self.requests.labels(error.code).inc()

    def http_request(self, api: str, endpoint: str, status: int) -> None:
        self.http_requests.labels(api, endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
