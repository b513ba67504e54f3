"""The block controller's base products (``rtl/blocked.py``) at TinyLlama's shapes, through the DRAM model.

    python scripts/blocked_product.py                                  # T = 128, four shapes, ULX3S SDRAM
    python scripts/blocked_product.py --projections k_proj --memory ecpix5-ddr3 --json blocked.json
    python scripts/blocked_product.py --backward                       # dx = dy W (a design with both modes)
    python scripts/blocked_product.py --rank-term                      # the step's y = bf16(x W^T + s hb B^T)
    python scripts/blocked_product.py --backward --rank-term           # the step's dx = bf16(dy W + s gb A)
    python scripts/blocked_product.py --backward --rank-term --gradient  # and grad_B = s dy^T hb, grad_A = s gb^T x
    python scripts/blocked_product.py --rank-term --gradient           # y, and hb written for grad_B
    python scripts/blocked_product.py --build build/blocked            # place the same design on the ULX3S-85F

With ``--backward``, the backward product ``dx = dy W`` instead, in the traffic model's backward schedule (column
blocks of whole NF4 blocks; a token-stationary choice runs output-stationary with the other projections' widest
column block), on a design built with both modes (``BlockedConfig.transposed``); the lower bound is then W, dy and
dx once, the memory-fed step's product its B4. With ``--rank-term``, the product with its LoRA term (r = 16), the
step's y or dx, a design with ``BlockedConfig.rank`` (A and B read from memory; hb, or gb, made on chip as the
first feature block's activation passes); the lower bound then counts A and B once too, and the outputs are
checked against ``golden/rank_term.py`` (which equals the step's). With ``--gradient`` (and ``--rank-term``), a
design with ``BlockedConfig.gradient`` (both modes): forward the product also writes hb, backward it reads hb and
writes the step's grad_B, made as the second column block's dy passes, and gb, then makes grad_A in a pass over x;
hb, x's chunk fields (forward), grad_B, gb and grad_A are checked against the twins, and the lower bound counts hb
once and x's fields once (forward) or grad_B, x and grad_A once (backward; gb, 8 kB written and read back, is
not in it).

For each projection, ``y = x W^T`` (x random bf16, W NF4 with double quantization) on one 8x8 engine with x, W and
y in external memory, compiled with Verilator against the DRAM model, in the output-stationary schedule the traffic
model chooses for the forward sweep (``golden.traffic.blocked``; the feature block rounded up to a multiple of the
array's columns, keeping the model's number of blocks). Per run: cycles, the engine's cycle model alone (streams
that never stall), the product's cycle model with memory (``sim.blocked.model_cycles``), memory stall cycles,
the bytes the RTL's counters moved, the same product's bytes in the
memory-fed step (W once per tile of 8 tokens: ``golden/memprogram.py``'s F2) and the lower bound (W, x and y
once), the bandwidth achieved and the PE utilization. y is checked against the golden product: zero mismatches,
or the script fails.
"""

import argparse
import json
import time

import numpy as np
import torch

from edge_qlora.constants import DRAM_PRESETS
from edge_qlora.golden import gemm as golden
from edge_qlora.golden import nf4_dequant, traffic
from edge_qlora.golden.rank_gradient import rank_gradient, x_chunk_fields
from edge_qlora.golden.rank_term import backward_rows, column_exponent, forward_rows, rank_term
from edge_qlora.golden.lora import random_case
from edge_qlora.golden.memmap import layout
from edge_qlora.rtl.blocked import BlockedConfig, absmax2_groups
from edge_qlora.rtl.memport import port_for
from edge_qlora.sim.blocked import engine_cycles, model_cycles, run_blocked_product
from edge_qlora.sim.blocked_step import even_width

#: the forward products: (in features, out features); up/o/v_proj are gate/q/k_proj's shapes
SHAPES = {"q_proj": (2048, 2048), "k_proj": (2048, 256), "gate_proj": (2048, 5632), "down_proj": (5632, 2048)}
ROWS = COLS = 8


def blocks(t, d_in, d_out, rank=16, most=None):
    """The traffic model's forward schedule as ``(tokens, features)``: its output-stationary blocks, the feature
    block a multiple of ``COLS`` with as many blocks as the model's. A token-stationary choice (small T) runs as one
    block of tokens by the most features whose float32 partial sums fit the model's buffer budget. ``most``: at most
    that many features a block (more blocks)."""
    choice = traffic.blocked(traffic.StepShape(t=t, d_in=d_in, d_out=d_out, r=rank)).schedule["forward"]
    if choice["loop"] == "output-stationary":
        tokens, features = choice["tokens"], choice["features"]
    else:
        tokens = choice.get("tokens", t)
        features = min(d_out, traffic.DEFAULT_BUFFER_BYTES // (4 * tokens))
    features = min(features, most or features)
    tokens = -(-tokens // ROWS) * ROWS
    return min(tokens, t), min(even_width(d_out, features, COLS), d_out)


def backward_blocks(t, d_in, d_out, rank=16):
    """The traffic model's backward schedule as ``(tokens, column block)``, the column block whole NF4 blocks
    (``None`` for a token-stationary choice: the caller picks the column block)."""
    choice = traffic.blocked(traffic.StepShape(t=t, d_in=d_in, d_out=d_out, r=rank)).schedule["backward"]
    if choice["loop"] != "output-stationary":
        return min(-(-choice.get("tokens", t) // ROWS) * ROWS, t), None
    return min(-(-choice["tokens"] // ROWS) * ROWS, t), min(choice["features"], d_in)


def plan(t, backward, most=None):
    """``{projection: (tokens, features)}`` of the forward or backward product at ``t`` tokens (``most``: at most
    that many features a block, whole NF4 blocks backward)."""
    if not backward:
        return {name: blocks(t, *SHAPES[name], most=most) for name in SHAPES}
    plans = {name: backward_blocks(t, *SHAPES[name]) for name in SHAPES}
    widest = max((f for _, f in plans.values() if f), default=448)
    out = {}
    for name, (tokens, features) in plans.items():
        d_in = SHAPES[name][0]
        features = min(features or min(widest, d_in), most // 64 * 64 if most else d_in)
        out[name] = tokens, even_width(d_in, features, 64)
    return out


def _expected(case, config, backward):
    """The product's outputs as bf16 bit patterns (int16): the golden product, or with the rank-r term its twin."""
    whole = nf4_dequant.dequantize(case.weight, "bf16")
    base = golden.gemm(case.dy, whole, config.gemm.numerics, transposed=True) if backward else \
        golden.gemm(case.x, whole.T, config.gemm.numerics)
    if not config.rank:
        return base.view(torch.int16)
    # float32 base outputs with the term
    a, b = case.lora_A.to(torch.bfloat16), case.lora_B.to(torch.bfloat16)
    out = rank_term(base.numpy(), backward_rows(case), a.T, case.scaling, True, column_exponent(a)) if backward \
        else rank_term(base.numpy(), forward_rows(case), b, case.scaling)
    return torch.from_numpy(out.astype("uint16").view("int16"))


def run_case(name, t, memory, config, seed, blocks_of, backward):
    d_in, d_out = SHAPES[name]
    tokens, features = blocks_of
    case = random_case(t, d_in, d_out, 16, seed=seed)
    start = time.perf_counter()
    run = run_blocked_product(case, tokens, features, config, memory=memory, transposed=backward,
                              rank_term=bool(config.rank), backend="verilator")
    wall = time.perf_counter() - start
    bad = int((_expected(case, config, backward) != run.y.view(torch.int16)).sum())
    gradient = config.gradient
    if gradient and backward:
        want = rank_gradient(case.dy, forward_rows(case), case.scaling)
        bad += int((want.view("uint32") != run.grad_B.numpy().view("uint32")).sum())
        want = rank_gradient(case.x, backward_rows(case), case.scaling, transposed=True)
        bad += int((want.view("uint32") != run.grad_A.numpy().view("uint32")).sum())
        bad += int((backward_rows(case).view(torch.int16) != run.gb.view(torch.int16)).sum())
    elif gradient:
        bad += int((forward_rows(case).view(torch.int16) != run.hb.view(torch.int16)).sum())
        fields = x_chunk_fields(case.x)
        bad += int((np.asarray(run.x_fields)[:len(fields)] != fields).sum())
    if bad:
        raise SystemExit(f"error: {name}: {bad} outputs differ from the golden product")
    mm = layout(d_in, d_out, t, 16)
    w_bytes = mm.weight_bytes - mm["nf4_offset"].size
    x_bytes, y_bytes = t * d_in * 2, t * d_out * 2          # backward: dx and dy
    # A and B once (hb or gb are made on chip)
    term_bytes = (d_in + d_out) * 16 * 4 if config.rank else 0
    # hb written once with x's chunk fields (forward), or hb read once, grad_B written once and grad_A's x read
    # and grad_A written once
    term_bytes += (t * 16 * 2 + ((d_out + d_in) * 16 * 4 + t * d_in * 2 if backward else 4 * -(-t // 64))) \
        if gradient else 0
    moved = sum(run.read_bytes.values()) + run.written_bytes
    timing = DRAM_PRESETS[memory]
    clock = timing.clock_mhz * 1e6
    peak = timing.peak_bytes_per_cycle * clock
    seconds = run.cycles / clock
    product = ("dx = dy W" + (", grad_B, grad_A" if gradient else "")) if backward else \
        ("y = x W^T" + (", hb" if gradient else ""))
    return dict(projection=name, product=product, tokens=t, memory=memory,
                blocks=f"{tokens} x {features}", cycles=run.cycles,
                engine_cycles=engine_cycles(config, t, d_in, d_out, tokens, features, backward),
                model_cycles=model_cycles(config, memory, t, d_in, d_out, tokens, features, transposed=backward),
                memory_stall_cycles=run.stall_cycles["memory"], compute_stall_cycles=run.stall_cycles["compute"],
                read_bytes=run.read_bytes, written_bytes=run.written_bytes, bytes_moved=moved,
                lower_bound_bytes=w_bytes + x_bytes + y_bytes + term_bytes,
                memstep_bytes=-(-t // ROWS) * w_bytes + x_bytes + y_bytes,
                bandwidth=moved / seconds, peak_bandwidth=peak,
                utilization=t * d_in * d_out / (ROWS * COLS * run.cycles), mismatches=bad, wall_s=wall)


def design(tokens, backward, memory, rank_term, max_features=None, gradient=False):
    """One configuration for every projection at ``tokens`` (so that Verilator compiles it once; with
    ``backward``, one that runs both products) and the plan of blocks: ``(config, {projection: blocks})``."""
    plans = plan(tokens, backward, max_features)
    sized = list(plans.values()) + (list(plan(tokens, not backward, max_features).values()) if backward or gradient
                                    else [])
    extra = {"transposed": True, "max_out": max(d_out for _, d_out in SHAPES.values())} if backward or gradient \
        else {}
    config = BlockedConfig(rows=ROWS, cols=COLS, port=port_for(DRAM_PRESETS[memory]),
                           max_tokens=max(tb for tb, _ in sized), max_features=max(fb for _, fb in sized),
                           max_in=max(d_in for d_in, _ in SHAPES.values()),
                           max_groups=max(absmax2_groups(d_in, d_out) for d_in, d_out in SHAPES.values()),
                           rank=16 if rank_term else 0, gradient=gradient, **extra)
    return config, plans


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="T, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--projections", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--memory", choices=list(DRAM_PRESETS), default="ulx3s-sdram")
    parser.add_argument("--backward", action="store_true", help="the backward product dx = dy W instead")
    parser.add_argument("--rank-term", action="store_true", help="the product with its rank-r term (r = 16): "
                        "the step's y (or dx)")
    parser.add_argument("--gradient", action="store_true", help="with --rank-term: a design that also makes grad_B "
                        "= s dy^T hb and grad_A = s gb^T x (backward) and writes hb and x's chunk fields for them "
                        "(forward)")
    parser.add_argument("--max-features", type=int, metavar="N", help="feature blocks of at most N outputs (more "
                        "blocks, smaller buffers; default: the traffic model's)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--build", metavar="DIR", help="instead of simulating, place the design (one build for "
                        "every projection at this T) on the ULX3S-85F with YoWASP: resources and Fmax estimate")
    args = parser.parse_args(argv)
    if args.tokens < ROWS or args.tokens % ROWS:
        parser.error(f"--tokens must be a positive multiple of {ROWS}")
    if args.max_features is not None and (args.max_features < 64 or args.max_features % COLS):
        parser.error(f"--max-features must be a multiple of {COLS} from 64")
    if args.gradient and not args.rank_term:
        parser.error("--gradient needs --rank-term")
    config, plans = design(args.tokens, args.backward, args.memory, args.rank_term, args.max_features,
                           args.gradient)
    if args.build:
        from edge_qlora.boards.build import place
        from edge_qlora.rtl.blocked import BlockedProduct

        place(BlockedProduct(config), "ulx3s-85f", args.build)
        return
    print("| projection | T | memory | blocks (tokens x features) | cycles | engine alone (model) | x | "
          "cycle model with memory | model error | memory stall cycles | bytes moved | / lower bound | "
          "memory-fed step's product (F2 or B4) / lower bound | bandwidth (of peak) | PE utilization | mismatches |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for seed, name in enumerate(args.projections):
        row = run_case(name, args.tokens, args.memory, config, seed, plans[name], args.backward)
        rows.append(row)
        lb = row["lower_bound_bytes"]
        print(f"| {name} | {row['tokens']} | {row['memory']} | {row['blocks']} | {row['cycles']:,} | "
              f"{row['engine_cycles']:,} | {row['cycles'] / row['engine_cycles']:.2f} | {row['model_cycles']:,} | "
              f"{100 * (row['model_cycles'] / row['cycles'] - 1):+.2f}% | "
              f"{row['memory_stall_cycles']:,} | {row['bytes_moved'] / 1e6:.2f} MB | {row['bytes_moved'] / lb:.2f} | "
              f"{row['memstep_bytes'] / lb:.2f} | {row['bandwidth'] / 1e9:.3f} GB/s "
              f"({100 * row['bandwidth'] / row['peak_bandwidth']:.0f}%) | {100 * row['utilization']:.1f}% | "
              f"{row['mismatches']} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
