"""PyTorch integration: QLoRALinear in place of PEFT + bitsandbytes Linear4bit, trained for a few steps; the loss
curve against PEFT's, the pysim backend against the golden one, and the adapter loaded back by PEFT."""

import logging

import numpy as np
import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from edge_qlora.formats import quant_state_dict  # noqa: E402
from edge_qlora.golden.nf4_quant import quantize  # noqa: E402
from edge_qlora.qlora import QLoRALinear, export_peft_adapter  # noqa: E402

RANK, ALPHA = 4, 8
# widths that are whole NF4 blocks: bitsandbytes 0.50's AVX-512 kernel is wrong otherwise (see README)
SIZES = (64, 128, 32)


class TinyMLP(torch.nn.Module):
    """Two NF4 linear layers with a ReLU between them, built locally from given float weights."""

    def __init__(self, weights):
        super().__init__()
        self.fc1 = self._nf4(weights[0])
        self.fc2 = self._nf4(weights[1])

    @staticmethod
    def _nf4(weight):
        out_features, in_features = weight.shape
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4")
        tensors = quant_state_dict(quantize(weight, 64, True))
        packed = tensors.pop("weight")
        stats = {k[len("weight."):]: v for k, v in tensors.items()}
        layer.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device="cpu",
                                                           module=layer)
        return layer

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class HardwareMLP(torch.nn.Module):
    """The same network with QLoRALinear layers."""

    def __init__(self, weights, inits, backend="golden"):
        super().__init__()
        self.fc1 = QLoRALinear(quantize(weights[0], 64, True), RANK, ALPHA / RANK, backend=backend, rows=2, cols=2,
                               lora_a=inits["fc1"][0], lora_b=inits["fc1"][1])
        self.fc2 = QLoRALinear(quantize(weights[1], 64, True), RANK, ALPHA / RANK, backend=backend, rows=2, cols=2,
                               lora_a=inits["fc2"][0], lora_b=inits["fc2"][1])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(SIZES[1], SIZES[0], generator=gen) * 0.2, torch.randn(SIZES[2], SIZES[1], generator=gen) * 0.2]
    x = torch.randn(64, SIZES[0], generator=gen)
    teacher = torch.randn(SIZES[2], SIZES[0], generator=gen) * 0.3
    return weights, x, x @ teacher.T


def peft_model(weights, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(TinyMLP(weights), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["fc1", "fc2"],
                                                       lora_dropout=0.0, bias="none"))
    for name in ("fc1", "fc2"):   # start B non-zero so that both factors learn from the first step
        torch.nn.init.normal_(getattr(model.base_model.model, name).lora_B["default"].weight, std=0.05)
    return model


def lora_weights(model):
    return {name: (getattr(model.base_model.model, name).lora_A["default"].weight.detach().float().clone(),
                   getattr(model.base_model.model, name).lora_B["default"].weight.detach().float().clone())
            for name in ("fc1", "fc2")}


def train(model, x, y, steps, dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_peft():
    weights, x, y = problem()
    reference = peft_model(weights)
    inits = lora_weights(reference)
    reference.to(torch.bfloat16)
    peft_losses = train(reference, x, y, 8, torch.bfloat16)
    ours = HardwareMLP(weights, inits)
    our_losses = train(ours, x, y, 8, torch.bfloat16)
    assert our_losses[-1] < 0.8 * our_losses[0] and peft_losses[-1] < 0.8 * peft_losses[0]
    np.testing.assert_allclose(our_losses, peft_losses, rtol=0.03)


def test_pysim_backend_equals_golden():
    # a smaller network: every product runs on the RTL engine in Amaranth's simulator
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(12, 8, generator=gen) * 0.2, torch.randn(6, 12, generator=gen) * 0.2]
    x, y = torch.randn(3, 8, generator=gen), torch.randn(3, 6, generator=gen)
    inits = {"fc1": (torch.randn(RANK, 8, generator=gen) * 0.1, torch.randn(12, RANK, generator=gen) * 0.1),
             "fc2": (torch.randn(RANK, 12, generator=gen) * 0.1, torch.randn(6, RANK, generator=gen) * 0.1)}
    grads = {}
    for backend in ("golden", "pysim"):
        model = HardwareMLP(weights, inits, backend)
        out = model(x.to(torch.bfloat16))
        torch.nn.functional.mse_loss(out.float(), y).backward()
        grads[backend] = (out.detach(), model.fc1.lora_A.grad.clone(), model.fc2.lora_B.grad.clone())
    for a, b in zip(grads["golden"], grads["pysim"]):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b)


def test_adapter_loads_in_peft(tmp_path):
    weights, x, y = problem(2)
    inits = lora_weights(peft_model(weights, 2))
    ours = HardwareMLP(weights, inits)
    train(ours, x, y, 3, torch.bfloat16)
    export_peft_adapter(TinyMLP(weights), {"fc1": ours.fc1, "fc2": ours.fc2}, str(tmp_path), RANK, ALPHA)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(TinyMLP(weights), str(tmp_path))
    for name in ("fc1", "fc2"):
        layer = getattr(loaded.base_model.model, name)
        assert torch.equal(layer.lora_A["default"].weight.float(), getattr(ours, name).lora_A.detach())
        assert torch.equal(layer.lora_B["default"].weight.float(), getattr(ours, name).lora_B.detach())
    with torch.no_grad():
        ours_out = ours(x[:4].to(torch.bfloat16)).float()
        peft_out = loaded.to(torch.bfloat16)(x[:4].to(torch.bfloat16)).float()
    assert torch.allclose(ours_out, peft_out, rtol=0.05, atol=0.05)


def test_layer_checks():
    with pytest.raises(TypeError, match="NF4Quantized"):
        QLoRALinear(torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="backend"):
        QLoRALinear(quantize(torch.ones(4, 4), 64, True), 2, backend="cuda")


def test_quantize_linear_widths():
    from edge_qlora.golden.codebook import Codebook
    from edge_qlora.qlora import quantize_linear
    w = problem()[0][0]
    old = quantize_linear(w, 64, True)          # the NF4 call as before: bitsandbytes' format
    assert old.is_nf4 and np.array_equal(old.packed, quantize(w, 64, True).packed)
    assert quantize_linear(w, 64, False, bits=2).bits == 2
    table = Codebook(np.linspace(-1, 1, 8))
    assert quantize_linear(w, codebook=table).codebook == table


@pytest.mark.parametrize("bits", [2, 3])
def test_sub4bit_weight_golden(bits):
    """A 2- or 3-bit weight runs on the golden engine: forward and LoRA gradients as float math on its bf16
    dequantized weight, within the engine's rounding."""
    from edge_qlora.golden.codebook import dequantize
    from edge_qlora.qlora import quantize_linear
    weights, x, _ = problem(3)
    q = quantize_linear(weights[0], bits=bits)
    gen = torch.Generator().manual_seed(bits)
    a, b = torch.randn(RANK, SIZES[0], generator=gen) * 0.1, torch.randn(SIZES[1], RANK, generator=gen) * 0.1
    layer = QLoRALinear(q, RANK, ALPHA / RANK, lora_a=a, lora_b=b)
    out = layer(x.to(torch.bfloat16))
    out.float().square().sum().backward()
    w = dequantize(q, "bf16").float()
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    xr = x.to(torch.bfloat16).float()
    ref = xr @ w.T + ALPHA / RANK * (xr @ ra.T) @ rb.T
    ref.square().sum().backward()
    torch.testing.assert_close(out.float(), ref.detach(), rtol=0.02, atol=0.05)
    torch.testing.assert_close(layer.lora_A.grad, ra.grad, rtol=0.03, atol=0.03 * ra.grad.abs().max().item())
    torch.testing.assert_close(layer.lora_B.grad, rb.grad, rtol=0.03, atol=0.03 * rb.grad.abs().max().item())
    for backend in ("pysim", "verilator"):
        with pytest.raises(ValueError, match="NF4 dequantizer only"):
            QLoRALinear(q, RANK, backend=backend)
