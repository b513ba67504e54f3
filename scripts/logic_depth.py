"""Rank a synthesized ECP5 netlist's register-to-register paths by a rough weighted logic depth.

    python scripts/logic_depth.py build/synth/ulx3s-85f_8x8/top.json            # 40 deepest endpoint groups
    python scripts/logic_depth.py build/synth/ulx3s-85f_8x8/top.json --top 100 --paths

nextpnr reports one critical path per clock, so after a fix the next one shows only after another hour of place and
route. This reads the Yosys netlist nextpnr starts from (``top.json`` of a build folder) and scores every path from a
register, block RAM or DSP output to a register, block RAM or DSP input: a LUT4 or a carry cell entered from fabric
counts one level, a carry step 0.1, a PFUMX/L6MUX21 data input 0.25, and each net adds ``0.25 * log2(fanout)``; a
block RAM output starts at 3.5 and a DSP output at 1.5, and their inputs add one. The score knows nothing of
placement, so it ranks candidates; the routed critical path decides. Endpoints are grouped by register name.
"""

import argparse
import collections
import json
import math
import re
import sys

SOURCES = {"TRELLIS_FF": 0.5, "DP16KD": 3.5, "MULT18X18D": 1.5, "ALU54B": 1.5}
SINKS = ("TRELLIS_FF", "DP16KD", "MULT18X18D", "TRELLIS_DPR16X4")


def analyse(netlist):
    """Returns ``(ends, label, path)``: ``ends`` sorted deepest first as ``(score, cell, port, bit)``."""
    module = netlist["modules"]["top"]
    cells = module["cells"]
    names = {}
    for name, info in module["netnames"].items():
        for bit in info["bits"]:
            if isinstance(bit, int):
                old = names.get(bit)
                if old is None or (old.startswith("$") and not name.startswith("$")) \
                        or (not name.startswith("$") and len(name) < len(old)):
                    names[bit] = name
    fanout, driver = collections.Counter(), {}
    for cell_name, cell in cells.items():
        for port, bits in cell["connections"].items():
            direction = cell.get("port_directions", {}).get(port)
            for bit in bits:
                if isinstance(bit, int):
                    if direction == "input":
                        fanout[bit] += 1
                    elif direction == "output":
                        driver[bit] = (cell_name, port)

    def net(bit):
        return 0.25 * math.log2(max(fanout[bit], 1))

    arrival, previous = {}, {}

    def inputs(cell, port):
        kind, con = cell["type"], cell["connections"]
        if kind == "LUT4":
            return [(con[p][0], 1.0, True) for p in "ABCD"]
        if kind == "PFUMX":
            return [(con["ALUT"][0], 0.25, False), (con["BLUT"][0], 0.25, False), (con["C0"][0], 1.0, True)]
        if kind == "L6MUX21":
            return [(con["D0"][0], 0.25, False), (con["D1"][0], 0.25, False), (con["SD"][0], 1.0, True)]
        if kind == "CCU2C":
            fabric = [(con[p][0], 1.2, True) for p in ("A0", "B0", "C0", "D0", "A1", "B1", "C1", "D1")]
            return fabric + [(con["CIN"][0], 0.1 if port == "COUT" else 0.3, False)]
        if kind == "TRELLIS_DPR16X4" and port.startswith("DO"):
            return [(bit, 1.0, True) for bit in con["RAD"]]
        return []

    def visit(bit):
        # iterative depth-first evaluation (carry chains and LUT trees can be deep for Python's recursion)
        stack = [bit]
        while stack:
            top = stack[-1]
            if top in arrival:
                stack.pop()
                continue
            if not isinstance(top, int) or top not in driver:
                arrival[top] = 0.0
                stack.pop()
                continue
            cell_name, port = driver[top]
            cell = cells[cell_name]
            if cell["type"] in SOURCES:
                arrival[top], previous[top] = SOURCES[cell["type"]], None
                stack.pop()
                continue
            pending = [b for b, _, _ in inputs(cell, port) if b not in arrival]
            if pending:
                stack.extend(pending)
                continue
            best, before = 0.0, None
            for b, weight, routed in inputs(cell, port):
                score = arrival[b] + weight + (net(b) if routed else 0.0)
                if score > best:
                    best, before = score, b
            arrival[top], previous[top] = best, before
            stack.pop()
        return arrival[bit]

    ends = []
    for cell_name, cell in cells.items():
        if cell["type"] not in SINKS:
            continue
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) != "input" or port.startswith("CLK") or port == "WCK":
                continue
            for bit in bits:
                if isinstance(bit, int):
                    score = visit(bit) + net(bit) + (1.0 if cell["type"] in ("DP16KD", "MULT18X18D") else 0.0)
                    ends.append((score, cell_name, port, bit))
    ends.sort(key=lambda end: -end[0])

    def label(bit):
        kind = f" [{cells[driver[bit][0]]['type']}]" if bit in driver else ""
        return names.get(bit, str(bit)) + kind

    def path(bit):
        chain = []
        while bit is not None:
            chain.append(bit)
            bit = previous.get(bit)
        return chain[::-1]
    return ends, label, path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("netlist", help="Yosys JSON netlist (a build folder's top.json)")
    parser.add_argument("--top", type=int, default=40, help="endpoint groups to list (default 40)")
    parser.add_argument("--paths", action="store_true", help="print each group's deepest path")
    args = parser.parse_args(argv)
    try:
        with open(args.netlist) as f:
            netlist = json.load(f)
        netlist["modules"]["top"]["cells"], netlist["modules"]["top"]["netnames"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"error: {args.netlist} is not a Yosys JSON netlist with a module 'top' ({error})")
    ends, label, path = analyse(netlist)
    groups = {}
    for score, cell, port, bit in ends:
        key = re.sub(r"_TRELLIS_FF_Q(_\d+)?$", "", re.sub(r"\$.*", "", cell)) + " " + port.rstrip("0123456789")
        if key not in groups:
            groups[key] = (score, bit)
            if len(groups) >= args.top:
                break
    print("| score | endpoint (register, port) |\n|---:|---|")
    for key, (score, bit) in groups.items():
        print(f"| {score:.1f} | `{key}` |")
        if args.paths:
            print("|  | " + " -> ".join(label(b) for b in path(bit)) + " |")


if __name__ == "__main__":
    main()
