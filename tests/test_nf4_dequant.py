# amaranth: UnusedElaboratable=no
"""NF4 dequantizer: golden model against bitsandbytes, and the RTL against the golden model."""

import pytest
import torch

from edge_qlora.golden import nf4_dequant, nf4_quant, nf4_span

from cases import DTYPES, adversarial, random_weights
from reference import bnb_dequantize, bnb_quantize, mismatches


def dequant_mismatches(weight, blocksize, double_quant):
    """Mismatches between bitsandbytes and the golden model, per output dtype, for one quantized weight."""
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    quantized = nf4_quant.quantize(weight, blocksize, double_quant)
    counts = {}
    for name, dtype in DTYPES.items():
        golden = nf4_dequant.dequantize(quantized, name)
        assert golden.shape == weight.shape and golden.dtype == dtype
        counts[name] = mismatches(bnb_dequantize(packed, state, dtype), golden.reshape(-1))
    return counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_golden_random(dtype, blocksize, double_quant):
    for seed, shape in enumerate([(64, 128), (7, 63), (3, 5), (1000,), (129, 257), (33, 2048), (6, 192)]):
        counts = dequant_mismatches(random_weights(shape, DTYPES[dtype], seed), blocksize, double_quant)
        assert counts == dict.fromkeys(counts, 0), shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_golden_adversarial(dtype, blocksize, double_quant):
    for name, weight in adversarial(DTYPES[dtype], blocksize).items():
        counts = dequant_mismatches(weight, blocksize, double_quant)
        assert counts == dict.fromkeys(counts, 0), name


def test_golden_refuses_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        nf4_dequant.dequantize(nf4_quant.quantize(torch.ones(64)), "fp8")


# --- RTL ------------------------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402

from edge_qlora.rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer  # noqa: E402
from edge_qlora.sim.nf4 import run_dequantizer  # noqa: E402
from edge_qlora.sim.streams import Stalls  # noqa: E402

STREAMS = ("tensor", "codes", "absmax", "absmax2", "weights")


def random_stalls(seed, idle=0.3):
    return {name: Stalls(idle, seed * 10 + i) for i, name in enumerate(STREAMS)}


def check_rtl(tensors, config, seed):
    """RTL against the golden model and against bitsandbytes, with random stalls on every stream."""
    run = run_dequantizer(tensors, config, stalls=random_stalls(seed))
    for q, values, weight in zip(tensors, run.values, [t.weight for t in tensors]):
        golden = nf4_dequant.dequantize(q, config.out_dtype)
        assert mismatches(golden.reshape(-1), torch.from_numpy(values.view(np.int16 if golden.element_size() == 2
                                                                             else np.int32)).view(golden.dtype)) == 0
        packed, state = bnb_quantize(weight, q.blocksize, q.double_quant)
        reference = bnb_dequantize(packed, state, golden.dtype)
        assert mismatches(reference, golden.reshape(-1)) == 0


def quantized(weight, blocksize, double_quant):
    q = nf4_quant.quantize(weight, blocksize, double_quant)
    q.weight = weight  # kept for the bitsandbytes comparison
    return q


@pytest.mark.parametrize("lanes", [1, 3, 8, 16])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_rtl_random(lanes, out_dtype, double_quant):
    # three tensors back to back: odd sizes, a size below one block, different block counts
    blocksize = 64 if lanes != 3 else 32
    shapes = [(7, 63), (5,), (3, 129)]
    tensors = [quantized(random_weights(shape, DTYPES["bf16"], seed), blocksize, double_quant)
               for seed, shape in enumerate(shapes)]
    check_rtl(tensors, NF4DequantConfig(lanes=lanes, blocksize=blocksize, out_dtype=out_dtype,
                                        double_quant=double_quant), seed=lanes)


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_rtl_adversarial(in_dtype, double_quant):
    cases = adversarial(DTYPES[in_dtype], 64)
    tensors = [quantized(weight, 64, double_quant) for weight in cases.values()]
    for out_dtype, lanes in (("bf16", 16), ("fp16", 5), ("fp32", 8)):
        check_rtl(tensors, NF4DequantConfig(lanes=lanes, blocksize=64, out_dtype=out_dtype,
                                            double_quant=double_quant), seed=lanes)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_rtl_compact(double_quant):
    # the small-FPGA build: fewer float pipeline registers, same bits
    tensors = [quantized(weight, 64, double_quant) for weight in adversarial(DTYPES["fp16"], 64).values()]
    tensors.append(quantized(random_weights((3, 129), DTYPES["bf16"], 4), 64, double_quant))
    for out_dtype, lanes in (("bf16", 1), ("fp16", 3)):
        check_rtl(tensors, NF4DequantConfig(lanes=lanes, blocksize=64, out_dtype=out_dtype,
                                            double_quant=double_quant, compact=True), seed=lanes)


def test_rtl_many_absmax2_groups():
    # more than 256 blocks: the second-level absmax changes mid-tensor; blocksize 32 with 16 lanes (2 cycles/block)
    weight = random_weights((300 * 32 + 17,), DTYPES["fp16"], 7)
    check_rtl([quantized(weight, 32, True)], NF4DequantConfig(lanes=16, blocksize=32, out_dtype="bf16"), seed=3)


def test_rtl_spans_between_whole_tensors():
    # rectangles of whole blocks cut from a weight of 700 blocks (three groups of 256): rows of a feature block by
    # one block (forward spans: each block in another place of its group, groups changing mid-span), a span of rows
    # by two blocks (transposed), one block alone; whole tensors before, between and after: each span's blocks take
    # their own absmax2 beats (the header says so), the whole tensors one per 256 blocks. (Without double
    # quantization a span is an ordinary tensor: its blocks' absmax, nothing more.)
    weight = random_weights((70, 640), DTYPES["bf16"], 11)
    whole = quantized(weight, 64, True)
    cuts = [(slice(3, 40), slice(128, 192)), (slice(20, 26), slice(512, 640)), (slice(69, 70), slice(0, 64))]
    spans = [nf4_span.span(whole, rows, cols) for rows, cols in cuts]
    other = quantized(random_weights((3, 129), DTYPES["bf16"], 12), 64, True)
    tensors = [other, spans[0], whole, spans[1], spans[2], other]
    config = NF4DequantConfig(lanes=8, blocksize=64, double_quant=True)
    run = run_dequantizer(tensors, config, stalls=random_stalls(5))
    full = nf4_dequant.dequantize(whole).view(torch.int16)
    expected = [nf4_dequant.dequantize(other).view(torch.int16).reshape(-1), full[cuts[0]].reshape(-1),
                full.reshape(-1), full[cuts[1]].reshape(-1), full[cuts[2]].reshape(-1)]
    expected.append(expected[0])
    for values, reference in zip(run.values, expected):
        assert (torch.from_numpy(values.view(np.int16)) == reference).all()


@pytest.mark.parametrize("lanes", [1, 4, 8, 16])
def test_rtl_sustains_lanes_per_cycle(lanes):
    weight = random_weights((64, 64), DTYPES["bf16"], 1)
    q = nf4_quant.quantize(weight, 64, True)
    run = run_dequantizer(q, NF4DequantConfig(lanes=lanes, blocksize=64))
    beats = weight.numel() // lanes
    assert run.beats == beats
    assert run.cycles <= beats + 50  # the pipeline fills once (about 45 cycles), then one beat per cycle


def test_config_checks():
    with pytest.raises(ValueError, match="lanes"):
        NF4DequantConfig(lanes=17)
    with pytest.raises(ValueError, match="blocksize"):
        NF4DequantConfig(blocksize=48)
    with pytest.raises(ValueError, match="out_dtype"):
        NF4DequantConfig(out_dtype="fp8")
    with pytest.raises(ValueError, match="multipliers"):
        NF4DequantConfig(multipliers=3)
    with pytest.raises(TypeError, match="config"):
        NF4Dequantizer("bf16")
