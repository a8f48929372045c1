"""V4 core attention for decode (one query token per sequence, ragged lengths): flash-decoding.

Why a kernel of its own: in decode a layer's work is tiny (CSA: 128 window + 512 picked keys; HCA at 1M:
128 + 8192 keys; < 5 MB of FP8 records) and the general kernel (`sparse_attn`) spent ~100 µs at every
context on latency: a few programs walking 4-8 dependent 512-wide iterations each, FP8 scales gathered
once per dim, and a merge that visited the splits one after another. Here:

  `_partial_kernel`  grid (splits, head blocks, B). A split owns CHUNK consecutive keys of one source (window
                     splits first, then compressed: the indexer's top-k for CSA, or every finished entry for
                     HCA) and BLOCK_H query heads (MQA: the heads are the M of both matmuls); with a value
                     split, VS programs share the split and head block, one slice of the value dims each. A key is two
                     dot operands, as the FP8 record (`fp8_kv`) stores it: the E4M3 dims, dequantised to the
                     model dtype with one scale load per 64 dims, and the BF16 RoPE dims; logits = q.k + qr.kr
                     and the value product goes to two accumulators, so no key is ever assembled from both
                     halves. Row loads carry their alignment (8 bytes for records) and vectorise. It writes
                     the partial softmax state (running max m, denominator l, unnormalised output) in fp32.
  `_merge_kernel`    grid (B, heads, D / BLOCK_DM): loads every split of its heads in one go (no serial loop over
                     splits), adds the sink to the denominator (§2.3: logit sink_h, zero value), normalises.

The reference is `dsv4.attention.sparse_attention`; `attend_decode` takes the arguments of
`sparse_attn.attend` (paged / ring / dense sources), `sparse_attention_decode` the reference's signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .sparse_attn import LOG2E, KVSource, _align, _num_sms, _row_of, dense_source, entries_seen, reference  # noqa: F401

NEG = tl.constexpr(-1e30)  # "no key yet": finite, so exp2(NEG - m) is 0 without inf - inf


@triton.jit
def _block_rows(T, st, BS, b, j0, BLOCK_N: tl.constexpr, ZERO):
    """Pool rows of entries j0 .. j0 + BLOCK_N - 1 of sequence b when they lie in one pool block (j0 a multiple
    of BLOCK_N, BLOCK_N dividing the block size): one table load for the block instead of a gather and an
    integer division per key. ZERO as in `_row_of` (the true alignment is stated by the caller)."""
    blk = tl.load(T + b * st + j0 // BS)
    return blk.to(tl.int64) * BS + j0 % BS + tl.arange(0, BLOCK_N) + ZERO


@triton.jit
def _keep_layout(x, ON: tl.constexpr):
    """x itself, through an identity the compiler cannot see into (ON; not in the CPU interpreter, which runs no
    PTX). Why: a dequantised key feeds two mma.sync matmuls in two register layouts, and Triton rematerialises the
    dequantisation in each layout from the FP8 bytes, read from shared memory one byte at a time (the value
    product needs the key transposed: a thread's two bytes lie a row apart). Behind the identity the bf16 key is
    converted once and changes layout as 16-bit data (ldmatrix). ncu on an H200: LDS.U8 and its byte packing held
    ~35 % of the HCA kernel's stall samples; offline sm_90 build (Triton 3.6): 918 -> 492 warp-instructions per
    key; H200 at 1M: HCA 30.6 -> 22.0 us, CSA 11.7 -> 9.8 us, the same outputs (RESULTS.md "Session 5")."""
    if ON:  # one 32-bit register per asm call: 1 fp32 value or 2 16-bit ones
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False,
                                      pack=32 // x.dtype.primitive_bitwidth)
    return x


@triton.jit
def _load_nope(X, XS, s0, ss, rows, valid, D0, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr,
               NOPE: tl.constexpr, GS: tl.constexpr, FP8: tl.constexpr, SCALED: tl.constexpr, dtype: tl.constexpr,
               OPAQUE: tl.constexpr):
    """`rows` -> dims [D0, D0 + WIDTH) of the first operand, (BLOCK_N, WIDTH) in `dtype`, zero past NOPE and on
    invalid rows. D0 is a multiple of GS, GS divides 64 and WIDTH.

    FP8 records: the E4M3 part is viewed as (BLOCK_N, groups of GS dims) so each group costs one UE8M0 scale
    load; E4M3 x 2^(e - 127) -> dtype is exact (4 significant bits times a power of two). SCALED=False leaves
    the scale out (bare E4M3 values, also exact in dtype): the caller applies it to a product instead. Row
    offsets carry the host-checked alignment (`_align`) so the loads vectorise (8-byte loads of the
    8-byte-aligned records)."""
    ro = tl.multiple_of(rows * s0, ALIGN)
    v = valid[:, None]
    if FP8:
        g = tl.arange(0, WIDTH // GS)[None, :]  # (1, NG) group
        d = D0 + g[:, :, None] * GS + tl.arange(0, GS)[None, None, :]  # (1, NG, GS) dim
        x = tl.load(X + ro[:, None, None] + d, mask=v[:, :, None] & (d < NOPE), other=0.0)
        if SCALED:
            e = tl.load(XS + rows[:, None] * ss + (D0 + g * GS) // 64, mask=v & (D0 + g * GS < NOPE), other=127)
            sc = (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127), exactly
            k = _keep_layout(tl.reshape((x.to(tl.float32) * sc[:, :, None]).to(dtype), (BLOCK_N, WIDTH)), OPAQUE)
        else:
            k = _keep_layout(tl.reshape(x.to(dtype), (BLOCK_N, WIDTH)), OPAQUE)
    else:
        dm = D0 + tl.arange(0, WIDTH)[None, :]
        k = tl.load(X + ro[:, None] + dm, mask=v & (dm < NOPE), other=0.0).to(dtype)
    return k


@triton.jit
def _group_scale(XS, ss, rows, valid, D0):
    """(BLOCK_N,) fp32 UE8M0 multipliers of the 64-dim scale block holding dim D0 (1 on invalid rows)."""
    e = tl.load(XS + rows * ss + D0 // 64, mask=valid, other=127)
    return (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_rope(X, XR, s0, sr, rows, valid, ALIGN: tl.constexpr, RALIGN: tl.constexpr, NOPE: tl.constexpr,
               RD: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr, dtype: tl.constexpr):
    """`rows` -> the second operand kr (BLOCK_N, RD) = dims [NOPE, NOPE + ROPE): BF16 in the record's own slot
    (FP8) or the dense row's tail."""
    dr = tl.arange(0, RD)[None, :]
    v = valid[:, None]
    if FP8:
        rr = tl.multiple_of(rows * sr, RALIGN)
        kr = tl.load(XR + rr[:, None] + dr, mask=v & (dr < ROPE), other=0.0).to(dtype)
    else:
        ro = tl.multiple_of(rows * s0, ALIGN)
        kr = tl.load(X + ro[:, None] + NOPE + dr, mask=v & (dr < ROPE), other=0.0).to(dtype)
    return kr


@triton.jit
def _step(q, qr, QROW, qmask, X, XR, XS, s0, sr, ss, rows, valid, m_i, l_i, acc, acc_r, qk_scale, d0,
          ALIGN: tl.constexpr, RALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
          NOPE: tl.constexpr, RD: tl.constexpr, ROPE: tl.constexpr, GS: tl.constexpr, FP8: tl.constexpr,
          PREC: tl.constexpr, DV: tl.constexpr, GSV: tl.constexpr, QK_GROUPS: tl.constexpr, OPAQUE: tl.constexpr):
    """One block of BLOCK_N keys folded into the online softmax of BLOCK_H heads: logits = q.k + qr.kr, and
    the value product into the two accumulators acc (this program's value dims [d0, d0 + DV) of [0, NOPE))
    and acc_r (the RoPE dims).

    QK_GROUPS: the logits one 64-dim scale group at a time, q's slice reloaded (L1) instead of held, the bare
    E4M3 values as the operand and the UE8M0 scale applied to the (BLOCK_H, BLOCK_N) product (exact: a power
    of two), so no dequantised copy of the key feeds QK and q (64 heads x 512 dims) needs no registers.
    DV < BLOCK_M (value split): only this program's value dims are dequantised for the value product."""
    dtype = qr.dtype
    if QK_GROUPS:
        logits = tl.zeros([QROW.shape[0], BLOCK_N], dtype=tl.float32)
        dg = tl.arange(0, GS)[None, :]
        for g in tl.static_range(0, NOPE, GS):
            qg = tl.load(QROW + g + dg, mask=qmask & (g + dg < NOPE), other=0.0)
            x = _load_nope(X, XS, s0, ss, rows, valid, g, ALIGN, BLOCK_N, GS, NOPE, GS, FP8, False, dtype, OPAQUE)
            part = tl.dot(qg, tl.trans(x), input_precision=PREC)
            if FP8:
                part = part * _group_scale(XS, ss, rows, valid, g)[None, :]
            logits += part
        k = x  # unused placeholder (the value operand is loaded below)
    else:
        k = _load_nope(X, XS, s0, ss, rows, valid, 0, ALIGN, BLOCK_N, BLOCK_M, NOPE, GS, FP8, True, dtype, OPAQUE)
        logits = tl.dot(q, tl.trans(k), input_precision=PREC)
    if RD > 0:
        kr = _load_rope(X, XR, s0, sr, rows, valid, ALIGN, RALIGN, NOPE, RD, ROPE, FP8, dtype)
        logits = tl.dot(qr, tl.trans(kr), logits, input_precision=PREC)
    logits = tl.where(valid[None, :], logits * qk_scale, float("-inf"))  # (BH, BN), base 2
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(dtype)
    if QK_GROUPS or DV < BLOCK_M:
        k = _load_nope(X, XS, s0, ss, rows, valid, d0, ALIGN, BLOCK_N, DV, NOPE, GSV, FP8, True, dtype, OPAQUE)
    acc = tl.dot(p, k, acc * alpha[:, None], input_precision=PREC)
    if RD > 0:
        acc_r = tl.dot(p, kr, acc_r * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc, acc_r


@triton.jit(do_not_specialize=["ZERO"])
def _partial_kernel(ZERO, Q, sqb, sqh, POS,
                    W, WR, WS, sw0, swr, sws, WT, swt, WBS, WPOS0, WLO,
                    C, CR, CS, sc0, scr, scs, CT, sct, CBS, NC,
                    TOPK, stb, K,
                    PO, PM, PL, NSPLIT, H, qk_scale, window, ratio, W_SPLITS,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, NOPE: tl.constexpr, RD: tl.constexpr,
                    ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, GS: tl.constexpr,
                    CHUNK: tl.constexpr, W_CHUNK: tl.constexpr, W_FP8: tl.constexpr, C_FP8: tl.constexpr,
                    W_ALIGN: tl.constexpr, W_RALIGN: tl.constexpr, C_ALIGN: tl.constexpr, C_RALIGN: tl.constexpr,
                    W_RING: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, VS: tl.constexpr,
                    GSV: tl.constexpr, QK_GROUPS: tl.constexpr, CONTIG: tl.constexpr, OPAQUE: tl.constexpr):
    split = tl.program_id(0)
    hb = tl.program_id(1) // VS
    vs = tl.program_id(1) % VS  # value slice: this program's value dims [d0, d0 + DV)
    b = tl.program_id(2)
    DV: tl.constexpr = BLOCK_M // VS
    d0 = vs * DV
    pos = tl.load(POS + b)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    qrow = Q + b * sqb + h[:, None] * sqh  # (BH, 1)
    dm = tl.arange(0, BLOCK_M)
    if RD > 0:
        dr = tl.arange(0, RD)
        qr = tl.load(qrow + NOPE + dr[None, :], mask=hm[:, None] & (dr < ROPE)[None, :], other=0.0)
    if QK_GROUPS:  # q is reloaded a scale group at a time in `_step`
        q = tl.zeros([BLOCK_H, 16], dtype=Q.dtype.element_ty)  # placeholder, never used
    else:
        q = tl.load(qrow + dm[None, :], mask=hm[:, None] & (dm < NOPE)[None, :], other=0.0)
    if RD == 0:  # no RoPE operand: placeholder of fixed type, never used
        qr = q
    m_i = tl.full([BLOCK_H], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV], dtype=tl.float32)
    if RD > 0:
        acc_r = tl.zeros([BLOCK_H, RD], dtype=tl.float32)
    else:
        acc_r = acc
    if split < W_SPLITS:  # window: positions lo .. pos, W_CHUNK of them per split
        lo = tl.maximum(pos - window + 1, tl.load(WLO + b))
        start = lo + split * W_CHUNK
        end = tl.minimum(start + W_CHUNK, pos + 1)
        pos0 = tl.load(WPOS0 + b)
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            valid = t < end
            if W_RING > 0:
                li = t % W_RING
            else:
                li = t - pos0
            rows = _row_of(WT, swt, WBS, b, li, valid, ZERO)
            m_i, l_i, acc, acc_r = _step(q, qr, qrow, hm[:, None], W, WR, WS, sw0, swr, sws, rows, valid, m_i, l_i, acc,
                                         acc_r, qk_scale, d0, W_ALIGN, W_RALIGN, BLOCK_N, BLOCK_M, NOPE, RD, ROPE, GS,
                                         W_FP8, PREC, DV, GSV, QK_GROUPS, OPAQUE)
    elif MODE > 0:  # compressed: HCA every finished entry (MODE 1), CSA the top-k list (MODE 2)
        nc = tl.load(NC + b)
        n_keys = entries_seen(pos, ratio, nc, K, MODE)
        start = (split - W_SPLITS) * CHUNK
        end = tl.minimum(start + CHUNK, n_keys)
        for j0 in range(start, end, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            valid = j < end
            if MODE == 2:
                li = tl.load(TOPK + b * stb + j, mask=valid, other=-1).to(tl.int32)
                valid = valid & (li >= 0) & (li < nc)
                li = tl.maximum(li, 0)
                rows = _row_of(CT, sct, CBS, b, li, valid, ZERO)
            elif CONTIG:  # HCA reads entries in order: a key block is one pool block's slice
                rows = _block_rows(CT, sct, CBS, b, j0, BLOCK_N, ZERO)
            else:
                rows = _row_of(CT, sct, CBS, b, j, valid, ZERO)
            m_i, l_i, acc, acc_r = _step(q, qr, qrow, hm[:, None], C, CR, CS, sc0, scr, scs, rows, valid, m_i, l_i, acc,
                                         acc_r, qk_scale, d0, C_ALIGN, C_RALIGN, BLOCK_N, BLOCK_M, NOPE, RD, ROPE, GS,
                                         C_FP8, PREC, DV, GSV, QK_GROUPS, OPAQUE)
    base = (b * NSPLIT + split) * H + h  # (BH,) rows of the (B, NSPLIT, H) partial state
    po = PO + base[:, None] * BLOCK_D
    dv = d0 + tl.arange(0, DV)
    tl.store(po + dv[None, :], acc, mask=hm[:, None] & (dv < NOPE)[None, :])
    # Every value slice computed the same logits (same code, same inputs): one of them writes m, l and acc_r.
    if RD > 0:
        if vs == VS - 1:
            tl.store(po + NOPE + dr[None, :], acc_r, mask=hm[:, None] & (dr < ROPE)[None, :])
    if vs == 0:
        tl.store(PM + base, m_i, mask=hm)
        tl.store(PL + base, l_i, mask=hm)


@triton.jit
def _merge_kernel(PO, PM, PL, SINK, O, sob, soh, NSPLIT, H,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HM: tl.constexpr,
                  BLOCK_DM: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_HM + tl.arange(0, BLOCK_HM)
    d = tl.program_id(2) * BLOCK_DM + tl.arange(0, BLOCK_DM)
    sp = tl.arange(0, BLOCK_S)
    hm = h < H
    sm = sp[:, None] < NSPLIT
    base = (b * NSPLIT + sp[:, None]) * H + h[None, :]  # (BLOCK_S, BLOCK_HM)
    pm = tl.load(PM + base, mask=sm & hm[None, :], other=NEG)
    pl = tl.load(PL + base, mask=sm & hm[None, :], other=0.0)
    po = tl.load(PO + base[:, :, None] * BLOCK_D + d[None, None, :], mask=(sm & hm[None, :])[:, :, None], other=0.0)
    sink = tl.load(SINK + h, mask=hm, other=0.0).to(tl.float32) * 1.4426950408889634
    m = tl.maximum(tl.max(pm, 0), sink)  # (BLOCK_HM,)
    w = tl.exp2(pm - m[None, :])
    denom = tl.sum(w * pl, 0) + tl.exp2(sink - m)
    o = tl.sum(w[:, :, None] * po, 0) / denom[:, None]  # (BLOCK_HM, BLOCK_DM)
    tl.store(O + b * sob + h[:, None] * soh + d[None, :], o.to(O.dtype.element_ty),
             mask=hm[:, None] & (d < D)[None, :])


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


def attend_decode(q: torch.Tensor, positions: torch.Tensor, sink: torch.Tensor, scale: float, window: int,
                  win: KVSource, win_pos0: torch.Tensor, win_lo: torch.Tensor, win_ring: int = 0,
                  comp: KVSource | None = None, n_comp: torch.Tensor | None = None, max_comp: int = 0,
                  topk: torch.Tensor | None = None, ratio: int = 1, rope_dim: int = 0, chunk: int | None = None,
                  block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int = 2, out: torch.Tensor | None = None, value_split: int = 1,
                  qk_groups: bool = False, contiguous_blocks: bool | None = None,
                  keep_layout: bool = True) -> torch.Tensor:
    """`sparse_attn.attend` for one query per sequence: q (B, 1, H, D), positions (B, 1) int32.

    Sources, `win_pos0` / `win_lo` / `win_ring`, `n_comp` / `max_comp` and `topk` (B, 1, k) (CSA; None = HCA)
    mean what they mean there. Tiles: `block_h` heads per program, `block_n` keys per step, `chunk`
    compressed keys per split (default: enough splits for ~2 programs per SM). `value_split` programs share a
    head block and split its value dims (each computes the logits, dequantises only its slice for the value
    product: a (heads x dims / value_split) accumulator, so a 64-head tile fits); `qk_groups` forms the logits
    per 64-dim scale group from the bare E4M3 values with q reloaded per group (no dequantised key and no q
    held for QK); `contiguous_blocks` (HCA) looks up one block-table entry per key block (needs `block_n`
    to divide the pool's block size; None: wherever it does, 33.3 -> 30.4 us for HCA at 1M on the H100,
    RESULTS.md "Session 3"); `keep_layout` (on by default; the CPU interpreter never has it) converts each FP8
    key tile to the model dtype once and moves it between the two matmuls' layouts as 16-bit data
    (`_keep_layout`). The other defaults are the kernel as tuned in RESULTS.md "Decode kernels v2". (Session 4's
    `grouped` step, which never dequantised a key, was removed in session 5: no faster than the default before
    `_keep_layout`, 1.4x slower after it; RESULTS.md "Session 4" / "Session 5".)"""
    B, S, H, D = q.shape
    assert S == 1 and q.stride(-1) == 1, "decode path: one query per sequence (use sparse_attn.attend)"
    BLOCK_D = _pow2(D)
    BLOCK_H = block_h or 16  # 16-head tiles: 1.7x faster than 32 for decode (results/tune_decode_h100.jsonl)
    BLOCK_N = block_n or (32 if D > 256 else 16)
    num_warps = num_warps or 4
    mode = 0 if comp is None else (2 if topk is not None else 1)
    if comp is None:
        comp, n_comp = win, win_lo  # placeholders of the right types; never read
    # FP8 records split each key into the E4M3 dims [0, nope) and the BF16 RoPE dims: two dot operands.
    nope = D - rope_dim if (win.fp8 or comp.fp8) else D
    BLOCK_M = max(16, _pow2(nope))
    RD = max(16, _pow2(D - nope)) if D > nope else 0
    GS = min(64, BLOCK_M)  # dims per scale load (the FP8 scale block is 64)
    n_keys = 0 if mode == 0 else (topk.shape[-1] if mode == 2 else max_comp)
    assert value_split >= 1 and BLOCK_M % value_split == 0, "value_split: a power of two dividing the E4M3 dims"
    programs_per_split = B * triton.cdiv(H, BLOCK_H) * value_split
    if chunk is None:  # in the CPU interpreter programs run one after another: splitting only adds work
        want = max(1, triton.cdiv(2 * _num_sms(q.device), programs_per_split)) if q.is_cuda else 1
        chunk = triton.cdiv(max(n_keys, 1), want)
    chunk = triton.cdiv(max(chunk, BLOCK_N), BLOCK_N) * BLOCK_N
    if contiguous_blocks is None:
        contiguous_blocks = mode == 1 and comp.block_size % BLOCK_N == 0
    if contiguous_blocks and mode == 1 and comp.block_size % BLOCK_N:
        raise ValueError(f"contiguous_blocks: block_n={BLOCK_N} must divide the pool block size {comp.block_size}")
    w_chunk = min(chunk, triton.cdiv(min(window, 64), BLOCK_N) * BLOCK_N)
    w_splits = triton.cdiv(window, w_chunk)
    n_split = w_splits + triton.cdiv(n_keys, chunk)
    po = torch.empty(B, n_split, H, BLOCK_D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B, n_split, H, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    out = torch.empty_like(q) if out is None else out
    tk = topk if topk is not None else positions
    aligns = [(_align(s.main), _align(s.rope) if s.fp8 else 1) for s in (win, comp)]
    _partial_kernel[(n_split, programs_per_split // B, B)](
        0, q, q.stride(0), q.stride(2), positions,
        *win.args(), win_pos0, win_lo, *comp.args(), n_comp,
        tk, tk.stride(0), n_keys if mode == 2 else 0,
        po, pm, pl, n_split, H, scale * LOG2E, window, ratio, w_splits,
        BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, NOPE=nope, RD=RD, ROPE=D - nope, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, GS=GS,
        CHUNK=chunk, W_CHUNK=w_chunk, W_FP8=win.fp8, C_FP8=comp.fp8, W_ALIGN=aligns[0][0], W_RALIGN=aligns[0][1],
        C_ALIGN=aligns[1][0], C_RALIGN=aligns[1][1], W_RING=win_ring, MODE=mode,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", VS=value_split, GSV=min(GS, BLOCK_M // value_split),
        QK_GROUPS=qk_groups, CONTIG=contiguous_blocks and mode == 1,
        OPAQUE=keep_layout and not interpreting(), num_warps=num_warps, num_stages=num_stages)
    BLOCK_S = _pow2(n_split)
    # One head per merge program on the GPU (parallelism), all heads in the interpreter (fewer programs).
    BLOCK_HM = 1 if q.is_cuda else _pow2(H)
    BLOCK_DM = max(16, min(BLOCK_D, 8192 // (BLOCK_S * BLOCK_HM))) if q.is_cuda else BLOCK_D  # <= 32 KB a program
    _merge_kernel[(B, triton.cdiv(H, BLOCK_HM), BLOCK_D // BLOCK_DM)](
        po, pm, pl, sink, out, out.stride(0), out.stride(2), n_split, H,
        D=D, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S, BLOCK_HM=BLOCK_HM, BLOCK_DM=BLOCK_DM, num_warps=4)
    return out


def sparse_attention_decode(q, window_kv, positions, compressed, topk, ratio, sink, scale, window,
                            **kwargs) -> torch.Tensor:
    """The reference's signature (`dsv4.attention.sparse_attention`) for S == 1: window_kv (B, L, D) whose
    last row is the query's own key, compressed (B, N, D) or None, topk (B, 1, k) or None."""
    B, S, H, D = q.shape
    L = window_kv.shape[1]
    dev = q.device
    pos = positions.to(device=dev, dtype=torch.int32)[None].expand(B, S).contiguous()
    pos0 = (positions[-1] - (L - 1)).to(device=dev, dtype=torch.int32).reshape(1).expand(B).contiguous()
    comp = n_comp = tk = None
    N = 0
    if compressed is not None and compressed.shape[1] and (topk is None or topk.shape[-1]):
        N = compressed.shape[1]
        comp, n_comp = dense_source(compressed), torch.full((B,), N, device=dev, dtype=torch.int32)
        tk = None if topk is None else topk.to(torch.int32).contiguous()
    return attend_decode(q, pos, sink, scale, window, dense_source(window_kv), pos0, pos0, comp=comp,
                         n_comp=n_comp, max_comp=N, topk=tk, ratio=ratio, **kwargs)
