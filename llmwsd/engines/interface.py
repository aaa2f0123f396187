"""What a generation is asked for and what it reports: the engine's interface types.

The server builds a :class:`GenerationRequest`, the engine answers through a
callback with :data:`GenerationEvent` values on the event loop. Nothing here
imports torch, so the protocol layer and its tests stay light.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmwsd.errors import ContextTooLong, LLMWSError
from llmwsd.settings import FORMAT_TYPES, GenerationSettings, OutputFormat

if TYPE_CHECKING:
    from llmwsd.engines.memory import Capacity


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the chat messages (role/content dicts) and its settings.

    ``prompt_ids`` are the messages through the model's chat template, as the service
    counted them to fit the context (``EngineLike.tokenize``): the engine runs those,
    and tokenizes the messages itself only when a caller gave none. ``tools`` (OpenAI's
    function tools, the HTTP APIs') are rendered into the prompt with the messages, whose
    assistant turns may then carry ``tool_calls`` and whose ``tool`` turns are results
    (llmwsd.engines.chat_template).
    """

    messages: list[dict[str, str]]
    settings: GenerationSettings
    request_id: str = ""
    prompt_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None


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

    @classmethod
    def measured(
        cls,
        total_tokens: int,
        finish_reason: str,
        submitted_at: float,
        first_token_at: float | None,
        started_at: float,
    ) -> Finished:
        """The end of an answer, timed (monotonic seconds): the time to its first token
        from its submission, its speed from when the engine started on it."""
        elapsed = time.monotonic() - started_at
        return cls(
            total_tokens=total_tokens,
            finish_reason=finish_reason,
            ttft_ms=round((first_token_at - submitted_at) * 1000, 1) if first_token_at else 0.0,
            tokens_per_s=round(total_tokens / elapsed, 2) if total_tokens and elapsed > 0 else 0.0,
        )


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
    # Why the engine can serve no more (its process died); None while it can.
    failure: str | None = None

    def stuck(self, after_s: float) -> bool:
        """Whether the engine is out of service: dead, or busy and silent for ``after_s``."""
        return self.failure is not None or (self.busy and self.age_s > after_s)

    def reason(self) -> str:
        if self.failure is not None:
            return self.failure
        return f"the engine has not finished a step in {self.age_s:.0f} s"


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
    # What admission reserves requests against, and how max_context was derived; None: nothing
    memory: Capacity | None = None
    engine: str = "transformers"  # [engine] backend: which engine serves the model

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
            "engine": self.engine,
            "formats": list(FORMAT_TYPES),  # the answer formats both engines enforce
            "training": False,
        }


class GenerationHandle(Protocol):
    request_id: str

    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the daemon needs of an engine (the transformers engine, or a test's fake)."""

    info: ModelInfo

    def tokenize(
        self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The messages (and tools) through the chat template; thread-safe, called off the
        event loop."""
        ...

    def prepare_format(self, fmt: OutputFormat) -> None:
        """Compile an answer's format for this model (cached), or raise BadRequest saying why
        it cannot be enforced; called off the event loop, before admission."""
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
