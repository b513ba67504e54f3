"""NF4 dequantizer IP core, bit-exact with bitsandbytes' ``dequantize_4bit`` (twin: ``golden/nf4_dequant.py``),
and its generalization to codes of 2, 3 and 4 bits with any table of ``2**bits`` levels (twin:
``golden/codebook.py``): the NormalFloat table of the width as constants, or a table loaded with every tensor.

Every weight of a block is ``round_out(fl32(NF4[code] * absmax))``: one of only 16 values per block (4 or 8 with
2- or 3-bit codes: below, 16 stands for the table's ``2**bits`` entries). The core
therefore never multiplies per weight. Per block it builds a 16-entry table of output-format values (16 float32
products, each rounded to float32 and then to the output format, exactly as bitsandbytes rounds twice), and every
lane is a 16-way lookup into that table. Per block that costs 16 products on ``multipliers`` pipelined float32
multipliers, whatever the number of lanes, so the multiplier count only has to keep up with ``blocksize / lanes``
cycles per block.

With double quantization the block absmax is first rebuilt as ``fl32(fl32(code8[q] * absmax2) + offset)``.

Datapath, one stall domain per stage::

    absmax (+ absmax2) -> [scale: ROM, FPMul, FPAdd] -> scale -> [register slice, unless compact]
        -> [table builder: FPMul x M, FPConvert x M] -> table window (current and next block) -> [lane lookups]
        -> weights
"""

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Array, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import BLOCKSIZES, CODE_BITS, DYNAMIC_BLOCKSIZE, DYNAMIC_CODE, MAX_LANES, NF_CODES
from .fp import FORMATS, FP32, FPAdd, FPConvert, FPMul, at_least
from .pipeline import SkidBuffer, StallPipeline, delay_line

__all__ = ["NF4DequantConfig", "NF4Dequantizer", "codes_layout", "weights_layout"]

#: The tables of the "nf" cores, as float32 bit patterns.
_NF_BITS = {bits: code.view(np.uint32).tolist() for bits, code in NF_CODES.items()}
#: Tables a loaded-table core holds at once: the table builder's tensor and the next one taken by the scale stage.
_TABLE_QUEUE = 2
_DYNAMIC_BITS = DYNAMIC_CODE.view(np.uint32).tolist()


@dataclass(frozen=True)
class NF4DequantConfig:
    """Elaboration parameters of :class:`NF4Dequantizer`.

    Parameters
    ----------
    lanes : int
        Weights per cycle, 1 to 16.
    blocksize : int
        NF4 block size: 32, 64, ..., 4096.
    out_dtype : str
        ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    double_quant : bool
        The absmax arrives as uint8 codes with a second-level float32 absmax per 256 blocks and an offset.
    multipliers : int or None
        Table-builder multipliers, a divisor of the table's ``2**bits`` entries; ``None`` picks the fewest that sustain ``lanes`` weights per
        cycle.
    compact : bool
        Fewer pipeline registers in the float units (2 per multiplier and adder, 1 per rounding instead of 7, 8
        and 2) and no register slice after the scale: for small FPGAs at a low clock, such as the iCE40 UP5K,
        where flip-flops are scarce.
        Same results and throughput; the latency per block is shorter.
    bits : int
        Code width: 2, 3 or 4 bits per weight; a table has ``2**bits`` levels.
    table : str
        ``"nf"``: the NormalFloat table of ``bits`` as constants (NF4: bitsandbytes' format exactly). ``"loaded"``:
        the table is data, ``2**bits`` float32 levels in every tensor's header, so each tensor may bring its own.
    """

    lanes: int = 8
    blocksize: int = 64
    out_dtype: str = "bf16"
    double_quant: bool = True
    multipliers: int = None
    compact: bool = False
    bits: int = 4
    table: str = "nf"

    def __post_init__(self):
        if not isinstance(self.lanes, int) or not 1 <= self.lanes <= MAX_LANES:
            raise ValueError(f"lanes must be an integer from 1 to {MAX_LANES}, not {self.lanes!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {self.blocksize!r}")
        if self.out_dtype not in FORMATS:
            raise ValueError(f"out_dtype must be one of {sorted(FORMATS)}, not {self.out_dtype!r}")
        if isinstance(self.bits, bool) or self.bits not in CODE_BITS:
            raise ValueError(f"bits must be one of {CODE_BITS}, not {self.bits!r}")
        if self.table not in ("nf", "loaded"):
            raise ValueError(f"table must be 'nf' or 'loaded', not {self.table!r}")
        divisors = [d for d in (1, 2, 4, 8, 16) if d <= self.entries]
        if self.multipliers is not None and self.multipliers not in divisors:
            raise ValueError(f"multipliers must divide the table's {self.entries} entries "
                             f"({', '.join(map(str, divisors))}), not {self.multipliers!r}")

    @property
    def entries(self):
        """Levels in the table: ``2**bits``."""
        return 1 << self.bits

    @property
    def fp_stages(self):
        """Pipeline stages of the float units: ``(multiplier, adder, rounding)``."""
        return (2, 2, 1) if self.compact else (7, 8, 2)

    @property
    def out_format(self):
        return FORMATS[self.out_dtype]

    @property
    def table_multipliers(self):
        """Multipliers in the table builder: ``entries`` products every ``entries / multipliers`` cycles."""
        if self.multipliers is not None:
            return self.multipliers
        cycles_per_block = self.blocksize // self.lanes  # floor: a block may take a fraction of a cycle more
        return self.entries // max(r for r in (1, 2, 4, 8, 16)
                                   if r <= max(1, cycles_per_block) and r <= self.entries)


def codes_layout(lanes, bits=4):
    """Payload of the ``codes`` stream: ``lanes`` codes of ``bits`` bits in weight order (element 0 is the first
    weight)."""
    return data.ArrayLayout(bits, lanes)


def weights_layout(fmt, lanes):
    """Payload of the ``weights`` stream: ``lanes`` packed values of ``fmt`` and ``last`` on a tensor's final beat.
    Lanes past the end of the tensor on the final beat carry don't-care values."""
    return data.StructLayout({"data": data.ArrayLayout(fmt.width, lanes), "last": 1})


def tensor_layout(double_quant, entries=None):
    """Payload of the ``tensor`` stream: one beat per tensor, ahead of (or with) its first inputs; with a loaded
    table (``entries`` levels) also the table, float32 bit patterns in code order; with double quantization, last,
    ``absmax2_per_block``: every block of the tensor takes its own ``absmax2`` beat (a span of a larger tensor,
    whose blocks lie in that tensor's groups of 256)."""
    fields = {"n_weights": 32}
    if double_quant:
        fields["offset"] = 32
    if entries:
        fields["levels"] = data.ArrayLayout(32, entries)
    if double_quant:
        fields["absmax2_per_block"] = 1
    return data.StructLayout(fields)


class NF4Dequantizer(wiring.Component):
    """Streaming NF4 dequantizer: ``lanes`` weights per cycle, fully pipelined.

    A tensor is announced by one ``tensor`` beat (its weight count ``n``, with double quantization its float32
    offset, with a loaded table its levels), then arrives as ``ceil(n / lanes)`` beats of codes (the final beat
    padded) and
    ``ceil(n / blocksize)`` absmax values; with double quantization also one ``absmax2`` per 256 absmax codes.
    Tensors follow each other back to back: each stage takes the next tensor's header when it is done with the
    current one, so nothing drains between tensors.

    Parameters
    ----------
    config : NF4DequantConfig

    Attributes
    ----------
    tensor : In(stream of :func:`tensor_layout`)
        Per-tensor header: ``n_weights`` (at least 1), with double quantization ``offset`` (float32 bits) and
        ``absmax2_per_block``, with a loaded table ``levels`` (``2**bits`` float32 bit patterns, code 0 first).
    codes : In(stream of :func:`codes_layout`)
        Codes of ``bits`` bits, ``lanes`` per beat.
    absmax : In(stream of unsigned(32) or unsigned(8))
        Per-block float32 absmax bits, or its uint8 code when double-quantized.
    absmax2 : In(stream of unsigned(32)), double quantization only
        Second-level float32 absmax, one per 256 blocks of a tensor (the last group may be shorter), or one per
        block when the tensor's header sets ``absmax2_per_block``.
    weights : Out(stream of :func:`weights_layout`)
        Dequantized weights, ``lanes`` per beat, in the configured output format; ``last`` marks the final beat
        of each tensor.
    """

    def __init__(self, config=NF4DequantConfig()):
        if not isinstance(config, NF4DequantConfig):
            raise TypeError(f"config must be an NF4DequantConfig, not {config!r}")
        self.config = config
        self._loaded_entries = config.entries if config.table == "loaded" else None
        members = {
            "tensor": In(stream.Signature(tensor_layout(config.double_quant, self._loaded_entries))),
            "codes": In(stream.Signature(codes_layout(config.lanes, config.bits))),
            "absmax": In(stream.Signature(8 if config.double_quant else 32)),
            "weights": Out(stream.Signature(weights_layout(config.out_format, config.lanes))),
        }
        if config.double_quant:
            members["absmax2"] = In(stream.Signature(32))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        # every block's scale and table carry the weight count of their tensor, for the lookup's beat counter
        scale_layout = data.StructLayout({"value": 32, "count": self._count_layout, "last_block": 1})
        scale = stream.Signature(scale_layout).create(path=("scale",))
        table = stream.Signature(self._table_layout()).create(path=("table",))
        levels = None
        if self._loaded_entries:
            # each tensor's table waits here from its header until the table builder is done with its last block
            m.submodules.tables = tables = SyncFIFOBuffered(width=32 * self.config.entries, depth=_TABLE_QUEUE)
            levels = tables
        self._elaborate_scale(m, platform, scale, levels)
        if not self.config.compact:
            # a register slice between the two pipelines: the table builder's advance (its round counter, the
            # table slot) does not reach the scale pipeline's enable, its code-book read and the absmax handshake
            # in one cycle (the compact core is for small devices at low clock rates, and has no room for it)
            m.submodules.scale_slice = scale_slice = SkidBuffer(scale_layout)
            wiring.connect(m, scale, scale_slice.i)
            scale = scale_slice.o
        self._elaborate_builder(m, platform, scale, table, levels)
        self._elaborate_lookup(m, table)
        return m

    # the weight count of a tensor, and whether it fits in one beat (precomputed off the lookup's critical path)
    _count_layout = data.StructLayout({"n_weights": 32, "one_beat": 1})

    def _table_layout(self):
        return data.StructLayout({"levels": data.ArrayLayout(self.config.out_format.width, self.config.entries),
                                  "count": self._count_layout})

    def _elaborate_scale(self, m, platform, scale, tables):
        """Per-block float32 absmax: passed through, or rebuilt from double quantization; a loaded table goes to
        the ``tables`` queue as its header is taken."""
        dq = self.config.double_quant
        shift = self.config.blocksize.bit_length() - 1
        if dq:
            mul_stages, add_stages, _ = self.config.fp_stages
            multiply, add = FPMul(FP32, FP32, FP32, stages=mul_stages), FPAdd(FP32, stages=add_stages)
            # 2: the code-book read, then a register, because block RAM clock-to-out is slow on ECP5
            latency = 2 + multiply.latency + add.latency
            tag = data.StructLayout({"count": self._count_layout, "last_block": 1})
        else:
            latency = 1  # a register slice, so that scale.valid does not depend on scale.ready
            tag = data.StructLayout({"count": self._count_layout, "last_block": 1, "value": 32})
        pipe = StallPipeline(m, latency, scale.ready, tag_shape=tag, name="scale", platform=platform)

        # the current tensor: its header, and the blocks still to come
        active = Signal()
        header = Signal(tensor_layout(dq))
        blocks_left = Signal(32)
        tensor_done = Signal()  # this block is the tensor's last: a register, to keep compares off `issue`
        with m.If(~active):
            m.d.comb += self.tensor.ready.eq(1 if tables is None else tables.w_stream.ready)
            with m.If(self.tensor.valid & self.tensor.ready):
                blocks = (self.tensor.payload.n_weights + self.config.blocksize - 1) >> shift
                # field by field: a loaded table's levels stay in the tables queue, not here
                m.d.sync += [active.eq(1), blocks_left.eq(blocks), tensor_done.eq(blocks == 1)]
                m.d.sync += [getattr(header, name).eq(getattr(self.tensor.payload, name))
                             for name, _ in header.shape()]

        issue = Signal()
        group_index = Signal(range(DYNAMIC_BLOCKSIZE))
        absmax2, absmax2_valid = Signal(32), Signal()
        ready = active & pipe.advance & (absmax2_valid if dq else 1)
        m.d.comb += [
            self.absmax.ready.eq(ready),
            issue.eq(self.absmax.valid & ready),
            pipe.in_valid.eq(issue),
            pipe.in_tag.count.n_weights.eq(header.n_weights),
            pipe.in_tag.count.one_beat.eq(header.n_weights <= self.config.lanes),
            pipe.in_tag.last_block.eq(tensor_done),
        ]
        if tables is not None:
            m.d.comb += [
                tables.w_stream.valid.eq(~active & self.tensor.valid),
                tables.w_stream.payload.eq(self.tensor.payload.levels),
            ]
        with m.If(issue):
            m.d.sync += [blocks_left.eq(blocks_left - 1), group_index.eq(group_index + 1),
                         tensor_done.eq(blocks_left == 2)]
            with m.If(tensor_done):
                m.d.sync += [active.eq(0), group_index.eq(0)]
        m.d.comb += [
            scale.valid.eq(pipe.out_valid),
            scale.payload.count.eq(pipe.out_tag.count),
            scale.payload.last_block.eq(pipe.out_tag.last_block),
        ]
        if not dq:
            m.d.comb += [pipe.in_tag.value.eq(self.absmax.payload), scale.payload.value.eq(pipe.out_tag.value)]
            return

        # absmax2 is held for 256 blocks, or until the tensor's last block; for one block of a span
        m.d.comb += self.absmax2.ready.eq(~absmax2_valid)
        with m.If(self.absmax2.valid & self.absmax2.ready):
            m.d.sync += [absmax2.eq(self.absmax2.payload), absmax2_valid.eq(1)]
        with m.If(issue & (tensor_done | header.absmax2_per_block | (group_index == DYNAMIC_BLOCKSIZE - 1))):
            m.d.sync += absmax2_valid.eq(0)

        # code8 -> float32 level: a 256-entry ROM with a registered read, which maps to block RAM
        m.submodules.dynamic_levels = levels = Memory(shape=32, depth=256, init=_DYNAMIC_BITS)
        m.submodules.scale_mul = pipe.stall(multiply)
        m.submodules.scale_add = pipe.stall(add)
        level = levels.read_port(domain="sync")
        m.d.comb += [level.addr.eq(self.absmax.payload), level.en.eq(pipe.advance)]
        # the operands ride beside the code-book read and its output register
        absmax2_held, offset_held = Signal(32), Signal(32)
        level_reg, absmax2_reg, offset_reg = Signal(32), Signal(32), Signal(32)
        with m.If(pipe.enable):
            m.d.sync += [
                absmax2_held.eq(absmax2), offset_held.eq(header.offset),
                level_reg.eq(level.data), absmax2_reg.eq(absmax2_held), offset_reg.eq(offset_held),
            ]
        offset_late = Signal(32)  # the offset, delayed to meet the product at the adder
        m.d.comb += [
            multiply.a.eq(level_reg),
            multiply.b.eq(absmax2_reg),
            add.a.eq(multiply.result),
            add.b.eq(offset_late),
            scale.payload.value.eq(add.result),
        ]
        m.d.comb += offset_late.eq(delay_line(m, pipe.enable, offset_reg, multiply.latency, "offset"))

    def _elaborate_builder(self, m, platform, scale, table, tables):
        """``entries`` output-format values per block, ``multipliers`` products per cycle; the levels are constants,
        or the head of the ``tables`` queue, which the tensor's last block releases."""
        fmt = self.config.out_format
        entries = self.config.entries
        mults = self.config.table_multipliers
        rounds = entries // mults
        # stages=6 registers the operands too: the level mux must not sit in front of the DSPs; stages=7 adds a
        # fabric register behind each DSP block, whose route to the adders would otherwise take most of a cycle
        mul_stages, _, round_stages = self.config.fp_stages
        multipliers = [FPMul(FP32, FP32, FP32, stages=mul_stages) for _ in range(mults)]
        # two stages: fp32 -> fp16 rounding (subnormal shifts) is too long for one cycle on the ECP5
        converters = [FPConvert(FP32, fmt, stages=round_stages) if fmt != FP32 else None for _ in range(mults)]
        latency = multipliers[0].latency + (converters[0].latency if converters[0] else 0)

        table_valid = Signal()
        table_payload = Signal(self._table_layout())
        tag = data.StructLayout({"round": range(rounds), "count": self._count_layout})
        pipe = StallPipeline(m, latency, ~table_valid | table.ready, tag_shape=tag, name="build",
                             platform=platform)
        round_index = Signal(range(rounds))
        # a block is issued only with its table present (always, for constants)
        has_table = 1 if tables is None else tables.r_stream.valid
        issue = Signal()
        m.d.comb += [
            issue.eq(scale.valid & has_table & pipe.advance),
            pipe.in_valid.eq(scale.valid & has_table),
            pipe.in_tag.round.eq(round_index),
            pipe.in_tag.count.eq(scale.payload.count),
            scale.ready.eq(pipe.advance & has_table & (round_index == rounds - 1)),
        ]
        with m.If(issue):
            m.d.sync += round_index.eq(Mux(round_index == rounds - 1, 0, round_index + 1))
        if tables is not None:
            # the products read the queue's head; the tensor's last block releases it with its last round
            loaded = data.View(data.ArrayLayout(32, entries), tables.r_stream.payload)
            m.d.comb += tables.r_stream.ready.eq(issue & (round_index == rounds - 1) & scale.payload.last_block)

        results = []
        for lane, (multiply, convert) in enumerate(zip(multipliers, converters)):
            m.submodules[f"level_mul_{lane}"] = pipe.stall(multiply)
            # multiplier `lane` computes entries lane, lane + mults, lane + 2 * mults, ... in successive rounds
            if tables is None:
                levels = Array(Const(_NF_BITS[self.config.bits][r * mults + lane], 32) for r in range(rounds))
            else:
                levels = Array(loaded[r * mults + lane] for r in range(rounds))
            m.d.comb += [multiply.a.eq(levels[round_index]), multiply.b.eq(scale.payload.value)]
            if convert is None:
                results.append(multiply.result)
            else:
                m.submodules[f"level_round_{lane}"] = pipe.stall(convert)
                m.d.comb += convert.a.eq(multiply.result)
                results.append(convert.result)

        # rounds arrive in order; the last one completes the table
        partial = Signal(data.ArrayLayout(fmt.width, entries))
        complete = Signal(data.ArrayLayout(fmt.width, entries))
        for entry in range(entries):
            r, lane = divmod(entry, mults)
            if r == rounds - 1:
                m.d.comb += complete[entry].eq(results[lane])
            else:
                m.d.comb += complete[entry].eq(partial[entry])
                with m.If(pipe.advance & pipe.out_valid & (pipe.out_tag.round == r)):
                    m.d.sync += partial[entry].eq(results[lane])
        # pipe.advance implies the table slot is free or being drained
        with m.If(table.valid & table.ready):
            m.d.sync += table_valid.eq(0)
        with m.If(pipe.advance & pipe.out_valid & (pipe.out_tag.round == rounds - 1)):
            m.d.sync += [table_valid.eq(1), table_payload.levels.eq(complete),
                         table_payload.count.eq(pipe.out_tag.count)]
        m.d.comb += [table.valid.eq(table_valid), table.payload.eq(table_payload)]

    def _elaborate_lookup(self, m, table):
        """A window of two tables (this block, next block) and ``lanes`` ``entries``-way lookups."""
        lanes, blocksize = self.config.lanes, self.config.blocksize
        straddles = blocksize % lanes != 0  # a beat may hold weights of two blocks

        # The window is two table slots and a pointer to the current block's: a finished block flips the pointer, so
        # the handshake (`fire`) reaches the pointer and the valid flags, not the enables of a whole table; a table
        # from the builder goes to the slot that is free at the start of the cycle.
        slots = [Signal(self._table_layout(), name=f"table_{i}") for i in range(2)]
        head = Signal()

        def slot(select):
            return data.View(self._table_layout(), Mux(select, slots[1].as_value(), slots[0].as_value()))
        current = slot(head)
        current_valid, following_valid = Signal(), Signal()

        # Beat bookkeeping. The flags that gate `codes.ready` (last beat, block crossed, next table needed) are
        # registers computed one beat ahead, so no 32-bit compare sits between the counters and the table window.
        offset = Signal(range(blocksize))           # position of lane 0 in its block
        remaining = Signal(32)                      # weights left in the tensor, from this beat on
        fresh = Signal(init=1)                      # no beat of the current tensor taken yet
        last_r, crossed_r, needs_next_r = Signal(), Signal(), Signal()
        # a tensor's first beat starts a block at offset 0: it crosses no boundary and needs no next table
        last = Mux(fresh, current.count.one_beat, last_r)
        crossed = ~fresh & crossed_r
        needs_next = (~fresh & needs_next_r) if straddles else Const(0)

        left = Mux(fresh, current.count.n_weights, remaining)
        left_next = left - lanes
        offset_next = Mux(crossed, offset + lanes - blocksize, offset + lanes)
        # left_next <= lanes, as a comparison of `left` with a constant: gates, not a second carry chain behind the
        # subtraction
        last_next = ~at_least(left, 2 * lanes + 1)
        filled_next = Mux(last_next, left_next[:lanes.bit_length()], lanes)  # weights of the next beat that belong to the tensor
        update = [
            remaining.eq(left_next),
            offset.eq(offset_next),
            last_r.eq(last_next),
            crossed_r.eq(offset_next + lanes >= blocksize),
            needs_next_r.eq(offset_next + filled_next > blocksize),
        ]

        out_free = ~self.weights.valid | self.weights.ready
        fire = Signal()
        m.d.comb += [
            self.codes.ready.eq(current_valid & (following_valid | ~needs_next) & out_free),
            fire.eq(self.codes.valid & self.codes.ready),
        ]

        with m.If(fire):
            m.d.sync += [self.weights.valid.eq(1), self.weights.payload.last.eq(last), fresh.eq(last)]
            with m.If(last):
                m.d.sync += offset.eq(0)
            with m.Else():
                m.d.sync += update
            for lane in range(lanes):
                source = slot(head ^ (offset + lane >= blocksize)).levels if straddles else current.levels
                m.d.sync += self.weights.payload.data[lane].eq(
                    Array(source[k] for k in range(self.config.entries))[self.codes.payload[lane]])
        with m.Elif(self.weights.ready):
            m.d.sync += self.weights.valid.eq(0)

        # consume the tables this beat finished, then refill from the builder into the first free slot
        consume_two = fire & needs_next & last
        consume_one = fire & ~consume_two & (crossed | last)
        current_after = Mux(consume_two, 0, Mux(consume_one, following_valid, current_valid))
        following_after = Mux(consume_two | consume_one, 0, following_valid)
        m.d.comb += table.ready.eq(~current_valid | ~following_valid)
        with m.If(consume_one):
            m.d.sync += head.eq(~head)
        m.d.sync += [current_valid.eq(current_after), following_valid.eq(following_after)]
        with m.If(table.valid & table.ready):
            # the free slot: the current one if empty (then nothing fires), else the following one (then the
            # current may finish this cycle, and the table becomes current)
            for i, free in enumerate(slots):
                with m.If((head ^ current_valid) == i):
                    m.d.sync += free.eq(table.payload)
            with m.If(~current_after):
                m.d.sync += current_valid.eq(1)
            with m.Else():
                m.d.sync += following_valid.eq(1)
