"""Drive ``rtl/rank_product.py``'s :class:`~edge_qlora.rtl.rank_product.RankProduct` with token blocks of an
activation, a span at a time, and check its rows against the twin (``golden/rank_product.py``) and every value it
passes on, on Amaranth's simulator or on Verilator."""

from dataclasses import dataclass

import numpy as np
import torch

from ..golden.rank_product import rank_rows
from ..rtl.rank_product import SPAN, RankProduct, span_layout
from .harness import pack_lanes, run_outputs, unpack_lanes

__all__ = ["ProductBlock", "ProductRun", "add_product", "run_rank_product"]


@dataclass(frozen=True)
class ProductBlock:
    """One token block: ``activation`` bf16 ``[tokens, k]`` (k a multiple of 64); ``operand`` bf16 A ``[r, k]`` or,
    ``transposed``, B ``[k, r]``; ``passes``: spans before and after the reduction's that the unit only passes on
    (the feature blocks after the first), ``(before, after)``."""

    activation: torch.Tensor
    operand: torch.Tensor
    transposed: bool = False
    passes: tuple = (0, 0)


@dataclass(frozen=True)
class ProductRun:
    """``rows`` and ``want``: the unit's and the twin's beats; ``passed_mismatches``: values passed on that differ
    from (or are missing against) those sent; ``mismatches``: hb/gb values that differ; ``cycles``."""

    rows: list
    want: list
    passed_mismatches: int
    mismatches: int
    cycles: int


def _bits(tensor):
    return tensor.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF


def add_product(layout, block, inputs, **fields):
    """Append a :class:`ProductBlock`'s spans (beats of ``layout``, a span layout with ``tokens``, ``capture``,
    ``first``, ``last`` and ``transposed``; each field named in ``fields`` set with ``capture`` too), operands and
    values to ``inputs``."""
    tokens, k = block.activation.shape
    spans = k // SPAN
    x = _bits(block.activation)
    operand = _bits(block.operand)
    kinds = ["pass"] * block.passes[0] + ["capture"] * spans + ["pass"] * block.passes[1]
    s = 0
    for kind in kinds:
        capture = kind == "capture"
        piece = slice(s * SPAN, (s + 1) * SPAN) if capture else slice(0, SPAN)
        inputs["spans"].append(layout.const({
            "tokens": tokens, "capture": int(capture), "first": int(capture and s == 0),
            "last": int(capture and s == spans - 1), "transposed": int(block.transposed),
            **{name: int(capture) for name in fields}}).as_bits())
        if capture:
            # forward A's rows' pieces row by row; transposed B's 64 rows of the span
            ops = operand[piece, :] if block.transposed else operand[:, piece]
            inputs["operands"] += [int(v) for v in ops.reshape(-1)]
            s += 1
        inputs["values"] += [int(v) for v in x[:, piece].reshape(-1)]


def _stimulus(config, blocks):
    layout, rank = span_layout(config), config.rank
    inputs = {"spans": [], "operands": [], "values": []}
    want = []
    for block in blocks:
        add_product(layout, block, inputs)
        want += pack_lanes(_bits(rank_rows(block.activation, block.operand, block.transposed)).reshape(-1), rank, 16)
    return inputs, want


def run_rank_product(config, blocks, *, stalls=None, backend=None, max_cycles=None):
    """Run ``blocks`` (:class:`ProductBlock`) through one unit; returns a :class:`ProductRun`."""
    inputs, want = _stimulus(config, blocks)
    count = len(inputs["values"])
    max_cycles = max_cycles or 4 * (count + len(inputs["operands"])) + 200 * len(want) + 5000
    outputs, cycles = run_outputs(lambda: RankProduct(config), f"RankProduct {config!r}", inputs,
                                  {"rows": len(want), "passed": count}, stalls=stalls, max_cycles=max_cycles,
                                  backend=backend)
    rows, passed = outputs["rows"], outputs["passed"]
    values = np.array(inputs["values"])
    got = np.array(passed[:count], np.int64)
    passed_mismatches = int((got != values[:got.size]).sum()) + count - got.size
    n = len(want) * config.rank
    have = unpack_lanes(rows, config.rank, 16, n)
    mismatches = int((have != unpack_lanes(want, config.rank, 16, n)[:have.size]).sum()) + n - have.size
    return ProductRun(rows, want, passed_mismatches, mismatches, cycles)
