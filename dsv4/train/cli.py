"""`dsv4 train`: a thin shell over `dsv4.train.trainer.Trainer`.

    dsv4 train --preset tiny --out runs/tiny
    dsv4 train --config train.toml --out runs/x --steps 500 --resume
    torchrun --nproc-per-node 2 -m dsv4.train.cli --preset tiny --out runs/dp   (data + expert parallel)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_train_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="train config file (JSON or TOML with TrainConfig fields)")
    src.add_argument("--preset", help="named train recipe (tiny, demo)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--steps", type=int, default=None, help="train until this step (default: the config's steps)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args) -> int:
    import torch

    from dsv4.train.config import TrainConfig, train_preset
    from dsv4.train.parallel import Parallel, launched_by_torchrun
    from dsv4.train.trainer import Trainer

    cfg = TrainConfig.from_file(args.config) if args.config else train_preset(args.preset)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    out = Path(args.out)
    dist = Parallel.from_env() if launched_by_torchrun() else None
    device = args.device or (f"cuda:{dist.local_rank}" if dist is not None and torch.cuda.is_available() else
                             "cuda" if torch.cuda.is_available() else "cpu")
    if not args.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*")):
        print(f"dsv4 train: {out} already holds checkpoints; pass --resume to continue, or choose a new --out",
              file=sys.stderr)
        return 2
    trainer = Trainer(cfg, out, device=device, dist=dist)
    if args.resume:
        if trainer.resume():
            print(f"[dsv4] resumed at step {trainer.step} from {trainer.latest_checkpoint()}", file=sys.stderr)
        else:
            print(f"[dsv4] no checkpoint in {out}; starting afresh", file=sys.stderr)
    elif (out / "metrics.jsonl").exists() and trainer.rank == 0:
        (out / "metrics.jsonl").unlink()
    records = trainer.run(progress=not args.no_progress)
    if trainer.rank == 0:
        last = records[-1] if records else None
        if last is not None:
            val = f", validation loss {last['val_loss']:.3f}" if "val_loss" in last else ""
            print(f"[dsv4] step {trainer.step}: loss {last['loss']:.3f}{val}; {trainer.tokens:,} tokens")
        print(f"[dsv4] checkpoint: {trainer.latest_checkpoint()}")
        print(f"[dsv4] loss curve: {out / 'loss.png'}")
    if dist is not None:
        dist.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv4 train", description="train a V4 model on the bundled corpus")
    add_train_args(p)
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
