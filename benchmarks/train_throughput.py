"""Training throughput of a ~1.3B-parameter (0.5B active) V4 on one GPU, at 4K and 16K tokens per sequence.

    python benchmarks/train_throughput.py [--out DIR] [--lengths 4096 16384] [--steps 3] [--kernels auto reference]
    python benchmarks/train_throughput.py --profile [--lengths 4096]   # where one step's time goes

--profile times nothing: it runs one step under torch.profiler after the warm-up and writes, per length, the ops
with the most device time and the most host time, and the number of kernel launches, to `train_profile_<len>.txt`.

The full recipe's sparse phase as `dsv4 train` runs it: Muon, bf16 autocast, FP4 QAT of experts and indexer,
MTP, sequence-wise balance loss, indexer KL on detached inputs, packed documents (random tokens, 500-6000
per document, so no tokenizer is needed). One sequence per step. Reports tokens/s and MFU:
  MFU(6N)      6 x active parameters (matmuls, head included, embedding lookup excluded) x tokens/s / peak
  MFU(+attn)   the same plus core attention (window 128 + top-k 512 for CSA, all finished entries for HCA)
peak = 989 TFLOP/s (H100 SXM dense bf16). The model code is the plain-PyTorch reference (per-expert loop,
per-document attention) except behind the kernel seam (`dsv4.kernels`). Each row names the seam backend
(`--kernels`, one run per choice: `reference` is the pre-kernel baseline) and `attention_calls`: how many core
attention calls of the timed steps went to each implementation (`triton_train`: the trainable kernel,
`reference`: PyTorch autograd, `triton_forward` / `triton_decode`: the forward-only kernels, e.g. validation).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from dsv4 import kernels
from dsv4.info import describe
from dsv4.train.config import TrainConfig
from dsv4.train.trainer import Trainer

MODEL = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, head_dim=128, qk_rope_head_dim=64,
             q_lora_rank=512, o_groups=4, o_lora_rank=512, sliding_window=128, compress_ratios=[0, 0] + [4, 128] * 5,
             index_n_heads=8, index_head_dim=64, index_topk=512, n_routed_experts=16, num_experts_per_tok=2,
             moe_intermediate_size=1536, num_hash_layers=2, max_position_embeddings=65536)
PEAK = 989e12


def random_docs(n_tokens: int, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(500, 6000, (1,), generator=gen))
        docs.append(torch.randint(2, vocab, (n,), generator=gen, dtype=torch.int32))
        total += n
    return {"random": docs}


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward (x3) core-attention FLOPs per token, averaged over positions."""
    H, D = cfg.num_attention_heads, cfg.head_dim
    total = 0.0
    for r in cfg.layer_ratios + [0] * cfg.num_nextn_predict_layers:
        keys = min(cfg.sliding_window, seq_len / 2)
        if r == 4:
            keys += min(cfg.index_topk, seq_len / 8)
        elif r == 128:
            keys += seq_len / 2 / 128
        total += 4 * H * D * keys  # QK^T and PV
    return 3 * total


@contextlib.contextmanager
def attention_paths(counts: collections.Counter):
    """Count the implementations `kernels.sparse_attention` sends each call to: the seam imports them by name
    at call time, so wrapping the module attributes sees its real choice (not a re-derivation of its rule)."""
    from dsv4 import attention
    from dsv4.kernels import decode_attn, sparse_attn, sparse_attn_train
    targets = [(attention, "sparse_attention", "reference"),
               (sparse_attn_train, "sparse_attention_train", "triton_train"),
               (sparse_attn, "sparse_attention_dense", "triton_forward"),
               (decode_attn, "sparse_attention_decode", "triton_decode")]

    def counted(fn, name):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in targets]
    for mod, attr, name in targets:
        setattr(mod, attr, counted(getattr(mod, attr), name))
    try:
        yield counts
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def profile_step(trainer: Trainer, path: Path) -> None:
    """One training step under torch.profiler: the top ops by device and by host time, and the launch count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    text = "\n\n".join([f"kernel launches: {launches}, synchronising calls (incl. memcpy): {syncs}",
                         events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70),
                         events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text[:20000], flush=True)


def run(args, backend: str, seq_len: int, ckpt: bool, device: str) -> dict | None:
    """One configuration, timed; None when it ran out of memory."""
    cfg = TrainConfig(model="small", model_overrides=MODEL, steps=args.warmup + args.steps, batch_size=1,
                      seq_len_schedule=[[0, seq_len]], warmup_steps=1, bf16=True, fp4_experts=True,
                      fp4_indexer=True, activation_checkpointing=ckpt, checkpoint_every=10**6, spike_warmup=10**6)
    mc = cfg.model_config()
    counts = collections.Counter()
    t = None
    try:
        with kernels.use(backend):
            t = Trainer(cfg, Path(args.out) / "run", device=device,
                        docs=random_docs(seq_len * (args.warmup + args.steps + 1), mc.vocab_size),
                        val_docs=random_docs(seq_len, mc.vocab_size, 1))
            for _ in range(args.warmup):
                t.train_step()
            torch.cuda.synchronize()
            if args.profile:
                profile_step(t, Path(args.out) / f"train_profile_{seq_len}.txt")
                return None
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with attention_paths(counts):
                for _ in range(args.steps):
                    rec = t.train_step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.steps
    except torch.OutOfMemoryError:
        print(f"kernels={backend} seq {seq_len} checkpointing={ckpt}: out of memory", flush=True)
        return None
    finally:
        del t
        torch.cuda.empty_cache()
    active = describe(mc)["parameters"]["active"] - mc.vocab_size * mc.hidden_size  # no embedding lookup
    tps = seq_len / dt
    return {"kernels": backend, "attention_calls": dict(counts), "seq_len": seq_len, "activation_checkpointing": ckpt,
            "step_s": dt, "tokens_per_s": tps, "mfu_6n": 6 * active * tps / PEAK,
            "mfu_with_attention": (6 * active + attention_flops_per_token(mc, seq_len)) * tps / PEAK,
            "loss": rec["loss"], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "params_total": describe(mc)["parameters"]["total"], "params_active": active}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kernels", nargs="+", default=["auto"], choices=kernels.BACKENDS,
                   help="kernel seam backend(s), one run each (reference: the pre-kernel baseline)")
    p.add_argument("--profile", action="store_true", help="profile one step per length instead of timing")
    args = p.parse_args()
    device = "cuda"
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for backend in args.kernels:
        for seq_len in args.lengths:
            for ckpt in (False, True):
                row = run(args, backend, seq_len, ckpt, device)
                if args.profile:
                    break
                if row is not None:
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    break  # checkpointing only when needed
    if args.profile:
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
