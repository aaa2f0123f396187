"""How a protocol message, a frozen dataclass, maps to its JSON object and back.

A message's fields are its wire fields, in wire order, with these marks:

* ``metadata=OMITTED``: left off the wire while it holds its default (``seq``
  before the session numbers an event, ``request_id`` of a refused cancel, ...);
* ``metadata=SPREAD``: a dict whose keys travel beside ``type`` (a report, an
  error's details); on the way in it takes every key the message does not name.

``from_wire`` raises :class:`~llmwsd.errors.BadRequest` for a missing field or
one of the wrong type, and ignores fields it does not know (a newer peer's).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from llmwsd.errors import BadRequest

# Field marks (see the module's docstring), as dataclasses.field(metadata=...).
OMITTED = {"omitted": True}
SPREAD = {"spread": True}


@dataclass(frozen=True, kw_only=True)
class Message:
    """One protocol message; a subclass names its ``TYPE`` and declares its fields."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """The JSON object to send (``wire.encode_message`` turns it into a frame)."""
        message: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata == SPREAD:
                message.update(value)
            elif not (f.metadata == OMITTED and value == f.default):
                message[f.name] = value
        return message

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        """The message a decoded frame holds, checked; BadRequest when it does not fit."""
        hints = _hints(cls)
        values: dict[str, Any] = {}
        spread_into = None
        for f in dataclasses.fields(cls):
            if f.metadata == SPREAD:
                spread_into = f.name
            elif f.name in message:
                values[f.name] = _checked(cls.TYPE, f.name, message[f.name], hints[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRequest(f"{cls.TYPE} needs {f.name!r}")
        if spread_into is not None:
            named = {"type", *(f.name for f in dataclasses.fields(cls))}
            values[spread_into] = {k: v for k, v in message.items() if k not in named}
        return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """A class's field annotations, evaluated once (they are strings until then)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _checked(kind: str, name: str, value: Any, hint: Any) -> Any:
    if not _conforms(value, hint):
        raise BadRequest(f"{kind}'s {name!r} must be {_describe(hint)}")
    return value


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (containers: their outer type)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON does not tell 2 from 2.0
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list) and all(_conforms(item, args[0]) for item in value)
    raise TypeError(f"no JSON check for {hint!r}")  # a field annotated with a new kind of type


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is dict:
        return "a JSON object"
    if typing.get_origin(hint) is list:
        return "a list"
    return names.get(hint, str(hint))
