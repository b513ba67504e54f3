"""Where a build's logic goes: the cells of a Yosys netlist (``top.json`` in an ``edge-qlora build`` folder) counted
per part of the design, as a Markdown table.

Yosys flattens the design and names each cell after the net it drives, which carries the path of the Amaranth
module that declares it (``design.step.engine.accumulator.to_float_3.…``); the module paths are read from the
build's ``top.il``, and each cell goes to the deepest module its name starts with, cut to ``--depth`` levels below
``design``. The attribution is close, not exact: a cell that drives a port of a child is named after whichever
side's net Yosys kept, and cells named after no net of the design fall under ``(other)``.

    python scripts/area_breakdown.py build/ulx3s-85f            # the parts two levels down, largest first
    python scripts/area_breakdown.py build/ulx3s-85f --depth 3 --top 40

LUT sites = LUT4 + 2 CCU2C (a carry cell takes two LUT sites); nextpnr's TRELLIS_COMB count is higher still: each
distributed-RAM cell (TRELLIS_DPR16X4) takes a slice's LUTs in RAM mode, and the packer adds some.
"""

import argparse
import collections
import json
import pathlib
import sys

KINDS = ("LUT4", "CCU2C", "TRELLIS_DPR16X4", "TRELLIS_FF", "MULT18X18D", "DP16KD")


def module_paths(rtlil):
    """The module paths below the top of an Amaranth RTLIL file (``design``, ``design.step``, ...)."""
    paths = set()
    for line in rtlil.splitlines():
        if line.startswith("module \\top."):
            paths.add(tuple(line.split()[1][len("\\top."):].split(".")))
    return paths


def breakdown(netlist, modules, depth=2):
    """``{part: Counter(cell type -> count)}`` of a Yosys JSON netlist's top module; ``modules``: the design's
    module paths (:func:`module_paths`)."""
    cells = netlist["modules"]
    top = next((m for m in cells.values() if m.get("attributes", {}).get("top")), None) or cells["top"]
    parts = collections.defaultdict(collections.Counter)
    for name, cell in top["cells"].items():
        path = tuple(name.split("."))
        owner = max((path[:n] for n in range(1, len(path)) if path[:n] in modules), key=len, default=None)
        part = ".".join(owner[1:1 + depth]) or "(the top component)" if owner else "(other)"
        parts[part][cell["type"]] += 1
    return parts


def lut_sites(counts):
    return counts["LUT4"] + 2 * counts["CCU2C"]


def table(parts, top=30):
    lines = ["| part | LUT sites | LUT4 | CCU2C | DPR16X4 | FF | DSP | DP16KD |", "|---|" + "---:|" * 7]
    ranked = sorted(parts.items(), key=lambda item: -lut_sites(item[1]))
    shown, rest = ranked[:top], ranked[top:]
    if rest:
        shown.append((f"({len(rest)} smaller parts)", sum((c for _, c in rest), collections.Counter())))
    total = sum((c for c in parts.values()), collections.Counter())
    for part, counts in shown + [("**total**", total)]:
        lines.append(f"| {part} | {lut_sites(counts):,} | " + " | ".join(f"{counts[k]:,}" for k in KINDS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=pathlib.Path, help="an edge-qlora build folder (top.json and top.il)")
    parser.add_argument("--depth", type=int, default=2, help="levels of the module path below 'design' (default: 2)")
    parser.add_argument("--top", type=int, default=30, help="parts listed; the rest summed (default: 30)")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.top < 1:
        parser.error("--depth and --top must be at least 1")
    try:
        netlist = json.loads((args.build / "top.json").read_text())
        modules = module_paths((args.build / "top.il").read_text())
    except (OSError, ValueError) as error:
        print(f"area_breakdown: error: {args.build} is not a build folder with top.json and top.il: {error}",
              file=sys.stderr)
        return 2
    print(table(breakdown(netlist, modules, args.depth), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
