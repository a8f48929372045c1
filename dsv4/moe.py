"""DeepSeekMoE with V4's changes (§2.1): sqrt(softplus) affinities, auxiliary-loss-free selection bias,
hash routing in the first layers, one shared expert, clamped SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .hooks import TrainStep, fake_quant_fp4
from .layers import Linear


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up with the gate clamped to <= l and the linear part to [-l, l]: the clamp removes the rare
    activation outliers that destabilise training (§4.2.3, "SwiGLU clamping")."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class Expert(nn.Module):
    """SwiGLU FFN, w1 = gate, w3 = up, w2 = down (the shared expert)."""

    def __init__(self, dim: int, inter_dim: int, limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


def expert_key(prefix: str, expert: int, matrix: str) -> str:
    """The official checkpoint key of one routed expert's matrix, e.g. `layers.3.ffn.experts.7.w1.weight`."""
    return f"{prefix}{expert}.{matrix}.weight"


class Experts(nn.Module):
    """The routed experts of one layer, stacked: w1 (gate) and w3 (up) (E, I, d), w2 (down) (E, d, I), each
    expert's matrix in the official (out, in) layout.

    Stacked rather than E `Expert` modules (STYLE.md wants the official names internally) because each
    projection of all experts is then one grouped GEMM: the per-expert loop (3 linears, clamp, SwiGLU, FP4
    fake-quant, index_add, forward and backward, per expert and layer) made a training step launch-bound, and
    its per-layer `.tolist()` of the expert counts kept decoding out of CUDA graphs. The state dict still holds
    the official per-expert keys (`{e}.w1.weight`: split on save, joined on load), so checkpoints, `dsv4.hf`
    and `dsv4.quant` see the official layout.

    `first`: the index of the first stored expert; expert parallelism (`dsv4.train.parallel`) stores a slice
    of the layer's experts in a subclass, and `forward` then runs only those."""

    MATRICES = ("w1", "w2", "w3")
    holds_all = True  # every expert of the layer is stored here (False: a rank's slice, from `first` on)

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.limit = limit
        self.first = 0

    def local(self, matrix: str) -> torch.Tensor:
        """The stored rows of `matrix` as a plain tensor (n, out, in), experts first .. first + n - 1."""
        return getattr(self, matrix)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, fp4: bool = False
                ) -> torch.Tensor:
        """x (N, d), weights (N, k), indices (N, k) -> sum over each token's chosen experts among those stored
        (N, d), without a host sync.

        fp4: fake-quantised FP4 weights with straight-through gradients (quantisation-aware training); the
        1x32 blocks run along each expert's input dim, as in the release."""
        w1, w2, w3 = (self.local(m) for m in self.MATRICES)
        n, (N, k) = w1.shape[0], indices.shape
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        expert = indices.reshape(-1) - self.first  # (N k,) expert of each (token, choice) pair
        if not self.holds_all:
            # pairs of experts stored on other ranks go to a last bucket n that no GEMM group covers; a grouped
            # GEMM leaves its rows unwritten (forward) and their input gradient too (backward): masked both ways
            stored = (expert >= 0) & (expert < n)
            expert = torch.where(stored, expert, n)
        sorted_expert, order = expert.sort(stable=True)
        # group ends: pairs with expert <= e (searchsorted: bincount on CUDA reads its max back to the host)
        offs = torch.searchsorted(sorted_expert, torch.arange(n, device=x.device), right=True).to(torch.int32)
        rows = x[order // k].to(dtype)  # (N k, d) grouped by expert
        if not self.holds_all:
            keep = stored[order][:, None]
            rows = torch.where(keep, rows, 0)
        if fp4:
            w1, w2, w3 = (fake_quant_fp4(w) for w in (w1, w2, w3))
        w1, w2, w3 = (w.to(dtype) for w in (w1, w2, w3))
        h = clamped_swiglu(_expert_matmul(rows, w1, offs, sorted_expert),
                           _expert_matmul(rows, w3, offs, sorted_expert), self.limit)
        y = _expert_matmul(h, w2, offs, sorted_expert)  # (N k, d)
        if not self.holds_all:
            y = torch.where(keep, y, 0)
        # back to (token, choice) order through the inverse permutation, then a weighted sum over the k choices:
        # deterministic, unlike adding rows into the output with atomics
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        y = y[inverse].view(N, k, -1).to(x.dtype)
        return (y * weights.to(x.dtype)[..., None]).sum(1)

    # The state dict holds the official per-expert keys (see the class docstring).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for matrix in self.MATRICES:
            stacked = self.local(matrix) if keep_vars else self.local(matrix).detach()
            for j, weight in enumerate(stacked.unbind(0)):
                destination[expert_key(prefix, self.first + j, matrix)] = weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        absent = []
        for matrix in self.MATRICES:
            stacked = self.local(matrix)
            keys = [expert_key(prefix, self.first + j, matrix) for j in range(stacked.shape[0])]
            found = [key for key in keys if key in state_dict]
            if not found:
                absent.append(matrix)
                missing_keys.extend(keys)
                continue
            lacking = [key for key in keys if key not in state_dict]
            bad = [f"{key}: {tuple(state_dict[key].shape)}" for key in found
                   if tuple(state_dict[key].shape) != tuple(stacked.shape[1:])]
            if lacking or bad:
                error_msgs.append(f"routed experts {prefix}*.{matrix}.weight: "
                                  + (f"{len(lacking)} missing, e.g. {lacking[:3]}; " if lacking else "")
                                  + (f"expected {tuple(stacked.shape[1:])} per expert, got {bad[:3]}" if bad else ""))
                absent.append(matrix)
                for key in found:
                    del state_dict[key]
                continue
            state_dict[prefix + matrix] = torch.stack([state_dict.pop(key) for key in keys])
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # the stacked names are internal: what is missing was reported above under the official keys
        missing_keys[n_missing:] = [key for key in missing_keys[n_missing:]
                                    if key not in {prefix + matrix for matrix in absent}]

    def extra_repr(self) -> str:
        E, inter, dim = self.w1.shape
        return f"{E} experts, {dim} -> {inter} -> {dim}, first {self.first}"


def _grouped_mm_ok(rows: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs these operands without a host sync: on CPU (fp32, bf16), and on CUDA in bf16
    on sm90 / sm100 (its CUTLASS kernel; elsewhere CUDA falls back to a loop over the offsets copied to the host).
    Every stride must be a multiple of 16 bytes, so both matrix dims must be."""
    if not hasattr(torch, "_grouped_mm") or rows.dtype != w.dtype:
        return False
    aligned = all(size * rows.element_size() % 16 == 0 for size in w.shape[1:])
    if rows.device.type == "cpu":
        return aligned and rows.dtype in (torch.float32, torch.bfloat16)
    if rows.device.type == "cuda":
        return aligned and rows.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rows.device)[0] in (9, 10)
    return False


def _expert_matmul(rows: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """rows (R, in) grouped by expert (group e ends at offs[e]; `expert` (R,) names each row's) times their expert's
    w (n, out, in) transposed -> (R, out). Rows past offs[-1] are left unwritten.

    One grouped GEMM where `_grouped_mm_ok`; otherwise (fp32 / fp16 on CUDA, unaligned dims) a loop over experts
    that multiplies every row and keeps its own expert's result: n times the FLOPs, but no host sync and
    exact, for those checks only (training runs bf16 autocast, serving bf16)."""
    if _grouped_mm_ok(rows, w):
        return torch._grouped_mm(rows, w.transpose(-2, -1), offs=offs)
    out = rows.new_zeros(rows.shape[0], w.shape[1])
    for e in range(w.shape[0]):
        out = torch.where((expert == e)[:, None], F.linear(rows, w[e]), out)
    return out


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
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, limit)
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

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, fp4: bool = False) -> torch.Tensor:
        """Sum over each token's chosen experts, all experts at once (`Experts`: three grouped GEMMs). Expert
        parallelism replaces this method (`dsv4.train.parallel`)."""
        return self.experts(x, weights, indices, fp4)
