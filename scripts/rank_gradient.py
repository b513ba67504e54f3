"""The unit that makes grad_B and grad_A, and hb and gb (``rtl/rank_gradient.py``), on a token block of TinyLlama's
step, on Verilator.

    python scripts/rank_gradient.py                             # grad_B, grad_A, hb and gb at T = 128, r = 16
    python scripts/rank_gradient.py --build build/rank_gradient # place the unit on the ULX3S-85F: resources, Fmax

Per gradient: an activation (random bf16: dy with d_out = 2048 for grad_B, x with d_in = 2048 for grad_A) passes
through the unit span by span after the token block's rows (hb or gb); its gradient is checked against the twin
(zero mismatches, or the script fails), and every value it passes on against the one sent. Per product (hb from x
and A, gb from dy and B, the blocks of ``scripts/rank_product.py``): its rows against ``golden/rank_product.py``.
Printed: cycles, the activation values, values per cycle, and the cycles the SDRAM's 16-bit port needs to move the
same bytes (a gradient's activation and rows in and float32 gradient out; a product's activation and float32
operands in).
"""

import argparse
import json

import numpy as np
import torch

from edge_qlora.rtl.rank_gradient import RankGradient, RankGradientConfig
from edge_qlora.sim.rank_gradient import GradientBlock, run_rank_gradient
from edge_qlora.sim.rank_product import ProductBlock

from rank_product import blocks as product_blocks

RANK = 16


def _bf16(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16)


def blocks(tokens, k, seed=0):
    """grad_B's gradient (dy [tokens, k], hb [tokens, 16]) and grad_A's (x [tokens, k], gb [tokens, 16])."""
    rng = np.random.default_rng(seed)
    return {"grad_B = s dy^T hb": GradientBlock(_bf16(rng.normal(0, 0.01, (tokens, k))),
                                                _bf16(rng.normal(0, 1, (tokens, RANK))), scale=2.0),
            "grad_A = s gb^T x": GradientBlock(_bf16(rng.normal(0, 1, (tokens, k))),
                                               _bf16(rng.normal(0, 0.01, (tokens, RANK))), scale=2.0,
                                               transposed=True)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="token rows, the whole reduction, 1 to 512 "
                        "(default: %(default)s)")
    parser.add_argument("--features", type=int, default=2048, help="the activation's width, a multiple of 64 "
                        "(default: %(default)s)")
    parser.add_argument("--backend", choices=("verilator", "pysim"), default="verilator")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--build", metavar="DIR", help="instead of simulating, place the unit on the ULX3S-85F")
    args = parser.parse_args(argv)
    if not 1 <= args.tokens <= 512:
        parser.error("--tokens must be from 1 to 512")
    if args.features < 64 or args.features % 64 or args.features > 8192:
        parser.error("--features must be a multiple of 64 from 64 to 8192")
    config = RankGradientConfig(rank=RANK, max_tokens=max(128, args.tokens))
    if args.build:
        from edge_qlora.boards.build import place

        place(RankGradient(config), "ulx3s-85f", args.build)
        return
    print("| gradient or rows | tokens x features | activation values | cycles | values per cycle | "
          "16-bit port's cycles for the bytes | mismatches |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    work = {**blocks(args.tokens, args.features), **product_blocks(args.tokens, args.features)}
    for name, block in work.items():
        run = run_rank_gradient(config, [block], backend=args.backend)
        tokens, k = block.activation.shape
        values = tokens * k
        product = isinstance(block, ProductBlock)
        port = values + 2 * k * RANK + (0 if product else tokens * RANK)
        wrong = run.row_mismatches if product else run.mismatches
        row = {"gradient": name, "tokens": tokens, "features": k, "values": values, "cycles": run.cycles,
               "values_per_cycle": values / run.cycles, "port_cycles": port, "mismatches": wrong,
               "passed_mismatches": run.passed_mismatches, "backend": args.backend}
        rows.append(row)
        print(f"| {name} | {tokens} x {k} | {values:,} | {run.cycles:,} | {values / run.cycles:.3f} | {port:,} | "
              f"{wrong} |", flush=True)
        if wrong or run.passed_mismatches:
            raise SystemExit(f"error: {name}: {wrong} values and {run.passed_mismatches} passed values differ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": repr(config), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
