"""The GEMM engine's sequencer: walks the tiles, reads the buffers, aligns the operands and feeds the PE array."""

from amaranth.hdl import Array, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..bfp import AlignLanes
from ..fp import BF16
from ..pe_array import steps_layout
from ..pipeline import StallPipeline, private_register
from .config import EXP, ABufferSignature, ControlSignature, GemmConfig, WBufferSignature, info_layout

__all__ = ["Sequencer"]


class Sequencer(wiring.Component):
    """Walk the tiles, read the buffers, align operands to 18-bit integers, feed the PE array.

    Forward, for each A tile and each W tile (``cols`` W rows), one chunk after another along K: a chunk's steps
    read A at reduction index ``q`` and lane ``q % cols`` of every bank. Transposed, for each A tile and each W
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

    def elaborate(self, platform):
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        words, slots = cfg.words_per_row, cfg.slots
        min_steps = cfg.min_steps
        m = Module()
        job, start = self.control.job, self.control.start
        q_length = Mux(job.transposed, job.n, job.k)
        a_buffer, w_buffer = self.a_buffer, self.w_buffer
        a_full_next, w_full_next = a_buffer.full_next, w_buffer.full_next
        a_release, w_release = a_buffer.release, w_buffer.release

        layout = info_layout(cfg)
        info_depth = self.INFO_DEPTH
        m.submodules.info_fifo = fifo = SyncFIFOBuffered(width=layout.size, depth=info_depth)
        wiring.connect(m, fifo.r_stream, wiring.flipped(self.info))

        # loop counters
        active = Signal()
        flushing = Signal(range(self.flush_steps + 1))
        m_left = Signal(32)        # A rows left, this tile included
        a_half, w_half = Signal(), Signal()
        outer = Signal(32)         # forward: p0 (first output column of the tile); transposed: n0 (first W row)
        kt = Signal(32)            # transposed: k-tile index t (output columns t*cols ...)
        k0 = Signal(32)            # transposed: t * cols
        q0 = Signal(32)            # forward: first reduction index of the chunk
        chunk_index = Signal(32)   # chunk of the A buffer (q0 / chunk)
        step = Signal(range(max(chunk, min_steps) + 1))
        fwd_lane = Signal(range(cols))        # forward: q % cols, the lane of the W word read
        bwd_bank = Signal(range(cols))        # transposed: the bank of row `step` of the W tile
        with m.If(start):
            m.d.sync += [m_left.eq(job.m), outer.eq(0), kt.eq(0), k0.eq(0), q0.eq(0),
                         chunk_index.eq(0), step.eq(0), fwd_lane.eq(0), bwd_bank.eq(0)]

        # Loop control. Every flag the issue logic needs is a register for the current chunk; the next chunk's
        # coordinates are worked out on the chunk's second step, what is left of K and N after them on its third,
        # their flags (comparisons with constants) on its fourth and the padded step count on its fifth (a chunk has
        # at least 12 steps), so at most one 32-bit carry chain sits between two registers and none between the
        # counters and the array's step enable.
        length_shape = range(chunk + 1)
        fwd_cols_shape = range(cols + 1)

        def flags_of(k_left, n_left, kb_left, m_left_, first_):
            # k_left = K - q0, n_left = N - outer, kb_left = K - k0: all positive
            fwd_len = Mux(k_left < chunk, k_left, chunk)
            bwd_len = Mux(n_left < chunk, n_left, chunk)
            fwd_last_chunk_, fwd_last_tile_ = k_left <= chunk, n_left <= cols
            bwd_last_ktile_, bwd_last_chunk_ = kb_left <= cols, n_left <= chunk
            return {
                "length": Mux(job.transposed, bwd_len, fwd_len),
                "fwd_last_chunk": fwd_last_chunk_,
                "fwd_last_tile": fwd_last_tile_,
                "bwd_last_ktile": bwd_last_ktile_,
                "bwd_last_chunk": bwd_last_chunk_,
                # the chunk's last step hands back its W tile / A tile (a register each: the release drives the
                # halves' full flags and the writers' handshakes behind them)
                "w_tile_done": Mux(job.transposed, bwd_last_ktile_, fwd_last_chunk_),
                "a_tile_done": Mux(job.transposed, bwd_last_chunk_ & bwd_last_ktile_,
                                   fwd_last_chunk_ & fwd_last_tile_),
                "last_m_tile": m_left_ <= rows,
                "first": first_,
                "fwd_cols": Mux(n_left < cols, n_left, cols),
            }

        def steps_m1_of(length_):   # a cycle after the length (the chunk's fifth step): padded steps, minus 1
            return Mux(length_ < min_steps, min_steps, length_) - 1

        first_flags = flags_of(job.k, job.n, job.k, job.m, 1)
        flag_shapes = {"length": length_shape, "steps_m1": range(max(chunk, min_steps)), "fwd_cols": fwd_cols_shape}
        cur = {name: Signal(flag_shapes.get(name, 1), name=f"chunk_{name}")
               for name in [*first_flags, "steps_m1"]}
        nxt = {name: Signal(flag_shapes.get(name, 1), name=f"next_{name}") for name in cur}
        n_q0, n_outer, n_kt, n_k0 = (Signal(32, name=f"next_{n}") for n in ("q0", "outer", "kt", "k0"))
        n_chunk_index, n_m_left = Signal(32), Signal(32)
        n_k_left, n_n_left, n_kb_left = (Signal(32, name=f"next_{n}_left") for n in ("k", "n", "kb"))
        with m.If(start):
            m.d.sync += [cur[name].eq(value) for name, value in first_flags.items()]
        # the first chunk's padded step count a cycle after its length, like every other chunk's: its first step is
        # later still (the buffers take longer than that to fill)
        started = Signal()
        m.d.sync += started.eq(start)
        with m.If(started):
            m.d.sync += cur["steps_m1"].eq(steps_m1_of(cur["length"]))

        length = cur["length"]
        # per-step flags as registers, each set a step ahead, so that `issue`, which enables most of the sequencer,
        # is not the end of a comparison with the chunk's length: `step == 0`, `step == steps_m1`, `step < length`.
        # A chunk has at least `min_steps` (12) steps and at least one real one
        step_zero, last_step, real = Signal(init=1), Signal(), Signal(init=1)
        with m.If(start):
            m.d.sync += [last_step.eq(0), real.eq(1)]
        fwd_last_chunk, fwd_last_tile = cur["fwd_last_chunk"], cur["fwd_last_tile"]
        bwd_last_ktile, bwd_last_chunk = cur["bwd_last_ktile"], cur["bwd_last_chunk"]
        last_m_tile = cur["last_m_tile"]
        chunk_first = cur["first"]
        chunk_last = Mux(job.transposed, bwd_last_chunk, fwd_last_chunk)
        job_last = last_m_tile & Mux(job.transposed, bwd_last_chunk & bwd_last_ktile,
                                     fwd_last_chunk & fwd_last_tile)

        # memory read; a register on the raw read data (block RAM clock-to-out is slow); selection and exponents,
        # registered; the alignment's distance, shift and rounding, each registered
        align_stages = 3
        pipe_latency = 1 + 1 + 1 + align_stages
        # (the PE array takes the steps; everything before it stalls with it)
        pipe = StallPipeline(m, pipe_latency, self.steps.ready, tag_shape=data.StructLayout({
            "real": 1, "last": 1, "lane": range(cols), "bank": range(cols), "transposed": 1,
            "fwd_cols": fwd_cols_shape, "bwd_row_real": 1, "chunk_start": 1,
        }), name="seq", platform=platform)
        # A step may start when the sequencer is active, its buffers' halves are full and, on a chunk's first step,
        # the chunk FIFO has room (a chunk start may be in each of the 3 stages and the push register before the
        # FIFO). All of that is `gate`, a register worked out a cycle ahead from the next values of what it reads
        # (below), so that `issue`, which enables most of the sequencer, is one gate behind the stall chain rather
        # than behind the halves' full flags and the FIFO's level. Its room test uses the FIFO's level a cycle
        # early, which grows by one at most in between.
        gate = Signal()
        issue = self.issue
        m.d.comb += issue.eq(gate & pipe.advance)
        m.d.comb += [pipe.in_valid.eq(issue | (flushing != 0))]

        # --- stage 0: addresses
        a_read, ea_read, ew_read = a_buffer.read, a_buffer.exp_read, w_buffer.exp_read
        w_reads = [getattr(w_buffer, f"read_{b}") for b in range(cols)]
        for port in [a_read, ea_read, ew_read, *w_reads]:
            m.d.comb += port.en.eq(pipe.advance)
        # the chunk's fixed addresses (A at its first step, its exponents, the W tile's base) for the next chunk
        # are worked out on its third step; the exponent addresses are registers set from them at the chunk's end
        n_bases = {name: Signal(range(depth), name=f"next_{name}_base")
                   for name, depth in (("a", 2 * cfg.max_q), ("ea", 2 * cfg.chunks_q), ("ew", 2 * cfg.chunks_k),
                                       ("w", 2 * slots * words))}
        bases = {name: Signal.like(n_bases[name], name=f"{name}_base") for name in ("ea", "ew")}

        def bases_of(a_half_, w_half_, q0_, outer_, kt_, chunk_index_):
            return {
                "a": Mux(a_half_, cfg.max_q, 0) + Mux(job.transposed, outer_, q0_),
                "ea": Mux(a_half_, cfg.chunks_q, 0) + chunk_index_,
                "ew": Mux(w_half_, cfg.chunks_k, 0) + chunk_index_,
                "w": Mux(w_half_, slots * words, 0) + Mux(job.transposed, kt_, 0),
            }
        # the A and W read addresses are registers that count from the chunk's bases (A: its base + step; W,
        # forward: every bank reads its row (slot 0) at word q // cols, the tile's base + q // cols; transposed: row
        # `step` of the tile, its base + (step // cols) * words): the memories sit all over the die, and no adder
        # sits in front of the long routes to them
        a_address = Signal(range(2 * cfg.max_q))
        w_address = Signal(range(2 * slots * words))
        with m.If(start):
            first_bases = bases_of(a_half, w_half, 0, 0, 0, 0)
            m.d.sync += [bases[name].eq(first_bases[name]) for name in bases]
            m.d.sync += [a_address.eq(first_bases["a"]), w_address.eq(first_bases["w"])]
        m.d.comb += [
            a_read.addr.eq(a_address),
            ea_read.addr.eq(bases["ea"]),
            ew_read.addr.eq(bases["ew"]),
        ]
        for port in w_reads:
            m.d.comb += port.addr.eq(w_address)

        fwd_cols = cur["fwd_cols"]
        m.d.comb += [
            pipe.in_tag.real.eq(issue & real),
            pipe.in_tag.last.eq(issue & last_step),
            pipe.in_tag.lane.eq(fwd_lane),
            pipe.in_tag.bank.eq(bwd_bank),
            pipe.in_tag.transposed.eq(job.transposed),
            pipe.in_tag.fwd_cols.eq(fwd_cols),
            pipe.in_tag.chunk_start.eq(issue & step_zero),
        ]

        # chunk info: pushed when the chunk's first step reaches stage 1 (its exponents are then read)
        info_in = data.View(layout, fifo.w_stream.payload)
        pending = Signal(layout)   # the fields known at issue
        with m.If(issue & step_zero):
            m.d.sync += [
                pending.base.eq(Mux(job.transposed, kt * rows, 0)),
                pending.first.eq(chunk_first),
                pending.last.eq(chunk_last),
                pending.job_last.eq(job_last),
            ]

        # the next chunk's coordinates (second step), what is left after them (third step) and flags (fourth step)
        with m.If(issue & (step == 1)):
            with m.If(~job.transposed):
                with m.If(fwd_last_chunk):
                    m.d.sync += [n_q0.eq(0), n_chunk_index.eq(0), n_kt.eq(0), n_k0.eq(0),
                                 n_outer.eq(Mux(fwd_last_tile, 0, outer + cols)),
                                 n_m_left.eq(Mux(fwd_last_tile, m_left - rows, m_left))]
                with m.Else():
                    m.d.sync += [n_q0.eq(q0 + chunk), n_chunk_index.eq(chunk_index + 1), n_kt.eq(kt),
                                 n_k0.eq(k0), n_outer.eq(outer), n_m_left.eq(m_left)]
            with m.Else():
                with m.If(bwd_last_ktile):
                    m.d.sync += [n_kt.eq(0), n_k0.eq(0), n_q0.eq(q0),
                                 n_outer.eq(Mux(bwd_last_chunk, 0, outer + chunk)),
                                 n_chunk_index.eq(Mux(bwd_last_chunk, 0, chunk_index + 1)),
                                 n_m_left.eq(Mux(bwd_last_chunk, m_left - rows, m_left))]
                with m.Else():
                    m.d.sync += [n_kt.eq(kt + 1), n_k0.eq(k0 + cols), n_q0.eq(q0), n_outer.eq(outer),
                                 n_chunk_index.eq(chunk_index), n_m_left.eq(m_left)]
        w_tile_done, a_tile_done = cur["w_tile_done"], cur["a_tile_done"]
        with m.If(issue & (step == 2)):
            m.d.sync += [n_k_left.eq(job.k - n_q0), n_n_left.eq(job.n - n_outer), n_kb_left.eq(job.k - n_k0)]
            m.d.sync += [n_bases[name].eq(value) for name, value in bases_of(
                a_half ^ a_tile_done, w_half ^ w_tile_done, n_q0, n_outer, n_kt, n_chunk_index).items()]
        with m.If(issue & (step == 3)):
            n_first = Mux(job.transposed, n_outer == 0, n_q0 == 0)   # the coordinates hold from the second step
            m.d.sync += [nxt[name].eq(value)
                         for name, value in flags_of(n_k_left, n_n_left, n_kb_left, n_m_left, n_first).items()]
        with m.If(issue & (step == 4)):
            m.d.sync += nxt["steps_m1"].eq(steps_m1_of(nxt["length"]))

        # advance the counters
        with m.If(issue):
            m.d.sync += [step.eq(Mux(last_step, 0, step + 1)), a_address.eq(a_address + 1),
                         last_step.eq(~last_step & (step + 1 == cur["steps_m1"])),
                         real.eq(last_step | (step + 1 < length))]
            with m.If(real & ~job.transposed):
                m.d.sync += fwd_lane.eq(Mux(fwd_lane == cols - 1, 0, fwd_lane + 1))
                with m.If(fwd_lane == cols - 1):
                    m.d.sync += w_address.eq(w_address + 1)
            with m.If(real & job.transposed):
                m.d.sync += bwd_bank.eq(Mux(bwd_bank == cols - 1, 0, bwd_bank + 1))
                with m.If(bwd_bank == cols - 1):
                    m.d.sync += w_address.eq(w_address + words)
            with m.If(last_step):
                m.d.sync += [bwd_bank.eq(0), q0.eq(n_q0), outer.eq(n_outer), kt.eq(n_kt),
                             k0.eq(n_k0), chunk_index.eq(n_chunk_index), m_left.eq(n_m_left)]
                m.d.sync += [cur[name].eq(nxt[name]) for name in cur]
                m.d.sync += [bases[name].eq(n_bases[name]) for name in bases]
                m.d.sync += a_address.eq(n_bases["a"])
                # (forward, within a W tile, the base stays and the word count goes on)
                with m.If(job.transposed | w_tile_done):
                    m.d.sync += w_address.eq(n_bases["w"])
                with m.If(w_tile_done):
                    # the W tile is done
                    m.d.comb += w_release.bit_select(w_half, 1).eq(1)
                    with m.If(~job.transposed):
                        m.d.sync += fwd_lane.eq(0)
                with m.If(a_tile_done):
                    # the A tile is done
                    m.d.comb += a_release.bit_select(a_half, 1).eq(1)
                    with m.If(last_m_tile):
                        m.d.sync += flushing.eq(self.flush_steps)
        with m.If(pipe.advance & (flushing != 0) & ~issue):
            m.d.sync += flushing.eq(flushing - 1)

        # `active` (set at `start`, cleared after the last A tile), the halves (flipped when a chunk hands its tile
        # back) and `step_zero` load their next values, and `gate` is worked out from them
        chunk_end = issue & last_step
        a_half_next = a_half ^ (chunk_end & a_tile_done)
        w_half_next = w_half ^ (chunk_end & w_tile_done)
        active_next = Mux(start, 1, active & ~(chunk_end & a_tile_done & last_m_tile))
        step_zero_next = Mux(start, 1, Mux(issue, last_step, step_zero))
        room_next = fifo.level < info_depth - 5
        m.d.sync += [active.eq(active_next), a_half.eq(a_half_next), w_half.eq(w_half_next),
                     step_zero.eq(step_zero_next)]
        m.d.sync += gate.eq(active_next & a_full_next.bit_select(a_half_next, 1)
                            & w_full_next.bit_select(w_half_next, 1) & (~step_zero_next | room_next))
        m.d.comb += self.control.done.eq(~active & (flushing == 0))

        # --- stage 1: memory data, registered raw; stage 2: select, mask, exponents; stage 3: their register;
        # stages 4-6: alignment
        tag1, tag2 = Signal.like(pipe.in_tag), Signal.like(pipe.in_tag)
        read_half, read_half2 = Signal(), Signal()
        raw_a = Signal.like(a_read.data)
        raw_ea, raw_ew = Signal.like(ea_read.data), Signal.like(ew_read.data)
        raw_w = [Signal.like(port.data, name=f"raw_w_{b}") for b, port in enumerate(w_reads)]
        with m.If(pipe.enable):
            m.d.sync += [tag1.eq(pipe.in_tag), tag2.eq(tag1), read_half.eq(w_half), read_half2.eq(read_half),
                         raw_a.eq(a_read.data), raw_ea.eq(ea_read.data), raw_ew.eq(ew_read.data)]
            m.d.sync += [raw.eq(port.data) for raw, port in zip(raw_w, w_reads)]
        chunk_start = tag2.chunk_start
        ea_hold = Signal(data.ArrayLayout(EXP, rows))
        eb_hold = Signal(data.ArrayLayout(EXP, cols))
        ea_now = Mux(chunk_start, raw_ea.as_value(), ea_hold.as_value())
        ew_now = Mux(chunk_start, raw_ew.as_value(), eb_hold.as_value())
        with m.If(pipe.advance & chunk_start):
            m.d.sync += [ea_hold.eq(raw_ea), eb_hold.eq(raw_ew)]
        ea_now = data.View(data.ArrayLayout(EXP, rows), ea_now)
        ew_now = data.View(data.ArrayLayout(EXP, cols), ew_now)

        # B operands and exponents per column. Column j takes lane `lane` of bank j (forward) or lane j of bank
        # `bank` (transposed), or zero. Each column loads its own copy of the select (bank, lane, direction and its
        # keep mask) beside `tag2`, in registers synthesis does not merge (:func:`~..pipeline.private_register`),
        # so that the select lines of a column's muxes stay within the column instead of one tag field fanning out
        # to all of them
        select_layout = data.StructLayout({"bank": range(cols), "lane": range(cols), "transposed": 1, "keep": 1})
        b_values = []
        b_exps = []
        for j in range(cols):
            select = Signal(select_layout, name=f"b_select_{j}")
            keep = tag1.real & (tag1.transposed | (j < tag1.fwd_cols))
            # (the fields in the layout's order)
            private_register(m, platform, select.as_value(), Cat(tag1.bank, tag1.lane, tag1.transposed, keep),
                             pipe.enable, f"b_select_{j}")
            bwd_value = Array(raw_w[b][j] for b in range(cols))[select.bank]
            fwd_value = Array(raw_w[j][l] for l in range(cols))[select.lane]
            b_values.append(Mux(select.keep, Mux(select.transposed, bwd_value, fwd_value), 0))
        a_values = [Mux(tag2.real, raw_a[i], 0) for i in range(rows)]

        # transposed chunks use the tile's single exponent; it belongs to the half being read
        for j in range(cols):
            b_exps.append(Mux(tag2.transposed, w_buffer.tile_exponent[read_half2], ew_now[j]))

        align_b_units = []
        for j in range(cols):
            unit = AlignLanes(1, stages=align_stages)
            m.submodules[f"align_b_{j}"] = pipe.stall(unit)
            align_b_units.append(unit)
        align_a_units = []
        for i in range(rows):
            unit = AlignLanes(1, stages=align_stages)
            m.submodules[f"align_a_{i}"] = pipe.stall(unit)
            align_a_units.append(unit)
        # stage 3: the selected operands and their shared exponents, registered before the alignment
        for i, unit in enumerate(align_a_units):
            value, shared = Signal(BF16.width, name=f"a_value_{i}"), Signal(EXP, name=f"a_shared_{i}")
            with m.If(pipe.enable):
                m.d.sync += [value.eq(a_values[i]), shared.eq(ea_now[i])]
            m.d.comb += [unit.values[0].eq(value), unit.shared.eq(shared)]
        for j, unit in enumerate(align_b_units):
            value, shared = Signal(BF16.width, name=f"b_value_{j}"), Signal(EXP, name=f"b_shared_{j}")
            with m.If(pipe.enable):
                m.d.sync += [value.eq(b_values[j]), shared.eq(b_exps[j])]
            m.d.comb += [unit.values[0].eq(value), unit.shared.eq(shared)]

        # chunk info to the FIFO a cycle after stage 2 of a chunk's first step, through a register: `advance` (from
        # the array's ready) does not reach the FIFO's level logic in the same cycle. The entry is read only when
        # the chunk's sums leave the array, many cycles later, and the room check's margin covers the one entry in
        # the register
        push = Signal()
        entry = pipe.advance & chunk_start
        m.d.sync += push.eq(entry)
        with m.If(entry):
            m.d.sync += [info_in.base.eq(pending.base), info_in.first.eq(pending.first),
                         info_in.last.eq(pending.last), info_in.job_last.eq(pending.job_last)]
            m.d.sync += [info_in.ea[i].eq(ea_now[i]) for i in range(rows)]
            m.d.sync += [info_in.eb[j].eq(b_exps[j]) for j in range(cols)]
        m.d.comb += fifo.w_stream.valid.eq(push)

        # stage 6 -> the array
        m.d.comb += [
            self.steps.valid.eq(pipe.out_valid),
            self.steps.payload.last.eq(pipe.out_tag.last),
        ]
        for i, unit in enumerate(align_a_units):
            m.d.comb += self.steps.payload.a[i].eq(unit.q[0])
        for j, unit in enumerate(align_b_units):
            m.d.comb += self.steps.payload.b[j].eq(unit.q[0])
        return m
