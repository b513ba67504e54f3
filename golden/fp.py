"""Bit-accurate numpy twin of ``rtl/fp.py``: IEEE-754 formats, rounding, and the arithmetic of the FP units.

Floats travel as their bit patterns (``uint16`` for bf16/fp16, ``uint32`` for fp32). Every result is rounded once,
to nearest with ties to even, with gradual underflow, overflow to infinity and signed zeros; every NaN result is the
format's canonical quiet NaN (sign 0, exponent all ones, top fraction bit set), which is what the hardware outputs.

Every supported format is a subset of fp32 (at most 8 exponent and 23 fraction bits), so its values are exactly
float32 values, and a product of two of them is exact in float64. Sums and quotients computed in float64 and then
rounded to a format of at most 24 significant bits are correctly rounded too: float64 has more than
``2 * 24 + 2`` bits, which makes the double rounding innocuous (Figueroa, "When is double rounding innocuous?",
1995). That is why the golden ops are a few lines of float64 arithmetic followed by one explicit rounding.
"""

import numpy as np

from ..constants import FloatFormat

__all__ = [
    "to_bits", "from_bits", "round_to", "is_nan",
    "mul", "add", "div", "sqrt", "convert", "fixed_to_float",
]


def _check_format(fmt):
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"format must be a FloatFormat, not {fmt!r}")


def from_bits(bits, fmt):
    """The exact float32 values of bit patterns of ``fmt`` (NaN patterns give NaN).

    Parameters
    ----------
    bits : array_like of int
        Bit patterns, one per value.
    fmt : FloatFormat
    """
    _check_format(fmt)
    bits = np.asarray(bits).astype(np.int64) & ((1 << fmt.width) - 1)
    sign = np.where(bits >> (fmt.width - 1) != 0, -1.0, 1.0)
    field = (bits >> fmt.frac_bits) & fmt.exp_max
    fraction = bits & ((1 << fmt.frac_bits) - 1)
    # a subnormal is 0.fraction * 2 ** (1 - bias): the same formula as a normal value without the hidden bit
    significand = np.where(field == 0, fraction, fraction | (1 << fmt.frac_bits)).astype(np.float64)
    magnitude = np.ldexp(significand, np.maximum(field, 1) - fmt.bias - fmt.frac_bits)
    magnitude = np.where(field == fmt.exp_max, np.where(fraction == 0, np.inf, np.nan), magnitude)
    return (sign * magnitude).astype(np.float32)


def to_bits(values, fmt):
    """Round float values to ``fmt``, to nearest with ties to even, and return their bit patterns.

    Subnormal results are rounded correctly (gradual underflow), values beyond the largest finite one round to
    infinity, the sign of a zero or of a result that underflows to zero is kept, and a NaN becomes the canonical NaN.

    Parameters
    ----------
    values : array_like of float
        float32 or float64 values; each is rounded once, from its exact value.
    fmt : FloatFormat
    """
    _check_format(fmt)
    with np.errstate(invalid="ignore"):                 # converting a signalling NaN raises the invalid flag
        values = np.asarray(values, dtype=np.float64)
    raw = np.ascontiguousarray(values).view(np.uint64).reshape(values.shape)
    sign = (raw >> np.uint64(63)).astype(np.int64)
    field = ((raw >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    fraction = (raw & np.uint64((1 << 52) - 1)).astype(np.int64)
    # float64 subnormals lie far below half the smallest subnormal of any supported format: they round to zero
    significand = np.where(field == 0, 0, fraction | (1 << 52))
    exponent = field - 1023 + fmt.bias                  # biased in fmt, as if the result were normal
    # drop the bits below fmt's last place: 52 - frac_bits for a normal result, more for a subnormal one; past 54
    # dropped bits every significand is below half a unit, so the clamp changes nothing
    dropped = np.minimum(52 - fmt.frac_bits + np.maximum(1 - exponent, 0), 54)
    kept = significand >> dropped
    rest = significand & ((1 << dropped) - 1)
    half = 1 << (dropped - 1)
    kept += (rest > half) | ((rest == half) & ((kept & 1) == 1))
    # the hidden bit of ``kept`` lands on the exponent field, so a carry out of the fraction moves to the next binade
    magnitude = ((np.maximum(exponent, 1) - 1) << fmt.frac_bits) + kept
    magnitude = np.where((magnitude >= fmt.inf_bits) | (field == 0x7FF), fmt.inf_bits, magnitude)
    bits = (sign << (fmt.width - 1)) | magnitude
    bits = np.where((field == 0x7FF) & (fraction != 0), fmt.nan_bits, bits)
    return bits.astype(fmt.dtype)


def round_to(values, fmt):
    """Round float values to ``fmt`` (as :func:`to_bits`) and return the results as float32 values."""
    return from_bits(to_bits(values, fmt), fmt)


def is_nan(bits, fmt):
    """Whether each bit pattern of ``fmt`` is a NaN."""
    _check_format(fmt)
    bits = np.asarray(bits).astype(np.int64) & ((1 << (fmt.width - 1)) - 1)
    return bits > fmt.inf_bits


def _exact(bits, fmt):
    return from_bits(bits, fmt).astype(np.float64)


def mul(a_bits, fmt_a, b_bits, fmt_b, fmt_out):
    """Twin of ``FPMul``: ``a * b`` rounded once to ``fmt_out``. Returns bit patterns of ``fmt_out``."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        exact = _exact(a_bits, fmt_a) * _exact(b_bits, fmt_b)      # at most 24 x 24 significant bits: exact
    return to_bits(exact, fmt_out)


def add(a_bits, b_bits, fmt, sub=False):
    """Twin of ``FPAdd``: ``a + b``, or ``a - b`` where ``sub`` is set, rounded to ``fmt``.

    Parameters
    ----------
    a_bits, b_bits : array_like of int
        Bit patterns of ``fmt``.
    fmt : FloatFormat
    sub : bool or array_like of bool
        Per element: subtract instead of add.
    """
    b = np.where(np.asarray(sub, dtype=bool), -_exact(b_bits, fmt), _exact(b_bits, fmt))
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        return to_bits(_exact(a_bits, fmt) + b, fmt)


def div(a_bits, b_bits, fmt):
    """Twin of ``FPDiv``: ``a / b`` rounded to ``fmt``; ``x / 0`` is a signed infinity and ``0 / 0`` a NaN."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        return to_bits(_exact(a_bits, fmt) / _exact(b_bits, fmt), fmt)


def convert(bits, fmt_in, fmt_out):
    """Twin of ``FPConvert``: exact widening or round-to-nearest-even narrowing from ``fmt_in`` to ``fmt_out``."""
    return to_bits(_exact(bits, fmt_in), fmt_out)


def fixed_to_float(values, exponents, fmt):
    """Twin of ``FixedToFloat``: ``values * 2 ** exponents`` rounded once to ``fmt``; a zero value gives ``+0``.

    ``ldexp`` in float64 is exact for ``|value| < 2 ** 53`` as long as the result is a normal float64; below that
    it is far below half the smallest subnormal of any supported format, and :func:`to_bits` rounds it to zero, as
    it should; above it, it is infinite, as the rounded result is.

    Parameters
    ----------
    values : array_like of int
        Integers with ``|value| < 2 ** 53``.
    exponents : array_like of int
        Powers of two, broadcast against ``values``.
    fmt : FloatFormat
    """
    _check_format(fmt)
    values = np.asarray(values, dtype=np.int64)
    if values.size and np.abs(values).max() >= 1 << 53:
        raise ValueError("values must be below 2 ** 53 in magnitude, where float64 holds them exactly")
    with np.errstate(over="ignore", under="ignore"):
        exact = np.ldexp(values.astype(np.float64), np.asarray(exponents, dtype=np.int64))
    return to_bits(exact, fmt)


def sqrt(bits, fmt):
    """Twin of ``FPSqrt``: the square root rounded to ``fmt``; ``sqrt(-0) = -0``, any other negative gives NaN.

    The float64 root of a value of at most 24 significant bits is correctly rounded, and float64 has more than
    ``2 * 24 + 2`` bits, so rounding it once more to ``fmt`` is innocuous (Figueroa, 1995), as for the quotient.
    """
    with np.errstate(invalid="ignore"):
        return to_bits(np.sqrt(_exact(bits, fmt)), fmt)
