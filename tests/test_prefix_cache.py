"""The prefix cache's bookkeeping: the longest shared beginning, LRU within its bytes."""

from __future__ import annotations

import torch

from llmwsd.engines.transformers.prefix_cache import PrefixCache, shared_length


def kv(tokens: int) -> torch.Tensor:
    """A stand-in for a prompt's keys and values: 2 layers × 2 × 1 head × tokens × 4."""
    return torch.zeros(2, 2, 1, tokens, 4, dtype=torch.float32)


TOKEN_BYTES = kv(1).numel() * 4


def test_shared_length_counts_tokens_past_whole_slices():
    a = list(range(40))
    assert shared_length(a, a) == 40
    assert shared_length(a, a[:20] + [-1] * 20) == 20
    assert shared_length(a, a[:35]) == 35
    assert shared_length(a, [-1, *a[1:]]) == 0
    assert shared_length(a, []) == 0


def test_the_longest_entry_wins_and_never_the_whole_prompt():
    cache = PrefixCache(max_bytes=1000 * TOKEN_BYTES, bytes_per_token=TOKEN_BYTES)
    prompt = list(range(48))
    cache.add(prompt[:10], kv(10))
    cache.add([7] * 32, kv(32))
    cache.add(prompt[:30] + [5] * 16, kv(46))
    tokens, entry = cache.longest([*prompt, 1, 2])
    assert tokens == 30 and entry is not None and entry.tokens[:30] == prompt[:30]
    # The last token must be run for its logits: a prompt an entry holds whole reuses all
    # but its last token.
    assert cache.longest(prompt[:30])[0] == 29
    assert cache.longest([9] * 40) == (0, None)


def test_an_entry_that_holds_another_replaces_it():
    cache = PrefixCache(max_bytes=1000 * TOKEN_BYTES, bytes_per_token=TOKEN_BYTES)
    prompt = list(range(64))
    cache.add(prompt[:16], kv(16))
    assert cache.holds(prompt[:16]) and cache.holds(prompt[:5]) and not cache.holds(prompt[:17])
    assert cache.wants(prompt[:17]) and not cache.wants(prompt[:16])
    assert not cache.wants([9] * 1001)  # larger than the whole cache
    cache.add(prompt[:40], kv(40))
    assert len(cache) == 1 and cache.bytes == 40 * TOKEN_BYTES
    assert cache.holds(prompt[:40])


def test_the_least_recently_used_make_room_within_max_bytes():
    cache = PrefixCache(max_bytes=48 * TOKEN_BYTES, bytes_per_token=TOKEN_BYTES)
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
    assert len(cache) == 3 and cache.bytes == 48 * TOKEN_BYTES
