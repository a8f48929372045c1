"""FP8 / FP4 checkpoint formats (dsv4/quant.py) against hand-made cases and their resolution bounds."""

import pytest
import torch

from dsv4.errors import CheckpointError
from dsv4.quant import (
    E2M1_VALUES,
    dequantize_fp4,
    dequantize_fp8_blockwise,
    dequantize_state_dict,
    fp4_to_fp8,
    quantize_fp4,
    quantize_fp8_blockwise,
    quantize_state_dict,
    shipped_format,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e8m0_exponents(scale):
    return scale.view(torch.uint8).to(torch.int32) - 127


# ------------------------------------------------------------------------------------------------ FP8
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 130), (1, 1)])
def test_fp8_round_trip_within_half_ulp_of_block(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float8_e8m0fnu and tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    # E4M3 has 3 mantissa bits: rounding error <= 2^-4 relative, and subnormal steps are 2^-9 * scale.
    s_el = s.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert ((d - w).abs() <= w.abs() * 2**-4 + s_el * 2**-10).all()


def test_fp8_scales_are_powers_of_two_and_block_max_fits():
    w = torch.zeros(128, 256)
    w[0, 0], w[5, 200] = 1.0, -960.0  # block (0,0) amax 1, block (0,1) amax 960
    q, s = quantize_fp8_blockwise(w)
    # 2^ceil(log2(1/448)) = 2^-8, 2^ceil(log2(960/448)) = 2^2
    assert _e8m0_exponents(s).tolist() == [[-8, 2]]
    assert q[0, 0].float() == 256.0 and q[5, 200].float() == -240.0
    assert q.float().abs().max() <= 448


def test_fp8_exact_values_survive():
    w = torch.tensor([[1.0, -2.0, 0.375, 448.0, 0.0]])
    q, s = quantize_fp8_blockwise(w)
    assert torch.equal(dequantize_fp8_blockwise(q, s, dtype=torch.float32), w)


def test_fp8_rejects_wrong_scale_shape():
    q, s = quantize_fp8_blockwise(torch.randn(256, 256))
    with pytest.raises(ValueError, match="expected"):
        dequantize_fp8_blockwise(q, s[:1])


# ------------------------------------------------------------------------------------------------ FP4
def test_e2m1_grid_encodes_exactly_with_low_nibble_first():
    vals = GRID + [-v for v in GRID[1:]] + [0.0] * 17  # 32 values = one block, amax 6 -> scale 1
    w = torch.tensor([vals])
    packed, scale = quantize_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16)
    assert scale.dtype == torch.float8_e8m0fnu and _e8m0_exponents(scale).tolist() == [[0]]
    codes = packed.view(torch.uint8)[0]
    # byte j holds column 2j in its low nibble and column 2j+1 in its high nibble
    assert codes[0].item() == 0x10  # 0.0 | 0.5 << 4
    assert codes[1].item() == 0x32  # 1.0 (code 2) | 1.5 (code 3) << 4
    assert codes[3].item() == 0x76  # 4.0 | 6.0
    assert codes[4].item() == 0xA9  # -0.5 (code 9) | -1.0 (code 10)
    assert torch.equal(dequantize_fp4(packed, scale, dtype=torch.float32), w)


def test_e2m1_table_matches_official_order():
    assert E2M1_VALUES[:8].tolist() == GRID and E2M1_VALUES[8:].tolist() == [-v for v in GRID]


def test_fp4_rounds_to_nearest_ties_to_even():
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 2.9, 5.1, 6.0] + [0.0] * 21])
    packed, scale = quantize_fp4(x)
    d = dequantize_fp4(packed, scale, dtype=torch.float32)[0, :11].tolist()
    assert d == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 3.0, 6.0, 6.0]


def test_fp4_scale_per_32_columns():
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 40], w[1, 63] = 12.0, 0.75, -3.0
    packed, scale = quantize_fp4(w)
    # amax / 6 -> 2, 0.125, 0.5 ; rows with only zeros get the smallest scale
    exps = _e8m0_exponents(scale)
    assert exps[0].tolist() == [1, -3] and exps[1, 1].item() == -1
    assert torch.equal(dequantize_fp4(packed, scale, dtype=torch.float32), w)


@pytest.mark.parametrize("shape", [(64, 128), (7, 48), (3, 2)])
def test_fp4_round_trip_within_grid_resolution(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    packed, scale = quantize_fp4(w)
    assert packed.shape == (shape[0], shape[1] // 2) and scale.shape == (shape[0], -(-shape[1] // 32))
    d = dequantize_fp4(packed, scale, dtype=torch.float32)
    # the widest E2M1 gap is 2 (between 4 and 6): error <= 1 * scale
    s_el = scale.float().repeat_interleave(32, 1)[:, : shape[1]]
    assert ((d - w).abs() <= s_el).all()
    assert torch.equal(dequantize_fp4(packed.view(torch.float4_e2m1fn_x2), scale, dtype=torch.float32), d)


def test_fp4_rejects_odd_input_dim():
    with pytest.raises(ValueError, match="odd"):
        quantize_fp4(torch.randn(4, 33))


# ------------------------------------------------------------------------------------------ FP4 -> FP8
@pytest.mark.parametrize("shape", [(256, 512), (200, 96)])
def test_fp4_to_fp8_is_bit_exact(shape):
    torch.manual_seed(2)
    w = torch.randn(shape) * torch.exp2(torch.randint(-12, 1, (shape[0], 1)).float())  # rows of varied magnitude
    packed, scale = quantize_fp4(w)
    w8, s8 = fp4_to_fp8(packed, scale)
    assert w8.dtype == torch.float8_e4m3fn and s8.dtype == torch.float8_e8m0fnu
    assert tuple(s8.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert w8.float().abs().max() <= 384
    assert torch.equal(
        dequantize_fp8_blockwise(w8, s8, dtype=torch.float32), dequantize_fp4(packed, scale, dtype=torch.float32)
    )


def test_fp4_to_fp8_random_codes_and_scales_exact():
    torch.manual_seed(3)
    packed = torch.randint(-128, 128, (128, 128), dtype=torch.int8)
    scale = (torch.randint(-13, 1, (128, 8)) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)  # spread 2^13
    w8, s8 = fp4_to_fp8(packed, scale)
    assert torch.equal(
        dequantize_fp8_blockwise(w8, s8, dtype=torch.float32), dequantize_fp4(packed, scale, dtype=torch.float32)
    )


def test_fp4_to_fp8_strict_refuses_lossy_tiles():
    packed = torch.full((128, 64), 0x11, dtype=torch.int8)  # all 0.5
    exps = torch.zeros(128, 4, dtype=torch.int32)
    exps[0, 0] = -20  # 2^20 below the tile max: 0.5 * 2^-20 * 64 underflows E4M3
    scale = (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match="round"):
        fp4_to_fp8(packed, scale)
    fp4_to_fp8(packed, scale, strict=False)


# ------------------------------------------------------------------------------------------ state dicts
def _dense_layer_sd():
    torch.manual_seed(4)
    return {
        "embed.weight": torch.randn(50, 64),
        "layers.0.attn.wq_a.weight": torch.randn(32, 64),
        "layers.0.attn.q_norm.weight": torch.ones(32),
        "layers.0.attn.compressor.wkv.weight": torch.randn(16, 64),
        "layers.0.attn.indexer.wq_b.weight": torch.randn(64, 32),
        "layers.0.attn.attn_sink": torch.zeros(4),
        "layers.0.hc_attn_fn": torch.randn(24, 256),
        "layers.0.ffn.gate.weight": torch.randn(4, 64),
        "layers.0.ffn.gate.tid2eid": torch.randint(0, 4, (50, 2), dtype=torch.int32),
        "layers.0.ffn.experts.3.w2.weight": torch.randn(64, 32),
        "layers.0.ffn.shared_experts.w1.weight": torch.randn(32, 64),
        "mtp.0.e_proj.weight": torch.randn(64, 64),
        "mtp.0.ffn.gate.bias": torch.zeros(4),
    }


def test_shipped_format_matches_official_layout():
    expect = {
        "layers.7.attn.wo_a.weight": "fp8",
        "layers.7.attn.wkv.weight": "fp8",
        "layers.7.attn.indexer.wq_b.weight": "fp8",
        "layers.7.attn.compressor.wkv.weight": "bf16",
        "layers.7.attn.indexer.compressor.wgate.weight": "bf16",
        "layers.7.attn.indexer.weights_proj.weight": "bf16",
        "layers.7.attn.compressor.ape": "fp32",
        "layers.7.ffn.experts.255.w3.weight": "fp4",
        "mtp.0.ffn.experts.0.w1.weight": "fp4",
        "mtp.0.h_proj.weight": "fp8",
        "layers.7.ffn.gate.weight": "bf16",
        "layers.7.ffn.gate.bias": "fp32",
        "layers.0.ffn.gate.tid2eid": "int64",
        "hc_head_scale": "fp32",
        "head.weight": "bf16",
        "norm.weight": "bf16",
    }
    assert {k: shipped_format(k) for k in expect} == expect


def test_quantize_state_dict_layout_and_round_trip():
    sd = _dense_layer_sd()
    q = quantize_state_dict(sd)
    assert q["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert q["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert q["layers.0.ffn.experts.3.w2.weight"].dtype == torch.int8
    assert q["layers.0.ffn.experts.3.w2.scale"].shape == (64, 1)
    assert q["mtp.0.e_proj.scale"].shape == (1, 1)
    assert q["layers.0.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert q["layers.0.hc_attn_fn"].dtype == torch.float32 and q["layers.0.attn.attn_sink"].dtype == torch.float32
    assert q["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert "layers.0.ffn.gate.scale" not in q and "embed.scale" not in q

    d = dequantize_state_dict(q, torch.float32)
    assert set(d) == set(sd)
    for key in ("layers.0.attn.wq_a.weight", "layers.0.ffn.experts.3.w2.weight"):
        rel = (d[key] - sd[key]).abs().max() / sd[key].abs().max()
        assert rel < 0.2, key
    assert d["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_quantize_state_dict_fp8_experts():
    q = quantize_state_dict(_dense_layer_sd(), expert_fp4=False)
    assert q["layers.0.ffn.experts.3.w2.weight"].dtype == torch.float8_e4m3fn


def test_dequantize_accepts_weight_scale_inv_fp32():
    q, s = quantize_fp8_blockwise(torch.randn(64, 64))
    d = dequantize_state_dict({"a.wq_a.weight": q, "a.wq_a.weight_scale_inv": s.float()}, torch.float32)
    assert list(d) == ["a.wq_a.weight"]
    assert torch.equal(d["a.wq_a.weight"], dequantize_fp8_blockwise(q, s, dtype=torch.float32))


def test_missing_scale_names_the_key():
    q = quantize_state_dict(_dense_layer_sd())
    del q["layers.0.attn.wq_a.scale"]
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_a\.weight"):
        dequantize_state_dict(q)


def test_wrong_scale_shape_and_orphan_scale_are_reported():
    q = quantize_state_dict(_dense_layer_sd())
    q["layers.0.ffn.experts.3.w2.scale"] = q["layers.0.ffn.experts.3.w2.scale"][:10]
    q["layers.0.ffn.gate.scale"] = torch.ones(1, 1)
    with pytest.raises(CheckpointError) as err:
        dequantize_state_dict(q)
    msg = str(err.value)
    assert "2 quantised tensors" in msg
    assert "layers.0.ffn.experts.3.w2.scale: shape (10, 1), expected (64, 1)" in msg
    assert "layers.0.ffn.gate.scale" in msg
    assert isinstance(err.value, ValueError)


def test_training_fake_quant_equals_the_release_fp4_round_trip():
    """FP4 QAT (dsv4.hooks.fake_quant_fp4) rounds exactly as the shipped FP4 format stores (dsv4.quant)."""
    from dsv4.hooks import fake_quant_fp4

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, scale = quantize_fp4(w)
    torch.testing.assert_close(fake_quant_fp4(w), dequantize_fp4(packed, scale, dtype=torch.float32), rtol=0, atol=0)
