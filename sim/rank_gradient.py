"""Drive ``rtl/rank_gradient.py``'s :class:`~edge_qlora.rtl.rank_gradient.RankGradient` with gradients, each an
activation's spans with a token block's rows, and with products (:class:`~edge_qlora.sim.rank_product.ProductBlock`,
the rows hb or gb), and check its gradients against the twin (``golden/rank_gradient.py``), its rows against
``golden/rank_product.py`` and every value it passes on, on Amaranth's simulator or on Verilator."""

from dataclasses import dataclass

import numpy as np
import torch

from ..golden.rank_gradient import rank_gradient, x_chunk_fields
from ..golden.rank_product import rank_rows
from ..rtl.rank_gradient import CHUNK, SPAN, RankGradient, span_layout
from .harness import pack_lanes, run_outputs, unpack_lanes
from .rank_product import ProductBlock, add_product

__all__ = ["GradientBlock", "GradientRun", "run_rank_gradient"]


@dataclass(frozen=True)
class GradientBlock:
    """One gradient: ``activation`` bf16 ``[tokens, k]`` (dy, or x ``transposed``; k a multiple of 64), ``rows``
    bf16 ``[tokens, r]`` (hb, or gb), ``scale`` (s); ``fields``: x's chunk fields over all its columns (default: of
    ``activation``); ``passes``: spans before and after that the unit only passes on, ``(before, after)``;
    ``sink``: the captured spans' values end in the unit (grad_A's pass over x), none is passed on."""

    activation: torch.Tensor
    rows: torch.Tensor
    scale: float = 2.0
    transposed: bool = False
    fields: tuple = None
    passes: tuple = (0, 0)
    sink: bool = False


@dataclass(frozen=True)
class GradientRun:
    """``grads`` and ``want``: the unit's and the twin's float32 values (bit patterns), feature after feature;
    ``passed_mismatches``: values passed on that differ
    from (or are missing against) those sent; ``mismatches``: gradient values that differ (bit patterns);
    ``rows`` and ``want_rows``: the products' beats, the unit's and the twin's; ``row_mismatches``: hb/gb values
    that differ; ``fields`` and ``want_fields``: forward products' x chunk fields, the unit's and the twin's
    (:func:`~edge_qlora.golden.rank_gradient.x_chunk_fields`); ``field_mismatches``; ``cycles``."""

    grads: list
    want: list
    passed_mismatches: int
    mismatches: int
    cycles: int
    rows: list = ()
    want_rows: list = ()
    row_mismatches: int = 0
    fields: list = ()
    want_fields: list = ()
    field_mismatches: int = 0


def _bits16(tensor):
    return tensor.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF


def _product(config, block, inputs):
    """A product block's spans, operands and values; returns its rows as the twin makes them and, forward, x's
    chunk fields."""
    tokens, k = block.activation.shape
    if k % SPAN or not 1 <= tokens <= config.max_tokens:
        raise ValueError(f"a product takes [tokens <= {config.max_tokens}, k] activations with k a multiple of "
                         f"{SPAN}, not {tuple(block.activation.shape)}")
    add_product(span_layout(config), block, inputs, product=True)
    rank = config.rank
    fields = [] if block.transposed else [int(f) for f in x_chunk_fields(block.activation, CHUNK)]
    return pack_lanes(_bits16(rank_rows(block.activation, block.operand, block.transposed)).reshape(-1), rank,
                      16), fields


def _stimulus(config, blocks):
    layout, rank = span_layout(config), config.rank
    inputs = {"spans": [], "rows": [], "fields": [], "operands": [], "values": []}
    want, want_rows, want_fields, passed = [], [], [], []
    for block in blocks:
        if isinstance(block, ProductBlock):
            before = len(inputs["values"])
            rows, fields = _product(config, block, inputs)
            passed += inputs["values"][before:]
            want_rows += rows
            want_fields += fields
            continue
        tokens, k = block.activation.shape
        if k % SPAN or not 1 <= tokens <= config.max_tokens or block.rows.shape != (tokens, rank):
            raise ValueError(f"a gradient takes [tokens <= {config.max_tokens}, k] activations with k a multiple "
                             f"of {SPAN} and [tokens, {rank}] rows, not {tuple(block.activation.shape)} and "
                             f"{tuple(block.rows.shape)}")
        scale = np.float32(block.scale)
        x = _bits16(block.activation)
        kinds = ["pass"] * block.passes[0] + ["capture"] * (k // SPAN) + ["pass"] * block.passes[1]
        s = 0
        for kind in kinds:
            capture = kind == "capture"
            piece = slice(s * SPAN, (s + 1) * SPAN) if capture else slice(0, SPAN)
            load = capture and s == 0
            inputs["spans"].append(layout.const({
                "tokens": tokens, "capture": int(capture), "load": int(load), "transposed": int(block.transposed),
                "sink": int(capture and block.sink), "scale": int(scale.view(np.uint32))}).as_bits())
            if load:
                inputs["rows"] += pack_lanes(_bits16(block.rows).reshape(-1), rank, 16)
                if block.transposed:
                    fields = block.fields or x_chunk_fields(block.activation, CHUNK)
                    inputs["fields"] += [int(f) for f in fields]
            s += int(capture)
            inputs["values"] += [int(v) for v in x[:, piece].reshape(-1)]
            if not (capture and block.sink):
                passed += [int(v) for v in x[:, piece].reshape(-1)]
        grads = rank_gradient(block.activation, block.rows, scale, block.transposed, block.fields).view(np.uint32)
        # per span in the order of memory: grad_B's 64 rows; transposed, the span's columns of grad_A's rows
        for s in range(k // SPAN):
            piece = grads[:, s * SPAN:(s + 1) * SPAN] if block.transposed else grads[s * SPAN:(s + 1) * SPAN]
            want += [int(v) for v in piece.reshape(-1)]
    return inputs, want, want_rows, want_fields, passed


def run_rank_gradient(config, blocks, *, stalls=None, backend=None, max_cycles=None):
    """Run ``blocks`` (:class:`GradientBlock` and :class:`~edge_qlora.sim.rank_product.ProductBlock`) through one
    unit, in order; returns a :class:`GradientRun`."""
    inputs, want, want_rows, want_fields, values = _stimulus(config, blocks)
    count = len(values)
    loads = (len(inputs["rows"]) + len(inputs["operands"])) * config.rank
    max_cycles = max_cycles or (4 * (len(inputs["values"]) + loads) + 10 * len(want) + 200 * len(want_rows) + 5000)
    outputs, cycles = run_outputs(lambda: RankGradient(config), f"RankGradient {config!r}", inputs,
                                  {"grads": len(want), "rows_out": len(want_rows), "x_fields_out": len(want_fields),
                                   "passed": count}, stalls=stalls, max_cycles=max_cycles, backend=backend)
    grads, passed, rows = outputs["grads"], outputs["passed"], outputs["rows_out"]
    fields = [int(f) for f in outputs["x_fields_out"]]
    field_mismatches = sum(a != b for a, b in zip(fields, want_fields)) + abs(len(want_fields) - len(fields))
    values = np.array(values)
    got = np.array(passed[:count], np.int64)
    passed_mismatches = int((got != values[:got.size]).sum()) + count - got.size
    n = len(want)
    have = np.array(grads[:n], np.int64)
    mismatches = int((have != np.array(want, np.int64)[:have.size]).sum()) + n - have.size
    n = len(want_rows) * config.rank
    have = unpack_lanes(rows, config.rank, 16, n)
    row_mismatches = int((have != unpack_lanes(want_rows, config.rank, 16, n)[:have.size]).sum()) + n - have.size
    return GradientRun(grads, want, passed_mismatches, mismatches, cycles, rows, want_rows, row_mismatches, fields,
                       want_fields, field_mismatches)
