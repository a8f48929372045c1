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
from dsv4.config import preset
from dsv4.kernels import fp8_kv
from tests.conftest import DEVICE, needs_kernels, rel_err

pytestmark = needs_kernels

if kernels.triton_available():
    from dsv4.kernels import decode_attn as da
    from dsv4.kernels import indexer_decode as ixd
    from tests.test_kernels import DTYPE, TOL, _fp8_source, _paged_setup, random_topk

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
    B, H, D, N, k, ratio, window, L = DENSE_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    positions = torch.tensor([ratio * N + 2]) if N else torch.tensor([L - 1])
    q = torch.randn(B, 1, H, D, generator=gen).to(DTYPE)
    window_kv = torch.randn(B, L, D, generator=gen).to(DTYPE)
    compressed = torch.randn(B, N, D, generator=gen).to(DTYPE) if N else None
    topk = random_topk(gen, B, 1, N, k, (positions + 1) // ratio) if k else None
    sink = torch.randn(H, generator=gen)
    args = (q, window_kv, positions, compressed, topk, ratio, sink, D ** -0.5, window)
    ref = attention_reference(*args)
    dev = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
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
    gen = torch.Generator().manual_seed(D)
    B, H, N, W, L = 2, 4, 37, 8, 8
    win, win_ref = _fp8_source(torch.randn(B, L, D, generator=gen), rope)
    comp, comp_ref = _fp8_source(torch.randn(B, N, D, generator=gen) * 3, rope)
    q = torch.randn(B, 1, H, D, generator=gen).to(DTYPE)
    sink = torch.randn(H, generator=gen)
    pos = torch.tensor([4 * N + 1])
    p32 = pos.int().to(DEVICE).expand(B, 1).contiguous()
    pos0 = (p32[:, 0] - (L - 1)).contiguous()
    n_comp = torch.full((B,), N, dtype=torch.int32, device=DEVICE)
    for topk in (None, random_topk(gen, B, 1, N, 11, torch.tensor([N]))):
        ref = attention_reference(q, win_ref, pos, comp_ref, topk, 4, sink, D ** -0.5, W)
        out = da.attend_decode(q.to(DEVICE), p32, sink.to(DEVICE), D ** -0.5, W, win, pos0, pos0, comp=comp,
                               n_comp=n_comp, max_comp=N, topk=None if topk is None else topk.int().to(DEVICE),
                               ratio=4, rope_dim=rope, chunk=16, **ATTN_VARIANTS[variant])
        assert rel_err(out.cpu(), ref) < TOL


@pytest.mark.parametrize("variant", sorted(ATTN_VARIANTS))
def test_decode_variant_paged_ragged_batch(variant):
    """3 sequences of different lengths in the paged FP8 pool (ring window, shuffled block tables), CSA and HCA
    layers: each variant vs the reference on the dequantised entries."""
    config = preset("tiny").replace(compress_ratios=[4, 128, 0, 4], index_topk=6)
    gen = torch.Generator().manual_seed(11)
    lengths = [300, 141, 9]
    cache, slots, truth = _paged_setup(config, lengths, gen)
    H, D, rd, W = config.num_attention_heads, config.head_dim, config.qk_rope_head_dim, config.sliding_window
    for layer, r in cache.ratios.items():
        q = torch.randn(len(slots), 1, H, D, generator=gen).to(DTYPE).to(DEVICE)
        sink = torch.randn(H, generator=gen).to(DEVICE)
        pos = torch.tensor([[n - 1] for n in lengths], dtype=torch.int32, device=DEVICE)
        n_comp = torch.tensor([n // r if r else 0 for n in lengths], dtype=torch.int32, device=DEVICE)
        topk = None
        if r == 4:
            topk = torch.stack([random_topk(gen, 1, 1, max(int(n_comp.max()), 1), config.index_topk,
                                            n_comp[i:i + 1].cpu())[0] for i in range(len(slots))]).to(DEVICE)
        zeros = torch.zeros(len(slots), dtype=torch.int32, device=DEVICE)
        out = da.attend_decode(q, pos, sink, D ** -0.5, W, cache.window_source(layer, slots), zeros, zeros,
                               win_ring=W, comp=cache.entry_source(layer, slots) if r else None, n_comp=n_comp,
                               max_comp=int(n_comp.max()), topk=topk, ratio=max(r, 1), rope_dim=rd, chunk=16,
                               **ATTN_VARIANTS[variant])
        for i, n in enumerate(lengths):
            win, ent = (fp8_kv.fake_quantize(t.float(), rd).to(DTYPE).cpu() for t in truth[i][layer])
            ref = attention_reference(q[i:i + 1].cpu(), win[None, -(W - 1) - 1:], torch.tensor([n - 1]),
                                      ent[None] if r else None, topk[i:i + 1].cpu() if topk is not None else None,
                                      max(r, 1), sink.cpu(), D ** -0.5, W)
            assert rel_err(out[i:i + 1].cpu(), ref) < TOL, (layer, i)
