"""The decode attention kernel's instruction budget, with no GPU: every variant of
`decode_attn.attend_decode` (benchmarks/tune_decode.py's list) built ahead of time for the H100
(sm_90a, `sm90.py`) at Flash dims and 1M context, batch 1, FP8 paged records. One JSON line per (op, variant):
  registers, spill_bytes, shared     what ptxas and Triton report for the partial kernel
  loop_instructions, loop_mma        one iteration of the compressed-key loop, per warp (static SASS counts;
                                     mma: HMMA + HGMMA, the tensor-core instructions)
  per_key                            warp-instructions per key for all 64 heads: loop x warps x head blocks / keys
                                     per iteration (the window loop and the merge kernel are left out)
Why: at 1M the HCA partial kernel ran 30 us for 4.8 MB, about 160 GB/s; its instruction count per key, not its
bytes, is what these figures show. They are static counts, not timings: tune_decode.py times the same variants.
The indexer's score kernel ("indexer") is built over the key pool's two layouts: 128-byte payload rows with the
scales apart ("planes", the pool's since session 4) and one 132-byte record per key ("records").
Usage (repo root): PYTHONPATH=$PWD python benchmarks/decode_sass.py [--ops hca,csa,indexer] [--variants default,bn16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import D, DI, H, HI, RD, TOPK, WIN, as_records  # noqa: E402 (Flash dims, as the timed benchmarks use them)
from sm90 import compile_sm90, record_launches  # noqa: E402
from tune_decode import ATTN_VARIANTS, CSA_SKIP  # noqa: E402

from dsv4.kernels import decode_attn, fp8_kv, indexer_decode  # noqa: E402
from dsv4.kernels.sparse_attn import KVSource  # noqa: E402

CTX = 1 << 20
CHUNK = 128  # keys per split, as the H100's default gives at 1M (about 2 programs per SM)


def meta_pool(n: int, block: int = 64) -> KVSource:
    """n FP8 records in a paged pool, on the meta device (shapes, strides and alignment only)."""
    rec = torch.empty(-(-n // block) * block, fp8_kv.record_bytes(D, RD), dtype=torch.uint8, device="meta")
    nope, rope, scale = fp8_kv.views(rec, D, RD)
    table = torch.empty(1, -(-n // block), dtype=torch.int32, device="meta")
    return KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=block)


def launch(ratio: int, **kw) -> None:
    """One decode call at 1M, batch 1, through the real launcher (recorded, not run)."""
    meta = dict(device="meta")
    n = CTX // ratio
    q = torch.empty(1, 1, H, D, dtype=torch.bfloat16, **meta)
    ints = torch.empty(1, dtype=torch.int32, **meta)
    topk = torch.empty(1, 1, TOPK, dtype=torch.int32, **meta) if ratio == 4 else None
    decode_attn.attend_decode(q, torch.empty(1, 1, dtype=torch.int32, **meta), torch.empty(H, **meta), D ** -0.5,
                              WIN, meta_pool(WIN), ints, ints, win_ring=WIN, comp=meta_pool(n), n_comp=ints,
                              max_comp=n, topk=topk, ratio=ratio, rope_dim=RD, **({"chunk": CHUNK} | kw))



def analyse(op: str, name: str, kw: dict) -> dict:
    ratio = 128 if op == "hca" else 4
    launches = [x for x in record_launches(lambda: launch(ratio, **kw), decode_attn) if x[0].__name__ == "_partial_kernel"]
    rec = compile_sm90(launches, spills=True, sass=True)[0]
    c = rec["constexprs"]
    loop = rec["loops"][-1]  # the compressed-key loop comes after the window's
    heads_blocks = -(-H // c["BLOCK_H"]) * c["VS"]
    return dict(op=op, variant=name, kwargs=kw, registers=rec["registers"], spill_bytes=rec["spill_bytes"],
                shared=rec["shared"], num_warps=rec["num_warps"], loop_instructions=loop["instructions"],
                loop_mma=loop["mma"], per_key=round(loop["instructions"] * rec["num_warps"] * heads_blocks / c["BLOCK_N"]),
                loop_ops=loop["ops"])


def index_keys(n: int, layout: str, block: int = 64) -> indexer_decode.KeySource:
    """n FP8 indexer keys on the meta device: the pool's two planes (128-byte payload rows + fp32 scales) or
    one 132-byte record per key (`attention.as_records`, the layout before session 4)."""
    rows, meta = -(-n // block) * block, dict(device="meta")
    planes = indexer_decode.KeySource(main=torch.empty(rows, DI, dtype=torch.float8_e4m3fn, **meta),
                                      table=torch.empty(1, rows // block, dtype=torch.int32, **meta), block_size=block,
                                      scale=torch.empty(rows, **meta))
    return planes if layout == "planes" else as_records(planes)


def analyse_indexer(layout: str, kw: dict) -> dict:
    """The indexer's score kernel at 1M (ctx / 4 keys), batch 1: its key loop per key."""
    n, meta = CTX // 4, dict(device="meta")
    ints = torch.empty(1, dtype=torch.int32, **meta)
    run = lambda: indexer_decode.indexer_topk_decode(  # noqa: E731
        torch.empty(1, HI, DI, dtype=torch.bfloat16, **meta), torch.empty(1, HI, **meta), index_keys(n, layout),
        ints, ints, 4, TOPK, n, tile=1024, ws=torch.empty(2, dtype=torch.int32, **meta), **kw)
    launches = [x for x in record_launches(run, indexer_decode) if x[0].__name__ == "_score_kernel"]
    rec = compile_sm90(launches, spills=True, sass=True)[0]
    loop = rec["loops"][-1]
    return dict(op="indexer_score", layout=layout, kwargs=kw, registers=rec["registers"], spill_bytes=rec["spill_bytes"],
                shared=rec["shared"], num_warps=rec["num_warps"], kalign=rec["constexprs"]["KALIGN"],
                loop_instructions=loop["instructions"], loop_mma=loop["mma"],
                per_key=round(loop["instructions"] * rec["num_warps"] / rec["constexprs"]["BLOCK_N"], 1),
                loop_ops=loop["ops"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="hca,csa,indexer")
    ap.add_argument("--variants", default=",".join(ATTN_VARIANTS))
    args = ap.parse_args()
    os.environ["TRITON_INTERPRET"] = "0"  # compile, whatever the shell says
    if "indexer" in args.ops.split(","):
        for layout in ("planes", "records"):
            for kw in ({}, dict(block_n=64, contiguous_blocks=True)):
                print(json.dumps(analyse_indexer(layout, kw)), flush=True)
    for op in (o for o in args.ops.split(",") if o != "indexer"):
        for name in args.variants.split(","):
            if op == "csa" and name in CSA_SKIP:
                continue
            try:
                print(json.dumps(analyse(op, name, ATTN_VARIANTS[name])), flush=True)
            except Exception as e:  # a variant that does not build is a result too
                print(json.dumps(dict(op=op, variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")), flush=True)


if __name__ == "__main__":
    main()
