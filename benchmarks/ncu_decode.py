"""Where the 1M-context decode kernels spend their time, read off the hardware counters (Nsight Compute).

The timing benchmarks (`attention.py`, `tune_decode.py`) say how long each decode kernel takes; this says why:
per kernel launch, the speed-of-light fractions (DRAM, L2, SM), achieved occupancy, issue-slot use and the
warp stall reasons. Each case below runs its op `--reps` times on the same random 1M-context inputs as
`attention.py` (the first call compiles; every launch is a profiled kernel). Run it under ncu, e.g.

  ncu --clock-control none --cache-control none -k regex:'_partial|_merge|_score|_collect|_rank' \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section LaunchStats --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      --csv --page details python benchmarks/ncu_decode.py > ncu.csv
  python benchmarks/ncu_decode.py --summarise ncu.csv       # one JSON line per kernel and case

`--clock-control none` leaves the card's clocks as they are (device METHOD.md). Per-instruction stall samples:
add `--section SourceCounters -o rep`, then `ncu -i rep.ncu-rep --csv --page source --print-source sass`.
Session 5's H200 summary is `results/ncu_decode_1m_h200_session5.jsonl`. Without ncu the script just runs the
cases (a smoke test of the inputs)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Metrics kept in the summary (ncu's names in the `details` page), shortened.
KEEP = {
    "Duration": "us",
    "DRAM Throughput": "dram_pct",
    "L2 Cache Throughput": "l2_pct",
    "Compute (SM) Throughput": "sm_pct",
    "Achieved Occupancy": "occupancy_pct",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Registers Per Thread": "registers",
    "Grid Size": "grid",
    "Block Size": "block",
    "Issue Slots Busy": "issue_busy_pct",
    "No Eligible": "no_eligible_pct",
    "Active Warps Per Scheduler": "warps_per_scheduler",
    "Eligible Warps Per Scheduler": "eligible_per_scheduler",
    "Warp Cycles Per Issued Instruction": "cycles_per_issue",
    "Dynamic Shared Memory Per Block": "smem_dyn",
}


def cases(ctx: int):
    from attention import attn_fn, decode_inputs, indexer_fn
    x = decode_inputs(ctx, 1)
    return {"hca": attn_fn(x, ctx, 128), "hca_bn16": attn_fn(x, ctx, 128, block_n=16),
            "csa": attn_fn(x, ctx, 4), "indexer": indexer_fn(x, ctx),
            "indexer_contig64": indexer_fn(x, ctx, block_n=64, contiguous_blocks=True)}


def run(ctx: int, reps: int, only: list[str]):
    import torch
    for name, fn in cases(ctx).items():
        if only and name not in only:
            continue
        torch.cuda.nvtx.range_push(name)
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(json.dumps({"case": name, "ran": reps}), flush=True)


def summarise(path: str):
    """ncu's `--csv --page details` -> one line per launch, in launch order (the cases in `cases` order, each
    `--reps` times): the KEEP metrics and the six largest stall reasons (cycles per issued instruction)."""
    rows = defaultdict(dict)
    stalls = defaultdict(dict)
    names = {}
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for r in csv.DictReader(lines):
        lid = int(r["ID"])
        names[lid] = r["Kernel Name"].split("(")[0]
        metric, value = r["Metric Name"], r["Metric Value"].replace(",", "")
        if metric == "Duration":  # ncu picks the unit (ns, us, ms)
            value = round(float(value) * {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                                          "nsecond": 1e-3}[r["Metric Unit"]], 2)
        if metric in KEEP:
            rows[lid][KEEP[metric]] = value
        if "stall" in metric.lower():
            stalls[lid][metric] = value
    for lid in sorted(rows):
        rec = {"launch": lid, "kernel": names[lid], **rows[lid]}
        top = sorted(((k, float(v)) for k, v in stalls[lid].items() if v.replace(".", "", 1).isdigit()),
                     key=lambda kv: -kv[1])[:6]
        if top:
            rec["stalls"] = dict(top)
        print(json.dumps(rec))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=1 << 20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated cases (default: all)")
    ap.add_argument("--summarise", default="", help="an ncu --csv --page details file to summarise instead")
    a = ap.parse_args(argv)
    only = [c for c in a.only.split(",") if c]
    if a.summarise:
        summarise(a.summarise)
    else:
        run(a.ctx, a.reps, only)


if __name__ == "__main__":
    main()
