"""Twin of ``rtl/rank_product.py``: a LoRA projection's rank-r rows, made as the activation streams past.

The step's first rank-r products are ``hb = bf16(x A^T)`` (F1) and ``gb = bf16(dy B)`` (B1)
(:func:`edge_qlora.golden.lora.step_model`). They are the engine's products (:func:`edge_qlora.golden.gemm.gemm`):
forward each of A's rows aligned per chunk of 16 reduction elements on its own, backward each chunk of 16 of B's
rows on one exponent over all of B's ``r`` columns; each chunk's exact sum rounded once to float32 and the chunks
added in reduction order in float32; the sum rounded to bf16. The unit computes the same sums a chunk at a time,
as the activation's rows pass it a span at a time on their way to the engine.
"""

import torch

from ..constants import MAX_RANK
from .gemm import GemmNumerics, _bf16_values, gemm

__all__ = ["rank_rows"]


def rank_rows(activation, operand, transposed=False, chunk=16):
    """The rows of hb or gb, a bf16 tensor ``[t, r]``.

    Parameters
    ----------
    activation : bf16 tensor [t, k]
        x (forward) or dy (transposed).
    operand : bf16 tensor
        Forward A ``[r, k]``; transposed B ``[k, r]``.
    transposed : bool
        B1: one exponent per chunk of B's rows over all its columns (the engine's transposed mode).
    """
    a, w = _bf16_values(activation), _bf16_values(operand)
    rank = w.shape[1] if transposed else w.shape[0]
    if a.ndim != 2 or w.ndim != 2 or (w.shape[0] if transposed else w.shape[1]) != a.shape[1]:
        raise ValueError(f"the activation {tuple(a.shape)} and the operand {tuple(w.shape)} do not share a "
                         f"reduction")
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"the rank must be 1 to {MAX_RANK}, not {rank}")
    numerics = GemmNumerics(chunk=chunk, out_dtype="fp32")
    out = gemm(activation, operand, numerics, transposed=True) if transposed else gemm(activation, operand.T, numerics)
    return out.to(torch.bfloat16)
