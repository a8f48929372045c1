"""Muon vs AdamW on the bundled corpus: same model, same data order, same token budget, small LR sweep each.

    python benchmarks/optim.py [--steps 150] [--out benchmarks/results/optim_cpu.json]

Model: the `tiny` preset (every component on; corpus ids folded into its 512-token vocabulary), rows of 128
tokens, 8 rows per step, sparse phase throughout, no FP4 (optimizer comparison only). Validation loss is
measured every `--eval-every` steps on fixed held-out batches. Reports, per optimizer, the best final
validation loss over its LR sweep, and the steps each optimizer's best run needs to reach AdamW's best final
validation loss.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dsv4.train.config import TrainConfig
from dsv4.train.data import tokenize_corpus
from dsv4.train.trainer import Trainer

SWEEP = {"muon": [1e-3, 3e-3, 1e-2], "adamw": [1e-3, 3e-3, 1e-2]}


def run(optimizer: str, lr: float, steps: int, eval_every: int, docs, val_docs) -> dict:
    cfg = TrainConfig(model="tiny", optimizer=optimizer, lr=lr, steps=steps, batch_size=8,
                      seq_len_schedule=[[0, 128]], warmup_steps=10, eval_every=eval_every, eval_batches=4,
                      checkpoint_every=10**6, spike_warmup=10**6)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        recs = Trainer(cfg, out, docs=docs, val_docs=val_docs).run(progress=False)
    curve = [(r["step"] + 1, r["val_loss"]) for r in recs if "val_loss" in r]
    return {"optimizer": optimizer, "lr": lr, "val_curve": curve, "final_val": curve[-1][1],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/optim_cpu.json")
    args = p.parse_args()
    docs, val_docs = tokenize_corpus("train"), tokenize_corpus("val")
    runs = []
    for opt, lrs in SWEEP.items():
        for lr in lrs:
            r = run(opt, lr, args.steps, args.eval_every, docs, val_docs)
            print(f"{opt:6s} lr {lr:.0e}: final val {r['final_val']:.4f} ({r['seconds']:.0f}s)", flush=True)
            runs.append(r)
    best = {opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["final_val"]) for opt in SWEEP}
    target = best["adamw"]["final_val"]
    summary = {}
    for opt, r in best.items():
        reach = next((s for s, v in r["val_curve"] if v <= target), None)
        summary[opt] = {"best_lr": r["lr"], "final_val": r["final_val"], "steps_to_adamw_best": reach}
        print(f"{opt}: best lr {r['lr']:.0e}, final val {r['final_val']:.4f}, reaches AdamW's best "
              f"({target:.4f}) at step {reach}")
    Path(args.out).write_text(json.dumps({"steps": args.steps, "tokens_per_step": 8 * 128, "summary": summary,
                                          "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
