"""mHC maps after the projection (§2.2) in one launch: sigmoid gates + every Sinkhorn-Knopp iteration.

Per token the maps are tiny (n = hc_mult = 4: 4 + 4 + 16 numbers from 24 mixes), but the reference runs
them as ~6 elementwise/reduction kernels per Sinkhorn iteration (20 iterations in the released config),
each re-reading the whole (tokens, n, n) tensor: launch-bound at decode, memory-bound at prefill. Here a
program owns BLOCK_M tokens, keeps their (n, n) matrices in registers for all iterations and writes the
three maps once: 96 bytes read and 96 written per token for n = 4.

n need not be a power of two: the matrices are padded to NP = next_pow2(n) and the padding held at exactly
zero (it adds nothing to any row or column sum, so the valid entries see the reference's arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mhc import hc_maps_from_mixes as reference
from ..mhc import hc_mult

__all__ = ["hc_maps_fused", "hc_maps_train", "reference"]

MAX_HC = 8  # registers: BLOCK_M * NP * NP values per program; n beyond 8 was never configured


@triton.jit
def _gate_sigmoids(mix, BASE, s_pre, s_post, i, im, m2, N: tl.constexpr):
    """sigmoid(mixes * scale + base) of the pre and post gates: (BM, NP) each (pre = it + eps, post = 2 it)."""
    sa = tl.sigmoid(tl.load(mix[:, None] + i[None, :], mask=m2, other=0.0) * s_pre
                    + tl.load(BASE + i, mask=im, other=0.0)[None, :])
    sc = tl.sigmoid(tl.load(mix[:, None] + N + i[None, :], mask=m2, other=0.0) * s_post
                    + tl.load(BASE + N + i, mask=im, other=0.0)[None, :])
    return sa, sc


@triton.jit
def _comb_softmax(mix, BASE, s_comb, ij, valid, m3, im):
    """The comb logits' row softmax (the reference's first Sinkhorn normalisation): (BM, NP, NP), exactly 0 in
    the padding. Padded columns are -inf (exp -> 0); padded rows get max 0 and sum 1, so 0 instead of 0/0."""
    logit = tl.load(mix[:, None, None] + ij[None, :, :], mask=m3, other=0.0)
    logit = logit * s_comb + tl.load(BASE + ij, mask=valid, other=0.0)[None, :, :]
    logit = tl.where(valid[None, :, :], logit, float("-inf"))
    mx = tl.where(im[None, :], tl.max(logit, axis=2), 0.0)
    e = tl.exp(logit - mx[:, :, None])
    se = tl.where(im[None, :], tl.sum(e, axis=2), 1.0)
    return tl.where(valid[None, :, :], e / se[:, :, None], 0.0)


@triton.jit
def _hc_maps_kernel(MIX, smm, BASE, SCALE, PRE, POST, COMB, M, iters, hc_eps,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    i = tl.arange(0, NP)
    im = i < N
    mix = MIX + rows.to(tl.int64) * smm  # (BM,) row pointers; columns [pre n | post n | comb n*n]
    s_pre = tl.load(SCALE)
    s_post = tl.load(SCALE + 1)
    s_comb = tl.load(SCALE + 2)

    # A = sigmoid(.) + eps, C = 2 sigmoid(.): (BM, NP)
    m2 = rm[:, None] & im[None, :]
    out2 = rows.to(tl.int64)[:, None] * N + i[None, :]
    sa, sc = _gate_sigmoids(mix, BASE, s_pre, s_post, i, im, m2, N)
    tl.store(PRE + out2, sa + hc_eps, mask=m2)
    tl.store(POST + out2, 2 * sc, mask=m2)

    # B = Sinkhorn(exp(.)): (BM, NP, NP), axis 1 = row index i, axis 2 = column index j.
    ij = i[:, None] * N + i[None, :]
    valid = im[:, None] & im[None, :]
    m3 = rm[:, None, None] & valid[None, :, :]
    p = _comb_softmax(mix + 2 * N, BASE + 2 * N, s_comb, ij, valid, m3, im)
    b = tl.where(valid[None, :, :], p + hc_eps, 0.0)
    b = b / (tl.sum(b, axis=1)[:, None, :] + hc_eps)
    for _ in range(iters - 1):
        b = b / (tl.sum(b, axis=2)[:, :, None] + hc_eps)
        b = b / (tl.sum(b, axis=1)[:, None, :] + hc_eps)
    tl.store(COMB + rows.to(tl.int64)[:, None, None] * (N * N) + ij[None, :, :], b, mask=m3)


def hc_maps_fused(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, sinkhorn_iters: int,
                  hc_eps: float, block_elems: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `reference`: mixes (..., (2+n)*n) -> pre (..., n), post (..., n), comb (..., n, n) fp32.
    `block_elems` bounds BLOCK_M * NP^2, the matrix entries one program holds (16 per thread at 4 warps)."""
    width = mixes.shape[-1]
    n = hc_mult(width)
    if n > MAX_HC:
        raise ValueError(f"hc_mult={n}: the fused mHC kernel supports n <= {MAX_HC}; use kernels.use('reference')")
    lead = mixes.shape[:-1]
    mix = mixes.float().reshape(-1, width)
    if mix.stride(-1) != 1:
        mix = mix.contiguous()
    M = mix.shape[0]
    pre = torch.empty(M, n, dtype=torch.float32, device=mixes.device)
    post = torch.empty_like(pre)
    comb = torch.empty(M, n, n, dtype=torch.float32, device=mixes.device)
    if M:
        NP = triton.next_power_of_2(n)
        BLOCK_M = min(max(1, block_elems // (NP * NP)), triton.next_power_of_2(M))
        _hc_maps_kernel[(triton.cdiv(M, BLOCK_M),)](
            mix, mix.stride(0), base.float().contiguous(), scale.float().contiguous(), pre, post, comb, M,
            sinkhorn_iters, hc_eps, N=n, NP=NP, BLOCK_M=BLOCK_M, num_warps=4)
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)


# ------------------------------------------------------------------------------------------- training
# The backward of the maps, for training (the reference's autograd launches ~10 kernels per Sinkhorn iteration
# forward and backward: ~9K launches per step of a 12-layer model). Per token it replays the forward, storing the
# input of each of the K = 2 * iters - 1 normalisations in a scratch buffer, then walks them back:
#   y = x / (s + eps), s = sum of x along the normalised axis  ->  dx = (dy - sum(dy * y) along it) / (s + eps)
# then the first row softmax and the gates. It writes d(mixes * scale + base), the gradient of each map's
# argument; the gradients of mixes, base and scale follow from it by an elementwise product and two sums.
@triton.jit
def _hc_maps_bwd_kernel(MIX, smm, BASE, SCALE, GPRE, GPOST, GCOMB, WS, DARG, M, iters, hc_eps,
                        N: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    i = tl.arange(0, NP)
    im = i < N
    r64 = rows.to(tl.int64)
    mix = MIX + r64 * smm
    darg = DARG + r64 * ((2 + N) * N)
    s_pre = tl.load(SCALE)
    s_post = tl.load(SCALE + 1)
    s_comb = tl.load(SCALE + 2)

    # gates: pre = sigmoid(a) + eps, post = 2 sigmoid(c)
    m2 = rm[:, None] & im[None, :]
    g2 = r64[:, None] * N + i[None, :]
    sa, sc = _gate_sigmoids(mix, BASE, s_pre, s_post, i, im, m2, N)
    tl.store(darg[:, None] + i[None, :], tl.load(GPRE + g2, mask=m2, other=0.0) * sa * (1 - sa), mask=m2)
    tl.store(darg[:, None] + N + i[None, :], tl.load(GPOST + g2, mask=m2, other=0.0) * 2 * sc * (1 - sc), mask=m2)

    # Sinkhorn, replayed exactly as `_hc_maps_kernel` computes it; normalisation k's input goes to WS[:, k].
    ij = i[:, None] * N + i[None, :]
    valid = im[:, None] & im[None, :]
    m3 = rm[:, None, None] & valid[None, :, :]
    p = _comb_softmax(mix + 2 * N, BASE + 2 * N, s_comb, ij, valid, m3, im)
    b = tl.where(valid[None, :, :], p + hc_eps, 0.0)
    K = 2 * iters - 1
    ws = WS + r64[:, None, None] * (K * NP * NP) + (i[:, None] * NP + i[None, :])[None, :, :]
    for k in range(K):  # k even: column sums (axis 1), k odd: row sums (axis 2), as in the forward
        tl.store(ws + k * NP * NP, b, mask=m3)
        if k % 2 == 0:
            b = b / (tl.sum(b, axis=1)[:, None, :] + hc_eps)
        else:
            b = b / (tl.sum(b, axis=2)[:, :, None] + hc_eps)
    g = tl.load(GCOMB + r64[:, None, None] * (N * N) + ij[None, :, :], mask=m3, other=0.0)
    for kk in range(K):
        k = K - 1 - kk
        x = tl.load(ws + k * NP * NP, mask=m3, other=0.0)
        # One name per branch: the two sums have different shapes, and Triton 3.6 refuses a variable whose
        # type differs between the branches of an `if` (it failed to compile on the H200 so).
        if k % 2 == 0:
            col = tl.sum(x, axis=1)[:, None, :] + hc_eps
            g = (g - tl.sum(g * (x / col), axis=1)[:, None, :]) / col
        else:
            row = tl.sum(x, axis=2)[:, :, None] + hc_eps
            g = (g - tl.sum(g * (x / row), axis=2)[:, :, None]) / row
        g = tl.where(valid[None, :, :], g, 0.0)  # the padding holds 0 whatever it gets: no gradient
    dz = p * (g - tl.sum(g * p, axis=2)[:, :, None])  # softmax backward along the row
    tl.store(darg[:, None, None] + 2 * N + ij[None, :, :], dz, mask=m3)


class _HcMaps(torch.autograd.Function):
    """`hc_maps_fused` with a backward (`_hc_maps_bwd_kernel`): gradients for mixes, base and scale."""

    @staticmethod
    def forward(ctx, mixes, base, scale, sinkhorn_iters, hc_eps):
        ctx.save_for_backward(mixes, base, scale)
        ctx.args = (sinkhorn_iters, hc_eps)
        return hc_maps_fused(mixes, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps)

    @staticmethod
    def backward(ctx, g_pre, g_post, g_comb):
        mixes, base, scale = ctx.saved_tensors
        iters, hc_eps = ctx.args
        width = mixes.shape[-1]
        n = hc_mult(width)
        mix = mixes.float().reshape(-1, width).contiguous()
        M = mix.shape[0]
        grads = [torch.zeros(M, *shape, device=mix.device) if g is None else g.float().reshape(M, *shape).contiguous()
                 for g, shape in ((g_pre, (n,)), (g_post, (n,)), (g_comb, (n, n)))]
        darg = torch.empty(M, width, device=mix.device, dtype=torch.float32)
        if M:
            NP = triton.next_power_of_2(n)
            BLOCK_M = min(max(1, 1024 // (NP * NP)), triton.next_power_of_2(M))
            ws = torch.empty(M, 2 * iters - 1, NP, NP, device=mix.device, dtype=torch.float32)
            _hc_maps_bwd_kernel[(triton.cdiv(M, BLOCK_M),)](
                mix, mix.stride(0), base.float().contiguous(), scale.float().contiguous(), *grads, ws, darg, M,
                iters, hc_eps, N=n, NP=NP, BLOCK_M=BLOCK_M, num_warps=4)
        s = scale.float()
        per_column = torch.cat([s[0].expand(n), s[1].expand(n), s[2].expand(n * n)])
        d_mixes = (darg * per_column).view(mixes.shape).to(mixes.dtype)
        d_base = darg.sum(0).to(base.dtype)
        parts = (darg * mix).split([n, n, n * n], dim=-1)
        d_scale = torch.stack([t.sum() for t in parts]).to(scale.dtype)
        return d_mixes, d_base, d_scale, None, None


def hc_maps_train(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, sinkhorn_iters: int,
                  hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hc_maps_fused`, differentiable in mixes, base and scale (training)."""
    if hc_mult(mixes.shape[-1]) > MAX_HC:
        raise ValueError(f"hc_mult > {MAX_HC}: the fused mHC kernel does not support it; use kernels.use('reference')")
    return _HcMaps.apply(mixes, base, scale, sinkhorn_iters, hc_eps)
