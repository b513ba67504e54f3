"""Why the blocked step's transposed product needs each chunk's exponent over all of W's columns: the backward
product ``dx = dy @ W`` computed in blocks of W's columns (as the blocked step's output-stationary loop would),
against the engine's golden model over whole rows (``docs/memstep.md``, "Next: the blocked step").

    python scripts/blocked_numerics.py [--tokens 128] [--out-features 256] [--in-features 2048] [--block 448]

The engine's backward mode shares one exponent per chunk of W rows across all the columns it holds; in blocks of
columns each block would take its own maximum, which differs from the whole row's where an outlier column sets it.
Prints the fraction of float32 outputs that differ, for a N(0, 0.02) weight and for the same weight with one
input feature 50 times larger, NF4-quantized as bitsandbytes does, with each block's own exponents and with the
whole rows' (``golden.gemm.row_chunk_exponents``, the table the blocked step would keep with the weight).
"""

import argparse

import numpy as np
import torch

from edge_qlora.golden import gemm as g
from edge_qlora.golden import nf4_dequant, nf4_quant


def differing(dy, w, block, table):
    """Fraction of float32 outputs that differ between the whole product and blocks of ``block`` columns (each
    with the whole rows' chunk exponents if ``table``, else with its own)."""
    numerics = g.GemmNumerics(out_dtype="fp32")
    whole = g.gemm(dy, w, numerics, transposed=True).numpy()
    exps = g.row_chunk_exponents(g._bf16_values(w), numerics.chunk) if table else None
    blocked = np.concatenate([g.gemm(dy, w[:, c:c + block], numerics, transposed=True, row_exponents=exps).numpy()
                              for c in range(0, w.shape[1], block)], axis=1)
    return float((whole.view(np.int32) != blocked.view(np.int32)).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out-features", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--block", type=int, default=448, help="W columns per block (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("tokens", "out_features", "in_features", "block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.out_features * args.in_features % 64:
        parser.error("the weight must be a whole number of NF4 blocks of 64")
    dy = g.random_activations((args.tokens, args.out_features), seed=4)
    base = torch.randn((args.out_features, args.in_features), generator=torch.Generator().manual_seed(5)) * 0.02
    outlier = base.clone()
    outlier[:, min(100, args.in_features - 1)] *= 50
    for label, weight in (("N(0, 0.02)", base), ("one input feature x50", outlier)):
        w = nf4_dequant.dequantize(nf4_quant.quantize(weight, 64, True), "bf16")
        for table, how in ((False, "each block's own chunk exponents"), (True, "the whole rows' chunk exponents")):
            share = differing(dy, w, args.block, table)
            print(f"{label}, blocks of {args.block} columns with {how}: {100 * share:.1f}% of the float32 outputs "
                  f"differ")


if __name__ == "__main__":
    main()
