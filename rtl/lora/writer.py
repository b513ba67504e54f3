"""The LoRA step's C writer: the GEMM engine's output into a scratchpad, or combined with a stored LoRA term and
sent out (:class:`Combiner`)."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..fp import FPAdd, FPConvert, FPMul
from ..gemm import c_layout
from ..pipeline import StallPipeline, delay_line
from ..scratchpad import ReadPort, WritePort, segment_layout
from .config import PHASES, STORES, GemmRun, Phase, Task, dims_layout, out_layout, row_words

__all__ = ["CWriter", "Combiner", "combine_layout"]


def combine_layout(config):
    """Payload of the :class:`Combiner`'s input: one engine output beat (float32 lanes, ``last``), whether it
    belongs to ``y`` (else ``dx``), and ``at``, the partner segment to read beside it."""
    return data.StructLayout({
        "data": data.ArrayLayout(FP32.width, config.cols), "last": 1, "y": 1,
        "at": segment_layout(config.banks, config.address_width),
    })


class Combiner(wiring.Component):
    """``c + scaling * partner``, rounded to bf16, one beat of ``cols`` lanes per cycle, out on ``y`` or ``dx``.

    A beat's partner segment is read as it enters (two cycles), multiplied by ``scaling`` while the beat waits,
    and added to it in float32. The whole pipeline stalls with the output stream the beat goes to.

    Parameters
    ----------
    config : LoraConfig

    Attributes
    ----------
    i : In(stream of :func:`combine_layout`)
    scaling : In(32)
        The LoRA scaling ``s``, float32.
    partner : Out(:class:`~..scratchpad.ReadPort`), float32 lanes
    y, dx : Out(stream of :func:`~.config.out_layout`)
    """

    def __init__(self, config):
        self.config = config
        super().__init__({
            "i": In(stream.Signature(combine_layout(config))),
            "scaling": In(FP32.width),
            "partner": Out(ReadPort(config.banks, FP32.width, config.address_width)),
            "y": Out(stream.Signature(out_layout(config))),
            "dx": Out(stream.Signature(out_layout(config))),
        })

    def elaborate(self, platform):
        m = Module()
        cols, beat = self.config.cols, self.i.payload
        # stages=6 registers the multipliers' operands: the partner read is chosen by the phase
        muls = [FPMul(FP32, FP32, FP32, stages=6) for _ in range(cols)]
        adds = [FPAdd(FP32) for _ in range(cols)]
        rounders = [FPConvert(FP32, BF16, stages=1) for _ in range(cols)]
        read_latency = 2
        latency = read_latency + muls[0].latency + adds[0].latency + rounders[0].latency
        out_ready = Signal()
        pipe = StallPipeline(m, latency, out_ready, tag_shape=data.StructLayout({"last": 1, "y": 1}), name="comb")
        m.d.comb += [
            self.i.ready.eq(pipe.advance),
            pipe.in_valid.eq(self.i.valid), pipe.in_tag.last.eq(beat.last), pipe.in_tag.y.eq(beat.y),
            self.partner.request.eq(beat.at), self.partner.en.eq(pipe.advance),
        ]
        # c rides beside the partner read and the multiply
        c_late = data.View(data.ArrayLayout(FP32.width, cols),
                           delay_line(m, pipe.advance, beat.data, read_latency + muls[0].latency, "c_delay"))
        for j in range(cols):
            m.submodules[f"mul_{j}"] = pipe.stall(muls[j])
            m.submodules[f"add_{j}"] = pipe.stall(adds[j])
            m.submodules[f"round_{j}"] = pipe.stall(rounders[j])
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
        return m


class CWriter(wiring.Component):
    """Drains the engine's ``c`` stream, one beat per output row of a tile, in the engine's tile order.

    In a phase with a store destination each beat is written to the store (rounded to bf16 where the phase says
    so), rows past M dropped. In F2 and B4 the beat goes through the :class:`Combiner`, with the place of its
    partner segment, and out on ``y`` (F2) or ``dx`` (B4).

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

        # a beat goes into the store, or through the combiner, which reads the partner at the same place
        m.submodules.combiner = combiner = Combiner(self.config)
        wiring.connect(m, combiner.partner, wiring.flipped(self.partner))
        wiring.connect(m, combiner.y, wiring.flipped(self.y))
        wiring.connect(m, combiner.dx, wiring.flipped(self.dx))
        at = combiner.i.payload.at
        accept = Signal()
        m.d.comb += [
            at.row_address.eq(row_address), at.row_words.eq(words), at.row.eq(row), at.col.eq(p0),
            at.column.eq(0), at.count.eq(count),
            self.write.request.eq(at),
            combiner.scaling.eq(self.scaling),
            combiner.i.valid.eq(c.valid & combining),
            combiner.i.payload.data.eq(c.payload.data), combiner.i.payload.last.eq(c.payload.last),
            combiner.i.payload.y.eq(run.phase == Phase.F2),
            c.ready.eq(Mux(combining, combiner.i.ready, 1)),
            accept.eq(c.valid & c.ready),
        ]

        # store destinations take the beat directly, rounded to bf16 combinationally for hb and gb
        m.d.comb += self.write.en.eq(accept & (row < dims.m))
        for j in range(cols):
            m.submodules[f"store_round_{j}"] = unit = FPConvert(FP32, BF16, stages=0)
            m.d.comb += [unit.a.eq(c.payload.data[j]),
                         self.write.data[j].eq(Mux(rounding, unit.result, c.payload.data[j]))]

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

        # done: the last beat taken and, when combining, out of the combiner
        finished = Signal()
        with m.If(accept & c.payload.last & ~combining):
            m.d.sync += finished.eq(1)
        for port in (self.y, self.dx):
            with m.If(port.valid & port.ready & port.payload.last):
                m.d.sync += finished.eq(1)
        with m.If(finished):
            m.d.sync += finished.eq(0)
        m.d.comb += self.task.done.eq(finished)
        return m
