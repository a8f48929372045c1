"""Fused compressor tail (`dsv4/kernels/compress.py`: slot softmax + pooling + RMSNorm + RoPE + FP8 record
insert, one launch) vs the unfused torch path (`compress.reference`, then `fp8_kv.pack(quantize(...))` into
the pool rows as `PagedKVCache.write_entries` does), Flash dims (head dim 512, RoPE 64, bf16). The kv / gate
projections are the same torch GEMMs for both and are left out. One JSON line per case.

Cases
  csa_prefill       8,192 tokens -> 2,048 CSA entries (m = 4, two series: width 1024), overlap rows carried
                    in, records inserted
  csa_prefill_noins the same without the insert (entries only)
  hca_prefill       8,192 tokens -> 64 HCA entries (m = 128), records inserted; hca_prefill_b8: 8 sequences
  indexer_prefill   the indexer's compressor: 8,192 tokens -> 2,048 keys of 128 dims (its keys are not 584-B
                    records: no insert)
  csa_decode        64 sequences each finishing one CSA block (fp32 overlap rows from the state pool, each row
                    at its own entry index), records inserted; hca_decode: the same for HCA
Bytes counted: kv + gate read, overlap rows read, entries written, records written. Times are medians of
`triton.testing.do_bench`; decode cases also as CUDA-graph replays (as an engine runs them; eager decode is
launch-bound). `--dry` runs tiny shapes on CPU in Triton's interpreter (a smoke test; its times mean nothing).
Usage: python benchmarks/compress.py [--cases csa_prefill,hca_decode] [--dry]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--dry" in sys.argv:  # the interpreter must be chosen before triton's kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton

from dsv4.kernels import compress as C
from dsv4.kernels import fp8_kv
from timing import bench_graph  # noqa: E402 (benchmarks/ is the script's folder)

H100_PEAK_GBPS = 3350.0  # SXM5 HBM3 datasheet

# name: (B, tokens per sequence, m, D, rope, CSA, carried overlap rows, insert records, decode)
CASES = {
    "csa_prefill": (1, 8192, 4, 512, 64, True, True, True, False),
    "csa_prefill_noins": (1, 8192, 4, 512, 64, True, True, False, False),
    "hca_prefill": (1, 8192, 128, 512, 64, False, False, True, False),
    "hca_prefill_b8": (8, 8192, 128, 512, 64, False, False, True, False),
    "indexer_prefill": (1, 8192, 4, 128, 64, True, True, False, False),
    "csa_decode": (64, 4, 4, 512, 64, True, True, True, True),
    "hca_decode": (64, 128, 128, 512, 64, False, False, True, True),
}
DRY = {  # the same cases, tiny: D 64 (indexer 32), RoPE 16, a few blocks, 4 decode rows
    "csa_prefill": (1, 32, 4, 64, 16, True, True, True, False),
    "csa_prefill_noins": (1, 32, 4, 64, 16, True, True, False, False),
    "hca_prefill": (1, 256, 128, 64, 16, False, False, True, False),
    "hca_prefill_b8": (2, 256, 128, 64, 16, False, False, True, False),
    "indexer_prefill": (1, 32, 4, 32, 16, True, True, False, False),
    "csa_decode": (4, 4, 4, 64, 16, True, True, True, True),
    "hca_decode": (4, 128, 128, 64, 16, False, False, True, True),
}


def setup(B, tokens, m, D, rope, csa, prev, insert, decode, device, dtype):
    """Random projections of the right shapes, a records pool with shuffled rows, entry indices."""
    gen = torch.Generator().manual_seed(0)
    n, width = tokens // m, (2 * D if csa else D)
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    kv, gate = randn(B, n, m, width).to(dtype), randn(B, n, m, width).to(dtype)
    okv = og = None
    if prev:  # carried series-a rows: fp32 state, kv cast to the model dtype (as `dsv4.paged` hands them over)
        okv, og = randn(B, m, D).to(dtype), randn(B, m, D)
    first = torch.randint(1, 250_000, (B, 1), generator=gen) if decode else 1000  # ~1M-token context
    inputs = [kv, gate, randn(m, width), okv, og, 1 + 0.1 * randn(D), 1e-6,
              1.0 / (10000 ** (torch.arange(0, rope, 2).float() / rope))]
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
    first = first.to(device) if isinstance(first, torch.Tensor) else first
    records = rows = None
    if insert:
        records = torch.zeros(2 * B * n, fp8_kv.record_bytes(D, rope), dtype=torch.uint8, device=device)
        rows = torch.randperm(2 * B * n, generator=gen)[:B * n].view(B, n).to(device)
    return inputs, first, records, rows


def unfused(inputs, first, records, rows):
    """Today's path: the reference pooling, then quantise + pack + scatter into the pool rows."""
    entries = C.reference(*inputs, first)
    if records is not None:
        rope = 2 * inputs[7].numel()
        records[rows.reshape(-1)] = fp8_kv.pack(*fp8_kv.quantize(entries.reshape(-1, entries.shape[-1]), rope))
    return entries


def moved_bytes(inputs, records, rows, out):
    kv, gate, _, okv, og = inputs[:5]
    total = sum(t.numel() * t.element_size() for t in (kv, gate, okv, og, out) if t is not None)
    return total + (rows.numel() * records.shape[1] if records is not None else 0)


def timed(fn, dry):
    if dry:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def run_case(name, spec, device, dtype, dry):
    B, tokens, m, D, rope, csa, prev, insert, decode = spec
    inputs, first, records, rows = setup(*spec, device, dtype)
    ref_records = None if records is None else records.clone()
    fused = lambda: C.compress_blocks(*inputs, first, records=records, rows=rows)  # noqa: E731
    plain = lambda: unfused(inputs, first, ref_records, rows)  # noqa: E731
    out, ref = fused(), plain()
    rec = dict(case=name, device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               dtype=str(dtype).removeprefix("torch."), B=B, entries_per_seq=tokens // m, ratio=m, head_dim=D,
               rope_dim=rope, insert=insert,
               rel_err=((out.float() - ref.float()).norm() / ref.float().norm()).item())
    if records is not None:  # bytes of the fused insert == quantise + pack of the kernel's own entries
        want = fp8_kv.pack(*fp8_kv.quantize(out.reshape(-1, D), rope))
        rec["records_identical"] = bool(torch.equal(records[rows.reshape(-1)], want))
    nbytes = moved_bytes(inputs, records, rows, out)
    rec["bytes"] = nbytes
    rec["ms_fused"], rec["ms_unfused"] = timed(fused, dry), timed(plain, dry)
    if decode and not dry:
        rec["ms_fused_graph"], rec["ms_unfused_graph"] = bench_graph(fused), bench_graph(plain)
    for key in [k for k in rec if k.startswith("ms_")]:
        rec[key.replace("ms_", "gbps_")] = nbytes / rec[key] / 1e6
    rec["speedup"] = rec["ms_unfused"] / rec["ms_fused"]
    if "ms_fused_graph" in rec:
        rec["speedup_graph"] = rec["ms_unfused_graph"] / rec["ms_fused_graph"]
    if not dry:
        rec["hbm_util_fused"] = rec["gbps_fused"] / H100_PEAK_GBPS
    print(json.dumps(rec), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --dry for the CPU smoke test)")
    table = DRY if args.dry else CASES
    device, dtype = ("cpu", torch.float32) if args.dry else ("cuda", torch.bfloat16)
    for name in args.cases.split(","):
        if name not in table:
            sys.exit(f"unknown case {name!r}; choose from {', '.join(table)}")
        with torch.no_grad():
            run_case(name, table[name], device, dtype, args.dry)


if __name__ == "__main__":
    main()
