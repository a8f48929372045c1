"""The prefill indexer's scoring variants (`indexer_topk(layout=..., head_dot=...)`) against the stable-sort
reference on tiny shapes: ragged query blocks and key tiles, query chunks that end inside a block, top-k larger
than the visible keys, batch > 1, the candidate top-k. Runs on a GPU or under TRITON_INTERPRET=1."""

import pytest
import torch

from conftest import DEVICE, needs_kernels

pytestmark = needs_kernels

# name -> indexer_topk keywords; explicit tiles make query blocks and key tiles end off the shapes below
VARIANTS = {
    "query": dict(),
    "interleaved": dict(layout="interleaved"),
    "interleaved_tiles": dict(layout="interleaved", block_q=4, block_n=16, num_warps=4),
    "key": dict(layout="key"),
    "key_tiles": dict(layout="key", block_q=2, block_n=32, num_warps=4),
    "key_head_dot": dict(layout="key", head_dot=True, block_n=32),  # 64-key tiles need 287 KB of shared memory in fp32
    "key_head_dot_tiles": dict(layout="key", head_dot=True, block_q=8, block_n=16),
}

# B, S, Hi, Di, N, k, first position, queries per chunk
CASES = {
    "ragged": (2, 21, 3, 24, 30, 5, 99, 5),  # 21 queries in chunks of 5, 30 keys: no block or tile divides them
    "topk_gt_visible": (1, 13, 4, 16, 11, 20, 0, 13),  # visible 0..3 of 11 keys, k = 20 > N: -1 padding
    "batch_prompt_start": (3, 17, 2, 16, 40, 6, 3, 7),  # early rows see fewer than k keys
    "candidates": (2, 9, 4, 16, 200, 5, 791, 9),  # N >= 8k: the group-maxima bound and collect kernel
}


def inputs(case, integer, seed=11):
    B, S, Hi, Di, N, k, first, chunk = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    draw = ((lambda *s: torch.randint(-2, 3, s, generator=gen).float()) if integer
            else (lambda *s: torch.randn(*s, generator=gen)))
    q, keys, w = draw(B, S, Hi, Di), draw(B, N, Di), draw(B, S, Hi)
    return q, w, keys, torch.arange(first, first + S), k, dict(key_budget=chunk * B * N, candidates=N >= 8 * k)


def run(ix, q, w, keys, positions, k, **kw):
    return ix.indexer_topk(q.to(DEVICE), w.to(DEVICE), keys.to(DEVICE), positions.to(DEVICE), 4, k, **kw).cpu()


def scores(q, w, keys):
    """fp32 head-summed scores (B, S, N), without the Di^-1/2 (order only)."""
    return torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu().mul(w.float()[..., None]).sum(2)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_reference(variant, case):
    """Integer-valued fp32 inputs score exactly (many ties): every variant equals the stable sort, order and
    tie-break included. Gaussian inputs: on CPU equal too (no near-ties at these sizes); on a GPU the tf32
    products may swap near-ties, so the chosen keys' scores are compared."""
    from dsv4.kernels import indexer_topk as ix
    for integer in (True, False):
        q, w, keys, positions, k, kw = inputs(case, integer)
        ref = ix.reference(q, w, keys, positions, 4, k)
        out = run(ix, q, w, keys, positions, k, **kw, **VARIANTS[variant])
        if integer or DEVICE == "cpu":
            assert torch.equal(out, ref), (variant, case, integer)
        else:
            score = lambda idx: scores(q, w, keys).gather(-1, idx.clamp(min=0))
            torch.testing.assert_close(score(out), score(ref), atol=1e-3, rtol=1e-3)
            assert torch.equal(out < 0, ref < 0)


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter multiplies bf16 tl.dot operands wrongly "
                    "(triton 3.9: a 16x16 bf16 dot of small integers comes out ~1e10); fp32 inputs cover the CPU")
@pytest.mark.parametrize("variant", ["query", "interleaved", "key", "key_head_dot_tiles"])
def test_variant_bf16_inputs(variant):
    """bf16 q and keys, as the model runs them. Integer-valued: the ReLU'd scores (|q.K| <= 2 x 2 x 24 < 2^8)
    and weights are exact in bf16 even where `head_dot` rounds them, so the picks equal the reference's. Gaussian,
    `head_dot`: each ReLU'd score and weight carries a bf16 rounding (2^-9 relative), so a pick scores at most
    2 x 2^-8 x max_n sum_h |w_h| ReLU(q_h . K_n) below the reference's k-th best."""
    from dsv4.kernels import indexer_topk as ix
    q, w, keys, positions, k, kw = inputs("ragged", integer=True)
    q, keys = q.bfloat16(), keys.bfloat16()
    out = run(ix, q, w, keys, positions, k, **kw, **VARIANTS[variant])
    assert torch.equal(out, ix.reference(q, w, keys, positions, 4, k))
    q, w, keys, positions, k, kw = inputs("candidates", integer=False)
    q, keys = q.bfloat16(), keys.bfloat16()
    out = run(ix, q, w, keys, positions, k, **kw, **VARIANTS[variant])
    ref = ix.reference(q, w, keys, positions, 4, k)
    score = scores(q, w, keys)
    bound = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu().mul(w.abs()[..., None]).sum(2)
    tol = 2 * 2.0 ** -8 * bound.amax(-1, keepdim=True) + 1e-3 * score.abs().amax(-1, keepdim=True)
    assert (score.gather(-1, out) >= score.gather(-1, ref[..., -1:]) - tol).all()
    assert (out.sort(-1).values.diff(dim=-1) > 0).all()  # distinct picks


def test_fp8_scores_in_key_layout():
    """FP8 scoring in the other layouts: the per-key scale multiplies each key's head sum, as in the default
    layout. Integer inputs in [-2, 2] are exact in E4M3 (0, +-128, +-256 at scale 2^-7), and so are the
    `head_dot` bf16 operands: each ReLU'd q.K is 2^14 x an integer below 2^8, each weight an integer x 2^-7."""
    from dsv4.kernels import indexer_topk as ix
    gen = torch.Generator().manual_seed(4)
    B, S, Hi, Di, N, k = 2, 9, 4, 32, 60, 8
    ints = lambda *s: torch.randint(-2, 3, s, generator=gen).float()
    q, keys, w = ints(B, S, Hi, Di), ints(B, N, Di), ints(B, S, Hi)
    positions = torch.arange(4 * N - S, 4 * N)
    variants = [dict(layout="interleaved"), dict(layout="key")]
    if DEVICE == "cuda":  # head_dot's bf16 matmul: not on CPU (see test_variant_bf16_inputs' skip)
        variants.append(dict(layout="key", head_dot=True))
    for kw in variants:
        out = run(ix, q, w, keys, positions, k, fp8=True, **kw)
        assert torch.equal(out, ix.reference(q, w, keys, positions, 4, k)), kw


def test_bad_variant_is_refused():
    from dsv4.kernels import indexer_topk as ix
    q, w, keys, positions, k, _ = inputs("ragged", integer=True)
    with pytest.raises(ValueError, match="layout"):
        run(ix, q, w, keys, positions, k, layout="heads")
    with pytest.raises(ValueError, match="head_dot"):
        run(ix, q, w, keys, positions, k, head_dot=True, layout="query")
