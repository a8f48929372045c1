"""Per-layer V4 attention (Flash dims: 64 heads, head dim 512, MQA, top-k 512, window 128) vs dense GQA-8
(64 q heads, 8 KV heads, head dim 128, torch SDPA flash backend) on one GPU. One JSON line per case.

Timed pieces (random inputs of the right shapes; the projections are the same dense matmuls for every
variant and are left out):
  decode   gqa8: SDPA over a bf16 K/V cache of ctx tokens; csa: the decode kernels (`indexer_decode`: scores,
           a group-maxima bound, candidates and their ranks over ctx/4 FP8 indexer keys, `decode_attn`:
           flash-decoding over 512 picked + 128 window FP8 records from the paged pool), alone and as one CUDA
           graph of the layer's step (indexer -> attention); hca: flash-decoding over ctx/128 FP8 records + window.
           `legacy_*`: the general kernels (`sparse_attn.attend`, `indexer_topk` + torch.topk) in the same run;
           `prev_*`: an earlier version of the kernels (`--prev DIR` holding `decode_attn_prev.py` /
           `indexer_decode_prev.py` / `indexer_topk_prev.py`, e.g. `git show REV:dsv4/kernels/decode_attn.py`),
           also in the same run
  prefill  gqa8: causal SDPA over ctx tokens; csa / hca: the same kernels over all ctx queries in chunks; the CSA
           indexer also with FP8 scores, with the candidate top-k, and in its `--prev` version
`--profile` first prints each op's per-kernel device time (torch.profiler), `--check` full-size agreement.
Prefill runs at each --ctx up to --prefill-max: `--prefill-max 512K` adds the 512K rows (gqa8, csa, hca) of the
default --ctx list.

`--vs-transformers` (only this): one whole layer as the model runs it (`dsv4.attention.Attention`: projections,
compressor, indexer, the kernels, over its `KVCache`) vs transformers' `DeepseekV4Attention` of the same type
holding the same random weights (renamed by `dsv4.hf`), for a CSA layer (ratio 4) and an HCA layer (ratio 128) with
Flash's attention dims (q LoRA rank 1024 too). At each --vs-transformers-ctx, per (impl, layer, ctx): ms and peak
GiB, "oom" where it does not fit (the run goes on), the ours / transformers ratios where both ran, and at the first
context the relative error between the two outputs, of
  prefill  ours in 8K-token chunks through its cache (like the prefill rows above), transformers' in one call as
           its model's forward: it scores every query against every token and compressed entry in dense
           (64, S, S + entries) tensors, so its memory grows with S^2. Median of 3 after a warm-up; peak GiB above
           weights and input; outputs against `BF16_TOL`
  decode   one token after the ctx-token context. Each side's own cache is filled with the context in 8K-token
           pieces, untimed (ours: `KVCache`; transformers': `DynamicCache(config=...)`, whose CSA / HCA layer
           keeps the window and the compressor's and indexer's state: unfinished block, CSA's overlap half,
           finished entries; in pieces its scores stay (64, 8K, 8K + window + entries), so the decode can run
           where its one-call prefill did not fit); then a warm-up step and 10 timed ones (ms per token: median;
           peak GiB above the filled cache), each appending its token; the last step's output (at ctx + 10) is the
           one compared, against `DECODE_BF16_TOL`: one token's output, where a bf16 top-k swap weighs more than
           in prefill's average over ctx rows. transformers' decode continues its full forward exactly: in fp32
           both sides' decode agree to 2e-7 on CPU (tests, a step that closes a CSA and an HCA block) and equal
           transformers' one-call forward to < 1e-4 on an H200 at Flash dims (4K, 8K). Ours decodes from the
           model-dtype cache through the seam's decode kernels (`decode_attn`, `indexer_decode` over dense keys);
           the model's serving decode reads the paged FP8 pool (`dsv4.paged`), whose kernels the decode rows above
           time
transformers' rows include its per-forward causal mask and RoPE tables, which a whole model builds once for all
its layers. Needs transformers >= 5.23 (the GPU image's 5.17 has no DeepSeek-V4: carry the wheels, device README;
these ran on the H200 image: transformers 5.23.0, huggingface-hub 1.33.0 (2.x imports httpx2, which it lacks),
tokenizers 0.23.3, safetensors 0.8.0, regex 2026.12.2).
Usage: python benchmarks/attention.py [--ctx 8K,32K,...] [--prefill-max 128K | 512K] [--csa-prefill-1m] [--prev DIR]
       python benchmarks/attention.py --vs-transformers [--vs-transformers-ctx 4K,8K,16K,32K]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

from dsv4 import hf, kernels
from dsv4.analysis import parse_context
from dsv4.cache import AttnView, KVCache
from dsv4.config import preset
from dsv4.kernels import fp8_kv
from dsv4.kernels.decode_attn import attend_decode
from dsv4.kernels.indexer_decode import KeySource, indexer_topk_decode, workspace
from dsv4.kernels.indexer_topk import indexer_topk
from dsv4.kernels.sparse_attn import KVSource, attend, sparse_attention_dense
from dsv4.model import Transformer, build_random
from timing import bench, bench_graph  # noqa: E402 (benchmarks/ is the script's folder)
from vs_transformers import config as two_layer_flash_config  # noqa: E402 (CSA + HCA, Flash attention dims)

H100_PEAK = {"bf16_tflops": 989.0, "hbm_gbps": 3350.0}  # SXM5 dense datasheet figures
H, D, RD, TOPK, WIN, HI, DI = 64, 512, 64, 512, 128, 64, 128
GQA_HQ, GQA_HK, GQA_D = 64, 8, 128
DEV = "cuda"
PREV: dict = {}  # module name -> an earlier version of it (`load_prev`)


def load_prev(dirname: str) -> dict:
    """Earlier copies of the decode kernel modules (`<name>_prev.py`), imported inside dsv4.kernels."""
    mods = {}
    for name in ("decode_attn", "indexer_decode", "indexer_topk"):
        path = os.path.join(dirname, f"{name}_prev.py")
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location(f"dsv4.kernels._prev_{name}", path)
            mods[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
    return mods


def emit(**rec):
    if "ms" in rec and rec.get("bytes"):
        rec["gbps"] = rec["bytes"] / rec["ms"] / 1e6
        rec["hbm_util"] = rec["gbps"] / H100_PEAK["hbm_gbps"]
    if "ms" in rec and rec.get("flops"):
        rec["tflops"] = rec["flops"] / rec["ms"] / 1e9
        rec["tc_util"] = rec["tflops"] / H100_PEAK["bf16_tflops"]
    print(json.dumps(rec), flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_pool(n: int, block: int = 64):
    """n random 584-byte records in a paged pool with a shuffled block table for one sequence."""
    n_blocks = max(1, math.ceil(n / block))
    x = torch.randn(n_blocks * block, D, device=DEV, dtype=torch.bfloat16)
    rec = fp8_kv.pack(*fp8_kv.quantize(x, RD))
    nope, rope, scale = fp8_kv.views(rec, D, RD)
    table = torch.randperm(n_blocks, device=DEV, dtype=torch.int32)[None]
    return KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=block)


def gqa_decode(ctx):
    q = torch.randn(1, GQA_HQ, 1, GQA_D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, GQA_HK, ctx, GQA_D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        ms = bench_graph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    emit(case="gqa8_decode", ctx=ctx, ms=ms, bytes=2 * k.numel() * 2, flops=4 * GQA_HQ * GQA_D * ctx,
         kv_bytes_per_token_layer=2 * GQA_HK * GQA_D * 2)
    del k, v
    return ms


def fp8_index_keys(n: int, batch: int, block: int = 64) -> KeySource:
    """n random indexer keys per sequence as the paged cache stores them (128 E4M3 + fp32 scale = 132 B, in two
    planes: 128-byte payload rows, the scales apart)."""
    n_blocks = max(1, math.ceil(n / block))
    x = torch.randn(batch * n_blocks * block, DI, device=DEV)
    scale = (x.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
    table = torch.randperm(batch * n_blocks, device=DEV, dtype=torch.int32).view(batch, n_blocks)
    return KeySource(main=(x / scale).to(torch.float8_e4m3fn), table=table, block_size=block, scale=scale[:, 0])


def as_records(src: KeySource) -> KeySource:
    """The same keys in the pool's layout before session 4: one 132-byte record per key, so the payload rows
    are only 4-byte aligned (what the two planes are measured against)."""
    n = src.main.shape[0]
    raw = torch.empty(n, DI + 4, dtype=torch.uint8, device=src.main.device)
    raw[:, :DI], raw[:, DI:] = src.main.view(torch.uint8), src.scale.view(torch.uint8).view(n, 4)
    return KeySource(main=raw[:, :DI].view(torch.float8_e4m3fn), table=src.table, block_size=src.block_size,
                     scale=raw.view(torch.float32)[:, DI // 4])


def decode_inputs(ctx, batch):
    n4, n128 = ctx // 4, ctx // 128
    win = fp8_pool(WIN)
    win.table = win.table.expand(batch, -1).contiguous()
    comps = {}
    for r, n in ((4, n4), (128, n128)):
        comps[r] = fp8_pool(n)
        comps[r].table = comps[r].table.expand(batch, -1).contiguous()
    return dict(
        q=torch.randn(batch, 1, H, D, device=DEV, dtype=torch.bfloat16), sink=torch.randn(H, device=DEV),
        pos=torch.full((batch, 1), ctx - 1, device=DEV, dtype=torch.int32),
        zeros=torch.zeros(batch, dtype=torch.int32, device=DEV), win=win, comps=comps,
        n_comp={r: torch.full((batch,), n, device=DEV, dtype=torch.int32) for r, n in ((4, n4), (128, n128))},
        topk=torch.stack([torch.randperm(n4, device=DEV)[:TOPK] for _ in range(batch)])[:, None].int(),
        iq=torch.randn(batch, HI, DI, device=DEV, dtype=torch.bfloat16), w=torch.randn(batch, HI, device=DEV),
        ikeys=fp8_index_keys(n4, batch), ws=workspace(batch, DEV))


def attn_fn(x, ctx, ratio, kernel=attend_decode, topk=None, **kw):
    n = ctx // ratio
    topk = (x["topk"] if topk is None else topk) if ratio == 4 else None
    return lambda: kernel(x["q"], x["pos"], x["sink"], D ** -0.5, WIN, x["win"], x["zeros"], x["zeros"], win_ring=WIN,
                          comp=x["comps"][ratio], n_comp=x["n_comp"][ratio], max_comp=n, topk=topk, ratio=ratio,
                          rope_dim=RD, **kw)


def indexer_fn(x, ctx, key_layout="planes", **kw):
    """`key_layout` "records": the same keys as one 132-byte record each (`as_records`)."""
    B = x["q"].shape[0]
    keys = as_records(x["ikeys"]) if key_layout == "records" else x["ikeys"]
    return lambda: indexer_topk_decode(x["iq"], x["w"], keys, x["pos"].view(B), x["n_comp"][4], 4, TOPK,
                                       ctx // 4, ws=x["ws"], **kw)


def v4_decode(ctx, batch=1, legacy=True, tuned=None):
    """`tuned`: {"hca" | "csa" | "indexer": kwargs} for the new kernels (`tune_decode_kernels`' best at 1M)."""
    tuned = tuned or {}
    x = decode_inputs(ctx, batch)
    n4, n128 = ctx // 4, ctx // 128
    out = {}
    csa_bytes, hca_bytes = batch * (WIN + TOPK) * 584, batch * (WIN + n128) * 584
    idx_bytes = batch * n4 * (DI + 4 + 4 + 4)  # FP8 key + scale, score written and read back
    out["csa"] = ms = bench_graph(attn_fn(x, ctx, 4, **tuned.get("csa", {})))
    emit(case="csa_decode_attn", ctx=ctx, batch=batch, ms=ms, bytes=csa_bytes, flops=batch * 4 * H * D * (WIN + TOPK))
    out["csa_indexer"] = ms = bench_graph(indexer_fn(x, ctx, **tuned.get("indexer", {})))
    emit(case="csa_decode_indexer", ctx=ctx, batch=batch, ms=ms, bytes=idx_bytes, flops=batch * 2 * HI * DI * n4,
         keys="fp8 + scale planes (132 B)")
    ms = bench_graph(indexer_fn(x, ctx, key_layout="records", **tuned.get("indexer", {})))
    emit(case="csa_decode_indexer_records132", ctx=ctx, batch=batch, ms=ms, bytes=idx_bytes, flops=batch * 2 * HI * DI * n4,
         keys="one 132-byte record per key (payload rows 4-byte aligned): the pool's layout before session 4")
    step_idx = indexer_fn(x, ctx, **tuned.get("indexer", {}))
    B = batch
    step = lambda: attn_fn(x, ctx, 4, topk=step_idx().view(B, 1, TOPK), **tuned.get("csa", {}))()
    out["csa_step"] = ms = bench_graph(step)
    emit(case="csa_decode_step", ctx=ctx, batch=batch, ms=ms, bytes=csa_bytes + idx_bytes,
         note="indexer -> attention on its top-k, one CUDA graph")
    out["hca"] = ms = bench_graph(attn_fn(x, ctx, 128, **tuned.get("hca", {})))
    emit(case="hca_decode_attn", ctx=ctx, batch=batch, ms=ms, bytes=hca_bytes, flops=batch * 4 * H * D * (WIN + n128))
    if "decode_attn" in PREV:
        out["prev_csa"] = ms = bench_graph(attn_fn(x, ctx, 4, kernel=PREV["decode_attn"].attend_decode))
        emit(case="prev_csa_decode_attn", ctx=ctx, batch=batch, ms=ms, bytes=csa_bytes)
        out["prev_hca"] = ms = bench_graph(attn_fn(x, ctx, 128, kernel=PREV["decode_attn"].attend_decode))
        emit(case="prev_hca_decode_attn", ctx=ctx, batch=batch, ms=ms, bytes=hca_bytes)
    if "indexer_decode" in PREV:
        old = PREV["indexer_decode"]
        ws = old.workspace(batch, DEV)
        out["prev_csa_indexer"] = ms = bench_graph(lambda: old.indexer_topk_decode(
            x["iq"], x["w"], old.KeySource(**vars(x["ikeys"])), x["pos"].view(B), x["n_comp"][4], 4, TOPK, n4, ws=ws))
        emit(case="prev_csa_decode_indexer", ctx=ctx, batch=batch, ms=ms, bytes=idx_bytes, keys="fp8+scale (132 B)")
    if legacy:
        ms = bench_graph(attn_fn(x, ctx, 4, kernel=attend))
        emit(case="legacy_csa_decode_attn", ctx=ctx, batch=batch, ms=ms, bytes=csa_bytes)
        ms = bench_graph(attn_fn(x, ctx, 128, kernel=attend))
        emit(case="legacy_hca_decode_attn", ctx=ctx, batch=batch, ms=ms, bytes=hca_bytes)
        ik = torch.randn(batch, n4, DI, device=DEV, dtype=torch.bfloat16)
        iq, w, p1 = x["iq"][:, None], x["w"][:, None], torch.tensor([ctx - 1], device=DEV)
        ms = bench_graph(lambda: indexer_topk(iq, w, ik, p1, 4, TOPK))
        out["legacy_csa_indexer"] = ms
        emit(case="legacy_csa_decode_indexer", ctx=ctx, batch=batch, ms=ms, bytes=batch * n4 * (DI * 2 + 16),
             keys="bf16")
        ms = bench_graph(lambda: indexer_topk_decode(x["iq"], x["w"], KeySource(ik.view(-1, DI), torch.arange(
            batch, device=DEV, dtype=torch.int32)[:, None], n4), x["pos"].view(B), x["n_comp"][4], 4, TOPK, n4,
            ws=x["ws"], **tuned.get("indexer", {})))
        emit(case="csa_decode_indexer_bf16keys", ctx=ctx, batch=batch, ms=ms, bytes=batch * n4 * (DI * 2 + 8),
             note="the seam's decode path (dense model-dtype keys)")
        del ik
    return out


def check_decode(ctx=1 << 20):
    """Full-size agreement: decode attention vs the general kernel, the indexer vs the stable-sort reference."""
    from dsv4.kernels.indexer_decode import reference as ix_reference
    x = decode_inputs(ctx, 2)
    for ratio in (4, 128):
        a, b = attn_fn(x, ctx, ratio)(), attn_fn(x, ctx, ratio, kernel=attend)()
        emit(case="check_decode_attn", ctx=ctx, ratio=ratio, rel_err=rel_err(a, b))
        if "decode_attn" in PREV:
            c = attn_fn(x, ctx, ratio, kernel=PREV["decode_attn"].attend_decode)()
            emit(case="check_decode_attn_vs_prev", ctx=ctx, ratio=ratio, rel_err=rel_err(a, c))
    got = indexer_fn(x, ctx)()
    src, n = x["ikeys"], ctx // 4
    rows = (src.table.long()[..., None] * src.block_size + torch.arange(src.block_size, device=DEV)).flatten(1)[:, :n]
    keys = src.main.float()[rows] * src.scale[rows][..., None]  # (B, n, DI) dequantised
    want = ix_reference(x["iq"], x["w"], keys, x["pos"].view(-1), 4, TOPK)
    same_set = [len(set(g.tolist()) & set(w.tolist())) / TOPK for g, w in zip(got, want)]
    emit(case="check_decode_indexer", ctx=ctx, exact=bool(torch.equal(got, want)), set_overlap=same_set)
    keys = keys.bfloat16()  # the seam's decode path: dense model-dtype keys
    got = indexer_topk_decode(x["iq"], x["w"], KeySource(keys.view(-1, DI), torch.arange(
        2, device=DEV, dtype=torch.int32)[:, None], n), x["pos"].view(-1), x["n_comp"][4], 4, TOPK, n)
    want = ix_reference(x["iq"], x["w"], keys, x["pos"].view(-1), 4, TOPK)
    emit(case="check_decode_indexer_bf16keys", ctx=ctx, exact=bool(torch.equal(got, want)),
         set_overlap=[len(set(g.tolist()) & set(w.tolist())) / TOPK for g, w in zip(got, want)])
    for scores in ("zero_query",):  # every score equal: the exact fallback (candidate list overflows)
        iq = torch.zeros_like(x["iq"])
        got = indexer_topk_decode(iq, x["w"], src, x["pos"].view(-1), x["n_comp"][4], 4, TOPK, n)
        emit(case="check_decode_indexer_fallback", ctx=ctx, scores=scores,
             exact=bool(torch.equal(got, torch.arange(TOPK, device=DEV).expand(2, TOPK))),
             ms=bench_graph(lambda: indexer_topk_decode(iq, x["w"], src, x["pos"].view(-1), x["n_comp"][4], 4,
                                                        TOPK, n), reps=3))


def tune_decode_kernels(ctx=1 << 20, parts=("hca", "csa", "indexer")) -> dict:
    """Tiles of the decode kernels at 1M: attention (HCA, CSA) and the indexer. Returns the fastest of each."""
    x = decode_inputs(ctx, 1)
    best = {}

    def keep(name, cfg, ms):
        if name not in best or ms < best[name][1]:
            best[name] = (cfg, ms)
        return ms
    hca = [(16, None, 32, 4, 2), (16, None, 16, 4, 2), (16, None, 64, 8, 2), (32, None, 32, 8, 2), (16, 64, 32, 4, 2)]
    csa = [(16, 32, 32, 4, 2), (16, 32, 16, 4, 2), (32, 32, 32, 8, 2)]
    for name, ratio, cfgs in (("hca", 128, hca), ("csa", 4, csa)):
        for bh, chunk, bn, nw, ns in cfgs if name in parts else ():
            cfg = dict(block_h=bh, chunk=chunk, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                emit(case=f"tune_{name}_decode_attn_1m", **cfg, ms=keep(name, cfg, bench_graph(attn_fn(x, ctx, ratio, **cfg))))
            except Exception as e:
                emit(case=f"tune_{name}_decode_attn_1m", **cfg, error=str(e)[:160])
    # digits of the candidate bound (bits x rounds; 32 = exact), rank tiles
    for cfg in [dict(), dict(bits=4, rounds=4), dict(rounds=3), dict(bits=4, rounds=3),
                dict(rank_rows=32, rank_cols=256)]:
        if "indexer" not in parts:
            break
        try:
            ms = keep("indexer", cfg, bench_graph(indexer_fn(x, ctx, **cfg)))
            emit(case="tune_csa_decode_indexer_1m", **cfg, ms=ms, bytes=(ctx // 4) * 140,
                 gbps=(ctx // 4) * 140 / ms / 1e6)
        except Exception as e:
            emit(case="tune_csa_decode_indexer_1m", **cfg, error=str(e)[:160])
    emit(case="tune_best_1m", **{k: dict(cfg, ms=ms) for k, (cfg, ms) in best.items()})
    return {k: cfg for k, (cfg, _) in best.items()}


def profile_kernels(ctx=1 << 20):
    """Per-kernel device time (torch.profiler, CUDA activity) of the decode steps at ctx and of one late
    prefill indexer chunk (8192 queries over 32K keys): which launch of each op costs what."""
    from torch.profiler import ProfilerActivity, profile
    x = decode_inputs(ctx, 1)
    n = 32768
    iq = torch.randn(1, 8192, HI, DI, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(1, 8192, HI, device=DEV)
    ik = torch.randn(1, n, DI, device=DEV, dtype=torch.bfloat16)
    pos = torch.arange(4 * n - 8192, 4 * n, device=DEV)
    cases = {"hca_decode_attn": attn_fn(x, ctx, 128), "csa_decode_attn": attn_fn(x, ctx, 4),
             "csa_decode_indexer": indexer_fn(x, ctx),
             "prefill_indexer_32k": lambda: indexer_topk(iq, w, ik, pos, 4, TOPK),
             "prefill_indexer_32k_fp8": lambda: indexer_topk(iq, w, ik, pos, 4, TOPK, fp8=True),
             "prefill_indexer_32k_candidates": lambda: indexer_topk(iq, w, ik, pos, 4, TOPK, candidates=True)}
    for name, fn in cases.items():
        reps = 20 if "decode" in name else 3
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        per = {}
        for evt in prof.key_averages():  # CUDA activity only: every row is a kernel, memset or copy
            t = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
            if t > 0:
                per[evt.key[:60]] = t / reps
        per = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
        emit(case="profile", op=name, ctx=ctx if "decode" in name else 4 * n, us_per_call=per,
             us_total=round(sum(per.values()), 2))


def gqa_prefill(ctx):
    q = torch.randn(1, GQA_HQ, ctx, GQA_D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, GQA_HK, ctx, GQA_D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), ms=500)
    emit(case="gqa8_prefill", ctx=ctx, ms=ms, flops=4 * GQA_HQ * GQA_D * ctx * ctx / 2)
    return ms


def v4_prefill(ctx, ratio, chunk=8192, warm=True, indexer=indexer_topk, name=None, attn=True):
    """All ctx queries in chunks of `chunk` (chunked prefill): per chunk the indexer (CSA) over every
    finished key so far and the attention kernel over window + (top-k | all visible) compressed.
    `indexer`: the top-k function timed (a variant or an earlier version); `attn=False` times it alone."""
    n = ctx // ratio
    comp = torch.randn(1, n, D, device=DEV, dtype=torch.bfloat16)
    ik = torch.randn(1, n, DI, device=DEV, dtype=torch.bfloat16) if ratio == 4 else None
    sink = torch.randn(H, device=DEV)
    qs = torch.randn(1, chunk, H, D, device=DEV, dtype=torch.bfloat16)
    kv = torch.randn(1, chunk + WIN - 1, D, device=DEV, dtype=torch.bfloat16)
    iq = torch.randn(1, chunk, HI, DI, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(1, chunk, HI, device=DEV)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    for rep in range(2 if warm else 1):  # the first pass compiles each kernel specialisation
        t_attn, t_idx = _prefill_pass(ctx, ratio, chunk, n, comp, ik, sink, qs, kv, iq, w, ev, indexer, attn)
    keys = (WIN + TOPK) * ctx if ratio == 4 else WIN * ctx + ctx * ctx // (2 * ratio)
    name = name or ("csa" if ratio == 4 else "hca")
    if attn:
        emit(case=f"{name}_prefill_attn", ctx=ctx, ms=t_attn, flops=4 * H * D * keys, chunk=chunk, warm=warm)
    if ratio == 4:
        emit(case=f"{name}_prefill_indexer", ctx=ctx, ms=t_idx, flops=2 * HI * DI * ctx * (ctx // 4) / 2, chunk=chunk)
    if attn:
        emit(case=f"{name}_prefill_total", ctx=ctx, ms=t_attn + t_idx, chunk=chunk)
    return t_attn, t_idx


def _prefill_pass(ctx, ratio, chunk, n, comp, ik, sink, qs, kv, iq, w, ev, indexer, attn):
    t_attn = t_idx = 0.0
    for s in range(0, ctx, chunk):
        e = min(ctx, s + chunk)
        c = e - s
        pos = torch.arange(s, e, device=DEV)
        ev[0].record()
        topk = None
        if ratio == 4:
            nvis = e // 4
            topk = indexer(iq[:, :c], w[:, :c], ik[:, :nvis], pos, 4, TOPK) if nvis else None
        ev[1].record()
        L = c + min(s, WIN - 1)
        if attn:
            sparse_attention_dense(qs[:, :c], kv[:, -L:], pos, comp[:, :e // ratio] if e // ratio else None,
                                   topk if ratio == 4 else None, ratio, sink, D ** -0.5, WIN)
        ev[2].record()
        torch.cuda.synchronize()
        t_idx += ev[0].elapsed_time(ev[1])
        t_attn += ev[1].elapsed_time(ev[2])
    return t_attn, t_idx


def check_prefill_indexer(ctx=32768, S=1024):
    """The prefill indexer on the last S queries at ctx vs the stable-sort reference: the bf16 kernel (its
    products are exact in fp32, only the summation order differs, so near-ties may swap: index sets compared
    too) and the FP8 kernel (how far below the reference's k-th best score its worst pick lies, and the E4M3
    rounding bound on that)."""
    from dsv4.kernels.indexer_topk import reference as ix_reference
    n = ctx // 4
    iq = torch.randn(1, S, HI, DI, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(1, S, HI, device=DEV) * HI ** -0.5
    ik = torch.randn(1, n, DI, device=DEV, dtype=torch.bfloat16)
    pos = torch.arange(ctx - S, ctx, device=DEV)
    want = ix_reference(iq, w, ik, pos, 4, TOPK)
    score = (torch.einsum("bshd,bnd->bshn", iq.float(), ik.float()).relu() * w[..., None]).sum(2) * DI ** -0.5
    kth = score.gather(-1, want[..., -1:])
    bound = (torch.einsum("bshd,bnd->bshn", iq.float().abs(), ik.float().abs()) * w.abs()[..., None]).sum(2)
    bound = 2 * 0.13 * bound.amax(-1, keepdim=True) * DI ** -0.5  # 2 x (1 + 2^-4)^2 - 1 per product, both sides
    for fp8 in (False, True):
        got = indexer_topk(iq, w, ik, pos, 4, TOPK, fp8=fp8)
        overlap = sum(len(set(g.tolist()) & set(r.tolist())) for g, r in zip(got[0], want[0])) / (S * TOPK)
        worst = (kth - score.gather(-1, got)).amax().item()
        emit(case="check_prefill_indexer", ctx=ctx, queries=S, fp8=fp8, exact=bool(torch.equal(got, want)),
             set_overlap=overlap, worst_pick_below_kth=worst, fp8_bound=bound.amax().item())


def tune(ctx=32768, c=8192):
    n = ctx // 4
    q = torch.randn(1, c, H, D, device=DEV, dtype=torch.bfloat16)
    kv = torch.randn(1, c + WIN - 1, D, device=DEV, dtype=torch.bfloat16)
    comp = torch.randn(1, n, D, device=DEV, dtype=torch.bfloat16)
    pos = torch.arange(ctx - c, ctx, device=DEV)
    topk = torch.randint(0, n // 2, (1, c, TOPK), device=DEV, dtype=torch.int32)
    sink = torch.randn(H, device=DEV)
    for bh, bn, nw, ns in [(32, 32, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2), (64, 64, 8, 1), (32, 32, 4, 3)]:
        try:
            ms = bench(lambda: sparse_attention_dense(q, kv, pos, comp, topk, 4, sink, D ** -0.5, WIN, block_h=bh,
                                                      block_n=bn, num_warps=nw, num_stages=ns))
            emit(case="tune_csa_prefill_attn", block_h=bh, block_n=bn, warps=nw, stages=ns, ms=ms,
                 flops=4 * H * D * (WIN + TOPK) * c)
        except Exception as e:  # out of shared memory / registers for this tile
            emit(case="tune_csa_prefill_attn", block_h=bh, block_n=bn, warps=nw, stages=ns, error=str(e)[:120])


def tune_decode(ctx=1 << 20):
    n = ctx // 128
    q = torch.randn(1, 1, H, D, device=DEV, dtype=torch.bfloat16)
    sink = torch.randn(H, device=DEV)
    pos = torch.full((1, 1), ctx - 1, device=DEV, dtype=torch.int32)
    zeros = torch.zeros(1, dtype=torch.int32, device=DEV)
    nc = torch.full((1,), n, device=DEV, dtype=torch.int32)
    win = fp8_pool(WIN)
    fp8 = fp8_pool(n)
    bf = KVSource(main=torch.randn(n, D, device=DEV, dtype=torch.bfloat16),
                  table=torch.zeros(1, 1, device=DEV, dtype=torch.int32), block_size=n)
    for src_name, src in (("fp8", fp8), ("bf16", bf)):
        for bh, bn, nw, ns, split in [(32, 32, 8, 2, None), (64, 32, 8, 2, None), (16, 32, 4, 2, None),
                                      (16, 16, 4, 2, None), (64, 32, 8, 2, 128), (32, 32, 8, 2, 32)]:
            fn = lambda: attend(q, pos, sink, D ** -0.5, WIN, win, zeros, zeros, win_ring=WIN, comp=src, n_comp=nc,
                                max_comp=n, ratio=128, rope_dim=RD, block_h=bh, block_n=bn, num_warps=nw,
                                num_stages=ns, n_split=split)
            try:
                emit(case="tune_hca_decode_1m", rows=src_name, block_h=bh, block_n=bn, warps=nw, stages=ns,
                     n_split=split, ms=bench_graph(fn), ms_eager=bench(fn))
            except Exception as e:
                emit(case="tune_hca_decode_1m", rows=src_name, block_h=bh, block_n=bn, error=str(e)[:120])


TRANSFORMERS_NEEDED = "5.23"  # the first release with DeepSeek-V4 (DeepseekV4ForCausalLM, DeepseekV4Attention)
# Ours vs transformers' layer, both in bf16: each rounds q, kv, probabilities and outputs to 8 significant bits
# (2^-8 = 0.4 %) at its own points, and a near-tie in the indexer's scores can swap an entry at the top-k boundary.
# A 384-token run at Flash dims on CPU (reference kernels; top-k not yet selective there) gives 0.6 %.
BF16_TOL = 0.03
# One decoded token's output is not an average over ctx rows: in bf16 every run, transformers' own included, picks 1-2
# of the 512 CSA entries that the fp32 run does not (near-ties at the top-k boundary), and one such swap moves that
# token's output by several %. H200, Flash dims, ctx 4K / 8K: ours vs transformers 0.046 / 0.031 at the compared
# step, up to 0.062 / 0.093 over 11 steps, HCA (no top-k) 0.006; in fp32 (no TF32) ours, Triton or reference
# kernels, and transformers' decode all equal transformers' one-call forward over the same tokens to < 1e-4.
DECODE_BF16_TOL = 0.1


def transformers_v4():
    """transformers' DeepSeek-V4 modeling module; ImportError naming the needed version where it is missing."""
    try:
        import transformers
    except ImportError:
        transformers = None
    try:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4
    except ImportError:
        found = transformers.__version__ if transformers else "none"
        raise ImportError(f"the transformers comparison needs transformers >= {TRANSFORMERS_NEEDED} "
                          f"(DeepseekV4Attention); found {found}. On the GPU image carry a transformers>="
                          f"{TRANSFORMERS_NEEDED} wheel in .whl/ (the device README's wheel recipe)") from None
    return modeling_deepseek_v4


def transformers_twin(model: Transformer, layer_id: int) -> torch.nn.Module:
    """transformers' `DeepseekV4Attention` for layer `layer_id` of `model`, holding that layer's own weight tensors:
    renamed by `dsv4.hf` (the one mapping) and assigned, not copied, so no second copy is in memory and the dtypes
    are ours (fp32 norms, sinks and slot biases, as transformers keeps them)."""
    v4 = transformers_v4()
    attn = model.layers[layer_id].attn
    # eager is V4's only attention backend in transformers; a standalone module would otherwise get no mask
    config = v4.DeepseekV4Config(**hf.to_hf_config(model.config), attn_implementation="eager")
    ours, theirs = f"layers.{layer_id}.attn.", f"model.layers.{layer_id}.self_attn."
    weights = hf.to_hf_state_dict({ours + k: t for k, t in attn.state_dict().items()}, model.config)
    with torch.device(attn.wq_a.weight.device):  # its RoPE tables are built where the weights are
        twin = v4.DeepseekV4Attention(config, layer_id)
    twin.load_state_dict({k.removeprefix(theirs): t for k, t in weights.items()}, strict=True, assign=True)
    return twin.eval()


class CachedLayer:
    """One implementation of a layer's attention as its model runs it over a cache of its own kind:
    `forward(x, start, cache)` takes x (1, S, d) at positions start .. start + S - 1 right after what `cache`
    holds (and appends to it) -> (1, S, d); `new_cache()` gives an empty cache."""

    def __init__(self, forward, new_cache):
        self.forward, self.new_cache = forward, new_cache

    @torch.inference_mode()  # also where the fill runs outside `measure`: no autograd state on the weights' tensors
    def fill(self, x: torch.Tensor, chunk: int):
        """x through a fresh cache in `chunk`-token pieces -> (output, the cache now holding all of x)."""
        cache, out = self.new_cache(), torch.empty_like(x)
        for s in range(0, x.shape[1], chunk):
            out[:, s:s + chunk] = self.forward(x[:, s:s + chunk], s, cache)
        return out, cache

    def decoder(self, cache, start: int):
        """One-token steps token (1, 1, d) -> (1, 1, d) continuing `cache` from position `start`: each call
        appends its token, so the next one decodes the position after it."""
        positions = itertools.count(start)
        return lambda token: self.forward(token, next(positions), cache)


def layer_pair(model: Transformer, layer_id: int) -> tuple[CachedLayer, CachedLayer]:
    """Layer `layer_id`'s attention as ours (the module a block calls, over our `KVCache`) and transformers'
    twin of it (over a `DynamicCache(config=...)`, whose layer for a CSA / HCA layer keeps the window and its
    compressor's and indexer's state: unfinished blocks, overlap halves, finished entries), each called with
    the RoPE tables and the mask its model would hand every layer. transformers' twin also runs without a cache
    (cache None: its model's forward without `use_cache`, one call over all tokens)."""
    from transformers.cache_utils import DynamicCache
    v4 = transformers_v4()
    attn = model.layers[layer_id].attn
    inv_freq = model.inv_freq_compress if attn.ratio else model.inv_freq_main
    twin = transformers_twin(model, layer_id)
    with torch.device(attn.wq_a.weight.device):
        rotary = v4.DeepseekV4RotaryEmbedding(twin.config)

    def ours(x, start, cache):
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        return attn(x, [AttnView(slice(None), slice(None), positions, cache)], inv_freq)

    def theirs(x, start, cache):
        pos = torch.arange(start, start + x.shape[1], device=x.device)[None]
        # sized against this layer's entry of the cache (the others stay empty: one layer runs here)
        mask = v4.create_sliding_window_causal_mask(config=twin.config, inputs_embeds=x, attention_mask=None,
                                                    past_key_values=cache, position_ids=pos, layer_idx=layer_id)
        rope = {kind: rotary(x, pos, layer_type=kind) for kind in rotary.layer_types}  # "main" / "compress"
        return twin(x, position_embeddings=rope, position_ids=pos, attention_mask=mask, past_key_values=cache)[0]

    return (CachedLayer(ours, lambda: KVCache.empty(model.config)),
            CachedLayer(theirs, lambda: DynamicCache(config=twin.config)))


def measure(fn, x: torch.Tensor, reps: int):
    """(median ms, peak GiB above what is allocated before the call or None on CPU, output) of fn(x) after a
    warm-up call (Triton compiles its kernels for new shapes on first use); wall clock between synchronisations."""
    cuda = x.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, out = [], None
    with torch.inference_mode():
        fn(x)
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        for _ in range(reps):
            out = None  # the previous call's output is freed before this call allocates its own
            t = time.perf_counter()
            out = fn(x)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else None
    return statistics.median(times), peak, out


def decode_after(impl: CachedLayer, x: torch.Tensor, token: torch.Tensor, chunk: int, steps: int):
    """`measure` of one-token decode steps on `token` after the context x (1, ctx, d): impl's own cache filled
    with x in `chunk`-token pieces (untimed), then a warm-up step and `steps` timed ones (each appends its token:
    positions ctx, ctx + 1, ...; the output is the last step's, at ctx + steps)."""
    return measure(impl.decoder(impl.fill(x, chunk)[1], x.shape[1]), token, steps)


# The rows of each phase: timed (impl, layer, ctx), ours / transformers, the outputs' agreement
ROWS = {"prefill": ("vs_transformers_prefill", "vs_transformers_ratio", "vs_transformers_check"),
        "decode": ("vs_transformers_decode", "vs_transformers_decode_ratio", "vs_transformers_decode_check")}


def compare_runs(phase: str, runs: dict, layer: str, ctx: int, check: bool, tol: float, **fields):
    """Runs each of `runs` ({impl: () -> `measure`'s (ms, peak GiB, output)}) and emits `phase`'s rows (`ROWS`):
    one per impl ("oom" where it did not fit; the next one still runs), the ratio where both ran, and with
    `check` the relative error between the two outputs (`ok`: within `tol`). `fields` go into every row."""
    case, ratio_case, check_case = ROWS[phase]
    ms, gib, outs = {}, {}, {}
    for impl, run in runs.items():
        try:
            ms[impl], gib[impl], out = run()
        except torch.cuda.OutOfMemoryError:
            out = None
        if out is None:
            emit(case=case, impl=impl, layer=layer, ctx=ctx, oom=True, **fields)
            # past the except block, which kept the failed call's frames alive: collect what they held
            # (in reference cycles too) and give its blocks back before the next call
            gc.collect()
            torch.cuda.empty_cache()
            continue
        emit(case=case, impl=impl, layer=layer, ctx=ctx, ms=ms[impl], peak_gib=gib[impl], **fields)
        if check:
            outs[impl] = out
        del out
    if len(ms) == 2:
        emit(case=ratio_case, layer=layer, ctx=ctx, ms_ours_over_transformers=ms["dsv4"] / ms["transformers"],
             peak_ours_over_transformers=None if gib["dsv4"] is None else gib["dsv4"] / gib["transformers"],
             **fields)
    if len(outs) == 2:
        err = rel_err(outs["dsv4"], outs["transformers"])
        emit(case=check_case, layer=layer, ctx=ctx, rel_err=err, tol=tol, ok=err <= tol, **fields)


def compare_with_transformers(model: Transformer, ctxs: list[int], chunk: int = 8192, reps: int = 3,
                              decode_steps: int = 10, tol: float = BF16_TOL, decode_tol: float = DECODE_BF16_TOL):
    """Each compressed layer of `model` (CSA, HCA), ours vs transformers', at each of `ctxs` (`compare_runs`'
    rows, the outputs compared at the first context): prefill (ours in `chunk`-token pieces through its cache,
    transformers' in one call; `tol`), then one-token decode after ctx tokens: each side's own cache filled with
    them in `chunk`-token pieces (untimed), `decode_steps` steps timed after a warm-up step, the last step's
    output (position ctx + decode_steps) compared (`decode_tol`)."""
    import transformers
    device = model.embed.weight.device
    emit(case="vs_transformers_setup", transformers=transformers.__version__, kernels=kernels.backend(), chunk=chunk,
         reps=reps, decode_steps=decode_steps, heads=model.config.num_attention_heads,
         head_dim=model.config.head_dim, q_lora_rank=model.config.q_lora_rank, index_topk=model.config.index_topk,
         window=model.config.sliding_window)
    for layer_id, ratio in enumerate(model.config.layer_ratios):
        if not ratio:
            continue
        layer = "csa" if ratio == 4 else "hca"
        ours, theirs = layer_pair(model, layer_id)
        impls = {"dsv4": ours, "transformers": theirs}
        dtype = model.layers[layer_id].attn.wq_a.weight.dtype
        for i, ctx in enumerate(ctxs):
            gen = torch.Generator(device=device).manual_seed(ctx)
            x = torch.randn(1, ctx, model.config.hidden_size, generator=gen, device=device, dtype=dtype)
            token = torch.randn(1, 1, model.config.hidden_size, generator=gen, device=device, dtype=dtype)
            prefill = {"dsv4": lambda: measure(lambda x_: ours.fill(x_, chunk)[0], x, reps),
                       "transformers": lambda: measure(lambda x_: theirs.forward(x_, 0, None), x, reps)}
            compare_runs("prefill", prefill, layer, ctx, i == 0, tol)
            decode = {name: lambda impl=impl: decode_after(impl, x, token, chunk, decode_steps)
                      for name, impl in impls.items()}
            compare_runs("decode", decode, layer, ctx, i == 0, decode_tol, steps=decode_steps)


def kv_bytes_summary():
    """KV bytes per token per layer, averaged over Flash's layer mix, vs BF16 GQA-8 (2 x 8 x 128 x 2 B)."""
    flash = preset("flash")
    entry, ikey = 584, 68
    per_layer = [((entry + ikey) / 4 if r == 4 else entry / 128 if r == 128 else 0.0) for r in flash.layer_ratios]
    avg = sum(per_layer) / len(per_layer)
    gqa = 2 * GQA_HK * GQA_D * 2
    emit(case="kv_bytes_per_token_layer", v4_flash_avg=avg, csa=(entry + ikey) / 4, hca=entry / 128, gqa8=gqa,
         ratio=avg / gqa, note="compressed entries + FP4 indexer keys; window ring (128 x 584 B / layer) is constant")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", default="8K,32K,128K,512K,1M")
    ap.add_argument("--prefill-max", default="128K")
    ap.add_argument("--csa-prefill-1m", action="store_true", help="only the 1M-token prefill of one CSA layer")
    ap.add_argument("--tune", action="store_true", help="only: prefill attention tile configs, 8K queries at 32K")
    ap.add_argument("--tune-decode", action="store_true", help="only: HCA decode at 1M, FP8 vs bf16 rows, tiles")
    ap.add_argument("--tune-decode-kernels", action="store_true", help="only: decode kernels' tiles at 1M")
    ap.add_argument("--decode-only", action="store_true", help="skip prefill")
    ap.add_argument("--tuned", action="store_true", help="decode: run the 1M tile sweep first, time its best tiles")
    ap.add_argument("--check", action="store_true", help="full-size kernels vs references (only this, unless a sweep runs)")
    ap.add_argument("--prev", default="", help="folder of earlier decode kernel modules to time alongside")
    ap.add_argument("--no-legacy", action="store_true", help="decode: skip the general kernels")
    ap.add_argument("--tune-indexer", action="store_true", help="decode: the indexer's 1M sweep first, time its best")
    ap.add_argument("--profile", action="store_true", help="first: per-kernel device time of the decode steps")
    ap.add_argument("--no-hca-prefill", action="store_true", help="prefill: CSA only")
    ap.add_argument("--vs-transformers", action="store_true",
                    help="only: prefill and decode of a CSA and an HCA layer vs transformers' DeepseekV4Attention")
    ap.add_argument("--vs-transformers-ctx", default="4K,8K,16K,32K",
                    help="--vs-transformers: prefill lengths, and the contexts decode continues")
    args = ap.parse_args(argv)
    PREV.update(load_prev(args.prev) if args.prev else {})
    if args.vs_transformers:
        try:
            transformers_v4()  # before anything is built: the GPU image's transformers may predate DeepSeek-V4
        except ImportError as e:
            sys.exit(f"--vs-transformers: {e}")
    emit(case="device", name=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    if args.vs_transformers:
        model = build_random(two_layer_flash_config(), DEV, torch.bfloat16)
        compare_with_transformers(model, [parse_context(c) for c in args.vs_transformers_ctx.split(",")])
        return
    if args.tune:
        tune()
        return
    if args.tune_decode:
        tune_decode()
        return
    if args.tune_decode_kernels:
        tune_decode_kernels()
        return
    if args.profile:
        profile_kernels()
    tuned = tune_decode_kernels() if args.tuned else (
        tune_decode_kernels(parts=("indexer",)) if args.tune_indexer else None)
    if args.check:
        check_decode()
        check_prefill_indexer()
        if not (args.tuned or args.tune_indexer):
            return
    if args.csa_prefill_1m:
        t = time.time()
        v4_prefill(1 << 20, 4, chunk=8192, warm=False)
        emit(case="csa_prefill_1m_wall", s=time.time() - t, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
        return
    kv_bytes_summary()
    ctxs = [parse_context(c) for c in args.ctx.split(",")]
    pmax = parse_context(args.prefill_max)
    for ctx in ctxs:
        g = gqa_decode(ctx)
        v = v4_decode(ctx, tuned=tuned, legacy=not args.no_legacy)
        prev = {f"prev_{k}": g / v[f"prev_{k}"] for k in ("csa", "hca") if f"prev_{k}" in v}
        if "prev_csa_indexer" in v:
            prev["prev_csa_with_indexer"] = g / (v["prev_csa"] + v["prev_csa_indexer"])
        emit(case="decode_speedup", ctx=ctx, csa_attn=g / v["csa"], csa_with_indexer=g / (v["csa"] + v["csa_indexer"]),
             csa_step=g / v["csa_step"], hca=g / v["hca"], **prev)
        torch.cuda.empty_cache()
    v4_decode(ctxs[-1], batch=8, legacy=False, tuned=tuned)
    if args.decode_only:
        return
    for ctx in ctxs:
        if ctx > pmax:
            continue
        g = gqa_prefill(ctx)
        a, i = v4_prefill(ctx, 4)
        _, i8 = v4_prefill(ctx, 4, indexer=lambda *a_, **k_: indexer_topk(*a_, fp8=True, **k_), name="csa_fp8",
                           attn=False)
        _, ic = v4_prefill(ctx, 4, indexer=lambda *a_, **k_: indexer_topk(*a_, candidates=True, **k_),
                           name="csa_candidates", attn=False)
        sp = dict(csa=g / (a + i), csa_fp8_indexer=g / (a + i8), csa_candidates_indexer=g / (a + ic))
        if "indexer_topk" in PREV:
            _, ip = v4_prefill(ctx, 4, indexer=PREV["indexer_topk"].indexer_topk, name="prev_csa", attn=False)
            sp["prev_csa"] = g / (a + ip)
        if not args.no_hca_prefill:
            sp["hca"] = g / sum(v4_prefill(ctx, 128))
        emit(case="prefill_speedup", ctx=ctx, **sp)
        torch.cuda.empty_cache()
    emit(case="peak_memory_gib", value=torch.cuda.max_memory_allocated() / 2 ** 30)

if __name__ == "__main__":
    sys.exit(main())
