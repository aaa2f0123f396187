"""A new session's settings: llmws's own, then the model's recommendation, then the operator's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import websockets

from llmwsd.catalogue.convert import DEFAULT_MODEL_SETTINGS, recommend
from llmwsd.config import parse_config
from llmwsd.service import defaults
from tests.conftest import DEFAULT_MODEL, REAL, RunningDaemon, answer_text, recv_json, recv_until

MODEL_CARD = {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "eos_token_id": 2}


def test_the_operator_wins_then_the_model_then_llmws() -> None:
    config = parse_config({"generation_defaults": {"temperature": 0.5, "do_sample": False}})
    chosen = defaults.resolve(config, {"temperature": 0.2, "top_p": 0.9, "do_sample": True})
    settings = chosen.settings
    assert (settings.temperature, settings.do_sample, settings.top_p) == (0.5, False, 0.9)
    assert (settings.max_new_tokens, settings.top_k, settings.repetition_penalty) == (512, 50, 1.1)
    assert chosen.sources == {
        "temperature": "config",
        "do_sample": "config",
        "top_p": "model",
        "max_new_tokens": "llmws",
        "top_k": "llmws",
        "repetition_penalty": "llmws",
    }
    assert defaults.resolve(parse_config({}), {}).sources == dict.fromkeys(defaults.KEYS, "llmws")


def test_a_models_unusable_settings_are_left_out(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": -1, "top_p": 0.9, "top_k": "many", "max_length": 10})
    )
    assert defaults.model_recommendation(tmp_path) == {"top_p": 0.9}
    assert sum("not used" in r.getMessage() for r in caplog.records) == 2
    (tmp_path / "generation_config.json").write_text("{not json")
    assert defaults.model_recommendation(tmp_path) == {}
    assert defaults.model_recommendation(tmp_path / "absent") == {}


def test_recommend_keeps_what_the_model_says_itself(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert recommend(tmp_path, DEFAULT_MODEL_SETTINGS) is True
    data = json.loads((tmp_path / "generation_config.json").read_text())
    assert data == {"temperature": 0.6, "do_sample": True, "top_p": 0.9}
    assert recommend(tmp_path, DEFAULT_MODEL_SETTINGS) is False  # once is enough


async def test_welcome_says_where_each_default_came_from(fake_daemon_factory, tmp_path) -> None:
    folder = tmp_path / "models" / "fake-model"
    (folder / "generation_config.json").write_text(json.dumps(MODEL_CARD))
    daemon = await fake_daemon_factory(generation_defaults={"top_k": 7})
    async with websockets.connect(f"ws://127.0.0.1:{daemon.server.port}/") as ws:
        await ws.send("{}")
        welcome = await recv_json(ws, 5, "welcome")
    config = welcome["config"]
    assert (config["temperature"], config["top_p"], config["top_k"]) == (0.2, 0.9, 7)
    assert (config["max_new_tokens"], config["do_sample"]) == (512, True)
    assert welcome["defaults_from"] == {
        "temperature": "model",
        "top_p": "model",
        "do_sample": "model",
        "top_k": "config",
        "max_new_tokens": "llmws",
        "repetition_penalty": "llmws",
    }


def test_the_default_model_comes_with_its_authors_settings() -> None:
    data = json.loads((DEFAULT_MODEL / "generation_config.json").read_text())
    assert {key: data[key] for key in DEFAULT_MODEL_SETTINGS} == DEFAULT_MODEL_SETTINGS


async def test_with_no_generation_defaults_the_first_answer_is_right(tmp_path: Path) -> None:
    """The shipped configuration sets no [generation_defaults]: the model card's apply."""
    daemon = RunningDaemon(tmp_path)
    text = daemon.config_path.read_text()
    section = text.index("[generation_defaults]")
    end = text.index("[", section + 1)
    daemon.config_path.write_text(text[:section] + text[end:])  # the tests' greedy default out
    daemon.start()
    try:
        async with websockets.connect(daemon.url) as ws:
            await ws.send("{}")
            welcome = await recv_json(ws, 30, "welcome")
            assert welcome["defaults_from"]["temperature"] == "model"
            assert welcome["config"]["max_new_tokens"] == 512
            for seed in (1, 2, 3):  # sampled, at the model card's temperature
                question = {"user": "What is the capital of France?"}
                message = {"type": "inference", "prompt": question, "config": {"seed": seed}}
                await ws.send(json.dumps(message))
                events = await recv_until(ws, {"done", "error"}, timeout=REAL)
                assert events[-1]["type"] == "done", events[-1]
                assert "Paris" in answer_text(events), (seed, answer_text(events))
                await ws.send(json.dumps({"type": "reset"}))
                await recv_until(ws, {"reset_done"}, timeout=10)
        log = daemon.log()
        assert "generation defaults for new sessions: max_new_tokens 512 (llmws), " in log
        assert "temperature 0.2 (model)" in log
    finally:
        daemon.stop()
