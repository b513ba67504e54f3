"""One QLoRA training step of one linear layer: the float references and the bit-accurate model of the hardware
(twin of ``rtl/lora/``).

The layer has a frozen NF4 weight W ``[out, in]``, LoRA factors A ``[r, in]`` and B ``[out, r]`` and a scaling
``s``. One step, given activations x ``[T, in]`` and the output gradient dy ``[T, out]``:

* forward: ``y = x W^T + s (x A^T) B^T``
* backward: ``grad_B = s dy^T (x A^T)``, ``grad_A = s (dy B)^T x``, ``dx = dy W + s (dy B) A``
* update: SGD, or AdamW with torch.optim.AdamW's semantics (decoupled weight decay, bias correction).

The hardware (``rtl/lora/``) runs every product on the GEMM engine (``golden/gemm.py`` numerics, float32
results) in this order, with the operand roles and engine modes below, and the element-wise steps in float32:

====  =======================  ===========  ======================  ==================
 ph    product                  mode         A operand (bf16)        W operand (bf16)
====  =======================  ===========  ======================  ==================
 F1    h = x A^T                 forward      x                       A
 F2    yb = x W^T                forward      x                       W (NF4)
 F3    yl = hb B^T               forward      hb = bf16(h)            B
 B1    g = dy B                  backward     dy                      B
 B2    gB = dy^T hb              forward      dy^T                    hb^T
 B3    gA = gb^T x               backward     gb^T (gb = bf16(g))     x
 B4    dxb = dy W                backward     dy                      W (NF4)
 B5    dxl = gb A                backward     gb                      A
====  =======================  ===========  ======================  ==================

then ``y = bf16(yb + s*yl)``, ``dx = bf16(dxb + s*dxl)``, ``grad_A = s*gA``, ``grad_B = s*gB`` (float32, each
operation rounded once) and the optimizer (``golden/lora_optim.py``) on the float32 master copies of A and B.
The A and B the products use are bf16 roundings of the master copies (as PEFT in bf16 holds them).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from . import gemm as gemm_model
from . import lora_optim
from .nf4_dequant import dequantize as nf4_dequantize

__all__ = ["LoraCase", "STATE_NAMES", "OUTPUT_NAMES", "random_case", "step_model", "step_reference_fp64",
           "step_peft_bf16"]

STATE_NAMES = ("exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B")
OUTPUT_NAMES = ("y", "dx", "grad_A", "grad_B", "lora_A", "lora_B") + STATE_NAMES
_F = np.float32


@dataclass
class LoraCase:
    """One step's inputs.

    Attributes
    ----------
    x : torch.Tensor bf16 [T, in]
    dy : torch.Tensor bf16 [T, out]
    weight : NF4Quantized [out, in]
    lora_A : torch.Tensor float32 [r, in]
    lora_B : torch.Tensor float32 [out, r]
    state : dict of name -> torch.Tensor float32 (zeros when absent)
    scaling, lr, beta1, beta2, eps, weight_decay : float
    optimizer : str, ``"sgd"`` or ``"adamw"``
    step : int, the step being taken (1 for the first)
    """

    x: torch.Tensor
    dy: torch.Tensor
    weight: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    state: dict = field(default_factory=dict)
    scaling: float = 2.0
    optimizer: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    step: int = 1

    def states(self):
        """The four optimizer states, zeros where absent."""
        shapes = {"A": tuple(self.lora_A.shape), "B": tuple(self.lora_B.shape)}
        return {name: self.state.get(name, torch.zeros(shapes[name[-1]])).float() for name in STATE_NAMES}

    @property
    def hyper(self):
        return lora_optim.hyper_from(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.step)


def random_case(t, d_in, d_out, r, optimizer="adamw", step=1, seed=0, states=False, double_quant=True,
                weight_decay=0.01, lr=1e-3, scaling=2.0):
    """A step case with random inputs: x ~ N(0, 1) and dy ~ N(0, 0.01) in bf16, W ~ N(0, 0.02^2) in NF4
    (blocksize 64), A and B ~ N(0, 0.05^2) in float32; with ``states``, AdamW moments as a few earlier steps leave
    them (first moments in [-5e-4, 5e-4), second in [0, 1e-3))."""
    from .nf4_quant import quantize

    gen = torch.Generator().manual_seed(seed)
    state = {}
    if states:
        for name in STATE_NAMES:
            shape = (r, d_in) if name.endswith("A") else (d_out, r)
            value = torch.rand(shape, generator=gen) * 1e-3
            state[name] = value if "sq" in name else value - 5e-4
    return LoraCase(
        x=torch.randn((t, d_in), generator=gen).to(torch.bfloat16),
        dy=(torch.randn((t, d_out), generator=gen) * 0.1).to(torch.bfloat16),
        weight=quantize(torch.randn((d_out, d_in), generator=gen) * 0.02, 64, double_quant),
        lora_A=torch.randn((r, d_in), generator=gen) * 0.05, lora_B=torch.randn((d_out, r), generator=gen) * 0.05,
        scaling=scaling, optimizer=optimizer, lr=lr, weight_decay=weight_decay, step=step, state=state)


def _bf16(values):
    return torch.from_numpy(np.ascontiguousarray(values, dtype=_F)).to(torch.bfloat16)


def _f32(t):
    return t.detach().float().numpy().astype(_F)


def step_model(case, chunk=16):
    """The hardware's step, bit for bit. Returns a dict of torch tensors named as :data:`OUTPUT_NAMES`."""
    numerics = gemm_model.GemmNumerics(chunk=chunk, out_dtype="fp32")

    def gemm(a, b, transposed):
        return _f32(gemm_model.gemm(a, b, numerics, transposed))

    s = _F(case.scaling)
    x, dy = case.x, case.dy
    w = nf4_dequantize(case.weight, "bf16")
    a_bf16, b_bf16 = case.lora_A.to(torch.bfloat16), case.lora_B.to(torch.bfloat16)

    h = gemm(x, a_bf16.T, False)                         # F1
    yb = gemm(x, w.T, False)                             # F2
    hb = _bf16(h)
    yl = gemm(hb, b_bf16.T, False)                       # F3
    g = gemm(dy, b_bf16, True)                           # B1
    gb = _bf16(g)
    g_b = gemm(dy.T.contiguous(), hb, False)             # B2: dy^T hb, W operand hb^T
    g_a = gemm(gb.T.contiguous(), x, True)               # B3: gb^T x, W operand x
    dxb = gemm(dy, w, True)                              # B4
    dxl = gemm(gb, a_bf16, True)                         # B5

    with np.errstate(over="ignore", invalid="ignore"):
        y = _bf16((yb + (s * yl).astype(_F)).astype(_F))
        dx = _bf16((dxb + (s * dxl).astype(_F)).astype(_F))
        grad_a = (s * g_a).astype(_F)
        grad_b = (s * g_b).astype(_F)
    states = {k: _f32(v) for k, v in case.states().items()}
    new_a, new_b, new_states = _update(case, grad_a, grad_b, states)
    out = {"y": y, "dx": dx, "grad_A": torch.from_numpy(grad_a), "grad_B": torch.from_numpy(grad_b),
           "lora_A": torch.from_numpy(new_a), "lora_B": torch.from_numpy(new_b)}
    out.update({k: torch.from_numpy(v) for k, v in new_states.items()})
    return out


def _update(case, grad_a, grad_b, states):
    hyper = case.hyper
    new_states = dict(states)
    results = []
    for name, grad, param in (("A", grad_a, _f32(case.lora_A)), ("B", grad_b, _f32(case.lora_B))):
        if case.optimizer == "adamw":
            p, m, v = lora_optim.adamw(param, grad, states[f"exp_avg_{name}"], states[f"exp_avg_sq_{name}"], hyper)
            new_states[f"exp_avg_{name}"], new_states[f"exp_avg_sq_{name}"] = m, v
        else:
            p = lora_optim.sgd(param, grad, hyper["weight_decay"], hyper["lr"])
        results.append(np.asarray(p, _F))
    return results[0], results[1], new_states


def step_reference_fp64(case):
    """Exact float64 step from the exact (float32) dequantized weight, the accuracy reference."""
    d = torch.float64
    w = nf4_dequantize(case.weight, "fp32").to(d)
    x, dy = case.x.to(d), case.dy.to(d)
    a, b = case.lora_A.to(d), case.lora_B.to(d)
    s = float(case.scaling)
    h = x @ a.T
    y = x @ w.T + s * (h @ b.T)
    g = dy @ b
    grad_b = s * (dy.T @ h)
    grad_a = s * (g.T @ x)
    dx = dy @ w + s * (g @ a)
    out = {"y": y, "dx": dx, "grad_A": grad_a, "grad_B": grad_b}
    states = {k: v.to(d) for k, v in case.states().items()}
    for name, grad, param in (("A", grad_a, a), ("B", grad_b, b)):
        p = param.clone()
        if case.optimizer == "adamw":
            m, v = states[f"exp_avg_{name}"], states[f"exp_avg_sq_{name}"]
            p = p * (1 - case.lr * case.weight_decay)
            m = case.beta1 * m + (1 - case.beta1) * grad
            v = case.beta2 * v + (1 - case.beta2) * grad * grad
            bc1 = 1 - case.beta1 ** case.step
            bc2 = 1 - case.beta2 ** case.step
            p = p - (case.lr / bc1) * m / (torch.sqrt(v) / bc2 ** 0.5 + case.eps)
            out[f"exp_avg_{name}"], out[f"exp_avg_sq_{name}"] = m, v
        else:
            p = p - case.lr * (grad + case.weight_decay * p)
            out[f"exp_avg_{name}"], out[f"exp_avg_sq_{name}"] = states[f"exp_avg_{name}"], \
                states[f"exp_avg_sq_{name}"]
        out[f"lora_{name}"] = p
    return out


def step_peft_bf16(case):
    """The same step as a user runs it: a bitsandbytes ``Linear4bit`` wrapped by PEFT LoRA, everything in bf16,
    ``y.backward(dy)``, then ``torch.optim.AdamW`` / ``SGD`` on the bf16 LoRA parameters."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from .bnb_state import quant_state_dict

    out_features, in_features = case.weight.shape
    rank = case.lora_A.shape[0]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=case.weight.double_quant, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    layer = Layer()
    tensors = quant_state_dict(case.weight)
    packed = tensors.pop("weight")
    stats = {k[len("weight."):]: v for k, v in tensors.items()}
    layer.proj.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device="cpu",
                                                            module=layer.proj)
    config = LoraConfig(r=rank, lora_alpha=case.scaling * rank, target_modules=["proj"], lora_dropout=0.0,
                        bias="none")
    model = get_peft_model(layer, config)
    lora = model.base_model.model.proj
    lora.lora_A["default"].weight.data = case.lora_A.to(torch.bfloat16).clone()
    lora.lora_B["default"].weight.data = case.lora_B.to(torch.bfloat16).clone()
    model.to(torch.bfloat16)
    params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    if case.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=case.lr, betas=(case.beta1, case.beta2), eps=case.eps,
                                weight_decay=case.weight_decay)
        for p, name in zip(params, "AB"):
            opt.state[p] = {"step": torch.tensor(float(case.step - 1)),
                            "exp_avg": case.states()[f"exp_avg_{name}"].to(torch.bfloat16).clone(),
                            "exp_avg_sq": case.states()[f"exp_avg_sq_{name}"].to(torch.bfloat16).clone()}
    else:
        opt = torch.optim.SGD(params, lr=case.lr, weight_decay=case.weight_decay)
    x = case.x.clone().requires_grad_(True)
    y = model(x)
    y.backward(case.dy)
    out = {"y": y.detach(), "dx": x.grad.detach(), "grad_A": params[0].grad.detach().clone(),
           "grad_B": params[1].grad.detach().clone()}
    opt.step()
    out["lora_A"], out["lora_B"] = params[0].detach().clone(), params[1].detach().clone()
    for p, name in zip(params, "AB"):
        st = opt.state.get(p, {})
        out[f"exp_avg_{name}"] = st.get("exp_avg", case.states()[f"exp_avg_{name}"]).detach().clone()
        out[f"exp_avg_sq_{name}"] = st.get("exp_avg_sq", case.states()[f"exp_avg_sq_{name}"]).detach().clone()
    return out
