import os

import pytest
import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.model import Transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton kernels run on a GPU, or on CPU in Triton's interpreter (`make test` sets TRITON_INTERPRET=1 there).
CAN_RUN_KERNELS = kernels.triton_available() and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_kernels = pytest.mark.skipif(not CAN_RUN_KERNELS, reason="needs triton and a GPU, or TRITON_INTERPRET=1 on CPU")


def rel_err(a, b):
    """Relative L2 error of a against b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_model(config, seed=0, spread=0.3):
    """A tiny model whose every parameter is random and non-neutral (norm weights, mHC gates and biases,
    sinks, slot biases, router bias), so that a parity test exercises each of them."""
    model = Transformer(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("ape"):
                p.add_(torch.randn(p.shape, generator=gen) * spread)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_config():
    return preset("tiny")


def random_topk(gen, B, S, N, k, visible, holes: float = 0.0):
    """Distinct indices < visible[s] per query, -1 padded (as the indexer returns them), in random order (N: the
    entries stored, unused); `holes`: fraction of the picks also set to -1."""
    out = torch.full((B, S, k), -1, dtype=torch.long)
    for b in range(B):
        for s in range(S):
            n = min(k, int(visible[s]))
            out[b, s, :n] = torch.randperm(max(int(visible[s]), 1), generator=gen)[:n]
            out[b, s] = out[b, s, torch.randperm(k, generator=gen)]
    return out.masked_fill(torch.rand(out.shape, generator=gen) < holes, -1) if holes else out
