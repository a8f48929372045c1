"""V4 attention (§2.3): shared-KV MQA over a sliding window plus compressed entries (CSA or HCA).

Every layer: queries from a low-rank latent (wq_a -> RMSNorm -> wq_b), RMSNorm per query head, one
KV head (wkv -> RMSNorm) used as key *and* value, partial RoPE on the last 64 dims, a learnable sink
logit per head in the softmax denominator, and a grouped output projection (heads -> g groups of
d_g -> d). Because K = V carries RoPE, the output is rotated by -position to keep only relative
position (§2.3.3).  Keys per query: the last `sliding_window` uncompressed tokens (itself included),
plus finished compressed entries: all of them (HCA) or the indexer's top-k (CSA).
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import AttnView, LayerCache
from .compressor import Compressor, Indexer, visible_entries
from .config import Config
from . import kernels
from .hooks import TrainStep
from .layers import Linear, RMSNorm, apply_rope, rms_normalize, rope_cos_sin


class Attention(nn.Module):
    def __init__(self, config: Config, layer_id: int):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.rope_dim = c.num_attention_heads, c.head_dim, c.qk_rope_head_dim
        self.window, self.ratio, self.eps = c.sliding_window, c.compress_ratios[layer_id], c.rms_norm_eps
        self.n_groups, self.layer_id = c.o_groups, layer_id
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = Linear(c.q_lora_rank, self.n_heads * self.head_dim)
        self.wkv = Linear(c.hidden_size, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.wo_a = Linear(self.n_heads * self.head_dim // c.o_groups, c.o_groups * c.o_lora_rank)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.hidden_size)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32))
        self.compressor = Compressor(c, self.head_dim, self.ratio) if self.ratio else None
        self.indexer = Indexer(c) if self.ratio == 4 else None

    def forward(self, x: torch.Tensor, views, inv_freq: torch.Tensor, step: TrainStep | None = None) -> torch.Tensor:
        """x: (B, S, d) -> (B, S, d); each view attends only within itself (see `AttnView`).
        `views` may instead be a `dsv4.paged.PagedBatch`: rows continue sequences of the paged FP8 pool."""
        if not isinstance(views, list):
            from . import paged
            return paged.attend(self, x, views, inv_freq)
        if step is not None and self.indexer is not None and step.indexer_loss:
            step.indexer_kl[self.layer_id] = []  # (re)filled by `attend`, once per view
        if len(views) == 1 and views[0].rows == slice(None) and views[0].cols == slice(None):
            v = views[0]
            return self.attend(x, v.positions, v.cache.layer(self.layer_id), inv_freq, step)
        out = torch.empty_like(x)
        for v in views:
            out[v.rows, v.cols] = self.attend(x[v.rows, v.cols], v.positions, v.cache.layer(self.layer_id), inv_freq,
                                              step)
        return out

    def project(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
        """x (B, S, d) at positions (S,) or (B, S) -> q (B, S, H, D), kv (B, S, D) (both RoPE'd), the query
        latent (B, S, q_lora_rank) the indexer shares, and the RoPE cos / sin for `output`."""
        cos, sin = rope_cos_sin(positions, inv_freq)  # (..., S, rd/2)
        q_latent = self.q_norm(self.wq_a(x))
        q = rms_normalize(self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = apply_rope(q, cos[..., None, :], sin[..., None, :])  # (B, S, H, D)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # (B, S, D)
        return q, kv, q_latent, cos, sin

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Core attention output (B, S, H, D) -> de-rotated, grouped output projection -> (B, S, d)."""
        B, S = o.shape[:2]
        o = apply_rope(o, cos[..., None, :], -sin[..., None, :])  # undo the values' absolute rotation
        # Grouped output projection: (B, S, H*D) -> g groups -> (B, S, g, d_g) -> (B, S, d).
        o = o.reshape(B, S, self.n_groups, -1)
        wo_a = self.wo_a.weight.view(self.n_groups, -1, o.shape[-1]).to(o.dtype)  # (g, d_g, H*D/g)
        o = torch.einsum("bsgi,goi->bsgo", o, wo_a)
        return self.wo_b(o.flatten(2))

    def attend(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache,
               inv_freq: torch.Tensor, step: TrainStep | None = None) -> torch.Tensor:
        """x: (B, S, d) at absolute `positions` (S,) following what `cache` holds -> (B, S, d)."""
        q, kv, q_latent, cos, sin = self.project(x, positions, inv_freq)
        window_kv = kv if cache.window is None else torch.cat((cache.window, kv), dim=1)
        cache.window = window_kv[:, max(0, window_kv.shape[1] - (self.window - 1)):]
        compressed = topk = None
        if self.compressor is not None:
            compressed = self.compressor(x, cache.compressor, inv_freq)
            if self.indexer is not None and step is None:
                topk = self.indexer(x, q_latent, positions, cache.indexer, inv_freq)
            elif self.indexer is not None:
                topk = self.train_indexer(x, q, q_latent, compressed, positions, cache, inv_freq, step)

        o = kernels.sparse_attention(q, window_kv, positions, compressed, topk, self.ratio, self.attn_sink,
                                     self.head_dim ** -0.5, self.window, self.rope_dim)
        return self.output(o, cos, sin)

    def train_indexer(self, x: torch.Tensor, q: torch.Tensor, q_latent: torch.Tensor, compressed: torch.Tensor,
                      positions: torch.Tensor, cache: LayerCache, inv_freq: torch.Tensor,
                      step: TrainStep) -> torch.Tensor | None:
        """The indexer under training options. Returns its top-k (sparse) or None (dense: every finished
        entry, as HCA). With `step.indexer_loss`, records KL(p || softmax(indexer scores)) summed over queries,
        where p is the dense attention distribution over the finished compressed entries, summed over heads
        and renormalised (DeepSeek-V3.2 §2.1 warm-up; V4 §3), a detached target."""
        if step.detach_indexer:
            x, q_latent = x.detach(), q_latent.detach()
        if not step.indexer_loss:
            topk = self.indexer(x, q_latent, positions, cache.indexer, inv_freq, fp4=step.fp4_indexer)
            return None if step.attention == "dense" else topk

        def dense_target(s: int, e: int) -> torch.Tensor:  # (B, e - s, N), computed per query chunk
            with torch.no_grad():
                logits = torch.einsum("bshd,bnd->bshn", q[:, s:e], compressed).float() * self.head_dim ** -0.5
                hidden = torch.arange(compressed.shape[1], device=x.device) >= visible_entries(
                    positions[s:e], self.ratio)[:, None]
                p = logits.masked_fill(hidden[None, :, None], float("-inf")).softmax(-1).nan_to_num(0.0).sum(2)
                return p / p.sum(-1, keepdim=True).clamp(min=1e-30)

        topk, kl, count = self.indexer(x, q_latent, positions, cache.indexer, inv_freq, fp4=step.fp4_indexer,
                                       kl_target=dense_target)
        if count:
            step.indexer_kl[self.layer_id].append((kl, count))
        return None if step.attention == "dense" else topk


def sparse_attention(q: torch.Tensor, window_kv: torch.Tensor, positions: torch.Tensor,
                     compressed: torch.Tensor | None, topk: torch.Tensor | None, ratio: int, sink: torch.Tensor,
                     scale: float, window: int, logit_budget: int = 1 << 25) -> torch.Tensor:
    """Plain-PyTorch reference of V4 core attention; the kernels are tested against it.

    q: (B, S, H, D) at `positions` (S,), the last S rows of window_kv (B, L, D) (L >= S: the earlier rows
    are cached tokens right before them). compressed: (B, N, D) entries or None; topk: (B, S, k) entry
    indices with -1 = none (CSA) or None (HCA: every finished entry). Queries are processed in chunks so
    no (S, L) or (S, N) score matrix larger than `logit_budget` elements is ever built.
    Softmax over [window logits, compressed logits, sink] in fp32; the sink adds only to the denominator.
    """
    B, S, H, D = q.shape
    L = window_kv.shape[1]
    key_pos = positions[-1] - (L - 1) + torch.arange(L, device=q.device)  # positions of window rows
    N = 0 if compressed is None else compressed.shape[1]
    # A chunk of c queries scores c + window - 1 window rows and k (CSA) or N (HCA) entries per head.
    extra = window + (topk.shape[-1] if topk is not None else N)
    chunk = S
    while chunk > 1 and B * H * chunk * (chunk + extra) > logit_budget:
        chunk = (chunk + 1) // 2
    out = torch.empty_like(q)
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        qp = positions[s:e]
        # Window rows reachable from this chunk: positions in (qp[0] - window, qp[-1]].
        lo = max(0, L - S + s - (window - 1))
        hi = L - S + e
        k = window_kv[:, lo:hi]
        logits = torch.einsum("bshd,bld->bshl", q[:, s:e], k).float() * scale
        dist = qp[:, None] - key_pos[None, lo:hi]  # (c, l)
        logits = logits.masked_fill(((dist < 0) | (dist >= window))[None, :, None, :], float("-inf"))
        parts, values = [logits], [k]
        if N and topk is None:  # HCA: every finished entry
            c_logits = torch.einsum("bshd,bnd->bshn", q[:, s:e], compressed).float() * scale
            hidden = torch.arange(N, device=q.device)[None, :] >= visible_entries(qp, ratio)[:, None]
            parts.append(c_logits.masked_fill(hidden[None, :, None, :], float("-inf")))
        elif N and topk.shape[-1]:  # CSA: the indexer's choice; gathered per query, O(S * k) memory
            idx = topk[:, s:e]
            picked = torch.gather(compressed[:, None].expand(-1, e - s, -1, -1), 2,
                                  idx.clamp(min=0)[..., None].expand(-1, -1, -1, D))  # (B, c, k, D)
            c_logits = torch.einsum("bshd,bskd->bshk", q[:, s:e], picked).float() * scale
            parts.append(c_logits.masked_fill((idx < 0)[:, :, None, :], float("-inf")))
        parts.append(sink.float().view(1, 1, H, 1).expand(B, e - s, H, 1))
        probs = torch.cat(parts, dim=-1).softmax(dim=-1).to(q.dtype)
        o = torch.einsum("bshl,bld->bshd", probs[..., :hi - lo], k)
        if len(parts) == 3:
            p_c = probs[..., hi - lo:-1]
            if topk is None:
                o = o + torch.einsum("bshn,bnd->bshd", p_c, compressed)
            else:
                o = o + torch.einsum("bshk,bskd->bshd", p_c, picked)
        out[:, s:e] = o
    return out
