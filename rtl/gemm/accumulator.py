"""The GEMM engine's accumulator: chunk sums to float32, accumulated per output, rounded to the output format."""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ...constants import ACC_BITS, OPERAND_FRAC
from ..fp import BF16, FP32, FPAdd, FPConvert, FixedToFloat
from ..pe_array import partials_layout
from ..pipeline import SkidBuffer, StallPipeline
from .config import EXP, ControlSignature, GemmConfig, c_layout, info_layout
from .writers import NO_RW_CHECK

__all__ = ["Accumulator"]


class Accumulator(wiring.Component):
    """Chunk sums -> float32 -> accumulated per output in the accumulator memory -> rounded outputs.

    Each chunk's ``rows`` partial beats (from the PE array) meet the chunk's info beat (from the sequencer): the
    sum ``S`` of row ``i``, column ``j`` is worth ``S * 2 ** (ea[i] + eb[j] - 32)``; it is rounded to float32
    (:class:`~..fp.FixedToFloat`) and added (:class:`~..fp.FPAdd`) to what the accumulator memory holds for its
    output (``base + i``), or stored as it is on the ``first`` chunk. On the ``last`` chunk the sum goes out on
    ``c`` instead, rounded to bf16 or as float32.

    With ``convert_interval`` 2 a row goes through in two halves, one a cycle: half as many converters and adders
    as columns, and the memory holds half rows, at ``2 * row + half``; the output rows are joined again at ``c``.

    Parameters
    ----------
    config : GemmConfig

    Attributes
    ----------
    control : In(:class:`~.config.ControlSignature`)
        Only ``done`` is used: nothing is left in the accumulator.
    partials : In(stream of :func:`~..pe_array.partials_layout`)
    info : In(stream of :func:`~.config.info_layout`)
    c : Out(stream of :func:`~.config.c_layout`)
    memory : Memory
        The float32 partial results, ``acc_depth`` rows (of ``cols / convert_interval`` values, that many times
        as deep).
    used : Signal
        High when the memory's read data is added (for collision checks in simulation).
    """

    #: partial beats queued between the PE array and the converters
    PARTIALS_DEPTH = 6

    def __init__(self, config):
        if not isinstance(config, GemmConfig):
            raise TypeError(f"config must be a GemmConfig, not {config!r}")
        self.config = config
        super().__init__({
            "control": In(ControlSignature()),
            "partials": In(stream.Signature(partials_layout(config.rows, config.cols))),
            "info": In(stream.Signature(info_layout(config))),
            "c": Out(stream.Signature(c_layout(config))),
        })
        self.memory = Memory(shape=data.ArrayLayout(FP32.width, config.cols // config.convert_interval),
                             depth=config.acc_depth * config.convert_interval, init=[], attrs=NO_RW_CHECK)
        self.used = Signal()
        # (ports made once, so that elaborating the accumulator again adds none)
        self._ports = (self.memory.read_port(domain="sync", transparent_for=()), self.memory.write_port())

    def _tag_layout(self):
        """What travels with each output row's sums (each half row's with ``convert_interval`` 2): its accumulator
        address and the chunk's flags."""
        cfg = self.config
        return data.StructLayout({"addr": range(max(1, cfg.acc_depth * cfg.convert_interval)), "first": 1,
                                  "last": 1, "job_last": 1})

    def elaborate(self, platform):
        m = Module()
        m.submodules.memory = self.memory
        acc_slice, front_busy = self._front(m, platform, self._partials_queue(m))
        back_busy = self._back(m, acc_slice)
        m.d.comb += self.control.done.eq(~front_busy & ~back_busy & ~self.info.valid)
        return m

    def _partials_queue(self, m):
        """The PE array's partials through a FIFO; returns its output stream."""
        rows, cols = self.config.rows, self.config.cols
        # a FIFO decouples the array's step enable from the accumulator's hazard checks. Its room is a register
        # worked out a cycle early (at most one write lands in between), so that the array's step ready, and with it
        # the sequencer's whole stall chain, starts at registers, not at the FIFO's level logic
        partials_depth = self.PARTIALS_DEPTH
        m.submodules.partials_fifo = partials_fifo = SyncFIFOBuffered(
            width=partials_layout(rows, cols).size, depth=partials_depth)
        partials_room = Signal()
        m.d.sync += partials_room.eq(partials_fifo.level <= partials_depth - 3)
        m.d.comb += [
            partials_fifo.w_stream.payload.eq(self.partials.payload),
            partials_fifo.w_stream.valid.eq(self.partials.valid & partials_room),
            self.partials.ready.eq(partials_room),
        ]
        partials = stream.Signature(partials_layout(rows, cols)).create(path=("partials_out",))
        wiring.connect(m, partials_fifo.r_stream, wiring.flipped(partials))
        return partials

    def _front(self, m, platform, partials):
        """Integer chunk sums to float32, stalling with the accumulator: each partial beat meets its chunk's info
        beat. Returns the register slice that holds the float32 row (half row) for the accumulator, and whether
        anything is in the front. With ``convert_interval`` 2 a row goes through the converters in two halves,
        each on to the accumulator as it comes out."""
        rows, cols = self.config.rows, self.config.cols
        share = self.config.convert_interval
        lanes = cols // share
        info = self.info.payload
        tag = self._tag_layout()
        # stages=5 registers the operands
        converters = [FixedToFloat(ACC_BITS, stages=5, biased=True) for _ in range(lanes)]
        # a register slice between the converters and the accumulator: the hazard check below decides whether an
        # item enters the accumulator; it does not also decide whether the whole front pipeline advances
        m.submodules.acc_slice = acc_slice = SkidBuffer(data.StructLayout({
            "tag": tag, "values": data.ArrayLayout(FP32.width, lanes)}))
        # the converters' first register stage is a register slice (`acc_in`): the row's A exponent is selected
        # once for all columns, and that selection, fanned out across the die, does not share a cycle with the
        # exponent adders behind it; and the two FIFOs are read on the slice's `ready`, a register, not on the
        # front's `advance` (which runs from the accumulator slice's ready through both FIFOs' level logic). The
        # slice's output register is the stage, so the latency is as if it were a plain register stage
        exp_width = converters[0].exponent_width
        m.submodules.acc_in = acc_in = SkidBuffer(data.StructLayout({
            "tag": tag, "row_ea": EXP, "values": data.ArrayLayout(signed(ACC_BITS), cols),
            "col_eb": data.ArrayLayout(signed(exp_width), cols)}))
        front_tag = data.StructLayout({"tag": tag, "half": range(share)})
        front_ready = Signal()
        front = StallPipeline(m, converters[0].latency, front_ready, tag_shape=front_tag, name="acc_front",
                              platform=platform)
        staged = acc_in.o.payload
        half = Signal(range(share))             # which part of the row enters the converters
        last_half = half == share - 1
        with m.If(front.advance & acc_in.o.valid):
            m.d.sync += half.eq(Mux(last_half, 0, half + 1))
        for j in range(cols):
            # the converter takes its exponent biased: the constant goes into the column's register, so the
            # converter's input register gets one sum (the chunk sum is worth 2 ** (Ea + Eb - 2 * OPERAND_FRAC))
            m.d.comb += [acc_in.i.payload.values[j].eq(partials.payload.data[j]),
                         acc_in.i.payload.col_eb[j].eq(info.eb[j] + (converters[0].exponent_offset
                                                                      - 2 * OPERAND_FRAC))]
        for k, unit in enumerate(converters):
            m.submodules[f"to_float_{k}"] = front.stall(unit)
            column = [k + h * lanes for h in range(share)]
            m.d.comb += [
                unit.value.eq(Array(staged.values[j] for j in column)[half]),
                unit.exponent.eq(staged.row_ea + Array(staged.col_eb[j] for j in column)[half]),
            ]
        last_row = partials.payload.row == rows - 1
        m.d.comb += [
            partials.ready.eq(acc_in.i.ready & self.info.valid),
            acc_in.i.valid.eq(partials.valid & self.info.valid),
            acc_in.i.payload.row_ea.eq(Array(info.ea[i] for i in range(rows))[partials.payload.row]),
            acc_in.i.payload.tag.addr.eq((info.base + partials.payload.row) * share),
            acc_in.i.payload.tag.first.eq(info.first),
            acc_in.i.payload.tag.last.eq(info.last),
            acc_in.i.payload.tag.job_last.eq(info.job_last & last_row),
            self.info.ready.eq(partials.valid & partials.ready & last_row),
            front.in_valid.eq(acc_in.o.valid),
            front.in_tag.tag.eq(staged.tag),
            front.in_tag.half.eq(half),
            acc_in.o.ready.eq(front.advance & last_half),
        ]
        # each part of the row goes on at its own address; the job's last flag with the last part of its row
        out_tag = front.out_tag
        m.d.comb += [
            front_ready.eq(acc_slice.i.ready),
            acc_slice.i.valid.eq(front.out_valid),
            acc_slice.i.payload.tag.eq(out_tag.tag),
            acc_slice.i.payload.tag.addr.eq(out_tag.tag.addr | out_tag.half),
            acc_slice.i.payload.tag.job_last.eq(out_tag.tag.job_last & (out_tag.half == share - 1)),
        ]
        for k, unit in enumerate(converters):
            m.d.comb += acc_slice.i.payload.values[k].eq(unit.result)
        return acc_slice, acc_in.spare_valid | front.out_valid

    def _admit(self, m, acc_slice, valid, tags, back_latency, depth, out_read):
        """Whether the head of ``acc_slice`` enters the back pipeline this cycle (``valid``/``tags``: its slots,
        shifted here); ``depth``: the output FIFO's; ``out_read``: an item leaves it."""
        head = acc_slice.o.payload.tag
        # `hazard`: an item in the back pipeline (not its last stage) still writes the head's address. A register,
        # worked out a cycle ahead for both outcomes (the head stays; the next item becomes the head), so that only
        # the late `admit` picks one: the address compares do not sit in front of `admit`, which enables the wide
        # slice registers
        hazard = Signal()

        def pending(addr):   # items in stages 0 .. back_latency - 2, which move on and still write, at `addr`
            found = Const(0)
            for s in range(back_latency - 1):
                found = found | (valid[s] & ~tags[s].last & (tags[s].addr == addr))
            return found

        def hazard_if_head(tag_):  # `tag_` becomes the head; the present head (if any) moves into stage 0
            return pending(tag_.addr) | (acc_slice.o.valid & ~head.last & (head.addr == tag_.addr))
        hazard_if_stay = pending(head.addr)
        # the next head is the slice's spare item if it holds one, else its input: both checks, then the pick, so
        # that the slice's `spare_valid` is one mux from `hazard`, not in front of the address compares
        hazard_if_next = Mux(acc_slice.spare_valid, hazard_if_head(acc_slice.spare.tag),
                             hazard_if_head(acc_slice.i.payload.tag))
        # outputs admitted and not yet read from the output FIFO (in flight or queued): a counter rather than the
        # FIFO level plus a count over the pipeline slots, so that `admit` is not behind an adder tree. `room` is a
        # register too, so that no path runs from `reserved` through the compare and `admit` back into `hazard`:
        # the count a cycle ago against a threshold one lower, safe as it grows by one a cycle at most
        reserved = Signal(range(depth + 1))
        room = Signal(init=1)
        m.d.sync += room.eq(reserved < depth - 2)
        admit = ~(hazard & ~head.first) & room
        m.d.comb += acc_slice.o.ready.eq(admit)
        m.d.sync += hazard.eq(Mux(~acc_slice.o.valid | admit, hazard_if_next, hazard_if_stay))
        enter = acc_slice.o.valid & admit
        m.d.sync += reserved.eq(reserved + (enter & head.last) - out_read)
        m.d.sync += [valid[0].eq(enter), tags[0].eq(head)]
        for s in range(1, len(valid)):
            m.d.sync += [valid[s].eq(valid[s - 1]), tags[s].eq(tags[s - 1])]
        return enter

    def _back(self, m, acc_slice):
        """Read-add-write on the accumulator memory, free-running; an item (a row, or half a row) enters only if
        no item in flight will still write its address and the output FIFO has a place for it. Last chunks go to
        ``c``, rounded, a row's halves joined. Returns whether anything is in the back or the output FIFO."""
        cfg = self.config
        share = cfg.convert_interval
        cols = cfg.cols // share
        tag = self._tag_layout()
        # stages=8 registers every cut: the operands (the accumulator memory's read data goes straight into a
        # register) and the magnitude comparison apart from the swap it steers
        adders = [FPAdd(FP32, stages=8) for _ in range(cols)]
        rounders = [FPConvert(FP32, BF16) if cfg.out_format == BF16 else None for _ in range(cols)]
        back_latency = 1 + adders[0].latency
        round_latency = rounders[0].latency if rounders[0] else 0
        for j, unit in enumerate(adders):
            m.submodules[f"acc_add_{j}"] = unit
        for j, unit in enumerate(rounders):
            if unit is not None:
                m.submodules[f"out_round_{j}"] = unit

        out_layout = data.StructLayout({"data": data.ArrayLayout(cfg.out_format.width, cols), "last": 1})
        depth = share * 4 + back_latency + round_latency
        m.submodules.out_fifo = out_fifo = SyncFIFOBuffered(width=out_layout.size, depth=depth)
        out_read = out_fifo.r_stream.valid & out_fifo.r_stream.ready
        self._join(m, out_fifo.r_stream, out_layout)

        # in-flight bookkeeping: one slot per cycle of the back pipeline (and of the rounding behind it)
        valid = [Signal(name=f"back_valid_{s}") for s in range(back_latency + round_latency)]
        tags = [Signal(tag, name=f"back_tag_{s}") for s in range(back_latency + round_latency)]
        head = acc_slice.o.payload.tag
        enter = self._admit(m, acc_slice, valid, tags, back_latency, depth, out_read)

        read, write = self._ports
        m.d.comb += [read.addr.eq(head.addr), read.en.eq(1)]
        used = self.used    # the read's data is added (not the first partial of an address)
        m.d.comb += used.eq(enter & ~head.first)
        partial_values = Signal(data.ArrayLayout(FP32.width, cols))   # beside the memory read, one cycle
        m.d.sync += partial_values.eq(acc_slice.o.payload.values)
        for j, unit in enumerate(adders):
            m.d.comb += [
                unit.a.eq(partial_values[j]),
                unit.b.eq(Mux(tags[0].first, 0, read.data[j])),
            ]
        sums_tag = tags[back_latency - 1]
        sums_valid = valid[back_latency - 1]
        m.d.comb += [
            write.addr.eq(sums_tag.addr),
            write.en.eq(sums_valid & ~sums_tag.last),
        ]
        for j, unit in enumerate(adders):
            m.d.comb += write.data[j].eq(unit.result)
            if rounders[j] is not None:
                m.d.comb += rounders[j].a.eq(unit.result)
        out_tag = tags[-1]
        out_valid = valid[-1]
        out_in = data.View(out_layout, out_fifo.w_stream.payload)
        m.d.comb += [out_fifo.w_stream.valid.eq(out_valid & out_tag.last), out_in.last.eq(out_tag.job_last)]
        for j in range(cols):
            result = rounders[j].result if rounders[j] is not None else adders[j].result
            m.d.comb += out_in.data[j].eq(result)
        return acc_slice.o.valid | Cat(*valid).any() | out_fifo.r_stream.valid

    def _join(self, m, parts, layout):
        """The output FIFO's items (``layout``) to ``c``: a row's first half waits in a register for its second."""
        share = self.config.convert_interval
        lanes = self.config.cols // share
        item = data.View(layout, parts.payload)
        c = self.c.payload
        if share == 1:
            m.d.comb += [self.c.valid.eq(parts.valid), parts.ready.eq(self.c.ready), c.eq(item)]
            return
        first = Signal(data.ArrayLayout(self.config.out_format.width, lanes))
        second = Signal()       # the first half is in `first`
        m.d.comb += [self.c.valid.eq(parts.valid & second), parts.ready.eq(~second | self.c.ready),
                     c.last.eq(item.last)]
        for j in range(lanes):
            m.d.comb += [c.data[j].eq(first[j]), c.data[lanes + j].eq(item.data[j])]
        with m.If(parts.valid & parts.ready):
            m.d.sync += second.eq(~second)
            with m.If(~second):
                m.d.sync += first.eq(item.data)
