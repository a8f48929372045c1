"""Operations on the caches that the engine needs and the model does not: for the per-sequence `KVCache`,
snapshots for speculative rollback and prefix caching, (de)serialisation for the on-disk prefix store and
a byte estimate for the memory budget; for the paged pool, its size under a byte budget.

The `KVCache` functions work on the cache's public dataclass fields only. The reference model never writes
into a cache tensor in place: every forward *replaces* `window`, `entries`, `pending_*` and `overlap_*` by
new tensors (cat / slice). So a snapshot is a structural copy that shares the tensors, O(layers) and free
of copies. The paged pool is written in place: its prefix snapshots are real copies
(`PagedKVCache.export` / `load`), and speculative decoding, which needs rollback, runs on `KVCache`s.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch

from ..cache import CompressorState, KVCache, LayerCache
from ..config import Config
from ..kernels.paged_cache import PagedKVCache

# The tensors of a compressor's state; `base` (entries held elsewhere) is 0 in a `KVCache`, which holds them all.
_STATE_FIELDS = [f.name for f in fields(CompressorState) if f.name != "base"]


def _copy_state(s: CompressorState | None, fn) -> CompressorState | None:
    return None if s is None else CompressorState(**{k: fn(getattr(s, k)) for k in _STATE_FIELDS}, base=s.base)


def _copy_layer(layer: LayerCache, fn) -> LayerCache:
    return LayerCache(window=fn(layer.window), compressor=_copy_state(layer.compressor, fn),
                      indexer=_copy_state(layer.indexer, fn))


def _map(cache: KVCache, fn) -> KVCache:
    return replace(cache, layers=[_copy_layer(x, fn) for x in cache.layers],
                   mtp=[_copy_layer(x, fn) for x in cache.mtp], mtp_length=list(cache.mtp_length))


def snapshot(cache: KVCache) -> KVCache:
    """A copy that shares the tensors (see the module note): restoring = using the copy instead."""
    return _map(cache, lambda t: t)


def clone(cache: KVCache, device: torch.device | str | None = None) -> KVCache:
    """A deep copy (optionally on another device), for stores that outlive the request."""
    return _map(cache, lambda t: None if t is None else t.detach().to(device or t.device, copy=True))


def to_tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    """Flat name -> tensor dict (safetensors-ready); lengths are stored as int64 scalars."""
    out = {"length": torch.tensor(cache.length, dtype=torch.int64),
           "mtp_length": torch.tensor(cache.mtp_length, dtype=torch.int64)}
    for prefix, layers in (("layers", cache.layers), ("mtp", cache.mtp)):
        for i, layer in enumerate(layers):
            if layer.window is not None:
                out[f"{prefix}.{i}.window"] = layer.window
            for part in ("compressor", "indexer"):
                state = getattr(layer, part)
                for k in _STATE_FIELDS if state is not None else ():
                    if getattr(state, k) is not None:
                        out[f"{prefix}.{i}.{part}.{k}"] = getattr(state, k)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_tensors(config: Config, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> KVCache:
    """Inverse of `to_tensors`; raises ValueError if the tensors do not fit `config`'s layer layout."""
    cache = KVCache.empty(config)
    cache.length = int(tensors["length"])
    cache.mtp_length = [int(x) for x in tensors["mtp_length"].tolist()]
    if len(cache.mtp_length) != len(cache.mtp):
        raise ValueError(f"stored cache has {len(cache.mtp_length)} MTP blocks, the model {len(cache.mtp)}")
    for name, t in tensors.items():
        if name in ("length", "mtp_length"):
            continue
        prefix, i, *rest = name.split(".")
        layers = cache.layers if prefix == "layers" else cache.mtp
        if int(i) >= len(layers):
            raise ValueError(f"stored cache tensor {name} has no layer in this model")
        layer = layers[int(i)]
        if rest == ["window"]:
            layer.window = t.to(device)
            continue
        state = getattr(layer, rest[0])
        if state is None:
            raise ValueError(f"stored cache tensor {name}: layer {i} of this model has no {rest[0]}")
        setattr(state, rest[1], t.to(device))
    return cache


def estimate_bytes(config: Config, n_tokens: int, element_size: int) -> int:
    """Upper bound of `KVCache.nbytes()` after `n_tokens` tokens (trunk + MTP), for admission control."""
    c, total = config, 0
    win = (c.sliding_window - 1) * c.head_dim
    for ratio in c.layer_ratios:
        total += win
        if ratio:
            total += _compressor_elems(n_tokens, ratio, c.head_dim)
        if ratio == 4:
            total += _compressor_elems(n_tokens, ratio, c.index_head_dim)
    total += c.num_nextn_predict_layers * win
    return total * element_size


def _compressor_elems(n: int, ratio: int, dim: int) -> int:
    width = 2 * dim if ratio == 4 else dim
    entries = math.ceil(n / ratio) * dim
    pending = 2 * ratio * width  # kv + gate of the unfinished block
    overlap = 2 * ratio * dim if ratio == 4 else 0
    return entries + pending + overlap


def paged_pool(config: Config, budget: int, max_seqs: int, block_size: int,
               device: torch.device | str) -> tuple[PagedKVCache, int]:
    """The paged pool with `max_seqs` slots and room for the most tokens whose `allocated_bytes()` fits
    `budget` (and no more than `max_seqs` full contexts) -> (pool, its tokens). Sized by building candidates
    on the meta device, so the count is the pool's own, not a formula that could drift from it."""
    def size(tokens: int) -> int:
        return PagedKVCache(config, max_seqs, tokens, block_size, device="meta").allocated_bytes()

    fixed = size(0)  # window rings, state rows, block tables and one spare block per slot and ratio
    if fixed > budget:
        raise ValueError(f"a KV budget of {budget / 2**20:.1f} MiB cannot hold the paged pool's per-sequence "
                         f"state for max_batch={max_seqs} ({fixed / 2**20:.1f} MiB before any token); raise "
                         f"the budget or lower max_batch")
    lo, hi = 0, max_seqs * config.max_position_embeddings
    if size(hi) <= budget:
        lo = hi
    while lo < hi:  # size() is monotone in tokens: the largest that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    return PagedKVCache(config, max_seqs, lo, block_size, device=device), lo
