"""The prefix cache's bookkeeping: whole blocks, longest match, LRU within its bytes."""

from __future__ import annotations

import torch

from llmwsd.prefix_cache import BLOCK, PrefixCache, shared_blocks


def kv(tokens: int) -> torch.Tensor:
    """A stand-in for a prompt's keys and values: 2 layers × 2 × 1 head × tokens × 4."""
    return torch.zeros(2, 2, 1, tokens, 4, dtype=torch.float32)


ENTRY_BYTES = kv(BLOCK).numel() * 4  # one block's


def test_shared_blocks_counts_whole_blocks_only():
    a = list(range(40))
    assert shared_blocks(a, a) == 32
    assert shared_blocks(a, a[:20] + [-1] * 20) == 16
    assert shared_blocks(a, [-1, *a[1:]]) == 0
    assert shared_blocks(a, []) == 0


def test_the_longest_entry_wins_and_never_the_whole_prompt():
    cache = PrefixCache(max_bytes=10 * ENTRY_BYTES)
    prompt = list(range(48))
    cache.add(prompt[:16], kv(16))
    cache.add([7] * 32, kv(32))
    cache.add(prompt[:32] + [5] * 16, kv(48))
    tokens, entry = cache.longest([*prompt, 1, 2])
    assert tokens == 32 and entry is not None and entry.tokens[:32] == prompt[:32]
    # The last token must be run for its logits: a prompt of exactly 32 reuses 16.
    assert cache.longest(prompt[:32])[0] == 16
    assert cache.longest([9] * 40) == (0, None)


def test_an_entry_that_holds_another_replaces_it():
    cache = PrefixCache(max_bytes=10 * ENTRY_BYTES)
    prompt = list(range(64))
    cache.add(prompt[:16], kv(16))
    cache.add(prompt[:48], kv(48))
    assert len(cache) == 1 and cache.bytes == 3 * ENTRY_BYTES
    cache.add(prompt[:32], kv(32))  # already held
    assert len(cache) == 1 and cache.bytes == 3 * ENTRY_BYTES


def test_the_least_recently_used_make_room_within_max_bytes():
    cache = PrefixCache(max_bytes=3 * ENTRY_BYTES)
    first, second, third = ([n] * 16 for n in (1, 2, 3))
    cache.add(first, kv(16))
    cache.add(second, kv(16))
    cache.add(third, kv(16))
    assert cache.longest([*first, 0])[0] == 16  # used: now the most recent
    cache.add([4] * 16, kv(16))
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert cache.longest([*second, 0])[0] == 0  # the least recently used went
    assert cache.longest([*first, 0])[0] == 16
    cache.add([5] * 64, kv(64))  # larger than the whole cache: not kept
    assert len(cache) == 3 and cache.bytes == 3 * ENTRY_BYTES
