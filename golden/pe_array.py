"""Bit-accurate twin of ``rtl/pe_array.py``: exact chunk sums of a stream of reduction steps.

The array sees the reduction as *steps*: step ``k`` brings ``a[k, i]`` for every array row ``i``, ``b[k, j]`` for
every array column ``j``, and a ``last`` flag that closes a chunk. After each chunk it gives the exact integer sums
``S[i][j] = sum over the chunk's steps of a[k, i] * b[k, j]``. :func:`gemm_steps` turns the aligned operands of
:func:`edge_qlora.golden.gemm.align` into such steps, so that :func:`chunk_sums` of them equals the ``sums`` of
:func:`edge_qlora.golden.gemm.chunk_partials` for one ``rows x cols`` output tile.
"""

import numpy as np

from ..constants import ACC_BITS, OPERAND_BITS

__all__ = ["chunk_sums", "gemm_steps", "chunk_lengths"]


def _steps(name, values, width):
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [steps, {width}], not of shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, not {values.dtype}")
    limit = 1 << (OPERAND_BITS - 1)
    if values.size and (values.min() < -limit or values.max() >= limit):
        raise ValueError(f"{name} holds values outside signed({OPERAND_BITS})")
    return values.astype(np.int64)


def chunk_lengths(last):
    """Lengths, in steps, of the chunks that ``last`` closes (steps after the final ``last`` are left out)."""
    ends = np.flatnonzero(np.asarray(last, dtype=bool))
    return np.diff(np.concatenate([[-1], ends])).tolist()


def chunk_sums(a, b, last, min_chunk=1):
    """Exact chunk sums, one ``[rows, cols]`` array per chunk closed by a ``last`` step.

    Parameters
    ----------
    a : int array [steps, rows]
        A's 18-bit signed operand per step and array row.
    b : int array [steps, cols]
        B's 18-bit signed operand per step and array column.
    last : bool array [steps]
        Set on the final step of each chunk; steps after the final ``last`` belong to no finished chunk and give
        no sums (the array keeps them in its accumulators).
    min_chunk : int
        The shortest allowed chunk (:attr:`edge_qlora.rtl.pe_array.PEArray.min_chunk` for the hardware).

    Returns
    -------
    list of int64 arrays [rows, cols]

    Raises
    ------
    ValueError
        Operands outside ``signed(18)``, a chunk shorter than ``min_chunk``, or a sum outside ``signed(44)`` (the
        accumulator would wrap; it cannot for ``|a|, |b| <= 2**17 - 1`` and chunks of at most 512 steps).
    """
    last = np.asarray(last, dtype=bool)
    if last.ndim != 1:
        raise ValueError(f"last must be a 1-d array of flags, not of shape {last.shape}")
    a, b = _steps("a", a, "rows"), _steps("b", b, "cols")
    if not len(a) == len(b) == len(last):
        raise ValueError(f"a, b and last must have one entry per step, not {len(a)}, {len(b)} and {len(last)}")
    lengths = chunk_lengths(last)
    if any(length < min_chunk for length in lengths):
        raise ValueError(f"chunks must be at least {min_chunk} steps long, not {min(lengths)}")
    sums, start = [], 0
    for length in lengths:
        # |a * b| < 2**34 and at most a few thousand steps: int64 is exact
        sums.append(a[start:start + length].T @ b[start:start + length])
        start += length
    limit = 1 << (ACC_BITS - 1)
    for s in sums:
        if s.size and (s.min() < -limit or s.max() >= limit):
            raise ValueError(f"a chunk sum is outside signed({ACC_BITS}): the accumulator would wrap")
    return sums


def gemm_steps(qa, qb, chunk):
    """The array's input steps for ``qa @ qb`` in chunks of ``chunk`` (the last one may be shorter).

    Parameters
    ----------
    qa : int array [M, Q]
        Aligned A (rows of the output tile), as :func:`edge_qlora.golden.gemm.align` gives along axis 1.
    qb : int array [Q, P]
        Aligned B (columns of the output tile), as :func:`edge_qlora.golden.gemm.align` gives along axis 0.
    chunk : int
        Steps per chunk.

    Returns
    -------
    a : int64 array [Q, M]
    b : int64 array [Q, P]
    last : bool array [Q]
    """
    qa, qb = np.asarray(qa, dtype=np.int64), np.asarray(qb, dtype=np.int64)
    if qa.ndim != 2 or qb.ndim != 2 or qa.shape[1] != qb.shape[0]:
        raise ValueError(f"shapes {qa.shape} and {qb.shape} cannot be multiplied")
    q = qa.shape[1]
    last = np.zeros(q, dtype=bool)
    last[chunk - 1::chunk] = True
    last[-1] = True
    return qa.T.copy(), qb.copy(), last
