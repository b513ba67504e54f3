#!/usr/bin/env python3
"""Simulated cycles per second of the 8x8 step accelerator: Amaranth's simulator against Verilator, side by side.

    python scripts/bench_verilator.py                 # a few minutes (pysim runs one small step)
    python scripts/bench_verilator.py --json FILE

Both backends run the same step (T=8, in=64, out=64, r=8, AdamW) on the same 8x8 step top; Verilator also runs a
long step (k_proj of TinyLlama, T=16: 359k cycles) on the top sized for TinyLlama's projections, where its speed
is steady. Each figure is one process on one core. "wall" counts the whole call (building the inputs, spawning the
model, reading the outputs); "loop" only the compiled harness's simulation loop. The first run of a configuration
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
    start = time.perf_counter()
    run = run_step(case, config, backend=backend)
    wall = time.perf_counter() - start
    loop = verilator.LAST_RUN.get("seconds") if backend == "verilator" else None
    return run, wall, loop


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
    slow, slow_wall, _ = timed(small, config, "pysim")
    if fast.cycles != slow.cycles:
        raise SystemExit(f"cycle counts differ: Verilator {fast.cycles}, pysim {slow.cycles}")
    rows.append(("8x8 step top, T=8 in=64 out=64 r=8", "pysim", slow.cycles, slow_wall, None))
    rows.append(("8x8 step top, T=8 in=64 out=64 r=8", "verilator", fast.cycles, fast_wall, fast_loop))
    if not args.skip_long:
        big = model_config()
        case = lora.random_case(16, 2048, 256, 16, seed=1)
        run_step(case, big, backend="verilator")
        run, wall, loop = timed(case, big, "verilator")
        rows.append(("8x8 step top for TinyLlama, k_proj T=16", "verilator", run.cycles, wall, loop))

    print("| design and step | backend | cycles | wall s | cycles/s (wall) | loop s | cycles/s (loop) | "
          "against pysim |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    pysim_rate = rows[0][2] / rows[0][3]
    for name, backend, cycles, wall, loop in rows:
        rate = cycles / wall
        loop_text = f"{loop:.3f} | {cycles / loop:,.0f}" if loop else "| "
        print(f"| {name} | {backend} | {cycles:,} | {wall:.2f} | {rate:,.0f} | {loop_text} | "
              f"{rate / pysim_rate:,.0f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(design=n, backend=b, cycles=c, wall_s=w, loop_s=l) for n, b, c, w, l in rows], f,
                      indent=1)


if __name__ == "__main__":
    main()
