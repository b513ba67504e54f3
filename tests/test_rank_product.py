"""The rank-r rows unit (rtl/rank_product.py) against its twin (golden/rank_product.py), and the twin against the
step's hb and gb."""

import numpy as np
import pytest
import torch

from edge_qlora.golden import lora
from edge_qlora.golden import rank_term as term
from edge_qlora.golden.rank_product import rank_rows
from edge_qlora.rtl.rank_product import RankProductConfig
from edge_qlora.sim.rank_product import ProductBlock, run_rank_product
from edge_qlora.sim.streams import Stalls

STREAMS = ("spans", "operands", "values", "passed", "rows")


def _bf16(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16)


def _activation(rng, tokens, k):
    x = rng.normal(0, 1, (tokens, k)).astype(np.float32)
    x[:, 5] *= 50                                      # an outlier feature: its chunk's small values round away
    x[1] = 0                                           # a zero row
    x[0, 17] = np.float32(torch.finfo(torch.bfloat16).tiny) / 8      # a subnormal
    x[2] *= np.exp2(rng.integers(-40, 40, k)).astype(np.float32)     # a row over 80 binades
    if tokens > 3:
        x[3, :16] = 3e38                               # chunk sums that overflow float32: +inf
        x[3, 64:80] = -3e38                            # and a later -inf: NaN
    return _bf16(x)


def _operand(rng, rank, k, transposed):
    w = rng.normal(0, 0.05, (k, rank) if transposed else (rank, k)).astype(np.float32)
    if transposed:
        w[20, 0] = 40.0                                # one of B's rows sets its chunk's exponent for all columns
    else:
        w[0, 33] = 40.0                                # one of A's values sets its row's chunk exponent
    w.flat[7] = 0.0
    return _bf16(w)


def test_the_twin_is_the_steps_first_rank_products():
    case = lora.random_case(64, 48, 24, 4, seed=3)
    a, b = case.lora_A.to(torch.bfloat16), case.lora_B.to(torch.bfloat16)
    assert torch.equal(rank_rows(case.x, a).view(torch.int16), term.forward_rows(case).view(torch.int16))
    assert torch.equal(rank_rows(case.dy, b, transposed=True).view(torch.int16),
                       term.backward_rows(case).view(torch.int16))


@pytest.mark.parametrize("rank", [16, 3])
def test_unit_equals_twin_with_random_stalls(rank):
    rng = np.random.default_rng(rank)
    config = RankProductConfig(rank=rank, max_tokens=8)
    blocks = [
        ProductBlock(_activation(rng, 8, 192), _operand(rng, rank, 192, False), passes=(0, 2)),
        ProductBlock(_activation(rng, 4, 128), _operand(rng, rank, 128, True), transposed=True, passes=(1, 1)),
        ProductBlock(_activation(rng, 8, 64), _operand(rng, rank, 64, False)),
    ]
    stalls = {name: Stalls(0.3, seed=11 + i) for i, name in enumerate(STREAMS)}
    run = run_rank_product(config, blocks, stalls=stalls)
    assert run.passed_mismatches == 0
    assert run.mismatches == 0
    assert len(run.rows) == 20


def test_unit_keeps_pace_with_the_activation():
    """Without stalls a capture span's values pass one a cycle once its operands are in and aligned."""
    rng = np.random.default_rng(1)
    config = RankProductConfig(rank=16, max_tokens=16)
    run = run_rank_product(config, [ProductBlock(_activation(rng, 16, 128), _operand(rng, 16, 128, False))])
    assert run.mismatches == 0 and run.passed_mismatches == 0
    values, operands = 16 * 128, 2 * 64 * 16
    assert run.cycles < values + 2 * operands + 16 * 30 + 200      # the operands load, then align in place


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"), ({"rank": 17}, "rank"), ({"rank": True}, "rank"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankProductConfig(**kwargs)


def test_twin_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="reduction"):
        rank_rows(_bf16(np.zeros((2, 64))), _bf16(np.zeros((4, 32))))
    with pytest.raises(ValueError, match="rank"):
        rank_rows(_bf16(np.zeros((2, 64))), _bf16(np.zeros((17, 64))))


def test_a_row_of_negative_underflows_stays_minus_zero():
    """Every chunk of a token row underflows float32 to -0: the row is -0, as the engine's (its first chunk's
    partial is the sum's start, not +0 plus it)."""
    tiny = float(torch.finfo(torch.bfloat16).tiny)
    x = np.full((2, 64), -tiny, np.float32)
    x[1] = 1.0
    a = np.full((3, 64), tiny, np.float32)
    run = run_rank_product(RankProductConfig(rank=3, max_tokens=2), [ProductBlock(_bf16(x), _bf16(a))])
    assert run.mismatches == 0
    want = rank_rows(_bf16(x), _bf16(a)).view(torch.int16).numpy()
    assert (want[0] == np.int16(-0x8000)).all()
