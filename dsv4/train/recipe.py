"""The pieces of the V4 training recipe between the model and the loop (report §3): the objective,
the auxiliary-loss-free bias update, the loss-spike detector and the router history that anticipatory
routing reads.

Every loss is returned as a (sum, count) pair so that the loop can divide by counts summed over all
data-parallel ranks: the loss of a batch then does not depend on how its rows are spread over ranks.
"""

from __future__ import annotations

from collections import UserDict, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv4.hooks import TrainStep
from dsv4.model import Transformer
from dsv4.train.data import IGNORE_INDEX


@dataclass
class LossParts:
    """Sums and counts of one (local) batch; `count_*` are plain floats."""
    lm_sum: torch.Tensor
    lm_count: float
    mtp_sum: torch.Tensor
    mtp_count: float
    balance_sum: torch.Tensor  # sum over learned-routing layers and rows of sum_i f_i P_i
    balance_count: float  # rows (per layer)
    indexer_sum: torch.Tensor  # sum over CSA layers and queries of KL(dense || indexer)
    indexer_count: float


def make_train_step(**switches) -> TrainStep:
    """A `TrainStep` for one training forward, its outputs kept in `UserDict`s. FSDP2 walks the arguments of
    every sharded module's forward (dicts, lists, dataclasses) and rebuilds each container that holds a tensor
    requiring grad, to hook its backward: once the first layer has recorded its balance loss or indexer KL,
    every later block (and `mtp_logits`) would get a copy of the TrainStep, and what they record would never
    reach the loss. A UserDict is not a dict, so FSDP2 leaves it, and the TrainStep, alone."""
    return TrainStep(**switches, expert_load=UserDict(), balance_loss=UserDict(), indexer_kl=UserDict())


def mtp_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the depth-1 MTP block. At position i it sees the next token t_{i+1} (= labels[i])
    and predicts t_{i+2} (= labels[i+1]); both must lie in position i's document, else the target is ignored.
    -> next_ids (B, S) (ignored positions get id 0), targets (B, S)."""
    next_ids = labels.clamp(min=0)
    targets = torch.full_like(labels, IGNORE_INDEX)
    both = (labels[:, :-1] != IGNORE_INDEX) & (labels[:, 1:] != IGNORE_INDEX)
    targets[:, :-1] = torch.where(both, labels[:, 1:], IGNORE_INDEX)
    return next_ids, targets


def target_counts(labels: torch.Tensor) -> tuple[float, float]:
    """(next-token targets, MTP targets) of a batch: its loss normalisers, known before the forward."""
    return float((labels != IGNORE_INDEX).sum()), float((mtp_targets(labels)[1] != IGNORE_INDEX).sum())


def forward_losses(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor,
                   step: TrainStep, with_mtp: bool = True) -> LossParts:
    """One forward pass of the trunk (and the MTP block) on a packed batch, with training switches `step`."""
    logits, hidden = model(input_ids, doc_ids=doc_ids, return_hidden=True, step=step)
    lm_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    lm_count, mtp_count = target_counts(labels)
    zero = logits.new_zeros(())
    mtp_sum = zero
    if with_mtp and len(model.mtp):
        next_ids, targets = mtp_targets(labels)
        mtp_logits = model.mtp_logits(hidden, next_ids, doc_ids=doc_ids, step=step)
        mtp_sum = F.cross_entropy(mtp_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
    else:
        mtp_count = 0.0
    bal = list(step.balance_loss.values())
    balance_sum = torch.stack([b.sum() for b in bal]).sum() if bal else zero
    kl = [pair for pairs in step.indexer_kl.values() for pair in pairs]
    indexer_sum = torch.stack([s for s, _ in kl]).sum() if kl else zero
    return LossParts(lm_sum, lm_count, mtp_sum, mtp_count, balance_sum, float(input_ids.shape[0]),
                     indexer_sum, float(sum(n for _, n in kl)))


def learned_gates(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """layer id -> Gate of every MoE layer routed by learned affinities (not hash tables), MTP blocks included."""
    return {m.layer_id: m.gate for m in model.modules() if hasattr(m, "gate") and hasattr(m.gate, "bias")
            and hasattr(m, "layer_id")}


@torch.no_grad()
def update_router_bias(model: torch.nn.Module, load: dict[int, torch.Tensor], speed: float) -> dict[int, float]:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2, kept in V4): after each step, move every expert's
    selection bias by `speed` towards balance, bias_i += speed * sign(mean load - load_i), from the tokens
    each expert received in the (global) batch. Returns each layer's max load / mean load (1 = balanced)."""
    imbalance = {}
    for layer_id, gate in learned_gates(model).items():
        if layer_id not in load:
            continue
        counts = load[layer_id].to(gate.bias.device, torch.float32)
        gate.bias.add_(speed * torch.sign(counts.mean() - counts))
        imbalance[layer_id] = float(counts.max() / counts.mean().clamp(min=1e-9))
    return imbalance


class SpikeDetector:
    """Detects a loss spike: a step whose loss exceeds `ratio` x the running mean of earlier losses (after
    `warmup` steps). A spike switches anticipatory routing on for `hold` steps (report §3: it is used only
    after a spike, as it costs extra routing work); a spike meanwhile extends the window. Spiking losses do
    not enter the running mean."""

    def __init__(self, ratio: float, warmup: int, ema: float, hold: int):
        self.ratio, self.warmup, self.ema, self.hold = ratio, warmup, ema, hold
        self.mean: float | None = None
        self.seen = 0
        self.active_from, self.active_until = 0, 0  # anticipatory routing is on for steps in [from, until)
        self.spikes: list[int] = []

    def active(self, step: int) -> bool:
        return self.active_from <= step < self.active_until

    def update(self, step: int, loss: float) -> bool:
        """Feed the loss of `step`; True when it is a spike."""
        spike = self.seen >= self.warmup and self.mean is not None and loss > self.ratio * self.mean
        if spike:
            self.spikes.append(step)
            if not self.active(step):
                self.active_from = step + 1
            self.active_until = step + 1 + self.hold
        else:
            self.mean = loss if self.mean is None else self.ema * self.mean + (1 - self.ema) * loss
        self.seen += 1
        return spike

    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "active_from": self.active_from,
                "active_until": self.active_until, "spikes": list(self.spikes)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.seen = state["mean"], state["seen"]
        self.active_from, self.active_until = state["active_from"], state["active_until"]
        self.spikes = list(state["spikes"])


class RouterHistory:
    """The learned routers' (weight, bias) at the start of each of the last Δt + 1 steps, so that step t can
    choose experts with the parameters of step t - Δt (anticipatory routing). Kept always (it is small:
    experts x d per layer), so routing can switch on at any step with a full history."""

    def __init__(self, delay: int):
        self.delay = delay
        self.snapshots: deque[dict[int, tuple[torch.Tensor, torch.Tensor]]] = deque(maxlen=delay + 1)

    @torch.no_grad()
    def push(self, model: torch.nn.Module) -> None:
        snap = {}
        for layer_id, gate in learned_gates(model).items():
            w = gate.weight
            w = w.full_tensor() if hasattr(w, "full_tensor") else w  # FSDP2 shards it
            snap[layer_id] = (w.detach().clone(), gate.bias.detach().clone())
        self.snapshots.append(snap)

    def oldest(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Parameters of step t - Δt (or the oldest kept, early in training)."""
        return self.snapshots[0]

    def state_dict(self) -> dict:
        return {"delay": self.delay, "snapshots": [{k: (w.cpu(), b.cpu()) for k, (w, b) in s.items()}
                                                   for s in self.snapshots]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.snapshots = deque(({k: (w.to(device), b.to(device)) for k, (w, b) in s.items()}
                                for s in state["snapshots"]), maxlen=self.delay + 1)
