#!/usr/bin/env python3
"""GEMM accuracy: the engine's arithmetic (its bit-accurate model, which the RTL equals bit for bit) against what
bitsandbytes does in software (dequantize to bf16, then a bf16 torch matmul), both measured against a float64
product of the same operands (the exact NF4-dequantized weights).

    python scripts/gemm_accuracy.py                 # the README's table
    python scripts/gemm_accuracy.py --out build/acc

For every shape of the accuracy contract (``tests/test_gemm.py``), activation kind and direction, prints the
relative Frobenius error and the largest absolute error of each (a summary, worst over the shapes, then every
case); the contract is ``ours <= software * 1.1``.
Writes ``gemm_accuracy.md`` and ``gemm_accuracy.json`` to ``--out`` when given.
"""

import argparse
import json
import os

import numpy as np

from edge_qlora.golden import gemm as golden

def measure():
    rows = []
    for kind in golden.ACTIVATION_KINDS:
        for transposed in (False, True):
            for seed, (m, n, k) in enumerate(golden.CONTRACT_SHAPES):
                _, w = golden.random_nf4_weight((n, k), seed)
                a = golden.random_activations((m, n if transposed else k), seed, kind)
                b = w if transposed else w.T
                reference = golden.reference_fp64(a, b)
                results = {"software": golden.bnb_style(a, b)}
                for out_dtype in ("bf16", "fp32"):
                    results[out_dtype] = golden.gemm(a, b, golden.GemmNumerics(out_dtype=out_dtype), transposed)
                row = {"kind": kind, "mode": "backward" if transposed else "forward", "shape": [m, n, k]}
                for name, result in results.items():
                    values = result.double().numpy()
                    row[f"rel_{name}"] = golden.rel_frobenius(result, reference)
                    row[f"max_abs_{name}"] = float(np.abs(values - reference).max())
                row["ratio"] = row["rel_bf16"] / row["rel_software"] if row["rel_software"] else 1.0
                rows.append(row)
    return rows


def table(rows):
    lines = ["| activations | mode | M x N x K | rel. error: ours bf16 out | ours fp32 out | bitsandbytes bf16 | "
             "ratio (bf16 out) | max abs: ours bf16 | ours fp32 | bitsandbytes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, n, k = r["shape"]
        lines.append(f"| {r['kind']} | {r['mode']} | {m}x{n}x{k} | {r['rel_bf16']:.3e} | {r['rel_fp32']:.3e} | "
                     f"{r['rel_software']:.3e} | {r['ratio']:.3f} | {r['max_abs_bf16']:.2e} | "
                     f"{r['max_abs_fp32']:.2e} | {r['max_abs_software']:.2e} |")
    worst = max(rows, key=lambda r: r["ratio"])
    lines.append("")
    lines.append(f"Worst ratio {worst['ratio']:.3f} ({worst['kind']}, {worst['mode']}, "
                 f"{'x'.join(map(str, worst['shape']))}); the contract allows 1.100. "
                 f"fp32 output: worst ratio {max(r['rel_fp32'] / r['rel_software'] for r in rows if r['rel_software']):.3g}.")
    return "\n".join(lines)


def summary(rows):
    """One line per activation kind and direction: the worst over the shapes."""
    lines = ["| activations | mode | worst ratio, bf16 out (contract: 1.1) | rel. error: ours bf16 out | ours fp32 out | "
             "bitsandbytes bf16 | max abs error: ours bf16 out | ours fp32 out | bitsandbytes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in golden.ACTIVATION_KINDS:
        for mode in ("forward", "backward"):
            group = [r for r in rows if r["kind"] == kind and r["mode"] == mode]
            worst = {key: max(r[key] for r in group) for key in group[0] if key.startswith(("rel_", "max_abs_"))}
            lines.append(f"| {kind} | {mode} | {max(r['ratio'] for r in group):.3f} | {worst['rel_bf16']:.2e} | "
                         f"{worst['rel_fp32']:.2e} | {worst['rel_software']:.2e} | {worst['max_abs_bf16']:.2e} | "
                         f"{worst['max_abs_fp32']:.2e} | {worst['max_abs_software']:.2e} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for gemm_accuracy.md and .json")
    args = parser.parse_args()
    rows = measure()
    text = summary(rows) + "\n\nEvery case:\n\n" + table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemm_accuracy.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "gemm_accuracy.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
