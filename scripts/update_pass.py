"""The update pass (``rtl/update.py``) at TinyLlama's LoRA shapes against the DRAM model: per projection, A's and
B's AdamW updates (r = 16) run on Verilator (or pysim), their results against ``golden.lora_optim`` bit for bit,
their cycles against the cycle model (``sim.update.model_cycles``) and their bytes against the program's.

    python scripts/update_pass.py                                   # the seven projections, ULX3S SDRAM
    python scripts/update_pass.py --memory ecpix5-ddr3 --json F.json
    python scripts/update_pass.py --build DIR                       # place the update pass on the ULX3S-85F

The masters, gradients and moments are random (seeded) with adversarial elements in every tensor: zeros, a
negative zero, subnormals, large values, and an infinite and a NaN gradient. One run per factor of each
projection (the projections' memory maps differ, and with them the DRAM rows the tensors fall in).
"""

import argparse
import json

import numpy as np

from edge_qlora.golden import lora_optim
from edge_qlora.golden.memmap import TINYLLAMA_PROJECTIONS
from edge_qlora.rtl.update import UpdateConfig, UpdatePass
from edge_qlora.sim.memstep import MEMORIES, _timing
from edge_qlora.sim.update import model_cycles, run_update, update_memmap

RANK = 16
_SHAPES = {name: (d_in, d_out) for name, d_in, d_out in TINYLLAMA_PROJECTIONS}


def tensors(shape, seed=0):
    """A factor's master, gradient and moments (float32), random with adversarial elements."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    out = {"param": rng.standard_normal(n) * 0.05, "grad": rng.standard_normal(n) * 1e-3,
           "m": rng.standard_normal(n) * 1e-4, "v": np.abs(rng.standard_normal(n)) * 1e-7}
    out = {k: v.astype(np.float32) for k, v in out.items()}
    tiny = np.float32(1e-40)                            # subnormal
    for k, values in out.items():
        values[:4] = (0.0, -0.0, tiny, -tiny)
        values[4] = np.float32(3e38) if k != "v" else np.float32(1e30)
    out["grad"][5], out["grad"][6] = np.inf, np.nan
    out["v"][7] = 0.0
    return {k: v.reshape(shape) for k, v in out.items()}


def mismatches(got, want):
    return int((np.asarray(got, np.float32).view(np.uint32) != np.asarray(want, np.float32).view(np.uint32)).sum())


def measure(d_in, d_out, which, memory, backend, hyper):
    """One factor's update: a dict of the row's measured and modelled figures."""
    memmap = update_memmap(d_in, d_out, RANK)
    shape = memmap[f"lora_{which}"].shape
    given = tensors(shape, seed=d_in * 7 + d_out + (which == "B"))
    run = run_update(memmap, which, given, hyper, memory=memory, backend=backend)
    want = lora_optim.adamw(given["param"], given["grad"], given["m"], given["v"], hyper)
    wrong = sum(mismatches(got, w) for got, w in zip((run.param, run.m, run.v), want))
    if run.read_bytes != run.program_read_bytes or run.written_bytes != run.program_written_bytes:
        raise SystemExit(f"error: {which} {shape}: the counters' bytes differ from the program's")
    if wrong:
        raise SystemExit(f"error: {which} {shape}: {wrong} values differ from golden.lora_optim")
    model = model_cycles(memmap, which, memory)
    moved = run.read_bytes + run.written_bytes
    elements = int(np.prod(shape))
    return {"factor": which, "elements": elements, "cycles": run.cycles, "cycles_per_element": run.cycles / elements,
            "model_cycles": model, "model_error": model / run.cycles - 1, "bytes": moved,
            "bandwidth": moved / (run.cycles * _timing(memory).peak_bytes_per_cycle), "mismatches": wrong}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", choices=MEMORIES, default="ulx3s-sdram")
    parser.add_argument("--projections", nargs="+", choices=tuple(_SHAPES), default=tuple(_SHAPES),
                        metavar="NAME", help="TinyLlama projections (default: all seven)")
    parser.add_argument("--backend", choices=("verilator", "pysim"), default="verilator")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--build", metavar="DIR", help="instead of simulating, place the update pass on the "
                        "ULX3S-85F (its SDRAM's port)")
    args = parser.parse_args(argv)
    if args.build:
        from edge_qlora.boards.build import place

        place(UpdatePass(UpdateConfig()), "ulx3s-85f", args.build)
        return
    hyper = lora_optim.hyper_from(1e-3, weight_decay=0.01, step=3)
    print("| projection | factor | elements | cycles | cycles per element | cycle model | model error | bytes moved "
          "| bandwidth (of peak) | mismatches |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for name in args.projections:
        d_in, d_out = _SHAPES[name]
        for which in ("A", "B"):
            row = {"projection": name, **measure(d_in, d_out, which, args.memory, args.backend, hyper),
                   "memory": args.memory, "backend": args.backend}
            rows.append(row)
            print(f"| {name} | {which} | {row['elements']:,} | {row['cycles']:,} | {row['cycles_per_element']:.2f} | "
                  f"{row['model_cycles']:,} | {row['model_error']:+.2%} | {row['bytes']:,} | "
                  f"{row['bandwidth']:.1%} | {row['mismatches']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": repr(UpdateConfig()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
