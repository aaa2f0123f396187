"""A generation's settings: the one type for a client's ``config`` and ``[generation_defaults]``.

Every key has its range here (:data:`SETTING_RANGES`); a session's settings, a request's
overrides and the configuration's defaults are all checked by :meth:`GenerationSettings.merge`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from llmwsd.errors import BadRequest

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


FORMAT_TYPES = ("json_schema", "json", "regex", "choice")
MAX_FORMAT_CHARS = 64 * 1024  # a schema, pattern or the choices together, as JSON text


@dataclass(frozen=True)
class OutputFormat:
    """The shape an answer must have, enforced token by token (llmwsd.engines.grammar).

    ``json_schema``: JSON matching ``schema``; ``json``: any JSON object; ``regex``: text
    matching ``pattern`` whole; ``choice``: one of ``choices``, exactly.
    """

    type: str
    schema: str = ""  # the JSON schema as JSON text, its keys in the order given (generated so)
    pattern: str = ""
    choices: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> OutputFormat | None:
        """A client's ``format`` object (None: no format), checked for shape, or BadRequest."""
        if value is None:
            return None
        if not isinstance(value, dict) or value.get("type") not in FORMAT_TYPES:
            raise BadRequest(
                "format must be an object whose type is one of " + ", ".join(FORMAT_TYPES),
                param="format",
            )
        kind = value["type"]
        if kind == "json_schema":
            schema = value.get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("format.schema must be a JSON schema (an object)", param="format")
            found = cls(kind, schema=json.dumps(schema, separators=(",", ":")))  # in its order
        elif kind == "regex":
            pattern = value.get("pattern")
            if not isinstance(pattern, str) or not pattern:
                raise BadRequest("format.pattern must be a regular expression", param="format")
            found = cls(kind, pattern=pattern)
        elif kind == "choice":
            choices = value.get("choices")
            if (
                not isinstance(choices, list)
                or not choices
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise BadRequest(
                    "format.choices must be a list of non-empty strings", param="format"
                )
            found = cls(kind, choices=tuple(choices))
        else:
            found = cls(kind)
        if len(json.dumps(found.to_dict())) > MAX_FORMAT_CHARS:
            raise BadRequest(f"format is over {MAX_FORMAT_CHARS} characters", param="format")
        return found

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        if self.type == "json_schema":
            data["schema"] = json.loads(self.schema)
        elif self.type == "regex":
            data["pattern"] = self.pattern
        elif self.type == "choice":
            data["choices"] = list(self.choices)
        return data


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
    format: OutputFormat | None = None  # the answer's shape: JSON (schema), regex or a choice

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
        if self.format is None:
            del data["format"]  # no format: no key, as before formats existed
        else:
            data["format"] = self.format.to_dict()
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
    if key == "format":
        return OutputFormat.from_wire(value)
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
