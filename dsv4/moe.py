"""DeepSeekMoE with V4's changes (§2.1): sqrt(softplus) affinities, auxiliary-loss-free selection bias,
hash routing in the first layers, one shared expert, clamped SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .hooks import TrainStep, fake_quant_fp4
from .layers import Linear


class Expert(nn.Module):
    """SwiGLU FFN, w1 = gate, w3 = up, w2 = down. The clamp (linear part to [-l, l], gate <= l) removes
    the rare activation outliers that destabilise training (§4.2.3, "SwiGLU clamping")."""

    def __init__(self, dim: int, inter_dim: int, limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.limit = limit

    def forward(self, x: torch.Tensor, fp4: bool = False) -> torch.Tensor:
        """fp4: fake-quantised FP4 weights with straight-through gradients (quantisation-aware training)."""
        if fp4:
            w1, w2, w3 = (fake_quant_fp4(w.weight).to(x.dtype) for w in (self.w1, self.w2, self.w3))
            gate, up = F.linear(x, w1).clamp(max=self.limit), F.linear(x, w3).clamp(-self.limit, self.limit)
            return F.linear(F.silu(gate) * up, w2)
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Router. Affinity s = sqrt(softplus(x W^T)); the top-k choice uses s + bias, where `bias` is the
    auxiliary-loss-free balancing bias (a buffer moved by measured load, never by gradient); the
    combination weights use s alone, normalised over the chosen experts, times the routed scale.
    Hash layers choose experts by a fixed token-id table `tid2eid` instead (§2.1)."""

    def __init__(self, config: Config, hashed: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.scale = config.routed_scaling_factor
        self.norm_topk = config.norm_topk_prob
        self.hashed = hashed
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.int32))
        else:
            self.register_buffer("bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None,
                route_with: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, d) -> weights (N, k) in fp32, indices (N, k), affinities (N, E) in fp32.

        route_with: (weight, bias) that choose the experts instead of the current ones (anticipatory
        routing, report §3: indices from the parameters of Δt steps before); weights use the current gate."""
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()  # (N, E)
        if self.hashed:
            if input_ids is None:
                raise ValueError("hash-routed MoE layers need the input token ids")
            indices = self.tid2eid[input_ids.reshape(-1)].long()
        elif route_with is not None:
            with torch.no_grad():
                old = F.softplus(F.linear(x.float(), route_with[0].float())).sqrt()
                indices = (old + route_with[1]).topk(self.top_k, dim=-1, sorted=False).indices
        else:
            indices = (scores + self.bias).topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(-1, indices)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices, scores


class MoE(nn.Module):
    def __init__(self, config: Config, layer_id: int):
        super().__init__()
        self.n_experts, self.layer_id = config.n_routed_experts, layer_id
        self.gate = Gate(config, hashed=config.is_hash_layer(layer_id))
        limit = config.swiglu_limit
        self.experts = nn.ModuleList(
            Expert(config.hidden_size, config.moe_intermediate_size, limit) for _ in range(config.n_routed_experts))
        self.shared_experts = (Expert(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                      limit) if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None,
                step: TrainStep | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        route_with = step.route_with.get(self.layer_id) if step is not None and step.route_with else None
        weights, indices, scores = self.gate(x, input_ids, route_with)
        if step is not None and not self.gate.hashed:
            self.record(step, indices, scores, rows=shape[0] if len(shape) == 3 else 1)
        out = self.routed(x, weights, indices, fp4=step is not None and step.fp4_experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def record(self, step: TrainStep, indices: torch.Tensor, scores: torch.Tensor, rows: int) -> None:
        """Measured load (for the auxiliary-loss-free bias) and the sequence-wise balance term (DeepSeek-V3
        eq. 17-20, kept small in V4): per row, sum_i f_i P_i with f_i = E / (k T) * (tokens choosing i),
        P_i = mean over the row's tokens of the normalised affinity s_i / sum_j s_j."""
        E, k = self.n_experts, indices.shape[-1]
        chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).unflatten(0, (rows, -1))  # (rows, T, E)
        step.expert_load[self.layer_id] = chosen.detach().sum(dim=(0, 1))
        f = chosen.mean(dim=1) * (E / k)  # (rows, E)
        P = (scores / scores.sum(-1, keepdim=True)).unflatten(0, (rows, -1)).mean(dim=1)
        step.balance_loss[self.layer_id] = (f * P).sum(-1)  # (rows,)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, fp4: bool = False,
               owned: range | None = None) -> torch.Tensor:
        """Sum over each token's chosen experts; tokens are grouped by expert so each expert runs once.
        `owned`: run only these experts (expert parallelism: each rank owns a range, dsv4.train.parallel)."""
        out = torch.zeros_like(x)
        flat_expert = indices.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()
        token_of = order // indices.shape[-1]
        weight_of = weights.reshape(-1)[order]
        start = 0
        for e, count in enumerate(counts):
            if count == 0 or (owned is not None and e not in owned):
                start += count
                continue
            tokens = token_of[start:start + count]
            y = self.experts[e](x[tokens], fp4) * weight_of[start:start + count, None].to(x.dtype)
            out.index_add_(0, tokens, y)
            start += count
        return out
