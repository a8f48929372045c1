"""Packed documents (sample-level masking) and batched decoding of sequences at different positions."""

import pytest
import torch

from dsv4.config import preset
from tests.conftest import random_model


@pytest.fixture(scope="module")
def model():
    return random_model(preset("tiny").replace(compress_ratios=[4, 128, 0, 4], initializer_range=0.2), seed=9)


def test_documents_do_not_see_each_other(model):
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 512, (n,), generator=gen) for n in (150, 37, 80))
    packed = torch.cat((a, b, c))[None]
    doc_ids = torch.tensor([0] * 150 + [1] * 37 + [2] * 80)[None]
    with torch.no_grad():
        logits = model(packed, doc_ids=doc_ids)
        alone = [model(d[None]) for d in (a, b, c)]
        # Same math, different matmul shapes: allow fp32 rounding relative to the logit scale (an H100 host's
        # CPU BLAS differed by 1.2e-5 on logits of scale ~5).
        torch.testing.assert_close(logits, torch.cat(alone, dim=1), rtol=0, atol=1e-5 * logits.abs().max().item())
        other = torch.cat((a, torch.randint(0, 512, (37,), generator=gen), c))[None]
        changed = model(other, doc_ids=doc_ids)
    assert torch.equal(changed[:, :150], logits[:, :150]) and torch.equal(changed[:, 187:], logits[:, 187:])
    assert not torch.allclose(changed[:, 150:187], logits[:, 150:187])


def test_mtp_respects_documents(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 60), generator=gen)
    doc_ids = torch.tensor([[0] * 20 + [1] * 40, [0] * 60])
    with torch.no_grad():
        _, h = model(ids, doc_ids=doc_ids, return_hidden=True)
        packed = model.mtp_logits(h, ids, doc_ids=doc_ids)  # `ids` stands in for the next tokens
        _, h0 = model(ids[:1, 20:], return_hidden=True)
        alone = model.mtp_logits(h0, ids[:1, 20:])
        torch.testing.assert_close(packed[:1, 20:], alone, rtol=0, atol=1e-5 * alone.abs().max().item())


def test_batched_decode_of_different_sequences(model):
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (1, n), generator=gen) for n in (5, 131, 260)]
    steps = torch.randint(0, 512, (3, 6), generator=gen)
    with torch.no_grad():
        caches = [model.new_cache() for _ in prompts]
        for p, c in zip(prompts, caches):
            model(p, c)
        batched = torch.cat([model(steps[:, i:i + 1], caches) for i in range(6)], dim=1)
        for row, p in enumerate(prompts):
            alone = model(torch.cat((p, steps[row:row + 1]), dim=1))[:, -6:]
            torch.testing.assert_close(batched[row:row + 1], alone, rtol=0, atol=1e-4 * alone.abs().max().item())
    assert [c.length for c in caches] == [11, 137, 266]


def test_bad_view_arguments(model):
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(ids, model.new_cache(), doc_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="2 caches for a batch of 3"):
        model(torch.zeros(3, 1, dtype=torch.long), [model.new_cache(), model.new_cache()])
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(ids, doc_ids=torch.zeros(2, 3, dtype=torch.long))
