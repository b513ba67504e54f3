"""Golden twin of ``rtl/scratchpad.py``: where an element of a matrix lives in the diagonal bank layout."""

__all__ = ["row_words", "placement"]


def row_words(cols, banks):
    """Words per bank that one matrix row takes."""
    return -(-cols // banks)


def placement(row, col, cols, banks, base=0):
    """(bank, word) of element ``(row, col)`` of a matrix with ``cols`` columns stored from word ``base``."""
    return (row + col) % banks, base + row * row_words(cols, banks) + col // banks
