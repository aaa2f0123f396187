"""The daemon's typed configuration, read once from TOML before any socket is bound.

Each section of ``llmws.toml`` is a frozen dataclass below; a key that is not a
field, or a value of the wrong type, is a :class:`ConfigError` naming the file
and the key. Adding a setting means adding a field with its default here and a
commented line in ``etc/llmws/llmws.toml``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmwsd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/llmws/llmws.toml")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8765
    max_message_size: int = 1024 * 1024  # bytes; a larger frame closes with 1009
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    hello_timeout: float = 10.0  # seconds to wait for the first frame
    drain_timeout: float = 10.0  # seconds running generations get on shutdown
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
    max_parallel_pulls: int = 2  # pulls beyond this wait their turn (read at start)
    hf_token: str = ""  # for gated or private Hugging Face repos; HF_TOKEN wins when set


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    do_sample: bool = True


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 0  # 0: 8 on CPU, 32 on CUDA
    attention: str = "auto"  # auto, sdpa, eager, flash_attention_2
    prefix_cache_mb: float = 64.0  # keys and values of recent prompts' beginnings; 0: off


@dataclass(frozen=True)
class MemoryConfig:
    gpu_utilization: float = 0.9  # share of the GPU memory free after loading that may be used
    cpu_utilization: float = 0.8  # share of the available RAM that may be used
    reserve_mb: float = 512.0  # kept free on top of the utilization share
    budget_mb: float = 0.0  # a cap on generation memory (KV cache + activations); 0: none
    probe_tokens: int = 2048  # prompt length of the warm-up forward that measures activations


@dataclass(frozen=True)
class LimitsConfig:
    max_queue: int = 64  # requests waiting for memory; one more is refused with busy
    on_overflow: str = "truncate"  # prompt + max_new_tokens over max_context: truncate or refuse
    max_connections: int = 256  # open WebSocket connections in total
    max_connections_per_address: int = 32
    messages_per_second: float = 20.0  # per connection, sustained; bursts up to message_burst
    message_burst: int = 40
    max_prompt_chars: int = 100_000  # characters of one prompt (system + user)
    idle_timeout: float = 3600.0  # seconds a connection may send nothing while nothing runs


@dataclass(frozen=True)
class ApiConfig:
    tokens_file: str = ""  # set to require an access token on the public port
    admin_tokens_file: str = ""  # tokens that may also manage models, where that is allowed
    allow_model_management: bool = False  # switch/download/delete over the public port
    allowed_origins: list[str] = field(default_factory=list)  # besides the page's own origin
    max_auth_failures: int = 10  # failed token attempts per address per minute


@dataclass(frozen=True)
class SessionsConfig:
    idle_ttl: float = 86400.0  # seconds with no client and no generation before a session expires
    sweep_interval: float = 60.0  # seconds between sweeps for expired sessions
    max_buffered_events: int = 4096  # unacknowledged events kept per session; oldest dropped
    max_history_messages: int = 200  # user/assistant messages kept; oldest exchange dropped
    max_sessions: int = 256  # beyond it the longest idle session goes; none idle: busy
    max_per_client: int = 32  # the same, per token (or address when tokens are off)


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
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{where}: expected {expected.__name__}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
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
    return cls(**values)


def parse_config(data: dict[str, Any], source: str = "<memory>") -> Config:
    config: Config = _build(Config, data, source)
    _validate(config, source)
    return dataclasses.replace(config, source=source)


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
    """Range checks that types alone cannot express."""
    s = config.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"{source}: [server] port must be 0..65535, got {s.port}")
    if s.max_message_size < 1024:
        raise ConfigError(f"{source}: [server] max_message_size must be at least 1024 bytes")
    for key in ("hello_timeout", "drain_timeout", "ping_interval", "ping_timeout"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{source}: [server] {key} must not be negative")
    if config.model.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(
            f"{source}: [model] dtype must be auto, bfloat16, float16 or float32, "
            f"got {config.model.dtype!r}"
        )
    if config.engine.attention not in ("auto", "sdpa", "eager", "flash_attention_2"):
        raise ConfigError(
            f"{source}: [engine] attention must be auto, sdpa, eager or flash_attention_2"
        )
    if config.engine.max_batch_size < 0:
        raise ConfigError(f"{source}: [engine] max_batch_size must not be negative")
    if config.engine.prefix_cache_mb < 0:
        raise ConfigError(f"{source}: [engine] prefix_cache_mb must not be negative")
    m = config.memory
    for key in ("gpu_utilization", "cpu_utilization"):
        if not 0 < getattr(m, key) <= 1:
            raise ConfigError(f"{source}: [memory] {key} must be greater than 0 and at most 1")
    if m.reserve_mb < 0 or m.budget_mb < 0:
        raise ConfigError(f"{source}: [memory] reserve_mb and budget_mb must not be negative")
    if m.probe_tokens < 1:
        raise ConfigError(f"{source}: [memory] probe_tokens must be at least 1")
    if config.models.max_parallel_pulls < 1:
        raise ConfigError(f"{source}: [models] max_parallel_pulls must be at least 1")
    if config.limits.max_queue < 0:
        raise ConfigError(f"{source}: [limits] max_queue must not be negative")
    if config.limits.on_overflow not in ("truncate", "refuse"):
        raise ConfigError(f"{source}: [limits] on_overflow must be truncate or refuse")
    for key in (
        "max_connections",
        "max_connections_per_address",
        "message_burst",
        "max_prompt_chars",
    ):
        if getattr(config.limits, key) < 1:
            raise ConfigError(f"{source}: [limits] {key} must be at least 1")
    if config.limits.messages_per_second <= 0 or config.limits.idle_timeout < 0:
        raise ConfigError(
            f"{source}: [limits] messages_per_second must be positive, idle_timeout not negative"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError(f"{source}: [server] tls_cert and tls_key go together")
    g = config.generation_defaults
    if g.max_new_tokens < 1:
        raise ConfigError(f"{source}: [generation_defaults] max_new_tokens must be at least 1")
    n = config.sessions
    if n.idle_ttl <= 0 or n.sweep_interval <= 0:
        raise ConfigError(f"{source}: [sessions] idle_ttl and sweep_interval must be positive")
    for key, least in (
        ("max_buffered_events", 1),
        ("max_history_messages", 2),
        ("max_sessions", 1),
        ("max_per_client", 1),
    ):
        if getattr(n, key) < least:
            raise ConfigError(f"{source}: [sessions] {key} must be at least {least}")
