"""Multi-token prediction (MTP, as in DeepSeek-V3 §2.2; V4 keeps it): one extra block that predicts the
token after next. At position i it combines the trunk's final streams h_i with the embedding of token
t_{i+1}, runs an ordinary (window-only, learned-routing) V4 block, and reads logits for t_{i+2} through
its own stream merge and norm and the *shared* output head. It trains the trunk with a denser signal and
serves as a draft model for speculative decoding.

    e = enorm(embed(t_{i+1}))          (B, S, d)
    x = e_proj(e) + h_proj(hnorm(h))   (B, S, n_hc, d), e broadcast to every stream
    x = Block(x)
    logits = head(norm(hc_head(x)))
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Block
from .cache import AttnView
from .config import Config
from .hooks import TrainStep
from .layers import Linear, RMSNorm
from .mhc import hc_head_collapse


class MTP(Block):
    """An ordinary block (so its tensors sit directly under `mtp.<k>.` as in the release) plus the
    embedding / hidden-state projections and its own stream merge and norm."""

    def __init__(self, config: Config, layer_id: int):
        super().__init__(config, layer_id)
        d, n = config.hidden_size, config.hc_mult
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.e_proj = Linear(d, d)
        self.h_proj = Linear(d, d)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * d))
        self.hc_head_base = nn.Parameter(torch.zeros(n))
        self.hc_head_scale = nn.Parameter(torch.ones(1))

    def predict(self, h: torch.Tensor, next_embed: torch.Tensor, next_ids: torch.Tensor, views: list[AttnView],
                inv_freq: torch.Tensor, head: nn.Module, step: TrainStep | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """h: trunk streams (B, S, n_hc, d); next_embed: embeddings of the next tokens (B, S, d).
        -> (logits (B, S, vocab) fp32, this block's output streams for a further MTP depth)."""
        x = self.e_proj(self.enorm(next_embed)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        x = self(x, next_ids, views, inv_freq, step)
        c = self.config
        merged = hc_head_collapse(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, hc_eps=c.hc_eps,
                                  norm_eps=c.rms_norm_eps)
        return head(self.norm(merged)).float(), x
