"""`dsv4 info`: what a config amounts to — parameters (total / active per token), layer types, KV bytes."""

from __future__ import annotations

from collections import Counter

from .analysis import indexer_key_format, v4_kv_format
from .config import Config


def parameter_counts(c: Config) -> dict[str, int]:
    """Parameter counts from the config alone (no model is built; V4-Pro has 1.6T).

    `active` counts what one token uses: everything but the routed experts it is not sent to; the MTP
    blocks are counted separately (they run only for training and drafting)."""
    d, H, D = c.hidden_size, c.num_attention_heads, c.head_dim
    expert = 3 * d * c.moe_intermediate_size
    hc = (2 + c.hc_mult) * c.hc_mult
    mhc = 2 * (hc * c.hc_mult * d + hc + 3)

    def block(ratio: int, hashed: bool) -> tuple[int, int]:
        attn = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * D + d * D + D
                + H * D * c.o_lora_rank + c.o_groups * c.o_lora_rank * d + H)
        if ratio:
            width = 2 * D if ratio == 4 else D
            attn += 2 * d * width + ratio * width + D
        if ratio == 4:
            di = c.index_head_dim
            attn += c.q_lora_rank * c.index_n_heads * di + d * c.index_n_heads + 2 * d * 2 * di + 4 * 2 * di + di
        router = c.n_routed_experts * d
        shared = expert * c.n_shared_experts
        dense = attn + router + shared + 2 * d + mhc
        return dense + c.n_routed_experts * expert, dense + c.num_experts_per_tok * expert

    total = active = 0
    for i, r in enumerate(c.layer_ratios):
        t, a = block(r, c.is_hash_layer(i))
        total, active = total + t, active + a
    outer = c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + d + c.hc_mult * c.hc_mult * d + c.hc_mult + 1
    mtp_t, _ = block(0, False)
    mtp = c.num_nextn_predict_layers * (mtp_t + 2 * d * d + 3 * d + c.hc_mult * c.hc_mult * d + c.hc_mult + 1)
    return {"total": total + outer, "active": active + outer, "mtp": mtp}


def kv_bytes_per_token(c: Config, index_keys: str = "fp8") -> dict[str, float]:
    """Cached bytes per token of context, by layer type, in the compact layout of the paged cache
    (`dsv4.kernels.paged_cache`, same default): 584 B per KV entry (448 FP8 dims + 64 BF16 RoPE dims +
    scales) and FP8 (132 B) or FP4 (68 B) indexer keys, excluding the constant-size window."""
    entry, key = v4_kv_format(c).bytes, indexer_key_format(c, index_keys).bytes
    out = Counter()
    for r in c.layer_ratios:
        if r == 4:
            out["compressed_sparse_attention"] += (entry + key) / 4
        elif r == 128:
            out["heavily_compressed_attention"] += entry / 128
    out["total"] = sum(out.values())
    out["window_bytes_per_sequence"] = len(c.layer_ratios) * c.sliding_window * entry
    return dict(out)


def describe(c: Config, index_keys: str = "fp8") -> dict:
    return {"parameters": parameter_counts(c), "layer_types": dict(Counter(c.layer_types)),
            "hash_layers": c.num_hash_layers, "mtp_blocks": c.num_nextn_predict_layers,
            "kv_bytes_per_token": kv_bytes_per_token(c, index_keys), "index_keys": index_keys,
            "context": c.max_position_embeddings}
