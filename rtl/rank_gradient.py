"""A LoRA projection's gradient made as an activation passes on its way to the engine (twin:
``golden/rank_gradient.py``): ``grad_B = s dy^T hb`` (the step's B2) from dy's spans, ``grad_A = s gb^T x`` (B3,
``transposed``) from x's.

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
from .rank_product import CHUNK, SPAN, accumulate_chunks, align_in_place, chunk_products

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
        operands (LUT RAM).
    """

    rank: int = 16
    max_tokens: int = 128

    def __post_init__(self):
        if not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be an integer from 1 to {MAX_RANK}, not {self.rank!r}")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= 1 << 12:
            raise ValueError(f"max_tokens must be an integer from 1 to 4096, not {self.max_tokens!r}")

    @property
    def chunks(self):
        """Chunks of 16 tokens in the largest token block."""
        return -(-self.max_tokens // CHUNK)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def span_layout(config):
    """One span: its token rows; ``capture`` (the unit computes on it: else its values only pass); ``load`` (a new
    gradient: the token block's rows, and with ``transposed`` x's chunk exponents, come before its values; the
    last two fields are taken from such a span); ``transposed`` (B3: grad_A from x); ``scale`` (``s``, float32)."""
    return data.StructLayout({"tokens": range(config.max_tokens + 1), "capture": 1, "load": 1, "transposed": 1,
                              "scale": FP32.width})


def _chunk_layout(config):
    """A captured chunk: its index in the token block, its token rows, whether it opens and closes the span."""
    return data.StructLayout({"chunk": range(config.chunks), "length": range(CHUNK + 1), "first": 1, "last": 1})


class _State(enum.Enum, shape=3):
    IDLE = 0     # waiting for a span
    ROWS = 1     # a new gradient's rows into the table, raw (once the last gradient has left)
    FIELDS = 2   # transposed: x's chunk exponents
    ALIGN = 3    # the table's operands aligned in place, one a cycle
    PASS = 4     # the span's activation values, on to ``passed`` (and, captured, into the chunk buffer)


class RankGradient(wiring.Component):
    """grad_B (or grad_A) of a token block, from the activation spans that pass through it.

    Per span one ``spans`` beat. With ``load`` (and ``capture``), ``tokens`` beats of ``rows`` (hb or gb, a token
    row each), then, ``transposed``, ``ceil(tokens / 16)`` beats of ``fields`` (x's chunk exponents as biased
    bf16 fields, :func:`edge_qlora.golden.rank_gradient.x_chunk_fields`). Then the span's ``tokens * 64``
    activation ``values`` (token row after token row), each of which leaves on ``passed`` unchanged. After a
    captured span's last values its ``64 * rank`` float32 gradient values leave on ``grads``, one a beat, in the
    order of the gradient in memory: grad_B's 64 rows (``rank`` values each), transposed the span's 64 columns of
    each of grad_A's ``rank`` rows. Rows and activation must be finite bf16.

    The activation passes one value a cycle while the unit keeps up: a chunk of 16 token rows replays in 1,024
    cycles while the next one fills; a span's ``64 * rank`` values of ``grads`` leave one a cycle, while the
    next span's first chunk fills but does not replay. A new gradient's rows load one a cycle and align in place
    through one aligner (``tokens * rank`` cycles), after the last gradient has left.

    Parameters
    ----------
    config : RankGradientConfig

    Attributes
    ----------
    spans : In(stream of :func:`span_layout`)
    rows : In(stream of ArrayLayout(BF16.width, rank))
    fields : In(stream of 8 bits)
    values : In(stream of bf16)
    passed : Out(stream of bf16)
    grads : Out(stream of float32)
    table : Memory of the rows, entry ``t`` (token) holding lane ``j``: raw bf16 as they load, then aligned
        18-bit operands
    buffer : Memory of two chunks of the activation, entry ``(half, token, feature)``
    sums : Memory of the float32 partial sums, entry ``feature * rank + j``
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
            "values": In(bf16), "passed": Out(bf16),
            "grads": Out(stream.Signature(FP32.width)),
        })
        rank = config.rank
        self.table = Memory(shape=data.ArrayLayout(OPERAND_BITS, rank), depth=config.max_tokens, init=[],
                            attrs={"ram_style": "distributed"})
        self.row_fields = Memory(shape=data.ArrayLayout(8, rank), depth=config.chunks, init=[])
        self.x_fields = Memory(shape=8, depth=config.chunks, init=[])
        self.buffer = Memory(shape=BF16.width, depth=2 * CHUNK * SPAN, init=[])
        # dy's per feature and chunk, the largest so far as the chunk fills
        self.value_fields = Memory(shape=8, depth=2 * SPAN, init=[])
        self.sums = Memory(shape=FP32.width, depth=SPAN * rank, init=[])

    def elaborate(self, platform):
        cfg = self.config
        m = Module()
        for name in ("table", "row_fields", "x_fields", "buffer", "value_fields", "sums"):
            m.submodules[name] = getattr(self, name)
        state = Signal(_State)
        span = Signal(span_layout(cfg))
        transposed, scale = Signal(), Signal(FP32.width)
        m.d.comb += self.spans.ready.eq(state == _State.IDLE)
        with m.If(self.spans.valid & self.spans.ready):
            payload = self.spans.payload
            m.d.sync += [span.eq(payload),
                         state.eq(Mux(payload.capture & payload.load, _State.ROWS, _State.PASS))]

        quiet = Signal()          # no chunk waits or replays, nothing in the pipelines, no gradient owed or leaving
        table_read = self.table.read_port(domain="sync", transparent_for=())
        fields_read = self.row_fields.read_port(domain="sync", transparent_for=())
        # the gradient's mode and scale, once the last gradient has left
        with m.If(self.rows.valid & self.rows.ready):
            m.d.sync += [transposed.eq(span.transposed), scale.eq(span.scale)]
        self._load(m, state, span, quiet, table_read, fields_read)
        full, meta, filled = self._capture(m, state, span)
        busy, owed, emitting, sums = self._replay(m, platform, full, filled, meta, table_read, fields_read,
                                                  transposed, state == _State.ALIGN)
        leaving = self._emit(m, owed, emitting, busy, sums, scale, transposed)
        m.d.comb += quiet.eq(~full.any() & ~busy & ~owed & ~emitting & ~leaving)
        return m

    def _load(self, m, state, span, quiet, table_read, fields_read):
        """A new gradient's rows into the table (token ``t`` at entry ``t``), each lane's largest exponent field
        per chunk of 16 tokens kept as they arrive; then, transposed, x's chunk fields; then each operand aligned
        to its lane's chunk field, in place, one a cycle."""
        rank = self.config.rank
        t = Signal(range(self.config.max_tokens))
        m.d.comb += self.rows.ready.eq((state == _State.ROWS) & quiet)
        take = self.rows.valid & self.rows.ready
        table = self.table.write_port(granularity=1)
        fields = self.row_fields.write_port()
        m.d.comb += [table.addr.eq(t), fields.addr.eq(t // CHUNK)]
        running = [Signal(8, name=f"row_field_{lane}") for lane in range(rank)]
        opens = t % CHUNK == 0
        closes = (t % CHUNK == CHUNK - 1) | (t == span.tokens - 1)
        for lane in range(rank):
            value = self.rows.payload[lane]
            field = biased_exponent(value)
            current = Mux(opens | (field > running[lane]), field, running[lane])
            m.d.comb += [table.data[lane].eq(value), fields.data[lane].eq(current)]
            with m.If(take):
                m.d.sync += running[lane].eq(current)
        with m.If(take):
            m.d.comb += [table.en.eq((1 << rank) - 1), fields.en.eq(closes)]
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
        aligned = align_in_place(m, state == _State.ALIGN, span.tokens, self.config.max_tokens, rank, table,
                                 table_read, fields_read)
        with m.If(aligned):
            m.d.sync += state.eq(_State.PASS)

    def _capture(self, m, state, span):
        """The span's values on to ``passed``; with ``capture`` each chunk of 16 token rows into one half of the
        buffer, and, per feature, its largest exponent field over the chunk. Returns the halves' full flags,
        their chunks (:func:`_chunk_layout`) and the half filled this cycle (one-hot)."""
        cfg = self.config
        full = Signal(2)
        meta = [Signal(_chunk_layout(cfg), name=f"half_{h}") for h in range(2)]
        half = Signal()
        feature, row, chunk = Signal(range(SPAN)), Signal(range(CHUNK)), Signal(range(cfg.chunks))
        capture = span.capture
        room = ~capture | ~full.bit_select(half, 1)
        passing = state == _State.PASS
        m.d.comb += [self.passed.valid.eq(self.values.valid & passing & room),
                     self.values.ready.eq(self.passed.ready & passing & room),
                     self.passed.payload.eq(self.values.payload)]
        take = self.values.valid & self.values.ready
        port = self.buffer.write_port()
        m.d.comb += [port.addr.eq(Cat(feature, row, half)), port.data.eq(self.values.payload),
                     port.en.eq(take & capture)]
        fields_read = self.value_fields.read_port(domain="comb")
        fields_write = self.value_fields.write_port()
        field = biased_exponent(self.values.payload)
        m.d.comb += [fields_read.addr.eq(Cat(feature, half)), fields_write.addr.eq(Cat(feature, half)),
                     fields_write.data.eq(Mux((row == 0) | (field > fields_read.data), field, fields_read.data)),
                     fields_write.en.eq(take & capture)]
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
                                             meta[h].first.eq(chunk == 0), meta[h].last.eq(last)]
                        m.d.comb += filled.eq(Mux(half, 0b10, 0b01))
                        m.d.sync += half.eq(~half)
                    with m.If(last):
                        m.d.sync += state.eq(_State.IDLE)
        return full, meta, filled

    def _replay(self, m, platform, full, filled, meta, table_port, fields_port, transposed, aligning):
        """A full half replayed feature by feature, each feature's token values one a cycle (16 a feature, those
        past the chunk's length as zeros) against the table's entries: the value aligned to its group's field, the
        ``rank`` operands to theirs, ``rank`` products summed exactly over the chunk; each chunk's sums then leave
        one a cycle into the feature's float32 partial sums. A span's first chunk waits until the gradient before
        has left. Returns whether anything is in the pipelines, whether a gradient is owed (its last chunk
        replayed) or leaving, and the partial sums' read port."""
        cfg = self.config
        rank = cfg.rank
        active, half = Signal(), Signal()
        feature, row = Signal(range(SPAN)), Signal(range(CHUNK))
        owed, emitting = Signal(), Signal()
        current = Signal(_chunk_layout(cfg))
        m.d.comb += current.eq(Mux(half, meta[1], meta[0]))
        start = ~active & full.bit_select(half, 1) & ~owed & ~emitting
        held = Signal(_chunk_layout(cfg))
        with m.If(start):
            m.d.sync += [active.eq(1), feature.eq(0), row.eq(0), held.eq(current)]
        issue = active
        clear = Signal(2)
        with m.If(issue):
            m.d.sync += row.eq(row + 1)
            with m.If(row == CHUNK - 1):
                m.d.sync += feature.eq(feature + 1)
                with m.If(feature == SPAN - 1):
                    m.d.sync += [active.eq(0), half.eq(~half)]
                    m.d.comb += clear.eq(Mux(half, 0b10, 0b01))
                    with m.If(held.last):
                        m.d.sync += owed.eq(1)
        m.d.sync += full.eq((full & ~clear) | filled)

        # stage 0: the reads; stage 1: the value and its group's field; stages 2-3: the alignment (the operands
        # read at stage 2); 4-5: the products; 6: the sums
        buffer = self.buffer.read_port(domain="sync", transparent_for=())
        value_fields = self.value_fields.read_port(domain="comb")
        x_fields = self.x_fields.read_port(domain="comb")
        m.d.comb += [buffer.addr.eq(Cat(feature, row, half)), value_fields.addr.eq(Cat(feature, half)),
                     x_fields.addr.eq(held.chunk)]
        group_field, real = Signal(8), Signal()
        m.d.sync += [group_field.eq(Mux(transposed, x_fields.data, value_fields.data)),
                     real.eq(row < held.length)]
        with m.If(~aligning):
            m.d.comb += [table_port.addr.eq(delay_line(m, 1, held.chunk * CHUNK + row, 2, "table_address")),
                         fields_port.addr.eq(held.chunk)]
        tag = Signal(data.StructLayout({"opens": 1, "closes": 1, "feature": range(SPAN), "first": 1}))
        m.d.comb += [tag.opens.eq(row == 0), tag.closes.eq(row == CHUNK - 1), tag.feature.eq(feature),
                     tag.first.eq(held.first)]
        stream_busy, (valid, entry, lane), closed = chunk_products(
            m, platform, rank, issue, Mux(real, buffer.data, 0), group_field, table_port.data, fields_port.data, tag)
        float_busy, partials = accumulate_chunks(m, self.sums, valid, entry, closed.feature * rank + lane,
                                                 closed.first)
        busy = active | stream_busy | float_busy | valid
        return busy, owed, emitting, partials

    def _emit(self, m, owed, emitting, busy, sums, scale, transposed):
        """Once an owed gradient's sums are all in: the partial sums read one a cycle (feature after feature;
        transposed, lane after lane), multiplied by ``s`` and queued for ``grads`` (a read is issued only when the
        queue has room for it). Returns whether values are still in the multiplier or the queue (the next
        gradient's ``s`` waits for them)."""
        rank = self.config.rank
        feature, lane = Signal(range(SPAN)), Signal(range(rank))
        with m.If(owed & ~busy):
            m.d.sync += [owed.eq(0), emitting.eq(1)]
        m.submodules.scale = multiply = FPMul(FP32, FP32, FP32, stages=6)
        depth = multiply.latency + 2
        m.submodules.scaled = queue = SyncFIFOBuffered(width=FP32.width, depth=depth)
        outstanding = Signal(range(depth + 1))          # issued and not yet taken from the queue
        issue = emitting & (outstanding < depth)
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
