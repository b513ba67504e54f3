"""Where an ECP5 build congests, and a DSP floorplan for the PE array to try against it.

    python scripts/congestion.py heatmap heat_congestion_by_coordinate_1.csv --png heat.png
    python scripts/congestion.py nets heat_congestion_by_net_1.csv --top 20
    python scripts/congestion.py floorplan build/synth/ulx3s-85f_8x8/top.json top_fp.json

``heatmap`` and ``nets`` read the CSV files that nextpnr's router2 writes each iteration when run with
``--router2-heatmap heat`` (YoWASP's nextpnr sees only its working folder: give a relative prefix). ``heatmap`` prints
the most congested tiles and the row and column totals, and draws the map; ``nets`` sums the overuse by net name with
indices folded (``pe_3_4_product[7]`` counts as ``pe_#_#_product``).

``floorplan`` pins each PE multiplier of a Yosys ``top.json`` (cells ``design.array.pe_R_C_mult``) to a DSP site of
the LFE5U-85F with nextpnr's ``BEL`` attribute (``edge_qlora.boards.floorplan``, which ``edge-qlora build`` applies
to GEMM engine builds on the ulx3s-85f by itself): array rows split over the three DSP rows (Y10, Y34, Y58), the PEs
of one array column side by side in one DSP block, the columns spread over the eleven blocks from X4 to X96. Place
and route the result with the build folder's nextpnr command (``build_top.sh``), ``--json`` pointing at it.
"""

import argparse
import collections
import csv
import json
import re
import sys

from edge_qlora.boards.floorplan import DSP_BLOCKS, DSP_ROWS, DSP_SITES, floorplan, floorplan_file, pe_sites
from edge_qlora.outputs import OutputError, atomic_output

__all__ = ["DSP_BLOCKS", "DSP_ROWS", "DSP_SITES", "floorplan", "pe_sites", "read_grid", "net_totals", "main"]

def read_grid(path):
    """The coordinate heatmap as a list of rows (outer index x, inner index y)."""
    with open(path, newline="") as f:
        return [[int(v) for v in row if v.strip()] for row in csv.reader(f)]


def net_totals(path):
    """Overuse per net name with bit indices and numbers folded to ``#``, largest first."""
    totals = collections.Counter()
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) != 2:
                continue
            name = re.sub(r"\d+", "#", re.sub(r"\[\d+\]", "", row[0]))
            totals[name] += int(row[1])
    return totals.most_common()


def _heatmap(args):
    grid = read_grid(args.csv)
    width = max(map(len, grid))
    total = sum(map(sum, grid))
    print(f"{args.csv}: {total} overused wire-tiles over {len(grid)} x {width} tiles")
    tiles = sorted(((v, x, y) for x, row in enumerate(grid) for y, v in enumerate(row)), reverse=True)
    print("hottest tiles (count x y):", " ".join(f"{v}@{x},{y}" for v, x, y in tiles[:args.top]))
    ys = [sum(row[y] for row in grid if y < len(row)) for y in range(width)]
    print("hottest rows (y: total):", " ".join(f"{y}:{ys[y]}" for y in sorted(range(width), key=lambda y: -ys[y])[:8]))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        image = np.zeros((width, len(grid)))
        for x, row in enumerate(grid):
            image[:len(row), x] = row
        plt.figure(figsize=(10, 7))
        plt.imshow(image, cmap="inferno", vmax=max(1.0, float(np.percentile(image, 99.5))))
        plt.colorbar(label="overused wires")
        plt.xlabel("x (tile column)")
        plt.ylabel("y (tile row)")
        plt.title(args.csv)
        with atomic_output(args.png) as temp:
            plt.savefig(temp, format="png", dpi=80, bbox_inches="tight")
        print(f"wrote {args.png}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    heat = commands.add_parser("heatmap", help="summarize (and draw) a congestion-by-coordinate CSV")
    heat.add_argument("csv")
    heat.add_argument("--png", help="write the map here")
    heat.add_argument("--top", type=int, default=10)
    nets = commands.add_parser("nets", help="overuse by net name from a congestion-by-net CSV")
    nets.add_argument("csv")
    nets.add_argument("--top", type=int, default=20)
    plan = commands.add_parser("floorplan", help="pin the PE multipliers of a top.json to DSP sites")
    plan.add_argument("netlist")
    plan.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "heatmap":
            _heatmap(args)
        elif args.command == "nets":
            totals = net_totals(args.csv)
            print(f"{sum(v for _, v in totals)} overused wire-nets")
            for name, count in totals[:args.top]:
                print(f"{count:8d}  {name}")
        else:
            count = floorplan_file(args.netlist, args.out)
            print(f"pinned {count} PE multipliers; wrote {args.out}")
    except KeyError as error:
        sys.exit(f"error: {args.netlist}: not a Yosys netlist (no {error} entry)")
    except json.JSONDecodeError as error:
        sys.exit(f"error: {args.netlist}: not a Yosys netlist (not JSON: {error})")
    except (OSError, ValueError, OutputError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
