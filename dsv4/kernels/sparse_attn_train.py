"""Trainable V4 core attention: Triton forward (which also saves each row's log-sum-exp) and Triton
backward for the sliding window + compressed entries (CSA top-k or HCA all visible) + sink, shared-KV
MQA (§2.3). Same semantics as the reference `dsv4.attention.sparse_attention`, whose autograd built and
kept per-chunk (B, c, H, window + k) fp32 logits and (B, c, k, D) gathered entries; here autograd keeps
only the inputs, the output and the (B, S, H) fp32 log-sum-exp.

Backward, flash-attention style (p recomputed from the saved log-sum-exp; delta = rowsum(dO * O)):
  dq        query-major: one program per (query, head block, output column block), over all its keys
  d window  key-major: one program per block of window rows; the queries that see a window row are a
            contiguous range of at most block + window - 1 rows, so each row's gradient is summed in one
            program and stored: deterministic, no atomics
  d entries HCA: key-major like the window (an entry is seen by every query from (w+1)*ratio - 1 on), the
            query range split over programs into fp32 partials summed afterwards: deterministic.
            CSA: the indexer's picks are data dependent, so the query-major dq program adds each picked
            entry's gradient, already summed over its block of heads, into an fp32 buffer with atomics.
            Not bit-reproducible across runs (fp32 addition order), but the alternatives cost more: a
            deterministic gather would either stage (B, S, k, D) fp32 partials (4 GiB per layer at 4K
            tokens, Flash dims) or re-read a picking query's 64 heads (128 KB) once per (query, entry) pair.
  d sink    -sum over rows of p_sink * delta, from the saved log-sum-exp (PyTorch, (B, S, H) sized).
Since K = V, a key row's gradient is ds^T q (as a key) + p^T dO (as a value), summed into the same row.

Head dims up to 512: scores are contracted in chunks of `d_in` columns (each chunk of q, dO and the keys
its own dot operand), and each backward program owns `d_out` output columns, so its fp32 accumulator is
(heads, d_out) or (keys, d_out), not a whole 512-wide row. Softmax statistics are base 2 (exp2) in fp32.
Query positions are consecutive and window row i sits at position positions[-1] - (L - 1) + i, as the
model passes them (the reference assumes the same).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .sparse_attn import entries_seen

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """Tile sizes; None picks the default for the head dim (see `_tiles`). All powers of two >= 16."""
    block_h: int | None = None  # heads per program (forward, dq)
    block_n: int | None = None  # keys per tile
    block_m: int | None = None  # (query, head) rows per tile in the key-major kernel
    d_in: int | None = None  # columns per chunk of a score contraction (and of a CSA atomic add)
    d_out: int | None = None  # output columns per backward program
    q_split: int | None = None  # HCA entry gradient: programs over the query range per entry block
    num_warps: int | None = None


# Addressing: every tile is a scalar int64 base pointer (its first row) plus int32 offsets inside it; a
# tensor of per-element 64-bit addresses would cost two registers per element (ptxas on sm_90 spilled).
# Training packs documents of every length and attends per document, so the lengths change on nearly every call;
# Triton's default specialisation of integer arguments (== 1, divisible by 16) would compile a new variant for each
# new combination (seconds each; the likely reason a timed 4K training step took 4.4 s with this kernel on the H100,
# against 2.5 s on the reference). They only bound loops and masks here, so they are left unspecialised.
_LENGTHS = ["S", "L", "N", "K"]


@triton.jit
def _load(base, rows, rm, d, dm, D: tl.constexpr):
    return tl.load(base + rows[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :], other=0.0)


@triton.jit
def _entries(C, TOPK, row, b, N, K, n_keys, j0, D: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    """Compressed-entry tile j0 of query `row`: (base, int32 rows from it, valid). HCA: entries j0 ...
    (contiguous); CSA: the top-k slots j0 ..., -1 = none."""
    j = tl.arange(0, BLOCK_N)
    valid = j0 + j < n_keys
    if MODE == 2:
        idx = tl.load(TOPK + row.to(tl.int64) * K + j0 + j, mask=valid, other=-1)
        valid = valid & (idx >= 0) & (idx < N)
        return C + (b * N).to(tl.int64) * D, tl.maximum(idx, 0), valid
    return C + (b * N + j0).to(tl.int64) * D, j, valid


@triton.jit
def _softmax_step(q, k, valid, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    logits = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BH, BN), base-2 units
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=_LENGTHS)
def _fwd_kernel(Q, W, C, TOPK, POS, SINK, O, LSE, S, H, L, N, K, qk_scale, window, ratio,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                MODE: tl.constexpr, PREC: tl.constexpr):
    """One query row x a block of heads (the heads share every key: they are the M of both matmuls).
    MODE 0: window only, 1: HCA (entries 0 .. (pos+1)//ratio - 1), 2: CSA (top-k, -1 = none)."""
    row = tl.program_id(0)  # b * S + s
    b = row // S
    s = row % S
    pos = tl.load(POS + s)
    pos0 = tl.load(POS + S - 1) - (L - 1)  # position of window row 0
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    qb = row.to(tl.int64) * H * D  # this query's (H, D) block of Q / O
    q = _load(Q + qb, h, hm, d, dm, D)
    dtype = q.dtype
    # The sink is the initial softmax state: logit sink_h with a zero value (denominator only).
    m_i = tl.load(SINK + h, mask=hm, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    for t0 in range(tl.maximum(pos - window + 1, pos0), pos + 1, BLOCK_N):
        t = tl.arange(0, BLOCK_N)
        valid = t0 + t <= pos
        k = _load(W + (b * L + t0 - pos0).to(tl.int64) * D, t, valid, d, dm, D).to(dtype)
        m_i, l_i, acc = _softmax_step(q, k, valid, m_i, l_i, acc, qk_scale, PREC)

    n_keys = entries_seen(pos, ratio, N, K, MODE)
    for j0 in range(0, n_keys, BLOCK_N):
        kb, kr, valid = _entries(C, TOPK, row, b, N, K, n_keys, j0, D, BLOCK_N, MODE)
        k = _load(kb, kr, valid, d, dm, D).to(dtype)
        m_i, l_i, acc = _softmax_step(q, k, valid, m_i, l_i, acc, qk_scale, PREC)

    o = acc / l_i[:, None]
    tl.store(O + qb + h[:, None] * D + d[None, :], o.to(O.dtype.element_ty), mask=hm[:, None] & dm[None, :])
    tl.store(LSE + row.to(tl.int64) * H + h, m_i + tl.log2(l_i), mask=hm)


@triton.jit(do_not_specialize=["R"])
def _delta_kernel(O, DO, DELTA, R, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 per (query, head): the softmax backward's correction term."""
    r0 = tl.program_id(0) * BLOCK_H
    r = tl.arange(0, BLOCK_H)
    rm = r0 + r < R
    d = tl.arange(0, BLOCK_D)
    base = r0.to(tl.int64) * D
    o = _load(O + base, r, rm, d, d < D, D).to(tl.float32)
    g = _load(DO + base, r, rm, d, d < D, D).to(tl.float32)
    tl.store(DELTA + r0 + r, tl.sum(o * g, 1), mask=rm)


@triton.jit
def _probs(QB, DOB, qr, qm, KB, kr, km, vis, lse, delta, qk_scale, scale,
           D: tl.constexpr, BLOCK_D: tl.constexpr, D_IN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           PREC: tl.constexpr):
    """p (BM, BN) and ds = p * (dO.v - delta) * scale (the gradient of the raw q.k products) for query
    rows QB/DOB + qr against key rows KB + kr, contracted D_IN columns at a time, so no 512-wide
    operand is ever one tile."""
    dtype = QB.dtype.element_ty
    s = tl.zeros([BM, BN], dtype=tl.float32)
    dp = tl.zeros([BM, BN], dtype=tl.float32)
    # A loop, not unrolled: unrolled, the compiler staged all 16 chunks' operands in shared memory at once
    # (147 KB at D = 512, 430 KB with the key loop pipelined); as a loop one chunk is resident, and only
    # this innermost loop is pipelined, its loads 3 chunks ahead (+10 KB).
    for c in tl.range(0, BLOCK_D, D_IN, num_stages=3):
        d = c + tl.arange(0, D_IN)
        dm = d < D
        k = tl.trans(_load(KB, kr, km, d, dm, D).to(dtype))
        s += tl.dot(_load(QB, qr, qm, d, dm, D), k, input_precision=PREC)
        dp += tl.dot(_load(DOB, qr, qm, d, dm, D).to(dtype), k, input_precision=PREC)
    s = tl.where(vis, s * qk_scale, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    return p, p * (dp - delta[:, None]) * scale


@triton.jit(do_not_specialize=_LENGTHS)
def _bwd_q_kernel(Q, DO, W, C, TOPK, POS, LSE, DELTA, DQ, DC, S, H, L, N, K, qk_scale, scale, window, ratio,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  D_IN: tl.constexpr, D_OUT: tl.constexpr, MODE: tl.constexpr, DC_GRAD: tl.constexpr,
                  PREC: tl.constexpr):
    """dq for one query row x a block of heads x D_OUT columns, over the same keys as the forward; for
    CSA (with DC_GRAD) also the picked entries' gradients (atomics into DC, fp32)."""
    row = tl.program_id(0)
    b = row // S
    s = row % S
    pos = tl.load(POS + s)
    pos0 = tl.load(POS + S - 1) - (L - 1)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    lse = tl.load(LSE + row.to(tl.int64) * H + h, mask=hm, other=0.0)
    delta = tl.load(DELTA + row.to(tl.int64) * H + h, mask=hm, other=0.0)
    qb = row.to(tl.int64) * H * D
    dtype = Q.dtype.element_ty
    c0 = tl.program_id(2) * D_OUT
    dout = c0 + tl.arange(0, D_OUT)
    dq = tl.zeros([BLOCK_H, D_OUT], dtype=tl.float32)

    for t0 in range(tl.maximum(pos - window + 1, pos0), pos + 1, BLOCK_N):
        t = tl.arange(0, BLOCK_N)
        valid = t0 + t <= pos
        kb = W + (b * L + t0 - pos0).to(tl.int64) * D
        p, ds = _probs(Q + qb, DO + qb, h, hm, kb, t, valid, hm[:, None] & valid[None, :], lse, delta,
                       qk_scale, scale, D, BLOCK_D, D_IN, BLOCK_H, BLOCK_N, PREC)
        dq += tl.dot(ds.to(dtype), _load(kb, t, valid, dout, dout < D, D).to(dtype), input_precision=PREC)

    n_keys = entries_seen(pos, ratio, N, K, MODE)
    for j0 in range(0, n_keys, BLOCK_N):
        kb, kr, valid = _entries(C, TOPK, row, b, N, K, n_keys, j0, D, BLOCK_N, MODE)
        p, ds = _probs(Q + qb, DO + qb, h, hm, kb, kr, valid, hm[:, None] & valid[None, :], lse, delta,
                       qk_scale, scale, D, BLOCK_D, D_IN, BLOCK_H, BLOCK_N, PREC)
        dq += tl.dot(ds.to(dtype), _load(kb, kr, valid, dout, dout < D, D).to(dtype), input_precision=PREC)
        if DC_GRAD:
            # This query's heads summed in registers first, so one atomic per (query, entry, column) per
            # head block; D_IN columns at a time to keep the (BLOCK_N, D_IN) fp32 temporary small.
            dcb = DC + (b * N).to(tl.int64) * D
            for c in tl.static_range(0, D_OUT, D_IN):
                d = c0 + c + tl.arange(0, D_IN)
                dm = d < D
                dkv = (tl.dot(tl.trans(ds.to(dtype)), _load(Q + qb, h, hm, d, dm, D), input_precision=PREC)
                       + tl.dot(tl.trans(p.to(dtype)), _load(DO + qb, h, hm, d, dm, D).to(dtype),
                                input_precision=PREC))  # (BLOCK_N, D_IN)
                tl.atomic_add(dcb + kr[:, None] * D + d[None, :], dkv, mask=valid[:, None] & dm[None, :],
                              sem="relaxed")

    tl.store(DQ + qb + h[:, None] * D + dout[None, :], dq.to(DQ.dtype.element_ty),
             mask=hm[:, None] & (dout < D)[None, :])


@triton.jit(do_not_specialize=["S", "L", "NK", "n_kb", "q_per_split"])
def _bwd_kv_kernel(Q, DO, KV, POS, LSE, DELTA, DKV, S, H, L, NK, n_kb, q_per_split, qk_scale, scale, window, ratio,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D_IN: tl.constexpr, D_OUT: tl.constexpr, HCA: tl.constexpr, PREC: tl.constexpr):
    """Gradient of BLOCK_N key rows (window rows, or HCA entries when HCA) x D_OUT columns, summed over
    the (query, head) rows that see them, BLOCK_M at a time; writes split program_id(2)'s partial."""
    pid = tl.program_id(0)
    b = pid // n_kb
    t0 = (pid % n_kb) * BLOCK_N
    t = tl.arange(0, BLOCK_N)
    tm = t0 + t < NK
    kb = KV + (b * NK + t0).to(tl.int64) * D
    split = tl.program_id(2)
    q_pos0 = tl.load(POS)
    if HCA:
        s_lo = (t0 + 1) * ratio - 1 - q_pos0  # first query whose finished entries include t0
        s_hi = S
    else:
        kpos = tl.load(POS + S - 1) - (L - 1) + t0 + t
        s_lo = t0 - (L - S)  # the query whose own row is t0 ...
        s_hi = t0 + BLOCK_N - 1 + window - (L - S)  # ... to the last one whose window reaches row t0 + BN - 1
    s_lo = tl.maximum(tl.maximum(s_lo, split * q_per_split), 0)
    s_hi = tl.minimum(tl.minimum(s_hi, (split + 1) * q_per_split), S)
    dtype = Q.dtype.element_ty
    dout = tl.program_id(1) * D_OUT + tl.arange(0, D_OUT)
    acc = tl.zeros([BLOCK_N, D_OUT], dtype=tl.float32)
    # (query, head) pairs of sequence b are consecutive rows of Q viewed as (B*S*H, D): a tile of
    # BLOCK_M of them is one contiguous block, whatever the head count.
    r = tl.arange(0, BLOCK_M)
    for r0 in range(s_lo * H, s_hi * H, BLOCK_M):
        rm = r0 + r < s_hi * H
        qb = (b.to(tl.int64) * S * H + r0) * D
        qpos = tl.load(POS + (r0 + r) // H, mask=rm, other=0)
        lse = tl.load(LSE + b.to(tl.int64) * S * H + r0 + r, mask=rm, other=0.0)
        delta = tl.load(DELTA + b.to(tl.int64) * S * H + r0 + r, mask=rm, other=0.0)
        if HCA:
            vis = (t0 + t[None, :] + 1) * ratio <= qpos[:, None] + 1
        else:
            dist = qpos[:, None] - kpos[None, :]
            vis = (dist >= 0) & (dist < window)
        vis = vis & rm[:, None] & tm[None, :]
        p, ds = _probs(Q + qb, DO + qb, r, rm, kb, t, tm, vis, lse, delta, qk_scale, scale,
                       D, BLOCK_D, D_IN, BLOCK_M, BLOCK_N, PREC)
        acc += tl.dot(tl.trans(ds.to(dtype)), _load(Q + qb, r, rm, dout, dout < D, D),
                      input_precision=PREC)  # as a key
        acc += tl.dot(tl.trans(p.to(dtype)), _load(DO + qb, r, rm, dout, dout < D, D).to(dtype),
                      input_precision=PREC)  # as a value
    # this split's (B, NK, D) slab
    out = DKV + ((split * (tl.num_programs(0) // n_kb) + b) * NK + t0).to(tl.int64) * D
    tl.store(out + t[:, None] * D + dout[None, :], acc.to(DKV.dtype.element_ty), mask=tm[:, None] & (dout < D)[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _tiles(t: Tiles, H: int, D: int, dtype: torch.dtype, rows: int, sms: int) -> dict:
    """Defaults from the head dim and dtype, chosen without a GPU: every launch compiled for sm_90 ahead of
    time (`benchmarks/attention_train.py --sm90 --spills`: shared memory per program, ptxas's registers and
    spills; the card allows 232,448 bytes) and kept where it fits with no spills; untimed.
    bf16 at D = 512 (Flash): 64 heads x 256 output columns per dq program (wgmma-sized, every head's CSA
    gradient summed before one atomic), 32-column contraction chunks, 64 (query, head) rows x 32 keys per
    key-major program; the price of 256 output columns is each tile's scores computed twice.
    fp32 takes ieee products, which run on the FMA units: each operand is staged through shared memory whole
    and each product unrolled in registers, so at D = 512 the bf16 tiles need 270-800 KB and spill up to
    160 KB (at D = 128-256 they fit but spill 1-170 KB); 16 x 16 tiles and 64 output columns fit at every
    D (<= 66 KB at 512) with no spills.
    Pipelining: the forward keeps two key tiles in flight (as the inference kernel, measured on the H100);
    the backward pipelines only its innermost loop, over contraction chunks (`_probs`), since a 3-stage key
    loop over the 16 unrolled chunks asked for 430 KB."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    heads = max(16, min(64, triton.next_power_of_2(H)))
    if dtype == torch.float32:
        d = dict(block_h=16, block_n=16, block_m=16, d_in=32, d_out=64, num_warps=4, fwd_block_h=16)
    elif BLOCK_D > 256:
        # forward heads as the inference kernel (sparse_attn.attend): 32 when too few rows fill the card
        d = dict(block_h=heads, block_n=32, block_m=64, d_in=32, d_out=256, num_warps=8,
                 fwd_block_h=min(heads, 64 if rows >= 2 * sms else 32))
    else:
        d = dict(block_h=heads, block_n=16, block_m=32, d_in=BLOCK_D, d_out=BLOCK_D, num_warps=4, fwd_block_h=heads)
    d_out = min(t.d_out or d["d_out"], BLOCK_D)
    return dict(BLOCK_D=BLOCK_D,
                block_h=t.block_h or d["block_h"],
                fwd_block_h=t.block_h or d["fwd_block_h"],
                block_n=t.block_n or d["block_n"],
                block_m=t.block_m or d["block_m"],
                d_in=min(t.d_in or d["d_in"], d_out),
                d_out=d_out,
                num_warps=t.num_warps or d["num_warps"])


def _prec(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 models get fp32 products, not tf32


def _mode(compressed, topk) -> int:
    if compressed is None or not compressed.shape[1]:
        return 0
    if topk is None:
        return 1
    return 2 if topk.shape[-1] else 0


class SparseAttention(torch.autograd.Function):
    """q (B, S, H, D), window_kv (B, L, D), compressed (B, N, D) or None, sink (H,) -> (B, S, H, D);
    gradients for all four. positions (S,) int, topk (B, S, k) int or None carry none."""

    @staticmethod
    def forward(ctx, q, window_kv, compressed, sink, positions, topk, ratio, scale, window, tiles):
        B, S, H, D = q.shape
        L = window_kv.shape[1]
        mode = _mode(compressed, topk)
        t = _tiles(tiles, H, D, q.dtype, B * S, _num_sms(q.device))
        q_, w_ = q.contiguous(), window_kv.contiguous()
        c_ = compressed.contiguous() if mode else w_  # placeholder of the right type when unused
        pos = positions.to(device=q.device, dtype=torch.int32).contiguous()
        tk = topk.to(torch.int32).contiguous() if mode == 2 else pos
        N = compressed.shape[1] if mode else 0
        K = topk.shape[-1] if mode == 2 else 0
        o = torch.empty_like(q_)
        lse = torch.empty(B, S, H, device=q.device, dtype=torch.float32)
        bh = t["fwd_block_h"]
        _fwd_kernel[(B * S, triton.cdiv(H, bh))](
            q_, w_, c_, tk, pos, sink, o, lse, S, H, L, N, K, scale * LOG2E, window, ratio,
            D=D, BLOCK_D=t["BLOCK_D"], BLOCK_H=bh, BLOCK_N=t["block_n"], MODE=mode, PREC=_prec(q),
            num_warps=t["num_warps"], num_stages=2)
        ctx.save_for_backward(q_, w_, c_ if mode else None, sink, pos, tk if mode == 2 else None, o, lse)
        ctx.args = (mode, ratio, scale, window, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        q, w, c, sink, pos, tk, o, lse = ctx.saved_tensors
        mode, ratio, scale, window, tiles = ctx.args
        B, S, H, D = q.shape
        L = w.shape[1]
        N = c.shape[1] if mode else 0
        K = tk.shape[-1] if mode == 2 else 0
        t = _tiles(tiles, H, D, q.dtype, B * S, _num_sms(q.device))
        BLOCK_D, bn, d_in, d_out, warps = t["BLOCK_D"], t["block_n"], t["d_in"], t["d_out"], t["num_warps"]
        n_out = triton.cdiv(D, d_out)
        prec, qk_scale = _prec(q), scale * LOG2E
        do = do.to(q.dtype).contiguous()
        delta = torch.empty_like(lse)
        _delta_kernel[(triton.cdiv(B * S * H, 16),)](o, do, delta, B * S * H, D=D, BLOCK_D=BLOCK_D, BLOCK_H=16,
                                                    num_warps=4)
        need_q, need_w, need_c, need_sink = ctx.needs_input_grad[:4]
        need_c = need_c and mode != 0  # else no entry was attended: the gradient is zero (None)

        dq = dw = dc = dsink = None
        dc32 = torch.zeros(B, N, D, device=q.device, dtype=torch.float32) if mode == 2 and need_c else None
        # num_stages=1: the key / row loops are not pipelined, only `_probs`'s chunk loop inside them (see _tiles)
        if need_q or dc32 is not None:
            dq = torch.empty_like(q)
            bh = t["block_h"]
            _bwd_q_kernel[(B * S, triton.cdiv(H, bh), n_out)](
                q, do, w, c if mode else w, tk if mode == 2 else pos, pos, lse, delta, dq,
                dc32 if dc32 is not None else dq, S, H, L, N, K, qk_scale, scale, window, ratio,
                D=D, BLOCK_D=BLOCK_D, BLOCK_H=bh, BLOCK_N=bn, D_IN=d_in, D_OUT=d_out, MODE=mode,
                DC_GRAD=dc32 is not None, PREC=prec, num_warps=warps, num_stages=1)
            dq = dq if need_q else None
        kv_args = dict(D=D, BLOCK_D=BLOCK_D, BLOCK_M=t["block_m"], BLOCK_N=bn, D_IN=d_in, D_OUT=d_out, PREC=prec,
                       num_warps=warps, num_stages=1)
        if need_w:
            dw = torch.empty_like(w)
            n_kb = triton.cdiv(L, bn)
            _bwd_kv_kernel[(B * n_kb, n_out, 1)](q, do, w, pos, lse, delta, dw, S, H, L, L, n_kb, S, qk_scale, scale,
                                                 window, ratio, HCA=False, **kv_args)
        if need_c and mode == 1:
            n_kb = triton.cdiv(N, bn)
            n_split = tiles.q_split or max(1, min(64, triton.cdiv(S, 64),
                                                  triton.cdiv(4 * _num_sms(q.device), B * n_kb * n_out)))
            per_split = triton.cdiv(S, n_split)
            part = torch.empty(n_split, B, N, D, device=q.device, dtype=torch.float32)
            _bwd_kv_kernel[(B * n_kb, n_out, n_split)](q, do, c, pos, lse, delta, part, S, H, L, N, n_kb, per_split,
                                                       qk_scale, scale, window, ratio, HCA=True, **kv_args)
            dc = part.sum(0)
        elif need_c:
            dc = dc32
        if need_c:
            dc = dc.to(c.dtype)
        if need_sink:
            # d sink_h = sum over rows of p_sink * (0 - delta): the sink's value is zero.
            p_sink = torch.exp2(sink.float()[None, None] * LOG2E - lse)
            dsink = -(p_sink * delta).sum((0, 1)).to(sink.dtype)
        return dq, dw, dc, dsink, None, None, None, None, None, None


def sparse_attention_train(q, window_kv, positions, compressed, topk, ratio, sink, scale, window,
                           tiles: Tiles = Tiles()) -> torch.Tensor:
    """The reference's signature (`dsv4.attention.sparse_attention`), differentiable in q, window_kv,
    compressed and sink."""
    return SparseAttention.apply(q, window_kv, compressed, sink, positions, topk, ratio, scale, window, tiles)
