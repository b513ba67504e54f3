"""LoftQ initialization (edge_qlora.loftq): PEFT's own LoftQ at 4 bits, bit for bit, and the alternation's error
falling with iterations at 2, 3 and 4 bits.

PEFT's ``loftq_utils.loftq_init`` moves its tensors to ``"xpu"`` or ``"cuda"`` (a literal in the function), and its
4-bit path quantizes with bitsandbytes (``Params4bit(..., compress_statistics=False, quant_type="nf4")``, blocksize
64). On a CPU-only machine it runs unchanged under :class:`CpuDevice`, a torch function mode that turns every
``cuda``/``xpu`` device argument of a torch call into ``cpu``: bitsandbytes then quantizes and dequantizes with its
CPU kernels, and nothing of PEFT's code is copied or patched.
"""

import logging

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
from peft.utils import loftq_utils  # noqa: E402

from edge_qlora.golden.codebook import Codebook, dequantize, quantize  # noqa: E402
from edge_qlora.loftq import loftq_init  # noqa: E402


class CpuDevice(TorchFunctionMode):
    """Run code written for an accelerator on the CPU: ``device="cuda"``/``"xpu"`` arguments become ``"cpu"``."""

    @staticmethod
    def _cpu(device):
        if isinstance(device, (str, torch.device)) and torch.device(device).type in ("cuda", "xpu"):
            return torch.device("cpu")
        return device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = self._cpu(kwargs["device"])
        if func is torch.Tensor.to:
            args = (args[0],) + tuple(self._cpu(a) for a in args[1:])
        return func(*args, **kwargs)


def weight(shape, seed):
    """A N(0, 0.02) weight with a few outliers (the rows are whole blocks of 64: bitsandbytes 0.50's AVX-512
    dequantizer is wrong otherwise, see DEVELOPERS.md)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[torch.rand(shape, generator=gen) < 0.002] *= 30
    return w


@pytest.mark.parametrize("shape, rank, iters", [((128, 256), 8, 1), ((64, 128), 4, 3), ((192, 320), 16, 5),
                                                ((256, 128), 32, 2)])
def test_peft_loftq_4bit(shape, rank, iters):
    w = weight(shape, seed=rank * 10 + iters)
    with CpuDevice():
        peft_weight, peft_a, peft_b = loftq_utils.loftq_init(w, num_bits=4, reduced_rank=rank, num_iter=iters)
    ours = loftq_init(w, bits=4, rank=rank, iters=iters, blocksize=64, double_quant=False, dtype="fp32")
    assert ours.quantized.is_nf4 and not ours.quantized.double_quant
    # the same quantized weight, bit for bit
    assert torch.equal(dequantize(ours.quantized, "fp32").view(torch.int32), peft_weight.view(torch.int32))
    assert ours.lora_A.shape == (rank, shape[1]) and ours.lora_B.shape == (shape[0], rank)
    torch.testing.assert_close(ours.lora_A, peft_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.lora_B, peft_b, rtol=1e-5, atol=1e-7)
    peft_error = (torch.linalg.norm(w.double() - peft_weight.double() - (peft_b @ peft_a).double())
                  / torch.linalg.norm(w.double())).item()
    assert ours.errors[-1] == pytest.approx(peft_error, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("double_quant", [True, False])
def test_iterations_reduce_error(bits, double_quant):
    w = weight((128, 256), seed=bits)
    result = loftq_init(w, bits=bits, rank=8, iters=5, double_quant=double_quant)
    errors = (result.quant_error,) + result.errors
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # the record is the code width asked for and the reported error is the one of what it returns
    assert result.quantized.bits == bits
    approx = dequantize(result.quantized, "bf16").double() + (result.lora_B @ result.lora_A).double()
    assert (torch.linalg.norm(w.double() - approx) / torch.linalg.norm(w.double())).item() == \
        pytest.approx(result.errors[-1], rel=1e-6)


def test_first_iteration_quantizes_the_weight():
    """One iteration: the stored weight is plain quantization of W, the factors its error's best rank-r part."""
    w = weight((64, 128), seed=7)
    result = loftq_init(w, bits=3, rank=4, iters=1)
    plain = quantize(w, bits=3)
    assert np.array_equal(result.quantized.packed, plain.packed)
    residual = (w - dequantize(plain, "bf16").float()).double()
    s = torch.linalg.svdvals(residual)
    best = torch.sqrt((s[4:] ** 2).sum()) / torch.linalg.norm(w.double())
    assert result.errors[0] == pytest.approx(best.item(), rel=1e-4)


def test_scaling_and_codebook():
    w = weight((64, 64), seed=3)
    table = Codebook(np.linspace(-1, 1, 8))
    one = loftq_init(w, codebook=table, rank=4, iters=2, scaling=1.0)
    four = loftq_init(w, codebook=table, rank=4, iters=2, scaling=4.0)
    assert one.quantized.bits == 3 and one.quantized.codebook == table
    assert np.array_equal(one.quantized.packed, four.quantized.packed)
    torch.testing.assert_close(4.0 * four.lora_B @ four.lora_A, one.lora_B @ one.lora_A, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"), ({"rank": 65}, "rank"), ({"iters": 0}, "iters"), ({"bits": 5}, "bits"),
    ({"scaling": -1.0}, "scaling"), ({"dtype": "fp16"}, "dtype"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loftq_init(weight((64, 64), 0), **kwargs)
