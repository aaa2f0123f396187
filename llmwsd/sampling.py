"""Choosing the next token of every row of a batch, each row with its own settings.

Each request keeps its own settings, seen tokens and random generator
(:class:`TokenSampler`); :func:`choose_tokens` applies them to a batch of logits.
The work over the whole vocabulary (argmax, top-k) runs once for the batch and
the rest per row on a few candidates, because a per-row pass over 49k logits
costs as much as a good part of a decoding step on a small CPU. The order is
that of transformers' ``generate()``: repetition penalty, minimum length,
temperature, top-k, top-p.
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
        self.vocab_size = vocab_size
        self._device = device
        self._end_tokens = torch.tensor(
            [i for i in end_token_ids if i < vocab_size], dtype=torch.long, device=device
        )
        # The repetition penalty applies to the prompt's tokens and the generated ones.
        self._penalized = settings.repetition_penalty != 1.0
        self._seen = {i for i in prompt_ids if i < vocab_size}
        self._seen_ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=device)
        self._generator: torch.Generator | None = None
        if not self.greedy:
            seed = settings.seed if settings.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)

    @property
    def top_k(self) -> int:
        """Candidates to sample from; 0 when all of the vocabulary is."""
        k = self.settings.top_k
        return k if 0 < k < self.vocab_size else 0

    def adjust(self, logits: torch.Tensor, generated: int) -> None:
        """Apply the repetition penalty and the minimum length to one row, in place."""
        if self._penalized and self._seen_ids.numel():
            penalty = self.settings.repetition_penalty
            seen = logits[self._seen_ids]
            logits[self._seen_ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
        if generated < self.settings.min_new_tokens and self._end_tokens.numel():
            logits[self._end_tokens] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Record a generated token (for the repetition penalty)."""
        if self._penalized and token_id not in self._seen and token_id < self.vocab_size:
            self._seen.add(token_id)
            new = torch.tensor([token_id], dtype=torch.long, device=self._device)
            self._seen_ids = torch.cat([self._seen_ids, new])

    def sample(self, values: torch.Tensor, indices: torch.Tensor | None = None) -> int:
        """Draw from candidates ``values`` (sorted, descending; ids ``indices``) or all logits."""
        temperature, top_p = self.settings.temperature, self.settings.top_p
        if indices is None and top_p < 1.0:
            values, indices = torch.sort(values, descending=True)
        if indices is None:
            # All of the vocabulary: the exponential race draws like multinomial, much faster.
            probs = torch.softmax(values / temperature, dim=-1)
            race = torch.empty_like(probs).exponential_(generator=self._generator)
            return int((probs / race).argmax())
        probs = torch.softmax(values / temperature, dim=-1)
        if top_p < 1.0:
            # Keep the smallest prefix whose probability reaches top_p (at least one token).
            before = torch.cumsum(probs, dim=-1) - probs
            probs = probs.masked_fill(before >= top_p, 0.0)
        choice = torch.multinomial(probs, 1, generator=self._generator)
        return int(indices[choice])


def choose_tokens(
    samplers: list[TokenSampler], logits: torch.Tensor, generated: list[int]
) -> list[int | Exception]:
    """The next token of each row of ``logits`` (float32, modified in place).

    A row whose settings fail (non-finite logits, say) gets its exception instead,
    so that it alone can be ended.
    """
    results: list[int | Exception] = [0] * len(samplers)
    for row, sampler in enumerate(samplers):
        try:
            sampler.adjust(logits[row], generated[row])
        except Exception as e:
            results[row] = e
    best = logits.argmax(dim=-1).tolist()
    top_k_rows, full_rows = [], []
    for row, sampler in enumerate(samplers):
        if isinstance(results[row], Exception):
            continue
        if sampler.greedy:
            results[row] = best[row]
        elif sampler.top_k:
            top_k_rows.append(row)
        else:
            full_rows.append(row)
    candidates: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {
        row: (logits[row], None) for row in full_rows
    }
    if top_k_rows:
        k = max(samplers[row].top_k for row in top_k_rows)
        values, indices = torch.topk(logits[top_k_rows], k, dim=-1)
        for i, row in enumerate(top_k_rows):
            n = samplers[row].top_k
            candidates[row] = (values[i, :n], indices[i, :n])
    for row, (row_values, row_indices) in candidates.items():
        try:
            results[row] = samplers[row].sample(row_values, row_indices)
        except Exception as e:
            results[row] = e
    return results
