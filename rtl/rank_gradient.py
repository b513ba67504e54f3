"""A LoRA projection's gradient made as an activation passes on its way to the engine (twin:
``golden/rank_gradient.py``): ``grad_B = s dy^T hb`` (the step's B2) from dy's spans, ``grad_A = s gb^T x`` (B3,
``transposed``) from x's; and, in ``product`` spans, the rows ``hb = bf16(x A^T)`` (F1) or ``gb = bf16(dy B)``
(B1) that :class:`~.rank_product.RankProduct` makes (twin: ``golden/rank_product.py``), through the same
multipliers, float pipeline and memories, so that one design with the gradient needs no second unit.

Both reduce over the tokens: a span of the activation (its token rows, 64 features each) with the token block's
rows of hb (or gb) gives 64 complete ``r``-vectors of the gradient, rows of grad_B or columns of grad_A, when the
whole reduction is one token block. The activation arrives token row after token row, but the engine's chunks run
along the tokens, so the unit turns each chunk of 16 token rows in a two-chunk buffer and replays it feature after
feature: one value a cycle meets that token's ``r`` operands in ``r`` multipliers (an outer product), ``r`` exact
chunk sums leave one a cycle, are rounded to float32 and added to the feature's float32 partial sums; after the
span's last chunk each partial sum is multiplied by ``s`` and leaves, one a cycle.

The alignment is the engine's (``rtl/bfp.py``): the rows per column and chunk of 16 tokens (hb^T is B2's forward
W operand, gb^T B3's A operand); dy per feature and chunk (B2's A operand); x per chunk of 16 token rows on one
exponent over all of x's columns (B3's transposed W operand), which the unit is given, since a span holds 64 of
them. So the gradient equals the step's to the bit.

A product span's chunks run along its 64 features instead: the same buffer replays its 16 token rows one after
the other, each row's 64 values (four chunks of 16, each with its largest exponent, kept as the values arrive)
against the table's 64 entries of A's (B's) span, into the token rows' float32 partial sums; after the
reduction's last span the rows leave rounded to bf16.
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import BF16, FP32, MAX_RANK, OPERAND_BITS
from .bfp import biased_exponent
from .fp import FPMul
from .pipeline import delay_line
from .rank_product import CHUNK, SPAN, accumulate_chunks, align_in_place, chunk_products, emit_rows, load_operands

__all__ = ["RankGradientConfig", "span_layout", "RankGradient", "CHUNK", "SPAN"]


@dataclass(frozen=True)
class RankGradientConfig:
    """Elaboration parameters of :class:`RankGradient`.

    Parameters
    ----------
    rank : int
        ``r``, 1 to 16.
    max_tokens : int
        The largest token block, which is the whole reduction: the rows' table holds ``max_tokens x rank``
        operands (and at least a span's 64 entries of A or B), the float32 partial sums as many (at 128 x 16:
        64 kbit, four block RAMs).
    table_ram : str
        Where the rows' table goes: ``"distributed"`` (LUT RAM: 128 x 16 operands take 704 LUT-RAM cells, each
        a slice's LUTs) or ``"block"`` (eight 36-bit wide block RAMs, a quarter of their depth used).
    """

    rank: int = 16
    max_tokens: int = 128
    table_ram: str = "distributed"

    def __post_init__(self):
        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be an integer from 1 to {MAX_RANK}, not {self.rank!r}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= 1 << 12:
            raise ValueError(f"max_tokens must be an integer from 1 to 4096, not {self.max_tokens!r}")
        if self.table_ram not in ("distributed", "block"):
            raise ValueError(f"table_ram must be 'distributed' or 'block', not {self.table_ram!r}")

    @property
    def chunks(self):
        """Chunks of 16 tokens in the largest token block."""
        return -(-self.max_tokens // CHUNK)

    @property
    def entries(self):
        """Entries of the table and of the partial sums (of ``rank`` each): a token block's or a span's."""
        return max(self.max_tokens, SPAN)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def span_layout(config):
    """One span: its token rows; ``capture`` (the unit computes on it: else its values only pass); ``product``
    (captured for the rows hb or gb, else for a gradient); for a gradient ``load`` (a new gradient: the token
    block's rows, and with ``transposed`` x's chunk exponents, come before its values; ``transposed`` and
    ``scale`` are taken from such a span), ``transposed`` (B3: grad_A from x) and ``scale`` (``s``, float32);
    for a product (whose span of A or B always comes before its values) ``first`` and ``last`` (the reduction's
    first span: its partial sums start afresh; its last: the rows leave after it) and ``transposed`` (B1: B's
    rows); and ``sink``: its values end here, none leaves on ``passed`` (grad_A's pass over x, which the engine
    does not take)."""
    return data.StructLayout({"tokens": range(config.max_tokens + 1), "capture": 1, "product": 1, "load": 1,
                              "first": 1, "last": 1, "transposed": 1, "sink": 1, "scale": FP32.width})


def _chunk_layout(config):
    """A captured half: its index in the token block, its token rows, whether it is a product's, whether its
    partial sums start afresh (a gradient's first chunk; a product's first span, at each row's first chunk) and
    whether the gradient or the rows are owed after it."""
    return data.StructLayout({"chunk": range(config.chunks), "length": range(CHUNK + 1), "product": 1, "first": 1,
                              "last": 1})


class _State(enum.Enum, shape=3):
    IDLE = 0      # waiting for a span
    ROWS = 1      # a new gradient's rows into the table, raw (once the last gradient or rows have left)
    FIELDS = 2    # transposed: x's chunk exponents
    OPERANDS = 3  # a product span's A (B) into the table, raw (once the last span's chunks are through)
    ALIGN = 4     # the table's operands aligned in place, one a cycle
    PASS = 5      # the span's activation values, on to ``passed`` (and, captured, into the chunk buffer)


class RankGradient(wiring.Component):
    """grad_B (or grad_A) of a token block, from the activation spans that pass through it.

    Per span one ``spans`` beat. With ``load`` (and ``capture``), ``tokens`` beats of ``rows`` (hb or gb, a token
    row each), then, ``transposed``, ``ceil(tokens / 16)`` beats of ``fields`` (x's chunk exponents as biased
    bf16 fields, :func:`edge_qlora.golden.rank_gradient.x_chunk_fields`). Then the span's ``tokens * 64``
    activation ``values`` (token row after token row), each of which leaves on ``passed`` unchanged (but in a
    ``sink`` span). After a captured span's last values its ``64 * rank`` float32 gradient values leave on
    ``grads``, one a beat, in the order of the gradient in memory: grad_B's 64 rows (``rank`` values each),
    transposed the span's 64 columns of each of grad_A's ``rank`` rows. Rows and activation must be finite bf16.

    The activation passes one value a cycle while the unit keeps up: a chunk of 16 token rows replays in 1,024
    cycles while the next one fills; a span's ``64 * rank`` values of ``grads`` leave one a cycle, while the
    next span's first chunk fills but does not replay. A new gradient's rows load one a cycle and align in place
    through one aligner (``tokens * rank`` cycles), after the last gradient has left.

    A captured ``product`` span takes ``64 * rank`` ``operands`` (bf16; forward A's ``rank`` rows' pieces of the
    span, row after row; transposed the span's 64 rows of B, ``rank`` values each) before its values, as
    :class:`~.rank_product.RankProduct` does; after the reduction's ``last`` span, ``tokens`` beats of
    ``rows_out`` (each token row's ``rank`` values of hb or gb, bf16), then, forward, ``ceil(tokens / 16)`` beats
    of ``x_fields_out``: x's chunk fields over all the columns it has seen, which a later ``transposed`` gradient
    (grad_A) takes on ``fields``. A span's operands load and align (``2 * 64 * rank`` cycles) once the last span's
    chunks have replayed.

    Parameters
    ----------
    config : RankGradientConfig

    Attributes
    ----------
    spans : In(stream of :func:`span_layout`)
    rows : In(stream of ArrayLayout(BF16.width, rank))
    fields : In(stream of 8 bits)
    operands, values : In(stream of bf16)
    passed : Out(stream of bf16)
    grads : Out(stream of float32)
    rows_out : Out(stream of ArrayLayout(BF16.width, rank))
    x_fields_out : Out(stream of 8 bits)
    table : Memory of the rows, entry ``t`` (token) holding lane ``j`` (a product's span of A or B: entry ``k``,
        the feature): raw bf16 as they load, then aligned 18-bit operands
    buffer : Memory of two chunks of the activation, entry ``(half, token, feature)``
    sums : Memory of the float32 partial sums, entry ``feature * rank + j`` (a product's ``token * rank + j``)
    """

    def __init__(self, config=RankGradientConfig()):
        if not isinstance(config, RankGradientConfig):
            raise TypeError(f"config must be a RankGradientConfig, not {config!r}")
        self.config = config
        bf16 = stream.Signature(BF16.width)
        super().__init__({
            "spans": In(stream.Signature(span_layout(config))),
            "rows": In(stream.Signature(data.ArrayLayout(BF16.width, config.rank))),
            "fields": In(stream.Signature(8)),
            "operands": In(bf16), "values": In(bf16), "passed": Out(bf16),
            "grads": Out(stream.Signature(FP32.width)),
            "rows_out": Out(stream.Signature(data.ArrayLayout(BF16.width, config.rank))),
            "x_fields_out": Out(stream.Signature(8)),
        })
        rank = config.rank
        self.table = Memory(shape=data.ArrayLayout(OPERAND_BITS, rank), depth=config.entries, init=[],
                            attrs={"ram_style": config.table_ram})
        # the table's groups' largest exponent fields: per chunk of 16 entries, each lane's
        self.row_fields = Memory(shape=data.ArrayLayout(8, rank), depth=max(config.chunks, SPAN // CHUNK), init=[])
        self.x_fields = Memory(shape=8, depth=config.chunks, init=[])
        # a forward product's x: each chunk of 16 token rows' largest field over the columns so far
        self.x_seen = Memory(shape=8, depth=config.chunks, init=[])
        self.buffer = Memory(shape=BF16.width, depth=2 * CHUNK * SPAN, init=[])
        # the activation's groups' fields, the largest so far as the half fills: a gradient's per feature (entry
        # ``(half, feature)``), a product's per token row and chunk of 16 features (``(half, row, chunk)``)
        self.value_fields = Memory(shape=8, depth=2 * SPAN, init=[])
        self.sums = Memory(shape=FP32.width, depth=config.entries * rank, init=[])

    def elaborate(self, platform):
        cfg = self.config
        m = Module()
        for name in ("table", "row_fields", "x_fields", "x_seen", "buffer", "value_fields", "sums"):
            m.submodules[name] = getattr(self, name)
        state = Signal(_State)
        span = Signal(span_layout(cfg))
        transposed, scale = Signal(), Signal(FP32.width)
        m.d.comb += self.spans.ready.eq(state == _State.IDLE)
        with m.If(self.spans.valid & self.spans.ready):
            payload = self.spans.payload
            m.d.sync += span.eq(payload)
            with m.If(payload.capture & payload.product):
                m.d.sync += state.eq(_State.OPERANDS)
            with m.Elif(payload.capture & payload.load):
                m.d.sync += state.eq(_State.ROWS)
            with m.Else():
                m.d.sync += state.eq(_State.PASS)

        quiet = Signal()          # no chunk waits or replays, nothing in the pipelines, nothing owed or leaving
        table_read = self.table.read_port(domain="sync", transparent_for=())
        fields_read = self.row_fields.read_port(domain="sync", transparent_for=())
        # the gradient's mode and scale, once the last gradient has left; a product's token rows
        tokens, forward = Signal(range(cfg.max_tokens + 1)), Signal()
        with m.If(self.rows.valid & self.rows.ready):
            m.d.sync += [transposed.eq(span.transposed), scale.eq(span.scale)]
        with m.If(self.operands.valid & self.operands.ready):
            m.d.sync += [tokens.eq(span.tokens), forward.eq(~span.transposed)]
        self._load(m, state, span, quiet, table_read, fields_read)
        full, meta, filled = self._capture(m, state, span)
        busy, owed, emitting, owed_rows, sums = self._replay(m, platform, full, filled, meta, table_read,
                                                             fields_read, transposed, state == _State.ALIGN)
        with m.If(owed & ~busy):
            m.d.sync += [owed.eq(0), emitting.eq(1)]
        leaving = self._emit(m, emitting & ~owed_rows, emitting, sums, scale, transposed)
        self._emit_rows(m, emitting & owed_rows, emitting, tokens, forward, sums)
        m.d.comb += quiet.eq(~full.any() & ~busy & ~owed & ~emitting & ~leaving)
        return m

    def _load(self, m, state, span, quiet, table_read, fields_read):
        """A new gradient's rows into the table (token ``t`` at entry ``t``), each lane's largest exponent field
        per chunk of 16 tokens kept as they arrive; then, transposed, x's chunk fields. Or a product span's
        operands: forward A's rows (value ``k`` of row ``j`` at entry ``k``, lane ``j``; each row's chunk its own
        field), transposed B's rows (value ``j`` of row ``k`` at the same place; each chunk of 16 rows one field
        over all of them). Then each operand aligned to its group's field, in place, one a cycle."""
        rank = self.config.rank
        all_lanes = (1 << rank) - 1
        table = self.table.write_port(granularity=1)
        fields = self.row_fields.write_port(granularity=1)

        t = Signal(range(self.config.max_tokens))
        m.d.comb += self.rows.ready.eq((state == _State.ROWS) & quiet)
        take = self.rows.valid & self.rows.ready
        running = [Signal(8, name=f"row_field_{lane}") for lane in range(rank)]
        currents = [Signal(8, name=f"row_field_now_{lane}") for lane in range(rank)]
        opens = t % CHUNK == 0
        closes = (t % CHUNK == CHUNK - 1) | (t == span.tokens - 1)
        for lane in range(rank):
            field = biased_exponent(self.rows.payload[lane])
            m.d.comb += currents[lane].eq(Mux(opens | (field > running[lane]), field, running[lane]))
            with m.If(take):
                m.d.sync += running[lane].eq(currents[lane])

        m.d.comb += self.operands.ready.eq((state == _State.OPERANDS) & quiet)
        take_operand = self.operands.valid & self.operands.ready
        operand = self.operands.payload
        k, operand_field, loaded = load_operands(m, take_operand, operand, span.transposed, rank, table, fields)
        with m.If(loaded):
            m.d.sync += state.eq(_State.ALIGN)

        with m.If(state == _State.OPERANDS):
            m.d.comb += [table.addr.eq(k), fields.addr.eq(k // CHUNK)]
            for lane in range(rank):
                m.d.comb += [table.data[lane].eq(operand), fields.data[lane].eq(operand_field)]
        with m.Else():
            m.d.comb += [table.addr.eq(t), fields.addr.eq(t // CHUNK)]
            for lane in range(rank):
                m.d.comb += [table.data[lane].eq(self.rows.payload[lane]), fields.data[lane].eq(currents[lane])]
        with m.If(take):
            m.d.comb += [table.en.eq(all_lanes), fields.en.eq(Mux(closes, all_lanes, 0))]
            m.d.sync += t.eq(t + 1)
            with m.If(t == span.tokens - 1):
                m.d.sync += [t.eq(0), state.eq(Mux(span.transposed, _State.FIELDS, _State.ALIGN))]

        chunk = Signal(range(self.config.chunks))
        x_fields = self.x_fields.write_port()
        m.d.comb += [self.fields.ready.eq(state == _State.FIELDS),
                     x_fields.addr.eq(chunk), x_fields.data.eq(self.fields.payload),
                     x_fields.en.eq(self.fields.valid & self.fields.ready)]
        with m.If(self.fields.valid & self.fields.ready):
            m.d.sync += chunk.eq(chunk + 1)
            with m.If((chunk + 1) * CHUNK >= span.tokens):
                m.d.sync += [chunk.eq(0), state.eq(_State.ALIGN)]
        # last: the aligner's writes take the table's port while it aligns
        aligned = align_in_place(m, state == _State.ALIGN, Mux(span.product, SPAN, span.tokens),
                                 self.config.entries, rank, table, table_read, fields_read)
        with m.If(aligned):
            m.d.sync += state.eq(_State.PASS)

    def _capture(self, m, state, span):
        """The span's values on to ``passed``; with ``capture`` each chunk of 16 token rows into one half of the
        buffer, and the largest exponent field of each of its groups (a gradient's: per feature; a product's: per
        token row and chunk of 16 features). Returns the halves' full flags, their chunks
        (:func:`_chunk_layout`) and the half filled this cycle (one-hot)."""
        cfg = self.config
        full = Signal(2)
        meta = [Signal(_chunk_layout(cfg), name=f"half_{h}") for h in range(2)]
        half = Signal()
        feature, row, chunk = Signal(range(SPAN)), Signal(range(CHUNK)), Signal(range(cfg.chunks))
        capture, product = span.capture, span.product
        room = ~capture | ~full.bit_select(half, 1)
        passing = state == _State.PASS
        m.d.comb += [self.passed.valid.eq(self.values.valid & passing & room & ~span.sink),
                     self.values.ready.eq((self.passed.ready | span.sink) & passing & room),
                     self.passed.payload.eq(self.values.payload)]
        take = self.values.valid & self.values.ready
        port = self.buffer.write_port()
        m.d.comb += [port.addr.eq(Cat(feature, row, half)), port.data.eq(self.values.payload),
                     port.en.eq(take & capture)]
        fields_read = self.value_fields.read_port(domain="comb")
        fields_write = self.value_fields.write_port()
        field = biased_exponent(self.values.payload)
        group = Mux(product, Cat(feature[4:], row, half), Cat(feature, half))
        opens = Mux(product, feature % CHUNK == 0, row == 0)
        m.d.comb += [fields_read.addr.eq(group), fields_write.addr.eq(group),
                     fields_write.data.eq(Mux(opens | (field > fields_read.data), field, fields_read.data)),
                     fields_write.en.eq(take & capture)]
        # a forward product's x: its chunk's largest field over all columns (afresh at the reduction's first value)
        seen_read = self.x_seen.read_port(domain="comb")
        seen_write = self.x_seen.write_port()
        fresh = span.first & (row == 0) & (feature == 0)
        m.d.comb += [seen_read.addr.eq(chunk), seen_write.addr.eq(chunk),
                     seen_write.data.eq(Mux(fresh | (field > seen_read.data), field, seen_read.data)),
                     seen_write.en.eq(take & capture & product & ~span.transposed)]
        tokens_left = span.tokens - chunk * CHUNK
        length = Mux(tokens_left > CHUNK, CHUNK, tokens_left)
        filled = Signal(2)
        with m.If(take):
            m.d.sync += feature.eq(feature + 1)
            with m.If(feature == SPAN - 1):
                m.d.sync += row.eq(row + 1)
                with m.If(row == length - 1):
                    last = tokens_left <= CHUNK
                    m.d.sync += [row.eq(0), chunk.eq(Mux(last, 0, chunk + 1))]
                    with m.If(capture):
                        for h in range(2):
                            with m.If(half == h):
                                m.d.sync += [meta[h].chunk.eq(chunk), meta[h].length.eq(length),
                                             meta[h].product.eq(product),
                                             meta[h].first.eq(Mux(product, span.first, chunk == 0)),
                                             meta[h].last.eq(last & (~product | span.last))]
                        m.d.comb += filled.eq(Mux(half, 0b10, 0b01))
                        m.d.sync += half.eq(~half)
                    with m.If(last):
                        m.d.sync += state.eq(_State.IDLE)
        return full, meta, filled

    def _replay(self, m, platform, full, filled, meta, table_port, fields_port, transposed, aligning):
        """A full half replayed against the table's entries, one value a cycle: a gradient's feature by feature,
        each feature's token values (16 a feature, those past the chunk's length as zeros); a product's token row
        by token row, each row's 64 values in four chunks. Each value is aligned to its group's field, the
        ``rank`` operands to theirs, ``rank`` products summed exactly over the chunk; each chunk's sums then leave
        one a cycle into the float32 partial sums (a gradient's feature's, a product's token row's). A span's
        first chunk waits until the gradient or rows before have left. Returns whether anything is in the
        pipelines, whether a gradient or rows are owed (the last chunk replayed) and leaving, whether the owed
        are rows, and the partial sums' read port."""
        cfg = self.config
        rank = cfg.rank
        active, half = Signal(), Signal()
        feature, row = Signal(range(SPAN)), Signal(range(CHUNK))
        owed, emitting, owed_rows = Signal(), Signal(), Signal()
        current = Signal(_chunk_layout(cfg))
        m.d.comb += current.eq(Mux(half, meta[1], meta[0]))
        start = ~active & full.bit_select(half, 1) & ~owed & ~emitting
        held = Signal(_chunk_layout(cfg))
        product = held.product
        with m.If(start):
            m.d.sync += [active.eq(1), feature.eq(0), row.eq(0), held.eq(current)]
        issue = active
        clear, done = Signal(2), Signal()
        with m.If(issue):
            with m.If(product):
                m.d.sync += feature.eq(feature + 1)
                with m.If(feature == SPAN - 1):
                    m.d.sync += row.eq(row + 1)
                    m.d.comb += done.eq(row == held.length - 1)
            with m.Else():
                m.d.sync += row.eq(row + 1)
                with m.If(row == CHUNK - 1):
                    m.d.sync += feature.eq(feature + 1)
                    m.d.comb += done.eq(feature == SPAN - 1)
            with m.If(done):
                m.d.sync += [active.eq(0), half.eq(~half)]
                m.d.comb += clear.eq(Mux(half, 0b10, 0b01))
                with m.If(held.last):
                    m.d.sync += [owed.eq(1), owed_rows.eq(product)]
        m.d.sync += full.eq((full & ~clear) | filled)

        # stage 0: the reads; stage 1: the value and its group's field; stages 2-3: the alignment (the operands
        # read at stage 2); 4-5: the products; 6: the sums
        buffer = self.buffer.read_port(domain="sync", transparent_for=())
        value_fields = self.value_fields.read_port(domain="comb")
        x_fields = self.x_fields.read_port(domain="comb")
        m.d.comb += [buffer.addr.eq(Cat(feature, row, half)),
                     value_fields.addr.eq(Mux(product, Cat(feature[4:], row, half), Cat(feature, half))),
                     x_fields.addr.eq(held.chunk)]
        group_field, real = Signal(8), Signal()
        m.d.sync += [group_field.eq(Mux(transposed & ~product, x_fields.data, value_fields.data)),
                     real.eq(row < held.length)]
        with m.If(~aligning):
            entry = Mux(product, feature, held.chunk * CHUNK + row)
            m.d.comb += [table_port.addr.eq(delay_line(m, 1, entry, 2, "table_address")),
                         fields_port.addr.eq(Mux(product, feature // CHUNK, held.chunk))]
        tag = Signal(data.StructLayout({"opens": 1, "closes": 1, "index": range(cfg.entries), "first": 1}))
        m.d.comb += [tag.opens.eq(Mux(product, feature % CHUNK == 0, row == 0)),
                     tag.closes.eq(Mux(product, feature % CHUNK == CHUNK - 1, row == CHUNK - 1)),
                     tag.index.eq(Mux(product, held.chunk * CHUNK + row, feature)),
                     tag.first.eq(held.first & (~product | (feature < CHUNK)))]
        stream_busy, (valid, entry, lane), closed = chunk_products(
            m, platform, rank, issue, Mux(real, buffer.data, 0), group_field, table_port.data, fields_port.data, tag)
        float_busy, partials = accumulate_chunks(m, self.sums, valid, entry, closed.index * rank + lane,
                                                 closed.first)
        busy = active | stream_busy | float_busy | valid
        return busy, owed, emitting, owed_rows, partials

    def _emit(self, m, active, emitting, sums, scale, transposed):
        """While ``active`` (an owed gradient, its sums all in): the partial sums read one a cycle (feature after
        feature; transposed, lane after lane), multiplied by ``s`` and queued for ``grads`` (a read is issued only
        when the queue has room for it); ``emitting`` cleared after the last read. Returns whether values are
        still in the multiplier or the queue (the next gradient's ``s`` waits for them)."""
        rank = self.config.rank
        feature, lane = Signal(range(SPAN)), Signal(range(rank))
        m.submodules.scale = multiply = FPMul(FP32, FP32, FP32, stages=6)
        depth = multiply.latency + 2
        m.submodules.scaled = queue = SyncFIFOBuffered(width=FP32.width, depth=depth)
        outstanding = Signal(range(depth + 1))          # issued and not yet taken from the queue
        issue = active & (outstanding < depth)
        taken = queue.r_stream.valid & queue.r_stream.ready
        m.d.sync += outstanding.eq(outstanding + issue - taken)
        with m.If(issue):
            m.d.comb += sums.addr.eq(feature * rank + lane)
            with m.If(~transposed):
                # grad_B's rows: feature after feature
                m.d.sync += lane.eq(Mux(lane == rank - 1, 0, lane + 1))
                with m.If(lane == rank - 1):
                    m.d.sync += feature.eq(feature + 1)
                    with m.If(feature == SPAN - 1):
                        m.d.sync += [feature.eq(0), emitting.eq(0)]
            with m.Else():
                # grad_A's rows: the span's 64 columns of each row, row after row
                m.d.sync += feature.eq(Mux(feature == SPAN - 1, 0, feature + 1))
                with m.If(feature == SPAN - 1):
                    m.d.sync += lane.eq(lane + 1)
                    with m.If(lane == rank - 1):
                        m.d.sync += [lane.eq(0), emitting.eq(0)]
        m.d.comb += [multiply.a.eq(scale), multiply.b.eq(sums.data),
                     queue.w_stream.valid.eq(delay_line(m, 1, issue, 1 + multiply.latency, "scaled_valid")),
                     queue.w_stream.payload.eq(multiply.result)]
        wiring.connect(m, queue.r_stream, wiring.flipped(self.grads))
        return outstanding != 0

    def _emit_rows(self, m, active, emitting, tokens, forward, sums):
        """While ``active`` (owed rows, their sums all in): each token row's ``rank`` partial sums read one a
        cycle, rounded to bf16 and gathered into one ``rows_out`` beat; then, ``forward``, x's chunk fields on
        ``x_fields_out``; ``emitting`` cleared as the last leaves."""
        rank = self.config.rank
        fields_phase, chunk = Signal(), Signal(range(self.config.chunks))
        seen = self.x_seen.read_port(domain="comb")
        m.d.comb += [seen.addr.eq(chunk), self.x_fields_out.payload.eq(seen.data),
                     self.x_fields_out.valid.eq(fields_phase)]
        with m.If(self.x_fields_out.valid & self.x_fields_out.ready):
            m.d.sync += chunk.eq(chunk + 1)
            with m.If((chunk + 1) * CHUNK >= tokens):
                m.d.sync += [chunk.eq(0), fields_phase.eq(0), emitting.eq(0)]
        with m.If(emit_rows(m, active & ~fields_phase, sums, self.rows_out, rank, tokens, self.config.max_tokens)):
            with m.If(forward):
                m.d.sync += fields_phase.eq(1)
            with m.Else():
                m.d.sync += emitting.eq(0)
