"""KV caches of several conversations as one left-padded batch (decode steps).

Each conversation owns a DynamicCache of its own length. While turns decode
together, their caches live in one batched DynamicCache whose rows are padded
on the left to the longest row; a 2D attention mask (0 on pads) and explicit
per-row position ids make every row compute exactly what it would alone. The
batch is rebuilt only when membership changes: a joining row is padded (or the
batch is, when the newcomer is longer) and concatenated; leaving rows are cut
out (pads removed) and handed back as per-conversation caches, and pad columns
no remaining row needs are trimmed.

`prefill_rows` prefills several conversations in one forward with the same
layout (cached tokens and new tokens, each block left-padded) and hands each
row's cache back without the pads.

Relies on DynamicCache's layers holding `keys`/`values` tensors of shape
[batch, kv_heads, seq, head_dim] (transformers 5.x).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch


def new_cache(config: Any, tensors: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """A DynamicCache for `config`, filled with per-layer (keys, values) if given."""
    tf: Any = importlib.import_module("transformers")
    if tensors is None:
        return tf.DynamicCache(config=config)
    return tf.DynamicCache(ddp_cache_data=tensors, config=config)


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of an initialised cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_bytes(cache: Any) -> int:
    """Bytes the cache's tensors hold."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV cache bytes one token costs (keys and values of every layer)."""
    text = config.get_text_config(decoder=True)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * size


def _growable_layer_class() -> type:
    tf: Any = importlib.import_module("transformers")

    class GrowableLayer(tf.DynamicLayer):  # type: ignore[misc, name-defined]
        """A DynamicLayer that appends into spare capacity instead of
        concatenating the whole cache every step (which dominates a batched
        decode step's time on CPU). `keys`/`values` are views of the buffers."""

        def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            n = keys.shape[2]
            cap = n + max(32, n // 4)
            shape = (keys.shape[0], keys.shape[1], cap, keys.shape[3])
            self.kbuf = keys.new_empty(shape)
            self.vbuf = values.new_empty((*shape[:3], values.shape[3]))
            self.kbuf[:, :, :n] = keys
            self.vbuf[:, :, :n] = values
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]
            self.device, self.is_initialized = keys.device, True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            n, q = self.keys.shape[2], key_states.shape[2]
            if n + q > self.kbuf.shape[2]:
                self.set(self.keys, self.values)
                if n + q > self.kbuf.shape[2]:
                    return super().update(key_states, value_states)  # type: ignore[no-any-return]
            self.kbuf[:, :, n : n + q] = key_states
            self.vbuf[:, :, n : n + q] = value_states
            self.keys, self.values = self.kbuf[:, :, : n + q], self.vbuf[:, :, : n + q]
            return self.keys, self.values

    return GrowableLayer


_GROWABLE: type | None = None


def _growable_cache(config: Any, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache whose layers grow in place (the decode batch's)."""
    global _GROWABLE
    if _GROWABLE is None:
        _GROWABLE = _growable_layer_class()
    cache = new_cache(config)
    layers = []
    for k, v in tensors:
        layer = _GROWABLE()
        layer.set(k, v)
        layers.append(layer)
    cache.layers = layers
    return cache


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[2] = n
    return torch.cat([t.new_zeros(shape), t], dim=2)


class DecodeBatch:
    """The caches of the decoding turns as one batched DynamicCache.

    Rows are identified by an owner object (a turn). `lengths[i]` is row i's
    real token count; every row is padded on the left to `width` columns.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.owners: list[object] = []
        self.lengths: list[int] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, width] long, 0 on pads

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def allocated_tokens(self) -> int:
        """Token slots the batched cache holds, pads included."""
        return len(self.owners) * self.width

    def add(self, owner: object, cache: Any, length: int) -> None:
        """Take over `cache` (one row of `length` tokens) as a new row."""
        if length < 1:
            raise ValueError("a row needs at least one cached token")
        rows = layer_tensors(cache)
        device = rows[0][0].device
        if self.cache is None or self.mask is None:
            self.cache = _growable_cache(self.config, rows)
            self.mask = torch.ones((1, length), dtype=torch.long, device=device)
        else:
            width = max(self.width, length)
            grow, pad = width - self.width, width - length
            merged = []
            for (bk, bv), (k, v) in zip(layer_tensors(self.cache), rows, strict=True):
                merged.append(
                    (
                        torch.cat([_pad_left(bk, grow), _pad_left(k, pad)], dim=0),
                        torch.cat([_pad_left(bv, grow), _pad_left(v, pad)], dim=0),
                    )
                )
            self._set_layers(merged)
            old = self.mask
            if grow:
                old = torch.cat([old.new_zeros((old.shape[0], grow)), old], dim=1)
            row = torch.cat(
                [
                    torch.zeros((1, pad), dtype=torch.long, device=device),
                    torch.ones((1, length), dtype=torch.long, device=device),
                ],
                dim=1,
            )
            self.mask = torch.cat([old, row], dim=0)
        self.owners.append(owner)
        self.lengths.append(length)

    def remove(self, owners: list[object]) -> list[Any]:
        """Cut these rows out; returns their caches (pads removed), in order."""
        if not owners:
            return []
        # by identity: owners may be dataclasses holding arrays (no usable ==)
        where = {id(o): i for i, o in enumerate(self.owners)}
        index = [where[id(o)] for o in owners]
        assert self.cache is not None and self.mask is not None
        layers = layer_tensors(self.cache)
        width = self.width
        out = []
        for i in index:
            start = width - self.lengths[i]
            out.append(
                new_cache(
                    self.config,
                    [
                        (k[i : i + 1, :, start:].contiguous(), v[i : i + 1, :, start:].contiguous())
                        for k, v in layers
                    ],
                )
            )
        keep = [i for i in range(len(self.owners)) if i not in set(index)]
        self.owners = [self.owners[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return out
        trim = width - max(self.lengths)  # pad columns no remaining row needs
        sel = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self._set_layers(
            [
                (
                    k.index_select(0, sel)[:, :, trim:],
                    v.index_select(0, sel)[:, :, trim:],
                )
                for k, v in layers
            ]
        )
        self.mask = self.mask.index_select(0, sel)[:, trim:].contiguous()
        return out

    def clear(self) -> None:
        self.owners, self.lengths = [], []
        self.cache, self.mask = None, None

    def step(self, model: Any, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (in row order); float32 logits [rows, vocab]."""
        assert self.cache is not None and self.mask is not None
        dev = self.mask.device
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev).unsqueeze(1)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=dev).unsqueeze(1)
        mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        out = model.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        logits: torch.Tensor = model.lm_head(out.last_hidden_state[:, -1, :]).float()
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _set_layers(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in zip(self.cache.layers, tensors, strict=True):
            layer.set(k, v)


def prefill_rows(
    model: Any,
    new_ids: list[list[int]],
    caches: list[Any],
    pad_id: int,
    **inputs: Any,
) -> tuple[torch.Tensor, list[Any]]:
    """Prefill several conversations in ONE forward; (float32 logits of each
    row's last new token [rows, vocab], each row's cache).

    Row i holds `caches[i]` (a DynamicCache, or None: nothing cached) and feeds
    `new_ids[i]` (at least one id) after it. The batch is laid out as
    [pad, cached tokens of row i, pad, new tokens of row i]: the cached parts
    left-padded to the longest cache, the new blocks left-padded to the longest
    block, so every row's last new token is the last column. The 2D mask is 0
    on pads and position ids continue each row's own cached length, so each
    row computes what it would alone. `inputs` go to `model.model` as they are
    (audio features of every row's new clips, in row order: the model fills the
    audio placeholders in row-major order; `pad_id` must not be a placeholder).
    The caches given are not modified; the caches returned hold each row's
    cached and new tokens and no pads (what a prefill of that row alone leaves).
    """
    rows = len(new_ids)
    if rows == 0 or len(caches) != rows or any(not ids for ids in new_ids):
        raise ValueError("every row needs a cache (or None) and at least one new id")
    cached = [0 if c is None else int(c.get_seq_length()) for c in caches]
    news = [len(ids) for ids in new_ids]
    wc, wn = max(cached), max(news)
    config = model.config
    ref = next((c for c, n in zip(caches, cached, strict=True) if n > 0), None)
    if ref is None:
        dev = next(model.parameters()).device
        batched = new_cache(config)
    else:
        dev = ref.layers[0].keys.device
        per_row = [[] if n == 0 else layer_tensors(c) for c, n in zip(caches, cached, strict=True)]
        tensors = []
        for li, (rk, rv) in enumerate(layer_tensors(ref)):
            ks, vs = [], []
            for layers, n in zip(per_row, cached, strict=True):
                if n == 0:
                    ks.append(rk.new_zeros((1, rk.shape[1], wc, rk.shape[3])))
                    vs.append(rv.new_zeros((1, rv.shape[1], wc, rv.shape[3])))
                else:
                    ks.append(_pad_left(layers[li][0], wc - n))
                    vs.append(_pad_left(layers[li][1], wc - n))
            tensors.append((torch.cat(ks, dim=0), torch.cat(vs, dim=0)))
        batched = new_cache(config, tensors)
    ids = torch.full((rows, wn), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, wn), dtype=torch.long)
    mask = torch.zeros((rows, wc + wn), dtype=torch.long)
    for i, (row, c, n) in enumerate(zip(new_ids, cached, news, strict=True)):
        ids[i, wn - n :] = torch.tensor(row, dtype=torch.long)
        positions[i, wn - n :] = torch.arange(c, c + n)
        mask[i, wc - c : wc] = 1
        mask[i, wc + wn - n :] = 1
    out = model.model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=positions.to(dev),
        cache=batched,
        use_cache=True,
        **inputs,
    )
    logits: torch.Tensor = model.lm_head(out.last_hidden_state[:, -1, :]).float()
    layers = layer_tensors(batched)
    width = wc + wn
    result = []
    for i, (c, n) in enumerate(zip(cached, news, strict=True)):
        row_layers = []
        for k, v in layers:
            if c:
                row_k = torch.cat(
                    [k[i : i + 1, :, wc - c : wc], k[i : i + 1, :, width - n :]], dim=2
                )
                row_v = torch.cat(
                    [v[i : i + 1, :, wc - c : wc], v[i : i + 1, :, width - n :]], dim=2
                )
            else:
                row_k = k[i : i + 1, :, width - n :].contiguous()
                row_v = v[i : i + 1, :, width - n :].contiguous()
            row_layers.append((row_k, row_v))
        result.append(new_cache(config, row_layers))
    return logits, result
