"""What a generation is asked for and what it reports: the engine's interface types.

The server builds a :class:`GenerationRequest`, the engine answers through a
callback with :data:`GenerationEvent` values on the event loop. Nothing here
imports torch, so the protocol layer and its tests stay light.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmwsd.errors import BadRequest, ContextTooLong, LLMWSError

if TYPE_CHECKING:
    from llmwsd.engines.memory import MemoryEstimate

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo`` to ``hi``, ``lo`` itself refused if ``lo_open``.

    Used for a client's settings here and for every numeric key of the
    configuration (llmwsd.config); NaN is in no range.
    """

    lo: int | float
    hi: int | float
    lo_open: bool = False

    def __contains__(self, value: int | float) -> bool:
        above = self.lo < value if self.lo_open else self.lo <= value
        return above and value <= self.hi

    def __str__(self) -> str:
        if self.lo_open:
            return f"greater than {self.lo} and at most {self.hi}"
        return f"between {self.lo} and {self.hi}"


# The one table of what a client may ask for; [generation_defaults] is held to it too.
SETTING_RANGES: dict[str, Range] = {
    "max_new_tokens": Range(1, 1_000_000),
    "min_new_tokens": Range(0, 1_000_000),
    "temperature": Range(0, 100),  # 0: greedy
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(0, 1_000_000),  # 0: off
    "repetition_penalty": Range(0, 10, lo_open=True),  # 1: off
    "seed": Range(0, 2**63 - 1),
}
INTEGER_SETTINGS = frozenset({"max_new_tokens", "min_new_tokens", "top_k", "seed"})


@dataclass(frozen=True)
class GenerationSettings:
    """Per-request sampling settings; ``merge`` validates what a client sends."""

    max_new_tokens: int = 512  # a runaway answer on a CPU stops after seconds, not a minute
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    do_sample: bool = True
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_new_tokens: int = 0

    def merge(self, data: Any) -> GenerationSettings:
        """Return these settings updated by ``data`` (a client's dict), or raise BadRequest."""
        if not isinstance(data, dict):
            raise BadRequest("generation settings must be a JSON object")
        changes: dict[str, Any] = {}
        for key, value in data.items():
            changes[key] = _validate_setting(key, value)
        merged = dataclasses.replace(self, **changes)
        if merged.min_new_tokens > merged.max_new_tokens:
            raise BadRequest("min_new_tokens must not exceed max_new_tokens")
        return merged

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stop"] = list(self.stop)
        return data


def _number(key: str, value: Any, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"setting {key!r} must be a number")
    if integer and not isinstance(value, int):
        raise BadRequest(f"setting {key!r} must be an integer")
    # Checked before any float(): an int beyond a float's range would raise OverflowError.
    if isinstance(value, int) and abs(value) >= 2**63:
        raise BadRequest(f"setting {key!r} is out of range")
    if not math.isfinite(value):
        raise BadRequest(f"setting {key!r} must be finite")
    return value


def _validate_setting(key: str, value: Any) -> Any:
    limits = SETTING_RANGES.get(key)
    if limits is not None:
        if key == "seed" and value is None:
            return None
        integer = key in INTEGER_SETTINGS
        n = _number(key, value, integer=integer)
        if n not in limits:
            raise BadRequest(f"{key} must be {limits}")
        return int(n) if integer else float(n)
    if key == "do_sample":
        if not isinstance(value, bool):
            raise BadRequest("do_sample must be true or false")
        return value
    if key == "stop":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise BadRequest("stop must be a list of non-empty strings")
        if len(value) > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > MAX_STOP_LENGTH for s in value):
            raise BadRequest(f"stop strings are at most {MAX_STOP_LENGTH} characters")
        return tuple(value)
    raise BadRequest(f"unknown generation setting {key!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the chat messages (role/content dicts) and its settings.

    ``prompt_ids`` are the messages through the model's chat template, as the service
    counted them to fit the context (``EngineLike.tokenize``): the engine runs those,
    and tokenizes the messages itself only when a caller gave none.
    """

    messages: list[dict[str, str]]
    settings: GenerationSettings
    request_id: str = ""
    prompt_ids: list[int] | None = None


def new_token_budget(
    prompt_tokens: int, max_new_tokens: int, max_context: int, on_overflow: str
) -> int:
    """``max_new_tokens``, or fewer so that the answer fits; ContextTooLong when none fits.

    ``on_overflow`` is ``[limits] on_overflow``: "refuse" a request whose answer does
    not fit whole, or "truncate" its max_new_tokens to what fits.
    """
    if prompt_tokens >= max_context:
        raise ContextTooLong(prompt_tokens, max_context)
    room = max_context - prompt_tokens
    if max_new_tokens <= room:
        return max_new_tokens
    if on_overflow == "refuse":
        raise ContextTooLong(prompt_tokens, max_context, max_new_tokens)
    return room


@dataclass(frozen=True)
class Started:
    tokens_in: int
    max_tokens: int


@dataclass(frozen=True)
class TokenText:
    text: str


@dataclass(frozen=True)
class Finished:
    total_tokens: int
    finish_reason: str  # "stop", "length" or "cancelled"
    ttft_ms: float
    tokens_per_s: float


@dataclass(frozen=True)
class Failed:
    error: LLMWSError


GenerationEvent = Started | TokenText | Finished | Failed
EventCallback = Callable[[GenerationEvent], None]


class EventStream:
    """One request's events on their way to its callback: nothing after its last one.

    The last event is a Finished or a Failed. Past it, what the engine still sends
    (a stuck step that ends after :meth:`EngineLike.abandon` failed the request) is
    dropped, so each request ends exactly once.
    """

    def __init__(self, on_event: EventCallback) -> None:
        self._on_event = on_event
        self.ended = False

    def __call__(self, event: GenerationEvent) -> None:
        if self.ended:
            return
        if isinstance(event, Finished | Failed):
            self.ended = True
        self._on_event(event)


@dataclass(frozen=True)
class Heartbeat:
    """Whether the engine is alive: how long its loop has not turned, and whether it has work.

    ``age_s`` counts from the loop's last turn, or from the moment work came to an idle
    engine. An idle engine waiting for work is alive however old its last turn.
    """

    age_s: float
    busy: bool

    def stuck(self, after_s: float) -> bool:
        return self.busy and self.age_s > after_s


@dataclass
class ModelInfo:
    """What the engine tells clients about the loaded model."""

    name: str
    path: str
    device: str
    dtype: str
    max_context: int
    attention: str
    compute_capability: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    memory: MemoryEstimate | None = None  # how max_context was derived; None: not measured
    # Sampling settings from the model's generation_config.json (llmwsd.service.defaults).
    recommended: dict[str, Any] = field(default_factory=dict)

    def capabilities(self) -> dict[str, Any]:
        return {
            "vision": False,
            "flash_attention": self.attention == "flash_attention_2",
            "sdpa": self.attention == "sdpa",
            "attention": self.attention,
            "dtype": self.dtype,
            "compute_capability": self.compute_capability,
            "device": self.device,
            "max_context": self.max_context,
            "training": False,
        }


class GenerationHandle(Protocol):
    request_id: str

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the daemon needs of an engine (the transformers engine, or a test's fake)."""

    info: ModelInfo

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the chat template; thread-safe, called off the event loop."""
        ...

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> GenerationHandle: ...

    def stats(self) -> dict[str, Any]: ...

    def heartbeat(self) -> Heartbeat: ...

    def abandon(self, error: LLMWSError) -> int:
        """End every running and queued request with ``Failed(error)``, on the event loop.

        For an engine found stuck: its own thread cannot deliver them. Returns how
        many were ended; new requests are refused until the engine's loop turns again.
        """
        ...

    async def drain(self, timeout: float) -> None: ...

    async def close(self) -> None: ...
