"""The compact KV record (§2.3.4 / official FP8 KV simulation, docs/official_format.md): per entry the
`head_dim - rope_dim` non-RoPE dims as FP8 E4M3 with one power-of-two (UE8M0) scale per 64 dims, the
RoPE dims in BF16, padded to 8 bytes. For V4 (512 = 448 + 64): 448 + 128 + 7 + 1 pad = 584 bytes, the
size `dsv4.analysis.v4_kv_format` counts. The official release quantises-dequantises exactly so
(`act_quant(kv[..., :-64], 64, ue8m0)`) before attention.

Byte layout of one record: [0, nope) E4M3 | [nope, nope + 2 rope) BF16 | scales (uint8, 2^(b - 127)) | pad.
Dequantisation happens inside the attention kernel (`sparse_attention._load_rows`); `dequantize` here
is its reference, and `fake_quantize` is the quantise-dequantise the reference path uses to model it.
"""

from __future__ import annotations

import math

import torch

from ..quant import _ceil_log2

BLOCK = 64  # dims per scale
E4M3_MAX = 448.0


def record_bytes(head_dim: int, rope_dim: int, align: int = 8) -> int:
    nope = head_dim - rope_dim
    raw = nope + 2 * rope_dim + math.ceil(nope / BLOCK)
    return -(-raw // align) * align


def quantize(x: torch.Tensor, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) -> nope (..., D - rope) float8_e4m3fn, rope (..., rope) bf16, scale (..., nsc) uint8."""
    nope_dim = x.shape[-1] - rope_dim
    nsc = math.ceil(nope_dim / BLOCK)
    nope = x[..., :nope_dim].float()
    padded = torch.nn.functional.pad(nope, (0, nsc * BLOCK - nope_dim)).unflatten(-1, (nsc, BLOCK))
    amax = padded.abs().amax(-1).clamp(min=1e-30)  # (..., nsc)
    exp = _ceil_log2(amax / E4M3_MAX)  # smallest power of two with amax / 2^e <= 448
    q = (padded / torch.exp2(exp.float())[..., None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = q.flatten(-2)[..., :nope_dim].to(torch.float8_e4m3fn)
    return q, x[..., nope_dim:].to(torch.bfloat16), (exp + 127).to(torch.uint8)


def dequantize(nope: torch.Tensor, rope: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    nope_dim = nope.shape[-1]
    mult = torch.exp2(scale.float() - 127).repeat_interleave(BLOCK, dim=-1)[..., :nope_dim]
    return torch.cat((nope.float() * mult, rope.float()), dim=-1).to(dtype)


def fake_quantize(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """What attention sees of x after a round trip through the FP8 record (the official simulation)."""
    return dequantize(*quantize(x, rope_dim), dtype=x.dtype)


def pack(nope: torch.Tensor, rope: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Three parts (..., *) -> records (..., record_bytes) uint8 (written into `out` when given)."""
    n, r, s = nope.shape[-1], rope.shape[-1], scale.shape[-1]
    size = record_bytes(n + r, r)
    if out is None:
        out = torch.zeros(*nope.shape[:-1], size, dtype=torch.uint8, device=nope.device)
    out[..., :n] = nope.view(torch.uint8)
    out[..., n:n + 2 * r] = rope.contiguous().view(torch.uint8)
    out[..., n + 2 * r:n + 2 * r + s] = scale
    return out


def views(records: torch.Tensor, head_dim: int, rope_dim: int):
    """Records (R, record_bytes) uint8 -> zero-copy views (nope fp8 (R, n), rope bf16 (R, r), scale u8 (R, s))."""
    n = head_dim - rope_dim
    s = math.ceil(n / BLOCK)
    return (records[:, :n].view(torch.float8_e4m3fn), records[:, n:n + 2 * rope_dim].view(torch.bfloat16),
            records[:, n + 2 * rope_dim:n + 2 * rope_dim + s])


# ---------------------------------------------------------------------- the lightning indexer's keys
# Stored apart from the KV records (CSA only, `paged_cache`): "fp8" = 128 E4M3 + one fp32 scale (amax / 448),
# 132 B for V4's 128 dims; "fp4" = E2M1 pairs + one UE8M0 byte per 32 dims, 68 B (the release's format).

def quantize_index_keys(keys: torch.Tensor, fmt: str = "fp8") -> torch.Tensor:
    """(..., Di) -> (..., index_key_bytes) uint8."""
    if fmt == "fp8":
        scale = (keys.float().abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        q = (keys.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat((q, scale.view(torch.uint8)), dim=-1)
    from ..quant import quantize_fp4
    packed, scale = quantize_fp4(keys.float())
    return torch.cat((packed.view(torch.uint8), scale.view(torch.uint8)), dim=-1)


def dequantize_index_keys(raw: torch.Tensor, index_dim: int, fmt: str = "fp8") -> torch.Tensor:
    """(..., index_key_bytes) uint8 -> (..., Di) fp32."""
    if fmt == "fp8":
        scale = raw[..., index_dim:index_dim + 4].contiguous().view(torch.float32)
        return raw[..., :index_dim].view(torch.float8_e4m3fn).float() * scale
    from ..quant import dequantize_fp4
    return dequantize_fp4(raw[..., :index_dim // 2].contiguous(), raw[..., index_dim // 2:].contiguous(),
                          dtype=torch.float32)


def fake_quantize_index_keys(keys: torch.Tensor, fmt: str = "fp8") -> torch.Tensor:
    """What the indexer sees of its keys after a round trip through the paged cache's key format."""
    return dequantize_index_keys(quantize_index_keys(keys, fmt), keys.shape[-1], fmt).to(keys.dtype)
