"""Manifold-Constrained Hyper-Connections (mHC, §2.2).

The residual stream is `n_hc` copies of the hidden vector, x: (B, S, n_hc, d). Around each sublayer
three maps are generated from the RMS-normalised, flattened stream (dynamic part `fn`, static part
`base`, per-map gates `scale`):
  A (pre)  = sigmoid(.) + eps            (n_hc)       mixes the streams into the sublayer input
  B (comb) = Sinkhorn-Knopp(exp(.))       (n_hc, n_hc) doubly stochastic: mixes the streams, norm <= 1
  C (post) = 2 * sigmoid(.)               (n_hc)       writes the sublayer output back into each stream
and the block computes  x' = C ⊗ f(A·x) + Bᵀ x.
The parameters live on the block under the official names (`hc_attn_fn`, `hc_attn_base`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kernels
from .layers import rms_normalize


def hc_maps(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, sinkhorn_iters: int,
            hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, S, n, d) -> pre (B, S, n), post (B, S, n), comb (B, S, n, n); all fp32."""
    flat = rms_normalize(x.flatten(-2).float(), norm_eps)  # (B, S, n*d)
    mixes = F.linear(flat, fn.float())  # (B, S, (2+n)*n)
    # The gates and the Sinkhorn iterations go through the kernel seam: one fused launch on the GPU.
    return kernels.hc_maps_post_linear(mixes, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps)


def hc_maps_from_mixes(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, sinkhorn_iters: int,
                       hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The maps from the projected stream, mixes (B, S, (2+n)*n) fp32 -> pre, post, comb (the reference of
    `dsv4.kernels.mhc_maps`)."""
    n = hc_mult(mixes.shape[-1])
    pre, post, comb = mixes.split([n, n, n * n], dim=-1)
    base_pre, base_post, base_comb = base.float().split([n, n, n * n])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(pre * s_pre + base_pre) + hc_eps
    post = 2 * torch.sigmoid(post * s_post + base_post)
    comb = (comb * s_comb + base_comb).unflatten(-1, (n, n))
    return pre, post, sinkhorn(comb, sinkhorn_iters, hc_eps)


def hc_mult(width: int) -> int:
    """n from the width (2+n)*n = (n+1)^2 - 1 of the projection's output."""
    n = math.isqrt(width + 1) - 1
    if (2 + n) * n != width:
        raise ValueError(f"mHC projection width {width} is not (2+n)*n for any n")
    return n


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) over the last two dims -> (approximately) doubly stochastic.

    The first row normalisation is a softmax (numerically safe exp); `eps` keeps every entry positive.
    """
    m = logits.softmax(dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Sublayer input: sum_j pre_j x_j.  x: (B, S, n, d), pre: (B, S, n) -> (B, S, d)."""
    return (pre.unsqueeze(-1) * x).sum(dim=-2).to(x.dtype)


def hc_expand(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x'_k = post_k * out + sum_j comb[j, k] x_j.  out: (B, S, d) -> (B, S, n, d)."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def hc_head_collapse(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
                     hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final merge of the streams before the output norm: a dynamic `pre` map only. -> (B, S, d)."""
    flat = rms_normalize(x.flatten(-2).float(), norm_eps)
    pre = torch.sigmoid(F.linear(flat, fn.float()) * scale.float() + base.float()) + hc_eps
    return hc_collapse(x, pre)
