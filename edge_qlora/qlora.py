"""PyTorch integration: a QLoRA linear layer whose products run with the accelerator's arithmetic.

:class:`QLoRALinear` replaces a PEFT-wrapped bitsandbytes ``Linear4bit``: the frozen NF4 weight, float32 master
copies of the LoRA factors as ``nn.Parameter`` s (any torch optimizer updates them), and a forward and backward
that compute exactly what ``rtl/lora/`` computes, phase by phase (:mod:`edge_qlora.golden.lora`):

* ``backend="golden"``: the bit-accurate model of the GEMM engine (fast, numpy);
* ``backend="pysim"``: every product on the RTL GEMM engine in Amaranth's simulator (slow; tiny layers only);
* ``backend="verilator"``: the same on the engine compiled with Verilator (each GEMM configuration compiles once).

Both give the same bits. :func:`export_peft_adapter` writes the trained factors as a PEFT adapter
(``adapter_model.safetensors`` + ``adapter_config.json``) that ``PeftModel.from_pretrained`` loads.
"""

import numpy as np
import torch

from .golden import gemm as gemm_model
from .golden.codebook import quantize as quantize_any
from .golden.nf4_dequant import dequantize
from .golden.nf4_quant import NF4Quantized
from .outputs import atomic_output_files

__all__ = ["QLoRALinear", "QLoRAFunction", "export_peft_adapter", "from_linear4bit"]


def _gemm(a, b, transposed, chunk, backend, weight=None, config=None):
    """float32 ``a @ b`` with the engine's numerics; ``weight`` (NF4) replaces b for the base products."""
    if backend == "golden":
        return gemm_model.gemm(a, b, gemm_model.GemmNumerics(chunk=chunk, out_dtype="fp32"), transposed)
    from .rtl.gemm import GemmConfig
    from .sim.gemm import run_gemm
    m, q = a.shape
    source = weight if weight is not None else (b if transposed else b.T).contiguous()
    n, k = source.shape if weight is None else weight.shape
    config = GemmConfig(rows=config[0], cols=config[1], max_k=max(k, 16), max_n=max(n, q, 16),
                        weights="nf4" if weight is not None else "bf16", out_dtype="fp32",
                        blocksize=weight.blocksize if weight is not None else 64,
                        double_quant=weight.double_quant if weight is not None else True, chunk=chunk)
    return run_gemm(a.contiguous(), source, config, transposed=transposed, backend=backend).out


def _bf16(t):
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
    return t.to(torch.bfloat16)


class QLoRAFunction(torch.autograd.Function):
    """``y = x W^T + s (x A^T) B^T`` and its backward, phase by phase as the hardware computes them."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer):
        shape = x.shape
        x2 = _bf16(x.reshape(-1, shape[-1]))
        a16, b16 = _bf16(lora_a), _bf16(lora_b)
        s = np.float32(layer.scaling)
        chunk, backend, array = layer.chunk, layer.backend, (layer.rows, layer.cols)
        h = _gemm(x2, a16.T, False, chunk, backend, config=array)                            # F1
        hb = _bf16(h)
        yl = _gemm(hb, b16.T, False, chunk, backend, config=array)                           # F3
        yb = _gemm(x2, layer.weight_bf16.T, False, chunk, backend, layer.weight, array)      # F2
        y = _bf16((yb.numpy() + (s * yl.numpy()).astype(np.float32)).astype(np.float32))
        ctx.save_for_backward(x2, hb, a16, b16)
        ctx.layer, ctx.shape = layer, shape
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, hb, a16, b16 = ctx.saved_tensors
        layer = ctx.layer
        s = np.float32(layer.scaling)
        chunk, backend, array = layer.chunk, layer.backend, (layer.rows, layer.cols)
        dy2 = _bf16(dy.reshape(-1, dy.shape[-1]))
        g = _gemm(dy2, b16, True, chunk, backend, config=array)                              # B1
        gb = _bf16(g)
        dxl = _gemm(gb, a16, True, chunk, backend, config=array)                             # B5
        dxb = _gemm(dy2, layer.weight_bf16, True, chunk, backend, layer.weight, array)       # B4
        dx = _bf16((dxb.numpy() + (s * dxl.numpy()).astype(np.float32)).astype(np.float32))
        g_b = _gemm(dy2.T.contiguous(), hb, False, chunk, backend, config=array)             # B2
        g_a = _gemm(gb.T.contiguous(), x2, True, chunk, backend, config=array)               # B3
        grad_a = torch.from_numpy((s * g_a.numpy()).astype(np.float32))
        grad_b = torch.from_numpy((s * g_b.numpy()).astype(np.float32))
        dx = dx.to(dy.dtype).reshape(*ctx.shape[:-1], -1)
        return dx, grad_a, grad_b, None


class QLoRALinear(torch.nn.Module):
    """A QLoRA linear layer computed with the accelerator's arithmetic.

    Parameters
    ----------
    weight : NF4Quantized [out, in]
        The frozen base weight: NF4, or with ``backend="golden"`` any code width and table
        (:mod:`~edge_qlora.golden.codebook`; the engine multiplies by the bf16 dequantized weight either way).
    rank : int
    scaling : float
        ``lora_alpha / rank`` in PEFT's terms.
    backend : str
        ``"golden"``, ``"pysim"`` or ``"verilator"``.
    rows, cols : int
        GEMM array (the chunk length follows from it).
    lora_a, lora_b : torch.Tensor, optional
        Initial factors; default as PEFT initialises them (A Kaiming-uniform, B zero).

    Attributes
    ----------
    lora_A, lora_B : nn.Parameter, float32 master copies
    """

    def __init__(self, weight, rank, scaling=1.0, backend="golden", rows=4, cols=4, lora_a=None, lora_b=None):
        super().__init__()
        if not isinstance(weight, NF4Quantized) or len(weight.shape) != 2:
            raise TypeError("weight must be a 2-D NF4Quantized")
        if backend not in ("golden", "pysim", "verilator"):
            raise ValueError(f"backend must be 'golden', 'pysim' or 'verilator', not {backend!r}")
        if backend != "golden" and not weight.is_nf4:
            raise ValueError(f"backend {backend!r} drives the NF4 dequantizer only; a {weight.bits}-bit "
                             f"{'NF' if weight.codebook is None else 'code-book'} weight needs backend='golden'")
        from .rtl.gemm import GemmConfig
        self.weight = weight
        self.weight_bf16 = dequantize(weight, "bf16")
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling, self.backend, self.rows, self.cols = float(scaling), backend, rows, cols
        self.chunk = GemmConfig(rows=rows, cols=cols).chunk_steps
        if lora_a is None:
            lora_a = torch.empty(rank, in_features)
            torch.nn.init.kaiming_uniform_(lora_a, a=5 ** 0.5)
        if lora_b is None:
            lora_b = torch.zeros(out_features, rank)
        self.lora_A = torch.nn.Parameter(lora_a.detach().float().clone())
        self.lora_B = torch.nn.Parameter(lora_b.detach().float().clone())

    def forward(self, x):
        return QLoRAFunction.apply(x, self.lora_A, self.lora_B, self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling}, backend={self.backend!r}, array={self.rows}x{self.cols}")


def from_linear4bit(module, rank, scaling, **kwargs):
    """A :class:`QLoRALinear` from a bitsandbytes ``Linear4bit`` (its packed weight and quant state)."""
    state = module.weight.quant_state
    absmax = state.absmax.numpy()
    if state.nested:
        q = NF4Quantized(module.weight.data.reshape(-1).numpy().copy(), absmax.copy(), tuple(state.shape),
                         {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[state.dtype],
                         state.blocksize, np.float32(state.offset.item()), state.state2.absmax.numpy().copy())
    else:
        q = NF4Quantized(module.weight.data.reshape(-1).numpy().copy(), absmax.copy(), tuple(state.shape),
                         {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[state.dtype],
                         state.blocksize)
    return QLoRALinear(q, rank, scaling, **kwargs)


def export_peft_adapter(base_model, layers, path, rank, lora_alpha):
    """Write trained factors as a PEFT LoRA adapter that ``PeftModel.from_pretrained(base_model, path)`` loads.

    Parameters
    ----------
    base_model : torch.nn.Module
        The model the adapter belongs to (its target modules are ``Linear4bit`` or ``Linear``).
    layers : dict of str to QLoRALinear
        Module name in ``base_model`` -> the trained layer.
    path : str
        Folder to write (created if missing); its adapter files are replaced whole, through
        :func:`~edge_qlora.outputs.atomic_output_files`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=sorted(layers), lora_dropout=0.0,
                        bias="none")
    peft_model = get_peft_model(base_model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    for name, layer in layers.items():
        target = modules[name]
        target.lora_A["default"].weight.data = layer.lora_A.detach().clone().to(target.lora_A["default"].weight.dtype)
        target.lora_B["default"].weight.data = layer.lora_B.detach().clone().to(target.lora_B["default"].weight.dtype)
    with atomic_output_files(path) as temp:
        peft_model.save_pretrained(temp)
    return peft_model


def quantize_linear(weight, blocksize=64, double_quant=True, *, bits=4, codebook=None):
    """Quantized form of a float weight for :class:`QLoRALinear`: NF4 by default, as bitsandbytes quantizes it;
    ``bits`` 2 or 3 (NF tables) or a ``codebook`` for the other widths (:func:`~edge_qlora.golden.codebook.quantize`).
    """
    return quantize_any(weight, bits, codebook, blocksize, double_quant)
