"""The QLoRA training step of one linear layer, sequenced in hardware (twin: ``golden/lora.py``).

:class:`LoraStep` holds the step's operands in matrix scratchpads (:class:`~.scratchpad.MatrixStore`, readable
along rows and columns), runs the eight products of the step on one :class:`~.gemm.GemmEngine` (the NF4 base
weight streams through its dequantizer, the LoRA factors and activations come from the scratchpads), combines and
scales in float32, and updates A and B with :class:`~.lora_optim.LoRAOptimizer`. A controller walks the phases
with no host action between them::

    load x, dy, A, B -> F1 h = x A^T -> F3 yl = hb B^T -> F2 y = x W^T + s yl -> B1 g = dy B -> B5 dxl = gb A
    -> B4 dx = dy W + s dxl -> B2 gB = dy^T hb -> B3 gA = gb^T x -> update A -> update B

(hb, gb: bf16 roundings of h, g.) The order puts each LoRA term before the base product it is added to, so the
base product's output is combined on its way out and never stored.

The master copies of A and B are float32 (a bf16 copy could not hold an update smaller than 2**-8 of a weight),
and so are the AdamW moments. The moments live in attached memory: they stream in (``state_in``) during the
update phases and out again (``updates``), element by element.

Streams (all payloads in :mod:`.lora` layouts): ``header`` (one per step: dimensions, scaling, optimizer
constants), ``x_in``, ``dy_in``, ``a_in``, ``b_in`` (row segments of ``banks`` elements, ``row_end``/``last``),
the dequantizer's ``tensor``/``codes``/``absmax``/``absmax2`` (one pass of W per tile of rows of x, for F2 and
for B4), ``state_in``; out: ``y`` and ``dx`` (the engine's output beats, tile order), ``updates`` (per element of
A, then B: gradient, new value, new moments).
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .fp import BF16, FP32, FPAdd, FPConvert, FPMul
from .gemm import GemmConfig, GemmEngine, a_layout
from .lora_optim import LoRAOptimizer, OptimConfig, hyper_layout
from .pipeline import StallPipeline
from .row_align import row_layout
from .scratchpad import MatrixStore

__all__ = ["LoraConfig", "LoraStep", "header_layout", "segment_in_layout", "PHASES"]

#: Phase order and, per GEMM phase: (M, N, K) as dimension names, transposed, W from the dequantizer,
#: A operand (store, "col": Act = store, "row": Act = store^T), W operand (store, "rows"/"cols"), destination
#: (store, rounded to bf16) or "y"/"dx" (combined with a store and sent out).
PHASES = {
    "F1": (("t", "r", "in"), False, False, ("x", "col"), ("a", "rows"), ("hb", True)),
    "F3": (("t", "out", "r"), False, False, ("hb", "col"), ("b", "rows"), ("yl", False)),
    "F2": (("t", "out", "in"), False, True, ("x", "col"), None, ("y", "yl")),
    "B1": (("t", "out", "r"), True, False, ("dy", "col"), ("b", "rows"), ("gb", True)),
    "B5": (("t", "r", "in"), True, False, ("gb", "col"), ("a", "rows"), ("dxl", False)),
    "B4": (("t", "out", "in"), True, True, ("dy", "col"), None, ("dx", "dxl")),
    "B2": (("out", "r", "t"), False, False, ("dy", "row"), ("hb", "cols"), ("gbs", False)),
    "B3": (("r", "t", "in"), True, False, ("gb", "row"), ("x", "rows"), ("ga", False)),
}
GEMM_ORDER = ("F1", "F3", "F2", "B1", "B5", "B4", "B2", "B3")

#: scratchpad matrices: (rows, cols) as dimension names, element width
STORES = {
    "x": (("t", "in"), 16), "dy": (("t", "out"), 16), "a": (("r", "in"), 32), "b": (("out", "r"), 32),
    "hb": (("t", "r"), 16), "gb": (("t", "r"), 16), "yl": (("t", "out"), 32), "dxl": (("t", "in"), 32),
    "ga": (("r", "in"), 32), "gbs": (("out", "r"), 32),
}


@dataclass(frozen=True)
class LoraConfig:
    """Elaboration parameters of :class:`LoraStep`.

    Parameters
    ----------
    rows, cols : int
        GEMM engine array, 1 to 16 each.
    max_t, max_in, max_out, max_rank : int
        Largest dimensions the scratchpads hold.
    optimizer : str
        ``"adamw"`` or ``"sgd"``.
    blocksize, double_quant : NF4 format of the base weight.
    """

    rows: int = 4
    cols: int = 4
    max_t: int = 16
    max_in: int = 64
    max_out: int = 64
    max_rank: int = 8
    optimizer: str = "adamw"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        for name in ("max_t", "max_in", "max_out", "max_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 1 << 15:
                raise ValueError(f"{name} must be an integer from 1 to 32768, not {value!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}")
        self.gemm  # checks rows, cols

    @property
    def banks(self):
        """Scratchpad banks: the next power of two of the longest segment any mover reads."""
        side = max(self.rows, self.cols)
        return 1 << (side - 1).bit_length()

    @property
    def gemm(self):
        longest = max(self.max_t, self.max_in, self.max_out, self.max_rank)
        return GemmConfig(rows=self.rows, cols=self.cols, max_k=max(self.max_in, self.max_t, self.max_rank),
                          max_n=longest, out_dtype="fp32", weights="both", blocksize=self.blocksize,
                          double_quant=self.double_quant)

    def dims(self):
        return {"t": self.max_t, "in": self.max_in, "out": self.max_out, "r": self.max_rank}

    @property
    def chunk(self):
        return self.gemm.chunk_steps


def header_layout():
    """Payload of the ``header`` stream: one beat per step."""
    return data.StructLayout({
        "t": 16, "in": 16, "out": 16, "r": 16,
        "scaling": 32,          # float32
        "n_weights": 32,        # out * in, for the dequantizer and the row aligner
        "offset": 32,           # float32 offset of the NF4 weight's double quantization
        "hyper": hyper_layout,
    })


def segment_in_layout(banks, width):
    """Payload of the matrix input streams: ``banks`` elements of one row, ``row_end`` on its last segment."""
    return data.StructLayout({"data": data.ArrayLayout(width, banks), "row_end": 1, "last": 1})


def updates_layout():
    """Payload of ``updates``: one element of A, then of B: gradient, new value, new moments (float32)."""
    return data.StructLayout({"grad": 32, "param": 32, "m": 32, "v": 32})


class LoraStep(wiring.Component):
    """One QLoRA training step of a linear layer, all phases sequenced in hardware.

    Parameters
    ----------
    config : LoraConfig

    Attributes
    ----------
    header : In(stream of :func:`header_layout`)
    x_in, dy_in, a_in, b_in : In(stream of :func:`segment_in_layout`)
        x [T, in] and dy [T, out] (bf16), A [r, in] and B [out, r] (float32), row-major in row segments.
    tensor, codes, absmax, absmax2 : In(stream)
        The NF4 base weight, as the dequantizer takes it (see :class:`~.nf4_dequant.NF4Dequantizer`).
    state_in : In(stream of StructLayout {"m": 32, "v": 32})
        AdamW moments of A, then B, element by element in row-major order (SGD: zeros, still one per element).
    y, dx : Out(stream of the engine's output beats)
        y = x W^T + s yl and dx = dy W + s dxl, bf16, in the engine's tile order.
    updates : Out(stream of :func:`updates_layout`)
    phase : Out(4)
        The running phase (for waveforms and cycle accounting).
    """

    def __init__(self, config=LoraConfig()):
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, not {config!r}")
        self.config = config
        self.engine = GemmEngine(config.gemm)
        banks = config.banks
        members = {
            "header": In(stream.Signature(header_layout())),
            "x_in": In(stream.Signature(segment_in_layout(banks, 16))),
            "dy_in": In(stream.Signature(segment_in_layout(banks, 16))),
            "a_in": In(stream.Signature(segment_in_layout(banks, 32))),
            "b_in": In(stream.Signature(segment_in_layout(banks, 32))),
            "state_in": In(stream.Signature(data.StructLayout({"m": 32, "v": 32}))),
            "y": Out(stream.Signature(c_layout_bf16(config))),
            "dx": Out(stream.Signature(c_layout_bf16(config))),
            "updates": Out(stream.Signature(updates_layout())),
            "phase": Out(5),
        }
        for name in ("tensor", "codes", "absmax", "absmax2"):
            if name in self.engine.signature.members:
                members[name] = self.engine.signature.members[name]
        super().__init__(members)

    # -------------------------------------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        banks = cfg.banks
        shift = banks.bit_length() - 1
        m.submodules.engine = engine = self.engine
        for name in ("tensor", "codes", "absmax", "absmax2"):
            if name in engine.signature.members:
                wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(engine, name))

        # the step's header
        header = Signal(header_layout())
        dims = {name: header[name] for name in ("t", "in", "out", "r")}

        def row_words(cols):
            return (cols + banks - 1) >> shift

        # scratchpads, one read and one write port each (the phases never need two readers of one store)
        stores = {}
        for name, ((rows_dim, cols_dim), width) in STORES.items():
            depth = cfg.dims()[rows_dim] * -(-cfg.dims()[cols_dim] // banks)
            store = MatrixStore(banks, width, depth, read_ports=1)
            m.submodules[f"store_{name}"] = store
            stores[name] = store
        geometry = {name: (dims[r], dims[c], row_words(dims[c])) for name, ((r, c), _) in STORES.items()}

        # --- phases
        phase_names = ["IDLE", "LOAD_X", "LOAD_DY", "LOAD_A", "LOAD_B", *GEMM_ORDER, "UPD_A", "UPD_B"]
        phase_index = {name: i for i, name in enumerate(phase_names)}
        phase = Signal(range(len(phase_names)))
        m.d.comb += self.phase.eq(phase)
        advance_phase = Signal()
        fresh_phase = Signal()   # the first cycle of a phase: the movers restart
        m.d.sync += fresh_phase.eq(advance_phase)
        with m.If(advance_phase):
            m.d.sync += phase.eq(Mux(phase == len(phase_names) - 1, 0, phase + 1))
        with m.If(phase == phase_index["IDLE"]):
            m.d.comb += self.header.ready.eq(1)
            with m.If(self.header.valid):
                m.d.sync += header.eq(self.header.payload)
                m.d.comb += advance_phase.eq(1)

        writes = {name: [] for name in stores}   # (condition, request, data, enable) per store
        reads = {name: [] for name in stores}    # (condition, request, enable)

        # --- loaders: input streams into the scratchpads, one row segment per cycle
        for phase_name, port, store_name in (("LOAD_X", self.x_in, "x"), ("LOAD_DY", self.dy_in, "dy"),
                                             ("LOAD_A", self.a_in, "a"), ("LOAD_B", self.b_in, "b")):
            active = phase == phase_index[phase_name]
            rows_n, cols_n, words = geometry[store_name]
            row, col, row_address = Signal(16, name=f"{store_name}_load_row"), \
                Signal(16, name=f"{store_name}_load_col"), Signal(stores[store_name].address_width,
                                                                  name=f"{store_name}_load_address")
            m.d.comb += port.ready.eq(active)
            take = port.valid & active
            request = Signal.like(stores[store_name].write_request, name=f"{store_name}_load_request")
            m.d.comb += [
                request.row_address.eq(row_address), request.row_words.eq(words), request.row.eq(row),
                request.col.eq(col), request.column.eq(0),
                request.count.eq(Mux(cols_n - col < banks, (cols_n - col)[:shift + 1], banks)),
            ]
            writes[store_name].append((active, request, port.payload.data, take))
            with m.If(take):
                m.d.sync += col.eq(col + banks)
                with m.If(port.payload.row_end):
                    m.d.sync += [col.eq(0), row.eq(row + 1), row_address.eq(row_address + words)]
                with m.If(port.payload.last):
                    m.d.sync += [row.eq(0), col.eq(0), row_address.eq(0)]
                    m.d.comb += advance_phase.eq(1)

        # --- GEMM phases
        gemm_active = Signal()
        current = {}
        for name in GEMM_ORDER:
            current[name] = phase == phase_index[name]
        m.d.comb += gemm_active.eq(Cat(*current.values()).any() & ~fresh_phase)

        def select(table):
            """Mux a per-phase value by the running phase (0 outside the GEMM phases)."""
            value = Const(0, 32)
            for name, v in table.items():
                value = Mux(current[name], v, value)
            return value

        spec = {name: PHASES[name] for name in GEMM_ORDER}
        # the running GEMM's dimensions and flags, registered: they settle in the phase's first cycle
        # (`fresh_phase`, no GEMM active yet), so the phase's mux tree is not in front of the movers' address and
        # count logic (phase -> dimensions -> a partner read's count -> a store's write enables was the step
        # accelerator's longest path)
        dim_m, dim_n, dim_k = (Signal(16, name=f"dim_{d}") for d in "mnk")
        dim_q = Signal(16)            # reduction length: A operand's columns
        dim_p = Signal(16)            # output columns
        transposed, from_nf4 = Signal(), Signal()
        next_n = select({n: dims[s[0][1]] for n, s in spec.items()})
        next_k = select({n: dims[s[0][2]] for n, s in spec.items()})
        next_transposed = select({n: int(s[1]) for n, s in spec.items()})[0]
        m.d.sync += [
            dim_m.eq(select({n: dims[s[0][0]] for n, s in spec.items()})), dim_n.eq(next_n), dim_k.eq(next_k),
            dim_q.eq(Mux(next_transposed, next_n, next_k)), dim_p.eq(Mux(next_transposed, next_k, next_n)),
            transposed.eq(next_transposed), from_nf4.eq(select({n: int(s[2]) for n, s in spec.items()})[0]),
        ]

        # one job per GEMM phase
        job_sent = Signal()
        m.d.comb += [
            engine.job.valid.eq(gemm_active & ~job_sent),
            engine.job.payload.m.eq(dim_m), engine.job.payload.n.eq(dim_n), engine.job.payload.k.eq(dim_k),
            engine.job.payload.weights.eq(header.n_weights), engine.job.payload.transposed.eq(transposed),
            engine.job.payload.rows_in.eq(~from_nf4),
        ]
        with m.If(engine.job.valid & engine.job.ready):
            m.d.sync += job_sent.eq(1)

        self._a_mover(m, cfg, stores, geometry, current, spec, dim_m, dim_q, gemm_active, reads)
        self._w_mover(m, cfg, stores, geometry, current, spec, dim_m, dim_n, dim_k, gemm_active, from_nf4, reads)
        done = self._c_writer(m, cfg, stores, geometry, current, spec, dim_m, dim_p, header, writes, reads)
        with m.If(gemm_active & done):
            m.d.comb += advance_phase.eq(1)
            m.d.sync += job_sent.eq(0)

        # --- update phases
        self._updater(m, cfg, stores, geometry, phase, phase_index, header, reads, advance_phase)

        # --- drive the store ports from the users of the running phase
        for name, store in stores.items():
            request, en, data_ = store.write_request, store.write_en, store.write_data
            for condition, req, value, enable in writes[name]:
                with m.If(condition):
                    m.d.comb += [request.eq(req), data_.eq(value), en.eq(enable)]
            read_request = getattr(store, "read_0_request")
            read_en = getattr(store, "read_0_en")
            for condition, req, enable in reads[name]:
                with m.If(condition):
                    m.d.comb += [read_request.eq(req), read_en.eq(enable)]
        return m

    # -------------------------------------------------------------------------------------------------------------

    def _mover_fifo(self, m, name, layout, depth=6):
        fifo = SyncFIFOBuffered(width=layout.size, depth=depth)
        m.submodules[f"{name}_fifo"] = fifo
        return fifo

    @staticmethod
    def _segment_reads(m, stores, geometry, current, store_of, reads, prefix, row_address, row, col, column, count):
        """One read request per store a mover reads (``store_of``: phase -> store), active in that store's
        phases: the segment at (``row``, ``col``), along a column if ``column``, ``count`` elements long."""
        for store_name in set(store_of.values()):
            _, _, words = geometry[store_name]
            users = Cat(*(current[n] for n in store_of if store_of[n] == store_name)).any()
            request = Signal.like(stores[store_name].read_0_request, name=f"{prefix}_read_{store_name}")
            m.d.comb += [
                request.row_address.eq(row_address), request.row_words.eq(words),
                request.row.eq(row), request.col.eq(col), request.column.eq(column), request.count.eq(count),
            ]
            reads[store_name].append((users, request, 1))

    def _a_mover(self, m, cfg, stores, geometry, current, spec, dim_m, dim_q, gemm_active, reads):
        """The engine's ``a`` stream: for each tile of ``rows`` rows of the A operand, one beat per reduction
        index, read as a column segment (Act is the store) or a row segment (Act is the store transposed)."""
        engine, rows, banks = self.engine, cfg.rows, cfg.banks
        layout = a_layout(rows)
        fifo = self._mover_fifo(m, "a", layout)
        m.d.comb += [engine.a.valid.eq(fifo.r_rdy), engine.a.payload.eq(fifo.r_data), fifo.r_en.eq(engine.a.ready)]

        m0, q = Signal(16), Signal(16)
        row_address = Signal(32)
        busy = Signal()           # the phase's a stream is not finished
        in_flight = Signal(range(4))
        issue = Signal()
        m.d.comb += issue.eq(gemm_active & busy & (fifo.level + in_flight < fifo.depth - 1))
        done = Signal()
        with m.If(~gemm_active):
            m.d.sync += [busy.eq(0), done.eq(0), m0.eq(0), q.eq(0), row_address.eq(0)]
        with m.Elif(~busy & ~done):
            m.d.sync += busy.eq(1)

        by_row = {n: s[3][1] == "row" for n, s in spec.items()}
        store_of = {n: s[3][0] for n, s in spec.items()}
        row_oriented = Cat(*(current[n] & by_row[n] for n in spec)).any()
        count = Mux(dim_m - m0 < rows, (dim_m - m0)[:5], rows)
        last_q = q == dim_q - 1
        last_tile = m0 + rows >= dim_m
        self._segment_reads(m, stores, geometry, current, store_of, reads, "a", row_address,
                            Mux(row_oriented, q, m0), Mux(row_oriented, m0, q), ~row_oriented, count)
        # the row address: the segment's first row, m0 (column segments) or q (row segments)
        words_now = Const(0, 32)
        for n in spec:
            words_now = Mux(current[n], geometry[store_of[n]][2], words_now)
        with m.If(issue):
            m.d.sync += q.eq(q + 1)
            with m.If(row_oriented):
                m.d.sync += row_address.eq(row_address + words_now)
            with m.If(last_q):
                m.d.sync += [q.eq(0), m0.eq(m0 + rows)]
                with m.If(row_oriented):
                    m.d.sync += row_address.eq(0)
                with m.Else():
                    m.d.sync += row_address.eq(row_address + words_now * rows)
                with m.If(last_tile):
                    m.d.sync += [busy.eq(0), done.eq(1)]

        # two cycles of store latency, then into the FIFO
        valid = [Signal(name=f"a_valid_{i}") for i in range(2)]
        m.d.sync += [valid[0].eq(issue), valid[1].eq(valid[0])]
        m.d.comb += in_flight.eq(valid[0] + valid[1])
        data_now = Const(0, 16 * banks)
        for n in spec:
            data_now = Mux(current[n], stores[store_of[n]].read_0_data.as_value(), data_now)
        m.d.comb += [fifo.w_en.eq(valid[1]), fifo.w_data.eq(data_now[:16 * rows])]

    def _w_mover(self, m, cfg, stores, geometry, current, spec, dim_m, dim_n, dim_k, gemm_active, from_nf4, reads):
        """The engine's ``rows_in`` stream, once per tile of A rows: each W-operand row in segments of ``cols``,
        from a store's rows or, for ``hb^T``, its columns; float32 stores are rounded to bf16 on the way."""
        engine, rows, cols, banks = self.engine, cfg.rows, cfg.cols, cfg.banks
        layout = row_layout(cols, 16)
        fifo = self._mover_fifo(m, "w", layout)
        m.d.comb += [engine.rows_in.valid.eq(fifo.r_rdy), engine.rows_in.payload.eq(fifo.r_data),
                     fifo.r_en.eq(engine.rows_in.ready)]

        passes_left, n, k0 = Signal(16), Signal(16), Signal(16)
        row_address = Signal(32)
        busy, done = Signal(), Signal()
        in_flight = Signal(range(4))
        issue = Signal()
        w_phase = gemm_active & ~from_nf4
        m.d.comb += issue.eq(w_phase & busy & (fifo.level + in_flight < fifo.depth - 1))
        with m.If(~gemm_active):
            m.d.sync += [busy.eq(0), done.eq(0), n.eq(0), k0.eq(0), row_address.eq(0)]
        with m.Elif(w_phase & ~busy & ~done):
            m.d.sync += [busy.eq(1), passes_left.eq(dim_m)]

        specs = {nm: s for nm, s in spec.items() if s[4] is not None}
        store_of = {nm: s[4][0] for nm, s in specs.items()}
        by_col = Cat(*(current[nm] & (s[4][1] == "cols") for nm, s in specs.items())).any()
        count = Mux(dim_k - k0 < cols, (dim_k - k0)[:5], cols)
        row_end = k0 + cols >= dim_k
        last_row = n == dim_n - 1
        self._segment_reads(m, stores, geometry, current, store_of, reads, "w", row_address,
                            Mux(by_col, k0, n), Mux(by_col, n, k0), by_col, count)
        words_now = Const(0, 32)
        for nm in specs:
            words_now = Mux(current[nm], geometry[store_of[nm]][2], words_now)
        with m.If(issue):
            m.d.sync += k0.eq(k0 + cols)
            with m.If(by_col):
                m.d.sync += row_address.eq(row_address + words_now * cols)
            with m.If(row_end):
                m.d.sync += [k0.eq(0), n.eq(n + 1)]
                with m.If(by_col):
                    m.d.sync += row_address.eq(0)
                with m.Else():
                    m.d.sync += row_address.eq(row_address + words_now)
                with m.If(last_row):
                    m.d.sync += [n.eq(0), row_address.eq(0), passes_left.eq(passes_left - rows)]
                    with m.If(passes_left <= rows):
                        m.d.sync += [busy.eq(0), done.eq(1)]

        # store latency, then bf16 (the float32 stores round, RNE), then into the FIFO
        valid = [Signal(name=f"w_valid_{i}") for i in range(3)]
        tags = [Signal(2, name=f"w_tag_{i}") for i in range(3)]
        m.d.sync += [valid[0].eq(issue), tags[0].eq(Cat(row_end, row_end & last_row))]
        for i in range(1, 3):
            m.d.sync += [valid[i].eq(valid[i - 1]), tags[i].eq(tags[i - 1])]
        m.d.comb += in_flight.eq(valid[0] + valid[1] + valid[2])
        wide = {nm: STORES[store_of[nm]][1] == 32 for nm in specs}
        data_now = Const(0, 32 * banks)
        for nm in specs:
            data_now = Mux(current[nm], stores[store_of[nm]].read_0_data.as_value(), data_now)
        is_wide = Cat(*(current[nm] & wide[nm] for nm in specs)).any()
        rounded = []
        for j in range(cols):
            unit = FPConvert(FP32, BF16, stages=1)
            m.submodules[f"w_round_{j}"] = unit
            m.d.comb += unit.a.eq(data_now.word_select(j, 32))
            narrow = Signal(16, name=f"w_narrow_{j}")
            m.d.sync += narrow.eq(data_now.word_select(j, 16))
            rounded.append(Mux(is_wide, unit.result, narrow))
        out = data.View(layout, fifo.w_data)
        m.d.comb += [fifo.w_en.eq(valid[2]), out.row_end.eq(tags[2][0]), out.last.eq(tags[2][1])]
        for j in range(cols):
            m.d.comb += out.data[j].eq(rounded[j])

    def _c_writer(self, m, cfg, stores, geometry, current, spec, dim_m, dim_p, header, writes, reads):
        """The engine's output: into a store (rounded to bf16 for hb, gb), or combined with a stored LoRA term
        (``y = c + s * yl``, ``dx = c + s * dxl``, rounded to bf16) and sent out. Returns the phase-done flag."""
        engine, rows, cols, banks = self.engine, cfg.rows, cfg.cols, cfg.banks
        c = engine.c
        m0, p0, i = Signal(16), Signal(16), Signal(range(rows))
        row = m0 + i
        count = Mux(dim_p - p0 < cols, (dim_p - p0)[:5], cols)
        live_row = row < dim_m
        last_beat = c.payload.last

        destination = {n: s[5] for n, s in spec.items()}
        combining = Cat(*(current[n] for n, d in destination.items() if d[0] in ("y", "dx"))).any()

        # the pipeline: the partner read (2 cycles), s * partner, + c, rounding to bf16; it stalls with the
        # output stream; plain stores take the beat directly (rounded to bf16 where asked)
        # stages=6 registers the multipliers' operands: the partner read is chosen by the phase, and an ECP5 DSP's
        # inputs need the slack
        mul = FPMul(FP32, FP32, FP32, stages=6)
        add = FPAdd(FP32)
        latency = 2 + mul.latency + add.latency + 1
        out_ready = Signal()
        pipe = StallPipeline(m, latency, out_ready, tag_shape=data.StructLayout({"last": 1, "y": 1}), name="comb")
        m.submodules.comb_mul = pipe.stall(mul)
        m.submodules.comb_add = pipe.stall(add)
        rounders = [pipe.stall(FPConvert(FP32, BF16, stages=1)) for _ in range(cols)]
        for j, unit in enumerate(rounders):
            m.submodules[f"comb_round_{j}"] = unit

        # row addresses of the beat's output row (m0 + i) in the destination or partner store, as running sums
        words_now = Const(0, 32)
        for n, (dest, partner) in destination.items():
            words_now = Mux(current[n], geometry[partner if dest in ("y", "dx") else dest][2], words_now)
        tile_address, row_address = Signal(32), Signal(32)

        # plain store writes take the beat directly (rounded to bf16 combinationally for hb and gb)
        store_rounders = []
        for j in range(cols):
            unit = FPConvert(FP32, BF16, stages=0)
            m.submodules[f"store_round_{j}"] = unit
            m.d.comb += unit.a.eq(c.payload.data[j])
            store_rounders.append(unit)
        accept = Signal()
        m.d.comb += [
            c.ready.eq(Mux(combining, pipe.advance, 1)),
            accept.eq(c.valid & c.ready),
        ]
        for n, (dest, rounded) in destination.items():
            if dest in ("y", "dx"):
                continue
            store = stores[dest]
            _, _, words = geometry[dest]
            request = Signal.like(store.write_request, name=f"c_write_{n}")
            m.d.comb += [
                request.row_address.eq(row_address), request.row_words.eq(words), request.row.eq(row),
                request.col.eq(p0), request.column.eq(0), request.count.eq(count),
            ]
            values = Signal(data.ArrayLayout(store.width, banks), name=f"c_values_{n}")
            for j in range(cols):
                m.d.comb += values[j].eq(store_rounders[j].result if rounded else c.payload.data[j])
            writes[dest].append((current[n], request, values, accept & live_row))

        # combined outputs: read the partner at (row, p0)
        partner_of = {n: d[1] for n, d in destination.items() if d[0] in ("y", "dx")}
        for n, partner in partner_of.items():
            store = stores[partner]
            _, _, words = geometry[partner]
            request = Signal.like(store.read_0_request, name=f"partner_read_{n}")
            m.d.comb += [
                request.row_address.eq(row_address), request.row_words.eq(words), request.row.eq(row),
                request.col.eq(p0), request.column.eq(0), request.count.eq(count),
            ]
            reads[partner].append((current[n], request, pipe.advance))
        partner_data = Const(0, 32 * banks)
        for n, partner in partner_of.items():
            partner_data = Mux(current[n], stores[partner].read_0_data.as_value(), partner_data)
        # c rides two cycles beside the read
        c_delay = [Signal(data.ArrayLayout(32, cols), name=f"c_delay_{d}") for d in range(2)]
        with m.If(pipe.advance):
            m.d.sync += [c_delay[0].eq(c.payload.data), c_delay[1].eq(c_delay[0])]
        m.d.comb += [
            pipe.in_valid.eq(c.valid & combining),
            pipe.in_tag.last.eq(last_beat),
            pipe.in_tag.y.eq(current["F2"]),
        ]
        # s * partner needs one FPMul per lane; the engine gives one beat per cycle at most: share nothing
        lane_results = []
        for j in range(cols):
            if j == 0:
                lane_mul, lane_add = mul, add
            else:
                lane_mul, lane_add = FPMul(FP32, FP32, FP32, stages=6), FPAdd(FP32)
                m.submodules[f"comb_mul_{j}"] = pipe.stall(lane_mul)
                m.submodules[f"comb_add_{j}"] = pipe.stall(lane_add)
            m.d.comb += [lane_mul.a.eq(partner_data.word_select(j, 32)), lane_mul.b.eq(header.scaling)]
            delayed = c_delay[1][j]
            for d in range(mul.latency):
                step = Signal(32, name=f"c_wait_{j}_{d}")
                with m.If(pipe.advance):
                    m.d.sync += step.eq(delayed)
                delayed = step
            m.d.comb += [lane_add.a.eq(delayed), lane_add.b.eq(lane_mul.result)]
            m.d.comb += rounders[j].a.eq(lane_add.result)
            lane_results.append(rounders[j].result)

        for port, flag in ((self.y, 1), (self.dx, 0)):
            m.d.comb += port.valid.eq(pipe.out_valid & (pipe.out_tag.y == flag))
            m.d.comb += port.payload.last.eq(pipe.out_tag.last)
            for j in range(cols):
                m.d.comb += port.payload.data[j].eq(lane_results[j])
        m.d.comb += out_ready.eq(Mux(pipe.out_tag.y, self.y.ready, self.dx.ready))

        # beat bookkeeping: tile order, rows within a tile
        last_i = i == rows - 1
        with m.If(accept):
            m.d.sync += [i.eq(Mux(last_i, 0, i + 1)), row_address.eq(row_address + words_now)]
            with m.If(last_i):
                m.d.sync += [p0.eq(p0 + cols), row_address.eq(tile_address)]
                with m.If(p0 + cols >= dim_p):
                    m.d.sync += [p0.eq(0), m0.eq(m0 + rows), tile_address.eq(tile_address + words_now * rows),
                                 row_address.eq(tile_address + words_now * rows)]
            with m.If(last_beat):
                m.d.sync += [i.eq(0), p0.eq(0), m0.eq(0), tile_address.eq(0), row_address.eq(0)]
        # done: the last beat taken and, when combining, out of the pipeline
        finished = Signal()
        with m.If(accept & last_beat & ~combining):
            m.d.sync += finished.eq(1)
        with m.If(pipe.out_valid & pipe.out_tag.last & out_ready):
            m.d.sync += finished.eq(1)
        with m.If(finished):
            m.d.sync += finished.eq(0)
        return finished

    def _updater(self, m, cfg, stores, geometry, phase, phase_index, header, reads, advance_phase):
        """A, then B: gradient ``s * g`` from the GEMM sums, moments from ``state_in``, the optimizer, out."""
        optimizer = LoRAOptimizer(OptimConfig(kind=cfg.optimizer))
        m.submodules.optimizer = optimizer
        m.d.comb += optimizer.hyper.eq(header.hyper)
        scale = FPMul(FP32, FP32, FP32, stages=6)   # operands registered ahead of the DSP blocks
        front_latency = 2 + scale.latency
        pipe = StallPipeline(m, front_latency, optimizer.elements.ready, name="upd")
        m.submodules.upd_scale = pipe.stall(scale)

        active_a = phase == phase_index["UPD_A"]
        active_b = phase == phase_index["UPD_B"]
        active = active_a | active_b
        row, col = Signal(16), Signal(16)
        row_address = Signal(32)
        rows_n = Mux(active_a, header.r, header.out)
        cols_n = Mux(active_a, header["in"], header.r)
        words = Mux(active_a, geometry["a"][2], geometry["b"][2])
        issued_all = Signal()
        issue = Signal()
        m.d.comb += issue.eq(active & ~issued_all & self.state_in.valid & pipe.advance)
        m.d.comb += [pipe.in_valid.eq(issue), self.state_in.ready.eq(active & ~issued_all & pipe.advance)]
        last = (row == rows_n - 1) & (col == cols_n - 1)
        with m.If(issue):
            m.d.sync += col.eq(col + 1)
            with m.If(col == cols_n - 1):
                m.d.sync += [col.eq(0), row.eq(row + 1), row_address.eq(row_address + words)]
            with m.If(last):
                m.d.sync += issued_all.eq(1)
        for name, param_store, grad_store, user in (("a", "a", "ga", active_a), ("b", "b", "gbs", active_b)):
            for store_name in (param_store, grad_store):
                store = stores[store_name]
                request = Signal.like(store.read_0_request, name=f"upd_read_{store_name}")
                m.d.comb += [
                    request.row_address.eq(row_address), request.row_words.eq(words), request.row.eq(row),
                    request.col.eq(col), request.column.eq(0), request.count.eq(1),
                ]
                reads[store_name].append((user, request, pipe.advance))
        param_now = Mux(active_a, stores["a"].read_0_data[0], stores["b"].read_0_data[0])
        grad_now = Mux(active_a, stores["ga"].read_0_data[0], stores["gbs"].read_0_data[0])
        # moments ride beside the two-cycle read and the scaling multiply
        moments = Signal(data.StructLayout({"m": 32, "v": 32}))
        m.d.comb += moments.eq(self.state_in.payload)
        delayed_moments = moments
        for d in range(2):
            step = Signal.like(moments, name=f"upd_moments_{d}")
            with m.If(pipe.advance):
                m.d.sync += step.eq(delayed_moments)
            delayed_moments = step
        m.d.comb += [scale.a.eq(grad_now), scale.b.eq(header.scaling)]
        delayed_param = param_now
        for d in range(scale.latency):
            p = Signal(32, name=f"upd_param_{d}")
            mm = Signal.like(moments, name=f"upd_moments_late_{d}")
            with m.If(pipe.advance):
                m.d.sync += [p.eq(delayed_param), mm.eq(delayed_moments)]
            delayed_param, delayed_moments = p, mm
        m.d.comb += [
            optimizer.elements.valid.eq(pipe.out_valid),
            optimizer.elements.payload.param.eq(delayed_param),
            optimizer.elements.payload.grad.eq(scale.result),
            optimizer.elements.payload.m.eq(delayed_moments.m),
            optimizer.elements.payload.v.eq(delayed_moments.v),
        ]
        # the gradient goes out beside the optimizer's result: a FIFO deep enough for its latency
        grads = SyncFIFOBuffered(width=32, depth=optimizer.latency + 4)
        m.submodules.upd_grads = grads
        m.d.comb += [grads.w_en.eq(optimizer.elements.valid & optimizer.elements.ready),
                     grads.w_data.eq(scale.result)]
        m.d.comb += [
            self.updates.valid.eq(optimizer.updated.valid),
            self.updates.payload.param.eq(optimizer.updated.payload.param),
            self.updates.payload.m.eq(optimizer.updated.payload.m),
            self.updates.payload.v.eq(optimizer.updated.payload.v),
            self.updates.payload.grad.eq(grads.r_data),
            optimizer.updated.ready.eq(self.updates.ready),
            grads.r_en.eq(self.updates.valid & self.updates.ready),
        ]
        # the phase ends when its last element has left
        outstanding = Signal(32)
        left = self.updates.valid & self.updates.ready
        m.d.sync += outstanding.eq(outstanding + issue - left)
        with m.If(active & issued_all & (outstanding == 0)):
            m.d.comb += advance_phase.eq(1)
            m.d.sync += [issued_all.eq(0), row.eq(0), col.eq(0), row_address.eq(0)]


def c_layout_bf16(config):
    return data.StructLayout({"data": data.ArrayLayout(16, config.cols), "last": 1})
