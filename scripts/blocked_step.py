"""The blocked step: its measured parts side by side against the step's lower bound of traffic, or (``--run``) whole
steps on the one top that runs them all (``rtl/blocked_step.py``) at TinyLlama's shapes on Verilator.

    python scripts/blocked_step.py                  # from the committed rows of docs/
    python scripts/blocked_step.py --forward F.json --backward B.json --update U.json --json step.json
    python scripts/blocked_step.py --run k_proj q_proj --json docs/blocked_step_sdram.json
    python scripts/blocked_step.py --build DIR      # place the step top on the ULX3S-85F

From rows: reads the rows of ``scripts/blocked_product.py --rank-term --gradient`` (forward: y, hb and x's chunk
fields), ``... --backward --rank-term --gradient`` (backward: dx, grad_B, gb and grad_A) and
``scripts/update_pass.py`` (the AdamW updates of A and B) for one memory and T, and per projection gives the parts'
cycles, the engine's PE utilization over the step (``2 T d_in d_out`` MACs), the bytes they moved (measured by the
RTL's counters) and those bytes against ``golden.traffic.lower_bound`` of the whole step (W twice, x, dy, y, dx
once, A, B and the moments read and written once).

``--run``: one step of each projection named (T = 128, r = 16, AdamW, random inputs with moments from earlier
steps), its four descriptors (forward, backward, update of A, of B) on one ``BlockedStep`` (8x8, feature blocks of
at most 384) against the DRAM model; every output (y, dx, grad_A, grad_B, the new A, B and moments) checked
against ``golden.lora.step_model`` to the bit.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from blocked_product import SHAPES, design, plan  # noqa: E402  (the projections' shapes and blocks)

from edge_qlora.constants import DRAM_PRESETS  # noqa: E402
from edge_qlora.golden import traffic  # noqa: E402
from edge_qlora.golden.lora import random_case, step_model  # noqa: E402
from edge_qlora.rtl.blocked_step import STEP_UPDATE_GROUP, StepConfig  # noqa: E402
from edge_qlora.rtl.update import UpdateConfig  # noqa: E402
from edge_qlora.sim.blocked_step import model_cycles, run_blocked_step  # noqa: E402

RANK = 16
MAX_FEATURES = 384
#: the projections of a shape that SHAPES names by another (run with other random inputs)
SAME_SHAPE = {"v_proj": "k_proj", "o_proj": "q_proj", "up_proj": "gate_proj"}


def _bound(name, tokens):
    d_in, d_out = SHAPES[SAME_SHAPE.get(name, name)]
    bound = traffic.lower_bound(traffic.StepShape(d_in, d_out, tokens, RANK))
    return sum(bound.read.values()) + sum(bound.written.values())


def _row(name, tokens, memory, cycles, moved):
    """A step row: the parts' cycles (``{part: cycles}``) and the bytes moved, against the lower bound."""
    d_in, d_out = SHAPES[SAME_SHAPE.get(name, name)]
    total = sum(cycles.values())
    bound = _bound(name, tokens)
    return dict(projection=name, tokens=tokens, memory=memory, **{f"{part}_cycles": c for part, c in cycles.items()},
                cycles=total, utilization=2 * tokens * d_in * d_out / (64 * total), bytes_moved=moved,
                lower_bound_bytes=bound, ratio=moved / bound)


def step_rows(forward, backward, update):
    """One row per projection present in all three lists (``update``: ``scripts/update_pass.py``'s rows, one per
    projection and factor)."""
    back = {row["projection"]: row for row in backward}
    updates = {}
    for row in update:
        updates.setdefault(row["projection"], []).append(row)
    rows = []
    for f in forward:
        name = f["projection"]
        if name not in back or name not in updates or name not in SHAPES:
            continue
        b, u = back[name], updates[name]
        if (f["tokens"], f["memory"]) != (b["tokens"], b["memory"]) or any(r["memory"] != f["memory"] for r in u):
            raise ValueError(f"{name}: the rows are for different T or memory")
        if sorted(r["factor"] for r in u) != ["A", "B"]:
            raise ValueError(f"{name}: the update rows must be one of A and one of B")
        cycles = {"forward": f["cycles"], "backward": b["cycles"], "update": sum(r["cycles"] for r in u)}
        moved = f["bytes_moved"] + b["bytes_moved"] + sum(r["bytes"] for r in u)
        rows.append(_row(name, f["tokens"], f["memory"], cycles, moved))
    return rows


def _load(path):
    with open(path) as f:
        rows = json.load(f)
    return rows["rows"] if isinstance(rows, dict) else rows


def step_top(memory, tokens=128):
    """The step top's configuration for every projection at ``tokens``: ``blocked_product.py``'s design with both
    products, the terms and the gradients, and the update on the same port."""
    product, _ = design(tokens, True, memory, True, MAX_FEATURES, gradient=True)
    return StepConfig(product=product, update=UpdateConfig(port=product.port, group=STEP_UPDATE_GROUP))


def run_step(name, memory, tokens=128, seed=0):
    """One whole step of projection ``name`` on the step top: a row with each part's cycles and the bytes moved,
    measured by the RTL's counters."""
    config = step_top(memory, tokens)
    shape = SAME_SHAPE.get(name, name)
    forward, backward = plan(tokens, False, MAX_FEATURES)[shape], plan(tokens, True, MAX_FEATURES)[shape]
    d_in, d_out = SHAPES[shape]
    seed += name != shape
    case = dataclasses.replace(random_case(tokens, d_in, d_out, RANK, seed=seed, states=True, step=3),
                               weight_decay=0.01)
    start = time.perf_counter()
    run = run_blocked_step(case, forward, backward, config, memory=memory, backend="verilator")
    wall = time.perf_counter() - start
    want = step_model(case)
    bad = sum(int((_bits(run.outputs[k]) != _bits(v)).sum()) for k, v in want.items())
    if bad:
        raise SystemExit(f"error: {name}: {bad} outputs differ from golden.lora.step_model")
    if run.read_bytes != run.program_read_bytes or run.written_bytes != run.program_written_bytes:
        raise SystemExit(f"error: {name}: the counters' bytes differ from the programs'")
    cycles = {"forward": run.cycles["forward"], "backward": run.cycles["backward"],
              "update": run.cycles["update_A"] + run.cycles["update_B"]}
    moved = sum(run.read_bytes.values()) + sum(run.written_bytes.values())
    row = _row(name, tokens, memory, cycles, moved)
    timing = DRAM_PRESETS[memory]
    model = model_cycles(case, forward, backward, config, memory)
    row.update(blocks={"forward": list(forward), "backward": list(backward)}, part_cycles=run.cycles,
               model_cycles=sum(model.values()), part_model_cycles=model,
               model_error=sum(model.values()) / row["cycles"] - 1, stall_cycles=run.stall_cycles,
               read_bytes=run.read_bytes, written_bytes=run.written_bytes,
               bandwidth=moved / (row["cycles"] * timing.peak_bytes_per_cycle), mismatches=bad, wall_s=wall,
               r=RANK, rows=config.product.rows, cols=config.product.cols, date=datetime.date.today().isoformat())
    return row


def _bits(tensor):
    """``tensor``'s bit patterns (bf16 or float32)."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward", default="docs/blocked_gradient384_forward_sdram.json", metavar="FILE",
                        help="rows of blocked_product.py --rank-term --gradient (default: %(default)s)")
    parser.add_argument("--backward", default="docs/blocked_gradient384_backward_sdram.json", metavar="FILE",
                        help="rows of blocked_product.py --backward --rank-term --gradient (default: %(default)s)")
    parser.add_argument("--update", default="docs/update_pass_sdram.json", metavar="FILE",
                        help="rows of update_pass.py (default: %(default)s)")
    names = list(SHAPES) + list(SAME_SHAPE)
    parser.add_argument("--run", nargs="+", choices=names, metavar="NAME",
                        help=f"instead, run whole steps of these projections ({', '.join(names)}) on the step top "
                        "(Verilator; v/o/up_proj on k/q/gate_proj's shapes with other random inputs)")
    parser.add_argument("--memory", choices=list(DRAM_PRESETS), default="ulx3s-sdram", help="with --run")
    parser.add_argument("--build", metavar="DIR", help="instead, place the step top (8x8, feature blocks of at most "
                        f"{MAX_FEATURES}, the ULX3S SDRAM's port) on the ULX3S-85F")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.build:
        from edge_qlora.boards.build import place
        from edge_qlora.rtl.blocked_step import BlockedStep

        place(BlockedStep(step_top(args.memory)), "ulx3s-85f", args.build)
        return
    if args.run:
        print("| projection | forward cycles | backward cycles | update cycles (A, B) | step cycles | PE utilization "
              "| cycle model | model error | bytes moved | step's lower bound | / lower bound | bandwidth (of peak) "
              "| mismatches |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        rows = []
        for name in args.run:
            r = run_step(name, args.memory)
            rows.append(r)
            print(f"| {name} | {r['forward_cycles']:,} | {r['backward_cycles']:,} | {r['update_cycles']:,} | "
                  f"{r['cycles']:,} | {r['utilization']:.1%} | {r['model_cycles']:,} | {r['model_error']:+.2%} | "
                  f"{r['bytes_moved'] / 1e6:.2f} MB | "
                  f"{r['lower_bound_bytes'] / 1e6:.2f} MB | {r['ratio']:.2f} | {r['bandwidth']:.1%} | "
                  f"{r['mismatches']} |", flush=True)
    else:
        try:
            rows = step_rows(_load(args.forward), _load(args.backward), _load(args.update))
        except (OSError, ValueError, KeyError, TypeError) as error:
            sys.exit(f"error: {error}")
        if not rows:
            sys.exit("error: no projection is in all three files")
        print("| projection | forward cycles | backward cycles | update cycles (A + B) | step cycles | "
              "PE utilization | bytes moved | step's lower bound | / lower bound |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['projection']} | {r['forward_cycles']:,} | {r['backward_cycles']:,} | "
                  f"{r['update_cycles']:,} | {r['cycles']:,} | {r['utilization']:.1%} | "
                  f"{r['bytes_moved'] / 1e6:.2f} MB | {r['lower_bound_bytes'] / 1e6:.2f} MB | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
