"""The memory-fed step's cycles on the RTL against its cycle model with memory, on small shapes and both DRAM
presets (``docs/memstep.md``).

    python scripts/memstep_cycles.py --backend verilator  # the table of docs/memstep.md (a model per shape)
    python scripts/memstep_cycles.py --json build/memstep_cycles.json    # pysim: equal cycles, slower
"""

import argparse
import json
import sys
import time
import warnings

#: ``(t, d_in, d_out, r, rows, cols, memory)``
SHAPES = (
    (4, 32, 16, 2, 2, 2, "ulx3s-sdram"),
    (4, 64, 32, 4, 2, 2, "ulx3s-sdram"),
    (8, 128, 64, 8, 2, 2, "ulx3s-sdram"),
    (16, 256, 128, 8, 4, 4, "ulx3s-sdram"),
    (8, 16, 16, 2, 8, 8, "ulx3s-sdram"),
    (8, 32, 32, 4, 8, 8, "ulx3s-sdram"),
    (4, 32, 16, 2, 2, 4, "ecpix5-ddr3"),
    (8, 128, 64, 8, 2, 4, "ecpix5-ddr3"),
    (8, 64, 64, 8, 8, 8, "ulx3s-sdram"),
    (16, 64, 64, 16, 8, 8, "ulx3s-sdram"),
    (16, 512, 64, 8, 8, 8, "ecpix5-ddr3"),
)

def measure(shape, backend):
    from edge_qlora.golden import lora
    from edge_qlora.sim.memstep import mem_step_config, model_cycles, run_mem_step
    t, d_in, d_out, r, rows, cols, memory = shape
    case = lora.random_case(t, d_in, d_out, r, seed=1, states=True)
    config = mem_step_config(case, memory, rows, cols)
    start = time.perf_counter()
    run = run_mem_step(case, config, memory=memory, backend=backend)
    model = model_cycles(config, memory, t, d_in, d_out, r)
    return {"t": t, "d_in": d_in, "d_out": d_out, "r": r, "rows": rows, "cols": cols, "memory": memory,
            "cycles": run.cycles, "model_cycles": model["cycles"], "compute_cycles": model["compute"],
            "model_error": model["cycles"] / run.cycles - 1, "stall_cycles": run.stall_cycles,
            "bytes": run.bytes_read + run.bytes_written, "seconds": time.perf_counter() - start}


def table(rows):
    lines = ["| T x in x out, r | array | memory | cycles (RTL) | cycle model | model error | compute alone |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['t']} x {row['d_in']} x {row['d_out']}, {row['r']} | {row['rows']}x{row['cols']} | "
                     f"{row['memory']} | {row['cycles']:,} | {row['model_cycles']:,} | "
                     f"{100 * row['model_error']:+.2f}% | {row['compute_cycles']:,} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("pysim", "verilator"), default="pysim")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the rows there")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")     # "created but never used" of the cycle model's throwaway parts
    rows = []
    for shape in SHAPES:
        rows.append(measure(shape, args.backend))
        print(f"{shape}: {rows[-1]['cycles']:,} cycles, model {100 * rows[-1]['model_error']:+.2f}%", file=sys.stderr,
              flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
