#!/usr/bin/env python3
"""NF4 core throughput: RTL weights/cycle x ULX3S Fmax, against bitsandbytes on this CPU, in one run.

For each lane count the script simulates the dequantizer (and quantizer) on the same tensor, builds it for the
ULX3S-85F to get Fmax, and times bitsandbytes' CPU ``dequantize_4bit`` / ``quantize_4bit`` on a TinyLlama-sized
weight (2048 x 2048) beside it. It prints a table, and writes ``bench_nf4.json``, ``bench_nf4.md`` and
``bench_nf4.png`` to ``--out``.

    python scripts/bench_nf4.py --out build/bench            # builds 8 bitstreams: about 15-30 minutes
    python scripts/bench_nf4.py --out build/bench --no-build  # simulation and CPU only
"""

import argparse
import json
import logging
import os
import statistics
import time

import numpy as np
import torch

from edge_qlora.boards.build import build
from edge_qlora.golden import nf4_quant
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer
from edge_qlora.sim.nf4 import run_dequantizer

LANES = (1, 4, 8, 16)


def cpu_rates(shape, repeats):
    """bitsandbytes' CPU dequantize_4bit and quantize_4bit in weights/s (median of ``repeats`` runs)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnbf.dequantize_4bit(packed, state)  # warm up (thread pool, caches)

    def rate(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return weight.numel() / statistics.median(times)

    return {
        "dequantize_4bit": rate(lambda: bnbf.dequantize_4bit(packed, state)),
        "quantize_4bit": rate(lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4")),
        "threads": torch.get_num_threads(),
    }


def sim_rate_dequant(lanes, weight):
    q = nf4_quant.quantize(weight, 64, True)
    run = run_dequantizer(q, NF4DequantConfig(lanes=lanes, blocksize=64))
    return weight.numel() / run.cycles, run.cycles


def sim_rate_quant(lanes, weight):
    try:
        from edge_qlora.rtl.nf4_quant import NF4QuantConfig
        from edge_qlora.sim.nf4_quant import run_quantizer
    except ImportError:
        return None, None
    run = run_quantizer(weight, NF4QuantConfig(lanes=lanes, blocksize=64, in_dtype="bf16"))
    return weight.numel() / run.cycles, run.cycles


def fmax(design, out_dir, seed):
    report = build(design, "ulx3s-85f", out_dir, seed=seed)
    return min(report["fmax_mhz"].values()), report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/bench", help="output folder (default build/bench)")
    parser.add_argument("--no-build", action="store_true", help="skip the ULX3S builds (no Fmax, no weights/s)")
    parser.add_argument("--seed", type=int, default=1, help="nextpnr seed")
    parser.add_argument("--sim-weights", type=int, default=16384, help="weights in the simulated tensor")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of each bitsandbytes call")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    weight = (torch.randn(args.sim_weights // 64, 64) * 0.02).to(torch.bfloat16)
    rows = []
    for lanes in LANES:
        row = {"lanes": lanes}
        row["dequant_weights_per_cycle"], row["dequant_cycles"] = sim_rate_dequant(lanes, weight)
        row["quant_weights_per_cycle"], row["quant_cycles"] = sim_rate_quant(lanes, weight)
        if not args.no_build:
            row["dequant_fmax_mhz"], report = fmax(NF4Dequantizer(NF4DequantConfig(lanes=lanes)),
                                                   os.path.join(args.out, f"dequant_l{lanes}"), args.seed)
            row["dequant_utilization"] = report["utilization"]
            if row["quant_weights_per_cycle"] is not None:
                from edge_qlora.rtl.nf4_quant import NF4QuantConfig, NF4Quantizer
                row["quant_fmax_mhz"], report = fmax(NF4Quantizer(NF4QuantConfig(lanes=lanes)),
                                                     os.path.join(args.out, f"quant_l{lanes}"), args.seed)
                row["quant_utilization"] = report["utilization"]
        rows.append(row)
        print(f"lanes {lanes}: done", flush=True)

    # the CPU is timed after the builds, so that nextpnr does not compete with it
    cpu = cpu_rates((2048, 2048), args.repeats)
    for row in rows:
        for unit, cpu_name in (("dequant", "dequantize_4bit"), ("quant", "quantize_4bit")):
            rate, mhz = row.get(f"{unit}_weights_per_cycle"), row.get(f"{unit}_fmax_mhz")
            if rate is not None and mhz is not None:
                row[f"{unit}_weights_per_s"] = rate * mhz * 1e6
                row[f"{unit}_ratio_vs_cpu"] = row[f"{unit}_weights_per_s"] / cpu[cpu_name]

    lines = [
        "| lanes | dequant w/cycle | Fmax MHz | dequant Gw/s | vs bnb CPU | quant w/cycle | Fmax MHz | quant Gw/s "
        "| vs bnb CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    for row in rows:
        lines.append(
            f"| {row['lanes']} | {cell(row['dequant_weights_per_cycle'], '.2f')} "
            f"| {cell(row.get('dequant_fmax_mhz'), '.1f')} | {cell(_g(row.get('dequant_weights_per_s')), '.3f')} "
            f"| {cell(row.get('dequant_ratio_vs_cpu'), '.2f')}x "
            f"| {cell(row['quant_weights_per_cycle'], '.2f')} | {cell(row.get('quant_fmax_mhz'), '.1f')} "
            f"| {cell(_g(row.get('quant_weights_per_s')), '.3f')} | {cell(row.get('quant_ratio_vs_cpu'), '.2f')}x |")
    lines.append("")
    lines.append(f"bitsandbytes {_bnb_version()} on this CPU ({cpu['threads']} threads), 2048x2048 bf16, "
                 f"blocksize 64, double quant: dequantize_4bit {cpu['dequantize_4bit'] / 1e9:.3f} Gw/s, "
                 f"quantize_4bit {cpu['quantize_4bit'] / 1e9:.3f} Gw/s.")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "bench_nf4.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "bench_nf4.json"), "w") as f:
        json.dump({"rows": rows, "cpu": cpu}, f, indent=2)
    _plot(rows, cpu, os.path.join(args.out, "bench_nf4.png"))


def _g(value):
    return None if value is None else value / 1e9


def _bnb_version():
    import bitsandbytes
    return bitsandbytes.__version__


def _plot(rows, cpu, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    lanes = [row["lanes"] for row in rows]
    for unit, colour in (("dequant", "tab:blue"), ("quant", "tab:orange")):
        rates = [row.get(f"{unit}_weights_per_s") for row in rows]
        if all(r is not None for r in rates):
            ax.plot(lanes, np.array(rates) / 1e9, "o-", color=colour, label=f"RTL {unit} @ ULX3S Fmax")
    ax.axhline(cpu["dequantize_4bit"] / 1e9, color="tab:blue", ls="--", label="bnb CPU dequantize_4bit")
    ax.axhline(cpu["quantize_4bit"] / 1e9, color="tab:orange", ls="--", label="bnb CPU quantize_4bit")
    ax.set_xlabel("lanes")
    ax.set_ylabel("Gweights/s")
    ax.set_xticks(lanes)
    ax.legend(fontsize=8)
    ax.set_title("NF4 cores on ULX3S-85F vs bitsandbytes on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
