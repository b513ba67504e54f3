"""Bit-accurate model of the GEMM engine's arithmetic (twin of ``rtl/gemm.py`` and ``rtl/pe_array.py``).

The engine computes ``C = A @ B`` with A ``[M, Q]`` bf16 activations and B ``[Q, P]`` bf16 weights (dequantized
NF4 or given in bf16). Forward: ``y = x @ W.T`` (A = x, B = W.T, Q = K). Backward: ``dx = dy @ W`` (A = dy, B = W,
Q = N). The arithmetic is block floating point over *chunks* of the reduction dimension:

1. **Alignment.** Along the reduction dimension, every ``chunk`` consecutive elements of a row of A (and of a column
   of B) share one exponent ``E``: the largest exponent among them (bf16 subnormals count as exponent -126). Each
   element becomes an 18-bit signed integer ``q = rne(v * 2**(16 - E))``; elements within 9 binades of the largest
   are exact, smaller ones are rounded to nearest, ties to even. 18 bits because that is an ECP5 DSP operand.
2. **Chunk products.** Each processing element sums the exact products ``qa * qb`` of one chunk in a 44-bit
   integer: exact, no rounding (|q| <= 2**17 - 1, chunk <= 512).
3. **Chunk partials to float32.** The chunk sum ``S`` is worth ``S * 2**(Ea + Eb - 32)``; it is rounded once to
   float32 (round to nearest even, gradual underflow).
4. **Accumulation.** The partials of successive chunks are added in float32, in chunk order: ``acc = p0``, then
   ``acc = fl32(acc + p_c)``.
5. **Output.** ``acc`` is rounded to bf16 (round to nearest even), or given as float32.

Float adders are expensive in FPGA fabric, DSPs are cheap: this keeps every multiply-accumulate in a DSP and an
integer adder, and spends one float32 adder per array column on ``rows`` partials every ``chunk`` cycles.
"""

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GemmNumerics", "align", "chunk_partials", "gemm", "reference_fp64", "bnb_style", "rel_frobenius"]

OPERAND_BITS = 18          # signed fixed-point operand width (one ECP5 MULT18X18D per MAC)
OPERAND_FRAC = OPERAND_BITS - 2   # the chunk's largest element lands in [2**16, 2**17)
ACC_BITS = 44              # chunk sums: 2 * 17 magnitude bits + log2(512) + sign
EXP_MIN = -126             # bf16 subnormals share the exponent of the smallest normal


@dataclass(frozen=True)
class GemmNumerics:
    """Parameters of the arithmetic.

    Parameters
    ----------
    chunk : int
        Elements of the reduction dimension that share one alignment exponent and one integer chunk sum, 8 to 512.
    out_dtype : str
        ``"bf16"`` or ``"fp32"``.
    """

    chunk: int = 64
    out_dtype: str = "bf16"

    def __post_init__(self):
        if not isinstance(self.chunk, int) or not 8 <= self.chunk <= 512:
            raise ValueError(f"chunk must be an integer from 8 to 512, not {self.chunk!r}")
        if self.out_dtype not in ("bf16", "fp32"):
            raise ValueError(f"out_dtype must be 'bf16' or 'fp32', not {self.out_dtype!r}")


def _bf16_values(t):
    """float32 numpy array holding exactly the values of a bf16 tensor/array."""
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.bfloat16:
            raise ValueError(f"operands must be bfloat16, not {t.dtype}")
        return t.float().numpy()
    return np.asarray(t, dtype=np.float32)


def exponents(values):
    """Unbiased exponent of each float32 value holding a bf16 (subnormals and zeros: -126)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    biased = ((bits >> 23) & 0xFF).astype(np.int64)
    return np.maximum(biased - 127, EXP_MIN)


def align(values, chunk, axis):
    """Block-floating-point alignment along ``axis`` in groups of ``chunk``.

    Returns
    -------
    q : int64 array, same shape
        18-bit signed fixed-point operands.
    e : int64 array
        Shared exponent per group: shape of ``values`` with ``axis`` replaced by the number of groups.
    """
    values = np.moveaxis(np.asarray(values, dtype=np.float32), axis, -1)
    length = values.shape[-1]
    groups = -(-length // chunk)
    padded = np.zeros(values.shape[:-1] + (groups * chunk,), np.float32)
    padded[..., :length] = values
    grouped = padded.reshape(values.shape[:-1] + (groups, chunk))
    shared = exponents(grouped).max(axis=-1)                       # [..., groups]
    scale = np.ldexp(1.0, (OPERAND_FRAC - shared))[..., None]      # exact powers of two (float64)
    q = np.rint(grouped.astype(np.float64) * scale).astype(np.int64)  # rint: round half to even
    q = q.reshape(values.shape[:-1] + (groups * chunk,))[..., :length]
    return np.moveaxis(q, -1, axis), np.moveaxis(shared, -1, axis) if shared.ndim > 1 else shared


def chunk_partials(a, b, chunk):
    """Exact chunk sums and their exponents.

    Parameters
    ----------
    a : array [M, Q] of bf16 values
    b : array [Q, P] of bf16 values

    Returns
    -------
    sums : int64 array [groups, M, P]
    exps : int64 array [groups, M, P]   (the partial is ``sums * 2**(exps - 32)``)
    """
    qa, ea = align(a, chunk, axis=1)      # ea [M, groups]
    qb, eb = align(b, chunk, axis=0)      # eb [groups, P]
    q = qa.shape[1]
    groups = -(-q // chunk)
    sums = np.empty((groups, qa.shape[0], qb.shape[1]), np.int64)
    for g in range(groups):
        sl = slice(g * chunk, min(q, (g + 1) * chunk))
        sums[g] = qa[:, sl] @ qb[sl, :]   # |sum| < 2**43: exact in int64
    exps = ea.T[:, :, None] + eb[:, None, :]
    return sums, exps


def partial_to_fp32(sums, exps):
    """``fl32(S * 2**(E - 32))``: exact in float64 (|S| < 2**53), then one rounding to float32."""
    with np.errstate(over="ignore"):
        return np.ldexp(sums.astype(np.float64), exps - 2 * OPERAND_FRAC).astype(np.float32)


def gemm(a, b, numerics=GemmNumerics()):
    """The engine's ``a @ b`` for bf16 ``a`` [M, Q] and ``b`` [Q, P]; returns a torch tensor (bf16 or fp32)."""
    a, b = _bf16_values(a), _bf16_values(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {a.shape} and {b.shape} cannot be multiplied")
    sums, exps = chunk_partials(a, b, numerics.chunk)
    partials = partial_to_fp32(sums, exps)
    acc = partials[0]
    with np.errstate(over="ignore", invalid="ignore"):
        for p in partials[1:]:
            acc = (acc + p).astype(np.float32)
    out = torch.from_numpy(np.ascontiguousarray(acc))
    return out.to(torch.bfloat16) if numerics.out_dtype == "bf16" else out


def reference_fp64(a, b):
    """Exact-operand float64 product, the accuracy reference."""
    return _bf16_values(a).astype(np.float64) @ _bf16_values(b).astype(np.float64)


def bnb_style(a, b):
    """What bitsandbytes does in software: bf16 operands, a bf16 torch matmul (float32 accumulation inside)."""
    return torch.from_numpy(_bf16_values(a)).to(torch.bfloat16) @ torch.from_numpy(_bf16_values(b)).to(torch.bfloat16)


def rel_frobenius(result, reference):
    """``||result - reference||_F / ||reference||_F`` in float64."""
    result = result.double().numpy() if isinstance(result, torch.Tensor) else np.asarray(result, np.float64)
    diff = np.linalg.norm(result - reference)
    norm = np.linalg.norm(reference)
    return float(diff / norm) if norm else float(diff)
