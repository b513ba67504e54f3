"""The blocked forward product (rtl/blocked.py): its parts alone under random stalls, and the whole product
against the DRAM model: y equal to the golden product to the bit, every request in the order of
golden/blockprogram.py's forward_product, and the RTL's byte counters equal to that program's."""

import dataclasses

import numpy as np
import pytest
import torch
from amaranth.hdl import Elaboratable, Module
from amaranth.sim import Simulator

from edge_qlora.golden import gemm as golden
from edge_qlora.golden import nf4_dequant
from edge_qlora.golden.lora import random_case
from edge_qlora.rtl.blocked import SPAN, AbsmaxBuffer, BlockedConfig, SpanWalker, XBuffer, span_beat_layout
from edge_qlora.rtl.memport import MemPortConfig
from edge_qlora.sim import verilator
from edge_qlora.sim.blocked import blocked_config, run_blocked_product
from edge_qlora.sim.harness import pack_lanes, run_streams
from edge_qlora.sim.streams import Stalls, get

from reference import long_run_backend, mismatches


def _spans(t, d_in, d_out, tokens, features):
    """The loop nest the walkers follow, as dicts of span_beat_layout's fields."""
    out = []
    for t0 in range(0, t, tokens):
        nt = min(tokens, t - t0)
        for f0 in range(0, d_out, features):
            nf = min(features, d_out - f0)
            for s in range(d_in // SPAN):
                final = s == d_in // SPAN - 1
                out.append({"t0": t0, "nt": nt, "f0": f0, "nf": nf, "s": s, "first_t": int(f0 == 0 and s == 0),
                            "first_f": int(s == 0), "final": int(final),
                            "last": int(final and f0 + nf >= d_out and t0 + nt >= t)})
    return out


def _beat(fields):
    return span_beat_layout().const(fields).as_bits()


@pytest.mark.parametrize("shape", [(6, 192, 24, 4, 16), (8, 64, 8, 8, 8)])
def test_span_walker_walks_the_loop_nest(shape):
    # twice in a row (a second start after the first walk), ready withheld at random
    dut = SpanWalker()
    t, d_in, d_out, tokens, features = shape
    want = [_beat(f) for f in _spans(*shape)]
    got = []

    async def bench(ctx):
        for walk in range(2):
            ctx.set(dut.shape, {"t": t, "d_in": d_in, "d_out": d_out, "tokens": tokens, "features": features})
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            got.append(await get(ctx, dut.spans, len(want), Stalls(0.4, walk), max_cycles=20 * len(want)))
            for _ in range(5):                     # nothing more after the last span
                _, _, valid = await ctx.tick().sample(dut.spans.valid)
                assert not valid

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got == [want, want]


def _stalls(seed, names):
    return {name: Stalls(0.35, seed * 10 + i) for i, name in enumerate(names)}


def test_x_buffer_turns_token_rows_into_a_tiles():
    # three spans (token blocks of 6, 2 and 4 on a 2-row engine): each in token rows, out as A beats of one
    # reduction index of one tile; random stalls on all three streams
    config = BlockedConfig(rows=2, cols=2, max_tokens=6, max_features=2, max_in=64, max_groups=1)
    rng = np.random.default_rng(3)
    blocks = [rng.integers(0, 1 << 16, (nt, SPAN)) for nt in (6, 2, 4)]
    spans = [_beat({"t0": 0, "nt": len(b), "f0": 0, "nf": 2, "s": 0, "first_t": 1, "first_f": 1, "final": 1,
                    "last": 0}) for b in blocks]
    values = [int(v) for b in blocks for v in b.reshape(-1)]
    want = [v for b in blocks for tile in range(len(b) // 2)
            for v in pack_lanes(b[2 * tile:2 * tile + 2].T.reshape(-1), 2, 16)]
    beats, _ = run_streams(lambda: XBuffer(config), None, {"spans": spans, "values": values}, "a", len(want),
                           stalls=_stalls(1, ("spans", "values", "a")), max_cycles=20 * len(values),
                           backend="pysim")
    assert beats == want


def test_absmax_buffer_serves_a_column_per_span():
    # two feature blocks (3 and 2 W rows of 3 blocks): each loaded once, then served column s of its rows per span
    config = BlockedConfig(rows=2, cols=2, max_tokens=2, max_features=4, max_in=3 * SPAN, max_groups=1)
    rng = np.random.default_rng(4)
    blocks = [rng.integers(0, 256, (nf, 3)) for nf in (3, 2)]
    spans, want = [], []
    for f0, b in zip((0, 3), blocks):
        for s in range(3):
            spans.append(_beat({"t0": 0, "nt": 2, "f0": f0, "nf": len(b), "s": s, "first_t": 0,
                                "first_f": int(s == 0), "final": int(s == 2), "last": 0}))
            want += [int(v) for v in b[:, s]]
    codes = [int(v) for b in blocks for v in b.reshape(-1)]

    beats, _ = run_streams(lambda: _WithShape(AbsmaxBuffer(config), 3 * SPAN), None,
                           {"spans": spans, "codes": codes}, "absmax", len(want),
                           stalls=_stalls(2, ("spans", "codes", "absmax")), max_cycles=40 * len(want),
                           backend="pysim")
    assert beats == want


class _WithShape(Elaboratable):
    """An AbsmaxBuffer with its held ``shape.d_in`` tied to a constant, for run_streams (streams only)."""

    def __init__(self, dut, d_in):
        self.dut, self.d_in = dut, d_in
        self.spans, self.codes, self.absmax = dut.spans, dut.codes, dut.absmax

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = self.dut
        m.d.comb += self.dut.shape.d_in.eq(self.d_in)
        return m


def _adversarial(case):
    """x with a zero token row, an outlier input feature and a bf16 subnormal: the block-floating-point chunks
    must align as the golden model's do."""
    x = case.x.clone()
    x[1] = 0
    x[:, 5] *= 50
    x[0, 7] = torch.finfo(torch.bfloat16).tiny / 4
    return dataclasses.replace(case, x=x)


def _check(case, run, config):
    whole = nf4_dequant.dequantize(case.weight, "bf16")
    assert mismatches(golden.gemm(case.x, whole.T, config.gemm.numerics), run.y) == 0
    assert run.read_bytes == run.program_read_bytes
    assert run.written_bytes == run.program_written_bytes == case.x.shape[0] * case.dy.shape[1] * 2


RUN_STALLS = ("descriptor", "fill", "written", "report")


@pytest.mark.parametrize("memory, rows, cols, shape", [
    ("ulx3s-sdram", 2, 2, (4, 128, 16, 2, 8)),      # two token blocks, two feature blocks, two spans
    ("ecpix5-ddr3", 2, 4, (4, 128, 16, 4, 8)),      # 64-bit port words: four x values, sixteen codes a word
])
def test_blocked_product_equals_the_golden_product(memory, rows, cols, shape):
    # on Verilator where installed (pysim's cycles equal Verilator's: the test after the next)
    t, d_in, d_out, tokens, features = shape
    case = _adversarial(random_case(t, d_in, d_out, 4, seed=11))
    config = blocked_config(case, tokens, features, memory, rows, cols)
    run = run_blocked_product(case, tokens, features, config, memory=memory, stalls=_stalls(3, RUN_STALLS),
                              backend=long_run_backend())
    _check(case, run, config)
    assert run.stall_cycles["memory"] > 0


def test_blocked_product_with_partial_blocks():
    # the last token block and the last feature block shorter than the others (6 = 4 + 2 tokens, 24 = 16 + 8
    # features), three spans; on Verilator where installed (a longer run)
    case = random_case(6, 192, 24, 4, seed=12)
    config = blocked_config(case, 4, 16, "ulx3s-sdram")
    run = run_blocked_product(case, 4, 16, config, backend=long_run_backend())
    _check(case, run, config)


@pytest.mark.skipif(not verilator.available(), reason="Verilator is not installed")
def test_blocked_product_verilator_equals_pysim():
    case = random_case(4, 128, 16, 4, seed=13)
    config = blocked_config(case, 2, 8, "ulx3s-sdram")
    runs = [run_blocked_product(case, 2, 8, config, backend=backend) for backend in ("pysim", "verilator")]
    for run in runs:
        _check(case, run, config)
    assert runs[0].cycles == runs[1].cycles
    assert runs[0].stall_cycles == runs[1].stall_cycles


def test_rejects_what_it_cannot_run():
    case = random_case(4, 128, 16, 4, seed=14)
    config = blocked_config(case, 2, 8, "ulx3s-sdram")
    with pytest.raises(ValueError, match="multiples of rows"):
        run_blocked_product(case, 3, 8, config)
    with pytest.raises(ValueError, match="multiples of cols"):
        run_blocked_product(case, 2, 7, config)
    with pytest.raises(ValueError, match="exceed the buffers"):
        run_blocked_product(case, 4, 8, config)
    with pytest.raises(ValueError, match="double quantization"):
        run_blocked_product(random_case(4, 128, 16, 4, double_quant=False), 2, 8, config)
    with pytest.raises(ValueError, match="whole 64-bit port words"):
        BlockedConfig(rows=2, cols=2, port=MemPortConfig(data_width=64))
    with pytest.raises(ValueError, match="max_in must be a multiple of 64"):
        BlockedConfig(max_in=100)
