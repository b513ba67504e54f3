"""Twin of ``rtl/rank_gradient.py``: a LoRA projection's gradient, made as an activation streams past.

The step's gradients are ``grad_B = s (dy^T hb)`` (B2) and ``grad_A = s (gb^T x)`` (B3)
(:func:`edge_qlora.golden.lora.step_model`), each the engine's product (:func:`edge_qlora.golden.gemm.gemm`) reduced
over the tokens, then multiplied by ``s`` in float32. B2 is a forward-mode product: each of dy's columns aligned per
chunk of 16 tokens on its own, each of hb's columns too. B3 is a transposed one: gb's columns aligned as hb's, and
each chunk of 16 of x's token rows on one exponent over *all* of x's columns, which a span of x's columns must be
given (:func:`x_chunk_fields`). Both give one ``r``-vector per feature of the activation: a row of grad_B, a
column of grad_A.
"""

import numpy as np

from ..constants import FP32, MAX_RANK
from .gemm import GemmNumerics, _bf16_values, gemm, row_chunk_exponents

__all__ = ["rank_gradient", "x_chunk_fields"]

_BF16_BIAS = 127


def x_chunk_fields(x, chunk=16):
    """B3: the biased exponent field each chunk of ``chunk`` token rows of x shares over all of x's columns
    (zeros and subnormals count as the smallest normal's field, 1)."""
    x = _bf16_values(x)
    if x.ndim != 2:
        raise ValueError(f"x must be [tokens, features], not shape {x.shape}")
    return [int(e) + _BF16_BIAS for e in row_chunk_exponents(x, chunk)]


def rank_gradient(activation, rows, scale, transposed=False, fields=None, chunk=16):
    """The gradient as it lies in memory, float32 numpy: grad_B ``[k, r]`` (row ``f`` feature ``f``'s ``r`` values)
    or, ``transposed``, grad_A ``[r, k]`` (a NaN is the canonical one, as the hardware gives it).

    Parameters
    ----------
    activation : bf16 tensor [t, k]
        dy (B2) or x (``transposed``, B3).
    rows : bf16 tensor [t, r]
        hb (B2) or gb (B3).
    scale : float
        ``s``, rounded to float32.
    transposed : bool
        B3: ``grad_A^T``; x's chunks aligned to ``fields``.
    fields : list of int, optional
        B3: :func:`x_chunk_fields` of the whole x (default: of ``activation``, when it is the whole x).
    """
    a, h = _bf16_values(activation), _bf16_values(rows)
    if a.ndim != 2 or h.ndim != 2 or a.shape[0] != h.shape[0]:
        raise ValueError(f"the activation {tuple(a.shape)} and the rows {tuple(h.shape)} do not share the tokens")
    if not 1 <= h.shape[1] <= MAX_RANK:
        raise ValueError(f"the rank must be 1 to {MAX_RANK}, not {h.shape[1]}")
    numerics = GemmNumerics(chunk=chunk, out_dtype="fp32")
    s = np.float32(scale)
    if transposed:
        fields = x_chunk_fields(activation, chunk) if fields is None else list(fields)
        exps = np.array(fields, np.int64) - _BF16_BIAS
        g = gemm(rows.T.contiguous(), activation, numerics, transposed=True, row_exponents=exps).numpy()
    else:
        g = gemm(activation.T.contiguous(), rows, numerics).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray((s * g.astype(np.float32)).astype(np.float32))
    # the hardware's NaN is the canonical one, whatever the NaN it came from (``golden/fp.py``)
    out[np.isnan(out)] = np.uint32(FP32.nan_bits).view(np.float32)
    return out
