"""Decode-kernel variants at long context (Flash dims, FP8 paged records): today's defaults and every selectable
variant of `decode_attn.attend_decode` (HCA, CSA) and `indexer_decode.indexer_topk_decode`, each timed as CUDA-graph
replays (`timing.bench_graph`) and checked against the defaults' output of the same inputs. One JSON line per case:
  {"op": "hca" | "csa" | "indexer", "ctx", "batch", "variant", "kwargs", "us", "speedup" (vs "default"),
   "rel_err" (attention, vs default) | "same_indices" (indexer, exact), or "error" when a variant does not build}.
The default runs first in each group, so its line carries the baseline of the lines below it.
Usage (repo root, PYTHONPATH=$PWD):
  python benchmarks/tune_decode.py [--ctx 1M,128K] [--batch 1,8] [--ops hca,csa,indexer] [--variants a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import attn_fn, decode_inputs, indexer_fn, rel_err  # noqa: E402 (benchmarks/ is the script's folder)
from timing import bench_graph  # noqa: E402

from dsv4.analysis import parse_context  # noqa: E402

# Variants (kwargs on top of the defaults). RESULTS.md "Decode kernels v2": the 16-head x 32-key tile is
# the best of the old sweep; 64-head tiles lost to register pressure (full 512-dim accumulators), which
# value_split removes (a (64, 512 / vs) accumulator); qk_groups keeps neither q nor a dequantised key for QK.
ATTN_VARIANTS = {
    "default": {},
    # Session 5: the default now keeps the dequantised key's layout change on 16-bit data (`_keep_layout`);
    # this is the kernel before (FP8 bytes read from shared memory one at a time, in both operand layouts).
    "fp8_bytes_layout": dict(keep_layout=False),
    "bn16": dict(block_n=16),  # no spills with keep_layout (offline sm_90: 778 warp-instructions per key)
    "chunk256": dict(chunk=256),  # fewer splits: half the partial state to write and merge
    "bn16_chunk256": dict(block_n=16, chunk=256),
    "contiguous_blocks": dict(contiguous_blocks=True),
    "more_splits_chunk64": dict(chunk=64),
    "more_splits_chunk32": dict(chunk=32),
    "qk_groups": dict(qk_groups=True),
    "vs2": dict(value_split=2),
    "vs2_qk_groups": dict(value_split=2, qk_groups=True),
    "h32_vs2_qk_groups": dict(block_h=32, value_split=2, qk_groups=True),
    "h64_vs4_qk_groups": dict(block_h=64, value_split=4, qk_groups=True),
    "h64_vs4_qk_groups_8warps": dict(block_h=64, value_split=4, qk_groups=True, num_warps=8),
    "h64_vs8_qk_groups": dict(block_h=64, value_split=8, qk_groups=True),
    "h64_vs4": dict(block_h=64, value_split=4),
    "h64_vs4_qk_groups_chunk64": dict(block_h=64, value_split=4, qk_groups=True, chunk=64),
    "h64_vs4_qk_groups_bn16": dict(block_h=64, value_split=4, qk_groups=True, block_n=16),
    # Session 4's `grouped` step (no dequantised key: fp16 E4M3 groups, scales on the products) was removed in
    # session 5: it tied the default at best before `_keep_layout` and lost 1.4x after (RESULTS.md "Session 5").
    # Every head in one 8-warp program, no value split (session 5): the matmuls become Hopper warpgroup MMAs whose
    # key operand is read from shared memory as bf16, so the key is dequantised once for all heads; the default
    # (mma.sync) instead reads the FP8 bytes one at a time from shared memory in both operand layouts (ncu, H200:
    # LDS.U8 and the byte packing around it hold ~35 % of its stall samples). Offline sm_90: 366 warp-instructions
    # per key vs 1,018, 440 B spilled; the split state per program is 64 x 512 fp32, so fewer, longer splits.
    "h64_8warps": dict(block_h=64, num_warps=8),
    "h64_8warps_chunk64": dict(block_h=64, num_warps=8, chunk=64),
    "h64_8warps_chunk128": dict(block_h=64, num_warps=8, chunk=128),
    "h64_8warps_bn16_chunk64": dict(block_h=64, num_warps=8, block_n=16, chunk=64),
}
CSA_SKIP = {"contiguous_blocks", "more_splits_chunk64", "more_splits_chunk32", "h64_vs4_qk_groups_chunk64",
            "h64_8warps_chunk128", "chunk256", "bn16_chunk256"}
INDEXER_VARIANTS = {  # the key pool's blocks are 64 keys: contiguous_blocks needs block_n <= 64
    "default": {},
    "records_132B": dict(key_layout="records"),  # the key pool's layout before session 4 (4-byte aligned rows)
    "bn64": dict(block_n=64),
    "bn64_contiguous": dict(block_n=64, contiguous_blocks=True),
    "tile512": dict(tile=512),
    "tile256": dict(tile=256),
    "bn64_tile512_contiguous": dict(block_n=64, tile=512, contiguous_blocks=True),
    "bn64_tile256_contiguous": dict(block_n=64, tile=256, contiguous_blocks=True),
    "bn64_stages3_contiguous": dict(block_n=64, num_stages=3, contiguous_blocks=True),
    # Session 5's default scores FP8 keys in fp16 (no f16 -> bf16 conversion per value); this is the bf16 path.
    "bf16_dot": dict(f16_dot=False),
    "fp8_bytes_layout": dict(keep_layout=False),  # before `_keep_layout` (see ATTN_VARIANTS)
    "bn64_contiguous_tile512": dict(block_n=64, tile=512, contiguous_blocks=True),
    "warps8": dict(num_warps=8),
    "warps8_tile512": dict(num_warps=8, tile=512),
    # Each collect program derives the candidate bound itself (radix select over ~2k group maxima): fewer of them
    # repeat it less (ncu, H200: collect ~11 us, SM-busy 42 %, for 256 programs scanning 1,024 scores each).
    "collect_tile4096": dict(collect_tile=4096),
    "collect_tile16384": dict(collect_tile=16384),
    "tile512_collect_tile4096": dict(tile=512, collect_tile=4096),
    "rank_rows64": dict(rank_rows=64),  # a quarter of the rank programs (most of the 1,024 find no candidates)
    "collect_tile4096_rank_rows64": dict(collect_tile=4096, rank_rows=64),
}


def emit(**rec):
    print(json.dumps(rec), flush=True)


def run_group(op, ctx, batch, variants, make_fn, compare):
    """Time each variant's step; compare(out, base_out) -> a dict of agreement fields."""
    base = base_us = None
    for name, kw in variants.items():
        rec = dict(op=op, ctx=ctx, batch=batch, variant=name, kwargs=kw)
        try:
            fn = make_fn(kw)
            out = fn().clone()
            us = bench_graph(fn) * 1e3
        except Exception as e:  # a variant that does not build (e.g. out of shared memory) is a result too
            emit(**rec, error=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        if base is None:
            base, base_us = out, us
        emit(**rec, us=round(us, 2), speedup=round(base_us / us, 3), **compare(out, base))


def attn_agreement(out, base):
    return dict(rel_err=rel_err(out, base))


def index_agreement(out, base):
    return dict(same_indices=bool(torch.equal(out, base)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", default="1M,128K")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--ops", default="hca,csa,indexer")
    ap.add_argument("--variants", default="", help="comma-separated variant names to time (default: all; the "
                    "default always runs first, as the baseline)")
    args = ap.parse_args()
    keep = {"default", *args.variants.split(",")} if args.variants else None
    attn, indexer = ({k: v for k, v in table.items() if keep is None or k in keep}
                     for table in (ATTN_VARIANTS, INDEXER_VARIANTS))
    ops = args.ops.split(",")
    for ctx in (parse_context(c) for c in args.ctx.split(",")):
        for batch in (int(b) for b in args.batch.split(",")):
            x = decode_inputs(ctx, batch)
            if "hca" in ops:
                run_group("hca", ctx, batch, attn, lambda kw: attn_fn(x, ctx, 128, **kw), attn_agreement)
            if "csa" in ops:
                csa = {k: v for k, v in attn.items() if k not in CSA_SKIP}
                run_group("csa", ctx, batch, csa, lambda kw: attn_fn(x, ctx, 4, **kw), attn_agreement)
            if "indexer" in ops:
                run_group("indexer", ctx, batch, indexer, lambda kw: indexer_fn(x, ctx, **kw),
                          index_agreement)
            del x
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
