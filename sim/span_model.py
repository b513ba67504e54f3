"""The cycle model with memory of the step top's two products (``BlockedConfig.gradient``), span by span.

``sim.blocked.model_cycles`` sums a product's block jobs and takes the reads behind them as hidden, which holds at
T = 128, where a span's job is long. With few token rows it is not: a span's reads, the rank-r unit's chain
(``rtl/rank_gradient.py``: a span's operands loaded and aligned, the activation passed, its last chunk replayed,
a gradient leaving) and the outputs' and gradients' writes set the pace. This model follows the design's requests
in program order (``golden/blockprogram.py``), span by span:

* the port serves the reads one group after another (the tagged reader requests a burst only when its
  destination's FIFO has room, so the reads stay in order), each group taking the DRAM model's time for its
  requests alone, but no faster than its consumer takes the words (the unit one operand or value a cycle, the
  absmax table one code a cycle, the rank term one column value a cycle, the engine its codes as its job streams
  them, the codes FIFO holding at most ``codes_words``); a read FIFO lets the port run ahead of its consumer by
  ``fifo_words`` less one request;
* the writes (outputs, grad_B, grad_A) hold the port for their own DRAM time, and the reads wait for them; a
  gradient leaves no faster than its writes take it, each burst's values gathered before the burst is sent;
* the unit, its two-chunk buffer, the x buffer, the engine and the rank term are each one resource, taken in the
  order the design takes them (a span's job once the job before has ended and its activation is in the x buffer;
  a block's outputs once its rows, hb or gb, are made; a backward block's first job once the block before has
  passed its outputs).

Measured against Verilator on 28 forward and 28 backward steps (T = 8 to 128, both board presets) and the
TinyLlama projections at T = 128: ``docs/blocked.md``.
"""

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.memmap import layout
from edge_qlora.rtl.blocked import SPAN

from .blocked_schedule import job_cycles, program
from .memstep import _timing

__all__ = ["forward_cycles", "backward_cycles"]

#: Cycles from a group's first request to its first word at the consumer.
_FIRST_WORD = 10
#: Cycles from a group's last word in memory to the consumer having it.
_LATENCY = 4
#: A job's codes reach the engine this long after its A tiles have loaded; its last W tile computes, and its sums
#: drain, this long past its last codes (besides the tile itself).
_JOB_START = 10
_JOB_TAIL = {False: 50, True: 60}
#: Cycles from the last room in the codes FIFO to its burst's request.
_ROOM = 20
#: The unit: from the last operand to its alignment's start; from the reduction's last span to its rows leaving.
_ALIGN_START = 4
_EMIT = 90
#: The rank term: from a forward block's last job's start to its first output; from a block's last output to its
#: writes' end.
_FIRST_OUTPUT = 100
_DRAIN = 30
#: Cycles the rank term spends per beat of A's columns (``rank`` of them, written a column a cycle) besides
#: ``rank`` (a beat of B's rows forward takes ``rank``).
_COLUMN_BEAT = 4
#: Cycles a chunk of 16 token rows takes to replay in a gradient (feature by feature over its 16 slots, however
#: many hold a token).
_GRADIENT_REPLAY = 16 * 64


def _runs(reqs):
    """The requests as runs of one ``(op, tensor)``, in order."""
    out = []
    for q in reqs:
        if out and out[-1][0] == (q.op, q.tensor):
            out[-1][1].append(q)
        else:
            out.append(((q.op, q.tensor), [q]))
    return out


class _Port:
    """The port's time: a read cursor that the groups advance in order, and the writes, each after the writes
    before, which the reads wait for."""

    def __init__(self, config, timing):
        self.timing = timing
        self.port = mp.PortShape.of(config.port)
        self.word_bytes = self.port.word_bytes
        self.fifo_words = config.fifo_words
        self.busy = []
        self.writes = 0

    def alone(self, group):
        """The DRAM model's cycles for ``group``'s requests alone, in order."""
        return bp.dram_time(self.timing, self.port, group).cycles if group else 0

    def advance(self, start, cycles):
        """When ``cycles`` of reads from ``start`` end, around the writes."""
        t, left = start, cycles
        for lo, hi in sorted(self.busy):
            if hi <= t:
                continue
            if lo >= t + left:
                break
            if lo > t:
                left -= lo - t
            t = hi
        return t + left

    def read(self, start, group, consumer, per_word):
        """``group`` read from ``start`` by a consumer free from ``consumer`` that takes a word in ``per_word``
        cycles: (when the port has read it all, when the consumer has taken it all)."""
        words = sum(q.length for q in group)
        # the port runs ahead of the consumer by what the FIFO holds (a request only once it has room for it all)
        lead = (self.fifo_words - max(q.length for q in group)) * per_word
        end = self.advance(max(start, consumer - lead), self.alone(group))
        taken = max(end + _LATENCY, max(consumer, start + _FIRST_WORD) + words * per_word)
        return max(end, taken - lead), taken

    def write(self, start, cycles):
        """Reserve ``cycles`` of writes from ``start``, after the writes before and around the port's other
        reservations; returns their end."""
        lo = max(start, self.writes)
        self.writes = self.advance(lo, cycles)
        self.busy.append((lo, self.writes))
        return self.writes


class _Codes:
    """The codes FIFO (``capacity`` words) between the port and the engine's jobs, which take their codes over
    their W stream."""

    def __init__(self, capacity):
        self.capacity, self.read_words, self.jobs = capacity, 0, []

    def room(self, words, stream):
        """When the FIFO has room for the last of a span's ``words``, its job streaming over ``stream`` (start,
        end); 0 when it always has."""
        need = self.read_words + words - self.capacity
        self.read_words += words
        done = 0
        for start, end, count in self.jobs + [(*stream, words)]:
            if need <= 0:
                return 0
            if done + count >= need:
                return start + (end - start) * (need - done) / count + _ROOM
            done += count
        return 0

    def taken(self, start, end, words):
        """A job takes its ``words`` codes from ``start`` to ``end``."""
        self.jobs.append((start, end, words))


class _Chunks:
    """The unit's two-chunk buffer in a gradient's spans: a chunk of 16 token rows fills (one value a cycle) once
    its half has replayed, replays (:data:`_GRADIENT_REPLAY`) once it is full and the chunk before has replayed
    and, a span's first, once the span before's gradient has left; the gradient leaves after the span's last."""

    def __init__(self):
        self.free = [0, 0]          # when each half has replayed
        self.half = 0
        self.filled = self.replayed = self.left = 0

    def ready(self):
        """When the next span's first chunk can start to fill."""
        return max(self.filled, self.free[self.half])

    def span(self, rows, start, passed, leaving):
        """A span of ``rows`` token rows whose values can come from ``start`` and have all come by ``passed``
        (the port's pace); ``leaving(replayed)``: when its gradient has left, from its last replay's end. Returns
        (when the values have passed, when the last chunk has replayed)."""
        for c in range(0, rows, 16):
            fill = max(self.filled, self.free[self.half], start if c == 0 else 0) + min(16, rows - c) * 64
            self.filled = fill = max(fill, passed) if c + 16 >= rows else fill
            self.replayed = max(fill, self.replayed, self.left if c == 0 else 0) + _GRADIENT_REPLAY
            self.free[self.half] = self.replayed
            self.half ^= 1
        self.left = leaving(self.replayed)
        return self.filled, self.replayed


def _requests(config, t, d_in, d_out, tokens, features, rank, transposed, x_per_span):
    """The product's requests (``golden/blockprogram.py``) as :func:`_runs`."""
    memmap = layout(d_in, d_out, t, rank, row_exponent_chunk=config.gemm.chunk_steps if transposed else None,
                    gradients_out=True, rank_rows=True)
    port = mp.PortShape.of(config.port)
    return _runs(bp.requests(port, program(config, memmap, tokens, features, transposed, x_per_span)))


def forward_cycles(config, memory, t, d_in, d_out, tokens, features, rank=16):
    """Cycles of the forward product ``y = bf16(x W^T + s hb B^T)`` with hb, on the step top ``config`` (a
    :class:`~edge_qlora.rtl.blocked.BlockedConfig` with the gradient) behind ``memory``'s DRAM model, in blocks of
    ``tokens x features``."""
    port = _Port(config, _timing(memory))
    wb, g, r = port.word_bytes, config.gemm, config.rank
    runs = _requests(config, t, d_in, d_out, tokens, features, rank, False, None)
    codes_fifo = _Codes(config.codes_words)
    spans = d_in // SPAN
    i = m = e = unit = xb = term = table = end = 0
    for t0 in range(0, t, tokens):
        nt = min(tokens, t - t0)
        for f0 in range(0, d_out, features):
            nf = min(features, d_out - f0)
            job = job_cycles(config, nt, nf, False)
            a_tiles = nt // g.rows
            a_load = a_tiles * SPAN + _JOB_START
            tail = a_tiles * SPAN + _JOB_TAIL[False]
            if runs[i][0][1] == "nf4_absmax2":
                m, _ = port.read(m, runs[i][1], m, wb / 4)
                i += 1
            # the block's absmax codes, into the table once the block before has taken its last column
            m, table_loaded = port.read(m, runs[i][1], table, wb)
            i += 1
            unit_block = runs[i][0][1] == "lora_A"
            outputs = next(group for (op, name), group in runs[i:] if name == "y")
            for s in range(spans):
                if unit_block:
                    # A's piece into the unit once it has replayed the span before, aligned, then x through it
                    m, loaded = port.read(m, runs[i][1], unit, wb / 4)
                    m, x_end = port.read(m, runs[i + 1][1], max(loaded + SPAN * r + _ALIGN_START, xb), wb / 2)
                    i += 2
                    unit = x_end + (nt - (nt - 1) // 16 * 16) * SPAN
                else:
                    m, x_end = port.read(m, runs[i][1], xb, wb / 2)
                    i += 1
                codes = runs[i][1]
                i += 1
                words = sum(q.length for q in codes)
                start = max(e, x_end, table_loaded if s == 0 else 0)
                stream = (start + a_load, start + job - tail)
                room = codes_fifo.room(words, stream)
                group = codes
                if s == spans - 1:
                    # the rank term passes the outputs one a cycle from the last job's first tile on, once hb is
                    # made; they leave tile by tile as the last span's codes come, and their writes share the port
                    # with those reads but for the codes read before the first output (no more than the FIFO holds
                    # and the job has taken)
                    first = start + a_load + _FIRST_OUTPUT
                    if unit_block:
                        first = max(first, unit + nt * r + _EMIT)
                    early = min(words * min(1.0, max(0.0, first - m) / port.alone(codes)),
                                config.codes_words + words * max(0, first - start) / job)
                    group, after, got = [], [], 0
                    for k in range(nf // g.cols + 1):
                        piece = codes[k * g.cols:(k + 1) * g.cols]
                        written = outputs[(k - 1) * nt:k * nt] if k else []
                        got += sum(q.length for q in piece)
                        group += piece + written
                        after += (piece if got > early else []) + written
                codes_end = max(port.advance(m, port.alone(group)), room)
                m = codes_end
                e = max(start + job, codes_end + tail)
                codes_fifo.taken(stream[0], max(stream[1], codes_end), words)
                xb = max(x_end, start) + a_tiles * SPAN
                if runs[i][0][1] == "lora_B":
                    # the block's rows of B, into the rank term once it has passed the block before's outputs
                    m, _ = port.read(max(m, term), runs[i][1], term, wb / 4)
                    i += 1
            while i < len(runs) and runs[i][0][0] == "write":
                i += 1
            end = term = max(e + _DRAIN, first + max(nt * nf, port.alone(after)), codes_end + _DRAIN)
            # the writes the last span's codes did not cover hold the port while the next block's first reads come
            lo = max(first, codes_end)
            port.busy.append((lo, lo + max(0, port.alone(outputs) - max(0, codes_end - first))))
            table = e
    return round(end)


def backward_cycles(config, memory, t, d_in, d_out, tokens, features, rank=16, x_per_span=None):
    """Cycles of the backward product ``dx = bf16(dy W + s gb A)`` with gb, grad_B and grad_A, on the step top
    ``config`` behind ``memory``'s DRAM model, in blocks of ``tokens x features`` (``x_per_span``: as
    :func:`~edge_qlora.sim.blocked.run_blocked_product`'s)."""
    timing = _timing(memory)
    port = _Port(config, timing)
    wb, g, r = port.word_bytes, config.gemm, config.rank
    if x_per_span is None:
        x_per_span = bp.x_pass_per_span(d_in, d_out, features)
    runs = _requests(config, t, d_in, d_out, tokens, features, rank, True, x_per_span)
    codes_fifo = _Codes(config.codes_words)
    spans = d_out // SPAN
    per_cycle = timing.peak_bytes_per_cycle / wb

    def leaving(group):
        """Cycles grad_A's span takes to leave through its writes: no faster than one value a cycle or than the
        DRAM model writes it, and each burst's values gathered before the burst is sent at the port's peak. (That
        last term stands for two things the model has no place for: the unit sends 8 values in every 10 cycles,
        and on the SDRAM the reads beside the writes slow them; docs/blocked.md.)"""
        return max(SPAN * r, port.alone(group), sum(q.length * wb / 4 + q.length / per_cycle for q in group))

    grad_b = next((group for (op, name), group in runs if name == "grad_B"), [])
    grad_b = grad_b[:len(grad_b) // spans]
    blocks = [min(features, d_in - f0) for f0 in range(0, d_in, features)]
    m = e = unit = xb = term = out_prev = end = 0
    chunks = _Chunks()
    aligned = rows_ready = columns = start = 0
    block, span, nt = -1, spans, min(tokens, t)
    for n, ((op, name), group) in enumerate(runs):
        if op == "read" and name in ("lora_B", "hb", "dy") and span == spans:
            block, span = block + 1, 0
            nf = blocks[block]
            job = job_cycles(config, nt, nf, True)
            a_tiles = nt // g.rows
            a_load = a_tiles * SPAN + _JOB_START
            mode = ("product", "gradient")[block] if block < 2 else "pass"
        if op == "read" and name in ("nf4_absmax2", "w_row_exponents", "x_fields"):
            m, _ = port.read(m, group, m, wb / 4)
        elif name == "nf4_absmax":
            # the span's absmax codes, into the table one a cycle
            m, _ = port.read(m, group, m, wb)
        elif name == "lora_B":
            # B's span piece into the unit (gb's operands), then aligned
            m, loaded = port.read(m, group, unit, wb / 4)
            aligned = loaded + SPAN * r + _ALIGN_START
        elif name in ("hb", "gb") and op == "read":
            # a gradient's rows, then aligned; the gradient's first chunk replays after that
            m, loaded = port.read(m, group, unit, 1)
            rows_ready = loaded + (nt if name == "hb" else t) * r + _ALIGN_START
            chunks.left = max(chunks.left, rows_ready)
        elif name == "dy":
            consumer = max(xb, unit, aligned if mode == "product" else 0,
                           max(chunks.ready(), rows_ready if span == 0 else 0) if mode == "gradient" else 0)
            m, x_end = port.read(m, group, consumer, wb / 2)
            if mode == "product":
                unit = x_end + (nt - (nt - 1) // 16 * 16) * SPAN
            elif mode == "gradient":
                x_end, _ = chunks.span(nt, consumer, x_end, lambda at: max(
                    at + SPAN * r, port.write(at, port.alone(grad_b))))
                unit = x_end
            else:
                unit = x_end
            start = max(e, x_end, out_prev if span == 0 else 0)
            xb = max(x_end, start) + a_tiles * SPAN
        elif name == "nf4_codes":
            words = sum(q.length for q in group)
            stream = (start + a_load, start + job - _JOB_TAIL[True])
            room = codes_fifo.room(words, stream)
            m = max(port.advance(m, port.alone(group)), room)
            e = max(start + job, m + _JOB_TAIL[True])
            codes_fifo.taken(stream[0], max(stream[1], m), words)
            span += 1
        elif name == "lora_A":
            # the block's piece of A, into the rank term once it has passed the block before's outputs
            m, columns = port.read(max(m, term), group, term, wb / 4 * (r + _COLUMN_BEAT) / r)
        elif name == "x":
            # grad_A's pass: x through the unit (to no buffer) once it has replayed the span before
            consumer = max(unit, rows_ready, chunks.ready())
            m, x_end = port.read(m, group, consumer, wb / 2)
            writes = runs[n + 1][1] if n + 1 < len(runs) and runs[n + 1][0][1] == "grad_A" else []
            unit, _ = chunks.span(t, consumer, x_end, lambda at: max(
                at + leaving(writes), port.write(at, port.alone(writes))))
            end = max(end, chunks.left)
        elif name == "dx":
            # the outputs, whole from the last W tile's first token tile on, pass the rank term one a cycle once
            # gb is made (in the block that makes it) and the block's columns of A are in
            last_tile = job * g.chunk_steps // SPAN
            first = max(e - last_tile + last_tile // a_tiles, columns)
            if mode == "product":
                first = max(first, unit + nt * r + _EMIT)
            # (their writes hold the port; a gradient's writes that come later go around them)
            writes = (first + g.rows * nf, first + g.rows * nf + port.alone(group))
            port.busy.append(writes)
            out_prev = term = max(first + nt * nf, writes[1]) + _DRAIN
            end = max(end, out_prev)
    return round(max(end, m, port.writes))
