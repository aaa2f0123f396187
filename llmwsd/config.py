"""The daemon's typed configuration, read once from TOML before any socket is bound.

Each section of ``llmws.toml`` is a frozen dataclass below; a key that is not a
field, a value of the wrong type, a NaN or infinite float, or a number outside
its range is a :class:`ConfigError` naming the file and the key. Every numeric
field declares its range beside its default (:func:`bounded`, :func:`within`);
[generation_defaults] uses the ranges a client is held to (llmwsd.engines.interface).
Adding a setting means adding a field with its default (and range) here and a
commented line in ``etc/llmws/llmws.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from llmwsd.errors import ConfigError
from llmwsd.settings import SETTING_RANGES, GenerationSettings, Range

DEFAULT_CONFIG_PATH = Path("/etc/llmws/llmws.toml")

T = TypeVar("T", int, float)

DAY = 86400  # seconds
WEEK = 7 * DAY
MAX_MIB = 16 * 1024 * 1024  # 16 TiB, in MiB
MAX_COUNT = 100_000  # connections, sessions, queued requests and the like


def within(default: T, limits: Range) -> T:
    """A numeric field's default and its range, checked when a file sets it."""
    return field(default=default, metadata={"range": limits})


def bounded(default: T, lo: float, hi: float, *, lo_open: bool = False) -> T:
    """A numeric field from ``lo`` to ``hi`` (``lo`` itself refused when ``lo_open``)."""
    return within(default, Range(lo, hi, lo_open))


def setting(key: str) -> Any:
    """A [generation_defaults] field: llmws's own default for it (GenerationSettings'),
    and the range a client's ``config`` is held to."""
    default = getattr(GenerationSettings(), key)
    limits = SETTING_RANGES.get(key)
    return field(default=default) if limits is None else within(default, limits)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = bounded(8765, 0, 65535)
    # bytes; a larger frame closes with 1009
    max_message_size: int = bounded(1024 * 1024, 1024, 64 * 1024 * 1024)
    ping_interval: float = bounded(20.0, 0, DAY)  # 0: no pings
    ping_timeout: float = bounded(20.0, 0, DAY)
    hello_timeout: float = bounded(10.0, 0, DAY)  # seconds to wait for the first frame
    drain_timeout: float = bounded(10.0, 0, DAY)  # seconds generations get on shutdown
    web_root: str = ""  # empty: share/web beside the code, or /usr/share/llmws/web
    tls_cert: str = ""  # PEM certificate chain; with tls_key: wss:// and https://
    tls_key: str = ""
    # Host names answered besides IP addresses, localhost and this machine's; "*": any.
    allowed_hosts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PathsConfig:
    state_dir: str = "/var/lib/llmws"
    runtime_dir: str = "/run/llmws"
    log_dir: str = "/var/log/llmws"


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # empty: auto-select from the model folders
    dtype: str = "auto"  # auto, bfloat16, float16, float32
    device: str = "auto"  # auto, cpu, cuda, cuda:N


@dataclass(frozen=True)
class ModelsConfig:
    dirs: list[str] = field(default_factory=list)
    max_parallel_pulls: int = bounded(2, 1, 64)  # pulls beyond this wait their turn (read at start)
    hf_token: str = ""  # for gated or private Hugging Face repos; HF_TOKEN wins when set


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = setting("max_new_tokens")
    temperature: float = setting("temperature")
    top_p: float = setting("top_p")
    top_k: int = setting("top_k")
    repetition_penalty: float = setting("repetition_penalty")
    do_sample: bool = setting("do_sample")


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "transformers"  # "transformers" (llmws's own) or "vllm"
    # vLLM's engine arguments, passed on (llmwsd.engines.vllm.arguments; README, "The vLLM
    # engine"), and kv_cache_space_gb, the KV cache of its CPU build
    vllm: dict[str, Any] = field(default_factory=dict)
    # The rest is the transformers engine's.
    max_batch_size: int = bounded(0, 0, 1024)  # 0: 8 on CPU, 32 on CUDA
    attention: str = "auto"  # auto, sdpa, eager, flash_attention_2
    # keys and values of recent prompts' beginnings; 0: off
    prefix_cache_mb: float = bounded(64.0, 0, MAX_MIB)
    # seconds an engine with work may go without a turn of its loop before it counts as
    # stuck (llmwsd.service.health); one step is a prefill of a whole batch of prompts
    stuck_timeout: float = bounded(120.0, 0, DAY, lo_open=True)


@dataclass(frozen=True)
class MemoryConfig:
    # share of the GPU memory free after loading that may be used
    gpu_utilization: float = bounded(0.9, 0, 1, lo_open=True)
    cpu_utilization: float = bounded(0.8, 0, 1, lo_open=True)  # of the available RAM
    reserve_mb: float = bounded(512.0, 0, MAX_MIB)  # kept free on top of the utilization share
    # a cap on generation memory (KV cache + activations); 0: none
    budget_mb: float = bounded(0.0, 0, MAX_MIB)
    # prompt length of the warm-up forward that measures activations
    probe_tokens: int = bounded(2048, 1, 1 << 20)


@dataclass(frozen=True)
class LimitsConfig:
    # requests waiting for memory; one more is refused with busy
    max_queue: int = bounded(64, 0, MAX_COUNT)
    on_overflow: str = "truncate"  # prompt + max_new_tokens over max_context: truncate or refuse
    max_connections: int = bounded(256, 1, MAX_COUNT)  # open connections (WebSocket, HTTP)
    max_connections_per_address: int = bounded(32, 1, MAX_COUNT)
    # per WebSocket connection (HTTP API requests: per address), sustained; bursts to message_burst
    messages_per_second: float = bounded(20.0, 0, 1_000_000, lo_open=True)
    message_burst: int = bounded(40, 1, 1_000_000)
    # characters of one prompt (system + user); no message carries more than 64 Mi
    max_prompt_chars: int = bounded(100_000, 1, 64 * 1024 * 1024)
    # seconds a connection may send nothing while nothing runs; 0: no limit
    idle_timeout: float = bounded(3600.0, 0, WEEK)


@dataclass(frozen=True)
class ApiConfig:
    tokens_file: str = ""  # set to require an access token on the public port
    admin_tokens_file: str = ""  # tokens that may also manage models, where that is allowed
    allow_model_management: bool = False  # switch/download/delete over the public port
    allowed_origins: list[str] = field(default_factory=list)  # besides the page's own origin
    # failed token attempts per address per minute; 0: no lockout
    max_auth_failures: int = bounded(10, 0, MAX_COUNT)


@dataclass(frozen=True)
class SessionsConfig:
    # seconds with no client and no generation before a session expires
    idle_ttl: float = bounded(86400.0, 0, 30 * DAY, lo_open=True)
    # seconds between sweeps for expired sessions
    sweep_interval: float = bounded(60.0, 0, DAY, lo_open=True)
    # unacknowledged events kept per session; oldest dropped
    max_buffered_events: int = bounded(4096, 1, 1_000_000)
    # user/assistant messages kept; oldest exchange dropped
    max_history_messages: int = bounded(200, 2, MAX_COUNT)
    # beyond it the longest idle session goes; none idle: busy
    max_sessions: int = bounded(256, 1, MAX_COUNT)
    # the same, per token (or address when tokens are off)
    max_per_client: int = bounded(32, 1, MAX_COUNT)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    engine: EngineConfig = field(default_factory=EngineConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    source: str = ""  # the file this was read from; empty for built-in defaults
    # The [generation_defaults] keys the file sets: they win over a model's recommendation.
    generation_defaults_set: frozenset[str] = frozenset()

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.paths.runtime_dir)

    @property
    def log_dir(self) -> Path:
        return Path(self.paths.log_dir)

    @property
    def model_dirs(self) -> list[Path]:
        """Folders scanned for models: the configured ones first, then the state folder's."""
        return [Path(d) for d in self.models.dirs] + [self.state_dir / "models"]


def _check_value(value: Any, expected: Any, where: str) -> Any:
    """Return ``value`` if it matches the annotation ``expected``, else raise ConfigError."""
    origin = typing.get_origin(expected)
    if origin is dict:  # a table passed on as it is ([engine.vllm]); its user checks the keys
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: unexpected value {value!r}")
    if expected is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected nothing, got {value!r}")
        return value
    # TOML integers are fine where a float is expected; bools are never numbers here.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{where}: expected {expected.__name__}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    internal = ("source", "generation_defaults_set")  # said by parse_config, not by a file
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}")
        expected = hints[key]
        if isinstance(expected, type) and dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            values[key] = _build(expected, value, f"{where} [{key}]")
        else:
            label = f"{where}: key {key!r}"
            values[key] = _check_value(value, expected, label)
            limits: Range | None = known[key].metadata.get("range")
            if limits is not None and values[key] not in limits:
                raise ConfigError(f"{label} must be {limits}, got {value!r}")
    return cls(**values)


def parse_config(data: dict[str, Any], source: str = "<memory>") -> Config:
    config: Config = _build(Config, data, source)
    _validate(config, source)
    chosen = frozenset(data.get("generation_defaults", {}))
    return dataclasses.replace(config, source=source, generation_defaults_set=chosen)


def override(config: Config, section: str, key: str, value: Any, where: str) -> Config:
    """``config`` with one key replaced, checked as if a file set it (``where``: by what)."""
    table = getattr(config, section)
    checked = _build(type(table), {key: value}, f"{where} [{section}]")
    changed = dataclasses.replace(table, **{key: getattr(checked, key)})
    return dataclasses.replace(config, **{section: changed})


def load_config(path: str | Path) -> Config:
    """Read and validate ``path``; every problem is one ConfigError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(data, str(path))


def _validate(config: Config, source: str) -> None:
    """Checks that a type and a range (see _build) cannot express."""
    s = config.server
    if config.model.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"{source}: [model] dtype must be auto, bfloat16, float16 or float32, "
            f"got {config.model.dtype!r}"
        )
    if config.engine.backend not in ("transformers", "vllm"):
        raise ConfigError(
            f"{source}: [engine] backend must be transformers or vllm, "
            f"got {config.engine.backend!r}"
        )
    if config.engine.attention not in ("auto", "sdpa", "eager", "flash_attention_2"):
        raise ConfigError(
            f"{source}: [engine] attention must be auto, sdpa, eager or flash_attention_2"
        )
    if config.limits.on_overflow not in ("truncate", "refuse"):
        raise ConfigError(f"{source}: [limits] on_overflow must be truncate or refuse")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError(f"{source}: [server] tls_cert and tls_key go together")
