"""The GEMM engine's sequencer: walks the tiles, reads the buffers, aligns the operands and feeds the PE array."""

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..bfp import AlignLanes
from ..fp import BF16
from ..pe_array import steps_layout
from ..pipeline import StallPipeline, delay_line, private_register
from .config import EXP, ABufferSignature, ControlSignature, GemmConfig, WBufferSignature, info_layout

__all__ = ["Sequencer"]


class Sequencer(wiring.Component):
    """Walk the tiles, read the buffers, align operands to 18-bit integers, feed the PE array.

    Forward, for each A tile and each W tile (``cols`` W rows), one chunk after another along K: a chunk's steps
    read A at reduction index ``q`` and lane ``q % cols`` of every bank; a block job swaps the two outer loops
    (each W tile serves every A tile of the buffer's half before it is handed back) and, when it holds or resumes
    partial sums, gives each output tile its own place in the accumulator. Transposed, for each A tile and each W
    tile (``chunk`` W rows), one chunk per ``cols`` output columns: a chunk's steps read W row ``step`` (bank
    ``step % cols``) at the word of those columns. Chunks are padded with zero steps to ``min_steps``; a step
    issues when the A and W halves it reads are full. After the job's last chunk the array gets ``flush_steps``
    zero steps.

    Parameters
    ----------
    config : GemmConfig
    flush_steps : int
        The PE array's :attr:`~..pe_array.PEArray.flush_steps`.

    Attributes
    ----------
    control : In(:class:`~.config.ControlSignature`)
    a_buffer : In(:class:`~.config.ABufferSignature`)
    w_buffer : In(:class:`~.config.WBufferSignature`)
    steps : Out(stream of :func:`~..pe_array.steps_layout`)
        Aligned operands for the PE array, ``last`` on a chunk's final step.
    info : Out(stream of :func:`~.config.info_layout`)
        One beat per chunk, in chunk order, from a FIFO deep enough for the chunks between their first step and
        their last partial sum; it always has room for a chunk the sequencer starts.
    issue : Signal
        High when a step is issued: the buffers' read data of this cycle's addresses is used (for collision checks
        in simulation).
    """

    #: chunks in flight: from their first step to their last row's partial leaving the accumulator front (short
    #: padded chunks can have many in flight)
    INFO_DEPTH = 16

    def __init__(self, config, flush_steps):
        if not isinstance(config, GemmConfig):
            raise TypeError(f"config must be a GemmConfig, not {config!r}")
        if not isinstance(flush_steps, int) or flush_steps < 1:
            raise ValueError(f"flush_steps must be a positive integer, not {flush_steps!r}")
        self.config = config
        self.flush_steps = flush_steps
        super().__init__({
            "control": In(ControlSignature()),
            "a_buffer": In(ABufferSignature(config)),
            "w_buffer": In(WBufferSignature(config)),
            "steps": Out(stream.Signature(steps_layout(config.rows, config.cols))),
            "info": Out(stream.Signature(info_layout(config))),
        })
        self.issue = Signal()

    #: registered stages of the alignment: its distance, shift and rounding
    ALIGN_STAGES = 3

    def elaborate(self, platform):
        m = Module()
        layout = info_layout(self.config)
        m.submodules.info_fifo = fifo = SyncFIFOBuffered(width=layout.size, depth=self.INFO_DEPTH)
        wiring.connect(m, fifo.r_stream, wiring.flipped(self.info))
        cols = self.config.cols
        # stages: memory read; a register on the raw read data (block RAM clock-to-out is slow); selection and
        # exponents; their register; the alignment. The PE array takes the steps; everything before it stalls
        # with it
        pipe = StallPipeline(m, 1 + 1 + 1 + self.ALIGN_STAGES, self.steps.ready, tag_shape=data.StructLayout({
            "real": 1, "last": 1, "lane": range(cols), "bank": range(cols), "transposed": 1,
            "fwd_cols": range(cols + 1), "chunk_start": 1,
        }), name="seq", platform=platform)
        walk = self._walk(m, pipe, fifo.level)
        chunk_start, ea_now, b_exps = self._operands(m, platform, pipe, walk.w_half)
        self._push_info(m, pipe.advance & chunk_start, fifo.w_stream, walk.pending, ea_now, b_exps)
        return m

    # --- the walk over the job's chunks -----------------------------------------------------------------------------

    def _walk(self, m, pipe, fifo_level):
        """Counters, the current chunk's flags and addresses, the step gate, the halves' releases and the flush.

        Returns a namespace of the walk's registers; the operand stages use ``w_half`` (the W half being read) and
        the chunk info ``pending`` (its fields known when a chunk's first step issues).
        """
        cfg = self.config
        cols, chunk = cfg.cols, cfg.chunk_steps
        job, start = self.control.job, self.control.start
        s = SimpleNamespace(
            active=Signal(name="active"),
            flushing=Signal(range(self.flush_steps + 1), name="flushing"),
            m_left=Signal(32, name="m_left"),       # A rows left, this tile included
            a_half=Signal(name="a_half"), w_half=Signal(name="w_half"),
            outer=Signal(32, name="outer"),         # forward: first output column of the tile; transposed: first W row
            kt=Signal(32, name="kt"),               # transposed: column tile t (output columns t * cols ...)
            k0=Signal(32, name="k0"),               # transposed: t * cols
            q0=Signal(32, name="q0"),               # forward: first reduction index of the chunk
            a_off=Signal(range(cfg.max_q + 1), name="a_off"),       # block: the A tile's first word in its half
            ea_off=Signal(range(cfg.chunks_q + 1), name="ea_off"),  # block: its first chunk's exponents
            acc_base=Signal(range(max(1, cfg.acc_depth)), name="acc_base"),  # block: the A tile's accumulator rows
            q_chunks=Signal(range(cfg.chunks_q + 1), name="q_chunks"),      # chunks of an A tile (see below)
            chunk_index=Signal(32, name="chunk_index"),     # chunk of the A buffer (q0 / chunk)
            step=Signal(range(max(chunk, cfg.min_steps) + 1), name="step"),
            fwd_lane=Signal(range(cols), name="fwd_lane"),  # forward: q % cols, the lane of the W word read
            bwd_bank=Signal(range(cols), name="bwd_bank"),  # transposed: the bank of row `step` of the W tile
            # per-step flags as registers, each set a step ahead, so that `issue`, which enables most of the
            # sequencer, is not the end of a comparison with the chunk's length: `step == 0`, `step == steps_m1`,
            # `step < length`. A chunk has at least `min_steps` steps and at least one real one
            step_zero=Signal(init=1, name="step_zero"), last_step=Signal(name="last_step"),
            real=Signal(init=1, name="real"),
            gate=Signal(name="gate"),
            pending=Signal(info_layout(cfg), name="pending"),
        )
        with m.If(start):
            m.d.sync += [s.m_left.eq(job.m), s.outer.eq(0), s.kt.eq(0), s.k0.eq(0), s.q0.eq(0), s.a_off.eq(0),
                         s.ea_off.eq(0), s.acc_base.eq(0),
                         s.chunk_index.eq(0), s.step.eq(0), s.fwd_lane.eq(0), s.bwd_bank.eq(0),
                         s.last_step.eq(0), s.real.eq(1)]
        self._chunk_flags(m, s)
        # a block job's A tiles lie ceil(Q / chunk) exponent entries apart (Q = K forward, N transposed): counted
        # up after `start`, a chunk a cycle, long before the first A tile is done (its Q values take Q cycles to
        # load)
        counted = Signal(32)
        with m.If(start):
            m.d.sync += [s.q_chunks.eq(0), counted.eq(0)]
        with m.Elif(counted < Mux(job.transposed, job.n, job.k)):
            m.d.sync += [s.q_chunks.eq(s.q_chunks + 1), counted.eq(counted + chunk)]

        # A step may start when the sequencer is active, its buffers' halves are full and, on a chunk's first step,
        # the chunk FIFO has room (a chunk start may be in each of the 3 stages and the push register before the
        # FIFO). All of that is `gate`, a register worked out a cycle ahead from the next values of what it reads
        # (see `_advance`), so that `issue`, which enables most of the sequencer, is one gate behind the stall
        # chain rather than behind the halves' full flags and the FIFO's level
        m.d.comb += [self.issue.eq(s.gate & pipe.advance), pipe.in_valid.eq(self.issue | (s.flushing != 0))]
        self._addresses(m, s, pipe)
        self._next_chunk(m, s)
        self._advance(m, s, pipe, fifo_level)
        return s

    def _flags_of(self, k_left, n_left, kb_left, m_left, first):
        """A chunk's flags from what is left of K from its first index (``k_left``), of N from its tile
        (``n_left``) and of K from its column tile (``kb_left``, transposed), all positive, and of M (``m_left``)."""
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        transposed, block = self.control.job.transposed, self.control.job.block
        fwd_last_chunk, fwd_last_tile = k_left <= chunk, n_left <= cols
        bwd_last_ktile, bwd_last_chunk = kb_left <= cols, n_left <= chunk
        last_m_tile = m_left <= rows
        return {
            "length": Mux(transposed, Mux(n_left < chunk, n_left, chunk), Mux(k_left < chunk, k_left, chunk)),
            "fwd_last_chunk": fwd_last_chunk,
            "fwd_last_tile": fwd_last_tile,
            "bwd_last_ktile": bwd_last_ktile,
            "bwd_last_chunk": bwd_last_chunk,
            # the chunk's last step hands back its W tile / A tile (a register each: the release drives the halves'
            # full flags and the writers' handshakes behind them)
            # (a block job's W tile serves every A tile, and its A tiles stay for every W tile)
            "w_tile_done": Mux(transposed, bwd_last_ktile, fwd_last_chunk) & (~block | last_m_tile),
            "a_tile_done": Mux(transposed, bwd_last_chunk & bwd_last_ktile, fwd_last_chunk & fwd_last_tile)
            & (~block | last_m_tile),
            "last_m_tile": last_m_tile,
            "first": first,
            "fwd_cols": Mux(n_left < cols, n_left, cols),
        }

    def _steps_m1_of(self, length):
        """A chunk's padded step count, minus 1."""
        min_steps = self.config.min_steps
        return Mux(length < min_steps, min_steps, length) - 1

    def _chunk_flags(self, m, s):
        """The current chunk's flags (``s.cur``, registers) and the next chunk's (``s.nxt``, worked out on the
        current one's steps, see :meth:`_next_chunk`)."""
        cfg = self.config
        chunk, cols = cfg.chunk_steps, cfg.cols
        job, start = self.control.job, self.control.start
        first_flags = self._flags_of(job.k, job.n, job.k, job.m, 1)
        shapes = {"length": range(chunk + 1), "steps_m1": range(max(chunk, cfg.min_steps)),
                  "fwd_cols": range(cols + 1)}
        s.cur = {name: Signal(shapes.get(name, 1), name=f"chunk_{name}") for name in [*first_flags, "steps_m1"]}
        s.nxt = {name: Signal(shapes.get(name, 1), name=f"next_{name}") for name in s.cur}
        with m.If(start):
            m.d.sync += [s.cur[name].eq(value) for name, value in first_flags.items()]
        # the first chunk's padded step count a cycle after its length, like every other chunk's: its first step is
        # later still (the buffers take longer than that to fill)
        started = Signal()
        m.d.sync += started.eq(start)
        with m.If(started):
            m.d.sync += s.cur["steps_m1"].eq(self._steps_m1_of(s.cur["length"]))

    def _bases_of(self, a_half, w_half, q0, outer, kt, chunk_index, a_off=0, ea_off=0):
        """A chunk's fixed addresses: A at its first step, its exponents, the W tile's base."""
        cfg = self.config
        transposed = self.control.job.transposed
        return {
            "a": Mux(a_half, cfg.max_q, 0) + Mux(transposed, outer, q0) + a_off,
            "ea": Mux(a_half, cfg.chunks_q, 0) + chunk_index + ea_off,
            "ew": Mux(w_half, cfg.chunks_k, 0) + chunk_index,
            "w": Mux(w_half, cfg.slots * cfg.words_per_row, 0) + Mux(transposed, kt, 0),
        }

    def _addresses(self, m, s, pipe):
        """Stage 0: the buffers' read addresses, and the step's tag into the pipeline."""
        cfg = self.config
        cols = cfg.cols
        start = self.control.start
        a_read, ea_read, ew_read = self.a_buffer.read, self.a_buffer.exp_read, self.w_buffer.exp_read
        w_reads = [getattr(self.w_buffer, f"read_{b}") for b in range(cols)]
        for port in [a_read, ea_read, ew_read, *w_reads]:
            m.d.comb += port.en.eq(pipe.advance)
        # the next chunk's bases are worked out on its third step (see `_next_chunk`); the exponent addresses are
        # registers set from them at the chunk's end
        s.n_bases = {name: Signal(range(depth), name=f"next_{name}_base")
                     for name, depth in (("a", 2 * cfg.max_q), ("ea", 2 * cfg.chunks_q), ("ew", 2 * cfg.chunks_k),
                                         ("w", 2 * cfg.slots * cfg.words_per_row))}
        s.bases = {name: Signal.like(s.n_bases[name], name=f"{name}_base") for name in ("ea", "ew")}
        # the A and W read addresses are registers that count from the chunk's bases (A: its base + step; W,
        # forward: every bank reads its row (slot 0) at word q // cols, the tile's base + q // cols; transposed: row
        # `step` of the tile, its base + (step // cols) * words): the memories sit all over the die, and no adder
        # sits in front of the long routes to them
        s.a_address = Signal(range(2 * cfg.max_q))
        s.w_address = Signal(range(2 * cfg.slots * cfg.words_per_row))
        with m.If(start):
            first_bases = self._bases_of(s.a_half, s.w_half, 0, 0, 0, 0)
            m.d.sync += [s.bases[name].eq(first_bases[name]) for name in s.bases]
            m.d.sync += [s.a_address.eq(first_bases["a"]), s.w_address.eq(first_bases["w"])]
        m.d.comb += [a_read.addr.eq(s.a_address), ea_read.addr.eq(s.bases["ea"]), ew_read.addr.eq(s.bases["ew"])]
        m.d.comb += [port.addr.eq(s.w_address) for port in w_reads]

        issue = self.issue
        m.d.comb += [
            pipe.in_tag.real.eq(issue & s.real),
            pipe.in_tag.last.eq(issue & s.last_step),
            pipe.in_tag.lane.eq(s.fwd_lane),
            pipe.in_tag.bank.eq(s.bwd_bank),
            pipe.in_tag.transposed.eq(self.control.job.transposed),
            pipe.in_tag.fwd_cols.eq(s.cur["fwd_cols"]),
            pipe.in_tag.chunk_start.eq(issue & s.step_zero),
        ]

    def _next_chunk(self, m, s):
        """The chunk info known at a chunk's first step; the next chunk's coordinates on its second step, what is
        left of K and N after them and its bases on the third, its flags (comparisons with constants) on the fourth
        and its padded step count on the fifth (a chunk has at least ``min_steps`` steps): at most one 32-bit carry
        chain sits between two registers and none between the counters and the array's step enable."""
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        job = self.control.job
        issue, cur, nxt = self.issue, s.cur, s.nxt
        n_q0, n_outer, n_kt, n_k0 = (Signal(32, name=f"next_{n}") for n in ("q0", "outer", "kt", "k0"))
        n_chunk_index, n_m_left = Signal(32, name="next_chunk_index"), Signal(32, name="next_m_left")
        n_k_left, n_n_left, n_kb_left = (Signal(32, name=f"next_{n}_left") for n in ("k", "n", "kb"))
        n_a_off, n_ea_off, n_acc_base = (Signal.like(getattr(s, n), name=f"next_{n}")
                                         for n in ("a_off", "ea_off", "acc_base"))
        s.next = {"q0": n_q0, "outer": n_outer, "kt": n_kt, "k0": n_k0, "chunk_index": n_chunk_index,
                  "m_left": n_m_left, "a_off": n_a_off, "ea_off": n_ea_off, "acc_base": n_acc_base}

        with m.If(issue & s.step_zero):
            m.d.sync += [
                s.pending.base.eq(s.acc_base + Mux(job.transposed, s.kt * rows, 0)),
                # a resumed job adds to the partial sums a held one left; a held one keeps its own
                s.pending.first.eq(cur["first"] & ~job.resume),
                s.pending.last.eq(Mux(job.transposed, cur["bwd_last_chunk"], cur["fwd_last_chunk"]) & ~job.hold),
                s.pending.job_last.eq(cur["last_m_tile"] & Mux(
                    job.transposed, cur["bwd_last_chunk"] & cur["bwd_last_ktile"],
                    cur["fwd_last_chunk"] & cur["fwd_last_tile"])),
            ]
        with m.If(issue & (s.step == 1)):
            m.d.sync += [n_a_off.eq(s.a_off), n_ea_off.eq(s.ea_off), n_acc_base.eq(s.acc_base)]
            with m.If(~job.transposed):
                with m.If(cur["fwd_last_chunk"] & job.block):
                    # the next A tile of the half, or after the last the next W tile with the first A tile
                    last_a = cur["last_m_tile"]
                    m.d.sync += [n_q0.eq(0), n_chunk_index.eq(0), n_kt.eq(0), n_k0.eq(0),
                                 n_outer.eq(Mux(last_a, s.outer + cols, s.outer)),
                                 n_m_left.eq(Mux(last_a, job.m, s.m_left - rows)),
                                 n_a_off.eq(Mux(last_a, 0, s.a_off + job.k)),
                                 n_ea_off.eq(Mux(last_a, 0, s.ea_off + s.q_chunks)),
                                 n_acc_base.eq(Mux(job.hold | job.resume, s.acc_base + rows, 0))]
                with m.Elif(cur["fwd_last_chunk"]):
                    m.d.sync += [n_q0.eq(0), n_chunk_index.eq(0), n_kt.eq(0), n_k0.eq(0),
                                 n_outer.eq(Mux(cur["fwd_last_tile"], 0, s.outer + cols)),
                                 n_m_left.eq(Mux(cur["fwd_last_tile"], s.m_left - rows, s.m_left))]
                with m.Else():
                    m.d.sync += [n_q0.eq(s.q0 + chunk), n_chunk_index.eq(s.chunk_index + 1), n_kt.eq(s.kt),
                                 n_k0.eq(s.k0), n_outer.eq(s.outer), n_m_left.eq(s.m_left)]
            with m.Else():
                with m.If(cur["bwd_last_ktile"] & job.block):
                    # the next A tile of the half (its outputs in the accumulator after this one's), or after the
                    # last the next W tile with the first A tile
                    last_a = cur["last_m_tile"]
                    m.d.sync += [n_kt.eq(0), n_k0.eq(0), n_q0.eq(s.q0),
                                 n_outer.eq(Mux(last_a, s.outer + chunk, s.outer)),
                                 n_chunk_index.eq(Mux(last_a, s.chunk_index + 1, s.chunk_index)),
                                 n_m_left.eq(Mux(last_a, job.m, s.m_left - rows)),
                                 n_a_off.eq(Mux(last_a, 0, s.a_off + job.n)),
                                 n_ea_off.eq(Mux(last_a, 0, s.ea_off + s.q_chunks)),
                                 n_acc_base.eq(Mux(last_a, 0, s.acc_base + s.kt * rows + rows))]
                with m.Elif(cur["bwd_last_ktile"]):
                    m.d.sync += [n_kt.eq(0), n_k0.eq(0), n_q0.eq(s.q0),
                                 n_outer.eq(Mux(cur["bwd_last_chunk"], 0, s.outer + chunk)),
                                 n_chunk_index.eq(Mux(cur["bwd_last_chunk"], 0, s.chunk_index + 1)),
                                 n_m_left.eq(Mux(cur["bwd_last_chunk"], s.m_left - rows, s.m_left))]
                with m.Else():
                    m.d.sync += [n_kt.eq(s.kt + 1), n_k0.eq(s.k0 + cols), n_q0.eq(s.q0), n_outer.eq(s.outer),
                                 n_chunk_index.eq(s.chunk_index), n_m_left.eq(s.m_left)]
        with m.If(issue & (s.step == 2)):
            m.d.sync += [n_k_left.eq(job.k - n_q0), n_n_left.eq(job.n - n_outer), n_kb_left.eq(job.k - n_k0)]
            m.d.sync += [s.n_bases[name].eq(value) for name, value in self._bases_of(
                s.a_half ^ cur["a_tile_done"], s.w_half ^ cur["w_tile_done"], n_q0, n_outer, n_kt,
                n_chunk_index, n_a_off, n_ea_off).items()]
        with m.If(issue & (s.step == 3)):
            n_first = Mux(job.transposed, n_outer == 0, n_q0 == 0)   # the coordinates hold from the second step
            m.d.sync += [nxt[name].eq(value)
                         for name, value in self._flags_of(n_k_left, n_n_left, n_kb_left, n_m_left, n_first).items()]
        with m.If(issue & (s.step == 4)):
            m.d.sync += nxt["steps_m1"].eq(self._steps_m1_of(nxt["length"]))

    def _advance(self, m, s, pipe, fifo_level):
        """The counters on each issued step; at a chunk's last step the next chunk's values, the halves handed
        back and, after the job's last chunk, the flush; then the gate for the next cycle."""
        cfg = self.config
        cols, words = cfg.cols, cfg.words_per_row
        job, start = self.control.job, self.control.start
        issue, cur = self.issue, s.cur
        w_tile_done, a_tile_done, last_m_tile = cur["w_tile_done"], cur["a_tile_done"], cur["last_m_tile"]
        with m.If(issue):
            m.d.sync += [s.step.eq(Mux(s.last_step, 0, s.step + 1)), s.a_address.eq(s.a_address + 1),
                         s.last_step.eq(~s.last_step & (s.step + 1 == cur["steps_m1"])),
                         s.real.eq(s.last_step | (s.step + 1 < cur["length"]))]
            with m.If(s.real & ~job.transposed):
                m.d.sync += s.fwd_lane.eq(Mux(s.fwd_lane == cols - 1, 0, s.fwd_lane + 1))
                with m.If(s.fwd_lane == cols - 1):
                    m.d.sync += s.w_address.eq(s.w_address + 1)
            with m.If(s.real & job.transposed):
                m.d.sync += s.bwd_bank.eq(Mux(s.bwd_bank == cols - 1, 0, s.bwd_bank + 1))
                with m.If(s.bwd_bank == cols - 1):
                    m.d.sync += s.w_address.eq(s.w_address + words)
            with m.If(s.last_step):
                m.d.sync += s.bwd_bank.eq(0)
                m.d.sync += [getattr(s, name).eq(value) for name, value in s.next.items()]
                m.d.sync += [cur[name].eq(s.nxt[name]) for name in cur]
                m.d.sync += [s.bases[name].eq(s.n_bases[name]) for name in s.bases]
                m.d.sync += s.a_address.eq(s.n_bases["a"])
                # (forward, within an output tile, the base stays and the word count goes on; a block job's next
                # A tile reads the same W tile from its base again)
                with m.If(job.transposed | cur["fwd_last_chunk"]):
                    m.d.sync += s.w_address.eq(s.n_bases["w"])
                with m.If(~job.transposed & cur["fwd_last_chunk"]):
                    m.d.sync += s.fwd_lane.eq(0)
                with m.If(w_tile_done):
                    m.d.comb += self.w_buffer.release.bit_select(s.w_half, 1).eq(1)
                with m.If(a_tile_done):
                    m.d.comb += self.a_buffer.release.bit_select(s.a_half, 1).eq(1)
                    with m.If(last_m_tile):
                        m.d.sync += s.flushing.eq(self.flush_steps)
        with m.If(pipe.advance & (s.flushing != 0) & ~issue):
            m.d.sync += s.flushing.eq(s.flushing - 1)

        # `active` (set at `start`, cleared after the last A tile), the halves (flipped when a chunk hands its tile
        # back) and `step_zero` load their next values, and `gate` is worked out from them. Its room test uses the
        # FIFO's level a cycle early, which grows by one at most in between
        chunk_end = issue & s.last_step
        a_half_next = s.a_half ^ (chunk_end & a_tile_done)
        w_half_next = s.w_half ^ (chunk_end & w_tile_done)
        active_next = Mux(start, 1, s.active & ~(chunk_end & a_tile_done & last_m_tile))
        step_zero_next = Mux(start, 1, Mux(issue, s.last_step, s.step_zero))
        room_next = fifo_level < self.INFO_DEPTH - 5
        m.d.sync += [s.active.eq(active_next), s.a_half.eq(a_half_next), s.w_half.eq(w_half_next),
                     s.step_zero.eq(step_zero_next)]
        m.d.sync += s.gate.eq(active_next & self.a_buffer.full_next.bit_select(a_half_next, 1)
                              & self.w_buffer.full_next.bit_select(w_half_next, 1) & (~step_zero_next | room_next))
        m.d.comb += self.control.done.eq(~s.active & (s.flushing == 0))

    # --- the operands -----------------------------------------------------------------------------------------------

    def _operands(self, m, platform, pipe, w_half):
        """Stage 1: the memories' data, registered raw; stage 2: selection, masks and exponents; stage 3: their
        register; then the alignment, into ``steps``. Returns, for the chunk info, whether the step in stage 2 is
        a chunk's first and its exponents (A rows, B columns)."""
        cfg = self.config
        rows, cols = cfg.rows, cfg.cols
        a_read, ea_read, ew_read = self.a_buffer.read, self.a_buffer.exp_read, self.w_buffer.exp_read
        w_reads = [getattr(self.w_buffer, f"read_{b}") for b in range(cols)]
        tag1 = data.View(pipe.in_tag.shape(), delay_line(m, pipe.enable, pipe.in_tag, 1, "seq_tag1"))
        tag2 = data.View(pipe.in_tag.shape(), delay_line(m, pipe.enable, tag1, 1, "seq_tag2"))
        read_half2 = delay_line(m, pipe.enable, w_half, 2, "read_half")
        raw_a = Signal.like(a_read.data)
        raw_ea, raw_ew = Signal.like(ea_read.data), Signal.like(ew_read.data)
        raw_w = [Signal.like(port.data, name=f"raw_w_{b}") for b, port in enumerate(w_reads)]
        with m.If(pipe.enable):
            m.d.sync += [raw_a.eq(a_read.data), raw_ea.eq(ea_read.data), raw_ew.eq(ew_read.data)]
            m.d.sync += [raw.eq(port.data) for raw, port in zip(raw_w, w_reads)]
        # a chunk's exponents are read with its first step and held for the rest
        chunk_start = tag2.chunk_start
        ea_hold = Signal(data.ArrayLayout(EXP, rows))
        eb_hold = Signal(data.ArrayLayout(EXP, cols))
        with m.If(pipe.advance & chunk_start):
            m.d.sync += [ea_hold.eq(raw_ea), eb_hold.eq(raw_ew)]
        ea_now = data.View(data.ArrayLayout(EXP, rows), Mux(chunk_start, raw_ea.as_value(), ea_hold.as_value()))
        ew_now = data.View(data.ArrayLayout(EXP, cols), Mux(chunk_start, raw_ew.as_value(), eb_hold.as_value()))

        # B operands and exponents per column. Column j takes lane `lane` of bank j (forward) or lane j of bank
        # `bank` (transposed), or zero. Each column loads its own copy of the select (bank, lane, direction and its
        # keep mask) beside `tag2`, in registers synthesis does not merge (:func:`~..pipeline.private_register`),
        # so that the select lines of a column's muxes stay within the column instead of one tag field fanning out
        # to all of them
        select_layout = data.StructLayout({"bank": range(cols), "lane": range(cols), "transposed": 1, "keep": 1})
        b_values = []
        for j in range(cols):
            select = Signal(select_layout, name=f"b_select_{j}")
            keep = tag1.real & (tag1.transposed | (j < tag1.fwd_cols))
            # (the fields in the layout's order)
            private_register(m, platform, select.as_value(), Cat(tag1.bank, tag1.lane, tag1.transposed, keep),
                             pipe.enable, f"b_select_{j}")
            bwd_value = Array(raw_w[b][j] for b in range(cols))[select.bank]
            fwd_value = Array(raw_w[j][lane] for lane in range(cols))[select.lane]
            b_values.append(Mux(select.keep, Mux(select.transposed, bwd_value, fwd_value), 0))
        a_values = [Mux(tag2.real, raw_a[i], 0) for i in range(rows)]
        # transposed chunks use the tile's single exponent; it belongs to the half being read
        b_exps = [Mux(tag2.transposed, self.w_buffer.tile_exponent[read_half2], ew_now[j]) for j in range(cols)]

        # stage 3: the selected operands and their shared exponents, registered before the alignment
        for side, values, shared, lanes in (("a", a_values, ea_now, self.steps.payload.a),
                                            ("b", b_values, b_exps, self.steps.payload.b)):
            for i, lane in enumerate(lanes):
                unit = AlignLanes(1, stages=self.ALIGN_STAGES)
                m.submodules[f"align_{side}_{i}"] = pipe.stall(unit)
                value = Signal(BF16.width, name=f"{side}_value_{i}")
                exponent = Signal(EXP, name=f"{side}_shared_{i}")
                with m.If(pipe.enable):
                    m.d.sync += [value.eq(values[i]), exponent.eq(shared[i])]
                m.d.comb += [unit.values[0].eq(value), unit.shared.eq(exponent), lane.eq(unit.q[0])]
        m.d.comb += [self.steps.valid.eq(pipe.out_valid), self.steps.payload.last.eq(pipe.out_tag.last)]
        return chunk_start, ea_now, b_exps

    def _push_info(self, m, entry, info_in, pending, ea_now, b_exps):
        """Chunk info into the FIFO a cycle after stage 2 of a chunk's first step, through a register: ``advance``
        (from the array's ready) does not reach the FIFO's level logic in the same cycle. The entry is read only
        when the chunk's sums leave the array, many cycles later, and the room check's margin covers the one entry
        in the register."""
        cfg = self.config
        info = data.View(info_layout(cfg), info_in.payload)
        m.d.sync += info_in.valid.eq(entry)
        with m.If(entry):
            m.d.sync += [info.base.eq(pending.base), info.first.eq(pending.first), info.last.eq(pending.last),
                         info.job_last.eq(pending.job_last)]
            m.d.sync += [info.ea[i].eq(ea_now[i]) for i in range(cfg.rows)]
            m.d.sync += [info.eb[j].eq(b_exps[j]) for j in range(cfg.cols)]
