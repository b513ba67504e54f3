"""The gradient unit (rtl/rank_gradient.py) against its twin (golden/rank_gradient.py), and the twin against the
step's grad_B and grad_A."""

import numpy as np
import pytest
import torch

from edge_qlora.golden import lora
from edge_qlora.golden import rank_term as term
from edge_qlora.golden.rank_gradient import rank_gradient, x_chunk_fields
from edge_qlora.rtl.rank_gradient import RankGradientConfig
from edge_qlora.sim.rank_gradient import GradientBlock, run_rank_gradient
from edge_qlora.sim.rank_product import ProductBlock
from edge_qlora.sim.streams import Stalls

STREAMS = ("spans", "rows", "fields", "operands", "values", "passed", "grads", "rows_out", "x_fields_out")


def _bf16(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16)


def _activation(rng, tokens, k):
    a = rng.normal(0, 1, (tokens, k)).astype(np.float32)
    a[:, 5] *= 50                                      # an outlier feature (B3: it sets x's chunk exponents)
    a[:, 9] = 0                                        # a zero feature
    a[1] = 0                                           # a zero token row
    a[0, 17] = np.float32(torch.finfo(torch.bfloat16).tiny) / 8      # a subnormal
    a[:, 40] *= np.exp2(rng.integers(-40, 40, tokens)).astype(np.float32)   # a feature over 80 binades
    if k > 64:
        a[:, 70] = 3e38                                # chunk sums that overflow float32: +inf
        a[:, 71] = 3e38
        a[tokens // 2:, 71] = -3e38                    # and -inf in a later chunk of the same feature: NaN
    return _bf16(a)


def _rows(rng, tokens, rank):
    h = rng.normal(0, 0.5, (tokens, rank)).astype(np.float32)
    h[2, 0] = 60.0                                     # one row value sets its column's chunk exponent
    h[:, -1] = np.abs(h[:, -1])                        # a column of one sign: the overflows stay infinities
    h[3] = 0
    return _bf16(h)


def test_the_twin_is_the_steps_gradients():
    case = lora.random_case(40, 128, 64, 4, seed=5)
    step = lora.step_model(case)
    hb, gb = term.forward_rows(case), term.backward_rows(case)
    grad_b = rank_gradient(case.dy, hb, case.scaling)
    grad_a = rank_gradient(case.x, gb, case.scaling, transposed=True)
    assert np.array_equal(grad_b.view(np.uint32), step["grad_B"].numpy().view(np.uint32))
    assert np.array_equal(grad_a.view(np.uint32), step["grad_A"].numpy().view(np.uint32))
    # a span of x's columns with the whole x's chunk fields gives the whole gradient's columns
    piece = rank_gradient(case.x[:, 64:], gb, case.scaling, transposed=True, fields=x_chunk_fields(case.x))
    assert np.array_equal(piece.view(np.uint32), grad_a[:, 64:].view(np.uint32))


@pytest.mark.parametrize("rank", [16, 3])
def test_unit_equals_twin_with_random_stalls(rank):
    rng = np.random.default_rng(rank)
    config = RankGradientConfig(rank=rank, max_tokens=40)
    x = _activation(rng, 40, 192)
    blocks = [
        GradientBlock(_activation(rng, 40, 128), _rows(rng, 40, rank), scale=0.25, passes=(1, 1)),
        # x's chunk fields over more columns than the unit sees: the outliers are in the columns it does not
        # (its values end in the unit, as in grad_A's pass over x)
        GradientBlock(x[:, 64:], _rows(rng, 40, rank), scale=3.0, transposed=True, fields=tuple(x_chunk_fields(x)),
                      passes=(0, 2), sink=True),
        GradientBlock(_activation(rng, 7, 64), _rows(rng, 7, rank), scale=-1.5),      # one short chunk
    ]
    stalls = {name: Stalls(0.3, seed=21 + i) for i, name in enumerate(STREAMS)}
    run = run_rank_gradient(config, blocks, stalls=stalls)
    assert run.passed_mismatches == 0
    assert run.mismatches == 0
    assert len(run.grads) == (64 * 2 + 64 * 2 + 64) * rank


@pytest.mark.parametrize("rank", [16, 3])
def test_unit_makes_the_rows_between_gradients_with_random_stalls(rank):
    """Products (hb from A, gb from B: RankProduct's twin) and gradients through the one unit, as the blocked
    backward product uses it (gb in the first column block, grad_B in the second), with short chunks, spans it
    only passes, and random stalls on all nine streams; forward, x's chunk fields over all its columns too."""
    rng = np.random.default_rng(10 + rank)
    config = RankGradientConfig(rank=rank, max_tokens=40)
    a = rng.normal(0, 0.2, (rank, 192)).astype(np.float32)
    a[0, 3] = 40.0                                     # one of A's values sets its row's chunk exponent
    b = rng.normal(0, 0.2, (128, rank)).astype(np.float32)
    b[17] *= 1e-30                                     # a row of B far below the others of its chunk
    dy = _activation(rng, 40, 128)
    blocks = [
        ProductBlock(_activation(rng, 40, 192), _bf16(a), passes=(0, 1)),
        ProductBlock(dy, _bf16(b), transposed=True, passes=(0, 0)),
        GradientBlock(dy, _rows(rng, 40, rank), scale=0.5, passes=(1, 0)),
        ProductBlock(_activation(rng, 18, 64), _bf16(b[:64]), transposed=True, passes=(2, 0)),
        GradientBlock(_activation(rng, 7, 64), _rows(rng, 7, rank), scale=-1.5),
    ]
    stalls = {name: Stalls(0.3, seed=41 + i) for i, name in enumerate(STREAMS)}
    run = run_rank_gradient(config, blocks, stalls=stalls)
    assert run.passed_mismatches == 0
    assert run.mismatches == 0 and run.row_mismatches == 0 and run.field_mismatches == 0
    assert len(run.grads) == (64 * 2 + 64) * rank and len(run.rows) == 40 + 40 + 18
    assert len(run.fields) == 3                        # forward x's: the outlier feature sets them


def test_unit_keeps_pace_with_the_activation():
    """Without stalls a chunk replays in 1,024 cycles while the next fills, and a span's gradient leaves in 1,024
    more, while the next span's first chunk fills: per span its chunks' replays and the gradient."""
    rng = np.random.default_rng(1)
    config = RankGradientConfig(rank=16, max_tokens=32)
    run = run_rank_gradient(config, [GradientBlock(_activation(rng, 32, 256), _rows(rng, 32, 16))])
    assert run.mismatches == 0 and run.passed_mismatches == 0
    spans, chunks = 4, 2
    assert run.cycles < (spans * (chunks + 1) + 1) * 1024 + 32 * 16 + 1500


def test_unit_makes_the_rows_at_a_span_a_span():
    """Without stalls a product span takes its operands' load and alignment, its values one a cycle, and the
    replay of its last half (the next span's operands wait for it); then the rows leave a token row per
    ``rank + 1`` cycles or so."""
    rng = np.random.default_rng(2)
    config = RankGradientConfig(rank=16, max_tokens=32)
    a = _bf16(rng.normal(0, 0.2, (16, 256)))
    run = run_rank_gradient(config, [ProductBlock(_activation(rng, 32, 256), a)])
    assert run.row_mismatches == 0 and run.passed_mismatches == 0 and run.field_mismatches == 0
    spans, operands = 4, 2 * 64 * 16
    assert run.cycles < spans * (operands + 32 * 64 + 1024) + 32 * 20 + 600


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"), ({"rank": 17}, "rank"), ({"rank": True}, "rank"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": 5000}, "max_tokens"),
    ({"table_ram": "lut"}, "table_ram"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankGradientConfig(**kwargs)


def test_twin_and_driver_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="tokens"):
        rank_gradient(_bf16(np.zeros((4, 64))), _bf16(np.zeros((3, 4))), 1.0)
    with pytest.raises(ValueError, match="rank"):
        rank_gradient(_bf16(np.zeros((4, 64))), _bf16(np.zeros((4, 17))), 1.0)
    with pytest.raises(ValueError, match="multiple of 64"):
        run_rank_gradient(RankGradientConfig(rank=2, max_tokens=8),
                          [GradientBlock(_bf16(np.zeros((4, 48))), _bf16(np.zeros((4, 2))))])
