"""Sampling and a simple `generate` on top of the cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .model import Transformer


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them (needs a tokenizer; engine only)
    stop_token_ids: tuple[int, ...] = ()  # generation ends after one of these (e.g. EOS)
    logprobs: int | None = None  # None = off; k = the chosen token's log-probability and the k most likely

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy at temperature 0; otherwise top-k, then nucleus (top-p)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """logits (B, V), chosen tokens (B,) -> per row (log-probability of the token, k most likely
    (id, log-probability)), from the model's distribution (before temperature / top-p / top-k)."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(-1).tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top_i.tolist(), top_v.tolist())]


@torch.no_grad()
def stream(model: Transformer, prompt_ids: list[int], params: SamplingParams,
           stop_ids: set[int] | None = None, prefill_chunk: int = 4096) -> Iterator[int]:
    """Yield generated token ids one by one (stops after a token in `stop_ids`, which is yielded)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                         f"model's context of {limit} tokens")
    device = model.embed.weight.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids], device=device)
    for s in range(0, ids.shape[1], prefill_chunk):  # chunked prefill: same cache as one pass
        logits = model(ids[:, s:s + prefill_chunk], cache, last_only=True)
    for _ in range(params.max_new_tokens):
        token = sample(logits[:, -1], params, generator)
        yield int(token)
        if stop_ids and int(token) in stop_ids:
            return
        logits = model(token[:, None], cache)


def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams | None = None,
             stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """Generated token ids (without the prompt)."""
    out = []
    for token in stream(model, prompt_ids, params or SamplingParams(), stop_ids):
        out.append(token)
        if on_token:
            on_token(token)
    return out
