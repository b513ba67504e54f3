#!/usr/bin/env python3
"""Simulated cycles per second of the 8x8 step accelerator: Amaranth's simulator against Verilator, side by side.

    python scripts/bench_verilator.py                 # a few minutes (pysim runs one small step)
    python scripts/bench_verilator.py --json FILE

Both backends run the same step (T=8, in=64, out=64, r=8, AdamW) on the same 8x8 step top; Verilator also runs a
long step (k_proj of TinyLlama, T=16: 359k cycles) on the top sized for TinyLlama's projections, where its speed
is steady. Each figure is one process on one core. "wall" counts the whole call (pysim: elaborating the design;
Verilator: building the input files, spawning the model, reading the outputs); "loop" only the simulation
(Verilator: the compiled harness's loop; pysim: the cycles between its first and last progress report). The first run of a configuration
also exports and compiles its model; that is done before timing.
"""

import argparse
import json
import time

from edge_qlora.golden import lora
from edge_qlora.rtl.lora import LoraConfig
from edge_qlora.sim import verilator
from edge_qlora.sim.lora import run_step
from edge_qlora.tinyllama import model_config


def timed(case, config, backend):
    """``(run, wall seconds, loop seconds)``; pysim's "loop" is the time from its first to its last progress
    report (every 256 cycles), which leaves out elaboration, and is scaled to the whole run's cycles."""
    marks = []
    start = time.perf_counter()
    run = run_step(case, config, backend=backend, progress=lambda done, total: marks.append((time.perf_counter(),
                                                                                           done)))
    wall = time.perf_counter() - start
    if backend == "verilator":
        return run, wall, verilator.LAST_RUN.get("seconds")
    (t0, c0), (t1, c1) = marks[0], marks[-1]
    return run, wall, (t1 - t0) / (c1 - c0) * run.cycles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the rows there")
    parser.add_argument("--skip-long", action="store_true", help="skip the TinyLlama-sized step")
    args = parser.parse_args()

    small = lora.random_case(8, 64, 64, 8, seed=1)
    config = LoraConfig(rows=8, cols=8, max_t=8, max_in=64, max_out=64, max_rank=8)
    run_step(small, config, backend="verilator")          # build (or find) the model before timing
    rows = []
    fast, fast_wall, fast_loop = timed(small, config, "verilator")
    slow, slow_wall, slow_loop = timed(small, config, "pysim")
    if fast.cycles != slow.cycles:
        raise SystemExit(f"cycle counts differ: Verilator {fast.cycles}, pysim {slow.cycles}")
    rows.append(("8x8 step top, T=8 in=64 out=64 r=8", "pysim", slow.cycles, slow_wall, slow_loop))
    rows.append(("8x8 step top, T=8 in=64 out=64 r=8", "verilator", fast.cycles, fast_wall, fast_loop))
    if not args.skip_long:
        big = model_config()
        case = lora.random_case(16, 2048, 256, 16, seed=1)
        run_step(case, big, backend="verilator")
        run, wall, loop = timed(case, big, "verilator")
        rows.append(("8x8 step top for TinyLlama, k_proj T=16", "verilator", run.cycles, wall, loop))

    print("| design and step | backend | cycles | wall s | cycles/s (wall) | loop s | cycles/s (loop) | "
          "against pysim (wall / loop) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    pysim_wall, pysim_loop = rows[0][2] / rows[0][3], rows[0][2] / rows[0][4]
    for name, backend, cycles, wall, loop in rows:
        print(f"| {name} | {backend} | {cycles:,} | {wall:.2f} | {cycles / wall:,.0f} | {loop:.3f} | "
              f"{cycles / loop:,.0f} | {cycles / wall / pysim_wall:,.0f}x / {cycles / loop / pysim_loop:,.0f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(design=n, backend=b, cycles=c, wall_s=w, loop_s=l) for n, b, c, w, l in rows], f,
                      indent=1)


if __name__ == "__main__":
    main()
