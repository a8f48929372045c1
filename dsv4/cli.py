"""The `dsv4` command: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16}[name]


def _resolve_config(model: str):
    from .config import PRESETS, Config, preset

    if model in PRESETS and not Path(model).exists():
        return preset(model)
    return Config.from_json(model)


def cmd_info(args) -> int:
    from .info import describe

    info = describe(_resolve_config(args.model), args.index_keys)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p, kv = info["parameters"], info["kv_bytes_per_token"]
    print(f"parameters: {p['total'] / 1e9:.3f} B total, {p['active'] / 1e9:.3f} B active per token "
          f"(+ {p['mtp'] / 1e9:.3f} B in {info['mtp_blocks']} MTP block(s))")
    print("layers:     " + ", ".join(f"{n} x {t}" for t, n in info["layer_types"].items())
          + f"; first {info['hash_layers']} MoE layer(s) hash-routed")
    print(f"KV cache:   {kv['total']:.1f} bytes per token of context (FP8 entries, {info['index_keys'].upper()} "
          f"indexer keys), "
          f"+ {kv['window_bytes_per_sequence'] / 2**20:.2f} MiB of sliding windows per sequence")
    print(f"context:    {info['context']:,} tokens")
    return 0


def cmd_generate(args) -> int:
    from .checkpoint import load
    from .generate import SamplingParams, stream
    from .tokenizer import tokenizer_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.model, dtype=_dtype(args.dtype) if args.dtype else None, device=device, seed=args.seed)
    if not Path(args.model).exists():
        print(f"[dsv4] '{args.model}' is a preset: random weights, the output is noise.", file=sys.stderr)
    tok = tokenizer_for(args.model)  # with the checkpoint's compact vocabulary, if it has one
    if model.config.vocab_size < tok.vocab_size:
        print(f"[dsv4] model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
              f"({tok.vocab_size}); out-of-range prompt tokens are folded into it.", file=sys.stderr)
    prompt = [t % model.config.vocab_size for t in tok.encode(args.prompt, add_bos=True)]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(args.prompt, end="", flush=True)
    out = []
    for token in stream(model, prompt, params, stop_ids={tok.eos_id}):
        if token == tok.eos_id:
            break
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text, end="", flush=True)
            out = []
    print(tok.decode(out) if out else "")
    return 0


def _add_model_args(p):
    p.add_argument("--model", required=True, help="checkpoint folder or preset (tiny, small, flash, pro)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--seed", type=int, default=0)


# Subcommands that live with their component; each module provides add_<name>_args(parser) and run_<name>(args).
_COMPONENT_COMMANDS = {
    "analyze": ("dsv4.analysis", "FLOPs and KV cache vs context length: V4-Pro, V4-Flash, V3.2, GQA-8"),
    "train": ("dsv4.train.cli", "train a V4 model (Muon, curriculum, MTP) on the bundled corpus"),
    "serve": ("dsv4.server", "OpenAI-compatible HTTP server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in readable PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameters, layer types and KV bytes of a checkpoint or preset")
    p.add_argument("model", help="checkpoint folder, config.json or preset")
    p.add_argument("--json", action="store_true")
    p.add_argument("--index-keys", choices=["fp8", "fp4"], default="fp8",
                   help="indexer key format of the paged cache (default fp8; fp4 is the release's path)")
    p.set_defaults(func=cmd_info)

    for name, (module, help_text) in _COMPONENT_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            p.set_defaults(func=lambda args, e=e, n=name: _unavailable(n, e))
            continue
        getattr(mod, f"add_{name}_args")(p)
        p.set_defaults(func=getattr(mod, f"run_{name}"))
    return parser


def _unavailable(name: str, error: Exception) -> int:
    print(f"dsv4 {name}: not available ({error})", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .errors import CheckpointError

    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
