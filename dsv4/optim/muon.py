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
`full_tensor()`, orthogonalised, and cut back to the local shard. The step is batched over the
parameters whose matrices share a shape (see `Muon`); that changes the kernels, not the math above.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

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
    X = G.float().reshape(-1, *G.shape[-2:])  # (batch, m, n)
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide side so the Gram matrix X X^T is the smaller one
        X = X.mT
    for a, b, c in steps:
        # X <- a X + (b A + c A^2) X with A = X X^T, as three matmul kernels (the step is launch-bound)
        A = X @ X.mT  # (batch, k, k), k = min(m, n)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return (X.mT if tall else X).reshape(G.shape)


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


def _batch_key(p: Tensor, g: Tensor, buf: Tensor) -> tuple | None:
    """Which batch parameter `p` joins: its matrices' shape (m, n), dtypes, device and whether it is a
    DTensor worked on through its local shard. None sends it down the per-parameter path
    (`Muon._step_alone`): a DTensor whose matrices are split over ranks, or a parameter that cannot be
    viewed as (E, m, n)."""
    if isinstance(p, DTensor) or isinstance(g, DTensor):
        local = (isinstance(p, DTensor) and isinstance(g, DTensor) and isinstance(buf, DTensor)
                 and _matrices_are_local(g) and g.placements == p.placements == buf.placements)
        if not local:
            return None
    if not _local(p).is_contiguous():  # the update is written through (E, m, n) views of it
        return None
    return (*p.shape[-2:], p.dtype, g.dtype, _local(p).device, isinstance(p, DTensor))


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view of its storage under no_grad), a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _runs(counts: Sequence[int], limit: int) -> Iterator[list[tuple[int, int, int]]]:
    """Cut the matrices of tensors 0, 1, ... (counts[i] each) into consecutive runs of at most `limit`
    matrices; a run is a list of (tensor index, first matrix, end matrix). A tensor may span runs."""
    run, room = [], limit
    for i, count in enumerate(counts):
        first = 0
        while first < count:
            take = min(room, count - first)
            run.append((i, first, first + take))
            first, room = first + take, room - take
            if room == 0:
                yield run
                run, room = [], limit
    if run:
        yield run


def _update_momentum_(bufs: list[Tensor], grads: list[Tensor], mu: float) -> None:
    """B <- mu * B + G for every pair, in place."""
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, grads)


def _direction(grads: list[Tensor], bufs: list[Tensor], mu: float, nesterov: bool) -> list[Tensor]:
    """U = G + mu * B (Nesterov) or B, the matrices that NS orthogonalises."""
    return torch._foreach_add(grads, bufs, alpha=mu) if nesterov else list(bufs)


# -------------------------------------------------------------------------------------- optimizer
class Muon(torch.optim.Optimizer):
    """Muon (see the module docstring for the exact update). Only for parameters with >= 2 dims;
    embeddings, the output head, norms, biases and gates belong to AdamW (`dsv4.optim.build_optimizer`).

    A step is batched: parameters whose matrices have one shape (a 3-D [E, m, n] stack counts as E
    matrices) share their foreach momentum/decay/update kernels and one Newton-Schulz call on the
    stacked (count, m, n) matrices, cut so that one stack holds at most `max_stack_bytes` (NS's
    temporaries are a few times that). Done one parameter at a time, a 1.29B-parameter V4 spent 1.87 s of
    host time launching ~27,000 matmuls for 0.33 s of GPU work. `max_stack_bytes` is an attribute, not
    a group hyperparameter, so optimizer state saved before it existed still loads.
    """

    def __init__(self, params, lr: float = 2e-4, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, update_rms: float = 0.18,
                 ns_coefficients: Sequence[tuple[float, float, float]] = HYBRID_NS_COEFFICIENTS, eps: float = 1e-7,
                 max_stack_bytes: int = 1 << 30):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or update_rms <= 0 or max_stack_bytes <= 0:
            raise ValueError(f"Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, update_rms > 0, "
                             f"max_stack_bytes > 0; got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"update_rms={update_rms}, max_stack_bytes={max_stack_bytes}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        update_rms=update_rms, ns_coefficients=tuple(map(tuple, ns_coefficients)), eps=eps)
        super().__init__(params, defaults)
        self.max_stack_bytes = max_stack_bytes
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
            batches: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}
            alone: list[tuple[Tensor, Tensor, Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                member = (p, p.grad, state["momentum_buffer"])
                key = _batch_key(*member)
                if key is None:
                    alone.append(member)
                else:
                    batches.setdefault(key, []).append(member)
            for members in batches.values():
                self._step_batch(members, group)
            for member in alone:
                self._step_alone(*member, group)
        return loss

    def _step_batch(self, members: list[tuple[Tensor, Tensor, Tensor]], group: dict) -> None:
        """One step of parameters whose matrices share a shape, on their (local) tensors."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        params, grads, bufs = ([_local(t) for t in ts] for ts in zip(*members))
        _update_momentum_(bufs, grads, mu)
        torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay
        m, n = params[0].shape[-2:]
        scale = update_scale((m, n), group["update_rms"])
        # (E, m, n) views; grads and buffers are only read, so a copy would do where no view exists
        P, G, B = ([t.reshape(-1, m, n) for t in ts] for ts in (params, grads, bufs))
        per_stack = max(1, self.max_stack_bytes // (m * n * bufs[0].element_size()))
        for run in _runs([len(t) for t in P], per_stack):
            U = _direction([G[i][a:b] for i, a, b in run], [B[i][a:b] for i, a, b in run], mu, group["nesterov"])
            O = hybrid_newton_schulz(torch.cat(U), group["ns_coefficients"], group["eps"])  # (count, m, n)
            update = torch.empty(O.shape, dtype=params[0].dtype, device=O.device)
            torch.mul(O, scale, out=update)  # scale, cast and lay out like the parameters in one kernel
            torch._foreach_add_([P[i][a:b] for i, a, b in run], update.split([b - a for _, a, b in run]),
                                alpha=-lr)

    @staticmethod
    def _step_alone(p: Tensor, g: Tensor, buf: Tensor, group: dict) -> None:
        """One step of one parameter outside the batches: a DTensor whose matrices are split over ranks
        (U is gathered whole, orthogonalised on every rank, and cut back to this rank's shard) or a
        parameter that no (E, m, n) view reaches."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        _update_momentum_([buf], [g], mu)
        (U,) = _direction([g], [buf], mu, group["nesterov"])
        O = hybrid_newton_schulz(gather_full(U) if isinstance(U, DTensor) else U, group["ns_coefficients"],
                                 group["eps"])
        O = (O * update_scale(p.shape, group["update_rms"])).to(p.dtype)
        p.mul_(1 - lr * wd)  # decoupled weight decay
        p.add_(shard_like(O, p) if isinstance(p, DTensor) else O, alpha=-lr)
