"""Lightning-indexer decode (§2.3.1 eqs. 13-17): one query per sequence scored against its N compressed keys
and fused with an exact top-k, without 8-byte sort keys for all N, a histogram or a torch.topk.

score(s) = c^-1/2 * sum_h w_h ReLU(q_h . K_s) over the finished entries s < min(len, (p + 1) // m); top-k
best first, equal scores resolved to the lowest index (the reference's stable sort). Scores are kept as
their order-preserving int32 image (4 B a key); (image, 2^31 - 1 - index) as one int64 is a unique key
whose order is the reference's. Three launches:

  `_score_kernel`      grid (key tiles, B). Per BLOCK_N keys one matmul with the keys as M and the heads as N
                       (the head sum stays inside a row's threads), ReLU, weighted head sum; FP8 keys are
                       converted in the kernel (to fp16, with a 16-bit q rescaled to fp16 by a power of two: both
                       exact) and their per-key fp32 scale applied after the sum (ReLU(s x) = s ReLU(x) for
                       s > 0). Writes every score and the maximum of each group of G consecutive keys.
  `_collect_kernel`    grid (key tiles, B). Each program first finds the bound L: the k-th largest group maximum
                       (rounded down to its top BITS x ROUNDS bits) by a radix select over the ~4k maxima, so at
                       least k distinct keys score >= L and every key of the top-k (ties included) scores >= L;
                       fewer than k groups: L = -inf. Then it appends its keys scoring >= L to a candidate list
                       (one atomic per block that takes any): about k x (1 + a little) of them for G ~ N / 4k.
  `_rank_kernel`       grid (candidate blocks, B). Each candidate's rank = how many candidates beat it; rank r < k
                       writes its index to output slot r. Exact, parallel, O(candidates^2) compares. If the list
                       overflows `cap` (thousands of equal scores, e.g. a zero query), one program finds the
                       exact k-th key by bisection over all scores and sorts its k winners: slow, still exact.
The score kernel also zeroes the candidate counter of the next launches, so a kept `workspace` needs no memset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting
from .decode_attn import _block_rows, _keep_layout
from .sparse_attn import _align, _num_sms, _row_of

INT32_MIN = tl.constexpr(-(1 << 31))
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
def _unique(key, idx):
    """(int32 order key, index) -> int64, larger = better score, then lower index."""
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _visible(LEN, POS, b, ratio):
    return tl.minimum(tl.load(LEN + b), (tl.load(POS + b) + 1) // ratio)


@triton.jit
def _rank_in(mine, X, n, CB: tl.constexpr):
    """For each of `mine` (RB,) unique keys: how many of the n unique keys at X beat it."""
    rank = tl.zeros(mine.shape, dtype=tl.int32)
    for c0 in range(0, n, CB):
        c = c0 + tl.arange(0, CB)
        other = tl.load(X + c, mask=c < n, other=INT64_MIN)
        rank += tl.sum((other[None, :] > mine[:, None]).to(tl.int32), 1)
    return rank


@triton.jit
def _key_rows(T, st, BS, b, j0, j, end, KS, sks, BLOCK_N: tl.constexpr, KSCALE: tl.constexpr, CONTIG: tl.constexpr,
              ZERO):
    """Pool rows of the key block j = j0 .. j0 + BLOCK_N - 1 (entries before `end` are valid) and their fp32
    scales (1 without KSCALE or past the end). A block wholly past the end (the prefetch after the last one) reads
    no scale and no table entry of its own (contiguous: entry 0's, which every table has); its rows are never
    used."""
    valid = j < end
    if CONTIG:  # one table entry for the block; a block past the end reads entry 0's instead (never used)
        rows = _block_rows(T, st, BS, b, tl.where(j0 < end, j0, 0), BLOCK_N, ZERO)
    else:
        rows = _row_of(T, st, BS, b, j, valid, ZERO)
    ksc = tl.full([BLOCK_N], 1.0, tl.float32)
    if KSCALE:
        ksc = tl.load(KS + rows * sks, mask=valid, other=1.0)
    return rows, ksc


@triton.jit(do_not_specialize=["ZERO"])
def _score_kernel(ZERO, Q, sqb, sqh, W, swb, K, sk0, KS, sks, T, st, BS, LEN, POS, ratio, SC, ssc, MX, smx, CNT,
                  score_scale, HI, DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_DI: tl.constexpr,
                  BLOCK_N: tl.constexpr, TILE: tl.constexpr, G: tl.constexpr, KALIGN: tl.constexpr,
                  KSCALE: tl.constexpr, PREC: tl.constexpr, CONTIG: tl.constexpr, F16: tl.constexpr,
                  OPAQUE: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    if tile == 0:
        tl.store(CNT + b, 0)  # the collect kernel's counter (it runs after every program of this one)
    n = _visible(LEN, POS, b, ratio)
    h = tl.arange(0, BLOCK_HI)
    d = tl.arange(0, BLOCK_DI)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + d[None, :], mask=(h < HI)[:, None] & (d < DI)[None, :], other=0.0)
    if F16:
        # E4M3 -> fp16 is one packed conversion per two keys' values; -> bf16 adds an f16 -> bf16 per value
        # on a slow pipe (ncu, H200: 16 % of the loop's stall samples). q goes to fp16 instead, first scaled by
        # a power of two that puts its largest |value| in [2^14, 2^15): bf16 -> fp16 is then exact for every
        # value down to 2^-28 of that maximum (smaller ones lose bits far below fp32 summation noise), and the
        # scores are multiplied back by the same power of two (exact).
        e = (tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0).to(tl.int32, bitcast=True) >> 23) & 0xFF
        up = tl.minimum(tl.maximum(268 - e, 1), 253)  # biased exponent of 2^(141 - e): max |q| -> [2^14, 2^15)
        q = (q.to(tl.float32) * (up << 23).to(tl.float32, bitcast=True)).to(tl.float16)
        score_scale = score_scale * ((254 - up) << 23).to(tl.float32, bitcast=True)
    qt = tl.trans(q)  # (BDI, BHI)
    w = tl.load(W + b * swb + h, mask=h < HI, other=0.0).to(tl.float32)
    start = tile * TILE
    end = tl.minimum(start + TILE, n)
    # The next key block's rows and scales are loaded one iteration ahead (by hand: the compiler pipelines the
    # key loads that feed the matmul, not these), so their latency hides behind this block's matmul.
    j = start + tl.arange(0, BLOCK_N)
    rows, ksc = _key_rows(T, st, BS, b, start, j, end, KS, sks, BLOCK_N, KSCALE, CONTIG, ZERO)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = j < end
        ro = tl.multiple_of(rows * sk0, KALIGN)
        k = tl.load(K + ro[:, None] + d[None, :], mask=valid[:, None] & (d < DI)[None, :], other=0.0)
        jn = j + BLOCK_N
        rows_next, ksc_next = _key_rows(T, st, BS, b, j0 + BLOCK_N, jn, end, KS, sks, BLOCK_N, KSCALE, CONTIG, ZERO)
        s = tl.maximum(tl.dot(_keep_layout(k.to(q.dtype), OPAQUE), qt, input_precision=PREC), 0.0)  # ReLU(q_h . K_s)
        score = tl.sum(s * w[None, :], 1) * score_scale
        if KSCALE:
            score = score * ksc
        rows, ksc = rows_next, ksc_next
        key = _order_key(score)
        tl.store(SC + b * ssc + j, key, mask=valid)
        gmax = tl.max(tl.reshape(tl.where(valid, key, INT32_MIN), (BLOCK_N // G, G)), 1)
        g = j0 // G + tl.arange(0, BLOCK_N // G)
        tl.store(MX + b * smx + g, gmax, mask=g * G < end)


@triton.jit
def _threshold(MX, smx, b, m, kk, MB: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    """A score bound L with at least kk group maxima >= L (so every top-kk key scores >= L): the kk-th largest
    of the m group maxima, found digit by digit (BITS a round, most significant first) from a 2^BITS-bin
    histogram of the maxima that share the digits found so far. BITS x ROUNDS = 32 gives it exactly; fewer
    rounds leave the low bits zero, i.e. a slightly lower bound (a few more candidates) for fewer dependent
    steps. Triton's histogram costs about bins / 32 operations per element and thread (a ballot per bit),
    so 16 bins x 4 rounds may beat 256 x 2 for the same 16 bits (not yet timed on a GPU)."""
    NB: tl.constexpr = 1 << BITS
    bins = tl.arange(0, NB)
    pre = tl.zeros([], dtype=tl.uint32)  # digits found so far, in the order key's unsigned image
    need = kk  # how many of the top kk lie at or below the current prefix
    for r in tl.static_range(ROUNDS):
        shift = 32 - BITS * (r + 1)
        hist = tl.zeros([NB], dtype=tl.int32)
        for c0 in range(0, m, MB):
            c = c0 + tl.arange(0, MB)
            key = tl.load(MX + b * smx + c, mask=c < m, other=0)
            u = key.to(tl.uint32, bitcast=True) ^ 0x80000000  # order-preserving unsigned image
            live = c < m
            if r > 0:
                live = live & ((u >> (shift + BITS)) == (pre >> (shift + BITS)))
            hist += tl.histogram(((u >> shift) & (NB - 1)).to(tl.int32), NB, mask=live)
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # maxima of this prefix in higher bins
        digit = tl.max(tl.where(above + hist >= need, bins, -1), 0)
        need -= tl.sum(tl.where(bins == digit, above, 0), 0)
        pre = pre | (digit.to(tl.uint32) << shift)
    return (pre ^ 0x80000000).to(tl.int32, bitcast=True)


@triton.jit
def _collect_kernel(SC, ssc, MX, smx, LEN, POS, ratio, CAND, CNT, CAP, K, G: tl.constexpr, TILE: tl.constexpr,
                    BLOCK: tl.constexpr, MB: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    n = _visible(LEN, POS, b, ratio)
    start = tile * TILE
    end = tl.minimum(start + TILE, n)
    if start < end:
        kk = tl.minimum(K, n)
        m = (n + G - 1) // G  # group maxima of this row
        # Every program finds the bound itself (a few histogram rounds over ~4k maxima, from L2): one launch
        # and one grid-wide dependency fewer than a threshold kernel of its own.
        thr = tl.full([], INT32_MIN, tl.int32)  # fewer groups than k: every visible key is a candidate
        if m >= kk:
            thr = _threshold(MX, smx, b, m, kk, MB, BITS, ROUNDS)
        for j0 in range(start, end, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            valid = j < end
            key = tl.load(SC + b * ssc + j, mask=valid, other=INT32_MIN)
            take = valid & (key >= thr)
            take_i = take.to(tl.int32)
            n_take = tl.sum(take_i, 0)
            if n_take > 0:
                off = tl.atomic_add(CNT + b, n_take) + tl.cumsum(take_i, 0) - 1
                tl.store(CAND + b * CAP + off, _unique(key, j), mask=take & (off < CAP))


@triton.jit
def _rank_kernel(SC, ssc, LEN, POS, ratio, CAND, CNT, SURV, OUT, sob, K, KOUT, CAP,
                 RB: tl.constexpr, CB: tl.constexpr, SORT: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    b = tl.program_id(1)
    n = _visible(LEN, POS, b, ratio)
    kk = tl.minimum(K, n)
    n_cand = tl.load(CNT + b)
    i = p * RB + tl.arange(0, RB)
    if n_cand <= CAP:
        mine = tl.load(CAND + b * CAP + i, mask=i < n_cand, other=INT64_MIN)
        rank = tl.full([RB], 1 << 30, tl.int32)
        if p * RB < n_cand:
            rank = _rank_in(mine, CAND + b * CAP, n_cand, CB)
        idx = 0x7FFFFFFF - (mine & 0xFFFFFFFF)
        tl.store(OUT + b * sob + rank, idx, mask=(i < n_cand) & (rank < kk))
        tl.store(OUT + b * sob + i, tl.full([RB], -1, tl.int64), mask=(i >= kk) & (i < KOUT))
    elif p == 0:
        # Exact fallback: bisect for the k-th largest key over all n scores (count(key >= lo) >= kk holds),
        # then take everything above it and its ties in index order (lowest index first), and sort those kk.
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
        sp = SURV + b * SORT
        taken = 0
        ties = 0
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            key = tl.load(SC + b * ssc + j, mask=j < n, other=-(1 << 31))
            tie = ((j < n) & (key.to(tl.int64) == lo)).to(tl.int32)
            keep = (j < n) & ((key.to(tl.int64) > lo) | ((tie > 0) & (ties + tl.cumsum(tie, 0) <= kk - above)))
            keep_i = keep.to(tl.int32)
            tl.store(sp + taken + tl.cumsum(keep_i, 0) - 1, _unique(key, j), mask=keep)
            taken += tl.sum(keep_i, 0)
            ties += tl.sum(tie, 0)
        tl.debug_barrier()  # SURV written by every thread above, read back below
        s = tl.arange(0, SORT)
        v = tl.sort(tl.load(sp + s, mask=s < kk, other=INT64_MIN), descending=True)
        tl.store(OUT + b * sob + s, tl.where(s < kk, 0x7FFFFFFF - (v & 0xFFFFFFFF), -1), mask=s < KOUT)


def workspace(batch: int, device) -> torch.Tensor:
    """Candidate counters (the first B of 2 int32 per row), kept across steps; each launch rewrites them."""
    return torch.zeros(2 * batch, dtype=torch.int32, device=device)


def indexer_topk_decode(q: torch.Tensor, head_w: torch.Tensor, keys: KeySource, positions: torch.Tensor,
                        lengths: torch.Tensor, ratio: int, k: int, max_len: int, tile: int | None = None,
                        block_n: int = 128, group: int | None = None, cap: int = 1 << 14, num_warps: int = 4,
                        num_stages: int = 2, bits: int = 8, rounds: int = 2, rank_rows: int = 16, rank_cols: int = 256,
                        ws: torch.Tensor | None = None, contiguous_blocks: bool = False,
                        f16_dot: bool | None = None, collect_tile: int | None = None,
                        keep_layout: bool = True) -> torch.Tensor:
    """q (B, Hi, Di) (or (B, 1, Hi, Di)), head_w (B, Hi) fp32 (already x Hi^-1/2), positions / lengths (B,) int32,
    `max_len` >= every length (host-side bound) -> (B, min(k, max_len)) int64 indices, best first.

    `group` keys share one maximum for the threshold (default ~max_len / 4k: ~4k maxima, ~k x 1.2 candidates
    on random scores); `rounds` digits of `bits` bits of the candidate bound are exact (bits x rounds = 32:
    all; 16: a bound up to 2^-7 lower, a few more candidates, half the dependent steps); `cap` candidates per
    row are ranked (`rank_rows` x `rank_cols` compares a step), more take the exact fallback; `ws` is a
    `workspace(B)` kept across steps (else a new one per call); `contiguous_blocks`: one block-table entry per
    `block_n` keys (needs `block_n` to divide `keys.block_size`) instead of a gather and a division per key;
    `f16_dot` (default: FP8 keys and a 16-bit q) scores in fp16 (`_score_kernel`: exact conversions, the same
    indices), False keeps q's dtype; `collect_tile` scores per collect program (default `tile`): each one derives
    the bound itself, so fewer, longer ones repeat that work less; `keep_layout` as in `decode_attn.attend_decode`."""
    q = q.reshape(q.shape[0], q.shape[-2], q.shape[-1])
    B, Hi, Di = q.shape
    assert q.stride(-1) == 1
    head_w = head_w.reshape(B, Hi).float()
    kout = min(k, max_len)
    out = torch.empty(B, kout, dtype=torch.long, device=q.device)
    if kout == 0:
        return out
    block_n = max(16, triton.next_power_of_2(block_n))
    G = min(block_n, group or max(1, triton.next_power_of_2(max_len // (4 * kout) + 1) // 2))
    if tile is None:  # about two programs per SM
        tile = triton.cdiv(triton.cdiv(max_len * B, 2 * _num_sms(q.device)), block_n) * block_n
    tile = min(max(triton.cdiv(tile, block_n) * block_n, block_n), 8192)
    collect_tile = tile if collect_tile is None else max(16, collect_tile)
    if contiguous_blocks and keys.block_size % block_n:
        raise ValueError(f"contiguous_blocks: block_n={block_n} must divide the key pool's block size "
                         f"{keys.block_size}")
    fp8_keys = keys.main.dtype == torch.float8_e4m3fn
    if f16_dot is None:
        f16_dot = fp8_keys and q.dtype in (torch.bfloat16, torch.float16)
    if f16_dot and not (fp8_keys and q.dtype != torch.float32):
        raise ValueError("f16_dot: FP8 (float8_e4m3fn) keys and a 16-bit query")
    cap = max(cap, kout)
    sort = max(16, triton.next_power_of_2(kout))
    grid = (triton.cdiv(max_len, tile), B)
    n_groups = triton.cdiv(max_len, G)
    sc = torch.empty(B, max_len, dtype=torch.int32, device=q.device)
    mx = torch.empty(B, n_groups, dtype=torch.int32, device=q.device)
    cand = torch.empty(B, cap, dtype=torch.int64, device=q.device)
    surv = torch.empty(B, sort, dtype=torch.int64, device=q.device)
    ws = workspace(B, q.device) if ws is None else ws
    cnt = ws[:B]
    main = keys.main
    kscale = keys.scale if keys.scale is not None else head_w
    _score_kernel[grid](0, q, q.stride(0), q.stride(1), head_w, head_w.stride(0), main, main.stride(0),
                        kscale, kscale.stride(0), keys.table, keys.table.stride(0), keys.block_size, lengths,
                        positions, ratio, sc, sc.stride(0), mx, mx.stride(0), cnt, Di ** -0.5, Hi, DI=Di,
                        BLOCK_HI=max(16, triton.next_power_of_2(Hi)), BLOCK_DI=max(16, triton.next_power_of_2(Di)),
                        BLOCK_N=block_n, TILE=tile, G=G, KALIGN=_align(main), KSCALE=keys.scale is not None,
                        PREC="ieee" if q.dtype == torch.float32 else "tf32", CONTIG=contiguous_blocks, F16=f16_dot,
                        OPAQUE=keep_layout and fp8_keys and not interpreting(),
                        num_warps=num_warps, num_stages=num_stages)
    _collect_kernel[(triton.cdiv(max_len, collect_tile), B)](
        sc, sc.stride(0), mx, mx.stride(0), lengths, positions, ratio, cand, cnt, cap, k, G=G, TILE=collect_tile,
        BLOCK=min(triton.next_power_of_2(collect_tile), 1024),  # masked by the tile's end
        MB=max(16, min(2048, triton.next_power_of_2(n_groups))), BITS=bits, ROUNDS=rounds, num_warps=4)
    _rank_kernel[(triton.cdiv(min(cap, max_len), rank_rows), B)](
        sc, sc.stride(0), lengths, positions, ratio, cand, cnt, surv, out, out.stride(0), k, kout, cap,
        RB=rank_rows, CB=rank_cols, SORT=sort, BLOCK=1024, num_warps=4)
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
