"""One exception tree for the daemon, the admin channel and the clients.

Every error a client can see is an :class:`LLMWSError` with a protocol ``code``
(see ``docs/protocol.md``, "Errors") and a human message; extra fields (such
as ``max_context``) travel in ``details``. This module imports nothing heavy so
that llmwsctl can share it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LLMWSError(Exception):
    """Base of every llmws error; ``code`` is the protocol's error code."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_message(self) -> dict[str, Any]:
        """The protocol's ``error`` message for this exception."""
        return {"type": "error", "code": self.code, "message": self.message, **self.details}


class ConfigError(LLMWSError):
    code = "bad_config"


class BadRequest(LLMWSError):
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class UnknownType(BadRequest):
    code = "unknown_type"


class ContextTooLong(LLMWSError):
    code = "context_too_long"

    def __init__(self, input_length: int, max_context: int, max_new_tokens: int = 0) -> None:
        if max_new_tokens:  # the prompt fits, but not with the answer room asked for
            super().__init__(
                f"Context too long ({input_length} tokens + max_new_tokens {max_new_tokens}). "
                f"Max: {max_context}. Lower max_new_tokens or shorten the prompt.",
                max_context=max_context,
                input_length=input_length,
                max_new_tokens=max_new_tokens,
            )
        else:
            super().__init__(
                f"Context too long ({input_length} tokens). Max: {max_context}. Please retry.",
                max_context=max_context,
                input_length=input_length,
            )
        self.input_length = input_length
        self.max_context = max_context


class NoModel(LLMWSError):
    code = "no_model"


class Busy(LLMWSError):
    code = "busy"


class RateLimited(LLMWSError):
    code = "rate_limited"


class Forbidden(LLMWSError):
    code = "forbidden"


class Unauthorized(LLMWSError):
    code = "unauthorized"


class Unsupported(LLMWSError):
    code = "unsupported"


class NotFound(LLMWSError):
    code = "not_found"


class TooLarge(LLMWSError):
    """An HTTP request body over ``[server] max_message_size``."""

    code = "too_large"


class MethodNotAllowed(LLMWSError):
    code = "method_not_allowed"


class RequestTimeout(LLMWSError):
    """An HTTP request whose body did not come within ``[server] hello_timeout``."""

    code = "request_timeout"


class Interrupted(LLMWSError):
    code = "interrupted"


class EventsDropped(LLMWSError):
    """Buffered events a client had not received were dropped (the session's buffer cap)."""

    code = "events_dropped"


class DiskFull(LLMWSError):
    """Not enough free disk space for a download (``needed_bytes``, ``free_bytes``)."""

    code = "disk_full"


class InternalError(LLMWSError):
    code = "internal"


ERROR_CLASSES: dict[str, type[LLMWSError]] = {
    cls.code: cls
    for cls in (
        ConfigError,
        BadRequest,
        InvalidJSON,
        UnknownType,
        NoModel,
        Busy,
        RateLimited,
        Forbidden,
        Unauthorized,
        Unsupported,
        NotFound,
        TooLarge,
        MethodNotAllowed,
        RequestTimeout,
        Interrupted,
        EventsDropped,
        DiskFull,
        InternalError,
    )
}


def error_from_message(msg: dict[str, Any]) -> LLMWSError:
    """Turn a received ``error`` message back into the matching exception."""
    code = str(msg.get("code", "internal"))
    message = str(msg.get("message", code))
    details = {k: v for k, v in msg.items() if k not in ("type", "code", "message")}
    if code == ContextTooLong.code:
        return ContextTooLong(
            int(details.get("input_length", 0)),
            int(details.get("max_context", 0)),
            int(details.get("max_new_tokens", 0)),
        )
    cls = ERROR_CLASSES.get(code, LLMWSError)
    error = cls(message, **details)
    if cls is LLMWSError:
        error.code = code  # type: ignore[misc]
    return error
