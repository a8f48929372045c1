"""V4 core attention in one Triton kernel: sliding window + compressed entries (CSA top-k or HCA all
visible) + attention sink, shared-KV MQA with head dim up to 512, online softmax in fp32 (§2.3).

One program handles one query row and a block of heads (the heads share every key: MQA, so the heads
are the M dimension of both matmuls). Keys come from two *sources*, each a pool of rows addressed
through a block table (a dense (B, L, D) tensor is the special case of one block per sequence):
  window      positions (p - n_win, p] of the query's own sequence; dense or a ring (slot = pos % ring)
  compressed  CSA: the rows named by the indexer's top-k (-1 = none); HCA: entries 0 .. (p+1)//m - 1
Rows are either model-dtype vectors or the compact FP8 record (E4M3 nope dims with one power-of-two
scale byte per 64 dims + BF16 RoPE dims; see `fp8_kv`), dequantised in the kernel.
For few query rows (decode) the compressed keys are split over programs (flash-decoding) and a second
kernel merges the partial softmaxes; the output de-rotation by -position (§2.3.3) can be fused into
the last kernel (`derotate_inv_freq`).
The reference is `dsv4.attention.sparse_attention`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def reference(q, window_kv, positions, compressed, topk, ratio, sink, scale, window):
    from ..attention import sparse_attention
    return sparse_attention(q, window_kv, positions, compressed, topk, ratio, sink, scale, window)


@dataclass
class KVSource:
    """Rows of one key/value pool as the kernel reads them.

    main: (R, D) model-dtype rows, or (R, nope) float8_e4m3fn when `rope`/`scale` are given (FP8 record);
    rope: (R, rope_dim) bf16; scale: (R, nope/64) uint8 UE8M0 exponents. Row of logical entry i of
    sequence b: table[b, i // block_size] * block_size + i % block_size.
    lengths: (B,) entries per sequence (compressed) or lowest valid position (window, see `lo`).
    """
    main: torch.Tensor
    table: torch.Tensor  # (B, T) int32
    block_size: int
    rope: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.rope is not None

    def args(self):
        rope = self.rope if self.fp8 else self.main
        scale = self.scale if self.fp8 else self.main
        return (self.main, rope, scale, self.main.stride(0), rope.stride(0), scale.stride(0), self.table,
                self.table.stride(0), max(1, self.block_size))


@triton.jit
def entries_seen(pos, ratio, n_entries, K, MODE: tl.constexpr):
    """How many compressed keys a query at `pos` attends: MODE 0 (window only) none, 1 (HCA) every finished
    entry, (pos + 1) // ratio of the n_entries stored, 2 (CSA) its K top-k picks (-1 ones masked by the caller)."""
    if MODE == 1:
        n_keys = tl.minimum((pos + 1) // ratio, n_entries)
    elif MODE == 2:
        n_keys = K
    else:
        n_keys = 0
    return n_keys


@triton.jit
def _row_of(T, st, BS, b, li, valid, ZERO):
    # ZERO (a runtime 0 the compiler may not specialise on) hides the arange-derived divisibility of the
    # row index: rows of 584-byte records are only 8-byte aligned, and vectorised loads that assumed
    # 16-byte alignment faulted (misaligned address) on the H100. The decode kernels then state the true
    # alignment of the row offsets (`_align`, tl.multiple_of), so their loads vectorise as far as it allows.
    blk = tl.load(T + b * st + li // BS, mask=valid, other=0)
    return blk.to(tl.int64) * BS + li % BS + ZERO


def _align(t: torch.Tensor) -> int:
    """Largest power of two (<= 16 bytes), in elements, dividing every row start of `t`: the alignment
    promise behind the kernel's vector loads (584-byte FP8 records: 8 bytes)."""
    e = t.element_size()
    a = 16
    while a > e and (t.data_ptr() % a or (t.stride(0) * e) % a):
        a //= 2
    return max(1, a // e)


@triton.jit
def _load_rows(X, XR, XS, s0, sr, ss, rows, valid, d, D: tl.constexpr, NOPE: tl.constexpr,
               FP8: tl.constexpr, dtype: tl.constexpr):
    r = rows[:, None]
    v = valid[:, None]
    if FP8:
        is_nope = (d < NOPE)[None, :]
        x = tl.load(X + r * s0 + d[None, :], mask=v & is_nope, other=0.0).to(tl.float32)
        e = tl.load(XS + r * ss + (d // 64)[None, :], mask=v & is_nope, other=127).to(tl.float32)
        x = x * tl.exp2(e - 127.0)
        rope = tl.load(XR + r * sr + (d - NOPE)[None, :], mask=v & (d >= NOPE)[None, :] & (d < D)[None, :],
                       other=0.0).to(tl.float32)
        return tl.where(is_nope, x, rope).to(dtype)
    else:
        return tl.load(X + r * s0 + d[None, :], mask=v & (d < D)[None, :], other=0.0).to(dtype)


@triton.jit
def _online_softmax(q, k, valid, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    logits = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale  # (BH, BN), base-2 units
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _derotate(o, pos, INV_FREQ, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
              ROPE_START: tl.constexpr):
    """Rotate interleaved pairs of the RoPE dims by -pos: (x0 c + x1 s, x1 c - x0 s)."""
    a0, a1 = tl.split(tl.reshape(o, (BLOCK_H, BLOCK_D // 2, 2)))
    i = tl.arange(0, BLOCK_D // 2)
    fi = i - ROPE_START // 2
    is_rope = (fi >= 0) & (i < D // 2)
    ang = pos.to(tl.float32) * tl.load(INV_FREQ + fi, mask=is_rope, other=0.0)
    c = tl.where(is_rope, tl.cos(ang), 1.0)[None, :]
    s = tl.where(is_rope, tl.sin(ang), 0.0)[None, :]
    return tl.reshape(tl.join(a0 * c + a1 * s, a1 * c - a0 * s), (BLOCK_H, BLOCK_D))


@triton.jit(do_not_specialize=["ZERO"])
def _attn_kernel(ZERO, Q, sqb, sqs, sqh, POS, spb,
                 W, WR, WS, sw0, swr, sws, WT, swt, WBS, WPOS0, WLO,
                 C, CR, CS, sc0, scr, scs, CT, sct, CBS, NC,
                 TOPK, stb, sts, K,
                 SINK, INV_FREQ, O, sob, sos, soh, PO, PM, PL, NSPLIT,
                 S, H, qk_scale, window, ratio, CPS,
                 D: tl.constexpr, NOPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_N: tl.constexpr, W_FP8: tl.constexpr, C_FP8: tl.constexpr, W_RING: tl.constexpr,
                 MODE: tl.constexpr, SPLIT: tl.constexpr, DEROTATE: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    b = row // S
    s = row % S
    pos = tl.load(POS + b * spb + s)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    dtype = Q.dtype.element_ty
    q = tl.load(Q + b * sqb + s * sqs + h[:, None] * sqh + d[None, :], mask=hm[:, None] & (d < D)[None, :],
                other=0.0)
    # The sink is the initial softmax state of split 0: logit sink_h with a zero value.
    sink = tl.load(SINK + h, mask=hm, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = tl.where(split == 0, sink, -1e30)
    l_i = tl.where(split == 0, 1.0, 0.0) + tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    # Window: positions max(pos - window + 1, lo) .. pos, read by split 0 only.
    lo = tl.maximum(pos - window + 1, tl.load(WLO + b))
    hi = lo + (pos + 1 - lo) * (split == 0).to(tl.int32)
    pos0 = tl.load(WPOS0 + b)
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t <= pos
        if W_RING > 0:
            li = t % W_RING
        else:
            li = t - pos0
        rows = _row_of(WT, swt, WBS, b, li, valid, ZERO)
        k = _load_rows(W, WR, WS, sw0, swr, sws, rows, valid, d, D, NOPE, W_FP8, dtype)
        m_i, l_i, acc = _online_softmax(q, k, valid, m_i, l_i, acc, qk_scale, PREC)

    # Compressed entries: this split's share [start, end) of the query's key list.
    nc = tl.load(NC + b)
    n_keys = entries_seen(pos, ratio, nc, K, MODE)
    start = split * CPS
    end = tl.minimum(start + CPS, n_keys)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = j < end
        if MODE == 2:
            li = tl.load(TOPK + b * stb + s * sts + j, mask=valid, other=-1).to(tl.int32)
            valid = valid & (li >= 0) & (li < nc)
            li = tl.maximum(li, 0)
        else:
            li = j
        rows = _row_of(CT, sct, CBS, b, li, valid, ZERO)
        k = _load_rows(C, CR, CS, sc0, scr, scs, rows, valid, d, D, NOPE, C_FP8, dtype)
        m_i, l_i, acc = _online_softmax(q, k, valid, m_i, l_i, acc, qk_scale, PREC)

    if SPLIT:
        base = (row * NSPLIT + split) * H
        tl.store(PO + (base + h[:, None]) * BLOCK_D + d[None, :], acc, mask=hm[:, None])
        tl.store(PM + base + h, m_i, mask=hm)
        tl.store(PL + base + h, l_i, mask=hm)
    else:
        o = acc / l_i[:, None]
        if DEROTATE:
            o = _derotate(o, pos, INV_FREQ, BLOCK_H, BLOCK_D, D, NOPE)
        tl.store(O + b * sob + s * sos + h[:, None] * soh + d[None, :], o.to(O.dtype.element_ty),
                 mask=hm[:, None] & (d < D)[None, :])


@triton.jit
def _combine_kernel(PO, PM, PL, POS, spb, INV_FREQ, O, sob, sos, soh, NSPLIT, S, H,
                    D: tl.constexpr, NOPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                    DEROTATE: tl.constexpr):
    row = tl.program_id(0)
    hb = tl.program_id(1)
    b = row // S
    s = row % S
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_H], -1e30, tl.float32)
    for i in range(0, NSPLIT):
        m = tl.maximum(m, tl.load(PM + (row * NSPLIT + i) * H + h, mask=hm, other=-1e30))
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(0, NSPLIT):
        base = (row * NSPLIT + i) * H
        w = tl.exp2(tl.load(PM + base + h, mask=hm, other=-1e30) - m)
        l += w * tl.load(PL + base + h, mask=hm, other=1.0)
        acc += w[:, None] * tl.load(PO + (base + h[:, None]) * BLOCK_D + d[None, :], mask=hm[:, None], other=0.0)
    o = acc / l[:, None]
    if DEROTATE:
        o = _derotate(o, tl.load(POS + b * spb + s), INV_FREQ, BLOCK_H, BLOCK_D, D, NOPE)
    tl.store(O + b * sob + s * sos + h[:, None] * soh + d[None, :], o.to(O.dtype.element_ty),
             mask=hm[:, None] & (d < D)[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def attend(q: torch.Tensor, positions: torch.Tensor, sink: torch.Tensor, scale: float, window: int,
           win: KVSource, win_pos0: torch.Tensor, win_lo: torch.Tensor, win_ring: int = 0,
           comp: KVSource | None = None, n_comp: torch.Tensor | None = None, max_comp: int = 0,
           topk: torch.Tensor | None = None, ratio: int = 1, rope_dim: int = 0,
           derotate_inv_freq: torch.Tensor | None = None, n_split: int | None = None,
           block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
           num_stages: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """The general entry point: q (B, S, H, D) at positions (B, S) int32 (ragged batches welcome).

    Window keys of sequence b: positions (p - window, p] that are >= win_lo[b]; logical index pos - win_pos0[b]
    (or pos % win_ring). Compressed: `topk` (B, S, k) indices (CSA) or, when topk is None, entries
    0 .. min((p+1)//ratio, n_comp[b]) - 1 (HCA); `max_comp` bounds n_comp on the host (for the split).
    With `derotate_inv_freq` the output's last `rope_dim` dims are rotated by -p in the kernel.
    """
    B, S, H, D = q.shape
    assert q.stride(-1) == 1
    BLOCK_D = triton.next_power_of_2(D)
    # Prefill (many rows): all 64 heads per program measured best on the H100 (146 vs 77 TFLOP/s at 32).
    many = B * S >= 2 * _num_sms(q.device)
    BLOCK_H = block_h or max(16, min(64 if (many or D <= 256) else 32, triton.next_power_of_2(H)))
    BLOCK_N = block_n or (32 if D > 256 else 16)
    num_warps = num_warps or (8 if D > 256 else 4)
    out = torch.empty_like(q) if out is None else out
    mode = 0 if comp is None else (2 if topk is not None else 1)
    if comp is None:
        comp, n_comp = win, win_lo  # unused placeholders of the right types
    n_keys = 0 if mode == 0 else (topk.shape[-1] if mode == 2 else max_comp)
    rows, hblocks = B * S, triton.cdiv(H, BLOCK_H)
    if n_split is None:
        want = triton.cdiv(2 * _num_sms(q.device), rows * hblocks)
        n_split = max(1, min(want, triton.cdiv(n_keys, 4 * BLOCK_N)))
    cps = max(BLOCK_N, triton.cdiv(triton.cdiv(max(n_keys, 1), n_split), BLOCK_N) * BLOCK_N)
    n_split = max(1, triton.cdiv(n_keys, cps))
    split = n_split > 1
    if split:
        po = torch.empty(rows, n_split, H, BLOCK_D, device=q.device, dtype=torch.float32)
        pm = torch.empty(rows, n_split, H, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = out
    tk = topk if topk is not None else positions
    inv = derotate_inv_freq if derotate_inv_freq is not None else sink
    nope = D - rope_dim if (derotate_inv_freq is not None or win.fp8 or comp.fp8) else D
    _attn_kernel[(rows, hblocks, n_split)](
        0, q, q.stride(0), q.stride(1), q.stride(2), positions, positions.stride(0),
        *win.args(), win_pos0, win_lo,
        *comp.args(), n_comp,
        tk, tk.stride(0), tk.stride(1) if tk.dim() > 2 else 0, topk.shape[-1] if topk is not None else 0,
        sink, inv, out, out.stride(0), out.stride(1), out.stride(2), po, pm, pl, n_split,
        S, H, scale * LOG2E, window, ratio, cps,
        D=D, NOPE=nope, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, W_FP8=win.fp8, C_FP8=comp.fp8,
        W_RING=win_ring, MODE=mode, SPLIT=split, DEROTATE=derotate_inv_freq is not None and not split,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models get fp32 products, not tf32
        num_warps=num_warps, num_stages=num_stages)
    if split:
        _combine_kernel[(rows, hblocks)](
            po, pm, pl, positions, positions.stride(0), inv, out, out.stride(0), out.stride(1), out.stride(2),
            n_split, S, H, D=D, NOPE=nope, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H,
            DEROTATE=derotate_inv_freq is not None, num_warps=4)
    return out


def dense_source(x: torch.Tensor) -> KVSource:
    """(B, L, D) model-dtype tensor -> a source with one block of L rows per sequence."""
    B, L, D = x.shape
    table = torch.arange(B, device=x.device, dtype=torch.int32)[:, None]
    return KVSource(main=x.contiguous().view(B * L, D) if L else x.new_zeros(B, D), table=table, block_size=L)


def sparse_attention_dense(q, window_kv, positions, compressed, topk, ratio, sink, scale, window,
                           **kwargs) -> torch.Tensor:
    """The reference's signature (`dsv4.attention.sparse_attention`): one position vector for the batch,
    window_kv (B, L, D) whose last S rows are the queries' own keys, compressed (B, N, D) or None."""
    B, S, H, D = q.shape
    L = window_kv.shape[1]
    dev = q.device
    pos = positions.to(device=dev, dtype=torch.int32)[None].expand(B, S)
    pos0 = (positions[-1] - (L - 1)).to(device=dev, dtype=torch.int32).reshape(1).expand(B).contiguous()
    comp = n_comp = None
    N = 0
    if compressed is not None and compressed.shape[1] and (topk is None or topk.shape[-1]):
        N = compressed.shape[1]
        comp, n_comp = dense_source(compressed), torch.full((B,), N, device=dev, dtype=torch.int32)
    tk = topk.to(torch.int32).contiguous() if comp is not None and topk is not None else None
    return attend(q, pos, sink, scale, window, dense_source(window_kv), pos0, pos0, comp=comp, n_comp=n_comp,
                  max_comp=N, topk=tk, ratio=ratio, **kwargs)
