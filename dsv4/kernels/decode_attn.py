"""V4 core attention for decode (one query token per sequence, ragged lengths): flash-decoding.

Why a kernel of its own: in decode a layer's work is tiny (CSA: 128 window + 512 picked keys; HCA at 1M:
128 + 8192 keys; < 5 MB of FP8 records) and the general kernel (`sparse_attn`) spent ~100 µs at every
context on latency: a few programs walking 4-8 dependent 512-wide iterations each, FP8 scales gathered
once per dim, and a merge that visited the splits one after another. Here:

  `_partial_kernel`  grid (splits, head blocks x value slices, B). A split owns CHUNK consecutive keys of
                     one source (window splits first, then compressed: the indexer's top-k for CSA, or every
                     finished entry for HCA), BLOCK_H query heads (MQA: the heads are the M of both matmuls)
                     and the value dims [dv, dv + BLOCK_DV); logits use all D dims. FP8 records (`fp8_kv`)
                     are dequantised in the kernel with one scale load per 64 dims. It writes the partial
                     softmax state (running max m, denominator l, unnormalised output) in fp32.
  `_merge_kernel`    grid (B, heads, D / BLOCK_DM): loads every split of its heads in one go (no serial loop over
                     splits), adds the sink to the denominator (§2.3: logit sink_h, zero value), normalises.

The reference is `dsv4.attention.sparse_attention`; `attend_decode` takes the arguments of
`sparse_attn.attend` (paged / ring / dense sources), `sparse_attention_decode` the reference's signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_attn import LOG2E, KVSource, _num_sms, _row_of, dense_source, reference  # noqa: F401

NEG = tl.constexpr(-1e30)  # "no key yet": finite, so exp2(NEG - m) is 0 without inf - inf


@triton.jit
def _load_keys(X, XR, XS, s0, sr, ss, rows, valid, d0, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr,
               G: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, FP8: tl.constexpr, dtype: tl.constexpr):
    """Dims [d0, d0 + WIDTH) of `rows` -> (BLOCK_N, WIDTH) in `dtype`, zero outside D / invalid rows.

    Dims are viewed as (WIDTH / G) groups of G (G divides 64, the FP8 scale block), so an FP8 row costs one
    scale load per group, not per dim."""
    r = rows[:, None, None].to(tl.int64)
    v = valid[:, None, None]
    g = d0 + tl.arange(0, WIDTH // G)[None, :, None] * G  # (1, NG, 1) first dim of each group
    d = g + tl.arange(0, G)[None, None, :]  # (1, NG, G)
    if FP8:
        x = tl.load(X + r * s0 + d, mask=v & (d < NOPE), other=0.0).to(tl.float32)
        e = tl.load(XS + r * ss + g // 64, mask=v & (g < NOPE), other=127).to(tl.float32)  # (BN, NG, 1)
        x = x * tl.exp2(e - 127.0)
        rope = tl.load(XR + r * sr + (d - NOPE), mask=v & (d >= NOPE) & (d < D), other=0.0).to(tl.float32)
        k = tl.where(d < NOPE, x, rope)
    else:
        k = tl.load(X + r * s0 + d, mask=v & (d < D), other=0.0)
    return tl.reshape(k, (BLOCK_N, WIDTH)).to(dtype)


@triton.jit
def _step(q, X, XR, XS, s0, sr, ss, rows, valid, dv0, m_i, l_i, acc, qk_scale,
          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
          NOPE: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr):
    """One block of BLOCK_N keys folded into the online softmax of (BLOCK_H heads, BLOCK_DV value dims)."""
    k = _load_keys(X, XR, XS, s0, sr, ss, rows, valid, 0, BLOCK_N, BLOCK_D, G, D, NOPE, FP8, q.dtype)
    logits = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale  # (BH, BN), base 2
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if BLOCK_DV == BLOCK_D:
        v = k
    else:  # this program's value slice of the same rows (an L1 hit)
        v = _load_keys(X, XR, XS, s0, sr, ss, rows, valid, dv0, BLOCK_N, BLOCK_DV, G, D, NOPE, FP8, q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["ZERO"])
def _partial_kernel(ZERO, Q, sqb, sqh, POS,
                    W, WR, WS, sw0, swr, sws, WT, swt, WBS, WPOS0, WLO,
                    C, CR, CS, sc0, scr, scs, CT, sct, CBS, NC,
                    TOPK, stb, K,
                    PO, PM, PL, NSPLIT, H, qk_scale, window, ratio, W_SPLITS,
                    D: tl.constexpr, NOPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr,
                    W_CHUNK: tl.constexpr, W_FP8: tl.constexpr, C_FP8: tl.constexpr, W_RING: tl.constexpr,
                    MODE: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = tl.program_id(1) % n_hb
    dv0 = (tl.program_id(1) // n_hb) * BLOCK_DV
    b = tl.program_id(2)
    pos = tl.load(POS + b)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + d[None, :], mask=hm[:, None] & (d < D)[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
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
            m_i, l_i, acc = _step(q, W, WR, WS, sw0, swr, sws, rows, valid, dv0, m_i, l_i, acc, qk_scale,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, G, D, NOPE, W_FP8, PREC)
    elif MODE > 0:  # compressed: HCA every finished entry (MODE 1), CSA the top-k list (MODE 2)
        nc = tl.load(NC + b)
        if MODE == 1:
            n_keys = tl.minimum((pos + 1) // ratio, nc)
        else:
            n_keys = K
        start = (split - W_SPLITS) * CHUNK
        end = tl.minimum(start + CHUNK, n_keys)
        for j0 in range(start, end, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            valid = j < end
            if MODE == 2:
                li = tl.load(TOPK + b * stb + j, mask=valid, other=-1).to(tl.int32)
                valid = valid & (li >= 0) & (li < nc)
                li = tl.maximum(li, 0)
            else:
                li = j
            rows = _row_of(CT, sct, CBS, b, li, valid, ZERO)
            m_i, l_i, acc = _step(q, C, CR, CS, sc0, scr, scs, rows, valid, dv0, m_i, l_i, acc, qk_scale,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, G, D, NOPE, C_FP8, PREC)
    base = (b * NSPLIT + split) * H + h  # (BH,) rows of the (B, NSPLIT, H) partial state
    dv = dv0 + tl.arange(0, BLOCK_DV)
    tl.store(PO + base[:, None] * BLOCK_D + dv[None, :], acc, mask=hm[:, None])
    first = hm & ((h * 0 + dv0) == 0)  # one value slice writes m and l
    tl.store(PM + base, m_i, mask=first)
    tl.store(PL + base, l_i, mask=first)


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
                  block_h: int | None = None, block_dv: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """`sparse_attn.attend` for one query per sequence: q (B, 1, H, D), positions (B, 1) int32.

    Sources, `win_pos0` / `win_lo` / `win_ring`, `n_comp` / `max_comp` and `topk` (B, 1, k) (CSA; None = HCA)
    mean what they mean there. Tiles: `block_h` heads and `block_dv` value dims per program, `chunk`
    compressed keys per split (default: enough splits for ~2 programs per SM)."""
    B, S, H, D = q.shape
    assert S == 1 and q.stride(-1) == 1, "decode path: one query per sequence (use sparse_attn.attend)"
    BLOCK_D = _pow2(D)
    BLOCK_H = block_h or 16  # 16-head tiles: 1.7x faster than 32 for decode (results/tune_decode_h100.jsonl)
    BLOCK_DV = min(block_dv or BLOCK_D, BLOCK_D)
    BLOCK_N = block_n or (32 if D > 256 else 16)
    G = min(64, BLOCK_D, BLOCK_DV)
    num_warps = num_warps or 4
    mode = 0 if comp is None else (2 if topk is not None else 1)
    if comp is None:
        comp, n_comp = win, win_lo  # placeholders of the right types; never read
    n_keys = 0 if mode == 0 else (topk.shape[-1] if mode == 2 else max_comp)
    programs_per_split = B * triton.cdiv(H, BLOCK_H) * (BLOCK_D // BLOCK_DV)
    if chunk is None:  # in the CPU interpreter programs run one after another: splitting only adds work
        want = max(1, triton.cdiv(2 * _num_sms(q.device), programs_per_split)) if q.is_cuda else 1
        chunk = triton.cdiv(max(n_keys, 1), want)
    chunk = triton.cdiv(max(chunk, BLOCK_N), BLOCK_N) * BLOCK_N
    w_chunk = min(chunk, triton.cdiv(min(window, 64), BLOCK_N) * BLOCK_N)
    w_splits = triton.cdiv(window, w_chunk)
    n_split = w_splits + triton.cdiv(n_keys, chunk)
    po = torch.empty(B, n_split, H, BLOCK_D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B, n_split, H, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    out = torch.empty_like(q) if out is None else out
    tk = topk if topk is not None else positions
    nope = D - rope_dim if (win.fp8 or comp.fp8) else D
    _partial_kernel[(n_split, programs_per_split // B, B)](
        0, q, q.stride(0), q.stride(2), positions,
        *win.args(), win_pos0, win_lo, *comp.args(), n_comp,
        tk, tk.stride(0), n_keys if mode == 2 else 0,
        po, pm, pl, n_split, H, scale * LOG2E, window, ratio, w_splits,
        D=D, NOPE=nope, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_DV=BLOCK_DV, G=G, CHUNK=chunk,
        W_CHUNK=w_chunk, W_FP8=win.fp8, C_FP8=comp.fp8, W_RING=win_ring, MODE=mode,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)
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
