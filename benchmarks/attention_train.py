"""Training cost of one layer's core attention, forward + backward, at Flash dims (64 heads, head dim 512,
shared-KV MQA, window 128; CSA: ratio 4, top-k 512; HCA: ratio 128): the trainable Triton kernel
(`dsv4/kernels/sparse_attn_train.py`) vs the reference's autograd (`dsv4.attention.sparse_attention`), which
training ran before it. One JSON line per (layer, tokens, path, tiles):
  fwd_ms, fwd_bwd_ms   medians over --iters after a warm-up (wall clock between device synchronisations)
  peak_gib             peak memory of one forward + backward above the inputs (what training adds per layer)
  tflops               useful FLOPs / time: QK^T and PV over the keys each query sees (forward), x3.5 (+ backward)
  err                  kernel vs reference, relative L2, output and each gradient (when both ran)
  oom                  true when the path ran out of memory
Inputs are random bf16 (one sequence of `tokens` tokens, every query at its own position, random top-k picks
among the finished entries).

    python benchmarks/attention_train.py [--tokens 4096 16384] [--iters 5] [--tiles '{"d_out": 512}' ...]
    python benchmarks/attention_train.py --dry      # tiny shapes on CPU through Triton's interpreter
    python benchmarks/attention_train.py --sm90 [--spills] [--tiles ...]   # no GPU needed, see below

--sm90 compiles, ahead of time for the H100 (sm_90a), every kernel launch one CSA and one HCA layer's forward +
backward makes at Flash dims (4,096 tokens), in bf16 and fp32, and prints each one's shared memory per program
(the card allows 232,448 bytes) and, with --spills, ptxas's registers and spill bytes. The launches are
recorded from the real launcher on meta tensors, and each is specialised (int == 1, multiples of 16, aligned
pointers) by Triton's own JIT rule, so it compiles what the GPU would. One JSON line per distinct launch.

The kernel's default tiles were chosen by spill counts, untimed (see `sparse_attn_train._tiles`); worth timing
beside them: --tiles '{}' --tiles '{"block_h": 32, "block_n": 16}' (no spills, but 2 head blocks: twice the CSA
atomics) --tiles '{"d_out": 512}' (scores once per tile, more registers) --tiles '{"d_in": 64}'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90 import compile_sm90, record_launches  # noqa: E402,F401 (benchmarks/ is the script's folder; tests use both)

FLASH = dict(H=64, D=512, window=128, topk=512, ratios={"csa": 4, "hca": 128}, dtype=torch.bfloat16)
DRY = dict(H=4, D=32, window=8, topk=8, ratios={"csa": 4, "hca": 16}, dtype=torch.float32)


def random_topk(S: int, N: int, k: int, ratio: int, device, gen) -> torch.Tensor:
    """(1, S, k) int32: min(k, visible) distinct finished entries per query in random order, -1 padded."""
    out = torch.full((1, S, k), -1, dtype=torch.int32, device=device)
    if not N:
        return out
    for s0 in range(0, S, 1024):  # chunks keep the (queries, N) score matrix small at 16K
        pos = torch.arange(s0, min(S, s0 + 1024), device=device)
        hidden = torch.arange(N, device=device)[None, :] >= ((pos + 1) // ratio)[:, None]
        scores = torch.rand(len(pos), N, device=device, generator=gen).masked_fill(hidden, -1.0)
        val, idx = scores.topk(min(k, N), dim=-1)
        out[0, s0:s0 + len(pos), :idx.shape[1]] = idx.masked_fill(val < 0, -1).int()
    return out


def useful_flops(S: int, H: int, D: int, window: int, ratio: int, topk: int | None) -> float:
    """Forward matmul FLOPs over the keys each query sees (2 matmuls x 2 H D per key)."""
    p = torch.arange(S, dtype=torch.float64)
    keys = (p + 1).clamp(max=window) + (((p + 1) // ratio).clamp(max=topk) if topk else (p + 1) // ratio)
    return 4 * H * D * keys.sum().item()


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def flash_layers(dtype: torch.dtype, tiles: dict, S: int = 4096):
    """One CSA and one HCA layer's forward + backward at Flash dims on meta tensors (for `record_launches`)."""
    from dsv4.kernels.sparse_attn_train import Tiles, sparse_attention_train

    H, D, window = FLASH["H"], FLASH["D"], FLASH["window"]
    for layer, ratio in FLASH["ratios"].items():
        topk = FLASH["topk"] if layer == "csa" else None
        meta = dict(device="meta", dtype=dtype, requires_grad=True)
        q, kv = torch.empty(1, S, H, D, **meta), torch.empty(1, S, D, **meta)
        comp = torch.empty(1, S // ratio, D, **meta)
        sink = torch.empty(H, device="meta", requires_grad=True)  # fp32, as the model keeps it
        tk = torch.empty(1, S, topk, device="meta", dtype=torch.int32) if topk else None
        out = sparse_attention_train(q, kv, torch.arange(S, device="meta"), comp, tk, ratio, sink, D ** -0.5,
                                     window, tiles=Tiles(**tiles))
        torch.autograd.grad(out, (q, kv, comp, sink), torch.empty_like(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--layers", nargs="+", default=["csa", "hca"], choices=["csa", "hca"])
    p.add_argument("--iters", type=int, default=None, help="timed runs per case (default 5; 1 with --dry)")
    p.add_argument("--tiles", action="append", default=None,
                   help="JSON of sparse_attn_train.Tiles fields; repeat to time several tile choices")
    p.add_argument("--no-reference", action="store_true", help="kernel only (the reference needs tens of GiB)")
    p.add_argument("--dry", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--sm90", action="store_true", help="compile for the H100 ahead of time: shared memory per kernel")
    p.add_argument("--spills", action="store_true", help="with --sm90: also ptxas's registers and spill bytes")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before importing them
    if args.sm90:
        os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, not the interpreter's
    from dsv4.attention import sparse_attention as reference
    from dsv4.kernels.sparse_attn_train import Tiles, sparse_attention_train

    dims = DRY if args.dry else FLASH
    iters = args.iters or (1 if args.dry else 5)
    device = "cpu" if args.dry else "cuda"
    tokens = args.tokens or ([32, 64] if args.dry else [4096, 16384])
    tile_sets = [json.loads(t) for t in (args.tiles or ["{}"])]
    H, D, window, dtype = dims["H"], dims["D"], dims["window"], dims["dtype"]
    out_file = open(args.out, "a") if args.out else None

    def emit(**rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out_file:
            out_file.write(line + "\n")

    if args.sm90:
        for tiles in tile_sets:
            for dt in (torch.bfloat16, torch.float32):
                for rec in compile_sm90(record_launches(lambda: flash_layers(dt, tiles)), args.spills):
                    emit(dtype=str(dt).removeprefix("torch."), tiles=tiles, **rec)
        return

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, iters):
        fn()  # warm-up (compiles)
        times = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    for S in tokens:
        for layer in args.layers:
            ratio = dims["ratios"][layer]
            topk = dims["topk"] if layer == "csa" else None
            gen = torch.Generator(device=device).manual_seed(S + ratio)
            N = S // ratio
            q = torch.randn(1, S, H, D, device=device, generator=gen).to(dtype).requires_grad_()
            kv = torch.randn(1, S, D, device=device, generator=gen).to(dtype).requires_grad_()
            comp = torch.randn(1, N, D, device=device, generator=gen).to(dtype).requires_grad_()
            sink = torch.randn(H, device=device, generator=gen).requires_grad_()
            pos = torch.arange(S, device=device)
            tk = random_topk(S, N, topk, ratio, device, gen) if topk else None
            do = torch.randn(1, S, H, D, device=device, generator=gen).to(dtype)
            leaves = (q, kv, comp, sink)
            flops = useful_flops(S, H, D, window, ratio, topk)
            # The reference first: each kernel line then carries its error against it.
            paths = ([] if args.no_reference else [("reference", None)]) + [("kernel", t) for t in tile_sets]
            ref = None
            for path, tiles in paths:
                if path == "kernel":
                    fn = lambda t=Tiles(**tiles): sparse_attention_train(q, kv, pos, comp, tk, ratio, sink, D ** -0.5,
                                                                        window, tiles=t)
                else:
                    fn = lambda: reference(q, kv, pos, comp, tk, ratio, sink, D ** -0.5, window)
                rec = dict(layer=layer, tokens=S, path=path, tiles=tiles, heads=H, head_dim=D, window=window,
                           ratio=ratio, topk=topk, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
                try:
                    with torch.no_grad():
                        rec["fwd_ms"] = timed(fn, iters)
                    rec["fwd_bwd_ms"] = timed(lambda: torch.autograd.grad(fn(), leaves, do, allow_unused=True), iters)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    got = (fn(),)
                    got = got + torch.autograd.grad(got[0], leaves, do, allow_unused=True)
                    if device == "cuda":
                        rec["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                    # backward: 5 matmuls (scores and dO.v again, dq, dk, dv) to the forward's 2
                    rec["tflops"] = {"fwd": flops / rec["fwd_ms"] / 1e9,
                                     "fwd_bwd": 3.5 * flops / rec["fwd_bwd_ms"] / 1e9}
                    if path == "reference":
                        ref = got
                    elif ref is not None:
                        names = ("out", "dq", "dwindow_kv", "dcompressed", "dsink")
                        rec["err"] = {n: rel_err(a, b) for n, a, b in zip(names, got, ref) if b is not None}
                    del got
                except torch.OutOfMemoryError:
                    rec["oom"] = True
                    torch.cuda.empty_cache()
                emit(**rec)
            del ref
            if device == "cuda":
                torch.cuda.empty_cache()
    if out_file:
        out_file.close()


if __name__ == "__main__":
    sys.exit(main())
