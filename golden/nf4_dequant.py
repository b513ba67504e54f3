"""Bit-accurate model of bitsandbytes' ``dequantize_4bit(quant_type="nf4")`` on the CPU, twin of
``rtl/nf4_dequant.py``.

Per block, in float32: the absmax is either stored, or rebuilt from double quantization as
``fl(fl(code8[q] * absmax2) + offset)``; each weight is ``fl(NF4[code] * absmax)``, then rounded once to the output
dtype (round to nearest even). The model does not call bitsandbytes.

It follows bitsandbytes' portable kernel (``bitsandbytes.backends.default.ops._dequantize_4bit_compute``, the same on
every CPU), with subnormal results correctly rounded like torch's own casts. Where the native CPU kernel differs, the
native kernel is wrong, and the model does not copy it: on AVX-512 CPUs it reads the wrong absmax when a row is not a
whole number of blocks, and on AVX512-BF16 CPUs it flushes subnormal bf16 results to zero (docs/nf4.md,
tests/test_nf4_bnb_cpu.py).
"""

import numpy as np
import torch

from . import absmax_quant
from .nf4_quant import unpack_codes

__all__ = ["DTYPES", "block_scales", "dequantize"]

#: Output dtypes by name.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def block_scales(q):
    """float32 absmax of every block of an :class:`~.nf4_quant.NF4Quantized`, rebuilt if double-quantized."""
    if q.double_quant:
        return absmax_quant.dequantize(q.absmax, q.absmax2, q.offset, 1 if q.absmax2_per_block else
                                       absmax_quant.DYNAMIC_BLOCKSIZE)
    return np.asarray(q.absmax, dtype=np.float32)


def dequantize(q, dtype="bf16"):
    """Dequantize an :class:`~.nf4_quant.NF4Quantized` to a torch tensor of ``dtype`` and the original shape.

    Any code width and table (:mod:`.codebook`): the weight is ``fl(level[code] * absmax)``, NF4's arithmetic.

    Parameters
    ----------
    q : NF4Quantized
    dtype : str
        ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    n = int(np.prod(q.shape))
    codes = unpack_codes(q.packed, n, q.bits)
    scales = np.repeat(block_scales(q), q.blocksize)[:n]
    with np.errstate(over="ignore", invalid="ignore"):  # IEEE overflow to inf is part of the model
        weights = (q.levels[codes] * scales).astype(np.float32)
    return torch.from_numpy(weights).to(DTYPES[dtype]).reshape(q.shape)
