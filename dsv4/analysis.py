"""`dsv4 analyze`: per-token inference FLOPs and KV-cache bytes as functions of context length.

Reproduces the report's Figure 1 (right) and §2.3.4: at a 1M-token context V4-Pro needs 27 % of the
single-token FLOPs and 10 % of the KV cache of DeepSeek-V3.2, V4-Flash 10 % / 7 %, and V4's KV cache is
about 2 % of a BF16 GQA-8 (head dim 128) model. docs/analysis.md explains every term and where our
numbers land.

Conventions (all stated in docs/analysis.md):
- "Single-token FLOPs at context L": decoding one token whose cache holds L earlier tokens; 2 FLOPs per
  multiply-add, matmuls and attention scores only (no softmax/norm/RoPE element-wise work); embedding
  lookup costs nothing; MTP modules are not counted (they are drafts, not part of one token's forward).
- The report measures FLOPs "in equivalent FP8 FLOPs" (§1): each term is weighted by FP8 peak / peak of
  its precision: BF16 x2, FP8 x1, FP4 weights x FP8 activations x1 ("currently the same peak as FP8 x FP8",
  §1), FP4 x FP4 (the V4 indexer QK path, §2.3.4) x0.5.
- KV bytes count what a serving cache holds per layer: compressed entries, indexer keys, the window ring
  and the compressor's unfinished-block state (§3.5.1), in the storage formats of the official kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsv4.config import Config, preset

# FP8-equivalent weight of one FLOP in each precision (H800/B200-class peaks: BF16 = FP8 / 2, FP4 = 2 x FP8).
PRECISION_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "fp4xfp8": 1.0, "fp4": 0.5}

KI, MI = 1024, 1024 * 1024
GIB, GB = 1024**3, 1e9  # Figure 1 labels its KV axis in GB
DEFAULT_CONTEXTS = (128 * KI, MI)  # "128K" and "1M" = max_position_embeddings = 2**20 tokens


# ---------------------------------------------------------------------- storage formats (bytes per entry)
@dataclass(frozen=True)
class KVFormat:
    """Bytes of one cached vector: FP8 / FP4 payload + BF16 RoPE dims + quantisation scales, padded to `align`."""

    fp8_dims: int
    bf16_dims: int = 0
    fp4_dims: int = 0
    scale_bytes: int = 0
    align: int = 1

    @property
    def bytes(self) -> int:
        raw = self.fp8_dims + 2 * self.bf16_dims + self.fp4_dims // 2 + self.scale_bytes
        return -(-raw // self.align) * self.align


def v4_kv_format(cfg: Config) -> KVFormat:
    # FlashMLA's V4 ("MODEL1") FP8 record: 448 FP8 nope dims, 64 BF16 RoPE dims, one UE8M0 scale byte per
    # 64 nope dims (7), padded to 8 bytes: 584 B. The reference quantises so: act_quant(kv[..., :-64], 64).
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    return KVFormat(fp8_dims=nope, bf16_dims=cfg.qk_rope_head_dim, scale_bytes=math.ceil(nope / 64), align=8)


def v4_indexer_key_format(cfg: Config) -> KVFormat:
    # FP4 (E2M1) indexer keys, one UE8M0 scale byte per 32 dims (fp4_act_quant block 32): 64 + 4 = 68 B.
    return KVFormat(fp8_dims=0, fp4_dims=cfg.index_head_dim, scale_bytes=cfg.index_head_dim // 32)


def indexer_key_format(cfg: Config, kind: str) -> KVFormat:
    """The cached indexer key: "fp4" (the release's path, 68 B) or "fp8" (128 E4M3 + an fp32 scale, 132 B,
    the paged cache's default)."""
    if kind == "fp4":
        return v4_indexer_key_format(cfg)
    if kind == "fp8":
        return KVFormat(fp8_dims=cfg.index_head_dim, scale_bytes=4)
    raise ValueError(f"index_keys={kind!r}: choose 'fp8' or 'fp4'")


# ---------------------------------------------------------------------- baselines
@dataclass
class V32Config:
    """DeepSeek-V3.2 (MLA + DSA), official config.json keys; defaults = the released model."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    first_k_dense_replace: int = 3
    intermediate_size: int = 18432
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    @property
    def mla_format(self) -> KVFormat:
        # FlashMLA "fp8_ds_mla": 512 FP8 latent + 4 FP32 scales (one per 128) + 64 BF16 RoPE = 656 B.
        return KVFormat(fp8_dims=self.kv_lora_rank, bf16_dims=self.qk_rope_head_dim,
                        scale_bytes=4 * (self.kv_lora_rank // 128))

    @property
    def indexer_key_format(self) -> KVFormat:
        # DSA indexer key cache: 128 FP8 + one FP32 scale = 132 B.
        return KVFormat(fp8_dims=self.index_head_dim, scale_bytes=4)


@dataclass
class GQAConfig:
    """BF16 GQA baseline (report §2.3.4: "BF16 GQA8 with a head dimension of 128").

    We give it the trunk of the V4 model it is compared with (layers, d, vocab, MoE), and replace only the
    attention: d / head_dim query heads, `num_key_value_heads` KV heads, dense attention over the whole
    context, K and V cached in BF16.
    """

    name: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    moe_flops: float  # raw FLOPs of one token's MoE block (taken from the V4 model), per layer
    num_key_value_heads: int = 8
    head_dim: int = 128
    kv_bytes_per_value: int = 2

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @classmethod
    def like(cls, cfg: Config, name: str) -> "GQAConfig":
        moe = sum(t.flops for t in _moe_terms(cfg, layer_id=cfg.num_hidden_layers - 1))
        return cls(name=name, num_hidden_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   vocab_size=cfg.vocab_size, moe_flops=moe)


# ---------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class Term:
    """One FLOP term of one token's forward, summed over layers; `flops` counts 2 per multiply-add."""

    name: str
    flops: float
    precision: str

    @property
    def fp8_equiv(self) -> float:
        return self.flops * PRECISION_WEIGHT[self.precision]


def _mm(n_in: int, n_out: int) -> float:
    return 2.0 * n_in * n_out


def _merge(terms: list[Term]) -> list[Term]:
    """Sum same-named terms (one per layer) into one term per component."""
    out: dict[str, Term] = {}
    for t in terms:
        old = out.get(t.name)
        out[t.name] = t if old is None else Term(t.name, old.flops + t.flops, t.precision)
    return list(out.values())


def _n_series(m: int) -> int:
    """CSA (m = 4) compresses two overlapping series C^a, C^b (§2.3.1); HCA one (§2.3.2)."""
    return 2 if m == 4 else 1


def _moe_terms(cfg: Config, layer_id: int) -> list[Term]:
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    terms = [
        # routed experts: FP4 weights x FP8 activations (§1: same peak as FP8 x FP8 today)
        Term("moe.routed", cfg.num_experts_per_tok * 3 * _mm(d, inter), "fp4xfp8"),
        Term("moe.shared", cfg.n_shared_experts * 3 * _mm(d, inter), "fp8"),
    ]
    if not cfg.is_hash_layer(layer_id):  # hash layers look experts up by token id, no router matmul
        terms.append(Term("moe.router", _mm(d, cfg.n_routed_experts), "bf16"))
    return terms


def _mhc_terms(cfg: Config) -> list[Term]:
    # Per sublayer: dynamic A, B, C from the flattened stream (n_hc*d -> 2n_hc + n_hc^2), read-in (A),
    # stream mixing (B) and write-back (C); two sublayers per block. Vector work, counted at BF16 weight.
    n, d = cfg.hc_mult, cfg.hidden_size
    per_sublayer = _mm(n * d, 2 * n + n * n) + 2.0 * d * (n + n * n + n)
    return [Term("mhc", 2 * per_sublayer, "bf16")]


def v4_flops_terms(cfg: Config, ctx: int) -> list[Term]:
    """FP8-taggable FLOP terms of one V4 decode step with `ctx` tokens already cached."""
    d, c, nh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    terms: list[Term] = []
    for layer_id, m in enumerate(cfg.layer_ratios):
        terms += [
            Term("attn.q_proj", _mm(d, cfg.q_lora_rank) + _mm(cfg.q_lora_rank, nh * c), "fp8"),
            Term("attn.kv_proj", _mm(d, c), "fp8"),  # window KV of this token
            # grouped output projection: g groups of (nh/g)*c -> d_g, then g*d_g -> d (§2.3.1)
            Term("attn.o_proj", _mm(nh * c, cfg.o_lora_rank) + _mm(cfg.o_groups * cfg.o_lora_rank, d), "fp8"),
        ]
        n_keys = min(ctx, cfg.sliding_window)
        if m:
            coff = _n_series(m)
            # token-level compressor: KV and gate projections of every token (BF16 in the checkpoint) and
            # the softmax-weighted pooling of coff*m rows per entry, amortised over the m tokens of a block
            terms.append(Term("compressor", 2 * _mm(d, coff * c) + 2.0 * coff * m * c / m, "bf16"))
            n_comp = ctx // m
            n_keys += min(cfg.index_topk, n_comp) if m == 4 else n_comp
        if m == 4:
            ni, ci = cfg.index_n_heads, cfg.index_head_dim
            terms += [
                Term("indexer.q_proj", _mm(cfg.q_lora_rank, ni * ci), "fp8"),
                Term("indexer.weights", _mm(d, ni), "bf16"),
                Term("indexer.compressor", 2 * _mm(d, 2 * ci) + 2.0 * 2 * m * ci / m, "bf16"),
                # score every finished compressed entry: sum_h w_h ReLU(q_h . k_s), QK in FP4 (§2.3.4)
                Term("indexer.scores", 2.0 * ni * ci * (ctx // m), "fp4"),
                Term("indexer.head_sum", 2.0 * ni * (ctx // m), "bf16"),
            ]
        # shared-KV MQA: QK over all c dims and AV over all c dims, every head (§2.3.1)
        terms.append(Term("attn.core", 2 * 2.0 * nh * c * n_keys, "bf16"))
        terms += _moe_terms(cfg, layer_id) + _mhc_terms(cfg)
    terms.append(Term("head", _mm(d, cfg.vocab_size), "bf16"))
    return _merge(terms)


def v32_flops_terms(v: V32Config, ctx: int) -> list[Term]:
    """V3.2 decode step, MLA in its absorbed (weight-folded) form as served, DSA top-k over all tokens."""
    d, nh, r = v.hidden_size, v.num_attention_heads, v.kv_lora_rank
    terms: list[Term] = []
    for layer_id in range(v.num_hidden_layers):
        terms += [
            Term("attn.q_proj", _mm(d, v.q_lora_rank)
                 + _mm(v.q_lora_rank, nh * (v.qk_nope_head_dim + v.qk_rope_head_dim)), "fp8"),
            Term("attn.kv_proj", _mm(d, r + v.qk_rope_head_dim), "fp8"),
            # absorbed W^UK (q_nope -> latent) and W^UV (latent -> v), per head, BF16 BMMs
            Term("attn.absorb", nh * (_mm(v.qk_nope_head_dim, r) + _mm(r, v.v_head_dim)), "bf16"),
            Term("attn.o_proj", _mm(nh * v.v_head_dim, d), "fp8"),
            Term("indexer.q_proj", _mm(v.q_lora_rank, v.index_n_heads * v.index_head_dim), "fp8"),
            Term("indexer.k_proj", _mm(d, v.index_head_dim), "fp8"),
            Term("indexer.weights", _mm(d, v.index_n_heads), "bf16"),
            # DSA scores every cached token, FP8 (DeepGEMM fp8_mqa_logits)
            Term("indexer.scores", 2.0 * v.index_n_heads * v.index_head_dim * ctx, "fp8"),
            Term("indexer.head_sum", 2.0 * v.index_n_heads * ctx, "bf16"),
            # MQA over the 576-dim latent (QK) and 512-dim latent (AV) of the top-k tokens
            Term("attn.core", 2.0 * nh * (2 * r + v.qk_rope_head_dim) * min(ctx, v.index_topk), "bf16"),
        ]
        if layer_id < v.first_k_dense_replace:
            terms.append(Term("mlp.dense", 3 * _mm(d, v.intermediate_size), "fp8"))
        else:
            terms += [
                Term("moe.routed", v.num_experts_per_tok * 3 * _mm(d, v.moe_intermediate_size), "fp8"),
                Term("moe.shared", v.n_shared_experts * 3 * _mm(d, v.moe_intermediate_size), "fp8"),
                Term("moe.router", _mm(d, v.n_routed_experts), "bf16"),
            ]
    terms.append(Term("head", _mm(d, v.vocab_size), "bf16"))
    return _merge(terms)


def gqa_flops_terms(g: GQAConfig, ctx: int) -> list[Term]:
    d, hq, hk, hd = g.hidden_size, g.num_attention_heads, g.num_key_value_heads, g.head_dim
    L = g.num_hidden_layers
    return [
        Term("attn.qkvo_proj", L * (_mm(d, hq * hd) + 2 * _mm(d, hk * hd) + _mm(hq * hd, d)), "fp8"),
        Term("attn.core", L * 2 * 2.0 * hq * hd * ctx, "bf16"),
        Term("moe", L * g.moe_flops, "fp8"),
        Term("head", _mm(d, g.vocab_size), "bf16"),
    ]


# ---------------------------------------------------------------------- KV cache
def v4_kv_terms(cfg: Config, ctx: int) -> dict[str, float]:
    """Bytes of one sequence's cache at `ctx` tokens, by kind, summed over layers (§3.5.1, Figure 6)."""
    entry, ikey = v4_kv_format(cfg).bytes, v4_indexer_key_format(cfg).bytes
    out = {"window": 0.0, "compressed": 0.0, "indexer_keys": 0.0, "compressor_state": 0.0}
    for m in cfg.layer_ratios:
        # window ring of the last n_win uncompressed entries, same FP8/BF16 record as compressed ones
        out["window"] += min(ctx, cfg.sliding_window) * entry
        if not m:
            continue
        coff = _n_series(m)
        out["compressed"] += (ctx // m) * entry
        # unfinished block(s): FP32 KV and gate-score rows of shape (coff*m, coff*c), pre-allocated
        out["compressor_state"] += 2 * (coff * m) * (coff * cfg.head_dim) * 4
        if m == 4:
            out["indexer_keys"] += (ctx // m) * ikey
            out["compressor_state"] += 2 * (2 * m) * (2 * cfg.index_head_dim) * 4
    return out


def v32_kv_terms(v: V32Config, ctx: int) -> dict[str, float]:
    L = v.num_hidden_layers
    return {"mla_latent": L * ctx * v.mla_format.bytes, "indexer_keys": L * ctx * v.indexer_key_format.bytes}


def gqa_kv_terms(g: GQAConfig, ctx: int) -> dict[str, float]:
    per_token_layer = 2 * g.num_key_value_heads * g.head_dim * g.kv_bytes_per_value  # K and V
    return {"kv": g.num_hidden_layers * ctx * per_token_layer}


# ---------------------------------------------------------------------- the models of Figure 1
# The presets carry the released layer schedules (report §4.2.1, official config.json).


@dataclass
class Model:
    name: str
    flops_terms: Callable[[int], list[Term]]
    kv_terms: Callable[[int], dict[str, float]]
    gqa: str | None = None  # name of the GQA-8 model with the same trunk (layers, d)

    def flops(self, ctx: int) -> float:
        return sum(t.fp8_equiv for t in self.flops_terms(ctx))

    def kv_bytes(self, ctx: int) -> float:
        return sum(self.kv_terms(ctx).values())


def default_models(pro: Config | None = None, flash: Config | None = None,
                   v32: V32Config | None = None) -> dict[str, Model]:
    pro, flash, v32 = pro or preset("pro"), flash or preset("flash"), v32 or V32Config()
    gp, gf = GQAConfig.like(pro, "GQA-8 (Pro)"), GQAConfig.like(flash, "GQA-8 (Flash)")
    models = [
        # V3.2 has Pro's trunk (61 layers, d 7168), so it is compared with the Pro-trunk GQA-8
        Model("DeepSeek-V3.2", lambda n: v32_flops_terms(v32, n), lambda n: v32_kv_terms(v32, n), gqa=gp.name),
        Model("V4-Pro", lambda n: v4_flops_terms(pro, n), lambda n: v4_kv_terms(pro, n), gqa=gp.name),
        Model("V4-Flash", lambda n: v4_flops_terms(flash, n), lambda n: v4_kv_terms(flash, n), gqa=gf.name),
        Model(gp.name, lambda n: gqa_flops_terms(gp, n), lambda n: gqa_kv_terms(gp, n)),
        Model(gf.name, lambda n: gqa_flops_terms(gf, n), lambda n: gqa_kv_terms(gf, n)),
    ]
    return {m.name: m for m in models}


BASELINE = "DeepSeek-V3.2"
REPORT_1M = {"V4-Pro": {"flops_vs_v32": 0.27, "kv_vs_v32": 0.10, "kv_vs_gqa8": 0.02},
             "V4-Flash": {"flops_vs_v32": 0.10, "kv_vs_v32": 0.07, "kv_vs_gqa8": 0.02}}


def analyse(models: dict[str, Model], contexts: list[int]) -> dict:
    """Every number the CLI prints, as one JSON-ready dict."""
    rows = []
    for ctx in contexts:
        base_f, base_kv = models[BASELINE].flops(ctx), models[BASELINE].kv_bytes(ctx)
        for m in models.values():
            terms = m.flops_terms(ctx)
            f, kv = sum(t.fp8_equiv for t in terms), m.kv_bytes(ctx)
            gqa = models[m.gqa] if m.gqa else None
            rows.append({
                "model": m.name, "context": ctx,
                "flops": f, "flops_raw": sum(t.flops for t in terms),
                "kv_bytes": kv, "kv_gb": kv / GB, "kv_gib": kv / GIB,
                "flops_vs_v32": f / base_f, "kv_vs_v32": kv / base_kv,
                "flops_vs_gqa8": f / gqa.flops(ctx) if gqa else None,
                "kv_vs_gqa8": kv / gqa.kv_bytes(ctx) if gqa else None,
                "gqa8": m.gqa,
                "flops_terms": {t.name: t.fp8_equiv for t in terms},
                "kv_terms": m.kv_terms(ctx),
            })
    return {
        "units": {"flops": "equivalent FP8 FLOPs per token", "kv": "bytes per sequence, all layers",
                  "context": "tokens (1M = 2**20)"},
        "precision_weight": PRECISION_WEIGHT,
        "report_1m": REPORT_1M,
        "rows": rows,
    }


# ---------------------------------------------------------------------- CLI
def parse_context(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": KI, "M": MI}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"context {text!r}: use a token count like 131072, 128K or 1M") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"context {text!r} must be at least 1 token")
    return int(n)


def _fmt_ctx(n: int) -> str:
    return f"{n // MI}M" if n % MI == 0 else f"{n // KI}K" if n % KI == 0 else str(n)


def add_analyze_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", nargs="+", type=parse_context, default=list(DEFAULT_CONTEXTS),
                        metavar="N", help="context lengths for the table (tokens; 128K, 1M, ... accepted)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--plot", default="analysis.png", metavar="PATH",
                        help="where to save the 2-panel PNG (FLOPs and KV vs context); default analysis.png")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--pro-config", type=Path, metavar="PATH", help="official V4-Pro config.json (default: released_config('pro'))")
    parser.add_argument("--flash-config", type=Path, metavar="PATH",
                        help="official V4-Flash config.json (default: released_config('flash'))")


def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f} %"


def _print_table(result: dict, contexts: list[int]) -> None:
    header = ["model", "context", "FLOPs/token", "KV cache", "FLOPs/V3.2", "KV/V3.2", "FLOPs/GQA-8", "KV/GQA-8"]
    body = [[r["model"], _fmt_ctx(r["context"]), f"{r['flops'] / 1e9:,.1f} G", f"{r['kv_gb']:,.2f} GB",
             _pct(r["flops_vs_v32"]), _pct(r["kv_vs_v32"]), _pct(r["flops_vs_gqa8"]), _pct(r["kv_vs_gqa8"], 2)]
            for r in result["rows"]]
    rep = result["report_1m"]
    note = ("FLOPs in equivalent FP8 FLOPs (BF16 x2, FP8 x1, FP4 weights x1, FP4 x FP4 x0.5); KV in GB = 1e9 B; "
            "GQA-8 = BF16 GQA-8 (head dim 128) on the same trunk.\n"
            f"Report at 1M: V4-Pro {rep['V4-Pro']['flops_vs_v32']:.0%} FLOPs / {rep['V4-Pro']['kv_vs_v32']:.0%} KV "
            f"of V3.2, V4-Flash {rep['V4-Flash']['flops_vs_v32']:.0%} / {rep['V4-Flash']['kv_vs_v32']:.0%}, V4 KV "
            f"~{rep['V4-Pro']['kv_vs_gqa8']:.0%} of GQA-8. Term by term: docs/analysis.md")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        for line in [header, *body]:
            print("  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w)
                            for i, (x, w) in enumerate(zip(line, widths))))
        print(note)
        return
    table = Table(title="Single-token inference FLOPs and KV cache (report Figure 1, right)", caption=note)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    per_ctx = len(body) // len(contexts)
    for i, line in enumerate(body):
        table.add_row(*line, end_section=(i + 1) % per_ctx == 0)
    console = Console()
    console.width = max(console.width, 110)  # piped output defaults to 80 columns, too narrow for 8 columns
    console.print(table)


def plot(models: dict[str, Model], path: str | Path, lo: int = 4 * KI, hi: int = MI) -> Path:
    """Two panels, log-x from `lo` to `hi`: FLOPs per token and KV cache per sequence vs context."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in tests and servers

    xs = [int(lo * (hi / lo) ** (i / 64)) for i in range(65)]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_f, ax_kv = fig.subplots(1, 2)
    styles = {"DeepSeek-V3.2": "k-", "V4-Pro": "C0-", "V4-Flash": "C1-"}
    for name, m in models.items():
        style = styles.get(name, "C3--" if "Pro" in name else "C3:")
        ax_f.plot(xs, [m.flops(x) / 1e12 for x in xs], style, label=name)
        ax_kv.plot(xs, [m.kv_bytes(x) / GB for x in xs], style, label=name)
    for ax, title, unit in ((ax_f, "Single-token FLOPs", "TFLOPs (FP8-equivalent)"),
                            (ax_kv, "Accumulated KV cache", "GB per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([4 * KI, 16 * KI, 64 * KI, 256 * KI, MI], ["4K", "16K", "64K", "256K", "1M"])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_kv.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def run_analyze(args: argparse.Namespace) -> int:
    pro = Config.from_json(args.pro_config) if getattr(args, "pro_config", None) else None
    flash = Config.from_json(args.flash_config) if getattr(args, "flash_config", None) else None
    models = default_models(pro=pro, flash=flash)
    contexts = list(args.contexts)
    result = analyse(models, contexts)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result, contexts)
    if not getattr(args, "no_plot", False):
        path = plot(models, args.plot)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.analysis", description=__doc__.split("\n")[0])
    add_analyze_args(parser)
    return run_analyze(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
