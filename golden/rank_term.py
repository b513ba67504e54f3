"""Twin of ``rtl/rank_term.py``: a LoRA projection's rank-r term added to a block of the base product's outputs.

The step's outputs are ``y = bf16(yb + s * yl)`` with ``yl = hb B^T`` and ``dx = bf16(dxb + s * dxl)`` with
``dxl = gb A`` (:func:`edge_qlora.golden.lora.step_model`): the rank-r products are the engine's, one chunk of
``r <= 16`` reduction steps (:func:`edge_qlora.golden.gemm.gemm`), and each output then takes one float32
multiply, one float32 add and one rounding to bf16. In the blocked step the base product's outputs come a block
at a time (``tokens`` rows by ``columns`` outputs), so the term is computed per block, from the block's rows of
hb (or gb) and its columns of B (or A). Backward, A's rows share one exponent over *all* of A's columns (the
engine's transposed mode), which a block of columns must be given (:func:`column_exponent`).
"""

import numpy as np
import torch

from ..constants import BF16, FP32, MAX_RANK
from . import fp
from .gemm import GemmNumerics, _bf16_values, gemm, row_chunk_exponents

__all__ = ["column_exponent", "forward_rows", "backward_rows", "rank_term", "combine"]

def column_exponent(a):
    """Backward: the exponent A's ``r <= 16`` rows share over all of A's columns (``a``: [r, d_in] bf16)."""
    a = _bf16_values(a)
    if a.ndim != 2 or not 1 <= a.shape[0] <= MAX_RANK:
        raise ValueError(f"A must be [r, d_in] with 1 <= r <= {MAX_RANK}, not shape {a.shape}")
    return int(row_chunk_exponents(a, MAX_RANK)[0])


def forward_rows(case, chunk=16):
    """hb = bf16(x A^T) of a :class:`~edge_qlora.golden.lora.LoraCase`, as the step computes it (its F1)."""
    numerics = GemmNumerics(chunk=chunk, out_dtype="fp32")
    return gemm(case.x, case.lora_A.to(torch.bfloat16).T, numerics).to(torch.bfloat16)


def backward_rows(case, chunk=16):
    """gb = bf16(dy B) of a :class:`~edge_qlora.golden.lora.LoraCase`, as the step computes it (its B1)."""
    numerics = GemmNumerics(chunk=chunk, out_dtype="fp32")
    return gemm(case.dy, case.lora_B.to(torch.bfloat16), numerics, transposed=True).to(torch.bfloat16)


def _bits(values):
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)


def combine(base, term, scaling):
    """``bf16(base + s * term)`` bit for bit as the hardware rounds it; float32 ``base`` and ``term``, returns
    bf16 bit patterns (int64)."""
    s = np.full(np.shape(term), _bits(np.float32(scaling)))
    scaled = fp.mul(_bits(term), FP32, s, FP32, FP32)
    return fp.convert(fp.add(_bits(base), scaled, FP32), FP32, BF16)


def rank_term(base, rows, columns, scaling, transposed=False, exponent=None):
    """A block of outputs with the rank-r term: bf16 bit patterns, ``[tokens, n]``.

    Parameters
    ----------
    base : float32 array [tokens, n]
        The block's base product outputs (``yb`` or ``dxb``), as the engine's accumulator gives them.
    rows : bf16 array [tokens, r]
        The block's rows of hb (forward) or gb (backward).
    columns : bf16 array [n, r]
        Per output column its ``r`` operands: forward the block's rows of B, backward the block's columns of A
        (``A[:, j0:j1].T``).
    scaling : float
        The LoRA scaling ``s`` (float32).
    transposed : bool
        Backward: the columns share ``exponent``, A's over all its columns (:func:`column_exponent`).
    """
    rows, columns = _bf16_values(rows), _bf16_values(columns)
    if rows.shape[1] != columns.shape[1] or not 1 <= rows.shape[1] <= MAX_RANK:
        raise ValueError(f"rows {rows.shape} and columns {columns.shape} must share a rank of 1 to {MAX_RANK}")
    numerics = GemmNumerics(chunk=MAX_RANK, out_dtype="fp32")
    if transposed:
        if exponent is None:
            raise ValueError("the backward term needs the exponent of A's rows (column_exponent)")
        term = gemm(rows, columns.T, numerics, transposed=True, row_exponents=[exponent])
    else:
        term = gemm(rows, columns.T, numerics)
    return combine(np.asarray(base, np.float32), term.numpy(), scaling)
