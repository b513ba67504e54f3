# amaranth: UnusedElaboratable=no
"""Block-floating-point helpers: the RTL bit for bit against ``golden.gemm`` (``exponents``, ``align``).

Every bf16 pattern except NaNs and infinities (the engine refuses them) goes through :class:`AlignLanes` for
several shared exponents, each pattern whose exponent the shared one covers; :func:`bf16_exponent` is checked on
all 65536 patterns. :class:`ExponentMax` sees random chunks with random gaps between beats.
"""

import random

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, EnableInserter, Module, Signal, Value
from amaranth.lib import data
from amaranth.sim import Simulator

from edge_qlora.golden import gemm
from edge_qlora.rtl.bfp import EXPONENT_SHAPE, AlignLanes, ExponentMax, bf16_exponent, max_exponent
from edge_qlora.sim.harness import pack_lanes, unpack_lanes

ALL_PATTERNS = np.arange(1 << 16, dtype=np.uint32)
FINITE = ALL_PATTERNS[((ALL_PATTERNS >> 7) & 0xFF) != 0xFF]


def _values(bits):
    """float32 values of bf16 bit patterns."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _golden_align(bits, shared):
    """``golden.gemm.align`` of each value against an exponent ``shared``: a chunk of two, the value and
    ``2 ** shared``, has exactly that shared exponent when ``shared`` covers the value's."""
    values = _values(bits)
    pairs = np.stack([values, np.ldexp(np.float32(1), np.broadcast_to(shared, values.shape)).astype(np.float32)], 1)
    q, e = gemm.align(pairs, 2, axis=1)
    assert np.array_equal(e[:, 0], np.broadcast_to(shared, values.shape))
    return q[:, 0]


def _signed(values, width):
    values = np.asarray(values, dtype=np.int64)
    return (values ^ (1 << (width - 1))) - (1 << (width - 1))


# -- bf16_exponent ----------------------------------------------------------------------------------------------------

class _Exponents(Elaboratable):
    def __init__(self, lanes):
        self.values = Signal(data.ArrayLayout(16, lanes))
        self.exponents = Signal(data.ArrayLayout(EXPONENT_SHAPE, lanes))
        self.maximum = Signal(EXPONENT_SHAPE)
        self.lanes = lanes

    def elaborate(self, platform):
        m = Module()
        for lane in range(self.lanes):
            m.d.comb += self.exponents[lane].eq(bf16_exponent(self.values[lane]))
        m.d.comb += self.maximum.eq(max_exponent(m, [self.values[lane] for lane in range(self.lanes)]))
        return m


def test_bf16_exponent_every_pattern():
    lanes = 16
    dut = _Exponents(lanes)
    beats = pack_lanes(ALL_PATTERNS, lanes, 16)
    exponents, maxima = [], []

    async def bench(ctx):
        for beat in beats:
            ctx.set(Value.cast(dut.values), beat)
            exponents.append(ctx.get(Value.cast(dut.exponents)))
            maxima.append(ctx.get(dut.maximum))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    got = _signed(unpack_lanes(exponents, lanes, 9, len(ALL_PATTERNS)).astype(np.int64), 9)
    finite = ((ALL_PATTERNS >> 7) & 0xFF) != 0xFF
    assert np.array_equal(got[finite], gemm.exponents(_values(ALL_PATTERNS[finite])))
    assert np.all(got[~finite] == 128)
    assert np.array_equal(np.array(maxima), got.reshape(-1, lanes).max(axis=1))


# -- AlignLanes -------------------------------------------------------------------------------------------------------

def _simulate_align(dut, beats, shared, enable_seed=None):
    """q of ``dut`` per beat (raw ints), one beat per cycle, or under a random enable with junk on idle cycles."""
    values_port, q_port = Value.cast(dut.values), Value.cast(dut.q)
    latency, results = dut.latency, []
    top = dut
    if enable_seed is not None:
        advance = Signal()
        top = EnableInserter(advance)(dut)
    sim = Simulator(top)
    if latency:
        sim.add_clock(1e-8)

    async def steady(ctx):
        for index in range(len(beats) + latency):
            if index < len(beats):
                ctx.set(values_port, beats[index])
                ctx.set(dut.shared, shared[index])
            if latency == 0:
                results.append(ctx.get(q_port))
                await ctx.delay(1e-8)
                continue
            if index >= latency:
                results.append(ctx.get(q_port))
            await ctx.tick()

    async def stalled(ctx):
        rng = random.Random(enable_seed)
        accepted = 0
        while len(results) < len(beats):
            enabled = rng.random() < 0.6
            ctx.set(advance, enabled)
            if enabled and accepted < len(beats):
                ctx.set(values_port, beats[accepted])
                ctx.set(dut.shared, shared[accepted])
            else:
                ctx.set(values_port, rng.getrandbits(len(values_port)))
                ctx.set(dut.shared, rng.randrange(-256, 256))
            if accepted - latency == len(results):
                results.append(ctx.get(q_port))
            await ctx.tick()
            accepted += enabled

    sim.add_testbench(steady if enable_seed is None else stalled)
    sim.run()
    return results


def _run_align(dut, bits, shared, enable_seed=None):
    """Align ``bits`` (a multiple of ``dut.lanes`` long) with ``shared`` per beat; compare with the golden twin."""
    lanes = dut.lanes
    beats = pack_lanes(bits, lanes, 16)
    results = _simulate_align(dut, beats, np.asarray(shared).tolist(), enable_seed)
    got = _signed(unpack_lanes(results, lanes, 18, len(bits)).astype(np.int64), 18)
    expected = _golden_align(bits, np.repeat(shared, lanes)[:len(bits)])
    wrong = np.flatnonzero(got != expected)
    lane_shared = np.repeat(shared, lanes)
    assert not wrong.size, f"{wrong.size} of {len(bits)} differ, e.g. " + ", ".join(
        f"{int(bits[i]):#06x} at E={int(lane_shared[i])}: got {got[i]}, expected {expected[i]}" for i in wrong[:6])
    return got


SHARED = [-126, -125, -118, -117, -100, -60, -1, 0, 1, 8, 9, 63, 126, 127]


def test_align_every_pattern():
    """Each shared exponent with every finite pattern it covers: exact, rounded, ties, and aligned to zero."""
    lanes = 16
    bits, shared = [], []
    for exponent in SHARED:
        covered = FINITE[gemm.exponents(_values(FINITE)) <= exponent]
        covered = np.concatenate([covered, np.zeros(-len(covered) % lanes, np.uint32)])   # +0 pads the last beat
        bits.append(covered)
        shared += [exponent] * (len(covered) // lanes)
    bits = np.concatenate(bits)
    dut = AlignLanes(lanes)
    assert dut.latency == 2
    got = _run_align(dut, bits, np.array(shared))
    # the whole range of q is reached, and nothing beyond it
    assert got.max() == 255 << 9 and got.min() == -(255 << 9)


@pytest.mark.parametrize("lanes, stages", [(3, 2), (5, 1), (1, 3), (2, 3)])
def test_align_stalled(lanes, stages):
    rng = np.random.default_rng(lanes)
    beats = 1500
    bits = rng.choice(FINITE, beats * lanes)
    lane_max = gemm.exponents(_values(bits)).reshape(beats, lanes).max(axis=1)
    # mostly the chunk maximum itself (as the engine uses it), sometimes well above it
    shared = np.where(rng.random(beats) < 0.6, lane_max, np.minimum(lane_max + rng.integers(0, 20, beats), 127))
    dut = AlignLanes(lanes, stages=stages)
    assert dut.latency == stages
    _run_align(dut, bits, shared, enable_seed=lanes + 10)


def test_align_combinational():
    rng = np.random.default_rng(20)
    bits = rng.choice(FINITE, 400 * 4)
    shared = np.minimum(gemm.exponents(_values(bits)).reshape(400, 4).max(axis=1) + rng.integers(0, 12, 400), 127)
    _run_align(AlignLanes(4, stages=0), bits, shared)


# -- ExponentMax ------------------------------------------------------------------------------------------------------

def _chunks(rng, lanes, count):
    """Random chunks of 1 to 8 beats: values of random magnitudes, some chunks all zero or all subnormal."""
    chunks = []
    for _ in range(count):
        beats = int(rng.integers(1, 9))
        kind = rng.random()
        if kind < 0.1:
            bits = np.zeros((beats, lanes), np.uint32) | (rng.integers(0, 2, (beats, lanes)) << 15).astype(np.uint32)
        elif kind < 0.2:
            bits = rng.integers(0, 1 << 7, (beats, lanes)).astype(np.uint32) | (1 << 15)
        else:
            # exponents within a few binades of each other, so that the maximum is decided by any lane and beat
            center = int(rng.integers(1, 255))
            field = np.clip(center + rng.integers(-3, 4, (beats, lanes)), 0, 254)
            bits = (field << 7 | rng.integers(0, 1 << 7, (beats, lanes))
                    | rng.integers(0, 2, (beats, lanes)) << 15).astype(np.uint32)
        chunks.append(bits)
    return chunks


EXPONENT_MAX_CASES = [(16, None), (16, 5), (5, 1), (3, 3), (2, 2), (1, 0), (1, 1), (8, 0)]


@pytest.mark.parametrize("lanes, stages", EXPONENT_MAX_CASES, ids=[f"{l}-{s}" for l, s in EXPONENT_MAX_CASES])
def test_exponent_max(lanes, stages):
    rng = np.random.default_rng(lanes * 3 + (stages or 0))
    chunks = _chunks(rng, lanes, 150)
    dut = ExponentMax(lanes, stages=stages)
    assert dut.latency == (2 if stages is None else stages) + 1
    values_port = Value.cast(dut.values)
    beats = [(beat, index == len(bits) - 1) for bits in chunks
             for index, beat in enumerate(pack_lanes(bits.ravel(), lanes, 16))]
    done = []

    async def feed(ctx):
        gaps = random.Random(lanes)
        for beat, last in beats:
            while gaps.random() < 0.3:
                ctx.set(dut.valid, 0)
                ctx.set(values_port, gaps.getrandbits(16 * lanes))     # junk outside valid beats is ignored
                ctx.set(dut.last, gaps.getrandbits(1))
                await ctx.tick()
            ctx.set(dut.valid, 1)
            ctx.set(values_port, beat)
            ctx.set(dut.last, last)
            await ctx.tick()
        ctx.set(dut.valid, 0)

    async def watch(ctx):
        cycle, last_cycles = 0, []
        async for _, _, valid, last, flag, exponent in ctx.tick().sample(dut.valid, dut.last, dut.done,
                                                                         dut.exponent):
            if flag:
                done.append((cycle, exponent))
            if valid and last:
                last_cycles.append(cycle)
            cycle += 1
            if len(done) == len(chunks):
                break
        # done follows each chunk's last beat by exactly ``latency`` cycles
        assert [c for c, _ in done] == [c + dut.latency for c in last_cycles[:len(done)]]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feed, background=True)
    sim.add_testbench(watch)
    sim.run()
    expected = [int(gemm.exponents(_values(bits)).max()) for bits in chunks]
    assert [e for _, e in done] == expected
    # the engine's view: golden.gemm.align gives the same shared exponents
    for bits, e in zip(chunks[:20], expected):
        assert gemm.align(_values(bits.ravel())[None, :], bits.size, axis=1)[1].item() == e


def test_arguments_checked():
    with pytest.raises(ValueError, match="lanes must be from 1 to 64, not 0"):
        AlignLanes(0)
    with pytest.raises(ValueError, match="stages must be from 0 to 3, not 4"):
        AlignLanes(4, stages=4)
    with pytest.raises(TypeError, match="lanes must be an integer"):
        ExponentMax("8")
    with pytest.raises(ValueError, match="stages must be from 0 to 4, not -1"):
        ExponentMax(8, stages=-1)
    with pytest.raises(ValueError, match="stages must be from 0 to 1, not 2"):
        ExponentMax(1, stages=2)
    with pytest.raises(ValueError, match="at least one value"):
        max_exponent(Module(), [])
