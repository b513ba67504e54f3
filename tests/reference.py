"""bitsandbytes itself, as the reference every NF4 test compares against, plus the comparison helpers."""

import logging

import numpy as np
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns about an optional package

import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

__all__ = ["bnb_quantize", "bnb_dequantize", "bits", "mismatches", "AVX512"]

AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def bnb_quantize(weight, blocksize, double_quant):
    return bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _avx512_kernel_is_wrong(shape, blocksize):
    # bitsandbytes 0.50's AVX-512 dequantize_4bit kernel indexes absmax per row as row * (cols // blocksize), which is
    # wrong when a row is not a whole number of blocks; it takes that path when cols % 16 == 0. On such shapes the
    # reference is bitsandbytes' own portable kernel (see README, "Known bitsandbytes issues").
    cols = shape[-1] if len(shape) > 1 else shape[0]
    return AVX512 and len(shape) > 1 and cols % 16 == 0 and cols % blocksize != 0


def bnb_dequantize(packed, state, dtype):
    """``dequantize_4bit`` as bitsandbytes computes it, flattened (its CPU kernel returns 1-D weights as [1, n])."""
    state.dtype = dtype
    shape = tuple(state.shape)
    if not _avx512_kernel_is_wrong(shape, state.blocksize):
        return bnbf.dequantize_4bit(packed, state).reshape(-1)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnbf.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, shape, dtype).reshape(-1)


def bits(values):
    """Bit patterns of a float tensor or array (uint16 for 16-bit formats, uint32 for float32)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().contiguous()
        width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[values.dtype]
        return values.view(width).numpy().view(np.uint32 if width == torch.int32 else np.uint16).reshape(-1)
    values = np.ascontiguousarray(values)
    return values.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[values.dtype.itemsize]).reshape(-1)


def mismatches(reference, result):
    """Number of positions whose bits differ; two NaNs count as equal (payloads differ between bitsandbytes'
    own CPU kernels), a NaN against a number does not."""
    ref_bits, got_bits = bits(reference), bits(result)
    if ref_bits.shape != got_bits.shape:
        return max(ref_bits.size, got_bits.size)
    if isinstance(reference, torch.Tensor) and reference.is_floating_point():
        both_nan = (torch.isnan(reference.reshape(-1).float()) & torch.isnan(result.reshape(-1).float())).numpy()
        return int(((ref_bits != got_bits) & ~both_nan).sum())
    return int((ref_bits != got_bits).sum())


def run_cli(*argv):
    """Run ``edge-qlora`` in-process with ``argv`` (anything ``str`` takes); its exit status (argparse's too)."""
    from edge_qlora.cli import main
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def fields(value, *widths):
    """Split the raw bits of a payload into fields of ``widths`` bits, the lowest first."""
    out = []
    for width in widths:
        out.append(value & ((1 << width) - 1))
        value >>= width
    return out


def long_run_backend():
    """For the longest cycle checks: Verilator where it is installed (it gives pysim's outputs and cycles,
    tests/test_verilator.py), else the default simulator."""
    from edge_qlora.sim import verilator
    return "verilator" if verilator.available() else None
