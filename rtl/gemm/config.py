"""The GEMM engine's configuration, its stream payloads and the handshakes between its parts."""

from dataclasses import dataclass

from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from ...constants import EXP_MIN, MAX_LANES, GemmNumerics
from ..bfp import EXPONENT_SHAPE
from ..fp import BF16, FP32
from ..nf4_dequant import NF4DequantConfig

__all__ = ["GemmConfig", "job_layout", "a_layout", "c_layout", "info_layout", "ControlSignature", "HalvesSignature",
           "ABufferSignature", "WBufferSignature", "writer_ready_next"]

#: an unbiased bf16 exponent, as the buffers and the alignment keep them
EXP = EXPONENT_SHAPE


@dataclass(frozen=True)
class GemmConfig:
    """Elaboration parameters of :class:`~.engine.GemmEngine`.

    Parameters
    ----------
    rows, cols : int
        PE array shape, 1 to :data:`~edge_qlora.constants.MAX_LANES` each.
    max_k : int
        Longest W row (K) the buffers hold.
    max_n : int
        Most W rows (N) in transposed mode (the A buffer then holds a tile of dy, ``N`` long).
    chunk : int or None
        Reduction steps per block-floating-point chunk: a multiple of ``cols``, at least ``2 * rows`` and 16.
        ``None``: the smallest such value.
    out_dtype : str
        ``"bf16"`` or ``"fp32"``.
    weights : str
        ``"nf4"`` (an :class:`~..nf4_dequant.NF4Dequantizer` with ``cols`` lanes feeds the engine), ``"bf16"``
        (a flat bf16 stream ``w``), or ``"both"``: the dequantizer and, chosen per job, a stream ``rows_in`` of
        bf16 beats already cut into rows (as the row aligner's output), for a controller that keeps its operands
        in row-addressable scratchpads.
    blocksize, double_quant : int, bool
        NF4 format, with ``weights="nf4"``.
    convert_interval : int
        Cycles the accumulator takes per row of chunk sums: 1 (an integer-to-float converter and a float32 adder
        per column) or 2 (``cols / 2`` of each, a row going through in two halves; ``cols`` even). The PE array
        gives at most a row every two steps, so 2 keeps pace with it and saves half the converters and adders.
    w_buffer_ram : str
        Where the W writer's double buffer goes: ``"auto"`` (Yosys picks: distributed RAM when it is shallow) or
        ``"block"`` (block RAM, ``ram_style``): a design short of LUTs and not of block RAM, as the LoRA step at
        small buffer sizes, keeps the buffer's ``cols`` wide banks out of the LUTs.
    held_tiles : int
        Output tiles (``rows x cols``) whose float32 partial sums the accumulator keeps for block jobs (from a
        ``hold`` job for a later ``resume`` job, or a transposed block job's, see :func:`job_layout`): its memory
        is ``rows * max(words_per_row, held_tiles)`` deep. 0: no more than the ordinary jobs need.
    """

    rows: int = 8
    cols: int = 8
    max_k: int = 2048
    max_n: int = 2048
    chunk: int = None
    out_dtype: str = "bf16"
    weights: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    convert_interval: int = 1
    w_buffer_ram: str = "auto"
    held_tiles: int = 0

    def __post_init__(self):
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LANES:
                raise ValueError(f"{name} must be an integer from 1 to {MAX_LANES}, not {value!r}")
        for name in ("max_k", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 1 << 20:
                raise ValueError(f"{name} must be an integer from 1 to 2**20, not {value!r}")
        if self.chunk is not None:
            if not isinstance(self.chunk, int) or self.chunk % self.cols or self.chunk < max(16, 2 * self.rows) \
                    or self.chunk > 512:
                raise ValueError(f"chunk must be a multiple of cols ({self.cols}), at least "
                                 f"{max(16, 2 * self.rows)} and at most 512, not {self.chunk!r}")
        if self.out_dtype not in ("bf16", "fp32"):
            raise ValueError(f"out_dtype must be 'bf16' or 'fp32', not {self.out_dtype!r}")
        if self.weights not in ("nf4", "bf16", "both"):
            raise ValueError(f"weights must be 'nf4', 'bf16' or 'both', not {self.weights!r}")
        if self.convert_interval not in (1, 2) or isinstance(self.convert_interval, bool) \
                or self.cols % self.convert_interval:
            raise ValueError(f"convert_interval must be 1 or 2 (2 with an even cols), not {self.convert_interval!r}")
        if self.w_buffer_ram not in ("auto", "block"):
            raise ValueError(f"w_buffer_ram must be 'auto' or 'block', not {self.w_buffer_ram!r}")
        if not isinstance(self.held_tiles, int) or isinstance(self.held_tiles, bool) \
                or not 0 <= self.held_tiles <= 1 << 16:
            raise ValueError(f"held_tiles must be an integer from 0 to 2**16, not {self.held_tiles!r}")
        if self.weights in ("nf4", "both"):
            NF4DequantConfig(lanes=self.cols, blocksize=self.blocksize, double_quant=self.double_quant)

    @property
    def chunk_steps(self):
        """The chunk length L actually used."""
        if self.chunk is not None:
            return self.chunk
        low = max(16, 2 * self.rows)
        return -(-low // self.cols) * self.cols

    @property
    def min_steps(self):
        """Fewest steps a chunk is padded to: the PE array's drain spacing (``2 * rows - 1``), and 12 so that the
        same output's partials of consecutive chunks reach the accumulator further apart than its
        read-add-write latency (10 cycles)."""
        return max(2 * self.rows - 1, 12)

    @property
    def acc_depth(self):
        """Rows of ``cols`` float32 partial sums the accumulator memory holds."""
        return self.rows * max(self.words_per_row, self.held_tiles)

    @property
    def numerics(self):
        return GemmNumerics(chunk=self.chunk_steps, out_dtype=self.out_dtype)

    @property
    def max_q(self):
        """Depth of one half of the A buffer: the longest reduction."""
        return max(self.max_k, self.max_n)

    @property
    def words_per_row(self):
        return -(-self.max_k // self.cols)

    @property
    def tile_rows(self):
        """W rows one half of the W buffer holds: cols (forward), chunk (transposed)."""
        return max(self.cols, self.chunk_steps)

    @property
    def chunks_q(self):
        """Chunks of the longest reduction: entries per half of the A exponent memory."""
        return -(-self.max_q // self.chunk_steps)

    @property
    def chunks_k(self):
        """Chunks of the longest W row: entries per half of the W exponent memory."""
        return -(-self.max_k // self.chunk_steps)

    @property
    def slots(self):
        """Rows of a W tile each bank holds (row ``r`` of a tile is in bank ``r % cols``, slot ``r // cols``)."""
        return -(-self.tile_rows // self.cols)

    @property
    def out_format(self):
        return BF16 if self.out_dtype == "bf16" else FP32


def job_layout():
    """Payload of the ``job`` stream: one beat per GEMM. ``weights`` is ``n * k`` (the W elements per pass);
    ``rows_in`` (engines with ``weights="both"``) takes this job's W from the ``rows_in`` stream, not the
    dequantizer.

    A ``block`` job is the output-stationary mode: the A buffer holds all ``ceil(m / rows)`` tiles of A at once
    (``ceil(m / rows) * q`` values, q = k forward and n transposed, at most ``max_q``; as many chunks of
    exponents, at most ``chunks_q``), W comes in one pass, and each W tile serves every A tile before the next.
    Forward, outputs come W tile by W tile, A tile by A tile within one; transposed, every output tile has its own
    place in the accumulator (at most ``acc_depth / rows`` tiles), outputs come as in an ordinary job, and each W
    tile takes its exponent from the ``exponents`` stream. A block job may continue the reduction of the one
    before it: with ``resume`` its outputs' first chunks add to the partial sums that job left in the
    accumulator, and with ``hold`` it gives no outputs and leaves its own there (the reduction a multiple of the
    chunk; at most ``held_tiles`` output tiles forward). A sequence of block jobs over spans of the reduction,
    all but the last held and all but the first resumed, gives exactly the outputs of one job over the whole
    reduction (transposed: with the whole W rows' chunk exponents)."""
    return data.StructLayout({"m": 32, "n": 32, "k": 32, "weights": 32, "transposed": 1, "rows_in": 1,
                              "block": 1, "resume": 1, "hold": 1})


def a_layout(rows):
    """Payload of the ``a`` stream: one reduction index of one A tile: ``rows`` bf16 values (zeros past M)."""
    return data.ArrayLayout(BF16.width, rows)


def c_layout(config):
    """Payload of the ``c`` stream: one output row of one tile, ``cols`` values; ``last`` on the job's last beat."""
    return data.StructLayout({"data": data.ArrayLayout(config.out_format.width, config.cols), "last": 1})


def info_layout(config):
    """Payload of the chunk-info stream from the sequencer to the accumulator, one beat per chunk: the shared
    exponents of its A rows (``ea``) and B columns (``eb``), the accumulator address of its tile's first row
    (``base``), whether it is the first or last chunk of its outputs' reduction, and the last of the job."""
    return data.StructLayout({
        "ea": data.ArrayLayout(EXP, config.rows), "eb": data.ArrayLayout(EXP, config.cols),
        "base": range(max(1, config.acc_depth)), "first": 1, "last": 1, "job_last": 1,
    })


class ControlSignature(wiring.Signature):
    """The job, as the engine hands it to each part (this side: the engine).

    Members
    -------
    job : Out(:func:`job_layout`)
        The job being run, held from its acceptance until every part is done.
    start : Out(1)
        High for one cycle, the cycle after the job is accepted: the parts load their counters.
    done : In(1)
        The part has nothing of the job left to do (it may rise again before ``start`` falls).
    """

    def __init__(self):
        super().__init__({"job": Out(job_layout()), "start": Out(1), "done": In(1)})


class HalvesSignature(wiring.Signature):
    """A double buffer's hand-over between the part that fills its halves (this side) and the part that reads them.

    Members
    -------
    full_next : Out(2)
        Which halves hold a tile that the reader has not released, as the flags will be after this cycle: the
        writer's and the reader's handshakes are registers worked out a cycle ahead from it.
    release : In(2)
        The reader is done with a half (one cycle, combinational): it may be written again.
    """

    def __init__(self, members=()):
        super().__init__({"full_next": Out(2), "release": In(2), **dict(members)})


def _read_port(depth, shape):
    return Out(ReadPort.Signature(addr_width=max(0, (depth - 1).bit_length()), shape=shape))


class ABufferSignature(HalvesSignature):
    """The A buffer as its writer offers it to the sequencer: the halves' hand-over and a read port each on the A
    values (``read``: ``rows`` bf16 per reduction index) and their chunk exponents (``exp_read``).
    """

    def __init__(self, config):
        super().__init__({
            "read": _read_port(2 * config.max_q, a_layout(config.rows)),
            "exp_read": _read_port(2 * config.chunks_q, data.ArrayLayout(EXP, config.rows)),
        })


class WBufferSignature(HalvesSignature):
    """The W buffer as its writer offers it to the sequencer: the halves' hand-over, a read port on each of the
    ``cols`` banks (``read_0`` ...: one member each, as amaranth cannot flip an interface that holds an array of
    them), one on the per-row chunk exponents (``exp_read``, forward) and each half's single tile exponent
    (``tile_exponent``, transposed; a register of the writer).
    """

    def __init__(self, config):
        cols = config.cols
        bank = _read_port(2 * config.slots * config.words_per_row, data.ArrayLayout(BF16.width, cols))
        super().__init__({
            **{f"read_{b}": bank for b in range(cols)},
            "exp_read": _read_port(2 * config.chunks_k, data.ArrayLayout(EXP, cols)),
            "tile_exponent": Out(data.ArrayLayout(EXP, 2), init=[EXP_MIN, EXP_MIN]),
        })


def writer_ready_next(open_next, full_next, half, flip):
    """A writer's next ``ready``: it will still be open and the half it writes next (``half``, flipped when this
    cycle ends a tile) will not be full. Loaded into a register every cycle, it equals ``open & ~full[half]``."""
    return open_next & ~full_next.bit_select(half ^ flip, 1)
