"""KV compression (CSA §2.3.1 eqs. 9-12, HCA §2.3.2 eqs. 20-23) and the lightning indexer (eqs. 13-17).

A compressor turns every `ratio` tokens into one KV entry: per token a value projection C = H W^KV and
gate logits Z = H W^Z (+ a learned positional bias per slot), then per channel a softmax over the slots
of the block weights the values: entry = RMSNorm(sum_j softmax(Z + B)_j * C_j), RoPE'd at the block's
first position.  CSA (ratio 4) uses two series a/b of width `2 * head_dim`: entry i pools the series-b
half of block i with the series-a half of block i-1 (overlapping windows, stride 4, width 8); HCA
(ratio 128) uses one series and disjoint blocks.  A query at position t only ever sees entries whose
block is finished: entry w is visible iff (w + 1) * ratio <= t + 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .cache import CompressorState
from .config import Config
from .hooks import fake_quant_fp4
from .kernels.fp8_kv import fake_quantize_index_keys
from .layers import Linear, RMSNorm, apply_rope, rope_cos_sin


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of finished compressed entries a query at each position may attend to."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")


class Compressor(nn.Module):
    def __init__(self, config: Config, head_dim: int, ratio: int):
        super().__init__()
        self.head_dim, self.ratio = head_dim, ratio
        self.overlap = ratio == 4  # CSA's two-series overlapping windows
        width = 2 * head_dim if self.overlap else head_dim
        self.wkv = Linear(config.hidden_size, width)
        self.wgate = Linear(config.hidden_size, width)
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))  # positional bias per slot
        self.norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: CompressorState, inv_freq: torch.Tensor) -> torch.Tensor:
        """Consume new tokens x (B, S, d); append finished entries to `state`; return all entries (B, N, D)."""
        kv, gate = self.wkv(x), self.wgate(x)
        if state.pending_kv is not None:
            kv = torch.cat((state.pending_kv, kv), dim=1)
            gate = torch.cat((state.pending_gate, gate), dim=1)
        first_block = state.num_entries
        n_blocks = kv.shape[1] // self.ratio
        done = n_blocks * self.ratio
        state.pending_kv, state.pending_gate = kv[:, done:], gate[:, done:]
        if n_blocks == 0:
            if state.entries is None:
                state.entries = kv.new_zeros(kv.shape[0], 0, self.head_dim)
            return state.entries

        D, m = self.head_dim, self.ratio
        kv = kv[:, :done].unflatten(1, (n_blocks, m))  # (B, n, m, width)
        gate = gate[:, :done].unflatten(1, (n_blocks, m))
        prev_kv, prev_gate = state.overlap_kv, state.overlap_gate
        if self.overlap:  # the next call's block 0 pools this call's last series a (its gate + slot bias)
            state.overlap_kv, state.overlap_gate = kv[:, -1, :, :D], gate[:, -1, :, :D] + self.ape[:, :D]
        # Slot softmax per channel, weighted sum, RMSNorm, RoPE at w * m (one launch on the Triton path).
        entries = kernels.compress_blocks(kv, gate, self.ape, prev_kv, prev_gate, self.norm.weight, self.norm.eps,
                                          inv_freq, first_block)  # (B, n, D)
        state.entries = entries if state.entries is None else torch.cat((state.entries, entries), dim=1)
        return state.entries


class Indexer(nn.Module):
    """Lightning indexer: score(t, s) = sum_h w_{t,h} ReLU(q_{t,h} . K_s), top-k finished entries per query.

    Queries come from the attention's query latent (low rank: `wq_b` on top of it), keys from its own
    small compressor over the same blocks as the CSA compressor, head weights w from the hidden state.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.topk = config.index_topk
        self.ratio = 4
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(config.hidden_size, self.n_heads)
        self.compressor = Compressor(config, self.head_dim, self.ratio)

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor,
                inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> RoPE'd queries (B, S, Hi, Di) and head weights (B, S, Hi) fp32, already x Hi^-1/2.
        positions: (S,) shared by the batch, or (B, S) (a decode batch of sequences at different positions)."""
        q = self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))  # (B, S, Hi, Di)
        cos, sin = rope_cos_sin(positions, inv_freq)
        q = apply_rope(q, cos[..., None, :], sin[..., None, :])
        return q, self.weights_proj(x).float() * self.n_heads ** -0.5

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, state: CompressorState,
                inv_freq: torch.Tensor, score_budget: int = 1 << 25, fp4: bool = False,
                kl_target: Callable[[int, int], torch.Tensor] | None = None):
        """-> indices (B, S, k') of the chosen entries, k' = min(topk, entries), -1 where none is left.

        Training options: `fp4` fake-quantises queries and keys to FP4 (the released indexer's QK path);
        `kl_target(s, e)` -> (B, e - s, N), the dense attention distribution over the entries for queries
        s..e-1 (no gradient): then also returns the indexer's distillation loss, the sum over queries of
        KL(target || softmax(indexer scores)) with gradients, and how many (row, query) pairs it covers
        (queries that see at least one entry)."""
        B, S, _ = x.shape
        keys = self.compressor(x, state, inv_freq)  # (B, N, Di)
        N = keys.shape[1]
        if N == 0:
            none = torch.full((B, S, 0), -1, dtype=torch.long, device=x.device)
            return none if kl_target is None else (none, x.new_zeros(()), 0)
        if kernels.kv_fp8():  # see the keys as the compact cache stores them (`fp8_kv.fake_quantize_index_keys`)
            keys = fake_quantize_index_keys(keys)
        q, head_w = self.queries(x, q_latent, positions, inv_freq)
        if fp4:
            q, keys = fake_quant_fp4(q), fake_quant_fp4(keys)
        visible = visible_entries(positions, self.ratio)  # (S,)
        # Scores are (B, chunk, Hi, N) before the head sum: chunk the queries to bound memory.
        chunk = max(1, score_budget // max(1, B * self.n_heads * N))
        if kernels.use_triton(q):  # fused scoring + top-k (same tie rule)
            indices = kernels.index_topk(q.detach(), head_w.detach(), keys.detach(), positions, self.ratio, self.topk)
        else:
            with torch.no_grad():
                indices = torch.cat([self._select(q[:, s:s + chunk], head_w[:, s:s + chunk], keys,
                                                  visible[s:s + chunk]) for s in range(0, S, chunk)], dim=1)
        if kl_target is None:
            return indices
        kl, count = x.new_zeros((), dtype=torch.float32), 0
        for s in range(0, S, chunk):
            e = min(S, s + chunk)
            hidden = torch.arange(N, device=x.device) >= visible[s:e, None]  # (c, N)
            has = ~hidden.all(-1)
            if not has.any():
                continue
            # Checkpointed per chunk: the (B, c, Hi, N) scores are rebuilt in the backward instead of being
            # kept, so the loss costs O(chunk x Hi x N) memory, not O(S x Hi x N) (16K-token training).
            kl = kl + checkpoint(self._kl_chunk, q[:, s:e][:, has], head_w[:, s:e][:, has], keys,
                                 kl_target(s, e)[:, has], hidden[has], use_reentrant=False)
            count += int(has.sum()) * B
        return indices, kl, count

    def _scores(self, q: torch.Tensor, head_w: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """score(t, s) = Di^-1/2 sum_h w_{t,h} ReLU(q_{t,h} . K_s) (eqs. 13-17), -inf where `hidden` (c, N)."""
        scores = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu()
        scores = torch.einsum("bshn,bsh->bsn", scores, head_w) * self.head_dim ** -0.5
        return scores.masked_fill(hidden, float("-inf"))

    def _select(self, q, head_w, keys, visible) -> torch.Tensor:
        N = keys.shape[1]
        scores = self._scores(q, head_w, keys, torch.arange(N, device=q.device) >= visible[:, None])
        # Stable sort, not topk: equal scores (common, ReLU zeros) resolve to the lowest index, so the choice
        # does not depend on how many future entries exist, and cached decode == full forward.
        idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(self.topk, N)]
        return torch.where(idx >= visible[:, None], -1, idx)

    def _kl_chunk(self, q, head_w, keys, target, hidden) -> torch.Tensor:
        log_q = self._scores(q, head_w, keys, hidden).log_softmax(-1).masked_fill(hidden, 0.0)
        return (target * (target.clamp(min=1e-30).log() - log_q)).sum()
