"""The model on the compact paged FP8 cache (dsv4.paged) == the reference model seeing KV through the same
formats (`kernels.simulate_fp8_kv`): chunked prefill, token-by-token decode, a ragged decode batch of
sequences at different positions sharing one pool, slot reuse after release.

Backends: "reference" everywhere; "triton" (decode attention + fused indexer top-k on the pool's blocks) on a
GPU or in the CPU interpreter (TRITON_INTERPRET=1, as `make test` sets it without a GPU).
"""


import pytest
import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.kernels.paged_cache import CacheFull, PagedKVCache
from dsv4.paged import PagedBatch
from tests.conftest import CAN_RUN_KERNELS, DEVICE, random_model

BACKENDS = ["reference", "triton"] if CAN_RUN_KERNELS else ["reference"]

# CSA, HCA, window-only, CSA; window 8, top-k 3 < entries, so the indexer's choice matters.
CONFIG = preset("tiny").replace(compress_ratios=[4, 128, 0, 4, 0], initializer_range=0.2)


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=5).to(DEVICE)


def reference_logits(model, ids):
    with torch.no_grad(), kernels.use("reference"), kernels.simulate_fp8_kv():
        return model(ids)


def close(got, ref):
    torch.testing.assert_close(got, ref, atol=2e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_then_decode_equals_full_forward(model, backend):
    ids = torch.randint(0, CONFIG.vocab_size, (1, 150), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = reference_logits(model, ids)
    pool = PagedKVCache(CONFIG, max_seqs=3, max_tokens=512, block_size=4, device=DEVICE)
    pool.allocate()  # slot 0 stays empty: the sequence lives in a non-trivial slot
    batch = PagedBatch(pool, [pool.allocate()])
    cuts = [0, 37, 41, 133, 140]  # chunk ends not on any block boundary; one crosses the 128-token HCA block
    with torch.no_grad(), kernels.use(backend):
        out = [model(ids[:, s:e], batch) for s, e in zip(cuts[:-1], cuts[1:])]
        out += [model(ids[:, i:i + 1], batch) for i in range(140, 150)]
    assert pool.lengths[batch.slots[0]] == 150
    close(torch.cat(out, 1), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_decode_batch_equals_each_sequence_alone(model, backend):
    """Three sequences at different positions (blocks finish at different steps) decode as one batch."""
    gen = torch.Generator().manual_seed(2)
    lengths, steps = [131, 6, 60], 4
    seqs = [torch.randint(0, CONFIG.vocab_size, (1, n + steps), generator=gen).to(DEVICE) for n in lengths]
    refs = [reference_logits(model, s) for s in seqs]
    pool = PagedKVCache(CONFIG, max_seqs=4, max_tokens=512, block_size=4, device=DEVICE)
    slots = [pool.allocate() for _ in seqs]
    with torch.no_grad(), kernels.use(backend):
        for slot, s, n in zip(slots, seqs, lengths):
            model(s[:, :n], PagedBatch(pool, [slot]))
        batch = PagedBatch(pool, slots)
        out = []
        for i in range(steps):
            ids = torch.cat([s[:, n + i:n + i + 1] for s, n in zip(seqs, lengths)])
            out.append(model(ids, batch))
    out = torch.cat(out, 1)
    for b, (ref, n) in enumerate(zip(refs, lengths)):
        close(out[b:b + 1], ref[:, n:])


def test_released_slot_starts_clean_and_errors_are_clear(model):
    pool = PagedKVCache(CONFIG, max_seqs=1, max_tokens=64, block_size=4, device=DEVICE)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    slot = pool.allocate()
    with torch.no_grad(), kernels.use("reference"):
        model(ids[:, :23], PagedBatch(pool, [slot]))  # leaves unfinished compressor blocks behind
        pool.release(slot)
        slot = pool.allocate()
        got = model(ids, PagedBatch(pool, [slot]))
        close(got, reference_logits(model, ids))
        with pytest.raises(ValueError, match="2 rows"):
            model(torch.cat([ids, ids])[:, :1], PagedBatch(pool, [slot]))
        pool.release(slot)
        with pytest.raises(ValueError, match="not allocated"):
            model(ids[:, :1], PagedBatch(pool, [slot]))
        slot = pool.allocate()
        with pytest.raises(CacheFull, match="max_tokens"):
            model(torch.zeros(1, 600, dtype=torch.long, device=DEVICE), PagedBatch(pool, [slot]))
