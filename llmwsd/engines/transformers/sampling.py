"""Choosing the next token of every row of a batch, each row with its own settings.

Each request keeps its own settings, seen tokens and random generator
(:class:`TokenSampler`); :func:`choose_tokens` applies them to a batch of logits.
The work over the whole vocabulary (argmax, top-k) runs once for the batch and
the rest per row on a few candidates, because a per-row pass over 49k logits
costs as much as a good part of a decoding step on a small CPU. The order is
that of transformers' ``generate()``: repetition penalty, minimum length,
the answer's format (a token mask: llmwsd.engines.grammar), temperature, top-k, top-p.

Every setting the ranges of llmwsd.engines.interface accept samples a valid token: the
settings are float64 and the logits float32, where 1e-300 is 0.0, so a divisor
(temperature, repetition penalty) is at least the smallest normal float32, logits
are clamped to finite values and shifted so that the best one is 0 before the
temperature divides them, and top-p always keeps the best candidate.
"""

from __future__ import annotations

import secrets

import torch
import xgrammar

from llmwsd.settings import GenerationSettings

_FLOAT32 = torch.finfo(torch.float32)


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
        grammar: xgrammar.GrammarMatcher | None = None,
    ) -> None:
        self.settings = settings
        self.grammar = grammar  # the answer's format (llmwsd.engines.grammar), token by token
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
            # A penalty under float32's smallest normal would be 0: x / 0 is inf or NaN.
            penalty = max(self.settings.repetition_penalty, _FLOAT32.tiny)
            seen = logits[self._seen_ids]
            raised = (seen / penalty).clamp_(max=_FLOAT32.max)  # finite, not +inf
            logits[self._seen_ids] = torch.where(seen < 0, seen * penalty, raised)
        # A format decides when the answer may end: min_new_tokens gives way to it.
        if (
            generated < self.settings.min_new_tokens
            and self._end_tokens.numel()
            and self.grammar is None
        ):
            logits[self._end_tokens] = float("-inf")

    def accept(self, token_id: int) -> None:
        """Record a generated token (for the repetition penalty and the format)."""
        if self.grammar is not None and not self.grammar.accept_token(token_id):
            raise ValueError(f"token {token_id} does not fit the answer's format")
        if self._penalized and token_id not in self._seen and token_id < self.vocab_size:
            self._seen.add(token_id)
            new = torch.tensor([token_id], dtype=torch.long, device=self._device)
            self._seen_ids = torch.cat([self._seen_ids, new])

    def sample(self, values: torch.Tensor, indices: torch.Tensor | None = None) -> int:
        """Draw from candidates ``values`` (sorted, descending; ids ``indices``) or all logits."""
        top_p = self.settings.top_p
        if indices is None and top_p < 1.0:
            values, indices = torch.sort(values, descending=True)
        probs = self._probabilities(values)
        if indices is None:
            # All of the vocabulary: the exponential race draws like multinomial, much faster.
            race = torch.empty_like(probs).exponential_(generator=self._generator)
            return int((probs / race).argmax())
        if top_p < 1.0:
            # Keep the smallest prefix whose probability reaches top_p, and always the
            # first (best) candidate: a top_p of 1e-300 is 0.0 in float32.
            before = torch.cumsum(probs, dim=-1) - probs
            drop = before >= top_p
            drop[0] = False
            probs = probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(probs, 1, generator=self._generator)
        return int(indices[choice])

    def _probabilities(self, values: torch.Tensor) -> torch.Tensor:
        """softmax(values / temperature), finite for every temperature in (0, 100].

        ±inf become ±the largest finite float, so that the best value can be
        subtracted without NaN; what remains is <= 0 with a 0, which no temperature
        (at least float32's smallest normal) turns into inf or NaN. A -inf candidate
        keeps probability 0 unless every candidate is -inf (then they are equal);
        a NaN logit stays NaN.
        """
        temperature = max(self.settings.temperature, _FLOAT32.tiny)
        scaled = values.clamp(-_FLOAT32.max, _FLOAT32.max)
        scaled -= scaled.max()
        scaled /= temperature
        return torch.softmax(scaled, dim=-1)


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
    constrained = [
        row
        for row, sampler in enumerate(samplers)
        if sampler.grammar is not None and not isinstance(results[row], Exception)
    ]
    if constrained:
        # What each format allows next, for its rows only; one mask for all of them.
        mask = xgrammar.allocate_token_bitmask(len(samplers), logits.shape[-1])
        for row in constrained:
            grammar = samplers[row].grammar
            assert grammar is not None
            grammar.fill_next_token_bitmask(mask, row)
        xgrammar.apply_token_bitmask_inplace(logits, mask.to(logits.device), indices=constrained)
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
