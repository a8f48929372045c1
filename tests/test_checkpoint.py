"""Checkpoints: save -> load gives the same logits in both layouts, sharded and quantised; transformers
reads ours and we read transformers'; broken checkpoints and configs fail with errors that name the
problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4 import hf, load
from dsv4.checkpoint import INDEX_NAME, load_checkpoint, save_checkpoint
from dsv4.config import Config, ConfigError, preset
from dsv4.errors import CheckpointError
from dsv4.quant import dequantize_state_dict, quantize_state_dict
from tests.conftest import random_model

CONFIG = preset("tiny").replace(index_n_heads=8, initializer_range=0.1)
IDS = torch.randint(0, CONFIG.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=11)


@pytest.fixture(scope="module")
def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_round_trip(model, logits, tmp_path, layout):
    save_checkpoint(model, tmp_path / "ckpt", layout=layout)
    again = load(tmp_path / "ckpt")
    with torch.no_grad():
        out = again(IDS)
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    if layout == "official":  # MTP weights travel too (transformers has no place for them)
        torch.testing.assert_close(again.mtp[0].e_proj.weight, model.mtp[0].e_proj.weight, rtol=0, atol=0)


def test_sharded_round_trip(model, logits, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 3
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "ckpt")(IDS), logits, rtol=0, atol=0)


def test_official_fp8_fp4_checkpoint_equals_reference_dequantisation(model, tmp_path):
    save_checkpoint(model, tmp_path / "q", quantize=True)
    shipped = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert shipped["layers.0.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert shipped["layers.0.ffn.experts.0.w1.weight"].dtype == torch.int8  # two E2M1 codes per byte
    expected = random_model(CONFIG, seed=11)
    expected.load_state_dict(dequantize_state_dict(quantize_state_dict(model.state_dict()), torch.float32),
                             strict=True)
    got = load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(got(IDS), expected(IDS), rtol=0, atol=1e-5)


def test_transformers_reads_ours_and_we_read_theirs(model, logits, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-time oracle")
    save_checkpoint(model, tmp_path / "ours", layout="transformers")
    ref = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, logits, rtol=0, atol=1e-4 * logits.abs().max().item())
    ref.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        out = load(tmp_path / "theirs")(IDS)
    torch.testing.assert_close(out, logits, rtol=0, atol=1e-4 * logits.abs().max().item())


def _official(model, tmp_path):
    save_checkpoint(model, tmp_path / "c")
    return tmp_path / "c", load_file(str(tmp_path / "c" / "model.safetensors"))


def test_missing_unexpected_misshaped_are_listed(model, tmp_path):
    path, sd = _official(model, tmp_path)
    del sd["layers.1.attn.indexer.wq_b.weight"]
    sd["layers.9.attn.wkv.weight"] = torch.zeros(3)
    sd["layers.0.attn.wkv.weight"] = torch.zeros(5, 7)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert "1 tensors missing" in msg and "layers.1.attn.indexer.wq_b.weight" in msg
    assert "1 tensors unexpected" in msg and "layers.9.attn.wkv.weight" in msg
    assert "mis-shaped" in msg and "layers.0.attn.wkv.weight: checkpoint (5, 7)" in msg


def test_truncated_file_is_reported(model, tmp_path):
    path, _ = _official(model, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(path)


def test_fp8_weight_without_scale(model, tmp_path):
    save_checkpoint(model, tmp_path / "q", quantize=True)
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    del sd["layers.0.attn.wq_a.scale"]
    save_file(sd, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.0.attn.wq_a.weight"):
        load(tmp_path / "q")


def test_config_mismatch_and_bad_config(model, tmp_path):
    path, _ = _official(model, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "hidden_size": 96}))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load(path)
    (path / "config.json").write_text(json.dumps({**raw, "o_groups": 3}))
    with pytest.raises(CheckpointError, match="o_groups"):
        load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(path)
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a preset"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize("change, field", [
    (dict(head_dim=32, qk_rope_head_dim=48), "qk_rope_head_dim"),
    (dict(o_groups=3), "o_groups"),
    (dict(compress_ratios=[128, 4, 64, 4, 0]), "compress_ratios"),
    (dict(compress_ratios=[128, 4]), "compress_ratios"),
    (dict(index_topk=2000, max_position_embeddings=4096), "index_topk"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny").replace(**change)


def test_official_and_transformers_config_json(tmp_path):
    official = {"vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_nextn_predict_layers": 1,
                "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "routed_scaling_factor": 1.5,
                "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                 "beta_fast": 32, "beta_slow": 1}, "topk_method": "noaux_tc",
                "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}
    (tmp_path / "config.json").write_text(json.dumps(official))
    assert Config.from_json(tmp_path) == preset("flash").replace(quantization_config={"quant_method": "fp8"})
    transformers = pytest.importorskip("transformers", reason="transformers is the test-time oracle")
    saved = transformers.DeepseekV4Config(**hf.to_hf_config(preset("pro")))
    saved.save_pretrained(tmp_path / "hf")
    assert Config.from_json(tmp_path / "hf") == preset("pro")
    (tmp_path / "config.json").write_text(json.dumps({**official, "hiden_size": 1}))
    with pytest.raises(ConfigError, match="hidden_size"):
        Config.from_json(tmp_path)
