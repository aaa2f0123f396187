"""Run by tests/test_memory.py in a fresh process: predicted vs measured peak of one generation.

Loads the engine (which measures its memory estimate), then runs one long
prompt and prints, as JSON, the estimate's prediction for it and the process's
measured peak RSS increase while it ran.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from llmwsd.config import Config, EngineConfig
from llmwsd.engines.interface import Failed, Finished, GenerationEvent, GenerationRequest
from llmwsd.engines.transformers import measure
from llmwsd.engines.transformers.engine import Engine
from llmwsd.settings import GenerationSettings

NEW_TOKENS = 16


async def main(model: Path, prompt_words: int) -> None:
    # The per-request figures alone: the prefix cache's memory is set aside apart.
    engine = await Engine.load(Config(engine=EngineConfig(prefix_cache_mb=0)), model)
    estimate = engine.info.memory
    assert estimate is not None
    text = " ".join(f"word{i % 97}" for i in range(prompt_words))
    messages = [{"role": "user", "content": f"Summarize: {text}"}]
    prompt_tokens = len(engine.tokenize(messages))
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    ended: asyncio.Future[GenerationEvent] = asyncio.get_running_loop().create_future()

    def on_event(event: GenerationEvent) -> None:
        if isinstance(event, Finished | Failed) and not ended.done():
            ended.set_result(event)

    measure.release_freed_memory()
    with measure.PeakRSS() as peak:
        engine.submit(GenerationRequest(messages, settings), on_event)
        result = await ended
    await engine.close()
    assert isinstance(result, Finished), result
    print(
        json.dumps(
            {
                "prompt_tokens": prompt_tokens,
                "predicted": estimate.batch_bytes([(prompt_tokens, prompt_tokens + NEW_TOKENS)]),
                "measured": peak.bytes,
                "estimate": estimate.to_dict(),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
