"""The GEMM engine's block jobs (its output-stationary mode) at TinyLlama's shapes, against its ordinary jobs.

    python scripts/block_gemm.py                                   # T = 128, four shapes, both products
    python scripts/block_gemm.py --projections k_proj --products backward --json block.json
    python scripts/block_gemm.py --weights bf16                    # W as bf16, no dequantizer

For each projection, the forward product ``y = x @ W.T`` and the backward ``dx = dy @ W`` for T tokens on one 8x8
engine on Verilator: as block jobs in the schedule the traffic model's blocked dataflow chooses for that
sweep (``golden.traffic.blocked``: a block of ``tokens x features`` float32 partial sums held in the accumulator
across spans of the reduction; a span is one NF4 block of W's row forward and 64 W rows backward, where the jobs
also take the whole rows' chunk exponents), set against one ordinary job (the whole of W streamed once per tile of
``rows`` tokens). Per run: cycles, the cycle model's (``golden.gemm.gemm_cycles``, job by job), PE utilization,
and the operands streamed into the engine: passes over the activation (x or dy) and over W, the traffic a
memory-fed engine would read for this product. The block jobs' outputs are checked against the golden model of
the whole product: zero mismatches, or the script fails. The ordinary job's row is the cycle model's (driving
its 16 passes of W through the simulator's streams takes far longer than simulating them).

W is NF4 (double-quantized, blocks of 64) by default: each job streams its rectangle of whole NF4 blocks through
the engine's dequantizer (``golden.nf4_span.span``; every block with its own second-level absmax, since a
rectangle's blocks lie in different groups of 256 of the whole weight). ``--weights bf16`` streams bf16 W instead.
"""

import argparse
import json
import time

import numpy as np
import torch

from edge_qlora.golden import gemm as golden
from edge_qlora.golden import nf4_dequant, nf4_quant, traffic
from edge_qlora.rtl.gemm import GemmConfig
from edge_qlora.sim.gemm import block_jobs, place_blocks, run_gemm_jobs

#: the forward products: (name, out features, in features)
SHAPES = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "gate_proj": (5632, 2048), "down_proj": (2048, 5632)}
SPAN = 64       # one NF4 block: a W row's part of a span is one 32-byte burst


def schedule(tokens, d_out, d_in, rank, sweep):
    """The traffic model's choice for this shape and sweep (``forward`` or ``backward``) as block jobs: (token
    block, feature block, its loop). The engine's block jobs keep a token block's float32 partial sums for a
    block of features in the accumulator, so a token-stationary choice (all features) runs with as many features
    as the model's buffer budget holds in float32: the model counts no partial sums for it (it leaves output tiles
    to the engine), which is right forward (each output is done within its W tile) but not backward. Backward,
    feature blocks are W's columns, whole NF4 blocks (the model's are)."""
    choice = traffic.blocked(traffic.StepShape(t=tokens, d_in=d_in, d_out=d_out, r=rank)).schedule[sweep]
    features = d_out if sweep == "forward" else d_in
    if choice["loop"] == "output-stationary":
        return choice["tokens"], choice["features"], "output-stationary"
    if choice["loop"] == "token-stationary":
        fits = traffic.DEFAULT_BUFFER_BYTES // (4 * choice["tokens"])
        fits -= fits % (SPAN if sweep == "backward" else 1)
        return choice["tokens"], min(features, fits), "token-stationary" + (
            f" (features capped at {fits})" if fits < features else "")
    return tokens, choice["features"], "weight-stationary"


def run_case(name, sweep, tokens, config, rank, seed):
    d_out, d_in = SHAPES[name]
    transposed = sweep == "backward"
    token_block, feature_block, loop = schedule(tokens, d_out, d_in, rank, sweep)
    gen = torch.Generator().manual_seed(seed)
    act = golden.random_activations((tokens, d_out if transposed else d_in), seed)
    w = (torch.randn((d_out, d_in), generator=gen) * 0.02).to(torch.bfloat16)
    source = w
    if config.weights == "nf4":
        source = nf4_quant.quantize(w, config.blocksize, config.double_quant)
        w = nf4_dequant.dequantize(source, "bf16")
    expected = golden.gemm(act, w if transposed else w.T, config.numerics, transposed)
    rows, cols, chunk = config.rows, config.cols, config.chunk_steps
    results = []

    jobs, places = block_jobs(act, source, token_block, feature_block, SPAN, transposed, chunk)
    start = time.perf_counter()
    runs = run_gemm_jobs(jobs, config, backend="verilator")
    wall = time.perf_counter() - start
    out = place_blocks(runs, places, tuple(expected.shape))
    model = sum(golden.gemm_cycles(a.shape[0], *b.shape, rows, cols, chunk, transposed, config.weights,
                                   blocksize=config.blocksize, block=True).cycles for a, b, *_ in jobs)
    plan = f"{loop}: {token_block} x {feature_block}, spans of {SPAN}"
    results.append(("block jobs", plan, len(jobs), runs[-1].cycles, model, sum(a.numel() for a, *_ in jobs),
                    sum(int(np.prod(b.shape)) for _, b, *_ in jobs), _mismatches(expected, out), wall))

    # (the ordinary job: the cycle model, which tests/test_gemm.py checks against the RTL)
    model = golden.gemm_cycles(tokens, d_out, d_in, rows, cols, chunk, transposed, config.weights,
                               blocksize=config.blocksize).cycles
    results.append(("one job (cycle model)", f"W once per {rows} tokens", 1, None, model, act.numel(),
                    -(-tokens // rows) * w.numel(), None, None))
    macs = tokens * d_out * d_in
    return [dict(projection=name, product=sweep, tokens=tokens, weights=config.weights, mode=mode, schedule=plan,
                 jobs=count, cycles=cycles, model_cycles=model, model_error=model / cycles - 1 if cycles else None,
                 utilization=macs / (rows * cols * (cycles or model)), activation_passes=act_values / act.numel(),
                 w_passes=w_values / w.numel(), mismatches=bad, wall_s=wall)
            for mode, plan, count, cycles, model, act_values, w_values, bad, wall in results]


def _mismatches(expected, got):
    return int((expected.view(torch.int16) != got.view(torch.int16)).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank: the traffic model's buffer budget has hb "
                        "and gb in it (default: %(default)s)")
    parser.add_argument("--projections", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--products", nargs="+", choices=["forward", "backward"], default=["forward", "backward"])
    parser.add_argument("--weights", choices=["nf4", "bf16"], default="nf4",
                        help="W as NF4 spans through the dequantizer, or bf16 (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.rank < 1:
        parser.error("--tokens and --rank must be positive integers")
    cases = [(name, sweep) for name in args.projections for sweep in args.products]
    rows, cols = 8, 8
    # one engine for every case: the longest W row, every block's A tiles and every block's output tiles
    plans = [schedule(args.tokens, *SHAPES[name], args.rank, sweep) for name, sweep in cases]
    tiles = max(-(-tb // rows) for tb, _, _ in plans)
    config = GemmConfig(rows=rows, cols=cols, max_k=max(max(SHAPES[name]) for name, _ in cases),
                        max_n=max(max(SHAPES[name]) for name, _ in cases), weights=args.weights,
                        held_tiles=max(tiles * -(-fb // cols) for _, fb, _ in plans))
    if tiles * SPAN > config.max_q:
        parser.error(f"token blocks of {tiles * rows} need a larger A buffer than this script's engine has")
    # rows are printed (and the JSON rewritten) as each case ends: the large ones take minutes each
    table = []
    print("| projection | product | T | W | mode | schedule | jobs | cycles | model | model error | PE utilization | "
          "activation passes | W passes | mismatches |")
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for seed, (name, sweep) in enumerate(cases):
        rows_of_case = run_case(name, sweep, args.tokens, config, args.rank, seed)
        table += rows_of_case
        for row in rows_of_case:
            rtl = row["cycles"] is not None
            cycles = f"{row['cycles']:,}" if rtl else "-"
            error = f"{100 * row['model_error']:+.2f}%" if rtl else "-"
            print(f"| {row['projection']} | {row['product']} | {row['tokens']} | {row['weights']} | {row['mode']} | "
                  f"{row['schedule']} | "
                  f"{row['jobs']} | {cycles} | {row['model_cycles']:,} | {error} | {100 * row['utilization']:.1f}% | "
                  f"{row['activation_passes']:.2f} | {row['w_passes']:.2f} | {row['mismatches'] if rtl else '-'} |",
                  flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(table, f, indent=1)
    if any(row["mismatches"] for row in table if row["mismatches"] is not None):
        raise SystemExit("block_gemm: outputs differ from the golden model")


if __name__ == "__main__":
    main()
