"""The blocked step's memory program (``golden/blockprogram.py``) on the DRAM model: for each TinyLlama projection
shape, its bytes against the traffic model, the DRAM model's time for its bursts in order, and that time against the
step's compute (``docs/traffic.md``, "The blocked program on the DRAM model").

    python scripts/blocked_dram.py [--t 16 128] [--buffer-kib 256] [--json FILE]

Prints a Markdown table on stdout; progress on stderr. q/o, k/v and gate/up share their shapes, so each shape runs
once. Compute: ``sim.lora.step_cycles`` on the 8x8 array with the optimizer at one element every 8 cycles (the
memory-fed build's), 100 MHz; the blocked step is assumed to take the same compute cycles. The products' traffic
overlaps their compute; the update's follows them (it needs every gradient): the step takes
``max(products' memory, compute) + max(update's memory, compute)``.
"""

import argparse
import json
import sys
import time

from edge_qlora.constants import DRAM_PRESETS, TINYLLAMA_PROJECTIONS
from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import traffic as tr

ROWS = COLS = 8
OPTIMIZER_INTERVAL = 8


def compute_cycles(t, d_in, d_out, r):
    """``(products, update)``: the step's cycle model without and with only its update."""
    from edge_qlora.sim.lora import step_cycles
    phases = step_cycles(t, d_in, d_out, r, ROWS, COLS, optimizer_interval=OPTIMIZER_INTERVAL)
    return sum(phases.values()) - phases["update"], phases["update"]


def shapes():
    """``(names, d_in, d_out)`` per distinct projection shape, in the model's order."""
    out = {}
    for name, d_in, d_out in TINYLLAMA_PROJECTIONS:
        out.setdefault((d_in, d_out), []).append(name)
    return [("/".join(n.removesuffix("_proj") for n in names) + "_proj", d_in, d_out)
            for (d_in, d_out), names in out.items()]


def measure(name, d_in, d_out, t, r, buffer_bytes, memory_name):
    timing = DRAM_PRESETS[memory_name]
    port = bp.port_for(timing)
    model, memmap, prog = bp.blocked_for(d_in, d_out, t, r, buffer_bytes)
    read, written = bp.traffic_bytes(prog)
    program_bytes = sum(read.values()) + sum(written.values())
    scale = 100 / timing.clock_mhz                    # DRAM cycles to cycles of the step's 100 MHz clock
    reqs = {which: bp.requests(port, prog.part(which)) for which in ("products", "update")}
    parts = {which: bp.dram_time(timing, port, part) for which, part in reqs.items()}
    memory = {which: round(result.cycles * scale) for which, result in parts.items()}
    compute = dict(zip(("products", "update"), compute_cycles(t, d_in, d_out, r)))
    # the products' traffic overlaps their compute; the update follows them (it needs every gradient)
    step = sum(max(compute[which], memory[which]) for which in ("products", "update"))
    moved = sum(result.bytes for result in parts.values())
    busy = sum(result.cycles for result in parts.values())
    lower = tr.lower_bound(tr.StepShape(d_in, d_out, t, r)).total
    return {"projection": name, "d_in": d_in, "d_out": d_out, "t": t, "memory": memory_name,
            "program_bytes": program_bytes, "model_bytes": model.total - 4 * model.weight_passes,
            "lower_bound_bytes": lower, "requests": sum(map(len, reqs.values())), "dram_cycles": busy,
            "efficiency": moved / (busy * timing.peak_bytes_per_cycle),
            "memory_cycles": memory, "compute_cycles": compute, "step_cycles": step,
            "utilization": tr.macs(tr.StepShape(d_in, d_out, t, r)) / (ROWS * COLS * step)}


def table(rows):
    lines = ["| projection | T | memory | program MB | / traffic model | / lower bound | bursts | DRAM efficiency | "
             "products: memory / compute ms | update: memory / compute ms | step ms | PE utilization |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        mem, comp = row["memory_cycles"], row["compute_cycles"]
        lines.append(f"| {row['projection']} | {row['t']} | {row['memory']} | {row['program_bytes'] / 1e6:.2f} | "
                     f"{row['program_bytes'] / row['model_bytes']:.3f} | "
                     f"{row['program_bytes'] / row['lower_bound_bytes']:.2f} | {row['requests']:,} | "
                     f"{100 * row['efficiency']:.1f}% | {mem['products'] / 1e5:.1f} / {comp['products'] / 1e5:.1f} | "
                     f"{mem['update'] / 1e5:.1f} / {comp['update'] / 1e5:.1f} | {row['step_cycles'] / 1e5:.1f} | "
                     f"{100 * row['utilization']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, nargs="+", default=[16, 128], help="tokens per step (default: 16 128)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--buffer-kib", type=int, default=tr.DEFAULT_BUFFER_BYTES // 1024,
                        help="the blocked dataflow's on-chip buffer (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows there")
    args = parser.parse_args(argv)
    for name, value in (("--t", min(args.t)), ("--rank", args.rank), ("--buffer-kib", args.buffer_kib)):
        if value < 1:
            parser.error(f"{name} must be a positive integer, not {value}")
    rows = []
    for t in args.t:
        for name, d_in, d_out in shapes():
            for memory in DRAM_PRESETS:
                start = time.perf_counter()
                rows.append(measure(name, d_in, d_out, t, args.rank, args.buffer_kib * 1024, memory))
                print(f"{name} T={t} {memory}: {rows[-1]['dram_cycles']:,} DRAM cycles, "
                      f"{100 * rows[-1]['efficiency']:.1f}% ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                      flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
