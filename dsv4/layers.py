"""Small building blocks shared by every component: the linear seam, RMSNorm, interleaved partial RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """Bias-free linear layer; the one seam where a quantised weight path can be chosen by weight dtype.

    Weights are stored as official checkpoints name them (`<module>.weight`). FP8/FP4 packed weights are
    dequantised at load time (see `dsv4.checkpoint`), so the model itself only ever sees float weights.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) if self.weight.dtype != x.dtype else self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight is kept in fp32 as in the official release."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * rms_normalize(x.float(), self.eps)).to(x.dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, without a weight (per-head query norm, mHC input norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin for `positions` (any shape), one entry per rotated pair: shape (*positions.shape, rd/2)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the *last* 2*cos.shape[-1] dims of x (§2.3.3 partial RoPE); the rest pass through.

    x: (..., S, [H,] D) and cos/sin broadcastable to (..., S, [H,] rd/2) after the caller adds head dims.
    Pairs are consecutive channels (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), computed in fp32.
    Passing -sin rotates by -position (the output de-rotation of §2.3.3).
    """
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:]
    pairs = rope.float().unflatten(-1, (-1, 2))  # (..., rd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)
