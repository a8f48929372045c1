"""Does training through the trainable attention kernel (`dsv4/kernels/sparse_attn_train.py`) follow the same loss
curve as training through the reference attention's autograd? Same model, seed, data order and recipe; only the
kernel seam's training path differs.

    python benchmarks/train_kernel_parity.py [--steps 40] [--seq 4096] [--out DIR]

Model: d 512, 4 layers (CSA, HCA, CSA, HCA: ratios 4 / 128), 8 heads x head dim 128, top-k 64, window 128, 8 experts
top-2, MTP, Muon, bf16 autocast: the sparse phase with the indexer's KL loss. Data: documents of 300-3000 tokens
stitched from 32 fixed 64-token motifs (so the loss falls within tens of steps); no tokenizer needed. Prints one JSON line per path (loss per step, seconds) and a
summary line (largest and last-10-mean absolute loss difference); writes `train_kernel_parity.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dsv4 import kernels
from dsv4.train.config import TrainConfig
from dsv4.train.trainer import Trainer

MODEL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, head_dim=128, qk_rope_head_dim=64,
             q_lora_rank=256, o_groups=2, o_lora_rank=256, sliding_window=128, compress_ratios=[4, 128, 4, 128],
             index_n_heads=4, index_head_dim=64, index_topk=64, n_routed_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=512, num_hash_layers=1, vocab_size=4096, max_position_embeddings=16384)


def motif_docs(n_tokens: int, vocab: int, seed: int) -> dict:
    """Documents stitched from 32 fixed 64-token motifs with distinct tokens: inside a motif the next token is
    determined by the current one, so the loss falls within tens of steps."""
    motifs = torch.randperm(vocab - 2, generator=torch.Generator().manual_seed(1234))[:32 * 64].add(2).view(32, 64)
    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(300, 3000, (1,), generator=gen))
        picks = torch.randint(0, 32, (n // 64 + 1,), generator=gen)
        docs.append(motifs[picks].flatten()[:n].int())
        total += n
    return {"motif": docs}


def train(path: str, args, out: Path) -> dict:
    cfg = TrainConfig(model="small", model_overrides=MODEL, steps=args.steps, batch_size=1,
                      seq_len_schedule=[[0, args.seq]], warmup_steps=5, lr=3e-3, bf16=True, seed=0,
                      checkpoint_every=10**6, spike_warmup=10**6)
    docs = motif_docs(args.seq * (args.steps + 2), MODEL["vocab_size"], 0)
    val = motif_docs(args.seq, MODEL["vocab_size"], 1)
    torch.manual_seed(0)
    with kernels.use_train_kernel(path == "kernel"):
        t = Trainer(cfg, out / path, device=args.device, docs=docs, val_docs=val)
        t0 = time.perf_counter()
        losses = [t.train_step()["loss"] for _ in range(args.steps)]
    return {"path": path, "losses": losses, "seconds": time.perf_counter() - t0,
            "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (the kernel path then needs "
                   "TRITON_INTERPRET=1)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for path in ("reference", "kernel"):
        runs[path] = train(path, args, out)
        print(json.dumps(runs[path]), flush=True)
    ref, ker = runs["reference"]["losses"], runs["kernel"]["losses"]
    diff = [abs(a - b) for a, b in zip(ref, ker)]
    print(json.dumps({"case": "summary", "max_abs_diff": max(diff), "last10_mean_abs_diff": sum(diff[-10:]) / 10,
                      "first_loss": ref[0], "last_loss_reference": ref[-1], "last_loss_kernel": ker[-1],
                      "speedup": runs["reference"]["seconds"] / runs["kernel"]["seconds"]}), flush=True)
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for path, r in runs.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{path} attention")
    ax.set(xlabel="step", ylabel="training loss", title=f"trainable kernel vs reference ({runs['kernel']['card']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "train_kernel_parity.png", dpi=120)


if __name__ == "__main__":
    main()
