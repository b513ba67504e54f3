"""Double quantization of the absmax vector: golden model against bitsandbytes, RTL against the golden model."""

import numpy as np
import pytest
import torch

from edge_qlora.constants import ABSMAX_THRESHOLDS
from edge_qlora.golden import absmax_quant, nf4_quant

from reference import mismatches

import bitsandbytes.functional as bnbf


def bnb_blockwise(values):
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(np.asarray(values, np.float32)), blocksize=256)
    return codes.numpy(), state.absmax.numpy()


def staircase_probe():
    """Each threshold, its float32 neighbours, and the code-book levels, in blocks whose absmax is exactly 1."""
    t = ABSMAX_THRESHOLDS
    values = np.concatenate([t, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2)),
                             bnbf.create_dynamic_map().numpy(), np.float32([-1, 1, 0, -0.0])]).astype(np.float32)
    blocks = [np.append(values[i:i + 255], np.float32(1)) for i in range(0, values.size, 255)]
    return np.concatenate(blocks)


def test_thresholds_are_the_staircase_of_bitsandbytes():
    values = staircase_probe()
    codes, _ = bnb_blockwise(values)
    assert mismatches(codes, absmax_quant.staircase_code(values)) == 0
    assert np.all(np.diff(ABSMAX_THRESHOLDS) >= 0)  # equal steps: codes the grid never reaches


def test_staircase_equals_grid_lookup():
    values = np.random.default_rng(0).uniform(-1, 1, 200_000).astype(np.float32)
    values = np.concatenate([values, ABSMAX_THRESHOLDS, np.float32([np.nan, np.inf, -np.inf])])
    grid = absmax_quant.GRID_CODE[absmax_quant.grid_index(values)]
    assert mismatches(grid, absmax_quant.staircase_code(values)) == 0


@pytest.mark.parametrize("case", ["random", "constant", "tiny_spread", "reciprocal_overflow", "huge", "odd_length"])
def test_golden_against_bitsandbytes(case):
    rng = np.random.default_rng(1)
    absmax = {
        "random": rng.lognormal(-3, 1, 2000),
        "constant": np.full(300, 0.125),                          # absmax2 == 0: code 0
        "tiny_spread": 0.5 + rng.uniform(-1e-6, 1e-6, 700),
        "reciprocal_overflow": np.float32([0, 1e-39, -1e-39, 5e-40, -0.0] * 60),  # 1 / absmax2 == inf
        "huge": rng.uniform(1e37, 3e38, 600),
        "odd_length": rng.lognormal(-4, 2, 257),
    }[case].astype(np.float32)
    offset = nf4_quant.mean(absmax)
    d = (absmax - offset).astype(np.float32)
    codes, absmax2 = bnb_blockwise(d)
    golden_codes, golden_absmax2 = absmax_quant.quantize(absmax, offset)
    assert mismatches(codes, golden_codes) == 0
    assert mismatches(absmax2, golden_absmax2) == 0


def test_golden_dequantize_against_bitsandbytes():
    rng = np.random.default_rng(2)
    absmax = rng.lognormal(-3, 1, 1000).astype(np.float32)
    offset = np.float32(absmax.mean())
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(absmax - offset), blocksize=256)
    reference = (bnbf.dequantize_blockwise(codes, state) + offset).numpy()
    golden = absmax_quant.dequantize(codes.numpy(), state.absmax.numpy(), offset)
    assert mismatches(reference, golden) == 0


# --- RTL ------------------------------------------------------------------------------------------------------------

from edge_qlora.sim.nf4_quant import run_absmax_quantizer  # noqa: E402
from edge_qlora.sim.streams import Stalls  # noqa: E402

STREAMS = ("absmax", "codes", "absmax2")


def random_stalls(seed, idle=0.3):
    return {name: Stalls(idle, seed * 10 + i) for i, name in enumerate(STREAMS)}


def check_rtl(tensors, seed):
    """The RTL against the golden model, vectors back to back, with random stalls on every stream.

    ``run_absmax_quantizer`` checks the code count and the ``last`` flags; the bit-exact comparison of every code
    and absmax2 catches anything lost, duplicated or reordered.
    """
    names = list(tensors)
    runs = run_absmax_quantizer([tensors[name][0] for name in names], [tensors[name][1] for name in names],
                                stalls=random_stalls(seed))
    for name, run in zip(names, runs):
        absmax, offset = tensors[name]
        codes, absmax2 = absmax_quant.quantize(absmax, offset)
        assert mismatches(codes, run.codes) == 0, name
        assert mismatches(absmax2, run.absmax2) == 0, name


def test_rtl_against_golden():
    # the cases of test_golden_against_bitsandbytes, each with its own offset, back to back through one core
    rng = np.random.default_rng(1)
    cases = {
        "random": rng.lognormal(-3, 1, 2000),
        "constant": np.full(300, 0.125),
        "tiny_spread": 0.5 + rng.uniform(-1e-6, 1e-6, 700),
        "reciprocal_overflow": np.float32([0, 1e-39, -1e-39, 5e-40, -0.0] * 60),
        "huge": rng.uniform(1e37, 3e38, 600),
        "odd_length": rng.lognormal(-4, 2, 257),
    }
    tensors = {}
    for name, values in cases.items():
        values = values.astype(np.float32)
        tensors[name] = (values, nf4_quant.mean(values))
    check_rtl(tensors, seed=1)


def test_rtl_staircase():
    # offset 0 and groups whose absmax is exactly 1: normed equals the value, so every threshold and both of its
    # float32 neighbours are probed exactly
    values = staircase_probe()
    run = run_absmax_quantizer(values, np.float32(0), stalls=random_stalls(2))
    assert mismatches(absmax_quant.staircase_code(values), run.codes) == 0
    assert np.all(run.absmax2 == 1)


def test_rtl_ieee_and_short_vectors_back_to_back():
    nan = np.uint32(0x7FC00000).view(np.float32)  # the canonical NaN, which numpy's arithmetic passes through
    tensors = {
        "one": (np.float32([0.25]), np.float32(0.25)),                             # absmax2 == 0: code 0
        "inf": (np.float32([1, np.inf, 2, 3]), np.float32(0)),                    # reciprocal 0, inf * 0 = NaN
        "nan": (np.float32([1, nan, 2]), np.float32(0)),                          # absmax2 NaN: codes 0
        "neg_zero": (np.float32([-0.0, 0.0, 1e-45, -1e-45]), np.float32(0)),      # subnormal absmax2: 1/x = inf
        "group_255": (np.linspace(-1, 2, 255, dtype=np.float32), np.float32(0.5)),
        "group_256": (np.linspace(-1, 2, 256, dtype=np.float32), np.float32(-0.5)),
        "group_257": (np.linspace(-1, 2, 257, dtype=np.float32), np.float32(0.125)),
        "groups_3": (np.random.default_rng(3).lognormal(-3, 1, 600).astype(np.float32), np.float32(0.05)),
    }
    check_rtl(tensors, seed=3)


def test_rtl_sustains_one_value_per_cycle(record_property):
    absmax = np.random.default_rng(4).lognormal(-3, 1, 2048).astype(np.float32)
    offset = nf4_quant.mean(absmax)
    run = run_absmax_quantizer(absmax, offset)
    codes, absmax2 = absmax_quant.quantize(absmax, offset)
    assert mismatches(codes, run.codes) == 0 and mismatches(absmax2, run.absmax2) == 0
    record_property("values_per_cycle", round(absmax.size / run.cycles, 3))
    print(f"{absmax.size} values in {run.cycles} cycles, {absmax.size / run.cycles:.3f} values/cycle")
    assert run.cycles <= absmax.size + 256 + 64   # the first group fills, then one value per cycle
