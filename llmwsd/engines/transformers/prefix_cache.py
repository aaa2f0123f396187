"""The KV cache of recent prompts' beginnings, reused by prompts that start the same way.

Chat prompts share long beginnings: every conversation opens with the chat
template's system prompt, and each turn of a session repeats the turns before
it. A prefill is compute-bound on CPU, so the engine keeps the keys and values
of recent prompts and prefills only what follows the longest beginning a new
prompt shares with one of them (the way vLLM's prefix caching and SGLang's
radix cache do, without their paged memory). What is prefilled is still
padded to a few lengths (:func:`llmwsd.engines.memory.padded_length`); the length of
the reused beginning only changes the attention's, which every decoding step
changes anyway. The entries' memory is set aside from the memory budget at
load; the least recently used entries make room for new ones.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

COMPARED_AT_ONCE = 16  # tokens: list slices compare in C, a token at a time in Python


@dataclass
class PrefixEntry:
    tokens: list[int]
    kv: torch.Tensor  # layers × 2 (keys, values) × heads × tokens × head dim

    @property
    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def shared_length(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` begin with in common."""
    end = min(len(a), len(b))
    shared = 0
    step = COMPARED_AT_ONCE
    while shared + step <= end and a[shared : shared + step] == b[shared : shared + step]:
        shared += step
    while shared < end and a[shared] == b[shared]:
        shared += 1
    return shared


class PrefixCache:
    """Recent prompts' keys and values, at most ``max_bytes`` of them (engine thread only).

    ``bytes_per_token``: what one token's keys and values take, for every layer.
    """

    def __init__(self, max_bytes: int, bytes_per_token: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self._entries: collections.OrderedDict[int, PrefixEntry] = collections.OrderedDict()
        self._next_key = 0
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt: list[int]) -> tuple[int, PrefixEntry | None]:
        """The most first tokens of ``prompt`` an entry holds (never all: the last one is
        run for its logits), and that entry."""
        usable = len(prompt) - 1
        best, found, found_key = 0, None, None
        for key, entry in self._entries.items():
            shared = min(shared_length(entry.tokens, prompt), usable)
            if shared > best:
                best, found, found_key = shared, entry, key
        if found_key is not None:
            self._entries.move_to_end(found_key)
        return best, found

    def holds(self, tokens: list[int]) -> bool:
        """Whether an entry begins with all of ``tokens``."""
        return any(shared_length(e.tokens, tokens) == len(tokens) for e in self._entries.values())

    def wants(self, prompt: list[int]) -> bool:
        """Whether ``prompt`` is worth copying in: it fits, and no entry holds it yet."""
        return len(prompt) * self.bytes_per_token <= self.max_bytes and not self.holds(prompt)

    def count_reuse(self, tokens: int, prompts: int) -> None:
        """``prompts`` prompts took their first ``tokens`` tokens from the cache."""
        self.hits += prompts
        self.reused_tokens += tokens * prompts

    def add(self, tokens: list[int], kv: torch.Tensor) -> None:
        """Keep ``kv`` for ``tokens`` (see ``wants``); drop the entries it makes redundant."""
        entry = PrefixEntry(tokens, kv)
        if not tokens or entry.bytes > self.max_bytes:
            return
        for key, old in list(self._entries.items()):
            if shared_length(old.tokens, tokens) == len(old.tokens):
                self._remove(key)  # the new entry holds all of it and more
        while self.bytes + entry.bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
        self._entries[self._next_key] = entry
        self._next_key += 1
        self.bytes += entry.bytes

    def _remove(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).bytes

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "reused_tokens": self.reused_tokens,
        }
