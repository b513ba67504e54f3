"""The ``edge-qlora`` command line.

Every error the user can cause ends in one line on stderr (``edge-qlora: error: ...``) and exit status 2; a bug
in the tool itself still shows its traceback.
"""

import argparse
import os
import sys
import time

__all__ = ["main"]

BOARDS = ("icebreaker", "ulx3s-85f")
DTYPES = ("bf16", "fp16", "fp32")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line instead of argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _lanes(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lanes must be an integer from 1 to 16, not {text!r}") from None
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"lanes must be an integer from 1 to 16, not {value}")
    return value


def _blocksize(text):
    from .golden.codebooks import BLOCKSIZES
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in BLOCKSIZES:
        raise argparse.ArgumentTypeError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, not {text}")
    return value


def _parser():
    parser = _Parser(
        prog="edge-qlora",
        description="Edge-QLoRA: FPGA IP cores for QLoRA, bit-exact with bitsandbytes. Each command runs the RTL in "
                    "Amaranth's simulator (--backend pysim, the default) or the bit-accurate Python model "
                    "(--backend golden).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    quantize = commands.add_parser(
        "quantize", help="quantize a weight to NF4 (bitsandbytes' quantize_4bit)",
        description="Quantize the tensor 'weight' of a safetensors file to NF4. OUT holds the packed weight under "
                    "'weight' and bitsandbytes' QuantState under 'weight.<key>' (QuantState.as_dict(packed=True)), "
                    "as a Linear4bit state dict does, so QuantState.from_dict loads it.")
    quantize.add_argument("input", metavar="IN", help="safetensors file with a float32/float16/bfloat16 'weight'")
    quantize.add_argument("output", metavar="OUT", help="safetensors file to write")
    quantize.add_argument("--blocksize", type=_blocksize, default=64, help="NF4 block size (default 64)")
    quantize.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                          help="quantize the absmax values again, as QLoRA does (default: on)")
    _backend_options(quantize)

    dequant = commands.add_parser(
        "dequant", help="dequantize an NF4 weight (bitsandbytes' dequantize_4bit)",
        description="Dequantize an NF4 weight stored as 'quantize' writes it (the form of a bitsandbytes Linear4bit "
                    "state dict). OUT holds 'weight' in the requested dtype and the original shape.")
    dequant.add_argument("input", metavar="IN", help="safetensors file with 'weight' and 'weight.<quant-state key>'")
    dequant.add_argument("output", metavar="OUT", help="safetensors file to write")
    dequant.add_argument("--dtype", choices=DTYPES, default="bf16", help="output dtype (default bf16)")
    _backend_options(dequant)

    build = commands.add_parser(
        "build", help="build a bitstream for a board with the open toolchain",
        description="Elaborate the NF4 dequantizer behind a board wrapper, run YoWASP Yosys, nextpnr and the "
                    "bitstream packer, and write the bitstream and report.json (Fmax per clock, target, "
                    "utilization) to the output folder.")
    build.add_argument("--board", choices=BOARDS, required=True, help="target board")
    build.add_argument("--lanes", type=_lanes, default=8, help="dequantizer lanes, 1 to 16 (default 8)")
    build.add_argument("--dtype", choices=DTYPES, default="bf16", help="dequantizer output dtype (default bf16)")
    build.add_argument("--blocksize", type=_blocksize, default=64, help="NF4 block size (default 64)")
    build.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                       help="build the plain-absmax dequantizer")
    build.add_argument("--target-mhz", type=float, default=None,
                       help="clock target (default: 100 MHz on ulx3s-85f, 24 MHz on icebreaker)")
    build.add_argument("--seed", type=int, default=1, help="nextpnr placement seed (default 1)")
    build.add_argument("--out", default=None, metavar="DIR", help="output folder (default build/<board>)")
    return parser


def _backend_options(parser):
    parser.add_argument("--backend", choices=("golden", "pysim"), default="pysim",
                        help="pysim: the RTL in Amaranth's simulator (default); golden: the Python model")
    parser.add_argument("--lanes", type=_lanes, default=8, help="RTL lanes (weights per cycle), 1 to 16 (default 8)")
    parser.add_argument("--vcd", metavar="FILE", default=None, help="write a VCD waveform of the RTL run (pysim)")


def _progress_bar(total, desc):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="beat", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())

    def update(done, _total=None):
        bar.update(done - bar.n)
    return bar, update


def _check_output(path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        from .formats import InputError
        raise InputError(f"{path}: output folder {folder} does not exist")


def _quantize(args):
    from .formats import load_weight, save_quantized
    from .golden import nf4_quant

    _check_output(args.output)
    weight = load_weight(args.input)
    values = weight.detach().reshape(-1).float().numpy()
    try:
        nf4_quant.check_finite(values)
    except ValueError as error:
        from .formats import InputError
        raise InputError(f"{args.input}: {error}") from None
    start = time.perf_counter()
    if args.backend == "golden":
        quantized = nf4_quant.quantize(weight, args.blocksize, args.double_quant)
        report = None
    else:
        from .sim.nf4_quant import quantize_rtl
        bar, update = _progress_bar(-(-weight.numel() // args.lanes), "quantize (pysim)")
        with bar:
            quantized, report = quantize_rtl(weight, args.blocksize, args.double_quant, lanes=args.lanes,
                                             vcd_path=args.vcd, progress=update)
    save_quantized(args.output, quantized)
    seconds = time.perf_counter() - start
    n = weight.numel()
    print(f"quantized {tuple(weight.shape)} {quantized.dtype} -> NF4, blocksize {args.blocksize}, "
          f"double quant {'on' if args.double_quant else 'off'}, backend {args.backend}: {args.output}")
    if report:
        for unit, cycles in report.items():
            print(f"  {unit}: {cycles} cycles")
        print(f"  {n / report['quantizer']:.2f} weights/cycle ({args.lanes} lanes), {seconds:.1f} s simulated")


def _dequant(args):
    from .formats import load_quantized, save_weight
    from .golden import nf4_dequant

    _check_output(args.output)
    quantized = load_quantized(args.input)
    n = 1
    for dim in quantized.shape:
        n *= dim
    start = time.perf_counter()
    if args.backend == "golden":
        weight = nf4_dequant.dequantize(quantized, args.dtype)
        cycles = None
    else:
        import torch
        from .rtl.nf4_dequant import NF4DequantConfig
        from .sim.nf4 import run_dequantizer
        config = NF4DequantConfig(lanes=args.lanes, blocksize=quantized.blocksize, out_dtype=args.dtype,
                                  double_quant=quantized.double_quant)
        bar, update = _progress_bar(-(-n // args.lanes), "dequant (pysim)")
        with bar:
            run = run_dequantizer(quantized, config, vcd_path=args.vcd, progress=update)
        weight = torch.from_numpy(run.values.view({"bf16": "int16", "fp16": "int16", "fp32": "int32"}[args.dtype]))
        weight = weight.view(nf4_dequant.DTYPES[args.dtype]).reshape(quantized.shape)
        cycles = run.cycles
    save_weight(args.output, weight.contiguous())
    seconds = time.perf_counter() - start
    print(f"dequantized {tuple(quantized.shape)} NF4 -> {args.dtype}, backend {args.backend}: {args.output}")
    if cycles:
        print(f"  {cycles} cycles for {n} weights: {n / cycles:.2f} weights/cycle ({args.lanes} lanes), "
              f"{seconds:.1f} s simulated")


def _build(args):
    from .boards.build import build, format_report
    from .rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer

    out = args.out or os.path.join("build", args.board)
    config = NF4DequantConfig(lanes=args.lanes, blocksize=args.blocksize, out_dtype=args.dtype,
                              double_quant=args.double_quant)
    print(f"building NF4Dequantizer(lanes={args.lanes}, blocksize={args.blocksize}, out={args.dtype}, "
          f"double_quant={args.double_quant}) for {args.board} in {out}", flush=True)
    report = build(NF4Dequantizer(config), args.board, out, target_mhz=args.target_mhz, seed=args.seed,
                   progress=lambda step: print(f"  {step}", flush=True))
    print(format_report(report))


def main(argv=None):
    args = _parser().parse_args(argv)
    from .formats import InputError
    from .boards.build import BuildError
    try:
        {"quantize": _quantize, "dequant": _dequant, "build": _build}[args.command](args)
    except (InputError, BuildError) as error:
        print(f"edge-qlora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-qlora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
