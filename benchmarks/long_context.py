"""A million-token prompt on one GPU: the 43-layer Flash-shaped V4 (Flash's attention, mHC and layer schedule;
8 routed experts instead of 256 so the weights fit in 80 GB) prefills a 1M-token prompt in chunks through the
paged FP8 cache (`dsv4.paged`), then decodes 64 tokens. Random weights and tokens: this measures time and
memory, not text.

Prints one JSON line per phase (prefill progress every `--report` tokens, the prefill total, decode) with
peak GPU memory and the pool's bytes, and writes the per-chunk prefill throughput to `--curve` (JSON lines)
and a PNG beside it.

A 1M-token prefill can outlast one 10-minute device command: `--budget-s N` stops after N seconds of prefill,
saves the pool and the position to `--state`, and a second run with the same `--state` continues (the
weights are re-drawn from the same seed on the same device, so they are the same); the reported prefill
time is the sum of both runs' prefill time.

Decode replays the step as a CUDA graph (`dsv4.engine.graphs`; eager decode is bound by kernel launches);
`--no-graph` decodes eagerly to compare. The decode line says which ran ("graph", or "eager" and why).

Usage: python benchmarks/long_context.py [--ctx 1M] [--chunk 8192] [--decode 64] [--experts 8] [--layers 43]
       [--budget-s 500 --state DIR] [--no-graph] [--dry]   (--dry: a tiny model on CPU, a few hundred tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4.analysis import parse_context  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.engine.graphs import DecodeGraphs  # noqa: E402
from dsv4.kernels.paged_cache import PagedKVCache  # noqa: E402
from dsv4.model import build_random  # noqa: E402
from dsv4.paged import PagedBatch  # noqa: E402


def build(args, device):
    base = preset("tiny") if args.dry else preset("flash")
    n = args.layers or base.num_hidden_layers
    ratios = base.layer_ratios[:n] if n <= base.num_hidden_layers else None
    cfg = base.replace(num_hidden_layers=n, compress_ratios=ratios, num_nextn_predict_layers=0,
                       n_routed_experts=args.experts, num_experts_per_tok=min(base.num_experts_per_tok, args.experts),
                       num_hash_layers=min(base.num_hash_layers, n))
    return build_random(cfg, device, torch.float32 if args.dry else torch.bfloat16, args.seed), cfg


def gib(x: int) -> float:
    return round(x / 2 ** 30, 3)


def peak() -> float:
    return gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0


def emit(**rec):
    print(json.dumps(rec), flush=True)


def save_state(path: str, pool: PagedKVCache, pos: int, prefill_s: float) -> None:
    state = {"pos": pos, "prefill_s": prefill_s, "lengths": pool.lengths, "active": pool.active,
             "window": pool.window, "entries": pool.entries, "keys": pool.keys, "state": pool.state,
             "groups": {r: (g.table, g.free, g.host) for r, g in pool.groups.items()}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed save leaves the previous state


def load_state(path: str, pool: PagedKVCache) -> tuple[int, float]:
    st = torch.load(path, map_location=pool.window[pool.layer_ids[0]].device, weights_only=False)
    pool.lengths, pool.active = st["lengths"], st["active"]
    for name in ("window", "entries", "keys", "state"):
        for layer, t in st[name].items():
            getattr(pool, name)[layer].copy_(t)
    for r, (table, free, host) in st["groups"].items():
        g = pool.groups[r]
        g.table.copy_(table)
        g.free, g.host = free, host
    return st["pos"], st["prefill_s"]


def plot(curve_path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(curve_path)]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["pos"] / 1e3 for r in rows], [r["tok_s"] for r in rows])
    ax.set_xlabel("context position (K tokens)")
    ax.set_ylabel("prefill tokens/s (chunk)")
    ax.set_title("V4-Flash-shaped 43 layers, paged FP8 cache, one GPU")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.splitext(curve_path)[0] + ".png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="1M")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default="64K", help="print a progress line every this many prompt tokens")
    ap.add_argument("--budget-s", type=float, default=None, help="stop prefill after this many seconds (see --state)")
    ap.add_argument("--state", default=None, help="file to save / resume the prefill state")
    ap.add_argument("--curve", default=None, help="JSON lines of per-chunk prefill throughput (+ a PNG)")
    ap.add_argument("--profile", action="store_true", help="profile two decode steps after the timed ones")
    ap.add_argument("--no-graph", action="store_true", help="decode eagerly instead of replaying a CUDA graph")
    ap.add_argument("--dry", action="store_true", help="tiny model on CPU: checks the script runs")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry else "cuda"
    ctx, report = parse_context(args.ctx), parse_context(args.report)
    if args.dry:
        ctx, args.chunk, args.decode, report = min(ctx, 300), 64, 4, 128
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, cfg = build(args, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pool = PagedKVCache(cfg, max_seqs=1, max_tokens=ctx + args.decode + args.chunk, block_size=64, device=device)
    slot = pool.allocate()
    batch = PagedBatch(pool, [slot])
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=gen, device=device)
    # The whole sequence must fit the model's context (Flash: 1,048,576 positions): a "1M" prompt leaves room
    # for the decoded tokens (and the one that starts decoding).
    prompt = min(ctx, cfg.max_position_embeddings - args.decode - 2)
    emit(phase="setup", layers=cfg.num_hidden_layers, experts=cfg.n_routed_experts, ctx=ctx, chunk=args.chunk,
         weights_gib=gib(weights), pool_gib=gib(pool.allocated_bytes()), setup_s=round(time.perf_counter() - t0, 1),
         device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    pos, prefill_s = 0, 0.0
    if args.state and os.path.exists(args.state):
        pos, prefill_s = load_state(args.state, pool)
        emit(phase="resumed", pos=pos, prefill_s_so_far=round(prefill_s, 1))
    curve = open(args.curve, "a") if args.curve else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    logits = None
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        while pos < prompt:
            end = min(prompt, pos + args.chunk)
            t = time.perf_counter()
            logits = model(ids[:, pos:end], batch, last_only=True)
            sync()
            dt = time.perf_counter() - t
            tok_s = round((end - pos) / dt, 1)
            if curve:
                curve.write(json.dumps({"pos": end, "tok_s": tok_s}) + "\n")
            pos = end
            if pos % report == 0 or pos == prompt:
                emit(phase="prefill", pos=pos, elapsed_s=round(prefill_s + time.perf_counter() - start, 1),
                     last_chunk_tok_s=tok_s, peak_gib=peak())
            if args.budget_s and time.perf_counter() - start > args.budget_s and pos < prompt:
                if not args.state:
                    raise SystemExit("--budget-s needs --state to save the prefill")
                save_state(args.state, pool, pos, prefill_s + time.perf_counter() - start)
                emit(phase="saved", pos=pos, state=args.state)
                return
        prefill_s += time.perf_counter() - start
        used = pool.used_bytes(slot)
        emit(phase="prefill_done", prompt=prompt, prefill_s=round(prefill_s, 1), prefill_tok_s=round(prompt / prefill_s),
             peak_gib=peak(), cache_used_gib=gib(sum(used.values())), cache_terms={k: gib(v) for k, v in used.items()})
        # Decode: greedy, one token per step.
        step = DecodeGraphs(model, pool, enabled=device == "cuda" and not args.no_graph)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        nxt = step(nxt, [slot])[:, -1].argmax(-1, keepdim=True)  # warm-up: compiles the kernels, captures
        sync()
        t = time.perf_counter()
        for _ in range(args.decode):
            nxt = step(nxt, [slot])[:, -1].argmax(-1, keepdim=True)
        sync()
        dt = time.perf_counter() - t
        mode = "graph" if any(s.graph is not None for s in step.steps.values()) else \
            "eager" + (f" ({step.failure})" if step.failure else "")
        emit(phase="decode", ctx=pool.lengths[slot], tokens=args.decode, decode_tok_s=round(args.decode / dt, 2),
             ms_per_token=round(1000 * dt / args.decode, 1), mode=mode, peak_gib=peak())
        if args.profile:  # where a decode step's time goes (CPU launch overhead vs GPU kernels)
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(2):
                    nxt = step(nxt, [slot])[:, -1].argmax(-1, keepdim=True)
                sync()
            key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=30), flush=True)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30), flush=True)
    if curve:
        curve.close()
        plot(args.curve)
    if args.state and os.path.exists(args.state):
        os.remove(args.state)


if __name__ == "__main__":
    main()
