"""Incremental decoding with the cache equals one full forward pass, for any split of the sequence into
chunks, across block boundaries of both compression rates (4 and 128) and the window."""

import pytest
import torch

from dsv4.config import preset
from tests.conftest import random_model

SPLITS = {
    "one_pass": [300],
    "token_by_token": [1] * 300,
    "ragged": [7, 1, 3, 117, 1, 128, 43],
    "block_edges": [127, 1, 1, 3, 4, 128, 36],
}


@pytest.fixture(scope="module")
def model_and_ids():
    config = preset("tiny").replace(compress_ratios=[4, 128, 0, 4], initializer_range=0.2)
    model = random_model(config, seed=5)
    ids = torch.randint(0, config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    return model, ids, full


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_chunked_equals_full(model_and_ids, split):
    model, ids, full = model_and_ids
    cache = model.new_cache()
    outs, start = [], 0
    with torch.no_grad():
        for n in SPLITS[split]:
            outs.append(model(ids[:, start:start + n], cache))
            start += n
    assert start == ids.shape[1] and cache.length == start
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4 * full.abs().max().item(), rtol=0)


def test_cache_holds_compressed_state(model_and_ids):
    model, ids, _ = model_and_ids
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :259], cache)
    csa, hca, window = cache.layers[0], cache.layers[1], cache.layers[2]
    assert csa.compressor.entries.shape[1] == 259 // 4 and csa.indexer.entries.shape[1] == 259 // 4
    assert csa.compressor.pending_kv.shape[1] == 259 % 4
    assert hca.compressor.entries.shape[1] == 2 and hca.compressor.pending_kv.shape[1] == 259 - 256
    assert window.window.shape[1] == model.config.sliding_window - 1
    assert window.compressor is None and cache.nbytes() > 0


def test_too_long_sequence_is_refused():
    config = preset("tiny").replace(max_position_embeddings=64, index_topk=3)
    model = random_model(config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_mtp_decode_equals_full(model_and_ids):
    """The MTP block (token after next) continues through its own cache exactly like the trunk."""
    model, ids, _ = model_and_ids
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        full = model.mtp_logits(hidden[:, :-1], ids[:, 1:])
        cache = model.new_cache()
        outs = []
        for s, e in ((0, 9), (9, 10), (10, 140), (140, 299)):
            _, h = model(ids[:, s:e], cache, return_hidden=True)
            outs.append(model.mtp_logits(h, ids[:, s + 1:e + 1], cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4 * full.abs().max().item(), rtol=0)


def test_last_only_logits(model_and_ids):
    model, ids, full = model_and_ids
    with torch.no_grad():
        # rtol: one row through the head matmul may round differently from many rows
        torch.testing.assert_close(model(ids, last_only=True), full[:, -1:], rtol=1e-5, atol=1e-5)


def test_out_of_range_token_ids_are_refused(model_and_ids):
    model, _, _ = model_and_ids
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        model(torch.tensor([[3, 600]]))
