"""One Muon step over the matrices of the ~1.3B-parameter V4 of train_throughput.py, timed on its own.

    python benchmarks/muon_step.py                          # the Muon of this tree
    git show 96629fd^:dsv4/optim/muon.py > /tmp/muon_per_parameter.py
    python benchmarks/muon_step.py --muon /tmp/muon_per_parameter.py   # another muon.py, e.g. the per-parameter step

Why: profiled inside a training step, the per-parameter Muon took 1.87 s of host time for 0.33 s of GPU
work (~27,000 matmul launches). The parameter shapes are those of Muon's group (`split_param_groups`) of the
model built on the meta device, so both implementations see the same matrices; parameters, gradients
(random) and momentum buffers are fp32 on the GPU. Reports per step: `host_ms`, the time until `step()`
returns (launch cost), `wall_ms`, until the GPU is done (medians), and the kernel launches of one step.
`--preset tiny --device cpu` is a smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

from dsv4.config import Config, preset
from dsv4.model import Transformer
from dsv4.optim import split_param_groups
from train_throughput import MODEL  # noqa: E402 (benchmarks/ is the script's folder)


def load_muon(path: str | None) -> type:
    """The Muon class of this tree, or of the muon.py file at `path` (it imports only torch)."""
    if path is None:
        from dsv4.optim import Muon
        return Muon
    spec = importlib.util.spec_from_file_location("muon_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Muon


def muon_shapes(cfg: Config) -> list[torch.Size]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return [p.shape for _, p in split_param_groups(model)["muon"]]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_launches(opt: torch.optim.Optimizer, device: str) -> int | None:
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        sync(device)
    return sum(e.count for e in prof.key_averages()
               if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--muon", help="path of a muon.py to time instead of dsv4.optim.muon")
    p.add_argument("--preset", help="a dsv4 preset instead of the train_throughput model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    cfg = preset(args.preset) if args.preset else Config.from_dict({**preset("small").to_dict(), **MODEL})
    shapes = muon_shapes(cfg)
    gen = torch.Generator(args.device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=args.device, generator=gen) * 0.02) for s in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, device=args.device, generator=gen)
    opt = load_muon(args.muon)(params)
    for _ in range(args.warmup):
        opt.step()
    sync(args.device)
    host, wall = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - t0)
        sync(args.device)
        wall.append(time.perf_counter() - t0)
    matrices = sum(s[:-2].numel() for s in shapes)
    print(json.dumps({"muon": args.muon or "dsv4.optim.muon", "device": args.device,
                      "card": torch.cuda.get_device_name() if args.device == "cuda" else None,
                      "torch": torch.__version__, "parameters": len(shapes), "matrices": matrices,
                      "distinct_matrix_shapes": len({tuple(s[-2:]) for s in shapes}),
                      "numel": sum(s.numel() for s in shapes),
                      "host_ms": round(1e3 * statistics.median(host), 2),
                      "wall_ms": round(1e3 * statistics.median(wall), 2),
                      "kernel_launches": kernel_launches(opt, args.device)}))


if __name__ == "__main__":
    main()
