"""``bench.ncu_source`` on a small CSV in ncu's ``--page source --csv`` form: the partitions'
starts, per-partition sums and shares, the top instructions, and its errors."""

from __future__ import annotations

import csv

import pytest

from sparse_prefill.bench import ncu_source

HEADER = ["Address", "Source", ncu_source.SAMPLES, "Warp Stall Sampling (Not-issued Samples)", ncu_source.EXECUTED,
          "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
ROWS = [
    ["0x0", "USETMAXREG.DEALLOC.CTAPOOL 0x50", "0", "0", "10", "0", "0", "0"],
    ["0x10", "LDG.E R9, desc[UR4][R2.64]", "2", "1", "10", "1", "1", "1"],
    ["0x20", "ISETP.GT.AND P4, PT, R9, -0x1, PT", "60", "50", "10", "58", "2", "50"],
    ["0x30", "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0x100", "0", "0", "10", "0", "0", "0"],
    ["0x40", "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24 | x", "30", "10", "20", "0", "30", "0"],
    ["0x50", "FMNMX R1, R2, R3, !PT", "8", "8", "20", "", "8", ""],
]


def write_csv(path, rows=ROWS, header=HEADER, preamble=("==PROF== Connected to process 1",)):
    with open(path, "w", newline="") as f:
        for line in preamble:
            f.write(line + "\n")
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_reads_instructions_after_ncu_messages(tmp_path):
    ins = ncu_source.read_source_csv(write_csv(tmp_path / "k.csv"))
    assert [i.samples for i in ins] == [0, 2, 60, 0, 30, 8]
    assert ins[2].stalls == {"long_sb": 58.0, "wait": 2.0}  # the "(Not Issued)" columns are left out
    assert ins[5].stalls["long_sb"] == 0.0  # empty cells are 0
    assert ncu_source.partition_starts(ins) == [(0, ROWS[0][1]), (3, ROWS[3][1])]


def test_summary_sums_each_partition(tmp_path):
    ins = ncu_source.read_source_csv(write_csv(tmp_path / "k.csv"))
    text = ncu_source.summary(ins, [("producer", 0, 2), ("math", 3, 5)], "T", top=2)
    lines = text.splitlines()
    assert lines[0] == "# T" and "Total samples: 100" in text
    assert "| producer | 0-2 | 62 | 62.0% | long_sb 95%, wait 5% |" in lines
    assert "| math | 3-5 | 38 | 38.0% | wait 100%, long_sb 0% |" in lines
    top = [l for l in lines if l.startswith("| 2 |") or l.startswith("| 4 |")]
    assert top == ["| 2 | 60.0% | 10 | `ISETP.GT.AND P4, PT, R9, -0x1, PT` | long_sb 58, wait 2 |",
                   "| 4 | 30.0% | 20 | `HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24 / x` | wait 30, long_sb 0 |"]
    assert not any(l.startswith("| 5 |") for l in lines)  # top=2


def test_main_lists_starts_or_writes_the_summary(tmp_path, capsys):
    path = write_csv(tmp_path / "k.csv")
    assert ncu_source.main([path]) == 0
    assert capsys.readouterr().out.split("\n")[0].split() == ["0", "USETMAXREG.DEALLOC.CTAPOOL", "0x50"]
    out = tmp_path / "s.md"
    assert ncu_source.main([path, "--part", "a b:0-5", "--title", "X", "--out", str(out)]) == 0
    assert out.read_text().startswith("# X\n") and "| a b | 0-5 | 100 | 100.0% |" in out.read_text()


@pytest.mark.parametrize("text", ["producer", "p:3", "p:5-2", ":0-1", "p:a-b"])
def test_bad_parts_are_refused(text):
    with pytest.raises(Exception, match="NAME:FIRST-LAST"):
        ncu_source.parse_part(text)


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no 'Address' header row"):
        ncu_source.read_source_csv(write_csv(tmp_path / "a.csv", header=["x"], rows=[]))
    with pytest.raises(ValueError, match="column 'Warp Stall Sampling \\(All Samples\\)' missing"):
        ncu_source.read_source_csv(write_csv(tmp_path / "b.csv", header=["Address", "Source", "Instructions Executed"],
                                             rows=[]))
    ins = ncu_source.read_source_csv(write_csv(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="part 'm' ends at line 9; the CSV has 6 instructions"):
        ncu_source.summary(ins, [("m", 0, 9)], "T")
    zero = [r[:2] + ["0"] + r[3:] for r in ROWS]
    with pytest.raises(ValueError, match="no stall samples"):
        ncu_source.summary(ncu_source.read_source_csv(write_csv(tmp_path / "d.csv", rows=zero)), [], "T")
