"""The step top's products against their cycle model with memory (``sim/span_model.py``), on small shapes.

    python scripts/span_model_check.py                       # both presets, print the table
    python scripts/span_model_check.py --json docs/span_model.json

Runs the forward and the backward product of one step (r = 16, AdamW, random inputs) for each shape on the one
step top that ``scripts/blocked_step.py --run`` builds (8x8, feature blocks of at most 384; one Verilator model per
memory, shared with the bench) against the DRAM model, and gives each product's cycles beside the span model's.
Shapes are ``T,in,out``; the DDR3's port word needs ``in`` a multiple of 512. ``SHAPES`` are those the model was
written against (``"set": "fit"`` in the rows), ``HELD_OUT`` shapes it was checked on afterwards, untouched
(``"held-out"``: T not a power of two, other widths).
"""

import argparse
import datetime
import json
import sys
import time

from edge_qlora import bench
from edge_qlora.golden.lora import random_case
from edge_qlora.sim.blocked_step import run_blocked_step, step_blocks
from edge_qlora.sim.span_model import backward_cycles, forward_cycles

SHAPES = {
    "ulx3s-sdram": ["8,256,64", "8,256,384", "16,256,64", "16,256,256", "16,256,384", "16,256,768", "32,256,64",
                    "32,256,384", "64,256,384", "16,768,256", "16,1024,256", "32,1024,384", "16,2048,256",
                    "128,256,384"],
    "ecpix5-ddr3": ["8,512,64", "8,512,384", "16,512,64", "16,512,256", "16,512,384", "16,512,768", "32,512,64",
                    "32,512,384", "64,512,384", "16,1024,256", "16,2048,256", "32,2048,256", "64,2048,256",
                    "128,512,384"],
}
HELD_OUT = {
    "ulx3s-sdram": ["48,512,128", "16,512,512", "8,1024,64", "64,768,256", "24,256,448", "40,512,192"],
    "ecpix5-ddr3": ["24,1024,128", "48,512,512", "8,2048,64", "40,1536,192", "16,512,448"],
}


def check(memory, shape, config):
    t, d_in, d_out = shape
    case = random_case(t, d_in, d_out, config.product.rank, "adamw", seed=0)
    forward, backward = step_blocks(t, d_in, d_out, config.product.cols, bench.BLOCKED_MAX_FEATURES)
    run = run_blocked_step(case, forward, backward, config, memory=memory, backend="verilator",
                           parts=("forward", "backward"))
    pc = config.product
    rows = []
    for part, blocks, model in (("forward", forward, forward_cycles), ("backward", backward, backward_cycles)):
        span = model(pc, memory, t, d_in, d_out, *blocks, pc.rank)
        rows.append({"memory": memory, "shape": [t, d_in, d_out], "part": part, "blocks": list(blocks),
                     "cycles": run.cycles[part], "model_cycles": span,
                     "model_error": span / run.cycles[part] - 1})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", choices=sorted(SHAPES), action="append",
                        help="a board preset (repeat for both; default both)")
    parser.add_argument("--shape", action="append", metavar="T,IN,OUT", help="instead of the default shapes")
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for memory in args.memory or sorted(SHAPES, reverse=True):
        config = bench.blocked_step_config(bench.options(memory=memory))
        shapes = [(text, None) for text in args.shape] if args.shape else \
            [(text, "fit") for text in SHAPES[memory]] + [(text, "held-out") for text in HELD_OUT[memory]]
        for text, which in shapes:
            try:
                shape = tuple(int(v) for v in text.split(","))
                if len(shape) != 3:
                    raise ValueError
            except ValueError:
                sys.exit(f"error: --shape takes T,IN,OUT (three integers), not {text!r}")
            started = time.monotonic()
            try:
                new = check(memory, shape, config)
            except ValueError as error:
                sys.exit(f"error: {text} on {memory}: {error}")
            for row in new:
                if which:
                    row["set"] = which
                row["date"] = datetime.date.today().isoformat()
                print(f"{memory:12} {text:13} {row['part']:8} RTL {row['cycles']:9,}  span model "
                      f"{row['model_cycles']:9,} ({100 * row['model_error']:+.1f}%)  "
                      f"[{time.monotonic() - started:.0f} s]", flush=True)
            rows += new
    print("\n| memory | T, in -> out | blocks (features) fw / bw | forward RTL | span model | error | backward RTL "
          "| span model | error | both products' error |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for forward, backward in zip(rows[::2], rows[1::2]):
        both = (forward["model_cycles"] + backward["model_cycles"]) / (forward["cycles"] + backward["cycles"]) - 1
        t, d_in, d_out = forward["shape"]
        held = " (held out)" if forward.get("set") == "held-out" else ""
        print(f"| {forward['memory']} | {t}, {d_in} -> {d_out}{held} | {forward['blocks'][1]} / "
              f"{backward['blocks'][1]} | "
              + " | ".join(f"{row['cycles']:,} | {row['model_cycles']:,} | {100 * row['model_error']:+.1f}%"
                           for row in (forward, backward)) + f" | {100 * both:+.1f}% |")
    for which in sorted({row.get("set") for row in rows}, key=str):
        for part in ("forward", "backward"):
            errors = [abs(row["model_error"]) for row in rows if row["part"] == part and row.get("set") == which]
            print(f"{which or 'shapes'} {part}: {len(errors)} products, |error| at most {100 * max(errors):.1f}%, "
                  f"mean {100 * sum(errors) / len(errors):.1f}%, {sum(e <= 0.03 for e in errors)} within 3%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
