"""The configuration refuses what a client would be refused (issue #17, point 5).

Every numeric key of every section has a range, declared beside its default;
NaN and infinity are refused for every float key; [generation_defaults] is held
to exactly the ranges of a client's ``config``.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from llmwsd.config import Config, load_config, parse_config
from llmwsd.errors import BadRequest, ConfigError
from llmwsd.settings import SETTING_RANGES, GenerationSettings, Range
from tests.conftest import LLMWSD, ROOT, write_config


def numeric_fields() -> list[tuple[str, str, type, Range | None]]:
    """(section, key, int or float, range) of every numeric key of every section."""
    found = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                found.append((section.name, f.name, hints[f.name], f.metadata.get("range")))
    return found


NUMERIC = numeric_fields()
FLOATS = [(section, key) for section, key, kind, _ in NUMERIC if kind is float]


def refused(section: str, key: str, value: Any) -> str:
    source = "/etc/llmws/test.toml"
    with pytest.raises(ConfigError) as e:
        parse_config({section: {key: value}}, source)
    message = e.value.message
    assert message.startswith(f"{source} [{section}]: key {key!r}"), message
    assert "\n" not in message
    return message


def test_every_numeric_key_has_a_range_its_default_is_in() -> None:
    assert len(NUMERIC) > 30 and len(FLOATS) > 10
    defaults = Config()
    for section, key, _, limits in NUMERIC:
        assert limits is not None, f"[{section}] {key} has no range"
        assert getattr(getattr(defaults, section), key) in limits, (section, key)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("generation_defaults", "top_p", 7.0),
        ("generation_defaults", "temperature", -3.0),
        ("generation_defaults", "repetition_penalty", 0.0),
        ("generation_defaults", "top_k", -5),
        ("generation_defaults", "temperature", math.nan),
        ("generation_defaults", "top_p", math.inf),
        ("generation_defaults", "max_new_tokens", 999_999_999_999),
        ("server", "hello_timeout", math.nan),
        ("server", "ping_interval", math.inf),
        ("server", "max_message_size", 99_999_999_999_999),
        ("sessions", "idle_ttl", math.nan),
        ("memory", "reserve_mb", math.nan),
        ("memory", "budget_mb", math.inf),
        ("api", "max_auth_failures", -3),
        ("engine", "max_batch_size", 100_000_000),
    ],
)
def test_the_values_of_the_hostile_run_are_refused(section: str, key: str, value: Any) -> None:
    refused(section, key, value)


@pytest.mark.parametrize(("section", "key"), FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_float_key_takes_nan_or_infinity(section: str, key: str, value: float) -> None:
    assert "finite" in refused(section, key, value)


@pytest.mark.parametrize(
    ("section", "key", "kind", "limits"), NUMERIC, ids=[f"{s}.{k}" for s, k, _, _ in NUMERIC]
)
def test_every_numeric_key_refuses_values_beyond_its_range(
    section: str, key: str, kind: type, limits: Range
) -> None:
    step = 1 if kind is int else 1e-9 * max(1.0, abs(limits.hi))
    below = limits.lo if limits.lo_open else limits.lo - (1 if kind is int else 1e-6)
    for value in (below, limits.hi + step, kind(-(10**12)), kind(10**15)):
        message = refused(section, key, kind(value))
        assert f"must be {limits}" in message
    # The ends that the range includes are accepted.
    ends = [limits.hi] if limits.lo_open else [limits.lo, limits.hi]
    for value in ends:
        parsed = parse_config({section: {key: kind(value)}})
        assert getattr(getattr(parsed, section), key) == value


GENERATION_KEYS = [key for section, key, _, _ in NUMERIC if section == "generation_defaults"]


@pytest.mark.parametrize("key", GENERATION_KEYS)
def test_generation_defaults_take_exactly_what_a_client_may_send(key: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(Config().generation_defaults)}
    assert fields[key].metadata["range"] is SETTING_RANGES[key]
    limits = SETTING_RANGES[key]
    candidates: list[Any] = [limits.lo, limits.hi, limits.hi + 1, -1, 0, 1, 7, 10, 100, 101]
    candidates += [-3.0, 0.0, 1e-300, 0.5, 1.0, 7.0, 100.0, 1e6, 10**6 + 1, 999_999_999_999]
    for value in candidates:
        try:
            GenerationSettings().merge({key: value})
            client_ok = True
        except BadRequest:
            client_ok = False
        try:
            parse_config({"generation_defaults": {key: value}})
            config_ok = True
        except ConfigError:
            config_ok = False
        assert client_ok == config_ok, (key, value)


def test_the_shipped_and_the_test_configurations_pass(tmp_path: Path) -> None:
    for name in ("llmws.toml", "dev.toml"):
        load_config(ROOT / "etc" / "llmws" / name)
    load_config(write_config(tmp_path))


def test_the_commented_default_notes_each_range() -> None:
    """etc/llmws/llmws.toml notes each numeric key's range beside it, as the code has it."""
    text = (ROOT / "etc" / "llmws" / "llmws.toml").read_text()
    for _, key, _, limits in NUMERIC:
        noted = (">" if limits.lo_open else "") + f"{limits.lo}..{limits.hi}"
        # A commented key (# key = …) shows llmws's default where the model's may apply.
        (line,) = [line for line in text.splitlines() if line.lstrip("# ").startswith(f"{key} = ")]
        assert f"# {noted}" in line, line


def check_config(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmwsd --check-config`` on a file holding ``text`` (and more arguments)."""
    config = tmp_path / "llmws.toml"
    config.write_text(text)
    return subprocess.run(
        [*LLMWSD, "--config", str(config), *args, "--check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nhello_timeout = nan\n", "hello_timeout"),
        ("[server]\nping_interval = inf\n", "ping_interval"),
        ("[generation_defaults]\ntop_p = 7.0\n", "top_p"),
        ("[generation_defaults]\nmax_new_tokens = 999999999999\n", "max_new_tokens"),
        ("[memory]\nbudget_mb = -inf\n", "budget_mb"),
        ("[engine]\nmax_batch_size = 100000000\n", "max_batch_size"),
    ],
)
def test_check_config_names_the_file_and_the_key_in_one_line(
    tmp_path: Path, text: str, key: str
) -> None:
    config = tmp_path / "llmws.toml"
    result = check_config(tmp_path, text)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0] and f"key {key!r}" in lines[0], lines[0]


def test_check_config_refuses_a_bad_allowed_hosts_entry(tmp_path: Path) -> None:
    config = tmp_path / "llmws.toml"
    result = check_config(tmp_path, '[server]\nallowed_hosts = ["llm.example.org", "http://x"]\n')
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"llmwsd: {config}: [server] allowed_hosts[1]: 'http://x' is not a host name "
        '(a name such as llm.example.org, or "*")\n'
    )


def test_port_on_the_command_line_is_checked_like_the_files(tmp_path: Path) -> None:
    result = check_config(tmp_path, "[server]\nport = 8765\n", "--port", "99999")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "llmwsd: --port [server]: key 'port' must be between 0 and 65535, got 99999\n"
    )
