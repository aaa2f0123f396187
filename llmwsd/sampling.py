"""Choosing the next token of one request from its logits, with its own settings.

Each request in a shared batch keeps its own settings and random generator, so
the rows of a batch are sampled one by one here; the order of the processors is
that of transformers' ``generate()`` (repetition penalty, minimum length,
temperature, top-k, top-p), so a request behaves the same alone or batched.
"""

from __future__ import annotations

import secrets

import torch

from llmwsd.generation import GenerationSettings


def is_greedy(settings: GenerationSettings) -> bool:
    return not settings.do_sample or settings.temperature == 0


class TokenSampler:
    """The sampling state of one request: its settings, generator and seen tokens."""

    def __init__(
        self,
        settings: GenerationSettings,
        prompt_ids: list[int],
        vocab_size: int,
        end_token_ids: list[int],
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.greedy = is_greedy(settings)
        self._end_tokens = torch.tensor(
            [i for i in end_token_ids if i < vocab_size], dtype=torch.long, device=device
        )
        # The repetition penalty applies to the prompt's tokens and the generated ones.
        self._seen: torch.Tensor | None = None
        if settings.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        self._generator: torch.Generator | None = None
        if not self.greedy:
            seed = settings.seed if settings.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)

    def next_token(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        """Pick the next token from ``logits`` (1-D, float32); ``generated`` tokens so far.

        Returns a 0-d tensor so that a batch of rows needs one device sync, not one per row.
        """
        if self._seen is not None:
            penalty = self.settings.repetition_penalty
            penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self._seen, penalized, logits)
        if generated < self.settings.min_new_tokens and self._end_tokens.numel():
            logits = logits.index_fill(0, self._end_tokens, float("-inf"))
        if self.greedy:
            return logits.argmax()
        return self._sample(logits / self.settings.temperature)

    def accept(self, token_id: int) -> None:
        """Record a generated token (for the repetition penalty)."""
        if self._seen is not None:
            self._seen[token_id] = True

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        top_k, top_p = self.settings.top_k, self.settings.top_p
        # Work on the k best candidates only (sorted, descending) when top-k is on.
        if 0 < top_k < logits.numel():
            values, indices = torch.topk(logits, top_k)
        elif top_p < 1.0:
            values, indices = torch.sort(logits, descending=True)
        else:
            probs = torch.softmax(logits, dim=-1)
            return torch.multinomial(probs, 1, generator=self._generator)[0]
        probs = torch.softmax(values, dim=-1)
        if top_p < 1.0:
            # Keep the smallest prefix whose probability reaches top_p (at least one token).
            before = torch.cumsum(probs, dim=-1) - probs
            probs = probs.masked_fill(before >= top_p, 0.0)
        choice = torch.multinomial(probs, 1, generator=self._generator)[0]
        return indices[choice]
