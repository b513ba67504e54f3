# amaranth: UnusedElaboratable=no
"""PE array: the RTL bit for bit against the golden chunk sums, with random stalls on both streams.

Each case streams several chunks of random 18-bit operands (the extremes +-131071 and 0 over-represented), of
lengths from the shortest the drain allows up to 64 steps, then :attr:`PEArray.flush_steps` zero steps; the
partials must come out exactly, in chunk and row order, and nothing more. The golden twin is checked against
:func:`edge_qlora.golden.gemm.chunk_partials` on bf16 operands.
"""


import numpy as np
import pytest
import torch
from amaranth.hdl import ResetInserter, Signal, Value
from amaranth.sim import Simulator

from edge_qlora.golden import gemm
from edge_qlora.golden.pe_array import chunk_lengths, chunk_sums, gemm_steps
from edge_qlora.rtl.pe_array import ACC_BITS, OPERAND_BITS, PEArray
from edge_qlora.sim.streams import NO_STALLS, Stalls, get, put

EXTREME = (1 << (OPERAND_BITS - 1)) - 1


# -- driver -----------------------------------------------------------------------------------------------------------

def _pack_steps(a, b, last):
    """Raw ``steps`` payloads: ``a`` lanes from bit 0, then ``b`` lanes, then ``last``."""
    mask = (1 << OPERAND_BITS) - 1
    rows, cols = a.shape[1], b.shape[1]
    beats = []
    for a_row, b_row, flag in zip(a.tolist(), b.tolist(), np.asarray(last).tolist()):
        beat = 0
        for lane, value in enumerate(a_row + b_row):
            beat |= (value & mask) << (OPERAND_BITS * lane)
        beats.append(beat | (int(flag) << (OPERAND_BITS * (rows + cols))))
    return beats


def _unpack_partials(beats, cols):
    """``(row, [data per column])`` per raw ``partials`` payload."""
    mask, sign = (1 << ACC_BITS) - 1, 1 << (ACC_BITS - 1)
    out = []
    for beat in beats:
        data = [((beat >> (ACC_BITS * c)) & mask) for c in range(cols)]
        out.append((beat >> (ACC_BITS * cols), [(v ^ sign) - sign for v in data]))
    return out


def run_pe_array(dut, a, b, last, in_stalls=NO_STALLS, out_stalls=NO_STALLS, monitor=None, prelude=None):
    """Stream ``a``, ``b``, ``last`` and ``dut.flush_steps`` zero steps through ``dut``; collect every partial.

    Returns the partials as ``(row, data)`` pairs and the number of beats that still came out afterwards (there
    should be none). ``monitor(accepted_steps, row)`` is called for every partial taken, with the number of steps
    accepted before that cycle, for latency checks. ``prelude`` is a list of raw step payloads offered one per
    cycle (with the consumer not ready) before a one-cycle reset of the array, ahead of the real stream.
    """
    steps = _pack_steps(np.asarray(a), np.asarray(b), last)
    steps += [0] * dut.flush_steps
    expected = len(chunk_lengths(last)) * dut.rows
    result = {}
    reset = Signal()
    sim = Simulator(ResetInserter(reset)(dut) if prelude else dut)
    sim.add_clock(1e-8)
    started = {"reset": not prelude}

    async def producer(ctx):
        if prelude:
            for beat in prelude:
                ctx.set(dut.steps.valid, 1)
                ctx.set(Value.cast(dut.steps.payload), beat)
                await ctx.tick()
            ctx.set(dut.steps.valid, 0)
            ctx.set(reset, 1)
            await ctx.tick()
            ctx.set(reset, 0)
            started["reset"] = True
        await put(ctx, dut.steps, steps, in_stalls)

    async def consumer(ctx):
        while not started["reset"]:
            await ctx.tick()
        beats = await get(ctx, dut.partials, expected, out_stalls, max_cycles=20 * len(steps) + 200)
        # nothing may come out after the expected partials, however long the consumer waits
        ctx.set(dut.partials.ready, 1)
        extra = 0
        for _ in range(4 * dut.flush_steps + 8):
            _, _, valid = await ctx.tick().sample(dut.partials.valid)
            extra += valid
        result["partials"], result["extra"] = _unpack_partials(beats, dut.cols), extra

    async def watch(ctx):
        accepted = 0
        async for _, _, sv, sr, pv, pr, row in ctx.tick().sample(dut.steps.valid, dut.steps.ready,
                                                                  dut.partials.valid, dut.partials.ready,
                                                                  dut.partials.payload.row):
            if pv and pr:
                monitor(accepted, row)
            accepted += sv and sr

    sim.add_testbench(producer, background=True)
    if monitor:
        sim.add_testbench(watch, background=True)
    sim.add_testbench(consumer)
    sim.run()
    return result["partials"], result["extra"]


def _check(dut, a, b, last, partials, extra):
    expected = chunk_sums(a, b, last, min_chunk=dut.min_chunk)
    assert extra == 0, f"{extra} partials after the expected ones"
    assert len(partials) == len(expected) * dut.rows, \
        f"{len(partials)} partials for {len(expected)} chunks of {dut.rows} rows"
    for index, (row, data) in enumerate(partials):
        chunk, expected_row = divmod(index, dut.rows)
        assert row == expected_row, f"partial {index}: row {row}, expected {expected_row}"
        assert data == expected[chunk][row].tolist(), f"chunk {chunk} row {row}: {data} != {expected[chunk][row]}"


# -- operands ---------------------------------------------------------------------------------------------------------

def _operands(rng, steps, width):
    """Random signed 18-bit operands: a quarter of them the extremes, zero, or +-1."""
    values = rng.integers(-EXTREME, EXTREME + 1, (steps, width))
    corner = rng.choice([EXTREME, -EXTREME, 0, 1, -1], (steps, width))
    return np.where(rng.random((steps, width)) < 0.25, corner, values)


def _chunks(lengths):
    """``last`` flags for chunks of the given lengths."""
    flags = []
    for length in lengths:
        flags += [False] * (length - 1) + [True]
    return np.array(flags)


SHAPES = [(1, 1), (1, 5), (5, 1), (3, 7), (4, 4), (8, 8)]


@pytest.mark.parametrize("rows, cols", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_random_chunks_with_stalls(rows, cols):
    rng = np.random.default_rng(rows * 16 + cols)
    dut = PEArray(rows, cols)
    lengths = [dut.min_chunk, 2 * rows, 37, 64, dut.min_chunk + 1, 2 * rows + 3]
    lengths = [max(length, dut.min_chunk) for length in lengths]
    last = _chunks(lengths)
    a, b = _operands(rng, len(last), rows), _operands(rng, len(last), cols)
    partials, extra = run_pe_array(dut, a, b, last, Stalls(0.3, seed=1), Stalls(0.4, seed=2))
    _check(dut, a, b, last, partials, extra)


def test_extreme_sums_do_not_wrap():
    """512-step chunks of +-131071 products: the largest sums the aligner can make, both signs."""
    rows, cols, chunk = 2, 3, 512
    dut = PEArray(rows, cols)
    a = np.full((2 * chunk, rows), EXTREME)
    a[:, 1] = -EXTREME
    b = np.full((2 * chunk, cols), EXTREME)
    b[chunk:, 2] = -EXTREME
    last = _chunks([chunk, chunk])
    partials, extra = run_pe_array(dut, a, b, last)
    _check(dut, a, b, last, partials, extra)
    assert abs(partials[0][1][0]) == chunk * EXTREME ** 2 > 1 << (ACC_BITS - 2)


@pytest.mark.parametrize("rows, cols", [(3, 2), (1, 4)], ids=["3x2", "1x4"])
def test_latency_attributes(rows, cols):
    """Without stalls, row i of a chunk ending at step k comes out once step k + latency + 2 i is accepted."""
    dut = PEArray(rows, cols)
    assert dut.latency == cols + 4 and dut.row_interval == 2
    assert dut.flush_steps == 2 * rows + cols + 2 and dut.min_chunk == 2 * rows - 1
    rng = np.random.default_rng(3)
    last = _chunks([dut.min_chunk, 9, dut.min_chunk])
    a, b = _operands(rng, len(last), rows), _operands(rng, len(last), cols)
    seen = []
    partials, extra = run_pe_array(dut, a, b, last, monitor=lambda accepted, row: seen.append((accepted, row)))
    _check(dut, a, b, last, partials, extra)
    expected = [(k + dut.latency + dut.row_interval * i + 1, i)
                for k in np.flatnonzero(last).tolist() for i in range(rows)]
    assert seen == expected


def test_consumer_holds_the_array():
    """A consumer that stalls for long stretches: the array waits, nothing is dropped or repeated."""
    rows, cols = 4, 3
    rng = np.random.default_rng(4)
    dut = PEArray(rows, cols)
    last = _chunks([dut.min_chunk] * 6 + [20])
    a, b = _operands(rng, len(last), rows), _operands(rng, len(last), cols)
    partials, extra = run_pe_array(dut, a, b, last, NO_STALLS, Stalls(0.9, seed=5))
    _check(dut, a, b, last, partials, extra)


def test_arguments_checked():
    with pytest.raises(ValueError, match="rows must be from 1 to 16, not 17"):
        PEArray(17, 4)
    with pytest.raises(ValueError, match="cols must be from 1 to 16, not 0"):
        PEArray(4, 0)
    with pytest.raises(TypeError, match="rows must be an integer"):
        PEArray(4.0, 4)


# -- the golden twin --------------------------------------------------------------------------------------------------

def test_golden_matches_gemm_chunk_partials():
    """Tiles of the engine's GEMM, cut into steps, give the same sums as golden.gemm.chunk_partials."""
    rng = np.random.default_rng(6)
    m, q, p, chunk = 5, 150, 7, 64
    a = torch.from_numpy(rng.standard_normal((m, q)).astype(np.float32) * 4).to(torch.bfloat16)
    b = torch.from_numpy(rng.standard_normal((q, p)).astype(np.float32) / 8).to(torch.bfloat16)
    sums, _ = gemm.chunk_partials(a.float().numpy(), b.float().numpy(), chunk)
    qa, _ = gemm.align(a.float().numpy(), chunk, axis=1)
    qb, _ = gemm.align(b.float().numpy(), chunk, axis=0)
    steps_a, steps_b, last = gemm_steps(qa, qb, chunk)
    assert chunk_lengths(last) == [64, 64, 22]
    got = chunk_sums(steps_a, steps_b, last)
    assert len(got) == len(sums)
    for g, s in zip(got, sums):
        assert np.array_equal(g, s)


def test_golden_checks():
    a, b = np.zeros((6, 2), np.int64), np.zeros((6, 3), np.int64)
    last = np.array([0, 0, 1, 0, 1, 0], bool)
    assert [s.shape for s in chunk_sums(a, b, last)] == [(2, 3), (2, 3)]      # the open chunk gives nothing
    with pytest.raises(ValueError, match="at least 3 steps"):
        chunk_sums(a, b, last, min_chunk=3)
    with pytest.raises(ValueError, match="outside signed"):
        chunk_sums(a + (1 << 17), b, last)
    with pytest.raises(ValueError, match="one entry per step"):
        chunk_sums(a, b[:5], last)
    big = np.full((600, 1), -(1 << 17))
    with pytest.raises(ValueError, match="wrap"):
        chunk_sums(big, big, np.arange(600) == 599)


def test_min_chunk_is_tight():
    """One step shorter than ``min_chunk`` and the drain chain mixes chunks up: the attribute is exact."""
    rows, cols = 3, 2
    rng = np.random.default_rng(7)
    dut = PEArray(rows, cols)
    last = _chunks([dut.min_chunk - 1] * 4)
    a, b = _operands(rng, len(last), rows), _operands(rng, len(last), cols)
    partials, _ = run_pe_array(dut, a, b, last)
    expected = [(i % rows, s[i % rows].tolist()) for s in chunk_sums(a, b, last) for i in range(rows)]
    assert partials != expected


def test_reset_mid_stream():
    """A reset with chunks half accumulated and partials waiting leaves nothing behind: accumulators, drain chains
    and the operand registers (whose reset values keep synthesis from merging them) all start clean."""
    rows, cols = 3, 4
    rng = np.random.default_rng(8)
    dut = PEArray(rows, cols)
    junk_last = _chunks([7, 9, 5])
    prelude = _pack_steps(_operands(rng, len(junk_last), rows), _operands(rng, len(junk_last), cols), junk_last)
    last = _chunks([dut.min_chunk, 12, 30])
    a, b = _operands(rng, len(last), rows), _operands(rng, len(last), cols)
    partials, extra = run_pe_array(dut, a, b, last, Stalls(0.2, seed=9), Stalls(0.2, seed=10), prelude=prelude)
    _check(dut, a, b, last, partials, extra)


def test_ecp5_uses_the_dsp_registers():
    """On ECP5 each PE's product is one MULT18X18D with its input and output registers on the step enable (which
    goes through a DCCA global buffer) and the sync reset; other platforms keep the portable description."""
    from amaranth.back import rtlil

    class Ecp5:  # the attribute the elaboration looks at
        family = "ecp5"

    text = rtlil.convert(PEArray(2, 3), platform=Ecp5())
    cells = text.split("cell \\MULT18X18D ")[1:]
    assert len(cells) == 6
    for cell in cells:
        cell = cell.split("\n  end")[0]
        for register in ("INPUTA", "INPUTB", "OUTPUT"):
            assert f'parameter \\REG_{register}_CLK "CLK0"' in cell
        assert "connect \\CE0 \\step_enable" in cell
    assert text.count("cell \\DCCA ") == 1
    assert "MULT18X18D" not in rtlil.convert(PEArray(2, 3))
