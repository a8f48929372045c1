"""dsv4 vs transformers' DeepseekV4ForCausalLM on one GPU, same weights: prefill time and peak memory of a
2-layer model with V4-Flash's attention dimensions (one CSA and one HCA layer: 64 heads x 512, q rank 1024,
top-k 512, window 128, mHC 4), a small MoE (8 experts x 256) and a 1,024-token vocabulary, so the numbers are
attention's. One JSON line per (implementation, length); "oom" when it does not fit. The first length also
checks that both give the same logits (bf16 tolerance, see `tol`).

Needs transformers >= 5.23 (DeepseekV4ForCausalLM); the GPU image may carry an older one, see the device
README's wheel recipe. Usage: python benchmarks/vs_transformers.py [--seq 2048,4096,8192,16384,32768,131072]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from dsv4 import hf, kernels
from dsv4.config import preset
from dsv4.model import Transformer


def config():
    return preset("flash").replace(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=0,
                                   n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                                   vocab_size=1024)


def run(model, ids, chunk=None) -> tuple[float, float, torch.Tensor]:
    """(ms, peak GiB, last-position logits) of one prefill forward (ours in `chunk`-token pieces if given)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    with torch.inference_mode():
        if chunk is None:
            out = model(ids)
            logits = (out.logits if hasattr(out, "logits") else out)[:, -1].float()
        else:
            cache = model.new_cache()
            for s in range(0, ids.shape[1], chunk):
                logits = model(ids[:, s:s + chunk], cache, last_only=True)[:, -1]
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, (torch.cuda.max_memory_allocated() - base) / 2 ** 30, logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="2048,4096,8192,16384,32768,131072")
    ap.add_argument("--chunk", type=int, default=8192, help="dsv4's prefill chunk")
    args = ap.parse_args(argv)
    import transformers

    cfg = config()
    ours = Transformer(cfg, seed=0).to_dtype(torch.bfloat16).cuda().eval()
    ours.reset_rope()
    ref = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf.to_hf_config(cfg)))
    missing, unexpected = ref.load_state_dict(hf.to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ref = ref.to(torch.bfloat16).cuda().eval()
    base = dict(device=torch.cuda.get_device_name(), transformers=transformers.__version__, layers="CSA+HCA",
                heads=cfg.num_attention_heads, head_dim=cfg.head_dim)
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(int(x) for x in args.seq.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen).cuda()
        rows = {}
        for name, model, chunk in (("transformers", ref, None), ("dsv4", ours, min(args.chunk, n))):
            try:
                run(model, ids, chunk)  # warm-up: Triton compiles its kernels for these shapes on first use
                ms, gib, logits = run(model, ids, chunk)
                rows[name] = logits
                print(json.dumps({**base, "impl": name, "seq": n, "ms": round(ms, 1), "peak_gib": round(gib, 3),
                                  "kernels": kernels.backend() if name == "dsv4" else None}), flush=True)
            except torch.OutOfMemoryError:
                print(json.dumps({**base, "impl": name, "seq": n, "oom": True}), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        if i == 0 and len(rows) == 2:
            a, b = rows["dsv4"], rows["transformers"]
            err = ((a - b).norm() / b.norm()).item()
            print(json.dumps({**base, "check": "last-token logits, relative L2", "seq": n, "rel_err": err}), flush=True)


if __name__ == "__main__":
    main()
