"""The fused mHC maps kernel (dsv4/kernels/mhc_maps.py) vs its reference `dsv4.mhc.hc_maps_from_mixes`, on tiny
shapes: token counts that leave a ragged last block, n = 2 and 4 (and 3, 8: padded to a power of two), one and
twenty Sinkhorn iterations; and the seam's routing.

On a CPU machine the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, as `make test` sets it).
"""


import pytest
import torch

from dsv4 import kernels
from dsv4.mhc import hc_maps, hc_maps_from_mixes, hc_mult
from tests.conftest import DEVICE, needs_kernels

pytestmark = needs_kernels

if kernels.triton_available():
    from dsv4.kernels.mhc_maps import hc_maps_fused, hc_maps_train

EPS = 1e-6


def random_inputs(B, S, n, seed=0):
    """mixes of the spread the projection gives (logits of a few units), non-neutral base and gates."""
    gen = torch.Generator().manual_seed(seed)
    width = (2 + n) * n
    mixes = torch.randn(B, S, width, generator=gen) * 3
    base = torch.randn(width, generator=gen)
    scale = torch.rand(3, generator=gen) + 0.5
    return mixes, base, scale


# (B, S, n, block_elems): block_elems small enough that B*S spans several programs with a ragged last one.
CASES = {
    "n4_ragged": (2, 13, 4, 64),  # BLOCK_M 4: 26 tokens = 6 full blocks + 2
    "n2_ragged": (3, 5, 2, 32),  # BLOCK_M 8: 15 tokens = 1 full block + 7
    "n4_decode": (3, 1, 4, 2048),  # one program: BLOCK_M capped at next_pow2(3 tokens) = 4
    "n3_padded": (1, 7, 3, 64),  # NP 4: a padded row and column in every matrix
    "n8_max": (2, 3, 8, 128),
}


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_maps_match_reference(case, iters):
    B, S, n, block_elems = CASES[case]
    mixes, base, scale = random_inputs(B, S, n, seed=len(case) + iters)
    ref = hc_maps_from_mixes(mixes, base, scale, sinkhorn_iters=iters, hc_eps=EPS)
    out = hc_maps_fused(mixes.to(DEVICE), base.to(DEVICE), scale.to(DEVICE), sinkhorn_iters=iters, hc_eps=EPS,
                        block_elems=block_elems)
    for name, o, r in zip(("pre", "post", "comb"), out, ref):
        assert o.shape == r.shape and o.dtype == torch.float32, name
        torch.testing.assert_close(o.cpu(), r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("case", ["n4_ragged", "n3_padded", "n2_ragged"])
def test_trainable_maps_gradients_match_reference(case, iters):
    """hc_maps_train's backward (replayed Sinkhorn walked back) == the reference's autograd, for mixes, base and
    scale, with a weighted loss on all three maps, and with only comb used (the other gradients None)."""
    B, S, n, _ = CASES[case]
    mixes, base, scale = random_inputs(B, S, n, seed=len(case) + iters)
    gen = torch.Generator().manual_seed(iters)
    weights = [torch.randn(B, S, *shape, generator=gen) for shape in ((n,), (n,), (n, n))]
    for used in ((0, 1, 2), (2,)):
        grads = []
        for fn, dev in ((hc_maps_from_mixes, "cpu"), (hc_maps_train, DEVICE)):
            # Fresh leaves per pass: `.to("cpu")` of a CPU tensor is the tensor itself, so reused inputs would share
            # (and accumulate into) one .grad between both passes, and on a GPU the copy of an input that requires
            # grad is no leaf (no .grad at all).
            leaves = [t.detach().clone().to(dev).requires_grad_() for t in (mixes, base, scale)]
            out = fn(*leaves, sinkhorn_iters=iters, hc_eps=EPS)
            sum((out[u] * weights[u].to(dev)).sum() for u in used).backward()
            grads.append([t.grad.cpu() for t in leaves])
        for name, got, want in zip(("mixes", "base", "scale"), grads[1], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} {used}")


def test_seam_routes_and_keeps_gradients():
    """No autograd: the forward kernel (= reference to rounding). Autograd recording: the trainable kernel (the
    default; = reference to rounding, same gradient), or with it switched off exactly the reference."""
    B, S, n, d = 2, 3, 4, 8
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, n, d, generator=gen).to(DEVICE)
    fn = (torch.randn((2 + n) * n, n * d, generator=gen) * 0.1).to(DEVICE).requires_grad_()
    _, base, scale = (t.to(DEVICE) for t in random_inputs(1, 1, n))
    kw = dict(sinkhorn_iters=20, hc_eps=EPS, norm_eps=1e-6)
    with kernels.use("reference"):
        ref = hc_maps(x, fn, base, scale, **kw)
    with kernels.use("triton"):
        with torch.no_grad():
            fast = hc_maps(x, fn, base, scale, **kw)
        with kernels.use_train_mhc_kernel(False):
            graded_ref = hc_maps(x, fn, base, scale, **kw)
        graded = hc_maps(x, fn, base, scale, **kw)
    for o, r in zip(fast, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    for o, r in zip(graded, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    for o, r in zip(graded_ref, ref):
        assert torch.equal(o, r)
    sum(t.sum() for t in graded_ref).backward()
    assert fn.grad is not None and fn.grad.abs().sum() > 0
    ref_grad, fn.grad = fn.grad, None
    sum(t.sum() for t in graded).backward()  # the trainable kernel's backward: the same gradient
    torch.testing.assert_close(fn.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_width_must_be_an_mhc_projection():
    assert [hc_mult((2 + n) * n) for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="not \\(2\\+n\\)\\*n"):
        hc_mult(23)
    with pytest.raises(ValueError, match="n <= 8"):
        hc_maps_fused(*random_inputs(1, 1, 9), sinkhorn_iters=1, hc_eps=EPS)
