"""The training config (the second dataclass; the model's is `dsv4.config.Config`) and the schedules it
defines: learning rate, sequence-length curriculum, attention phases. Loadable from JSON or TOML.

Recipe (report §3), scaled by the fields below:
  LR        linear warm-up over `warmup_steps`, constant at `lr`, cosine decay over the last `decay_steps`
            to `min_lr_ratio * lr` (2e-4 -> 2e-5 in the report)
  batch     `grad_accum` micro-batches of `batch_size` rows (all ranks together) per optimizer step
  length    `seq_len_schedule` = [[from_step, seq_len], ...] (report: 4K -> 16K -> 64K -> 1M); with
            `batch_tokens` > 0 the batch size follows as batch_tokens // seq_len (constant tokens per step)
  phases    "dense" for `dense_steps` (CSA attends to every finished compressed entry, the indexer is idle),
            then "indexer_warmup" for `indexer_warmup_steps` (backbone frozen: only the indexer learns, from
            KL to the dense attention distribution), then "sparse" (CSA uses the indexer's top-k; the
            indexer keeps learning from the KL on detached inputs when `indexer_loss_in_sparse`)
  vocab     `compact_vocab` = N > 0: the model's vocabulary is a `dsv4.tokenizer.VocabMap` of the training
            corpus (N ids: chat special tokens, UNK, the most frequent ids), so a small model does not
            spend most of its compute on a 129K-way head; the map travels in every checkpoint
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dsv4.config import Config, ConfigError, preset

PHASES = ("dense", "indexer_warmup", "sparse")


@dataclass
class TrainConfig:
    # --- model and data
    model: str = "tiny"  # preset name or path to a model config.json
    model_overrides: dict = field(default_factory=dict)  # model Config fields to change, e.g. {"vocab_size": 512}
    data_weights: dict | None = None  # token share per corpus source (None: natural shares)
    compact_vocab: int = 0  # > 0: model vocabulary = the N most frequent corpus ids + chat specials + UNK
    seed: int = 0  # model init and data order
    # --- length and batch
    steps: int = 200
    batch_size: int = 8
    seq_len_schedule: list = field(default_factory=lambda: [[0, 128]])  # [[from_step, seq_len], ...]
    batch_tokens: int = 0  # > 0: batch_size = batch_tokens // seq_len at each length
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size / batch_tokens are per micro-batch)
    # --- optimizer and schedule (report §3)
    optimizer: str = "muon"  # "muon" (Muon for matrices + AdamW for the rest) or "adamw" (AdamW for all)
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    decay_steps: int | None = None  # cosine decay over the last N steps; None: the last 20 %
    weight_decay: float = 0.1
    momentum: float = 0.95  # Muon
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # --- objective
    mtp_weight: float = 0.3  # weight of the MTP (next-next-token) loss
    balance_weight: float = 1e-4  # sequence-wise balance loss (small; the bias does the balancing)
    bias_update_speed: float = 1e-3  # auxiliary-loss-free bias step: bias += speed * sign(mean load - load)
    indexer_loss_weight: float = 1.0
    indexer_loss_in_sparse: bool = True
    # --- phases
    dense_steps: int = 0
    indexer_warmup_steps: int = 0
    # --- stability
    spike_ratio: float = 1.5  # a step whose loss exceeds spike_ratio x its running mean is a spike
    spike_warmup: int = 20  # no detection during the first steps (the loss falls fast there)
    spike_ema: float = 0.9  # running mean of the loss: m <- ema * m + (1 - ema) * loss
    anticipatory_delay: int = 1  # Δt: route with the router parameters of this many steps before
    anticipatory_steps: int = 50  # how long anticipatory routing stays on after a spike
    # --- precision and memory
    fp4_experts: bool = False  # FP4 quantisation-aware training of routed experts
    fp4_indexer: bool = False  # FP4 QAT of the indexer's query/key path
    bf16: bool = False  # bf16 autocast (on CUDA; CPU autocast is slow)
    activation_checkpointing: bool = False
    # --- bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 0  # validation loss every N steps (0 = at the end only)
    eval_batches: int = 4

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"train config field `{name}`: {msg}")

        need(self.optimizer in ("muon", "adamw"), "optimizer", f"'muon' or 'adamw', got {self.optimizer!r}")
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "checkpoint_every", "eval_batches"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("warmup_steps", "dense_steps", "indexer_warmup_steps", "batch_tokens", "eval_every",
                     "anticipatory_delay", "anticipatory_steps", "spike_warmup"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr", "lr > 0 and 0 <= min_lr_ratio <= 1")
        sched = self.seq_len_schedule
        need(bool(sched) and all(len(e) == 2 and int(e[1]) > 0 for e in sched), "seq_len_schedule",
             f"a list of [from_step, seq_len] pairs, got {sched!r}")
        starts = [int(e[0]) for e in sched]
        need(starts[0] == 0 and starts == sorted(set(starts)), "seq_len_schedule",
             f"steps must start at 0 and increase, got {starts}")
        need(isinstance(self.compact_vocab, int) and (self.compact_vocab == 0 or self.compact_vocab >= 64),
             "compact_vocab", f"0 (off) or a vocabulary of at least 64 ids, got {self.compact_vocab!r}")
        need(not (self.compact_vocab and "vocab_size" in self.model_overrides), "compact_vocab",
             "sets the model's vocab_size; leave vocab_size out of model_overrides")
        need(self.spike_ratio > 1, "spike_ratio", "must be > 1")
        need(self.anticipatory_delay >= 1, "anticipatory_delay", "must be >= 1 (routing from Δt >= 1 steps before)")
        if self.batch_tokens:
            too_long = [int(e[1]) for e in sched if int(e[1]) > self.batch_tokens]
            need(not too_long, "batch_tokens", f"{self.batch_tokens} is less than one row of length {too_long}")

    # ------------------------------------------------------------------ schedules
    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) `step`: warm-up, constant, cosine decay to min_lr_ratio * lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay = self.decay_steps if self.decay_steps is not None else max(1, self.steps // 5)
        start = self.steps - decay
        if step < start:
            return self.lr
        t = min(1.0, (step - start) / max(1, decay - 1))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def seq_len_at(self, step: int) -> int:
        return int([e for e in self.seq_len_schedule if int(e[0]) <= step][-1][1])

    def batch_size_at(self, step: int) -> int:
        return max(1, self.batch_tokens // self.seq_len_at(step)) if self.batch_tokens else self.batch_size

    def phase_at(self, step: int) -> str:
        if step < self.dense_steps:
            return "dense"
        if step < self.dense_steps + self.indexer_warmup_steps:
            return "indexer_warmup"
        return "sparse"

    # ------------------------------------------------------------------ model
    def model_config(self) -> Config:
        path = Path(self.model)
        base = Config.from_json(path) if path.suffix == ".json" or path.is_dir() else preset(self.model)
        overrides = {**self.model_overrides, **({"vocab_size": self.compact_vocab} if self.compact_vocab else {})}
        return Config.from_dict({**base.to_dict(), **overrides}) if overrides else base

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            hints = {k: next(iter(difflib.get_close_matches(k, known, n=1, cutoff=0.75)), None) for k in unknown}
            raise ConfigError("unknown train config field(s) " + ", ".join(
                f"{k!r}" + (f" (did you mean {h!r}?)" if h else "") for k, h in hints.items()))
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A JSON or TOML file of TrainConfig fields (a TOML `[train]` table is also accepted)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no train config file at {path}")
        text = path.read_text()
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
        if set(raw) == {"train"}:
            raw = raw["train"]
        return cls.from_dict(raw)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Named recipes for `dsv4 train --preset NAME`: every component of the recipe on, sized for the machine.
def _tiny() -> TrainConfig:
    # CPU tests: the tiny model (vocab 512: corpus ids are folded into it), short rows, all phases.
    return TrainConfig(model="tiny", steps=40, batch_size=4, seq_len_schedule=[[0, 64], [20, 128]], lr=3e-3,
                       warmup_steps=5, dense_steps=10, indexer_warmup_steps=5, checkpoint_every=20,
                       fp4_experts=True, fp4_indexer=True)


def _demo() -> TrainConfig:
    # `make demo`: the `small` model (every component on) on 2 CPU cores, ~4 minutes. Over the official 129K
    # vocabulary the two head passes (next token + MTP) were most of a step (~2.9 s per 1,024 tokens); over a
    # compact map of the corpus (8,192 ids: ~93 % of its tokens have their own id; 16,384 gave a worse
    # full-vocabulary validation loss in the same time) a step of 2,048 tokens takes ~1.5 s, so the run sees
    # ~4x the tokens in ~2x the optimizer steps. `steps` fits a quiet 2-core
    # machine with the LR decay inside the 4 minutes; a slower one stops at the time budget instead.
    return TrainConfig(model="small", compact_vocab=8192, steps=130, seq_len_schedule=[[0, 128], [45, 256], [90, 512]],
                       batch_tokens=2048, lr=3e-3, warmup_steps=10, dense_steps=40, indexer_warmup_steps=5,
                       checkpoint_every=65, keep_checkpoints=2, fp4_experts=True, fp4_indexer=True, spike_warmup=40,
                       eval_batches=2)


TRAIN_PRESETS = {"tiny": _tiny, "demo": _demo}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown train preset {name!r}; choose from {sorted(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]()
