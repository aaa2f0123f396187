"""llmws's errors in the HTTP APIs' own shapes and statuses.

One table maps an error code of the protocol (llmwsd.errors) to its HTTP status; OpenAI's
body is ``{"error": {"message", "type", "param", "code"}}``, Anthropic's
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from typing import Any

from llmwsd.errors import ContextTooLong, LLMWSError

STATUS: dict[str, int] = {
    "bad_request": 400,
    "invalid_json": 400,
    "context_too_long": 400,
    "unsupported": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "too_large": 413,
    "busy": 429,
    "rate_limited": 429,
    "no_model": 503,
}

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def status_of(error: LLMWSError) -> int:
    return STATUS.get(error.code, 500)


def openai_error(error: LLMWSError) -> dict[str, Any]:
    status = status_of(error)
    code = error.code
    message = error.message
    if isinstance(error, ContextTooLong):
        code = "context_length_exceeded"
        message = (
            f"This model's maximum context length is {error.max_context} tokens. However, "
            f"you requested {error.input_length} tokens in the prompt"
            + (
                f" and {error.details['max_new_tokens']} for the answer"
                if error.details.get("max_new_tokens")
                else ""
            )
            + ". Shorten the messages or lower max_tokens."
        )
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "server_error"),
            "param": error.details.get("param"),
            "code": error.details.get("api_code", code),
        }
    }


def anthropic_error(error: LLMWSError) -> dict[str, Any]:
    status = status_of(error)
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    message = openai_error(error)["error"]["message"]
    return {"type": "error", "error": {"type": kind, "message": message}}
