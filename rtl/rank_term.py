"""A LoRA projection's rank-r term added to the base product's outputs, a block at a time (twin:
``golden/rank_term.py``): ``y = bf16(yb + s * hb B^T)`` forward, ``dx = bf16(dxb + s * gb A)`` backward.

In the blocked step (``rtl/blocked.py``) the engine's accumulator gives a block's base outputs (float32) only
after the block's last span; the memory-fed step stores the whole rank-r product as a float32 tensor instead (up
to 2.9 MB at gate_proj's T = 128) and adds it from there. Here the term of each output is computed as it passes:
per block the unit holds the block's ``tokens`` rows of hb (or gb) and its ``columns`` columns of B (or A), each
one chunk of ``r <= 16`` values aligned to its shared exponent as the engine aligns them (``rtl/bfp.py``); per
output one chunk sum of ``r`` products (``r`` multipliers, one output per cycle), its conversion to float32, the
multiply by ``s``, the add of the base output and the rounding to bf16, which are the step's arithmetic
(:func:`edge_qlora.golden.lora.step_model`) bit for bit.
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import ACC_BITS, BF16, FP32, MAX_LANES, MAX_RANK, OPERAND_BITS, OPERAND_FRAC
from .bfp import EXPONENT_SHAPE, AlignLanes, max_exponent
from .fp import FixedToFloat, FPAdd, FPConvert, FPMul, ecp5_registered_product
from .pipeline import StallPipeline, delay_line, is_ecp5

__all__ = ["RankTermConfig", "block_layout", "operand_layout", "RankTerm"]


@dataclass(frozen=True)
class RankTermConfig:
    """Elaboration parameters of :class:`RankTerm`.

    Parameters
    ----------
    rows, cols : int
        The GEMM engine's array: outputs come in beats of ``cols`` values, a transposed block's in tiles of
        ``rows`` token rows.
    rank : int
        ``r``, 1 to 16: the term is one chunk of the engine.
    max_tokens, max_columns : int
        The largest block: token rows (a multiple of ``rows``) and output columns (a multiple of ``cols``).
    rows_table_ram : str
        Where the rows' table goes: ``"distributed"`` (LUT RAM: a block's 128 rows of 16 aligned operands are
        38 kbit, which would take nine 36-bit wide block RAMs for a fraction of their depth) or ``"block"``.
    """

    rows: int = 8
    cols: int = 8
    rank: int = 16
    max_tokens: int = 128
    max_columns: int = 472
    rows_table_ram: str = "distributed"

    def __post_init__(self):
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_LANES or value & (value - 1):
                raise ValueError(f"{name} must be a power of two from 1 to {MAX_LANES}, not {value!r}")
        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be an integer from 1 to {MAX_RANK} (one chunk), not {self.rank!r}")
        for name, unit in (("max_tokens", "rows"), ("max_columns", "cols")):
            value, step = getattr(self, name), getattr(self, unit)
            if not _is_int(value) or not step <= value <= 1 << 15 or value % step:
                raise ValueError(f"{name} must be a multiple of {unit} ({step}) up to 32768, not {value!r}")
        if self.rows_table_ram not in ("distributed", "block"):
            raise ValueError(f"rows_table_ram must be 'distributed' or 'block', not {self.rows_table_ram!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def block_layout(config):
    """One block: its shape, whether it is transposed (backward), which tables it loads first, the exponent a
    backward block's columns share (A's rows' over all of A) and the scaling ``s`` (float32)."""
    return data.StructLayout({
        "tokens": range(config.max_tokens + 1), "columns": range(config.max_columns + 1),
        "transposed": 1, "load_rows": 1, "load_columns": 1,
        "exponent": EXPONENT_SHAPE, "scaling": FP32.width,
    })


def operand_layout(config):
    """A table entry: one row's (or column's) ``rank`` operands aligned to their shared exponent."""
    return data.StructLayout({"q": data.ArrayLayout(signed(OPERAND_BITS), config.rank), "exponent": EXPONENT_SHAPE})


class _State(enum.Enum, shape=2):
    IDLE = 0     # waiting for a block (and for the previous block's outputs to leave the arithmetic)
    LOAD = 1     # the block's tables: its rows, then its columns
    RUN = 2      # its output beats


class RankTerm(wiring.Component):
    """``bf16(c + s * (row . column))`` for each output of a block of the base product, beat by beat.

    Per block: one ``block`` beat; if ``load_rows``, ``tokens`` beats of ``row_operands`` (each token row's
    ``rank`` bf16 values of hb or gb); if ``load_columns``, ``columns`` beats of ``column_operands``: forward each
    output column's ``rank`` values (a row of B), transposed the block's columns of A as A holds them, row by row,
    ``rank`` columns a beat (``columns`` a multiple of ``rank``; each beat is written a column a cycle into the
    lane of its row, so A needs no corner turn on the way in); then the block's
    ``tokens * columns / cols`` beats of ``c`` (``cols`` float32 base outputs of one token row) in the engine's
    order, each of which leaves on ``o`` as ``cols`` bf16 outputs. Forward the order is column tile by column tile,
    the block's token rows in order within each (the engine's forward block job); transposed, token tile
    (``rows`` rows) by token tile, column tile by column tile within one, the tile's rows within that. A block
    that loads no table uses the last one loaded (the forward step loads hb once per token block). The columns
    load first, then the rows (which the step makes as the token block's activation passes, after the columns'
    reads).

    Rows are aligned to their own largest exponent, forward columns too; a transposed block's columns to the
    block's ``exponent``, which must be at least each of their exponents (the engine shares one over all of A's
    columns, :func:`~edge_qlora.golden.rank_term.column_exponent`). Operands must be finite (as the engine's);
    ``c`` and ``s`` may be anything, infinities and NaNs go through the float32 arithmetic.

    One output enters the arithmetic per cycle: a beat takes ``cols`` cycles, as many as the engine's 8x8 array
    takes per beat of a forward block's last span, so a forward block's outputs leave at the engine's pace; a
    transposed block's outputs all come at its end, and the unit passes them at this pace behind the engine.

    Parameters
    ----------
    config : RankTermConfig

    Attributes
    ----------
    block : In(stream of :func:`block_layout`)
    row_operands, column_operands : In(stream of ArrayLayout(BF16.width, rank))
    c : In(stream of ArrayLayout(FP32.width, cols))
    o : Out(stream of ArrayLayout(BF16.width, cols))
    rows_table : Memory of :func:`operand_layout`
    columns_table, column_exponents : Memory of ``rank`` aligned operands, Memory of their exponent (forward)
    latency : int
        Cycles from an output's entry into the arithmetic to its rounded value.
    """

    def __init__(self, config=RankTermConfig()):
        if not isinstance(config, RankTermConfig):
            raise TypeError(f"config must be a RankTermConfig, not {config!r}")
        self.config = config
        operands = stream.Signature(data.ArrayLayout(BF16.width, config.rank))
        super().__init__({
            "block": In(stream.Signature(block_layout(config))),
            "row_operands": In(operands), "column_operands": In(operands),
            "c": In(stream.Signature(data.ArrayLayout(FP32.width, config.cols))),
            "o": Out(stream.Signature(data.ArrayLayout(BF16.width, config.cols))),
        })
        entry = operand_layout(config)
        self.rows_table = Memory(shape=entry, depth=config.max_tokens, init=[],
                                 attrs={"ram_style": config.rows_table_ram})
        self.columns_table = Memory(shape=data.ArrayLayout(signed(OPERAND_BITS), config.rank),
                                    depth=config.max_columns, init=[])
        self.column_exponents = Memory(shape=EXPONENT_SHAPE, depth=config.max_columns, init=[])
        self._convert = FixedToFloat(ACC_BITS, stages=4)
        self._scale = FPMul(FP32, FP32, FP32, stages=6)
        self._add = FPAdd(FP32)
        self._round = FPConvert(FP32, BF16, stages=1)
        # the table read, the products' two registers, the adder tree's two
        self._ahead = 5
        self.latency = self._ahead + sum(unit.latency for unit in (self._convert, self._scale, self._add, self._round))

    def _loader(self, m, block, state):
        """The tables' loads: each operand beat's shared exponent (its own largest, or a transposed block's given
        one for its columns), its values aligned to it, written at the next free entry; a transposed block's
        column beat (``rank`` columns of one row of A) is written one column a cycle, into its row's lane. Returns
        whether a load is still in flight."""
        cfg = self.config
        for name in ("rows_table", "columns_table", "column_exponents"):
            m.submodules[name] = getattr(self, name)
        rows_left = Signal(range(cfg.max_tokens + 1))
        columns_left = Signal(range(cfg.max_columns + 1))
        with m.If(self.block.valid & self.block.ready):
            m.d.sync += [rows_left.eq(Mux(self.block.payload.load_rows, self.block.payload.tokens, 0)),
                         columns_left.eq(Mux(self.block.payload.load_columns, self.block.payload.columns, 0))]
        loading = state == _State.LOAD
        in_flight, scattering = Signal(), Signal()
        # the columns first (the rows may be made by the step as the block's activation passes, after B's or A's
        # reads); a transposed column beat waits until the one before is scattered (a beat every rank + 5 cycles)
        m.d.comb += [self.row_operands.ready.eq(loading & (columns_left == 0) & (rows_left != 0)),
                     self.column_operands.ready.eq(loading & (columns_left != 0)
                                                   & ~(block.transposed & (in_flight | scattering)))]
        take_row = self.row_operands.valid & self.row_operands.ready
        take_column = self.column_operands.valid & self.column_operands.ready
        with m.If(take_row):
            m.d.sync += rows_left.eq(rows_left - 1)
        with m.If(take_column):
            m.d.sync += columns_left.eq(columns_left - 1)

        # three registered steps: the beat, its shared exponent, then the alignment (three cuts)
        entry = Signal(range(max(cfg.max_tokens, cfg.max_columns)))
        with m.If(take_row | take_column):
            m.d.sync += entry.eq(entry + 1)
        with m.If(self.block.valid & self.block.ready):
            m.d.sync += entry.eq(0)
        with m.If(take_column & (columns_left == 1)):
            m.d.sync += entry.eq(0)
        beat = Signal(data.ArrayLayout(BF16.width, cfg.rank))
        valid, to_rows, address, given = Signal(), Signal(), Signal.like(entry), Signal()
        m.d.sync += [valid.eq(take_row | take_column), to_rows.eq(take_row), address.eq(entry),
                     beat.eq(Mux(take_row, self.row_operands.payload, self.column_operands.payload)),
                     given.eq(take_column & block.transposed)]
        shared = Signal(EXPONENT_SHAPE)
        values = Signal.like(beat)
        m.d.sync += [shared.eq(Mux(given, block.exponent, max_exponent(m, list(beat), "operand_max"))),
                     values.eq(beat)]
        m.submodules.align = align = AlignLanes(cfg.rank, stages=3)
        m.d.comb += [align.values.eq(values), align.shared.eq(shared)]
        # the beat's valid bit, destination and entry travel beside the alignment
        steps = 1 + align.latency
        chain = [valid]
        for k in range(steps):
            chain.append(Signal(name=f"load_valid_{k}"))
            m.d.sync += chain[-1].eq(chain[-2])
        to_rows_out = delay_line(m, 1, to_rows, steps, "load_to_rows")
        address_out = delay_line(m, 1, address, steps, "load_address")
        exponent_out = delay_line(m, 1, shared, align.latency, "load_exponent")
        m.d.comb += in_flight.eq(Cat(*chain).any())
        done = chain[-1]

        rows = self.rows_table.write_port()
        m.d.comb += [rows.addr.eq(address_out), rows.en.eq(done & to_rows_out), rows.data.q.eq(align.q),
                     rows.data.exponent.eq(exponent_out)]
        exponents = self.column_exponents.write_port()
        m.d.comb += [exponents.addr.eq(address_out), exponents.data.eq(exponent_out),
                     exponents.en.eq(done & ~to_rows_out & ~block.transposed)]
        # transposed: the aligned beat is held and written a column a cycle, at lane `lane` (A's row) of entries
        # `first`.. (the beat's columns); forward: the whole entry at once
        held = Signal.like(align.q)
        first, offset = Signal(range(cfg.max_columns)), Signal(range(cfg.rank))
        lane = Signal(range(cfg.rank))
        with m.If(self.block.valid & self.block.ready):
            m.d.sync += [first.eq(0), lane.eq(0)]
        with m.If(done & ~to_rows_out & block.transposed):
            m.d.sync += [held.eq(align.q), scattering.eq(1), offset.eq(0)]
        with m.If(scattering):
            m.d.sync += offset.eq(offset + 1)
            with m.If(offset == cfg.rank - 1):
                m.d.sync += scattering.eq(0)
                with m.If(first + cfg.rank == block.columns):
                    m.d.sync += [first.eq(0), lane.eq(lane + 1)]
                with m.Else():
                    m.d.sync += first.eq(first + cfg.rank)
        columns = self.columns_table.write_port(granularity=1)
        with m.If(scattering):
            m.d.comb += [columns.addr.eq(first + offset), columns.en.eq(1 << lane)]
            for k in range(cfg.rank):
                m.d.comb += columns.data[k].eq(held[offset])
        with m.Else():
            m.d.comb += [columns.addr.eq(address_out), columns.data.eq(align.q),
                         columns.en.eq(Mux(done & ~to_rows_out & ~block.transposed, (1 << cfg.rank) - 1, 0))]
        busy = Signal()
        m.d.comb += busy.eq(in_flight | scattering)
        return busy

    def elaborate(self, platform):
        cfg = self.config
        m = Module()
        state = Signal(_State)
        block = Signal(block_layout(cfg))
        out_full, out_ready = Signal(), Signal()
        pipe = StallPipeline(m, self.latency, out_ready, tag_shape=range(cfg.cols), name="term", platform=platform)
        outputs_in_flight = Signal(range(self.latency + 2))
        entering = pipe.in_valid & pipe.advance
        leaving = pipe.out_valid & out_ready
        m.d.sync += outputs_in_flight.eq(outputs_in_flight + entering - leaving)

        m.d.comb += self.block.ready.eq((state == _State.IDLE) & (outputs_in_flight == 0))
        with m.If(self.block.valid & self.block.ready):
            m.d.sync += [block.eq(self.block.payload), state.eq(_State.LOAD)]
        loads_in_flight = self._loader(m, block, state)

        # the walk of the block's beats: token tile by token tile (forward one of all the block's rows), column
        # tile by column tile, the tile's rows in order
        tile_rows = Signal(range(cfg.max_tokens + 1))
        tile_base, row_in_tile = Signal(range(cfg.max_tokens)), Signal(range(cfg.max_tokens))
        column_base = Signal(range(cfg.max_columns))
        beats_left = Signal(range(cfg.max_tokens * cfg.max_columns // cfg.cols + 1))
        with m.If((state == _State.LOAD) & ~self.row_operands.ready & ~self.column_operands.ready
                  & ~loads_in_flight):
            m.d.sync += [state.eq(_State.RUN), tile_base.eq(0), row_in_tile.eq(0), column_base.eq(0),
                         tile_rows.eq(Mux(block.transposed, cfg.rows, block.tokens)),
                         beats_left.eq((block.tokens * block.columns) >> (cfg.cols.bit_length() - 1))]

        # the beat being fed, one output a cycle; the next beat is taken as its last output enters
        held = Signal(data.ArrayLayout(FP32.width, cfg.cols))
        held_valid = Signal()
        held_row, held_column = Signal.like(tile_base), Signal.like(column_base)
        lane = Signal(range(cfg.cols))
        beat_done = entering & (lane == cfg.cols - 1)
        m.d.comb += [pipe.in_valid.eq(held_valid), pipe.in_tag.eq(lane),
                     self.c.ready.eq((state == _State.RUN) & (beats_left != 0) & (~held_valid | beat_done))]
        with m.If(entering):
            m.d.sync += lane.eq(Mux(lane == cfg.cols - 1, 0, lane + 1))
        with m.If(beat_done):
            m.d.sync += held_valid.eq(0)
        with m.If(self.c.valid & self.c.ready):
            m.d.sync += [held.eq(self.c.payload), held_valid.eq(1), held_row.eq(tile_base + row_in_tile),
                         held_column.eq(column_base), beats_left.eq(beats_left - 1)]
            last_row, last_column = row_in_tile == tile_rows - 1, column_base + cfg.cols == block.columns
            m.d.sync += row_in_tile.eq(Mux(last_row, 0, row_in_tile + 1))
            with m.If(last_row):
                m.d.sync += column_base.eq(Mux(last_column, 0, column_base + cfg.cols))
                with m.If(last_column):
                    m.d.sync += tile_base.eq(tile_base + tile_rows)
        with m.If((state == _State.RUN) & (beats_left == 0) & ~held_valid):
            m.d.sync += state.eq(_State.IDLE)

        self._arithmetic(m, platform, pipe, held[lane], held_row, held_column + lane, block)

        # rounded outputs gather into the beat, which leaves when its last output is in
        gathered = Signal(data.ArrayLayout(BF16.width, cfg.cols))
        m.d.comb += [out_ready.eq(~out_full | self.o.ready), self.o.valid.eq(out_full), self.o.payload.eq(gathered)]
        with m.If(out_full & self.o.ready):
            m.d.sync += out_full.eq(0)
        with m.If(leaving):
            m.d.sync += gathered[pipe.out_tag].eq(self._round.result)
            with m.If(pipe.out_tag == cfg.cols - 1):
                m.d.sync += out_full.eq(1)
        return m

    def _arithmetic(self, m, platform, pipe, base, row, column, block):
        """One output a cycle, all in the stall domain: the two table reads, ``rank`` products and their sum (the
        chunk sum, exact), its float32 value, times ``s``, plus the base output, rounded to bf16."""
        cfg, enable = self.config, pipe.enable
        reads = []
        for table, address in ((self.rows_table, row), (self.columns_table, column),
                               (self.column_exponents, column)):
            port = table.read_port(domain="sync", transparent_for=())
            m.d.comb += [port.addr.eq(address), port.en.eq(enable)]
            reads.append(port.data)
        row_entry, column_q, column_exponent = reads
        width = 2 * OPERAND_BITS
        products = [Signal(signed(width), name=f"product_{k}") for k in range(cfg.rank)]
        for k, product in enumerate(products):
            a, b = row_entry.q[k], column_q[k]
            if is_ecp5(platform):
                m.submodules[f"multiply_{k}"] = ecp5_registered_product(a, b, product, enable, signed=True)
            else:
                operands = [Signal(signed(OPERAND_BITS), name=f"operand_{k}_{s}") for s in "ab"]
                with m.If(enable):
                    m.d.sync += [operands[0].eq(a), operands[1].eq(b), product.eq(operands[0] * operands[1])]
        # the chunk sum in two registered levels of the adder tree (four products, then the rest)
        groups = [sum(products[k:k + 4]) for k in range(0, cfg.rank, 4)]
        partials = [Signal(signed(ACC_BITS), name=f"partial_{k}") for k in range(len(groups))]
        total = Signal(signed(ACC_BITS))
        with m.If(enable):
            m.d.sync += [*(p.eq(g) for p, g in zip(partials, groups)), total.eq(sum(partials))]
        # a transposed block's columns share its exponent (A's over all of A), a forward block's have their own
        column_exponent = Mux(block.transposed, block.exponent, column_exponent)
        exponent = delay_line(m, enable, row_entry.exponent.as_signed() + column_exponent.as_signed()
                              - 2 * OPERAND_FRAC, self._ahead - 1, "term_exponent")

        for name, unit in (("convert", self._convert), ("scale", self._scale), ("add", self._add),
                           ("round", self._round)):
            m.submodules[name] = pipe.stall(unit)
        base_late = delay_line(m, enable, base, self._ahead + self._convert.latency + self._scale.latency, "base")
        m.d.comb += [
            self._convert.value.eq(total), self._convert.exponent.eq(exponent.as_signed()),
            self._scale.a.eq(self._convert.result), self._scale.b.eq(block.scaling),
            self._add.a.eq(base_late), self._add.b.eq(self._scale.result),
            self._round.a.eq(self._add.result),
        ]

