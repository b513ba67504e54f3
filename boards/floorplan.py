"""A DSP floorplan for the GEMM engine's PE array on the LFE5U-85F (ULX3S-85F).

nextpnr's placer packs the PE multipliers of an 8x8 array into one DSP row of the die, and the routes of their
products then congest that row until router1 and router2 stall. Pinning every PE multiplier to a DSP site of its own
with nextpnr's ``BEL`` attribute, written into the Yosys netlist (``top.json``) between synthesis and place and
route, spreads them out: the array rows split over the three DSP rows (Y10, Y34, Y58), the PEs of one array column
side by side in one DSP block, the columns spread over the eleven blocks from X4 to X96.

:func:`~edge_qlora.boards.build.build` applies it with ``floorplan=True``; ``scripts/congestion.py floorplan`` applies
it to a netlist file of its own.
"""

import json
import re

from ..outputs import atomic_output

__all__ = ["DSP_ROWS", "DSP_BLOCKS", "DSP_SITES", "FLOORPLAN_DEVICES", "pe_sites", "check_array", "floorplan",
           "floorplan_file"]

#: DSP rows of the LFE5U-85F and the first column of each DSP block in them (sites seen in placed 8x8 builds)
DSP_ROWS = (10, 34, 58)
DSP_BLOCKS = (4, 13, 22, 31, 40, 49, 58, 69, 78, 87, 96)
#: the four MULT18X18D sites of a block: (column offset, bel name)
DSP_SITES = ((0, "MULT18_0"), (1, "MULT18_1"), (4, "MULT18_4"), (5, "MULT18_5"))
#: the FPGA parts whose DSP sites these are
FLOORPLAN_DEVICES = ("LFE5U-85F",)
#: a PE multiplier of the engine's array, whether the engine is the top design or inside the step accelerator
_PE_MULT = re.compile(r"design\.(?:engine\.)?array\.pe_(\d+)_(\d+)_mult")


def check_array(rows, cols):
    """Raise ``ValueError`` (one line) if a ``rows`` x ``cols`` array cannot be laid out on the floorplan."""
    if rows < 1 or cols < 1 or -(-rows // len(DSP_ROWS)) > len(DSP_SITES) or cols > len(DSP_BLOCKS):
        raise ValueError(f"a {rows}x{cols} array does not fit the DSP floorplan (at most "
                         f"{len(DSP_ROWS) * len(DSP_SITES)}x{len(DSP_BLOCKS)})")


def pe_sites(rows, cols):
    """``{(row, col): bel}`` for a ``rows`` x ``cols`` array; raises ``ValueError`` if it cannot be laid out."""
    check_array(rows, cols)
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
    """Add a ``BEL`` attribute to every PE multiplier of ``netlist`` (a Yosys JSON dict, changed in place).

    Returns the number of cells pinned; raises ``ValueError`` when there are none or the array does not fit, and
    ``KeyError`` when ``netlist`` has no ``modules.top.cells``.
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


def floorplan_file(source, out):
    """Pin the PE multipliers of the Yosys netlist file ``source`` and write it to ``out`` (may be ``source``).

    ``out`` is replaced in one step (written beside it, then renamed). Returns the number of cells pinned; raises
    ``OSError``, ``ValueError`` (also for a file that is not JSON) or ``KeyError`` (JSON but not a Yosys netlist).
    """
    with open(source) as f:
        netlist = json.load(f)
    count = floorplan(netlist)
    with atomic_output(out, "w") as f:
        json.dump(netlist, f)
    return count
