"""The LoRA step's movers: input streams into the scratchpads, and the scratchpads into the GEMM engine's A and
W operand streams.

Each mover reads or writes the scratchpads through one :class:`~..scratchpad.ReadPort` or
:class:`~..scratchpad.WritePort`; the step routes it to the store its running phase uses
(:data:`~.config.PHASES`). The operand movers feed the engine through a FIFO, and issue a read only when the FIFO
has room for it and for the reads still in the store's pipeline, so a stalled engine never loses a segment.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..fp import FPConvert
from ..gemm import a_layout
from ..row_align import row_layout
from ..scratchpad import ReadPort, WritePort
from .config import PHASES, STORES, GemmRun, Task, dims_layout, row_words, segment_in_layout

__all__ = ["SegmentLoader", "AMover", "WMover", "MOVER_FIFO_DEPTH"]

#: Beats of the FIFO between an operand mover and the engine.
MOVER_FIFO_DEPTH = 6


def _words_now(run, dims, banks, store_of):
    """Row words of the store the running phase reads (``store_of``: phase -> store), 0 in other phases."""
    words = Const(0, 32)
    for phase, name in store_of.items():
        words = Mux(run.phase == phase, row_words(dims[STORES[name].cols], banks), words)
    return words


class SegmentLoader(wiring.Component):
    """A matrix from its input stream into a scratchpad, one row segment per cycle.

    Parameters
    ----------
    banks, width, address_width : int
        Segment length, element width, and the store's word address width.

    Attributes
    ----------
    segments : In(stream of :func:`~.config.segment_in_layout`)
        The matrix, row-major, ``banks`` elements a beat; ``row_end`` on each row's last beat, ``last`` on the
        matrix's.
    task : In(:class:`~.config.Task`)
        ``segments`` is taken while active; ``done`` with the ``last`` beat.
    cols : In(16)
        Columns of the matrix.
    write : Out(:class:`~..scratchpad.WritePort`)
    """

    def __init__(self, banks, width, address_width):
        self.banks = banks
        super().__init__({
            "segments": In(stream.Signature(segment_in_layout(banks, width))),
            "task": In(Task()),
            "cols": In(16),
            "write": Out(WritePort(banks, width, address_width)),
        })

    def elaborate(self, platform):
        m = Module()
        banks, beat = self.banks, self.segments.payload
        request = self.write.request
        row, col = Signal(16), Signal(16)
        row_address = Signal.like(request.row_address)
        words = row_words(self.cols, banks)
        take = Signal()
        m.d.comb += [
            self.segments.ready.eq(self.task.active),
            take.eq(self.segments.valid & self.task.active),
            request.row_address.eq(row_address), request.row_words.eq(words), request.row.eq(row),
            request.col.eq(col), request.column.eq(0),
            request.count.eq(Mux(self.cols - col < banks, (self.cols - col)[:banks.bit_length()], banks)),
            self.write.data.eq(beat.data), self.write.en.eq(take),
        ]
        with m.If(take):
            m.d.sync += col.eq(col + banks)
            with m.If(beat.row_end):
                m.d.sync += [col.eq(0), row.eq(row + 1), row_address.eq(row_address + words)]
            with m.If(beat.last):
                m.d.sync += [row.eq(0), col.eq(0), row_address.eq(0)]
                m.d.comb += self.task.done.eq(1)
        return m


class AMover(wiring.Component):
    """The engine's ``a`` stream: for each tile of ``rows`` rows of the A operand, one beat per reduction index,
    read as a column segment of the store, or a row segment where the operand is the store transposed.

    Parameters
    ----------
    rows, banks, address_width : int
        Engine rows, scratchpad banks, request address width.

    Attributes
    ----------
    run : In(:class:`~.config.GemmRun`)
    dims : In(:data:`~.config.dims_layout`)
        The step's dimensions (for the stores' row words).
    read : Out(:class:`~..scratchpad.ReadPort`), bf16 elements
    a : Out(stream of :func:`~.gemm.a_layout`)
    """

    def __init__(self, rows, banks, address_width):
        self.rows, self.banks = rows, banks
        super().__init__({
            "run": In(GemmRun()),
            "dims": In(dims_layout),
            "read": Out(ReadPort(banks, BF16.width, address_width)),
            "a": Out(stream.Signature(a_layout(rows))),
        })

    def elaborate(self, platform):
        m = Module()
        rows, banks, run = self.rows, self.banks, self.run
        active, dims = run.active, run.dims
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=a_layout(rows).size, depth=MOVER_FIFO_DEPTH)
        wiring.connect(m, fifo.r_stream, wiring.flipped(self.a))

        m0, q = Signal(16), Signal(16)      # the tile's first row, the reduction index
        row_address = Signal(32)            # of the segment's first row: m0 (column segments) or q (row segments)
        busy = Signal()                     # the phase's a stream is not finished
        done = Signal()
        in_flight = Signal(range(4))
        issue = Signal()
        m.d.comb += issue.eq(active & busy & (fifo.level + in_flight < fifo.depth - 1))
        with m.If(~active):
            m.d.sync += [busy.eq(0), done.eq(0), m0.eq(0), q.eq(0), row_address.eq(0)]
        with m.Elif(~busy & ~done):
            m.d.sync += busy.eq(1)

        along_rows = Cat(*(run.phase == name for name, row in PHASES.items() if row.a_transposed)).any()
        words = _words_now(run, self.dims, banks, {name: row.a_store for name, row in PHASES.items()})
        request = self.read.request
        m.d.comb += [
            request.row_address.eq(row_address), request.row_words.eq(words),
            request.row.eq(Mux(along_rows, q, m0)), request.col.eq(Mux(along_rows, m0, q)),
            request.column.eq(~along_rows),
            request.count.eq(Mux(dims.m - m0 < rows, (dims.m - m0)[:rows.bit_length()], rows)),
            self.read.en.eq(1),
        ]
        with m.If(issue):
            m.d.sync += q.eq(q + 1)
            with m.If(along_rows):
                m.d.sync += row_address.eq(row_address + words)
            with m.If(q == dims.q - 1):
                m.d.sync += [q.eq(0), m0.eq(m0 + rows)]
                with m.If(along_rows):
                    m.d.sync += row_address.eq(0)
                with m.Else():
                    m.d.sync += row_address.eq(row_address + words * rows)
                with m.If(m0 + rows >= dims.m):
                    m.d.sync += [busy.eq(0), done.eq(1)]

        # the store's latency, then into the FIFO
        valid = [Signal(name=f"valid_{stage}") for stage in range(2)]
        m.d.sync += [valid[0].eq(issue), valid[1].eq(valid[0])]
        m.d.comb += [
            in_flight.eq(valid[0] + valid[1]),
            fifo.w_stream.valid.eq(valid[1]),
            fifo.w_stream.payload.eq(Cat(*(self.read.data[j] for j in range(rows)))),
        ]
        return m


class WMover(wiring.Component):
    """The engine's ``rows_in`` stream, in the phases whose W operand is a scratchpad: once per tile of A rows,
    each W row in segments of ``cols``, from the store's rows or (``w_by_column``) its columns; float32 stores are
    rounded to bf16 on the way.

    Parameters
    ----------
    rows, cols, banks, address_width : int
        Engine rows and columns, scratchpad banks, request address width.

    Attributes
    ----------
    run : In(:class:`~.config.GemmRun`)
    dims : In(:data:`~.config.dims_layout`)
    read : Out(:class:`~..scratchpad.ReadPort`), float32 lanes
        A bf16 store's elements arrive in the low bits of their lanes.
    rows_in : Out(stream of :func:`~.row_align.row_layout`)
    """

    def __init__(self, rows, cols, banks, address_width):
        self.rows, self.cols, self.banks = rows, cols, banks
        super().__init__({
            "run": In(GemmRun()),
            "dims": In(dims_layout),
            "read": Out(ReadPort(banks, FP32.width, address_width)),
            "rows_in": Out(stream.Signature(row_layout(cols, BF16.width))),
        })

    def elaborate(self, platform):
        m = Module()
        rows, cols, banks, run = self.rows, self.cols, self.banks, self.run
        dims = run.dims
        layout = row_layout(cols, BF16.width)
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=layout.size, depth=MOVER_FIFO_DEPTH)
        wiring.connect(m, fifo.r_stream, wiring.flipped(self.rows_in))

        passes_left, n, k0 = Signal(16), Signal(16), Signal(16)   # W passes, W row, its first column
        row_address = Signal(32)
        busy, done = Signal(), Signal()
        in_flight = Signal(range(4))
        issue = Signal()
        from_store = run.active & ~dims.nf4
        m.d.comb += issue.eq(from_store & busy & (fifo.level + in_flight < fifo.depth - 1))
        with m.If(~run.active):
            m.d.sync += [busy.eq(0), done.eq(0), n.eq(0), k0.eq(0), row_address.eq(0)]
        with m.Elif(from_store & ~busy & ~done):
            m.d.sync += [busy.eq(1), passes_left.eq(dims.m)]

        store_of = {name: row.w_store for name, row in PHASES.items() if row.w_store is not None}
        by_column = Cat(*(run.phase == name for name, row in PHASES.items() if row.w_by_column)).any()
        row_end = k0 + cols >= dims.k
        last_row = n == dims.n - 1
        words = _words_now(run, self.dims, banks, store_of)
        request = self.read.request
        m.d.comb += [
            request.row_address.eq(row_address), request.row_words.eq(words),
            request.row.eq(Mux(by_column, k0, n)), request.col.eq(Mux(by_column, n, k0)),
            request.column.eq(by_column),
            request.count.eq(Mux(dims.k - k0 < cols, (dims.k - k0)[:cols.bit_length()], cols)),
            self.read.en.eq(1),
        ]
        with m.If(issue):
            m.d.sync += k0.eq(k0 + cols)
            with m.If(by_column):
                m.d.sync += row_address.eq(row_address + words * cols)
            with m.If(row_end):
                m.d.sync += [k0.eq(0), n.eq(n + 1)]
                with m.If(by_column):
                    m.d.sync += row_address.eq(0)
                with m.Else():
                    m.d.sync += row_address.eq(row_address + words)
                with m.If(last_row):
                    m.d.sync += [n.eq(0), row_address.eq(0), passes_left.eq(passes_left - rows)]
                    with m.If(passes_left <= rows):
                        m.d.sync += [busy.eq(0), done.eq(1)]

        # the store's latency, then bf16 (float32 stores round, RNE), then into the FIFO
        tag_layout = data.StructLayout({"row_end": 1, "last": 1})
        valid = [Signal(name=f"valid_{stage}") for stage in range(3)]
        tags = [Signal(tag_layout, name=f"tag_{stage}") for stage in range(3)]
        m.d.sync += [valid[0].eq(issue), tags[0].row_end.eq(row_end), tags[0].last.eq(row_end & last_row)]
        for stage in range(1, 3):
            m.d.sync += [valid[stage].eq(valid[stage - 1]), tags[stage].eq(tags[stage - 1])]
        m.d.comb += in_flight.eq(valid[0] + valid[1] + valid[2])
        wide = Cat(*(run.phase == name for name, store in store_of.items()
                     if STORES[store].width == FP32.width)).any()
        out = data.View(layout, fifo.w_stream.payload)
        m.d.comb += [fifo.w_stream.valid.eq(valid[2]), out.row_end.eq(tags[2].row_end), out.last.eq(tags[2].last)]
        for j in range(cols):
            m.submodules[f"round_{j}"] = unit = FPConvert(FP32, BF16, stages=1)
            narrow = Signal(BF16.width, name=f"narrow_{j}")
            m.d.comb += unit.a.eq(self.read.data[j])
            m.d.sync += narrow.eq(self.read.data[j][:BF16.width])
            m.d.comb += out.data[j].eq(Mux(wide, unit.result, narrow))
        return m
