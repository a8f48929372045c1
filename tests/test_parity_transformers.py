"""Our model against transformers' DeepseekV4ForCausalLM (the numerical oracle), on random tiny configs
that together cover CSA + HCA + window-only layers, hash and learned routing, an indexer top-k smaller
than the number of compressed entries, sequences longer than the window and several compression blocks,
batch > 1, and hc_mult 2 and 4."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dsv4 import hf
from dsv4.config import preset
from tests.conftest import random_model

transformers = pytest.importorskip("transformers", reason="transformers is the test-time oracle (test extra)")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

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


@pytest.fixture
def attention_bench():
    """benchmarks/attention.py as a module (it imports its siblings `timing` and `vs_transformers`)."""
    pytest.importorskip("triton", reason="benchmarks/attention.py imports the Triton kernels")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import attention
        yield attention
    finally:
        sys.path.remove(str(BENCHMARKS))


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_attention_layer_benchmark_matches_transformers(attention_bench, capsys):
    """`attention.py --vs-transformers` on CPU at a tiny size: our CSA and HCA layers and transformers' twins
    (same weight tensors via dsv4.hf) give one output in prefill (ours in chunks through the cache) and in
    decode (each side's own cache filled with the context, then one-token steps), and every row is there."""
    config = preset("tiny").replace(compress_ratios=[4, 128], num_hidden_layers=2, num_hash_layers=0,
                                    index_n_heads=8, index_topk=4, initializer_range=0.1)
    model = random_model(config, seed=36)
    picked = []  # our CSA indexer's top-k of each call
    model.layers[0].attn.indexer.register_forward_hook(lambda module, args, topk: picked.append(topk))
    # 380 tokens: 95 CSA entries of which top-k keeps 4, 2 HCA entries, 8-token window, chunks of 96. Decode: a
    # warm-up step and 3 timed ones at positions 380-383; the compared last one closes a CSA and an HCA block, so
    # both compressors finish an entry from their decode state (the unfinished block, CSA's overlap half) and
    # the token attends to it: as to every HCA entry, and (this seed) picked by CSA's indexer. A top-k of 16 would
    # reach indexer scores tied at 0 (every head's ReLU zero), which ours (lowest index first) and torch.topk
    # break differently
    attention_bench.compare_with_transformers(model, [380], chunk=96, reps=1, decode_steps=3)
    assert 384 // 4 - 1 in picked[-1][0, -1]
    rows = json_lines(capsys.readouterr().out)
    for case, ratio_case, check_case in [("vs_transformers_prefill", "vs_transformers_ratio", "vs_transformers_check"),
                                         ("vs_transformers_decode", "vs_transformers_decode_ratio",
                                          "vs_transformers_decode_check")]:
        checks = {r["layer"]: r for r in rows if r["case"] == check_case}
        assert sorted(checks) == ["csa", "hca"], case
        for r in checks.values():
            assert r["rel_err"] < 1e-5 and r["ok"], r
        timed = {(r["impl"], r["layer"]) for r in rows if r["case"] == case and r["ms"] > 0}
        assert timed == {(impl, layer) for impl in ("dsv4", "transformers") for layer in ("csa", "hca")}, case
        assert len([r for r in rows if r["case"] == ratio_case]) == 2, case
    assert {r["steps"] for r in rows if r["case"].startswith("vs_transformers_decode")} == {3}


def test_attention_layer_benchmark_goes_on_after_out_of_memory(attention_bench, capsys, monkeypatch):
    """A context that runs out of memory gets an "oom" row and no ratio; the next layer still runs. Simulated:
    transformers' one-call prefill of more than 40 tokens, its decode step over a cache of 48 tokens (the
    16-token pieces that fill that cache fit)."""
    config = preset("tiny").replace(compress_ratios=[4, 128], num_hidden_layers=2, num_hash_layers=0)
    v4 = attention_bench.transformers_v4()
    forward = v4.DeepseekV4Attention.forward

    def small_only(self, hidden_states, *args, past_key_values=None, **kwargs):
        cached = 0 if past_key_values is None else past_key_values.get_seq_length(self.layer_idx)
        if hidden_states.shape[1] > 40 or cached >= 48:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, hidden_states, *args, past_key_values=past_key_values, **kwargs)

    monkeypatch.setattr(v4.DeepseekV4Attention, "forward", small_only)
    attention_bench.compare_with_transformers(random_model(config, seed=6), [40, 48], chunk=16, reps=1,
                                              decode_steps=1)
    rows = json_lines(capsys.readouterr().out)
    for case, ratio_case in [("vs_transformers_prefill", "vs_transformers_ratio"),
                             ("vs_transformers_decode", "vs_transformers_decode_ratio")]:
        oom = [(r["impl"], r["layer"], r["ctx"]) for r in rows if r["case"] == case and r.get("oom")]
        assert oom == [("transformers", "csa", 48), ("transformers", "hca", 48)], case
        assert [(r["layer"], r["ctx"]) for r in rows if r["case"] == ratio_case] == [("csa", 40), ("hca", 40)], case
        assert {(r["impl"], r["ctx"]) for r in rows if r["case"] == case and "ms" in r} == {
            ("dsv4", 40), ("dsv4", 48), ("transformers", 40)}, case


def test_attention_layer_benchmark_names_the_transformers_it_needs(attention_bench, monkeypatch):
    """On a transformers without DeepSeek-V4 (the GPU image's 5.17) the comparison fails saying which it needs."""
    monkeypatch.setitem(sys.modules, "transformers.models.deepseek_v4", None)
    with pytest.raises(ImportError, match=r"transformers >= 5\.23"):
        attention_bench.transformers_v4()
