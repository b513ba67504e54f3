#!/usr/bin/env python3
"""GEMM engine: the cycle model against the RTL, and the model's utilization on TinyLlama's projections.

    python scripts/gemm_cycles.py              # both tables (the RTL runs take a few minutes in pysim)
    python scripts/gemm_cycles.py --model-only
    python scripts/gemm_cycles.py --regression # the RTL's cycle counts of test_gemm's cycle-model cases

Prints markdown tables (the README's) and writes them to ``--out``.
"""

import argparse
import os
import time

import torch

from edge_qlora.golden import gemm as golden
from edge_qlora.golden import nf4_quant
from edge_qlora.rtl.gemm import GemmConfig
from edge_qlora.sim.gemm import run_gemm
from edge_qlora.sim.streams import Stalls

# (M, N, K, rows, cols, transposed, weights): small enough for Amaranth's simulator
VALIDATION = [
    (4, 4, 32, 2, 2, False, "bf16"),
    (1, 7, 33, 3, 2, False, "bf16"),
    (6, 9, 1, 2, 2, False, "bf16"),
    (2, 3, 5, 4, 4, True, "bf16"),
    (9, 11, 70, 4, 3, False, "bf16"),
    (9, 11, 70, 4, 3, True, "bf16"),
    (8, 64, 256, 4, 4, False, "bf16"),
    (8, 64, 256, 4, 4, True, "bf16"),
    (5, 9, 100, 2, 4, False, "nf4"),
    (5, 9, 100, 2, 4, True, "nf4"),
    (6, 7, 70, 3, 5, True, "nf4"),
    (16, 24, 64, 8, 8, True, "nf4"),
    (8, 64, 128, 4, 4, False, "nf4"),
    (16, 32, 256, 8, 8, False, "nf4"),
]

STREAMS = ("job", "a", "w", "c", "tensor", "codes", "absmax", "absmax2")

TINYLLAMA = [("q_proj / o_proj", 2048, 2048), ("k_proj / v_proj", 256, 2048), ("gate_proj / up_proj", 5632, 2048),
             ("down_proj", 2048, 5632)]


def validation_table():
    lines = ["| M | N | K | array | mode | W | RTL cycles | model cycles | error | utilization |",
             "|---:|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for m, n, k, rows, cols, transposed, weights in VALIDATION:
        config = GemmConfig(rows=rows, cols=cols, max_k=max(k, 16), max_n=max(n, 16), weights=weights)
        gen = torch.Generator().manual_seed(m * n + k)
        a = torch.randn((m, n if transposed else k), generator=gen).to(torch.bfloat16)
        w = torch.randn((n, k), generator=gen) * 0.02
        source = nf4_quant.quantize(w, 64, True) if weights == "nf4" else w.to(torch.bfloat16)
        start = time.perf_counter()
        run = run_gemm(a, source, config, transposed=transposed)
        model = golden.gemm_cycles(m, n, k, rows, cols, config.chunk_steps, transposed, weights)
        error = (model.cycles - run.cycles) / run.cycles
        lines.append(f"| {m} | {n} | {k} | {rows}x{cols} | {'backward' if transposed else 'forward'} | {weights} | "
                     f"{run.cycles} | {model.cycles} | {100 * error:+.2f}% | "
                     f"{100 * m * n * k / (rows * cols * run.cycles):.1f}% |")
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    return "\n".join(lines)


def regression_cycles(seed=2):
    """The RTL's cycles for each :data:`~edge_qlora.golden.gemm.CYCLE_MODEL_CASES` case, without and with random stalls on every stream (30%),
    with the inputs of tests/test_gemm.py's ``check_rtl``: a refactoring of the engine must leave all of them
    unchanged. Each run is checked bit for bit against the model too."""
    counts = []
    for m, n, k, rows, cols, transposed, weights in golden.CYCLE_MODEL_CASES:
        config = GemmConfig(rows=rows, cols=cols, max_k=max(k, 64), max_n=max(n, 64), weights=weights)
        if weights == "nf4":
            source, w = golden.random_nf4_weight((n, k), seed)
        else:
            w = (torch.randn((n, k), generator=torch.Generator().manual_seed(seed + 100)) * 0.05).to(torch.bfloat16)
            source = w
        a = golden.random_activations((m, n if transposed else k), seed)
        expected = golden.gemm(a, w if transposed else w.T, config.numerics, transposed)
        for stalls in (None, {name: Stalls(0.3, seed * 10 + i) for i, name in enumerate(STREAMS)}):
            run = run_gemm(a, source, config, transposed=transposed, stalls=stalls)
            if not torch.equal(run.out.view(torch.int16), expected.view(torch.int16)):   # (bf16 bit patterns)
                raise SystemExit(f"RTL differs from the model on {(m, n, k, rows, cols, transposed, weights)}")
            counts.append(run.cycles)
            print(f"{(m, n, k, rows, cols, transposed, weights)} {'stalls' if stalls else 'no stalls'}: "
                  f"{run.cycles} cycles", flush=True)
    return counts


def utilization_table():
    lines = []
    for transposed in (False, True):
        lines.append(f"**{'Backward, dx = dy @ W' if transposed else 'Forward, y = x @ W.T'}** (NF4 weights)")
        lines.append("")
        lines.append("| projection (N x K) | M | 4x4 | 8x8 | 16x8 |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, n, k in TINYLLAMA:
            for m in (16, 32, 64, 128):
                cells = []
                for rows, cols in ((4, 4), (8, 8), (16, 8)):
                    chunk = GemmConfig(rows=rows, cols=cols).chunk_steps
                    cells.append(f"{100 * golden.gemm_cycles(m, n, k, rows, cols, chunk, transposed, 'nf4').utilization:.1f}%")
                lines.append(f"| {name} ({n} x {k}) | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/gemm_cycles")
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--regression", action="store_true",
                        help="print the RTL's cycle counts of the test's cycle-model cases, without and with stalls")
    args = parser.parse_args()
    if args.regression:
        print(regression_cycles())
        return
    os.makedirs(args.out, exist_ok=True)
    text = utilization_table()
    print(text)
    if not args.model_only:
        text = validation_table() + "\n\n" + text
    with open(os.path.join(args.out, "gemm_cycles.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
