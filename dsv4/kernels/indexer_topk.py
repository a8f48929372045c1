"""Lightning-indexer scores and top-k (§2.3.1 eqs. 13-17) without a [queries x heads x entries] tensor.

score(t, s) = c^-1/2 * sum_h w_{t,h} ReLU(q_{t,h} . K_s) for finished entries s < (p_t + 1) / m, top-k per
query; equal scores resolve to the lowest index (the reference's stable sort, so cached decode equals
the full forward). A program holds BLOCK_Q queries' heads, stacked as the rows (or, `layout="key"`, the
columns) of one matmul, and walks a range of key tiles (skipping the matmul past every query's visible
count); per tile it sums the heads on chip (`SCORE_LAYOUTS`: where that sum runs) and writes one int64
*sort key* per (query, entry): the score's order-preserving bit pattern in the high word and (N - 1 - s) in
the low word. Keys are unique, so a plain `torch.topk` on them reproduces the stable sort exactly, ties
included. Queries are processed in chunks so at most `key_budget` keys (8 bytes each) exist at a time:
O(chunk x N) memory, never O(S x N) for long prompts.

Options: `fp8` scores on the FP8 tensor cores (E4M3 q and keys, as the release's indexer), within E4M3
rounding of the reference; `candidates` writes each group's best score too, takes per query the k-th best
of ~4k group maxima as a bound (k distinct keys reach it, so the top-k, ties included, lies at or above it)
and runs `torch.topk` on the keys above it only (exact; whole rows when a list overflows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attn import _num_sms


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
def _score_keys_kernel(Q, sqb, sqs, sqh, W, swb, sws, K, skb, skn, KS, sksb, POS, OUT, sob, sos, MX, smb, smq,
                       S, N, HI, ratio, score_scale, PER_N,
                       DI: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_DI: tl.constexpr, G: tl.constexpr, KSCALE: tl.constexpr, PREC: tl.constexpr,
                       LAYOUT: tl.constexpr, HEAD_DOT: tl.constexpr):
    pq = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2)
    qi = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = qi < S
    pos = tl.load(POS + qi, mask=qm, other=0)
    vis = (pos + 1) // ratio
    h = tl.arange(0, BLOCK_HI)
    d = tl.arange(0, BLOCK_DI)
    hm = h < HI
    # The queries' heads stay loaded for the program's whole key range (the previous kernel reloaded them for
    # every 64-key tile). Layout 0 loads them as (query, head, dim) and keeps them in registers as the MMA's
    # A operand; layouts 1 and 2 load a 2-D (row, dim) tile that the MMA reads from shared memory (a register
    # tensor would be copied to shared memory again for every key tile).
    if LAYOUT == 0:
        qp = Q + b * sqb + qi[:, None, None] * sqs + h[None, :, None] * sqh + d[None, None, :]
        q = tl.load(qp, mask=qm[:, None, None] & hm[None, :, None] & (d < DI)[None, None, :], other=0.0)
        q = tl.reshape(q, (BLOCK_Q * BLOCK_HI, BLOCK_DI))
    else:
        r = tl.arange(0, BLOCK_Q * BLOCK_HI)
        if LAYOUT == 1:  # rows (head // 16, query, head % 16): see _head_sum_interleaved
            rq = pq * BLOCK_Q + (r // 16) % BLOCK_Q
            rh = (r // (16 * BLOCK_Q)) * 16 + r % 16
        else:  # rows (query, head)
            rq = pq * BLOCK_Q + r // BLOCK_HI
            rh = r % BLOCK_HI
        rm = (rq < S) & (rh < HI)
        if LAYOUT == 1:
            q = tl.load(Q + b * sqb + rq[:, None] * sqs + rh[:, None] * sqh + d[None, :],
                        mask=rm[:, None] & (d < DI)[None, :], other=0.0)
        else:  # loaded transposed, (dim, row): the MMA's B operand
            q = tl.load(Q + b * sqb + rq[None, :] * sqs + rh[None, :] * sqh + d[:, None],
                        mask=rm[None, :] & (d < DI)[:, None], other=0.0)
    if LAYOUT == 1:
        w = tl.load(W + b * swb + rq * sws + rh, mask=rm, other=0.0)  # (BQ*BH,) in the rows' order
    else:
        w = tl.load(W + b * swb + qi[:, None] * sws + h[None, :], mask=qm[:, None] & hm[None, :], other=0.0)
    if HEAD_DOT:
        w_sum = _head_weight_matrix(w, BLOCK_Q, BLOCK_HI)
        if PREC != "ieee":  # bf16 / FP8 scoring: the second matmul in bf16
            w_sum = w_sum.to(tl.bfloat16)
    n0 = pn * PER_N
    n1 = tl.minimum(n0 + PER_N, N)
    # Key tiles at or past every query's visible count skip the matmul (half the work causally).
    n_mid = tl.minimum(n1, tl.maximum(n0, tl.cdiv(tl.max(tl.where(qm, vis, 0)), BLOCK_N) * BLOCK_N))
    for j0 in range(n0, n_mid, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + j[:, None] * skn + d[None, :], mask=(j < N)[:, None] & (d < DI)[None, :],
                    other=0.0).to(q.dtype)
        if LAYOUT == 2:  # keys as the matmul's M: a query's heads lie along the accumulator's columns
            s = tl.maximum(tl.dot(k, q, input_precision=PREC), 0.0)  # (BN, BQ*BH) ReLU(K.q)
            if HEAD_DOT:
                score = _head_sum_dot(s, w_sum, PREC, BLOCK_Q, BLOCK_N)
            else:  # in-thread adds and two lane shuffles (heads never cross a warp)
                score = tl.sum(tl.reshape(s, (BLOCK_N, BLOCK_Q, BLOCK_HI)) * w[None, :, :], axis=2)
            score = tl.trans(score) * score_scale  # (BQ, BN)
        else:
            s = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)  # (BQ*BH, BN) ReLU(q.K)
            if LAYOUT == 1:
                score = _head_sum_interleaved(s * w[:, None], BLOCK_Q, BLOCK_HI, BLOCK_N) * score_scale
            else:  # rows (query, head): the head sum crosses the warps of a warpgroup (shared memory)
                s = tl.reshape(s, (BLOCK_Q, BLOCK_HI, BLOCK_N))
                score = tl.sum(s * w[:, :, None], axis=1) * score_scale
        if KSCALE:  # per-key scale of FP8 keys, after the ReLU (it is positive)
            score = score * tl.load(KS + b * sksb + j, mask=j < N, other=1.0)[None, :]
        _store_keys(OUT, b, sob, sos, MX, smb, smq, qi, qm, j0, vis, N, score, BLOCK_Q, BLOCK_N, G)
    for j0 in range(n_mid, n1, BLOCK_N):
        _store_keys(OUT, b, sob, sos, MX, smb, smq, qi, qm, j0, vis, N,
                    tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32), BLOCK_Q, BLOCK_N, G)


@triton.jit
def _head_sum_interleaved(s, BLOCK_Q: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weighted scores s (BQ*BH, BN) in rows (head // 16, query, head % 16) -> the head sums (BQ, BN).
    A Hopper warpgroup MMA gives warp w rows 16w..16w+15 of every 16 x num_warps (see the accumulator's
    layout), so with BLOCK_Q == num_warps each warp holds whole queries and the sum needs no shared memory."""
    s = tl.reshape(s, (BLOCK_HI // 16, BLOCK_Q, 16, BLOCK_N))
    return tl.sum(tl.sum(s, axis=2), axis=0)


@triton.jit
def _head_weight_matrix(w, BLOCK_Q: tl.constexpr, BLOCK_HI: tl.constexpr):
    """The head weights w (BQ, BH) as a block-diagonal ((query, head), column) matrix for `_head_sum_dot`:
    column c holds query c's weights for c < BQ and is zero past it (a dot needs >= 16 columns)."""
    cols: tl.constexpr = (BLOCK_Q + 15) // 16 * 16  # = max(16, BLOCK_Q) for powers of two
    r = tl.arange(0, BLOCK_Q * BLOCK_HI)
    c = tl.arange(0, cols)
    w_flat = tl.reshape(w, (BLOCK_Q * BLOCK_HI,))
    return tl.where((r // BLOCK_HI)[:, None] == c[None, :], w_flat[:, None], 0.0)


@triton.jit
def _head_sum_dot(s, w_sum, PREC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_h w_h s_h as a second matmul on the tensor cores: s (BN, BQ*BH) in w_sum's dtype (bf16 for bf16 /
    FP8 scoring: rounds the ReLU'd scores and the weights to 8 bits) -> (BN, BQ)."""
    cols: tl.constexpr = (BLOCK_Q + 15) // 16 * 16
    t = tl.dot(s.to(w_sum.dtype), w_sum, input_precision=PREC)  # (BN, cols), zero past column BQ
    return tl.sum(tl.reshape(t, (BLOCK_N, cols // BLOCK_Q, BLOCK_Q)), axis=1)  # adds exact zeros


@triton.jit
def _store_keys(OUT, b, sob, sos, MX, smb, smq, qi, qm, j0, vis, N, score, BLOCK_Q: tl.constexpr,
                BLOCK_N: tl.constexpr, G: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_N)
    score = tl.where(j[None, :] < vis[:, None], score, float("-inf"))
    # Order-preserving int32 image of the float (flip the magnitude bits of negatives), then the index
    # tie-break in the low word: larger key = higher score, then lower index.
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (N - 1 - j).to(tl.int64)
    tl.store(OUT + b * sob + qi[:, None] * sos + j[None, :], key, mask=qm[:, None] & (j < N)[None, :])
    if G > 0:  # the best score of each group of G keys, for the candidate bound
        gmax = tl.max(tl.reshape(bits, (BLOCK_Q, BLOCK_N // G, G)), 2)
        g = j0 // G + tl.arange(0, BLOCK_N // G)
        tl.store(MX + b * smb + qi[:, None] * smq + g[None, :], gmax, mask=qm[:, None] & (g * G < N)[None, :])


@triton.jit
def _collect_kernel(OUT, sob, sos, THR, stb, POS, CAND, scb, scq, CNT, S, N, ratio, CAP, PER_N,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """Appends each query's keys whose score image >= its bound THR to its candidate row (per-row atomics)."""
    pq = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2)
    qi = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = qi < S
    vis = (tl.load(POS + qi, mask=qm, other=0) + 1) // ratio
    thr = tl.load(THR + b * stb + qi, mask=qm, other=0)
    n0 = pn * PER_N
    n1 = tl.minimum(n0 + PER_N, N)
    for j0 in range(n0, n1, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < n1  # PER_N need not be a multiple of BLOCK_N: the next program owns the keys past n1
        key = tl.load(OUT + b * sob + qi[:, None] * sos + j[None, :], mask=qm[:, None] & jm[None, :], other=0)
        take = qm[:, None] & jm[None, :] & (j < vis[:, None]) & ((key >> 32).to(tl.int32) >= thr[:, None])
        take_i = take.to(tl.int32)
        n_take = tl.sum(take_i, 1)
        base = tl.atomic_add(CNT + b * S + qi, n_take, mask=qm & (n_take > 0), sem="relaxed")
        off = base[:, None] + tl.cumsum(take_i, 1) - 1
        tl.store(CAND + b * scb + qi[:, None] * scq + off, key, mask=take & (off < CAP))


# Where the scoring kernel's head sum runs (the kernel's LAYOUT), each exact up to fp32 summation order:
#   "query": rows (query, head) x key columns; the head sum crosses the warps of a warpgroup (shared memory);
#   "interleaved": rows (head // 16, query, head % 16): with block_q == num_warps (its default) each warp
#       holds whole queries, so the sum is in-thread adds and lane shuffles (`_head_sum_interleaved`);
#   "key": key rows x (query, head) columns (the queries are the MMA's B operand): the sum runs along a
#       row, in-thread adds and two lane shuffles.
SCORE_LAYOUTS = {"query": 0, "interleaved": 1, "key": 2}


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., Di) -> E4M3 (..., Di) and a power-of-two fp32 scale (...,) per row with |x| / scale <= 448:
    a power of two keeps every dequantised product exact in fp32, so equal inputs still score equal."""
    amax = x.float().abs().amax(-1).clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    return (x.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def indexer_topk(q: torch.Tensor, head_w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, ratio: int,
                 k: int, key_budget: int = 1 << 27, block_q: int | None = None, block_n: int = 64,
                 fp8: bool = False, n_split: int | None = None, num_warps: int = 4, num_stages: int = 2,
                 candidates: bool = True, layout: str = "key", head_dot: bool = False) -> torch.Tensor:
    """Same contract as `reference`; head_w fp32 (B, S, Hi); positions (S,).

    `fp8`: the scores on the FP8 tensor cores, as the release's indexer runs them: q per (query, head) and the
    keys per entry in E4M3 with power-of-two scales (`quantize_fp8`; the q scale folds into the head weight,
    the key scale multiplies the head sum). Scores then differ from the reference by the E4M3 rounding
    (3 mantissa bits, ~2^-4 relative per operand), so keys whose scores agree that closely may swap.
    `n_split` key ranges per query block (default: enough programs for the GPU). `candidates`: top-k over the
    keys above a per-query bound from group maxima (exact; see below) rather than over whole rows.

    `layout` of the scoring matmul's accumulator, i.e. where the sum over heads runs (`SCORE_LAYOUTS`);
    `head_dot` (layout "key" only) does that sum as a second matmul, with the ReLU'd scores and the head
    weights rounded to bf16 for bf16 / FP8 inputs: 8 mantissa bits instead of fp32 adds, so near-equal keys
    may swap (opt-in; exact for fp32 inputs up to summation order).

    Defaults (layout "key", 4 queries x 64-key tiles, 4 warps, candidates): the fastest set of the H100 sweep
    that keeps fp32 head sums (`benchmarks/tune_indexer_prefill.py`, 8,192 queries x 32K keys: scoring 8.2 ms
    vs 20.3 ms for the earlier "query" layout, whole call 12.6 vs 24.5 ms; benchmarks/RESULTS.md)."""
    if layout not in SCORE_LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {sorted(SCORE_LAYOUTS)}")
    if head_dot and layout != "key":
        raise ValueError("head_dot=True needs layout='key' (the head sum runs along the first matmul's columns)")
    B, S, Hi, Di = q.shape
    N = keys.shape[1]
    k = min(k, N)
    if N == 0:
        return torch.full((B, S, 0), -1, dtype=torch.long, device=q.device)
    BLOCK_HI = max(triton.next_power_of_2(Hi), 16 if layout == "interleaved" else 1)
    # "interleaved" sums heads within a warp only when each warp holds one query (`_head_sum_interleaved`)
    BLOCK_Q = block_q or (num_warps if layout == "interleaved" else max(1, 256 // BLOCK_HI))
    BLOCK_Q = max(BLOCK_Q, triton.cdiv(16, BLOCK_HI))  # dot needs >= 16 rows
    BLOCK_DI = max(16 if not fp8 else 32, triton.next_power_of_2(Di))
    pos = positions.to(device=q.device, dtype=torch.int32).contiguous()
    head_w = head_w.float().contiguous()
    kscale = None
    if fp8:
        q, qscale = quantize_fp8(q)
        head_w = head_w * qscale  # ReLU(s x) = s ReLU(x) for the positive scale s
        keys, kscale = quantize_fp8(keys)
    keys = keys.contiguous()
    visible = torch.div(pos + 1, ratio, rounding_mode="floor").long()
    chunk = max(1, min(S, key_budget // max(1, B * N)))
    out = torch.empty(B, S, k, dtype=torch.long, device=q.device)
    buf = torch.empty(B, chunk, N, dtype=torch.int64, device=q.device)
    # Candidate bound: the k-th best of the ~4k maxima of groups of G keys (k distinct keys score at least that),
    # so torch.topk runs on the <= cap keys above it instead of all N; rows with fewer than k x G visible
    # entries (the prompt's start) or an overflowing candidate list take the full row.
    G = 0
    if candidates and N >= 8 * k:
        G = max(1, min(block_n, 1 << ((N // (4 * k)).bit_length() - 1)))
    cap = 4 * k
    vis_host = visible.cpu() if G else None  # which chunks may take candidates (one host sync)
    mx = torch.empty(B, chunk, triton.cdiv(N, G) if G else 1, dtype=torch.int32, device=q.device)
    ks = kscale if kscale is not None else head_w
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        c = e - s
        qc, wc = q[:, s:e], head_w[:, s:e]
        q_blocks = triton.cdiv(c, BLOCK_Q)
        # key ranges per query block: about four programs per SM, at least four key tiles each
        split = n_split or max(1, min(triton.cdiv(N, 4 * block_n),
                                      triton.cdiv(4 * _num_sms(q.device), B * q_blocks)))
        per_n = triton.cdiv(triton.cdiv(N, split), block_n) * block_n
        grid = (q_blocks, triton.cdiv(N, per_n), B)
        _score_keys_kernel[grid](qc, qc.stride(0), qc.stride(1), qc.stride(2), wc, wc.stride(0), wc.stride(1),
                                 keys, keys.stride(0), keys.stride(1), ks, ks.stride(0), pos[s:e], buf,
                                 buf.stride(0), buf.stride(1), mx, mx.stride(0), mx.stride(1), c, N, Hi, ratio,
                                 Di ** -0.5, per_n, DI=Di, BLOCK_Q=BLOCK_Q, BLOCK_HI=BLOCK_HI, BLOCK_N=block_n,
                                 BLOCK_DI=BLOCK_DI, G=G, KSCALE=fp8, LAYOUT=SCORE_LAYOUTS[layout],
                                 HEAD_DOT=head_dot,
                                 PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
                                 num_stages=num_stages)
        top = None
        if G and int(vis_host[s:e].min()) >= k * G:
            thr = mx[:, :c].topk(k, dim=-1).values[..., -1].contiguous()  # (B, c) k-th best group maximum
            cnt = torch.zeros(B, c, dtype=torch.int32, device=q.device)
            cand = torch.full((B, c, cap), -(1 << 63), dtype=torch.int64, device=q.device)
            BQ = 16
            _collect_kernel[(triton.cdiv(c, BQ), grid[1], B)](buf, buf.stride(0), buf.stride(1), thr, thr.stride(0),
                                                              pos[s:e], cand, cand.stride(0), cand.stride(1), cnt,
                                                              c, N, ratio, cap, per_n, BLOCK_Q=BQ, BLOCK_N=128,
                                                              num_warps=4)
            if int(cnt.max()) <= cap:  # else (ties by the thousand) the whole rows below
                top = cand.topk(k, dim=-1, sorted=True).values
        if top is None:
            top = buf[:, :c].topk(k, dim=-1, sorted=True).values
        idx = (N - 1) - (top & 0xFFFFFFFF)
        out[:, s:e] = torch.where(idx >= visible[s:e, None], -1, idx)
    return out
