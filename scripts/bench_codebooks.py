#!/usr/bin/env python3
"""Weights per cycle of the code-book cores at every code width, NF table and loaded table, measured on the RTL.

Each configuration dequantizes (and quantizes, when the quantizer takes the width) the same 16384-weight bf16
tensor, blocksize 64 with double quantization, with no stalls, and counts cycles from the first input offered to
the last output taken. Prints a Markdown table (the one in docs/codebooks.md) and writes it with a JSON copy.

    python scripts/bench_codebooks.py --out build/bench-codebooks         # pysim, a few minutes
"""

import argparse
import inspect
import json
import os

import torch

from edge_qlora.golden import codebook
from edge_qlora.golden.codebook import Codebook
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig
from edge_qlora.sim.nf4 import run_dequantizer

LANES = (1, 4, 8, 16)
#: a 2-, 3- and 4-bit table that is not a NormalFloat one, for the loaded-table cores
UNIFORM = {bits: Codebook(torch.linspace(-1, 1, 2 ** bits).numpy()) for bits in (2, 3, 4)}


def quantizer_rate(weight, lanes, bits, table, book, backend):
    """Weights/cycle of the quantizer, or None where it does not take a code width."""
    from edge_qlora.rtl.nf4_quant import NF4QuantConfig
    from edge_qlora.sim.nf4_quant import run_quantizer

    if "bits" not in inspect.signature(NF4QuantConfig).parameters:
        return None
    config = NF4QuantConfig(lanes=lanes, blocksize=64, in_dtype="bf16", bits=bits, table=table)
    kwargs = {"codebook": book} if table == "loaded" else {}
    run = run_quantizer(weight, config, backend=backend, **kwargs)
    return weight.numel() / run.cycles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/bench-codebooks", help="output folder")
    parser.add_argument("--backend", choices=("pysim", "verilator"), default="pysim")
    parser.add_argument("--lanes", type=int, nargs="+", default=list(LANES), help="lane counts")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(128, 128, generator=gen) * 0.02).to(torch.bfloat16)
    rows = []
    for bits in (2, 3, 4):
        for table in ("nf", "loaded"):
            book = Codebook.nf(bits) if table == "nf" else UNIFORM[bits]
            q = codebook.quantize(weight, codebook=book)
            for lanes in args.lanes:
                config = NF4DequantConfig(lanes=lanes, blocksize=64, bits=bits, table=table)
                run = run_dequantizer(q, config, backend=args.backend)
                row = {"bits": bits, "table": table, "lanes": lanes, "multipliers": config.table_multipliers,
                       "dequant_weights_per_cycle": weight.numel() / run.cycles,
                       "quant_weights_per_cycle": quantizer_rate(weight, lanes, bits, table, book, args.backend)}
                rows.append(row)
                print(row, flush=True)
    lines = ["| bits | table | lanes | table multipliers | dequantizer w/cycle | quantizer w/cycle |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        quant = row["quant_weights_per_cycle"]
        lines.append(f"| {row['bits']} | {row['table']} | {row['lanes']} | {row['multipliers']} | "
                     f"{row['dequant_weights_per_cycle']:.2f} | {'' if quant is None else f'{quant:.2f}'} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "bench_codebooks.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "bench_codebooks.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
