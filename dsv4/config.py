"""Model configuration: one dataclass whose field names are the official `config.json` keys.

`Config.from_json` reads both the official release's config.json and the one transformers'
`DeepseekV4Config.save_pretrained` writes (which renames a few keys: `layer_types`, `compress_rates`,
`mlp_layer_types`, `rope_parameters`, `partial_rotary_factor`); both map onto the fields below.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config field is missing, unknown or inconsistent; the message names the field."""


# Attention type per layer is given by its compression ratio (official `compress_ratios`):
# 0 = sliding window only, 4 = CSA (§2.3.1), 128 = HCA (§2.3.2).
LAYER_TYPE_OF_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


@dataclass
class Config:
    # --- embedding / trunk
    vocab_size: int = 129280
    hidden_size: int = 4096  # d
    num_hidden_layers: int = 43
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    max_position_embeddings: int = 1048576
    # --- attention (§2.3): shared-KV MQA, low-rank queries, grouped output projection
    num_attention_heads: int = 64  # n_h
    head_dim: int = 512  # c: one KV head of this size is key and value
    qk_rope_head_dim: int = 64  # RoPE on the last 64 dims only
    q_lora_rank: int = 1024  # d_c
    o_groups: int = 8  # g
    o_lora_rank: int = 1024  # d_g
    sliding_window: int = 128  # n_win
    rope_theta: float = 10000.0  # RoPE base of sliding-only layers
    compress_rope_theta: float = 160000.0  # RoPE base of CSA / HCA layers and their compressed entries
    rope_scaling: dict | None = None  # YaRN for the compressed layers, e.g. {"type": "yarn", "factor": 16, ...}
    # --- CSA / HCA (§2.3.1-2.3.2)
    # Per layer, then per MTP block (official: num_hidden_layers + num_nextn_predict_layers entries):
    # 0 = window only, 4 = CSA, 128 = HCA. None = V4-Flash's schedule. MTP blocks are always 0.
    compress_ratios: list[int] | None = None
    index_n_heads: int = 64  # lightning indexer heads n_h^I
    index_head_dim: int = 128  # c^I
    index_topk: int = 512  # k compressed entries per query
    # --- mHC (§2.2)
    hc_mult: int = 4  # n_hc residual streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- MoE (§2.1)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    num_hash_layers: int = 3  # first MoE layers route by a fixed token-id -> expert table
    swiglu_limit: float = 10.0  # SwiGLU clamp: linear part to [-l, l], gate <= l
    # --- MTP
    num_nextn_predict_layers: int = 1
    # --- init (used for random checkpoints and training)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # Official checkpoints describe FP8/FP4 packing here; kept as given.
    quantization_config: dict | None = None

    def __post_init__(self):
        if self.compress_ratios is None:
            self.compress_ratios = default_compress_ratios(self.num_hidden_layers)
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        if len(self.compress_ratios) == self.num_hidden_layers:  # transformers truncates the MTP entries
            self.compress_ratios += [0] * self.num_nextn_predict_layers
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def layer_ratios(self) -> list[int]:
        """Compression ratio of each trunk layer (without the MTP blocks' entries)."""
        return self.compress_ratios[:self.num_hidden_layers]

    @property
    def layer_types(self) -> list[str]:
        return [LAYER_TYPE_OF_RATIO[r] for r in self.layer_ratios]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.num_hash_layers

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field `{name}`: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "hc_mult", "n_routed_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "index_n_heads", "index_head_dim",
                     "index_topk", "hc_sinkhorn_iters"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(0 < self.qk_rope_head_dim <= self.head_dim and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even and at most head_dim ({self.head_dim}), got {self.qk_rope_head_dim}")
        need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
             f"must hold the {self.qk_rope_head_dim} RoPE dims, got {self.index_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"{self.o_groups} groups do not divide num_attention_heads={self.num_attention_heads}")
        n_total = self.num_hidden_layers + self.num_nextn_predict_layers
        need(len(self.compress_ratios) == n_total, "compress_ratios",
             f"has {len(self.compress_ratios)} entries; expected num_hidden_layers + num_nextn_predict_layers"
             f" = {n_total}")
        need(all(r == 0 for r in self.compress_ratios[self.num_hidden_layers:]), "compress_ratios",
             "MTP blocks (the trailing entries) must be window-only (0)")
        bad = sorted({r for r in self.compress_ratios if r not in LAYER_TYPE_OF_RATIO})
        need(not bad, "compress_ratios", f"unknown layer type(s) {bad}; allowed ratios are 0 (window), 4 (CSA), "
             "128 (HCA)")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             f"must be in [0, num_hidden_layers], got {self.num_hash_layers}")
        need(self.n_shared_experts in (0, 1), "n_shared_experts", f"must be 0 or 1, got {self.n_shared_experts}")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func",
             f"only 'sqrtsoftplus' (V4) is implemented, got {self.scoring_func!r}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if 4 in self.compress_ratios:
            most = self.max_position_embeddings // 4
            need(self.index_topk <= most, "index_topk",
                 f"{self.index_topk} is larger than the {most} compressed entries a "
                 f"{self.max_position_embeddings}-token context can hold")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))
            need(kind in ("yarn", "default"), "rope_scaling", f"type {kind!r} is not supported (yarn or default)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    need(key in self.rope_scaling, "rope_scaling", f"yarn needs `{key}`")

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        # transformers' save_pretrained spelling -> official spelling
        if "layer_types" in raw and "compress_ratios" not in raw:
            rates = raw.get("compress_rates") or {"compressed_sparse_attention": 4,
                                                  "heavily_compressed_attention": 128}
            rates = {**rates, "sliding_attention": 0}
            try:
                raw["compress_ratios"] = [rates[t] for t in raw["layer_types"]]
            except KeyError as e:
                raise ConfigError(f"config field `layer_types`: unknown layer type {e.args[0]!r}") from None
            if any(r not in (0, 4, 128) for r in raw["compress_ratios"]):
                raise ConfigError(f"config field `compress_rates`: only 4 (CSA) and 128 (HCA) are supported, "
                                  f"got {rates}")
        if "mlp_layer_types" in raw and "num_hash_layers" not in raw:
            types = raw["mlp_layer_types"]
            n_hash = sum(1 for t in types if t == "hash_moe")
            if types[:n_hash] != ["hash_moe"] * n_hash:
                raise ConfigError("config field `mlp_layer_types`: hash_moe layers must come first")
            raw["num_hash_layers"] = n_hash
        if "partial_rotary_factor" in raw and "qk_rope_head_dim" not in raw and raw["partial_rotary_factor"]:
            raw["qk_rope_head_dim"] = int(raw.get("head_dim", 512) * raw["partial_rotary_factor"])
        rp = raw.get("rope_parameters")
        if isinstance(rp, dict) and "rope_scaling" not in raw:
            comp = rp.get("compress", {})
            if comp.get("rope_type", "default") == "yarn":
                raw["rope_scaling"] = {k: v for k, v in comp.items()
                                       if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")}
                raw["rope_scaling"]["type"] = raw["rope_scaling"].pop("rope_type")
            if "rope_theta" in rp.get("main", {}):
                raw.setdefault("rope_theta", rp["main"]["rope_theta"])
            if "rope_theta" in comp:
                raw.setdefault("compress_rope_theta", comp["rope_theta"])
        if isinstance(raw.get("eos_token_id"), list):
            raw["eos_token_id"] = raw["eos_token_id"][0]
        # Keys of other tools (architectures, torch_dtype, transformers_version, ...) are ignored on purpose;
        # a misspelt *model* key would silently take its default, so we reject names close to ours.
        for consumed in ("layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor", "rope_parameters"):
            raw.pop(consumed, None)
        unknown = [k for k in raw if k not in known]
        near = [k for k in unknown if _near_miss(k, known)]
        if near:
            raise ConfigError(f"unknown config field(s) {near}; did you mean one of "
                              f"{[_near_miss(k, known) for k in near]}?")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def _near_miss(name: str, known: set[str]) -> str | None:
    import difflib

    hit = difflib.get_close_matches(name, known, n=1, cutoff=0.88)
    return hit[0] if hit else None


def default_compress_ratios(n_layers: int, first: int = 0) -> list[int]:
    """The released schedule: two layers of type `first` (V4-Flash: window-only, V4-Pro: HCA), then
    CSA / HCA alternating, ending on CSA (official config.json files)."""
    rest = [4 if i % 2 == 0 else 128 for i in range(max(n_layers - 2, 0))]
    return ([first] * min(n_layers, 2) + rest)[:n_layers]


def yarn_inv_freq(dim: int, base: float, scaling: dict | None) -> "torch.Tensor":
    """Inverse RoPE frequencies for `dim` rotary dims; YaRN-scaled when `scaling` says so.

    V4 applies no YaRN attention-magnitude factor (mscale = 1), only the frequency interpolation.
    """
    import torch

    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not scaling or scaling.get("type", scaling.get("rope_type")) != "yarn":
        return freq
    factor = float(scaling["factor"])
    orig = float(scaling["original_max_position_embeddings"])
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp = 0 keeps the original (high) frequency, ramp = 1 interpolates by `factor`.
    return freq / factor * ramp + freq * (1 - ramp)


# ---------------------------------------------------------------------- presets
def _flash() -> Config:
    return Config(rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                "beta_fast": 32, "beta_slow": 1})


def _pro() -> Config:
    return Config(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                  o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, index_topk=1024,
                  routed_scaling_factor=2.5, compress_ratios=default_compress_ratios(61, first=128) + [0],
                  rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                "beta_fast": 32, "beta_slow": 1})


def _tiny() -> Config:
    # Every component on, small enough for CPU tests: CSA with real top-k selection, HCA, a window
    # shorter than the test sequences, hash + learned routing, mHC with 4 streams, MTP.
    return Config(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
                  qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
                  compress_ratios=[128, 4, 128, 4], index_n_heads=2, index_head_dim=16, index_topk=3,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1,
                  max_position_embeddings=65536, compress_rope_theta=160000.0)


def _small() -> Config:
    # The demo / CPU-training model (~10M parameters): real tokenizer vocabulary.
    return Config(vocab_size=129280, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
                  qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=32,
                  compress_ratios=[128, 4, 128, 4], index_n_heads=4, index_head_dim=32, index_topk=16,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=1,
                  max_position_embeddings=65536, tie_word_embeddings=False)


PRESETS = {"flash": _flash, "pro": _pro, "tiny": _tiny, "small": _small}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
