"""What fits each board: measured builds, so a build that cannot fit is refused before Yosys runs.

The table holds the largest configuration of each design that was built (placed) on each board, and the smallest
that was seen not to fit. :func:`check_fit` refuses a configuration known not to fit (larger than one that did not
fit, or needing more DSP blocks than the device has) with a one-line message naming the largest that fits;
everything else is left to the build, and :func:`fit_hint` gives the same name to append to nextpnr's "design
needs N cells" error. Numbers come from place-only builds (``edge-qlora build ... --place-only``): the dequantizer's
and the memory-fed step accelerator's of the current RTL, the GEMM engine's of an earlier release (marked so);
rebuild and update them when a design's size changes.
"""

from dataclasses import dataclass

__all__ = ["DequantFit", "DEQUANTIZER", "GEMM", "LORA", "default_lanes", "check_fit", "fit_hint"]


@dataclass(frozen=True)
class DequantFit:
    """The NF4 dequantizer on a board (bf16 output, double quantization, blocksize 64)."""
    default_lanes: int
    largest_lanes: int
    largest_use: str
    #: the fewest lanes seen not to fit, and what they needed (None: every lane count fits)
    too_large: tuple = None
    #: output dtypes that do not fit at all: dtype -> what one lane needed
    dtypes_too_large: tuple = ()


DEQUANTIZER = {
    # compact float units, 12 MHz; 1 lane with fp16 output: 5127 cells; 8 lanes: 7572
    "icebreaker": DequantFit(default_lanes=1, largest_lanes=1, largest_use="5045 of 5280 logic cells",
                             too_large=(2, "5439 of 5280 logic cells"),
                             dtypes_too_large=(("fp32", "6325 of 5280 logic cells"),)),
    "ulx3s-85f": DequantFit(default_lanes=8, largest_lanes=16, largest_use="9458 of 83640 LUT4, 20 of 156 DSP"),
}

#: the GEMM engine (with its ``cols``-lane dequantizer, max K 512): (largest rows, cols, what it used) or None
GEMM = {
    "icebreaker": None,
    "ulx3s-85f": (16, 8, "56952 of 83640 LUT4, 140 of 156 DSP, placed in an earlier release"),
}
#: why the GEMM engine does not fit where it does not
GEMM_NONE = {"icebreaker": "its 1x1 array needs 13298 of the UP5K's 5280 logic cells"}

#: the step accelerator: (rows, cols, bounds, what it used) of the largest placed, or None
LORA = {
    "icebreaker": None,
    "ulx3s-85f": (8, 8, "T<=16, in/out<=64, rank<=8, adamw, behind the ulx3s-sdram memory port (--memory)",
                  "76200 of 83640 LUT4, 92 of 156 DSP"),
}

#: MULT18X18D / SB_MAC16 blocks of each board's FPGA
_DSPS = {"icebreaker": 8, "ulx3s-85f": 156}


def default_lanes(board):
    """Dequantizer lanes when the user gives none: 1 on the icebreaker (all that fits), 8 on the ulx3s-85f."""
    return DEQUANTIZER[board].default_lanes


def _dequant_dsps(lanes):
    # the dequantizer's scale and table multipliers, as built (1-4 lanes: 8, 8: 12, 16: 20)
    return 8 + 4 * max(0, -(-(lanes - 4) // 4))


def _largest(board, kind):
    if kind == "dequantizer":
        fit = DEQUANTIZER[board]
        lanes = fit.largest_lanes
        return f"the {lanes}-lane dequantizer (--lanes {lanes}, bf16 output: {fit.largest_use})"
    if kind == "gemm":
        if GEMM[board] is None:
            return f"no GEMM engine ({GEMM_NONE[board]}); the {DEQUANTIZER[board].largest_lanes}-lane dequantizer"
        rows, cols, use = GEMM[board]
        return f"the {rows}x{cols} GEMM engine (--rows {rows} --cols {cols}: {use})"
    if LORA[board] is None:
        return f"no step accelerator (not even the GEMM engine fits); the " \
               f"{DEQUANTIZER[board].largest_lanes}-lane dequantizer"
    rows, cols, bounds, use = LORA[board]
    return f"the {rows}x{cols} step accelerator with {bounds} ({use})"


def fit_hint(board, kind):
    """``"largest measured fit on <board>: ..."``, to follow a "does not fit" error. ``kind``: ``"dequantizer"``,
    ``"gemm"`` or ``"lora"``."""
    return f"largest measured fit on {board}: {_largest(board, kind)}"


def check_fit(board, kind, *, lanes=None, rows=None, cols=None, dtype="bf16"):
    """Raise ``ValueError`` (one line, naming the largest fit) if the configuration is known not to fit ``board``.

    Known not to fit: at least as many dequantizer lanes as a build that did not fit, an output dtype that did not
    fit, a GEMM engine or step accelerator on a board where none fits,
    or more PE multipliers and dequantizer multipliers than the device has DSP blocks. Anything else may fit and is
    left to the build.
    """
    if kind == "dequantizer":
        too_large = DEQUANTIZER[board].too_large
        for name, use in DEQUANTIZER[board].dtypes_too_large:
            if dtype == name:
                raise ValueError(f"a dequantizer with {dtype} output does not fit the {board} (1 lane needs {use}); "
                                 f"{fit_hint(board, kind)}")
        if too_large and lanes >= too_large[0]:
            measured = f"{too_large[0]} lanes need {too_large[1]}"
            raise ValueError(f"a {lanes}-lane dequantizer does not fit the {board} ({measured}); {fit_hint(board, kind)}")
        return
    if (GEMM if kind == "gemm" else LORA)[board] is None:
        what = "the GEMM engine" if kind == "gemm" else "the step accelerator"
        raise ValueError(f"{what} does not fit the {board} at any size; {fit_hint(board, kind)}")
    dsps = rows * cols + _dequant_dsps(cols)
    if dsps > _DSPS[board]:
        raise ValueError(f"a {rows}x{cols} array needs at least {dsps} DSP blocks (one per PE, "
                         f"{_dequant_dsps(cols)} in the dequantizer) but the {board} has {_DSPS[board]}; "
                         f"{fit_hint(board, kind)}")
