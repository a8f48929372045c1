"""benchmarks/sm90.py's SASS reading (`sass_loops`), on a hand-written listing: the figures of
benchmarks/decode_sass.py (instructions per loop iteration, tensor-core instructions) rest on it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sm90 import sass_loops  # noqa: E402

LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/              @!P0 LDG.E.128 R16, desc[UR4][R2.64] ;
        /*0030*/                   HGMMA.64x32x16.F32 R24, gdesc[UR8], R24 ;
        /*0040*/              @P1 BRA `(.L_x_1) ;
        /*0050*/                   FMUL R5, R5, R6 ;
        /*0060*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0070*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0080*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0090*/                   EXIT ;
"""


def test_sass_loops_reads_backward_branches_only():
    loops = sass_loops(LISTING)
    assert len(loops) == 1  # the forward branches (to .L_x_1 and .L_x_2) close no loop
    body = loops[0]
    assert body["instructions"] == 6  # .L_x_0 up to and including its backward branch
    assert body["mma"] == 2  # one HMMA, one HGMMA
    assert body["ops"]["BRA"] == 2 and body["ops"]["LDG"] == 1  # predicates and suffixes dropped
