"""Sampling is numerically safe for every setting a client may send (issue #17, point 4).

The unit sweep runs every edge of the ranges that llmwsd.engines.interface accepts through
``choose_tokens``; the daemon test sends the tiniest values to the real model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import websockets

from llmwsd.engines.transformers.sampling import TokenSampler, choose_tokens
from llmwsd.settings import GenerationSettings
from tests.conftest import RunningDaemon, recv_json, recv_until

VOCAB = 32
END = [VOCAB - 1, VOCAB - 2]
# Prompt tokens, penalized by the repetition penalty: their logits are set below to
# 0, negative, positive and -inf values, where a tiny penalty used to make inf or NaN.
SEEN = [0, 1, 2, 3, 4]

TEMPERATURES = [0.0, 5e-324, 1e-300, 1e-45, 1e-38, 1e-6, 0.7, 1.0, 100.0]
TOP_PS = [5e-324, 1e-300, 1e-45, 1e-8, 0.5, 0.999999999, 1.0]
TOP_KS = [0, 1, 2, VOCAB - 1, VOCAB, 1_000_000]
PENALTIES = [5e-324, 1e-300, 1e-45, 1e-6, 1.0, 1.1, 10.0]
TINY = 1e-30  # settings below this sample like greedy decoding: only a best token


def logits_rows() -> tuple[torch.Tensor, list[int], list[int]]:
    """Rows of float32 logits, each row's min_new_tokens and generated count."""
    gen = torch.Generator().manual_seed(17)
    rows = [
        torch.randn(VOCAB, generator=gen),
        torch.randn(VOCAB, generator=gen) * 1e3,
        torch.randn(VOCAB, generator=gen) * 1e37,  # overflows when divided
        torch.zeros(VOCAB),  # all tied
    ]
    some_masked = torch.randn(VOCAB, generator=gen)
    some_masked[::3] = float("-inf")
    rows.append(some_masked)
    # Only end tokens are possible, and min_new_tokens masks them too: nothing is left.
    only_end = torch.full((VOCAB,), float("-inf"))
    only_end[END] = torch.tensor([2.0, 1.0])
    rows.append(only_end)
    # Only end tokens and one seen token; min_new_tokens masks the end tokens.
    one_left = only_end.clone()
    one_left[3] = 0.5
    rows.append(one_left)
    logits = torch.stack(rows).float()
    logits[:5, SEEN] = torch.tensor([0.0, -2.0, 3.0, float("-inf"), 50.0])
    logits[2, SEEN[1:]] = torch.tensor([-3e38, 3e38, float("-inf"), 1e38])
    min_new = [0, 0, 0, 0, 2, 2, 2]
    generated = [0, 0, 0, 0, 1, 0, 1]
    return logits, min_new, generated


def check_choices(settings: GenerationSettings) -> None:
    logits, min_new, generated = logits_rows()
    samplers = [
        TokenSampler(
            dataclasses.replace(settings, min_new_tokens=m),
            SEEN,
            VOCAB,
            END,
            torch.device("cpu"),
        )
        for m in min_new
    ]
    choices = choose_tokens(samplers, logits, generated)  # adjusts logits in place
    for row, token in enumerate(choices):
        assert isinstance(token, int), (settings, row, token)
        assert 0 <= token < VOCAB, (settings, row, token)
        adjusted = logits[row]
        assert not adjusted.isnan().any(), (settings, row, adjusted)
        best = adjusted.max()
        # A possible token is chosen over an impossible (-inf) one.
        if best > float("-inf"):
            assert adjusted[token] > float("-inf"), (settings, row, token, adjusted)
        nearly_greedy = (
            not settings.do_sample
            or settings.temperature < TINY
            or settings.top_p < TINY
            or settings.top_k == 1
        )
        if nearly_greedy:
            assert adjusted[token] == best, (settings, row, token, adjusted)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_choose_tokens_is_safe_at_every_edge_of_the_ranges(temperature: float) -> None:
    for top_p, top_k, penalty in itertools.product(TOP_PS, TOP_KS, PENALTIES):
        settings = GenerationSettings(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=penalty,
            max_new_tokens=8,
            seed=top_k,
        )
        check_choices(settings)
    check_choices(GenerationSettings(temperature=temperature, do_sample=False))


def test_the_tested_edges_are_the_accepted_ones() -> None:
    """Every value swept above is accepted from a client, and the ends of the ranges are swept."""
    base = GenerationSettings()
    for key, values in (
        ("temperature", TEMPERATURES),
        ("top_p", TOP_PS),
        ("top_k", TOP_KS),
        ("repetition_penalty", PENALTIES),
    ):
        for value in values:
            base.merge({key: value})
    assert (min(TEMPERATURES), max(TEMPERATURES)) == (0.0, 100.0)
    assert (min(TOP_KS), max(TOP_KS), max(TOP_PS), max(PENALTIES)) == (0, 1_000_000, 1.0, 10.0)


async def test_the_real_model_samples_with_the_tiniest_settings(real_daemon: RunningDaemon):
    tiny = {"temperature": 1e-300, "top_p": 1e-300, "repetition_penalty": 1e-300}
    configs = [
        {"temperature": 1e-300},
        {"top_p": 1e-300},
        {"repetition_penalty": 1e-300},
        tiny,
        {**tiny, "top_k": 0},
        {**tiny, "top_k": 0, "top_p": 1.0},
        {"temperature": 5e-324, "repetition_penalty": 5e-324, "top_k": 1_000_000},
        {"temperature": 100.0, "repetition_penalty": 10.0, "top_k": 0, "top_p": 1.0},
        {"seed": 2**63 - 1},  # the largest seed a client may send
    ]
    async with websockets.connect(real_daemon.url, max_size=None) as ws:
        await ws.send(json.dumps({}))
        assert (await recv_json(ws))["type"] == "welcome"
        for config in configs:
            message = {
                "type": "inference",
                "prompt": {"system": "", "user": "Say something."},
                "config": {"do_sample": True, "seed": 3, **config, "max_new_tokens": 8},
            }
            await ws.send(json.dumps(message))
            events = await recv_until(ws, {"done", "error"}, timeout=120)
            assert events[-1]["type"] == "done", (config, events[-1])
