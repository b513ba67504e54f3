# amaranth: UnusedElaboratable=no
"""The GEMM engine's parts, each alone, with random stalls on its streams.

* :class:`JobControl`: one job at a time, ``start`` once, the next job only when every part is done.
* :class:`AWriter`, :class:`WWriter`: random tiles in; each half's memory contents and exponents against the golden
  alignment exponents when the half is handed over, unchanged until it is released.
* :class:`Sequencer`: buffers preloaded with random tiles; the steps it issues (operands aligned, chunks padded,
  the flush) and the chunk-info beats against a golden schedule, and the halves released in order.
* :class:`Accumulator`: random chunk sums and exponents in; the outputs against float32 additions of
  :mod:`edge_qlora.golden.fp`.
"""

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory

from edge_qlora.constants import ACC_BITS, BF16, EXP_MIN, FP32, OPERAND_BITS, OPERAND_FRAC
from edge_qlora.golden import fp
from edge_qlora.golden.gemm import align, exponents
from edge_qlora.rtl.gemm import GemmConfig
from edge_qlora.rtl.gemm.accumulator import Accumulator
from edge_qlora.rtl.gemm.config import info_layout
from edge_qlora.rtl.gemm.engine import PARTS, JobControl
from edge_qlora.rtl.gemm.sequencer import Sequencer
from edge_qlora.rtl.gemm.writers import AWriter, WWriter
from edge_qlora.rtl.pe_array import PEArray
from edge_qlora.sim.harness import pack_lanes, producer, simulate
from edge_qlora.sim.streams import NO_STALLS, Stalls, get

LIMIT = 20_000      # cycles any wait may take


def random_bf16(rng, shape):
    """bf16 bit patterns over 40 binades, with zeros and subnormals of both signs."""
    values = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    kind = rng.random(shape)
    bits[kind < 0.1] = 0
    sub = kind > 0.93
    bits[sub] = (rng.integers(0, 2, sub.sum()) << 15 | rng.integers(1, 128, sub.sum())).astype(np.uint16)
    return bits


def as_float(bits):
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


def chunk_exponents(bits, chunk):
    """Per row of ``bits`` [rows, length], the largest exponent of each chunk of ``chunk`` columns."""
    e = exponents(as_float(bits))
    return np.stack([e[:, c:c + chunk].max(axis=1) for c in range(0, bits.shape[1], chunk)], axis=1)


def job(m, n, k, transposed=False, rows_in=False, flags=()):
    return {"m": m, "n": n, "k": k, "weights": n * k, "transposed": int(transposed), "rows_in": int(rows_in),
            **{flag: int(flag in flags) for flag in ("block", "resume", "hold")}}


async def start_job(ctx, control, payload):
    ctx.set(control.job, payload)
    ctx.set(control.start, 1)
    await ctx.tick()
    ctx.set(control.start, 0)


async def wait_for(ctx, condition, what):
    for _ in range(LIMIT):
        if condition():
            return
        await ctx.tick()
    raise AssertionError(f"timed out waiting for {what}")


async def idle(ctx, rng, most):
    for _ in range(int(rng.integers(0, most + 1))):
        await ctx.tick()


# --- job control -------------------------------------------------------------------------------------------------

async def take_full_half(ctx, buffer, half, rng, read, what):
    """Wait until the writer marks ``half`` of its buffer full, read it (``read()``), check that it stays unchanged
    while the sequencer would use it, release it; returns what ``read`` gave."""
    await wait_for(ctx, lambda: ctx.get(buffer.full_next) >> half & 1, f"{what} half {half}")
    await ctx.tick()    # (the last write lands with the flag)
    values, exps = read()
    await idle(ctx, rng, 15)
    later = read()
    assert (later[0] == values).all() and np.all(later[1] == exps), "a full half was written"
    ctx.set(buffer.release, 1 << half)
    await ctx.tick()
    ctx.set(buffer.release, 0)
    return values, exps


def test_job_control():
    dut = JobControl()
    jobs = [job(3, 4, 5), job(1, 2, 3, True), job(7, 1, 1)]
    rng = np.random.default_rng(1)

    async def parts(ctx):
        starts = []
        for payload in jobs:
            await wait_for(ctx, lambda: ctx.get(dut.a_writer.start), "start")
            starts.append(ctx.get(dut.sequencer.job.m))
            for name in PARTS:                      # every part sees the same job and start
                assert ctx.get(getattr(dut, name).start) == 1
                assert ctx.get(getattr(dut, name).job.k) == payload["k"]
                ctx.set(getattr(dut, name).done, 0)
            await ctx.tick()
            for name in rng.permutation(PARTS):     # the parts finish one by one: no job is taken before the last
                await idle(ctx, rng, 5)
                assert not ctx.get(dut.job.ready)
                ctx.set(getattr(dut, name).done, 1)
            await ctx.tick()
        return starts

    starts, _ = simulate(dut, [producer(dut.job, jobs, Stalls(0.5, 2))], parts, None)
    assert starts == [payload["m"] for payload in jobs]


# --- writers -----------------------------------------------------------------------------------------------------

def a_tiles(rng, config, jobs):
    """Per job (m, q_len, transposed), its A tiles [rows, q_len], in order."""
    return [[random_bf16(rng, (config.rows, q_len)) for _ in range(-(-m // config.rows))] for m, q_len, _ in jobs]


@pytest.mark.parametrize("rows,cols", [(3, 2), (1, 4)])
def test_a_writer(rows, cols):
    config = GemmConfig(rows=rows, cols=cols, max_k=40, max_n=50, weights="bf16")
    chunk = config.chunk_steps
    rng = np.random.default_rng(rows)
    jobs = [(7, 37, False), (2 * rows, 50, True), (1, 1, False)]   # (M, Q, transposed)
    tiles = a_tiles(rng, config, jobs)
    beats = [beat for per_job in tiles for tile in per_job for beat in pack_lanes(tile.T.reshape(-1), rows, 16)]
    dut = AWriter(config)

    def snapshot(ctx, half, q_len):
        values = [[ctx.get(dut.memory.data[half * config.max_q + q])[i] for q in range(q_len)] for i in range(rows)]
        exps = [[ctx.get(dut.exp_memory.data[half * config.chunks_q + c])[i] for c in range(-(-q_len // chunk))]
                for i in range(rows)]
        return np.array(values), np.array(exps)

    async def reader(ctx):
        got, half = [], 0
        for m, q_len, transposed in jobs:
            await start_job(ctx, dut.control, job(m, q_len if transposed else 5, 5 if transposed else q_len,
                                                  transposed))
            for _ in range(-(-m // rows)):
                got.append(await take_full_half(ctx, dut.buffer, half, rng,
                                                lambda: snapshot(ctx, half, q_len), "A"))
                half ^= 1
            await wait_for(ctx, lambda: ctx.get(dut.control.done), "done")
        return got

    got, _ = simulate(dut, [producer(dut.a, beats, Stalls(0.3, rows))], reader, None)
    expected = [tile for per_job in tiles for tile in per_job]
    assert len(got) == len(expected)
    for (values, exps), tile in zip(got, expected):
        assert (values == tile).all()
        assert (exps == chunk_exponents(tile, chunk)).all()


def test_a_writer_block_job():
    # a block job's three tiles go into one half, one after another, with their chunk exponents after each other's;
    # the half goes to the sequencer once the last is in, and the next (ordinary) job's tile into the other half
    config = GemmConfig(rows=2, cols=3, max_k=40, max_n=80, weights="bf16")
    chunk = config.chunk_steps
    rng = np.random.default_rng(7)
    jobs = [(5, 22, False), (2, 30, False)]
    tiles = a_tiles(rng, config, jobs)
    beats = [beat for per_job in tiles for tile in per_job for beat in pack_lanes(tile.T.reshape(-1), 2, 16)]
    dut = AWriter(config)

    def snapshot(ctx, half, words, entries):
        values = [[ctx.get(dut.memory.data[half * config.max_q + q])[i] for q in range(words)] for i in range(2)]
        exps = [[ctx.get(dut.exp_memory.data[half * config.chunks_q + c])[i] for c in range(entries)]
                for i in range(2)]
        return np.array(values), np.array(exps)

    async def reader(ctx):
        await start_job(ctx, dut.control, job(5, 4, 22, flags=("block",)))
        block = await take_full_half(ctx, dut.buffer, 0, rng, lambda: snapshot(ctx, 0, 3 * 22, 3 * 2), "A")
        await wait_for(ctx, lambda: ctx.get(dut.control.done), "done")
        await start_job(ctx, dut.control, job(2, 4, 30))
        after = await take_full_half(ctx, dut.buffer, 1, rng, lambda: snapshot(ctx, 1, 30, 2), "A")
        await wait_for(ctx, lambda: ctx.get(dut.control.done), "done")
        return block, after

    (block, after), _ = simulate(dut, [producer(dut.a, beats, Stalls(0.3, 3))], reader, None)
    assert (block[0] == np.concatenate(tiles[0], axis=1)).all()
    assert (block[1] == np.concatenate([chunk_exponents(tile, chunk) for tile in tiles[0]], axis=1)).all()
    assert (after[0] == tiles[1][0]).all() and (after[1] == chunk_exponents(tiles[1][0], chunk)).all()


def row_beats(w, cols):
    """W [N, K] already cut into rows, as the ``rows_in`` stream carries it: data, ``row_end``, ``last``."""
    n, k = w.shape
    words = -(-k // cols)
    beats = []
    for r, row in enumerate(w):
        for word, data in enumerate(pack_lanes(row, cols, 16)):
            row_end = word == words - 1
            beats.append(data | row_end << (16 * cols) | (row_end and r == n - 1) << (16 * cols + 1))
    return beats


@pytest.mark.parametrize("transposed,rows_in,block", [(False, False, False), (True, False, False),
                                                     (False, True, False), (True, False, True)],
                         ids=["forward", "transposed", "rows_in", "transposed_block"])
def test_w_writer(transposed, rows_in, block):
    # rows_in: an engine with both sources; the first job takes W through the row aligner, the second from rows_in.
    # block: transposed block jobs, one pass each, every tile's exponent from the `exponents` stream
    config = GemmConfig(rows=2, cols=3, max_k=40, max_n=40, weights="both" if rows_in else "bf16")
    rows, cols, chunk = config.rows, config.cols, config.chunk_steps
    words_per_row, slots = config.words_per_row, config.slots
    rng = np.random.default_rng(7 + transposed)
    jobs = [(3, 25, 20), (1, 4, 40)]    # (M, N, K): passes of W, each a different random W
    passes = [[random_bf16(rng, (n, k)) for _ in range(1 if block else -(-m // rows))] for m, n, k in jobs]
    given = [int(e) for e in rng.integers(-126, 128, sum(-(-n // chunk) for _, n, _ in jobs))]
    for w in passes[0]:
        w[-1, -1] = 0x4E80      # 2 ** 30, above every other value: the largest exponent in a tile's last beat
    flat = passes if not rows_in else passes[:1]
    beats = [beat for per_job in flat for w in per_job for beat in pack_lanes(w.reshape(-1), cols, 16)]
    dut = WWriter(config)
    producers = [producer(dut.w, beats, Stalls(0.3, 3))]
    if block:
        producers.append(producer(dut.exponents, [e & 0x1FF for e in given], Stalls(0.5, 5)))
    if rows_in:
        producers.append(producer(dut.rows_in, [beat for w in passes[1] for beat in row_beats(w, cols)],
                                  Stalls(0.3, 4)))
    tile_rows = chunk if transposed else cols

    def snapshot(ctx, half, n_rows, k):
        words = -(-k // cols)
        values = np.zeros((n_rows, words * cols), np.int64)
        for r in range(n_rows):
            for w in range(words):
                address = half * slots * words_per_row + (r // cols) * words_per_row + w
                word = ctx.get(dut.banks[r % cols].data[address])
                values[r, w * cols:(w + 1) * cols] = [word[j] for j in range(cols)]
        if transposed:
            return values, ctx.get(dut.buffer.tile_exponent)[half]
        exps = [[ctx.get(dut.exp_memory.data[half * config.chunks_k + c])[r] for c in range(-(-k // chunk))]
                for r in range(n_rows)]
        return values, np.array(exps)

    async def reader(ctx):
        got, half = [], 0
        for index, ((m, n, k), per_job) in enumerate(zip(jobs, passes)):
            await start_job(ctx, dut.control, job(m, n, k, transposed, rows_in and index == 1,
                                                  ("block",) if block else ()))
            for _ in per_job:
                for r0 in range(0, n, tile_rows):
                    n_rows = min(tile_rows, n - r0)
                    got.append(await take_full_half(ctx, dut.buffer, half, rng,
                                                    lambda: snapshot(ctx, half, n_rows, k), "W"))
                    half ^= 1
            await wait_for(ctx, lambda: ctx.get(dut.control.done), "done")
        return got

    got, _ = simulate(dut, producers, reader, None)
    expected = []
    for (m, n, k), per_job in zip(jobs, passes):
        for w in per_job:
            for r0 in range(0, n, tile_rows):
                tile = w[r0:r0 + tile_rows]
                padded = np.zeros((len(tile), -(-k // cols) * cols), np.int64)
                padded[:, :k] = tile
                exps = exponents(as_float(tile)).max() if transposed else chunk_exponents(tile, chunk)
                expected.append((padded, exps))
    if block:
        expected = [(values, exps) for (values, _), exps in zip(expected, given, strict=True)]
    assert len(got) == len(expected)
    for (values, exps), (want_values, want_exps) in zip(got, expected):
        assert (values == want_values).all()
        assert np.all(exps == want_exps)


# --- sequencer ---------------------------------------------------------------------------------------------------

class SequencerBench(Elaboratable):
    """A :class:`Sequencer` reading buffers preloaded with up to two tiles each (one per half), and the halves'
    full flags as the writers keep them, set by pulses on ``a_fill`` / ``w_fill``."""

    def __init__(self, config, images, tile_exponent):
        self.config = config
        self.seq = Sequencer(config, PEArray(config.rows, config.cols).flush_steps)
        self.a_fill, self.w_fill = Signal(2), Signal(2)
        buffers = self.seq.a_buffer, self.seq.w_buffer
        self.memories = {
            "a": (buffers[0].read, images["a"]), "ea": (buffers[0].exp_read, images["ea"]),
            "ew": (buffers[1].exp_read, images["ew"]),
            **{f"w{b}": (getattr(buffers[1], f"read_{b}"), images["w"][b]) for b in range(config.cols)},
        }
        self.tile_exponent = tile_exponent

    def elaborate(self, platform):
        m = Module()
        m.submodules.seq = seq = self.seq
        for name, (port, image) in self.memories.items():
            memory = Memory(shape=port.data.shape(), depth=len(image), init=image)
            m.submodules[f"mem_{name}"] = memory
            wiring.connect(m, port, memory.read_port(domain="sync"))
        for buffer, fill in ((seq.a_buffer, self.a_fill), (seq.w_buffer, self.w_fill)):
            full = Signal(2)
            m.d.comb += buffer.full_next.eq((full | fill) & ~buffer.release)
            m.d.sync += full.eq(buffer.full_next)
        tile_exponent = seq.w_buffer.tile_exponent
        m.d.comb += tile_exponent.eq(tile_exponent.shape().const(self.tile_exponent))
        return m


def sequencer_case(config, m, n, k, transposed, rng, flags=()):
    """Random A and W, the buffer images holding them and the golden schedule: steps, chunk infos and the number of
    A and W halves filled (at most two each; a block job's A tiles all in one half)."""
    rows, cols, chunk, min_steps = config.rows, config.cols, config.chunk_steps, config.min_steps
    block = "block" in flags
    q_len = n if transposed else k
    a = random_bf16(rng, (-(-m // rows) * rows, q_len))
    a[m:] = 0
    w = random_bf16(rng, (n, k))
    w_tile_rows = chunk if transposed else cols
    w_tiles = [w[r0:r0 + w_tile_rows] for r0 in range(0, n, w_tile_rows)]
    a_tiles = [a[r0:r0 + rows] for r0 in range(0, len(a), rows)]
    assert len(w_tiles) <= 2 if block else len(a_tiles) * len(w_tiles) <= 2
    n_chunks = -(-k // chunk)

    words, slots, wpr = -(-k // cols), config.slots, config.words_per_row
    images = {"a": [[0] * rows for _ in range(2 * config.max_q)],
              "ea": [[EXP_MIN] * rows for _ in range(2 * config.chunks_q)],
              "ew": [[EXP_MIN] * cols for _ in range(2 * config.chunks_k)],
              "w": [[[0] * cols for _ in range(2 * slots * wpr)] for _ in range(cols)]}
    for t, tile in enumerate(a_tiles):
        # a tile per half, or a block job's tiles one after another in half 0
        a_base, ea_base = (t * q_len, t * -(-q_len // chunk)) if block else (t * config.max_q, t * config.chunks_q)
        for q in range(q_len):
            images["a"][a_base + q] = [int(v) for v in tile[:, q]]
        for c, column in enumerate(chunk_exponents(tile, chunk).T):
            images["ea"][ea_base + c] = [int(v) for v in column]
    tile_exponent = [EXP_MIN, EXP_MIN]
    for half in range(len(w_tiles) if block else len(a_tiles) * len(w_tiles)):
        tile = w_tiles[half % len(w_tiles)]
        padded = np.zeros((len(tile), words * cols), np.int64)
        padded[:, :k] = tile
        for r, row in enumerate(padded):
            for word in range(words):
                address = half * slots * wpr + (r // cols) * wpr + word
                images["w"][r % cols][address] = [int(v) for v in row[word * cols:(word + 1) * cols]]
        if transposed:
            tile_exponent[half] = int(exponents(as_float(tile)).max())
        else:
            for c, column in enumerate(chunk_exponents(tile, chunk).T):
                images["ew"][half * config.chunks_k + c][:len(tile)] = [int(v) for v in column]

    steps, infos = [], []
    zeros_a, zeros_b = (0,) * rows, (0,) * cols

    def chunk_steps(length, a_of, b_of):
        padded = max(length, min_steps)
        for s in range(padded):
            real = s < length
            steps.append((a_of(s) if real else zeros_a, b_of(s) if real else zeros_b, s == padded - 1))

    held = bool({"hold", "resume"} & set(flags))
    if block and transposed:
        for g, w_tile in enumerate(w_tiles):
            e = int(exponents(as_float(w_tile)).max())
            qb = np.rint(as_float(w_tile).astype(np.float64) * np.ldexp(1.0, OPERAND_FRAC - e)).astype(np.int64)
            for i, tile in enumerate(a_tiles):
                qa, ea = align(as_float(tile), chunk, axis=1)
                for t in range(words):
                    n0, columns = g * chunk, [t * cols + j for j in range(cols)]
                    chunk_steps(len(w_tile), lambda s: tuple(qa[:, n0 + s]),
                                lambda s: tuple(qb[s, col] if col < k else 0 for col in columns))
                    infos.append({"ea": list(ea[:, g]), "eb": [e] * cols, "base": (i * words + t) * rows,
                                  "first": g == 0 and "resume" not in flags,
                                  "last": g == len(w_tiles) - 1 and "hold" not in flags,
                                  "job_last": g == len(w_tiles) - 1 and i == len(a_tiles) - 1 and t == words - 1})
        return images, tile_exponent, steps, infos, 1, len(w_tiles)
    if block:
        qb, eb = align(as_float(w).T, chunk, axis=0)
        for p in range(len(w_tiles)):
            for i, tile in enumerate(a_tiles):
                qa, ea = align(as_float(tile), chunk, axis=1)
                columns = [p * cols + j for j in range(cols)]
                for c in range(n_chunks):
                    q0 = c * chunk
                    chunk_steps(min(chunk, k - q0), lambda s: tuple(qa[:, q0 + s]),
                                lambda s: tuple(qb[q0 + s, col] if col < n else 0 for col in columns))
                    infos.append({"ea": list(ea[:, c]), "eb": [eb[c, col] if col < n else None for col in columns],
                                  "base": (p * len(a_tiles) + i) * rows if held else 0,
                                  "first": c == 0 and "resume" not in flags,
                                  "last": c == n_chunks - 1 and "hold" not in flags,
                                  "job_last": p == len(w_tiles) - 1 and i == len(a_tiles) - 1 and c == n_chunks - 1})
        return images, tile_exponent, steps, infos, 1, len(w_tiles)
    for i, tile in enumerate(a_tiles):
        qa, ea = align(as_float(tile), chunk, axis=1)
        last_a = i == len(a_tiles) - 1
        if not transposed:
            qb, eb = align(as_float(w).T, chunk, axis=0)     # [K, N], [chunks, N]
            for p in range(len(w_tiles)):
                for c in range(n_chunks):
                    q0 = c * chunk
                    columns = [p * cols + j for j in range(cols)]
                    chunk_steps(min(chunk, k - q0), lambda s: tuple(qa[:, q0 + s]),
                                lambda s: tuple(qb[q0 + s, col] if col < n else 0 for col in columns))
                    infos.append({"ea": list(ea[:, c]), "eb": [eb[c, col] if col < n else None for col in columns],
                                  "base": 0, "first": c == 0, "last": c == n_chunks - 1,
                                  "job_last": last_a and p == len(w_tiles) - 1 and c == n_chunks - 1})
        else:
            for g, w_tile in enumerate(w_tiles):
                e = int(exponents(as_float(w_tile)).max())
                qb = np.rint(as_float(w_tile).astype(np.float64) * np.ldexp(1.0, OPERAND_FRAC - e)).astype(np.int64)
                for t in range(words):
                    n0 = g * chunk
                    columns = [t * cols + j for j in range(cols)]
                    chunk_steps(len(w_tile), lambda s: tuple(qa[:, n0 + s]),
                                lambda s: tuple(qb[s, col] if col < k else 0 for col in columns))
                    infos.append({"ea": list(ea[:, g]), "eb": [e] * cols, "base": t * rows, "first": g == 0,
                                  "last": g == len(w_tiles) - 1,
                                  "job_last": last_a and g == len(w_tiles) - 1 and t == words - 1})
    return images, tile_exponent, steps, infos, len(a_tiles), len(a_tiles) * len(w_tiles)


def decode_steps(beats, rows, cols):
    mask, sign = (1 << OPERAND_BITS) - 1, 1 << (OPERAND_BITS - 1)
    lanes = [[((beat >> (OPERAND_BITS * i)) & mask ^ sign) - sign for i in range(rows + cols)] for beat in beats]
    return [(tuple(v[:rows]), tuple(v[rows:]), bool(beat >> (OPERAND_BITS * (rows + cols)) & 1))
            for v, beat in zip(lanes, beats)]


@pytest.mark.parametrize("m,n,k,rows,cols,transposed,flags", [
    (4, 3, 40, 2, 3, False, ()),     # two A tiles, three chunks of K (the last one short, padded)
    (3, 7, 20, 3, 4, False, ()),     # two W tiles, the second with one row: masked columns
    (2, 11, 7, 2, 3, True, ()),      # one W tile shorter than a padded chunk, three column tiles
    (5, 16, 6, 3, 2, True, ()),      # two A tiles and a full W tile each
    (5, 5, 20, 2, 3, False, ("block",)),                    # three A tiles in one half, each W tile for all three
    (3, 4, 36, 2, 2, False, ("block", "hold")),             # their partial sums kept, each tile in its own place
    (3, 4, 18, 2, 2, False, ("block", "resume")),           # and added to
    (5, 20, 5, 2, 3, True, ("block",)),                     # transposed: each W tile for three A tiles, two
                                                            # column tiles each, every output in its own place
    (3, 16, 4, 2, 2, True, ("block", "hold", "resume")),
])
def test_sequencer(m, n, k, rows, cols, transposed, flags):
    config = GemmConfig(rows=rows, cols=cols, max_k=40, max_n=120, weights="bf16", held_tiles=8)
    rng = np.random.default_rng(m * 100 + n)
    images, tile_exponent, want_steps, want_infos, n_a, n_w = sequencer_case(config, m, n, k, transposed, rng,
                                                                            flags)
    bench = SequencerBench(config, images, tile_exponent)
    seq = bench.seq
    flush = [((0,) * rows, (0,) * cols, False)] * seq.flush_steps
    record = {"cycle": 0, "fills": [], "releases": [], "issues": [], "infos": None}

    async def watch(ctx):
        async for _, _, a_fill, w_fill, a_release, w_release, issue in ctx.tick().sample(
                bench.a_fill, bench.w_fill, seq.a_buffer.release, seq.w_buffer.release, seq.issue):
            for name, fill in (("a", a_fill), ("w", w_fill)):
                if fill:
                    record["fills"].append((name, fill, record["cycle"]))
            if a_release:
                record["releases"].append(("a", a_release, record["cycle"]))
            if w_release:
                record["releases"].append(("w", w_release, record["cycle"]))
            if issue:
                record["issues"].append(record["cycle"])
            record["cycle"] += 1

    async def writers(ctx):
        # half 0 of both buffers, the A half last (forward) or the W half last (transposed); each half 1 only
        # once its buffer's half 0 is released, so that the sequencer waits on every one of them
        await start_job(ctx, seq.control, job(m, n, k, transposed, flags=flags))
        order = [("w", bench.w_fill, n_w), ("a", bench.a_fill, n_a)]
        for half in range(2):
            for name, fill, tiles in order if transposed else order[::-1]:
                if half < tiles:
                    if half:
                        await wait_for(ctx, lambda: any(who == name for who, _, _ in record["releases"]),
                                       f"{name} half 0 released")
                    await idle(ctx, rng, 20)
                    ctx.set(fill, 1 << half)
                    await ctx.tick()
                    ctx.set(fill, 0)

    async def infos(ctx):
        record["infos"] = await get(ctx, seq.info, len(want_infos), Stalls(0.3, 5), max_cycles=LIMIT)

    async def steps(ctx):
        beats = await get(ctx, seq.steps, len(want_steps) + len(flush), Stalls(0.3, 6), max_cycles=LIMIT)
        await wait_for(ctx, lambda: ctx.get(seq.control.done) and record["infos"] is not None, "done")
        return beats

    beats, _ = simulate(bench, [writers, infos], steps, None, processes=[watch])
    assert decode_steps(beats, rows, cols) == want_steps + flush
    layout = info_layout(config)
    for raw, want in zip(record["infos"], want_infos):
        info = layout.from_bits(raw)
        assert list(info.ea) == want["ea"]
        assert [e if w is not None else None for e, w in zip(info.eb, want["eb"])] == want["eb"]
        assert (info.base, info.first, info.last, info.job_last) == \
            (want["base"], want["first"], want["last"], want["job_last"])
    assert len(record["infos"]) == len(want_infos)
    # no step before both first halves are full, none after a half's release before the other half is full; each
    # half released once, in order, after it was filled
    fills = {(name, bit): cycle for name, bit, cycle in record["fills"]}
    assert record["issues"][0] > max(fills[("a", 1)], fills[("w", 1)])
    for name, tiles in (("a", n_a), ("w", n_w)):
        released = [(bit, cycle) for who, bit, cycle in record["releases"] if who == name]
        assert [bit for bit, _ in released] == [1 << h for h in range(tiles)]
        assert all(cycle > fills[(name, bit)] for bit, cycle in released)
        if tiles == 2:
            assert min(c for c in record["issues"] if c > released[0][1]) > fills[(name, 2)]


# --- accumulator -------------------------------------------------------------------------------------------------

def accumulator_case(config, rng, groups):
    """Chunks of random sums for ``groups`` (a list of lists of accumulator bases: the chunks of one reduction
    step, in issue order), and the golden outputs."""
    rows, cols = config.rows, config.cols
    info_beats, partial_beats, outputs = [], [], []
    layout = info_layout(config)
    partial_mask = (1 << ACC_BITS) - 1
    for g, bases in enumerate(groups):
        acc = {}
        n_chunks = len(bases)
        for c, base in enumerate(bases):
            ea = rng.integers(-30, 30, rows)
            eb = rng.integers(-30, 30, cols)
            if rng.random() < 0.2:
                ea[0] = EXP_MIN     # partials far below the float32 normals
            sums = rng.integers(-(1 << 42), 1 << 42, (rows, cols)) >> rng.integers(0, 42, (rows, cols))
            sums[rng.random((rows, cols)) < 0.1] = 0
            first, last = base not in acc, c >= n_chunks - 1 or base not in bases[c + 1:]
            job_last = g == len(groups) - 1 and c == n_chunks - 1
            info_beats.append(layout.const({"ea": [int(v) for v in ea], "eb": [int(v) for v in eb], "base": base,
                                            "first": first, "last": last, "job_last": job_last}).as_bits())
            for i in range(rows):
                partial_beats.append(sum((int(sums[i, j]) & partial_mask) << (ACC_BITS * j) for j in range(cols))
                                     | i << (ACC_BITS * cols))
                value = fp.fixed_to_float(sums[i], ea[i] + eb - 2 * OPERAND_FRAC, FP32)
                value = value if first else fp.add(acc[base][i], value, FP32)
                acc.setdefault(base, [None] * rows)[i] = value
                if last:
                    out = fp.convert(value, FP32, BF16) if config.out_dtype == "bf16" else value
                    outputs.append(([int(v) for v in out], job_last and i == rows - 1))
    return info_beats, partial_beats, outputs


@pytest.mark.parametrize("out_dtype, interval", [("bf16", 1), ("fp32", 1), ("bf16", 2), ("fp32", 2)])
def test_accumulator(out_dtype, interval):
    # interval 2: each row in two halves through half as many converters and adders, joined again at c
    config = GemmConfig(rows=3, cols=2, max_k=8, max_n=8, weights="bf16", out_dtype=out_dtype,
                        convert_interval=interval)
    rows = config.rows
    rng = np.random.default_rng(11)
    # forward-like: 3 chunks on base 0 back to back; transposed-like: chunks of several bases interleaved
    groups = [[0, 0, 0], [0], [0, rows, 2 * rows, 0, rows, 2 * rows], [rows, rows]]
    info_beats, partial_beats, outputs = accumulator_case(config, rng, groups)
    dut = Accumulator(config)
    width = config.out_format.width

    async def consumer(ctx):
        beats = await get(ctx, dut.c, len(outputs), Stalls(0.4, 3), max_cycles=LIMIT)
        await wait_for(ctx, lambda: ctx.get(dut.control.done), "done")
        return beats

    beats, _ = simulate(dut, [producer(dut.info, info_beats, Stalls(0.3, 1)),
                              producer(dut.partials, partial_beats, Stalls(0.3, 2))], consumer, None,
                        processes=[collision_check(dut)])
    mask = (1 << width) - 1
    got = [([(beat >> (width * j)) & mask for j in range(config.cols)], bool(beat >> (width * config.cols) & 1))
           for beat in beats]
    assert got == outputs


def collision_check(dut):
    """The accumulator memory is never read for data that is used at an address written in the same cycle."""
    async def watch(ctx):
        write, read = dut.memory.write_ports[0], dut.memory.read_ports[0]
        async for _, _, used, en, waddr, raddr in ctx.tick().sample(dut.used, write.en, write.addr, read.addr):
            assert not (used and en and waddr == raddr)
    return watch


@pytest.mark.parametrize("interval", [1, 2])
def test_accumulator_back_to_back_hazards(interval):
    # the same outputs in consecutive chunks with no gap: the hazard check holds the second until the first is
    # written back (rows = 1: consecutive partial beats hit the same address; interval 2: the same half rows)
    config = GemmConfig(rows=1, cols=2, max_k=8, max_n=8, weights="bf16", out_dtype="fp32",
                        convert_interval=interval)
    rng = np.random.default_rng(5)
    info_beats, partial_beats, outputs = accumulator_case(config, rng, [[0] * 6, [0, 1] * 3])
    dut = Accumulator(config)

    async def consumer(ctx):
        return await get(ctx, dut.c, len(outputs), NO_STALLS, max_cycles=LIMIT)

    beats, _ = simulate(dut, [producer(dut.info, info_beats, NO_STALLS),
                              producer(dut.partials, partial_beats, NO_STALLS)], consumer, None,
                        processes=[collision_check(dut)])
    mask = (1 << 32) - 1
    assert [[(beat >> (32 * j)) & mask for j in range(2)] for beat in beats] == [values for values, _ in outputs]
