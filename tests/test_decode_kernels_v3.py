"""The decode kernels' tiling variants (`decode_attn.attend_decode(value_split=, qk_groups=)`,
`indexer_decode.indexer_topk_decode(contiguous_blocks=)`) vs the PyTorch references, on tiny shapes: ragged
batch from the paged FP8 pool, lengths that are not multiples of the block sizes, top-k larger than the
entries available, several splits, a partial last scale group.

Each variant must give what the default tiling gives (the reference, at the dtype's tolerance); the
defaults themselves are covered by tests/test_kernels.py. Like there: TRITON_INTERPRET=1 on CPU.
"""

import pytest
import torch

from dsv4 import kernels
from dsv4.attention import sparse_attention as attention_reference
from dsv4.kernels import fp8_kv
from tests.conftest import DEVICE, needs_kernels, random_topk, rel_err

pytestmark = needs_kernels

if kernels.triton_available():
    from dsv4.kernels import decode_attn as da
    from dsv4.kernels import indexer_decode as ixd
    from tests.test_kernels import (DTYPE, TOL, _fp8_source, check_fp8_records_decode, dense_decode_case,
                                    paged_decode_cases, tolerance)

# attend_decode variants: one value slice per program of 2 / 4, logits per scale group, and both with every
# head in one tile (the "dequantise once for all heads" layout of benchmarks/tune_decode.py).
ATTN_VARIANTS = {
    "value_split_2": dict(value_split=2),
    "qk_groups": dict(qk_groups=True),
    "all_heads_value_split_4_qk_groups": dict(block_h=64, value_split=4, qk_groups=True),
    "value_split_2_small_blocks": dict(value_split=2, block_n=16),
}

# (B, H, D, N, k, ratio, window, cached): one query per sequence after `cached` window rows (dense rows).
DENSE_CASES = {
    "csa_topk_gt_entries": (1, 4, 32, 3, 7, 4, 8, 5),
    "csa_ragged_heads": (2, 20, 64, 40, 37, 4, 8, 9),  # 20 heads: a ragged head block
    "hca_many_splits": (3, 4, 32, 70, None, 2, 8, 7),
    "window_only": (1, 4, 48, 0, None, 4, 8, 5),
}


@pytest.mark.parametrize("variant", sorted(ATTN_VARIANTS))
@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_decode_variant_dense_rows(case, variant):
    dev, ref = dense_decode_case(*DENSE_CASES[case], seed=len(case))
    out = torch.full_like(dev[0], float("nan"))  # poisoned: every element must be written
    out = da.sparse_attention_decode(*dev, out=out, chunk=16, **ATTN_VARIANTS[variant])
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL


@pytest.mark.parametrize("variant", sorted(ATTN_VARIANTS))
@pytest.mark.parametrize("D,rope", [(160, 32), (128, 16)])  # E4M3 dims: two full scale groups / 64 + 48
def test_decode_variant_fp8_records(D, rope, variant):
    """FP8 records over several 64-dim scale groups (a partial last one too): the variants apply the UE8M0
    scale to the per-group logits and dequantise only their value slice; both must match the reference on
    the dequantised rows, HCA and CSA."""
    check_fp8_records_decode(D, rope, **ATTN_VARIANTS[variant])


@pytest.mark.parametrize("variant", sorted(ATTN_VARIANTS))
def test_decode_variant_paged_ragged_batch(variant):
    """3 sequences of different lengths in the paged FP8 pool (ring window, shuffled block tables), CSA and HCA
    layers: each variant vs the reference on the dequantised entries."""
    for layer, args, kw, refs in paged_decode_cases(seed=11):
        out = da.attend_decode(*args, **kw, chunk=16, **ATTN_VARIANTS[variant])
        for i, ref in enumerate(refs):
            assert rel_err(out[i:i + 1].cpu(), ref) < TOL, (layer, i)


def _shuffled_fp8_source(x: torch.Tensor, rope_dim: int, block_size: int, gen):
    """(B, N, D) -> (KVSource of FP8 records behind a shuffled block table of `block_size` rows, what the kernel
    must see: dequantised)."""
    B, N, D = x.shape
    n_blocks = -(-N // block_size)
    padded = torch.zeros(B, n_blocks * block_size, D)
    padded[:, :N] = x
    table = torch.randperm(B * n_blocks, generator=gen).int().view(B, n_blocks)
    rows = (table[..., None].long() * block_size + torch.arange(block_size)).view(B, -1)
    pool = torch.empty(B * n_blocks * block_size, D)
    pool[rows.flatten()] = padded.view(-1, D)
    nope, rope, scale = fp8_kv.views(fp8_kv.pack(*fp8_kv.quantize(pool, rope_dim)).to(DEVICE), D, rope_dim)
    src = da.KVSource(main=nope, rope=rope, scale=scale, table=table.to(DEVICE), block_size=block_size)
    return src, fp8_kv.fake_quantize(x.float(), rope_dim).to(DTYPE)


@pytest.mark.parametrize("variant", [{}, dict(value_split=2, qk_groups=True)])
def test_hca_contiguous_blocks_ragged_batch(variant):
    """HCA with one block-table entry per key block (`contiguous_blocks`), shuffled 32-row pool blocks, rows that
    see 70 / 45 / 3 of their entries (lengths not multiples of the block): vs the reference per row."""
    gen = torch.Generator().manual_seed(4)
    B, H, D, rope, N, W, L, ratio = 3, 4, 160, 32, 70, 8, 8, 2
    comp, comp_ref = _shuffled_fp8_source(torch.randn(B, N, D, generator=gen), rope, 32, gen)
    win, win_ref = _fp8_source(torch.randn(B, L, D, generator=gen), rope)
    q = torch.randn(B, 1, H, D, generator=gen).to(DTYPE)
    sink = torch.randn(H, generator=gen)
    visible = [70, 45, 3]
    pos = torch.tensor([[ratio * v] for v in visible], dtype=torch.int32)  # (pos + 1) // ratio = v visible
    pos0 = (pos[:, 0] - (L - 1)).contiguous()
    n_comp = torch.full((B,), N, dtype=torch.int32)
    out = da.attend_decode(q.to(DEVICE), pos.to(DEVICE), sink.to(DEVICE), D ** -0.5, W, win, pos0.to(DEVICE),
                           pos0.to(DEVICE), comp=comp, n_comp=n_comp.to(DEVICE), max_comp=N, ratio=ratio,
                           rope_dim=rope, chunk=32, block_n=16, contiguous_blocks=True, **variant)
    for i, v in enumerate(visible):
        ref = attention_reference(q[i:i + 1].to(win_ref.dtype), win_ref[i:i + 1], pos[i, :1].long(), comp_ref[i:i + 1, :v], None,
                                  ratio, sink, D ** -0.5, W)
        assert rel_err(out[i:i + 1].cpu(), ref) < tolerance(DTYPE), i
    with pytest.raises(ValueError, match="must divide"):
        da.attend_decode(q.to(DEVICE), pos.to(DEVICE), sink.to(DEVICE), D ** -0.5, W, win, pos0.to(DEVICE),
                         pos0.to(DEVICE), comp=comp, n_comp=n_comp.to(DEVICE), max_comp=N, ratio=ratio,
                         rope_dim=rope, block_n=64, contiguous_blocks=True)


def _fp8_key_pool(gen, B: int, N: int, Di: int, bs: int):
    """B rows of N integer-valued FP8 indexer keys with power-of-two per-key scales (exact scores), in shuffled
    pool blocks of bs keys -> (the keys as the reference sees them (B, N, Di), the pool as a KeySource)."""
    vals = torch.randint(-3, 4, (B, N, Di), generator=gen).float()
    scale = torch.exp2(torch.randint(-2, 3, (B, N), generator=gen).float())
    blocks = torch.randperm(B * N // bs, generator=gen).int().view(B, N // bs)
    rows = (blocks[..., None].long() * bs + torch.arange(bs)).view(B, N)
    main = torch.empty(B * N, Di, dtype=torch.float8_e4m3fn)
    kscale = torch.empty(B * N)
    main[rows.flatten()] = vals.view(-1, Di).to(torch.float8_e4m3fn)
    kscale[rows.flatten()] = scale.flatten()
    src = ixd.KeySource(main=main.to(DEVICE), table=blocks.to(DEVICE), block_size=bs, scale=kscale.to(DEVICE))
    return vals * scale[..., None], src


@pytest.mark.parametrize("tile", [16, 48])  # 48: a tile that is no power of two (default tiles can be)
def test_indexer_contiguous_blocks_paged_fp8(tile):
    """The score kernel reading a key block through one block-table entry: FP8 keys with power-of-two per-key
    scales (exact scores) in shuffled 16-key pool blocks, integer values (many ties: the stable-sort rule),
    ragged visibility (48, 30 and 5 of 48 entries; k = 12 > 5), the same indices as the reference."""
    gen = torch.Generator().manual_seed(9)
    B, Hi, Di, N, bs, k = 3, 4, 16, 48, 16, 12
    keys, src = _fp8_key_pool(gen, B, N, Di, bs)
    q = torch.randint(-2, 3, (B, Hi, Di), generator=gen).float()
    w = torch.randint(-2, 3, (B, Hi), generator=gen).float()
    pos = torch.tensor([4 * N + 3, 4 * 30 + 1, 4 * 5])
    lengths = torch.full((B,), N)
    ref = ixd.reference(q, w, keys, pos, 4, k, lengths)
    out = ixd.indexer_topk_decode(q.to(DEVICE), w.to(DEVICE), src, pos.int().to(DEVICE), lengths.int().to(DEVICE), 4,
                                  k, N, tile=tile, block_n=16, contiguous_blocks=True)
    assert torch.equal(out.cpu(), ref)
    with pytest.raises(ValueError, match="must divide"):
        ixd.indexer_topk_decode(q.to(DEVICE), w.to(DEVICE), src, pos.int().to(DEVICE), lengths.int().to(DEVICE), 4,
                                k, N, block_n=32, contiguous_blocks=True)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("log2_mag", [0, 40, -40])  # |q| of 2^40 overflows fp16 and 2^-40 underflows it, unscaled
def test_indexer_f16_dot_bf16_query_fp8_keys(contiguous, log2_mag):
    """A bf16 query over FP8 keys scores in fp16 (`f16_dot`, the default for these dtypes): q is rescaled by a power
    of two into fp16's range and the scores back, so the indices are the reference's exactly, for queries whose
    size alone would overflow or underflow fp16; `f16_dot=False` (bf16) gives the same on a GPU (Triton 3.9's CPU
    interpreter returns garbage for a bf16 matmul of converted FP8 values); fp32 q refuses it."""
    gen = torch.Generator().manual_seed(11)
    B, Hi, Di, N, bs, k = 2, 4, 16, 48, 16, 12
    keys, src = _fp8_key_pool(gen, B, N, Di, bs)
    q = (torch.randint(-2, 3, (B, Hi, Di), generator=gen).float() * 2.0 ** log2_mag).to(torch.bfloat16)
    w = torch.randint(-2, 3, (B, Hi), generator=gen).float()
    pos = torch.tensor([4 * N + 3, 4 * 30 + 1])
    lengths = torch.full((B,), N)
    ref = ixd.reference(q.float(), w, keys, pos, 4, k, lengths)
    args = (w.to(DEVICE), src, pos.int().to(DEVICE), lengths.int().to(DEVICE), 4, k, N)
    for f16 in (None, False) if DEVICE == "cuda" else (None,):
        out = ixd.indexer_topk_decode(q.to(DEVICE), *args, tile=32, block_n=16, contiguous_blocks=contiguous,
                                      f16_dot=f16)
        assert torch.equal(out.cpu(), ref), f16
    with pytest.raises(ValueError, match="f16_dot"):
        ixd.indexer_topk_decode(q.float().to(DEVICE), *args, f16_dot=True)
