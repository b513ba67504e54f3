"""NF4 quantizer: golden model against bitsandbytes, and the RTL against the golden model."""

import numpy as np
import pytest
import torch

from edge_qlora.golden import nf4_quant
from edge_qlora.golden.codebooks import DYNAMIC_CODE, NF4_CODE

from cases import DTYPES, adversarial, random_weights
from reference import bnb_quantize, bits, mismatches

import bitsandbytes.functional as bnbf


def quant_mismatches(weight, blocksize, double_quant):
    """Mismatch counts between bitsandbytes and the golden model for every output of ``quantize_4bit``."""
    packed, state = bnb_quantize(weight, blocksize, double_quant)
    golden = nf4_quant.quantize(weight, blocksize, double_quant)
    counts = {"packed": mismatches(packed.reshape(-1).numpy(), golden.packed)}
    if double_quant:
        counts["absmax_codes"] = mismatches(state.absmax.numpy(), golden.absmax)
        counts["offset"] = mismatches(np.float32(state.offset.item()).reshape(1), np.float32(golden.offset).reshape(1))
        counts["absmax2"] = mismatches(state.state2.absmax, torch.from_numpy(golden.absmax2))
    else:
        counts["absmax"] = mismatches(state.absmax, torch.from_numpy(golden.absmax))
    return counts


def test_codebooks_match_bitsandbytes():
    assert mismatches(bnbf.get_4bit_type("nf4", device="cpu").numpy(), NF4_CODE) == 0
    assert mismatches(bnbf.create_dynamic_map().numpy(), DYNAMIC_CODE) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_golden_random(dtype, blocksize, double_quant):
    for seed, shape in enumerate([(64, 128), (7, 63), (3, 5), (1,), (2,), (1000,), (129, 257), (33, 2048)]):
        counts = quant_mismatches(random_weights(shape, DTYPES[dtype], seed), blocksize, double_quant)
        assert counts == dict.fromkeys(counts, 0), shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_golden_adversarial(dtype, blocksize, double_quant):
    for name, weight in adversarial(DTYPES[dtype], blocksize).items():
        counts = quant_mismatches(weight, blocksize, double_quant)
        assert counts == dict.fromkeys(counts, 0), name


def test_golden_packs_like_bitsandbytes():
    # odd count: the pad nibble is the code of 0.0 (7), first weight in the high nibble
    weight = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float32)
    golden = nf4_quant.quantize(weight, 64, double_quant=False)
    assert golden.packed.tolist() == [0xF0, 0x77]
    assert nf4_quant.unpack_nibbles(golden.packed, 3).tolist() == [15, 0, 7]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_golden_refuses_non_finite(bad):
    weight = torch.ones(100)
    weight[37] = bad
    with pytest.raises(ValueError, match="flat index 37"):
        nf4_quant.quantize(weight)


def test_golden_refuses_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quant.quantize(torch.ones(64), blocksize=48)
    with pytest.raises(ValueError, match="dtype"):
        nf4_quant.quantize(torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        nf4_quant.quantize(torch.ones(0))
