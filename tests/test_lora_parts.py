# amaranth: UnusedElaboratable=no
"""The LoRA step's parts, each alone: the controller's phase walk and jobs, a loader's writes, the operand movers'
streams, the C writer's stores and combined outputs, the updater's elements, all under random stalls and against
small models of what each part must produce."""

import numpy as np
import pytest
from amaranth.hdl import Module, Signal, Value
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from edge_qlora.constants import BF16, FP32
from edge_qlora.golden import fp as fp_model
from edge_qlora.golden.scratchpad import row_words
from edge_qlora.rtl.lora import (GEMM_ORDER, PHASES, STORES, AMover, Combiner, CWriter, LoraConfig, Phase,
                                 PhaseController, SegmentLoader, Updater, WMover)
from edge_qlora.rtl.lora.writer import combine_layout
from edge_qlora.rtl.lora.config import LOAD_ORDER, UPDATE_ORDER
from edge_qlora.rtl.lora_optim import element_layout, update_layout
from edge_qlora.rtl.scratchpad import MatrixStore, WritePort, segment_layout
from edge_qlora.sim.harness import producer, simulate
from edge_qlora.sim.streams import Stalls, get, put

SIZES = {"t": 5, "in": 7, "out": 6, "r": 3}


class StoreRig(wiring.Component):
    """A part under test with a scratchpad behind one of its read ports; ``preload`` is the store's write port."""

    def __init__(self, part, port, store, extra=()):
        self.part, self.port, self.store, self.extra = part, port, store, extra
        super().__init__({"preload": In(WritePort(store.banks, store.width, store.address_width))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.part = self.part
        m.submodules.store = self.store
        for k, submodule in enumerate(self.extra):
            m.submodules[f"extra_{k}"] = submodule
        wiring.connect(m, wiring.flipped(self.preload), self.store.write)
        read = self.store.read[0]
        for name in read.request.shape().members:
            m.d.comb += read.request[name].eq(self.port.request[name])
        m.d.comb += read.en.eq(self.port.en)
        for e in range(self.store.banks):
            m.d.comb += self.port.data[e].eq(read.data[e])
        return m


def store_for(matrix, banks, width):
    return MatrixStore(banks, width, max(2, matrix.shape[0] * row_words(matrix.shape[1], banks)))


async def preload(ctx, port, matrix, banks):
    """Write ``matrix`` row by row in segments of ``banks``, from word 0."""
    rows, cols = matrix.shape
    words = row_words(cols, banks)
    for r in range(rows):
        for c in range(0, cols, banks):
            count = min(banks, cols - c)
            ctx.set(port.request, {"row_address": r * words, "row_words": words, "row": r, "col": c, "column": 0,
                                   "count": count})
            ctx.set(port.data, [int(v) for v in matrix[r, c:c + count]] + [0] * (banks - count))
            ctx.set(port.en, 1)
            await ctx.tick()
    ctx.set(port.en, 0)


def set_dims(ctx, port, sizes):
    for name, value in sizes.items():
        ctx.set(port[name], value)


def gemm_dims(phase, sizes):
    row = PHASES[phase]
    return {"m": sizes[row.m], "n": sizes[row.n], "k": sizes[row.k], "q": sizes[row.reduction],
            "p": sizes[row.out_columns], "transposed": int(row.transposed), "nf4": int(row.nf4)}


async def start_phase(ctx, run, phase, sizes):
    """The controller's side of a GEMM phase: its first cycle with the dimensions settling, then active."""
    ctx.set(run.phase, phase)
    ctx.set(run.dims, gemm_dims(phase, sizes))
    await ctx.tick()
    ctx.set(run.active, 1)


def after(gate, stream, payloads, stalls):
    """A producer that starts once ``gate`` is high (the engine sends nothing before its job)."""
    async def feed(ctx):
        await ctx.tick().until(gate)
        await put(ctx, stream, payloads, stalls)
    return feed


def random_bits(rng, shape, fmt):
    """Random finite normal values of ``fmt`` (bit patterns), magnitudes around 1."""
    values = rng.standard_normal(shape).astype(np.float32) * np.float32(4)
    return fp_model.to_bits(values, fmt).astype(np.int64)


# --- controller -----------------------------------------------------------------------------------------------

def test_controller_walks_the_phases():
    dut = PhaseController()
    rng = np.random.default_rng(1)
    header = {**SIZES, "scaling": 0x3F800000, "n_weights": SIZES["out"] * SIZES["in"], "offset": 0}
    stalls = Stalls(0.3, 2)
    tasks = {**dict(zip(LOAD_ORDER, dut.load)), **dict(zip(UPDATE_ORDER, dut.update))}

    async def parts(ctx):
        """Every part finishes its phase a few cycles after it starts (a GEMM phase: after its job)."""
        log, jobs, first_cycles = [], [], []
        previous, wait, job_taken = Phase.IDLE, 0, False
        for cycle in range(600):
            phase = Phase(ctx.get(dut.phase))
            if phase != previous:
                log.append(phase)
                wait, job_taken = int(rng.integers(0, 5)), False
                if phase in PHASES:
                    first_cycles.append((phase, ctx.get(dut.gemm.active)))
                if phase == Phase.IDLE:
                    break
            previous = phase
            if phase in tasks or job_taken:
                if wait == 0:
                    ctx.set(tasks.get(phase, dut.gemm_task).done, 1)
                wait -= 1
            ready = phase in PHASES and not stalls.stall()
            ctx.set(dut.job.ready, ready)
            if ready and ctx.get(dut.job.valid):
                jobs.append((phase, dut.job.payload.shape().from_bits(ctx.get(Value.cast(dut.job.payload))),
                             ctx.get(Value.cast(dut.gemm.dims))))
                job_taken = True
            await ctx.tick()
            for task in (*tasks.values(), dut.gemm_task):
                ctx.set(task.done, 0)
        params = dut.params.shape().from_bits(ctx.get(Value.cast(dut.params)))
        return log, jobs, first_cycles, params

    (log, jobs, first_cycles, params), _ = simulate(dut, [producer(dut.header, [header], stalls)], parts, None)
    assert {name: int(params[name]) for name in header} == header
    assert log == [*list(Phase)[1:], Phase.IDLE]
    assert [phase for phase, *_ in jobs] == list(GEMM_ORDER)
    assert all(not active for _, active in first_cycles)
    dims_layout = dut.gemm.dims.shape()
    for phase, job, dims_bits in jobs:
        expected = gemm_dims(phase, SIZES)
        assert (job.m, job.n, job.k) == (expected["m"], expected["n"], expected["k"]), phase
        assert (job.transposed, job.rows_in, job.weights) == (expected["transposed"], 1 - expected["nf4"],
                                                              header["n_weights"]), phase
        dims = dims_layout.from_bits(dims_bits)
        assert {name: int(getattr(dims, name)) for name in expected} == expected, phase


# --- loader ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("banks,width,rows,cols", [(4, 16, 3, 10), (2, 32, 4, 4), (8, 16, 2, 5)])
def test_loader_writes_row_segments(banks, width, rows, cols):
    rng = np.random.default_rng(banks + cols)
    matrix = rng.integers(0, 1 << width, size=(rows, cols))
    dut = SegmentLoader(banks, width, 8)
    words = row_words(cols, banks)
    beats, expected = [], []
    for r in range(rows):
        for c in range(0, cols, banks):
            count = min(banks, cols - c)
            chunk = [int(v) for v in matrix[r, c:c + count]] + [0] * (banks - count)
            row_end, last = c + banks >= cols, c + banks >= cols and r == rows - 1
            beats.append(sum(v << (width * e) for e, v in enumerate(chunk)) | row_end << (width * banks)
                         | last << (width * banks + 1))
            expected.append((r * words, words, r, c, count, chunk))
    request_layout = segment_layout(banks, 8)

    async def writes(ctx):
        ctx.set(dut.cols, cols)
        ctx.set(dut.task.active, 1)
        got, dones = [], 0
        for _ in range(20 * len(beats)):
            _, _, en, request, values, done = await ctx.tick().sample(
                dut.write.en, Value.cast(dut.write.request), Value.cast(dut.write.data), dut.task.done)
            dones += done
            if en:
                req = request_layout.from_bits(request)
                got.append((req.row_address, req.row_words, req.row, req.col, req.count,
                            [(values >> (width * e)) & ((1 << width) - 1) for e in range(banks)]))
                assert req.column == 0
                if done:
                    break
        return got, dones

    (got, dones), _ = simulate(dut, [producer(dut.segments, beats, Stalls(0.4, cols))], writes, None)
    assert got == expected
    assert dones == 1


# --- operand movers -------------------------------------------------------------------------------------------

def a_operand_beats(act, rows, width=BF16.width):
    """The engine's ``a`` stream for A operand ``act`` [M, Q]: per tile of ``rows`` rows, one beat per column."""
    m_size, q_size = act.shape
    return [sum(int(act[m0 + i, q]) << (width * i) for i in range(rows) if m0 + i < m_size)
            for m0 in range(0, m_size, rows) for q in range(q_size)]


@pytest.mark.parametrize("phase", [Phase.F1, Phase.B2])
def test_a_mover_streams_the_operand(phase):
    rows, banks = 3, 4
    row = PHASES[phase]
    spec = STORES[row.a_store]
    matrix = np.random.default_rng(phase.value).integers(0, 1 << BF16.width, size=(SIZES[spec.rows], SIZES[spec.cols]))
    act = matrix.T if row.a_transposed else matrix
    expected = a_operand_beats(act, rows)
    store = store_for(matrix, banks, BF16.width)
    mover = AMover(rows, banks, store.address_width)
    dut = StoreRig(mover, mover.read, store)

    async def consumer(ctx):
        await preload(ctx, dut.preload, matrix, banks)
        set_dims(ctx, mover.dims, SIZES)
        await start_phase(ctx, mover.run, phase, SIZES)
        beats = await get(ctx, mover.a, len(expected) + 1, Stalls(0.4, 7), max_cycles=20 * len(expected))
        return beats

    beats, _ = simulate(dut, [], consumer, None)
    assert beats == expected      # and nothing after the pass


def w_operand_beats(w, cols, passes):
    """The engine's ``rows_in`` stream for W operand ``w`` [N, K] (bf16 bits), ``passes`` times."""
    n_size, k_size = w.shape
    beats = []
    for _ in range(passes):
        for n in range(n_size):
            for k0 in range(0, k_size, cols):
                chunk = [int(v) for v in w[n, k0:k0 + cols]] + [0] * (cols - min(cols, k_size - k0))
                row_end = k0 + cols >= k_size
                width = BF16.width
                beats.append(sum(v << (width * j) for j, v in enumerate(chunk)) | row_end << (width * cols)
                             | (row_end and n == n_size - 1) << (width * cols + 1))
    return beats


@pytest.mark.parametrize("phase", [Phase.F1, Phase.B2])
def test_w_mover_streams_the_operand(phase):
    rows, cols, banks = 2, 3, 4
    row = PHASES[phase]
    spec = STORES[row.w_store]
    shape = (SIZES[spec.rows], SIZES[spec.cols])
    fmt = FP32 if spec.width == FP32.width else BF16
    matrix = random_bits(np.random.default_rng(phase.value), shape, fmt)
    w = matrix.T if row.w_by_column else matrix
    w_bf16 = fp_model.convert(w, FP32, BF16) if fmt is FP32 else w
    expected = w_operand_beats(w_bf16, cols, -(-SIZES[row.m] // rows))
    store = store_for(matrix, banks, spec.width)
    mover = WMover(rows, cols, banks, store.address_width)
    dut = StoreRig(mover, mover.read, store)

    async def consumer(ctx):
        await preload(ctx, dut.preload, matrix, banks)
        set_dims(ctx, mover.dims, SIZES)
        await start_phase(ctx, mover.run, phase, SIZES)
        return await get(ctx, mover.rows_in, len(expected) + 1, Stalls(0.4, 8), max_cycles=20 * len(expected))

    beats, _ = simulate(dut, [], consumer, None)
    assert beats == expected


def test_w_mover_idles_in_nf4_phases():
    mover = WMover(2, 2, 2, 4)

    async def consumer(ctx):
        set_dims(ctx, mover.dims, SIZES)
        await start_phase(ctx, mover.run, Phase.F2, SIZES)
        return await get(ctx, mover.rows_in, 1, max_cycles=100)

    beats, _ = simulate(mover, [], consumer, None)
    assert beats == []


# --- C writer -------------------------------------------------------------------------------------------------

def c_beats(product, rows, cols):
    """The engine's ``c`` stream for a float32 product [M, P] (bits), in tile order, zeros past M and P:
    ``(row, p0, values, last)`` per beat."""
    m_size, p_size = product.shape
    tiles_m, tiles_p = -(-m_size // rows), -(-p_size // cols)
    padded = np.zeros((tiles_m * rows, tiles_p * cols), np.int64)
    padded[:m_size, :p_size] = product
    beats = []
    for m0 in range(0, tiles_m * rows, rows):
        for p0 in range(0, tiles_p * cols, cols):
            for i in range(rows):
                beats.append((m0 + i, p0, [int(v) for v in padded[m0 + i, p0:p0 + cols]]))
    return [(r, p0, v, k == len(beats) - 1) for k, (r, p0, v) in enumerate(beats)]


def pack_c(values, last, cols):
    """A ``c`` beat: ``cols`` float32 values and ``last``."""
    return sum(v << (FP32.width * j) for j, v in enumerate(values)) | int(last) << (FP32.width * cols)


def test_c_writer_stores_rounded_products():
    config = LoraConfig(rows=2, cols=3, max_t=SIZES["t"], max_in=SIZES["in"], max_out=SIZES["out"],
                        max_rank=SIZES["r"])
    phase = Phase.F1                                   # h [t, r], rounded to bf16 into hb
    dims = gemm_dims(phase, SIZES)
    rng = np.random.default_rng(4)
    product = random_bits(rng, (dims["m"], dims["p"]), FP32)
    beats = c_beats(product, config.rows, config.cols)
    dut = CWriter(config)
    words = row_words(SIZES[STORES[PHASES[phase].destination].cols], config.banks)
    request_layout = segment_layout(config.banks, config.address_width)

    async def writes(ctx):
        set_dims(ctx, dut.dims, SIZES)
        await start_phase(ctx, dut.run, phase, SIZES)
        ctx.set(dut.task.active, 1)
        got, dones = [], 0
        for _ in range(30 * len(beats)):
            _, _, en, request, values, done = await ctx.tick().sample(
                dut.write.en, Value.cast(dut.write.request), Value.cast(dut.write.data), dut.task.done)
            if en:
                req = request_layout.from_bits(request)
                got.append((req.row, req.col, req.count, req.row_address, req.row_words, req.column,
                            [(values >> (FP32.width * j)) & ((1 << FP32.width) - 1)
                             for j in range(config.cols)]))
            if done:
                dones += 1
                break
        return got, dones

    stream = [pack_c(v, last, config.cols) for _, _, v, last in beats]
    (got, dones), _ = simulate(dut, [after(dut.run.active, dut.c, stream, Stalls(0.4, 5))], writes, None)
    expected = []
    for row, p0, values, _ in beats:
        if row < dims["m"]:
            rounded = [int(v) for v in fp_model.convert(np.array(values), FP32, BF16)]
            expected.append((row, p0, min(config.cols, dims["p"] - p0), row * words, words, 0, rounded))
    assert got == expected
    assert dones == 1


@pytest.mark.parametrize("phase", [Phase.F2, Phase.B4])
def test_c_writer_combines_with_the_partner(phase):
    config = LoraConfig(rows=2, cols=2, max_t=SIZES["t"], max_in=SIZES["in"], max_out=SIZES["out"],
                        max_rank=SIZES["r"])
    row = PHASES[phase]
    dims = gemm_dims(phase, SIZES)
    rng = np.random.default_rng(phase.value)
    product = random_bits(rng, (dims["m"], dims["p"]), FP32)
    partner = random_bits(rng, (SIZES[STORES[row.partner].rows], SIZES[STORES[row.partner].cols]), FP32)
    scaling = int(fp_model.to_bits(np.float32(0.375), FP32))
    beats = c_beats(product, config.rows, config.cols)
    store = MatrixStore(config.banks, FP32.width, config.store_depth(row.partner))
    writer = CWriter(config)
    dut = StoreRig(writer, writer.partner, store)
    out, idle = (writer.y, writer.dx) if phase == Phase.F2 else (writer.dx, writer.y)

    async def consumer(ctx):
        await preload(ctx, dut.preload, partner, config.banks)
        set_dims(ctx, writer.dims, SIZES)
        ctx.set(writer.scaling, scaling)
        ctx.set(idle.ready, 1)
        await start_phase(ctx, writer.run, phase, SIZES)
        ctx.set(writer.task.active, 1)
        got = await get(ctx, out, len(beats), Stalls(0.4, 9), max_cycles=40 * len(beats))
        dones = 0
        for _ in range(4):
            _, _, done, idle_valid = await ctx.tick().sample(writer.task.done, idle.valid)
            dones += done
            assert not idle_valid
        return got, dones

    stream = [pack_c(v, last, config.cols) for _, _, v, last in beats]
    (got, dones), _ = simulate(dut, [after(writer.run.active, writer.c, stream, Stalls(0.4, 6))], consumer,
                               None)
    assert len(got) == len(beats)
    for beat, (r, p0, values, last) in zip(got, beats):
        assert beat >> (BF16.width * config.cols) == int(last)
        if r >= dims["m"]:
            continue                                    # rows past M are don't-care
        lanes = min(config.cols, dims["p"] - p0)
        s_partner = fp_model.mul(partner[r, p0:p0 + lanes], FP32, np.full(lanes, scaling), FP32, FP32)
        want = fp_model.convert(fp_model.add(np.array(values[:lanes]), s_partner, FP32), FP32, BF16)
        got_lanes = [(beat >> (BF16.width * j)) & ((1 << BF16.width) - 1) for j in range(lanes)]
        assert got_lanes == [int(v) for v in want], (r, p0)
    assert dones == 1


def test_combiner_alone_routes_y_and_dx():
    """Beats for y and dx interleaved, each at its own partner segment; both outputs stall at random."""
    config = LoraConfig(rows=2, cols=3, max_t=4, max_in=9, max_out=9, max_rank=2)
    cols, banks = config.cols, config.banks
    rng = np.random.default_rng(21)
    partner = random_bits(rng, (4, 9), FP32)
    words = row_words(9, banks)
    scaling = int(fp_model.to_bits(np.float32(-1.5), FP32))
    layout = combine_layout(config)
    beats, expected = [], {"y": [], "dx": []}
    for k in range(30):
        r, p0, to_y = int(rng.integers(0, 4)), 3 * int(rng.integers(0, 3)), bool(rng.integers(0, 2))
        values = random_bits(rng, cols, FP32)
        last = k == 29
        beats.append(layout.const({"data": [int(v) for v in values], "last": last, "y": to_y, "at": {
            "row_address": r * words, "row_words": words, "row": r, "col": p0, "column": 0, "count": cols}}
        ).as_bits())
        s_partner = fp_model.mul(partner[r, p0:p0 + cols], FP32, np.full(cols, scaling), FP32, FP32)
        want = fp_model.convert(fp_model.add(values, s_partner, FP32), FP32, BF16)
        expected["y" if to_y else "dx"].append(
            sum(int(v) << (BF16.width * j) for j, v in enumerate(want)) | int(last) << (BF16.width * cols))
    combiner = Combiner(config)
    dut = StoreRig(combiner, combiner.partner, MatrixStore(banks, FP32.width, 4 * words))
    ports = {"y": combiner.y, "dx": combiner.dx}
    preloaded = Signal()     # the beats wait for the partner store

    async def consumer(ctx):
        await preload(ctx, dut.preload, partner, banks)
        ctx.set(combiner.scaling, scaling)
        ctx.set(preloaded, 1)
        stalls = {name: Stalls(0.4, 30 + k) for k, name in enumerate(ports)}
        got = {name: [] for name in ports}
        for _ in range(40 * len(beats)):
            if sum(map(len, got.values())) == len(beats):
                break
            for name, port in ports.items():
                ctx.set(port.ready, 0 if stalls[name].stall() else 1)
            sample = await ctx.tick().sample(*[x for port in ports.values()
                                               for x in (port.valid, port.ready, Value.cast(port.payload))])
            for index, name in enumerate(ports):
                valid, ready, payload = sample[2 + 3 * index:5 + 3 * index]
                if valid and ready:
                    got[name].append(payload)
        return got

    got, _ = simulate(dut, [after(preloaded, combiner.i, beats, Stalls(0.3, 22))], consumer, None)
    assert got == expected


# --- updater --------------------------------------------------------------------------------------------------

class EchoOptimizer(wiring.Component):
    """Stands in for the optimizer: a FIFO that returns each element's parameter and moments unchanged."""

    latency = 2

    def __init__(self):
        super().__init__({"elements": In(stream.Signature(element_layout)),
                          "updated": Out(stream.Signature(update_layout))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.queue = queue = SyncFIFOBuffered(width=element_layout.size, depth=4)
        element = data.View(element_layout, queue.r_stream.payload)
        m.d.comb += [
            queue.w_stream.valid.eq(self.elements.valid), queue.w_stream.payload.eq(self.elements.payload),
            self.elements.ready.eq(queue.w_stream.ready),
            self.updated.valid.eq(queue.r_stream.valid), queue.r_stream.ready.eq(self.updated.ready),
            self.updated.payload.param.eq(element.param), self.updated.payload.m.eq(element.m),
            self.updated.payload.v.eq(element.v),
        ]
        return m


class UpdaterRig(wiring.Component):
    """The updater, its two scratchpads (parameters, gradient sums) and the echo optimizer."""

    def __init__(self, banks, depth):
        self.param_store = MatrixStore(banks, FP32.width, depth)
        self.grad_store = MatrixStore(banks, FP32.width, depth)
        self.echo = EchoOptimizer()
        self.updater = Updater(banks, self.param_store.address_width, EchoOptimizer.latency)
        signature = WritePort(banks, FP32.width, self.param_store.address_width)
        super().__init__({"preload_param": In(signature), "preload_grad": In(signature)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.updater, m.submodules.echo = self.updater, self.echo
        m.submodules.param_store, m.submodules.grad_store = self.param_store, self.grad_store
        wiring.connect(m, wiring.flipped(self.preload_param), self.param_store.write)
        wiring.connect(m, wiring.flipped(self.preload_grad), self.grad_store.write)
        wiring.connect(m, self.updater.elements, self.echo.elements)
        wiring.connect(m, self.echo.updated, self.updater.updated)
        for store, port in ((self.param_store, self.updater.param), (self.grad_store, self.updater.grad)):
            read = store.read[0]
            for name in read.request.shape().members:
                m.d.comb += read.request[name].eq(port.request[name])
            m.d.comb += read.en.eq(port.en)
            for e in range(store.banks):
                m.d.comb += port.data[e].eq(read.data[e])
        return m


def test_updater_feeds_the_optimizer():
    banks = 4
    rng = np.random.default_rng(12)
    tensors = []
    for param_name, _ in UPDATE_ORDER.values():
        shape = (SIZES[STORES[param_name].rows], SIZES[STORES[param_name].cols])
        tensors.append([random_bits(rng, shape, FP32) for _ in range(4)])   # param, grad sum, m, v
    depth = max(t[0].shape[0] * row_words(t[0].shape[1], banks) for t in tensors)
    dut = UpdaterRig(banks, depth)
    updater = dut.updater
    scaling = int(fp_model.to_bits(np.float32(0.75), FP32))
    moments = [int(m) | int(v) << FP32.width
               for _, _, ms, vs in tensors for m, v in zip(ms.reshape(-1), vs.reshape(-1))]

    async def consumer(ctx):
        set_dims(ctx, updater.dims, SIZES)
        ctx.set(updater.scaling, scaling)
        got, dones = [], []
        stalls = Stalls(0.4, 13)
        for k, (param, grad, _, _) in enumerate(tensors):
            await preload(ctx, dut.preload_param, param, banks)
            await preload(ctx, dut.preload_grad, grad, banks)
            ctx.set(updater.tensors[k].active, 1)
            for _ in range(40 * param.size):
                ctx.set(updater.updates.ready, 0 if stalls.stall() else 1)
                _, _, valid, ready, payload, done = await ctx.tick().sample(
                    updater.updates.valid, updater.updates.ready, Value.cast(updater.updates.payload),
                    updater.tensors[k].done)
                if valid and ready:
                    got.append(payload)
                if done:
                    dones.append((k, len(got)))
                    break
            ctx.set(updater.tensors[k].active, 0)
        return got, dones

    (got, dones), _ = simulate(dut, [producer(updater.state_in, moments, Stalls(0.4, 14))], consumer, None)
    expected = []
    for param, grad, ms, vs in tensors:
        grads = fp_model.mul(grad.reshape(-1), FP32, np.full(grad.size, scaling), FP32, FP32)
        for p, g, m_, v in zip(param.reshape(-1), grads, ms.reshape(-1), vs.reshape(-1)):
            fields = (int(g), int(p), int(m_), int(v))   # updates_layout: grad, param, m, v
            expected.append(sum(value << (FP32.width * k) for k, value in enumerate(fields)))
    assert got == expected
    sizes = [t[0].size for t in tensors]
    assert dones == [(0, sizes[0]), (1, sizes[0] + sizes[1])]
