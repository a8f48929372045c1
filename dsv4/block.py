"""One V4 block (§2): x (B, S, n_hc, d) --mHC--> attention (CSA / HCA / window) --mHC--> MoE."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .cache import AttnView
from .config import Config
from .hooks import TrainStep
from .layers import RMSNorm
from .mhc import hc_collapse, hc_expand, hc_maps
from .moe import MoE


class Block(nn.Module):
    def __init__(self, config: Config, layer_id: int):
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoE(config, layer_id)
        n, flat = config.hc_mult, config.hc_mult * config.hidden_size
        for site in ("attn", "ffn"):  # mHC parameters of each sublayer, fp32 as released
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.zeros((2 + n) * n, flat)))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.zeros((2 + n) * n)))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.ones(3)))

    def _maps(self, x: torch.Tensor, site: str):
        c = self.config
        return hc_maps(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                       getattr(self, f"hc_{site}_scale"), sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps,
                       norm_eps=c.rms_norm_eps)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None, views: list[AttnView],
                inv_freq: torch.Tensor, step: TrainStep | None = None) -> torch.Tensor:
        pre, post, comb = self._maps(x, "attn")
        out = self.attn(self.attn_norm(hc_collapse(x, pre)), views, inv_freq, step)
        x = hc_expand(x, out, post, comb)
        pre, post, comb = self._maps(x, "ffn")
        out = self.ffn(self.ffn_norm(hc_collapse(x, pre)), input_ids, step)
        return hc_expand(x, out, post, comb)
