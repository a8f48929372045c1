"""The DeepSeek-V4 transformer, leaves first, root last.

Block (§2): x (B, S, n_hc, d) --mHC--> attention (CSA / HCA / window) --mHC--> MoE.
Transformer: embed -> copy into n_hc streams -> blocks -> merge streams (hc_head) -> RMSNorm -> head.
Parameter names are the official checkpoint keys, so official weights load without a renaming table.
One model serves training and inference: all inference state lives in the `KVCache` passed in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .block import Block
from .cache import AttnView, KVCache
from .config import Config, yarn_inv_freq
from .hooks import TrainStep
from .layers import Linear, RMSNorm
from .mhc import hc_head_collapse
from .moe import Experts
from .mtp import MTP
from .paged import PagedBatch


class Transformer(nn.Module):
    def __init__(self, config: Config, seed: int = 0):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = Linear(c.hidden_size, c.vocab_size)
        self.mtp = nn.ModuleList(MTP(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers))
        n = c.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * c.hidden_size))
        self.hc_head_base = nn.Parameter(torch.zeros(n))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.register_buffer("inv_freq_main", torch.empty(c.qk_rope_head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_compress", torch.empty(c.qk_rope_head_dim // 2), persistent=False)
        self.reset_rope()
        if self.embed.weight.device.type != "meta":  # built on meta when a checkpoint will fill it
            init_weights(self, seed)

    def reset_rope(self) -> None:
        """(Re)compute the RoPE frequencies (also after building the model on the meta device).

        Sliding-only layers use `rope_theta`; CSA / HCA layers, their compressed entries and the indexer
        use `compress_rope_theta` with YaRN (as transformers' V4 does)."""
        c, device = self.config, self.embed.weight.device
        if device.type == "meta":  # filled by the checkpoint loader, which calls this again
            return
        self.inv_freq_main = yarn_inv_freq(c.qk_rope_head_dim, c.rope_theta, None).to(device)
        self.inv_freq_compress = yarn_inv_freq(c.qk_rope_head_dim, c.compress_rope_theta, c.rope_scaling).to(device)

    def to_dtype(self, dtype: torch.dtype) -> "Transformer":
        """Cast to `dtype`, keeping in fp32 what the release keeps in fp32 (norms, mHC, sinks, slot biases,
        router bias): they are tiny and precision-sensitive."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | list[KVCache] | None = None,
                doc_ids: torch.Tensor | None = None, return_hidden: bool = False,
                step: TrainStep | None = None,
                last_only: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, S) -> logits (B, S, vocab) in fp32.

        cache: None (the tokens are whole sequences from position 0), one `KVCache` the whole batch
        continues, one per row (rows at different positions: batched decoding of many sequences), or a
        `dsv4.paged.PagedBatch` (rows continue slots of the compact FP8 paged pool).
        doc_ids (B, S), without a cache: packed documents; a token attends only within its document,
        whose positions restart at 0 (sample-level attention masking, §3.1).
        `return_hidden` also returns the final streams (B, S, n_hc, d) that the MTP blocks consume.
        `step`: training switches and measurements (`dsv4.hooks.TrainStep`); None for inference.
        `last_only`: logits of the last position only (B, 1, vocab): prefill needs no more, and a chunk's
        full logits are S x vocab fp32 (1 GiB per 2K tokens at V4's vocabulary).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        self._check_ids(input_ids)
        if isinstance(cache, PagedBatch):
            if doc_ids is not None or step is not None:
                raise ValueError("the paged cache is for inference: no doc_ids / training step")
            cache.begin(input_ids, self.config.max_position_embeddings)
            views = cache
        else:
            views = self._views(input_ids, cache, doc_ids, lambda c: c.length)
        if step is not None and step.checkpoint and torch.is_grad_enabled() and cache is not None:
            raise ValueError("activation checkpointing is for training (no cache)")
        x = self.streams(input_ids, views, step)
        if isinstance(views, PagedBatch):
            views.advance()
        else:
            for v in views:
                v.cache.length = int(v.positions[-1]) + 1
        logits = self.logits(x[:, -1:] if last_only else x)
        return (logits, x) if return_hidden else logits

    def streams(self, input_ids: torch.Tensor, views, step: TrainStep | None = None) -> torch.Tensor:
        """Embedding and every layer, nothing else: input_ids (B, S) over prepared cache `views` -> the final
        streams (B, S, n_hc, d). `forward` wraps it with its checks and cache bookkeeping; a captured decode
        step (`dsv4.engine.graphs`) calls it alone, since those sync with the host."""
        x = self.embed(input_ids).unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            inv_freq = self.inv_freq_compress if layer.attn.ratio else self.inv_freq_main
            if step is not None and step.checkpoint and torch.is_grad_enabled():
                x = checkpoint(_fresh_layer, layer, x, input_ids, views, inv_freq, step, use_reentrant=False)
            else:
                x = layer(x, input_ids, views, inv_freq, step)
        return x

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache | list[KVCache] | None = None,
                   doc_ids: torch.Tensor | None = None, depth: int = 0, step: TrainStep | None = None) -> torch.Tensor:
        """Logits of MTP block `depth` for the token after next.

        hidden: the trunk's final streams for positions p..p+S-1 (from `forward(..., return_hidden=True)`),
        next_ids: the tokens at p+1..p+S; cache / doc_ids as in `forward` (the MTP block keeps its own
        window in the cache and continues like the trunk)."""
        if isinstance(cache, PagedBatch):
            raise NotImplementedError("MTP blocks keep their window in the reference KVCache, not the paged pool")
        views = self._views(next_ids, cache, doc_ids, lambda c: c.mtp_length[depth])
        logits, _ = self.mtp[depth].predict(hidden, self.embed(next_ids), next_ids, views, self.inv_freq_main,
                                            self.head, step)
        for v in views:
            v.cache.mtp_length[depth] = int(v.positions[-1]) + 1
        return logits

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}) for this model, got "
                             f"[{int(ids.min())}, {int(ids.max())}] (a tokenizer with a larger vocabulary?)")

    def _views(self, ids: torch.Tensor, cache, doc_ids: torch.Tensor | None, length_of) -> list[AttnView]:
        B, S = ids.shape
        device, every = ids.device, slice(None)

        def span(start: int, n: int) -> torch.Tensor:
            if start + n > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {start + n} tokens exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            return torch.arange(start, start + n, device=device)

        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed training sequences) cannot be combined with a cache")
            if doc_ids.shape != ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(ids.shape)}")
            views = []
            for b in range(B):
                starts = [0] + (torch.nonzero(doc_ids[b, 1:] != doc_ids[b, :-1]).flatten() + 1).tolist() + [S]
                for s, e in zip(starts[:-1], starts[1:]):
                    views.append(AttnView(slice(b, b + 1), slice(s, e), span(0, e - s), self.new_cache()))
            return views
        if cache is None:
            return [AttnView(every, every, span(0, S), self.new_cache())]
        if isinstance(cache, KVCache):
            return [AttnView(every, every, span(length_of(cache), S), cache)]
        if len(cache) != B:
            raise ValueError(f"{len(cache)} caches for a batch of {B} rows")
        return [AttnView(slice(b, b + 1), every, span(length_of(c), S), c) for b, c in enumerate(cache)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = hc_head_collapse(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, hc_eps=c.hc_eps,
                             norm_eps=c.rms_norm_eps)
        return self.head(self.norm(h)).float()


def _fresh_layer(layer: Block, x: torch.Tensor, input_ids: torch.Tensor, views: list[AttnView],
                 inv_freq: torch.Tensor, step: TrainStep | None) -> torch.Tensor:
    """One block on fresh per-view layer caches: activation checkpointing runs a block twice (forward and
    recompute), and the second run must not see the state the first left in the cache."""
    for v in views:
        v.cache.layers[layer.attn.layer_id] = KVCache.empty(layer.config).layers[layer.attn.layer_id]
    return layer(x, input_ids, views, inv_freq, step)


def build_random(config: Config, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> Transformer:
    """A randomly initialised eval-mode model allocated directly on `device` in `dtype` (fp32 where the release
    keeps it): built on meta, so a 16B-parameter benchmark model never passes through CPU memory."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_dtype(dtype)  # on meta: only the dtypes change, nothing is allocated
    model.to_empty(device=device)
    with torch.no_grad():
        init_weights(model, seed)  # drawn on the device
    model.reset_rope()
    return model.eval()


def keeps_fp32(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return name.endswith("norm.weight") or leaf.startswith("hc_") or leaf in ("attn_sink", "ape", "bias")


@torch.no_grad()
def init_weights(model: Transformer, seed: int = 0) -> Transformer:
    """Random initialisation for new models: N(0, initializer_range) for matrices and embeddings,
    neutral values for the rest (norm weights 1, mHC gates 1, biases / sinks / slot biases 0), and a
    random token -> expert table for hash layers (distinct experts per token). Numbers are drawn on the
    model's device (a big model initialises on the GPU in seconds; same seed, same device, same weights)."""
    c = model.config
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    stacked = {id(getattr(m, w)): m for m in model.modules() if isinstance(m, Experts) for w in Experts.MATRICES}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in stacked:
            if leaf == Experts.MATRICES[0]:
                # expert by expert (its w1, w2, w3, then the next): a seed gives the weights it gave when each
                # expert was a module of its own
                experts = stacked[id(p)]
                for e in range(p.shape[0]):
                    for w in Experts.MATRICES:
                        m = getattr(experts, w)[e]
                        m.copy_(torch.randn(m.shape, generator=gen, device=device) * c.initializer_range)
        elif name.endswith("norm.weight") or leaf.endswith("_scale"):
            p.fill_(1.0)
        elif leaf.endswith("_base") or leaf in ("ape", "attn_sink"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * c.initializer_range)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            b.copy_(torch.rand(c.vocab_size, c.n_routed_experts, generator=gen, device=device).argsort(-1)[:, :b.shape[1]])
        elif name.endswith("gate.bias"):
            b.zero_()
    return model
