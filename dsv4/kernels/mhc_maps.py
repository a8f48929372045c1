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

__all__ = ["hc_maps_fused", "reference"]

MAX_HC = 8  # registers: BLOCK_M * NP * NP values per program; n beyond 8 was never configured


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
    a = tl.load(mix[:, None] + i[None, :], mask=m2, other=0.0)
    a = tl.sigmoid(a * s_pre + tl.load(BASE + i, mask=im, other=0.0)[None, :]) + hc_eps
    tl.store(PRE + out2, a, mask=m2)
    c = tl.load(mix[:, None] + N + i[None, :], mask=m2, other=0.0)
    c = 2 * tl.sigmoid(c * s_post + tl.load(BASE + N + i, mask=im, other=0.0)[None, :])
    tl.store(POST + out2, c, mask=m2)

    # B = Sinkhorn(exp(.)): (BM, NP, NP), axis 1 = row index i, axis 2 = column index j.
    ij = i[:, None] * N + i[None, :]
    valid = im[:, None] & im[None, :]
    m3 = rm[:, None, None] & valid[None, :, :]
    logit = tl.load(mix[:, None, None] + 2 * N + ij[None, :, :], mask=m3, other=0.0)
    logit = logit * s_comb + tl.load(BASE + 2 * N + ij, mask=valid, other=0.0)[None, :, :]
    # Row softmax (the reference's first row normalisation). Padded columns are -inf (exp -> 0); padded
    # rows get max 0 and sum 1 so they stay 0 instead of 0/0.
    logit = tl.where(valid[None, :, :], logit, float("-inf"))
    mx = tl.where(im[None, :], tl.max(logit, axis=2), 0.0)
    e = tl.exp(logit - mx[:, :, None])
    se = tl.where(im[None, :], tl.sum(e, axis=2), 1.0)
    b = tl.where(valid[None, :, :], e / se[:, :, None] + hc_eps, 0.0)
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
