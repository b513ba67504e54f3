"""The rank-r term unit (rtl/rank_term.py) against its twin (golden/rank_term.py), and the twin against the step."""

import math

import numpy as np
import pytest
import torch

from edge_qlora.golden import gemm as golden_gemm
from edge_qlora.golden import lora
from edge_qlora.golden import rank_term as golden
from edge_qlora.golden.nf4_dequant import dequantize
from edge_qlora.rtl.rank_term import RankTermConfig
from edge_qlora.sim.rank_term import TermBlock, run_rank_term
from edge_qlora.sim.streams import Stalls

STREAMS = ("block", "row_operands", "column_operands", "c", "o")


def _bf16(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16)


def _bits(tensor):
    return tensor.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF


def _rows(rng, tokens, rank):
    rows = rng.normal(0, 1, (tokens, rank)).astype(np.float32)
    rows[1] = 0                                        # a zero row: its exponent is -126
    rows[0, 0] = np.float32(torch.finfo(torch.bfloat16).tiny) / 8     # a subnormal beside normal values
    rows[-1, -1] *= 1000                               # an outlier that rounds its row's small values away
    return _bf16(rows)


def _base(rng, tokens, columns):
    base = rng.normal(0, 4, (tokens, columns)).astype(np.float32)
    base[0, :4] = [np.inf, -np.inf, np.nan, -0.0]
    base[-1, 0] = np.finfo(np.float32).max             # overflows with a positive term
    base[-1, 1] = 1e-40                                # a float32 subnormal
    return base


def _blocks(config, rng):
    """Three blocks: forward loading both tables; forward again with the rows kept (as a token block's next
    feature block); transposed, whose columns share the exponent of a whole A with an outlier elsewhere."""
    cols, rank = config.cols, config.rank
    tokens = 2 * config.rows
    hb, gb = _rows(rng, tokens, rank), _rows(rng, tokens, rank)
    width = _transposed_columns(config)                # A's rows arrive rank columns a beat
    a_whole = rng.normal(0, 0.5, (rank, width + 2 * cols)).astype(np.float32)
    a_whole[0, 0] = 300.0                              # outside the block: it sets the shared exponent
    a_whole = _bf16(a_whole)
    a_block = a_whole[:, cols:cols + width].T.contiguous()
    exponent = golden.column_exponent(a_whole)
    assert exponent > golden.column_exponent(a_block.T)
    return [
        TermBlock(_base(rng, tokens, 3 * cols), hb, _bf16(rng.normal(0, 0.1, (3 * cols, rank))), 2.0),
        TermBlock(_base(rng, tokens, 2 * cols), hb, _bf16(rng.normal(0, 0.1, (2 * cols, rank))), -0.375,
                  load_rows=False),
        TermBlock(_base(rng, tokens, width), gb, a_block, 1e30, transposed=True, exponent=exponent),
    ]


def _transposed_columns(config):
    return 2 * math.lcm(config.rank, config.cols)


@pytest.mark.parametrize("rows, cols, rank, parts", [(2, 2, 4, 1), (2, 4, 16, 1), (4, 2, 3, 1), (2, 4, 16, 4),
                                                     (4, 2, 4, 2)])
def test_rank_term_equals_its_twin(rows, cols, rank, parts):
    # three blocks (forward, forward keeping hb, transposed); adversarial operands and base outputs (infinities,
    # a NaN, an overflow, subnormals, a zero row); random stalls on all five streams; the rows' table whole or in
    # parts
    config = RankTermConfig(rows=rows, cols=cols, rank=rank, max_tokens=2 * rows,
                            max_columns=max(3 * cols, 2 * math.lcm(rank, cols)), rows_parts=parts)
    rng = np.random.default_rng(rows * 100 + cols * 10 + rank)
    stalls = {name: Stalls(0.35, 70 + k) for k, name in enumerate(STREAMS)}
    run = run_rank_term(config, _blocks(config, rng), stalls=stalls, backend="pysim")
    assert len(run.outputs) == len(run.want) and run.mismatches == 0


def test_twin_is_the_steps_arithmetic():
    # a block of y and a block of dx from the twin equal golden.lora.step_model's outputs there, bit for bit
    case = lora.random_case(8, 128, 64, 16, seed=3)
    out = lora.step_model(case)
    numerics = golden_gemm.GemmNumerics(chunk=16, out_dtype="fp32")
    w = dequantize(case.weight, "bf16")
    a, b = case.lora_A.to(torch.bfloat16), case.lora_B.to(torch.bfloat16)
    hb = golden_gemm.gemm(case.x, a.T, numerics).to(torch.bfloat16)
    gb = golden_gemm.gemm(case.dy, b, numerics, transposed=True).to(torch.bfloat16)
    yb = golden_gemm.gemm(case.x, w.T, numerics).numpy()
    dxb = golden_gemm.gemm(case.dy, w, numerics, transposed=True).numpy()
    y = golden.rank_term(yb[:, 16:48], hb, b[16:48], case.scaling)
    dx = golden.rank_term(dxb[:, 64:128], gb, a[:, 64:128].T, case.scaling, transposed=True,
                          exponent=golden.column_exponent(a))
    assert np.array_equal(y, _bits(out["y"][:, 16:48].contiguous()))
    assert np.array_equal(dx, _bits(out["dx"][:, 64:128].contiguous()))


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 17}, "rank must be an integer from 1 to 16"),
    ({"rows": 3}, "rows must be a power of two"),
    ({"max_columns": 12}, "max_columns must be a multiple of cols"),
    ({"max_tokens": 0}, "max_tokens must be a multiple of rows"),
    ({"rows_table_ram": "lut"}, "rows_table_ram must be 'distributed' or 'block'"),
    ({"rows_parts": 3}, "rows_parts must be a power of two dividing rank"),
    ({"rank": 4, "cols": 2, "rows_parts": 4}, "rows_parts must be a power of two dividing rank .4. and at most cols"),
])
def test_rank_term_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankTermConfig(**kwargs)
