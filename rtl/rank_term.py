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

from amaranth.hdl import Array, Cat, Module, Mux, Signal, signed
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
        Where the rows' table goes: ``"distributed"`` (LUT RAM) or ``"block"``.
    rows_parts : int
        Entries of the rows' table per row (a power of two dividing ``rank``, at most ``cols``), each ``rank /
        rows_parts`` operands: a row is written over ``rows_parts`` cycles and read over ``rows_parts`` cycles
        into a register while the beat before it passes (a beat takes ``cols`` cycles). A block's 128 rows of 16
        aligned operands are 37 kbit: whole, they take nine 36-bit wide block RAMs for a quarter of their depth, or
        about 600 LUT-RAM cells; in four parts of 72 bits, two block RAMs.
    """

    rows: int = 8
    cols: int = 8
    rank: int = 16
    max_tokens: int = 128
    max_columns: int = 472
    rows_table_ram: str = "distributed"
    rows_parts: int = 1

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
        parts = self.rows_parts
        if not _is_int(parts) or not 1 <= parts <= self.cols or parts & (parts - 1) or self.rank % parts:
            raise ValueError(f"rows_parts must be a power of two dividing rank ({self.rank}) and at most cols "
                             f"({self.cols}), not {parts!r}")


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
    """One row's (or column's) ``rank`` operands aligned to their shared exponent."""
    return data.StructLayout({"q": data.ArrayLayout(signed(OPERAND_BITS), config.rank), "exponent": EXPONENT_SHAPE})


def row_part_layout(config):
    """An entry of the rows' table: ``rank / rows_parts`` aligned operands of a row."""
    return data.ArrayLayout(signed(OPERAND_BITS), config.rank // config.rows_parts)


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
    rows_table, row_exponents : Memory of :func:`row_part_layout` (``rows_parts`` entries per row), Memory of the
        rows' exponents
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
        self.rows_table = Memory(shape=row_part_layout(config), depth=config.max_tokens * config.rows_parts,
                                 init=[], attrs={"ram_style": config.rows_table_ram})
        self.row_exponents = Memory(shape=EXPONENT_SHAPE, depth=config.max_tokens, init=[])
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
        for name in ("rows_table", "row_exponents", "columns_table", "column_exponents"):
            m.submodules[name] = getattr(self, name)
        rows_left = Signal(range(cfg.max_tokens + 1))
        columns_left = Signal(range(cfg.max_columns + 1))
        with m.If(self.block.valid & self.block.ready):
            m.d.sync += [rows_left.eq(Mux(self.block.payload.load_rows, self.block.payload.tokens, 0)),
                         columns_left.eq(Mux(self.block.payload.load_columns, self.block.payload.columns, 0))]
        loading = state == _State.LOAD
        in_flight, scattering, row_pending = Signal(), Signal(), Signal()
        # the columns first (the rows may be made by the step as the block's activation passes, after B's or A's
        # reads); a transposed column beat waits until the one before is scattered (a beat every rank + 5 cycles),
        # a row beat until the one before is written (a beat every rows_parts + 5 cycles)
        m.d.comb += [self.row_operands.ready.eq(loading & (columns_left == 0) & (rows_left != 0) & ~row_pending),
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

        # a row: its exponent at once, its parts one a cycle from a register
        parts = cfg.rows_parts
        width = cfg.rank // parts
        row_exponents = self.row_exponents.write_port()
        m.d.comb += [row_exponents.addr.eq(address_out), row_exponents.data.eq(exponent_out),
                     row_exponents.en.eq(done & to_rows_out)]
        row_held = Signal(operand_layout(cfg).members["q"])
        part_bits = width * OPERAND_BITS
        row_address = Signal(range(cfg.max_tokens))
        part = Signal(range(parts + 1))
        with m.If(take_row):
            m.d.sync += row_pending.eq(1)
        with m.If(done & to_rows_out):
            m.d.sync += [row_held.eq(align.q), row_address.eq(address_out), part.eq(parts)]
        rows = self.rows_table.write_port()
        m.d.comb += [rows.addr.eq(row_address * parts + (parts - part)), rows.en.eq(part != 0),
                     rows.data.eq(Array(row_held.as_value()[k * part_bits:(k + 1) * part_bits]
                                        for k in range(parts))[parts - part])]
        with m.If(part != 0):
            m.d.sync += part.eq(part - 1)
            with m.If(part == 1):
                m.d.sync += row_pending.eq(0)
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
        m.d.comb += busy.eq(in_flight | scattering | row_pending)
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

        # the next beat's row, read from the rows' table while the beat before it passes
        fetched = self._fetch_row(m, state, tile_base + row_in_tile)

        # the beat being fed, one output a cycle; the next beat is taken as its last output enters, with its row
        held = Signal(data.ArrayLayout(FP32.width, cfg.cols))
        held_valid = Signal()
        held_row_entry = Signal(operand_layout(cfg))
        held_column = Signal.like(column_base)
        lane = Signal(range(cfg.cols))
        beat_done = entering & (lane == cfg.cols - 1)
        m.d.comb += [pipe.in_valid.eq(held_valid), pipe.in_tag.eq(lane),
                     self.c.ready.eq((state == _State.RUN) & (beats_left != 0) & (~held_valid | beat_done)
                                     & fetched.valid)]
        with m.If(entering):
            m.d.sync += lane.eq(Mux(lane == cfg.cols - 1, 0, lane + 1))
        with m.If(beat_done):
            m.d.sync += held_valid.eq(0)
        with m.If(self.c.valid & self.c.ready):
            m.d.sync += [held.eq(self.c.payload), held_valid.eq(1), held_row_entry.eq(fetched.entry),
                         held_column.eq(column_base), beats_left.eq(beats_left - 1)]
            last_row, last_column = row_in_tile == tile_rows - 1, column_base + cfg.cols == block.columns
            m.d.sync += row_in_tile.eq(Mux(last_row, 0, row_in_tile + 1))
            with m.If(last_row):
                m.d.sync += column_base.eq(Mux(last_column, 0, column_base + cfg.cols))
                with m.If(last_column):
                    m.d.sync += tile_base.eq(tile_base + tile_rows)
        with m.If((state == _State.RUN) & (beats_left == 0) & ~held_valid):
            m.d.sync += state.eq(_State.IDLE)

        self._arithmetic(m, platform, pipe, held[lane], held_row_entry, held_column + lane, block)

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

    def _fetch_row(self, m, state, row):
        """The rows' table read ahead: from the cycle the walk points at a beat (entering RUN, or the beat before
        it taken), its row's ``rows_parts`` entries are read one a cycle, with the row's exponent, into a register.
        Returns a view with ``entry`` (:func:`operand_layout`) and ``valid`` (all of it read)."""
        cfg = self.config
        parts = cfg.rows_parts
        part_bits = cfg.rank // parts * OPERAND_BITS
        fetched = Signal(data.StructLayout({"entry": operand_layout(cfg), "valid": 1}))
        issued = Signal(range(parts + 1))       # parts whose read was issued
        arrived = Signal(range(parts))          # the part whose data the table gives this cycle
        reading = Signal()                      # a read was issued last cycle
        restart = (self.c.valid & self.c.ready) | (state != _State.RUN)
        read = self.rows_table.read_port(domain="sync", transparent_for=())
        exponent = self.row_exponents.read_port(domain="sync", transparent_for=())
        m.d.comb += [read.addr.eq(row * parts + issued), read.en.eq(issued != parts),
                     exponent.addr.eq(row), exponent.en.eq(issued == 0)]
        m.d.sync += reading.eq(~restart & (issued != parts))
        with m.If(restart):
            m.d.sync += [issued.eq(0), arrived.eq(0), fetched.valid.eq(0)]
        with m.Else():
            with m.If(issued != parts):
                m.d.sync += issued.eq(issued + 1)
            with m.If(reading):
                q = fetched.entry.q.as_value()
                with m.Switch(arrived):
                    for k in range(parts):
                        with m.Case(k):
                            m.d.sync += q[k * part_bits:(k + 1) * part_bits].eq(read.data)
                with m.If(arrived == 0):
                    m.d.sync += fetched.entry.exponent.eq(exponent.data)
                m.d.sync += arrived.eq(arrived + 1)
                with m.If(arrived == parts - 1):
                    m.d.sync += fetched.valid.eq(1)
        return fetched

    def _arithmetic(self, m, platform, pipe, base, row_held, column, block):
        """One output a cycle, all in the stall domain: the row (``row_held``, fetched with its beat) and the
        column's table reads, ``rank`` products and their sum (the chunk sum, exact), its float32 value, times
        ``s``, plus the base output, rounded to bf16."""
        cfg, enable = self.config, pipe.enable
        reads = []
        for table in (self.columns_table, self.column_exponents):
            port = table.read_port(domain="sync", transparent_for=())
            m.d.comb += [port.addr.eq(column), port.en.eq(enable)]
            reads.append(port.data)
        column_q, column_exponent = reads
        # a register in step with the column's read
        row_entry = Signal(operand_layout(cfg))
        with m.If(enable):
            m.d.sync += row_entry.eq(row_held)
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

