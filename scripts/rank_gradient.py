"""The unit that makes grad_B and grad_A (``rtl/rank_gradient.py``) on a token block of TinyLlama's step, on
Verilator.

    python scripts/rank_gradient.py                             # grad_B and grad_A at T = 128, r = 16
    python scripts/rank_gradient.py --build build/rank_gradient # place the unit on the ULX3S-85F: resources, Fmax

Per gradient: an activation (random bf16: dy with d_out = 2048 for grad_B, x with d_in = 2048 for grad_A) passes
through the unit span by span after the token block's rows (hb or gb); its gradient is checked against the twin
(zero mismatches, or the script fails), and every value it passes on against the one sent. Printed: cycles, the
activation values, values per cycle, and the cycles the SDRAM's 16-bit port needs to move the same bytes (the
activation and the rows in, the float32 gradient out).
"""

import argparse
import json

import numpy as np
import torch

from edge_qlora.rtl.rank_gradient import RankGradient, RankGradientConfig
from edge_qlora.sim.rank_gradient import GradientBlock, run_rank_gradient

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
    print("| gradient | tokens x features | activation values | cycles | values per cycle | "
          "16-bit port's cycles for the bytes | mismatches |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for name, block in blocks(args.tokens, args.features).items():
        run = run_rank_gradient(config, [block], backend=args.backend)
        tokens, k = block.activation.shape
        values = tokens * k
        port = values + tokens * RANK + 2 * k * RANK
        row = {"gradient": name, "tokens": tokens, "features": k, "values": values, "cycles": run.cycles,
               "values_per_cycle": values / run.cycles, "port_cycles": port, "mismatches": run.mismatches,
               "passed_mismatches": run.passed_mismatches, "backend": args.backend}
        rows.append(row)
        print(f"| {name} | {tokens} x {k} | {values:,} | {run.cycles:,} | {values / run.cycles:.3f} | {port:,} | "
              f"{run.mismatches} |", flush=True)
        if run.mismatches or run.passed_mismatches:
            raise SystemExit(f"error: {name}: {run.mismatches} gradient values and {run.passed_mismatches} passed "
                             f"values differ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": repr(config), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
