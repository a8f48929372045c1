"""Training hooks the model reads: one explicit `TrainStep` object passed down `forward` (default None,
which is inference: the model then behaves exactly as without hooks).

It carries the switches of the training recipe (report §3) into the layers, and brings back what the
layers measured:
  attention       "sparse" (CSA picks the indexer's top-k) or "dense" (CSA attends to every finished
                  compressed entry, as HCA does): the dense warm-up phases
  indexer_loss    compute KL(dense attention over compressed entries || indexer distribution) per CSA layer
  detach_indexer  the indexer sees detached inputs, so its loss trains the indexer only (the backbone is
                  untouched by it) and the LM loss never reaches the indexer (its top-k is not differentiable)
  fp4_experts     fake-quantise routed experts' weights to FP4 (E2M1, 1x32 blocks, straight-through)
  fp4_indexer     fake-quantise the indexer's queries and keys to FP4 (same format)
  route_with      layer id -> (gate weight, bias) to choose experts with (anticipatory routing: parameters
                  from Δt steps ago); the combination weights still use the current gate
  checkpoint      recompute each block in backward (activation checkpointing)
Outputs, keyed by layer id (so a recomputed block overwrites, never double counts):
  expert_load     (E,) tokens routed to each expert (learned-routing layers; no grad)
  balance_loss    (rows,) sequence-wise balance term sum_i f_i P_i per row (learned-routing layers)
  indexer_kl      (sum over queries of KL, number of queries) per CSA layer
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field

import torch

# E2M1 magnitudes (the FP4 format of the release, `dsv4.quant`)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass
class TrainStep:
    attention: str = "sparse"
    indexer_loss: bool = False
    detach_indexer: bool = True
    fp4_experts: bool = False
    fp4_indexer: bool = False
    route_with: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    checkpoint: bool = False
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)
    balance_loss: dict[int, torch.Tensor] = field(default_factory=dict)
    indexer_kl: dict[int, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)

    def __post_init__(self):
        if self.attention not in ("sparse", "dense"):
            raise ValueError(f"TrainStep.attention must be 'sparse' or 'dense', got {self.attention!r}")


@functools.lru_cache(maxsize=None)
def _e2m1_grid(device: torch.device) -> torch.Tensor:
    """The E2M1 magnitudes on `device`, made once: building them from a Python list is a host-to-device copy,
    i.e. a host synchronisation on every FP4 call (MoE's sync-free training path would lose it)."""
    return torch.tensor(_E2M1, device=device)


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x to FP4 (E2M1) with one power-of-two scale per `block` values of the last dim (the release's
    1x32 blocks, ue8m0 scales); the gradient passes straight through (STE). A last dim that `block` does
    not divide is one block."""
    D = x.shape[-1]
    b = block if D % block == 0 else D
    xb = x.detach().float().unflatten(-1, (D // b, b))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))  # smallest power of two with amax / scale <= 6
    y = xb / scale
    grid = _e2m1_grid(x.device)
    idx = torch.bucketize(y.abs(), (grid[1:] + grid[:-1]) / 2)  # nearest grid point
    q = (grid[idx] * y.sign() * scale).flatten(-2).to(x.dtype)
    return x + (q - x).detach()
