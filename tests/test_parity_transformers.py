"""Our model against transformers' DeepseekV4ForCausalLM (the numerical oracle), on random tiny configs
that together cover CSA + HCA + window-only layers, hash and learned routing, an indexer top-k smaller
than the number of compressed entries, sequences longer than the window and several compression blocks,
batch > 1, and hc_mult 2 and 4."""

import pytest
import torch

from dsv4 import hf
from dsv4.config import preset
from tests.conftest import random_model

transformers = pytest.importorskip("transformers", reason="transformers is the test-time oracle (test extra)")

CASES = {
    # name: (config overrides, batch, seq)
    "csa_hca_hc4": (dict(compress_ratios=[128, 4, 128, 4], index_n_heads=8, initializer_range=0.1), 2, 300),
    "csa_topk_hc2": (dict(compress_ratios=[4, 4, 0], num_hidden_layers=3, hc_mult=2, index_topk=5,
                          index_n_heads=8, num_hash_layers=2, initializer_range=0.15), 3, 97),
    "yarn_learned_only": (dict(compress_ratios=[4, 128], num_hidden_layers=2, num_hash_layers=0, index_n_heads=8,
                               rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                                             "beta_fast": 32, "beta_slow": 1}, initializer_range=0.1), 2, 260),
}


def reference_model(config, ours):
    ref = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf.to_hf_config(config))).eval()
    missing, unexpected = ref.load_state_dict(hf.to_hf_state_dict(ours.state_dict(), config), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    overrides, batch, seq = CASES[case]
    config = preset("tiny").replace(**overrides)
    ours = random_model(config, seed=len(case))
    ref = reference_model(config, ours)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    scale = b.abs().max()
    assert scale > 1.0, "logits too flat for a meaningful comparison"
    assert (a - b).abs().max() <= 1e-4 * scale


def test_indexer_selection_matters():
    """The parity configs must make top-k bite: with everything selected the logits change."""
    overrides, batch, seq = CASES["csa_topk_hc2"]
    config = preset("tiny").replace(**overrides)
    ours = random_model(config, seed=3)
    wide = random_model(config.replace(index_topk=1000), seed=3)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - wide(ids)).abs().max() > 1e-2


def test_bf16_model_tracks_fp32_reference():
    """In bf16 (fp32 kept for norms, mHC, sinks, biases as released) the logits stay within 3 % of the
    fp32 reference's scale. Routing and indexer selection are discrete: on a random model a bf16 rounding
    flips some expert / entry choices and moves logits by O(1), so this test fixes both (hash routing in
    every layer, top-k covering every entry) to measure the numerics alone."""
    config = preset("tiny").replace(compress_ratios=[128, 4, 128, 4], index_n_heads=8, index_topk=1000,
                                    num_hash_layers=4, initializer_range=0.05)
    ours = random_model(config, seed=4)
    ref = reference_model(config, ours)
    ids = torch.randint(0, config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        b = ref(ids).logits
        a = ours.to_dtype(torch.bfloat16)(ids)
    assert ours.layers[0].attn_norm.weight.dtype == torch.float32
    assert ours.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    err = (a - b).abs().max() / b.abs().max()
    assert err < 0.03, f"bf16 logits deviate by {err:.3f} of the logit scale"
