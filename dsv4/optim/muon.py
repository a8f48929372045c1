"""Muon for the matrix parameters (report §3): Nesterov momentum 0.95, decoupled weight decay 0.1,
hybrid Newton-Schulz orthogonalisation, update RMS rescaled to 0.18 so AdamW learning rates carry over.

One step for a matrix W of shape (m, n) with gradient G, momentum mu, learning rate lr, decay wd:

    B <- mu * B + G                                  momentum buffer (SGD form; NS erases its scale)
    U <- G + mu * B   (Nesterov)   or   B   (plain)
    O <- NS(U)                                       ~ U V^T of U's SVD, singular values ~ 1
    W <- W * (1 - lr * wd) - lr * (0.18 * sqrt(max(m, n))) * O

RMS scaling, chosen by shape (as in Moonlight, "Muon is Scalable for LLM Training", §2.2), not by
measuring O: a semi-orthogonal (m, n) matrix has sum of squares min(m, n), so its RMS is
1 / sqrt(max(m, n)), and the factor 0.18 * sqrt(max(m, n)) makes the update RMS 0.18. The hybrid NS
below drives every singular value whose share of ||U||_F is above ~3e-5 to within 0.2% of 1, so for a
full-rank update the RMS is 0.18 to ~1e-4 (tested). A rank-deficient update (say an expert that saw
one token) keeps its spectral norm at 0.18 * sqrt(max(m, n)) and gets a smaller RMS; dividing by the
measured RMS instead would blow such a single direction up by sqrt(min(m, n)).

Parameters with more than two dims (stacked experts [E, out, in]) are orthogonalised per matrix over
the last two dims. DTensor parameters (FSDP2) are orthogonalised on their local shard when every
matrix lies whole on one rank (sharded only along leading dims), otherwise gathered with
`full_tensor()`, orthogonalised, and cut back to the local shard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

# Report §3: 8 steps of the fast quintic (Keller Jordan's coefficients: large slope at 0, lands the
# singular values anywhere in ~[0.7, 1.2]), then 2 steps of p(x) = 2x - 1.5x^3 + 0.5x^5, whose fixed
# point 1 has p'(1) = 0, so it pulls them to 1 quadratically.
HYBRID_NS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
)


def hybrid_newton_schulz(G: Tensor, steps: Sequence[tuple[float, float, float]] = HYBRID_NS_COEFFICIENTS,
                         eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of G = U S V^T, per matrix over the last two dims.

    G: [..., m, n]. Returns [..., m, n] in `dtype` (default: bf16 on CUDA, fp32 elsewhere). Each
    step maps every singular value x to a*x + b*x^3 + c*x^5. G is first divided by its Frobenius norm
    (an upper bound on the spectral norm) so that all singular values start in [0, 1]. A zero matrix
    maps to zero.
    """
    if G.ndim < 2:
        raise ValueError(f"hybrid_newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.float()
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide side so the Gram matrix X X^T is the smaller one
        X = X.mT
    for a, b, c in steps:
        A = X @ X.mT  # [..., m, m], m <= n
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def update_scale(shape: Sequence[int], update_rms: float) -> float:
    """Factor that gives a semi-orthogonal [..., m, n] matrix an RMS of `update_rms` (Moonlight)."""
    return update_rms * math.sqrt(max(shape[-2], shape[-1]))


# ---------------------------------------------------------------------------------------- DTensor
def _matrices_are_local(t: DTensor) -> bool:
    """True when every [m, n] matrix of `t` sits whole on this rank: only leading dims are sharded."""
    for pl in t.placements:
        if isinstance(pl, Partial):
            return False
        if isinstance(pl, Shard) and pl.dim % t.ndim >= t.ndim - 2:
            return False
    return True


def gather_full(t: DTensor) -> Tensor:
    """The whole tensor on every rank (all-gathers shards, reduces Partial)."""
    return t.full_tensor()


def shard_like(full: Tensor, like: DTensor) -> DTensor:
    """Cut `full` (identical on every rank) to `like`'s mesh and placements, without communication."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def orthogonalised_update(U: Tensor, param: Tensor, steps: Sequence[tuple[float, float, float]], eps: float,
                          update_rms: float) -> Tensor:
    """NS(U) scaled to RMS `update_rms`, in param's dtype and (for DTensors) param's placements."""
    scale = update_scale(param.shape, update_rms)
    if not isinstance(U, DTensor):
        return (hybrid_newton_schulz(U, steps, eps) * scale).to(param.dtype)
    if _matrices_are_local(U) and U.placements == param.placements:
        local = (hybrid_newton_schulz(U.to_local(), steps, eps) * scale).to(param.dtype)
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    full = (hybrid_newton_schulz(gather_full(U), steps, eps) * scale).to(param.dtype)
    return shard_like(full, param)


# -------------------------------------------------------------------------------------- optimizer
class Muon(torch.optim.Optimizer):
    """Muon (see the module docstring for the exact update). Only for parameters with >= 2 dims;
    embeddings, the output head, norms, biases and gates belong to AdamW (`dsv4.optim.build_optimizer`).
    """

    def __init__(self, params, lr: float = 2e-4, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, update_rms: float = 0.18,
                 ns_coefficients: Sequence[tuple[float, float, float]] = HYBRID_NS_COEFFICIENTS, eps: float = 1e-7):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or update_rms <= 0:
            raise ValueError(f"Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, update_rms > 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, update_rms={update_rms}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        update_rms=update_rms, ns_coefficients=tuple(map(tuple, ns_coefficients)), eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon got a {p.ndim}-D parameter of shape {tuple(p.shape)}; Muon is for "
                                     "matrices -- give vectors to AdamW (dsv4.optim.build_optimizer does)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)
                U = g.add(buf, alpha=mu) if group["nesterov"] else buf
                O = orthogonalised_update(U, p, group["ns_coefficients"], group["eps"], group["update_rms"])
                p.mul_(1 - lr * wd)  # decoupled weight decay
                p.add_(O, alpha=-lr)
        return loss
