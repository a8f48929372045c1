"""FP8 / FP4 weight formats of the official DeepSeek-V4 checkpoints, in plain PyTorch.

What the release ships (docs/official_format.md has the sources):
- FP8 (attention projections, shared experts, MTP e_proj/h_proj): `<m>.weight` float8_e4m3fn [out, in] and
  `<m>.scale` float8_e8m0fnu [ceil(out/128), ceil(in/128)]: one power-of-two multiplier per 128x128 block,
  w = w_fp8 * scale.
- FP4 (routed experts): `<m>.weight` int8 [out, in/2] holding two E2M1 codes per byte along the input dim
  (low nibble = even column, high nibble = odd column) and `<m>.scale` float8_e8m0fnu [out, in/32]:
  one power-of-two multiplier per 1x32 block, w = e2m1 * scale.
- Everything else is bf16 (embeddings, head, norms, router weight, compressor projections) or fp32 (mHC
  parameters, attention sinks, compressor `ape`, router bias); hash tables `tid2eid` are int64.
Scales are rounded up to a power of two (ue8m0), as the official `act_quant` / `fp4_act_quant` do.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from dsv4.errors import CheckpointError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest E2M1 value
FP8_BLOCK = (128, 128)  # official `weight_block_size`
FP4_BLOCK = 32  # official `fp4_block_size`, along the input dim
# E2M1 code -> value; bit 3 is the sign. Matches the official FP4_TABLE in inference/convert.py.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
# Midpoints between consecutive non-negative E2M1 values, for round-to-nearest.
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_FP4_STORAGE = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)
_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")  # official name; the HF/V3 name convert.py renames from


# ---------------------------------------------------------------------------------------------- scales
def _ceil_log2(x: Tensor) -> Tensor:
    """Exact ceil(log2(x)) for x > 0 (frexp: x = m * 2^e, m in [0.5, 1)); int32, clamped to e8m0's range."""
    m, e = torch.frexp(x.float())
    e = torch.where(m == 0.5, e - 1, e)
    return e.clamp(-127, 127).to(torch.int32)


def _e8m0(exponent: Tensor) -> Tensor:
    """Power-of-two scales 2^exponent as float8_e8m0fnu (biased exponent byte, bias 127)."""
    return (exponent + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def _scale_exponent(scale: Tensor) -> Tensor:
    """log2 of power-of-two scales, stored as e8m0 (or raw e8m0 bytes as uint8) or as floats."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return scale.view(torch.uint8).to(torch.int32) - 127
    m, e = torch.frexp(scale.float())
    if not bool((m == 0.5).all()):
        raise ValueError("scales are not powers of two")
    return (e - 1).to(torch.int32)


def scale_to_float(scale: Tensor) -> Tensor:
    """Dequantisation multipliers as float32; uint8 input is read as raw e8m0 bytes (2^(b-127))."""
    if scale.dtype == torch.uint8:
        scale = scale.view(torch.float8_e8m0fnu)
    return scale.float()


def _pad_to(x: Tensor, rows: int, cols: int, value: float = 0.0) -> Tensor:
    """Pad a 2-D tensor at the bottom/right up to multiples of (rows, cols)."""
    pr, pc = -x.shape[0] % rows, -x.shape[1] % cols
    return torch.nn.functional.pad(x, (0, pc, 0, pr), value=value) if pr or pc else x


def _check_2d(w: Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{what} expects a 2-D weight [out, in], got shape {tuple(w.shape)}")


# ------------------------------------------------------------------------------------------------- FP8
def fp8_scale_shape(shape: tuple[int, int], block: tuple[int, int] = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the block-scale tensor of an FP8 weight: one entry per (partial) block."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def quantize_fp8_blockwise(w: Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """Block-wise FP8 E4M3 with ue8m0 scales: w [out, in] -> (float8_e4m3fn [out, in], e8m0 [ceil(out/bo), ceil(in/bi)]).

    Each block's scale is 2^ceil(log2(amax / 448)); partial edge blocks get their own scale.
    """
    _check_2d(w, "quantize_fp8_blockwise")
    (out, inp), (bo, bi) = w.shape, block
    tiles = _pad_to(w.float(), bo, bi)
    nbo, nbi = tiles.shape[0] // bo, tiles.shape[1] // bi
    tiles = tiles.view(nbo, bo, nbi, bi)  # (block row, row in block, block col, col in block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(torch.finfo(torch.float32).tiny)
    exponent = _ceil_log2(amax / FP8_MAX)
    inv = torch.ldexp(torch.ones_like(amax), -exponent)  # exact power of two
    q = (tiles * inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nbo * bo, nbi * bi)[:out, :inp].contiguous(), _e8m0(exponent)


def dequantize_fp8_blockwise(
    w_fp8: Tensor, scale: Tensor, block: tuple[int, int] = FP8_BLOCK, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Inverse of `quantize_fp8_blockwise`: w = w_fp8 * scale of its block (any float / e8m0 scale dtype)."""
    _check_2d(w_fp8, "dequantize_fp8_blockwise")
    expected = fp8_scale_shape(tuple(w_fp8.shape), block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale has shape {tuple(scale.shape)}, expected {expected} for weight {tuple(w_fp8.shape)}")
    out, inp = w_fp8.shape
    s = scale_to_float(scale).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :inp]
    return (w_fp8.float() * s).to(dtype)


# ------------------------------------------------------------------------------------------------- FP4
def fp4_scale_shape(packed_shape: tuple[int, int], block: int = FP4_BLOCK) -> tuple[int, int]:
    """Shape of the scale of a packed FP4 weight [out, in/2]: one entry per 1 x `block` (partial) block."""
    return (packed_shape[0], -(-(2 * packed_shape[1]) // block))


def _e2m1_encode(x: Tensor) -> Tensor:
    """Round |x| <= 6 to the nearest E2M1 value (ties to even code, as hardware converts) -> uint8 code."""
    a = x.abs()
    code = torch.searchsorted(_E2M1_MIDPOINTS.to(x.device), a.contiguous(), right=False)  # = #midpoints < a
    tie = (a == _E2M1_MIDPOINTS.to(x.device)[code.clamp(max=6)]) & (code % 2 == 1)
    code = code + tie.to(code.dtype)
    return (code | (torch.signbit(x).to(code.dtype) << 3)).to(torch.uint8)


def _unpack_codes(packed: Tensor) -> Tensor:
    """[out, in/2] bytes -> [out, in] E2M1 codes; low nibble first (column 2j), high nibble second (2j+1)."""
    if packed.dtype not in _FP4_STORAGE:
        raise ValueError(f"packed FP4 weight must be int8/uint8/float4_e2m1fn_x2, got {packed.dtype}")
    b = packed.view(torch.uint8)
    return torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)


def quantize_fp4(w: Tensor, block: int = FP4_BLOCK) -> tuple[Tensor, Tensor]:
    """E2M1 with ue8m0 scales: w [out, in] (in even) -> (int8 packed [out, in/2], e8m0 scale [out, ceil(in/block)]).

    Each 1 x `block` group along the input dim gets scale 2^ceil(log2(amax / 6)) (official `fp4_act_quant`).
    """
    _check_2d(w, "quantize_fp4")
    out, inp = w.shape
    if inp % 2:
        raise ValueError(f"FP4 packs two values per byte along the input dim; in={inp} is odd")
    groups = _pad_to(w.float(), 1, block).view(out, -1, block)  # (out, group, col in group)
    amax = groups.abs().amax(dim=-1).clamp_min(FP4_MAX * 2.0**-126)
    exponent = _ceil_log2(amax / FP4_MAX)
    inv = torch.ldexp(torch.ones_like(amax), -exponent)
    codes = _e2m1_encode((groups * inv[..., None]).clamp(-FP4_MAX, FP4_MAX)).view(out, -1)[:, :inp]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), _e8m0(exponent)


def dequantize_fp4(packed: Tensor, scale: Tensor, block: int = FP4_BLOCK, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Inverse of `quantize_fp4`: packed [out, in/2] (int8, uint8 or float4_e2m1fn_x2) -> [out, in]."""
    _check_2d(packed, "dequantize_fp4")
    expected = fp4_scale_shape(tuple(packed.shape), block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}, expected {expected} for packed {tuple(packed.shape)}")
    values = E2M1_VALUES.to(packed.device)[_unpack_codes(packed).long()]
    s = scale_to_float(scale).repeat_interleave(block, 1)[:, : values.shape[1]]
    return (values * s).to(dtype)


def fp4_to_fp8(
    packed: Tensor,
    scale: Tensor,
    fp4_block: int = FP4_BLOCK,
    fp8_block: tuple[int, int] = FP8_BLOCK,
    strict: bool = True,
) -> tuple[Tensor, Tensor]:
    """Lossless FP4 -> FP8 (the official convert.py `--expert-dtype fp8` path, §3 precision notes).

    Per 128x128 tile the FP8 scale is 2^(e_max - 6), e_max the largest FP4 block exponent in the tile; each FP4
    value is multiplied by 2^(e - e_max + 6) <= 64, so |value| <= 6 * 64 = 384 < 448. E4M3 has two more exponent
    bits and two more mantissa bits than E2M1, so the product is exact unless a block's scale is more than 2^14
    below its tile's largest (E4M3 subnormals end at 2^-9); `strict` raises if that would lose a nonzero value.
    """
    _check_2d(packed, "fp4_to_fp8")
    if fp8_block[1] % fp4_block:
        raise ValueError(f"FP4 block {fp4_block} must divide the FP8 block {fp8_block}")
    values = dequantize_fp4(packed, torch.ones(fp4_scale_shape(tuple(packed.shape), fp4_block)), fp4_block, torch.float32)
    out, inp = values.shape
    exp = _scale_exponent(scale).repeat_interleave(fp4_block, 1)[:, :inp]  # per element
    bo, bi = fp8_block
    tiles = _pad_to(exp, bo, bi, value=-(2**30)).view(-(-out // bo), bo, -(-inp // bi), bi)
    tile_exp = tiles.amax(dim=(1, 3)) - 6  # log2 of the FP8 scale per tile
    tile_exp_el = tile_exp.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out, :inp]
    exact = torch.ldexp(values, exp - tile_exp_el)
    w_fp8 = exact.to(torch.float8_e4m3fn)
    if strict and not torch.equal(w_fp8.float(), exact):
        n = int((w_fp8.float() != exact).sum())
        raise ValueError(f"FP4 -> FP8 would round {n} values: FP4 block scales span more than 2^14 inside a tile")
    return w_fp8, _e8m0(tile_exp)


# -------------------------------------------------------------------------------------- state dicts
_FP8_KEYS = re.compile(
    r"(^|\.)attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$"
    r"|(^|\.)attn\.indexer\.wq_b\.weight$"
    r"|(^|\.)ffn\.shared_experts\.w[123]\.weight$"
    r"|(^|\.)(e_proj|h_proj)\.weight$"
)
_FP4_KEYS = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")
_FP32_KEYS = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$|(^|\.)attn_sink$|(^|\.)ape$|(^|\.)gate\.bias$")
_INT64_KEYS = re.compile(r"(^|\.)tid2eid$")


def shipped_format(key: str) -> str:
    """How the official checkpoint stores tensor `key`: "fp8", "fp4", "fp32", "int64" or "bf16"."""
    if _FP4_KEYS.search(key):
        return "fp4"
    if _FP8_KEYS.search(key):
        return "fp8"
    if _FP32_KEYS.search(key):
        return "fp32"
    if _INT64_KEYS.search(key):
        return "int64"
    return "bf16"


def _scale_key(weight_key: str, sd: dict[str, Tensor]) -> str | None:
    prefix = weight_key.removesuffix(".weight")
    for suffix in _SCALE_SUFFIXES:
        if prefix + suffix in sd:
            return prefix + suffix
    return None


def dequantize_state_dict(
    sd: dict[str, Tensor], dtype: torch.dtype = torch.bfloat16, fp8_block: tuple[int, int] = FP8_BLOCK
) -> dict[str, Tensor]:
    """Dequantise every FP8 (float8_e4m3fn) and FP4 (int8 / float4_e2m1fn_x2) `.weight` with its `.scale`
    (or `.weight_scale_inv`) to `dtype`, drop the scales, pass every other tensor through unchanged.

    Raises CheckpointError listing every quantised weight without a scale, every scale of the wrong shape
    and every scale without a quantised weight.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []
    for key, t in sd.items():
        if key.endswith(_SCALE_SUFFIXES):
            continue
        fmt = "fp8" if t.dtype == torch.float8_e4m3fn else "fp4" if t.dtype in _FP4_STORAGE else None
        if fmt is None or not key.endswith(".weight"):
            out[key] = t
            continue
        skey = _scale_key(key, sd)
        if skey is None:
            problems.append(f"{key}: {fmt.upper()} weight has no scale ({key.removesuffix('.weight')}.scale)")
            continue
        used.add(skey)
        scale = sd[skey]
        shape = tuple(t.shape)
        expected = fp8_scale_shape(shape, fp8_block) if fmt == "fp8" else fp4_scale_shape(shape)
        if t.dim() != 2 or tuple(scale.shape) != expected:
            problems.append(f"{skey}: shape {tuple(scale.shape)}, expected {expected} for {fmt.upper()} weight {shape}")
            continue
        if fmt == "fp8":
            out[key] = dequantize_fp8_blockwise(t, scale, fp8_block, dtype)
        else:
            out[key] = dequantize_fp4(t, scale, FP4_BLOCK, dtype)
    orphans = [k for k in sd if k.endswith(_SCALE_SUFFIXES) and k not in used]
    problems += [f"{k}: scale without an FP8/FP4 weight" for k in orphans]
    if problems:
        raise CheckpointError(f"{len(problems)} quantised tensors are inconsistent:\n  " + "\n  ".join(problems))
    return out


def quantize_state_dict(
    sd: dict[str, Tensor], expert_fp4: bool = True, fp8_block: tuple[int, int] = FP8_BLOCK
) -> dict[str, Tensor]:
    """Dense state dict (official key names) -> the official shipped layout (see `shipped_format`).

    FP8 and FP4 weights get a `<module>.scale` (float8_e8m0fnu); with `expert_fp4=False` routed experts
    are FP8 instead (as convert.py `--expert-dtype fp8` writes them). Other tensors are cast to bf16 / fp32 /
    int64 as shipped; non-float tensors other than `tid2eid` pass through.
    """
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        fmt = shipped_format(key)
        if fmt == "fp4" and not expert_fp4:
            fmt = "fp8"
        if fmt in ("fp8", "fp4"):
            if t.dim() != 2:
                raise CheckpointError(f"{key}: expected a 2-D weight to quantise to {fmt.upper()}, got {tuple(t.shape)}")
            w, s = quantize_fp8_blockwise(t, fp8_block) if fmt == "fp8" else quantize_fp4(t)
            out[key], out[key.removesuffix(".weight") + ".scale"] = w, s
        elif fmt == "int64":
            out[key] = t.to(torch.int64)
        elif t.is_floating_point():
            out[key] = t.to(torch.float32 if fmt == "fp32" else torch.bfloat16)
        else:
            out[key] = t
    return out
