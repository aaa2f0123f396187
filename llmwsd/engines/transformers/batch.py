"""The running batch: requests that share one left-padded KV cache, and its forward passes.

Rows of different lengths share the cache by padding on the left, with an
attention mask and per-row position ids, the way TGI's first Python server
batched: a prefill builds a batch for newcomers, :meth:`Batch.extend` joins it
to the running one, :meth:`Batch.keep` drops finished rows, and
:meth:`Batch.decode` runs one token for every row in a single forward pass.
The cost of a decoding step then depends on the rows running, not on how
requests came and went.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmwsd.engines import memory

Row = TypeVar("Row")


class SpareRoomLayer(DynamicLayer):
    """A DynamicLayer that appends into spare room instead of concatenating.

    DynamicLayer copies the whole cache of its layer for every new token; here a
    token is written in place and ``keys``/``values`` are views of the used part.
    When someone replaces them (the batch adding or removing rows), the next
    update moves them into a new buffer with room to grow.
    """

    _view: torch.Tensor | None = None
    _key_room: torch.Tensor
    _value_room: torch.Tensor

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        used = keys.shape[-2] if keys.dim() == 4 else 0
        length = used + key_states.shape[-2]
        if keys is not self._view or length > self._key_room.shape[-2]:
            batch, heads, _, key_dim = key_states.shape
            value_dim = value_states.shape[-1]
            capacity = memory.cache_room(length)
            self._key_room = key_states.new_empty(batch, heads, capacity, key_dim)
            self._value_room = value_states.new_empty(batch, heads, capacity, value_dim)
            if used:
                self._key_room[:, :, :used] = keys
                self._value_room[:, :, :used] = values
        self._key_room[:, :, used:length] = key_states
        self._value_room[:, :, used:length] = value_states
        self.keys = self._view = self._key_room[:, :, :length]
        self.values = self._value_room[:, :, :length]
        return self.keys, self.values


def new_cache(model_config: Any) -> DynamicCache:
    """A model's DynamicCache whose full-attention layers append in place."""
    cache = DynamicCache(config=model_config)
    cache.layers = [
        SpareRoomLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = SpareRoomLayer
    return cache


def rows_can_join(model_config: Any) -> bool:
    """Whether rows of different lengths can share this model's cache.

    Only when every layer keeps all tokens: sliding-window layers do not, so such
    models batch one wave at a time.
    """
    return all(isinstance(layer, SpareRoomLayer) for layer in new_cache(model_config).layers)


def prefill_groups(count: int, split: bool) -> list[int]:
    """Split ``count`` newcomers into prefill groups (all at once unless ``split``).

    Split, the first group holds just over half of them and the second the rest:
    8 newcomers are prefilled as 5 and 3. Where a prefill's cost grows with its
    rows (on CPU), most of a burst then gets its first token after one pass that
    is not much longer than a pass over half of it, and the rest soon after;
    one pass over all would keep everyone waiting for the whole, and groups of
    four would keep the middle client waiting for two passes.
    """
    if not split or count <= 2:
        return [count] if count else []
    first = count // 2 + 1
    return [first, count - first]


def joined(first: Batch[Row] | None, second: Batch[Row] | None) -> Batch[Row] | None:
    """``first`` with ``second``'s rows appended; either may be None."""
    if first is None:
        return second
    if second is not None:
        first.extend(second)
    return first


class Batch(Generic[Row]):
    """Running requests (``rows``) sharing one left-padded KV cache.

    ``next_tokens`` were sampled but are not in the cache yet; ``positions`` are
    their position ids (the number of real tokens before them in each row).
    """

    def __init__(
        self,
        rows: list[Row],
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        self.rows = rows
        self.cache = cache
        self.attention_mask = attention_mask
        self.positions = positions
        self.next_tokens = torch.zeros_like(positions)

    @classmethod
    def prefill(
        cls,
        model: Any,
        rows: list[Row],
        prompts: list[list[int]],
        pad_id: int,
        prefix_kv: torch.Tensor | None = None,
    ) -> tuple[Batch[Row], torch.Tensor]:
        """Run the prompts, left-padded to a common, bucketed length, in one forward pass.

        ``prefix_kv`` (layers × 2 × rows × heads × tokens × head dim) holds the keys
        and values of every prompt's first tokens, from the prefix cache: only the
        rest of each prompt is run, padded on its left, after them.
        Returns the new batch and every row's logits for its first token (float32).
        """
        device = model.device
        reused = 0 if prefix_kv is None else prefix_kv.shape[-2]
        rests = [p[reused:] for p in prompts]
        length = memory.padded_length(max(len(r) for r in rests))
        input_ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rests], device=device)
        attention_mask = torch.tensor(
            [[1] * reused + [0] * (length - len(r)) + [1] * len(r) for r in rests], device=device
        )
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, reused:]
        cache = new_cache(model.config)
        if prefix_kv is not None:
            for index, (keys, values) in enumerate(prefix_kv):
                cache.update(keys, values, index)
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = cls(rows, cache, attention_mask, attention_mask.sum(-1))
        return batch, output.logits[:, -1, :].float()

    def row_kv(self, index: int, tokens: int) -> torch.Tensor | None:
        """A copy of the keys and values of row ``index``'s first ``tokens`` real tokens
        (layers × 2 × heads × tokens × head dim); None when a layer holds none."""
        layers = self._layers()
        if len(layers) != len(self.cache.layers):
            return None
        columns = self.attention_mask[index].nonzero().squeeze(-1)[:tokens]
        first = layers[0].keys[index]
        heads, _, head_dim = first.shape
        # Written in place: no second copy of a long prompt's KV on the way.
        kv = first.new_empty(len(layers), 2, heads, len(columns), head_dim)
        for layer, (keys, values) in zip(layers, kv, strict=True):
            torch.index_select(layer.keys[index], 1, columns, out=keys)
            torch.index_select(layer.values[index], 1, columns, out=values)
        return kv

    def decode(self, model: Any) -> torch.Tensor:
        """Run ``next_tokens`` through the model; return every row's next logits (float32).

        When this raises, the cache may be half updated and the batch is lost.
        """
        attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        output = model(
            input_ids=self.next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.attention_mask = attention_mask
        self.positions = self.positions + 1
        return output.logits[:, -1, :].float()

    def _layers(self) -> list[Any]:
        # Layers a model never uses (shared KV) stay uninitialized and are skipped.
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def keep(self, indices: list[int], trim: bool) -> None:
        """Keep only these rows; ``trim``: cut the left padding no remaining row needs."""
        index = torch.tensor(indices, device=self.positions.device)
        self.rows = [self.rows[i] for i in indices]
        self.attention_mask = self.attention_mask[index]
        self.positions = self.positions[index]
        self.next_tokens = self.next_tokens[index]
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        start = int(self.attention_mask.any(dim=0).int().argmax()) if trim else 0
        if start > 0:
            self.attention_mask = self.attention_mask[:, start:]
            for layer in self._layers():
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def extend(self, other: Batch[Row]) -> None:
        """Append ``other``'s rows, padding the shorter cache on the left."""
        length = max(self.attention_mask.shape[1], other.attention_mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = length - t.shape[-dim_from_end]
            return F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else t

        self.rows += other.rows
        self.attention_mask = torch.cat([pad(self.attention_mask, 1), pad(other.attention_mask, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
