"""mHC maps (§2.2): the fused kernel (`dsv4/kernels/mhc_maps.py`) vs the unfused torch reference. One JSON line
per case.

    python benchmarks/mhc.py          # GPU: tokens 1, 64, 8192, 65536; n = 4, 20 Sinkhorn iterations
    python benchmarks/mhc.py --dry    # CPU smoke run: tiny shapes, kernel in Triton's interpreter

  maps   after the projection: `hc_maps_from_mixes` vs `hc_maps_fused`. `gbps` counts the fused kernel's
         one-pass traffic (mixes read, three maps written) for both, so the reference's figure is an
         effective rate.
  full   the whole `mhc.hc_maps` (RMS norm + fp32 projection + maps) on a bf16 stream of width n*d, three ways:
         ref (all torch), fused (torch norm + projection, fused maps: the model's path), and fold: the
         per-token 1/rms applied to the 24 projected numbers instead of the n*d inputs (linearity; the
         official inference code's order), so the normalised copy of the stream is never written. `gbps`
         counts one read of the bf16 stream. If fold wins on the H100, the seam should take the projection.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

H100_HBM_GBPS = 3350.0  # SXM5 datasheet


def emit(**rec):
    if rec.get("bytes"):
        rec["gbps"] = rec["bytes"] / rec["ms"] / 1e6
        if "H100" in rec["device"]:
            rec["hbm_util"] = rec["gbps"] / H100_HBM_GBPS
    print(json.dumps(rec), flush=True)


def bench(fn, dry: bool) -> float:
    """Median milliseconds: triton's do_bench on the GPU, a few wall-clock calls in the dry run."""
    if not dry:
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[1] * 1e3


def hc_maps_fold(x, fn, base, scale, *, sinkhorn_iters, hc_eps, norm_eps):
    """`mhc.hc_maps` with the RMS factor moved after the projection: F.linear(x / r, W) = F.linear(x, W) / r."""
    from dsv4.kernels.mhc_maps import hc_maps_fused
    flat = x.flatten(-2)
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=torch.float32).square()
                          / flat.shape[-1] + norm_eps)  # (B, S, 1): one read of the stream, no squared copy
    mixes = F.linear(flat.float(), fn) * inv_rms
    return hc_maps_fused(mixes, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps)


def max_err(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    ap.add_argument("--tokens", default="1,64,8192,65536", help="B*S per case")
    ap.add_argument("--hc", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=4096, help="d of the `full` cases (Flash: 4096)")
    ap.add_argument("--no-full", action="store_true", help="skip the norm + projection + maps cases")
    args = ap.parse_args(argv)
    if args.dry:
        args.tokens, args.hidden = "1,64", 16
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is imported
    from dsv4 import kernels
    from dsv4.kernels.mhc_maps import hc_maps_fused, hc_maps_train
    from dsv4.mhc import hc_maps, hc_maps_from_mixes

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.dry:
        raise SystemExit("no GPU: run with --dry for a CPU smoke run")
    n, iters, eps = args.hc, args.iters, 1e-6
    width = (2 + n) * n
    gen = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(width, device=dev, generator=gen)
    scale = torch.rand(3, device=dev, generator=gen) + 0.5
    kw = dict(sinkhorn_iters=iters, hc_eps=eps)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    for m in (int(t) for t in args.tokens.split(",")):
        mixes = torch.randn(1, m, width, device=dev, generator=gen) * 3
        ref = hc_maps_from_mixes(mixes, base, scale, **kw)
        err = max_err(hc_maps_fused(mixes, base, scale, **kw), ref)
        nbytes = m * (width + 2 * n + n * n) * 4
        common = dict(part="maps", tokens=m, n=n, iters=iters, device=device_name, bytes=nbytes)
        t_ref = bench(lambda: hc_maps_from_mixes(mixes, base, scale, **kw), args.dry)
        t_fused = bench(lambda: hc_maps_fused(mixes, base, scale, **kw), args.dry)
        emit(impl="reference", ms=t_ref, **common)
        emit(impl="fused", ms=t_fused, speedup=t_ref / t_fused, max_abs_err=err, **common)
        # Training: forward + backward of the maps, the reference's autograd vs the kernel's backward.
        leaves = [t.clone().requires_grad_() for t in (mixes, base, scale)]
        weights = [torch.randn_like(t) for t in ref]

        def train_step(fn):
            for t in leaves:
                t.grad = None
            sum((o * w).sum() for o, w in zip(fn(*leaves, **kw), weights)).backward()
            return [t.grad for t in leaves]
        grad_err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                       for a, b in zip(train_step(hc_maps_train), train_step(hc_maps_from_mixes)))
        t_ref = bench(lambda: train_step(hc_maps_from_mixes), args.dry)
        t_train = bench(lambda: train_step(hc_maps_train), args.dry)
        emit(impl="reference", ms=t_ref, **dict(common, part="maps fwd+bwd"))
        emit(impl="train_kernel", ms=t_train, speedup=t_ref / t_train, max_rel_grad_err=grad_err,
             **dict(common, part="maps fwd+bwd"))
        if args.no_full:
            continue
        del mixes, ref
        x = torch.randn(1, m, n, args.hidden, device=dev, generator=gen).to(torch.bfloat16)
        fn = torch.randn(width, n * args.hidden, device=dev, generator=gen) * (n * args.hidden) ** -0.5
        full = dict(kw, norm_eps=eps)
        with torch.no_grad():
            with kernels.use("reference"):
                ref = hc_maps(x, fn, base, scale, **full)
                t_ref = bench(lambda: hc_maps(x, fn, base, scale, **full), args.dry)
            with kernels.use("triton"):
                err_fused = max_err(hc_maps(x, fn, base, scale, **full), ref)
                t_fused = bench(lambda: hc_maps(x, fn, base, scale, **full), args.dry)
            err_fold = max_err(hc_maps_fold(x, fn, base, scale, **full), ref)
            t_fold = bench(lambda: hc_maps_fold(x, fn, base, scale, **full), args.dry)
        common = dict(part="full", tokens=m, n=n, d=args.hidden, iters=iters, device=device_name, bytes=x.nbytes)
        emit(impl="reference", ms=t_ref, **common)
        emit(impl="fused", ms=t_fused, speedup=t_ref / t_fused, max_abs_err=err_fused, **common)
        emit(impl="fold", ms=t_fold, speedup=t_ref / t_fold, max_abs_err=err_fold, **common)
        del x, fn, ref


if __name__ == "__main__":
    main()
