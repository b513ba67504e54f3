"""Double quantization of the absmax vector: golden model against bitsandbytes, RTL against the golden model."""

import numpy as np
import pytest
import torch

from edge_qlora.golden import absmax_quant, nf4_quant

from reference import bits, mismatches

import bitsandbytes.functional as bnbf


def bnb_blockwise(values):
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(np.asarray(values, np.float32)), blocksize=256)
    return codes.numpy(), state.absmax.numpy()


def staircase_probe():
    """Each threshold, its float32 neighbours, and the code-book levels, in blocks whose absmax is exactly 1."""
    t = absmax_quant.THRESHOLDS
    values = np.concatenate([t, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2)),
                             bnbf.create_dynamic_map().numpy(), np.float32([-1, 1, 0, -0.0])]).astype(np.float32)
    blocks = [np.append(values[i:i + 255], np.float32(1)) for i in range(0, values.size, 255)]
    return np.concatenate(blocks)


def test_thresholds_are_the_staircase_of_bitsandbytes():
    values = staircase_probe()
    codes, _ = bnb_blockwise(values)
    assert mismatches(codes, absmax_quant.staircase_code(values)) == 0
    assert np.all(np.diff(absmax_quant.THRESHOLDS) >= 0)  # equal steps: codes the grid never reaches


def test_staircase_equals_grid_lookup():
    values = np.random.default_rng(0).uniform(-1, 1, 200_000).astype(np.float32)
    values = np.concatenate([values, absmax_quant.THRESHOLDS, np.float32([np.nan, np.inf, -np.inf])])
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
