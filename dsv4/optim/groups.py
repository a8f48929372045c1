"""Which parameter goes to which optimizer (report §3), and one optimizer object that steps both.

Decided by parameter name and shape under our names (= the official checkpoint keys):

  adamw           embed.weight, head.weight                                 weight decay as given
  adamw_no_decay  RMSNorm weights (names ending in `norm.weight`: norm, attn_norm, ffn_norm, q_norm,
                  kv_norm, compressor/indexer norms, MTP enorm/hnorm/norm); mHC static biases and
                  gates (hc_{attn,ffn,head}_{base,scale}); attention sinks (attn_sink); compressor
                  positional biases (ape); any other parameter with fewer than 2 dims    no decay
  muon            every other parameter with >= 2 dims: attention projections, compressor and
                  indexer matrices, router gate.weight, experts w1/w2/w3, shared experts, mHC
                  hc_*_fn, MTP e_proj/h_proj

Decaying a norm gain, a bias or a gate pulls it towards 0 rather than towards "no effect", so those
get no weight decay. Buffers (the router's load-balancing `gate.bias`, `tid2eid`) are not parameters
and never reach an optimizer; neither does any parameter with requires_grad=False.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from dsv4.optim.muon import Muon

GROUPS = ("muon", "adamw", "adamw_no_decay")

_ADAMW_DECAY = re.compile(r"(^|\.)(embed|head)\.weight$")
_ADAMW_NO_DECAY = re.compile(r"(norm\.weight|(^|\.)hc_(attn|ffn|head)_(base|scale)|(^|\.)attn_sink|(^|\.)ape)$")


def group_of(name: str, param: torch.Tensor) -> str:
    """The group ("muon", "adamw" or "adamw_no_decay") that parameter `name` belongs to."""
    if _ADAMW_DECAY.search(name):
        return "adamw"
    if _ADAMW_NO_DECAY.search(name) or param.ndim < 2:
        return "adamw_no_decay"
    return "muon"


def split_param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters of `model` by group, in `named_parameters` order (shared ones once)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[group_of(name, p)].append((name, p))
    return groups


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one. `param_groups` is the flat list of their group dicts (the
    same dict objects), so LR schedulers drive every group; each group carries a "name" key.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        # Optimizer.__init__ is skipped on purpose: it would build its own param_groups list, while
        # here the groups live in the wrapped optimizers.
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)
        self.defaults = {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state_dict)} but this optimizer has "
                             f"{sorted(self.optimizers)}; was it saved with a different parameter grouping?")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    # Optimizer's pickling restores a param_groups attribute; this class keeps them in the wrapped ones.
    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={type(opt).__name__}" for name, opt in self.optimizers.items())
        return f"CombinedOptimizer({inner})"


def build_optimizer(model: nn.Module, lr: float = 2e-4, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), muon_kw: dict | None = None,
                    adamw_kw: dict | None = None) -> CombinedOptimizer:
    """Muon for the matrices, AdamW for the rest (see the module docstring); one LR for both, since
    Muon's update RMS is matched to AdamW's. Empty groups are left out."""
    groups = split_param_groups(model)
    params = {g: [p for _, p in groups[g]] for g in GROUPS}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if params["muon"]:
        optimizers["muon"] = Muon([{"params": params["muon"], "name": "muon"}], lr=lr, weight_decay=weight_decay,
                                  **(muon_kw or {}))
    adamw_groups = [{"params": params[g], "name": g, "weight_decay": wd}
                    for g, wd in (("adamw", weight_decay), ("adamw_no_decay", 0.0)) if params[g]]
    if adamw_groups:
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, **(adamw_kw or {}))
    if not optimizers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return CombinedOptimizer(optimizers)


def describe_groups(model: nn.Module) -> str:
    """A short table: tensors and parameter count per group, with a few example names."""
    groups = split_param_groups(model)
    rows = [f"{'group':<15} {'tensors':>7} {'params':>14}  examples"]
    for g in GROUPS:
        named = groups[g]
        # layers.0.attn.wq_a.weight and layers.1.attn.wq_a.weight are one kind of tensor
        kinds = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n, _ in named))
        examples = ", ".join(kinds[:4]) + (f", ... (+{len(kinds) - 4})" if len(kinds) > 4 else "")
        rows.append(f"{g:<15} {len(named):>7} {sum(p.numel() for _, p in named):>14,}  {examples}")
    return "\n".join(rows)
