"""Code-book formats of 2, 3 and 4 bits per weight: NF2, NF3, NF4 and tables the user gives, twin of the k-bit
dequantizer and quantizer in ``rtl/``.

The arithmetic is NF4's (:mod:`.nf4_quant`, :mod:`.nf4_dequant`) with another table: per block of ``blocksize``
weights the absmax, ``scaled = w * fl(1 / absmax)`` (a final partial block divides), the code is the number of
decision bounds strictly below ``scaled`` (the float32 midpoints of neighbouring levels, a tie to the lower code),
and a weight is ``fl(level[code] * absmax)`` rounded once to the output dtype; double quantization of the absmax is
bitsandbytes' for every width. NF4 with its own table is bitsandbytes' format exactly and is quantized by
:func:`.nf4_quant.quantize` itself.

Packed layout (:func:`pack_codes`, in :mod:`.nf4_quant` with the other packing helpers): the codes of a tensor in weight order as one big-endian bit string, the first
weight in the most significant bits of byte 0, ``ceil(n * bits / 8)`` bytes; the tail of the last byte repeats the
code of 0.0. For 4 bits that is bitsandbytes' layout (high nibble first, an odd count padded with code 7), for 2
bits four codes per byte. It is dense, so DRAM traffic is exactly ``bits`` per weight, and 8 codes always fill
whole bytes: every block (32 weights or more) starts on a byte boundary at byte ``block * blocksize * bits / 8``,
so a block can be fetched alone, and a 16-bit SDRAM beat carries 8 NF2 codes, 4 NF4 codes, or, for NF3, 16 codes
in every 3 beats, which is how the hardware's unpacker takes them (48 bits in, 16 codes out).
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..constants import CODE_BITS, NF_CODES, NF_OFFSET
from . import nf4_quant
from .nf4_dequant import dequantize as _dequantize
from .nf4_quant import NF4Quantized, pack_codes, packed_bytes, unpack_codes

__all__ = ["Codebook", "nf_levels", "quantize", "dequantize", "pack_codes", "unpack_codes", "packed_bytes",
           "stored_bytes", "Quantized"]

#: A quantized weight of any code width (the NF4 record carries ``bits`` and ``codebook``).
Quantized = NF4Quantized


def nf_levels(bits, offset=NF_OFFSET):
    """The NormalFloat table of ``bits`` bits, computed as LoftQ's ``create_normal_map`` (asymmetric) computes it:
    float32 quantiles, 2**(bits-1) positive levels, 2**(bits-1) - 1 negative ones and an exact zero, divided by the
    largest. Needs scipy; :data:`~edge_qlora.constants.NF_CODES` holds the results as constants."""
    from scipy.stats import norm

    half = 2 ** bits // 2
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy().astype(np.float64)).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy().astype(np.float64))).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return (values / values.max()).numpy()


@dataclass(frozen=True, eq=False)
class Codebook:
    """A table of ``2**bits`` float32 levels, strictly increasing.

    Parameters
    ----------
    levels : array of float32
        4, 8 or 16 finite values in increasing order (code 0 is the smallest).
    name : str, optional
        ``"nf2"``, ``"nf3"``, ``"nf4"`` when the levels are that NormalFloat table (found by itself when omitted),
        else ``"custom"``.
    """

    levels: np.ndarray
    name: str = None

    def __post_init__(self):
        levels = np.asarray(self.levels)
        if levels.ndim != 1 or levels.size not in [2 ** b for b in CODE_BITS]:
            raise ValueError(f"a code book has 4, 8 or 16 levels (2, 3 or 4 bits), not {levels.size}")
        if not np.issubdtype(levels.dtype, np.floating):
            raise ValueError(f"code-book levels must be floats, not {levels.dtype}")
        as32 = levels.astype(np.float32)
        if not np.isfinite(as32).all():
            raise ValueError("code-book levels must be finite float32 values")
        if not (np.diff(as32) > 0).all():
            raise ValueError("code-book levels must be strictly increasing (code 0 the smallest)")
        as32 = as32.copy()
        as32.setflags(write=False)
        object.__setattr__(self, "levels", as32)
        bits = as32.size.bit_length() - 1
        nf = np.array_equal(as32.view(np.uint32), NF_CODES[bits].view(np.uint32))
        name = f"nf{bits}" if nf else "custom"
        if self.name is not None and self.name != name:
            raise ValueError(f"levels are {'the NF table' if nf else 'not the NF table'} of {bits} bits; "
                             f"name {self.name!r} does not fit them")
        object.__setattr__(self, "name", name)

    @classmethod
    def nf(cls, bits):
        """The NormalFloat code book of ``bits`` bits (2, 3 or 4)."""
        if bits not in CODE_BITS:
            raise ValueError(f"bits must be one of {CODE_BITS}, not {bits!r}")
        return cls(NF_CODES[bits])

    @property
    def bits(self):
        return self.levels.size.bit_length() - 1

    @property
    def bounds(self):
        """The ``2**bits - 1`` decision bounds: float32 midpoints of neighbouring levels."""
        return ((self.levels[:-1] + self.levels[1:]) / np.float32(2)).astype(np.float32)

    @property
    def pad_code(self):
        """The code that pads the packed tail: the level 0.0 where the table has it (NF tables do), else 0."""
        zero = np.flatnonzero(self.levels == 0)
        return int(zero[0]) if zero.size else 0

    @property
    def quant_type(self):
        """Name in the file's quant state: ``nf2``, ``nf3``, ``nf4``, or ``cb2``/``cb3``/``cb4`` for a user table."""
        return self.name if self.name != "custom" else f"cb{self.bits}"

    def __eq__(self, other):
        return isinstance(other, Codebook) and np.array_equal(self.levels.view(np.uint32),
                                                              other.levels.view(np.uint32))

    def __hash__(self):
        return hash(self.levels.tobytes())

    def __repr__(self):
        return f"Codebook({self.name}, {self.bits} bits)"


def stored_bytes(n, bits, blocksize=64, double_quant=True):
    """Bytes a quantized weight of ``n`` values occupies in memory: packed codes, absmax (uint8 codes, one float32
    second-level absmax per 256 blocks and the float32 offset with double quantization; float32 per block without),
    and the table of ``2**bits`` float32 levels. bitsandbytes' 8-bit dynamic map (1 kB per tensor in a file) is a
    constant of the hardware and not counted."""
    blocks = -(-n // blocksize)
    if double_quant:
        scales = blocks + 4 * -(-blocks // 256) + 4
    else:
        scales = 4 * blocks
    return packed_bytes(n, bits) + scales + 4 * 2 ** bits


def quantize(weight, bits=4, codebook=None, blocksize=64, double_quant=True):
    """Quantize a weight with a code book of ``bits`` bits.

    Parameters
    ----------
    weight : torch.Tensor (fp32, fp16 or bf16) or numpy array (treated as fp32)
    bits : int
        2, 3 or 4; ignored when ``codebook`` is given (its size sets the width).
    codebook : Codebook, optional
        Defaults to the NormalFloat table of ``bits``. NF4 is bitsandbytes' ``quantize_4bit`` exactly.
    blocksize : int
        32, 64, ..., 4096.
    double_quant : bool

    Returns
    -------
    Quantized
    """
    if codebook is None:
        codebook = Codebook.nf(bits)
    if not isinstance(codebook, Codebook):
        raise TypeError(f"codebook must be a Codebook, not {codebook!r}")
    # NF4 is bitsandbytes' own path; the other tables take the same arithmetic with their bounds and width
    return nf4_quant.quantize(weight, blocksize, double_quant, table=None if codebook.name == "nf4" else codebook)


def dequantize(q, dtype="bf16"):
    """Dequantize a :class:`Quantized` weight of any code width (:func:`.nf4_dequant.dequantize`)."""
    return _dequantize(q, dtype)


def codes(q):
    """The code of every weight of ``q``, one uint8 each."""
    return unpack_codes(q.packed, int(np.prod(q.shape)), q.bits)
