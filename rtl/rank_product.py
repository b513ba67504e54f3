"""A LoRA projection's rank-r rows made as the activation passes on its way to the engine (twin:
``golden/rank_product.py``): ``hb = bf16(x A^T)`` forward (the step's F1), ``gb = bf16(dy B)`` backward (B1).

In the blocked step (``rtl/blocked.py``) the activation reaches the engine a span (64 reduction elements) at a
time, token row after token row, once per feature block. The rank-r term behind the engine (``rtl/rank_term.py``)
needs the token block's rows of hb (or gb) when the first feature block's outputs leave the engine, and by then
every span of the activation has passed once. This unit sits in the activation's path during the first feature
block: per span it holds the span's piece of A (or B), ``64 x r`` values; per chunk of 16 activation values one
value a cycle goes through ``r`` multipliers into ``r`` exact chunk sums (an outer product, so one activation
value meets ``r`` operands and nothing needs a corner turn); each chunk's ``r`` sums leave one a cycle, are rounded
to float32 and added to the token row's float32 partial sums; after the last span the partial sums leave rounded
to bf16, a row per beat. The alignment is the engine's (``rtl/bfp.py``): the activation per chunk, A per row and
chunk, B per chunk of 16 rows over all its ``r`` columns, so the rows equal the step's to the bit.
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import ACC_BITS, BF16, FP32, MAX_RANK, OPERAND_BITS, OPERAND_FRAC
from .bfp import BF16_BIAS, AlignLanes, biased_exponent
from .fp import FixedToFloat, FPAdd, FPConvert, ecp5_registered_product
from .pipeline import delay_line, is_ecp5

__all__ = ["RankProductConfig", "span_layout", "RankProduct", "CHUNK", "SPAN", "MINUS_ZERO", "load_operands",
           "align_in_place", "chunk_products", "accumulate_chunks", "emit_rows"]

#: Reduction elements per alignment chunk (the engine's) and per span (one NF4 block).
CHUNK = 16
SPAN = 64
#: float32 minus zero: the identity of a round-to-nearest addition, so a fresh partial sum takes the first
#: chunk's partial as it is (``-0.0`` included), as the engine's first chunk does.
MINUS_ZERO = 1 << (FP32.width - 1)


@dataclass(frozen=True)
class RankProductConfig:
    """Elaboration parameters of :class:`RankProduct`.

    Parameters
    ----------
    rank : int
        ``r``, 1 to 16.
    max_tokens : int
        The largest token block: the float32 partial sums are ``max_tokens x rank`` (at 128 x 16: 64 kbit, four
        block RAMs).
    """

    rank: int = 16
    max_tokens: int = 128

    def __post_init__(self):
        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be an integer from 1 to {MAX_RANK}, not {self.rank!r}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= 1 << 15:
            raise ValueError(f"max_tokens must be an integer from 1 to 32768, not {self.max_tokens!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def span_layout(config):
    """One span: its token rows; ``capture`` (the unit computes on it: else its values only pass); ``first`` (the
    reduction's first span: the partial sums start from zero); ``last`` (the reduction's last: the rows leave after
    it); ``transposed`` (B1: the operand is B's span of rows)."""
    return data.StructLayout({"tokens": range(config.max_tokens + 1), "capture": 1, "first": 1, "last": 1,
                              "transposed": 1})


def load_operands(m, take, value, transposed, rank, table, fields):
    """A span's operands, one a cycle (``value``, bf16, taken when ``take``), into lane-enabled write ports of the
    table and of its groups' fields (``table``, ``fields``; enables driven here, address and data by the caller:
    entry ``k``, every lane ``value`` and ``field``): forward A's rows (value ``k`` of row ``j`` at entry ``k``,
    lane ``j``; each row's chunk of 16 its own field), transposed B's rows (value ``j`` of row ``k`` at the same
    place; each chunk of 16 rows one field over all of them). The fields are biased, the largest so far kept as
    the values arrive. Returns ``k``, ``field`` and ``done`` (the last operand taken this cycle)."""
    j, k = Signal(range(rank)), Signal(range(SPAN))
    group_start = Mux(transposed, (k % CHUNK == 0) & (j == 0), k % CHUNK == 0)
    group_end = Mux(transposed, (k % CHUNK == CHUNK - 1) & (j == rank - 1), k % CHUNK == CHUNK - 1)
    running, current, done = Signal(8), Signal(8), Signal()
    field = biased_exponent(value)
    m.d.comb += current.eq(Mux(group_start | (field > running), field, running))
    with m.If(take):
        m.d.comb += [table.en.eq(1 << j),
                     fields.en.eq(Mux(group_end, Mux(transposed, (1 << rank) - 1, 1 << j), 0)),
                     done.eq((j == rank - 1) & (k == SPAN - 1))]
        m.d.sync += running.eq(current)
        with m.If(transposed):
            m.d.sync += j.eq(Mux(j == rank - 1, 0, j + 1))
            with m.If(j == rank - 1):
                m.d.sync += k.eq(k + 1)
        with m.Else():
            m.d.sync += k.eq(k + 1)
            with m.If(k == SPAN - 1):
                m.d.sync += j.eq(j + 1)
        with m.If(done):
            m.d.sync += [j.eq(0), k.eq(0)]
    return k, current, done


def align_in_place(m, aligning, entries, depth, rank, table, table_read, fields_read):
    """A table's raw bf16 operands (the first ``entries`` of its ``depth`` entries of ``rank`` lanes), entry by
    entry and lane by lane: read, aligned to the field of the lane's group (``fields_read``, read at entry
    ``k // 16``; one aligner), written back into their lane through ``table`` (a lane-enabled write port, driven
    here only while writing). A read of an entry returns its later lanes still raw. Runs while ``aligning``;
    returns ``done``, high once the last operand is written (the caller leaves the aligning state on it)."""
    k, j = Signal(range(depth)), Signal(range(rank))
    issuing = Signal(init=1)
    issue = aligning & issuing
    with m.If(issue):
        m.d.comb += [table_read.addr.eq(k), fields_read.addr.eq(k // CHUNK)]
        m.d.sync += [j.eq(Mux(j == rank - 1, 0, j + 1)), k.eq(Mux(j == rank - 1, k + 1, k))]
        with m.If((j == rank - 1) & (k == entries - 1)):
            m.d.sync += [issuing.eq(0), k.eq(0)]
    # stage 1: the lane of the read entry and its exponent; then the alignment; then the write
    m.submodules.align_operand = align = AlignLanes(1, stages=2)
    chain = [issue]
    for stage in range(1 + align.latency):
        chain.append(Signal(name=f"align_valid_{stage + 1}"))
        m.d.sync += chain[-1].eq(chain[-2])
    lane, entry = Signal.like(j), Signal.like(k)
    m.d.sync += [lane.eq(j), entry.eq(k)]
    m.d.comb += [align.values.eq(table_read.data[lane][:BF16.width]),
                 align.shared.eq(fields_read.data[lane].as_unsigned() - BF16_BIAS)]
    written_lane = delay_line(m, 1, lane, align.latency, "align_lane")
    written_entry = delay_line(m, 1, entry, align.latency, "align_entry")
    with m.If(chain[-1]):
        m.d.comb += [table.addr.eq(written_entry), table.en.eq(1 << written_lane)]
        for index in range(rank):
            m.d.comb += table.data[index].eq(align.q[0])
    done = Signal()
    m.d.comb += done.eq(aligning & ~issuing & ~Cat(*chain[1:]).any())
    with m.If(done):
        m.d.sync += issuing.eq(1)
    return done


def chunk_products(m, platform, rank, issue, value, field, operands, operand_fields, tag):
    """The outer product's pipeline, a value a cycle: the value issued at stage 0 arrives (``value``, bf16, and
    its chunk's biased exponent ``field``) at stage 1 and is aligned (stages 2-3); its ``rank`` aligned operands
    (``operands``, the table's read data) arrive at stage 3 and their groups' fields (``operand_fields``) at
    stage 1; the products take stages 4-5, and ``rank`` exact sums run over each chunk (``tag.opens`` on its first
    value, ``tag.closes`` on its last; ``tag``, a struct given at stage 0). Each closed chunk's sums then shift
    out one a cycle, lane 0 first, with their exponents. Returns whether values are in the pipeline
    (``stream``), the serializer's output (``valid``, ``entry``: ``sum`` and ``exponent``, ``lane``) and the
    closed chunk's ``tag``."""
    valid = [issue]
    for s in range(6):
        valid.append(Signal(name=f"product_valid_{s + 1}"))
        m.d.sync += valid[-1].eq(valid[-2])
    late = tag.shape()(delay_line(m, 1, tag, 5, "product_tag"))
    field_late = delay_line(m, 1, field, 4, "product_field")
    fields_late = operand_fields.shape()(delay_line(m, 1, operand_fields, 4, "product_fields"))

    m.submodules.align_value = align = AlignLanes(1, stages=2)
    m.d.comb += [align.values.eq(value), align.shared.eq(field - BF16_BIAS)]
    operand_q = [operands[lane].as_signed() for lane in range(rank)]
    # the products (two registers), stage 4 to 6; the chunk's sums at stage 6
    products = [Signal(signed(2 * OPERAND_BITS), name=f"product_{lane}") for lane in range(rank)]
    for lane, product in enumerate(products):
        if is_ecp5(platform):
            m.submodules[f"multiply_{lane}"] = ecp5_registered_product(align.q[0], operand_q[lane], product,
                                                                       Const(1), signed=True)
        else:
            a = Signal(signed(OPERAND_BITS), name=f"operand_a_{lane}")
            b = Signal(signed(OPERAND_BITS), name=f"operand_b_{lane}")
            m.d.sync += [a.eq(align.q[0]), b.eq(operand_q[lane]), product.eq(a * b)]
    # each lane's sum so far with this value's product (a chunk's first value starts it)
    sums = [Signal(signed(ACC_BITS), name=f"chunk_sum_{lane}") for lane in range(rank)]
    totals = [Signal(signed(ACC_BITS), name=f"chunk_total_{lane}") for lane in range(rank)]
    m.d.comb += [total.eq(Mux(late.opens, 0, partial) + product)
                 for total, partial, product in zip(totals, sums, products)]
    at_products = valid[5]
    with m.If(at_products):
        m.d.sync += [partial.eq(total) for partial, total in zip(sums, totals)]

    # the chunk's sums and exponents shift out one a cycle, lane 0 first
    out_layout = data.StructLayout({"sum": signed(ACC_BITS), "exponent": signed(11)})
    shift = [Signal(out_layout, name=f"serial_{lane}") for lane in range(rank)]
    left = Signal(range(rank + 1))
    closed = Signal(tag.shape())
    with m.If(left != 0):
        m.d.sync += left.eq(left - 1)
        for lane in range(rank - 1):
            m.d.sync += shift[lane].eq(shift[lane + 1])
    with m.If(at_products & late.closes):
        m.d.sync += [left.eq(rank), closed.eq(late)]
        for lane in range(rank):
            exponent = field_late + fields_late[lane] - (2 * BF16_BIAS + 2 * OPERAND_FRAC)
            m.d.sync += [shift[lane].sum.eq(totals[lane]), shift[lane].exponent.eq(exponent)]
    # the lane leaving now: rank - left (lane 0 when left = rank)
    lane_out = Signal(range(rank))
    m.d.comb += lane_out.eq(rank - left)
    return Cat(*valid).any(), (left != 0, shift[0], lane_out), closed


def accumulate_chunks(m, sums, valid, entry, address, fresh):
    """A chunk sum (``entry``: ``sum`` and ``exponent``) to float32 and into its partial sum in memory ``sums``
    at ``address`` (``fresh``: the reduction's first chunk, added to minus zero, the identity of a rounded
    addition, so that a first partial of -0 stays -0 as the engine's does). The same partial sum's next chunk
    must come after this one's write. Returns whether a sum is on its way and the partial sums' read port."""
    m.submodules.convert = convert = FixedToFloat(ACC_BITS, stages=4)
    m.submodules.add = add = FPAdd(FP32)
    m.d.comb += [convert.value.eq(entry.sum), convert.exponent.eq(entry.exponent)]
    chain = [valid]
    for s in range(convert.latency + add.latency):
        chain.append(Signal(name=f"float_valid_{s + 1}"))
        m.d.sync += chain[-1].eq(chain[-2])
    read_address = delay_line(m, 1, address, convert.latency - 1, "sum_read_address")
    first = delay_line(m, 1, fresh, convert.latency, "sum_fresh")
    partials = sums.read_port(domain="sync", transparent_for=())
    m.d.comb += partials.addr.eq(read_address)
    m.d.comb += [add.a.eq(Mux(first, MINUS_ZERO, partials.data)), add.b.eq(convert.result)]
    write = sums.write_port()
    m.d.comb += [write.addr.eq(delay_line(m, 1, address, convert.latency + add.latency, "sum_write_address")),
                 write.data.eq(add.result), write.en.eq(chain[-1])]
    return Cat(*chain[1:]).any(), partials


def emit_rows(m, active, sums, rows, rank, tokens, max_tokens):
    """While ``active``: each of ``tokens`` token rows' ``rank`` float32 partial sums (``sums``, a read port, entry
    ``token * rank + j``) read one a cycle, rounded to bf16 and gathered into one beat of ``rows`` (a stream of
    ``rank`` bf16). Returns ``done``: the last row taken this cycle."""
    token, lane = Signal(range(max_tokens)), Signal(range(rank))
    reading, full, arrived, done = Signal(), Signal(), Signal(), Signal()
    arrived_lane = Signal(range(rank))
    gathered = Signal(data.ArrayLayout(BF16.width, rank))
    m.submodules.round = rounder = FPConvert(FP32, BF16, stages=0)
    m.d.sync += [arrived.eq(reading), arrived_lane.eq(lane)]
    with m.If(reading):
        m.d.comb += sums.addr.eq(token * rank + lane)
    m.d.comb += rounder.a.eq(sums.data)
    with m.If(arrived):
        m.d.sync += gathered[arrived_lane].eq(rounder.result)
        with m.If(arrived_lane == rank - 1):
            m.d.sync += full.eq(1)
    with m.If(active & ~reading & ~full & ~arrived):
        m.d.sync += [reading.eq(1), lane.eq(0)]
    with m.If(reading):
        m.d.sync += lane.eq(lane + 1)
        with m.If(lane == rank - 1):
            m.d.sync += [reading.eq(0), lane.eq(0)]
    m.d.comb += [rows.valid.eq(full), rows.payload.eq(gathered)]
    with m.If(rows.valid & rows.ready):
        m.d.sync += [full.eq(0), token.eq(token + 1)]
        with m.If(token == tokens - 1):
            m.d.sync += token.eq(0)
            m.d.comb += done.eq(1)
    return done


class _State(enum.Enum, shape=3):
    IDLE = 0     # waiting for a span
    LOAD = 1     # the span's operands into the table, raw (once the span before has left the table)
    ALIGN = 2    # the table's operands aligned in place, one a cycle
    PASS = 3     # the span's activation values, on to ``passed`` (and captured a chunk at a time)
    DRAIN = 4    # after the last span: until every chunk sum is in the partial sums
    EMIT = 5     # the rows, rounded to bf16


class RankProduct(wiring.Component):
    """hb (or gb) of a token block, from the activation spans that pass through it.

    Per span one ``spans`` beat, then with ``capture`` ``64 * rank`` ``operands`` (bf16; forward A's ``rank``
    rows' pieces of the span, row after row; transposed the span's 64 rows of B, ``rank`` values each), then the
    span's ``tokens * 64`` activation ``values`` (token row after token row), each of which leaves on ``passed``
    unchanged. After a ``last`` span's values, ``tokens`` beats of ``rows``: each token row's ``rank`` values of hb
    or gb. Operands must be finite; the activation may hold anything the engine takes (finite bf16).

    One activation value enters the multipliers a cycle, the pace at which the activation arrives (one element a
    cycle from its unpacker), so the activation is not slowed while the unit keeps up; a span's operands take
    ``64 * rank`` cycles to load and as many to align in place (one aligner, not one per multiplier), before its
    first value passes.

    Parameters
    ----------
    config : RankProductConfig

    Attributes
    ----------
    spans : In(stream of :func:`span_layout`)
    operands, values : In(stream of bf16)
    passed : Out(stream of bf16)
    rows : Out(stream of ArrayLayout(BF16.width, rank))
    table : Memory of the span's operands, entry ``k`` (reduction index) holding lane ``j`` (rank index): raw
        bf16 as they load, then aligned 18-bit operands
    sums : Memory of the float32 partial sums, entry ``t * rank + j``
    """

    def __init__(self, config=RankProductConfig()):
        if not isinstance(config, RankProductConfig):
            raise TypeError(f"config must be a RankProductConfig, not {config!r}")
        self.config = config
        bf16 = stream.Signature(BF16.width)
        super().__init__({
            "spans": In(stream.Signature(span_layout(config))),
            "operands": In(bf16), "values": In(bf16), "passed": Out(bf16),
            "rows": Out(stream.Signature(data.ArrayLayout(BF16.width, config.rank))),
        })
        rank = config.rank
        # 64 entries of 288 bits: LUT RAM (in block RAM the width would take eight for a sixteenth of their depth)
        self.table = Memory(shape=data.ArrayLayout(OPERAND_BITS, rank), depth=SPAN, init=[],
                            attrs={"ram_style": "distributed"})
        self.exponents = Memory(shape=data.ArrayLayout(8, rank), depth=SPAN // CHUNK, init=[])
        self.chunks = Memory(shape=BF16.width, depth=2 * CHUNK, init=[])
        self.sums = Memory(shape=FP32.width, depth=config.max_tokens * rank, init=[])

    def elaborate(self, platform):
        cfg = self.config
        m = Module()
        for name in ("table", "exponents", "chunks", "sums"):
            m.submodules[name] = getattr(self, name)
        state = Signal(_State)
        span = Signal(span_layout(cfg))
        m.d.comb += self.spans.ready.eq(state == _State.IDLE)
        with m.If(self.spans.valid & self.spans.ready):
            m.d.sync += [span.eq(self.spans.payload),
                         state.eq(Mux(self.spans.payload.capture, _State.LOAD, _State.PASS))]

        quiet = Signal()          # no captured chunk waits or streams, nothing in the multipliers
        table = self.table.read_port(domain="sync", transparent_for=())
        exps = self.exponents.read_port(domain="sync", transparent_for=())
        self._load(m, state, span, quiet, table, exps)
        chunk_ready, chunk_meta, filled = self._capture(m, state, span)
        busy, sums = self._stream(m, platform, chunk_ready, filled, chunk_meta, table, exps, state == _State.ALIGN)
        m.d.comb += quiet.eq(~chunk_ready.any() & ~busy["stream"])
        with m.If((state == _State.DRAIN) & quiet & ~busy["float"]):
            m.d.sync += state.eq(_State.EMIT)
        self._emit(m, state, span, sums)
        return m

    def _load(self, m, state, span, quiet, table_read, exps_read):
        """The span's operands into the table: forward A's rows (value ``k`` of row ``j`` at entry ``k``, lane
        ``j``; each row's chunk its own exponent), transposed B's rows (value ``j`` of row ``k`` at the same place;
        each chunk of 16 rows one exponent over all of them); the exponents are biased fields, the largest so far
        kept as the values arrive. Then each operand aligned to its group's exponent, in place, one a cycle."""
        rank = self.config.rank
        m.d.comb += self.operands.ready.eq((state == _State.LOAD) & quiet)
        take = self.operands.valid & self.operands.ready
        value = self.operands.payload
        table = self.table.write_port(granularity=1)
        exps = self.exponents.write_port(granularity=1)
        k, field, done = load_operands(m, take, value, span.transposed, rank, table, exps)
        m.d.comb += [table.addr.eq(k), exps.addr.eq(k // CHUNK)]
        for lane in range(rank):
            m.d.comb += [table.data[lane].eq(value), exps.data[lane].eq(field)]
        with m.If(done):
            m.d.sync += state.eq(_State.ALIGN)
        # (after the load's: the aligner's writes take the table's port while it aligns)
        with m.If(align_in_place(m, state == _State.ALIGN, SPAN, SPAN, rank, table, table_read, exps_read)):
            m.d.sync += state.eq(_State.PASS)

    def _capture(self, m, state, span):
        """The span's values on to ``passed``; with ``capture`` each chunk of 16 into one of two slots, with its
        largest exponent, its token row, its index in the span and whether it opens the reduction. Returns the
        slots' full flags, their fields and the slot filled this cycle (one-hot)."""
        cfg = self.config
        meta_layout = data.StructLayout({"field": 8, "token": range(cfg.max_tokens), "chunk": range(SPAN // CHUNK),
                                         "first": 1})
        full = Signal(2)
        meta = [Signal(meta_layout, name=f"slot_{s}") for s in range(2)]
        slot = Signal()
        index, token = Signal(range(SPAN)), Signal(range(cfg.max_tokens))
        capture = span.capture
        room = ~capture | ~full.bit_select(slot, 1)
        passing = state == _State.PASS
        m.d.comb += [self.passed.valid.eq(self.values.valid & passing & room),
                     self.values.ready.eq(self.passed.ready & passing & room),
                     self.passed.payload.eq(self.values.payload)]
        take = self.values.valid & self.values.ready
        running, current = Signal(8), Signal(8)
        field = biased_exponent(self.values.payload)
        m.d.comb += current.eq(Mux((index % CHUNK == 0) | (field > running), field, running))
        port = self.chunks.write_port()
        m.d.comb += [port.addr.eq(Cat(index[:4], slot)), port.data.eq(self.values.payload),
                     port.en.eq(take & capture)]
        filled = Signal(2)
        with m.If(take):
            m.d.sync += [running.eq(current), index.eq(index + 1)]
            with m.If(index % CHUNK == CHUNK - 1):
                with m.If(capture):
                    for s in range(2):
                        with m.If(slot == s):
                            m.d.sync += [meta[s].field.eq(current), meta[s].token.eq(token),
                                         meta[s].chunk.eq(index // CHUNK),
                                         meta[s].first.eq(span.first & (index < CHUNK))]
                    m.d.comb += filled.eq(Mux(slot, 0b10, 0b01))
                    m.d.sync += slot.eq(~slot)
                with m.If(index == SPAN - 1):
                    m.d.sync += token.eq(token + 1)
                    with m.If(token == span.tokens - 1):
                        m.d.sync += [token.eq(0), state.eq(Mux(capture & span.last, _State.DRAIN, _State.IDLE))]
        return full, meta, filled

    def _stream(self, m, platform, full, filled, meta, table_port, exps_port, aligning):
        """A full slot's 16 values, one a cycle, against the table's entries: the activation value aligned to its
        chunk's exponent, the ``rank`` operands each to theirs, ``rank`` products summed exactly over the chunk;
        each chunk's sums then leave one a cycle into the float32 partial sums. Returns whether values are
        streaming or in the multipliers (``stream``) and whether sums are on their way to the partial sums
        (``float``), and the partial sums' read port."""
        rank = self.config.rank
        active, slot = Signal(), Signal()
        i = Signal(range(CHUNK))
        current = Signal(meta[0].shape())
        m.d.comb += current.eq(Mux(slot, meta[1], meta[0]))
        start = ~active & full.bit_select(slot, 1)
        held = Signal(meta[0].shape())
        with m.If(start):
            m.d.sync += [active.eq(1), i.eq(0), held.eq(current)]
        issue = active
        clear = Signal(2)
        with m.If(issue):
            m.d.sync += i.eq(i + 1)
            with m.If(i == CHUNK - 1):
                m.d.sync += [active.eq(0), slot.eq(~slot)]
                m.d.comb += clear.eq(Mux(slot, 0b10, 0b01))
        m.d.sync += full.eq((full & ~clear) | filled)

        # stage 0: the reads; stage 1: the values; stages 2-3: the alignment (the operands read at stage 2);
        # 4-5: the products; 6: the sums
        chunk_port = self.chunks.read_port(domain="sync", transparent_for=())
        m.d.comb += chunk_port.addr.eq(Cat(i, slot))
        # the operands are read two cycles after the activation value, as its alignment takes two
        with m.If(~aligning):
            m.d.comb += [table_port.addr.eq(delay_line(m, 1, held.chunk * CHUNK + i, 2, "table_address")),
                         exps_port.addr.eq(held.chunk)]
        tag = Signal(data.StructLayout({"opens": 1, "closes": 1, "token": held.token.shape(), "first": 1}))
        m.d.comb += [tag.opens.eq(i == 0), tag.closes.eq(i == CHUNK - 1), tag.token.eq(held.token),
                     tag.first.eq(held.first)]
        stream_busy, (valid, entry, lane), closed = chunk_products(m, platform, rank, issue, chunk_port.data,
                                                                   held.field, table_port.data, exps_port.data, tag)
        float_busy, sums = accumulate_chunks(m, self.sums, valid, entry, closed.token * rank + lane, closed.first)
        return {"stream": stream_busy, "float": float_busy | valid}, sums

    def _emit(self, m, state, span, sums):
        """After the last span: each token row's ``rank`` partial sums read one a cycle, rounded to bf16 and
        gathered into one ``rows`` beat."""
        cfg = self.config
        with m.If(emit_rows(m, state == _State.EMIT, sums, self.rows, cfg.rank, span.tokens, cfg.max_tokens)):
            m.d.sync += state.eq(_State.IDLE)
