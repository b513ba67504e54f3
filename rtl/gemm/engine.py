"""The GEMM engine: its parts joined with ``wiring.connect``."""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..fp import BF16
from ..nf4_dequant import NF4DequantConfig, NF4Dequantizer
from ..pe_array import PEArray
from ..row_align import row_layout
from .accumulator import Accumulator
from .config import EXP, ControlSignature, GemmConfig, a_layout, c_layout, job_layout
from .sequencer import Sequencer
from .writers import AWriter, WWriter

__all__ = ["JobControl", "GemmEngine"]

#: the engine's parts, each given the job by :class:`JobControl`
PARTS = ("a_writer", "w_writer", "sequencer", "accumulator")


class JobControl(wiring.Component):
    """Takes one job at a time and hands it to every part; the next job is taken once all of them are done.

    Attributes
    ----------
    job : In(stream of :func:`~.config.job_layout`)
    a_writer, w_writer, sequencer, accumulator : Out(:class:`~.config.ControlSignature`)
        The job, held until every part is done, and ``start`` the cycle after it is taken.
    """

    def __init__(self):
        super().__init__({"job": In(stream.Signature(job_layout())),
                          **{name: Out(ControlSignature()) for name in PARTS}})

    def elaborate(self, platform):
        m = Module()
        job = Signal(job_layout())
        busy = Signal()
        start = Signal()  # one cycle after a job is taken: the parts load their counters
        m.d.comb += self.job.ready.eq(~busy)
        with m.If(self.job.valid & self.job.ready):
            m.d.sync += [job.eq(self.job.payload), busy.eq(1)]
        m.d.sync += start.eq(self.job.valid & self.job.ready)
        parts = [getattr(self, name) for name in PARTS]
        all_done = Signal()
        m.d.comb += all_done.eq(Cat(*(part.done for part in parts)).all())
        with m.If(busy & all_done & ~start):
            m.d.sync += busy.eq(0)
        for part in parts:
            m.d.comb += [part.job.eq(job), part.start.eq(start)]
        return m


class GemmEngine(wiring.Component):
    """Tiled streaming GEMM: ``y = x @ W.T`` or, transposed, ``dx = dy @ W``, W from the NF4 dequantizer.

    Per job: one ``job`` beat; then, for each tile of ``rows`` rows of A (``ceil(M / rows)`` tiles), the tile's A
    values (``Q`` beats of ``rows`` values: Q = K forward, N transposed) and one pass of W (``N * K`` weights,
    row-major, through the dequantizer's streams or ``w``). Outputs come as beats of ``cols`` values, one per
    output row of a tile: forward, tile after tile of ``cols`` output columns (``rows`` beats each); transposed,
    after the last chunk of an A tile, ``rows`` beats per tile of ``cols`` output columns. Rows past M and columns
    past the output width carry don't-care values.

    Parts (submodules of the same names): :class:`JobControl` (``control``) gives the job to the A writer
    (:class:`~.writers.AWriter`), the W writer (:class:`~.writers.WWriter`, behind the ``dequantizer`` and a small
    FIFO, or the ``w`` stream), the :class:`~.sequencer.Sequencer` and the :class:`~.accumulator.Accumulator`.
    The writers offer their buffers to the sequencer, which feeds the PE ``array`` and tells the accumulator about
    each chunk; the accumulator takes the array's partial sums and produces ``c``.

    Parameters
    ----------
    config : GemmConfig

    Attributes
    ----------
    job : In(stream of :func:`~.config.job_layout`)
    a : In(stream of :func:`~.config.a_layout`)
    exponents : In(stream of a signed exponent)
        A transposed block job's W tile exponents, one beat per tile of ``chunk`` W rows (see
        :class:`~.writers.WWriter`); unused by every other job.
    w : In(stream of ArrayLayout(BF16.width, cols)), bf16 weights only
        W, flat and row-major, ``cols`` bf16 per beat, final beat zero-padded.
    tensor, codes, absmax, absmax2 : NF4 weights only
        The dequantizer's input streams (see :class:`~..nf4_dequant.NF4Dequantizer`), one tensor per pass of W.
    rows_in : In(stream of row_layout(cols, BF16.width)), ``weights="both"`` only
    c : Out(stream of :func:`~.config.c_layout`)
    array : PEArray
    dequantizer : NF4Dequantizer or None
    control, a_writer, w_writer, sequencer, accumulator : the parts
    collisions : list of (str, Memory, Signal)
        The memories marked ``no_rw_check``, each with a strobe that is high when its read data is used: in such a
        cycle it may not read an address that it writes (simulations check it).
    """

    def __init__(self, config=GemmConfig()):
        if not isinstance(config, GemmConfig):
            raise TypeError(f"config must be a GemmConfig, not {config!r}")
        self.config = config
        members = {
            "job": In(stream.Signature(job_layout())),
            "a": In(stream.Signature(a_layout(config.rows))),
            "exponents": In(stream.Signature(EXP)),
            "c": Out(stream.Signature(c_layout(config))),
        }
        if config.weights in ("nf4", "both"):
            self.dequantizer = NF4Dequantizer(NF4DequantConfig(
                lanes=config.cols, blocksize=config.blocksize, out_dtype="bf16", double_quant=config.double_quant))
            for name, member in self.dequantizer.signature.members.items():
                if name != "weights":
                    members[name] = member
        else:
            self.dequantizer = None
            members["w"] = In(stream.Signature(data.ArrayLayout(BF16.width, config.cols)))
        if config.weights == "both":
            members["rows_in"] = In(stream.Signature(row_layout(config.cols, BF16.width)))
        super().__init__(members)

        self.array = PEArray(config.rows, config.cols)
        self.control = JobControl()
        self.a_writer = AWriter(config)
        self.w_writer = WWriter(config)
        self.sequencer = Sequencer(config, self.array.flush_steps)
        self.accumulator = Accumulator(config)
        issue = self.sequencer.issue
        self.collisions = [
            ("a", self.a_writer.memory, issue), ("ea", self.a_writer.exp_memory, issue),
            ("ew", self.w_writer.exp_memory, issue),
            *((f"w{b}", bank, issue) for b, bank in enumerate(self.w_writer.banks)),
            ("acc", self.accumulator.memory, self.accumulator.used),
        ]

    def elaborate(self, platform):
        m = Module()
        m.submodules.array = self.array
        m.submodules.control = self.control
        for name in PARTS:
            m.submodules[name] = getattr(self, name)

        wiring.connect(m, wiring.flipped(self.job), self.control.job)
        for name in PARTS:
            wiring.connect(m, getattr(self.control, name), getattr(self, name).control)

        wiring.connect(m, wiring.flipped(self.a), self.a_writer.a)
        wiring.connect(m, wiring.flipped(self.exponents), self.w_writer.exponents)
        if self.dequantizer is not None:
            m.submodules.dequantizer = self.dequantizer
            for name in self.dequantizer.signature.members:
                if name != "weights":
                    wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(self.dequantizer, name))
            # a small FIFO between them keeps the row aligner's handshake out of the dequantizer's pipeline
            weights = self.dequantizer.weights
            m.submodules.dequant_fifo = fifo = SyncFIFOBuffered(width=weights.payload.data.shape().size, depth=4)
            m.d.comb += [
                fifo.w_stream.payload.eq(weights.payload.data),
                fifo.w_stream.valid.eq(weights.valid),
                weights.ready.eq(fifo.w_stream.ready),
            ]
            wiring.connect(m, fifo.r_stream, self.w_writer.w)
        else:
            wiring.connect(m, wiring.flipped(self.w), self.w_writer.w)
        if self.config.weights == "both":
            wiring.connect(m, wiring.flipped(self.rows_in), self.w_writer.rows_in)

        wiring.connect(m, self.a_writer.buffer, self.sequencer.a_buffer)
        wiring.connect(m, self.w_writer.buffer, self.sequencer.w_buffer)
        wiring.connect(m, self.sequencer.steps, self.array.steps)
        wiring.connect(m, self.array.partials, self.accumulator.partials)
        wiring.connect(m, self.sequencer.info, self.accumulator.info)
        wiring.connect(m, self.accumulator.c, wiring.flipped(self.c))
        return m
