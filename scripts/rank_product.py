"""The unit that makes hb and gb (``rtl/rank_product.py``) on a token block of TinyLlama's blocked step, on Verilator.

    python scripts/rank_product.py                            # hb and gb of a 128-token block, r = 16
    python scripts/rank_product.py --build build/rank_product # place the unit on the ULX3S-85F: resources, Fmax

Per product: a token block's activation (random bf16, x with d_in = 2048 for hb, dy with d_out = 2048 for gb)
passes through the unit span by span with A's (or B's) span pieces, as in the block controller's first feature
block; its rows are checked against the twin (zero mismatches, or the script fails), and every value it passes on
against the one sent. Printed: cycles, the activation values and operands it took, values per cycle, and the
cycles the SDRAM's 16-bit port needs to deliver the same bytes (one bf16 or half a float32 a cycle).
"""

import argparse
import json

import numpy as np
import torch

from edge_qlora.rtl.rank_product import RankProduct, RankProductConfig
from edge_qlora.sim.rank_product import ProductBlock, run_rank_product

RANK = 16


def _bf16(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16)


def blocks(tokens, k, seed=0):
    """hb's block (x [tokens, k], A [16, k]) and gb's (dy [tokens, k], B [k, 16])."""
    rng = np.random.default_rng(seed)
    return {"hb = bf16(x A^T)": ProductBlock(_bf16(rng.normal(0, 1, (tokens, k))),
                                             _bf16(rng.normal(0, 0.02, (RANK, k)))),
            "gb = bf16(dy B)": ProductBlock(_bf16(rng.normal(0, 0.01, (tokens, k))),
                                            _bf16(rng.normal(0, 0.02, (k, RANK))), transposed=True)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="token rows a block, 1 to 512 (default: "
                        "%(default)s)")
    parser.add_argument("--reduction", type=int, default=2048, help="d_in (hb) or d_out (gb), a multiple of 64 "
                        "(default: %(default)s)")
    parser.add_argument("--backend", choices=("verilator", "pysim"), default="verilator")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--build", metavar="DIR", help="instead of simulating, place the unit on the ULX3S-85F")
    args = parser.parse_args(argv)
    if not 1 <= args.tokens <= 512:
        parser.error("--tokens must be from 1 to 512")
    if args.reduction < 64 or args.reduction % 64 or args.reduction > 8192:
        parser.error("--reduction must be a multiple of 64 from 64 to 8192")
    config = RankProductConfig(rank=RANK, max_tokens=max(128, args.tokens))
    if args.build:
        from edge_qlora.boards.build import place

        place(RankProduct(config), "ulx3s-85f", args.build)
        return
    print("| product | tokens x reduction | activation values | operands | cycles | values per cycle | "
          "16-bit port's cycles for the bytes | mismatches |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for name, block in blocks(args.tokens, args.reduction).items():
        run = run_rank_product(config, [block], backend=args.backend)
        tokens, k = block.activation.shape
        values, operands = tokens * k, RANK * k
        port = values + 2 * operands
        row = {"product": name, "tokens": tokens, "reduction": k, "values": values, "operands": operands,
               "cycles": run.cycles, "values_per_cycle": values / run.cycles, "port_cycles": port,
               "mismatches": run.mismatches, "passed_mismatches": run.passed_mismatches, "backend": args.backend}
        rows.append(row)
        print(f"| {name} | {tokens} x {k} | {values:,} | {operands:,} | {run.cycles:,} | {values / run.cycles:.3f} | "
              f"{port:,} | {run.mismatches} |", flush=True)
        if run.mismatches or run.passed_mismatches:
            raise SystemExit(f"error: {name}: {run.mismatches} rows' values and {run.passed_mismatches} passed "
                             f"values differ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": repr(config), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
