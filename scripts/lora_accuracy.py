#!/usr/bin/env python3
"""Accuracy of one QLoRA step: our hardware arithmetic against PEFT + bitsandbytes in bf16, both against fp64.

    python scripts/lora_accuracy.py                    # the README's table (seconds)
    python scripts/lora_accuracy.py --t 16 --in 2048 --out 256 --rank 16 --optimizer sgd

The hardware's outputs come from its bit-accurate model (``golden.lora.step_model``), which the RTL equals bit for
bit (``tests/test_lora.py``); the reference is ``golden.lora.step_reference_fp64`` on the same bf16 inputs and
dequantized weight, and PEFT's figures from ``bitsandbytes.nn.Linear4bit`` wrapped by PEFT LoRA, run in bf16.
"""

import argparse

import torch

from edge_qlora.golden import gemm as gemm_model
from edge_qlora.golden import lora


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=int, default=16)
    parser.add_argument("--in", dest="d_in", type=int, default=512)
    parser.add_argument("--out", dest="d_out", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--step", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    case = lora.random_case(args.t, args.d_in, args.d_out, args.rank, args.optimizer, args.step, args.seed,
                            states=args.step > 1)
    reference = lora.step_reference_fp64(case)
    ours = lora.step_model(case)
    peft = lora.step_peft_bf16(case)
    print(f"**Step {args.step} ({args.optimizer}), T={args.t}, in={args.d_in}, out={args.d_out}, r={args.rank}: "
          f"relative Frobenius error against fp64**\n")
    print("| output | Edge-QLoRA | PEFT + bitsandbytes (bf16) | ratio | max abs error (ours) |")
    print("|---|---:|---:|---:|---:|")
    worst = 0.0
    for name in lora.OUTPUT_NAMES:
        exact = reference[name].numpy()
        our = gemm_model.rel_frobenius(ours[name], exact)
        theirs = gemm_model.rel_frobenius(peft[name].float(), exact)
        ratio = our / theirs if theirs else float("nan")
        worst = max(worst, ratio)
        max_abs = float((ours[name].double() - torch.from_numpy(exact).double()).abs().max())
        print(f"| {name} | {our:.3e} | {theirs:.3e} | {ratio:.3f} | {max_abs:.2e} |")
    print(f"\nworst ratio {worst:.3f} (the contract: at most 1.1)")


if __name__ == "__main__":
    main()
