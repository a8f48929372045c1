"""The `dsv4` command line and the parameter accounting behind `dsv4 info`."""

import json

import pytest

from dsv4.cli import main
from dsv4.config import preset
from dsv4.info import parameter_counts
from dsv4.model import Transformer


@pytest.mark.parametrize("overrides", [{}, dict(n_shared_experts=0, num_hash_layers=0, compress_ratios=[0, 4, 128, 4, 0]),
                                       dict(tie_word_embeddings=True, hc_mult=2)])
def test_parameter_counts_match_a_built_model(overrides):
    config = preset("tiny").replace(**overrides)
    model = Transformer(config)
    counts = parameter_counts(config)
    n_mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    n_trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    if config.tie_word_embeddings:  # our model keeps a separate head; a tied checkpoint has one matrix
        n_trunk -= model.head.weight.numel()
    assert counts["total"] == n_trunk and counts["mtp"] == n_mtp
    unused = (config.n_routed_experts - config.num_experts_per_tok) * 3 * config.hidden_size * config.moe_intermediate_size
    assert counts["active"] == counts["total"] - config.num_hidden_layers * unused


def test_flash_and_pro_sizes_match_the_release():
    flash, pro = parameter_counts(preset("flash")), parameter_counts(preset("pro"))
    assert 280e9 < flash["total"] < 290e9 and 13e9 < flash["active"] < 14e9  # "284B, 13B activated"
    assert 1.55e12 < pro["total"] < 1.65e12 and 49e9 < pro["active"] < 50e9  # "1.6T, 49B activated"


def test_info_json(capsys):
    assert main(["info", "flash", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer_types"] == {"sliding_attention": 2, "compressed_sparse_attention": 21,
                                   "heavily_compressed_attention": 20}
    assert info["kv_bytes_per_token"]["total"] == pytest.approx(21 * (584 + 132) / 4 + 20 * 584 / 128)
    assert main(["info", "flash", "--json", "--index-keys", "fp4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_bytes_per_token"]["total"] == pytest.approx(21 * (584 + 68) / 4 + 20 * 584 / 128)


def test_generate_from_preset(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "70000"]) == 2
    assert "exceeds" in capsys.readouterr().err
