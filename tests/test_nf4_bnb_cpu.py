# amaranth: UnusedElaboratable=no
"""Which bitsandbytes the NF4 golden model follows, on every CPU.

bitsandbytes 0.50 has two CPU ``dequantize_4bit`` kernels: a native one (C++, AVX-512 where the CPU has it), taken
when the last dimension is even (and, on AVX-512 CPUs, the blocksize below 2048), and a portable one in torch
(``bitsandbytes.backends.default.ops._dequantize_4bit_compute``), taken otherwise and the same on every CPU. The
golden model and the RTL follow the portable kernel: float32 products, each rounded once to the output dtype, to
nearest even, subnormals included.

The tensors here are whole blocks (no partial final block), so on an AVX-512 CPU the native kernel takes its vector
path, and their dequantized values are subnormal in the output dtype. On a CPU with AVX512-BF16 that path converts
float32 to bf16 with an instruction that flushes subnormals to zero; the native comparison reports that as an
expected failure naming the CPU and the count, and fails only on a difference of any other kind.
"""

import numpy as np
import pytest
import torch

from edge_qlora.constants import NF4_CODE
from edge_qlora.golden import nf4_dequant, nf4_quant
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig
from edge_qlora.sim.nf4 import run_dequantizer
from edge_qlora.sim.streams import Stalls

from cases import DTYPES
from reference import bnb_quantize, bits, mismatches

# after reference, which quiets bitsandbytes' logger
import bitsandbytes.functional as bnbf
from bitsandbytes.backends.default import ops as bnb_default


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


AVX512_BF16 = "avx512_bf16" in cpu_flags()
CPU = f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, avx512_bf16 {'yes' if AVX512_BF16 else 'no'}"

# blocksize -> a whole-block shape whose rows are whole blocks too (so the native kernel's row indexing is right)
SHAPES = {32: (8, 64), 64: (16, 64), 128: (4, 256), 256: (2, 512), 1024: (2, 1024)}


def subnormal_weights(shape, dtype, seed, scales):
    """Mixed-sign weights whose blocks have magnitudes drawn from ``scales``, one per block of 64."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).reshape(-1, 64)
    pick = torch.randint(len(scales), (w.shape[0], 1), generator=gen)
    return (w * torch.tensor(scales, dtype=torch.float32)[pick]).reshape(shape).to(dtype)


def round_up_pairs():
    """(NF4 code, bf16 absmax) pairs whose float32 product is subnormal but rounds to bf16's smallest normal."""
    tiny = np.float32(torch.finfo(torch.float32).smallest_normal)
    absmax = torch.arange(0x0080, 0x0200, dtype=torch.int16).view(torch.bfloat16).float().numpy()  # 1 to 4 x tiny
    pairs = []
    for code, level in enumerate(NF4_CODE):
        products = np.abs((level * absmax).astype(np.float32))
        pairs += [(code, a) for a in absmax[(products < tiny) & (products >= tiny * np.float32(1 - 2.0 ** -9))]]
    return pairs


def bf16_case(shape, in_dtype, blocksize, seed=0):
    # 1e-39 and 3e-39: absmax below the 1e-38 floor, outputs are float32 and bf16 subnormals; 1e-38 and 2e-38: a
    # normal absmax with subnormal products. In a quarter of the blocks, a quarter of the weights are one NF4 level
    # times the block's absmax, a product that rounds up to bf16's smallest normal number.
    weight = subnormal_weights(shape, torch.float32, seed, [1e-39, 3e-39, 1e-38, 2e-38]).reshape(-1, blocksize)
    pairs = round_up_pairs()
    for i, block in enumerate(weight[::4]):
        code, absmax = pairs[i % len(pairs)]
        block[: blocksize // 4] = float(np.float32(NF4_CODE[code] * absmax))
        block[blocksize // 4] = float(absmax)
        block[blocksize // 4 + 1:] *= float(absmax) / float(block[blocksize // 4 + 1:].abs().max())
    return weight.reshape(shape).to(in_dtype)


def fp16_case(shape, seed=0):
    # fp16 subnormals are below 6.1e-5; 3e-8 is near the smallest (6e-8), where most products round to 0 or 1 ulp
    return subnormal_weights(shape, torch.float16, seed, [1e-6, 1e-5, 3e-8])


def portable(packed, state, dtype, eager=False):
    """bitsandbytes' portable ``dequantize_4bit`` (the torch kernel of ``backends/default/ops.py``), flattened.

    bitsandbytes wraps ``_dequantize_4bit_compute`` in ``torch.compile``; ``eager=True`` runs the plain function."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnbf.get_4bit_type("nf4", device="cpu")
    kernel = bnb_default._dequantize_4bit_compute
    if eager:
        kernel = getattr(kernel, "__wrapped__", kernel)
    return kernel(packed.reshape(-1), absmax, code, state.blocksize, tuple(state.shape), dtype).reshape(-1)


def native(packed, state, dtype):
    """``bitsandbytes.functional.dequantize_4bit`` as a user calls it (the native kernel for these shapes)."""
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state).reshape(-1)


def subnormal_count(values):
    info = torch.finfo(values.dtype)
    v = values.float().abs()
    return int(((v > 0) & (v < info.smallest_normal)).sum())


def golden_of(weight, blocksize, double_quant, out):
    return nf4_dequant.dequantize(nf4_quant.quantize(weight, blocksize, double_quant), out).reshape(-1)


def rounded_up(weight, blocksize, double_quant):
    """Outputs whose float32 product is subnormal and whose bf16 rounding is the smallest normal number."""
    tiny = torch.finfo(torch.float32).smallest_normal
    products = golden_of(weight, blocksize, double_quant, "fp32").abs()
    golden = golden_of(weight, blocksize, double_quant, "bf16").float().abs()
    return int(((products > 0) & (products < tiny) & (golden == tiny)).sum())


# --- golden against the portable kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("blocksize", list(SHAPES))
@pytest.mark.parametrize("in_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_golden_is_portable_kernel_subnormal(blocksize, in_dtype, double_quant):
    weight = bf16_case(SHAPES[blocksize], DTYPES[in_dtype], blocksize, seed=blocksize)
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    for out, dtype in DTYPES.items():
        golden = golden_of(weight, blocksize, double_quant, out)
        reference = portable(packed, state, dtype)
        assert mismatches(reference, golden) == 0, out
        assert mismatches(portable(packed, state, dtype, eager=True), reference) == 0, out
    # the case is meaningful: many bf16 and float32 subnormal outputs, of both signs
    golden = golden_of(weight, blocksize, double_quant, "bf16")
    assert subnormal_count(golden) > weight.numel() // 8
    assert subnormal_count(golden_of(weight, blocksize, double_quant, "fp32")) > weight.numel() // 8
    assert (golden < 0).any() and (golden > 0).any()
    if not double_quant:  # double quantization moves the absmax off the crafted values
        assert rounded_up(weight, blocksize, double_quant) > 0


@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_golden_is_portable_kernel_fp16_subnormal(blocksize, double_quant):
    weight = fp16_case(SHAPES[blocksize], seed=blocksize)
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    golden = golden_of(weight, blocksize, double_quant, "fp16")
    assert mismatches(portable(packed, state, torch.float16), golden) == 0
    assert subnormal_count(golden) > weight.numel() // 8


# --- the native kernel on this CPU: reported, never a failure for a CPU feature --------------------------------------

def native_report(weight, blocksize, double_quant, out):
    """Differences between the native kernel and the golden model; fails only on a difference that is not a
    subnormal flushed to a signed zero."""
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    dtype = DTYPES[out]
    golden = golden_of(weight, blocksize, double_quant, out)
    got = native(packed, state, dtype)
    differ = bits(got) != bits(golden)
    count = int(differ.sum())
    if count == 0:
        return 0, ""
    # the float32 product each output was rounded from, as the golden model computes it
    products = golden_of(weight, blocksize, double_quant, "fp32").abs()
    flushed = (got == 0) & (products > 0) & (products < torch.finfo(dtype).smallest_normal)
    unexplained = differ & ~flushed.numpy()
    assert not unexplained.any(), (f"native dequantize_4bit differs from golden in {int(unexplained.sum())} "
                                   f"outputs that are not flushed subnormals ({CPU})")
    detail = f"{subnormal_count(golden)} subnormal"
    if out == "bf16":
        detail += f", {rounded_up(weight, blocksize, double_quant)} rounded up to the smallest normal"
    return count, (f"bitsandbytes' native dequantize_4bit flushes {count} of {weight.numel()} {out} outputs to "
                   f"zero (golden: {detail}) on this CPU: {CPU}")


@pytest.mark.parametrize("blocksize", list(SHAPES))
@pytest.mark.parametrize("out", list(DTYPES))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_native_kernel_subnormal(blocksize, out, double_quant):
    shape = SHAPES[blocksize]
    weight = fp16_case(shape) if out == "fp16" else bf16_case(shape, torch.bfloat16, blocksize)
    count, reason = native_report(weight, blocksize, double_quant, out)
    if count:
        pytest.xfail(reason)


def test_native_kernel_measured_flush():
    # [16, 64] bf16 near 1e-39, blocksize 64: the golden model equals torch's own float32 -> bf16 cast of the
    # products and the portable kernel; on an AVX512-BF16 CPU the native kernel returns +-0 for every output
    weight = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 1e-39).to(torch.bfloat16)
    packed, state = bnb_quantize(weight, 64, False)
    golden = golden_of(weight, 64, False, "bf16")
    products = golden_of(weight, 64, False, "fp32")
    assert mismatches(products.to(torch.bfloat16), golden) == 0
    assert mismatches(portable(packed, state, torch.bfloat16), golden) == 0
    count, reason = native_report(weight, 64, False, "bf16")
    if count:
        zeros = int((native(packed, state, torch.bfloat16) == 0).sum())
        pytest.xfail(f"{reason}; native zeros {zeros} of {weight.numel()}, golden zeros {int((golden == 0).sum())}")


@pytest.mark.parametrize("shape, blocksize", [((64, 128), 256), ((6, 192), 128)])
def test_native_kernel_row_absmax(shape, blocksize):
    # rows that are not whole blocks, cols % 16 == 0: the AVX-512 kernel indexes absmax as row * (cols // blocksize)
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1).to(torch.bfloat16)
    packed, state = bnb_quantize(weight, blocksize, False)
    golden = golden_of(weight, blocksize, False, "bf16")
    assert mismatches(portable(packed, state, torch.bfloat16), golden) == 0
    got = native(packed, state, torch.bfloat16)
    count = mismatches(got, golden)
    if count:
        err_native = float((got.float() - weight.reshape(-1).float()).abs().max())
        err_golden = float((golden.float() - weight.reshape(-1).float()).abs().max())
        pytest.xfail(f"bitsandbytes' native dequantize_4bit reads the wrong absmax: {count} of "
                     f"{weight.numel()} outputs differ, max |error| {err_native:.3g} (correct: {err_golden:.3g}); "
                     f"{CPU}")


# --- the RTL on a whole-block subnormal tensor -------------------------------------------------------------------

STREAMS = ("tensor", "codes", "absmax", "absmax2", "weights")


@pytest.mark.parametrize("double_quant, out, lanes", [(True, "bf16", 4), (False, "bf16", 3), (True, "fp32", 8)],
                         ids=["dq-bf16", "plain-bf16", "dq-fp32"])
def test_rtl_subnormal(double_quant, out, lanes):
    weight = bf16_case((2, 64), torch.bfloat16, 32, seed=lanes)
    q = nf4_quant.quantize(weight, 32, double_quant)
    stalls = {name: Stalls(0.3, lanes * 10 + i) for i, name in enumerate(STREAMS)}
    run = run_dequantizer(q, NF4DequantConfig(lanes=lanes, blocksize=32, out_dtype=out, double_quant=double_quant),
                          stalls=stalls)
    golden = nf4_dequant.dequantize(q, out).reshape(-1)
    assert mismatches(np.asarray(run.values), golden) == 0
    packed, state = bnb_quantize(weight, 32, double_quant)
    assert mismatches(portable(packed, state, DTYPES[out]), golden) == 0
    assert subnormal_count(golden) > 16
    assert double_quant or rounded_up(weight, 32, False) > 0
