"""The model on the compact paged cache (§2.3.4): many sequences of different lengths in one FP8 pool.

`PagedBatch(pool, slots)` is passed to `Transformer.forward` as its cache: row b of the batch continues the
sequence in `slots[b]` of a `dsv4.kernels.paged_cache.PagedKVCache`. Each attention layer then
  - writes the new tokens' KV into the slot's window ring and the compressors' finished entries (and the
    indexer's keys) into the pool, as FP8 records; the unfinished blocks stay in the pool's fp32 state rows;
  - attends over what the pool holds. Decode (one token per row, ragged positions) runs the split-K decode
    kernel and the fused indexer top-k directly on the pool's blocks; a prefill chunk (several tokens of
    one row) reads the slot's entries back (dequantised) and runs the dense-source kernels.
The decode step is graph-safe (`dsv4.engine.graphs` captures it as a CUDA graph): what it reads that changes
between steps is in device tensors (`PagedBatch.slot_ids`, `pos`, the pool's block tables, allocated by
`PagedBatch.reserve_decode` before the step), every row runs the same ops (no host list, no host sync, no
branch on the rows' positions), and the only host number, `max_len`, just sizes the kernels' grids.
What attention sees is exactly the reference model's view under `kernels.simulate_fp8_kv()` (every KV
entry and index key rounded through its stored format), so the paged model is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .cache import CompressorState
from .compressor import Compressor, visible_entries
from .kernels import fp8_kv
from .kernels.paged_cache import PagedKVCache


@dataclass
class PagedBatch:
    """Rows of a forward pass -> sequence slots of a paged pool (see the module docstring)."""
    pool: PagedKVCache
    slots: list[int]
    pos: torch.Tensor | None = None  # (B, S) positions of the pass under way (`begin`)
    # Decode (S = 1): the slots as a (B,) device tensor, and a bound on every row's position + 1 that sizes
    # the kernels' grids (the exact maximum here; a captured graph's capacity bucket in `engine.graphs`).
    slot_ids: torch.Tensor | None = None
    max_len: int = 0

    def starts(self) -> list[int]:
        return [self.pool.lengths[s] for s in self.slots]

    def begin(self, ids: torch.Tensor, max_positions: int) -> None:
        """Check the batch against the slots; set `pos`, the (B, S) absolute positions of the new tokens
        (decode: also `slot_ids`, `max_len`, and the blocks the step writes into)."""
        self.check(ids, max_positions)
        starts, S = self.starts(), ids.shape[1]
        self.pos = torch.tensor(starts, device=ids.device)[:, None] + torch.arange(S, device=ids.device)
        if S == 1:
            self.slot_ids = torch.tensor(self.slots, device=ids.device)
            self.max_len = max(starts) + 1
            self.reserve_decode()

    def check(self, ids: torch.Tensor, max_positions: int) -> None:
        B, S = ids.shape
        if B != len(self.slots):
            raise ValueError(f"{len(self.slots)} cache slots for a batch of {B} rows")
        for s in self.slots:
            if not self.pool.active[s]:
                raise ValueError(f"cache slot {s} is not allocated (PagedKVCache.allocate())")
        if len(set(self.slots)) != B:
            raise ValueError(f"a slot appears twice in {self.slots}")
        starts = self.starts()
        if max(starts) + S > max_positions:
            raise ValueError(f"sequence of {max(starts) + S} tokens exceeds max_position_embeddings={max_positions}")

    def reserve_decode(self) -> None:
        """Before a decode step: the blocks of the entries it finishes (CacheFull here, before any write)."""
        for s in self.slots:
            self.pool.reserve(s, self.pool.lengths[s] + 1)

    def advance(self) -> None:
        """After the pass: every slot has consumed its new tokens."""
        for s in self.slots:
            self.pool.lengths[s] += self.pos.shape[1]
        self.pos = None


def attend(attn, x: torch.Tensor, batch: PagedBatch, inv_freq: torch.Tensor) -> torch.Tensor:
    """`Attention.attend` on the paged cache: x (B, S, d) at `batch.pos` (B, S) -> (B, S, d)."""
    positions = batch.pos
    q, kv, q_latent, cos, sin = attn.project(x, positions, inv_freq)
    if x.shape[1] == 1:
        o = _decode(attn, x, q, kv, q_latent, batch, positions, inv_freq)
    else:
        o = torch.cat([_prefill_row(attn, x[b:b + 1], q[b:b + 1], kv[b:b + 1], q_latent[b:b + 1], batch.pool,
                                    batch.slots[b], positions[b], inv_freq) for b in range(x.shape[0])])
    return attn.output(o, cos, sin)


# ---------------------------------------------------------------------------------------------- prefill
def _prefill_row(attn, x, q, kv, q_latent, pool: PagedKVCache, slot: int, pos: torch.Tensor,
                 inv_freq: torch.Tensor) -> torch.Tensor:
    """One sequence's chunk of S tokens: x (1, S, d) at `pos` (S,) -> attention output (1, S, H, D)."""
    layer, W, rd = attn.layer_id, attn.window, attn.rope_dim
    p0, S = pool.lengths[slot], x.shape[1]
    prev = pool.read_window(layer, slot, p0, min(p0, W - 1), dtype=kv.dtype)[None]
    window_kv = torch.cat((prev, fp8_kv.fake_quantize(kv, rd)), dim=1)
    pool.write_window(layer, slot, kv[0], p0)
    compressed = topk = None
    if attn.compressor is not None:
        n = (p0 + S) // attn.ratio  # finished entries after this chunk
        new, first = _compress_prefill(attn.compressor, x, pool, layer, slot, p0, inv_freq, indexer=False)
        if new.shape[1]:
            pool.write_entries(layer, slot, new[0], first)
        compressed = pool.gather_entries(layer, slot, kv.dtype, n)[None]
        if attn.indexer is not None:
            new, first = _compress_prefill(attn.indexer.compressor, x, pool, layer, slot, p0, inv_freq, indexer=True)
            if new.shape[1]:
                pool.write_index_keys(layer, slot, new[0], first)
            if n == 0:
                topk = torch.full((1, S, 0), -1, dtype=torch.long, device=x.device)
            else:
                keys = pool.gather_index_keys(layer, slot, n).to(kv.dtype)[None]
                iq, head_w = attn.indexer.queries(x, q_latent, pos, inv_freq)
                topk = kernels.index_topk(iq, head_w, keys, pos, attn.ratio, attn.indexer.topk)
    return kernels.sparse_attention(q, window_kv, pos, compressed, topk, attn.ratio, attn.attn_sink,
                                    attn.head_dim ** -0.5, W, rd)


def _compress_prefill(comp: Compressor, x: torch.Tensor, pool: PagedKVCache, layer: int, slot: int, p0: int,
                      inv_freq: torch.Tensor, indexer: bool) -> tuple[torch.Tensor, int]:
    """Run `comp` over a chunk of one sequence from the state the pool keeps -> (new entries (1, n, D), index
    of the first). The compressor itself is the reference's: it sees the same pending rows and overlap."""
    kv_state, gate_state = pool.compressor_state(layer, indexer)
    r, D, dtype = comp.ratio, comp.head_dim, x.dtype
    pending = p0 % r
    state = CompressorState(pending_kv=kv_state[slot, None, :pending].to(dtype),
                            pending_gate=gate_state[slot, None, :pending].to(dtype), base=p0 // r)
    if comp.overlap and p0 // r > 0:
        state.overlap_kv = kv_state[slot, None, r:2 * r, :D].to(dtype)
        state.overlap_gate = gate_state[slot, None, r:2 * r, :D].clone()  # fp32, slot bias included
    entries = comp(x, state, inv_freq)
    left = state.pending_kv.shape[1]
    kv_state[slot, :left] = state.pending_kv[0].float()
    gate_state[slot, :left] = state.pending_gate[0].float()
    if comp.overlap and state.overlap_kv is not None:
        kv_state[slot, r:2 * r, :D] = state.overlap_kv[0].float()
        gate_state[slot, r:2 * r, :D] = state.overlap_gate[0].float()
    return entries, p0 // r


# ---------------------------------------------------------------------------------------------- decode
def _compress_decode(comp: Compressor, x: torch.Tensor, pool: PagedKVCache, layer: int, batch: PagedBatch,
                     inv_freq: torch.Tensor, indexer: bool) -> None:
    """One new token per row (rows at different positions), every row alike (graph-safe): each row stores its
    token in its slot's unfinished block (row p % r) and pools that block into the entry it would make; only
    the rows whose token completes the block (p + 1 = 0 mod r) keep it: they write the entry into the pool
    and update the overlap rows, the others send it to the pool's scratch row and keep theirs. Row r - 1 of
    the block thus ends up holding the finishing token, which nothing reads (pending tokens are rows < r - 1)."""
    kv_state, gate_state = pool.compressor_state(layer, indexer)
    r, D, dtype = comp.ratio, comp.head_dim, x.dtype
    slots, p = batch.slot_ids, batch.pos[:, 0]  # (B,), (B,)
    kv_state[slots, p % r] = comp.wkv(x[:, 0]).float()
    gate_state[slots, p % r] = comp.wgate(x[:, 0]).float()
    finished = (p + 1) % r == 0
    first = (p + 1) // r - 1  # index of the entry a finishing row emits
    # The whole block is in the state (bf16 -> fp32 -> bf16 is exact): the compressor gets no new tokens.
    state = CompressorState(pending_kv=kv_state[slots, :r].to(dtype), pending_gate=gate_state[slots, :r].to(dtype),
                            base=first[:, None])
    if comp.overlap:
        none = (first <= 0)[:, None, None]  # no block before entry 0 (first < 0: a row that finishes nothing)
        old_kv, old_gate = kv_state[slots, r:2 * r, :D], gate_state[slots, r:2 * r, :D]
        state.overlap_kv = old_kv.masked_fill(none, 0.0).to(dtype)
        state.overlap_gate = old_gate.masked_fill(none, float("-inf"))
    entries = comp(x[:, :0], state, inv_freq)[:, 0]  # (B, D)
    if comp.overlap:
        keep = ~finished[:, None, None]
        kv_state[slots, r:2 * r, :D] = torch.where(keep, old_kv, state.overlap_kv.float())
        gate_state[slots, r:2 * r, :D] = torch.where(keep, old_gate, state.overlap_gate.float())
    pool.write_finished(layer, slots, first, finished, entries, index_keys=indexer)


def _decode(attn, x, q, kv, q_latent, batch: PagedBatch, positions: torch.Tensor,
            inv_freq: torch.Tensor) -> torch.Tensor:
    """B sequences, one new token each, at their own positions (B, 1) -> (B, 1, H, D)."""
    pool, layer, W, B, dev = batch.pool, attn.layer_id, attn.window, x.shape[0], x.device
    pool.write_window_tokens(layer, batch.slot_ids, kv[:, 0], positions[:, 0])
    max_comp = 0  # host bound on every row's finished entries: sizes the grids, the kernels mask by n_comp
    if attn.compressor is not None:
        _compress_decode(attn.compressor, x, pool, layer, batch, inv_freq, indexer=False)
        max_comp = batch.max_len // attn.ratio
        if attn.indexer is not None:
            _compress_decode(attn.indexer.compressor, x, pool, layer, batch, inv_freq, indexer=True)
    scale, rd, ratio, sink = attn.head_dim ** -0.5, attn.rope_dim, max(attn.ratio, 1), attn.attn_sink
    if kernels.use_triton(q) and (attn.indexer is None or pool.index_keys == "fp8"):
        from .kernels.decode_attn import attend_decode
        from .kernels.indexer_decode import indexer_topk_decode
        pos32 = positions.to(torch.int32)
        zeros = torch.zeros(B, dtype=torch.int32, device=dev)
        comp = n_comp = topk = None
        if max_comp:
            n_comp = visible_entries(positions[:, 0], attn.ratio).to(torch.int32)
            comp = pool.entry_source(layer, batch.slot_ids)
            if attn.indexer is not None:
                iq, head_w = attn.indexer.queries(x, q_latent, positions, inv_freq)
                topk = indexer_topk_decode(iq.contiguous(), head_w, pool.key_source(layer, batch.slot_ids),
                                           pos32[:, 0], n_comp, 4, attn.indexer.topk, max_comp)[:, None].to(torch.int32)
        return attend_decode(q.contiguous(), pos32, sink, scale, W, pool.window_source(layer, batch.slot_ids), zeros,
                             zeros, win_ring=W, comp=comp, n_comp=n_comp, max_comp=max_comp, topk=topk, ratio=ratio,
                             rope_dim=rd)
    # Reference (host lists, not graph-safe): each row's window and entries read back (dequantised), the
    # model's attention on them.
    out = []
    for b, (slot, p) in enumerate(zip(batch.slots, batch.starts())):
        n_vis = (p + 1) // attn.ratio if attn.compressor is not None else 0
        window_kv = pool.read_window(layer, slot, p + 1, min(p + 1, W), dtype=kv.dtype)[None]
        compressed = topk = None
        if attn.compressor is not None:
            compressed = pool.gather_entries(layer, slot, kv.dtype, n_vis)[None]
            if attn.indexer is not None:
                if n_vis == 0:
                    topk = torch.full((1, 1, 0), -1, dtype=torch.long, device=dev)
                else:
                    keys = pool.gather_index_keys(layer, slot, n_vis).to(kv.dtype)[None]
                    iq, head_w = attn.indexer.queries(x[b:b + 1], q_latent[b:b + 1], positions[b], inv_freq)
                    topk = kernels.index_topk(iq, head_w, keys, positions[b], attn.ratio, attn.indexer.topk)
        out.append(kernels.sparse_attention(q[b:b + 1], window_kv, positions[b], compressed, topk, attn.ratio, sink,
                                            scale, W, rd))
    return torch.cat(out)
