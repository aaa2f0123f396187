"""llmwsctl's renderers: the daemon's answers as the text each command prints."""

from __future__ import annotations

import time
from typing import Any

from llmwsctl import render

STATUS: dict[str, Any] = {
    "version": "1.2.0",
    "uptime_s": 3600,
    "pid": 4242,
    "model": "m",
    "device": "cuda:0",
    "max_context": 8192,
    "listen": "127.0.0.1:8765",
    "sessions": 2,
    "active": 1,
    "queue": 0,
    "memory": {"ram_used_gb": 1.0, "ram_total_gb": 2.0, "rss_gb": 0.5},
    "config": None,
    "engine_heartbeat_age_s": 0.2,
    "engine_busy": True,
    "engine_stuck": False,
}


def labels(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()]


def test_status_of_a_healthy_engine_has_no_engine_line() -> None:
    text = render.render_status(STATUS)
    assert labels(text) == ["llmwsd", "model", "listening", "sessions", "memory", "config"]
    assert "model      m on cuda:0 (context 8192 tokens)" in text.splitlines()
    # An idle engine's heartbeat grows old without it being stuck: still no line.
    assert "engine" not in render.render_status({**STATUS, "engine_heartbeat_age_s": 999})


def test_status_says_when_the_engine_is_stuck() -> None:
    stuck = {**STATUS, "engine_heartbeat_age_s": 131.4, "engine_stuck": True}
    lines = render.render_status(stuck).splitlines()
    assert (
        lines[2]
        == "engine     stuck: no step for 131 s (under systemd, its watchdog restarts llmwsd)"
    )
    assert labels("\n".join(lines)) == [
        "llmwsd",
        "model",
        "engine",
        "listening",
        "sessions",
        "memory",
        "config",
    ]


def test_status_of_an_older_daemon_without_the_heartbeat_fields() -> None:
    old = {k: v for k, v in STATUS.items() if not k.startswith("engine_")}
    assert render.render_status(old) == render.render_status(STATUS)


def test_status_without_a_model_gives_the_reason() -> None:
    text = render.render_status({**STATUS, "model": None, "model_reason": "loading m"})
    assert "model      none: loading m" in text.splitlines()


def test_models_mark_the_loaded_one_in_a_footnote() -> None:
    entry = {
        "name": "SmolLM2",
        "size_bytes": 270_000_000,
        "parameters": 134_515_008,
        "modified": time.time() - 7200,
        "architecture": "LlamaForCausalLM",
        "context_length": 8192,
        "dtype": "bfloat16",
        "source": "/var/lib/llmws/models",
    }
    text = render.render_models([{**entry, "loaded": True}, {**entry, "name": "other"}])
    lines = text.splitlines()
    assert lines[0].split() == [
        "NAME",
        "SIZE",
        "PARAMS",
        "MODIFIED",
        "ARCHITECTURE",
        "CONTEXT",
        "DTYPE",
        "FOLDER",
    ]
    assert lines[1].startswith("*  SmolLM2") and "135M" in lines[1] and "270 MB" in lines[1]
    assert lines[2].startswith("   other")
    assert lines[-1] == "* loaded"
    assert render.render_models([entry]).splitlines()[-1] != "* loaded"
    assert render.render_models([]).startswith("no models in the model folders")


def test_parameter_counts() -> None:
    assert [
        render.parameter_count(n) for n in (None, 0, 999, 1500, 134_515_008, 7_615_616_512)
    ] == ["-", "-", "999", "1.5K", "135M", "7.6B"]


def test_pulls_with_the_resume_footnote_only_for_unfinished_ones() -> None:
    running = {"id": "p1", "name": "m", "state": "running", "done": 50, "total": 200}
    running |= {"source": "org/m", "stage": "downloading"}
    failed = {**running, "id": "p2", "state": "failed", "error": {"message": "disk full"}}
    text = render.render_pulls([running])
    assert text.splitlines()[1].split() == [
        "p1",
        "m",
        "running",
        "25%",
        "200",
        "B",
        "org/m",
        "downloading",
    ]
    assert len(text.splitlines()) == 2
    lines = render.render_pulls([running, failed]).splitlines()
    assert lines[2].endswith("disk full")
    assert lines[-1].startswith("pull the same SOURCE again to resume")
    assert render.render_pulls([]) == "no pulls"


def test_sessions_table() -> None:
    session = {"id": "abc", "age_s": 120, "idle_s": 5, "messages": 4, "buffered_events": 0}
    text = render.render_sessions([{**session, "connected": True, "generating": False}])
    assert text.splitlines()[1].split() == ["abc", "2", "min", "5", "s", "4", "0", "yes", "no"]
    assert render.render_sessions([]) == "no sessions"


def test_tokens_say_when_they_are_off_or_missing() -> None:
    token = {"name": "alice", "id": "t1", "admin": False, "created": time.time()}
    assert render.render_tokens({"required": False, "tokens": []}) == (
        "tokens are off: clients need none ([api] tokens_file is not set)"
    )
    assert render.render_tokens({"required": True, "tokens": []}).startswith("no tokens yet")
    lines = render.render_tokens({"required": True, "tokens": [token]}).splitlines()
    assert lines[0].split() == ["NAME", "ID", "KIND", "CREATED"]
    assert lines[1].split()[:3] == ["alice", "t1", "access"]
    off = render.render_tokens({"required": False, "tokens": [token]}).splitlines()
    assert off[0].startswith("tokens are off") and off[1:] == lines


def test_reload_names_the_sections_that_need_a_restart() -> None:
    assert render.render_reload({"source": None}) == (
        "configuration reloaded from built-in defaults"
    )
    text = render.render_reload({"source": "/etc/llmws/llmws.toml", "needs_restart": ["server"]})
    assert text.splitlines() == [
        "configuration reloaded from /etc/llmws/llmws.toml",
        "changed but applied only at start: [server]; restart llmwsd to apply them",
    ]
