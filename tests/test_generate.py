"""Sampling rules and the cached generation loop."""

import pytest
import torch

from dsv4.config import preset
from dsv4.generate import SamplingParams, generate, sample
from tests.conftest import random_model


def test_greedy_and_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, SamplingParams()).item() == 1
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2), gen).item() for _ in range(200)}
    assert picks == {1, 3}
    # top_p keeps the smallest prefix whose mass reaches p: here only the top token
    peaked = torch.tensor([[0.0, 10.0, 1.0, 2.0]])
    assert {sample(peaked, SamplingParams(temperature=1.0, top_p=0.5), gen).item() for _ in range(50)} == {1}


def test_seeded_sampling_is_reproducible():
    model = random_model(preset("tiny"), seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    a = generate(model, [0, 5, 9], params)
    assert a == generate(model, [0, 5, 9], params) and len(a) == 12


def test_greedy_generation_equals_argmax_of_full_forward():
    model = random_model(preset("tiny").replace(initializer_range=0.2), seed=2)
    prompt = list(range(1, 140))
    out = generate(model, prompt, SamplingParams(max_new_tokens=6))
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        argmax = model(ids)[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == argmax


def test_stop_token_and_bad_params():
    model = random_model(preset("tiny"), seed=1)
    first = generate(model, [3, 4], SamplingParams(max_new_tokens=1))[0]
    assert generate(model, [3, 4], SamplingParams(max_new_tokens=10), stop_ids={first}) == [first]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], SamplingParams())
