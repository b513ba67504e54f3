"""The LoRA step's configuration, its phase table, the scratchpads it keeps, and the layouts and signatures its
parts share."""

from dataclasses import dataclass
from typing import Optional

from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..gemm import GemmConfig
from ..lora_optim import OptimConfig, hyper_layout

__all__ = [
    "LoraConfig", "Phase", "GemmPhase", "PHASES", "GEMM_ORDER", "LOAD_ORDER", "UPDATE_ORDER", "StoreSpec", "STORES",
    "SCRATCHPADS",
    "DIMENSIONS", "header_layout", "dims_layout", "gemm_dims_layout", "segment_in_layout", "updates_layout",
    "moments_layout", "out_layout", "row_words", "Task", "GemmRun",
]

#: Dimensions of a step, as the header names them: tokens, input and output features, LoRA rank.
DIMENSIONS = ("t", "in", "out", "r")


class Phase(enum.Enum, shape=4):
    """The phases of a step, in the order the controller walks them."""
    IDLE = 0
    LOAD_X = 1
    LOAD_DY = 2
    LOAD_A = 3
    LOAD_B = 4
    F1 = 5       # h = x A^T
    F3 = 6       # yl = hb B^T
    F2 = 7       # y = x W^T + s yl
    B1 = 8       # g = dy B
    B5 = 9       # dxl = gb A
    B4 = 10      # dx = dy W + s dxl
    B2 = 11      # gB = dy^T hb
    B3 = 12      # gA = gb^T x
    UPD_A = 13
    UPD_B = 14


@dataclass(frozen=True)
class GemmPhase:
    """One GEMM phase of the step: the product ``Act @ W^T`` (or, transposed, ``Act @ W``) the engine runs.

    Attributes
    ----------
    m, n, k : str
        The job's dimensions, as names of :data:`DIMENSIONS`.
    transposed : bool
        The engine's transposed mode.
    nf4 : bool
        W is the NF4 base weight, from the dequantizer; otherwise W comes from ``w_store``.
    a_store : str
        Store of the A operand.
    a_transposed : bool
        The A operand is the store transposed: it is read along the store's rows (else down its columns).
    w_store : str or None
        Store of the W operand (None: the dequantizer).
    w_by_column : bool
        The W operand's rows are the store's columns.
    destination : str
        The store the product goes to, or ``"y"``/``"dx"``: the product plus ``scaling * partner`` goes out.
    round : bool
        The destination store holds the product rounded to bf16.
    partner : str or None
        The stored LoRA term added to the product on its way out (outputs only).
    """

    m: str
    n: str
    k: str
    transposed: bool
    nf4: bool
    a_store: str
    a_transposed: bool
    w_store: Optional[str]
    w_by_column: bool
    destination: str
    round: bool = False
    partner: Optional[str] = None

    @property
    def combining(self):
        """The product goes out (combined with ``partner``), not into a store."""
        return self.partner is not None

    @property
    def reduction(self):
        """Name of the reduction dimension: the A operand's columns."""
        return self.n if self.transposed else self.k

    @property
    def out_columns(self):
        """Name of the output's column dimension."""
        return self.k if self.transposed else self.n


#: The GEMM phases, in execution order. Each LoRA term is computed before the base product it is added to, so the
#: base product is combined on its way out and never stored.
PHASES = {
    Phase.F1: GemmPhase("t", "r", "in", False, False, "x", False, "a", False, "hb", round=True),
    Phase.F3: GemmPhase("t", "out", "r", False, False, "hb", False, "b", False, "yl"),
    Phase.F2: GemmPhase("t", "out", "in", False, True, "x", False, None, False, "y", partner="yl"),
    Phase.B1: GemmPhase("t", "out", "r", True, False, "dy", False, "b", False, "gb", round=True),
    Phase.B5: GemmPhase("t", "r", "in", True, False, "gb", False, "a", False, "dxl"),
    Phase.B4: GemmPhase("t", "out", "in", True, True, "dy", False, None, False, "dx", partner="dxl"),
    Phase.B2: GemmPhase("out", "r", "t", False, False, "dy", True, "hb", True, "gbs"),
    Phase.B3: GemmPhase("r", "t", "in", True, False, "gb", True, "x", False, "ga"),
}
GEMM_ORDER = tuple(PHASES)

#: The load phases and the store each fills from its input stream.
LOAD_ORDER = {Phase.LOAD_X: "x", Phase.LOAD_DY: "dy", Phase.LOAD_A: "a", Phase.LOAD_B: "b"}

#: The update phases: the parameter store and the gradient store each reads.
UPDATE_ORDER = {Phase.UPD_A: ("a", "ga"), Phase.UPD_B: ("b", "gbs")}


@dataclass(frozen=True)
class StoreSpec:
    """A scratchpad matrix: its row and column dimensions (names of :data:`DIMENSIONS`) and element width."""

    rows: str
    cols: str
    width: int


STORES = {
    "x": StoreSpec("t", "in", BF16.width), "dy": StoreSpec("t", "out", BF16.width),
    "a": StoreSpec("r", "in", FP32.width), "b": StoreSpec("out", "r", FP32.width),
    "hb": StoreSpec("t", "r", BF16.width), "gb": StoreSpec("t", "r", BF16.width),
    "yl": StoreSpec("t", "out", FP32.width), "dxl": StoreSpec("t", "in", FP32.width),
    "ga": StoreSpec("r", "in", FP32.width), "gbs": StoreSpec("out", "r", FP32.width),
}

#: The scratchpads the step builds, each holding the matrices of :data:`STORES` named here, one at a time: yl lives
#: from F3 to F2 and dxl from B5 to B4, so they share one store (both float32, both from address 0).
SCRATCHPADS = {name: (name,) for name in STORES if name not in ("yl", "dxl")}
SCRATCHPADS["yl_dxl"] = ("yl", "dxl")


@dataclass(frozen=True)
class LoraConfig:
    """Elaboration parameters of :class:`~.step.LoraStep`.

    Parameters
    ----------
    rows, cols : int
        GEMM engine array, 1 to 16 each.
    max_t, max_in, max_out, max_rank : int
        Largest dimensions the scratchpads hold.
    optimizer : str
        ``"adamw"`` or ``"sgd"``.
    blocksize, double_quant : NF4 format of the base weight.
    optimizer_interval : int
        Cycles per element of the optimizer core (1 to 16): it shares its float units among the element's
        operations (:class:`~..lora_optim.OptimConfig`); the memory-fed step chooses it from its port
        (:func:`~.memstep.for_memory`).
    """

    rows: int = 4
    cols: int = 4
    max_t: int = 16
    max_in: int = 64
    max_out: int = 64
    max_rank: int = 8
    optimizer: str = "adamw"
    blocksize: int = 64
    double_quant: bool = True
    optimizer_interval: int = 1

    def __post_init__(self):
        for name in ("max_t", "max_in", "max_out", "max_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 1 << 15:
                raise ValueError(f"{name} must be an integer from 1 to 32768, not {value!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}")
        self.optim  # checks optimizer_interval
        self.gemm  # checks rows, cols

    @property
    def banks(self):
        """Scratchpad banks: the next power of two of the longest segment any mover reads."""
        side = max(self.rows, self.cols)
        return 1 << (side - 1).bit_length()

    @property
    def optim(self):
        """The optimizer core's configuration."""
        return OptimConfig(kind=self.optimizer, interval=self.optimizer_interval)

    @property
    def gemm(self):
        longest = max(self.max_t, self.max_in, self.max_out, self.max_rank)
        return GemmConfig(rows=self.rows, cols=self.cols, max_k=max(self.max_in, self.max_t, self.max_rank),
                          max_n=longest, out_dtype="fp32", weights="both", blocksize=self.blocksize,
                          double_quant=self.double_quant, w_buffer_ram="block",
                          convert_interval=2 if self.cols % 2 == 0 else 1)

    def dims(self):
        return {"t": self.max_t, "in": self.max_in, "out": self.max_out, "r": self.max_rank}

    @property
    def chunk(self):
        return self.gemm.chunk_steps

    def store_depth(self, name):
        """Words per bank of matrix ``name``: its largest size, rows of ``ceil(cols / banks)`` words."""
        spec, dims = STORES[name], self.dims()
        return dims[spec.rows] * -(-dims[spec.cols] // self.banks)

    def scratchpad_depth(self, name):
        """Words per bank of scratchpad ``name`` (of :data:`SCRATCHPADS`): its largest matrix's."""
        return max(self.store_depth(matrix) for matrix in SCRATCHPADS[name])

    @property
    def c_queue_depth(self):
        """Engine output beats queued for the C writer: one B4 tile's, ``rows * ceil(max_in / cols)``. B4's
        outputs all come in its last sweep over the reduction, one beat every two steps or so, and the combiner
        takes ``cols + 2`` cycles a beat; with a tile's beats queued the engine goes on to the next tile while
        they drain."""
        return self.rows * -(-self.max_in // self.cols)

    @property
    def address_width(self):
        """Bits of a word address in the largest scratchpad (the movers' request ports)."""
        return max(max(1, (self.store_depth(name) - 1).bit_length()) for name in STORES)


def row_words(cols, banks):
    """``ceil(cols / banks)`` of a run-time column count: the words per bank one row of a matrix takes."""
    return (cols + banks - 1) >> (banks.bit_length() - 1)


#: A step's dimensions, as the header carries them.
dims_layout = data.StructLayout({name: 16 for name in DIMENSIONS})


def header_layout():
    """Payload of the ``header`` stream: one beat per step."""
    return data.StructLayout({
        "t": 16, "in": 16, "out": 16, "r": 16,
        "scaling": FP32.width,
        "n_weights": 32,        # out * in, for the dequantizer and the row aligner
        "offset": FP32.width,   # offset of the NF4 weight's double quantization
        "hyper": hyper_layout,
    })


#: The running GEMM phase's dimensions and flags: the job's M, N, K, the reduction length Q (the A operand's
#: columns), the output columns P.
gemm_dims_layout = data.StructLayout({
    "m": 16, "n": 16, "k": 16, "q": 16, "p": 16, "transposed": 1, "nf4": 1,
})


def segment_in_layout(banks, width):
    """Payload of the matrix input streams: ``banks`` elements of one row, ``row_end`` on its last segment."""
    return data.StructLayout({"data": data.ArrayLayout(width, banks), "row_end": 1, "last": 1})


#: AdamW moments of one element, as ``state_in`` carries them.
moments_layout = data.StructLayout({"m": FP32.width, "v": FP32.width})


def updates_layout():
    """Payload of ``updates``: one element of A, then of B: gradient, new value, new moments (float32)."""
    return data.StructLayout({"grad": FP32.width, "param": FP32.width, "m": FP32.width, "v": FP32.width})


def out_layout(config):
    """Payload of ``y`` and ``dx``: one output row of a tile, ``cols`` bf16 values; ``last`` on the final beat."""
    return data.StructLayout({"data": data.ArrayLayout(BF16.width, config.cols), "last": 1})


class Task(wiring.Signature):
    """A phase handed to a part, from the controller's side: ``active`` while it runs; the part raises ``done``
    (one cycle, while ``active``) when the phase's work is finished."""

    def __init__(self):
        super().__init__({"active": Out(1), "done": In(1)})


class GemmRun(wiring.Signature):
    """The running GEMM phase, from the controller's side, broadcast to the parts that feed and drain the engine.

    Members
    -------
    phase : Out(Phase)
        The running phase.
    active : Out(1)
        A GEMM phase runs, past its first cycle (in which ``dims`` settle).
    dims : Out(:data:`gemm_dims_layout`)
        The phase's dimensions, registered.
    """

    def __init__(self):
        super().__init__({"phase": Out(Phase), "active": Out(1), "dims": Out(gemm_dims_layout)})
