"""Drive ``rtl/rank_gradient.py``'s :class:`~edge_qlora.rtl.rank_gradient.RankGradient` with gradients, each an
activation's spans with a token block's rows, and check its gradients against the twin
(``golden/rank_gradient.py``) and every value it passes on, on Amaranth's simulator or on Verilator."""

from dataclasses import dataclass

import numpy as np
import torch

from ..golden.rank_gradient import rank_gradient, x_chunk_fields
from ..rtl.rank_gradient import CHUNK, SPAN, RankGradient, span_layout
from .harness import pack_lanes, run_outputs

__all__ = ["GradientBlock", "GradientRun", "run_rank_gradient"]


@dataclass(frozen=True)
class GradientBlock:
    """One gradient: ``activation`` bf16 ``[tokens, k]`` (dy, or x ``transposed``; k a multiple of 64), ``rows``
    bf16 ``[tokens, r]`` (hb, or gb), ``scale`` (s); ``fields``: x's chunk fields over all its columns (default: of
    ``activation``); ``passes``: spans before and after that the unit only passes on, ``(before, after)``."""

    activation: torch.Tensor
    rows: torch.Tensor
    scale: float = 2.0
    transposed: bool = False
    fields: tuple = None
    passes: tuple = (0, 0)


@dataclass(frozen=True)
class GradientRun:
    """``grads`` and ``want``: the unit's and the twin's float32 values (bit patterns), feature after feature;
    ``passed_mismatches``: values passed on that differ
    from (or are missing against) those sent; ``mismatches``: gradient values that differ (bit patterns);
    ``cycles``."""

    grads: list
    want: list
    passed_mismatches: int
    mismatches: int
    cycles: int


def _bits16(tensor):
    return tensor.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF


def _stimulus(config, blocks):
    layout, rank = span_layout(config), config.rank
    inputs = {"spans": [], "rows": [], "fields": [], "values": []}
    want = []
    for block in blocks:
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
                "scale": int(scale.view(np.uint32))}).as_bits())
            if load:
                inputs["rows"] += pack_lanes(_bits16(block.rows).reshape(-1), rank, 16)
                if block.transposed:
                    fields = block.fields or x_chunk_fields(block.activation, CHUNK)
                    inputs["fields"] += [int(f) for f in fields]
            s += int(capture)
            inputs["values"] += [int(v) for v in x[:, piece].reshape(-1)]
        grads = rank_gradient(block.activation, block.rows, scale, block.transposed, block.fields).view(np.uint32)
        # per span in the order of memory: grad_B's 64 rows; transposed, the span's columns of grad_A's rows
        for s in range(k // SPAN):
            piece = grads[:, s * SPAN:(s + 1) * SPAN] if block.transposed else grads[s * SPAN:(s + 1) * SPAN]
            want += [int(v) for v in piece.reshape(-1)]
    return inputs, want


def run_rank_gradient(config, blocks, *, stalls=None, backend=None, max_cycles=None):
    """Run ``blocks`` (:class:`GradientBlock`) through one unit; returns a :class:`GradientRun`."""
    inputs, want = _stimulus(config, blocks)
    count = len(inputs["values"])
    max_cycles = max_cycles or 4 * (count + len(inputs["rows"]) * config.rank) + 10 * len(want) + 5000
    outputs, cycles = run_outputs(lambda: RankGradient(config), f"RankGradient {config!r}", inputs,
                                  {"grads": len(want), "passed": count}, stalls=stalls, max_cycles=max_cycles,
                                  backend=backend)
    grads, passed = outputs["grads"], outputs["passed"]
    values = np.array(inputs["values"])
    got = np.array(passed[:count], np.int64)
    passed_mismatches = int((got != values[:got.size]).sum()) + count - got.size
    n = len(want)
    have = np.array(grads[:n], np.int64)
    mismatches = int((have != np.array(want, np.int64)[:have.size]).sum()) + n - have.size
    return GradientRun(grads, want, passed_mismatches, mismatches, cycles)
