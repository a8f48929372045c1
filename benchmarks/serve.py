"""Serving benchmark: the engine under load (no HTTP: the numbers are the engine's, not uvicorn's).

    python benchmarks/serve.py --out results.json                 # GPU: Flash-shaped model, 8 routed experts
    python benchmarks/serve.py --preset tiny --quick --out r.json # CPU smoke run

Measures requests/s and generated tokens/s at 1, 8 and 64 concurrent requests (random prompts, greedy,
fixed output length), time to first token at long prompts (one request alone), and MTP speculative
decoding at batch 1: plain vs speculative with the model's own MTP block, and with an oracle drafter
that always drafts the right token (the upper bound a trained MTP approaches; random weights accept ~0).
Weights are random (built on the GPU directly), which does not change the cost of a forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dsv4.config import preset
from dsv4.engine import Engine, EngineConfig, SamplingParams
from dsv4.generate import generate
from dsv4.model import Transformer


def build_model(name: str, experts: int, layers: int | None, device: str, dtype: torch.dtype) -> Transformer:
    """A preset with fewer routed experts, random weights drawn on `device` (no CPU init of 16B params)."""
    c = preset(name)
    changes = {"n_routed_experts": min(experts, c.n_routed_experts)}
    if layers:
        changes.update(num_hidden_layers=layers, compress_ratios=None)
    c = c.replace(**changes)
    with torch.device("meta"):
        model = Transformer(c)
    model.to_dtype(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():  # the init_weights rules, drawn on the device
            leaf = n.rsplit(".", 1)[-1]
            if n.endswith("norm.weight") or leaf.endswith("_scale"):
                p.fill_(1.0)
            elif leaf.endswith("_base") or leaf in ("ape", "attn_sink"):
                p.zero_()
            else:
                p.normal_(0, c.initializer_range, generator=gen)
        for n, b in model.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.rand(c.vocab_size, c.n_routed_experts, device=device, generator=gen)
                        .argsort(-1)[:, :b.shape[1]])
            elif n.endswith("gate.bias"):
                b.zero_()
    model.reset_rope()
    return model.eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n)]


def throughput(model, concurrency: int, prompt_len: int, gen_len: int, chunk: int) -> dict:
    engine = Engine(model, EngineConfig(max_batch=max(64, concurrency), prefill_chunk=chunk, prefix_cache_bytes=0,
                                        prefill_tokens_per_step=max(chunk, concurrency * prompt_len)))
    with engine:
        engine.generate(prompts(1, prompt_len, model.config.vocab_size, 99)[0], SamplingParams(max_new_tokens=2))
        ps = prompts(concurrency, prompt_len, model.config.vocab_size, concurrency)
        sync()
        t = time.perf_counter()
        handles = [engine.submit(p, SamplingParams(max_new_tokens=gen_len, stop_token_ids=())) for p in ps]
        outs = [h.result() for h in handles]
        sync()
        dt = time.perf_counter() - t
        stats = engine.stats()
    toks = sum(o.usage.completion_tokens for o in outs)
    return {"concurrency": concurrency, "prompt_tokens": prompt_len, "output_tokens": gen_len, "seconds": dt,
            "requests_per_s": concurrency / dt, "output_tokens_per_s": toks / dt,
            "mean_ttft_s": stats["ttft_seconds_sum"] / max(1, stats["ttft_count"]),
            "forward_passes": stats["forward_passes"]}


def ttft(model, length: int, chunk: int, cap_s: float) -> dict:
    """Prefill `length` tokens in chunks (as the engine does) and time until the first token, capped."""
    ids = torch.tensor(prompts(1, length, model.config.vocab_size, length), device=model.embed.weight.device)
    cache = model.new_cache()
    sync()
    t = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for s in range(0, length, chunk):
            logits = model(ids[:, s:s + chunk], cache)
            done = min(length, s + chunk)
            sync()
            if time.perf_counter() - t > cap_s and done < length:
                break
        int(logits[0, -1].argmax())
    sync()
    dt = time.perf_counter() - t
    out = {"prompt_tokens": length, "prefilled": done, "seconds": dt, "complete": done == length,
           "kv_cache_mib": cache.nbytes() / 2**20}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def mtp(model, prompt_len: int, gen_len: int, chunk: int) -> dict:
    p = prompts(1, prompt_len, model.config.vocab_size, 7)[0]
    params = SamplingParams(max_new_tokens=gen_len)
    with torch.inference_mode():
        truth = generate(model, p, params)
    rows = {}
    for label, spec, drafter in (("plain", False, None), ("mtp", True, None),
                                 ("mtp_oracle", True, lambda logits, ctx: [truth[len(c) - len(p)] if len(c) - len(p) <
                                                                           len(truth) else 0 for c in ctx])):
        cfg = EngineConfig(prefill_chunk=chunk, prefix_cache_bytes=0, speculative=spec)
        with Engine(model, cfg, drafter=drafter) as engine:
            engine.generate(p, SamplingParams(max_new_tokens=4))
            sync()
            t = time.perf_counter()
            out = engine.generate(p, params)
            sync()
            dt = time.perf_counter() - t
            s = engine.stats()
        rows[label] = {"seconds": dt, "tokens_per_s": gen_len / dt, "accept_rate": s["spec_accept_rate"],
                       "same_tokens_as_plain": out.token_ids == truth}
    for r in rows.values():
        r["speedup_vs_plain"] = rows["plain"]["seconds"] / r["seconds"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--experts", type=int, default=8, help="routed experts (Flash has 256; 6 active)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--ttft", default="8192,131072")
    ap.add_argument("--ttft-chunk", type=int, default=8192)
    ap.add_argument("--ttft-cap-s", type=float, default=90)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--mtp-gen-len", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        args.concurrency, args.gen_len, args.ttft, args.ttft_chunk, args.chunk, args.mtp_gen_len = \
            "1,8", 8, "512", 256, 256, 16
    t = time.perf_counter()
    model = build_model(args.preset, args.experts, args.layers, device, dtype)
    c = model.config
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__,
              "model": {"preset": args.preset, "layers": c.num_hidden_layers, "routed_experts": c.n_routed_experts,
                        "active_experts": c.num_experts_per_tok,
                        "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9},
              "build_s": time.perf_counter() - t, "throughput": [], "ttft": [], "mtp": None}

    def dump():
        text = json.dumps(result, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text, flush=True)

    result["mtp"] = mtp(model, args.prompt_len, args.mtp_gen_len, args.chunk)
    dump()
    for n in (int(x) for x in args.concurrency.split(",")):
        result["throughput"].append(throughput(model, n, args.prompt_len, args.gen_len, args.chunk))
        dump()
    for n in (int(x) for x in args.ttft.split(",")):
        result["ttft"].append(ttft(model, n, args.ttft_chunk, args.ttft_cap_s))
        dump()
        if not result["ttft"][-1]["complete"]:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
