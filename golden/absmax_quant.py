"""Bit-accurate model of double quantization of NF4 absmax values, twin of ``rtl/absmax_quant.py``.

bitsandbytes 0.50 quantizes ``d = absmax - offset`` with its signed 8-bit dynamic map in blocks of 256
(``quantize_blockwise``; CPU kernel ``quantize_cpu``). Per block, in float32:

- ``absmax2 = max|d|``; a block with ``absmax2 == 0`` gets code 0 throughout;
- ``normed = d * fl(1 / absmax2)`` (a reciprocal, then a product);
- ``index = trunc(fl(fl(clamp(normed, -1, 1) + 1) * 0.5 * 65535) + 0.5)``, a 16-bit position on a uniform grid
  of [-1, 1];
- the code is a 65536-entry table: grid point ``i`` (value ``-1 + 2i / 65535``) maps to the number of code-book
  midpoints strictly below it.

That is not the nearest level: near zero, where levels are closer than the grid, several codes are unreachable.
The composition is monotone in ``normed``, so it is a staircase with 255 float32 steps (:data:`~edge_qlora.constants.ABSMAX_THRESHOLDS`), which
is what the hardware implements. Dequantization is ``code[q] * absmax2 + offset`` in float32.
"""

import numpy as np

from ..constants import ABSMAX_THRESHOLDS, DYNAMIC_BLOCKSIZE, DYNAMIC_CODE

__all__ = ["quantize", "dequantize", "grid_index", "GRID_CODE", "derive_thresholds", "staircase_code"]

_F = np.float32
GRID_POINTS = 65536


def _grid_code():
    levels = DYNAMIC_CODE
    midpoints = (_F(0.5) * (levels[:-1] + levels[1:])).astype(_F)
    i = np.arange(GRID_POINTS, dtype=_F)
    grid = (_F(-1) + ((_F(2) * i).astype(_F) / _F(GRID_POINTS - 1)).astype(_F)).astype(_F)
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


#: Code of each of the 65536 grid points.
GRID_CODE = _grid_code()


def grid_index(normed):
    """Grid position of float32 ``normed`` values, rounding as bitsandbytes does in float32.

    A NaN (``0 * inf`` when ``absmax2`` is so small that its reciprocal overflows) lands on position 0, as the x86
    float-to-integer conversion of NaN does in bitsandbytes.
    """
    v = np.clip(np.asarray(normed, dtype=_F), _F(-1), _F(1))
    nan = np.isnan(v)
    v = np.where(nan, _F(-1), v)
    t = ((v + _F(1)).astype(_F) * _F(0.5)).astype(_F)
    u = ((t * _F(GRID_POINTS - 1)).astype(_F) + _F(0.5)).astype(_F)
    return np.trunc(u).astype(np.int64)


def derive_thresholds():
    """The staircase of :func:`grid_index` and :data:`GRID_CODE`: for each code k + 1, the smallest float32 at which
    the code first reaches it, by bisection over ordered float32 bit patterns. The hardware and :func:`staircase_code`
    use the same table as a constant (:data:`edge_qlora.constants.ABSMAX_THRESHOLDS`); the tests check the two equal."""
    def key_to_float(key):
        key = np.asarray(key, dtype=np.int64)
        return np.where(key >= 0, key, (-key) | 0x80000000).astype(np.uint32).view(_F)

    lo = np.full(255, -0x3F800000, dtype=np.int64)  # key of -1.0: code 0
    hi = np.full(255, 0x3F800000, dtype=np.int64)   # key of +1.0: code 255
    target = np.arange(1, 256)
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        above = GRID_CODE[grid_index(key_to_float(mid))] >= target
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return key_to_float(hi)


def staircase_code(normed):
    """Code of float32 ``normed`` values from :data:`~edge_qlora.constants.ABSMAX_THRESHOLDS`: the number of thresholds ``<= normed``, so NaN
    gets 0 and +-inf the end codes, as the grid lookup does."""
    normed = np.asarray(normed, dtype=_F)
    codes = np.searchsorted(ABSMAX_THRESHOLDS, normed, side="right")
    return np.where(np.isnan(normed), 0, codes).astype(np.uint8)


def quantize(absmax, offset):
    """Double-quantize float32 ``absmax`` around ``offset``.

    Returns
    -------
    codes : ndarray of uint8, one per absmax value
    absmax2 : ndarray of float32, one per block of 256 codes
    """
    d = (np.asarray(absmax, dtype=_F) - _F(offset)).astype(_F)
    n = d.size
    blocks = -(-n // DYNAMIC_BLOCKSIZE)
    padded = np.zeros(blocks * DYNAMIC_BLOCKSIZE, _F)
    padded[:n] = np.abs(d)
    absmax2 = padded.reshape(blocks, DYNAMIC_BLOCKSIZE).max(axis=1).astype(_F)
    scale = np.repeat(absmax2, DYNAMIC_BLOCKSIZE)[:n]
    # bitsandbytes skips the division for an all-zero block and writes code 0
    live = scale != 0
    with np.errstate(over="ignore", invalid="ignore"):
        reciprocal = (_F(1) / np.where(live, scale, _F(1))).astype(_F)
        normed = (d * reciprocal).astype(_F)
    codes = GRID_CODE[grid_index(normed)]
    return np.where(live, codes, np.uint8(0)).astype(np.uint8), absmax2


def dequantize(codes, absmax2, offset, group=DYNAMIC_BLOCKSIZE):
    """float32 absmax from double-quantized codes: ``code[q] * absmax2 + offset``, each step rounded to float32;
    one ``absmax2`` per ``group`` codes (1: each code its own, as in a span of a larger tensor)."""
    codes = np.asarray(codes, dtype=np.uint8)
    scale = np.repeat(np.asarray(absmax2, dtype=_F), group)[: codes.size]
    with np.errstate(over="ignore", invalid="ignore"):  # IEEE overflow to inf is part of the model
        return ((DYNAMIC_CODE[codes] * scale).astype(_F) + _F(offset)).astype(_F)
