"""The fused compressor kernel (dsv4/kernels/compress.py) vs its PyTorch reference (= `Compressor.forward`'s
pooling): CSA (two overlapping series) and HCA, block 0 with and without carried overlap rows, several blocks,
batch 2, fp32 and bf16, per-row first blocks (a decode batch), and the fused FP8 record insert byte for byte
against `fp8_kv.pack(fp8_kv.quantize(...))`, rounding ties and scale boundaries included.

On a CPU machine the kernel runs in Triton's interpreter (TRITON_INTERPRET=1); on a GPU it compiles.
"""


import pytest
import torch

from dsv4 import kernels
from dsv4.cache import CompressorState
from dsv4.compressor import Compressor
from dsv4.config import preset
from dsv4.kernels import fp8_kv
from tests.conftest import DEVICE, needs_kernels, rel_err

pytestmark = needs_kernels

if kernels.triton_available():
    import triton
    import triton.language as tl

    from dsv4.kernels import compress as C
    from dsv4.kernels.compress import _write_record

    @triton.jit
    def _record_kernel(X, R8, R16, srec, srec16, D: tl.constexpr, ROPE: tl.constexpr, GROUP: tl.constexpr,
                       NSC: tl.constexpr, PAD: tl.constexpr):
        """The kernel's record writer alone, on given fp32 rows (crafted edge values)."""
        i = tl.program_id(0)
        x = tl.load(X + i * D + tl.arange(0, D))
        _write_record(x, R8 + i * srec, R16 + i * srec16, D, ROPE, GROUP, NSC, PAD)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inv_freq(rope):
    return 1.0 / (10000 ** (torch.arange(0, rope, 2).float() / rope))


def inputs(seed, B, n, m, D, rope, csa, prev, dtype):
    """kv, gate (B, n, m, width), ape, overlap rows (gate + ape, fp32 as `Compressor.forward` keeps them),
    norm weight, inv_freq; every tensor non-trivial so each input matters."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * D if csa else D
    kv = torch.randn(B, n, m, width, generator=gen).to(dtype)
    gate = (2 * torch.randn(B, n, m, width, generator=gen)).to(dtype)
    ape = torch.randn(m, width, generator=gen)
    okv = torch.randn(B, m, D, generator=gen).to(dtype) if prev else None
    og = 2 * torch.randn(B, m, D, generator=gen) if prev else None
    nw = 1 + 0.3 * torch.randn(D, generator=gen)
    return kv, gate, ape, okv, og, nw, 1e-6, inv_freq(rope)


def dev(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


CASES = {  # B, n_blocks, m, D, rope, CSA, carried overlap, first block
    "csa_block0_no_overlap": (2, 3, 4, 32, 16, True, False, 0),
    "csa_overlap_several": (2, 5, 4, 64, 16, True, True, 7),
    "csa_one_block_decode": (2, 1, 4, 32, 16, True, True, 3),
    "hca_block0": (2, 3, 128, 32, 16, False, False, 0),
    "hca_later_blocks": (2, 2, 128, 64, 16, False, False, 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_entries_match_reference(case, dtype):
    B, n, m, D, rope, csa, prev, first = CASES[case]
    args = inputs(len(case), B, n, m, D, rope, csa, prev, dtype)
    ref = C.reference(*args, first)
    out = C.compress_blocks(*dev(args), first)
    assert out.dtype == dtype and out.shape == (B, n, D)
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    with kernels.use("triton"):  # the seam routes here when autograd does not record
        assert torch.equal(kernels.compress_blocks(*dev(args), first), out)


def test_hca_slot_chunks_and_strided_views():
    """HCA's 128 slots folded in chunks of 8 (the Flash default) == one chunk; kv / gate as views with a
    padded channel stride (pool rows)."""
    args = inputs(3, 2, 2, 128, 32, 16, False, False, torch.float32)
    kv, gate = (torch.nn.functional.pad(t, (0, 8))[..., :32] for t in args[:2])
    ref = C.reference(*args, 2)
    for block_m in (8, 128):
        out = C.compress_blocks(*dev((kv, gate, *args[2:])), 2, block_m=block_m)
        assert rel_err(out.cpu(), ref) < 1e-5


def test_decode_batch_per_row_first_block_and_empty_overlap():
    """A paged decode batch: rows finish different blocks (first_block (B, 1)); a row at entry 0 has no block
    before it, which the paged cache marks by overlap rows of kv 0 / gate -inf."""
    args = list(inputs(5, 3, 1, 4, 32, 16, True, True, torch.float32))
    args[3][0], args[4][0] = 0.0, float("-inf")
    first = torch.tensor([[0], [9], [250000]])
    ref = C.reference(*args, first)
    out = C.compress_blocks(*dev(args), first.to(DEVICE))
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < 1e-5
    assert torch.equal(ref[:1], C.reference(*args[:3], None, None, *args[5:], 0)[:1])  # -inf rows = no rows


RECORD_CASES = {  # B, n, m, D, rope, CSA, dtype: tiny, the indexer's 128 dims, Flash's 512 (7 scale groups + pad)
    "tiny_fp32": (2, 3, 4, 32, 16, True, torch.float32),
    "hca_bf16": (2, 2, 128, 64, 16, False, torch.bfloat16),
    "flash_bf16": (2, 2, 4, 512, 64, True, torch.bfloat16),
    "flash_fp32": (1, 2, 4, 512, 64, True, torch.float32),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_record_insert_is_byte_identical(case):
    B, n, m, D, rope, csa, dtype = RECORD_CASES[case]
    args = inputs(len(case), B, n, m, D, rope, csa, csa, dtype)
    args = (*args[:5], args[5] * torch.logspace(-4, 4, D), *args[6:])  # scales that differ per 64-dim group
    size = fp8_kv.record_bytes(D, rope)
    R = B * n + 3
    gen = torch.Generator().manual_seed(1)
    rows = torch.randperm(R, generator=gen)[:B * n].view(B, n)
    rows[0, -1] = -1  # skipped: its row keeps its bytes
    for fn in (C.compress_blocks, C.reference):
        pool = torch.full((R, size), 0xA5, dtype=torch.uint8, device=DEVICE)
        out = fn(*dev(args), 4, records=pool, rows=rows.to(DEVICE)).cpu()
        want = fp8_kv.pack(*fp8_kv.quantize(out.reshape(-1, D), rope))
        flat = rows.reshape(-1)
        keep = flat >= 0
        assert torch.equal(pool.cpu()[flat[keep]], want[keep]), fn.__name__
        untouched = torch.ones(R, dtype=torch.bool)
        untouched[flat[keep]] = False
        assert (pool.cpu()[untouched] == 0xA5).all()


def test_record_writer_edge_values():
    """E4M3 ties to even in the normal and subnormal range (and the carry into the smallest normal), signed
    zeros, an all-zero scale group, group maxima exactly at and just above a power-of-two scale boundary, huge
    and tiny magnitudes, and BF16 ties in the RoPE dims: every byte as torch's quantize + pack."""
    D, rope = 128, 16  # E4M3 dims 112 = a full scale group + a partial one
    u = 2.0 ** -9  # E4M3's subnormal step at scale 1
    ties = [448.0, 1.0625, 1.1875, -1.0625, 0.5 * u, 1.5 * u, 2.5 * u, -2.5 * u, 7.5 * u, 7.49 * u, 2.0 ** -12,
            0.0, -0.0, 3.0 * 2 ** -7, 240.0, 232.0, -232.0, 0.00390625 * 1.5]
    rows = torch.zeros(5, D)
    rows[0, :len(ties)] = torch.tensor(ties)  # group 1 (dims 64..111) all zero
    rows[0, 112:] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130, -0.0] + [0.5] * 11)
    rows[1] = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 1e18
    rows[1, 0], rows[1, 64] = 448 * 2.0 ** 70, -448 * 2.0 ** 60 * (1 + 2 ** -20)  # amax / 448: 2^70, just over 2^60
    rows[2] = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 1e-25
    rows[3] = torch.randn(D, generator=torch.Generator().manual_seed(2)) * torch.logspace(-30, 30, D)
    rows[4] = torch.randn(D, generator=torch.Generator().manual_seed(3)).bfloat16().float() * 3  # bf16 entries
    size = fp8_kv.record_bytes(D, rope)
    recs = torch.full((rows.shape[0], size), 0xA5, dtype=torch.uint8, device=DEVICE)
    nsc = -(-(D - rope) // 64)
    _record_kernel[(rows.shape[0],)](rows.to(DEVICE), recs, recs.view(torch.int16), size, size // 2, D=D,
                                     ROPE=rope, GROUP=64, NSC=nsc, PAD=size - (D - rope) - 2 * rope - nsc)
    assert torch.equal(recs.cpu(), fp8_kv.pack(*fp8_kv.quantize(rows, rope)))


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_forward_through_the_seam(ratio):
    """`Compressor.forward` on the Triton path == on the reference, over a prefill, chunks that end mid-block
    and single-token steps (overlap rows carried between calls); with autograd recording, the seam takes the
    reference (gradients reach the projections)."""
    config = preset("tiny")
    torch.manual_seed(ratio)
    comp = Compressor(config, config.head_dim, ratio).to(DEVICE)
    with torch.no_grad():
        for p in comp.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 2 * ratio + 3, config.hidden_size, device=DEVICE)
    freqs = inv_freq(config.qk_rope_head_dim).to(DEVICE)
    cuts = [0, ratio + 1, 2 * ratio - 1, 2 * ratio, 2 * ratio + 3] if ratio == 4 else [0, ratio + 5, 2 * ratio + 3]
    got = {}
    for name in ("reference", "triton"):
        state = CompressorState()
        with torch.no_grad(), kernels.use(name):
            for a, b in zip(cuts, cuts[1:]):
                entries = comp(x[:, a:b], state, freqs)
        got[name] = entries
    assert got["triton"].shape == (2, (2 * ratio + 3) // ratio, config.head_dim)
    assert rel_err(got["triton"].cpu(), got["reference"].cpu()) < 1e-5
    with kernels.use("triton"):
        entries = comp(x, CompressorState(), freqs)
    entries.sum().backward()
    assert comp.wkv.weight.grad is not None and comp.ape.grad is not None
