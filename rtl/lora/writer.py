"""The LoRA step's C writer: the GEMM engine's output into a scratchpad, or combined with a stored LoRA term and
sent out."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..fp import FPAdd, FPConvert, FPMul
from ..gemm import c_layout
from ..pipeline import StallPipeline, delay_line
from ..scratchpad import ReadPort, WritePort
from .config import PHASES, STORES, GemmRun, Phase, Task, dims_layout, out_layout, row_words

__all__ = ["CWriter"]


class CWriter(wiring.Component):
    """Drains the engine's ``c`` stream, one beat per output row of a tile, in the engine's tile order.

    In a phase with a store destination each beat is written to the store (rounded to bf16 where the phase says
    so), rows past M dropped. In F2 and B4 the beat goes through the combining pipeline: the partner store is read
    at the same place (two cycles), ``c + scaling * partner`` is computed in float32, rounded to bf16 and sent
    out on ``y`` (F2) or ``dx`` (B4); that pipeline stalls with the output streams.

    Parameters
    ----------
    config : LoraConfig

    Attributes
    ----------
    run : In(:class:`~.config.GemmRun`)
    task : In(:class:`~.config.Task`)
        ``done`` when the phase's last beat is stored or, combining, has left.
    dims : In(:data:`~.config.dims_layout`)
    scaling : In(32)
        The LoRA scaling ``s``, float32.
    c : In(stream of :func:`~.gemm.c_layout`), float32
    write : Out(:class:`~..scratchpad.WritePort`), float32 lanes (bf16 results in the low bits)
    partner : Out(:class:`~..scratchpad.ReadPort`), float32 lanes
    y, dx : Out(stream of :func:`~.config.out_layout`)
    """

    def __init__(self, config):
        self.config = config
        banks, aw = config.banks, config.address_width
        super().__init__({
            "run": In(GemmRun()),
            "task": In(Task()),
            "dims": In(dims_layout),
            "scaling": In(FP32.width),
            "c": In(stream.Signature(c_layout(config.gemm))),
            "write": Out(WritePort(banks, FP32.width, aw)),
            "partner": Out(ReadPort(banks, FP32.width, aw)),
            "y": Out(stream.Signature(out_layout(config))),
            "dx": Out(stream.Signature(out_layout(config))),
        })

    def elaborate(self, platform):
        m = Module()
        rows, cols, banks = self.config.rows, self.config.cols, self.config.banks
        run, c = self.run, self.c
        dims = run.dims

        def during(flag):
            return Cat(*(run.phase == name for name, row in PHASES.items() if flag(row))).any()

        combining = during(lambda row: row.combining)
        rounding = during(lambda row: row.round)
        # row words of the store the running phase writes, or of its partner
        words = Const(0, 32)
        for name, row in PHASES.items():
            store = row.partner if row.combining else row.destination
            words = Mux(run.phase == name, row_words(self.dims[STORES[store].cols], banks), words)

        # where the beat goes: output row m0 + i of the tile's columns p0 ..; row addresses as running sums
        m0, p0, i = Signal(16), Signal(16), Signal(range(rows))
        tile_address, row_address = Signal(32), Signal(32)
        row = m0 + i
        count = Mux(dims.p - p0 < cols, (dims.p - p0)[:cols.bit_length()], cols)

        # the combining pipeline: the partner read (2 cycles), s * partner, + c, rounding to bf16
        # (stages=6 registers the multipliers' operands: the partner read is chosen by the phase)
        out_ready = Signal()
        muls = [FPMul(FP32, FP32, FP32, stages=6) for _ in range(cols)]
        adds = [FPAdd(FP32) for _ in range(cols)]
        rounders = [FPConvert(FP32, BF16, stages=1) for _ in range(cols)]
        read_latency = 2
        latency = read_latency + muls[0].latency + adds[0].latency + rounders[0].latency
        pipe = StallPipeline(m, latency, out_ready, tag_shape=data.StructLayout({"last": 1, "y": 1}), name="comb")
        accept = Signal()
        m.d.comb += [
            c.ready.eq(Mux(combining, pipe.advance, 1)),
            accept.eq(c.valid & c.ready),
            pipe.in_valid.eq(c.valid & combining),
            pipe.in_tag.last.eq(c.payload.last),
            pipe.in_tag.y.eq(run.phase == Phase.F2),
        ]
        for request in (self.write.request, self.partner.request):
            m.d.comb += [
                request.row_address.eq(row_address), request.row_words.eq(words), request.row.eq(row),
                request.col.eq(p0), request.column.eq(0), request.count.eq(count),
            ]
        m.d.comb += self.partner.en.eq(pipe.advance)

        # store destinations take the beat directly, rounded to bf16 combinationally for hb and gb
        m.d.comb += self.write.en.eq(accept & (row < dims.m))
        for j in range(cols):
            m.submodules[f"store_round_{j}"] = unit = FPConvert(FP32, BF16, stages=0)
            m.d.comb += [unit.a.eq(c.payload.data[j]),
                         self.write.data[j].eq(Mux(rounding, unit.result, c.payload.data[j]))]

        # c rides beside the partner read and the multiply
        c_late = data.View(data.ArrayLayout(FP32.width, cols),
                           delay_line(m, pipe.advance, c.payload.data, read_latency + muls[0].latency, "c_delay"))
        for j in range(cols):
            m.submodules[f"comb_mul_{j}"] = pipe.stall(muls[j])
            m.submodules[f"comb_add_{j}"] = pipe.stall(adds[j])
            m.submodules[f"comb_round_{j}"] = pipe.stall(rounders[j])
            m.d.comb += [
                muls[j].a.eq(self.partner.data[j]), muls[j].b.eq(self.scaling),
                adds[j].a.eq(c_late[j]), adds[j].b.eq(muls[j].result),
                rounders[j].a.eq(adds[j].result),
            ]
        for port, flag in ((self.y, 1), (self.dx, 0)):
            m.d.comb += [port.valid.eq(pipe.out_valid & (pipe.out_tag.y == flag)),
                         port.payload.last.eq(pipe.out_tag.last)]
            for j in range(cols):
                m.d.comb += port.payload.data[j].eq(rounders[j].result)
        m.d.comb += out_ready.eq(Mux(pipe.out_tag.y, self.y.ready, self.dx.ready))

        # beat bookkeeping: tile order, rows within a tile
        last_i = i == rows - 1
        with m.If(accept):
            m.d.sync += [i.eq(Mux(last_i, 0, i + 1)), row_address.eq(row_address + words)]
            with m.If(last_i):
                m.d.sync += [p0.eq(p0 + cols), row_address.eq(tile_address)]
                with m.If(p0 + cols >= dims.p):
                    m.d.sync += [p0.eq(0), m0.eq(m0 + rows), tile_address.eq(tile_address + words * rows),
                                 row_address.eq(tile_address + words * rows)]
            with m.If(c.payload.last):
                m.d.sync += [i.eq(0), p0.eq(0), m0.eq(0), tile_address.eq(0), row_address.eq(0)]

        # done: the last beat taken and, when combining, out of the pipeline
        finished = Signal()
        with m.If(accept & c.payload.last & ~combining):
            m.d.sync += finished.eq(1)
        with m.If(pipe.out_valid & pipe.out_tag.last & out_ready):
            m.d.sync += finished.eq(1)
        with m.If(finished):
            m.d.sync += finished.eq(0)
        m.d.comb += self.task.done.eq(finished)
        return m
