"""Golden twin of ``rtl/row_align.py``: cut a row-major matrix into row-aligned beats."""

import numpy as np

__all__ = ["row_beats"]


def row_beats(matrix, lanes):
    """Beats of ``lanes`` elements, each within one row and starting at a multiple of ``lanes``; zero-filled.

    Returns
    -------
    data : ndarray [beats, lanes]
    row_end : ndarray of bool [beats]
    """
    matrix = np.asarray(matrix)
    rows, length = matrix.shape
    per_row = -(-length // lanes)
    padded = np.zeros((rows, per_row * lanes), matrix.dtype)
    padded[:, :length] = matrix
    data = padded.reshape(rows * per_row, lanes)
    row_end = np.tile(np.arange(per_row) == per_row - 1, rows)
    return data, row_end
