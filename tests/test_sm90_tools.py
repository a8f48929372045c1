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


NCU_CSV = '''==PROF== Connected to process 598 (/usr/bin/python3.12)
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"
"0","598","python3.12","127.0.0.1","_partial_kernel","1","7","(128, 1, 1)","(66, 4, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","ns","34,176",
"0","598","python3.12","127.0.0.1","_partial_kernel","1","7","(128, 1, 1)","(66, 4, 1)","0","9.0","Command line profiler metrics","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","inst","0.92",
"0","598","python3.12","127.0.0.1","_partial_kernel","1","7","(128, 1, 1)","(66, 4, 1)","0","9.0","Command line profiler metrics","smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio","inst","1.47",
"1","598","python3.12","127.0.0.1","_merge_kernel","1","7","(128, 1, 1)","(1, 64, 8)","0","9.0","GPU Speed Of Light Throughput","Duration","us","5.89",
"1","598","python3.12","127.0.0.1","_merge_kernel","1","7","(128, 1, 1)","(1, 64, 8)","0","9.0","Occupancy","Achieved Occupancy","%","22.42",
'''


def test_ncu_summary_reads_durations_and_stalls(tmp_path, capsys):
    """benchmarks/ncu_decode.py --summarise: one line per launch, durations in microseconds whatever unit ncu
    printed (thousands separators too), stall reasons largest first."""
    import json

    from ncu_decode import summarise
    path = tmp_path / "ncu.csv"
    path.write_text(NCU_CSV)
    summarise(str(path))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["kernel"] for x in lines] == ["_partial_kernel", "_merge_kernel"]
    assert lines[0]["us"] == 34.18 and lines[1]["us"] == 5.89
    assert list(lines[0]["stalls"]) == ["smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
                                        "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"]
    assert lines[1]["occupancy_pct"] == "22.42" and "stalls" not in lines[1]
