"""Bit-accurate model of bitsandbytes' ``quantize_4bit(quant_type="nf4")`` on the CPU, twin of ``rtl/nf4_quant.py``.

The model follows bitsandbytes 0.50's CPU path operation by operation in float32, without calling bitsandbytes:

- full blocks: ``absmax = max|w|``; ``scaled = w * fl(1 / max(absmax, 1e-38))``; code = number of NF4 bounds strictly
  below ``scaled`` (a tie goes to the lower code);
- a final partial block divides instead: ``scaled = w / am`` with ``am = max(max|w|, 1e-38)``, and stores ``am``
  (clamped) as its absmax, while full blocks store the unclamped absmax;
- codes are packed two per byte, the first weight in the high nibble; an odd count pads with the code of 0.0 (7);
- double quantization: ``offset = mean(absmax)``; ``absmax - offset`` is quantized by :mod:`.absmax_quant`.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..constants import ABSMAX_FLOOR, BLOCKSIZES, NF4_BOUNDS, NF_CODES
from . import absmax_quant

__all__ = ["NF4Quantized", "ABSMAX_FLOOR", "quantize", "block_absmax", "encode", "pack_nibbles", "unpack_nibbles",
           "pack_codes", "unpack_codes", "packed_bytes"]

@dataclass
class NF4Quantized:
    """What ``quantize_4bit`` returns, as numpy arrays.

    Attributes
    ----------
    packed : ndarray of uint8, shape ``((n + 1) // 2,)``
        NF4 codes, two per byte, first weight in the high nibble.
    absmax : ndarray
        float32 per-block absmax, or uint8 codes of ``absmax - offset`` when double-quantized.
    shape : tuple of int
        Shape of the original weight.
    dtype : str
        ``"fp32"``, ``"fp16"`` or ``"bf16"``, the dtype of the original weight.
    blocksize : int
    offset : float32 or None
        Mean of the absmax values (double quantization only).
    absmax2 : ndarray of float32 or None
        Second-level absmax, one per 256 first-level blocks (double quantization only), or one per block with
        ``absmax2_per_block``.
    bits : int
        Code width: 4 (NF4 and 4-bit tables), 3 or 2 (:mod:`.codebook`); ``packed`` holds ``ceil(n * bits / 8)``
        bytes.
    codebook : Codebook or None
        The table of ``2**bits`` levels; ``None`` is the NormalFloat table of ``bits`` (NF4: bitsandbytes').
    absmax2_per_block : bool
        ``absmax2`` holds each block's own second-level absmax: a rectangle of whole blocks cut from a larger tensor
        (:func:`~.nf4_span.span`), whose blocks belong to groups of 256 of that tensor, not of the rectangle.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple
    dtype: str
    blocksize: int
    offset: np.float32 = None
    absmax2: np.ndarray = None
    bits: int = 4
    codebook: object = None
    absmax2_per_block: bool = False

    @property
    def double_quant(self):
        return self.absmax2 is not None

    @property
    def levels(self):
        """The float32 levels of the code book, in code order."""
        return NF_CODES[self.bits] if self.codebook is None else self.codebook.levels

    @property
    def is_nf4(self):
        """Exactly bitsandbytes' NF4 format: 4-bit codes and the NF4 table."""
        return self.bits == 4 and (self.codebook is None or self.codebook.name == "nf4")


def _as_float32(weight):
    # The weight may be a torch tensor in bf16/fp16/fp32 or a numpy float array; float32 holds all of them exactly.
    if isinstance(weight, torch.Tensor):
        return weight.detach().reshape(-1).to(torch.float32).numpy()
    return np.asarray(weight, dtype=np.float32).reshape(-1)


def block_absmax(values, blocksize):
    """Per-block absmax as bitsandbytes stores it: full blocks unclamped, a final partial block clamped to 1e-38."""
    n = values.size
    full = n - n % blocksize
    absmax = np.abs(values[:full]).reshape(-1, blocksize).max(axis=1) if full else np.zeros(0, np.float32)
    if n % blocksize:
        absmax = np.append(absmax, max(np.abs(values[full:]).max(), ABSMAX_FLOOR))
    return absmax.astype(np.float32)


def encode(values, absmax, blocksize, bounds=NF4_BOUNDS):
    """Code of every value (one uint8 per value) given the per-block absmax from :func:`block_absmax` and the
    decision bounds of the code book (NF4's by default)."""
    n = values.size
    full = n - n % blocksize
    scaled = np.empty(n, np.float32)
    if full:
        reciprocal = np.float32(1) / np.maximum(absmax[: full // blocksize], ABSMAX_FLOOR)
        scaled[:full] = (values[:full].reshape(-1, blocksize) * reciprocal[:, None]).reshape(-1)
    if n % blocksize:
        scaled[full:] = values[full:] / absmax[-1]
    # clamp(-1, 1) in bitsandbytes never moves a value across a bound, so it is left out
    return np.searchsorted(bounds, scaled, side="left").astype(np.uint8)


def pack_nibbles(codes):
    """Two codes per byte, the first in the high nibble; an odd count is padded with code 7 (the code of 0.0)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(7))
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack_nibbles(packed, n):
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes of a packed byte array."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    return codes[:n]


def pack_codes(codes, bits, pad_code=0):
    """Codes (one per uint8) as a big-endian bit string of ``ceil(n * bits / 8)`` bytes; the tail repeats
    ``pad_code``. For 4 bits and pad 7 this is :func:`pack_nibbles`."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    n = codes.size
    padded = np.full(-(-n // 8) * 8, pad_code, np.uint8)
    padded[:n] = codes
    planes = (padded[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1))[:packed_bytes(n, bits)]


def unpack_codes(packed, n, bits):
    """Inverse of :func:`pack_codes`: the first ``n`` codes."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1))[: n * bits].reshape(n, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (stream * weights).sum(axis=1).astype(np.uint8)


def packed_bytes(n, bits):
    """Bytes of ``n`` packed codes of ``bits`` bits."""
    return -(-n * bits // 8)


def check_finite(values, what="weight"):
    """Refuse NaN and Inf: bitsandbytes turns a whole block into NaN for one of them (see README)."""
    bad = ~np.isfinite(values)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} holds {int(bad.sum())} NaN/Inf value(s), the first at flat index {index}; "
                         "NF4 cannot represent them")


def quantize(weight, blocksize=64, double_quant=True, *, table=None):
    """Quantize a weight to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does on the CPU.

    Parameters
    ----------
    weight : torch.Tensor (fp32, fp16 or bf16) or numpy array (treated as fp32)
    blocksize : int
        One of 32, 64, ..., 4096.
    double_quant : bool
        Quantize the absmax values again (``compress_statistics=True``), as QLoRA does.
    table : Codebook, optional
        Another code book (:mod:`.codebook`, whose ``quantize`` passes it): the same arithmetic with its bounds,
        packed at its width. None is NF4.

    Returns
    -------
    NF4Quantized
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {blocksize}")
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        weight.dtype if isinstance(weight, torch.Tensor) else torch.float32)
    if dtype is None:
        raise ValueError(f"weight dtype must be float32, float16 or bfloat16, not {weight.dtype}")
    shape = tuple(weight.shape)
    values = _as_float32(weight)
    if values.size == 0:
        raise ValueError("weight is empty")
    check_finite(values)
    absmax = block_absmax(values, blocksize)
    if table is None:
        packed, extra = pack_nibbles(encode(values, absmax, blocksize)), {}
    else:
        packed = pack_codes(encode(values, absmax, blocksize, table.bounds), table.bits, table.pad_code)
        extra = {"bits": table.bits, "codebook": None if table.name.startswith("nf") else table}
    if not double_quant:
        return NF4Quantized(packed, absmax, shape, dtype, blocksize, **extra)
    offset = mean(absmax)
    codes, absmax2 = absmax_quant.quantize(absmax, offset)
    return NF4Quantized(packed, codes, shape, dtype, blocksize, offset, absmax2, **extra)


def mean(absmax):
    """``torch.mean`` of the float32 absmax vector, the offset of double quantization.

    The rounding of a float32 mean depends on the summation order, which torch chooses per CPU (vector width), so
    the offset is taken from torch itself rather than re-derived; the hardware receives it as a parameter.
    """
    return np.float32(torch.from_numpy(np.ascontiguousarray(absmax, dtype=np.float32)).mean().item())
