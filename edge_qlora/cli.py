"""The ``edge-qlora`` command line.

Every error the user can cause (a bad input file or option, an output that cannot be written, a design that does not
fit its board, a write that fails) ends in one line on stderr (``edge-qlora: error: ...``) and exit status 2;
Ctrl-C ends in ``edge-qlora: interrupted`` and exit status 130. Output paths are checked before any long work, and
every output is written to a temporary file beside it and renamed when complete, so an interrupted run leaves
neither a truncated file nor a destroyed older one. Runs longer than a few seconds show progress on stderr when it
is a terminal (``--quiet`` turns it off). A bug in the tool itself still shows its traceback.
"""

import argparse
import contextlib
import os
import sys
import time

from .constants import CODE_BITS, DRAM_PRESETS, TINYLLAMA_PROJECTIONS
from .cli_shared import blocksize as _blocksize, progress_bar as _progress_bar, show_progress as _show_progress

__all__ = ["main"]

BOARDS = ("icebreaker", "ulx3s-85f")
DTYPES = ("bf16", "fp16", "fp32")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line instead of argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show (flags, board-dependent defaults, which
    their help spells out)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or any(action.default is none
                                                                 for none in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def _lanes(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lanes must be an integer from 1 to 16, not {text!r}") from None
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"lanes must be an integer from 1 to 16, not {value}")
    return value


def _side(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not 1 <= value <= 16:
            raise argparse.ArgumentTypeError(f"{name} must be an integer from 1 to 16, not {text}")
        return value
    return parse



def _parser():
    parser = _Parser(
        prog="edge-qlora", formatter_class=_HelpFormatter,
        description="Edge-QLoRA: FPGA IP cores for QLoRA, bit-exact with bitsandbytes. Each command runs the RTL in "
                    "Amaranth's simulator (--backend pysim, the default), compiled with Verilator (--backend "
                    "verilator: over 1000 times faster, built once per configuration and cached; see 'cache'), "
                    "or the bit-accurate Python model (--backend golden).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they appear on stderr only when it is a terminal)")

    def command(name, **kwargs):
        return commands.add_parser(name, formatter_class=_HelpFormatter, parents=[common], **kwargs)

    demo = command(
        "demo", help="quantize and dequantize a TinyLlama-shaped weight on the RTL, checked against bitsandbytes",
        description="The main job in one command: a random bf16 weight of TinyLlama's hidden width is quantized to "
                    "NF4 (blocksize 64, double quantization) by the RTL quantizer and dequantized by the RTL "
                    "dequantizer, both in Amaranth's simulator, and every output is compared bit for bit with "
                    "bitsandbytes' quantize_4bit / dequantize_4bit.")
    demo.add_argument("--rows", type=int, default=8, help="rows of the weight (TinyLlama's projections have 2048)")
    demo.add_argument("--cols", type=int, default=2048, help="columns of the weight")
    demo.add_argument("--lanes", type=_lanes, default=16, help="RTL lanes (weights per cycle), 1 to 16")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weight")
    demo.add_argument("--backend", choices=BACKENDS[1:], default="pysim",
                      help="pysim: Amaranth's simulator; verilator: the RTL compiled with Verilator (cached)")

    quantize = command(
        "quantize", help="quantize a weight to NF4 (bitsandbytes' quantize_4bit), NF3, NF2 or a table of yours",
        description="Quantize the tensor 'weight' of a safetensors file to NF4 (or with --bits to NF3/NF2, or with "
                    "--codebook to a table of 4, 8 or 16 levels). OUT holds the packed weight under 'weight' and "
                    "the quant state under 'weight.<key>' (QuantState.as_dict(packed=True)), as a Linear4bit state "
                    "dict does: NF4 files are exactly bitsandbytes' and QuantState.from_dict loads them; the other "
                    "code books keep the same tensors under their own key (docs/codebooks.md).")
    quantize.add_argument("input", metavar="IN", help="safetensors file with a float32/float16/bfloat16 'weight'")
    quantize.add_argument("output", metavar="OUT", help="safetensors file to write (replaced if it exists)")
    quantize.add_argument("--bits", type=int, choices=CODE_BITS, default=None,
                          help="code width: NF2, NF3 or NF4 (default 4; with --codebook, the table's width)")
    quantize.add_argument("--codebook", metavar="FILE", default=None,
                          help="your own table: a JSON list, or a safetensors tensor 'levels', of 4, 8 or 16 "
                               "increasing float32 values (code 0 the smallest); default: the NF table of --bits")
    quantize.add_argument("--blocksize", type=_blocksize, default=64, help="block size")
    quantize.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                          help="quantize the absmax values again, as QLoRA does")
    _backend_options(quantize)

    dequant = command(
        "dequant", help="dequantize an NF4/NF3/NF2 or code-book weight (bitsandbytes' dequantize_4bit for NF4)",
        description="Dequantize a weight stored as 'quantize' writes it (the form of a bitsandbytes Linear4bit "
                    "state dict); the code width and table come from the file. OUT holds 'weight' in the requested "
                    "dtype and the original shape.")
    dequant.add_argument("input", metavar="IN", help="safetensors file with 'weight' and 'weight.<quant-state key>'")
    dequant.add_argument("output", metavar="OUT", help="safetensors file to write (replaced if it exists)")
    dequant.add_argument("--dtype", choices=DTYPES, default="bf16", help="output dtype")
    _backend_options(dequant)

    matmul = command(
        "matmul", help="y = x @ W.T (or x @ W) on the GEMM engine, W in bf16 or NF4",
        description="Multiply activations by a weight on the systolic GEMM engine. Without --transpose-w: "
                    "y = x @ W.T, x [M, K], W [N, K], y [M, N] (the forward pass). With --transpose-w: y = x @ W, "
                    "x [M, N], y [M, K] (the backward pass dx = dy @ W). W is a bf16 'weight' or an NF4 weight "
                    "in the form 'quantize' writes; NF4 weights go through the dequantizer and are never stored "
                    "in full precision.")
    matmul.add_argument("x", metavar="X", help="safetensors file with a bf16 tensor 'x'")
    matmul.add_argument("w", metavar="W", help="safetensors file with 'weight' (bf16, or NF4 + quant state)")
    matmul.add_argument("output", metavar="OUT", help="safetensors file to write, with 'y' (replaced if it exists)")
    matmul.add_argument("--rows", type=_side("rows"), default=4, help="PE array rows, 1 to 16")
    matmul.add_argument("--cols", type=_side("cols"), default=4, help="PE array columns, 1 to 16")
    matmul.add_argument("--transpose-w", action="store_true", help="compute x @ W instead of x @ W.T")
    matmul.add_argument("--out-dtype", choices=("bf16", "fp32"), default="bf16", help="y's dtype")
    matmul.add_argument("--backend", choices=BACKENDS, default="pysim", help=BACKEND_HELP)
    matmul.add_argument("--vcd", metavar="FILE", default=None,
                        help="write a VCD waveform of the RTL run (pysim or verilator; default: none)")

    step = command(
        "step", help="one QLoRA training step of a linear layer (forward, backward, update)",
        description="Run one training step of a QLoRA linear layer: y = x W^T + s (x A^T) B^T, the gradients of "
                    "A and B, dx, and the SGD or AdamW update of A and B. CASE is a safetensors file with x [T, in] "
                    "and dy [T, out] (bf16), lora_A [r, in] and lora_B [out, r] (float32 or bf16), the NF4 base "
                    "weight as base.weight + base.weight.<quant-state keys>, optionally exp_avg_A, exp_avg_sq_A, "
                    "exp_avg_B, exp_avg_sq_B (zeros when absent), and metadata strings scaling, optimizer (sgd or "
                    "adamw), lr, beta1, beta2, eps, weight_decay, step. OUT is the CASE of the next step: the new "
                    "lora_A and lora_B (float32 master copies), the new optimizer state, step + 1, the same x, dy, "
                    "base weight and hyperparameters (replace x and dy for the next batch), and this step's "
                    "results y, dx, grad_A and grad_B. OUT must not be CASE. With --memory the step runs with every "
                    "tensor in external memory (the memory-fed step against the DRAM's timing model): the new "
                    "lora_A, lora_B and moments are read back from memory, the results are y and dx only (that "
                    "step writes no gradients: OUT has no grad_A, grad_B), and the report adds the stall cycles, "
                    "the bytes read and written per tensor, the bandwidth achieved against the DRAM's peak and the "
                    "cycle model with memory. With --memory and --blocked the step runs on the blocked step top "
                    "(the I/O-aware dataflow: the forward and backward products in blocks through the memory port "
                    "with the rank-r terms and the gradients, then the AdamW or SGD update of A and B, four "
                    "descriptors on one design): OUT has every result, y, dx, grad_A and grad_B, and the report gives "
                    "each part's cycles, stalls and bytes.")
    step.add_argument("case", metavar="CASE", help="safetensors step case")
    step.add_argument("output", metavar="OUT", help="safetensors file to write: the next step's case and this "
                                                    "step's results (replaced if it exists)")
    step.add_argument("--backend", choices=BACKENDS, default="pysim", help=BACKEND_HELP)
    step.add_argument("--rows", type=_side("rows"), default=4, help="GEMM array rows, 1 to 16")
    step.add_argument("--cols", type=_side("cols"), default=4, help="GEMM array columns, 1 to 16")
    step.add_argument("--vcd", metavar="FILE", default=None,
                      help="write a VCD waveform of the RTL run (pysim or verilator; default: none)")
    step.add_argument("--memory", choices=MEMORIES, default=None,
                      help="run the memory-fed step, every tensor in this DRAM behind a memory port (pysim or "
                           "verilator; T a multiple of --rows, in and out of --cols; ecpix5-ddr3's 64-bit port "
                           "needs --cols >= 4); OUT's results are then y and dx, no grad_A/grad_B, unless --blocked "
                           "(default: the step with its tensors as streams)")
    step.add_argument("--blocked", action="store_true",
                      help="with --memory: run the blocked step top (feature blocks of at most --max-features; NF4 in "
                           "blocks of 64 with double quantization, T a multiple of --rows, in a multiple of 64 and at "
                           "least 128, out a multiple of --cols, r a power of two from 2 to 16)")
    step.add_argument("--max-features", type=int, default=384, metavar="N",
                      help="--blocked: feature (and column) blocks of at most N outputs (default: %(default)s)")
    step.add_argument("--json", action="store_true",
                      help="print one JSON object on stdout (cycles, phase_cycles, utilization, model_cycles; with "
                           "--memory also stall_cycles, bytes_read, bytes_written, read_bytes, written_bytes, "
                           "bandwidth_gbps) instead of the report")

    make_case = command(
        "make-case", help="write a random step case for 'step' (x, dy, LoRA factors, NF4 base weight)",
        description="Write a step case with random inputs: x [T, in] ~ N(0, 1) and dy [T, out] ~ N(0, 0.01) in "
                    "bf16, a base weight ~ N(0, 0.02^2) quantized to NF4 (blocksize 64, double quantization), "
                    "lora_A and lora_B ~ N(0, 0.05^2) in float32, and the optimizer settings as metadata (AdamW's "
                    "beta1 0.9, beta2 0.999, eps 1e-8; step 1).")
    make_case.add_argument("output", metavar="OUT", help="safetensors file to write (replaced if it exists)")
    make_case.add_argument("--tokens", type=int, default=4, help="T, tokens in the batch")
    make_case.add_argument("--in-features", type=int, default=64, help="in, the layer's input features")
    make_case.add_argument("--out-features", type=int, default=48, help="out, the layer's output features")
    make_case.add_argument("--rank", type=int, default=8, help="r, the LoRA rank")
    make_case.add_argument("--scaling", type=float, default=2.0, help="s = lora_alpha / r")
    make_case.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer of the step")
    make_case.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    make_case.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (decoupled for AdamW)")
    make_case.add_argument("--seed", type=int, default=0, help="seed of the random tensors")

    build = command(
        "build", help="build a bitstream for a board with the open toolchain",
        description="Elaborate a design behind a board wrapper, run YoWASP Yosys, nextpnr and the bitstream "
                    "packer, and write the bitstream and report.json (Fmax per clock, target, utilization) to "
                    "the output folder. The design is the NF4 dequantizer, or with --rows/--cols the GEMM engine "
                    "(with its dequantizer), or with --lora the whole step accelerator. The GEMM engine on the "
                    "ulx3s-85f builds as its 8x8 array routed at 107.71 MHz: classic ABC LUT mapping, seed 5 and "
                    "the PE multipliers pinned to a DSP floorplan between Yosys and nextpnr (--floorplan). A "
                    "design known not to fit the board (measured builds, see --lanes) is refused before Yosys "
                    "runs, naming the largest that fits.")
    build.add_argument("--board", choices=BOARDS, required=True, help="target board (required)")
    build.add_argument("--rows", type=_side("rows"), default=None,
                       help="build the GEMM engine with this many rows (default: the dequantizer alone)")
    build.add_argument("--cols", type=_side("cols"), default=None,
                       help="... and this many columns (and dequantizer lanes) (default: none)")
    build.add_argument("--max-k", type=int, default=512,
                       help="GEMM engine buffers: longest W row and most W rows transposed (the synthesis table's "
                            "and the routed 8x8's value)")
    build.add_argument("--lora", action="store_true",
                       help="build the full step accelerator (dequantizer, GEMM engine, LoRA datapath, optimizer, "
                            "controller) on a --rows x --cols array")
    build.add_argument("--memory", choices=MEMORIES, default=None,
                       help="--lora: the step fed through an external-memory port shaped for this DRAM (driven by the "
                            "board wrapper like every other port: no DRAM controller yet) (default: the step with "
                            "its tensors as streams)")
    build.add_argument("--max-t", type=int, default=16, help="--lora: most tokens per step")
    build.add_argument("--max-in", type=int, default=64, help="--lora: largest in_features")
    build.add_argument("--max-out", type=int, default=64, help="--lora: largest out_features")
    build.add_argument("--max-rank", type=int, default=8, help="--lora: largest LoRA rank")
    build.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="--lora: optimizer core")
    build.add_argument("--lanes", type=_lanes, default=None,
                       help="dequantizer lanes, 1 to 16 (default: 1 on icebreaker, the most that fits its 5280 "
                            "logic cells; 8 on ulx3s-85f, where all 16 fit)")
    build.add_argument("--dtype", choices=DTYPES, default="bf16", help="dequantizer output dtype")
    build.add_argument("--quantizer", action="store_true",
                       help="build the quantizer core instead of the dequantizer (--lanes, --dtype as its input, "
                            "--bits, --table, --blocksize)")
    build.add_argument("--bits", type=int, choices=CODE_BITS, default=4,
                       help="dequantizer/quantizer code width (NF4, NF3, NF2, or a loaded table of 2**bits levels)")
    build.add_argument("--table", choices=("nf", "loaded"), default="nf",
                       help="dequantizer/quantizer code book: the NF table of --bits as constants, or loaded per "
                            "tensor")
    build.add_argument("--blocksize", type=_blocksize, default=64, help="NF4 block size")
    build.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                       help="build the plain-absmax dequantizer (default: double quantization)")
    build.add_argument("--compact", action=argparse.BooleanOptionalAction, default=None,
                       help="dequantizer float units with fewer pipeline registers, for small FPGAs "
                            "(default: on for icebreaker, off for ulx3s-85f)")
    build.add_argument("--target-mhz", type=float, default=None,
                       help="clock target (default: 100 MHz on ulx3s-85f through the PLL; 12 MHz on icebreaker, "
                            "its oscillator)")
    build.add_argument("--seed", type=int, default=None,
                       help="nextpnr placement seed (default: 5 for the GEMM engine on ulx3s-85f, the seed its "
                            "floorplanned 8x8 routed with; 1 otherwise)")
    build.add_argument("--router", choices=("router1", "router2"), default=None,
                       help="nextpnr router (default: nextpnr's, router1)")
    build.add_argument("--lut-mapper", choices=("abc9", "abc"), default=None,
                       help="Yosys LUT mapping: abc9 (fewer LUTs) or classic abc (about 6%% more LUTs, but the 8x8 "
                            "GEMM engine routes with it, not with abc9) (default: abc for the GEMM engine on "
                            "ulx3s-85f, abc9 otherwise)")
    build.add_argument("--floorplan", action=argparse.BooleanOptionalAction, default=None,
                       help="pin the PE multipliers of the GEMM engine to a DSP floorplan of the LFE5U-85F (nextpnr "
                            "BEL attributes written into the netlist between Yosys and nextpnr); ulx3s-85f only, "
                            "arrays up to 12x11 (default: on for the GEMM engine on ulx3s-85f, off for the "
                            "dequantizer, the step accelerator and the icebreaker)")
    build.add_argument("--place-only", action="store_true",
                       help="stop after placement (no routing, no bitstream): a quick check that a large design "
                            "fits; Fmax is nextpnr's estimate before routing")
    build.add_argument("--out", default=None, metavar="DIR",
                       help="output folder, created if missing (default: build/<board>)")

    verilog = command(
        "verilog", help="write the Verilog of a unit (dequantizer, quantizer, GEMM engine, step accelerator)",
        description="Export one unit with its parameters to Verilog (top module 'top', ports clk and rst and the "
                    "unit's streams), for integration in another design or flow. The file's header lists the "
                    "ports, each stream's payload fields and the stream protocol. Options that do not apply to "
                    "UNIT are ignored.")
    verilog.add_argument("unit", metavar="UNIT", choices=VERILOG_UNITS,
                         help=f"one of: {', '.join(VERILOG_UNITS)}")
    verilog.add_argument("-o", "--output", metavar="FILE.v", required=True, help="Verilog file to write (required)")
    verilog.add_argument("--lanes", type=_lanes, default=8, help="dequantizer/quantizer lanes, 1 to 16")
    verilog.add_argument("--dtype", choices=DTYPES, default="bf16",
                         help="dequantizer output / quantizer input dtype")
    verilog.add_argument("--blocksize", type=_blocksize, default=64, help="NF4 block size")
    verilog.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                         help="double-quantized absmax (dequantizer, gemm, step)")
    verilog.add_argument("--compact", action="store_true", help="dequantizer: fewer pipeline registers")
    verilog.add_argument("--bits", type=int, choices=CODE_BITS, default=4, help="dequantizer/quantizer: code width")
    verilog.add_argument("--table", choices=("nf", "loaded"), default="nf",
                         help="dequantizer/quantizer: the NF table of --bits as constants, or loaded per tensor")
    verilog.add_argument("--rows", type=_side("rows"), default=8, help="gemm/step: PE array rows")
    verilog.add_argument("--cols", type=_side("cols"), default=8, help="gemm/step: PE array columns")
    verilog.add_argument("--max-k", type=int, default=512, help="gemm: longest W row")
    verilog.add_argument("--max-n", type=int, default=512, help="gemm: most W rows")
    verilog.add_argument("--weights", choices=("nf4", "bf16"), default="nf4", help="gemm: weight stream")
    verilog.add_argument("--out-dtype", choices=("bf16", "fp32"), default="bf16", help="gemm: output dtype")
    verilog.add_argument("--max-t", type=int, default=16, help="step: most tokens")
    verilog.add_argument("--max-in", type=int, default=64, help="step: largest in_features")
    verilog.add_argument("--max-out", type=int, default=64, help="step: largest out_features")
    verilog.add_argument("--max-rank", type=int, default=8, help="step: largest LoRA rank")
    verilog.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="step: optimizer core")

    cache = command(
        "cache", help="show or clear the cache of compiled Verilator models",
        description="The Verilator backend exports each configuration to Verilog and compiles it once; both are "
                    "kept in $EDGE_QLORA_CACHE/verilator (default ~/.cache/edge-qlora/verilator). Without "
                    "options: where it is, its models and size.")
    cache.add_argument("--clear", action="store_true", help="delete every cached model (default: only list them)")

    tinyllama = command(
        "tinyllama", help="one QLoRA step of each of TinyLlama's seven projections, cycle by cycle on Verilator",
        description="Run one QLoRA step (AdamW) of each of TinyLlama-1.1B's seven projections at its real shape "
                    "(q and o 2048 -> 2048, k and v 2048 -> 256, gate and up 2048 -> 5632, down 5632 -> 2048) on "
                    "the step accelerator compiled with Verilator, weights built locally. Each row: cycles "
                    "measured and modelled, PE utilization, the accuracy contract (every output at least as "
                    "accurate as PEFT + bitsandbytes in bf16 against float64, within 10%), the scratchpads the "
                    "shape needs against the ECP5-85F's block RAM. The first run exports and compiles the model "
                    "(about 8 minutes); all seven projections at T=16 and 128 take about 40 minutes. With --memory "
                    "each projection runs on the memory-fed step, every tensor in that DRAM behind a memory port "
                    "(its timing model), and the rows add the memory and compute stall cycles, the bytes read and "
                    "written and the bandwidth achieved; that step writes no gradients, so the accuracy contract "
                    "covers y, dx and the new factors and moments.")
    tinyllama.add_argument("--tokens", type=_positive("--tokens"), nargs="+", default=[16, 128],
                           help="token counts T per step")
    tinyllama.add_argument("--projections", nargs="+", default=[name for name, _, _ in TINYLLAMA_PROJECTIONS],
                           choices=[name for name, _, _ in TINYLLAMA_PROJECTIONS], metavar="NAME",
                           help="projections to run")
    tinyllama.add_argument("--rank", type=_positive("--rank"), default=16, help="LoRA rank")
    tinyllama.add_argument("--rows", type=_side("rows"), default=8, help="GEMM array rows")
    tinyllama.add_argument("--cols", type=_side("cols"), default=8, help="GEMM array columns")
    tinyllama.add_argument("--json", metavar="FILE", default=None,
                           help="also write the rows as a JSON list there (default: none)")
    tinyllama.add_argument("--memory", choices=MEMORIES, default=None,
                           help="run each projection on the memory-fed step with every tensor in this DRAM "
                                "(ecpix5-ddr3 needs --cols >= 4) (default: the step with its tensors on chip)")

    footprint = command(
        "footprint", help="memory of QLoRA fine-tuning a model: NF4 bytes measured, LoRA, AdamW, activations",
        description="The memory of QLoRA fine-tuning a model, counted on the model built from its published "
                    "configuration (transformers, meta device) with every distinct linear-layer shape quantized "
                    "by bitsandbytes (NF4, blocksize 64, double quantization) and measured: the quantized model "
                    "as stored and its reduction against FP16, LoRA on every projection (fp32 masters and "
                    "gradients, AdamW's two fp32 moments), the activations the backward pass keeps (bf16, batch "
                    "1), and the working set of a device through which the decoder layers stream one at a time; "
                    "how far the model is from 300 MB and from 75% less than FP16. See docs/footprint.md.")
    footprint.add_argument("--model", choices=_footprint_models(), required=True, help="the model (required)")
    footprint.add_argument("--lora-r", type=_positive("the LoRA rank"), default=16, help="LoRA rank")
    footprint.add_argument("--seq-len", type=_positive("the sequence length"), default=128,
                           help="tokens in the sequence (batch 1)")
    footprint.add_argument("--embeddings", choices=("bf16", "nf4"), default="bf16",
                           help="storage of the embeddings and lm_head")
    footprint.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    from .plan import add_footprint_options, add_plan_parser
    add_footprint_options(footprint)
    add_plan_parser(command)
    _bench_options(command)
    _sweep_options(command)
    return parser


def _sweep_options(command):
    sweep = command(
        "sweep", help="run many builds or TinyLlama step simulations at once on Ray (one machine or a cluster)",
        description="Sweep a design space: SPEC (TOML) names the command (build, the default, or tinyllama), the "
                    "board, a [design] table of fixed options and a [sweep] table of lists, both named as the "
                    "command's long options without dashes (lanes = 1, seed = [1, 2], place_only = [true], "
                    "lut_mapper = [\"abc\", \"abc9\"]), and optionally timeout_s (a point running longer is "
                    "stopped and recorded) and memory_gb (what each point declares to Ray). Every combination is a "
                    "Ray task of one CPU; a point that fails is recorded with its reason and the sweep goes on. "
                    "Writes DIR/sweep.json after every point, then DIR/sweep.md and, for builds, DIR/pareto.png "
                    "(Fmax against LUTs, Pareto front marked); the best bitstream of each design point is kept in "
                    "DIR/bitstreams, the others are deleted. Needs Ray: pip install -e \".[sweep]\". See "
                    "docs/sweep.md.")
    sweep.add_argument("spec", metavar="SPEC", help="sweep specification, a TOML file")
    sweep.add_argument("--address", default=None, metavar="ADDRESS",
                       help="an existing Ray cluster: ray://HOST:PORT (Ray Client) or HOST:PORT (its GCS) (default: "
                            "start a local Ray instance of --jobs CPUs)")
    sweep.add_argument("--jobs", type=_positive("--jobs"), default=None,
                       help="points running at once (default: the cores minus one here, the cluster's CPUs with "
                            "--address)")
    sweep.add_argument("--out", default=None, metavar="DIR",
                       help="results folder, created if missing (default: build/sweep-<SPEC name>)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep in DIR: skip the points already done (ok or failed), run again "
                            "those stopped (worker died, Ctrl-C) or timed out under a shorter timeout_s")
    sweep.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")


def _bench_options(command):
    from .bench import lanes_list, thread_list
    bench = command(
        "bench", help="the accelerator against this CPU: NF4 weights/s and the QLoRA step of each TinyLlama "
                      "projection, measured side by side",
        description="Measure, in one run on this machine, the RTL (simulated cycles x the Fmax of the matching "
                    "routed build, named on every row) against the software it replaces: NF4 quantize and "
                    "dequantize weights per second (bitsandbytes on the CPU), and one QLoRA step (forward, "
                    "backward, AdamW) of each TinyLlama-1.1B projection at T = 16 and 128 (PEFT + bitsandbytes "
                    "NF4 in bf16 and fp32, on one thread and on all). The step runs on the blocked step top (or "
                    "with --top memory-fed the memory-fed step), every tensor in --memory's DRAM behind a memory "
                    "port (stalls included), or with --memory none on the step with every tensor on chip. Step "
                    "cycles come from Verilator runs where "
                    "there are some, else from the cycle model, checked against RTL runs in the same bench. "
                    "Prints a Markdown table (or --json) and writes bench.md, bench.json and two PNG plots to "
                    "--out. See docs/bench.md.")
    bench.add_argument("--small", action="store_true",
                       help="a quick run for CI (two to three minutes): q_proj and k_proj, 8 lanes, 2048 simulated "
                            "weights, one small check of the cycle model, 3 timed runs, Amaranth's simulator")
    bench.add_argument("--out", metavar="DIR", default=os.path.join("build", "bench"),
                       help="folder for bench.md, bench.json, bench_utilization.png, bench_step_time.png "
                            "(created if missing)")
    bench.add_argument("--json", action="store_true", help="print the report as one JSON object, not the table")
    bench.add_argument("--rows", type=_side("rows"), default=8, help="PE array rows of the step accelerator")
    bench.add_argument("--cols", type=_side("cols"), default=8, help="PE array columns of the step accelerator")
    bench.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    bench.add_argument("--threads", type=thread_list, default=None,
                       help="CPU thread counts to time, comma-separated, 'all' for every thread (default: 1,all)")
    bench.add_argument("--lanes", type=lanes_list, default=None,
                       help="NF4 core lane counts, comma-separated, from 1, 4, 8, 16 (default: 1,4,8,16; 8 with "
                            "--small)")
    bench.add_argument("--warmup", type=int, default=None,
                       help="untimed CPU runs before the timed ones (default: 2; 1 with --small)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="timed CPU runs, of which the median is reported (default: 5; 3 with --small)")
    bench.add_argument("--backend", choices=("auto", "pysim", "verilator"), default=None,
                       help="simulator of the RTL runs: auto (Verilator where it works here, else Amaranth's "
                            "simulator), pysim or verilator (default: auto; pysim with --small)")
    bench.add_argument("--verilator-max-cycles", type=int, default=None,
                       help="run on Verilator the TinyLlama steps that the cycle model puts at most this many "
                            "cycles (default: 3000000; none with --small)")
    bench.add_argument("--fmax", type=float, default=None, metavar="MHZ",
                       help="clock of the step accelerator, instead of the routed build's (default: the routed "
                            "build of the array, or the routed GEMM engine of the array standing in)")
    bench.add_argument("--memory", choices=MEMORIES + ("none",), default="ulx3s-sdram",
                       help="the DRAM the step is fed from: every tensor in that DRAM behind a memory port, against "
                            "its timing model (clock at most the memory controller's); none: the step with every "
                            "tensor on chip")
    bench.add_argument("--top", choices=("blocked", "memory-fed"), default="blocked",
                       help="with a memory, the design the step runs on: the blocked step top (feature blocks of at "
                            "most 384, as step --blocked) or the memory-fed step (default: %(default)s)")
    bench.add_argument("--measured", metavar="FILE", default=None,
                       help="JSON list of TinyLlama steps measured on Verilator, of the step --memory and --top "
                            "select (default: docs/blocked_step_sdram.json on the blocked top, "
                            "docs/tinyllama_memory_steps.json on the memory-fed step, docs/tinyllama_steps.json "
                            "with --memory none, where it exists)")


def _footprint_models():
    from .footprint import MODELS
    return tuple(MODELS)


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, not {text}")
        return value
    return parse


#: --memory: the DRAM presets (edge_qlora.constants).
MEMORIES = tuple(DRAM_PRESETS)
BACKENDS = ("golden", "pysim", "verilator")
VERILOG_UNITS = ("dequantizer", "quantizer", "absmax-quantizer", "gemm", "step")

BACKEND_HELP = ("pysim: the RTL in Amaranth's simulator; verilator: the RTL compiled with Verilator (the first run "
                "of a configuration compiles it, seconds to minutes; cached); golden: the bit-accurate Python model")


def _backend_options(parser):
    parser.add_argument("--backend", choices=BACKENDS, default="pysim", help=BACKEND_HELP)
    parser.add_argument("--lanes", type=_lanes, default=8, help="RTL lanes (weights per cycle), 1 to 16")
    parser.add_argument("--vcd", metavar="FILE", default=None,
                        help="write a VCD waveform of the RTL run (pysim or verilator; default: none)")




def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_outputs(args, outputs, inputs=()):
    """Refuse, before any work, an output that cannot be written or that is an input or another output.

    ``outputs`` and ``inputs`` are ``(what, path)`` pairs; ``None`` paths are skipped. A ``--vcd`` needs the
    simulator.
    """
    from .outputs import OutputError, check_output

    if getattr(args, "vcd", None) and getattr(args, "backend", "pysim") == "golden":
        raise OutputError("--vcd records the RTL run: it needs --backend pysim or verilator")
    if getattr(args, "backend", None) == "verilator":
        from .sim.verilator import unavailable_reason
        if unavailable_reason():
            raise OutputError(f"--backend verilator: {unavailable_reason()}")
    outputs = [(what, path) for what, path in outputs if path is not None]
    for index, (what, path) in enumerate(outputs):
        check_output(path, what)
        for other_what, other in [*inputs, *outputs[:index]]:
            if _same_file(path, other):
                raise OutputError(f"{what} {path} is the same file as {other_what} {other}; "
                                  f"write it to another file")


@contextlib.contextmanager
def _vcd(args):
    """The path the simulator writes the VCD to (a temporary file renamed to --vcd at the end), or None."""
    if not getattr(args, "vcd", None):
        yield None
        return
    from .outputs import atomic_output
    with atomic_output(args.vcd) as temp:
        yield temp


def _codebook_of(args):
    """The code book the quantize options ask for: ``--codebook FILE`` or the NF table of ``--bits``."""
    from .formats import InputError, load_codebook
    from .golden.codebook import Codebook

    if args.codebook is None:
        return Codebook.nf(args.bits or 4)
    book = load_codebook(args.codebook)
    if args.bits is not None and args.bits != book.bits:
        raise InputError(f"{args.codebook}: the table has {2 ** book.bits} levels ({book.bits} bits), "
                         f"but --bits is {args.bits}")
    return book


def _quantize(args):
    from .formats import InputError, load_weight, save_quantized
    from .golden import codebook, nf4_quant

    _check_outputs(args, [("OUT", args.output), ("--vcd", args.vcd)],
                   [("IN", args.input)] + ([("--codebook", args.codebook)] if args.codebook else []))
    book = _codebook_of(args)
    weight = load_weight(args.input)
    values = weight.detach().reshape(-1).float().numpy()
    try:
        nf4_quant.check_finite(values)
    except ValueError as error:
        raise InputError(f"{args.input}: {error}") from None
    start = time.perf_counter()
    if args.backend == "golden":
        quantized = codebook.quantize(weight, codebook=book, blocksize=args.blocksize,
                                      double_quant=args.double_quant)
        report = None
    else:
        from .sim.nf4_quant import quantize_rtl
        bar, update = _progress_bar(args, -(-weight.numel() // args.lanes), f"quantize ({args.backend})")
        with bar, _vcd(args) as vcd_path:
            table = {} if book.name == "nf4" else {"bits": book.bits, "codebook": book}
            quantized, report = quantize_rtl(weight, args.blocksize, args.double_quant, lanes=args.lanes,
                                             vcd_path=vcd_path, progress=update, backend=args.backend, **table)
    save_quantized(args.output, quantized)
    seconds = time.perf_counter() - start
    n = weight.numel()
    print(f"quantized {tuple(weight.shape)} {quantized.dtype} -> {book.quant_type.upper()}, blocksize "
          f"{args.blocksize}, double quant {'on' if args.double_quant else 'off'}, backend {args.backend}: "
          f"{args.output}")
    if report:
        for unit, cycles in report.items():
            print(f"  {unit}: {cycles} cycles")
        print(f"  {n / report['quantizer']:.2f} weights/cycle ({args.lanes} lanes), {seconds:.1f} s simulated")


def _dequant(args):
    from .formats import load_quantized, save_weight
    from .golden import nf4_dequant

    _check_outputs(args, [("OUT", args.output), ("--vcd", args.vcd)], [("IN", args.input)])
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
                                  double_quant=quantized.double_quant, bits=quantized.bits,
                                  table="nf" if quantized.codebook is None else "loaded")
        bar, update = _progress_bar(args, -(-n // args.lanes), f"dequant ({args.backend})")
        with bar, _vcd(args) as vcd_path:
            run = run_dequantizer(quantized, config, vcd_path=vcd_path, progress=update, backend=args.backend)
        weight = torch.from_numpy(run.values.view({"bf16": "int16", "fp16": "int16", "fp32": "int32"}[args.dtype]))
        weight = weight.view(nf4_dequant.DTYPES[args.dtype]).reshape(quantized.shape)
        cycles = run.cycles
    save_weight(args.output, weight.contiguous())
    seconds = time.perf_counter() - start
    kind = quantized.codebook.quant_type if quantized.codebook is not None else f"nf{quantized.bits}"
    print(f"dequantized {tuple(quantized.shape)} {kind.upper()} -> {args.dtype}, backend {args.backend}: "
          f"{args.output}")
    if cycles:
        print(f"  {cycles} cycles for {n} weights: {n / cycles:.2f} weights/cycle ({args.lanes} lanes), "
              f"{seconds:.1f} s simulated")


def _build_settings(args):
    """``(seed, lut_mapper, floorplan)``: the user's, or the board's defaults for the design.

    The GEMM engine on the ulx3s-85f gets what routed its 8x8 array at 107.71 MHz: classic ABC LUT mapping, seed 5
    and the PE multipliers pinned to the DSP floorplan (router1, nextpnr's default router).
    """
    from .boards.build import BuildError
    from .boards.floorplan import check_array

    engine_on_85f = args.board == "ulx3s-85f" and args.rows is not None and not args.lora
    seed = args.seed if args.seed is not None else 5 if engine_on_85f else 1
    lut_mapper = args.lut_mapper or ("abc" if engine_on_85f else "abc9")
    floorplan = args.floorplan
    if floorplan is None:
        try:
            check_array(args.rows, args.cols) if engine_on_85f else None
        except ValueError:
            engine_on_85f = False  # an array larger than the floorplan is placed by nextpnr alone
        floorplan = engine_on_85f
    elif floorplan:
        if args.board != "ulx3s-85f" or args.rows is None:
            raise BuildError("--floorplan places the GEMM engine's PE multipliers (--rows, --cols) on the "
                             "ulx3s-85f's DSP sites; it does not apply to this build")
        try:
            check_array(args.rows, args.cols)
        except ValueError as error:
            raise BuildError(f"--floorplan: {error}") from None
    return seed, lut_mapper, floorplan


def _check_build_folder(out):
    """Refuse, before elaborating anything, a build folder that cannot be created or written."""
    from .outputs import OutputError, check_output

    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out):
        check_output(os.path.join(out, "report.json"), "--out")
    else:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise OutputError(f"--out {out}: cannot create build folder: {parent} does not exist")
        check_output(os.path.join(parent, os.path.basename(os.path.abspath(out))), "--out")


def _build(args):
    from .boards.build import BuildError, build, format_report
    from .boards.fits import check_fit, default_lanes, fit_hint
    from .outputs import OutputError

    out = args.out or os.path.join("build", args.board)
    if (args.rows is None) != (args.cols is None):
        raise BuildError("--rows and --cols go together (they select the GEMM engine)")
    if args.lora and args.rows is None:
        raise BuildError("--lora needs --rows and --cols (the GEMM engine's array)")
    if args.memory and not args.lora:
        raise BuildError("--memory goes with --lora (it builds the step accelerator behind a memory port)")
    if args.out is None and not os.path.exists("build"):
        try:
            os.mkdir("build")  # the default folder's parent, in a fresh working folder
        except OSError as error:
            raise OutputError(f"cannot create folder build for the default --out ({error.strerror})") from None
    _check_build_folder(out)
    seed, lut_mapper, floorplan = _build_settings(args)
    kind = "lora" if args.lora else "gemm" if args.rows is not None else "dequantizer"
    if kind != "dequantizer" and (args.bits != 4 or args.table != "nf"):
        raise BuildError("--bits and --table configure the dequantizer and quantizer builds; the GEMM engine and "
                         "the step accelerator take NF4")
    if args.quantizer and kind != "dequantizer":
        raise BuildError("--quantizer builds the quantizer alone: not with --rows/--cols or --lora")
    lanes = args.lanes if args.lanes is not None else default_lanes(args.board)
    try:
        if not args.quantizer:  # the fit table has no quantizer builds: left to the tools
            check_fit(args.board, kind, lanes=lanes, rows=args.rows, cols=args.cols, dtype=args.dtype)
    except ValueError as error:
        raise BuildError(str(error)) from None
    if args.quantizer:
        from .rtl.nf4_quant import NF4QuantConfig, NF4Quantizer
        design = NF4Quantizer(NF4QuantConfig(lanes=lanes, blocksize=args.blocksize, in_dtype=args.dtype,
                                             bits=args.bits, table=args.table))
        what = (f"NF4Quantizer(lanes={lanes}, blocksize={args.blocksize}, in={args.dtype}, bits={args.bits}, "
                f"table={args.table})")
    elif args.lora:
        from .rtl.lora import LoraConfig, LoraStep
        try:
            config = LoraConfig(rows=args.rows, cols=args.cols, max_t=args.max_t, max_in=args.max_in,
                                max_out=args.max_out, max_rank=args.max_rank, optimizer=args.optimizer,
                                blocksize=args.blocksize, double_quant=args.double_quant)
        except ValueError as error:
            raise BuildError(f"--lora: {error}") from None
        what = (f"{args.rows}x{args.cols} array, T<={args.max_t}, in<={args.max_in}, out<={args.max_out}, "
                f"rank<={args.max_rank}, {args.optimizer}, NF4 blocksize {args.blocksize}")
        if args.memory:
            from .rtl.lora.memstep import MemStep, for_memory
            from .rtl.memport import port_for
            try:
                design = MemStep(for_memory(config, port_for(DRAM_PRESETS[args.memory])))
            except ValueError as error:
                raise BuildError(f"--memory: {error}") from None
            what = (f"MemStep({args.memory} port) around LoraStep({what}, optimizer one element per "
                    f"{design.config.step.optimizer_interval} cycles)")
        else:
            design = LoraStep(config)
            what = f"LoraStep({what})"
    elif args.rows is not None:
        from .rtl.gemm import GemmConfig, GemmEngine
        if not 16 <= args.max_k <= 1 << 16:
            raise BuildError(f"--max-k must be from 16 to 65536, not {args.max_k}")
        config = GemmConfig(rows=args.rows, cols=args.cols, max_k=args.max_k, max_n=args.max_k,
                            blocksize=args.blocksize, double_quant=args.double_quant)
        design = GemmEngine(config)
        what = (f"GemmEngine({args.rows}x{args.cols}, chunk {config.chunk_steps}, max K {args.max_k}, "
                f"NF4 weights, blocksize {args.blocksize})")
    else:
        from .rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer
        compact = args.board == "icebreaker" if args.compact is None else args.compact
        design = NF4Dequantizer(NF4DequantConfig(lanes=lanes, blocksize=args.blocksize, out_dtype=args.dtype,
                                                 double_quant=args.double_quant, compact=compact, bits=args.bits,
                                                 table=args.table))
        what = (f"NF4Dequantizer(lanes={lanes}, blocksize={args.blocksize}, out={args.dtype}, "
                f"double_quant={args.double_quant}, compact={compact}, bits={args.bits}, table={args.table})")
    settings = [f"seed {seed}", f"LUT mapper {lut_mapper}"]
    if floorplan:
        settings.append("PE multipliers on the DSP floorplan")
    print(f"building {what} for {args.board} in {out} ({', '.join(settings)})", flush=True)
    target_mhz = args.target_mhz
    if target_mhz is None and args.board == "icebreaker":
        target_mhz = 12.0  # the float datapaths close at 13-14 MHz on the UP5K: run from the oscillator, no PLL
    from tqdm import tqdm
    # the tool's phase and the time it has taken, on one line of stderr
    bar = tqdm(total=None, desc="elaborate", bar_format="{desc} [{elapsed}]", file=sys.stderr, leave=False,
               disable=not _show_progress(args))

    def step(line):
        tqdm.write(f"  {line}", file=sys.stdout)
        sys.stdout.flush()

    def status(text):
        bar.set_description_str(text, refresh=False)
        bar.refresh()

    try:
        with bar:
            report = build(design, args.board, out, target_mhz=target_mhz, seed=seed, router=args.router,
                           lut_mapper=lut_mapper, place_only=args.place_only, floorplan=floorplan,
                           progress=step, status=status)
    except BuildError as error:
        if str(error).startswith("design needs") and not args.quantizer:
            raise BuildError(f"{error}; {fit_hint(args.board, kind)}") from None
        raise
    print(format_report(report))


def _matmul(args):
    import torch
    from .formats import InputError, load_tensor, load_quantized_or_weight, save_tensors
    from .golden import gemm as golden

    _check_outputs(args, [("OUT", args.output), ("--vcd", args.vcd)], [("X", args.x), ("W", args.w)])
    x = load_tensor(args.x, "x")
    if x.dtype != torch.bfloat16:
        raise InputError(f"{args.x}: tensor 'x' has dtype {str(x.dtype)[6:]}; expected bfloat16")
    if x.dim() != 2:
        raise InputError(f"{args.x}: tensor 'x' has shape {tuple(x.shape)}; expected 2 dimensions [M, K]")
    if not torch.isfinite(x).all():
        raise InputError(f"{args.x}: tensor 'x' holds NaN/Inf")
    weight, quantized = load_quantized_or_weight(args.w)
    if quantized is not None and not quantized.is_nf4:
        raise InputError(f"{args.w}: the weight is {quantized.bits}-bit; the GEMM engine's dequantizer takes NF4 "
                         "(dequantize it with 'dequant' and pass the bf16 weight)")
    if weight.dim() != 2:
        raise InputError(f"{args.w}: weight has shape {tuple(weight.shape)}; expected 2 dimensions [N, K]")
    n, k = weight.shape
    inner = n if args.transpose_w else k
    if x.shape[1] != inner:
        raise InputError(f"inner dimensions differ: x is {tuple(x.shape)} and W is {(n, k)}; "
                         f"{'x @ W needs x[:, N]' if args.transpose_w else 'x @ W.T needs x[:, K]'}"
                         f" = {inner}")
    m = x.shape[0]
    b = weight if args.transpose_w else weight.T
    start = time.perf_counter()
    from .rtl.gemm import GemmConfig
    config = GemmConfig(rows=args.rows, cols=args.cols, max_k=max(k, 16), max_n=max(n, 16),
                        out_dtype=args.out_dtype, weights="nf4" if quantized is not None else "bf16",
                        blocksize=quantized.blocksize if quantized is not None else 64,
                        double_quant=quantized.double_quant if quantized is not None else True)
    model = golden.gemm_cycles(m, n, k, args.rows, args.cols, config.chunk_steps, args.transpose_w,
                               config.weights, args.out_dtype, config.blocksize)
    if args.backend == "golden":
        y = golden.gemm(x, b, config.numerics, args.transpose_w)
        cycles = None
    else:
        from .sim.gemm import run_gemm
        out_cols = k if args.transpose_w else n
        total = -(-m // args.rows) * -(-out_cols // args.cols) * args.rows
        bar, update = _progress_bar(args, total, f"matmul ({args.backend})", unit="row")
        with bar, _vcd(args) as vcd_path:
            run = run_gemm(x, quantized if quantized is not None else weight, config,
                           transposed=args.transpose_w, vcd_path=vcd_path, progress=update, backend=args.backend)
        y, cycles = run.out, run.cycles
    save_tensors(args.output, {"y": y.contiguous()})
    seconds = time.perf_counter() - start
    kind = "x @ W" if args.transpose_w else "x @ W.T"
    print(f"{kind}: x {tuple(x.shape)}, W {(n, k)} {config.weights}, y {tuple(y.shape)} {args.out_dtype}, "
          f"{args.rows}x{args.cols} array, backend {args.backend}: {args.output}")
    if cycles is not None:
        util = m * n * k / (args.rows * args.cols * cycles)
        print(f"  {cycles} cycles, PE utilization {100 * util:.1f}% (cycle model: {model.cycles} cycles, "
              f"{100 * model.utilization:.1f}%), {seconds:.1f} s simulated")
    else:
        print(f"  cycle model: {model.cycles} cycles, PE utilization {100 * model.utilization:.1f}%")


def _run_step(args, case, config):
    """The RTL step with a progress bar: simulated cycles (pysim) or output beats (Verilator). With --memory the
    memory-fed step (``config`` a ``MemStepConfig``) against the DRAM model; a shape it does not take ends in one
    line (InputError)."""
    from .formats import InputError
    from .sim.lora import run_step

    memory = getattr(args, "memory", None)
    unit = "cycle" if args.backend == "pysim" else "beat"
    where = f", {memory}" if memory else ""
    bar, update = _progress_bar(args, None, f"step ({args.backend}, {args.rows}x{args.cols}{where})", unit=unit)

    def progress(done, total):
        bar.total = total
        update(done)

    def status(text):
        bar.set_description_str(f"step ({args.backend}): {text}")

    with bar, _vcd(args) as vcd_path:
        if not memory:
            return run_step(case, config, vcd_path=vcd_path, progress=progress, status=status, backend=args.backend)
        from .sim.memstep import run_mem_step
        try:
            return run_mem_step(case, config, memory=memory, vcd_path=vcd_path, progress=progress, status=status,
                                backend=args.backend)
        except ValueError as error:
            raise InputError(f"{args.case} on the {args.rows}x{args.cols} array with --memory {memory}: "
                             f"{error}") from None


def _memory_step_config(args, case, rows, cols, memory):
    """The memory-fed step's ``MemStepConfig`` for ``case`` with ``memory``'s port; one line for a port or array it
    cannot have (shared with ``tinyllama --memory``, where ``case`` is None: only the port's needs)."""
    from .formats import InputError
    from .rtl.memport import port_for

    port = port_for(DRAM_PRESETS[memory])
    need = port.data_width // 16        # the engine's bf16 output row holds at least one port word
    if cols < need:
        kind = "DDR3" if "ddr3" in memory else "SDRAM"
        raise InputError(f"--memory {memory}: the {kind} port needs --cols >= {need} (its {port.data_width}-bit "
                         f"words take {need} bf16 outputs of an array row), not --cols {cols}")
    try:
        if case is None:
            from .tinyllama import memory_config
            return memory_config(memory, rows, cols, max(128, *args.tokens), args.rank)
        from .sim.memstep import mem_step_config
        return mem_step_config(case, memory, rows, cols)
    except ValueError as error:
        raise InputError(f"--memory {memory} on the {rows}x{cols} array: {error}") from None


def _step(args):
    import json
    from .boards.build import BuildError
    from .formats import load_case, next_case, save_case
    from .golden import lora

    if args.memory and args.backend == "golden":
        raise BuildError("--memory runs the memory-fed step's RTL against the DRAM model: it needs --backend pysim "
                         "or verilator, not golden")
    if args.blocked and not args.memory:
        raise BuildError("--blocked runs the blocked step top against a DRAM model: it needs --memory")
    _check_outputs(args, [("OUT", args.output), ("--vcd", args.vcd)], [("CASE", args.case)])
    case = load_case(args.case)
    if args.blocked:
        return _blocked_step(args, case)
    tokens, in_features = case.x.shape
    out_features, rank = case.lora_B.shape
    from .rtl.lora import LoraConfig
    if args.memory:
        config = _memory_step_config(args, case, args.rows, args.cols, args.memory)
    else:
        config = LoraConfig(rows=args.rows, cols=args.cols, max_t=tokens, max_in=in_features, max_out=out_features,
                            max_rank=rank, optimizer=case.optimizer, blocksize=case.weight.blocksize,
                            double_quant=case.weight.double_quant)
    start = time.perf_counter()
    if args.backend == "golden":
        outputs, run = lora.step_model(case, config.chunk), None
    else:
        run = _run_step(args, case, config)
        outputs = run.outputs
    names = ("y", "dx") if args.memory else ("y", "dx", "grad_A", "grad_B")
    results = {name: outputs[name].contiguous() for name in names}
    save_case(args.output, next_case(case, outputs), extra=results)
    seconds = time.perf_counter() - start
    written = "results y and dx, no gradients," if args.memory else "results"
    memory = f", memory {args.memory}" if args.memory else ""
    header = (f"step {case.step} ({case.optimizer}), x {tuple(case.x.shape)}, W {case.weight.shape} NF4, rank {rank}, "
              f"scaling {case.scaling}, backend {args.backend}{memory}: {args.output} ({written} and the case of "
              f"step {case.step + 1})")
    report = _step_report(args, case, config, run, seconds) if args.json or args.memory else None
    if args.json:
        print(header, file=sys.stderr)
        print(json.dumps(report))
        return
    print(header)
    if run is not None:
        macs = tokens * in_features * out_features
        print(f"  {'phase':8} {'cycles':>9}")
        for name, cycles in run.phase_cycles.items():
            print(f"  {name:8} {cycles:9d}")
        print(f"  {'total':8} {run.cycles:9d}   ({seconds:.1f} s simulated; base products {2 * macs} MACs)")
    if args.memory:
        _print_memory_report(args, report)


def _blocked_step(args, case):
    """``step --memory M --blocked``: the step on the blocked step top, its report."""
    import json
    from .formats import InputError, next_case, save_case
    from .sim.blocked_step import PARTS, check_step_in, model_cycles, run_blocked_step, step_blocks, step_config

    t, d_in = case.x.shape
    d_out, r = case.lora_B.shape
    if args.max_features < 64:
        raise InputError(f"--max-features must be at least 64, not {args.max_features}")
    forward, backward = step_blocks(t, d_in, d_out, args.cols, args.max_features)
    where = f"{args.case} on the blocked step top ({args.rows}x{args.cols}, --memory {args.memory})"
    try:
        check_step_in(d_in)
        config = step_config(case, forward, backward, args.memory, args.rows, args.cols)
        model = model_cycles(case, forward, backward, config, args.memory)
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None
    unit = "cycle" if args.backend == "pysim" else "beat"
    bar, update = _progress_bar(args, None, f"blocked step ({args.backend}, {args.memory})", unit=unit)

    def progress(done, total):
        bar.total = total
        update(done)

    start = time.perf_counter()
    with bar, _vcd(args) as vcd_path:
        try:
            run = run_blocked_step(case, forward, backward, config, memory=args.memory, backend=args.backend,
                                   vcd_path=vcd_path, progress=progress)
        except ValueError as error:
            raise InputError(f"{where}: {error}") from None
    results = {name: run.outputs[name].contiguous() for name in ("y", "dx", "grad_A", "grad_B")}
    save_case(args.output, next_case(case, run.outputs), extra=results)
    seconds = time.perf_counter() - start
    cycles = sum(run.cycles.values())
    macs = 2 * t * d_in * d_out
    timing = DRAM_PRESETS[args.memory]
    read, written = sum(run.read_bytes.values()), sum(run.written_bytes.values())
    stalls = {cause: sum(part[cause] for part in run.stall_cycles.values()) for cause in ("memory", "compute")}
    report = {"step": case.step, "optimizer": case.optimizer, "t": t, "d_in": d_in, "d_out": d_out, "r": r,
              "rows": args.rows, "cols": args.cols, "backend": args.backend, "memory": args.memory, "top": "blocked",
              "blocks": {"forward": list(forward), "backward": list(backward)}, "output": args.output,
              "seconds": seconds, "cycles": cycles, "phase_cycles": dict(run.cycles), "stall_cycles": stalls,
              "phase_stall_cycles": run.stall_cycles, "bytes_read": read, "bytes_written": written,
              "read_bytes": run.read_bytes, "written_bytes": run.written_bytes, "macs": macs,
              "utilization": macs / (args.rows * args.cols * cycles), "clock_mhz": timing.clock_mhz,
              "bandwidth_gbps": (read + written) / cycles * timing.clock_mhz / 1e3, "peak_gbps": timing.peak_gbps,
              "model_cycles": sum(model.values()), "model_error": sum(model.values()) / cycles - 1}
    header = (f"step {case.step} ({case.optimizer}), x {tuple(case.x.shape)}, W {case.weight.shape} NF4, rank {r}, "
              f"scaling {case.scaling}, backend {args.backend}, blocked step top, memory {args.memory}: "
              f"{args.output} (results y, dx, grad_A, grad_B and the case of step {case.step + 1})")
    if args.json:
        print(header, file=sys.stderr)
        print(json.dumps(report))
        return
    print(header)
    print(f"  blocks: forward {forward[0]} x {forward[1]}, backward {backward[0]} x {backward[1]}")
    print(f"  {'part':8} {'cycles':>11} {'model':>11} {'memory stalls':>14} {'bytes read':>12} {'written':>10}")
    for part in PARTS:
        print(f"  {part:8} {run.cycles[part]:11,} {model[part]:11,} {run.stall_cycles[part]['memory']:14,} "
              f"{run.read_bytes[part]:12,} {run.written_bytes[part]:10,}")
    print(f"  {'total':8} {cycles:11,} {report['model_cycles']:11,}   ({seconds:.1f} s simulated)")
    print("  stall cycles: " + ", ".join(f"{name} {stalls[name]:,} ({100 * stalls[name] / cycles:.1f}%)"
                                         for name in ("memory", "compute")))
    print(f"  bandwidth: {report['bandwidth_gbps']:.3f} GB/s ({read + written:,} bytes in {cycles:,} cycles at "
          f"{timing.clock_mhz:g} MHz), {100 * report['bandwidth_gbps'] / timing.peak_gbps:.1f}% of "
          f"{args.memory}'s {timing.peak_gbps:.3f} GB/s peak")
    print(f"  cycle model with memory: {report['model_cycles']:,} cycles, {100 * report['model_error']:+.2f}% "
          f"against the measured; PE utilization {100 * report['utilization']:.1f}% ({macs:,} MACs of the base "
          f"products on {args.rows}x{args.cols})")


def _step_report(args, case, config, run, seconds):
    """The step's figures as one JSON-ready dict (``--json``; the --memory lines print from it too)."""
    from .sim.lora import step_cycles

    t, d_in = case.x.shape
    d_out, r = case.lora_B.shape
    macs = 2 * t * d_in * d_out + 3 * t * r * (d_in + d_out)
    cycles = run.cycles if run is not None else None
    report = {"step": case.step, "optimizer": case.optimizer, "t": t, "d_in": d_in, "d_out": d_out, "r": r,
              "rows": args.rows, "cols": args.cols, "backend": args.backend, "memory": args.memory,
              "output": args.output, "seconds": seconds, "cycles": cycles,
              "phase_cycles": dict(run.phase_cycles) if run is not None else {}, "macs": macs,
              "utilization": macs / (args.rows * args.cols * cycles) if cycles else None}
    if args.memory:
        from .sim.memstep import model_cycles
        timing = DRAM_PRESETS[args.memory]
        model = model_cycles(config, args.memory, t, d_in, d_out, r, double_quant=case.weight.double_quant)["cycles"]
        moved = run.bytes_read + run.bytes_written
        report.update({
            "stall_cycles": dict(run.stall_cycles), "bytes_read": run.bytes_read, "bytes_written": run.bytes_written,
            "read_bytes": dict(run.read_bytes), "written_bytes": dict(run.written_bytes),
            "clock_mhz": timing.clock_mhz, "bandwidth_gbps": moved / run.cycles * timing.clock_mhz / 1e3,
            "peak_gbps": timing.peak_gbps})
    else:
        model = sum(step_cycles(t, d_in, d_out, r, args.rows, args.cols, case.optimizer).values())
    report["model_cycles"] = model
    report["model_error"] = model / cycles - 1 if cycles and model else None    # < 0: the model is short
    return report


def _print_memory_report(args, report):
    cycles, stalls = report["cycles"], report["stall_cycles"]
    print("  stall cycles: " + ", ".join(f"{name} {stalls[name]:,} ({100 * stalls[name] / cycles:.1f}%)"
                                         for name in ("memory", "compute")))
    for what, total, tensors in (("read", report["bytes_read"], report["read_bytes"]),
                                 ("written", report["bytes_written"], report["written_bytes"])):
        print(f"  bytes {what}: {total:,} (" + ", ".join(f"{name} {n:,}" for name, n in tensors.items()) + ")")
    moved = report["bytes_read"] + report["bytes_written"]
    print(f"  bandwidth: {report['bandwidth_gbps']:.3f} GB/s ({moved:,} bytes in {cycles:,} cycles at "
          f"{report['clock_mhz']:g} MHz), {100 * report['bandwidth_gbps'] / report['peak_gbps']:.1f}% of "
          f"{args.memory}'s {report['peak_gbps']:.3f} GB/s peak")
    print(f"  cycle model with memory: {report['model_cycles']:,} cycles, "
          f"{100 * report['model_error']:+.2f}% against the measured; "
          f"PE utilization {100 * report['utilization']:.1f}% ({report['macs']:,} MACs on {args.rows}x{args.cols})")


def _make_case(args):
    from .formats import InputError, save_case
    from .golden import lora

    _check_outputs(args, [("OUT", args.output)])
    dims = {"--tokens": args.tokens, "--in-features": args.in_features, "--out-features": args.out_features,
            "--rank": args.rank}
    for name, value in dims.items():
        if not 1 <= value <= 1 << 15:
            raise InputError(f"{name} must be from 1 to 32768, not {value}")
    t, d_in, d_out, r = args.tokens, args.in_features, args.out_features, args.rank
    case = lora.random_case(t, d_in, d_out, r, args.optimizer, seed=args.seed, weight_decay=args.weight_decay,
                            lr=args.lr, scaling=args.scaling)
    save_case(args.output, case)
    print(f"step case: x [{t}, {d_in}], dy [{t}, {d_out}], W [{d_out}, {d_in}] NF4, rank {r}, {args.optimizer}: "
          f"{args.output}")


def _demo(args):
    import logging

    import numpy as np
    import torch
    from .boards.build import BuildError
    from .golden import nf4_dequant
    from .rtl.nf4_dequant import NF4DequantConfig
    from .sim.nf4 import run_dequantizer
    from .sim.nf4_quant import quantize_rtl

    if not (1 <= args.rows <= 4096 and 1 <= args.cols <= 65536):
        raise BuildError(f"--rows and --cols must be 1..4096 and 1..65536, not {args.rows} and {args.cols}")
    _check_outputs(args, [])     # --backend verilator: the tool and a C++ compiler
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(args.seed)
    weight = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(torch.bfloat16)
    n = weight.numel()
    print(f"weight [{args.rows}, {args.cols}] bf16, NF4 blocksize 64, double quantization, {args.lanes} lanes")
    bar, update = _progress_bar(args, -(-n // args.lanes), f"quantize ({args.backend})")
    with bar:
        quantized, cycles = quantize_rtl(weight, 64, True, lanes=args.lanes, progress=update, backend=args.backend)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")

    def differ(a, b):
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        return int((a.view(np.uint8) != b.view(np.uint8)).sum()) if a.nbytes == b.nbytes else max(a.size, b.size)

    quant_mismatch = (differ(packed.reshape(-1).numpy(), quantized.packed)
                      + differ(state.absmax.numpy(), quantized.absmax)
                      + differ(state.state2.absmax.numpy(), quantized.absmax2)
                      + differ(np.float32(state.offset.item()), np.float32(quantized.offset)))
    config = NF4DequantConfig(lanes=args.lanes, blocksize=64, out_dtype="bf16", double_quant=True)
    bar, update = _progress_bar(args, -(-n // args.lanes), f"dequant ({args.backend})")
    with bar:
        run = run_dequantizer(quantized, config, progress=update, backend=args.backend)
    state.dtype = torch.bfloat16
    reference = bnbf.dequantize_4bit(packed, state).reshape(-1).view(torch.int16).numpy().view(np.uint16)
    dequant_mismatch = int((reference != run.values).sum())
    golden = nf4_dequant.dequantize(quantized, "bf16").reshape(-1).view(torch.int16).numpy().view(np.uint16)
    rows = [("quantize (RTL)", cycles["quantizer"] + cycles.get("absmax_quantizer", 0), quant_mismatch,
             f"{cycles['quantizer']} + {cycles.get('absmax_quantizer', 0)} (absmax pass)"),
            ("dequantize (RTL)", run.cycles, dequant_mismatch, f"{n / run.cycles:.2f} weights/cycle")]
    print(f"{'step':18} {'cycles':>9}  {'mismatches vs bitsandbytes':>27}  note")
    for name, total, mismatch, note in rows:
        print(f"{name:18} {total:9d}  {mismatch:27d}  {note}")
    print(f"dequantized weights equal to the golden model: {int((golden == run.values).sum())} of {n}")
    if quant_mismatch or dequant_mismatch:
        return 1


def _unit(args):
    """``(component, title)`` of ``edge-qlora verilog``'s UNIT with its options."""
    from .boards.build import BuildError
    try:
        if args.unit == "dequantizer":
            from .rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer
            config = NF4DequantConfig(lanes=args.lanes, blocksize=args.blocksize, out_dtype=args.dtype,
                                      double_quant=args.double_quant, compact=args.compact, bits=args.bits,
                                      table=args.table)
            return NF4Dequantizer(config), f"NF4Dequantizer {config!r}"
        if args.unit == "quantizer":
            from .rtl.nf4_quant import NF4QuantConfig, NF4Quantizer
            config = NF4QuantConfig(lanes=args.lanes, blocksize=args.blocksize, in_dtype=args.dtype, bits=args.bits,
                                    table=args.table)
            return NF4Quantizer(config), f"NF4Quantizer {config!r}"
        if args.unit == "absmax-quantizer":
            from .rtl.absmax_quant import AbsmaxQuantizer
            return AbsmaxQuantizer(), "AbsmaxQuantizer (second quantization of the absmax values)"
        if args.unit == "gemm":
            from .rtl.gemm import GemmConfig, GemmEngine
            config = GemmConfig(rows=args.rows, cols=args.cols, max_k=args.max_k, max_n=args.max_n,
                                out_dtype=args.out_dtype, weights=args.weights, blocksize=args.blocksize,
                                double_quant=args.double_quant)
            return GemmEngine(config), f"GemmEngine {config!r}"
        from .rtl.lora import LoraConfig, LoraStep
        config = LoraConfig(rows=args.rows, cols=args.cols, max_t=args.max_t, max_in=args.max_in,
                            max_out=args.max_out, max_rank=args.max_rank, optimizer=args.optimizer,
                            blocksize=args.blocksize, double_quant=args.double_quant)
        return LoraStep(config), f"LoraStep {config!r}"
    except (ValueError, TypeError) as error:
        raise BuildError(f"{args.unit}: {error}") from None


def _verilog(args):
    from .outputs import atomic_output
    from .rtl.export import verilog

    _check_outputs(args, [("-o", args.output)])
    dut, title = _unit(args)
    text = verilog(dut, title)
    with atomic_output(args.output, "w") as f:
        f.write(text)
    print(f"{title}: {args.output} ({len(text.splitlines()):,} lines)")


def _cache(args):
    import shutil
    from collections import Counter
    from .sim.verilator import cache_dir

    folder = cache_dir()
    models = sorted(folder.glob("*/key.txt")) if folder.exists() else []
    # the design key of every binary: in binaries/ beside it; for one compiled before binaries/ existed (it stays
    # in its design's folder until first used), in that folder
    keys = list(folder.glob("binaries/*/key.txt")) + [
        path.parents[1] / "key.txt" for path in folder.glob("*/*/vsim") if path.parents[1].name != "binaries"]
    binaries = [key.read_text().strip() for key in keys if key.exists()]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
    if args.clear:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"cleared {folder}: {len(models)} models, {len(binaries)} compiled, {size / 1e6:.1f} MB")
        return
    print(f"{folder}: {len(models)} models, {len(binaries)} compiled, {size / 1e6:.1f} MB "
          "(clear with: edge-qlora cache --clear)")
    compiled = Counter(binaries)
    for key in models:
        title = key.read_text().strip()
        print(f"  {key.parent.name}  {title}  ({compiled[title]} binaries)")


def _tinyllama(args):
    import json
    from .outputs import atomic_output
    from .tinyllama import format_table, model_config, run_projection

    args.backend = "verilator"      # _check_outputs also checks that Verilator can run here
    _check_outputs(args, [("--json", args.json)])
    config = model_config(args.rows, args.cols, max(128, *args.tokens), args.rank)
    shapes = {name: (d_in, d_out) for name, d_in, d_out in TINYLLAMA_PROJECTIONS}
    if args.memory:
        from .formats import InputError
        from .tinyllama import check_memory_shape
        config = _memory_step_config(args, None, args.rows, args.cols, args.memory)
        for t in args.tokens:       # every shape checked before the first (long) run
            for name in args.projections:
                try:
                    check_memory_shape(config, t, *shapes[name], args.rank)
                except ValueError as error:
                    raise InputError(f"--memory {args.memory}: {name} at T={t} on the {args.rows}x{args.cols} "
                                     f"array: {error}") from None
    runs = []
    for t in args.tokens:
        for name in args.projections:
            d_in, d_out = shapes[name]
            bar, update = _progress_bar(args, None, f"{name} T={t}")

            def progress(done, total):
                bar.total = total
                update(done)

            with bar:
                run = run_projection(name, d_in, d_out, t, args.rank, args.rows, args.cols, config=config,
                                     progress=progress, status=lambda text: bar.set_description_str(text),
                                     memory=args.memory)
            runs.append(run)
            through = (f", {args.memory}: memory stalls {run.stall_cycles['memory']:,} cycles, "
                       f"{run.bytes_read + run.bytes_written:,} bytes moved at {run.bandwidth_gbps:.3f} GB/s"
                       if args.memory else "")
            print(f"{name} T={t}: {run.cycles:,} cycles (model {run.model_cycles:,}, "
                  f"{100 * run.model_error:+.2f}%), utilization {100 * run.utilization:.1f}%, accuracy "
                  f"{'passed' if run.contract_passed else 'FAILED'}{through}", flush=True)
    print()
    print(format_table(runs))
    if args.json:
        with atomic_output(args.json, "w") as f:
            json.dump([run.to_dict() for run in runs], f, indent=1)
    return 0 if all(run.contract_passed for run in runs) else 1


def _footprint(args):
    import json
    from .footprint import footprint, format_table
    from .plan import footprint_plan

    plan = footprint_plan(args)
    bar, update = _progress_bar(args, None, "measuring NF4 shapes (bitsandbytes)", unit="shape")

    def progress(done, total):
        bar.total = total
        update(done)

    with bar:
        result = footprint(args.model, args.lora_r, args.seq_len, args.embeddings, progress=progress, plan=plan)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_table(result))


def _bench(args):
    import json
    from .bench import markdown, options, prepare_out, run, write

    opts = options(args.small, rows=args.rows, cols=args.cols, rank=args.rank, threads=args.threads,
                   lanes=args.lanes, warmup=args.warmup, repeats=args.repeats, backend=args.backend,
                   verilator_max_cycles=args.verilator_max_cycles, fmax_mhz=args.fmax, measured=args.measured,
                   memory=args.memory, top=args.top)
    prepare_out(args.out)
    report = run(opts, progress=_show_progress(args))
    text = markdown(report)
    paths = write(report, text, args.out)
    print(json.dumps(report, indent=2) if args.json else text, end="\n" if args.json else "")
    print(f"written: {', '.join(paths)}", file=sys.stderr if args.json else sys.stdout)


def _sweep(args):
    import json
    from tqdm import tqdm
    from .outputs import OutputError
    from .sweep import label, load_spec, run_sweep

    spec = load_spec(args.spec, _parser())
    out = args.out or os.path.join("build", "sweep-" + os.path.splitext(os.path.basename(args.spec))[0])
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} exists and is not a folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise OutputError(f"--out {out}: cannot create folder: {os.path.dirname(os.path.abspath(out))} "
                          f"does not exist")
    bar = tqdm(total=None, desc="sweep", unit="point", file=sys.stderr, disable=not _show_progress(args),
               bar_format="{desc}: {n}/{total} points [{elapsed}] {postfix}")

    def progress(done, total, running, failed, best):
        bar.total = total
        bar.n = done
        shown = ""
        if best is not None:
            shown = (f"{best['fmax_mhz']:.2f} MHz" if spec.command == "build"
                     else f"{100 * best['utilization']:.1f}% utilization")
            shown = f", best {shown} ({label(best, spec)})"
        bar.set_postfix_str(f"running {running}, failed {failed}{shown}", refresh=False)
        bar.refresh()

    with bar:
        rows = run_sweep(spec, out, jobs=args.jobs, address=args.address, resume=args.resume, progress=progress)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        with open(os.path.join(out, "sweep.md")) as f:
            print(f.read(), end="")
    written = ["sweep.json", "sweep.md"] + (["pareto.png"] if os.path.exists(os.path.join(out, "pareto.png"))
                                            else [])
    print(f"written to {out}: {', '.join(written)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _run(args):
    from .boards.build import BuildError
    from .formats import InputError
    from .outputs import OutputError
    from .sweep import SpecError
    from .plan import run_plan

    commands = {"quantize": _quantize, "dequant": _dequant, "build": _build, "matmul": _matmul, "step": _step,
                "demo": _demo, "make-case": _make_case, "footprint": _footprint,
                "bench": _bench, "tinyllama": _tinyllama,
                "verilog": _verilog, "cache": _cache, "sweep": _sweep,
                "plan": run_plan}
    try:
        return commands[args.command](args) or 0
    except (InputError, BuildError, OutputError, SpecError) as error:
        print(f"edge-qlora: error: {error}", file=sys.stderr)
        return 2


def main(argv=None):
    try:
        return _run(_parser().parse_args(argv))
    except KeyboardInterrupt:
        # outputs are renamed into place only when complete: an interrupted run leaves none half-written
        print("edge-qlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
