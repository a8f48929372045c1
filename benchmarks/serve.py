"""Serving benchmark: the engine under load (no HTTP: the numbers are the engine's, not uvicorn's).

    python benchmarks/serve.py --out results.json                     # GPU: Flash-shaped model, 8 routed experts
    python benchmarks/serve.py --kv-cache reference --out ref.json    # the per-request reference cache
    python benchmarks/serve.py --preset tiny --quick --out r.json     # CPU smoke run

Measures, in this order (the JSON is rewritten after each stage, so a run cut short keeps what it measured):
requests/s and generated tokens/s at 1, 8 and 64 concurrent requests (random prompts, greedy, fixed output
length); time to first token of one request alone at 8K and 128K-token prompts, through the engine
(chunked prefill into the KV cache, first token sampled); MTP speculative decoding at batch 1: plain vs
speculative with the model's own MTP block, and with an oracle drafter that always drafts the right token
(the upper bound a trained MTP approaches; random weights accept ~0). Speculation runs on the reference
cache (it needs rollback), so the MTP rows all use kv_cache="reference", plain included.
`--kv-cache` picks the engine's cache for the throughput and TTFT rows: "paged" (the FP8 pool, one forward
per decode step) or "reference". Weights are random (built on the GPU directly), which does not change
the cost of a forward.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from dsv4.config import preset
from dsv4.engine import Engine, EngineConfig, SamplingParams
from dsv4.generate import generate
from dsv4.model import Transformer, build_random


def build_model(name: str, experts: int, layers: int | None, device: str, dtype: torch.dtype) -> Transformer:
    """A preset with fewer routed experts, random weights drawn on `device` (no CPU init of 16B params)."""
    c = preset(name)
    changes = {"n_routed_experts": min(experts, c.n_routed_experts)}
    if layers:
        changes.update(num_hidden_layers=layers, compress_ratios=None)
    c = c.replace(**changes)
    return build_random(c, device, dtype)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n)]


def free_memory():
    """Drop the last stage's engine (its KV pool) before the next one allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def throughput(model, concurrency: int, prompt_len: int, gen_len: int, chunk: int, kv: str,
               budget: int | None) -> dict:
    engine = Engine(model, EngineConfig(max_batch=max(64, concurrency), prefill_chunk=chunk, prefix_cache_bytes=0,
                                        prefill_tokens_per_step=max(chunk, concurrency * prompt_len), kv_cache=kv,
                                        kv_budget_bytes=budget))
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
    out = {"concurrency": concurrency, "prompt_tokens": prompt_len, "output_tokens": gen_len, "kv_cache": kv,
           "seconds": dt, "requests_per_s": concurrency / dt, "output_tokens_per_s": toks / dt,
           "mean_ttft_s": stats["ttft_seconds_sum"] / max(1, stats["ttft_count"]),
           "forward_passes": stats["forward_passes"], "errors": stats["finished"].get("error", 0),
           "first_error": next((o.error for o in outs if o.error), None)}
    if "kv_pool_bytes" in stats:
        out.update(kv_pool_gib=stats["kv_pool_bytes"] / 2**30, kv_pool_tokens=stats["kv_pool_tokens"])
    del engine, handles
    free_memory()
    return out


def ttft(model, length: int, chunk: int, cap_s: float, kv: str, budget: int | None) -> dict:
    """One request of `length` prompt tokens alone in the engine: seconds from submit to its first token
    (chunked prefill of `chunk` tokens per forward, then the first sample). Cancelled after `cap_s`."""
    p = prompts(1, length, model.config.vocab_size, length)[0]
    cfg = EngineConfig(max_batch=1, prefill_chunk=chunk, prefill_tokens_per_step=chunk, prefix_cache_bytes=0,
                       kv_cache=kv, kv_budget_bytes=budget)
    seen = {}

    def on_event(ev):  # on the engine thread, while the request still holds its cache
        if "kv" not in seen:
            seen["kv"] = engine.stats()["kv_used_bytes"]

    with Engine(model, cfg) as engine:
        engine.generate(prompts(1, min(length, 2 * chunk), model.config.vocab_size, 1)[0],
                        SamplingParams(max_new_tokens=1))  # warm-up
        sync()
        t = time.perf_counter()
        handle = engine.submit(p, SamplingParams(max_new_tokens=1), on_event=on_event)
        error = None
        try:
            out = handle.result(timeout=cap_s)
            complete, error = out.finish_reason == "length", out.error
        except TimeoutError:
            handle.cancel()
            complete = False
        sync()
        dt = time.perf_counter() - t
        errors = engine.stats()["finished"].get("error", 0)
    res = {"prompt_tokens": length, "chunk": chunk, "kv_cache": kv, "seconds": dt, "complete": complete,
           "errors": errors, "error": error, "kv_cache_mib": seen.get("kv", 0) / 2**20}
    if torch.cuda.is_available():
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del engine, handle
    free_memory()
    return res


def mtp(model, prompt_len: int, gen_len: int, chunk: int) -> dict:
    p = prompts(1, prompt_len, model.config.vocab_size, 7)[0]
    params = SamplingParams(max_new_tokens=gen_len)
    with torch.inference_mode():
        truth = generate(model, p, params)
    rows = {}
    for label, spec, drafter in (("plain", False, None), ("mtp", True, None),
                                 ("mtp_oracle", True, lambda logits, ctx: [truth[len(c) - len(p)] if len(c) - len(p) <
                                                                           len(truth) else 0 for c in ctx])):
        cfg = EngineConfig(prefill_chunk=chunk, prefix_cache_bytes=0, speculative=spec, kv_cache="reference")
        with Engine(model, cfg, drafter=drafter) as engine:
            engine.generate(p, SamplingParams(max_new_tokens=4))
            sync()
            t = time.perf_counter()
            out = engine.generate(p, params)
            sync()
            dt = time.perf_counter() - t
            s = engine.stats()
        rows[label] = {"seconds": dt, "tokens_per_s": gen_len / dt, "accept_rate": s["spec_accept_rate"],
                       "same_tokens_as_plain": out.token_ids == truth, "kv_cache": s["kv_cache"]}
        del engine
        free_memory()
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
    ap.add_argument("--mtp-gen-len", type=int, default=64, help="0 = skip the MTP rows")
    ap.add_argument("--kv-cache", default="paged", choices=["paged", "reference"],
                    help="the engine's KV cache for the throughput and TTFT rows")
    ap.add_argument("--kv-budget-gib", type=float, default=None,
                    help="KV budget (paged: the pool's size); default: the engine's share of free memory")
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        args.concurrency, args.gen_len, args.ttft, args.ttft_chunk, args.chunk, args.mtp_gen_len = \
            "1,8,64", 8, "512,2048", 256, 256, 16
    budget = None if args.kv_budget_gib is None else int(args.kv_budget_gib * 2**30)
    t = time.perf_counter()
    model = build_model(args.preset, args.experts, args.layers, device, dtype)
    c = model.config
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__, "kv_cache": args.kv_cache,
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

    for n in (int(x) for x in args.concurrency.split(",")):
        result["throughput"].append(throughput(model, n, args.prompt_len, args.gen_len, args.chunk, args.kv_cache,
                                               budget))
        dump()
    for n in (int(x) for x in args.ttft.split(",")):
        result["ttft"].append(ttft(model, n, args.ttft_chunk, args.ttft_cap_s, args.kv_cache, budget))
        dump()
        if not result["ttft"][-1]["complete"]:
            break
    if args.mtp_gen_len:
        result["mtp"] = mtp(model, args.prompt_len, args.mtp_gen_len, args.chunk)
        dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
