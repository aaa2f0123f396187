"""Every message of the public JSON protocol, typed: one frozen dataclass per ``type``.

docs/protocol.md is the reference; these are its tables as code, shared by the
daemon (which builds what it sends with ``to_wire()`` and checks what it receives
with ``from_wire()``) and the clients (the other way round). How fields map to
JSON is in :mod:`llmwsd.protocol.shape`. Some client fields are typed ``Any``:
the code they go to checks them and says what it expected. Only the standard
library and llmwsd.errors are imported here: the client library shares this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Self

from llmwsd.errors import BadRequest, LLMWSError, UnknownType, error_from_message
from llmwsd.protocol import wire
from llmwsd.protocol.shape import OMITTED, SPREAD, Message

# -- from the client --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hello:
    """A JSON client's first frame: every field optional, and no ``type`` of its own.

    (A hello that also has a ``type`` is that message too; the connection handles it next.)
    """

    session_id: str | None = None
    last_seq: int | None = None
    token: Any = None  # the gatekeeper checks it, before the hello is read as a message

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        return cls(
            session_id=wire.parse_session_id(message.get("session_id")),
            last_seq=wire.parse_seq(message.get("last_seq")),
            token=message.get("token"),
        )


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    TYPE = "ping"


@dataclass(frozen=True, kw_only=True)
class Config(Message):
    """Change the session's settings (checked by GenerationSettings.merge, field by field)."""

    TYPE = "config"
    data: dict[str, Any]

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        # The old clients send the settings beside "type", without "data".
        data = message.get("data", {k: v for k, v in message.items() if k != "type"})
        return cls(data=_settings(data))


@dataclass(frozen=True, kw_only=True)
class Prompt:
    system: str
    user: str


@dataclass(frozen=True, kw_only=True)
class Inference(Message):
    """One turn; ``config``: settings for this answer only (``format`` may also stand beside)."""

    TYPE = "inference"
    prompt: Prompt
    config: dict[str, Any] | None = field(default=None, metadata=OMITTED)

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "prompt": dataclasses.asdict(self.prompt)}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        prompt = wire.parse_prompt(message.get("prompt"))  # also a legacy prompt string
        config = message.get("config")
        if "format" in message:  # the answer's shape: a setting of this answer, like config's
            config = {**_settings(config or {}), "format": message["format"]}
        return cls(
            prompt=Prompt(system=prompt["system"], user=prompt["user"]),
            config=None if config is None else _settings(config),
        )


def _settings(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest("generation settings must be a JSON object")
    return data


@dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    TYPE = "cancel"


@dataclass(frozen=True, kw_only=True)
class Ack(Message):
    """Let the server drop its buffered events up to ``seq`` (None: all of them)."""

    TYPE = "ack"
    seq: int | None = field(default=None, metadata=OMITTED)

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        return cls(seq=wire.parse_seq(message.get("seq"), "seq"))


@dataclass(frozen=True, kw_only=True)
class Reset(Message):
    TYPE = "reset"


@dataclass(frozen=True, kw_only=True)
class GetHistory(Message):
    TYPE = "history"


@dataclass(frozen=True, kw_only=True)
class GetResources(Message):
    TYPE = "get_resources"


@dataclass(frozen=True, kw_only=True)
class SubscribeResources(Message):
    """``resources`` every ``interval`` seconds; 0 stops."""

    TYPE = "subscribe_resources"
    interval: float = 2

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        interval = message.get("interval", 2)
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not (interval == 0 or 0.5 <= interval <= 3600)
            or not math.isfinite(interval)
        ):
            raise BadRequest("interval must be 0 (stop) or between 0.5 and 3600 seconds")
        return cls(interval=interval)


@dataclass(frozen=True, kw_only=True)
class GetStatus(Message):
    TYPE = "get_status"


@dataclass(frozen=True, kw_only=True)
class ListModels(Message):
    TYPE = "list_models"


@dataclass(frozen=True, kw_only=True)
class RecheckModel(Message):
    TYPE = "recheck_model"


@dataclass(frozen=True, kw_only=True)
class SwitchModel(Message):
    """By ``model`` (a name) or ``model_path`` (a catalogue folder); the manager checks both."""

    TYPE = "switch_model"
    model: Any = field(default=None, metadata=OMITTED)
    model_path: Any = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class DownloadModel(Message):
    """``repo`` into the catalogue as ``target_dir``; the pull checks each field."""

    TYPE = "download_model"
    repo: Any = None
    target_dir: Any = field(default=None, metadata=OMITTED)
    revision: Any = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class DeleteModel(Message):
    TYPE = "delete_model"
    model_name: Any = None  # the manager checks it
    force: bool = field(default=False, metadata=OMITTED)

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Self:
        return cls(model_name=message.get("model_name"), force=message.get("force") is True)


@dataclass(frozen=True, kw_only=True)
class Train(Message):
    """The old server's training messages: answered with ``unsupported``."""

    TYPE = "train"


@dataclass(frozen=True, kw_only=True)
class TrainStatus(Message):
    TYPE = "train_status"


@dataclass(frozen=True, kw_only=True)
class SaveSnapshot(Message):
    TYPE = "save_snapshot"


# -- from the server: answers -----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    TYPE = "welcome"
    protocol: int
    server: str
    session_id: str
    resumed: bool
    last_seq: int  # the session's newest event seq at the welcome (0: none yet)
    model: str | None
    model_state: str
    capabilities: dict[str, Any]
    resources: dict[str, Any]
    config: dict[str, Any]
    defaults_from: dict[str, str]
    last_seq_clamped: int | None = field(
        default=None, metadata=OMITTED
    )  # the hello's last_seq, when past last_seq


@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    TYPE = "pong"


@dataclass(frozen=True, kw_only=True)
class ConfigAck(Message):
    TYPE = "config_ack"
    config: dict[str, Any]  # all of the session's settings after the change


@dataclass(frozen=True, kw_only=True)
class CancelAck(Message):
    TYPE = "cancel_ack"
    cancelled: bool
    request_id: str | None = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class AckReceived(Message):
    TYPE = "ack_received"
    seq: int  # what was acknowledged, never past the newest event
    dropped: int  # events removed from the buffer


@dataclass(frozen=True, kw_only=True)
class ResetDone(Message):
    TYPE = "reset_done"


@dataclass(frozen=True, kw_only=True)
class History(Message):
    TYPE = "history"
    messages: list[dict[str, str]]  # {"role", "content"}, the system message first


@dataclass(frozen=True, kw_only=True)
class Resources(Message):
    TYPE = "resources"
    report: dict[str, Any] = field(
        default_factory=dict, metadata=SPREAD
    )  # device, free_gb, total_gb, gpus, engine, ...


@dataclass(frozen=True, kw_only=True)
class Subscribed(Message):
    TYPE = "subscribed"
    interval: float


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    TYPE = "status"
    version: str
    uptime_s: float
    model: str | None
    model_state: str
    device: str | None
    max_context: int | None
    sessions: int
    queue: int
    active: int
    memory: dict[str, Any]
    context_limit: dict[str, Any] | None
    # The engine's heartbeat (llmwsd.service.health): None without a model.
    engine_heartbeat_age_s: float | None = None
    engine_busy: bool = False
    engine_stuck: bool = False
    engine_failure: str | None = None  # why a dead engine serves no more
    engine: str | None = None  # [engine] backend of the model served: transformers or vllm


@dataclass(frozen=True, kw_only=True)
class ModelsList(Message):
    TYPE = "models_list"
    models: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class RecheckComplete(Message):
    TYPE = "recheck_complete"
    models: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Log(Message):
    """A line of a switch's or a download's progress (``id``: the download's)."""

    TYPE = "log"
    id: str | None = field(default=None, metadata=OMITTED)
    message: str


@dataclass(frozen=True, kw_only=True)
class ModelSwitched(Message):
    TYPE = "model_switched"
    result: dict[str, Any] = field(
        default_factory=dict, metadata=SPREAD
    )  # model, changed, previous or load_s, unloaded_first


@dataclass(frozen=True, kw_only=True)
class DownloadStarted(Message):
    TYPE = "download_started"
    id: str
    repo: str
    name: str


@dataclass(frozen=True, kw_only=True)
class DownloadProgress(Message):
    TYPE = "download_progress"
    progress: dict[str, Any] = field(
        default_factory=dict, metadata=SPREAD
    )  # id, stage, message, done, total, ...


@dataclass(frozen=True, kw_only=True)
class DownloadDone(Message):
    TYPE = "download_done"
    result: dict[str, Any] = field(default_factory=dict, metadata=SPREAD)


@dataclass(frozen=True, kw_only=True)
class ModelDeleted(Message):
    TYPE = "model_deleted"
    result: dict[str, Any] = field(
        default_factory=dict, metadata=SPREAD
    )  # removed, path, size_bytes


# -- from the server: generation events (numbered by the session's buffer) ---------------


@dataclass(frozen=True, kw_only=True)
class Queued(Message):
    TYPE = "queued"
    request_id: str
    position: int
    seq: int | None = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class Start(Message):
    TYPE = "start"
    request_id: str
    tokens_in: int
    max_tokens: int
    dropped_turns: int
    max_tokens_requested: int = field(
        default=0, metadata=OMITTED
    )  # when max_new_tokens was lowered to fit
    seq: int | None = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class Token(Message):
    TYPE = "token"
    request_id: str
    data: str
    seq: int | None = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class Done(Message):
    TYPE = "done"
    request_id: str
    total_tokens: int
    finish_reason: str  # stop, length or cancelled
    ttft_ms: float
    tokens_per_s: float
    history_dropped: int = field(default=0, metadata=OMITTED)
    seq: int | None = field(default=None, metadata=OMITTED)


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    """An error about a message (no seq), or the end of a generation (request_id and seq)."""

    TYPE = "error"
    code: str
    message: str
    details: dict[str, Any] = field(
        default_factory=dict, metadata=SPREAD
    )  # max_context, first_seq, id, needed_bytes, ...
    request_id: str | None = field(default=None, metadata=OMITTED)
    seq: int | None = field(default=None, metadata=OMITTED)

    @classmethod
    def from_exception(cls, error: LLMWSError, **fields: Any) -> Self:
        """``fields``: ``request_id``, ``seq`` or more details (a download's ``id``)."""
        return cls.from_wire({**error.to_message(), **fields})

    def exception(self) -> LLMWSError:
        """The matching exception of llmwsd.errors, to raise."""
        return error_from_message(self.to_wire())


# -- the tables -------------------------------------------------------------------------


def _table(*classes: type[Message]) -> dict[str, type[Message]]:
    return {cls.TYPE: cls for cls in classes}


CLIENT_MESSAGES = _table(
    Ping,
    Config,
    Inference,
    Cancel,
    Ack,
    Reset,
    GetHistory,
    GetResources,
    SubscribeResources,
    GetStatus,
    ListModels,
    RecheckModel,
    SwitchModel,
    DownloadModel,
    DeleteModel,
    Train,
    TrainStatus,
    SaveSnapshot,
)
GENERATION_EVENTS = _table(Queued, Start, Token, Done, Error)
SERVER_MESSAGES = _table(
    Welcome,
    Pong,
    ConfigAck,
    CancelAck,
    AckReceived,
    ResetDone,
    History,
    Resources,
    Subscribed,
    Status,
    ModelsList,
    RecheckComplete,
    Log,
    ModelSwitched,
    DownloadStarted,
    DownloadProgress,
    DownloadDone,
    ModelDeleted,
    *GENERATION_EVENTS.values(),
)

# Every message type a JSON client may send; the server answers each one.
CLIENT_TYPES = frozenset(CLIENT_MESSAGES)
# Generation events: they carry `seq` and `request_id` and are buffered per session.
GENERATION_TYPES = frozenset(GENERATION_EVENTS)


def is_generation_event(message: dict[str, Any]) -> bool:
    """A buffered generation event (it has a seq), as opposed to a direct answer."""
    return message.get("type") in GENERATION_TYPES and "seq" in message


def _class_of(table: dict[str, type[Message]], kind: Any) -> type[Message]:
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownType(
            f"unknown message type {str(kind)[:64]!r}"
            if kind is not None
            else "a message needs a 'type'"
        )
    return cls


def client_message_class(kind: Any) -> type[Message]:
    """The definition of a client message's ``type``; UnknownType when there is none."""
    return _class_of(CLIENT_MESSAGES, kind)


def parse_client_message(message: dict[str, Any]) -> Message:
    """What a client sent, checked; UnknownType or BadRequest when it is not a message."""
    return client_message_class(message.get("type")).from_wire(message)


def parse_server_message(message: dict[str, Any]) -> Message:
    """What the server sent, typed; UnknownType or BadRequest when it is not a message."""
    return _class_of(SERVER_MESSAGES, message.get("type")).from_wire(message)
