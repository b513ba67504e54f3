"""Spans of an NF4 weight: rectangles of whole blocks cut from a 2-D quantized weight, as the output-stationary
block jobs stream them (a feature block's W rows by a span of the reduction; transposed, a span of W rows by a
block of columns). Twin of ``rtl/nf4_span.py``, which gives each block of a span its second-level absmax.

A span's blocks are not consecutive in the weight: block ``(r, j)`` of a span starting at block ``first`` is block
``first + r * stride + j`` of the weight (``stride``: blocks per row of the weight), so with double quantization
consecutive blocks of a span lie in different groups of 256 of the weight, and each takes its own ``absmax2``
(the dequantizer's ``absmax2_per_block``). Nothing is re-quantized: dequantized, a span equals the same slice of
the dequantized weight bit for bit.
"""

from dataclasses import dataclass

import numpy as np

from ..constants import DYNAMIC_BLOCKSIZE
from .nf4_quant import NF4Quantized

__all__ = ["SpanBlocks", "span_blocks", "span", "span_absmax2"]


@dataclass(frozen=True)
class SpanBlocks:
    """Where a span's blocks lie in the whole weight, in the span's row-major order.

    Attributes
    ----------
    first : int
        The weight's index of the span's first block.
    rows : int
        Rows of the span.
    blocks : int
        Blocks per row of the span.
    stride : int
        Blocks per row of the weight: from one row of the span to the next.
    """

    first: int
    rows: int
    blocks: int
    stride: int

    def indices(self):
        """The weight's block index of every block of the span, in order."""
        return ((self.first + np.arange(self.rows)[:, None] * self.stride)
                + np.arange(self.blocks)[None, :]).reshape(-1)

    def groups(self):
        """The double quantization group (of 256 blocks of the weight) of every block of the span."""
        return self.indices() // DYNAMIC_BLOCKSIZE


def span_blocks(shape, rows, cols, blocksize):
    """The :class:`SpanBlocks` of the rectangle ``[rows, cols]`` (contiguous slices) of a 2-D weight of ``shape``
    quantized in blocks of ``blocksize``; ValueError unless every row of it is whole blocks of such a weight."""
    if len(shape) != 2:
        raise ValueError(f"a span is cut from a 2-D weight, not one of shape {tuple(shape)}")
    height, width = shape
    (r0, r1, rstep), (c0, c1, cstep) = rows.indices(height), cols.indices(width)
    if rstep != 1 or cstep != 1 or r1 <= r0 or c1 <= c0:
        raise ValueError(f"a span needs non-empty contiguous rows and columns, not {rows} x {cols} of "
                         f"{tuple(shape)}")
    if width % blocksize or c0 % blocksize or c1 % blocksize:
        raise ValueError(f"a span's rows must be whole NF4 blocks of {blocksize}: columns {c0}..{c1} of a weight "
                         f"{width} wide")
    stride = width // blocksize
    return SpanBlocks(r0 * stride + c0 // blocksize, r1 - r0, (c1 - c0) // blocksize, stride)


def span(q, rows, cols):
    """The rectangle ``[rows, cols]`` of a 2-D :class:`~.nf4_quant.NF4Quantized` as a tensor of its own, in
    row-major order: its codes, its blocks' absmax and, with double quantization, each block's own ``absmax2``
    (``absmax2_per_block``). A span of a span is allowed.

    Parameters
    ----------
    q : NF4Quantized
    rows, cols : slice
        Contiguous ranges (step 1) within ``q.shape``; every row of the rectangle whole blocks of ``q``.
    """
    where = span_blocks(q.shape, rows, cols, q.blocksize)
    blocks = where.indices()
    # Every block size is a multiple of 8 codes, so each block is whole bytes of the packed codes: gather them.
    block_bytes = q.blocksize * q.bits // 8
    packed = np.asarray(q.packed, np.uint8).reshape(-1, block_bytes)[blocks].reshape(-1)
    absmax2 = None
    if q.double_quant:
        absmax2 = np.asarray(q.absmax2)[blocks if q.absmax2_per_block else where.groups()]
    return NF4Quantized(packed, np.asarray(q.absmax)[blocks], (where.rows, where.blocks *
                        q.blocksize), q.dtype, q.blocksize, q.offset, absmax2, q.bits, q.codebook, q.double_quant)


def span_absmax2(absmax2, where):
    """What ``rtl/nf4_span.py`` gives for a span: the ``absmax2`` (the whole weight's, one per 256 blocks) of each
    of its blocks, float32."""
    return np.asarray(absmax2, np.float32)[where.groups()]
