#!/usr/bin/env python3
"""Where the cycles of a QLoRA step go: base-weight products against the rank-r products and the update.

    python scripts/lora_cycles.py                     # TinyLlama projections, model only (seconds)
    python scripts/lora_cycles.py --rtl               # also simulate a small step and compare per phase (minutes)

Each GEMM phase of ``rtl/lora/`` is costed with the engine's validated cycle model (``golden.gemm.gemm_cycles``,
NF4 weights for F2 and B4, bf16 from the scratchpads otherwise); the loads stream ``banks`` elements per cycle and
the optimizer takes one element per cycle plus its latency. The table answers the issue's question "reuse the
GEMM engine, or a small dedicated array for the rank-r products?": a dedicated array can at best remove the
rank-r phases' share of the step, listed in the last column.
"""

import argparse

from edge_qlora.rtl.lora import GEMM_ORDER, PHASES, LoraConfig
from edge_qlora.sim.lora import step_cycles

TINYLLAMA = [("q_proj / o_proj", 2048, 2048), ("k_proj / v_proj", 2048, 256), ("gate_proj / up_proj", 2048, 5632),
             ("down_proj", 5632, 2048)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--rtl", action="store_true", help="simulate a small step and compare per phase")
    args = parser.parse_args()

    print(f"**One QLoRA step of a TinyLlama projection on a {args.rows}x{args.cols} array (model)**\n")
    print("| projection (in -> out) | T | rank | total cycles | base F2+B4 | rank-r products | update | "
          "rank-r share | PE utilization |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, d_in, d_out in TINYLLAMA:
        for t in (16, 128):
            for r in (8, 64):
                p = step_cycles(t, d_in, d_out, r, args.rows, args.cols)
                total = sum(p.values())
                base = p["F2"] + p["B4"]
                lora = sum(p[phase.name] for phase, row in PHASES.items() if not row.nf4)
                # useful MACs of the step: the two base products and the six rank-r products
                macs = 2 * t * d_in * d_out + 3 * t * r * (d_in + d_out)
                print(f"| {name} ({d_in} -> {d_out}) | {t} | {r} | {total:,} | {base:,} | {lora:,} | "
                      f"{p['update']:,} | {lora / total:.1%} | {macs / (args.rows * args.cols * total):.1%} |")

    if args.rtl:
        from edge_qlora.golden import lora
        from edge_qlora.sim.lora import run_step
        t, d_in, d_out, r, rows, cols = 4, 40, 24, 4, 2, 2
        case = lora.random_case(t, d_in, d_out, r, seed=1)
        config = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=d_out, max_rank=r)
        run = run_step(case, config)
        model = step_cycles(t, d_in, d_out, r, rows, cols)
        print(f"\n**Small step, T={t}, in={d_in}, out={d_out}, r={r}, {rows}x{cols}: RTL against the estimate**\n")
        print("| phase | RTL cycles | estimate |")
        print("|---|---:|---:|")
        loads = sum(v for k, v in run.phase_cycles.items() if k.startswith("LOAD"))
        print(f"| load | {loads} | {model['load']} |")
        for phase in GEMM_ORDER:
            print(f"| {phase.name} | {run.phase_cycles.get(phase.name, 0)} | {model[phase.name]} |")
        upd = run.phase_cycles.get("UPD_A", 0) + run.phase_cycles.get("UPD_B", 0)
        print(f"| update | {upd} | {model['update']} |")
        print(f"| total | {run.cycles} | {sum(model.values())} |")


if __name__ == "__main__":
    main()
