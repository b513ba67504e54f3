"""The blocked step as far as it is built: the forward and backward products' measured runs side by side, against
the step's lower bound of traffic.

    python scripts/blocked_step.py                  # from the committed rows of docs/
    python scripts/blocked_step.py --forward F.json --backward B.json --json step.json

Reads the rows of ``scripts/blocked_product.py --rank-term --gradient`` (forward: y, hb and x's chunk fields) and
``... --backward --rank-term --gradient`` (backward: dx, grad_B, gb and grad_A) for one memory and T, and per
projection gives both products' cycles, the engine's PE utilization over the two (``2 T d_in d_out`` MACs), the
bytes they moved (measured by the RTL's counters) and those bytes against ``golden.traffic.lower_bound`` of the
whole step (W twice, x, dy, y, dx once, A, B and the moments read and written once). The update is not built: the
last columns add a modelled update pass (grad_A and grad_B read back, A, B and AdamW's two moments read and
written once, ``golden.traffic.StepShape``'s sizes) to the measured bytes. Measured and modelled columns are
labelled as such.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from blocked_product import SHAPES  # noqa: E402  (the projections' shapes, from the script that makes the rows)

from edge_qlora.golden import traffic  # noqa: E402

RANK = 16


def step_rows(forward, backward):
    """One row per projection present in both lists of ``blocked_product.py`` rows."""
    back = {row["projection"]: row for row in backward}
    rows = []
    for f in forward:
        name = f["projection"]
        if name not in back or name not in SHAPES:
            continue
        b = back[name]
        if (f["tokens"], f["memory"]) != (b["tokens"], b["memory"]):
            raise ValueError(f"{name}: the forward and backward rows are for different T or memory")
        d_in, d_out = SHAPES[name]
        shape = traffic.StepShape(d_in, d_out, f["tokens"], RANK)
        bound = traffic.lower_bound(shape)
        bound_bytes = sum(bound.read.values()) + sum(bound.written.values())
        update = 2 * (shape.size("A") + shape.size("B") + shape.state_bytes) + shape.size("grad_A") + \
            shape.size("grad_B")
        cycles = f["cycles"] + b["cycles"]
        moved = f["bytes_moved"] + b["bytes_moved"]
        rows.append(dict(projection=name, tokens=f["tokens"], memory=f["memory"], forward_cycles=f["cycles"],
                         backward_cycles=b["cycles"], cycles=cycles,
                         utilization=2 * f["tokens"] * d_in * d_out / (64 * cycles), bytes_moved=moved,
                         lower_bound_bytes=bound_bytes, ratio=moved / bound_bytes, update_bytes_modelled=update,
                         ratio_with_update=(moved + update) / bound_bytes))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward", default="docs/blocked_gradient384_forward_sdram.json", metavar="FILE",
                        help="rows of blocked_product.py --rank-term --gradient (default: %(default)s)")
    parser.add_argument("--backward", default="docs/blocked_gradient384_backward_sdram.json", metavar="FILE",
                        help="rows of blocked_product.py --backward --rank-term --gradient (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        with open(args.forward) as f, open(args.backward) as b:
            rows = step_rows(json.load(f), json.load(b))
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"error: {error}")
    if not rows:
        sys.exit("error: no projection is in both files")
    print("| projection | forward cycles | backward cycles | both | PE utilization | bytes moved (measured) | "
          "step's lower bound | / lower bound | with a modelled update pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['projection']} | {r['forward_cycles']:,} | {r['backward_cycles']:,} | {r['cycles']:,} | "
              f"{r['utilization']:.1%} | {r['bytes_moved'] / 1e6:.2f} MB | {r['lower_bound_bytes'] / 1e6:.2f} MB | "
              f"{r['ratio']:.2f} | {r['ratio_with_update']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
