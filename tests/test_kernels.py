"""Triton kernels vs their PyTorch references (dsv4/kernels), on tiny shapes: ragged tails, lengths that
are not multiples of any block size, top-k larger than the entries available, batch > 1, split-K decode.

On a CPU machine the kernels run in Triton's interpreter: set TRITON_INTERPRET=1 (CI does). On a GPU
the same tests compile and run the kernels. Without triton, or on CPU without the interpreter, they skip.
"""


import pytest
import torch

from dsv4 import kernels
from dsv4.analysis import v4_indexer_key_format, v4_kv_format, v4_kv_terms
from dsv4.attention import sparse_attention as attention_reference
from dsv4.config import preset
from dsv4.info import kv_bytes_per_token
from dsv4.kernels import fp8_kv
from dsv4.kernels.sparse_attn import _align
from tests.conftest import DEVICE, needs_kernels, random_model, random_topk, rel_err

pytestmark = needs_kernels

if kernels.triton_available():
    from dsv4.kernels import decode_attn as da
    from dsv4.kernels import indexer_decode as ixd
    from dsv4.kernels import indexer_topk as ix
    from dsv4.kernels import sparse_attn as sa
    from dsv4.kernels.paged_cache import PagedKVCache

# Model dtype per device: fp32 in the interpreter (exact comparisons), bf16 on the GPU.
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    """Kernel vs reference, relative error: bf16 rounding, or fp32 round-off (the interpreter's dtype on CPU)."""
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


TOL = tolerance(DTYPE)


# (B, S, H, D, cached, N, k, ratio, window, n_split): S new queries after `cached` window rows.
CASES = {
    "csa_prefill_ragged": (2, 13, 4, 32, 3, 9, 5, 4, 8, None),
    "csa_topk_gt_entries": (1, 6, 4, 32, 5, 3, 7, 4, 8, None),
    "hca_prefill": (2, 11, 3, 32, 7, 5, None, 4, 8, None),
    "window_only": (1, 9, 4, 48, 2, 0, None, 4, 8, None),
    "hca_decode_split": (3, 1, 4, 32, 7, 70, None, 2, 8, 3),
    "csa_decode_split": (2, 1, 20, 64, 9, 40, 37, 4, 8, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_attention_matches_reference(case):
    B, S, H, D, cached, N, k, ratio, window, n_split = CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    L = cached + S
    positions = torch.arange(ratio * N + 3 - S, ratio * N + 3) if N else torch.arange(cached, L)
    q = torch.randn(B, S, H, D, generator=gen).to(DTYPE)
    window_kv = torch.randn(B, L, D, generator=gen).to(DTYPE)
    compressed = torch.randn(B, N, D, generator=gen).to(DTYPE) if N else None
    topk = random_topk(gen, B, S, N, k, (positions + 1) // ratio) if k else None
    sink = torch.randn(H, generator=gen)
    args = (q, window_kv, positions, compressed, topk, ratio, sink, D ** -0.5, window)
    ref = attention_reference(*args)
    dev = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.full_like(dev[0], float("nan"))  # poisoned: every element must be written
    out = sa.sparse_attention_dense(*dev, n_split=n_split, out=out)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL


def test_fused_derotation():
    B, S, H, D, rope = 2, 5, 4, 32, 8
    gen = torch.Generator().manual_seed(3)
    positions = torch.arange(20, 20 + S)
    q, kv = torch.randn(B, S, H, D, generator=gen).to(DTYPE), torch.randn(B, S + 4, D, generator=gen).to(DTYPE)
    comp, sink = torch.randn(B, 5, D, generator=gen).to(DTYPE), torch.randn(H, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rope, 2).float() / rope))
    from dsv4.layers import apply_rope, rope_cos_sin
    cos, sin = rope_cos_sin(positions, inv_freq)
    ref = apply_rope(attention_reference(q, kv, positions, comp, None, 4, sink, D ** -0.5, 8), cos[:, None], -sin[:, None])
    for n_split in (1, 2):  # fused into the attention kernel, and into the split-combine kernel
        out = sa.sparse_attention_dense(*(t.to(DEVICE) for t in (q, kv, positions, comp)), None, 4, sink.to(DEVICE),
                                        D ** -0.5, 8, derotate_inv_freq=inv_freq.to(DEVICE), rope_dim=rope,
                                        n_split=n_split)
        assert rel_err(out.cpu(), ref) < TOL


# (B, H, D, N, k, ratio, window, cached, kwargs): one query per sequence after `cached` window rows.
DECODE_CASES = {
    "csa_holes_and_splits": (2, 20, 64, 40, 37, 4, 8, 9, dict(chunk=16)),  # 20 heads: a ragged head block
    "csa_topk_gt_entries": (1, 4, 32, 3, 7, 4, 8, 5, {}),
    "csa_wide_blocks": (2, 4, 64, 30, 12, 4, 8, 9, dict(block_n=64, chunk=16)),  # block > chunk: masked tail
    "hca_many_splits": (3, 4, 32, 70, None, 2, 8, 7, dict(chunk=16)),
    "window_only": (1, 4, 48, 0, None, 4, 8, 5, {}),
}


def dense_decode_case(B, H, D, N, k, ratio, window, L, seed):
    """One decode query per sequence after L window rows, N dense entries, top-k k (None: HCA) -> (the seam's
    arguments on DEVICE, the reference's output)."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.tensor([ratio * N + 2]) if N else torch.tensor([L - 1])
    q = torch.randn(B, 1, H, D, generator=gen).to(DTYPE)
    window_kv = torch.randn(B, L, D, generator=gen).to(DTYPE)
    compressed = torch.randn(B, N, D, generator=gen).to(DTYPE) if N else None
    topk = random_topk(gen, B, 1, N, k, (positions + 1) // ratio) if k else None
    sink = torch.randn(H, generator=gen)
    args = (q, window_kv, positions, compressed, topk, ratio, sink, D ** -0.5, window)
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args], attention_reference(*args)


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_attention_matches_reference(case):
    *shape, kwargs = DECODE_CASES[case]
    dev, ref = dense_decode_case(*shape, seed=len(case))
    out = torch.full_like(dev[0], float("nan"))
    out = da.sparse_attention_decode(*dev, out=out, **kwargs)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL
    with kernels.use("triton"):  # the seam routes S == 1 here
        assert rel_err(kernels.sparse_attention(*dev).cpu(), ref) < TOL


# ------------------------------------------------------------------------------------------ FP8 records
def test_fp8_record_roundtrip_and_size():
    flash = preset("flash")
    assert fp8_kv.record_bytes(flash.head_dim, flash.qk_rope_head_dim) == v4_kv_format(flash).bytes == 584
    x = torch.randn(7, 512) * torch.logspace(-3, 3, 7)[:, None]
    nope, rope, scale = fp8_kv.quantize(x, 64)
    assert nope.dtype == torch.float8_e4m3fn and rope.dtype == torch.bfloat16 and scale.shape == (7, 7)
    records = fp8_kv.pack(nope, rope, scale)
    assert records.shape == (7, 584)
    y = fp8_kv.dequantize(*fp8_kv.views(records, 512, 64), dtype=torch.float32)
    assert torch.equal(y[:, 448:], x[:, 448:].bfloat16().float())
    assert rel_err(y[:, :448], x[:, :448]) < 0.04  # E4M3: 3 mantissa bits
    # scales are the smallest powers of two that keep every block within E4M3's range
    blocks = x[:, :448].unflatten(-1, (7, 64)).abs().amax(-1)
    mult = torch.exp2(scale.float() - 127)
    assert (blocks / mult <= 448).all() and (blocks / mult > 224).all()


def _paged_setup(config, lengths, gen, index_keys="fp8"):
    """A paged cache holding random window rows and compressed entries for sequences of `lengths`."""
    cache = PagedKVCache(config, max_seqs=len(lengths) + 1, max_tokens=sum(lengths) + 64, block_size=4,
                         index_keys=index_keys, device=DEVICE)
    cache.allocate()  # slot 0 stays empty: the sequences use non-trivial slots
    slots, truth = [], []
    for n in lengths:
        s = cache.allocate()
        per_layer = {}
        for layer, r in cache.ratios.items():
            win = torch.randn(n, config.head_dim, generator=gen).to(DTYPE).to(DEVICE)
            cache.write_window(layer, s, win, 0)
            ent = torch.randn(n // r if r else 0, config.head_dim, generator=gen).to(DTYPE).to(DEVICE)
            if r:
                cache.write_entries(layer, s, ent, 0)
            per_layer[layer] = (win, ent)
        cache.lengths[s] = n
        slots.append(s)
        truth.append(per_layer)
    return cache, slots, truth


def paged_decode_cases(seed: int):
    """3 sequences of different lengths in the paged FP8 pool (ring window + shuffled block tables), CSA, HCA and
    window-only layers -> per layer (layer, `attend_decode` args, kwargs, per row the reference's output on the
    dequantised entries)."""
    config = preset("tiny").replace(compress_ratios=[4, 128, 0, 4], index_topk=6)
    gen = torch.Generator().manual_seed(seed)
    lengths = [300, 141, 9]
    cache, slots, truth = _paged_setup(config, lengths, gen)
    H, D, rd, W = config.num_attention_heads, config.head_dim, config.qk_rope_head_dim, config.sliding_window
    for layer, r in cache.ratios.items():
        q = torch.randn(len(slots), 1, H, D, generator=gen).to(DTYPE).to(DEVICE)
        sink = torch.randn(H, generator=gen).to(DEVICE)
        pos = torch.tensor([[n - 1] for n in lengths], dtype=torch.int32, device=DEVICE)
        n_comp = torch.tensor([n // r if r else 0 for n in lengths], dtype=torch.int32, device=DEVICE)
        topk = None
        if r == 4:
            topk = torch.stack([random_topk(gen, 1, 1, max(int(n_comp.max()), 1), config.index_topk,
                                            n_comp[i:i + 1].cpu())[0] for i in range(len(slots))]).to(DEVICE)
        zeros = torch.zeros(len(slots), dtype=torch.int32, device=DEVICE)
        args = (q, pos, sink, D ** -0.5, W, cache.window_source(layer, slots), zeros, zeros)
        kw = dict(win_ring=W, comp=cache.entry_source(layer, slots) if r else None, n_comp=n_comp,
                  max_comp=int(n_comp.max()), topk=topk, ratio=max(r, 1), rope_dim=rd)
        refs = []
        for i, n in enumerate(lengths):
            win, ent = (fp8_kv.fake_quantize(t.float(), rd).to(DTYPE).cpu() for t in truth[i][layer])
            refs.append(attention_reference(q[i:i + 1].cpu(), win[None, -(W - 1) - 1:], torch.tensor([n - 1]),
                                            ent[None] if r else None,
                                            topk[i:i + 1].cpu() if topk is not None else None,
                                            max(r, 1), sink.cpu(), D ** -0.5, W))
        yield layer, args, kw, refs


def test_paged_fp8_decode_ragged_batch():
    """Decode for 3 sequences of different lengths from the paged FP8 pool (ring window + block tables),
    dequantised in the kernel, vs the reference on the dequantised entries."""
    for layer, args, kw, refs in paged_decode_cases(seed=7):
        outs = [sa.attend(*args, **kw, n_split=2), da.attend_decode(*args, **kw, chunk=16),
                da.attend_decode(*args, **kw, chunk=32, block_n=32, block_h=32)]  # decode kernel, wider tiles
        for i, ref in enumerate(refs):
            for out in outs:
                assert rel_err(out[i:i + 1].cpu(), ref) < TOL, (layer, i)


def _fp8_source(x: torch.Tensor, rope_dim: int):
    """(B, L, D) -> (KVSource over FP8 records in row-major blocks of L, what the kernel must see: dequantised)."""
    B, L, D = x.shape
    rec = fp8_kv.pack(*fp8_kv.quantize(x.reshape(B * L, D).float(), rope_dim))
    nope, rope, scale = fp8_kv.views(rec.to(DEVICE), D, rope_dim)
    table = torch.arange(B, dtype=torch.int32, device=DEVICE)[:, None]
    return (sa.KVSource(main=nope, rope=rope, scale=scale, table=table, block_size=L),
            fp8_kv.fake_quantize(x.float(), rope_dim).to(DTYPE))


@pytest.mark.parametrize("D,rope", [(160, 32), (128, 16)])  # E4M3 dims: two full scale groups / 64 + 48
def test_decode_fp8_records_split_operands(D, rope):
    """FP8 records whose E4M3 part spans several 64-dim scale groups (a partial last one too), the RoPE dims
    as the second dot operand: HCA and CSA decode vs the reference on the dequantised rows."""
    check_fp8_records_decode(D, rope)


def check_fp8_records_decode(D: int, rope: int, dtype: torch.dtype = DTYPE, **tiles) -> None:
    """`attend_decode(**tiles)` on FP8 records of D dims (rope of them BF16), HCA and CSA, vs the reference
    (queries in `dtype`, its tolerance)."""
    gen = torch.Generator().manual_seed(D)
    B, H, N, W, L = 2, 4, 37, 8, 8
    win_x, comp_x = torch.randn(B, L, D, generator=gen), torch.randn(B, N, D, generator=gen) * 3
    win, win_ref = _fp8_source(win_x, rope)
    comp, comp_ref = _fp8_source(comp_x, rope)
    q = torch.randn(B, 1, H, D, generator=gen).to(dtype)
    sink = torch.randn(H, generator=gen)
    pos = torch.tensor([4 * N + 1])
    p32 = pos.int().to(DEVICE).expand(B, 1).contiguous()
    pos0 = (p32[:, 0] - (L - 1)).contiguous()
    n_comp = torch.full((B,), N, dtype=torch.int32, device=DEVICE)
    for topk in (None, random_topk(gen, B, 1, N, 11, torch.tensor([N]))):
        ref = attention_reference(q.to(win_ref.dtype), win_ref, pos, comp_ref, topk, 4, sink, D ** -0.5, W)
        out = da.attend_decode(q.to(DEVICE), p32, sink.to(DEVICE), D ** -0.5, W, win, pos0, pos0, comp=comp,
                               n_comp=n_comp, max_comp=N, topk=None if topk is None else topk.int().to(DEVICE),
                               ratio=4, rope_dim=rope, chunk=16, **tiles)
        assert rel_err(out.cpu(), ref) < tolerance(dtype)


def test_paged_cache_bytes_match_analyser_and_info():
    flash = preset("flash")
    cache = PagedKVCache(flash, max_seqs=2, max_tokens=4096, block_size=64, index_keys="fp4", device="cpu",
                         layers=[2, 3])  # one CSA, one HCA layer of Flash's schedule
    slot = cache.allocate()
    cache.lengths[slot] = 3000
    used = cache.used_bytes(slot)
    one_csa_one_hca = flash.replace(num_hidden_layers=2, num_hash_layers=0, compress_ratios=[4, 128, 0])
    assert used == {k: int(v) for k, v in v4_kv_terms(one_csa_one_hca, 3000).items()}
    per_token = kv_bytes_per_token(one_csa_one_hca, index_keys="fp4")  # `dsv4 info --index-keys fp4`
    assert per_token["compressed_sparse_attention"] == (584 + 68) / 4
    assert per_token["heavily_compressed_attention"] == 584 / 128
    assert used["compressed"] + used["indexer_keys"] == (3000 // 4) * (584 + 68) + (3000 // 128) * 584
    assert cache.entries[2].shape[1] == cache.entries[3].shape[1] == 584
    key_bytes = cache.keys[2].shape[1] + cache.key_scales[2].shape[1]  # payload and scale planes
    assert key_bytes == v4_indexer_key_format(flash).bytes == 68
    fp8 = PagedKVCache(flash, 1, 256, layers=[2])  # the default, as `dsv4 info`'s
    assert (fp8.keys[2].shape[1], fp8.key_scales[2].shape[1]) == (128, 4)
    assert 128 + 4 == kv_bytes_per_token(one_csa_one_hca)["compressed_sparse_attention"] * 4 - 584


def test_index_key_payload_rows_are_16_byte_aligned():
    """The pool keeps index-key payloads and scales in two planes so the decode scorer's row loads can be
    16-byte vectors (`_align`); in one 132-byte record the payload rows were only 4-byte aligned."""
    cache = PagedKVCache(preset("flash"), 1, 256, layers=[2])
    src = cache.key_source(2, [0])
    assert _align(src.main) == 16 and src.main.shape[1] == 128 and src.scale.stride(0) == 1


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_index_key_roundtrip(kind):
    config = preset("small")  # indexer dims 32: one FP4 block
    cache = PagedKVCache(config, 1, 64, block_size=4, index_keys=kind, device=DEVICE, layers=[1])
    slot = cache.allocate()
    keys = torch.randn(9, config.index_head_dim).to(DEVICE)
    cache.write_index_keys(1, slot, keys, 0)
    cache.lengths[slot] = 36
    assert rel_err(cache.gather_index_keys(1, slot).cpu(), keys.cpu()) < (0.04 if kind == "fp8" else 0.2)


# ------------------------------------------------------------------------------------------ indexer
INDEXER_CASES = {  # B, S, Hi, Di, N, k, integer-valued (exact scores, many ties)
    "ties": (2, 9, 2, 16, 7, 3, True),
    "topk_gt_entries": (1, 13, 4, 16, 11, 20, False),
    "ragged": (2, 21, 3, 24, 30, 5, True),
    # N >= 8k: top-k over the candidates above the group-maxima bound (groups of 8 / 4 keys)
    "candidates_ties": (2, 9, 2, 16, 200, 5, True),
    "candidates": (1, 13, 4, 16, 300, 7, False),
}


@pytest.mark.parametrize("case", sorted(INDEXER_CASES))
def test_indexer_topk_matches_reference(case):
    B, S, Hi, Di, N, k, integer = INDEXER_CASES[case]
    gen = torch.Generator().manual_seed(11)
    draw = ((lambda *s: torch.randint(-2, 3, s, generator=gen).float()) if integer
            else (lambda *s: torch.randn(*s, generator=gen)))
    q, keys, w = draw(B, S, Hi, Di), draw(B, N, Di), draw(B, S, Hi)
    positions = torch.arange(4 * N - S, 4 * N)
    ref = ix.reference(q, w, keys, positions, 4, k)
    out = ix.indexer_topk(q.to(DEVICE), w.to(DEVICE), keys.to(DEVICE), positions.to(DEVICE), 4, k,
                          key_budget=3 * N, candidates=N >= 8 * k)  # several query chunks
    if integer or DEVICE == "cpu":
        assert torch.equal(out.cpu(), ref)  # same order, same tie-break
        if N >= 8 * k:  # every score equal: the candidate list overflows, the rows' full top-k answers
            zero = ix.indexer_topk(torch.zeros_like(q).to(DEVICE), w.to(DEVICE), keys.to(DEVICE),
                                   positions.to(DEVICE), 4, k, candidates=True)
            assert torch.equal(zero.cpu(), torch.arange(k).expand_as(zero.cpu()))
    else:  # tf32/fp32 summation order may swap near-ties: compare the chosen scores
        score = lambda idx: torch.einsum("bshd,bnd->bshn", q, keys).relu().mul(w[..., None]).sum(2).gather(
            -1, idx.clamp(min=0))
        torch.testing.assert_close(score(out.cpu()), score(ref), atol=1e-3, rtol=1e-3)


def test_indexer_topk_fp8_scores():
    """FP8 (E4M3) scoring of the prefill indexer: q per (query, head) and keys per entry, power-of-two scales.
    Integer-valued inputs in [-2, 2] are exact in E4M3 (they scale to 0, +-128, +-256), so the picks equal
    the stable-sort reference, ties included. On Gaussian inputs the scores move by the E4M3 rounding, at most
    0.15 x sum_h |w_h| sum_d |q_hd K_sd| x Di^-1/2 per key ((1 + 2^-4)^2 - 1 = 0.129 per product for the 3-bit
    mantissa, plus subnormal steps), so every pick scores at most twice that below the reference's k-th best."""
    gen = torch.Generator().manual_seed(4)
    B, S, Hi, Di, N, k = 2, 9, 4, 32, 60, 8
    positions = torch.arange(4 * N - S, 4 * N)
    ints = lambda *s: torch.randint(-2, 3, s, generator=gen).float()
    q, keys, w = ints(B, S, Hi, Di), ints(B, N, Di), ints(B, S, Hi)
    out = ix.indexer_topk(q.to(DEVICE), w.to(DEVICE), keys.to(DEVICE), positions.to(DEVICE), 4, k, fp8=True)
    assert torch.equal(out.cpu(), ix.reference(q, w, keys, positions, 4, k))
    q, keys = torch.randn(B, S, Hi, Di, generator=gen), torch.randn(B, N, Di, generator=gen)
    w = torch.randn(B, S, Hi, generator=gen)
    ref = ix.reference(q, w, keys, positions, 4, k)
    out = ix.indexer_topk(q.to(DEVICE), w.to(DEVICE), keys.to(DEVICE), positions.to(DEVICE), 4, k, fp8=True).cpu()
    score = torch.einsum("bshd,bnd->bshn", q, keys).relu().mul(w[..., None]).sum(2) * Di ** -0.5
    bound = torch.einsum("bshd,bnd->bshn", q.abs(), keys.abs()).mul(w.abs()[..., None]).sum(2) * Di ** -0.5
    tol = 2 * 0.15 * bound.amax(-1, keepdim=True)
    assert (score.gather(-1, out) >= score.gather(-1, ref[..., -1:]) - tol).all()
    assert (out.sort(-1).values.diff(dim=-1) > 0).all()  # distinct picks


# B, Hi, Di, N, k, integer-valued, lengths, positions, kwargs
INDEXER_DECODE_CASES = {
    "ties": (2, 2, 16, 37, 5, True, None, None, {}),
    "many_tiles": (2, 4, 16, 300, 20, False, None, None, dict(tile=64, block_n=16)),
    "ragged": (3, 3, 24, 200, 50, True, [200, 120, 7], [900, 300, 100], dict(tile=32, block_n=16)),
    "topk_gt_entries": (1, 2, 16, 10, 20, False, None, None, {}),
    "fallback_cap": (2, 2, 16, 200, 30, True, None, None, dict(tile=32, block_n=16, cap=16)),
    "groups_of_one": (2, 2, 16, 200, 30, True, None, None, dict(tile=32, block_n=16, group=1)),  # L = k-th score
    "groups_of_16": (2, 3, 16, 300, 8, False, [300, 250], [1300, 1300], dict(tile=64, block_n=32, group=16)),
    # the candidate bound exact (4 x 8 bits) / 16-bin digits / one round (top 8 bits: many more candidates),
    # other rank tiles
    "exact_bound": (2, 2, 16, 300, 20, True, None, None, dict(tile=64, block_n=16, rounds=4, rank_rows=64,
                                                               rank_cols=128)),
    "bound_4_bit_digits": (2, 2, 16, 300, 20, True, None, None, dict(tile=64, block_n=16, bits=4, rounds=4)),
    "one_round_bound": (2, 3, 16, 300, 20, False, None, None, dict(tile=64, block_n=16, rounds=1, rank_rows=32)),
    # collect programs over other tiles than the score kernel's: fewer and longer, and more and shorter
    "collect_tile_longer": (2, 3, 16, 300, 20, False, [300, 170], None, dict(tile=32, block_n=16, collect_tile=128)),
    "collect_tile_shorter": (2, 2, 16, 300, 20, True, None, None, dict(tile=128, block_n=16, collect_tile=48)),
}


@pytest.mark.parametrize("case", sorted(INDEXER_DECODE_CASES))
def test_indexer_decode_matches_reference(case):
    """Fused score + threshold + rank top-k for one query per row: same indices in the same order as the stable
    sort (integer-valued inputs make many exact ties), with group maxima of 1..16 keys and the exact fallback
    (candidate list overflow) too."""
    B, Hi, Di, N, k, integer, lengths, positions, kwargs = INDEXER_DECODE_CASES[case]
    gen = torch.Generator().manual_seed(5)
    draw = ((lambda *s: torch.randint(-2, 3, s, generator=gen).float()) if integer
            else (lambda *s: torch.randn(*s, generator=gen)))
    q, keys, w = draw(B, Hi, Di), draw(B, N, Di), draw(B, Hi)
    lengths = torch.full((B,), N) if lengths is None else torch.tensor(lengths)
    positions = torch.full((B,), 4 * N + 1) if positions is None else torch.tensor(positions)
    ref = ixd.reference(q, w, keys, positions, 4, k, lengths)
    out = ixd.indexer_topk_decode(q.to(DEVICE), w.to(DEVICE), ixd.dense_keys(keys.to(DEVICE)),
                                  positions.int().to(DEVICE), lengths.int().to(DEVICE), 4, k, N, **kwargs)
    assert torch.equal(out.cpu(), ref)


def test_indexer_decode_all_equal_scores():
    """Every score equal (zero queries): the lowest indices win, in index order."""
    q, keys, w = torch.zeros(2, 2, 16), torch.randn(2, 100, 16), torch.ones(2, 2)
    pos, n = torch.full((2,), 999, dtype=torch.int32), torch.full((2,), 100, dtype=torch.int32)
    out = ixd.indexer_topk_decode(q.to(DEVICE), w.to(DEVICE), ixd.dense_keys(keys.to(DEVICE)), pos.to(DEVICE),
                                  n.to(DEVICE), 4, 9, 100, tile=32, block_n=16)
    assert torch.equal(out.cpu(), torch.arange(9).expand(2, 9))


def test_indexer_decode_paged_fp8_keys_and_seam():
    """FP8 E4M3 keys with a per-key fp32 scale (the paged cache's 132-B record) behind a shuffled block table;
    power-of-two scales keep the scores exact. And the dense adapter and the seam against the chunked reference."""
    gen = torch.Generator().manual_seed(9)
    B, Hi, Di, N, bs = 2, 4, 16, 48, 8
    vals = torch.randint(-3, 4, (B, N, Di), generator=gen).float()
    scale = torch.exp2(torch.randint(-2, 3, (B, N), generator=gen).float())
    blocks = torch.randperm(B * N // bs, generator=gen).int().view(B, N // bs)
    main = torch.empty(B * N, Di, dtype=torch.float8_e4m3fn)
    kscale = torch.empty(B * N)
    rows = (blocks[..., None].long() * bs + torch.arange(bs)).view(B, N)
    main[rows.flatten()] = vals.view(-1, Di).to(torch.float8_e4m3fn)
    kscale[rows.flatten()] = scale.flatten()
    q, w = torch.randint(-2, 3, (B, Hi, Di), generator=gen).float(), torch.randint(-2, 3, (B, Hi), generator=gen).float()
    pos = torch.tensor([4 * N + 3, 4 * 30 + 1])  # second row sees 30 of its 48 entries
    lengths = torch.full((B,), N)
    ref = ixd.reference(q, w, vals * scale[..., None], pos, 4, 12, lengths)
    src = ixd.KeySource(main=main.to(DEVICE), table=blocks.to(DEVICE), block_size=bs, scale=kscale.to(DEVICE))
    out = ixd.indexer_topk_decode(q.to(DEVICE), w.to(DEVICE), src, pos.int().to(DEVICE), lengths.int().to(DEVICE), 4,
                                  12, N, tile=16, block_n=16)
    assert torch.equal(out.cpu(), ref)
    q1, w1, keys = q[:, None], w[:, None], vals * scale[..., None]
    got = ixd.indexer_topk_dense(q1.to(DEVICE), w1.to(DEVICE), keys.to(DEVICE), pos[:1].to(DEVICE), 4, 12)
    assert torch.equal(got.cpu(), ix.reference(q1, w1, keys, pos[:1], 4, 12))
    with kernels.use("triton"):
        got = kernels.index_topk(q1.to(DEVICE), w1.to(DEVICE), keys.to(DEVICE), pos[:1].to(DEVICE), 4, 12)
    assert torch.equal(got.cpu(), ix.reference(q1, w1, keys, pos[:1], 4, 12))


def test_indexer_reference_is_the_models():
    config = preset("tiny").replace(index_topk=5)
    model = random_model(config.replace(compress_ratios=[4, 4, 4, 4]), seed=2)
    indexer = model.layers[0].attn.indexer
    gen = torch.Generator().manual_seed(0)
    x, q_latent = torch.randn(2, 40, config.hidden_size, generator=gen), torch.randn(2, 40, config.q_lora_rank, generator=gen)
    positions = torch.arange(40)
    from dsv4.cache import CompressorState
    from dsv4.layers import apply_rope, rope_cos_sin
    inv_freq = model.inv_freq_compress
    with torch.no_grad():
        want = indexer(x, q_latent, positions, CompressorState(), inv_freq)
        keys = indexer.compressor(x, CompressorState(), inv_freq)
        q = indexer.wq_b(q_latent).unflatten(-1, (indexer.n_heads, indexer.head_dim))
        cos, sin = rope_cos_sin(positions, inv_freq)
        q = apply_rope(q, cos[:, None], sin[:, None])
        w = indexer.weights_proj(x).float() * indexer.n_heads ** -0.5
    assert torch.equal(ix.reference(q, w, keys, positions, 4, indexer.topk), want)


# ------------------------------------------------------------------------------------------ the seam
def test_dispatch_switch(monkeypatch):
    monkeypatch.setenv("DSV4_KERNELS", "reference")
    t = torch.zeros(1, device=DEVICE)
    assert not kernels.use_triton(t)
    with kernels.use("triton"):
        assert kernels.use_triton(t)
    monkeypatch.setenv("DSV4_KERNELS", "bogus")
    with pytest.raises(kernels.KernelBackendError):
        kernels.backend()


def test_model_forward_and_decode_through_triton():
    """The whole tiny model with the Triton attention == with the reference, full pass and cached decode."""
    config = preset("tiny").replace(compress_ratios=[4, 128, 0, 4], initializer_range=0.2)
    model = random_model(config, seed=5).to(DEVICE)
    ids = torch.randint(0, config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad(), kernels.use("reference"):
        ref = model(ids)
    with torch.no_grad(), kernels.use("triton"):
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :131], cache)] + [model(ids[:, i:i + 1], cache) for i in range(131, 140)]
    tol = 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(full, ref, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=tol, rtol=0)


def test_fp8_kv_logits_close_to_model_dtype():
    """FP8 KV (what the paged cache stores: every window and compressed entry through the 584-byte record,
    the indexer's keys through their 132-byte FP8 format) vs the model-dtype cache, on a random tiny model
    (whose MoE routing flips amplify any perturbation): logits within 12 % relative L2 (measured 9.2 %; 4.0 %
    with the KV records alone) and the same argmax at >= 88 % of positions (measured 91.4 %)."""
    config = preset("tiny").replace(compress_ratios=[4, 128, 0, 4], initializer_range=0.02)
    model = random_model(config, seed=5)
    ids = torch.randint(0, config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), kernels.use("reference"):
        ref = model(ids)
        with kernels.simulate_fp8_kv():
            fp8 = model(ids)
    assert 0 < rel_err(fp8, ref) < 0.12
    assert (fp8.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.88


def test_training_gets_gradients_through_the_seam():
    """The inference kernels are forward-only: with autograd recording, the seam must take the reference path
    (or, when enabled, the trainable kernel: tests/test_kernel_attn_train.py), so a training step through
    `kernels.sparse_attention` has the reference's gradients (not none)."""
    gen = torch.Generator().manual_seed(5)
    B, S, H, D, N, k = 1, 6, 2, 32, 4, 3
    q = torch.randn(B, S, H, D, generator=gen).to(DEVICE).requires_grad_()
    kv = torch.randn(B, S, D, generator=gen).to(DEVICE).requires_grad_()
    comp = torch.randn(B, N, D, generator=gen).to(DEVICE).requires_grad_()
    topk = random_topk(gen, B, S, N, k, torch.div(torch.arange(S) + 1, 4, rounding_mode="floor")).to(DEVICE)
    sink, pos = torch.zeros(H, device=DEVICE), torch.arange(S, device=DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        with kernels.use(backend):
            out = kernels.sparse_attention(q, kv, pos, comp, topk, 4, sink, D ** -0.5, 4, 8)
        grads.append(torch.autograd.grad(out.square().sum(), (q, kv, comp)))
    for g_triton, g_ref in zip(*grads):
        torch.testing.assert_close(g_triton, g_ref)
