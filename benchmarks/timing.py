"""GPU timing helpers shared by the benchmarks (one place for how we time kernels)."""

from __future__ import annotations

import torch


def bench(fn, ms: int = 200) -> float:
    """Median milliseconds of `fn` (eager launches, triton's do_bench: warm-up, cache flush between reps)."""
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=ms, return_mode="median")


def bench_graph(fn, reps: int = 50) -> float:
    """Median milliseconds of one `fn` replayed from a CUDA graph of `reps` calls. Decode steps are
    launch-bound in eager mode; a serving engine runs them as graphs, so that is what we time."""
    import triton
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(g.replay, warmup=5, rep=200, return_mode="median") / reps
