"""llmws's generation settings as vLLM's SamplingParams.

vLLM is asked for token ids only (``detokenize=False``): llmws detokenizes them
and applies stop strings itself, as the transformers engine does
(:mod:`llmwsd.engines.detokenize`), so that both engines stream the same text.
The differences that remain are vLLM's own (docs/engines.md, "vLLM").
"""

from __future__ import annotations

from typing import Any

from llmwsd.engines.grammar import json_schema_of
from llmwsd.settings import GenerationSettings, OutputFormat

# vLLM takes temperatures from 0.01 (it raises smaller ones, with a warning a request) to 2:
# llmws's wider range (up to 100) is held to that. Past 2 the model's choice is near
# uniform on either engine; under 0.01 near greedy.
VLLM_TEMPERATURE = (0.01, 2.0)


def sampling_params(
    settings: GenerationSettings, max_tokens: int, end_ids: list[int], vocab_size: int
) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    greedy = not settings.do_sample or settings.temperature == 0
    low, high = VLLM_TEMPERATURE
    top_k = settings.top_k if 0 < settings.top_k < vocab_size else 0  # 0: all of them
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else min(max(settings.temperature, low), high),
        top_p=1.0 if greedy else settings.top_p,
        top_k=0 if greedy else top_k,
        repetition_penalty=settings.repetition_penalty,
        seed=None if greedy else settings.seed,
        max_tokens=max_tokens,
        min_tokens=min(settings.min_new_tokens, max_tokens),
        # The chat template's end tokens end an answer as in the transformers engine.
        stop_token_ids=list(end_ids),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=None
        if settings.format is None
        else StructuredOutputsParams(**structured_output(settings.format)),
    )


def structured_output(fmt: OutputFormat) -> dict[str, Any]:
    """A format as vLLM's structured-output fields: the grammar llmws compiles (grammar.py)."""
    if fmt.type in ("json_schema", "json"):
        return {"json": json_schema_of(fmt), "disable_any_whitespace": True}
    if fmt.type == "regex":
        return {"regex": fmt.pattern}
    return {"choice": list(fmt.choices)}
