"""Fused kernels behind one dispatch seam (STYLE 4): the model calls the functions here, never a kernel.

Each op lives in its own file and exports the fast (Triton) path and the plain-PyTorch reference it is
tested against. The backend is chosen per call:
  reference   always the PyTorch reference
  triton      always the Triton kernel (on CPU tensors this needs TRITON_INTERPRET=1: the interpreter)
  auto        (default) Triton for CUDA tensors when triton imports, else the reference
Set it for a process with the environment variable DSV4_KERNELS, or for a region with `use("reference")`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

BACKENDS = ("auto", "reference", "triton")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsv4_kernels", default=None)
_kv_fp8: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsv4_kv_fp8", default=None)
_train_kernel: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsv4_train_kernel", default=None)
_train_mhc_kernel: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsv4_train_mhc_kernel", default=None)


class KernelBackendError(RuntimeError):
    pass


def backend() -> str:
    name = _backend.get() or os.environ.get("DSV4_KERNELS", "auto")
    if name not in BACKENDS:
        raise KernelBackendError(f"DSV4_KERNELS={name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, value):
    """`var` = value inside a `with` block (per thread / task: contextvars)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _switch(var: contextvars.ContextVar, env: str, default: bool = False) -> bool:
    """A boolean switch: the innermost `with` block's value, else the environment variable `env` (1 on, 0 off),
    else `default`."""
    flag = var.get()
    return os.environ.get(env, "1" if default else "0") == "1" if flag is None else flag


def use(name: str):
    """Force a backend inside a `with` block: `with kernels.use("reference"): model(ids)`."""
    if name not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    return _scoped(_backend, name)


def train_kernel() -> bool:
    """Whether training's core attention takes the trainable Triton kernel (`sparse_attn_train`) where Triton
    runs (CUDA): on unless DSV4_TRAIN_KERNEL=0 or `with use_train_kernel(False):`. On the H100 it passes its
    tests, runs one Flash-dims CSA layer's forward + backward at 4K in 18.5 ms / 0.5 GiB against the reference
    autograd's 67.9 ms / 4.3 GiB, tracks the reference's loss curve, and is what makes 16K training fit
    (benchmarks/RESULTS.md, training)."""
    return _switch(_train_kernel, "DSV4_TRAIN_KERNEL", default=True)


def use_train_kernel(enabled: bool = True):
    return _scoped(_train_kernel, enabled)


def train_mhc_kernel() -> bool:
    """Whether training's mHC maps take the fused kernel with its backward (`mhc_maps.hc_maps_train`: ~9K fewer
    launches per step of a 12-layer model) where Triton runs: on unless DSV4_TRAIN_MHC_KERNEL=0 or
    `with use_train_mhc_kernel(False):`. Its gradients match the reference's autograd (tests/test_kernel_mhc.py,
    CPU interpreter and an H200); on the H200 it makes a 4K-token training step of the ~1.3B benchmark model
    1.63x faster (0.593 vs 0.966 s, benchmarks/RESULTS.md "Session 5")."""
    return _switch(_train_mhc_kernel, "DSV4_TRAIN_MHC_KERNEL", default=True)


def use_train_mhc_kernel(enabled: bool = True):
    return _scoped(_train_mhc_kernel, enabled)


def kv_fp8() -> bool:
    """Whether attention sees KV through the FP8 record (the official FP8 KV simulation; DSV4_KV_FP8=1)."""
    return _switch(_kv_fp8, "DSV4_KV_FP8")


def simulate_fp8_kv(enabled: bool = True):
    """Round every window and compressed KV entry (and the indexer's keys) through the compact cache's
    formats before attention, inside a `with` block."""
    return _scoped(_kv_fp8, enabled)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    name = backend()
    if name == "reference":
        return False
    if name == "triton":
        if not triton_available():
            raise KernelBackendError("DSV4_KERNELS=triton but triton is not installed: pip install triton")
        if t.device.type != "cuda" and not interpreting():
            raise KernelBackendError("Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
        return True
    return t.device.type == "cuda" and triton_available()


def sparse_attention(q, window_kv, positions, compressed, topk, ratio, sink, scale, window, rope_dim=64):
    """V4 core attention (window + compressed entries + sink); signature of `dsv4.attention.sparse_attention`
    plus the RoPE width (the FP8 record keeps those dims in BF16)."""
    if kv_fp8():
        from .fp8_kv import fake_quantize
        window_kv = fake_quantize(window_kv, rope_dim)
        compressed = None if compressed is None else fake_quantize(compressed, rope_dim)
    # While autograd records (training), the forward-only kernels would silently stop gradients at
    # attention: take the trainable kernel (Triton forward + backward) when enabled (`train_kernel`), else
    # the reference's autograd. The FP8 KV simulation, a numerics study, always keeps the reference.
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (q, window_kv, compressed, sink))
    if needs_grad and train_kernel() and use_triton(q) and not kv_fp8():
        from .sparse_attn_train import sparse_attention_train
        return sparse_attention_train(q, window_kv, positions, compressed, topk, ratio, sink, scale, window)
    if not needs_grad and use_triton(q):
        if q.shape[1] == 1:  # decode: flash-decoding kernel (split-K partials + parallel merge)
            from .decode_attn import sparse_attention_decode
            return sparse_attention_decode(q, window_kv, positions, compressed, topk, ratio, sink, scale, window)
        from .sparse_attn import sparse_attention_dense
        return sparse_attention_dense(q, window_kv, positions, compressed, topk, ratio, sink, scale, window)
    from ..attention import sparse_attention as reference
    return reference(q, window_kv, positions, compressed, topk, ratio, sink, scale, window)


def index_topk(q, head_w, keys, positions, ratio, k):
    """Lightning-indexer top-k (§2.3.1 eqs. 13-17), the scoring of `dsv4.compressor.Indexer.forward`: q (B, S, Hi, Di)
    (RoPE'd), head_w (B, S, Hi) fp32 (already x Hi^-1/2), keys (B, N, Di), positions (S,) -> (B, S, min(k, N))
    indices best first, equal scores by lowest index, -1 where none. Named after the config key (`indexer_topk`
    is the kernel module). On the Triton path one query (decode) takes the fused scoring + threshold + rank
    kernel (`indexer_decode`, no torch.topk), several (prefill) the chunked scoring kernel + torch.topk.
    The reference lives beside the kernels, so this needs triton installed even when forced to "reference"."""
    if use_triton(q):
        if q.shape[1] == 1:
            from .indexer_decode import indexer_topk_dense
            return indexer_topk_dense(q, head_w, keys, positions, ratio, k)
        from .indexer_topk import indexer_topk as fast
        return fast(q, head_w, keys, positions, ratio, k)
    from .indexer_topk import reference
    return reference(q, head_w, keys, positions, ratio, k)


def hc_maps_post_linear(mixes, base, scale, *, sinkhorn_iters, hc_eps):
    """mHC maps after the projection (§2.2): mixes (B, S, (2+n)*n) fp32 -> pre (B, S, n), post (B, S, n),
    comb (B, S, n, n) fp32; `dsv4.mhc.hc_maps_from_mixes`. The Triton path fuses the gates and every
    Sinkhorn iteration into one launch (the reference launches ~6 kernels per iteration)."""
    # While autograd records (training): the kernel with its backward when enabled (`train_mhc_kernel`), else
    # the reference, whose backward is PyTorch's.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (mixes, base, scale))
    if needs_grad and train_mhc_kernel() and use_triton(mixes):
        from .mhc_maps import hc_maps_train
        return hc_maps_train(mixes, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps)
    if not needs_grad and use_triton(mixes):
        from .mhc_maps import hc_maps_fused
        return hc_maps_fused(mixes, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps)
    from ..mhc import hc_maps_from_mixes as reference
    return reference(mixes, base, scale, sinkhorn_iters=sinkhorn_iters, hc_eps=hc_eps)


def compress_blocks(kv, gate, ape, overlap_kv, overlap_gate, norm_weight, eps, inv_freq, first_block,
                    records=None, rows=None):
    """Finished compression blocks -> entries (§2.3.1 eqs. 9-12 CSA, §2.3.2 HCA), the pooling of
    `dsv4.compressor.Compressor.forward`: kv, gate (B, n, m, width) (width 2D: CSA's two series; D: HCA; gate
    without the positional bias), ape (m, width), the carried series-a rows overlap_kv / overlap_gate (B, m, D)
    (gate + ape) or None, RMSNorm weight (D,) and eps, inv_freq (rope_dim / 2,), first_block an int or (B, 1)
    -> (B, n, D) in kv's dtype, softmax-pooled, normed and RoPE'd at position w * m. With a uint8 records pool
    (R, record_bytes) and rows (B, n) int64 it also writes each entry's `fp8_kv` record into those rows (-1:
    skip). The Triton path does all of it in one launch (`kernels.compress`)."""
    from . import compress
    # Forward-only kernel: while autograd records (training), take the reference, whose backward is PyTorch's.
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                                 (kv, gate, ape, overlap_kv, overlap_gate, norm_weight))
    fn = compress.compress_blocks if not needs_grad and use_triton(kv) else compress.reference
    return fn(kv, gate, ape, overlap_kv, overlap_gate, norm_weight, eps, inv_freq, first_block, records, rows)
