"""The public WebSocket protocol's framing, field parsers and legacy text mode.

See ``docs/protocol.md`` (the reference); the messages themselves are typed in
:mod:`llmwsd.protocol.messages`. Parsing here turns untrusted frames into checked
Python values or raises a :class:`~llmwsd.errors.BadRequest` subclass; it never
touches the filesystem or the model.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llmwsd.errors import BadRequest, InvalidJSON

PROTOCOL_VERSION = 1

_LEGACY_SECTION = re.compile(r"<\|(system|user)\|>(.*?)(?:<\|end\|>|(?=<\|)|\Z)", re.DOTALL)
_LEGACY_TAG = re.compile(r"<\|[a-z_]+\|>")
# Where a surrogate may hide: a \uD800-\uDFFF escape (a valid pair is fine, a lone one is not).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def parse_legacy_prompt(text: str) -> dict[str, str]:
    """Split a text client's ``<|system|>…<|end|><|user|>…<|end|>`` prompt into its parts.

    A frame with no tags is all user text.
    """
    if "<|" not in text:
        return {"system": "", "user": text.strip()}
    parts = {"system": "", "user": ""}
    sections = _LEGACY_SECTION.findall(text)
    for role, body in sections:
        parts[role] = (parts[role] + "\n" + body.strip()).strip()
    if not sections:
        # Tags we do not know: keep the text without them rather than dropping it.
        parts["user"] = _LEGACY_TAG.sub("", text).strip()
    return parts


def is_legacy_end_frame(text: str) -> bool:
    """Text clients stop at a frame that is a lone tag containing ``end``."""
    stripped = text.strip()
    return bool(_LEGACY_TAG.fullmatch(stripped)) and "end" in stripped


def decode_message(frame: str | bytes) -> dict[str, Any]:
    """Parse one JSON-mode frame into a message dict with a known ``type``."""
    if isinstance(frame, bytes):
        raise BadRequest("binary frames are not supported: send JSON text")
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError) as e:
        raise InvalidJSON(f"invalid JSON: {e}") from None
    if not isinstance(message, dict):
        raise BadRequest("a message must be a JSON object")
    if _SURROGATE_ESCAPE.search(frame) and not _is_text(message):
        # A lone surrogate cannot be encoded: echoed or stored, it would fail later, elsewhere.
        raise BadRequest("invalid text: a lone surrogate escape (\\ud800-\\udfff)")
    return message


def _is_text(message: dict[str, Any]) -> bool:
    """Whether every string in ``message`` is valid Unicode (JSON escapes can make it not)."""
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_message(message: dict[str, Any]) -> str:
    # allow_nan=False: NaN is not JSON, and a client's parser would reject the whole frame.
    return json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def parse_session_id(value: Any) -> str | None:
    """A hello's ``session_id``: None when absent, a canonical UUID string, or BadRequest."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 36:
        raise BadRequest("session_id must be a UUID such as 123e4567-e89b-12d3-a456-426614174000")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise BadRequest("session_id must be a UUID") from None
    return str(parsed)


def parse_seq(value: Any, field: str = "last_seq") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise BadRequest(f"{field} must be a non-negative integer")
    return value


def parse_prompt(value: Any) -> dict[str, str]:
    """An inference ``prompt``: ``{"system", "user"}`` or a legacy prompt string."""
    if isinstance(value, str):
        prompt = parse_legacy_prompt(value)
    elif isinstance(value, dict):
        system = value.get("system", "")
        user = value.get("user")
        if not isinstance(user, str):
            raise BadRequest("prompt.user must be a string")
        if system is None:
            system = ""
        if not isinstance(system, str):
            raise BadRequest("prompt.system must be a string")
        prompt = {"system": system, "user": user}
    else:
        raise BadRequest('inference needs a prompt: {"system": "...", "user": "..."} or a string')
    if not prompt["user"].strip():
        raise BadRequest("the prompt's user text is empty")
    return prompt
