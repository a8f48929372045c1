"""The trainable core attention (dsv4/kernels/sparse_attn_train.py) vs the reference's autograd: the output
and all four gradients (q, window_kv, compressed, sink), CSA / HCA / window only, on tiny shapes.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) in fp32, where kernel and reference
agree to rounding: relative L2 error < 1e-5 per tensor (measured < 1e-6). On a GPU they run in bf16
against the fp32 reference: < 2e-2. The sink stays fp32 on both, as the model keeps it.

`test_kernels_fit_sm90` needs neither: it compiles every launch ahead of time for the H100 and checks its
shared memory against the card's limit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4 import kernels
from dsv4.attention import sparse_attention as reference
from tests.conftest import DEVICE, needs_kernels, random_topk

runs_kernels = needs_kernels

if kernels.triton_available():
    from dsv4.kernels import sparse_attn_train as sat

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = 2e-2 if DTYPE == torch.bfloat16 else 1e-5


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def picks(gen, B, S, k, visible, holes=0.0):
    """`random_topk` with holes; few entries and many queries, so queries pick the same entries."""
    return random_topk(gen, B, S, None, k, visible, holes)


# (B, S, H, D, cached, N, k, ratio, window, tiles): S queries after `cached` window rows; k None = HCA,
# N 0 = window only.
CASES = {
    # 13 queries: not a multiple of any tile; holes; 9 entries over 26 query rows: shared picks
    "csa_holes_shared_picks": (2, 13, 4, 32, 3, 9, 5, 4, 8, {}),
    "csa_topk_gt_entries": (1, 6, 4, 32, 5, 3, 7, 4, 8, {}),
    # Flash's 64 heads x 512 dims with bf16's default tiles (fp32's are smaller): 32-column chunks, two
    # 256-column output programs
    "csa_flash_dims": (1, 16, 64, 512, 2, 5, 4, 4, 12, dict(block_h=64, block_n=32, block_m=64, d_in=32, d_out=256)),
    # D chunked: 4 contraction chunks, 2 output-column programs, (query, head) tiles across queries;
    # 20 heads in blocks of 16: two programs per query add into the same picked entries
    "csa_d_tiled_head_blocks": (1, 7, 20, 64, 4, 6, 4, 2, 6, dict(d_in=16, d_out=32, block_m=16, block_h=16)),
    "hca_batch2_cached": (2, 11, 3, 32, 7, 5, None, 4, 8, {}),
    "hca_query_splits": (1, 16, 2, 48, 0, 7, None, 2, 5, dict(q_split=3, d_in=16, d_out=32)),
    "window_only_cached": (1, 9, 4, 48, 2, 0, None, 4, 8, {}),
    "window_longer_than_tile": (1, 30, 2, 16, 9, 0, None, 4, 20, {}),
}


def make_inputs(case):
    B, S, H, D, cached, N, k, ratio, window, _ = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    L = cached + S
    # queries end where the entries fit: the last query sees N finished entries (N * ratio <= pos + 1)
    positions = torch.arange(ratio * N + 3 - S, ratio * N + 3) if N else torch.arange(cached, L)
    q = torch.randn(B, S, H, D, generator=gen)
    window_kv = torch.randn(B, L, D, generator=gen)
    compressed = torch.randn(B, N, D, generator=gen) if N else None
    topk = picks(gen, B, S, k, ((positions + 1) // ratio).clamp(max=N), holes=0.2) if k else None
    sink = torch.randn(H, generator=gen)
    weight = torch.randn(B, S, H, D, generator=gen)  # loss = <out, weight>: a generic upstream gradient
    return (q, window_kv, positions, compressed, topk, ratio, sink, D ** -0.5, window), weight


def on_device(args, device=DEVICE, dtype=DTYPE):
    """The test's dtype for q, window_kv and compressed; the sink (argument 6) stays fp32."""
    return [a.to(device, dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and i != 6 else
            a.to(device) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]


def grads(fn, args, weight):
    leaves = [a.clone().requires_grad_() if i in (0, 1, 3, 6) and a is not None else a for i, a in enumerate(args)]
    out = fn(*leaves)
    (out.float() * weight).sum().backward()
    return [out] + [leaves[i].grad for i in (0, 1, 3, 6) if leaves[i] is not None]


@runs_kernels
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case):
    args, weight = make_inputs(case)
    if case.startswith("csa"):
        assert (args[4] < 0).any()
        picked = args[4][args[4] >= 0]
        assert picked.unique().numel() < picked.numel()  # several queries pick the same entry
    ref = grads(reference, args, weight)
    tiles = sat.Tiles(**CASES[case][-1])
    out = grads(lambda *a: sat.sparse_attention_train(*a, tiles=tiles), on_device(args), weight.to(DEVICE))
    names = ["out", "dq", "dwindow_kv"] + (["dcompressed"] if args[3] is not None else []) + ["dsink"]
    for name, o, r in zip(names, out, ref):
        assert o.shape == r.shape and o.dtype == (torch.float32 if name == "dsink" else DTYPE), name
        assert not o.isnan().any(), name
        assert rel_err(o.cpu(), r) < TOL, (name, rel_err(o.cpu(), r))


@runs_kernels
def test_only_some_inputs_need_grad():
    """Detached compressed entries and sink (the CSA atomics are skipped): q and window_kv gradients unchanged."""
    args, weight = make_inputs("csa_holes_shared_picks")
    q, kv = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
    (reference(q, kv, *args[2:]).float() * weight).sum().backward()
    dev = on_device(args)
    q2, kv2 = dev[0].requires_grad_(), dev[1].requires_grad_()
    (sat.sparse_attention_train(q2, kv2, *dev[2:]).float() * weight.to(DEVICE)).sum().backward()
    assert rel_err(q2.grad.cpu(), q.grad) < TOL and rel_err(kv2.grad.cpu(), kv.grad) < TOL


@runs_kernels
def test_seam_trains_through_the_kernel(monkeypatch):
    """While autograd records, the seam takes the trainable kernel on the Triton path (the default); not when
    it is switched off (`use_train_kernel(False)`, DSV4_TRAIN_KERNEL=0), not without autograd (the forward-only
    kernel) nor under the FP8 KV simulation (kept on the reference)."""
    calls = []
    real = sat.sparse_attention_train
    monkeypatch.setattr(sat, "sparse_attention_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("DSV4_TRAIN_KERNEL", raising=False)
    args, weight = make_inputs("hca_batch2_cached")
    args = on_device(args)
    with kernels.use("triton"), kernels.use_train_kernel(False):
        grads(kernels.sparse_attention, args, weight.to(DEVICE))
        assert not calls  # switched off
    monkeypatch.setenv("DSV4_TRAIN_KERNEL", "0")
    with kernels.use("triton"):
        grads(kernels.sparse_attention, args, weight.to(DEVICE))
        assert not calls  # switched off by the environment
    monkeypatch.delenv("DSV4_TRAIN_KERNEL")
    with kernels.use("triton"):
        ours = grads(kernels.sparse_attention, args, weight.to(DEVICE))
        assert len(calls) == 1  # on by default
        with torch.no_grad():
            kernels.sparse_attention(*args)  # inference: the forward-only kernel
        assert len(calls) == 1
        with kernels.simulate_fp8_kv():
            grads(lambda *a: kernels.sparse_attention(*a, rope_dim=8), args, weight.to(DEVICE))
        assert len(calls) == 1
    with kernels.use("reference"):
        ref = grads(kernels.sparse_attention, args, weight.to(DEVICE))
    assert len(calls) == 1
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < TOL


# Run in a child process: the kernels must be compiled, not interpreted, whatever TRITON_INTERPRET says here.
# Launches are recorded on meta tensors: Flash dims through benchmarks/attention_train.py (bf16, fp32), and
# this file's cases in bf16, as a GPU runs them.
SM90_CHECK = """
import json, sys, torch
sys.path[:0] = ["benchmarks", "tests"]
import attention_train as bench, test_kernel_attn_train as t
from dsv4.kernels import sparse_attn_train as sat

def case(name):
    args, weight = t.make_inputs(name)
    t.grads(lambda *a: sat.sparse_attention_train(*a, tiles=sat.Tiles(**t.CASES[name][-1])),
            t.on_device(args, "meta", torch.bfloat16), weight.to("meta"))

launches = [x for dt in (torch.bfloat16, torch.float32) for x in bench.record_launches(lambda: bench.flash_layers(dt, {}))]
launches += [x for name in t.CASES for x in bench.record_launches(lambda: case(name))]
print(json.dumps(bench.compile_sm90(launches)))
"""


@pytest.mark.skipif(not kernels.triton_available(), reason="needs triton")
def test_kernels_fit_sm90():
    """Every launch of one CSA and one HCA layer's forward + backward at Flash dims (bf16 and fp32), and of
    the cases above, compiled for the H100 ahead of time: shared memory per program within the card's
    232,448 bytes (the first GPU run asked for 430,464)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import native_specialize_impl  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile for sm_90 as used here: {e}")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", SM90_CHECK], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(run.stdout.splitlines()[-1])
    assert {r["kernel"] for r in records} == {"_fwd_kernel", "_delta_kernel", "_bwd_q_kernel", "_bwd_kv_kernel"}
    too_big = [r for r in records if r["shared"] > 232448]
    assert not too_big, too_big
