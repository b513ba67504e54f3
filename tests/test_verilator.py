# amaranth: UnusedElaboratable=no
"""The Verilator backend against pysim and the golden models: the same outputs bit for bit (random and adversarial
inputs, random stalls on every stream), and without stalls the same cycle counts.

Each distinct configuration compiles one model (seconds to two minutes; cached in ``$EDGE_QLORA_CACHE``). The
whole driver-level suite runs on Verilator with ``EDGE_QLORA_SIM_BACKEND=verilator`` (see docs/verification.md).
"""

import numpy as np
import pytest
import torch
from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from edge_qlora.golden import gemm as golden_gemm
from edge_qlora.golden import lora, nf4_dequant, nf4_quant, nf4_span
from edge_qlora.rtl.gemm import GemmConfig
from edge_qlora.rtl.lora import LoraConfig
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig
from edge_qlora.sim import verilator
from edge_qlora.sim.gemm import run_gemm, run_gemm_jobs
from edge_qlora.sim.lora import run_step
from edge_qlora.sim.nf4 import run_dequantizer, run_span_scales
from edge_qlora.sim.nf4_quant import quantize_rtl
from edge_qlora.sim.streams import Stalls

from cases import adversarial, random_weights
from reference import mismatches

pytestmark = pytest.mark.skipif(not verilator.available(), reason=f"Verilator backend unavailable: "
                                                                   f"{verilator.unavailable_reason()}")


def stalls(names, seed, idle=0.35):
    return {name: Stalls(idle, seed * 31 + i) for i, name in enumerate(names)}


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantizer(double_quant):
    weights = [random_weights((300,), torch.bfloat16, 3), *adversarial(torch.float32, 64).values()]
    tensors = [nf4_quant.quantize(w, 64, double_quant) for w in weights]
    # and spans of whole blocks across the groups of 256 of a larger weight, each block with its own absmax2
    whole = nf4_quant.quantize(random_weights((70, 640), torch.bfloat16, 4), 64, double_quant)
    tensors[1:1] = [nf4_span.span(whole, slice(3, 40), slice(128, 192)), whole,
                    nf4_span.span(whole, slice(20, 26), slice(512, 640))]
    config = NF4DequantConfig(lanes=4, blocksize=64, out_dtype="bf16", double_quant=double_quant)
    names = ("tensor", "codes", "absmax", "absmax2", "weights")
    stalled = run_dequantizer(tensors, config, stalls=stalls(names, 1), backend="verilator")
    for q, values in zip(tensors, stalled.values):
        golden = nf4_dequant.dequantize(q, "bf16").reshape(-1)
        assert mismatches(golden, torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)) == 0
    fast = run_dequantizer(tensors[:1], config, backend="verilator")
    assert fast.cycles == run_dequantizer(tensors[:1], config, backend="pysim").cycles


def test_span_scales():
    """Each block of a span its group's absmax2, two weights' tables in turn, under stalls: as the golden model."""
    weights = [nf4_quant.quantize(random_weights(shape, torch.bfloat16, seed), 64, True)
               for seed, shape in ((5, (70, 640)), (6, (30, 640)))]
    cuts = [(slice(3, 40), slice(128, 192)), (slice(20, 26), slice(512, 640)), (slice(0, 30), slice(0, 640))]
    spans, expected = [], []
    for q in weights:
        for i, (rows, cols) in enumerate(cuts):
            where = nf4_span.span_blocks(q.shape, rows, cols, 64)
            spans.append((where, q.absmax2 if i == 0 else None))
            expected.append(nf4_span.span_absmax2(q.absmax2, where))
    run = run_span_scales(spans, 4, stalls=stalls(("span", "table", "absmax2"), 5), backend="verilator")
    for got, want in zip(run.values, expected):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_quantizer_back_to_back():
    """Two tensors through one run: the side-band ``n_weights``/``n_blocks``/``offset`` change between them."""
    weights = [*(w.to(torch.bfloat16) for w in adversarial(torch.bfloat16, 64).values()),
               random_weights((300,), torch.bfloat16, 4)]
    names = ("weights", "codes", "absmax", "absmax2")
    for weight in weights:
        ours, _ = quantize_rtl(weight, 64, True, lanes=4, stalls=stalls(names, 2), backend="verilator")
        golden = nf4_quant.quantize(weight, 64, True)
        assert np.array_equal(ours.packed, golden.packed)
        assert np.array_equal(ours.absmax, golden.absmax) and np.array_equal(ours.absmax2, golden.absmax2)
    _, fast = quantize_rtl(weights[1], 64, True, lanes=4, backend="verilator")
    _, slow = quantize_rtl(weights[1], 64, True, lanes=4, backend="pysim")
    assert fast == slow


@pytest.mark.parametrize("m,n,k,rows,cols,transposed,weights",
                         [c for c in golden_gemm.CYCLE_MODEL_CASES if (c[3], c[4]) in ((2, 2), (2, 4))])
def test_gemm_cycle_cases(m, n, k, rows, cols, transposed, weights):
    """The cycle-model cases: outputs equal the golden model; cycles equal pysim's."""
    a = golden_gemm.random_activations((m, n if transposed else k), seed=m + n)
    if weights == "nf4":
        w, dense = golden_gemm.random_nf4_weight((n, k), seed=k)
    else:
        w = dense = golden_gemm.random_activations((n, k), seed=k) * 0.05
    config = GemmConfig(rows=rows, cols=cols, max_k=max(k, 16), max_n=max(n, 16), weights=weights)
    b = dense if transposed else dense.T
    expected = golden_gemm.gemm(a.to(torch.bfloat16), b.to(torch.bfloat16), config.numerics, transposed)
    fast = run_gemm(a, w, config, transposed=transposed, backend="verilator")
    assert mismatches(expected, fast.out) == 0
    assert fast.cycles == run_gemm(a, w, config, transposed=transposed, backend="pysim").cycles


def test_gemm_jobs_with_stalls():
    # ordinary jobs both ways, then the same products as block jobs (the transposed one with its rows' exponents)
    w1, _ = golden_gemm.random_nf4_weight((9, 100), seed=1)
    w2, dense2 = golden_gemm.random_nf4_weight((12, 64), seed=2)
    x, dy = golden_gemm.random_activations((5, 100), seed=3), golden_gemm.random_activations((3, 12), seed=4)
    config = GemmConfig(rows=2, cols=4, max_k=128, max_n=512, weights="nf4")
    exponents = [int(e) for e in golden_gemm.row_chunk_exponents(dense2.float().numpy(), config.chunk_steps)]
    jobs = [(x, w1, False), (dy, w2, True), (x, w1, False, {"block"}), (dy, w2, True, {"block"}, exponents)]
    names = ("job", "a", "tensor", "codes", "absmax", "absmax2", "exponents", "c")
    fast = run_gemm_jobs(jobs, config, stalls=stalls(names, 3), backend="verilator")
    slow = run_gemm_jobs(jobs, config, stalls=stalls(names, 4), backend="pysim")
    for ours, theirs in zip(fast, slow):
        assert mismatches(ours.out, theirs.out) == 0
    assert mismatches(fast[0].out, fast[2].out) == 0 and mismatches(fast[1].out, fast[3].out) == 0


def test_step_equals_pysim_and_model():
    case = lora.random_case(3, 20, 12, 2, seed=5)
    config = LoraConfig(rows=2, cols=2, max_t=3, max_in=20, max_out=12, max_rank=2)
    fast = run_step(case, config, backend="verilator")
    slow = run_step(case, config, backend="pysim")
    assert fast.cycles == slow.cycles and fast.phase_cycles == slow.phase_cycles
    names = ("header", "x_in", "dy_in", "a_in", "b_in", "tensor", "codes", "absmax", "absmax2", "state_in",
             "y", "dx", "updates")
    stalled = run_step(case, config, stalls=stalls(names, 6), backend="verilator")
    model = lora.step_model(case, config.chunk)
    for name in lora.OUTPUT_NAMES:
        assert mismatches(model[name], fast.outputs[name]) == 0, name
        assert mismatches(model[name], stalled.outputs[name]) == 0, name


def test_cli_dequant_with_vcd(tmp_path):
    from edge_qlora.cli import main
    from edge_qlora.formats import save_quantized
    from safetensors.torch import load_file

    q = nf4_quant.quantize(random_weights((2, 64), torch.bfloat16, 7), 64, True)
    save_quantized(tmp_path / "q.safetensors", q)
    out, vcd = tmp_path / "w.safetensors", tmp_path / "run.vcd"
    assert main(["dequant", str(tmp_path / "q.safetensors"), str(out), "--backend", "verilator", "--lanes", "4",
                 "--vcd", str(vcd), "-q"]) == 0
    assert mismatches(nf4_dequant.dequantize(q, "bf16"), load_file(out)["weight"]) == 0
    text = vcd.read_text()
    assert "$enddefinitions" in text and "weights__valid" in text.replace("___05F", "__")


class _Increment(wiring.Component):
    """A stream of bytes, each plus one, through a register: a design that compiles in seconds."""

    def __init__(self):
        super().__init__({"i": In(stream.Signature(8)), "o": Out(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.i.ready):
            m.d.sync += [self.o.payload.eq(self.i.payload + 1), self.o.valid.eq(self.i.valid)]
        return m


def test_rtl_edit_that_leaves_the_verilog_compiles_nothing(tmp_path, monkeypatch):
    # an edit of the RTL sources exports the design again into a new folder, but its Verilog is the same, so the
    # compiled binary is found: nothing is compiled a second time
    monkeypatch.setenv("EDGE_QLORA_CACHE", str(tmp_path))
    first = verilator.VerilatorModel(_Increment, key="increment")
    beats, _, _ = verilator.run_model(first, {"i": [1, 2, 254]}, {"o": 3})
    assert beats["o"] == [2, 3, 255]
    monkeypatch.setattr(verilator, "_rtl_digest", lambda: "an edited RTL")
    edited = verilator.VerilatorModel(_Increment, key="increment")
    assert edited.folder != first.folder and edited.binary() == first.binary() and edited.binary().exists()
    monkeypatch.setattr(verilator.subprocess, "run", pytest.fail)     # no compile from here on
    assert verilator.run_model(edited, {"i": [7]}, {"o": 1})[0]["o"] == [8]
