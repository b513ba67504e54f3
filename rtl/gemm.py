"""Tiled streaming GEMM engine fed by the NF4 dequantizer (twin: ``golden/gemm.py``, schedule and cycle model in
``golden/gemm_schedule.py``).

The engine computes ``C = A @ B`` on a ``rows x cols`` :class:`~.pe_array.PEArray`, with the block-floating-point
arithmetic of :mod:`edge_qlora.golden.gemm`:

* **forward**, ``y = x @ W.T``: A = x ``[M, K]``, B = ``W.T``; the reduction runs over K.
* **transposed** (backward), ``dx = dy @ W``: A = dy ``[M, N]``, B = W; the reduction runs over N.

W ``[N, K]`` always arrives row-major and flat: from the NF4 dequantizer (``weights="nf4"``) or as bf16 beats
(``weights="bf16"``), once per tile of ``rows`` output rows, and never exists in memory in full precision. A
:class:`~.row_align.RowAligner` re-cuts it into row-aligned beats of ``cols`` elements.

Buffers (all :class:`~amaranth.lib.memory.Memory`, all double-buffered so loading overlaps computing):

* the A buffer holds one tile of A: ``rows`` rows of the whole reduction (``max_q`` deep);
* the W buffer holds ``cols`` rows of W (forward: one column tile of B) or ``chunk`` rows (transposed: one chunk
  of B's rows), in ``cols`` banks of ``cols``-element words;
* exponent memories hold each chunk's shared exponents (per A row; per W row in forward, one per W tile in
  transposed);
* the accumulator memory holds float32 partial results: ``rows`` of them in forward, ``rows`` per column tile of
  the output in transposed (``max_k`` wide).

Datapath: writers (A, W) -> buffers -> sequencer (addresses, alignment to 18-bit integers) -> PE array -> chunk
sums -> :class:`~.fp.FixedToFloat` -> float32 accumulation (:class:`~.fp.FPAdd` on the accumulator memory) ->
output rounding -> ``c``.
"""

from dataclasses import dataclass

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from edge_qlora.golden.gemm import GemmNumerics
from .bfp import BF16_BIAS, EXP_MIN, AlignLanes, bf16_exponent, exponent_field, max_of_partials, partial_maxima
from .fp import BF16, FP32, FPAdd, FPConvert, FixedToFloat
from .nf4_dequant import NF4DequantConfig, NF4Dequantizer
from .pe_array import ACC_BITS, PEArray
from .pipeline import SkidBuffer, StallPipeline, private_register
from .row_align import RowAligner, row_layout

__all__ = ["GemmConfig", "GemmEngine", "job_layout", "a_layout", "c_layout"]

EXP = signed(9)


@dataclass(frozen=True)
class GemmConfig:
    """Elaboration parameters of :class:`GemmEngine`.

    Parameters
    ----------
    rows, cols : int
        PE array shape, 1 to 16 each.
    max_k : int
        Longest W row (K) the buffers hold.
    max_n : int
        Most W rows (N) in transposed mode (the A buffer then holds a tile of dy, ``N`` long).
    chunk : int or None
        Reduction steps per block-floating-point chunk: a multiple of ``cols``, at least ``2 * rows`` and 16.
        ``None``: the smallest such value.
    out_dtype : str
        ``"bf16"`` or ``"fp32"``.
    weights : str
        ``"nf4"`` (an :class:`~.nf4_dequant.NF4Dequantizer` with ``cols`` lanes feeds the engine), ``"bf16"``
        (a flat bf16 stream ``w``), or ``"both"``: the dequantizer and, chosen per job, a stream ``rows_in`` of
        bf16 beats already cut into rows (as the row aligner's output), for a controller that keeps its operands
        in row-addressable scratchpads.
    blocksize, double_quant : int, bool
        NF4 format, with ``weights="nf4"``.
    """

    rows: int = 8
    cols: int = 8
    max_k: int = 2048
    max_n: int = 2048
    chunk: int = None
    out_dtype: str = "bf16"
    weights: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16:
                raise ValueError(f"{name} must be an integer from 1 to 16, not {value!r}")
        for name in ("max_k", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 1 << 20:
                raise ValueError(f"{name} must be an integer from 1 to 2**20, not {value!r}")
        if self.chunk is not None:
            if not isinstance(self.chunk, int) or self.chunk % self.cols or self.chunk < max(16, 2 * self.rows) \
                    or self.chunk > 512:
                raise ValueError(f"chunk must be a multiple of cols ({self.cols}), at least "
                                 f"{max(16, 2 * self.rows)} and at most 512, not {self.chunk!r}")
        if self.out_dtype not in ("bf16", "fp32"):
            raise ValueError(f"out_dtype must be 'bf16' or 'fp32', not {self.out_dtype!r}")
        if self.weights not in ("nf4", "bf16", "both"):
            raise ValueError(f"weights must be 'nf4', 'bf16' or 'both', not {self.weights!r}")
        if self.weights in ("nf4", "both"):
            NF4DequantConfig(lanes=self.cols, blocksize=self.blocksize, double_quant=self.double_quant)

    @property
    def chunk_steps(self):
        """The chunk length L actually used."""
        if self.chunk is not None:
            return self.chunk
        low = max(16, 2 * self.rows)
        return -(-low // self.cols) * self.cols

    @property
    def min_steps(self):
        """Fewest steps a chunk is padded to: the PE array's drain spacing (``2 * rows - 1``), and 12 so that the
        same output's partials of consecutive chunks reach the accumulator further apart than its
        read-add-write latency (10 cycles)."""
        return max(2 * self.rows - 1, 12)

    @property
    def numerics(self):
        return GemmNumerics(chunk=self.chunk_steps, out_dtype=self.out_dtype)

    @property
    def max_q(self):
        """Depth of one half of the A buffer: the longest reduction."""
        return max(self.max_k, self.max_n)

    @property
    def words_per_row(self):
        return -(-self.max_k // self.cols)

    @property
    def tile_rows(self):
        """W rows one half of the W buffer holds: cols (forward), chunk (transposed)."""
        return max(self.cols, self.chunk_steps)


def job_layout():
    """Payload of the ``job`` stream: one beat per GEMM. ``weights`` is ``n * k`` (the W elements per pass);
    ``rows_in`` (engines with ``weights="both"``) takes this job's W from the ``rows_in`` stream, not the
    dequantizer."""
    return data.StructLayout({"m": 32, "n": 32, "k": 32, "weights": 32, "transposed": 1, "rows_in": 1})


def a_layout(rows):
    """Payload of the ``a`` stream: one reduction index of one A tile: ``rows`` bf16 values (zeros past M)."""
    return data.ArrayLayout(16, rows)


def c_layout(config):
    """Payload of the ``c`` stream: one output row of one tile, ``cols`` values; ``last`` on the job's last beat."""
    width = 16 if config.out_dtype == "bf16" else 32
    return data.StructLayout({"data": data.ArrayLayout(width, config.cols), "last": 1})


def _writer_ready_next(open_next, full_next, half, flip):
    """A writer's next ``ready``: it will still be open and the half it writes next (``half``, flipped when this
    cycle ends a tile) will not be full. Loaded into a register every cycle, it equals ``open & ~full[half]``."""
    return open_next & ~full_next.bit_select(half ^ flip, 1)


class GemmEngine(wiring.Component):
    """Tiled streaming GEMM: ``y = x @ W.T`` or, transposed, ``dx = dy @ W``, W from the NF4 dequantizer.

    Per job: one ``job`` beat; then, for each tile of ``rows`` rows of A (``ceil(M / rows)`` tiles), the tile's A
    values (``Q`` beats of ``rows`` values: Q = K forward, N transposed) and one pass of W (``N * K`` weights,
    row-major, through the dequantizer's streams or ``w``). Outputs come as beats of ``cols`` values, one per
    output row of a tile: forward, tile after tile of ``cols`` output columns (``rows`` beats each); transposed,
    after the last chunk of an A tile, ``rows`` beats per tile of ``cols`` output columns. Rows past M and columns
    past the output width carry don't-care values.

    Parameters
    ----------
    config : GemmConfig

    Attributes
    ----------
    job : In(stream of :func:`job_layout`)
    a : In(stream of :func:`a_layout`)
    w : In(stream of ArrayLayout(16, cols)), bf16 weights only
        W, flat and row-major, ``cols`` bf16 per beat, final beat zero-padded.
    tensor, codes, absmax, absmax2 : NF4 weights only
        The dequantizer's input streams (see :class:`~.nf4_dequant.NF4Dequantizer`), one tensor per pass of W.
    c : Out(stream of :func:`c_layout`)
    collisions : list of (str, Memory, Signal), set by ``elaborate``
        The memories marked ``no_rw_check``, each with a strobe that is high when its read data is used: in such a
        cycle it may not read an address that it writes (simulations check it).
    """

    def __init__(self, config=GemmConfig()):
        if not isinstance(config, GemmConfig):
            raise TypeError(f"config must be a GemmConfig, not {config!r}")
        self.config = config
        self.array = PEArray(config.rows, config.cols)
        members = {
            "job": In(stream.Signature(job_layout())),
            "a": In(stream.Signature(a_layout(config.rows))),
            "c": Out(stream.Signature(c_layout(config))),
        }
        if config.weights in ("nf4", "both"):
            self.dequantizer = NF4Dequantizer(NF4DequantConfig(
                lanes=config.cols, blocksize=config.blocksize, out_dtype="bf16", double_quant=config.double_quant))
            for name, member in self.dequantizer.signature.members.items():
                if name != "weights":
                    members[name] = member
        else:
            self.dequantizer = None
            members["w"] = In(stream.Signature(data.ArrayLayout(16, config.cols)))
        if config.weights == "both":
            members["rows_in"] = In(stream.Signature(row_layout(config.cols, 16)))
        super().__init__(members)

    # ---------------------------------------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        m.submodules.array = self.array

        # the job, latched by every part when the engine is idle
        job = Signal(job_layout())
        busy = Signal()
        parts_done = Signal()
        m.d.comb += self.job.ready.eq(~busy)
        with m.If(self.job.valid & self.job.ready):
            m.d.sync += [job.eq(self.job.payload), busy.eq(1)]
        start = Signal()  # one cycle after a job is taken: the parts load their counters
        m.d.sync += start.eq(self.job.valid & self.job.ready)
        with m.If(busy & parts_done & ~start):
            m.d.sync += busy.eq(0)
        q_length = Mux(job.transposed, job.n, job.k)

        # shared state between the writers and the sequencer: which halves are full
        a_full = Signal(2)
        w_full = Signal(2)
        a_release, w_release = Signal(2), Signal(2)
        a_filled, w_filled = Signal(2), Signal(2)
        # (the writers and the sequencer read their next values, from which they work out a cycle ahead whether they
        # may take a beat or issue a step)
        a_full_next, w_full_next = Signal(2), Signal(2)
        m.d.comb += [a_full_next.eq((a_full | a_filled) & ~a_release), w_full_next.eq((w_full | w_filled) & ~w_release)]
        m.d.sync += [a_full.eq(a_full_next), w_full.eq(w_full_next)]

        a_done, w_done, seq_done, acc_done = Signal(), Signal(), Signal(), Signal()
        m.d.comb += parts_done.eq(a_done & w_done & seq_done & acc_done)

        mem = self._memories(m)
        self._a_writer(m, mem, job, start, q_length, a_full_next, a_filled, a_done)
        self._w_writer(m, mem, job, start, w_full_next, w_filled, w_done)
        chunk_info = self._sequencer(m, platform, mem, job, start, q_length, a_full_next, w_full_next, a_release,
                                     w_release, seq_done)
        self._accumulator(m, platform, mem, job, start, chunk_info, acc_done)
        return m

    def _memories(self, m):
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        chunks_q = -(-cfg.max_q // chunk)
        chunks_k = -(-cfg.max_k // chunk)
        slots = -(-cfg.tile_rows // cols)
        # No read whose data is used meets a write to its address in the same cycle (the sequencer issues steps from
        # full halves only, the writers write only halves that are not full; the accumulator admits an item only
        # when no item in flight still writes its address, or when it ignores the read): the read ports may return
        # don't-care on a collision (Yosys's `no_rw_check`, applied by boards/build.py), and the block RAMs need no
        # soft logic that emulates read-before-write. `collisions` lets simulations check the claim.
        free = {"no_rw_check": 1}
        mem = {
            "a": Memory(shape=data.ArrayLayout(16, rows), depth=2 * cfg.max_q, init=[], attrs=free),
            "ea": Memory(shape=data.ArrayLayout(EXP, rows), depth=2 * chunks_q, init=[], attrs=free),
            "ew": Memory(shape=data.ArrayLayout(EXP, cols), depth=2 * chunks_k, init=[], attrs=free),
            "acc": Memory(shape=data.ArrayLayout(32, cols), depth=rows * cfg.words_per_row, init=[], attrs=free),
        }
        for bank in range(cols):
            mem[f"w{bank}"] = Memory(shape=data.ArrayLayout(16, cols), depth=2 * slots * cfg.words_per_row, init=[],
                                     attrs=free)
        for name, memory in mem.items():
            m.submodules[f"mem_{name}"] = memory
        mem["chunks_q"], mem["chunks_k"], mem["slots"] = chunks_q, chunks_k, slots
        # transposed mode: one shared exponent for all of a W tile, per half
        mem["tile_exponent"] = Array(Signal(EXP, name=f"tile_exponent_{h}", init=EXP_MIN) for h in range(2))
        return mem

    # --- A writer ---------------------------------------------------------------------------------------------------

    def _a_writer(self, m, mem, job, start, q_length, a_full_next, a_filled, a_done):
        """Tiles of A into the A buffer, with each chunk's shared exponent per row."""
        cfg = self.config
        rows, chunk = cfg.rows, cfg.chunk_steps
        write = mem["a"].write_port()
        exp_write = mem["ea"].write_port()

        half = Signal()
        m_left = Signal(32)         # A rows still to load, this tile included
        q = Signal(32)
        in_chunk = Signal(range(chunk))
        chunk_index = Signal(range(mem["chunks_q"]))
        running = [Signal(EXP, name=f"a_exp_{i}", init=EXP_MIN) for i in range(rows)]
        active = Signal()

        # q is the tile's last reduction index: a register, so that the 32-bit compare stays off the handshake
        q_last = Signal()
        # and whether this is the last tile of A rows: a register too, not a 32-bit compare behind the handshake
        m_last = Signal()
        with m.If(start):
            m.d.sync += [m_left.eq(job.m), q.eq(0), in_chunk.eq(0), chunk_index.eq(0),
                         q_last.eq(q_length == 1), m_last.eq(job.m <= rows)]
        m.d.comb += a_done.eq(~active)

        # a register slice at the engine's boundary: the writer's `ready` stops at the slice, and the producer sees
        # a registered `ready` (the 8x8 engine's longest path ran from `a_full` through `ready` to the producer's
        # logic across the die and back)
        m.submodules.a_slice = a_slice = SkidBuffer(a_layout(rows))
        wiring.connect(m, wiring.flipped(self.a), a_slice.i)
        a_in = a_slice.o
        ready = Signal()    # `active & ~a_full[half]`, a register (see the end)
        m.d.comb += a_in.ready.eq(ready)
        take = a_in.valid & ready
        chunk_end = (in_chunk == chunk - 1) | q_last
        # the buffer writes are registered: `take` stays off the routes to the block RAMs, which sit all over the die
        # (the 8x8 engine's longest path ran from `a_full` through `ready` to a block RAM's write enable and back
        # to `a_full`); the half goes to the sequencer a cycle after its last take, once that write has landed.
        # The chunk maxima work from those registers too, a cycle behind `take` (the beat in `write.data`, taken
        # if `write.en`), so `take` does not fan out to them either: the maxima's registers pulled the writer's
        # handshake apart (the 8x8 engine's longest path ran from `ready` to logic 31 columns away and back)
        exp_en = Signal()   # the beat in `write.data` ends its chunk
        m.d.sync += [
            write.addr.eq(Mux(half, cfg.max_q, 0) + q),
            write.data.eq(a_in.payload),
            write.en.eq(take),
            exp_write.addr.eq(Mux(half, mem["chunks_q"], 0) + chunk_index),
            exp_en.eq(take & chunk_end),
        ]
        # the running maxima are kept biased too: the comparison needs no subtraction in front of it, and the
        # unbiased exponent (for the memory) is computed beside the comparison, not behind it
        running_biased = [Signal(8, name=f"a_exp_biased_{i}", init=EXP_MIN + BF16_BIAS) for i in range(rows)]
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
                # the tile is in: hand the half to the sequencer (`a_filled` is a register, see above)
                m.d.sync += a_filled.bit_select(half, 1).eq(1)
                m.d.sync += [q.eq(0), in_chunk.eq(0), chunk_index.eq(0),
                             m_left.eq(m_left - rows), m_last.eq(m_left <= 2 * rows)]
        # `active` (set at `start`, cleared after the last tile) and `half` (flipped after each tile) load their next
        # values, from which `ready` is worked out too: the handshake starts at two registers (the slice's valid and
        # this), not behind a mux of the full flags (the 8x8 engine's longest path ran from `active` through `ready`
        # to the slice and back to the writer's state)
        tile_in = take & q_last
        active_next = Mux(start, 1, active & ~(tile_in & m_last))
        m.d.sync += [active.eq(active_next), half.eq(half ^ tile_in),
                     ready.eq(_writer_ready_next(active_next, a_full_next, half, tile_in))]

    # --- W writer ---------------------------------------------------------------------------------------------------

    def _w_writer(self, m, mem, job, start, w_full_next, w_filled, w_done):
        """Passes of W, re-cut into rows, into tiles of the W buffer, with their shared exponents."""
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        words = cfg.words_per_row
        slots = mem["slots"]
        m.submodules.row_align = aligner = RowAligner(cols)
        if self.dequantizer is not None:
            m.submodules.dequantizer = self.dequantizer
            for name in self.dequantizer.signature.members:
                if name != "weights":
                    wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(self.dequantizer, name))
            # a small FIFO between them keeps the aligner's handshake out of the dequantizer's critical path
            m.submodules.dequant_fifo = skid = SyncFIFOBuffered(width=16 * cols, depth=4)
            m.d.comb += [
                skid.w_data.eq(self.dequantizer.weights.payload.data),
                skid.w_en.eq(self.dequantizer.weights.valid),
                self.dequantizer.weights.ready.eq(skid.w_rdy),
                aligner.flat.valid.eq(skid.r_rdy),
                aligner.flat.payload.eq(skid.r_data),
                skid.r_en.eq(aligner.flat.ready),
            ]
        else:
            wiring.connect(m, wiring.flipped(self.w), aligner.flat)

        # one shape header per pass of W: ceil(M / rows) passes per job
        passes_left = Signal(32)
        with m.If(start):
            m.d.sync += passes_left.eq(job.m)
        m.d.comb += [
            aligner.shape.valid.eq((passes_left != 0) & ~job.rows_in),
            aligner.shape.payload.rows.eq(job.n),
            aligner.shape.payload.row_length.eq(job.k),
            aligner.shape.payload.elements.eq(job.weights),
        ]
        with m.If(aligner.shape.valid & aligner.shape.ready):
            m.d.sync += passes_left.eq(Mux(passes_left <= rows, 0, passes_left - rows))

        beat = aligner.rows
        if cfg.weights == "both":
            # per job: the aligner's output or the rows_in stream, both row-aligned
            beat = stream.Signature(row_layout(cols, 16)).create(path=("w_rows",))
            m.d.comb += [
                beat.valid.eq(Mux(job.rows_in, self.rows_in.valid, aligner.rows.valid)),
                beat.payload.eq(Mux(job.rows_in, self.rows_in.payload, aligner.rows.payload)),
                self.rows_in.ready.eq(job.rows_in & beat.ready),
                aligner.rows.ready.eq(~job.rows_in & beat.ready),
            ]
        # two register slices in front of the writer, which find the beat's largest exponent ahead of it (the lane
        # maximum and the running maxima in one cycle were the engine's longest path, then the lane maximum alone).
        # The first slice takes the maxima of the tree's first levels with the beat; the second finishes the tree
        # into `peak`, loaded with the beat, so the row and tile maxima compare a register with a register.
        levels = (cols - 1).bit_length()
        first = stream.Signature(row_layout(cols, 16)).create(path=("w_beat_first",))
        # raw exponent fields (no zero test in front of the tree): a beat of zeros gives -127, below the running
        # maxima, which start at -126
        partial = partial_maxima(m, beat.payload.data, -(-levels // 2), "w_beat_peak", raw=True)
        partial_held = [Signal(8, name=f"w_beat_partial_{i}") for i in range(len(partial))]
        m.d.comb += beat.ready.eq(~first.valid | first.ready)
        with m.If(beat.valid & beat.ready):
            m.d.sync += [first.valid.eq(1), first.payload.eq(beat.payload),
                         *(reg.eq(node) for reg, node in zip(partial_held, partial))]
        with m.Elif(first.ready):
            m.d.sync += first.valid.eq(0)

        source = first
        beat = stream.Signature(row_layout(cols, 16)).create(path=("w_beat",))
        peak = Signal(EXP)      # the largest exponent of the beat in `beat.payload`
        m.d.comb += source.ready.eq(~beat.valid | beat.ready)
        with m.If(source.valid & source.ready):
            m.d.sync += [beat.valid.eq(1), beat.payload.eq(source.payload),
                         peak.eq(max_of_partials(m, partial_held, "w_beat_peak"))]
        with m.Elif(beat.ready):
            m.d.sync += beat.valid.eq(0)

        half = Signal()
        row = Signal(range(cfg.tile_rows))   # row within the tile
        word = Signal(range(words))
        words_in_chunk = chunk // cols
        word_in_chunk = Signal(range(words_in_chunk))
        chunk_index = Signal(range(mem["chunks_k"]))
        tile_rows = Mux(job.transposed, chunk, cols)
        rows_seen = Signal(32)              # rows of this pass already written
        pass_open = Signal()                # a pass of W is still expected (m_left != 0, kept as a register)
        m_left = Signal(32)
        m_more = Signal()                   # m_left > rows: a pass is left after this one (a register)
        with m.If(start):
            m.d.sync += [m_left.eq(job.m), m_more.eq(job.m > rows), row.eq(0), word.eq(0), word_in_chunk.eq(0),
                         chunk_index.eq(0),
                         rows_seen.eq(0)]
        m.d.comb += w_done.eq(~pass_open)

        ready = Signal()    # `pass_open & ~w_full[half]`, a register (as in the A writer; see the end)
        m.d.comb += beat.ready.eq(ready)
        take = beat.valid & ready
        row_end = beat.payload.row_end
        pass_end = beat.payload.last
        tile_end = row_end & ((row == tile_rows - 1) | pass_end)

        row_peak = Signal(EXP, init=EXP_MIN)     # forward: this row's current chunk
        tile_peak = Signal(EXP, init=EXP_MIN)    # transposed: the whole tile
        new_row_peak = Mux(peak > row_peak, peak, row_peak)
        new_tile_peak = Mux(peak > tile_peak, peak, tile_peak)
        tile_exponent = mem["tile_exponent"]

        slot = Signal(range(slots + 1))     # row // cols and row % cols, as counters
        bank = Signal(range(cols))
        address = Mux(half, slots * words, 0) + slot * words + word
        # registered writes, as in the A writer: `take` stays off the routes to the banks; a tile goes to the
        # sequencer a cycle after its last take
        for b in range(cols):
            port = mem[f"w{b}"].write_port()
            m.d.sync += [port.addr.eq(address), port.data.eq(beat.payload.data), port.en.eq(take & (bank == b))]

        exp_port = mem["ew"].write_port(granularity=1)  # one element (a row's exponent) at a time
        chunk_end = (word_in_chunk == words_in_chunk - 1) | row_end
        m.d.sync += [
            exp_port.addr.eq(Mux(half, mem["chunks_k"], 0) + chunk_index),
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
                             tile_exponent[half].eq(new_tile_peak)]
            with m.If(pass_end):
                m.d.sync += [m_left.eq(Mux(m_more, m_left - rows, 0)), m_more.eq(m_left > 2 * rows)]
        # `pass_open` (set at `start`, then whether passes are left after each) and `half` load their next values,
        # from which `ready` is worked out too (as in the A writer)
        tile_in = take & tile_end
        pass_open_next = Mux(start, job.m != 0, Mux(take & pass_end, m_more, pass_open))
        m.d.sync += [pass_open.eq(pass_open_next), half.eq(half ^ tile_in),
                     ready.eq(_writer_ready_next(pass_open_next, w_full_next, half, tile_in))]

    # --- sequencer --------------------------------------------------------------------------------------------------

    def _sequencer(self, m, platform, mem, job, start, q_length, a_full_next, w_full_next, a_release, w_release,
                   seq_done):
        """Walk the tiles, read the buffers, align operands to 18-bit integers, feed the PE array.

        Returns the chunk-info stream (one entry per chunk: exponents, accumulator base, first/last flags).
        """
        cfg = self.config
        rows, cols, chunk = cfg.rows, cfg.cols, cfg.chunk_steps
        words, slots = cfg.words_per_row, mem["slots"]
        array = self.array
        min_steps = cfg.min_steps

        info_layout = data.StructLayout({
            "ea": data.ArrayLayout(EXP, rows), "eb": data.ArrayLayout(EXP, cols),
            "base": range(max(1, rows * words)), "first": 1, "last": 1, "job_last": 1,
        })
        # chunks in flight: from their first step to their last row's partial leaving the accumulator front;
        # short padded chunks (min_chunk steps) can have many in flight
        info_depth = 16
        m.submodules.chunk_info = fifo = SyncFIFOBuffered(width=info_layout.size, depth=info_depth)
        info = data.View(info_layout, fifo.r_data)

        # loop counters
        active = Signal()
        flushing = Signal(range(array.flush_steps + 1))
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
        def flags_of(k_left, n_left, kb_left, m_left_, first_):
            # k_left = K - q0, n_left = N - outer, kb_left = K - k0: all positive
            fwd_len = Mux(k_left < chunk, k_left[:16], chunk)
            bwd_len = Mux(n_left < chunk, n_left[:16], chunk)
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
                "fwd_cols": Mux(n_left < cols, n_left[:5], cols),
            }

        def steps_m1_of(length_):   # a cycle after the length (the chunk's fifth step): padded steps, minus 1
            return Mux(length_ < min_steps, min_steps, length_) - 1

        first_flags = flags_of(job.k, job.n, job.k, job.m, 1)
        flag_shapes = {"length": 16, "steps_m1": 16, "fwd_cols": 5}
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
        # per-step flags as registers, each set a step ahead (`issue`, which enables most of the sequencer, was the
        # end of a comparison with the chunk's length): `step == 0`, `step == steps_m1`, `step < length`. A chunk
        # has at least `min_steps` (12) steps and at least one real one
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

        # memory read; a register on the raw read data (block RAM clock-to-out is slow on ECP5); selection and
        # exponents, registered; the alignment's distance, shift and rounding, each registered
        align_stages = 3
        pipe_latency = 1 + 1 + 1 + align_stages
        # (the PE array takes the steps; everything before it stalls with it)
        pipe = StallPipeline(m, pipe_latency, array.steps.ready, tag_shape=data.StructLayout({
            "real": 1, "last": 1, "lane": range(cols), "bank": range(cols), "transposed": 1, "fwd_cols": 5,
            "bwd_row_real": 1, "chunk_start": 1,
        }), name="seq", platform=platform)
        # A step may start when the sequencer is active, its buffers' halves are full and, on a chunk's first step, the
        # chunk FIFO has room (a chunk start may be in each of the 3 stages and the push register before the FIFO). All
        # of that is `gate`, a register worked out a cycle ahead from the next values of what it reads (below), so that
        # `issue`, which enables most of the sequencer, is one gate behind the stall chain (the 8x8 engine's longest
        # paths ran from the halves' full flags and the FIFO's level through `issue`). Its room test uses the FIFO's
        # level a cycle early, which grows by one at most in between.
        gate = Signal()
        issue = Signal()
        m.d.comb += issue.eq(gate & pipe.advance)
        m.d.comb += [pipe.in_valid.eq(issue | (flushing != 0))]
        self.collisions = [(name, mem[name], issue) for name in ("a", "ea", "ew", *(f"w{b}" for b in range(cols)))]

        # --- stage 0: addresses
        a_read = mem["a"].read_port(domain="sync")
        ea_read = mem["ea"].read_port(domain="sync")
        ew_read = mem["ew"].read_port(domain="sync")
        w_reads = [mem[f"w{b}"].read_port(domain="sync") for b in range(cols)]
        for port in [a_read, ea_read, ew_read, *w_reads]:
            m.d.comb += port.en.eq(pipe.advance)
        # the chunk's fixed addresses (A at its first step, its exponents, the W tile's base) for the next chunk are
        # worked out on its third step; the exponent addresses are registers set from them at the chunk's end
        n_bases = {name: Signal(range(mem[key].depth), name=f"next_{name}_base")
                   for name, key in (("a", "a"), ("ea", "ea"), ("ew", "ew"), ("w", "w0"))}
        bases = {name: Signal.like(n_bases[name], name=f"{name}_base") for name in ("ea", "ew")}

        def bases_of(a_half_, w_half_, q0_, outer_, kt_, chunk_index_):
            return {
                "a": Mux(a_half_, cfg.max_q, 0) + Mux(job.transposed, outer_, q0_),
                "ea": Mux(a_half_, mem["chunks_q"], 0) + chunk_index_,
                "ew": Mux(w_half_, mem["chunks_k"], 0) + chunk_index_,
                "w": Mux(w_half_, slots * words, 0) + Mux(job.transposed, kt_, 0),
            }
        # the A and W read addresses are registers that count from the chunk's bases (A: its base + step; W,
        # forward: every bank reads its row (slot 0) at word q // cols, the tile's base + q // cols; transposed: row
        # `step` of the tile, its base + (step // cols) * words): the memories sit all over the die, and an adder
        # in front of the long routes to them was the 8x8 engine's longest path
        a_address = Signal(range(mem["a"].depth))
        w_address = Signal(range(mem["w0"].depth))
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
        info_in = data.View(info_layout, fifo.w_data)
        pending = Signal(info_layout)   # the fields known at issue
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
                        m.d.sync += flushing.eq(array.flush_steps)
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
        m.d.comb += seq_done.eq(~active & (flushing == 0))

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
        # keep mask) beside `tag2`, in registers synthesis does not merge (:func:`~.pipeline.private_register`), so
        # that the select lines of a column's 8:1 muxes stay within the column instead of one tag field fanning out
        # to all of them (the `5a802ea` critical path)
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
            b_exps.append(Mux(tag2.transposed, mem["tile_exponent"][read_half2], ew_now[j]))

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
            value, shared = Signal(16, name=f"a_value_{i}"), Signal(EXP, name=f"a_shared_{i}")
            with m.If(pipe.enable):
                m.d.sync += [value.eq(a_values[i]), shared.eq(ea_now[i])]
            m.d.comb += [unit.values[0].eq(value), unit.shared.eq(shared)]
        for j, unit in enumerate(align_b_units):
            value, shared = Signal(16, name=f"b_value_{j}"), Signal(EXP, name=f"b_shared_{j}")
            with m.If(pipe.enable):
                m.d.sync += [value.eq(b_values[j]), shared.eq(b_exps[j])]
            m.d.comb += [unit.values[0].eq(value), unit.shared.eq(shared)]

        # chunk info to the FIFO a cycle after stage 2 of a chunk's first step, through a register: `advance`
        # (from the array's ready) must not reach the FIFO's level logic in the same cycle (the longest path of the
        # 8x8 netlist). The entry is read only when the chunk's sums leave the array, many cycles later, and the
        # room check's margin covers the one entry in the register
        push = Signal()
        entry = pipe.advance & chunk_start
        m.d.sync += push.eq(entry)
        with m.If(entry):
            m.d.sync += [info_in.base.eq(pending.base), info_in.first.eq(pending.first),
                         info_in.last.eq(pending.last), info_in.job_last.eq(pending.job_last)]
            m.d.sync += [info_in.ea[i].eq(ea_now[i]) for i in range(rows)]
            m.d.sync += [info_in.eb[j].eq(b_exps[j]) for j in range(cols)]
        m.d.comb += fifo.w_en.eq(push)

        # stage 6 -> the array
        m.d.comb += [
            array.steps.valid.eq(pipe.out_valid),
            array.steps.payload.last.eq(pipe.out_tag.last),
        ]
        for i, unit in enumerate(align_a_units):
            m.d.comb += array.steps.payload.a[i].eq(unit.q[0])
        for j, unit in enumerate(align_b_units):
            m.d.comb += array.steps.payload.b[j].eq(unit.q[0])
        return fifo, info

    # --- accumulator ------------------------------------------------------------------------------------------------

    def _accumulator(self, m, platform, mem, job, start, chunk_info, acc_done):
        """Chunk sums -> float32 -> accumulated per output in the accumulator memory -> rounded outputs."""
        cfg = self.config
        rows, cols = cfg.rows, cfg.cols
        fifo, info = chunk_info
        # a FIFO decouples the array's step enable from the accumulator's hazard checks (a long path otherwise). Its
        # room is a register worked out a cycle early (at most one write lands in between), so that the array's step
        # ready, and with it the sequencer's whole stall chain, starts at registers, not at the FIFO's level logic
        partials_depth = 6
        m.submodules.partials_fifo = partials_fifo = SyncFIFOBuffered(width=self.array.partials.payload.shape().size,
                                                                       depth=partials_depth)
        partials_room = Signal()
        m.d.sync += partials_room.eq(partials_fifo.level <= partials_depth - 3)
        m.d.comb += [
            partials_fifo.w_data.eq(self.array.partials.payload),
            partials_fifo.w_en.eq(self.array.partials.valid & partials_room),
            self.array.partials.ready.eq(partials_room),
        ]
        partials = stream.Signature(self.array.partials.payload.shape()).create(path=("partials_out",))
        m.d.comb += [partials.valid.eq(partials_fifo.r_rdy), partials.payload.eq(partials_fifo.r_data),
                     partials_fifo.r_en.eq(partials.ready)]

        # front: integer chunk sums to float32 (stalls with its consumer); stages=5 registers the operands
        converters = [FixedToFloat(ACC_BITS, stages=5, biased=True) for _ in range(cols)]
        tag = data.StructLayout({"addr": range(max(1, rows * cfg.words_per_row)), "first": 1, "last": 1,
                                 "job_last": 1})
        # a register slice between the converters and the accumulator: the hazard check below decides whether an
        # item enters the accumulator; it must not also decide whether the whole front pipeline advances
        m.submodules.acc_slice = acc_slice = SkidBuffer(data.StructLayout({
            "tag": tag, "values": data.ArrayLayout(32, cols)}))
        # the converters' first register stage is a register slice (`acc_in`): the row's A exponent is selected once
        # for all columns, and that selection, fanned out across the die, must not share a cycle with the exponent
        # adders behind it; and the two FIFOs are read on the slice's `ready`, a register, not on the front's
        # `advance` (from the accumulator slice's ready through both FIFOs' level logic, a deep path of the 8x8
        # netlist). The slice's output register is the stage, so the latency is as before
        exp_width = converters[0].exponent_width
        m.submodules.acc_in = acc_in = SkidBuffer(data.StructLayout({
            "tag": tag, "row_ea": EXP, "values": data.ArrayLayout(signed(ACC_BITS), cols),
            "col_eb": data.ArrayLayout(signed(exp_width), cols)}))
        front = StallPipeline(m, converters[0].latency, acc_slice.i.ready, tag_shape=tag, name="acc_front",
                              platform=platform)
        staged = acc_in.o.payload
        for j, unit in enumerate(converters):
            m.submodules[f"to_float_{j}"] = front.stall(unit)
            # the converter takes its exponent biased: the constant goes into the column's register, so the
            # converter's input register gets one sum (the chunk sum is worth 2 ** (Ea + Eb - 32))
            m.d.comb += [
                acc_in.i.payload.values[j].eq(partials.payload.data[j]),
                acc_in.i.payload.col_eb[j].eq(info.eb[j] + (unit.exponent_offset - 32)),
                unit.value.eq(staged.values[j]),
                unit.exponent.eq(staged.row_ea + staged.col_eb[j]),
            ]
        last_row = partials.payload.row == rows - 1
        m.d.comb += [
            partials.ready.eq(acc_in.i.ready & fifo.r_rdy),
            acc_in.i.valid.eq(partials.valid & fifo.r_rdy),
            acc_in.i.payload.row_ea.eq(Array(info.ea[i] for i in range(rows))[partials.payload.row]),
            acc_in.i.payload.tag.addr.eq(info.base + partials.payload.row),
            acc_in.i.payload.tag.first.eq(info.first),
            acc_in.i.payload.tag.last.eq(info.last),
            acc_in.i.payload.tag.job_last.eq(info.job_last & last_row),
            fifo.r_en.eq(partials.valid & partials.ready & last_row),
            front.in_valid.eq(acc_in.o.valid),
            front.in_tag.eq(staged.tag),
            acc_in.o.ready.eq(front.advance),
            acc_slice.i.valid.eq(front.out_valid),
            acc_slice.i.payload.tag.eq(front.out_tag),
        ]
        for j, unit in enumerate(converters):
            m.d.comb += acc_slice.i.payload.values[j].eq(unit.result)

        # back: read-add-write on the accumulator memory, free-running; an item enters only if no item in flight
        # will still write its address and the output FIFO has a place for it
        # stages=8 registers every cut: the operands (the accumulator memory's read data goes straight into a
        # register) and the magnitude comparison apart from the swap it steers
        adders = [FPAdd(FP32, stages=8) for _ in range(cols)]
        out_fmt = BF16 if cfg.out_dtype == "bf16" else FP32
        rounders = [FPConvert(FP32, BF16) if out_fmt == BF16 else None for _ in range(cols)]
        back_latency = 1 + adders[0].latency
        round_latency = rounders[0].latency if rounders[0] else 0
        for j, unit in enumerate(adders):
            m.submodules[f"acc_add_{j}"] = unit
        for j, unit in enumerate(rounders):
            if unit is not None:
                m.submodules[f"out_round_{j}"] = unit

        out_layout = c_layout(cfg)
        depth = 4 + back_latency + round_latency
        m.submodules.out_fifo = out_fifo = SyncFIFOBuffered(width=out_layout.size, depth=depth)
        m.d.comb += [
            self.c.valid.eq(out_fifo.r_rdy),
            self.c.payload.eq(out_fifo.r_data),
            out_fifo.r_en.eq(self.c.ready),
        ]

        # in-flight bookkeeping: one slot per cycle of the back pipeline (and of the rounding behind it)
        valid = [Signal(name=f"back_valid_{s}") for s in range(back_latency + round_latency)]
        tags = [Signal(tag, name=f"back_tag_{s}") for s in range(back_latency + round_latency)]
        head = acc_slice.o.payload.tag
        # `hazard`: an item in the back pipeline (not its last stage) still writes the head's address. A register,
        # worked out a cycle ahead for both outcomes (the head stays; the next item becomes the head), so that only
        # the late `admit` picks one: eight address compares in front of `admit`, which enables the wide slice
        # registers, were the 4x4 engine's longest path.
        hazard = Signal()

        def pending(addr):   # items in stages 0 .. back_latency - 2, which move on and still write, at `addr`
            found = Const(0)
            for s in range(back_latency - 1):
                found = found | (valid[s] & ~tags[s].last & (tags[s].addr == addr))
            return found

        def hazard_if_head(tag_):  # `tag_` becomes the head; the present head (if any) moves into stage 0
            return pending(tag_.addr) | (acc_slice.o.valid & ~head.last & (head.addr == tag_.addr))
        hazard_if_stay = pending(head.addr)
        # the next head is the slice's spare item if it holds one, else its input: both checks, then the pick, so
        # that the slice's `spare_valid` is one mux from `hazard` (in front of the address compares, it was a
        # deep path of the 8x8 netlist)
        hazard_if_next = Mux(acc_slice.spare_valid, hazard_if_head(acc_slice.spare.tag),
                             hazard_if_head(acc_slice.i.payload.tag))
        # outputs admitted and not yet read from the output FIFO (in flight or queued): a counter rather than the
        # FIFO level plus a count over the pipeline slots, which was the engine's longest path into `admit`. `room`
        # is a register too (the 8x8 engine's longest path ran from `reserved` through the compare and `admit` back
        # into `hazard`): the count a cycle ago against a threshold one lower, safe as it grows by one a cycle at most
        reserved = Signal(range(depth + 1))
        room = Signal(init=1)
        m.d.sync += room.eq(reserved < depth - 2)
        admit = ~(hazard & ~head.first) & room
        m.d.comb += acc_slice.o.ready.eq(admit)
        m.d.sync += hazard.eq(Mux(~acc_slice.o.valid | admit, hazard_if_next, hazard_if_stay))
        enter = acc_slice.o.valid & admit
        m.d.sync += reserved.eq(reserved + (enter & head.last) - (self.c.valid & self.c.ready))
        m.d.sync += [valid[0].eq(enter), tags[0].eq(head)]
        for s in range(1, len(valid)):
            m.d.sync += [valid[s].eq(valid[s - 1]), tags[s].eq(tags[s - 1])]

        read = mem["acc"].read_port(domain="sync", transparent_for=())
        write = mem["acc"].write_port()
        m.d.comb += [read.addr.eq(head.addr), read.en.eq(1)]
        used = Signal()     # the read's data is added (not the first partial of an address)
        m.d.comb += used.eq(enter & ~head.first)
        self.collisions.append(("acc", mem["acc"], used))
        partial_values = Signal(data.ArrayLayout(32, cols))   # beside the memory read, one cycle
        m.d.sync += partial_values.eq(acc_slice.o.payload.values)
        for j, unit in enumerate(adders):
            m.d.comb += [
                unit.a.eq(partial_values[j]),
                unit.b.eq(Mux(tags[0].first, 0, read.data[j])),
            ]
        sums_tag = tags[back_latency - 1]
        sums_valid = valid[back_latency - 1]
        m.d.comb += [
            write.addr.eq(sums_tag.addr),
            write.en.eq(sums_valid & ~sums_tag.last),
        ]
        for j, unit in enumerate(adders):
            m.d.comb += write.data[j].eq(unit.result)
            if rounders[j] is not None:
                m.d.comb += rounders[j].a.eq(unit.result)
        out_tag = tags[-1]
        out_valid = valid[-1]
        out_in = data.View(out_layout, out_fifo.w_data)
        m.d.comb += [out_fifo.w_en.eq(out_valid & out_tag.last), out_in.last.eq(out_tag.job_last)]
        for j in range(cols):
            result = rounders[j].result if rounders[j] is not None else adders[j].result
            m.d.comb += out_in.data[j].eq(result)

        # done when nothing is left anywhere
        idle = (~acc_in.spare_valid & ~front.out_valid & ~acc_slice.o.valid & ~Cat(*valid).any() & ~fifo.r_rdy
                & ~out_fifo.r_rdy)
        m.d.comb += acc_done.eq(idle)
