#!/usr/bin/env python3
"""Synthesis table of the GEMM engine (with its NF4 dequantizer): Fmax and LUT/FF/DSP/BRAM per array shape.

    python scripts/synth_gemm.py --out build/synth                      # the README's table (long: minutes per build)
    python scripts/synth_gemm.py --out build/synth --only ulx3s-85f:8x8
    python scripts/synth_gemm.py --out build/synth --only ulx3s-85f:8x8 --lut-mapper abc --seed 5 --floorplan

Writes ``synth_gemm.json`` and ``synth_gemm.md`` to ``--out`` and prints the table. A configuration that does not
fit its device is reported as such (the build's one-line reason), not as an error.
"""

import argparse
import json
import os

from edge_qlora.boards.build import BuildError, build
from edge_qlora.boards.floorplan import check_array
from edge_qlora.outputs import atomic_output
from edge_qlora.rtl.gemm import GemmConfig, GemmEngine

# (board, rows, cols, max_k): the README's rows
CONFIGS = [
    ("ulx3s-85f", 4, 4, 512),
    ("ulx3s-85f", 8, 8, 512),
    ("ulx3s-85f", 16, 8, 512),
    ("ulx3s-85f", 12, 11, 512),
    ("icebreaker", 1, 1, 64),
    ("icebreaker", 2, 2, 64),
]

COLUMNS = {
    "ulx3s-85f": [("LUT4", "TRELLIS_COMB"), ("FF", "TRELLIS_FF"), ("DSP 18x18", "MULT18X18D"), ("BRAM 18k", "DP16KD")],
    "icebreaker": [("LC", "ICESTORM_LC"), ("FF", None), ("DSP 16x16", "ICESTORM_DSP"), ("BRAM 4k", "ICESTORM_RAM")],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/synth")
    parser.add_argument("--only", action="append", default=[],
                        help="build this array instead of the table's: board:RxC, e.g. ulx3s-85f:12x8 (repeatable)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--router", choices=("router1", "router2"), default=None, help="nextpnr router")
    parser.add_argument("--lut-mapper", choices=("abc9", "abc"), default="abc9", help="Yosys LUT mapping")
    parser.add_argument("--place-only", action="store_true",
                        help="stop after placement: final resource use, Fmax estimated before routing")
    parser.add_argument("--floorplan", action="store_true",
                        help="pin the PE multipliers to the DSP floorplan (edge_qlora.boards.floorplan) on ulx3s-85f "
                             "arrays that fit it, as 'edge-qlora build' does by default")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    configs = CONFIGS
    if args.only:
        configs = []
        for item in args.only:
            try:
                board, shape = item.split(":")
                rows, cols = (int(side) for side in shape.lower().split("x"))
                if board not in COLUMNS:
                    raise ValueError
            except ValueError:
                parser.error(f"--only takes board:RxC with board one of {', '.join(COLUMNS)}, not {item!r}")
            configs.append((board, rows, cols, 64 if board == "icebreaker" else 512))

    results = []
    for board, rows, cols, max_k in configs:
        try:
            config = GemmConfig(rows=rows, cols=cols, max_k=max_k, max_n=max_k)
        except ValueError as error:
            parser.error(str(error))
        out = os.path.join(args.out, f"{board}_{rows}x{cols}")
        print(f"{board} {rows}x{cols} (max K {max_k}, chunk {config.chunk_steps}) ...", flush=True)
        row = {"board": board, "rows": rows, "cols": cols, "max_k": max_k}
        try:
            try:
                check_array(rows, cols)
                pinned = args.floorplan and board == "ulx3s-85f"
            except ValueError:
                pinned = False
            report = build(GemmEngine(config), board, out, seed=args.seed, router=args.router,
                           lut_mapper=args.lut_mapper, place_only=args.place_only, floorplan=pinned)
            row.update(fmax_mhz=min(report["fmax_mhz"].values(), default=0.0), target_mhz=report["target_mhz"],
                       utilization=report["utilization"], seconds=report["seconds"], notes=report.get("notes", []),
                       placed_only=report.get("placed_only", False))
        except BuildError as error:
            row["error"] = str(error)
        print(f"  {row.get('fmax_mhz', row.get('error'))}", flush=True)
        results.append(row)
        with atomic_output(os.path.join(args.out, "synth_gemm.json"), "w") as f:
            json.dump(results, f, indent=2)

    lines = ["| board | array | max K | Fmax MHz (target) | LUT/LC | FF | DSP | BRAM |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['board']} | {row['rows']}x{row['cols']} | {row['max_k']} | "
                         f"{row['error']} | | | | |")
            continue
        cells = []
        for _, key in COLUMNS[row["board"]]:
            if key is None:
                cells.append("-")
            else:
                used, avail = row["utilization"].get(key, [0, 0])
                cells.append(f"{used} / {avail}")
        note = " *" if row.get("notes") else ""
        lines.append(f"| {row['board']} | {row['rows']}x{row['cols']}{note} | {row['max_k']} | "
                     f"{row['fmax_mhz']:.1f} ({row['target_mhz']:.0f})"
                     f"{' placed, not routed' if row.get('placed_only') else ''} | " + " | ".join(cells) + " |")
    notes = sorted({note for row in results for note in row.get("notes", [])})
    if notes:
        lines.append("")
        lines.append("\\* " + "; ".join(notes))
    table = "\n".join(lines)
    print(table)
    with atomic_output(os.path.join(args.out, "synth_gemm.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
