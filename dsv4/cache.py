"""The inference state of a V4 model, kept outside the modules and passed to `forward` (§2.3.4).

Per layer the cache is heterogeneous:
  window       the last `sliding_window - 1` uncompressed KV entries (the current token makes n_win)
  compressor   finished compressed entries (1 per 4 tokens for CSA, per 128 for HCA) plus the state of the
               unfinished block (its projections and gate logits) and, for CSA's overlapping windows, the
               first-series half of the last finished block
  indexer      the same for the lightning indexer's own compressed keys (CSA layers only)
A forward pass over new tokens appends to it; the full-sequence forward uses a fresh cache, so prefill in
one pass, prefill in chunks and token-by-token decoding run exactly the same code.
This reference cache stores everything in the model dtype; the compact FP8 paged cache is the kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import Config


@dataclass
class CompressorState:
    entries: torch.Tensor | None = None  # (B, N, D) finished entries, normalised and RoPE'd
    pending_kv: torch.Tensor | None = None  # (B, r, C), r < ratio: tokens of the unfinished block
    pending_gate: torch.Tensor | None = None  # (B, r, C) their gate logits (+ positional bias)
    overlap_kv: torch.Tensor | None = None  # (B, ratio, D) CSA: series-a half of the last finished block
    overlap_gate: torch.Tensor | None = None
    # Entries finished before `entries` starts: 0 here; the paged cache keeps finished entries in its pool
    # and hands the compressor only the state, with `base` = entries already in the pool (an int, or a
    # (B, 1) tensor when the rows of a decode batch finish blocks at different indices).
    base: int | torch.Tensor = 0

    @property
    def num_entries(self) -> int | torch.Tensor:
        return self.base + (0 if self.entries is None else self.entries.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.entries, self.pending_kv, self.pending_gate, self.overlap_kv, self.overlap_gate)
                if t is not None]


@dataclass
class LayerCache:
    window: torch.Tensor | None = None  # (B, <= n_win - 1, D)
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.window] if self.window is not None else []
        for state in (self.compressor, self.indexer):
            if state is not None:
                out += state.tensors()
        return out


@dataclass
class KVCache:
    layers: list[LayerCache]
    length: int = 0  # tokens consumed so far = absolute position of the next token
    mtp: list[LayerCache] = field(default_factory=list)  # one window-only layer per MTP block
    mtp_length: list[int] = field(default_factory=list)  # tokens each MTP block has consumed

    @classmethod
    def empty(cls, config: Config) -> "KVCache":
        def layer(ratio: int) -> LayerCache:
            return LayerCache(compressor=CompressorState() if ratio else None,
                              indexer=CompressorState() if ratio == 4 else None)

        k = config.num_nextn_predict_layers
        return cls(layers=[layer(r) for r in config.layer_ratios], mtp=[layer(0) for _ in range(k)],
                   mtp_length=[0] * k)

    def layer(self, layer_id: int) -> LayerCache:
        """Cache of trunk layer `layer_id`; ids past the trunk are the MTP blocks (as in the release)."""
        n = len(self.layers)
        return self.layers[layer_id] if layer_id < n else self.mtp[layer_id - n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers + self.mtp for t in layer.tensors())


@dataclass
class AttnView:
    """One independent attention stream inside a batch: rows x cols of the (B, S) tokens, their absolute
    positions, and the cache they continue. A plain batch is one view; rows with their own caches
    (batched decoding of different sequences) or packed documents (sample-level masking: each document
    attends only within itself, RoPE positions and compression blocks restart at its first token) are
    several. Attention is the only place where tokens meet, so views are all that masking needs."""
    rows: slice
    cols: slice
    positions: torch.Tensor  # (cols,)
    cache: KVCache
