"""The cycle model with memory of the step top's two products (``BlockedConfig.gradient``), span by span.

``sim.blocked.model_cycles`` sums a product's block jobs and takes the reads behind them as hidden, which holds at
T = 128, where a span's job is long. With few token rows it is not: a span's reads, the rank-r unit's chain
(``rtl/rank_gradient.py``: a span's operands loaded and aligned, the activation passed, its last chunk replayed,
a gradient leaving) and the outputs' and gradients' writes set the pace. This model follows the design's requests
in program order (``golden/blockprogram.py``), span by span:

* the port serves the reads one group after another (the tagged reader requests a burst only when its
  destination's FIFO has room, so the reads stay in order), each group taking the DRAM model's time for its
  requests alone, but no faster than its consumer takes the words (the unit one operand or value a cycle, the
  absmax table one code a cycle, the rank term one column value a cycle, the engine its codes as its job takes
  them: forward as it streams W, transposed a W tile at a time, one ahead), a read FIFO letting the port run
  ahead of its consumer by what it holds;
* the outputs' and grad_B's writes hold the port, and the reads after them wait; grad_A's writes, which the unit
  sends at its own pace (8 values in 10 cycles), take every other turn with the reads and with the outputs'
  writes, as the RTL's arbiter lets them (a write goes first whenever its burst is staged); on the SDRAM, whose
  write data is due with the command, each write burst starts a cycle or two late;
* the unit, its two-chunk buffer, the x buffer, the engine and the rank term are each one resource, taken in the
  order the design takes them (a span's job once the job before has ended and its activation is in the x buffer;
  a block's outputs once its rows, hb or gb, and its columns are in the rank term; a backward block's first job
  once the block before has passed its outputs); on the ULX3S's 16-bit port the engine's W tiles load at 4 codes
  a cycle, not 8 (:func:`~edge_qlora.sim.blocked_schedule.codes_feed`).

Measured against Verilator on 28 forward and 28 backward products (T = 8 to 128, both board presets), 22 more
held out while the model was written, and the TinyLlama projections at T = 128: ``docs/blocked.md``.
"""

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import dram
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.memmap import layout
from edge_qlora.rtl.blocked import SPAN

from .blocked_schedule import codes_feed, job_cycles, program
from .memstep import _timing

__all__ = ["forward_cycles", "backward_cycles"]

#: Cycles the accelerator's write path gives a burst's first word after its command (measured on Verilator).
_WRITE_START = 2
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
#: The rank term, backward: from its last column (and a product block's last row) to its first output.
_TERM_RUN = 40
#: Cycles the rank term spends per beat of A's columns besides ``rank`` (it writes them a column a cycle and
#: takes the next beat once the one before is scattered: ``rtl/rank_term.py``); a beat of B's rows forward takes
#: ``rank``.
_COLUMN_BEAT = 5
#: Cycles a chunk of 16 token rows takes to replay in a gradient (feature by feature over its 16 slots, however
#: many hold a token).
_GRADIENT_REPLAY = 16 * 64
#: The unit sends a gradient's values 8 in every 10 cycles, the first this long after its replay's end.
_GRAD_PACE = 1.25
_GRAD_LATENCY = 34
#: Runs of the backward model at most (:func:`backward_cycles`).
_PASSES = 4


def _runs(reqs):
    """The requests as runs of one ``(op, tensor)``, in order."""
    out = []
    for q in reqs:
        if out and out[-1][0] == (q.op, q.tensor):
            out[-1][1].append(q)
        else:
            out.append(((q.op, q.tensor), [q]))
    return out


def _alternate(t, left, spans, delay):
    """``left`` cycles of port time from ``t`` beside other traffic in ``spans`` (``(k, (lo, hi))``, in order of
    ``lo``), with which they take every other turn: alone outside them, at half pace inside, each delaying span
    ``k`` by its turns (``delay(k, cycles)``). Returns ``(t, left)``: where the spans end and what is left then."""
    for k, (lo, hi) in spans:
        if hi <= t or left <= 0:
            continue
        if lo > t:
            if lo - t >= left:
                break
            left -= lo - t
            t = lo
        both = min(left, hi - t)
        t, left = t + 2 * both, left - both
        delay(k, both)
    return t, left


class _Port:
    """The port's time. The reads are served in program order (a cursor). Two kinds of writes share the port with
    them, as the RTL's arbiter does (a write first whenever its burst's data is staged):

    * the outputs and grad_B hold the port (``busy``): the reads that come after wait for them, the reads under way
      when they start take every other turn;
    * grad_A's spans (``windows``) are written at the unit's pace, so a burst is not staged the moment the one
      before has gone: the reads take every other turn with them and delay them as much, and so do the outputs'
      writes (two writers alternate burst for burst).

    ``delays``: each grad_A window's delay by the reads, from the model's pass before (see
    :func:`backward_cycles`)."""

    def __init__(self, config, timing, delays=()):
        self.timing = timing
        self.port = mp.PortShape.of(config.port)
        self.word_bytes = self.port.word_bytes
        self.fifo_words = config.fifo_words
        self.busy = []
        self.windows = []
        self.delays = list(delays)
        self.delayed = []
        self.writes = 0             # the last grad_B or grad_A write's end
        self.read_end = 0           # the last read's end
        self.last = {}              # per FIFO, when its last group has been taken and at what pace

    def alone(self, group):
        """The DRAM model's cycles for ``group``'s requests alone, in order, with the write data's late starts."""
        if not group:
            return 0
        cycles = bp.dram_time(self.timing, self.port, group).cycles
        if self.timing.cwl or all(q.op == "read" for q in group):
            return cycles
        # with cwl == 0 a write's first word is due with its command, and the accelerator's write path gives it
        # _WRITE_START cycles later; a row opened first hides all but one of them
        beats = dram.data_beats(self.timing, [(q.address, q.length * self.word_bytes, q.op) for q in group])
        for k, q in enumerate(group):
            if q.op == "write":
                cycles += _WRITE_START if k and beats[k][0] == beats[k - 1][-1] + 1 else 1
        return cycles

    def advance(self, start, cycles):
        """When ``cycles`` of reads from ``start`` end, around the writes that hold the port."""
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

    def serve(self, begin, cycles):
        """When ``cycles`` of reads from ``begin`` end: around the writes that hold the port, taking every other
        turn in grad_A's windows."""
        t, left = _alternate(self.advance(begin, 0), cycles, enumerate(self.windows), self._delay)
        end = self.advance(t, left)
        self.read_end = max(self.read_end, end)
        return end

    def _delay(self, k, cycles):
        """Delay the end of window ``k`` by ``cycles``, and the windows after it as far as they then overlap."""
        lo, hi = self.windows[k]
        self.delayed[k] += cycles
        self.windows[k] = (lo, hi + cycles)
        for j in range(k + 1, len(self.windows)):
            lo2, hi2 = self.windows[j]
            shift = max(0, self.windows[j - 1][1] - lo2)
            self.windows[j] = (lo2 + shift, hi2 + shift)
        self.writes = max(self.writes, self.windows[-1][1])

    def read(self, start, group, consumer, per_word, fifo=None):
        """``group`` read from ``start`` by a consumer free from ``consumer`` that takes a word in ``per_word``
        cycles: (when the port has read it all, when the consumer has taken it all). ``fifo``: the destination's
        name where the groups before it in the same FIFO matter (x's: the activation, dy and grad_A's x)."""
        words = sum(q.length for q in group)
        if fifo in self.last:
            # its first request waits for room behind the group before
            taken, paced = self.last[fifo]
            start = max(start, taken - (self.fifo_words - group[0].length) * paced)
        # the port runs ahead of the consumer by what the FIFO holds (a request only once it has room for it
        # all): the last request goes once the consumer has taken all but the FIFO's words
        cycles = self.alone(group)
        first = max(consumer, start + _FIRST_WORD)
        behind = first + max(0, words - self.fifo_words) * per_word + cycles * group[-1].length / words
        end = self.serve(max(start, behind - cycles), cycles)
        taken = max(end + _LATENCY, first + words * per_word)
        if fifo:
            self.last[fifo] = taken, per_word
        return max(end, behind), taken

    def gradient(self, start, cycles):
        """grad_A's span written from ``start`` (its first burst gathered) for ``cycles`` of its own, after the
        gradient writes before; returns when it has left."""
        lo = max(start, self.writes)

        def delay(k, cycles):
            self.busy[k] = (self.busy[k][0], self.busy[k][1] + cycles)

        # the reads under way and the outputs' writes take every other turn
        t, left = _alternate(lo, cycles + max(0, min(cycles, self.read_end - lo)),
                             sorted(enumerate(self.busy), key=lambda kb: kb[1]), delay)
        self.writes = t + left
        k = len(self.windows)
        self.windows.append((lo, self.writes))
        self.delayed.append(0)
        # and the reads later in the program that take turns with it (their delay in the pass before)
        return self.writes + (self.delays[k] if k < len(self.delays) else 0)

    def hold(self, lo, cycles):
        """Writes that hold the port from ``lo`` for ``cycles`` of their own (the reads under way and grad_A's
        windows taking every other turn); returns their end."""
        both = sum(max(0, min(b, lo + cycles) - max(a, lo)) for a, b in self.windows)
        hi = self.advance(lo, cycles + both + max(0, min(cycles, self.read_end - lo)))
        self.busy.append((lo, hi))
        return hi

    def write(self, start, cycles):
        """grad_B's writes from ``start``, after the gradient writes before; returns their end."""
        self.writes = self.hold(max(start, self.writes), cycles)
        return self.writes


class _Codes:
    """The codes FIFO (``capacity`` words) between the port and the engine's jobs, which take their codes as they
    stream W: each job's codes as pieces ``(start, end, words)``, taken evenly from ``start`` to ``end``."""

    def __init__(self, capacity):
        self.capacity, self.read_words, self.pieces = capacity, 0, []

    def room(self, words, pieces):
        """When the FIFO has room for the last of a span's ``words``, its job taking them as ``pieces``; 0 when
        it always has."""
        need = self.read_words + words - self.capacity
        self.read_words += words
        done = 0
        for start, end, count in self.pieces + pieces:
            if need <= 0:
                return 0
            if done + count >= need:
                return start + (end - start) * (need - done) / count + _ROOM
            done += count
        return 0

    def taken(self, pieces, read):
        """A job takes its codes as ``pieces``, the last no sooner than they have all been ``read``."""
        *first, (start, end, count) = pieces
        self.pieces += first + [(start, max(end, read), count)]


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
            job = job_cycles(config, nt, nf, False, feed=codes_feed(config))
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
                    m, x_end = port.read(m, runs[i + 1][1], max(loaded + SPAN * r + _ALIGN_START, xb), wb / 2, "x")
                    i += 2
                    unit = x_end + min(nt, 16) * SPAN       # the last chunk replays behind the one before
                else:
                    m, x_end = port.read(m, runs[i][1], xb, wb / 2, "x")
                    i += 1
                codes = runs[i][1]
                i += 1
                words = sum(q.length for q in codes)
                start = max(e, x_end, table_loaded if s == 0 else 0)
                stream = (start + a_load, start + job - tail)
                room = codes_fifo.room(words, [(*stream, words)])
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
                codes_end = max(port.serve(m, port.alone(group)), room)
                m = codes_end
                e = max(start + job, codes_end + tail)
                codes_fifo.taken([(*stream, words)], codes_end)
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
    :func:`~edge_qlora.sim.blocked.run_blocked_product`'s).

    A span of grad_A's pass has left once its writes have, and the reads of the spans after it, which the model
    meets later in program order, take turns with them; so the model runs again with each window's delay from the
    run before, until the cycles stop changing or :data:`_PASSES` runs (most shapes settle at the second)."""
    delays, cycles = (), None
    for _ in range(_PASSES):
        last = cycles
        cycles, delays = _backward(config, memory, t, d_in, d_out, tokens, features, rank, x_per_span, delays)
        if cycles == last:
            break
    return cycles


def _backward(config, memory, t, d_in, d_out, tokens, features, rank, x_per_span, delays):
    """One run of :func:`backward_cycles`: (cycles, each grad_A window's delay by the reads)."""
    timing = _timing(memory)
    port = _Port(config, timing, delays)
    wb, g, r = port.word_bytes, config.gemm, config.rank
    if x_per_span is None:
        x_per_span = bp.x_pass_per_span(d_in, d_out, features)
    runs = _requests(config, t, d_in, d_out, tokens, features, rank, True, x_per_span)
    codes_fifo = _Codes(config.codes_words)
    spans = d_out // SPAN

    def pace(group):
        """Cycles the unit takes to send grad_A's span (``group``'s values)."""
        return _GRAD_PACE * sum(q.length * wb / 4 for q in group) + _GRAD_LATENCY

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
            job = job_cycles(config, nt, nf, True, feed=codes_feed(config))
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
            m, x_end = port.read(m, group, consumer, wb / 2, "x")
            if mode == "product":
                unit = x_end + min(nt, 16) * SPAN
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
            # the engine takes a span's W tiles (``chunk_steps`` rows each) one ahead of the tile it computes
            tiles = SPAN // g.chunk_steps
            per_tile = (job - _JOB_TAIL[True] - a_load) / tiles
            pieces = [(start + a_load + max(0, k - 1) * per_tile,) * 2 + (words / tiles,) for k in range(tiles)]
            room = codes_fifo.room(words, pieces)
            m = max(port.serve(m, port.alone(group)), room)
            e = max(start + job, m + _JOB_TAIL[True])
            codes_fifo.taken(pieces, m)
            span += 1
        elif name == "lora_A":
            # the block's piece of A, into the rank term once it has passed the block before's outputs
            m, columns = port.read(max(m, term), group, term, wb / 4 * (r + _COLUMN_BEAT) / r)
        elif name == "x":
            # grad_A's pass: x through the unit (to no buffer) once it has replayed the span before
            consumer = max(unit, rows_ready, chunks.ready())
            m, x_end = port.read(m, group, consumer, wb / 2, "x")
            writes = runs[n + 1][1] if n + 1 < len(runs) and runs[n + 1][0][1] == "grad_A" else []
            if port.windows:
                # the span before's gradient leaves as late as the reads since have delayed its window
                chunks.left = max(chunks.left, port.windows[-1][1])
            unit, _ = chunks.span(t, consumer, x_end, lambda at: max(
                at + pace(writes), port.gradient(at + writes[0].length * wb / 4 * _GRAD_PACE, port.alone(writes))))
            end = max(end, chunks.left)
        elif name == "dx":
            # the outputs, whole from the last W tile's first token tile on, pass the rank term one a cycle once
            # gb is made (in the block that makes it) and the block's columns of A are in
            last_tile = job * g.chunk_steps // SPAN
            first = max(e - last_tile + last_tile // a_tiles, columns + _TERM_RUN)
            if mode == "product":
                # the term takes gb's rows from the unit after its columns, a row every r + 2 cycles
                rows_taken = max(unit + nt * r + _EMIT, columns + _TERM_RUN + nt * (r + 2))
                first = max(first, rows_taken)
                # the unit, which gives them, takes the next block's activation only then
                unit = max(unit, rows_taken)
            # the corner turn writes a token tile's rows once they have all passed; their writes hold the port
            # (grad_A's writes alternate with them)
            tiles = nt // g.rows
            per_tile = len(group) // tiles
            written = 0
            for k in range(tiles):
                written = port.hold(max(first + (k + 1) * g.rows * nf, written),
                                    port.alone(group[k * per_tile:(k + 1) * per_tile]))
            out_prev = term = max(first + nt * nf, written) + _DRAIN
            end = max(end, out_prev)
    return round(max(end, m, port.writes)), port.delayed
