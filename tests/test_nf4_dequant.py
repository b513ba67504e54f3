"""NF4 dequantizer: golden model against bitsandbytes, and the RTL against the golden model."""

import pytest
import torch

from edge_qlora.golden import nf4_dequant, nf4_quant

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
