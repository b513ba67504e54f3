"""The rank-r term unit (``rtl/rank_term.py``) on blocks of TinyLlama's blocked step, on Verilator.

    python scripts/rank_term.py                          # a forward and a backward block, T = 128, r = 16
    python scripts/rank_term.py --build build/rank_term  # place the unit on the ULX3S-85F: resources, Fmax estimate

Per block: the base outputs (random float32, as the engine's accumulator gives them), hb or gb (the bf16 of
random x A^T or dy B products' size), B's rows or A's columns (bf16, A with the exponent its rows share over all
of A); the unit's outputs are checked against its twin (zero mismatches, or the script fails). Printed: cycles,
outputs, outputs per cycle, and the cycles the engine's 8x8 array takes for the same block's last span (its
outputs come in that span: ``tokens / 8 * columns / 8`` tiles of 64 reduction steps).
"""

import argparse
import json

import numpy as np
import torch

from edge_qlora.golden import rank_term as golden
from edge_qlora.rtl.rank_term import RankTerm, RankTermConfig
from edge_qlora.sim.rank_term import TermBlock, run_rank_term

ROWS = COLS = 8
RANK = 16


def _bf16(values):
    return torch.from_numpy(np.asarray(values, np.float32)).to(torch.bfloat16)


def blocks(tokens, features, columns, d_in, seed=0):
    """A forward block (q_proj's 128 x ``features``) and a backward block (``columns`` of A's ``d_in``)."""
    rng = np.random.default_rng(seed)
    a = _bf16(rng.normal(0, 0.02, (RANK, d_in)))
    forward = TermBlock(rng.normal(0, 1, (tokens, features)).astype(np.float32),
                        _bf16(rng.normal(0, 0.5, (tokens, RANK))), _bf16(rng.normal(0, 0.02, (features, RANK))), 2.0)
    backward = TermBlock(rng.normal(0, 1, (tokens, columns)).astype(np.float32),
                         _bf16(rng.normal(0, 0.5, (tokens, RANK))), a[:, :columns].T.contiguous(), 2.0,
                         transposed=True, exponent=golden.column_exponent(a))
    return {"forward": forward, "backward": backward}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="token rows a block, a multiple of 8 "
                        "(default: %(default)s)")
    parser.add_argument("--features", type=int, default=416, help="the forward block's outputs (default: "
                        "%(default)s, q_proj's at T = 128)")
    parser.add_argument("--columns", type=int, default=448, help="the backward block's columns (default: "
                        "%(default)s)")
    parser.add_argument("--backend", choices=("verilator", "pysim"), default="verilator")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--build", metavar="DIR", help="instead of simulating, place the unit on the ULX3S-85F")
    args = parser.parse_args(argv)
    for name in ("tokens", "features", "columns"):
        value, step = getattr(args, name), ROWS if name == "tokens" else COLS
        if value < step or value % step or value > 2048:
            parser.error(f"--{name} must be a multiple of {step} from {step} to 2048")
    config = RankTermConfig(rows=ROWS, cols=COLS, rank=RANK, max_tokens=max(128, args.tokens),
                            max_columns=max(472, args.features, args.columns))
    if args.build:
        from edge_qlora.boards.build import place

        place(RankTerm(config), "ulx3s-85f", args.build)
        return
    print("| block | tokens x columns | outputs | cycles | outputs per cycle | engine's last span (cycles) | "
          "mismatches |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for name, block in blocks(args.tokens, args.features, args.columns, 2048).items():
        run = run_rank_term(config, [block], backend=args.backend)
        tokens, columns = block.base.shape
        outputs = tokens * columns
        span = tokens // ROWS * (columns // COLS) * 64
        row = {"block": name, "tokens": tokens, "columns": columns, "outputs": outputs, "cycles": run.cycles,
               "outputs_per_cycle": outputs / run.cycles, "engine_last_span_cycles": span,
               "mismatches": run.mismatches, "backend": args.backend}
        rows.append(row)
        print(f"| {name} | {tokens} x {columns} | {outputs:,} | {run.cycles:,} | {outputs / run.cycles:.3f} | "
              f"{span:,} | {run.mismatches} |", flush=True)
        if run.mismatches:
            raise SystemExit(f"error: {run.mismatches} outputs of the {name} block differ from the twin")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": repr(config), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
