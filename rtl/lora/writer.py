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
    """``c + scaling * partner``, rounded to bf16, for one beat of ``cols`` lanes, out on ``y`` or ``dx``.

    One float32 multiplier, adder and rounder serve the lanes in turn: a beat is taken and its partner segment
    read (two cycles), then its lanes enter the arithmetic one per cycle, and the beat leaves when its last lane
    is rounded. A beat takes ``cols + 2`` cycles, which F2 and B4 hide: the engine gives a tile's ``rows`` beats
    once per pass over the reduction (the layer's input or output features), so one lane instead of ``cols``
    saves ``cols - 1`` float32 multipliers (four DSPs each), adders and rounders at no cost to the step at the
    model's shapes. The arithmetic stalls with the output stream the beat goes to.

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
        mul, add = FPMul(FP32, FP32, FP32, stages=6), FPAdd(FP32)
        rounder = FPConvert(FP32, BF16, stages=1)
        latency = mul.latency + add.latency + rounder.latency
        tag = data.StructLayout({"lane": range(cols), "last": 1, "y": 1})
        out_full, out_ready = Signal(), Signal()
        pipe = StallPipeline(m, latency, out_ready, tag_shape=tag, name="comb")
        for name, unit in (("mul", mul), ("add", add), ("round", rounder)):
            m.submodules[name] = pipe.stall(unit)

        # the beat waits in registers while its lanes go through one at a time
        held = Signal(data.ArrayLayout(FP32.width, cols))
        held_last, held_y = Signal(), Signal()
        lane = Signal(range(cols))
        m.d.comb += self.partner.request.eq(beat.at)
        with m.FSM(name="combine"):
            with m.State("TAKE"):
                m.d.comb += [self.i.ready.eq(1), self.partner.en.eq(self.i.valid)]
                with m.If(self.i.valid):
                    m.d.sync += [held.eq(beat.data), held_last.eq(beat.last), held_y.eq(beat.y)]
                    m.next = "READ"
            with m.State("READ"):
                m.d.comb += self.partner.en.eq(1)       # the read's second cycle: the segment then holds still
                m.next = "FEED"
            with m.State("FEED"):
                m.d.comb += [pipe.in_valid.eq(1), pipe.in_tag.lane.eq(lane), pipe.in_tag.y.eq(held_y),
                             pipe.in_tag.last.eq(held_last & (lane == cols - 1))]
                with m.If(pipe.advance):
                    m.d.sync += lane.eq(lane + 1)
                    with m.If(lane == cols - 1):
                        m.d.sync += lane.eq(0)
                        m.next = "TAKE"
        # c waits for the product beside the multiplier
        c_late = delay_line(m, pipe.advance, held[lane], mul.latency, "c_delay")
        m.d.comb += [mul.a.eq(self.partner.data[lane]), mul.b.eq(self.scaling),
                     add.a.eq(c_late), add.b.eq(mul.result), rounder.a.eq(add.result)]

        # rounded lanes gather into the output beat, which leaves when its last lane is in
        gathered = Signal(data.ArrayLayout(BF16.width, cols))
        out_last, out_y = Signal(), Signal()
        port_ready = Mux(out_y, self.y.ready, self.dx.ready)
        m.d.comb += out_ready.eq(~out_full | port_ready)
        with m.If(out_full & port_ready):
            m.d.sync += out_full.eq(0)
        with m.If(pipe.out_valid & out_ready):
            m.d.sync += gathered[pipe.out_tag.lane].eq(rounder.result)
            with m.If(pipe.out_tag.lane == cols - 1):
                m.d.sync += [out_full.eq(1), out_last.eq(pipe.out_tag.last), out_y.eq(pipe.out_tag.y)]
        for port, flag in ((self.y, 1), (self.dx, 0)):
            m.d.comb += [port.valid.eq(out_full & (out_y == flag)), port.payload.last.eq(out_last),
                         port.payload.data.eq(gathered)]
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
