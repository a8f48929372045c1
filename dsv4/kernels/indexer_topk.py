"""Lightning-indexer scores and top-k (§2.3.1 eqs. 13-17) without a [queries x heads x entries] tensor.

score(t, s) = c^-1/2 * sum_h w_{t,h} ReLU(q_{t,h} . K_s) for finished entries s < (p_t + 1) / m, top-k per
query; equal scores resolve to the lowest index (the reference's stable sort, so cached decode equals
the full forward). The kernel computes a (queries x entries) tile per program with the query heads
stacked as rows of one matmul (BLOCK_Q * heads rows share each key tile), sums the heads in registers
and writes one int64 *sort key* per (query, entry): the score's order-preserving bit pattern in the
high word and (N - 1 - s) in the low word. Keys are unique, so a plain `torch.topk` on them reproduces
the stable sort exactly, ties included. Queries are processed in chunks so at most `key_budget` keys
(8 bytes each) exist at a time: O(chunk x N) memory, never O(S x N) for long prompts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def reference(q: torch.Tensor, head_w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, ratio: int,
              k: int, score_budget: int = 1 << 25) -> torch.Tensor:
    """The scoring of `dsv4.compressor.Indexer.forward`: q (B, S, Hi, Di), head_w (B, S, Hi) fp32 (already
    x Hi^-1/2), keys (B, N, Di), positions (S,) -> (B, S, min(k, N)) indices, -1 where none is left."""
    B, S, Hi, Di = q.shape
    N = keys.shape[1]
    visible = torch.div(positions + 1, ratio, rounding_mode="floor")
    k = min(k, N)
    chunk = max(1, score_budget // max(1, B * Hi * N))
    out = []
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        scores = torch.einsum("bshd,bnd->bshn", q[:, s:e].float(), keys.float()).relu_()
        scores = torch.einsum("bshn,bsh->bsn", scores, head_w[:, s:e]) * Di ** -0.5
        future = torch.arange(N, device=q.device) >= visible[s:e, None]
        scores = scores.masked_fill(future, float("-inf"))
        idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        out.append(torch.where(idx >= visible[s:e, None], -1, idx))
    return torch.cat(out, dim=1)


@triton.jit
def _score_keys_kernel(Q, sqb, sqs, sqh, W, swb, sws, K, skb, skn, POS, OUT, sob, sos,
                       S, N, HI, ratio, score_scale,
                       DI: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_DI: tl.constexpr, PREC: tl.constexpr):
    pq = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2)
    qi = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = qi < S
    pos = tl.load(POS + qi, mask=qm, other=0)
    vis = (pos + 1) // ratio
    j = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.arange(0, BLOCK_HI)
    d = tl.arange(0, BLOCK_DI)
    hm = h < HI
    score = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    # Programs whose whole tile lies in the future of every query skip the matmul (half the work causally).
    if pn * BLOCK_N < tl.max(tl.where(qm, vis, 0)):
        qp = Q + b * sqb + qi[:, None, None] * sqs + h[None, :, None] * sqh + d[None, None, :]
        q = tl.load(qp, mask=qm[:, None, None] & hm[None, :, None] & (d < DI)[None, None, :], other=0.0)
        q = tl.reshape(q, (BLOCK_Q * BLOCK_HI, BLOCK_DI))
        k = tl.load(K + b * skb + j[:, None] * skn + d[None, :], mask=(j < N)[:, None] & (d < DI)[None, :],
                    other=0.0).to(q.dtype)
        s = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)  # (BQ*BH, BN): ReLU(q_h . K_s)
        s = tl.reshape(s, (BLOCK_Q, BLOCK_HI, BLOCK_N))
        w = tl.load(W + b * swb + qi[:, None] * sws + h[None, :], mask=qm[:, None] & hm[None, :], other=0.0)
        score = tl.sum(s * w[:, :, None], axis=1) * score_scale
    score = tl.where(j[None, :] < vis[:, None], score, float("-inf"))
    # Order-preserving int32 image of the float (flip the magnitude bits of negatives), then the index
    # tie-break in the low word: larger key = higher score, then lower index.
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (N - 1 - j).to(tl.int64)
    tl.store(OUT + b * sob + qi[:, None] * sos + j[None, :], key, mask=qm[:, None] & (j < N)[None, :])


def indexer_topk(q: torch.Tensor, head_w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, ratio: int,
                 k: int, key_budget: int = 1 << 27, block_q: int | None = None, block_n: int = 64) -> torch.Tensor:
    """Same contract as `reference`; head_w fp32 (B, S, Hi); positions (S,)."""
    B, S, Hi, Di = q.shape
    N = keys.shape[1]
    k = min(k, N)
    if N == 0:
        return torch.full((B, S, 0), -1, dtype=torch.long, device=q.device)
    BLOCK_HI = max(triton.next_power_of_2(Hi), 1)
    BLOCK_Q = block_q or max(1, 128 // BLOCK_HI)
    BLOCK_Q = max(BLOCK_Q, triton.cdiv(16, BLOCK_HI))  # dot needs >= 16 rows
    BLOCK_DI = max(16, triton.next_power_of_2(Di))
    pos = positions.to(device=q.device, dtype=torch.int32).contiguous()
    head_w = head_w.float().contiguous()
    keys = keys.contiguous()
    visible = torch.div(pos + 1, ratio, rounding_mode="floor").long()
    chunk = max(1, min(S, key_budget // max(1, B * N)))
    out = torch.empty(B, S, k, dtype=torch.long, device=q.device)
    buf = torch.empty(B, chunk, N, dtype=torch.int64, device=q.device)
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        c = e - s
        qc, wc = q[:, s:e], head_w[:, s:e]
        grid = (triton.cdiv(c, BLOCK_Q), triton.cdiv(N, block_n), B)
        _score_keys_kernel[grid](qc, qc.stride(0), qc.stride(1), qc.stride(2), wc, wc.stride(0), wc.stride(1),
                                 keys, keys.stride(0), keys.stride(1), pos[s:e], buf, buf.stride(0), buf.stride(1),
                                 c, N, Hi, ratio, Di ** -0.5, DI=Di, BLOCK_Q=BLOCK_Q, BLOCK_HI=BLOCK_HI,
                                 BLOCK_N=block_n, BLOCK_DI=BLOCK_DI,
                                 PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
        top = buf[:, :c].topk(k, dim=-1, sorted=True).values
        idx = (N - 1) - (top & 0xFFFFFFFF)
        out[:, s:e] = torch.where(idx >= visible[s:e, None], -1, idx)
    return out
