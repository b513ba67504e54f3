"""LoftQ initialization for the 2/3/4-bit code books: a quantized weight and LoRA factors whose sum is the weight.

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models") alternates a
quantization and a rank-``r`` SVD of what the quantization missed:

    Q_t = quant(W - B_{t-1} A_{t-1})            (B_0 A_0 = 0: the first pass quantizes W itself)
    B_t A_t = SVD_r(W - deq(Q_t))

so that ``deq(Q) + B A`` is closer to ``W`` than ``deq(Q)`` alone, and a QLoRA fine-tune starts from (nearly) the
full-precision model instead of the quantized one. :func:`loftq_init` does this with :mod:`.golden.codebook`
(NF2, NF3, NF4 or a user table, blocksize and double quantization as stored), where PEFT's ``loftq_init`` can only
use bitsandbytes' NF4: at 4 bits without double quantization the two give the same quantized weight, bit for bit,
and the same factors (``tests/test_loftq.py``).

Conventions are PEFT's: ``lora_A`` is ``[rank, in_features]``, ``lora_B`` ``[out_features, rank]``, and the layer
computes ``W_eff = deq(Q) + scaling * lora_B @ lora_A`` (``scaling = lora_alpha / r``). PEFT's LoftQ ignores the
scaling (its factors are right only when ``lora_alpha == r``); here each factor is divided by ``sqrt(scaling)``,
so ``W_eff`` approximates ``W`` for any scaling and the factors are PEFT's exactly at ``scaling = 1``.
"""

from typing import NamedTuple

import numpy as np
import torch

from .golden.codebook import Codebook, dequantize, quantize

__all__ = ["LoftQInit", "loftq_init", "low_rank", "relative_error"]


class LoftQInit(NamedTuple):
    """What :func:`loftq_init` returns."""

    #: the quantized weight (``Quantized``, any code width), for :class:`~edge_qlora.qlora.QLoRALinear`
    quantized: object
    #: ``[rank, in_features]`` float32
    lora_A: torch.Tensor
    #: ``[out_features, rank]`` float32
    lora_B: torch.Tensor
    #: ``||W - deq(Q_t) - scaling * B_t A_t||_F / ||W||_F`` after each iteration t (float64)
    errors: tuple
    #: ``||W - deq(Q_1)||_F / ||W||_F``: plain quantization, no LoRA correction
    quant_error: float


def low_rank(residual, rank):
    """``(L, R)`` with ``L @ R`` the best rank-``rank`` approximation of ``residual`` (float32 SVD), the singular
    values split evenly: ``L = U sqrt(S)``, ``R = sqrt(S) V^T``, as PEFT's ``_low_rank_decomposition``."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def relative_error(weight, approx):
    """``||weight - approx||_F / ||weight||_F`` in float64."""
    weight = weight.double()
    norm = torch.linalg.norm(weight).item()
    diff = torch.linalg.norm(weight - approx.double()).item()
    return diff / norm if norm else diff


@torch.no_grad()
def loftq_init(weight, bits=4, codebook=None, rank=16, iters=1, blocksize=64, double_quant=True, scaling=1.0,
               dtype="bf16"):
    """LoftQ-initialize one linear layer.

    Parameters
    ----------
    weight : torch.Tensor [out_features, in_features]
        The full-precision weight (fp32, fp16 or bf16; the alternation runs in float32).
    bits : int
        2, 3 or 4 (NF tables); ignored when ``codebook`` is given.
    codebook : Codebook, optional
        A table of 4, 8 or 16 levels.
    rank : int
        LoRA rank, at most ``min(out_features, in_features)``.
    iters : int
        Alternations, 1 or more (LoftQ uses 1 to 5; 1 is the SVD of plain quantization's error).
    blocksize, double_quant :
        As stored (:func:`~edge_qlora.golden.codebook.quantize`).
    scaling : float
        ``lora_alpha / rank`` of the layer the factors go into; each factor is divided by ``sqrt(scaling)``.
    dtype : str
        Dtype of the dequantized weight the residual is taken against: ``"bf16"``, the weight the GEMM engine
        multiplies by (:class:`~edge_qlora.qlora.QLoRALinear`), or ``"fp32"``, bitsandbytes' float32
        ``dequantize_4bit`` as PEFT's LoftQ uses it.

    Returns
    -------
    LoftQInit
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError("weight must be a 2-D torch tensor [out_features, in_features]")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor, not {weight.dtype}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be an integer in 1..{min(weight.shape)} for a {tuple(weight.shape)} weight, "
                         f"not {rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"iters must be a positive integer, not {iters!r}")
    if not np.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"scaling must be a positive number, not {scaling!r}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', not {dtype!r}")
    if codebook is None:
        codebook = Codebook.nf(bits)
    w = weight.detach().to("cpu", torch.float32)
    residual = w
    errors = []
    quant_error = None
    for _ in range(int(iters)):
        q = quantize(residual, codebook=codebook, blocksize=blocksize, double_quant=double_quant)
        deq = dequantize(q, dtype).float()
        if quant_error is None:
            quant_error = relative_error(w, deq)
        left, right = low_rank(w - deq, rank)
        errors.append(relative_error(w, deq + left @ right))
        residual = w - left @ right
    root = float(np.sqrt(scaling))
    lora_a, lora_b = right / root, left / root
    return LoftQInit(q, lora_a.contiguous(), lora_b.contiguous(), tuple(errors), quant_error)
