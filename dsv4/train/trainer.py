"""The training loop: one `Trainer` owns the model, optimizer, data loaders, recipe state and the run folder.

Run folder (`out`):
  metrics.jsonl                 one JSON object per step: step, loss, lr, tokens, seq_len, phase, ...
  loss.png                      the loss curve (training loss, validation loss when measured)
  checkpoints/step_NNNNNNN/     model.safetensors + config.json (loadable by `dsv4 generate`),
                                vocab_map.json (with `compact_vocab`: the model's vocabulary),
                                train_config.json, train_state.pt (optimizer state by parameter name, data
                                position, RNG, recipe state). Each is written to a temporary folder and
                                renamed into place; the last `keep_checkpoints` stay.
Resuming restores all of it, so a resumed run computes exactly what the uninterrupted run computes
(bitwise on CPU: every random choice is a function of the seed and the step). Weights and optimizer state
are saved whole (shards gathered, experts from their owners) and the data order does not depend on the
number of ranks, so a checkpoint resumes with any number of processes that divides the batch and experts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dsv4.checkpoint import save_checkpoint
from dsv4.errors import CheckpointError
from dsv4.model import Transformer
from dsv4.optim import build_optimizer
from dsv4.tokenizer import VOCAB_MAP_NAME, VocabMap
from dsv4.train.config import TrainConfig
from dsv4.train.data import IGNORE_INDEX, DataLoader
from dsv4.train.parallel import place_like
from dsv4.train.recipe import (RouterHistory, SpikeDetector, forward_losses, make_train_step, target_counts,
                               update_router_bias)

# Train-config fields that must match a checkpoint to resume it: they fix the model, the data order and the
# optimizer state's meaning. The others (steps, LR, intervals, ...) may change between runs.
RESUME_MUST_MATCH = ("model", "model_overrides", "compact_vocab", "seed", "data_weights", "optimizer")


class CheckpointMismatch(CheckpointError):
    """A checkpoint was written for a different model or training setup."""


class Trainer:
    def __init__(self, config: TrainConfig, out: str | Path, device: str | torch.device = "cpu",
                 dist=None, tokenizer=None, docs: dict | None = None, val_docs: dict | None = None):
        """`dist`: a `dsv4.train.parallel.Parallel` (data/expert parallel) or None (one process).
        `docs` / `val_docs`: {source: [token ids]} instead of the bundled corpus (tests)."""
        from dsv4.tokenizer import load_tokenizer

        self.config = cfg = config
        self.out = Path(out)
        self.device = torch.device(device)
        self.dist = dist
        self.rank, self.world = (dist.rank, dist.world) if dist is not None else (0, 1)
        self.model_config = cfg.model_config()
        torch.manual_seed(cfg.seed)
        self.model = Transformer(self.model_config, seed=cfg.seed).to(self.device)
        if dist is not None:
            self.model = dist.parallelize(self.model)
        self.optimizer = self._build_optimizer()
        self._indexer_params = [p for name, p in self.model.named_parameters() if ".indexer." in name]
        tok = tokenizer
        if docs is None or val_docs is None:
            from dsv4.train.data import tokenize_corpus

            tok = tok or load_tokenizer()
            docs = docs if docs is not None else tokenize_corpus("train", tokenizer=tok)
            val_docs = val_docs if val_docs is not None else tokenize_corpus("val", tokenizer=tok)
        bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else (0, 1)
        # The loaders yield official ids; `_local` maps them into the model's vocabulary.
        self.vocab_map, self._oov_nats, self.vocab_info = None, None, {}
        if cfg.compact_vocab:
            self._build_vocab_map(docs, val_docs, tok or load_tokenizer())
        self.loader = DataLoader(docs, cfg.batch_size_at(0), cfg.seq_len_at(0), bos, eos, cfg.data_weights, cfg.seed)
        self._val = (val_docs, bos, eos)
        self.spikes = SpikeDetector(cfg.spike_ratio, cfg.spike_warmup, cfg.spike_ema, cfg.anticipatory_steps)
        self.router_history = RouterHistory(cfg.anticipatory_delay)
        self.step = 0
        self.tokens = 0

    def _build_optimizer(self):
        cfg = self.config
        if cfg.optimizer == "muon":
            return build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                   muon_kw={"momentum": cfg.momentum})
        from dsv4.optim import CombinedOptimizer, split_param_groups

        groups = split_param_groups(self.model)
        adamw = torch.optim.AdamW(
            [{"params": [p for _, p in groups["muon"] + groups["adamw"]], "weight_decay": cfg.weight_decay},
             {"params": [p for _, p in groups["adamw_no_decay"]], "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas))
        return CombinedOptimizer({"adamw": adamw})

    # ------------------------------------------------------------------ data
    def _build_vocab_map(self, docs: dict, val_docs: dict, tok) -> None:
        """The compact vocabulary of the training split (`compact_vocab` ids: the chat format's special tokens,
        UNK, the most frequent ids), and for each official id outside it the nats a full-vocabulary model
        would add on top of P(UNK): -log q(id), q = the training split's add-one unigram over those ids. So
        `val_loss_full` (= val_loss + those nats on UNK targets) is a loss over all 129K ids, comparable to a
        run without the map."""
        from dsv4.chat import SPECIAL_TOKENS

        V = tok.vocab_size
        specials = [tok.bos_id, tok.eos_id] + [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        counts = torch.zeros(V, dtype=torch.long)
        for d in (d for v in docs.values() for d in v):
            counts += torch.bincount(torch.as_tensor(d).long(), minlength=V)
        self.vocab_map = vmap = VocabMap.from_counts(counts, self.config.compact_vocab, specials)
        outside = ~vmap.contains(torch.arange(V))
        q = (counts + 1).double() * outside
        self._oov_nats = torch.where(outside, -(q / q.sum()).log(), 0.0)
        val = torch.cat([torch.as_tensor(d).long() for v in val_docs.values() for d in v] or [torch.zeros(0).long()])
        self.vocab_info = {"size": len(vmap), "train_unk_share": float(counts[outside].sum() / counts.sum()),
                           "val_unk_share": float(outside[val].double().mean()) if len(val) else float("nan")}

    def _model_ids(self, t: torch.Tensor) -> torch.Tensor:
        """Official token ids -> the model's vocabulary: through the compact map, or folded into a vocabulary
        smaller than the tokenizer's (tiny test models). Negative labels (ignored positions) stay."""
        if self.vocab_map is not None:
            return self.vocab_map.to_compact(t)
        V = self.model_config.vocab_size
        return torch.where(t >= 0, t % V, t)

    def _my_rows(self, batch: dict) -> slice:
        B = batch["input_ids"].shape[0]
        if B % self.world:
            raise ValueError(f"batch of {B} rows does not split over {self.world} ranks")
        n = B // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def _local(self, batch: dict) -> dict:
        """This rank's rows of the global batch, on the device, ids mapped into the model's vocabulary."""
        rows = self._my_rows(batch)
        return {k: (self._model_ids(v[rows]) if k in ("input_ids", "labels") else v[rows]).to(self.device)
                for k, v in batch.items()}

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce(t) if self.dist is not None else t

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches of `batch_size_at(step)` rows (over all ranks)."""
        cfg, step = self.config, self.step
        phase = cfg.phase_at(step)
        self.loader.set_seq_len(cfg.seq_len_at(step))
        self.loader.set_batch_size(cfg.batch_size_at(step))
        lr = cfg.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.router_history.push(self.model)
        anticipatory = self.spikes.active(step)
        self._set_trainable(phase)
        self.model.train()
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext())
        micro = [self._local(next(self.loader)) for _ in range(cfg.grad_accum)]
        # The step's loss normalisers (over every micro-batch and rank) before any forward, so that each
        # micro-batch's loss is its share of the step's mean: k micro-batches of b rows give the gradient of one
        # batch of k*b rows. Gradients are averaged over ranks, hence the factor `world` below.
        n_lm, n_mtp, n_rows = self._all_reduce(torch.tensor(
            [[*target_counts(b["labels"]), b["labels"].shape[0]] for b in micro], dtype=torch.float64,
            device=self.device).sum(0)).tolist()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # lm, mtp, balance, KL; KL's count
        load: dict[int, torch.Tensor] = {}
        for i, b in enumerate(micro):
            if self.dist is not None:  # reduce gradients over ranks once, after the last micro-batch
                self.dist.gradient_sync(self.model, i == len(micro) - 1)
            # detach_indexer: the KL trains the indexer only, and nothing else trains it (its top-k has no
            # gradient), so its normaliser, known only after the forwards, can divide the indexer's gradients
            # after the last micro-batch.
            ts = make_train_step(attention="sparse" if phase == "sparse" else "dense",
                                 indexer_loss=phase == "indexer_warmup" or (phase == "sparse"
                                                                            and cfg.indexer_loss_in_sparse),
                                 detach_indexer=True, fp4_experts=cfg.fp4_experts, fp4_indexer=cfg.fp4_indexer,
                                 route_with=self.router_history.oldest() if anticipatory else None,
                                 checkpoint=cfg.activation_checkpointing)
            with autocast:
                parts = forward_losses(self.model, b["input_ids"], b["labels"], b["doc_ids"], ts)
            loss = cfg.indexer_loss_weight * parts.indexer_sum
            if phase != "indexer_warmup":  # backbone frozen in the warm-up: only the indexer's KL has gradients
                loss = loss + (parts.lm_sum / max(n_lm, 1) + cfg.mtp_weight * parts.mtp_sum / max(n_mtp, 1)
                               + cfg.balance_weight * parts.balance_sum / max(n_rows, 1))
            (loss * self.world).backward()
            if self.dist is not None:
                self.dist.reshard(self.model)
            sums[:4] += torch.stack([parts.lm_sum, parts.mtp_sum, parts.balance_sum, parts.indexer_sum]).detach()
            sums[4] += parts.indexer_count
            for k, v in ts.expert_load.items():
                load[k] = load[k] + v if k in load else v
        totals = self._all_reduce(sums).tolist()
        n_kl = totals[4]
        lm_v, mtp_v, balance_v, kl_v = (x / max(n, 1) for x, n in zip(totals, (n_lm, n_mtp, n_rows, n_kl)))
        for p in self._indexer_params:
            if p.grad is not None:
                p.grad.div_(max(n_kl, 1))
        if self.dist is not None:
            grad_norm = self.dist.finish_grads(self.model, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            if cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), cfg.grad_clip, grad_norm)
        self.optimizer.step()
        imbalance = {}
        if phase != "indexer_warmup":
            load = {k: self._all_reduce(v.float()) for k, v in sorted(load.items())}
            imbalance = update_router_bias(self.model, load, cfg.bias_update_speed)
        spike = self.spikes.update(step, lm_v) if phase != "indexer_warmup" else False
        global_tokens = sum(b["input_ids"].numel() for b in micro) * self.world
        self.tokens += global_tokens
        self.step += 1
        gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        return {"step": step, "loss": lm_v, "mtp_loss": mtp_v, "indexer_kl": kl_v, "balance": balance_v,
                "lr": lr, "tokens": self.tokens, "batch_tokens": global_tokens, "seq_len": self.loader.seq_len,
                "phase": phase, "anticipatory": anticipatory, "spike": spike, "grad_norm": gn,
                "max_load": max(imbalance.values()) if imbalance else None}

    def _set_trainable(self, phase: str) -> None:
        """The indexer learns only in the warm-up and sparse phases, the backbone in all but the warm-up.
        Frozen parameters get no gradient, so the optimizer leaves them (and their moments) untouched."""
        indexer = {id(p) for p in self._indexer_params}
        for p in self.model.parameters():
            p.requires_grad_(phase == "sparse" or (phase == "indexer_warmup") == (id(p) in indexer))

    def evaluate(self) -> float:
        """Mean next-token loss over `eval_batches` fixed validation batches at the current length."""
        return self._evaluate()[0]

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float | None]:
        """(validation loss, the same over the full official vocabulary, or None without a compact map)."""
        cfg = self.config
        docs, bos, eos = self._val
        loader = DataLoader(docs, cfg.batch_size_at(self.step) if self.world == 1 else self.world
                            * max(1, cfg.batch_size_at(self.step) // self.world),
                            cfg.seq_len_at(max(0, self.step - 1)), bos, eos, None, seed=1234)
        phase = cfg.phase_at(max(0, self.step - 1))
        self.model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for _ in range(cfg.eval_batches):
            raw = next(loader)
            b = self._local(raw)
            ts = make_train_step(attention="sparse" if phase == "sparse" else "dense",
                                 fp4_experts=cfg.fp4_experts, fp4_indexer=cfg.fp4_indexer)
            parts = forward_losses(self.model, b["input_ids"], b["labels"], b["doc_ids"], ts, with_mtp=False)
            labels = raw["labels"][self._my_rows(raw)]
            oov = float(self._oov_nats[labels[labels >= 0]].sum()) if self.vocab_map is not None else 0.0
            total += torch.tensor([float(parts.lm_sum), parts.lm_count, oov], dtype=torch.float64,
                                  device=self.device)
        total = self._all_reduce(total)
        self.model.train()
        n = total[1].clamp(min=1)
        return float(total[0] / n), (float((total[0] + total[2]) / n) if self.vocab_map is not None else None)

    # ------------------------------------------------------------------ run
    def run(self, steps: int | None = None, progress: bool = True, on_step=None,
            max_seconds: float | None = None) -> list[dict]:
        """Train up to step `steps` (default: config.steps), appending to metrics.jsonl and checkpointing.
        `max_seconds`: stop (with validation and a checkpoint) after the first step that ends past it."""
        from tqdm import tqdm

        cfg = self.config
        total = steps if steps is not None else cfg.steps
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        records = []
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not progress or self.rank != 0,
                   dynamic_ncols=True)
        t0, tok0 = time.perf_counter(), self.tokens
        while self.step < total:
            rec = self.train_step()
            out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            if out_of_time:
                total = self.step
            if cfg.eval_every and self.step % cfg.eval_every == 0 or self.step == total:
                rec["val_loss"], full = self._evaluate()
                if full is not None:
                    rec["val_loss_full"] = full
            records.append(rec)
            if self.rank == 0:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if not math.isfinite(rec["loss"]):
                bar.close()
                raise FloatingPointError(f"loss is {rec['loss']} at step {rec['step']}; lower lr or check the data")
            dt = time.perf_counter() - t0
            bar.set_postfix_str(f"loss {rec['loss']:.3f} lr {rec['lr']:.1e} {rec['seq_len']}tok {rec['phase']}"
                                f"{' AR' if rec['anticipatory'] else ''} {(self.tokens - tok0) / max(dt, 1e-9):,.0f} tok/s")
            bar.update(1)
            if on_step is not None:
                on_step(rec)
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self.save()
        bar.close()
        if self.rank == 0:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return records

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _full_state_dict(self) -> dict:
        if self.dist is not None:
            return self.dist.full_state_dict(self.model)
        return self.model.state_dict()

    def save(self) -> Path:
        """Write checkpoints/step_N atomically (temporary folder + rename) and keep the last N."""
        final = self.checkpoint_dir() / f"step_{self.step:07d}"
        tmp = self.checkpoint_dir() / f".step_{self.step:07d}.tmp"
        sd = self._full_state_dict()
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _StateOnly(self.model_config, sd, self.vocab_map).save(tmp)
            (tmp / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        self._barrier()
        # Loader, recipe state and RNG are the same on every rank (each runs the whole batch's loader), so
        # rank 0's stand for all.
        state = {"step": self.step, "tokens": self.tokens, "optimizer_state": self._optimizer_state(),
                 "loader": self.loader.state_dict(), "spikes": self.spikes.state_dict(),
                 "router_history": self.router_history.state_dict(), "rng": torch.get_rng_state(),
                 "world": self.world}
        if self.rank == 0:
            _atomic_torch_save(state, tmp / "train_state.pt")
        self._barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(self.checkpoint_dir().glob("step_*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir().glob("step_*"))
        return found[-1] if found else None

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; False when there is none."""
        from safetensors.torch import load_file

        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None:
            return False
        self._check_matches(path)
        state_file = path / "train_state.pt"
        if not state_file.is_file():  # an earlier dsv4 wrote one per rank when data parallel
            state_file = path / f"train_state_rank{self.rank}.pt"
        if not state_file.is_file():
            raise CheckpointMismatch(f"{path} has no train_state.pt: not a training checkpoint, or an incomplete one")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        sd = load_file(str(path / "model.safetensors"))
        if self.dist is not None:
            self.dist.load_full_state_dict(self.model, sd)
        else:
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise CheckpointMismatch(f"{path}: {len(missing)} tensors missing {missing[:5]}, "
                                         f"{len(unexpected)} unexpected {unexpected[:5]}")
        if "optimizer_state" in state:
            self._load_optimizer_state(state["optimizer_state"])
        elif state["world"] == self.world:  # an earlier dsv4's Optimizer.state_dict(): this world's shards
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            raise CheckpointMismatch(f"{path} was written by an earlier dsv4 whose optimizer state only a run with "
                                     f"{state['world']} processes can load (this run has {self.world})")
        self.loader.load_state_dict(state["loader"])
        self.spikes.load_state_dict(state["spikes"])
        self.router_history.load_state_dict(state["router_history"], self.device)
        torch.set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        return True

    def _optimizer_state(self) -> dict[str, dict]:
        """The optimizer's state by parameter name, whole tensors on CPU: what any number of processes can load."""
        if self.dist is not None:
            return self.dist.full_optimizer_state(self.model, self.optimizer)
        state = self.optimizer.state
        return {name: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state[p].items()}
                for name, p in self.model.named_parameters() if state.get(p)}

    def _load_optimizer_state(self, saved: dict[str, dict]) -> None:
        """Inverse of `_optimizer_state`: tensors shaped like their parameter go where it is (this rank's shard,
        or its experts: other ranks' names are skipped); the rest (AdamW's step count) stays as saved."""
        owner = {id(p): opt for opt in self.optimizer.optimizers.values() for g in opt.param_groups
                 for p in g["params"]}
        for name, p in self.model.named_parameters():
            if name not in saved and _STACKED_EXPERT.search(name):
                saved = {**saved, name: _stack_expert_state(saved, name, p.shape[0])}
            if name in saved and id(p) in owner:
                owner[id(p)].state[p] = {k: place_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                                         for k, v in saved[name].items()}

    def _check_matches(self, path: Path) -> None:
        try:
            saved_model = json.loads((path / "config.json").read_text())
            saved_train = json.loads((path / "train_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointMismatch(f"{path} is not a training checkpoint (config.json / train_config.json: {e})")
        mine = self.model_config.to_dict()
        diff = [f"{k}: checkpoint {saved_model.get(k)!r} != config {mine[k]!r}" for k in mine
                if saved_model.get(k) != mine[k]]
        diff += [f"{k}: checkpoint {saved_train.get(k)!r} != config {getattr(self.config, k)!r}"
                 for k in RESUME_MUST_MATCH if saved_train.get(k, 0 if k == "compact_vocab" else None)
                 != getattr(self.config, k)]
        saved_map = VocabMap.load(path / VOCAB_MAP_NAME) if (path / VOCAB_MAP_NAME).is_file() else None
        if not diff and saved_map != self.vocab_map:
            diff.append(f"{VOCAB_MAP_NAME}: the checkpoint's compact vocabulary differs from the one built from "
                        "this run's training data (did the corpus change?)")
        if diff:
            raise CheckpointMismatch(
                f"cannot resume from {path}: the config does not match the checkpoint:\n  " + "\n  ".join(diff)
                + "\nuse the checkpoint's train_config.json, or a new --out folder to start afresh")


_STACKED_EXPERT = re.compile(r"\.experts\.(w1|w2|w3)$")


def _stack_expert_state(saved: dict[str, dict], name: str, n_experts: int) -> dict:
    """Optimizer state of a stacked expert parameter (`...experts.w1`, (E, out, in)) from a checkpoint written
    before the experts were stacked, which keeps it per expert (`...experts.{e}.w1.weight`): each tensor stacked
    over e, the rest as saved. Empty when the checkpoint has none of them (the state then starts afresh)."""
    prefix, w = name.rsplit(".", 1)
    per_expert = [saved.get(f"{prefix}.{e}.{w}.weight") for e in range(n_experts)]
    if not any(per_expert):
        return {}
    if not all(per_expert):
        missing = [e for e, st in enumerate(per_expert) if not st]
        raise CheckpointMismatch(f"optimizer state of {name}: the checkpoint has experts {prefix}.N.{w}.weight "
                                 f"for some N but not for {missing}")
    return {k: torch.stack([st[k] for st in per_expert]) if torch.is_tensor(v) else v
            for k, v in per_expert[0].items()}


class _StateOnly:
    """Adapter so `dsv4.checkpoint.save_checkpoint` writes a (gathered) state dict with its config."""

    def __init__(self, config, sd: dict, vocab_map: VocabMap | None = None):
        self.config, self._sd, self.vocab_map = config, sd, vocab_map

    def state_dict(self) -> dict:
        return self._sd

    def save(self, path: Path) -> None:
        save_checkpoint(self, path, vocab_map=self.vocab_map)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps >= `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """Training (and validation) loss against step and tokens -> PNG, written atomically."""
    if not metrics.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1, label="train (next token)")
    if any(r.get("mtp_loss") for r in recs):
        ax.plot([r["step"] for r in recs], [r["mtp_loss"] for r in recs], lw=0.8, alpha=0.6, label="train (MTP)")
    val = [r for r in recs if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    for s in sorted({r["step"] for r in recs if r.get("spike")}):
        ax.axvline(s, color="red", lw=0.5, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"dsv4 training ({recs[-1]['tokens']:,} tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png
