"""The admin socket's protocol, shared by llmwsd and llmwsctl (no daemon internals here).

One JSON object per line, UTF-8, both ways:

* on connect the daemon sends a greeting, ``{"hello": "llmwsd", "protocol": 1,
  "version": "0.1.0"}``; a client that speaks another protocol version stops there;
* a request is ``{"id": 7, "cmd": "switch", "args": {"model": "NAME"}}`` (``args``
  optional);
* long commands answer with ``{"id": 7, "progress": {...}}`` lines first; a
  progress object has ``stage`` and a human ``message``, and transfers add
  ``done`` and ``total`` bytes (optionally ``file``, ``file_done``, ``file_total``);
* the final answer is ``{"id": 7, "ok": true, "result": ...}`` or
  ``{"id": 7, "ok": false, "error": {"code": "not_found", "message": "..."}}``.

A request line longer than :data:`MAX_REQUEST_LINE` bytes is skipped and
answered with a ``bad_request`` error whose ``id`` is null; the connection stays
usable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmwsd.errors import BadRequest, InvalidJSON, LLMWSError, error_from_message

ADMIN_PROTOCOL_VERSION = 1

SOCKET_NAME = "admin.sock"
DEFAULT_SOCKET = f"/run/llmws/{SOCKET_NAME}"
SOCKET_ENV = "LLMWS_ADMIN_SOCKET"

# Requests are small; this bounds what a client can make the daemon hold in memory.
MAX_REQUEST_LINE = 1024 * 1024
# Answers can list many models or sessions; the client still bounds them.
MAX_RESPONSE_LINE = 64 * 1024 * 1024

STATUS = "status"
MODELS = "models"
SWITCH = "switch"
PULL = "pull"
PULLS = "pulls"
PULL_CANCEL = "pull_cancel"
PULLS_CLEAN = "pulls_clean"
RM = "rm"
RESOURCES = "resources"
SESSIONS = "sessions"
SESSION_DROP = "session_drop"
RELOAD = "reload"
TOKENS = "tokens"
TOKEN_ADD = "token_add"
TOKEN_REVOKE = "token_revoke"

# Commands that change the server: the daemon logs who sent them (SO_PEERCRED).
CHANGING_COMMANDS = frozenset(
    {SWITCH, PULL, PULL_CANCEL, PULLS_CLEAN, RM, SESSION_DROP, RELOAD, TOKEN_ADD, TOKEN_REVOKE}
)

RequestId = int | str | None


def encode(message: dict[str, Any]) -> bytes:
    """One line of the protocol; allow_nan=False because NaN is not JSON."""
    text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line into a JSON object, or raise InvalidJSON / BadRequest."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidJSON(f"invalid JSON: {e}") from None
    if not isinstance(message, dict):
        raise BadRequest("a request must be a JSON object")
    return message


def greeting(version: str) -> dict[str, Any]:
    return {"hello": "llmwsd", "protocol": ADMIN_PROTOCOL_VERSION, "version": version}


@dataclass(frozen=True)
class Greeting:
    """A greeting as a client reads it; ``protocol`` may be another version than ours."""

    protocol: Any
    version: str

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Greeting:
        """BadRequest when ``message`` is not llmwsd's greeting at all."""
        if message.get("hello") != "llmwsd":
            raise BadRequest("not an llmwsd admin greeting")
        return cls(protocol=message.get("protocol"), version=str(message.get("version", "")))


def request(request_id: RequestId, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": request_id, "cmd": cmd, "args": args or {}}


def parse_request(message: dict[str, Any]) -> tuple[RequestId, str, dict[str, Any]]:
    """The id, command and arguments of a decoded request line, or BadRequest."""
    request_id = message.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, int | str)
    ):
        raise BadRequest("id must be a number or a string")
    cmd = message.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise BadRequest('a request needs "cmd", a command name such as "status"')
    args = message.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest('"args" must be a JSON object')
    return request_id, cmd, args


def request_id_of(message: Any) -> RequestId:
    """The id to answer a bad request with: its own when readable, else null."""
    if isinstance(message, dict):
        value = message.get("id")
        if isinstance(value, int | str) and not isinstance(value, bool):
            return value
    return None


def ok(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def failed(request_id: RequestId, error: LLMWSError) -> dict[str, Any]:
    return {
        "id": request_id,
        "ok": False,
        "error": {"code": error.code, "message": error.message, **error.details},
    }


def progress(request_id: RequestId, data: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "progress": data}


@dataclass(frozen=True)
class Answer:
    """One line the daemon sends about a request, as a client reads it (see :func:`ok`,
    :func:`failed` and :func:`progress`): a progress report, or the final result or error."""

    id: RequestId
    progress: dict[str, Any] | None = None
    result: Any = None
    error: LLMWSError | None = None

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Answer:
        request_id = message.get("id")
        if "progress" in message:
            return cls(request_id, progress=message["progress"])
        if message.get("ok"):
            return cls(request_id, result=message.get("result"))
        error = message.get("error")
        return cls(request_id, error=error_from_message(error if isinstance(error, dict) else {}))
