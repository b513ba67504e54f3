"""Drive ``rtl/rank_term.py``'s :class:`~edge_qlora.rtl.rank_term.RankTerm` with blocks of base outputs and check
each output against its twin (``golden/rank_term.py``), on Amaranth's simulator or on Verilator."""

from dataclasses import dataclass

import numpy as np
import torch

from ..golden import rank_term as golden
from ..rtl.rank_term import RankTerm, block_layout
from .harness import pack_lanes, run_streams, unpack_lanes

__all__ = ["TermBlock", "TermRun", "beat_order", "run_rank_term"]


@dataclass(frozen=True)
class TermBlock:
    """One block for the unit: ``base`` float32 [tokens, n]; ``rows`` bf16 [tokens, r] (hb or gb); ``columns``
    bf16 [n, r] (rows of B, or columns of A); a block that loads no rows uses the previous block's."""

    base: np.ndarray
    rows: torch.Tensor
    columns: torch.Tensor
    scaling: float
    transposed: bool = False
    exponent: int = 0
    load_rows: bool = True


@dataclass(frozen=True)
class TermRun:
    """``outputs``: the unit's beats; ``want``: the twin's; ``cycles`` of the run; ``mismatches``: outputs (not
    beats) that differ."""

    outputs: list
    want: list
    cycles: int
    mismatches: int


def _bits(values):
    if isinstance(values, torch.Tensor):
        return values.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    return np.asarray(values, np.float32).view(np.uint32).astype(np.int64)


def beat_order(tokens, columns, rows, cols, transposed):
    """(token row, first column) of each of a block's beats, in the engine's order: forward column tile by column
    tile, the block's token rows in order within each; transposed token tile by token tile (``rows`` rows), column
    tile by column tile within one, its rows within that."""
    height = rows if transposed else tokens
    return [(tile + r, c) for tile in range(0, tokens, height) for c in range(0, columns, cols)
            for r in range(height)]


def run_rank_term(config, blocks, *, stalls=None, backend=None, max_cycles=None, progress=None):
    """Run ``blocks`` (:class:`TermBlock`) through one unit; returns a :class:`TermRun`."""
    layout, rank, cols = block_layout(config), config.rank, config.cols
    inputs = {"block": [], "row_operands": [], "column_operands": [], "c": []}
    want = []
    for block in blocks:
        tokens, columns = block.base.shape
        inputs["block"].append(layout.const({
            "tokens": tokens, "columns": columns, "transposed": int(block.transposed),
            "load_rows": int(block.load_rows), "load_columns": 1, "exponent": block.exponent,
            "scaling": int(_bits(np.float32(block.scaling))),
        }).as_bits())
        if block.load_rows:
            inputs["row_operands"] += pack_lanes(_bits(block.rows).reshape(-1), rank, 16)
        # forward a beat per column; transposed A's rows as they lie, rank columns a beat
        operands = _bits(block.columns)
        inputs["column_operands"] += pack_lanes((operands.T if block.transposed else operands).reshape(-1), rank, 16)
        out = golden.rank_term(block.base, block.rows, block.columns, block.scaling, block.transposed,
                               block.exponent)
        order = beat_order(tokens, columns, config.rows, cols, block.transposed)
        inputs["c"] += pack_lanes(np.concatenate([_bits(block.base[t, f:f + cols]) for t, f in order]), cols, 32)
        want += pack_lanes(np.concatenate([out[t, f:f + cols] for t, f in order]), cols, 16)
    outputs, cycles = run_streams(lambda: RankTerm(config), f"RankTerm {config!r}", inputs, "o", len(want),
                                  stalls=stalls, max_cycles=max_cycles or 60 * len(want) * cols + 5000,
                                  backend=backend, progress=progress)
    count = len(want) * cols
    got = unpack_lanes(outputs, cols, 16, count)
    mismatches = int((got != unpack_lanes(want, cols, 16, count)[:got.size]).sum()) + count - got.size
    return TermRun(outputs, want, cycles, mismatches)
