# amaranth: UnusedElaboratable=no
"""FP units: the RTL bit for bit against the golden twin, and the golden twin against numpy and torch.

Each RTL case is one simulation that feeds an operand set per cycle, back to back: a few thousand random bit patterns
steered towards the corners (subnormal and overflowing results, cancellation, rounding ties, carries into the
exponent) plus every pair of corner values (zeros, extreme subnormals and normals, infinities, NaNs). NaN results
are compared as NaN-ness against the golden twin, and must be the canonical NaN. Separate cases wrap the units in
``EnableInserter`` with a random enable, so that stalls (with junk on the inputs) are covered.
"""

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from amaranth.hdl import Elaboratable, EnableInserter, Module, Signal
from amaranth.sim import Simulator

from edge_qlora.golden import fp as golden
from edge_qlora.constants import BF16, FORMATS, FP16, FP32, FloatFormat
from edge_qlora.golden.gemm import partial_to_fp32
from edge_qlora.rtl.fp import (FixedToFloat, FPAdd, FPConvert, FPDiv, FPDivFolded, FPMul, FPSqrt, FPSqrtFolded,
                               fp_abs_key, fp_is_inf,
                               fp_is_nan, fp_is_zero, fp_order_key, _count_leading_zeros)

RANDOM_VECTORS = 4000


# -- operands ---------------------------------------------------------------------------------------------------------

def _pack(fmt, sign, field, fraction):
    sign, field, fraction = (np.asarray(x, dtype=np.int64) for x in (sign, field, fraction))
    return ((sign << (fmt.width - 1)) | (field << fmt.frac_bits) | fraction).astype(fmt.dtype)


def _fields(bits, fmt):
    bits = np.asarray(bits, dtype=np.int64)
    return (bits >> (fmt.width - 1), (bits >> fmt.frac_bits) & fmt.exp_max, bits & ((1 << fmt.frac_bits) - 1))


def _corners(fmt):
    """Both signs of: zero, extreme subnormals, extreme normals, 1 and its neighbours, infinity, NaNs."""
    f, one = fmt.frac_bits, fmt.bias << fmt.frac_bits
    magnitudes = [
        0, 1, 2, 3, 1 << (f - 1), fmt.min_normal_bits - 2, fmt.min_normal_bits - 1,
        fmt.min_normal_bits, fmt.min_normal_bits + 1, one - 1, one, one + 1, one | (1 << (f - 1)), one + (1 << f),
        (fmt.exp_max - 1) << f, fmt.max_finite_bits - 1, fmt.max_finite_bits, fmt.inf_bits,
        fmt.nan_bits, fmt.inf_bits + 1,
    ]
    return np.array([m | s for m in magnitudes for s in (0, fmt.sign_bit)], dtype=fmt.dtype)


def _operands(fmt, n, rng):
    """Random bit patterns of ``fmt``, most of them with a structure that makes the corners likely."""
    f = fmt.frac_bits
    sign = rng.integers(0, 2, n)
    field = rng.integers(0, fmt.exp_max + 1, n)
    edge = rng.random(n) < 0.25
    field = np.where(edge, rng.choice([0, 1, 2, fmt.exp_max - 2, fmt.exp_max - 1, fmt.bias - 1, fmt.bias], n), field)
    fraction = rng.integers(0, 1 << f, n)
    # a short significand (few fraction bits) makes exact results and rounding ties likely
    kept = np.minimum(rng.integers(0, f // 2 + 2, n), f)
    fraction = np.where(rng.random(n) < 0.3, fraction >> (f - kept) << (f - kept), fraction)
    # an all-ones fraction sits below a binade boundary, where rounding carries into the exponent
    fraction = np.where(rng.random(n) < 0.05, (1 << f) - 1 - rng.integers(0, 3, n), fraction)
    bits = _pack(fmt, sign, field, fraction)
    bits = np.where(rng.random(n) < 0.2, rng.integers(0, 1 << fmt.width, n), bits)
    bits = np.where(rng.random(n) < 0.05, rng.choice(_corners(fmt), n), bits)
    return bits.astype(fmt.dtype)


def _exponent_of(bits, fmt):
    """Unbiased exponent of each pattern (a subnormal counts as the smallest normal exponent)."""
    return np.maximum(_fields(bits, fmt)[1], 1) - fmt.bias


def _with_exponent(bits, fmt, exponent):
    """``bits`` with the unbiased ``exponent``, clamped to the finite range (below it, a subnormal)."""
    sign, _, fraction = _fields(bits, fmt)
    return _pack(fmt, sign, np.clip(exponent + fmt.bias, 0, fmt.exp_max - 1), fraction)


def _tie_makers(fmt, n, rng):
    """+-1.5 and +-1.25 times small powers of two: they turn odd significands into products on a rounding tie."""
    fraction = rng.choice([1 << (fmt.frac_bits - 1), 1 << (fmt.frac_bits - 2)], n)
    return _pack(fmt, rng.integers(0, 2, n), fmt.bias + rng.integers(-3, 4, n), fraction)


def _extreme_exponents(fmt, n, rng):
    """Unbiased exponents where a result of ``fmt`` is subnormal, barely normal, or about to overflow."""
    emin, emax = 1 - fmt.bias, fmt.exp_max - 1 - fmt.bias
    return np.where(rng.random(n) < 0.7, rng.integers(emin - fmt.frac_bits - 3, emin + 3, n),
                    rng.integers(emax - 1, emax + 3, n))


def _cross(xs, ys):
    return np.repeat(xs, len(ys)), np.tile(ys, len(xs))


def _mul_operands(fmt_a, fmt_b, fmt_out, rng, n=RANDOM_VECTORS, corners=True):
    a, b = _operands(fmt_a, n, rng), _operands(fmt_b, n, rng)
    a = np.where(rng.random(n) < 0.1, _tie_makers(fmt_a, n, rng), a)
    b = np.where(rng.random(n) < 0.1, _tie_makers(fmt_b, n, rng), b)
    # steer a third of the products to the subnormal and overflow edges of the result
    target = _extreme_exponents(fmt_out, n, rng)
    b = np.where(rng.random(n) < 0.35, _with_exponent(b, fmt_b, target - _exponent_of(a, fmt_a)), b)
    corner_a, corner_b = _cross(_corners(fmt_a), _corners(fmt_b)) if corners else ([], [])
    return np.concatenate([a, corner_a]).astype(fmt_a.dtype), np.concatenate([b, corner_b]).astype(fmt_b.dtype)


def _add_operands(fmt, rng, n=RANDOM_VECTORS, corners=True):
    a, b = _operands(fmt, n, rng), _operands(fmt, n, rng)
    sub = rng.integers(0, 2, n)
    # nearby exponents: alignment shifts around the precision, where the guard, round and sticky bits matter
    nearby = _exponent_of(a, fmt) + rng.integers(-fmt.precision - 4, fmt.precision + 5, n)
    b = np.where(rng.random(n) < 0.4, _with_exponent(b, fmt, nearby), b)
    # cancellation: b within a few units of +-a, so that a - b (or a + b) loses most of its bits
    close = (a.astype(np.int64) ^ np.where(sub == 1, 0, fmt.sign_bit)) + rng.integers(-3, 4, n)
    b = np.where(rng.random(n) < 0.15, close & ((1 << fmt.width) - 1), b)
    corner_a, corner_b = _cross(_corners(fmt), _corners(fmt)) if corners else ([], [])
    a = np.concatenate([a, corner_a, corner_a]).astype(fmt.dtype)
    b = np.concatenate([b, corner_b, corner_b]).astype(fmt.dtype)
    sub = np.concatenate([sub, np.zeros(len(corner_a), int), np.ones(len(corner_a), int)]).astype(int)
    return a, b, sub


def _div_operands(fmt, rng, n=RANDOM_VECTORS, corners=True):
    a, b = _operands(fmt, n, rng), _operands(fmt, n, rng)
    target = _extreme_exponents(fmt, n, rng)
    b = np.where(rng.random(n) < 0.35, _with_exponent(b, fmt, _exponent_of(a, fmt) - target), b)
    # an odd multiple of the smallest subnormal over a power of two: a quotient exactly on a rounding tie
    tiny = rng.random(n) < 0.05
    a = np.where(tiny, _pack(fmt, rng.integers(0, 2, n), 0, rng.integers(1, 64, n)), a)
    b = np.where(tiny, _pack(fmt, rng.integers(0, 2, n), fmt.bias + rng.integers(1, 7, n), 0), b)
    corner_a, corner_b = _cross(_corners(fmt), _corners(fmt)) if corners else ([], [])
    return np.concatenate([a, corner_a]).astype(fmt.dtype), np.concatenate([b, corner_b]).astype(fmt.dtype)


def _convert_operands(fmt_in, fmt_out, rng, n=RANDOM_VECTORS, exhaustive=True):
    """Every pattern of a 16-bit ``fmt_in`` (or random ones); for fp32, patterns around ``fmt_out``'s edges."""
    if fmt_in.width <= 16:
        if exhaustive:
            return np.arange(1 << fmt_in.width).astype(fmt_in.dtype)
        return np.concatenate([_operands(fmt_in, n, rng), _corners(fmt_in)])
    a = _operands(fmt_in, n, rng)
    a = np.where(rng.random(n) < 0.3, _with_exponent(a, fmt_in, _extreme_exponents(fmt_out, n, rng)), a)
    # midpoints between neighbours of fmt_out, and the patterns either side of them
    neighbours = rng.integers(0, fmt_out.max_finite_bits, n) | (rng.integers(0, 2, n) << (fmt_out.width - 1))
    low = golden.from_bits(neighbours, fmt_out).astype(np.float64)
    high = golden.from_bits(neighbours + 1, fmt_out).astype(np.float64)
    middle = ((low + high) / 2).astype(np.float32).view(np.uint32).astype(np.int64) + rng.integers(-1, 2, n)
    # the midpoint between the largest finite value and the next binade overflows
    largest, below = golden.from_bits([fmt_out.max_finite_bits, fmt_out.max_finite_bits - 1], fmt_out)
    overflow = np.float32(largest + (largest - below) / 2).view(np.uint32).astype(np.int64) + np.arange(-2, 3)
    return np.concatenate([a, middle, overflow, overflow | FP32.sign_bit, _corners(fmt_in)]).astype(fmt_in.dtype)


# -- simulation -------------------------------------------------------------------------------------------------------

def _simulate(dut, operands, enable_seed=None):
    """Results of ``dut`` for one operand set per element of ``operands`` (port name -> array), fed back to back.

    Without ``enable_seed``, one set enters per cycle and its result is read ``dut.latency`` cycles later. With it,
    the unit is wrapped in ``EnableInserter`` with a random enable, and stalled cycles drive junk on the inputs.
    """
    names = list(operands)
    vectors = list(zip(*(np.asarray(operands[name]).tolist() for name in names)))
    ports = [getattr(dut, name) for name in names]
    latency = dut.latency
    results = []
    if enable_seed is not None and latency == 0:
        raise ValueError("a unit without registers has nothing to stall")

    if enable_seed is None:
        top = dut
    else:
        advance = Signal()
        top = EnableInserter(advance)(dut)
    sim = Simulator(top)
    if latency > 0:
        sim.add_clock(1e-6)

    async def steady(ctx):
        for index in range(len(vectors) + latency):
            if index < len(vectors):
                for port, value in zip(ports, vectors[index]):
                    ctx.set(port, value)
            if latency == 0:
                results.append(ctx.get(dut.result))
                await ctx.delay(1e-6)
                continue
            if index >= latency:
                results.append(ctx.get(dut.result))
            await ctx.tick()

    async def stalled(ctx):
        rng = random.Random(enable_seed)
        accepted = 0                                # operand sets taken by an enabled clock edge
        while len(results) < len(vectors):
            enabled = rng.random() < 0.6
            ctx.set(advance, enabled)
            if enabled and accepted < len(vectors):
                for port, value in zip(ports, vectors[accepted]):
                    ctx.set(port, value)
            else:
                for port in ports:
                    ctx.set(port, rng.getrandbits(len(port)))
            # after k enabled edges the result register holds the result of operand set k - latency
            if accepted - latency == len(results):
                results.append(ctx.get(dut.result))
            await ctx.tick()
            accepted += enabled

    sim.add_testbench(steady if enable_seed is None else stalled)
    sim.run()
    return np.array(results, dtype=np.int64)


def _simulate_folded(dut, operands, gap, seed):
    """Results of a folded unit (``load`` set with each operand set, a set every ``gap`` cycles, at least its
    occupancy), each read ``dut.latency`` cycles after its load; junk on the inputs in the cycles between."""
    names = list(operands)
    vectors = list(zip(*(np.asarray(operands[name]).tolist() for name in names)))
    ports = [getattr(dut, name) for name in names]
    rng = random.Random(seed)
    results = []

    async def bench(ctx):
        for cycle in range(len(vectors) * gap + dut.latency + 1):
            i, phase = divmod(cycle, gap)
            load = phase == 0 and i < len(vectors)
            ctx.set(dut.load, load)
            for port, value in zip(ports, vectors[i] if load else [rng.getrandbits(len(p)) for p in ports]):
                ctx.set(port, value)
            done, waited = divmod(cycle - dut.latency, gap)
            if cycle >= dut.latency and waited == 0 and done < len(vectors):
                results.append(ctx.get(dut.result))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return np.array(results, dtype=np.int64)


def _assert_same(got, expected, fmt, **operands):
    """Bit-exact comparison, NaN compared as NaN-ness; the hardware's NaNs must be the canonical one."""
    got, expected = np.asarray(got, dtype=np.int64), np.asarray(expected, dtype=np.int64)
    assert len(got) == len(expected), f"{len(got)} results for {len(expected)} operand sets"
    got_nan, expected_nan = golden.is_nan(got, fmt), golden.is_nan(expected, fmt)
    wrong = np.nonzero(np.where(expected_nan, ~got_nan, got != expected))[0]
    if wrong.size:
        first = [", ".join(f"{name}={int(np.asarray(values)[i]):#x}" for name, values in operands.items())
                 + f": got {got[i]:#x}, expected {expected[i]:#x}" for i in wrong[:8]]
        pytest.fail(f"{wrong.size} of {len(got)} results differ:\n" + "\n".join(first))
    assert np.all(got[got_nan] == fmt.nan_bits), "NaN results must be the canonical NaN"


def _ids(*fmts):
    return "x".join(fmt.name for fmt in fmts)


# -- RTL against the golden twin --------------------------------------------------------------------------------------

MUL_CASES = [(FP32, FP32, FP32), (BF16, FP32, FP32), (FP16, FP32, FP32), (BF16, BF16, FP32)]


@pytest.mark.parametrize("fmt_a, fmt_b, fmt_out", MUL_CASES, ids=[_ids(*case) for case in MUL_CASES])
def test_mul(fmt_a, fmt_b, fmt_out):
    a, b = _mul_operands(fmt_a, fmt_b, fmt_out, np.random.default_rng(1))
    got = _simulate(FPMul(fmt_a, fmt_b, fmt_out), {"a": a, "b": b})
    _assert_same(got, golden.mul(a, fmt_a, b, fmt_b, fmt_out), fmt_out, a=a, b=b)


# every cut registered, as in the dequantizer's scale adder, once: the arithmetic does not depend on the cuts, but
# the ``compare`` cut carries flags (the swap, the exact-cancellation test) that the corner cases exercise
@pytest.mark.parametrize("fmt, stages", [(FP32, 6), (BF16, 6), (FP32, 8)], ids=["fp32", "bf16", "fp32-8"])
def test_add(fmt, stages):
    a, b, sub = _add_operands(fmt, np.random.default_rng(2))
    got = _simulate(FPAdd(fmt, stages=stages), {"a": a, "b": b, "sub": sub})
    _assert_same(got, golden.add(a, b, fmt, sub=sub), fmt, a=a, b=b, sub=sub)


def test_div():
    a, b = _div_operands(FP32, np.random.default_rng(3))
    got = _simulate(FPDiv(FP32), {"a": a, "b": b})
    _assert_same(got, golden.div(a, b, FP32), FP32, a=a, b=b)


@pytest.mark.parametrize("steps_per_cycle, gap", [(4, 8), (3, 10), (26, 3)])
def test_div_folded(steps_per_cycle, gap):
    # the recurrence over several cycles (4 a cycle: 7 cycles, the last with 2 spare steps), the same quotients
    a, b = _div_operands(FP32, np.random.default_rng(30 + steps_per_cycle))
    dut = FPDivFolded(FP32, steps_per_cycle)
    assert dut.latency == -(-26 // steps_per_cycle) + 2 and dut.occupancy <= gap
    n = 1500
    _assert_same(_simulate_folded(dut, {"a": a[:n], "b": b[:n]}, gap, 1), golden.div(a[:n], b[:n], FP32), FP32,
                 a=a[:n], b=b[:n])


@pytest.mark.parametrize("steps_per_cycle, gap", [(4, 7), (5, 9)])
def test_sqrt_folded(steps_per_cycle, gap):
    a = _sqrt_operands(FP32, np.random.default_rng(40 + steps_per_cycle), 1500)
    dut = FPSqrtFolded(FP32, steps_per_cycle)
    assert dut.latency == -(-24 // steps_per_cycle) + 2 and dut.occupancy <= gap
    _assert_same(_simulate_folded(dut, {"a": a}, gap, 2), golden.sqrt(a, FP32), FP32, a=a)


def test_folded_arguments_checked():
    with pytest.raises(ValueError, match="steps_per_cycle must be an integer from 1 to 26"):
        FPDivFolded(FP32, 27)
    with pytest.raises(ValueError, match="FPSqrtFolded takes 8 cycles, not 27"):
        FPSqrtFolded(FP32, 4, stages=27)


CONVERT_CASES = [(FP32, BF16), (FP32, FP16), (BF16, FP32), (FP16, FP32)]


@pytest.mark.parametrize("fmt_in, fmt_out", CONVERT_CASES, ids=[_ids(*case) for case in CONVERT_CASES])
def test_convert(fmt_in, fmt_out):
    a = _convert_operands(fmt_in, fmt_out, np.random.default_rng(4))
    got = _simulate(FPConvert(fmt_in, fmt_out), {"a": a})
    _assert_same(got, golden.convert(a, fmt_in, fmt_out), fmt_out, a=a)


# fewer vectors: these cases are about stalls and register placement, the arithmetic is covered above
STALL_VECTORS = 600
STALL_CASES = {                                        # unit, and the latency it must report
    "mul-bf16xfp32-6": (lambda: FPMul(BF16, FP32, FP32, stages=6), 6),
    "mul-fp32-2": (lambda: FPMul(FP32, FP32, FP32, stages=2), 2),
    "mul-fp32-7": (lambda: FPMul(FP32, FP32, FP32, stages=7), 7),
    "add-fp32-7": (lambda: FPAdd(FP32, stages=7), 7),
    "add-fp32-8": (lambda: FPAdd(FP32, stages=8), 8),
    "add-fp32-default": (lambda: FPAdd(FP32), 6),
    "add-bf16-3": (lambda: FPAdd(BF16, stages=3), 3),
    "div-fp32": (lambda: FPDiv(FP32), FP32.precision + 6),
    "div-fp32-12": (lambda: FPDiv(FP32, stages=12), 12),
    "convert-fp16-fp32-3": (lambda: FPConvert(FP16, FP32, stages=3), 3),
    "convert-fp32-fp16-2": (lambda: FPConvert(FP32, FP16, stages=2), 2),
}


@pytest.mark.parametrize("case", list(STALL_CASES))
def test_random_stalls(case):
    make, latency = STALL_CASES[case]
    dut = make()
    assert dut.latency == latency
    rng = np.random.default_rng(5)
    if isinstance(dut, FPMul):
        a, b = _mul_operands(dut.fmt_a, dut.fmt_b, dut.fmt_out, rng, STALL_VECTORS, corners=False)
        expected, fmt, operands = golden.mul(a, dut.fmt_a, b, dut.fmt_b, dut.fmt_out), dut.fmt_out, {"a": a, "b": b}
    elif isinstance(dut, FPAdd):
        a, b, sub = _add_operands(dut.fmt, rng, STALL_VECTORS, corners=False)
        expected, fmt, operands = golden.add(a, b, dut.fmt, sub=sub), dut.fmt, {"a": a, "b": b, "sub": sub}
    elif isinstance(dut, FPDiv):
        a, b = _div_operands(dut.fmt, rng, STALL_VECTORS, corners=False)
        expected, fmt, operands = golden.div(a, b, dut.fmt), dut.fmt, {"a": a, "b": b}
    else:
        a = _convert_operands(dut.fmt_in, dut.fmt_out, rng, STALL_VECTORS, exhaustive=False)
        expected, fmt, operands = golden.convert(a, dut.fmt_in, dut.fmt_out), dut.fmt_out, {"a": a}
    _assert_same(_simulate(dut, operands, enable_seed=6), expected, fmt, **operands)


def test_combinational():
    """``stages=0`` leaves no register at all: the result follows the operands in the same cycle."""
    a, b = _mul_operands(FP32, FP32, FP32, np.random.default_rng(7), 500, corners=False)
    got = _simulate(FPMul(FP32, FP32, FP32, stages=0), {"a": a, "b": b})
    _assert_same(got, golden.mul(a, FP32, b, FP32, FP32), FP32, a=a, b=b)


class _Helpers(Elaboratable):
    def __init__(self, fmt):
        self.value = Signal(fmt.width)
        self.abs_key = Signal(fmt.width - 1)
        self.order_key = Signal(fmt.width)
        self.is_nan, self.is_inf, self.is_zero = Signal(), Signal(), Signal()
        self.fmt = fmt

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [
            self.abs_key.eq(fp_abs_key(self.value, self.fmt)),
            self.order_key.eq(fp_order_key(self.value, self.fmt)),
            self.is_nan.eq(fp_is_nan(self.value, self.fmt)),
            self.is_inf.eq(fp_is_inf(self.value, self.fmt)),
            self.is_zero.eq(fp_is_zero(self.value, self.fmt)),
        ]
        return m


def test_helpers():
    fmt = BF16
    bits = np.concatenate([_operands(fmt, 1500, np.random.default_rng(8)), _corners(fmt)])
    dut = _Helpers(fmt)
    rows = []

    async def bench(ctx):
        for value in bits.tolist():
            ctx.set(dut.value, value)
            rows.append([ctx.get(s) for s in (dut.abs_key, dut.order_key, dut.is_nan, dut.is_inf, dut.is_zero)])

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    abs_key, order_key, nan, inf, zero = np.array(rows).T
    values = golden.from_bits(bits, fmt).astype(np.float64)
    assert np.array_equal(nan == 1, np.isnan(values))
    assert np.array_equal(inf == 1, np.isinf(values))
    assert np.array_equal(zero == 1, values == 0)
    keep = ~np.isnan(values)
    values, abs_key, order_key, bits = values[keep], abs_key[keep], order_key[keep], bits[keep]
    # integer order of the keys is the float order; -0 sorts just below +0
    by_value = values[np.argsort(order_key, kind="stable")]
    assert np.all(by_value[1:] >= by_value[:-1])
    zeros = by_value[by_value == 0]
    assert np.all(np.signbit(zeros)[1:] <= np.signbit(zeros)[:-1])
    by_magnitude = np.abs(values[np.argsort(abs_key, kind="stable")])
    assert np.all(by_magnitude[1:] >= by_magnitude[:-1])


def test_arguments_checked():
    with pytest.raises(ValueError, match="stages must be from 0 to 7, not 8"):
        FPMul(FP32, FP32, FP32, stages=8)
    with pytest.raises(ValueError, match="dsp_width"):
        FPMul(FP32, FP32, FP32, dsp_width=1)
    with pytest.raises(TypeError, match="fmt_b must be a FloatFormat"):
        FPMul(FP32, "fp32", FP32)
    with pytest.raises(TypeError, match="stages must be an integer"):
        FPAdd(FP32, stages=2.0)
    with pytest.raises(ValueError, match="stages must be from 0 to 30"):
        FPDiv(FP32, stages=31)
    with pytest.raises(ValueError, match="exp_bits"):
        FloatFormat("fp64", 11, 52)


# -- the golden twin against numpy and torch --------------------------------------------------------------------------

def _as_torch(bits, dtype):
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).view(np.int16).copy()).view(dtype)


def _torch_bits(tensor):
    return tensor.view(torch.int16).numpy().view(np.uint16)


def test_golden_formats():
    assert (FP32.width, FP32.bias, BF16.width, BF16.bias, FP16.width, FP16.bias) == (32, 127, 16, 127, 16, 15)
    assert (FP32.nan_bits, BF16.nan_bits, FP16.nan_bits) == (0x7FC00000, 0x7FC0, 0x7E00)
    assert FORMATS == {"fp32": FP32, "bf16": BF16, "fp16": FP16}


def test_golden_rounding_matches_torch_and_numpy():
    rng = np.random.default_rng(9)
    bits = np.concatenate([rng.integers(0, 1 << 32, 500_000, dtype=np.uint64).astype(np.uint32),
                           _operands(FP32, 200_000, rng), _convert_operands(FP32, FP16, rng, 50_000),
                           _convert_operands(FP32, BF16, rng, 50_000)])
    values = bits.view(np.float32)
    finite = np.isfinite(values)
    bf16 = golden.to_bits(values, BF16)
    assert np.array_equal(bf16[finite], _torch_bits(torch.from_numpy(values[finite]).to(torch.bfloat16)))
    fp16 = golden.to_bits(values, FP16)
    with np.errstate(over="ignore"):
        assert np.array_equal(fp16[finite], values[finite].astype(np.float16).view(np.uint16))
    assert np.array_equal(fp16[finite], _torch_bits(torch.from_numpy(values[finite]).to(torch.float16)))
    assert np.array_equal(golden.to_bits(values, FP32)[finite], bits[finite])
    assert np.array_equal(golden.is_nan(bf16, BF16), np.isnan(values))
    assert np.array_equal(golden.round_to(values, BF16)[finite], golden.from_bits(bf16, BF16)[finite])
    # widening is exact
    every = np.arange(1 << 16).astype(np.uint16)
    assert np.array_equal(golden.from_bits(every, BF16).view(np.uint32)[~golden.is_nan(every, BF16)],
                          _as_torch(every, torch.bfloat16).float().numpy().view(np.uint32)[~golden.is_nan(every, BF16)])
    assert np.array_equal(golden.convert(every, FP16, FP32)[~golden.is_nan(every, FP16)],
                          every.view(np.float16).astype(np.float32).view(np.uint32)[~golden.is_nan(every, FP16)])


def _float32_reference(bits, fmt_out):
    return np.where(np.isnan(bits), fmt_out.nan_bits, bits.view(np.uint32))


@pytest.mark.parametrize("fmt_a, fmt_b, fmt_out", MUL_CASES, ids=[_ids(*case) for case in MUL_CASES])
def test_golden_mul_matches_float32(fmt_a, fmt_b, fmt_out):
    a, b = _mul_operands(fmt_a, fmt_b, fmt_out, np.random.default_rng(10), 200_000)
    with np.errstate(all="ignore"):
        reference = golden.from_bits(a, fmt_a) * golden.from_bits(b, fmt_b)
    _assert_same(golden.mul(a, fmt_a, b, fmt_b, fmt_out), _float32_reference(reference, fmt_out), fmt_out, a=a, b=b)


def test_golden_add_div_match_float32():
    a, b, sub = _add_operands(FP32, np.random.default_rng(11), 200_000)
    x, y = golden.from_bits(a, FP32), golden.from_bits(b, FP32)
    with np.errstate(all="ignore"):
        reference = np.where(sub == 1, x - y, x + y)
    _assert_same(golden.add(a, b, FP32, sub=sub), _float32_reference(reference, FP32), FP32, a=a, b=b)
    a, b = _div_operands(FP32, np.random.default_rng(12), 200_000)
    with np.errstate(all="ignore"):
        reference = golden.from_bits(a, FP32) / golden.from_bits(b, FP32)
    _assert_same(golden.div(a, b, FP32), _float32_reference(reference, FP32), FP32, a=a, b=b)


def test_golden_bf16_ops_match_torch():
    """torch computes bf16 arithmetic in float32 and rounds once more, which is exact for these operations."""
    rng = np.random.default_rng(13)
    a, b, sub = _add_operands(BF16, rng, 200_000)
    x, y = _as_torch(a, torch.bfloat16), _as_torch(b, torch.bfloat16)
    reference = torch.where(torch.from_numpy(sub == 1), x - y, x + y)
    expected = np.where(torch.isnan(reference).numpy(), BF16.nan_bits, _torch_bits(reference))
    _assert_same(golden.add(a, b, BF16, sub=sub), expected, BF16, a=a, b=b)
    a, b = _mul_operands(BF16, BF16, BF16, rng, 200_000)
    reference = _as_torch(a, torch.bfloat16) * _as_torch(b, torch.bfloat16)
    expected = np.where(torch.isnan(reference).numpy(), BF16.nan_bits, _torch_bits(reference))
    _assert_same(golden.mul(a, BF16, b, BF16, BF16), expected, BF16, a=a, b=b)


# -- FixedToFloat -----------------------------------------------------------------------------------------------------

def _fixed_operands(width, exp_range, fmt, rng, n=RANDOM_VECTORS):
    """Integers of every bit length (many with short significands, ties and all-ones runs) and exponents, a third of
    them steered so that the result is subnormal, barely normal or about to overflow, plus every corner pair."""
    lo, hi = exp_range
    length = rng.integers(0, width, n)                      # magnitude below 2 ** length
    magnitude = rng.integers(0, 1 << 62, n) >> (62 - length)
    # a significand of precision + 1 bits ending in 1 is a rounding tie once the result is normal
    tie = ((1 << fmt.precision) | (rng.integers(0, 1 << (fmt.precision - 1), n) << 1) | 1)
    tie_shift = rng.integers(0, max(1, width - 1 - (fmt.precision + 1)) + 1, n)
    magnitude = np.where(rng.random(n) < 0.15, np.minimum(tie << tie_shift, (1 << (width - 1)) - 1), magnitude)
    # few significant bits: exact results, and ties wherever the window falls (subnormal results)
    kept = rng.integers(1, 6, n)
    short = magnitude >> np.maximum(length - kept, 0) << np.maximum(length - kept, 0)
    magnitude = np.where(rng.random(n) < 0.2, short, magnitude)
    # a run of ones below a binade boundary: rounding carries into the exponent
    ones = (1 << np.minimum(length, width - 1)) - 1 - rng.integers(0, 3, n)
    magnitude = np.where(rng.random(n) < 0.1, np.maximum(ones, 0), magnitude)
    values = np.where(rng.integers(0, 2, n) == 1, -magnitude, magnitude)
    exponents = rng.integers(lo, hi + 1, n)
    top = np.array([max(int(v).bit_length() - 1, 0) for v in np.abs(values)])
    steered = np.clip(_extreme_exponents(fmt, n, rng) - top, lo, hi)
    exponents = np.where(rng.random(n) < 0.35, steered, exponents)
    big = (1 << (width - 1)) - 1
    corner_values = np.array([0, 1, -1, 2, -2, 3, big, -big, -big - 1, 1 << (width - 2), -(1 << (width - 2))])
    emin, emax = 1 - fmt.bias, fmt.exp_max - 1 - fmt.bias
    corner_exponents = np.unique(np.clip(np.array(
        [lo, lo + 1, hi - 1, hi, 0, emin, emin - fmt.frac_bits, emin - fmt.frac_bits - 1, emin - fmt.frac_bits - 2,
         emax, emax + 1, emax - width + 1, emax - width + 2, emin - width + 1]), lo, hi))
    corner_values, corner_exponents = _cross(corner_values, corner_exponents)
    return np.concatenate([values, corner_values]), np.concatenate([exponents, corner_exponents])


FIXED_CASES = {
    "44-fp32": (44, (-284, 222), FP32),
    "44-bf16": (44, (-284, 222), BF16),
    "20-fp16": (20, (-40, 30), FP16),
    "6-fp32-normal": (6, (-20, 20), FP32),          # no subnormal and no overflow: the rounder drops those checks
}


@pytest.mark.parametrize("case", list(FIXED_CASES))
def test_fixed_to_float(case):
    width, exp_range, fmt = FIXED_CASES[case]
    values, exponents = _fixed_operands(width, exp_range, fmt, np.random.default_rng(14))
    got = _simulate(FixedToFloat(width, exp_range, fmt), {"value": values, "exponent": exponents})
    _assert_same(got, golden.fixed_to_float(values, exponents, fmt), fmt, value=values, exponent=exponents)


@pytest.mark.parametrize("stages", [5, 2, 0])
def test_fixed_to_float_stages(stages):
    """Other register placements, stalled at random (``stages=0``: combinational, not stalled)."""
    values, exponents = _fixed_operands(44, (-284, 222), FP32, np.random.default_rng(15), STALL_VECTORS)
    dut = FixedToFloat(stages=stages)
    assert dut.latency == stages and dut.exponent_width == 10
    got = _simulate(dut, {"value": values, "exponent": exponents}, enable_seed=16 if stages else None)
    _assert_same(got, golden.fixed_to_float(values, exponents, FP32), FP32, value=values, exponent=exponents)


def test_fixed_to_float_biased():
    """``biased=True``: the same results from the exponent with the offset added by the caller."""
    values, exponents = _fixed_operands(44, (-284, 222), FP32, np.random.default_rng(19), STALL_VECTORS)
    dut = FixedToFloat(stages=5, biased=True)
    assert dut.exponent_offset == 43 + 127 and dut.exponent_width == 10
    got = _simulate(dut, {"value": values, "exponent": [e + dut.exponent_offset for e in exponents]},
                    enable_seed=20)
    _assert_same(got, golden.fixed_to_float(values, exponents, FP32), FP32, value=values, exponent=exponents)


def test_fixed_to_float_default_stalled():
    values, exponents = _fixed_operands(44, (-284, 222), FP32, np.random.default_rng(17), STALL_VECTORS)
    dut = FixedToFloat()
    assert dut.latency == 4
    got = _simulate(dut, {"value": values, "exponent": exponents}, enable_seed=18)
    _assert_same(got, golden.fixed_to_float(values, exponents, FP32), FP32, value=values, exponent=exponents)


def test_fixed_to_float_arguments_checked():
    with pytest.raises(ValueError, match="width must be an integer from 2 to 64, not 65"):
        FixedToFloat(65)
    with pytest.raises(ValueError, match="exp_range must be a tuple"):
        FixedToFloat(exp_range=(3, -3))
    with pytest.raises(TypeError, match="fmt must be a FloatFormat"):
        FixedToFloat(fmt="fp32")
    with pytest.raises(ValueError, match="stages must be from 0 to 5, not 6"):
        FixedToFloat(stages=6)


def test_golden_fixed_to_float():
    """Against float32 arithmetic, exact where the product of the value and the power of two is a float32."""
    rng = np.random.default_rng(19)
    values = rng.integers(-(1 << 24), 1 << 24, 100_000)
    exponents = rng.integers(-180, 140, 100_000)
    with np.errstate(over="ignore"):
        reference = values.astype(np.float32) * np.ldexp(np.float32(1), exponents.clip(-149, 127)).astype(np.float32)
    exact = (exponents >= -149) & (exponents <= 127) & (np.abs(reference) >= np.float32(2.0 ** -126))
    got = golden.fixed_to_float(values, exponents, FP32)
    assert np.array_equal(got[exact], reference[exact].view(np.uint32))
    # the engine's conversion is the same arithmetic
    sums = rng.integers(-(1 << 43) + 1, 1 << 43, 10_000)
    exps = rng.integers(-252, 255, 10_000)
    assert np.array_equal(golden.fixed_to_float(sums, exps - 32, FP32), partial_to_fp32(sums, exps).view(np.uint32))
    assert golden.fixed_to_float([0, 0], [-300, 300], FP32).tolist() == [0, 0]
    with pytest.raises(ValueError, match="2 \\*\\* 53"):
        golden.fixed_to_float([1 << 53], [0], FP32)


# -- FPSqrt -----------------------------------------------------------------------------------------------------------

def _scaled(significands, fmt, rng, even=False):
    """Bit patterns of ``significands * 2 ** k`` (float64, rounded to ``fmt``), ``k`` spread over the whole range of
    ``fmt`` from its subnormals to its largest binade; ``k`` even where ``even``, so that an exact square stays one."""
    significands = np.asarray(significands, dtype=np.float64)
    top = np.floor(np.log2(significands)).astype(np.int64)
    emin, emax = 1 - fmt.bias - fmt.frac_bits, fmt.exp_max - 1 - fmt.bias
    k = rng.integers(emin, emax + 1, len(significands)) - top
    if even:
        k = k & ~1
    return golden.to_bits(np.ldexp(significands, k), fmt)


def _hard_roots(fmt, n, rng):
    """Significands whose roots come closest to a rounding midpoint: within about ``2 ** -(p + 2)`` units in the
    last place, so that only the sticky bit from the final remainder decides the rounding.

    A midpoint between neighbours of precision ``p`` is an odd ``y`` of ``p + 1`` bits (in units of half the last
    place); ``x = (y * y - r) / 2 ** (p + 2)`` is an integer of at most ``p`` bits whenever ``y * y = r`` modulo
    ``2 ** (p + 2)``, and then ``sqrt(x * 2 ** (p + 2))`` is ``y - r / (2 y)``. For a small ``r = 1 (mod 8)`` of
    either sign, Hensel lifting finds such a ``y``.
    """
    p = fmt.precision
    modulus = 1 << (p + 2)
    significands = []
    bound = min(40, 1 << max(p - 8, 0))             # |r| well below y, so that r / (2 y) stays far below 1
    for r in (1 + 8 * rng.integers(-bound, bound + 1, n)).tolist():
        y = 1
        for k in range(3, p + 2):                   # from y * y = r modulo 2 ** k to modulo 2 ** (k + 1)
            if (y * y - r) % (2 << k):
                y += 1 << (k - 1)
        # of the four roots of r modulo 2 ** (p + 2), the one of p + 1 bits
        y = next(s % modulus for s in (y, -y, y + modulus // 2, modulus // 2 - y) if 1 << p <= s % modulus < 2 << p)
        significands.append((y * y - r) // modulus << (p % 2))      # an even power of two on top: still a square
    return np.array(significands, dtype=np.float64)


def _sqrt_operands(fmt, rng, n=RANDOM_VECTORS, corners=True):
    """Random patterns of either sign, exact squares, and roots near rounding midpoints, at every exponent.

    A square root is never exactly halfway between two floats. The patterns nearest the squares of midpoints have
    roots within a quarter of a unit in the last place of one; :func:`_hard_roots` come far closer.
    """
    p = fmt.precision
    random_bits = _operands(fmt, n, rng)
    # a significand of p // 2 bits squares exactly into p bits
    roots = rng.integers(1 << (p // 2 - 1), 1 << (p // 2), n // 8)
    squares = _scaled(roots.astype(np.float64) ** 2, fmt, rng, even=True)
    # (2q + 1) * 2 ** -p is the midpoint between two neighbours q * 2 ** (1 - p) of [1, 2); its square is exact in
    # float64 (2p + 2 bits), and the pattern nearest it and the ones either side have roots near the midpoint
    odd = 2 * rng.integers(1 << (p - 1), 1 << p, n // 8) + 1
    near = _scaled(odd.astype(np.float64) ** 2, fmt, rng, even=True).astype(np.int64) + rng.integers(-1, 2, n // 8)
    near = np.clip(near, 0, fmt.max_finite_bits)
    hard = _scaled(_hard_roots(fmt, n // 8, rng), fmt, rng, even=True)
    extra = [_corners(fmt)] if corners else []
    return np.concatenate([random_bits, squares, near, hard, *extra]).astype(fmt.dtype)


@pytest.mark.parametrize("fmt", [FP32, BF16, FP16], ids=_ids)
def test_sqrt(fmt):
    a = _sqrt_operands(fmt, np.random.default_rng(20), RANDOM_VECTORS if fmt is FP32 else RANDOM_VECTORS // 4)
    got = _simulate(FPSqrt(fmt), {"a": a})
    _assert_same(got, golden.sqrt(a, fmt), fmt, a=a)


@pytest.mark.parametrize("stages", [None, 9, 16])
def test_sqrt_stalled(stages):
    """The default and other register placements, with a random enable and junk on the input while stalled."""
    a = _sqrt_operands(FP32, np.random.default_rng(21), STALL_VECTORS, corners=False)
    dut = FPSqrt(FP32, stages=stages)
    assert dut.latency == (FP32.precision + 3 if stages is None else stages)
    _assert_same(_simulate(dut, {"a": a}, enable_seed=22), golden.sqrt(a, FP32), FP32, a=a)


def test_sqrt_special_values():
    """IEEE semantics, spelled out: signed zeros, +inf, and NaN for every negative nonzero operand and every NaN."""
    cases = {0x00000000: 0x00000000, 0x80000000: 0x80000000, 0x7F800000: 0x7F800000, 0xFF800000: FP32.nan_bits,
             0xBF800000: FP32.nan_bits, 0x80000001: FP32.nan_bits, 0x7F800001: FP32.nan_bits,
             0xFFC00000: FP32.nan_bits, 0x3F800000: 0x3F800000, 0x40800000: 0x40000000,
             0x00000001: 0x1A3504F3, 0x7F7FFFFF: 0x5F7FFFFF}
    a = np.array(list(cases), dtype=np.uint32)
    expected = np.array(list(cases.values()), dtype=np.uint32)
    assert np.array_equal(golden.sqrt(a, FP32), expected)
    assert np.array_equal(_simulate(FPSqrt(FP32), {"a": a}), expected)


def test_sqrt_arguments_checked():
    with pytest.raises(ValueError, match="FPSqrt has 27 cuts .* stages must be from 0 to 27, not 28"):
        FPSqrt(FP32, stages=28)
    with pytest.raises(TypeError, match="FPSqrt stages must be an integer"):
        FPSqrt(FP32, stages=True)
    with pytest.raises(TypeError, match="FPSqrt fmt must be a FloatFormat"):
        FPSqrt("fp32")


def _root_is_correctly_rounded(x_bits, r_bits):
    """Whether the fp32 ``r`` is the correctly rounded root of the positive finite fp32 ``x``, in exact rationals:
    the square of the midpoint below ``r`` must lie below ``x`` and the square of the one above ``r`` above it (a
    root is never exactly a midpoint, so no tie needs breaking)."""
    x = Fraction(float(np.uint32(x_bits).view(np.float32)))
    below, r, above = (Fraction(float(np.uint32(bits).view(np.float32))) for bits in (r_bits - 1, r_bits, r_bits + 1))
    return ((r + below) / 2) ** 2 < x < ((r + above) / 2) ** 2


def test_golden_sqrt_matches_float32():
    """Against numpy's float32 square root (the CPU's correctly rounded instruction) on random and adversarial
    patterns, and against exact rational arithmetic on a sample of the positive ones.

    torch's float32 ``sqrt`` is no reference here: on this CPU it is off by one unit in the last place for about one
    operand in twelve (a fast vectorised approximation), so torch only checks the 16-bit formats below, where the
    float32 root comes from numpy."""
    rng = np.random.default_rng(23)
    bits = np.concatenate([rng.integers(0, 1 << 32, 500_000, dtype=np.uint64).astype(np.uint32),
                           _sqrt_operands(FP32, rng, 200_000)])
    with np.errstate(invalid="ignore"):
        reference = np.sqrt(bits.view(np.float32))
    got = golden.sqrt(bits, FP32)
    _assert_same(got, _float32_reference(reference, FP32), FP32, a=bits)
    positive = bits[(bits > 0) & (bits < FP32.inf_bits)]
    sample = np.concatenate([positive[:3000], positive[-3000:]])    # random patterns, then adversarial ones
    wrong = [hex(x) for x, r in zip(sample.tolist(), golden.sqrt(sample, FP32).tolist())
             if not _root_is_correctly_rounded(x, r)]
    assert not wrong, f"roots not correctly rounded for {wrong[:8]}"
    # the 16-bit formats, every pattern, against the float32 root rounded once more by torch (innocuous: float32
    # has 24 >= 2 * 11 + 2 bits)
    every = np.arange(1 << 16).astype(np.uint16)
    for fmt, dtype in ((BF16, torch.bfloat16), (FP16, torch.float16)):
        with np.errstate(invalid="ignore"):
            root = torch.from_numpy(np.sqrt(_as_torch(every, dtype).float().numpy())).to(dtype)
        expected = np.where(torch.isnan(root).numpy(), fmt.nan_bits, _torch_bits(root))
        _assert_same(golden.sqrt(every, fmt), expected, fmt, a=every)


def test_fpmul_ecp5_uses_the_dsp_registers():
    """With its input and partials cuts registered, FPMul on ECP5 puts those registers of the significands in the
    MULT18X18D blocks (unsigned pieces); a stall domain's enable reaches them through ``dsp_enable``."""
    import re

    from amaranth.back import rtlil

    from edge_qlora.rtl.nf4_dequant import NF4Dequantizer

    class Ecp5:  # the attribute the elaboration looks at
        family = "ecp5"

    text = rtlil.convert(FPMul(FP32, FP32, FP32, stages=6), platform=Ecp5())
    cells = text.split("cell \\MULT18X18D ")[1:]
    assert len(cells) == 4       # 24 x 24 bits: 12-bit pieces
    for cell in cells:
        cell = cell.split("\n  end")[0]
        assert 'parameter \\REG_INPUTA_CLK "CLK0"' in cell and 'parameter \\REG_OUTPUT_CLK "CLK0"' in cell
        assert "connect \\SIGNEDA 1'0" in cell
    # the spread cut: the same four blocks, then their products registered again in fabric
    text = rtlil.convert(FPMul(FP32, FP32, FP32, stages=7), platform=Ecp5())
    assert text.count("cell \\MULT18X18D ") == 4
    assert len(re.findall(r"wire width 24 \\spread_partial_\d+_\d+\n", text)) == 4
    assert "MULT18X18D" not in rtlil.convert(FPMul(FP32, FP32, FP32, stages=5), platform=Ecp5())
    assert "MULT18X18D" not in rtlil.convert(FPMul(FP32, FP32, FP32, stages=6))
    # every DSP block of the dequantizer is enabled by its stall domain
    text = rtlil.convert(NF4Dequantizer(), platform=Ecp5())
    assert set(re.findall(r"connect \\CE0 (\S+)", text)) == {"\\scale_enable", "\\build_enable"}


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 8, 11, 44, 64])
def test_count_leading_zeros(width):
    """The leading-zero tree every rounder uses: exhaustive up to 11 bits, else every single bit and random values
    with every count (an all-zero input counts ``width``)."""
    m = Module()
    value = Signal(width)
    count = _count_leading_zeros(m, value, "lz")
    if width <= 11:
        values = range(1 << width)
    else:
        rng = random.Random(width)
        values = [0, (1 << width) - 1, *(1 << i for i in range(width)),
                  *(rng.getrandbits(width) >> rng.randrange(width) for _ in range(200))]
    wrong = []

    async def testbench(ctx):
        for v in values:
            ctx.set(value, v)
            if ctx.get(count) != width - v.bit_length():
                wrong.append(v)

    sim = Simulator(m)
    sim.add_testbench(testbench)
    sim.run()
    assert not wrong
