"""The indexer's distillation loss (KL(dense attention || indexer distribution), §3 warm-up) is computed in
query chunks, each checkpointed: any chunking gives the same loss and the same gradients as one piece, and the
loss equals a direct computation from the full score matrix."""

import torch

from dsv4.cache import CompressorState
from dsv4.compressor import Indexer, visible_entries
from dsv4.config import preset
from tests.conftest import random_model


def setup():
    config = preset("tiny").replace(compress_ratios=[4, 4, 0], num_hidden_layers=3, index_n_heads=4,
                                    initializer_range=0.2)
    attn = random_model(config, seed=3).layers[0].attn
    gen = torch.Generator().manual_seed(0)
    B, S = 2, 41
    x = torch.randn(B, S, config.hidden_size, generator=gen)
    q_latent = torch.randn(B, S, config.q_lora_rank, generator=gen)
    target = torch.rand(B, S, S // 4, generator=gen)
    positions = torch.arange(S)
    hidden = torch.arange(S // 4) >= visible_entries(positions, 4)[:, None]
    target = target.masked_fill(hidden, 0.0)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
    return attn, x, q_latent, positions, target, hidden


def loss_and_grads(indexer: Indexer, x, q_latent, positions, target, budget):
    indexer.zero_grad()
    _, kl, count = indexer(x, q_latent, positions, CompressorState(), torch.ones(4), score_budget=budget,
                           kl_target=lambda s, e: target[:, s:e])
    kl.backward()
    return kl.detach(), count, [p.grad.clone() for p in indexer.parameters()]


def test_chunked_distillation_loss_equals_one_piece_and_direct():
    attn, x, q_latent, positions, target, hidden = setup()
    indexer = attn.indexer
    whole = loss_and_grads(indexer, x, q_latent, positions, target, 1 << 30)
    chunked = loss_and_grads(indexer, x, q_latent, positions, target, 4 * 40)  # a few queries per chunk
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=0)
    assert chunked[1] == whole[1] == 2 * int((~hidden.all(-1)).sum())
    for a, b in zip(chunked[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    # direct: every score at once, log-softmax over the visible entries
    with torch.no_grad():
        keys = indexer.compressor(x, CompressorState(), torch.ones(4))
        q, head_w = indexer.queries(x, q_latent, positions, torch.ones(4))
        scores = torch.einsum("bshd,bnd->bshn", q, keys).relu()
        scores = torch.einsum("bshn,bsh->bsn", scores, head_w) * indexer.head_dim ** -0.5
        has = ~hidden.all(-1)
        log_q = scores.masked_fill(hidden, float("-inf"))[:, has].log_softmax(-1).masked_fill(hidden[has], 0)
        t = target[:, has]
        direct = (t * (t.clamp(min=1e-30).log() - log_q)).sum()
    torch.testing.assert_close(whole[0], direct, rtol=1e-5, atol=0)
    assert whole[0] > 0
