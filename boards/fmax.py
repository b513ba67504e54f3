"""Clock frequencies of the routed builds on the ULX3S-85F, for the figures that turn simulated cycles into time.

Each entry is one routed build (one placement seed) from the synthesis table of ``docs/results.md``, with the
command that reproduces it. :func:`nf4_clock` and :func:`step_clock` pick the build that matches a configuration,
or, where the configuration itself has never been routed, the build whose Fmax stands in for it, and say which;
``edge-qlora bench`` names it beside every figure it derives. Rebuild and update an entry when its design changes.
"""

from dataclasses import dataclass

__all__ = ["RoutedBuild", "ROUTED", "PLACED_ONLY", "DEVICE", "DEVICE_DSPS", "ClockChoice", "nf4_clock",
           "step_clock", "placed_only"]

#: the FPGA the figures are for, and its 18x18 multiplier blocks (MULT18X18D): the bound of any array on it
DEVICE = "ECP5 LFE5U-85F-6 (ULX3S)"
DEVICE_DSPS = 156


@dataclass(frozen=True)
class RoutedBuild:
    """One build's measured Fmax.

    Attributes
    ----------
    unit : str
        ``"dequantizer"``, ``"quantizer"``, ``"gemm"`` (the GEMM engine with its dequantizer) or ``"lora"`` (the
        whole step accelerator).
    config : str
        The configuration as the synthesis table names it (``"8 lanes"``, ``"8x8"``).
    mhz : float
        Fmax reported by nextpnr after routing (or its estimate after placement, in :data:`PLACED_ONLY`).
    command : str
        The command that makes the build.
    note : str
        What differs from the configuration a reader might assume (buffers, netlist), or "".
    """

    unit: str
    config: str
    mhz: float
    command: str
    note: str = ""

    @property
    def name(self):
        return f"{_UNIT_NAMES[self.unit]} {self.config}"


_UNIT_NAMES = {"dequantizer": "NF4 dequantizer", "quantizer": "NF4 quantizer", "gemm": "GEMM engine",
               "lora": "LoRA step"}
_NF4_BENCH = "python scripts/bench_nf4.py --out build/bench"

ROUTED = (
    RoutedBuild("dequantizer", "1 lane", 117.9, "edge-qlora build --board ulx3s-85f --lanes 1"),
    RoutedBuild("dequantizer", "4 lanes", 123.0, "edge-qlora build --board ulx3s-85f --lanes 4"),
    RoutedBuild("dequantizer", "8 lanes", 121.91, "edge-qlora build --board ulx3s-85f --lanes 8"),
    RoutedBuild("dequantizer", "16 lanes", 121.8, "edge-qlora build --board ulx3s-85f --lanes 16"),
    RoutedBuild("quantizer", "1 lane", 107.1, _NF4_BENCH),
    RoutedBuild("quantizer", "4 lanes", 99.0, _NF4_BENCH),
    RoutedBuild("quantizer", "8 lanes", 93.6, _NF4_BENCH),
    RoutedBuild("quantizer", "16 lanes", 90.0, _NF4_BENCH),
    RoutedBuild("gemm", "4x4", 108.4, "python scripts/synth_gemm.py --out build/synth --only ulx3s-85f:4x4"),
    RoutedBuild("gemm", "8x8", 107.71, "edge-qlora build --board ulx3s-85f --rows 8 --cols 8",
                "the engine before its split into components, DSP floorplan"),
    RoutedBuild("lora", "2x2", 72.72,
                "edge-qlora build --board ulx3s-85f --lora --rows 2 --cols 2 --max-t 8 --max-in 32 --max-out 32 "
                "--max-rank 4",
                "buffers for T<=8, in/out<=32, rank<=4 only"),
)

#: builds that were placed but never routed: nextpnr's estimate, named in notes, never used as a clock
PLACED_ONLY = (
    RoutedBuild("gemm", "16x8", 48.8, "python scripts/synth_gemm.py --out build/synth --only ulx3s-85f:16x8 "
                                      "--place-only"),
    RoutedBuild("lora", "4x4", 48.2, "edge-qlora build --board ulx3s-85f --lora --rows 4 --cols 4 --place-only",
                "in/out<=64"),
    RoutedBuild("blocked_step", "8x8", 34.48, "python scripts/blocked_step.py --build build/step",
                "T<=128, feature blocks<=384, r=16, ULX3S SDRAM port"),
)


@dataclass(frozen=True)
class ClockChoice:
    """The clock a figure assumes: the build it comes from and whether that build is the configuration itself.

    ``build`` is None when the user gave the clock (``assumed``)."""

    mhz: float
    build: RoutedBuild = None
    same_config: bool = True

    @property
    def label(self):
        if self.build is None:
            return "assumed by the user"
        return self.build.name if self.same_config else f"{self.build.name} stands in"


def _find(table, unit, config):
    return next((b for b in table if b.unit == unit and b.config == config), None)


def _lanes_config(lanes):
    return f"{lanes} lane" if lanes == 1 else f"{lanes} lanes"


def nf4_clock(unit, lanes):
    """The routed clock of the ``unit`` (``"dequantizer"`` or ``"quantizer"``) with ``lanes`` lanes.

    Raises ValueError naming the lane counts that have one.
    """
    build = _find(ROUTED, unit, _lanes_config(lanes))
    if build is None:
        have = ", ".join(b.config.split()[0] for b in ROUTED if b.unit == unit)
        raise ValueError(f"no routed build of the {unit} with {lanes} lanes; routed: {have} lanes")
    return ClockChoice(build.mhz, build)


def step_clock(rows, cols):
    """The clock of the step accelerator on a ``rows`` x ``cols`` array: its own routed build, or else the routed
    GEMM engine of the same array, which stands in (the step runs every product on it).

    Raises ValueError naming the arrays that have one.
    """
    array = f"{rows}x{cols}"
    own = _find(ROUTED, "lora", array)
    if own is not None:
        return ClockChoice(own.mhz, own)
    engine = _find(ROUTED, "gemm", array)
    if engine is not None:
        return ClockChoice(engine.mhz, engine, same_config=False)
    have = sorted({b.config for b in ROUTED if b.unit in ("lora", "gemm")})
    raise ValueError(f"no routed build of a {array} array (routed: {', '.join(have)}); give the clock with --fmax")


def placed_only(unit, config):
    """The placed-but-unrouted build of ``unit`` ``config``, or None (for notes)."""
    return _find(PLACED_ONLY, unit, config)
