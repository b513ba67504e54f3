"""Where an ECP5 build congests, and a DSP floorplan for the PE array to try against it.

    python scripts/congestion.py heatmap heat_congestion_by_coordinate_1.csv --png heat.png
    python scripts/congestion.py nets heat_congestion_by_net_1.csv --top 20
    python scripts/congestion.py floorplan build/synth/ulx3s-85f_8x8/top.json top_fp.json

``heatmap`` and ``nets`` read the CSV files that nextpnr's router2 writes each iteration when run with
``--router2-heatmap heat`` (YoWASP's nextpnr sees only its working folder: give a relative prefix). ``heatmap`` prints
the most congested tiles and the row and column totals, and draws the map; ``nets`` sums the overuse by net name with
indices folded (``pe_3_4_product[7]`` counts as ``pe_#_#_product``).

``floorplan`` pins each PE multiplier of a Yosys ``top.json`` (cells ``design.array.pe_R_C_mult``) to a DSP site of
the LFE5U-85F with nextpnr's ``BEL`` attribute: array rows split over the three DSP rows (Y10, Y34, Y58), the PEs of
one array column side by side in one DSP block, the columns spread over the eleven blocks from X4 to X96. Place and
route the result with the build folder's nextpnr command (``build_top.sh``), ``--json`` pointing at it.
"""

import argparse
import collections
import csv
import json
import re
import sys

#: DSP rows of the LFE5U-85F and the first column of each DSP block in them (sites seen in placed 8x8 builds)
DSP_ROWS = (10, 34, 58)
DSP_BLOCKS = (4, 13, 22, 31, 40, 49, 58, 69, 78, 87, 96)
#: the four MULT18X18D sites of a block: (column offset, bel name)
DSP_SITES = ((0, "MULT18_0"), (1, "MULT18_1"), (4, "MULT18_4"), (5, "MULT18_5"))
_PE_MULT = re.compile(r"design\.array\.pe_(\d+)_(\d+)_mult")


def pe_sites(rows, cols):
    """``{(row, col): bel}`` for a ``rows`` x ``cols`` array; raises ``ValueError`` if it cannot be laid out."""
    per_dsp_row = -(-rows // len(DSP_ROWS))
    if per_dsp_row > len(DSP_SITES) or cols > len(DSP_BLOCKS) or rows < 1 or cols < 1:
        raise ValueError(f"a {rows}x{cols} array does not fit the floorplan (at most "
                         f"{len(DSP_ROWS) * len(DSP_SITES)}x{len(DSP_BLOCKS)})")
    # split the rows as evenly as possible, the first DSP rows taking the extra ones
    counts = [rows // len(DSP_ROWS) + (i < rows % len(DSP_ROWS)) for i in range(len(DSP_ROWS))]
    sites = {}
    row = 0
    for y, count in zip(DSP_ROWS, counts):
        for slot in range(count):
            offset, bel = DSP_SITES[slot]
            for col in range(cols):
                block = round(col * (len(DSP_BLOCKS) - 1) / (cols - 1)) if cols > 1 else 0
                sites[row, col] = f"X{DSP_BLOCKS[block] + offset}/Y{y}/{bel}"
            row += 1
    return sites


def floorplan(netlist):
    """Adds a ``BEL`` attribute to every PE multiplier of ``netlist`` (a Yosys JSON dict, changed in place).

    Returns the number of cells pinned; raises ``ValueError`` when there are none or the array does not fit.
    """
    cells = netlist["modules"]["top"]["cells"]
    found = {}
    for name, cell in cells.items():
        match = _PE_MULT.fullmatch(name)
        if match and cell["type"] == "MULT18X18D":
            found[int(match[1]), int(match[2])] = cell
    if not found:
        raise ValueError("no PE multipliers (MULT18X18D cells named design.array.pe_R_C_mult) in the netlist")
    rows = 1 + max(r for r, _ in found)
    cols = 1 + max(c for _, c in found)
    sites = pe_sites(rows, cols)
    for key, cell in found.items():
        cell.setdefault("attributes", {})["BEL"] = sites[key]
    return len(found)


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
        plt.savefig(args.png, dpi=80, bbox_inches="tight")
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
            with open(args.netlist) as f:
                netlist = json.load(f)
            count = floorplan(netlist)
            with open(args.out, "w") as f:
                json.dump(netlist, f)
            print(f"pinned {count} PE multipliers; wrote {args.out}")
    except KeyError as error:
        sys.exit(f"error: {args.netlist}: not a Yosys netlist (no {error} entry)")
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
