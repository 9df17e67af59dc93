"""Where a warp-specialized kernel's warps wait, per partition: a summary of Nsight Compute's
per-instruction stall samples (runs on any machine; the CSV comes from the GPU machine).

    ncu --section WarpStateStats --section SourceCounters --page source --print-source sass --csv \\
        -k regex:NAME ... > kernel.csv          # e.g. device_session's NCU_FLAGS
    python -m sparse_prefill.bench.ncu_source kernel.csv                      # the partitions' starts
    python -m sparse_prefill.bench.ncu_source kernel.csv --title T \\
        --part "producer:30-379" --part "math:380-2503" --out summary.md

Without ``--part`` it lists the SASS lines that set a partition's registers (``USETMAXREG``),
where Gluon's ``warp_specialize`` partitions begin, so the ranges can be read off. With them it
writes a markdown summary: samples per partition with their top stall reasons, then the
instructions with the most samples. SASS lines are numbered from 0 in the CSV's order.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass(frozen=True)
class Instruction:
    source: str
    samples: float
    executed: str
    stalls: dict[str, float]  # reason (without "stall_") -> samples


def read_source_csv(path: str) -> list[Instruction]:
    """The instructions of ncu's ``--page source --csv`` output (the lines before its header,
    ncu's own messages, are skipped)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    starts = [i for i, r in enumerate(rows) if r and r[0] == "Address"]
    if not starts:
        raise ValueError(f"{path}: no 'Address' header row; expected ncu --page source --csv output")
    header = rows[starts[0]]
    col = {name: i for i, name in enumerate(header)}
    for name in ("Source", SAMPLES, EXECUTED):
        if name not in col:
            raise ValueError(f"{path}: column {name!r} missing (collect the SourceCounters section)")
    reasons = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]

    def number(text: str) -> float:
        return float(text) if text else 0.0

    return [
        Instruction(r[col["Source"]].strip(), number(r[col[SAMPLES]]), r[col[EXECUTED]],
                    {h[len("stall_"):]: number(r[col[h]]) for h in reasons})
        for r in rows[starts[0] + 1:] if len(r) == len(header)
    ]


def parse_part(text: str) -> tuple[str, int, int]:
    """``NAME:FIRST-LAST`` (SASS lines, both included)."""
    name, sep, span = text.rpartition(":")
    first, dash, last = span.partition("-")
    if not (sep and dash and name and first.isdigit() and last.isdigit()) or int(first) > int(last):
        raise argparse.ArgumentTypeError(f"expected NAME:FIRST-LAST (e.g. producer:30-379), got {text!r}")
    return name, int(first), int(last)


def partition_starts(instructions: Sequence[Instruction]) -> list[tuple[int, str]]:
    """``(line, instruction)`` of every ``USETMAXREG``."""
    return [(n, ins.source) for n, ins in enumerate(instructions) if "USETMAXREG" in ins.source]


def summary(instructions: Sequence[Instruction], parts: Sequence[tuple[str, int, int]], title: str,
            top: int = 25) -> str:
    """The markdown summary (see the module docstring)."""
    total = sum(i.samples for i in instructions)
    if total == 0:
        raise ValueError("the CSV has no stall samples (collect the SourceCounters section)")
    lines = [f"# {title}", "",
             "`python -m sparse_prefill.bench.ncu_source` over ncu's per-instruction stall samples "
             "(`--page source --print-source sass --csv`).", "", f"Total samples: {total:.0f}", "",
             "| partition | SASS lines | samples | share | top stall reasons (share of the partition) |",
             "| --- | --- | --- | --- | --- |"]
    for name, first, last in parts:
        if last >= len(instructions):
            raise ValueError(f"part {name!r} ends at line {last}; the CSV has {len(instructions)} instructions")
        seg = instructions[first:last + 1]
        samples = sum(i.samples for i in seg)
        reasons = {r: sum(i.stalls.get(r, 0.0) for i in seg) for r in seg[0].stalls}
        ranked = sorted(reasons.items(), key=lambda kv: -kv[1])[:5]
        share = ", ".join(f"{r} {100 * v / samples:.0f}%" for r, v in ranked) if samples else "-"
        lines.append(f"| {name} | {first}-{last} | {samples:.0f} | {100 * samples / total:.1f}% | {share} |")
    lines += ["", "| SASS line | share of all samples | executed | instruction | top stall reasons (samples) |",
              "| --- | --- | --- | --- | --- |"]
    for n in sorted(range(len(instructions)), key=lambda k: -instructions[k].samples)[:top]:
        ins = instructions[n]
        ranked = sorted(ins.stalls.items(), key=lambda kv: -kv[1])[:2]
        reasons = ", ".join(f"{r} {v:.0f}" for r, v in ranked)
        lines.append(f"| {n} | {100 * ins.samples / total:.1f}% | {ins.executed} | `{ins.source.replace('|', '/')}` "
                     f"| {reasons} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--part", action="append", type=parse_part, default=[], help="NAME:FIRST-LAST, repeatable")
    ap.add_argument("--title", default="ncu stall samples per instruction")
    ap.add_argument("--top", type=int, default=25, help="instructions listed (default 25)")
    ap.add_argument("--out", help="write the summary here (default: print it)")
    args = ap.parse_args(argv)
    instructions = read_source_csv(args.csv)
    if not args.part:
        for n, source in partition_starts(instructions):
            print(f"{n:6d}  {source}")
        return 0
    text = summary(instructions, args.part, args.title, args.top)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
