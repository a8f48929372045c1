"""The transformers (`DeepseekV4ForCausalLM`) checkpoint layout, mapped onto ours in this one place.

Our parameter names are the official release's keys; transformers renames them and stacks the routed
experts into two 3-D tensors. Both directions are pure key/tensor reshuffles (no numerics).
"""

from __future__ import annotations

import re

import torch

from .config import Config

# (official regex, transformers template) for the 1:1 renames; order matters only for readability.
_RENAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"head\.weight", "lm_head.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"hc_head_(fn|base|scale)", "model.hc_head.hc_{0}"),
    (r"layers\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.hc_(attn|ffn)_(fn|base|scale)", "model.layers.{0}.{1}_hc.{2}"),
    (r"layers\.(\d+)\.attn\.wq_a\.weight", "model.layers.{0}.self_attn.q_a_proj.weight"),
    (r"layers\.(\d+)\.attn\.q_norm\.weight", "model.layers.{0}.self_attn.q_a_norm.weight"),
    (r"layers\.(\d+)\.attn\.wq_b\.weight", "model.layers.{0}.self_attn.q_b_proj.weight"),
    (r"layers\.(\d+)\.attn\.wkv\.weight", "model.layers.{0}.self_attn.kv_proj.weight"),
    (r"layers\.(\d+)\.attn\.kv_norm\.weight", "model.layers.{0}.self_attn.kv_norm.weight"),
    (r"layers\.(\d+)\.attn\.wo_a\.weight", "model.layers.{0}.self_attn.o_a_proj.weight"),
    (r"layers\.(\d+)\.attn\.wo_b\.weight", "model.layers.{0}.self_attn.o_b_proj.weight"),
    (r"layers\.(\d+)\.attn\.attn_sink", "model.layers.{0}.self_attn.sinks"),
    (r"layers\.(\d+)\.attn\.compressor\.wkv\.weight", "model.layers.{0}.self_attn.compressor.kv_proj.weight"),
    (r"layers\.(\d+)\.attn\.compressor\.wgate\.weight", "model.layers.{0}.self_attn.compressor.gate_proj.weight"),
    (r"layers\.(\d+)\.attn\.compressor\.ape", "model.layers.{0}.self_attn.compressor.position_bias"),
    (r"layers\.(\d+)\.attn\.compressor\.norm\.weight", "model.layers.{0}.self_attn.compressor.kv_norm.weight"),
    (r"layers\.(\d+)\.attn\.indexer\.wq_b\.weight", "model.layers.{0}.self_attn.compressor.indexer.q_b_proj.weight"),
    (r"layers\.(\d+)\.attn\.indexer\.weights_proj\.weight",
     "model.layers.{0}.self_attn.compressor.indexer.scorer.weights_proj.weight"),
    (r"layers\.(\d+)\.attn\.indexer\.compressor\.wkv\.weight",
     "model.layers.{0}.self_attn.compressor.indexer.kv_proj.weight"),
    (r"layers\.(\d+)\.attn\.indexer\.compressor\.wgate\.weight",
     "model.layers.{0}.self_attn.compressor.indexer.gate_proj.weight"),
    (r"layers\.(\d+)\.attn\.indexer\.compressor\.ape", "model.layers.{0}.self_attn.compressor.indexer.position_bias"),
    (r"layers\.(\d+)\.attn\.indexer\.compressor\.norm\.weight",
     "model.layers.{0}.self_attn.compressor.indexer.kv_norm.weight"),
    (r"layers\.(\d+)\.ffn\.gate\.weight", "model.layers.{0}.mlp.gate.weight"),
    (r"layers\.(\d+)\.ffn\.gate\.bias", "model.layers.{0}.mlp.gate.e_score_correction_bias"),
    (r"layers\.(\d+)\.ffn\.gate\.tid2eid", "model.layers.{0}.mlp.gate.tid2eid"),
    (r"layers\.(\d+)\.ffn\.shared_experts\.w1\.weight", "model.layers.{0}.mlp.shared_experts.gate_proj.weight"),
    (r"layers\.(\d+)\.ffn\.shared_experts\.w2\.weight", "model.layers.{0}.mlp.shared_experts.down_proj.weight"),
    (r"layers\.(\d+)\.ffn\.shared_experts\.w3\.weight", "model.layers.{0}.mlp.shared_experts.up_proj.weight"),
]
_COMPILED = [(re.compile(src + "$"), dst) for src, dst in _RENAMES]
_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def official_to_hf_key(key: str) -> str | None:
    for pattern, template in _COMPILED:
        m = pattern.match(key)
        if m:
            return template.format(*m.groups())
    return None


# transformers-side names -> official names, applied in order to a key with its `model.` prefix removed.
# Tolerant on purpose: `save_pretrained` runs transformers' conversion backwards only for keys that were
# converted on load, so a saved file can mix both spellings (e.g. `self_attn.compressor.norm.weight`).
_TO_OFFICIAL = [(re.compile(a), b) for a, b in [
    (r"(^|\.)self_attn\.", r"\1attn."), (r"(^|\.)mlp\.", r"\1ffn."),
    (r"attn\.compressor\.indexer\.scorer\.weights_proj\.", "attn.indexer.weights_proj."),
    (r"attn\.compressor\.indexer\.q_b_proj\.", "attn.indexer.wq_b."),
    (r"attn\.compressor\.indexer\.", "attn.indexer.compressor."),
    (r"compressor\.kv_proj\.", "compressor.wkv."), (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"compressor\.position_bias$", "compressor.ape"), (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"attn\.q_a_proj\.", "attn.wq_a."), (r"attn\.q_a_norm\.", "attn.q_norm."), (r"attn\.q_b_proj\.", "attn.wq_b."),
    (r"attn\.kv_proj\.", "attn.wkv."), (r"attn\.o_a_proj\.", "attn.wo_a."), (r"attn\.o_b_proj\.", "attn.wo_b."),
    (r"attn\.sinks$", "attn.attn_sink"), (r"attn\.norm\.weight$", "attn.kv_norm.weight"),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"), (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"ffn\.gate\.e_score_correction_bias$", "ffn.gate.bias"),
    (r"shared_experts\.gate_proj\.", "shared_experts.w1."), (r"shared_experts\.down_proj\.", "shared_experts.w2."),
    (r"shared_experts\.up_proj\.", "shared_experts.w3."),
    (r"^embed_tokens\.weight$", "embed.weight"), (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
]]
_HF_EXPERTS = re.compile(r"layers\.(\d+)\.ffn\.experts\.(gate_up_proj|down_proj)$")


def hf_to_official_key(key: str) -> str | None:
    k = key.removeprefix("model.")
    for pattern, replacement in _TO_OFFICIAL:
        k = pattern.sub(replacement, k)
    return k if official_to_hf_key(k) is not None or _EXPERT.match(k) or _HF_EXPERTS.match(k) else None


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Official-layout tensors -> transformers layout. MTP weights have no transformers home: dropped."""
    out, experts = {}, {}
    for key, t in sd.items():
        if key.startswith("mtp."):
            continue
        m = _EXPERT.match(key)
        if m:
            experts[(int(m[1]), int(m[2]), m[3])] = t
            continue
        hf = official_to_hf_key(key)
        if hf is None:
            raise KeyError(f"no transformers name for checkpoint key {key!r}")
        out[hf] = t.long() if key.endswith("tid2eid") else t
    for layer in sorted({k[0] for k in experts}):
        E = config.n_routed_experts
        w1 = torch.stack([experts[(layer, e, "w1")] for e in range(E)])
        w3 = torch.stack([experts[(layer, e, "w3")] for e in range(E)])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat((w1, w3), dim=1)  # (E, 2I, d)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [experts[(layer, e, "w2")] for e in range(E)])  # (E, d, I)
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-layout tensors (in-memory names or what `save_pretrained` writes) -> official layout."""
    out = {}
    for key, t in sd.items():
        official = hf_to_official_key(key)
        if official is None:
            raise KeyError(f"unknown transformers checkpoint key {key!r}")
        m = _HF_EXPERTS.match(official)
        if not m:
            out[official] = t
        elif m[2] == "gate_up_proj":  # (E, 2I, d): gate rows then up rows
            w1, w3 = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"layers.{m[1]}.ffn.experts.{e}.w1.weight"] = w1[e]
                out[f"layers.{m[1]}.ffn.experts.{e}.w3.weight"] = w3[e]
        else:
            for e in range(t.shape[0]):
                out[f"layers.{m[1]}.ffn.experts.{e}.w2.weight"] = t[e]
    return out


def to_hf_config(config: Config) -> dict:
    """Our config as the dict `transformers.DeepseekV4Config(**d)` / its config.json expects."""
    c = config
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    compress = {"rope_type": "default", "rope_theta": c.compress_rope_theta,
                "partial_rotary_factor": c.qk_rope_head_dim / c.head_dim}
    if c.rope_scaling and c.rope_scaling.get("type", c.rope_scaling.get("rope_type")) == "yarn":
        compress.update({k: v for k, v in c.rope_scaling.items() if k not in ("type", "rope_type")})
        compress.update(rope_type="yarn", attention_factor=1.0)
    return dict(
        model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"],
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, moe_intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads, num_key_value_heads=1,
        head_dim=c.head_dim, q_lora_rank=c.q_lora_rank, num_experts_per_tok=c.num_experts_per_tok,
        n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts, scoring_func=c.scoring_func,
        norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
        layer_types=c.layer_types, compress_rates=rates, compress_rope_theta=c.compress_rope_theta,
        hc_mult=c.hc_mult, hc_sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps,
        mlp_layer_types=["hash_moe" if c.is_hash_layer(i) else "moe" for i in range(c.num_hidden_layers)],
        swiglu_limit=c.swiglu_limit, sliding_window=c.sliding_window, o_groups=c.o_groups,
        o_lora_rank=c.o_lora_rank, index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim,
        index_topk=c.index_topk, num_nextn_predict_layers=c.num_nextn_predict_layers, rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_word_embeddings,
        partial_rotary_factor=c.qk_rope_head_dim / c.head_dim, initializer_range=c.initializer_range,
        rope_parameters={"main": {"rope_type": "default", "rope_theta": c.rope_theta,
                                  "partial_rotary_factor": c.qk_rope_head_dim / c.head_dim},
                         "compress": compress},
    )
