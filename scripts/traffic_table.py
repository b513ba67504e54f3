"""External-memory traffic of one QLoRA step of each TinyLlama projection: today's dataflow, the blocked
(I/O-aware) dataflow and the lower bound, with memory time against compute time, and a roofline plot.

    python scripts/traffic_table.py [--t 16 128 512] [--rank 16] [--buffer-kib 256] [--efficiency 0.8]
                                    [--plot docs/traffic_roofline.png] [--no-plot]

Prints Markdown on stdout (the tables of docs/traffic.md). The model: ``edge_qlora.golden.traffic``.
"""

import argparse
import sys

from edge_qlora.constants import TINYLLAMA_PROJECTIONS
from edge_qlora.golden import traffic as tr


def compute_cycles(shape, cols=8):
    """Cycles of the step on a ``rows`` x ``cols`` array from the step's validated cycle model
    (``sim.lora.step_cycles``: the GEMM engine's model per phase, the loads and the update); memory never stalls
    in it."""
    from edge_qlora.sim.lora import step_cycles
    return sum(step_cycles(shape.t, shape.d_in, shape.d_out, shape.r, shape.rows, cols, shape.optimizer).values())

BOARDS = (("ULX3S SDRAM (16-bit SDR, 100 MHz)", tr.ULX3S_SDRAM_BYTES_PER_S),
          ("ECPIX-5 DDR3 (16-bit, 400 MT/s assumed)", tr.ECPIX5_DDR3_BYTES_PER_S))


def rows(ts, rank, buffer_bytes):
    """One dict per (T, projection): the three traffics and the compute cycles."""
    out = []
    cycles = {}
    for t in ts:
        for name, d_in, d_out in TINYLLAMA_PROJECTIONS:
            shape = tr.StepShape(d_in, d_out, t, rank)
            key = (d_in, d_out, t)
            if key not in cycles:
                cycles[key] = compute_cycles(shape)
            out.append({"name": name, "shape": shape, "today": tr.today(shape), "resident": tr.resident(shape),
                        "blocked": tr.blocked(shape, buffer_bytes), "lower": tr.lower_bound(shape),
                        "cycles": cycles[key]})
    return out


def _loop(choice):
    if choice["loop"] == "token-stationary":
        return f"TS {choice['tokens']} tok"
    if choice["loop"] == "weight-stationary":
        return f"WS {choice['features']} feat"
    return f"OS {choice['tokens']}x{choice['features']}"


def traffic_table(results):
    lines = ["| projection | in -> out | T | today MB | today / LB | blocked MB | blocked / LB | lower bound MB | "
             "W passes (today / blocked / LB) | blocked loops (forward; backward) | on chip kB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for row in results:
        s, today, blocked, lower = row["shape"], row["today"], row["blocked"], row["lower"]
        sched = blocked.schedule
        lines.append(
            f"| {row['name']} | {s.d_in} -> {s.d_out} | {s.t} | {today.total / 1e6:.2f} | "
            f"{today.total / lower.total:.1f} | {blocked.total / 1e6:.2f} | **{blocked.total / lower.total:.2f}** | "
            f"{lower.total / 1e6:.2f} | {today.weight_passes} / {blocked.weight_passes} / {lower.weight_passes} | "
            f"{_loop(sched['forward'])}; {_loop(sched['backward'])}; {sched['order']}, gradient "
            f"{sched['accumulate']}{', A/B on chip' if sched['rank_resident'] else ''} | "
            f"{sched['footprint'] / 1e3:.0f} |")
    return "\n".join(lines)


def time_table(results, efficiency):
    bw, name = tr.ULX3S_SDRAM_BYTES_PER_S, "ULX3S"
    lines = [f"| projection | T | MAC | compute ms (cycle model, 100 MHz) | today ms | blocked ms | lower bound ms | "
             f"MAC/byte today | MAC/byte blocked | blocked on {name}: bound by |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results:
        s = row["shape"]
        compute = row["cycles"] / tr.CLOCK_HZ
        times = [tr.memory_seconds(row[k].total, bw, efficiency) for k in ("today", "blocked", "lower")]
        _, _, bound = tr.roofline_point(row["blocked"], row["cycles"], bw, efficiency)
        ratio = max(times[1], compute) / min(times[1], compute)
        lines.append(f"| {row['name']} | {s.t} | {tr.macs(s) / 1e6:,.0f} M | {1e3 * compute:,.1f} | "
                     f"{1e3 * times[0]:,.1f} | {1e3 * times[1]:,.1f} | {1e3 * times[2]:,.1f} | "
                     f"{row['today'].intensity:.1f} | {row['blocked'].intensity:.1f} | "
                     f"{bound} ({ratio:.1f}x) |")
    return "\n".join(lines)


#: Peak bytes/s of each ``--memory`` preset, where its measured points go.
PRESET_BYTES_PER_S = {"ulx3s-sdram": tr.ULX3S_SDRAM_BYTES_PER_S, "ecpix5-ddr3": tr.ECPIX5_DDR3_BYTES_PER_S}


def plot(results, t, efficiency, path, measured=()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bandwidth = np.logspace(np.log10(0.02e9), np.log10(10e9), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    seen, colour_of = set(), {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row in (r for r in results if r["shape"].t == t):
        s = row["shape"]
        key = tuple(sorted((s.d_in, s.d_out)))     # down_proj is gate/up transposed: the same curves within 0.5%
        if key in seen:
            continue
        names = "/".join(r["name"].replace("_proj", "") for r in results
                         if r["shape"].t == t and tuple(sorted((r["shape"].d_in, r["shape"].d_out))) == key)
        seen.add(key)
        color = colors[len(seen) - 1]
        compute = row["cycles"] / tr.CLOCK_HZ
        colour_of[key] = color
        for kind, style in (("blocked", "-"), ("resident", "-."), ("today", ":")):
            memory = row[kind].total / (bandwidth * efficiency)
            ax.loglog(bandwidth / 1e9, 1e3 * np.maximum(memory, compute), style, color=color,
                      label=f"{names} ({key[0]}x{key[1]}), {kind}")
        lower = row["lower"].total / (bandwidth * efficiency)
        ax.loglog(bandwidth / 1e9, 1e3 * np.maximum(lower, compute), "--", color=color, alpha=0.4, linewidth=1)
    marked = set()
    for entry in measured:      # the memory-fed step on Verilator: cycles at 100 MHz, at its DRAM's peak
        key = tuple(sorted((entry["d_in"], entry["d_out"])))
        if entry["t"] != t or key not in colour_of or (key, entry["memory"]) in marked:
            continue
        marked.add((key, entry["memory"]))
        ax.loglog(PRESET_BYTES_PER_S[entry["memory"]] / 1e9, 1e3 * entry["cycles"] / tr.CLOCK_HZ, "o",
                  color=colour_of[key], markeredgecolor="black",
                  label="memory-fed step as built, measured (Verilator)" if len(marked) == 1 else None)
    for label, bw in BOARDS:
        ax.axvline(bw / 1e9, color="black", linewidth=0.8)
        ax.text(bw / 1e9 * 1.05, 0.97, label, rotation=90, va="top", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlabel(f"DRAM peak bandwidth, GB/s (sustained: {efficiency:.0%} of it, assumed)")
    ax.set_ylabel("time per step, ms: max(memory, compute)")
    ax.set_title(f"One QLoRA step per TinyLlama projection, T={t}, 8x8 array at 100 MHz\n"
                 f"(dashed, faint: the traffic lower bound; dash-dot: the memory-fed step as built)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t", type=int, nargs="+", default=[16, 128, 512], help="token counts (default 16 128 512)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--buffer-kib", type=int, default=tr.DEFAULT_BUFFER_BYTES // 1024,
                        help="on-chip buffer budget of the blocked dataflow, KiB (default 256)")
    parser.add_argument("--efficiency", type=float, default=tr.DEFAULT_EFFICIENCY,
                        help="sustained fraction of the DRAM peak (default 0.8, an assumption)")
    parser.add_argument("--plot", default="docs/traffic_roofline.png", help="roofline PNG (at T=128, or the "
                        "middle --t)")
    parser.add_argument("--no-plot", action="store_true", help="print the tables only")
    parser.add_argument("--measured", default=None, metavar="FILE",
                        help="JSON list of memory-fed steps measured on Verilator (edge-qlora tinyllama --memory M "
                             "--json FILE), drawn as points on the roofline (default: none)")
    args = parser.parse_args(argv)
    try:
        if any(t < 1 for t in args.t) or args.rank < 1 or args.buffer_kib < 1:
            raise ValueError("--t, --rank and --buffer-kib must be positive")
        tr.memory_seconds(1, efficiency=args.efficiency)
        results = rows(args.t, args.rank, args.buffer_kib * 1024)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Traffic per step (r={args.rank}, AdamW, NF4 blocksize 64 with double quantization; blocked: "
          f"{args.buffer_kib} KiB on-chip buffer; LB: lower bound):\n")
    print(traffic_table(results))
    print(f"\nTime to move it at the ULX3S SDRAM's 0.2 GB/s peak x {args.efficiency} sustained (assumed) against "
          f"the step's cycle model at 100 MHz on the 8x8 array:\n")
    print(time_table(results, args.efficiency))
    if not args.no_plot:
        t = 128 if 128 in args.t else sorted(args.t)[len(args.t) // 2]
        measured = []
        if args.measured:
            import json
            with open(args.measured) as f:
                measured = [e for e in json.load(f) if e.get("memory") in PRESET_BYTES_PER_S]
        plot(results, t, args.efficiency, args.plot, measured)
        print(f"\nRoofline (T={t}): {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
