"""The GEMM engine's writers: A tiles and passes of W into their double buffers, with each chunk's shared exponent.

Each writer owns the memories it fills and offers them to the sequencer as a buffer interface
(:class:`~.config.ABufferSignature`, :class:`~.config.WBufferSignature`): read ports and the hand-over of the
halves. A writer fills a half only while it is not full, marks it full a cycle after its last write lands (the
writes are registered) and takes it back when the sequencer releases it.
"""

from amaranth.hdl import Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ...constants import EXP_MIN
from ..bfp import bf16_exponent, exponent_field, max_of_partials, partial_maxima
from ..fp import BF16
from ..pipeline import SkidBuffer
from ..row_align import RowAligner, row_layout
from .config import (EXP, ABufferSignature, ControlSignature, GemmConfig, WBufferSignature, a_layout,
                     writer_ready_next)

__all__ = ["AWriter", "WWriter", "NO_RW_CHECK"]

# No read whose data is used meets a write to its address in the same cycle (the sequencer issues steps from full
# halves only, the writers write only halves that are not full; the accumulator admits an item only when no item in
# flight still writes its address, or when it ignores the read): the read ports may return don't-care on a
# collision (Yosys's `no_rw_check`, applied by boards/build.py), and the block RAMs need no soft logic that
# emulates read-before-write. `GemmEngine.collisions` lets simulations check the claim.
NO_RW_CHECK = {"no_rw_check": 1}


def _check_config(config):
    if not isinstance(config, GemmConfig):
        raise TypeError(f"config must be a GemmConfig, not {config!r}")


def _half_flags(m, buffer):
    """The halves' full flags of ``buffer`` (a writer's side of a :class:`~.config.HalvesSignature`): a register,
    set a cycle after the writer marks a half filled, cleared when the reader releases it. Returns ``filled``, the
    writer's mark (a register, one cycle per half)."""
    full, filled = Signal(2, name="full"), Signal(2, name="filled")
    m.d.comb += buffer.full_next.eq((full | filled) & ~buffer.release)
    m.d.sync += full.eq(buffer.full_next)
    return filled


def _pass_rows(job):
    """The A rows that the W writer counts its passes by, ``rows`` a pass: ``m``, or 1 for a block job (one pass)."""
    return Mux(job.block, Mux(job.m != 0, 1, 0), job.m)


class AWriter(wiring.Component):
    """Tiles of A into the A buffer, with each chunk's shared exponent per row.

    Per job, ``ceil(M / rows)`` tiles, each ``Q`` beats (one reduction index, ``rows`` values; Q = K forward, N
    transposed). Tiles alternate between the two halves of the buffer, but a block job's tiles go into one half,
    one after another; every ``chunk`` indices (and at the end of a tile) the largest exponent of each row's chunk
    goes to the exponent memory, after the earlier tiles' of the half.

    Parameters
    ----------
    config : GemmConfig

    Attributes
    ----------
    control : In(:class:`~.config.ControlSignature`)
    a : In(stream of :func:`~.config.a_layout`)
        A tiles, through a register slice: the producer sees a registered ``ready``.
    buffer : Out(:class:`~.config.ABufferSignature`)
        The A buffer, for the sequencer.
    memory, exp_memory : Memory
        The A values (``2 * max_q`` deep, half ``h`` from ``h * max_q``) and their chunk exponents (``2 *
        chunks_q`` deep), read through ``buffer``.
    """

    def __init__(self, config):
        _check_config(config)
        self.config = config
        super().__init__({
            "control": In(ControlSignature()),
            "a": In(stream.Signature(a_layout(config.rows))),
            "buffer": Out(ABufferSignature(config)),
        })
        self.memory = Memory(shape=a_layout(config.rows), depth=2 * config.max_q, init=[], attrs=NO_RW_CHECK)
        self.exp_memory = Memory(shape=data.ArrayLayout(EXP, config.rows), depth=2 * config.chunks_q, init=[],
                                 attrs=NO_RW_CHECK)
        # (ports made once, so that elaborating the writer again adds none)
        self._ports = (self.memory.write_port(), self.memory.read_port(domain="sync"),
                       self.exp_memory.write_port(), self.exp_memory.read_port(domain="sync"))

    def elaborate(self, platform):
        cfg = self.config
        rows, chunk = cfg.rows, cfg.chunk_steps
        m = Module()
        m.submodules.memory = self.memory
        m.submodules.exp_memory = self.exp_memory
        write, read, exp_write, exp_read = self._ports
        wiring.connect(m, wiring.flipped(self.buffer.read), read)
        wiring.connect(m, wiring.flipped(self.buffer.exp_read), exp_read)
        a_filled = _half_flags(m, self.buffer)
        a_full_next = self.buffer.full_next
        job, start = self.control.job, self.control.start
        q_length = Mux(job.transposed, job.n, job.k)

        half = Signal()
        m_left = Signal(32)         # A rows still to load, this tile included
        q = Signal(32)
        offset = Signal(range(cfg.max_q + 1))   # the tile's first word in the half (a block job's tiles follow on)
        in_chunk = Signal(range(chunk))
        chunk_index = Signal(range(cfg.chunks_q))
        running = [Signal(EXP, name=f"a_exp_{i}", init=EXP_MIN) for i in range(rows)]
        active = Signal()

        # whether q is the tile's last reduction index, and whether this is the last tile of A rows: registers, so
        # that no 32-bit compare sits behind the handshake
        q_last = Signal()
        m_last = Signal()
        with m.If(start):
            m.d.sync += [m_left.eq(job.m), q.eq(0), offset.eq(0), in_chunk.eq(0), chunk_index.eq(0),
                         q_last.eq(q_length == 1), m_last.eq(job.m <= rows)]
        m.d.comb += self.control.done.eq(~active)

        # a register slice at the engine's boundary: the writer's `ready` stops at the slice, and the producer sees
        # a registered `ready`, so the path from the full flags through `ready` does not reach the producer's logic
        m.submodules.a_slice = a_slice = SkidBuffer(a_layout(rows))
        wiring.connect(m, wiring.flipped(self.a), a_slice.i)
        a_in = a_slice.o
        ready = Signal()    # `active & ~a_full[half]`, a register (see the end)
        m.d.comb += a_in.ready.eq(ready)
        take = a_in.valid & ready
        chunk_end = (in_chunk == chunk - 1) | q_last
        # the buffer writes are registered: `take` stays off the routes to the block RAMs, which sit all over the
        # die; the half goes to the sequencer a cycle after its last take, once that write has landed. The chunk
        # maxima work from those registers too, a cycle behind `take` (the beat in `write.data`, taken if
        # `write.en`), so that `take` does not fan out to the maxima's registers either
        exp_en = Signal()   # the beat in `write.data` ends its chunk
        m.d.sync += [
            write.addr.eq(Mux(half, cfg.max_q, 0) + offset + q),
            write.data.eq(a_in.payload),
            write.en.eq(take),
            exp_write.addr.eq(Mux(half, cfg.chunks_q, 0) + chunk_index),
            exp_en.eq(take & chunk_end),
        ]
        # the running maxima are kept biased too: the comparison needs no subtraction in front of it, and the
        # unbiased exponent (for the memory) is computed beside the comparison, not behind it
        running_biased = [Signal(BF16.exp_bits, name=f"a_exp_biased_{i}", init=EXP_MIN + BF16.bias)
                          for i in range(rows)]
        # raw fields: a zero's 0 never beats a running maximum, which starts at 1
        fields = [exponent_field(write.data[i]) for i in range(rows)]
        higher = [fields[i] > running_biased[i] for i in range(rows)]
        peaks = [Mux(higher[i], bf16_exponent(write.data[i]), running[i]) for i in range(rows)]
        m.d.comb += exp_write.en.eq(exp_en)
        for i in range(rows):
            m.d.comb += exp_write.data[i].eq(peaks[i])
        with m.If(write.en):
            m.d.sync += [running[i].eq(Mux(exp_en, EXP_MIN, peaks[i])) for i in range(rows)]
            m.d.sync += [running_biased[i].eq(Mux(exp_en, running_biased[i].init,
                                                  Mux(higher[i], fields[i], running_biased[i])))
                         for i in range(rows)]
        m.d.sync += a_filled.eq(0)
        with m.If(take):
            m.d.sync += [q.eq(q + 1), in_chunk.eq(Mux(chunk_end, 0, in_chunk + 1)),
                         q_last.eq(Mux(q_last, q_length == 1, q + 2 == q_length))]
            with m.If(chunk_end):
                m.d.sync += chunk_index.eq(chunk_index + 1)
            with m.If(q_last):
                m.d.sync += [q.eq(0), in_chunk.eq(0), m_left.eq(m_left - rows), m_last.eq(m_left <= 2 * rows)]
                with m.If(job.block & ~m_last):
                    # a block job's next tile follows in the same half
                    m.d.sync += offset.eq(offset + q_length)
                with m.Else():
                    # the half is in: hand it to the sequencer (`a_filled` is a register, see above)
                    m.d.sync += a_filled.bit_select(half, 1).eq(1)
                    m.d.sync += [offset.eq(0), chunk_index.eq(0)]
        # `active` (set at `start`, cleared after the last tile) and `half` (flipped after each half is filled) load
        # their next values, from which `ready` is worked out too: the handshake starts at two registers (the
        # slice's valid and this), not behind a mux of the full flags
        tile_in = take & q_last & (~job.block | m_last)
        active_next = Mux(start, 1, active & ~(tile_in & m_last))
        m.d.sync += [active.eq(active_next), half.eq(half ^ tile_in),
                     ready.eq(writer_ready_next(active_next, a_full_next, half, tile_in))]
        return m


class WWriter(wiring.Component):
    """Passes of W, re-cut into rows, into tiles of the W buffer, with their shared exponents.

    Per job, ``ceil(M / rows)`` passes of W (one for a block job; ``N x K``, flat and row-major, ``cols`` bf16
    per beat); a :class:`~..row_align.RowAligner` cuts them into beats of one row each. A tile is ``cols`` W rows
    (forward) or ``chunk`` rows (transposed), row ``r`` in bank ``r % cols``; tiles alternate between the two
    halves. Forward, each row's chunk exponents go to the exponent memory; transposed, one exponent for the whole
    tile goes to ``buffer.tile_exponent`` (a transposed block job's from ``exponents``).

    Parameters
    ----------
    config : GemmConfig

    Attributes
    ----------
    control : In(:class:`~.config.ControlSignature`)
    w : In(stream of ArrayLayout(BF16.width, cols))
        W, flat and row-major, final beat of a pass zero-padded.
    rows_in : In(stream of row_layout(cols, BF16.width)), ``weights="both"`` only
        W already cut into rows, taken instead of ``w`` by jobs with ``rows_in`` set.
    exponents : In(stream of EXP)
        A transposed block job's tile exponents, one beat per tile, taken instead of the tile's own maximum: the
        chunk of W rows' maximum over all of W's columns (``golden.gemm.row_chunk_exponents``), of which the job
        holds a block, so that blocks of columns align as the whole rows would. A tile's beats wait for its
        exponent.
    buffer : Out(:class:`~.config.WBufferSignature`)
        The W buffer, for the sequencer.
    banks, exp_memory : list of Memory, Memory
        The W banks (``2 * slots * words_per_row`` deep, half ``h`` from ``h * slots * words_per_row``) and the
        rows' chunk exponents (``2 * chunks_k`` deep), read through ``buffer``.
    """

    def __init__(self, config):
        _check_config(config)
        self.config = config
        cols = config.cols
        members = {
            "control": In(ControlSignature()),
            "w": In(stream.Signature(data.ArrayLayout(BF16.width, cols))),
            "exponents": In(stream.Signature(EXP)),
            "buffer": Out(WBufferSignature(config)),
        }
        if config.weights == "both":
            members["rows_in"] = In(stream.Signature(row_layout(cols, BF16.width)))
        super().__init__(members)
        attrs = NO_RW_CHECK | ({"ram_style": "block"} if config.w_buffer_ram == "block" else {})
        self.banks = [Memory(shape=data.ArrayLayout(BF16.width, cols), depth=2 * config.slots * config.words_per_row,
                             init=[], attrs=attrs) for _ in range(cols)]
        self.exp_memory = Memory(shape=data.ArrayLayout(EXP, cols), depth=2 * config.chunks_k, init=[],
                                 attrs=NO_RW_CHECK)
        # (ports made once, so that elaborating the writer again adds none; the exponents are written one element,
        # a row's, at a time)
        self._bank_ports = [(bank.write_port(), bank.read_port(domain="sync")) for bank in self.banks]
        self._exp_ports = (self.exp_memory.write_port(granularity=1), self.exp_memory.read_port(domain="sync"))

    def _aligner(self, m):
        """The row aligner on ``w``, with one shape header per pass of W (``ceil(M / rows)`` passes a job)."""
        job, start = self.control.job, self.control.start
        rows = self.config.rows
        m.submodules.row_align = aligner = RowAligner(self.config.cols)
        wiring.connect(m, wiring.flipped(self.w), aligner.flat)
        passes_left = Signal(32)
        with m.If(start):
            m.d.sync += passes_left.eq(_pass_rows(job))
        m.d.comb += [
            aligner.shape.valid.eq((passes_left != 0) & ~job.rows_in),
            aligner.shape.payload.rows.eq(job.n),
            aligner.shape.payload.row_length.eq(job.k),
            aligner.shape.payload.elements.eq(job.weights),
        ]
        with m.If(aligner.shape.valid & aligner.shape.ready):
            m.d.sync += passes_left.eq(Mux(passes_left <= rows, 0, passes_left - rows))
        return aligner

    def _rows(self, m, aligner):
        """The stream of row-aligned beats: the aligner's, or per job the aligner's or ``rows_in``."""
        if self.config.weights != "both":
            return aligner.rows
        job = self.control.job
        beat = stream.Signature(row_layout(self.config.cols, BF16.width)).create(path=("w_rows",))
        m.d.comb += [
            beat.valid.eq(Mux(job.rows_in, self.rows_in.valid, aligner.rows.valid)),
            beat.payload.eq(Mux(job.rows_in, self.rows_in.payload, aligner.rows.payload)),
            self.rows_in.ready.eq(job.rows_in & beat.ready),
            aligner.rows.ready.eq(~job.rows_in & beat.ready),
        ]
        return beat

    def _with_peak(self, m, beat):
        """``beat`` through two register slices that find its largest exponent ahead of the writer: the first
        takes the maxima of the tree's first levels with the beat, the second finishes the tree into ``peak``,
        loaded with the beat, so that the row and tile maxima compare a register with a register. Returns the
        delayed stream and ``peak``."""
        cols = self.config.cols
        levels = (cols - 1).bit_length()
        first = stream.Signature(row_layout(cols, BF16.width)).create(path=("w_beat_first",))
        # raw exponent fields (no zero test in front of the tree): a beat of zeros gives -127, below the running
        # maxima, which start at -126
        partial = partial_maxima(m, beat.payload.data, -(-levels // 2), "w_beat_peak", raw=True)
        partial_held = [Signal(BF16.exp_bits, name=f"w_beat_partial_{i}") for i in range(len(partial))]
        m.d.comb += beat.ready.eq(~first.valid | first.ready)
        with m.If(beat.valid & beat.ready):
            m.d.sync += [first.valid.eq(1), first.payload.eq(beat.payload),
                         *(reg.eq(node) for reg, node in zip(partial_held, partial))]
        with m.Elif(first.ready):
            m.d.sync += first.valid.eq(0)

        second = stream.Signature(row_layout(cols, BF16.width)).create(path=("w_beat",))
        peak = Signal(EXP)      # the largest exponent of the beat in `second.payload`
        m.d.comb += first.ready.eq(~second.valid | second.ready)
        with m.If(first.valid & first.ready):
            m.d.sync += [second.valid.eq(1), second.payload.eq(first.payload),
                         peak.eq(max_of_partials(m, partial_held, "w_beat_peak"))]
        with m.Elif(second.ready):
            m.d.sync += second.valid.eq(0)
        return second, peak

    def elaborate(self, platform):
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        words, slots = cfg.words_per_row, cfg.slots
        m = Module()
        for b, (bank, (_, read)) in enumerate(zip(self.banks, self._bank_ports)):
            m.submodules[f"bank_{b}"] = bank
            wiring.connect(m, wiring.flipped(getattr(self.buffer, f"read_{b}")), read)
        m.submodules.exp_memory = self.exp_memory
        exp_port, exp_read = self._exp_ports
        wiring.connect(m, wiring.flipped(self.buffer.exp_read), exp_read)
        w_filled = _half_flags(m, self.buffer)
        w_full_next = self.buffer.full_next
        job, start = self.control.job, self.control.start
        beat, peak = self._with_peak(m, self._rows(m, self._aligner(m)))

        half = Signal()
        row = Signal(range(cfg.tile_rows))   # row within the tile
        word = Signal(range(words))
        words_in_chunk = chunk // cols
        word_in_chunk = Signal(range(words_in_chunk))
        chunk_index = Signal(range(cfg.chunks_k))
        tile_rows = Mux(job.transposed, chunk, cols)
        pass_open = Signal()                # a pass of W is still expected (m_left != 0, kept as a register)
        m_left = Signal(32)
        m_more = Signal()                   # m_left > rows: a pass is left after this one (a register)
        with m.If(start):
            m.d.sync += [m_left.eq(_pass_rows(job)), m_more.eq(_pass_rows(job) > rows), row.eq(0), word.eq(0),
                         word_in_chunk.eq(0), chunk_index.eq(0)]
        m.d.comb += self.control.done.eq(~pass_open)

        ready = Signal()    # `pass_open & ~w_full[half]`, a register (as in the A writer; see the end)
        # a transposed block job's tile takes its exponent from `exponents`: held in `given` until the tile ends
        given_valid, given = Signal(), Signal(EXP)
        given_needed = job.transposed & job.block
        m.d.comb += beat.ready.eq(ready & (~given_needed | given_valid))
        take = beat.valid & beat.ready
        row_end = beat.payload.row_end
        pass_end = beat.payload.last
        tile_end = row_end & ((row == tile_rows - 1) | pass_end)

        row_peak = Signal(EXP, init=EXP_MIN)     # forward: this row's current chunk
        tile_peak = Signal(EXP, init=EXP_MIN)    # transposed: the whole tile
        new_row_peak = Mux(peak > row_peak, peak, row_peak)
        new_tile_peak = Mux(peak > tile_peak, peak, tile_peak)
        tile_exponent = self.buffer.tile_exponent

        slot = Signal(range(slots + 1))     # row // cols and row % cols, as counters
        bank = Signal(range(cols))
        address = Mux(half, slots * words, 0) + slot * words + word
        # registered writes, as in the A writer: `take` stays off the routes to the banks; a tile goes to the
        # sequencer a cycle after its last take
        for b, (port, _) in enumerate(self._bank_ports):
            m.d.sync += [port.addr.eq(address), port.data.eq(beat.payload.data), port.en.eq(take & (bank == b))]

        chunk_end = (word_in_chunk == words_in_chunk - 1) | row_end
        m.d.sync += [
            exp_port.addr.eq(Mux(half, cfg.chunks_k, 0) + chunk_index),
            exp_port.en.eq(Mux(take & chunk_end & ~job.transposed, Const(1, cols) << bank, 0)),
        ]
        for j in range(cols):
            m.d.sync += exp_port.data[j].eq(new_row_peak)

        m.d.sync += w_filled.eq(0)
        with m.If(take):
            m.d.sync += [
                word.eq(Mux(row_end, 0, word + 1)),
                word_in_chunk.eq(Mux(chunk_end, 0, word_in_chunk + 1)),
                chunk_index.eq(Mux(row_end, 0, Mux(chunk_end, chunk_index + 1, chunk_index))),
                row_peak.eq(Mux(chunk_end, EXP_MIN, new_row_peak)),
                tile_peak.eq(new_tile_peak),
            ]
            with m.If(row_end):
                m.d.sync += [row.eq(row + 1), bank.eq(Mux(bank == cols - 1, 0, bank + 1)),
                             slot.eq(Mux(bank == cols - 1, slot + 1, slot))]
            with m.If(tile_end):
                m.d.sync += w_filled.bit_select(half, 1).eq(1)
                m.d.sync += [row.eq(0), bank.eq(0), slot.eq(0), tile_peak.eq(EXP_MIN),
                             tile_exponent[half].eq(Mux(given_needed, given, new_tile_peak))]
            with m.If(pass_end):
                m.d.sync += [m_left.eq(Mux(m_more, m_left - rows, 0)), m_more.eq(m_left > 2 * rows)]
        given_used = take & tile_end & given_needed
        m.d.comb += self.exponents.ready.eq(~given_valid | given_used)
        with m.If(self.exponents.valid & self.exponents.ready):
            m.d.sync += [given_valid.eq(1), given.eq(self.exponents.payload)]
        with m.Elif(given_used):
            m.d.sync += given_valid.eq(0)
        # `pass_open` (set at `start`, then whether passes are left after each) and `half` load their next values,
        # from which `ready` is worked out too (as in the A writer)
        tile_in = take & tile_end
        pass_open_next = Mux(start, _pass_rows(job) != 0, Mux(take & pass_end, m_more, pass_open))
        m.d.sync += [pass_open.eq(pass_open_next), half.eq(half ^ tile_in),
                     ready.eq(writer_ready_next(pass_open_next, w_full_next, half, tile_in))]
        return m
