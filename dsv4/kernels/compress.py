"""Fused compressor tail (§2.3.1 eqs. 9-12, §2.3.2 eqs. 20-23): finished blocks -> compressed KV entries,
optionally straight into the paged cache's FP8 records, in one launch.

The projections C = H W^KV and Z = H W^Z stay torch GEMMs; this is everything after them, per entry:
  softmax over the block's slots per channel of Z + B (eq. 11, the positional bias B = `ape` added here),
  the weighted sum of C, RMSNorm, interleaved RoPE at the block's first position (entry w at w * m), and,
  when a records pool is given, the 584-byte record of `fp8_kv` (E4M3 + UE8M0 scale per 64 dims, BF16 RoPE
  dims) written into the given pool rows (`PagedKVCache`'s layout).
CSA (m = 4, width 2D): entry w pools series a (channels [0, D)) of block w - 1 with series b ([D, 2D)) of
block w, 2m slots; block 0 takes series a from the carried `overlap_kv/gate` (the last finished block of the
previous call, its gate already + ape as `Compressor.forward` keeps it), or nothing (weight 0) when None.
HCA (m = 128, width D): the m slots of block w.

One program per entry holds the D channels in registers and walks the slots in chunks with an online
softmax (running max / denominator / weighted sum per channel), so HCA's 128 slots never sit in registers
at once. The kernel is forward-only (the seam takes `reference` while autograd records).
"""

from __future__ import annotations

import math

import torch

from ..layers import apply_rope, rms_normalize, rope_cos_sin
from . import fp8_kv

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is the optional `kernels` extra; the reference below needs only torch
    triton = tl = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


# ------------------------------------------------------------------------------------------ reference
def reference(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, overlap_kv: torch.Tensor | None,
              overlap_gate: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
              first_block: int | torch.Tensor, records: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """The pooling block of `Compressor.forward`, op for op: kv, gate (B, n, m, width) (gate without ape),
    ape (m, width) fp32, overlap_kv / overlap_gate (B, m, D) or None, first_block an int or (B, 1) -> (B, n, D)
    in kv's dtype. With `records` (R, record_bytes) uint8 and `rows` (B, n) int64, also writes each entry's
    FP8 record into records[rows] (rows < 0 are skipped)."""
    B, n, m, width = kv.shape
    D = norm_weight.shape[0]
    gate = gate + ape
    if width == 2 * D:
        # Slots 0..m-1: series a of the previous block (none before block 0: weight 0);
        # slots m..2m-1: series b of this block (eq. 11's overlapping windows).
        prev_kv = kv.new_zeros(B, 1, m, D) if overlap_kv is None else overlap_kv.unsqueeze(1).to(kv.dtype)
        prev_gate = (gate.new_full((B, 1, m, D), float("-inf")) if overlap_gate is None
                     else overlap_gate.unsqueeze(1).to(gate.dtype))
        kv = torch.cat((torch.cat((prev_kv, kv[:, :-1, :, :D]), 1), kv[..., D:]), dim=2)  # (B, n, 2m, D)
        gate = torch.cat((torch.cat((prev_gate, gate[:, :-1, :, :D]), 1), gate[..., D:]), dim=2)
    weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    entries = (kv * weights).sum(dim=2)  # (B, n, D)
    entries = (norm_weight * rms_normalize(entries.float(), eps)).to(entries.dtype)  # = layers.RMSNorm
    if isinstance(first_block, torch.Tensor):
        first_block = first_block.reshape(-1, 1)
    positions = (torch.arange(n, device=kv.device) + first_block) * m
    cos, sin = rope_cos_sin(positions, inv_freq)
    entries = apply_rope(entries, cos, sin)
    if records is not None:
        rows = rows.reshape(-1)
        keep = rows >= 0
        packed = fp8_kv.pack(*fp8_kv.quantize(entries.reshape(-1, D), 2 * inv_freq.numel()))
        records[rows[keep]] = packed[keep]
    return entries


# ------------------------------------------------------------------------------------------ kernel
@_jit
def _pool_slots(acc, den, mx, KV, skm, G, sgm, A, sam, c, M: tl.constexpr, BLOCK_M: tl.constexpr,
                ADD_APE: tl.constexpr):
    """Fold M slots into the per-channel online softmax (eq. 11): running max mx, denominator den, sum acc."""
    for j0 in range(0, M, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        ok = (j < M)[:, None]
        g = tl.load(G + j[:, None] * sgm + c[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        if ADD_APE:
            g += tl.load(A + j[:, None] * sam + c[None, :], mask=ok, other=0.0)
        v = tl.load(KV + j[:, None] * skm + c[None, :], mask=ok, other=0.0).to(tl.float32)
        mx_new = tl.maximum(mx, tl.max(g, 0))
        alpha = tl.exp(mx - mx_new)
        p = tl.exp(g - mx_new[None, :])
        den = den * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p * v, 0)
        mx = mx_new
    return acc, den, mx


@_jit
def _ceil_log2(x):
    """Exact ceil(log2(x)) of positive normal fp32 values from their bits, clamped to UE8M0's range
    (`quant._ceil_log2`)."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.minimum(tl.maximum(e, -127), 127)


@_jit
def _e4m3_bits(q):
    """fp32 with |q| <= 448 -> E4M3 code, round to nearest even. Integer ops only, so the bytes equal torch's
    `.to(torch.float8_e4m3fn)` on the GPU and in the interpreter alike (records must be byte-identical)."""
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    e = a >> 23
    # normal (|q| >= 2^-6, fp32 exponent >= 121): rebias 127 -> 7, round the mantissa to 3 bits (ties even)
    normal = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    # subnormal: |q| in units of 2^-9, rounded to an integer (ties even); 8 = the smallest normal, correctly
    s = tl.minimum(141 - e, 26)  # m24 >> s; s >= 26 leaves 0 and rounds to 0 (m24 < 2^24 < half)
    m24 = (a & 0x7FFFFF) | 0x800000
    low = m24 & ((1 << s) - 1)
    half = 1 << (s - 1)
    sub = m24 >> s
    sub += ((low > half) | ((low == half) & ((sub & 1) == 1))).to(tl.int32)
    return tl.where(e >= 121, normal, sub) | sign


@_jit
def _bf16_bits(x):
    """fp32 -> BF16 bits (round to nearest even; no NaN inputs), as int32 holding the 16-bit pattern."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@_jit
def _write_record(x, R8, R16, D: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr, NSC: tl.constexpr,
                  PAD: tl.constexpr):
    """One entry x (D,) fp32 -> its `fp8_kv` record at R8 (bytes) / R16 (the same row as int16):
    [0, nope) E4M3 | [nope, nope + 2 rope) BF16 | NSC UE8M0 scales | PAD zero bytes."""
    NOPE: tl.constexpr = D - ROPE
    NG: tl.constexpr = D // GROUP
    xg = tl.reshape(x, (NG, GROUP))  # scale groups of 64 dims (one group of D < 64)
    ch = tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    nope = ch < NOPE
    amax = tl.maximum(tl.max(tl.where(nope, tl.abs(xg), 0.0), 1), 1e-30)
    # smallest power of two with amax / 2^e <= 448; the IEEE division (not the fast one) as torch divides
    ex = _ceil_log2(tl.math.div_rn(amax, 448.0))
    inv = ((127 - ex) << 23).to(tl.float32, bitcast=True)  # 2^-e exactly: x * 2^-e == x / 2^e, rounding too
    q = tl.clamp(xg * inv[:, None], -448.0, 448.0)
    tl.store(R8 + ch, _e4m3_bits(q).to(tl.uint8), mask=nope)
    tl.store(R16 + NOPE // 2 + (ch - NOPE), _bf16_bits(xg).to(tl.int16), mask=ch >= NOPE)
    g = tl.arange(0, NG)
    tl.store(R8 + NOPE + 2 * ROPE + g, (ex + 127).to(tl.uint8), mask=g < NSC)
    if PAD > 0:
        p = tl.arange(0, 8)
        tl.store(R8 + NOPE + 2 * ROPE + NSC + p, tl.zeros([8], dtype=tl.uint8), mask=p < PAD)


@_jit
def _compress_kernel(KV, skb, skn, skm, G, sgb, sgn, sgm, APE, sam, OKV, sokb, sokm, OG, sogb, sogm,
                     NW, INV_FREQ, FIRST, sfb, first_block, eps, OUT, sob, son,
                     REC8, REC16, srec, srec16, ROWS, srb, srn,
                     D: tl.constexpr, M: tl.constexpr, ROPE: tl.constexpr, BLOCK_M: tl.constexpr,
                     OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr, FIRST_PER_ROW: tl.constexpr,
                     RECORD: tl.constexpr, GROUP: tl.constexpr, NSC: tl.constexpr, PAD: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a 1M-token prefill or a large pool passes 2^31 bytes
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    den = tl.zeros([D], dtype=tl.float32)
    # Maxima start at a finite floor, not -inf: a chunk whose slots are all -inf (the paged cache marks "no
    # block before entry 0" in its overlap rows that way) then rescales by exp(0), not exp(-inf + inf) = NaN.
    mx = tl.full([D], -1.0e30, dtype=tl.float32)
    kv_w = KV + b * skb + w * skn
    g_w = G + b * sgb + w * sgn
    if OVERLAP:
        # Slots 0..m-1: series a (channels [0, D)) of block w - 1, or the carried overlap rows for block 0
        # (their gates already include ape), or nothing at all; slots m..2m-1: series b of block w.
        if w > 0:
            acc, den, mx = _pool_slots(acc, den, mx, kv_w - skn, skm, g_w - sgn, sgm, APE, sam, c, M, BLOCK_M,
                                       True)
        elif HAS_PREV:
            acc, den, mx = _pool_slots(acc, den, mx, OKV + b * sokb, sokm, OG + b * sogb, sogm, APE, sam, c, M,
                                       BLOCK_M, False)
        acc, den, mx = _pool_slots(acc, den, mx, kv_w + D, skm, g_w + D, sgm, APE + D, sam, c, M, BLOCK_M, True)
    else:
        acc, den, mx = _pool_slots(acc, den, mx, kv_w, skm, g_w, sgm, APE, sam, c, M, BLOCK_M, True)

    # Round to the model dtype where the reference materialises a tensor of it (the pooled sum, the normed
    # entry): bf16 entries then differ from the reference's only by its bf16 softmax weights and products.
    dt = OUT.dtype.element_ty
    y = (acc / den).to(dt).to(tl.float32)
    y = y * tl.math.rsqrt(tl.sum(y * y, 0) / D + eps)  # RMSNorm (fp32, weight fp32)
    y = (tl.load(NW + c) * y).to(dt).to(tl.float32)

    # Interleaved RoPE on the last ROPE dims at the block's first position (§2.3.3 partial RoPE).
    if FIRST_PER_ROW:
        first_block = tl.load(FIRST + b * sfb)
    pos = ((first_block + w) * M).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(y, (D // 2, 2)))
    fi = tl.arange(0, D // 2) - (D - ROPE) // 2
    is_rope = fi >= 0
    ang = pos * tl.load(INV_FREQ + fi, mask=is_rope, other=0.0)
    cs = tl.where(is_rope, tl.cos(ang), 1.0)
    sn = tl.where(is_rope, tl.sin(ang), 0.0)
    entry = tl.reshape(tl.join(x0 * cs - x1 * sn, x1 * cs + x0 * sn), (D,)).to(dt)
    tl.store(OUT + b * sob + w * son + c, entry)

    if RECORD:  # quantise exactly the stored entry, as `fp8_kv.quantize(entries)` would
        row = tl.load(ROWS + b * srb + w * srn)
        if row >= 0:
            _write_record(entry.to(tl.float32), REC8 + row * srec, REC16 + row * srec16, D, ROPE, GROUP, NSC, PAD)


def compress_blocks(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, overlap_kv: torch.Tensor | None,
                    overlap_gate: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                    first_block: int | torch.Tensor, records: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None, block_m: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """Same contract as `reference` (rope_dim = 2 * len(inv_freq), D = len(norm_weight) a power of two; CSA
    when width == 2D). Inputs may be strided views (pool rows) as long as the channel dim is contiguous."""
    B, n, m, width = kv.shape
    D, rope = norm_weight.numel(), 2 * inv_freq.numel()
    overlap = width == 2 * D
    if width != D and not overlap:
        raise ValueError(f"kv width {width} must be head_dim {D} (HCA) or 2 * head_dim (CSA)")
    if D & (D - 1) or not 0 < rope <= D:
        raise ValueError(f"head_dim {D} must be a power of two holding the {rope} RoPE dims")
    if gate.shape != kv.shape or tuple(ape.shape) != (m, width):
        raise ValueError(f"gate {tuple(gate.shape)} / ape {tuple(ape.shape)} do not match kv {tuple(kv.shape)}")
    if overlap_kv is not None and not overlap:
        raise ValueError("overlap rows are CSA's (width 2 * head_dim)")
    out = torch.empty(B, n, D, dtype=kv.dtype, device=kv.device)
    if B * n == 0:
        return out
    kv, gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (kv, gate))
    ape = ape.float().contiguous()
    has_prev = overlap_kv is not None
    okv, og = (overlap_kv, overlap_gate) if has_prev else (kv, gate)  # dummies when absent
    okv, og = (t if t.stride(-1) == 1 else t.contiguous() for t in (okv, og))
    per_row = isinstance(first_block, torch.Tensor)
    first = first_block.reshape(-1).to(device=kv.device, dtype=torch.int64) if per_row else out
    sfb = (first.stride(0) if first.numel() > 1 else 0) if per_row else 0  # a single index serves every row
    record = records is not None
    nope = D - rope
    nsc = math.ceil(nope / fp8_kv.BLOCK)
    if record:
        size = fp8_kv.record_bytes(D, rope)
        if records.dtype != torch.uint8 or records.shape[-1] != size or records.stride(-1) != 1:
            raise ValueError(f"records must be (R, {size}) uint8 rows with contiguous bytes")
        if rows.shape != (B, n):
            raise ValueError(f"rows {tuple(rows.shape)} must be (B, n_blocks) = {(B, n)}")
        rows = rows if rows.dtype == torch.int64 else rows.long()
        rec16 = records.view(torch.int16)  # the BF16 RoPE dims as 2-byte stores (nope and the row are even)
        srec, srec16, srb, srn = records.stride(0), rec16.stride(0), rows.stride(0), rows.stride(1)
    else:
        records = rec16 = rows = out
        srec = srec16 = srb = srn = 0
    block_m = block_m or max(1, min(m, 4096 // D))
    _compress_kernel[(n, B)](
        kv, kv.stride(0), kv.stride(1), kv.stride(2), gate, gate.stride(0), gate.stride(1), gate.stride(2),
        ape, ape.stride(0), okv, okv.stride(0), okv.stride(1), og, og.stride(0), og.stride(1),
        norm_weight.float().contiguous(), inv_freq.float().contiguous(), first, sfb,
        0 if per_row else int(first_block), float(eps), out, out.stride(0), out.stride(1),
        records, rec16, srec, srec16, rows, srb, srn,
        D=D, M=m, ROPE=rope, BLOCK_M=triton.next_power_of_2(block_m), OVERLAP=overlap, HAS_PREV=has_prev,
        FIRST_PER_ROW=per_row, RECORD=record, GROUP=min(D, fp8_kv.BLOCK), NSC=nsc,
        PAD=(fp8_kv.record_bytes(D, rope) - nope - 2 * rope - nsc) if record else 0,
        num_warps=num_warps or (4 if D >= 256 else 2))
    return out
