"""A request's place in the model's context: the one source of its token budget.

A prompt is tokenized once, by the engine's :meth:`~llmwsd.engines.interface.EngineLike.tokenize`
in a worker thread; its ids travel with the request to the engine, which runs them as
they are. :func:`~llmwsd.engines.interface.new_token_budget` alone decides how many new
tokens a prompt leaves room for (the engine holds direct callers to it too);
:func:`fit_history` alone decides which turns of a conversation are sent.
"""

from __future__ import annotations

import dataclasses

from llmwsd.engines.interface import EngineLike, GenerationRequest, new_token_budget
from llmwsd.settings import GenerationSettings


def with_budget(
    request: GenerationRequest, prompt_ids: list[int], max_context: int, on_overflow: str
) -> GenerationRequest:
    """``request`` with its prompt's ids, and its max_new_tokens lowered to fit if need be."""
    settings = request.settings
    allowed = new_token_budget(len(prompt_ids), settings.max_new_tokens, max_context, on_overflow)
    if allowed < settings.max_new_tokens:
        settings = dataclasses.replace(
            settings, max_new_tokens=allowed, min_new_tokens=min(settings.min_new_tokens, allowed)
        )
    return dataclasses.replace(request, settings=settings, prompt_ids=prompt_ids)


def fit_history(
    engine: EngineLike, history: list[dict[str, str]], user: str, settings: GenerationSettings
) -> tuple[list[dict[str, str]], int, list[int]]:
    """The messages to send: drop the oldest turns (never the system message) until they fit.

    Room is left for the answer: up to max_new_tokens, but at most half the context,
    so a huge max_new_tokens does not erase the whole conversation. Returns the
    messages, how many turns were dropped, and the messages' token ids. Blocking
    (tokenizes): run it in a worker thread.
    """
    max_context = engine.info.max_context
    prompt_room = max_context - min(settings.max_new_tokens, max_context // 2)
    system = [m for m in history if m["role"] == "system"]
    turns = [m for m in history if m["role"] != "system"]
    dropped = 0
    while True:
        messages = [*system, *turns, {"role": "user", "content": user}]
        ids = engine.tokenize(messages)
        if not turns or len(ids) <= prompt_room:
            return messages, dropped, ids
        # Drop a whole exchange (user + assistant) at a time.
        turns = turns[2:]
        dropped += 1
