"""`dsv4 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `dsv4.engine`.

    dsv4 serve --model tiny --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .app import THINKING_DEFAULTS, create_app

__all__ = ["add_serve_args", "run_serve", "create_app"]


def add_serve_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or preset (tiny, small, flash, pro)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model's name)")
    p.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV4_API_KEY; none = open)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--seed", type=int, default=0, help="weights seed of a preset")
    p.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    p.add_argument("--kv-cache", default="paged", choices=["paged", "reference"],
                   help="paged: one FP8 pool, one forward per decode step; reference: a model-dtype cache per "
                        "request (what --speculative uses)")
    p.add_argument("--kv-budget-gib", type=float, default=None,
                   help="KV cache: the paged pool's size / reserved for running requests (reference) "
                        "(default: 60%% of free GPU memory / 25%% of RAM)")
    p.add_argument("--prefix-cache-gib", type=float, default=1.0, help="in-memory prefix cache; 0 = off")
    p.add_argument("--prefix-dir", default=None, help="on-disk prefix cache folder (kept across restarts)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding for greedy requests")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's output never depends on the other requests in the batch (slower)")
    p.add_argument("--default-thinking", default="off", choices=THINKING_DEFAULTS,
                   help="reasoning mode when a request names none")
    p.add_argument("--max-tokens-default", type=int, default=4096, help="max_tokens when a chat request has none")
    p.add_argument("--log-level", default="info")


def build_engine(args):
    """Model + engine + tokenizer from the CLI arguments (shared with benchmarks)."""
    import torch

    from ..checkpoint import load
    from ..engine import Engine, EngineConfig
    from ..tokenizer import tokenizer_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype] if args.dtype else None
    model = load(args.model, dtype=dtype, device=device, seed=args.seed)
    if not Path(args.model).exists():
        print(f"[dsv4] '{args.model}' is a preset: random weights, the output is noise.", file=sys.stderr)
    tok = tokenizer_for(args.model)
    gib = 1 << 30
    cfg = EngineConfig(max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                       kv_budget_bytes=None if args.kv_budget_gib is None else int(args.kv_budget_gib * gib),
                       prefix_cache_bytes=int(args.prefix_cache_gib * gib), prefix_dir=args.prefix_dir,
                       speculative=args.speculative, batch_invariant=args.batch_invariant, kv_cache=args.kv_cache)
    return Engine(model, cfg, decode=tok.decode).start(), tok


def run_serve(args) -> int:
    import uvicorn

    engine, tok = build_engine(args)
    name = args.served_model_name or Path(args.model).name
    app = create_app(engine, tok, name, api_key=args.api_key, default_thinking=args.default_thinking,
                     default_max_tokens=args.max_tokens_default)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
