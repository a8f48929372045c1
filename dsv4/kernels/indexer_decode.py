"""Lightning-indexer decode (§2.3.1 eqs. 13-17): one query per sequence scored against its N compressed keys
and fused with an exact top-k, without 8-byte sort keys for all N or a torch.topk.

score(s) = c^-1/2 * sum_h w_h ReLU(q_h . K_s) over the finished entries s < min(len, (p + 1) // m); top-k
best first, equal scores resolved to the lowest index (the reference's stable sort). Three launches:

  `_score_kernel`    grid (key tiles, B). Heads are the M of one matmul per BLOCK_N keys; FP8 keys are
                     converted in the kernel and their per-key fp32 scale applied after the head sum
                     (ReLU(s x) = s ReLU(x) for s > 0). Writes each score as its order-preserving int32
                     image (4 B a key) and adds the tile's histogram of the top 12 bits (sign, exponent, 3
                     mantissa bits) to the row's: one atomic per non-empty bin and tile, not per key.
  `_collect_kernel`  same grid. Every program finds from the histogram the bin b1 holding the k-th best
                     score, appends the keys of bins >= b1 (the winners above b1 plus all of b1) to a
                     candidate list as unique 64-bit (score, 2^31 - 1 - index) keys, and histograms bin
                     b1's next 12 bits.
  `_select_kernel`   grid (B,). From both histograms: the 24-bit prefix P of the k-th best score. Keeps the
                     candidates >= P (k plus what shares P's 24 bits), sorts them in registers, writes the
                     first k indices; -1 past the visible entries. If the candidates overflow (thousands of
                     scores equal in 24 bits, e.g. ReLU zeros) it finds the exact k-th key by bisection over
                     all scores and takes its ties in index order: slow, still exact. It leaves the
                     histograms and counter zeroed, so a kept `workspace` needs no memset per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .sparse_attn import _num_sms, _row_of

NBINS = 4096  # 12 bits per histogram level
INT64_MIN = tl.constexpr(-(1 << 63))


@dataclass
class KeySource:
    """Indexer keys as the kernel reads them. main: (R, Di) bf16 / fp32, or float8_e4m3fn with `scale` (R,)
    fp32 per-key multipliers (the paged cache's 132-byte record). Row of entry i of sequence b:
    table[b, i // block_size] * block_size + i % block_size."""
    main: torch.Tensor
    table: torch.Tensor  # (B, T) int32
    block_size: int
    scale: torch.Tensor | None = None


def dense_keys(keys: torch.Tensor) -> KeySource:
    """(B, N, Di) -> a source with one block of N rows per sequence."""
    B, N, Di = keys.shape
    table = torch.arange(B, device=keys.device, dtype=torch.int32)[:, None]
    return KeySource(main=keys.contiguous().view(B * N, Di), table=table, block_size=max(N, 1))


def reference(q: torch.Tensor, head_w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, ratio: int, k: int,
              lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row positions and lengths (ragged batch): q (B, Hi, Di), head_w (B, Hi) fp32 (already x Hi^-1/2),
    keys (B, N, Di), positions (B,), lengths (B,) (default N) -> (B, min(k, N)) indices, -1 where none."""
    B, Hi, Di = q.shape
    N = keys.shape[1]
    lengths = torch.full((B,), N) if lengths is None else lengths
    visible = torch.minimum(lengths.cpu(), torch.div(positions.cpu() + 1, ratio, rounding_mode="floor")).to(q.device)
    scores = torch.einsum("bhd,bnd->bhn", q.float(), keys.float()).relu_()
    scores = torch.einsum("bhn,bh->bn", scores, head_w.float()) * Di ** -0.5
    hidden = torch.arange(N, device=q.device)[None] >= visible[:, None]
    idx = scores.masked_fill(hidden, float("-inf")).sort(dim=-1, descending=True, stable=True).indices[:, :min(k, N)]
    return torch.where(idx >= visible[:, None], -1, idx)


@triton.jit
def _order_key(s):
    """fp32 -> int32 with the same order (negatives' magnitude bits flipped); -0.0 first becomes +0.0 (equal)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _visible(LEN, POS, b, ratio):
    return tl.minimum(tl.load(LEN + b), (tl.load(POS + b) + 1) // ratio)


@triton.jit
def _threshold_bin(hist, need, NBINS: tl.constexpr):
    """Highest bin whose suffix count reaches `need`, and the count strictly above it."""
    i = tl.arange(0, NBINS)
    suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys in bins >= i
    b = tl.sum((suffix >= need).to(tl.int32), 0) - 1
    return b, tl.sum(tl.where(i > b, hist, 0), 0)


@triton.jit(do_not_specialize=["ZERO"])
def _score_kernel(ZERO, Q, sqb, sqh, W, swb, K, sk0, KS, sks, T, st, BS, LEN, POS, ratio, SC, ssc, HIST,
                  score_scale, HI, DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_DI: tl.constexpr,
                  BLOCK_N: tl.constexpr, TILE: tl.constexpr, NBINS: tl.constexpr, KSCALE: tl.constexpr,
                  PREC: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    n = _visible(LEN, POS, b, ratio)
    h = tl.arange(0, BLOCK_HI)
    d = tl.arange(0, BLOCK_DI)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + d[None, :], mask=(h < HI)[:, None] & (d < DI)[None, :], other=0.0)
    w = tl.load(W + b * swb + h, mask=h < HI, other=0.0).to(tl.float32)
    hist = tl.zeros([NBINS], dtype=tl.int32)
    is_bin0 = tl.arange(0, NBINS) == 0
    start = tile * TILE
    end = tl.minimum(start + TILE, n)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = j < end
        rows = _row_of(T, st, BS, b, j, valid, ZERO)
        k = tl.load(K + rows[:, None] * sk0 + d[None, :], mask=valid[:, None] & (d < DI)[None, :], other=0.0)
        s = tl.maximum(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC), 0.0)  # (BHI, BN) ReLU(q_h . K_s)
        score = tl.sum(s * w[:, None], 0) * score_scale
        if KSCALE:
            score = score * tl.load(KS + rows * sks, mask=valid, other=1.0)
        key = _order_key(score)
        tl.store(SC + b * ssc + j, key, mask=valid)
        # invalid lanes land in bin 0 and are taken out again
        hist += tl.histogram(tl.where(valid, (key >> 20) + NBINS // 2, 0), NBINS)
        hist -= tl.where(is_bin0, BLOCK_N - tl.sum(valid.to(tl.int32), 0), 0)
    tl.atomic_add(HIST + b * (2 * NBINS) + tl.arange(0, NBINS), hist, mask=hist > 0)


@triton.jit
def _collect_kernel(SC, ssc, HIST, LEN, POS, ratio, CAND, CNT, K, CAP_G,
                    NBINS: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    n = _visible(LEN, POS, b, ratio)
    kk = tl.minimum(K, n)
    b1, _ = _threshold_bin(tl.load(HIST + b * (2 * NBINS) + tl.arange(0, NBINS)), kk, NBINS)
    hist2 = tl.zeros([NBINS], dtype=tl.int32)
    is_bin0 = tl.arange(0, NBINS) == 0
    start = tile * TILE
    end = tl.minimum(start + TILE, n)
    for j0 in range(start, end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        valid = j < end
        key = tl.load(SC + b * ssc + j, mask=valid, other=0)
        bin1 = (key >> 20) + NBINS // 2
        take = valid & (bin1 >= b1)
        in_b1 = valid & (bin1 == b1)
        hist2 += tl.histogram(tl.where(in_b1, (key >> 8) & (NBINS - 1), 0), NBINS)
        hist2 -= tl.where(is_bin0, BLOCK - tl.sum(in_b1.to(tl.int32), 0), 0)
        take_i = take.to(tl.int32)
        base = tl.atomic_add(CNT + b, tl.sum(take_i, 0))
        off = base + tl.cumsum(take_i, 0) - 1
        cand = (key.to(tl.int64) << 32) | (0x7FFFFFFF - j).to(tl.int64)
        tl.store(CAND + b * CAP_G + off, cand, mask=take & (off < CAP_G))
    tl.atomic_add(HIST + b * (2 * NBINS) + NBINS + tl.arange(0, NBINS), hist2, mask=hist2 > 0)


@triton.jit
def _select_kernel(SC, ssc, HIST, LEN, POS, ratio, CAND, CNT, SURV, OUT, sob, K, KOUT, CAP_G,
                   NBINS: tl.constexpr, SORT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    n = _visible(LEN, POS, b, ratio)
    kk = tl.minimum(K, n)
    i = tl.arange(0, NBINS)
    hp = HIST + b * (2 * NBINS)
    b1, above1 = _threshold_bin(tl.load(hp + i), kk, NBINS)
    hist2 = tl.load(hp + NBINS + i)
    b2, above2 = _threshold_bin(hist2, kk - above1, NBINS)
    prefix = ((b1 - NBINS // 2) << 12) | b2  # the k-th best key's top 24 bits, as key >> 8
    n_cand = tl.load(CNT + b)
    n_surv = above1 + above2 + tl.sum(tl.where(i == b2, hist2, 0), 0)
    sp = SURV + b * SORT
    total = kk
    if (n_cand <= CAP_G) & (n_surv <= SORT):
        # Fast path: candidates sharing or beating the k-th key's 24-bit prefix, compacted in order found.
        total = 0
        for c0 in range(0, n_cand, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            v = tl.load(CAND + b * CAP_G + c, mask=c < n_cand, other=0)
            keep = (c < n_cand) & (((v >> 32).to(tl.int32) >> 8) >= prefix)
            keep_i = keep.to(tl.int32)
            tl.store(sp + total + tl.cumsum(keep_i, 0) - 1, v, mask=keep)
            total += tl.sum(keep_i, 0)
    else:
        # Exact fallback: bisect for the k-th largest key over all n scores (count(key >= lo) >= kk holds),
        # then take everything above it and its ties in index order (lowest index first).
        lo = tl.full([], -(1 << 31), tl.int64)
        hi = tl.full([], (1 << 31) - 1, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            count = 0
            for j0 in range(0, n, BLOCK):
                j = j0 + tl.arange(0, BLOCK)
                key = tl.load(SC + b * ssc + j, mask=j < n, other=-(1 << 31)).to(tl.int64)
                count += tl.sum(((j < n) & (key >= mid)).to(tl.int32), 0)
            lo = tl.where(count >= kk, mid, lo)
            hi = tl.where(count >= kk, hi, mid - 1)
        above = 0
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            key = tl.load(SC + b * ssc + j, mask=j < n, other=-(1 << 31)).to(tl.int64)
            above += tl.sum(((j < n) & (key > lo)).to(tl.int32), 0)
        taken = 0
        ties = 0
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            key = tl.load(SC + b * ssc + j, mask=j < n, other=-(1 << 31)).to(tl.int64)
            tie = ((j < n) & (key == lo)).to(tl.int32)
            keep = (j < n) & ((key > lo) | ((tie > 0) & (ties + tl.cumsum(tie, 0) <= kk - above)))
            keep_i = keep.to(tl.int32)
            tl.store(sp + taken + tl.cumsum(keep_i, 0) - 1, (key << 32) | (0x7FFFFFFF - j).to(tl.int64), mask=keep)
            taken += tl.sum(keep_i, 0)
            ties += tl.sum(tie, 0)
    tl.debug_barrier()  # SURV written by every thread above, read back below
    s = tl.arange(0, SORT)
    v = tl.sort(tl.load(sp + s, mask=s < total, other=INT64_MIN), descending=True)
    idx = 0x7FFFFFFF - (v & 0xFFFFFFFF)
    tl.store(OUT + b * sob + s, tl.where(s < kk, idx, -1), mask=s < KOUT)
    tl.store(hp + i, tl.zeros([NBINS], dtype=tl.int32))  # leave the workspace clean for the next step
    tl.store(hp + NBINS + i, tl.zeros([NBINS], dtype=tl.int32))
    tl.store(CNT + b, 0)


def workspace(batch: int, device) -> torch.Tensor:
    """Zeroed histograms (2 x 4096 per row) + candidate counters; `indexer_topk_decode` leaves it zeroed."""
    return torch.zeros(batch * (2 * NBINS + 1), dtype=torch.int32, device=device)


def indexer_topk_decode(q: torch.Tensor, head_w: torch.Tensor, keys: KeySource, positions: torch.Tensor,
                        lengths: torch.Tensor, ratio: int, k: int, max_len: int, tile: int | None = None,
                        block_n: int = 128, cap: int = 1 << 15, sort: int | None = None, num_warps: int = 4,
                        num_stages: int = 3, ws: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hi, Di) (or (B, 1, Hi, Di)), head_w (B, Hi) fp32 (already x Hi^-1/2), positions / lengths (B,) int32,
    `max_len` >= every length (host-side bound) -> (B, min(k, max_len)) int64 indices, best first.

    `cap` candidates per row are kept after the first histogram and `sort` (>= 2k by default) are sorted;
    `ws` is a `workspace(B)` kept across steps (else a zeroed one per call)."""
    q = q.reshape(q.shape[0], q.shape[-2], q.shape[-1])
    B, Hi, Di = q.shape
    assert q.stride(-1) == 1
    head_w = head_w.reshape(B, Hi).float()
    kout = min(k, max_len)
    out = torch.empty(B, kout, dtype=torch.long, device=q.device)
    if kout == 0:
        return out
    block_n = max(16, block_n)
    if tile is None:  # about two programs per SM
        tile = triton.cdiv(triton.cdiv(max_len * B, 2 * _num_sms(q.device)), block_n) * block_n
    tile = min(max(triton.cdiv(tile, block_n) * block_n, block_n), 8192)
    sort = sort or max(64, 2 * triton.next_power_of_2(kout))
    grid = (triton.cdiv(max_len, tile), B)
    sc = torch.empty(B, max_len, dtype=torch.int32, device=q.device)
    cand = torch.empty(B, cap, dtype=torch.int64, device=q.device)
    surv = torch.empty(B, sort, dtype=torch.int64, device=q.device)
    ws = workspace(B, q.device) if ws is None else ws
    hist, cnt = ws[:B * 2 * NBINS], ws[B * 2 * NBINS:]
    main = keys.main
    kscale = keys.scale if keys.scale is not None else head_w
    _score_kernel[grid](0, q, q.stride(0), q.stride(1), head_w, head_w.stride(0), main, main.stride(0),
                        kscale, kscale.stride(0), keys.table, keys.table.stride(0), keys.block_size, lengths,
                        positions, ratio, sc, sc.stride(0), hist, Di ** -0.5, Hi, DI=Di,
                        BLOCK_HI=max(16, triton.next_power_of_2(Hi)), BLOCK_DI=max(16, triton.next_power_of_2(Di)),
                        BLOCK_N=block_n, TILE=tile, NBINS=NBINS, KSCALE=keys.scale is not None,
                        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
                        num_stages=num_stages)
    _collect_kernel[grid](sc, sc.stride(0), hist, lengths, positions, ratio, cand, cnt, k, cap,
                          NBINS=NBINS, TILE=tile, BLOCK=min(tile, 2048), num_warps=4)
    _select_kernel[(B,)](sc, sc.stride(0), hist, lengths, positions, ratio, cand, cnt, surv, out, out.stride(0),
                         k, kout, cap, NBINS=NBINS, SORT=sort, BLOCK=2048, num_warps=8)
    return out


def indexer_topk_dense(q, head_w, keys, positions, ratio, k, **kwargs) -> torch.Tensor:
    """`indexer_topk.reference`'s signature for one query per sequence: q (B, 1, Hi, Di), head_w (B, 1, Hi),
    keys (B, N, Di), positions (1,) -> (B, 1, min(k, N))."""
    B, S, Hi, Di = q.shape
    N = keys.shape[1]
    dev = q.device
    pos = positions.to(device=dev, dtype=torch.int32).reshape(1).expand(B).contiguous()
    lengths = torch.full((B,), N, device=dev, dtype=torch.int32)
    return indexer_topk_decode(q, head_w, dense_keys(keys), pos, lengths, ratio, k, N, **kwargs)[:, None]
