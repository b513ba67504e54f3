"""The blocked forward product (rtl/blocked.py): its parts alone under random stalls, and the whole product
against the DRAM model: y equal to the golden product to the bit, every request in the order of
golden/blockprogram.py's forward_product, and the RTL's byte counters equal to that program's."""

import dataclasses

import numpy as np
import pytest
import torch
from amaranth.sim import Simulator

from edge_qlora.golden import gemm as golden
from edge_qlora.golden import nf4_dequant, nf4_quant
from edge_qlora.golden.lora import random_case, step_model
from edge_qlora.golden.rank_gradient import x_chunk_fields
from edge_qlora.golden.rank_term import backward_rows, forward_rows
from edge_qlora.rtl.blocked import (SPAN, BlockedConfig, OutputTurn, SpanTable, SpanWalker, XBuffer, plan_layout,
                                   span_beat_layout, turn_layout)
from edge_qlora.rtl.memport import MemPortConfig
from edge_qlora.sim import verilator
from edge_qlora.sim.blocked import blocked_config, run_blocked_product
from edge_qlora.sim.harness import pack_lanes, run_streams
from edge_qlora.sim.streams import Stalls, get

from reference import long_run_backend, mismatches


def _spans(t, d_in, d_out, tokens, features, transposed=False):
    """The loop nest the walkers follow, as dicts of span_beat_layout's fields (transposed: the features are W's
    columns, the spans its rows)."""
    reduction, outputs = (d_out, d_in) if transposed else (d_in, d_out)
    out = []
    for t0 in range(0, t, tokens):
        nt = min(tokens, t - t0)
        for f0 in range(0, outputs, features):
            nf = min(features, outputs - f0)
            for s in range(reduction // SPAN):
                final = s == reduction // SPAN - 1
                out.append({"t0": t0, "nt": nt, "f0": f0, "nf": nf, "s": s, "first_t": int(f0 == 0 and s == 0),
                            "first_f": int(s == 0), "final": int(final),
                            "last": int(final and f0 + nf >= outputs and t0 + nt >= t)})
    return out


def _beat(fields):
    return span_beat_layout().const(fields).as_bits()


def _walk(shape, transposed, want, walks, seed, per=None):
    """The walker's beats in ``walks`` walks one after another (``per``: with grad_A's pass, that many of its spans
    after each span of the third block on), ready withheld at random; nothing more after each walk's last."""
    dut = SpanWalker()
    t, d_in, d_out, tokens, features = shape
    got = []

    async def bench(ctx):
        for walk in range(walks):
            ctx.set(dut.shape, {"t": t, "d_in": d_in, "d_out": d_out, "tokens": tokens, "features": features,
                                "transposed": int(transposed)})
            if per is not None:
                ctx.set(dut.x_pass, 1)
                ctx.set(dut.x_per_span, per)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            got.append(await get(ctx, dut.spans, len(want), Stalls(0.4, seed + walk), max_cycles=20 * len(want)))
            for _ in range(5):
                _, _, valid = await ctx.tick().sample(dut.spans.valid)
                assert not valid

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return got


@pytest.mark.parametrize("shape, transposed", [((6, 192, 24, 4, 16), False), ((8, 64, 8, 8, 8), False),
                                               ((6, 40, 192, 4, 16), True)])
def test_span_walker_walks_the_loop_nest(shape, transposed):
    # twice in a row (a second start after the first walk)
    want = [_beat(f) for f in _spans(*shape, transposed)]
    assert _walk(shape, transposed, want, 2, 0) == [want, want]


def _with_pass(spans, t, d_in, features, per):
    """The walk with grad_A's pass over x: ``per`` of its ``d_in / 64`` spans after each span from the third
    column block on, the rest after the product (``golden.blockprogram.backward_product``'s order)."""
    n, out, xs = d_in // SPAN, [], 0

    def passing(count, tail):
        nonlocal xs
        for _ in range(min(count, n - xs)):
            out.append({"t0": 0, "nt": t, "f0": d_in, "nf": 0, "s": xs, "final": int(xs == n - 1),
                        "last": int(xs == n - 1 and tail), "x_pass": 1})
            xs += 1

    for beat in spans:
        out.append(dict(beat, last=int(beat["last"] and xs == n)))
        if per and beat["f0"] > features:
            passing(per, False)
    passing(n, True)
    return out


@pytest.mark.parametrize("per, d_in", [(1, 320), (2, 384), (0, 192), (4, 320)])
def test_span_walker_walks_grad_as_pass(per, d_in):
    # the backward walk (one token block of 6, column blocks of 64) with the pass's spans: one or two after each
    # span of the third column block on, all after the product, and a run of four that the pass's end cuts short
    shape = (6, d_in, 128, 6, 64)
    want = [_beat(f) for f in _with_pass(_spans(*shape, True), 6, d_in, 64, per)]
    assert _walk(shape, True, want, 1, per, per) == [want]


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


def test_span_table_loads_and_serves_per_plan():
    # the forward absmax codes of two feature blocks (3 and 2 W rows of 3 blocks: loaded once each, column s of its
    # rows served per span); a transposed span's absmax words (4 rows of 4 codes loaded, codes 1 and 2 of each
    # served); two token blocks of a transposed product's chunk exponents (a table of 8, loaded per token block, 4
    # served per span); random stalls on all three streams
    rng = np.random.default_rng(4)
    blocks = [rng.integers(0, 256, (nf, 3)) for nf in (3, 2)]
    plans, values, want = [], [], []
    for b in blocks:
        for s in range(3):
            plans.append({"load": int(s == 0), "load_count": b.size, "start": s, "count": len(b), "width": 1,
                          "step": 3})
            want += [int(v) for v in b[:, s]]
        values += [int(v) for v in b.reshape(-1)]
    words = rng.integers(0, 256, (4, 4))
    plans.append({"load": 1, "load_count": 16, "start": 1, "count": 4, "width": 2, "step": 4})
    values += [int(v) for v in words.reshape(-1)]
    want += [int(v) for v in words[:, 1:3].reshape(-1)]
    for _ in range(2):
        table = rng.integers(0, 256, 8)
        for s in range(2):
            plans.append({"load": int(s == 0), "load_count": 8, "start": 4 * s, "count": 4, "width": 1, "step": 1})
            want += [int(v) for v in table[4 * s:4 * s + 4]]
        values += [int(v) for v in table]
    beats, _ = run_streams(lambda: SpanTable(16), None,
                           {"plans": [plan_layout().const(p).as_bits() for p in plans], "values": values}, "out",
                           len(want), stalls=_stalls(2, ("plans", "values", "out")), max_cycles=40 * len(want),
                           backend="pysim")
    assert beats == want


def test_output_turn_gives_token_rows():
    # two blocks (2 token tiles of 3 column tiles, then 1 of 2) on a 2x2 engine: each token tile's rows come column
    # tile by column tile and leave token row by token row; random stalls on all three streams
    config = BlockedConfig(rows=2, cols=2, max_tokens=4, max_features=8, max_in=64, max_groups=1, transposed=True,
                           max_out=64)
    rng = np.random.default_rng(5)
    jobs, beats_in, want = [], [], []
    for tiles, col_tiles in ((2, 3), (1, 2)):
        jobs.append(turn_layout().const({"tiles": tiles, "col_tiles": col_tiles}).as_bits())
        for _ in range(tiles):
            tile = rng.integers(0, 1 << 32, (col_tiles, 2))           # [column tile, row]: one beat each
            beats_in += [int(v) for v in tile.reshape(-1)]
            want += [int(v) for v in tile.T.reshape(-1)]
    beats, _ = run_streams(lambda: OutputTurn(config), None, {"jobs": jobs, "rows_in": beats_in}, "rows_out",
                           len(want), stalls=_stalls(6, ("jobs", "rows_in", "rows_out")), max_cycles=40 * len(want),
                           backend="pysim")
    assert beats == want


def _adversarial(case, name="x"):
    """The case's activation ``name`` (x, or dy) with a zero token row, an outlier feature and a bf16 subnormal:
    the block-floating-point chunks must align as the golden model's do."""
    a = getattr(case, name).clone()
    a[1] = 0
    a[:, 5] *= 50
    a[0, 7] = torch.finfo(torch.bfloat16).tiny / 4
    return dataclasses.replace(case, **{name: a})


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


@pytest.mark.parametrize("memory, rows, cols, shape", [
    ("ulx3s-sdram", 2, 2, (4, 128, 16, 2, 8)),      # two token blocks (hb made twice), two feature blocks
    ("ecpix5-ddr3", 2, 4, (4, 128, 16, 4, 8)),      # 64-bit port words: two values of A or B a word
])
def test_blocked_product_with_the_rank_term_writes_the_steps_y(memory, rows, cols, shape):
    # y = bf16(x W^T + s hb B^T) with hb made on chip from A as x passes and B read from memory: the step's y
    # (golden.lora.step_model) to the bit, with the adversarial x, an outlier in one of A's chunks and random
    # stalls; on Verilator where installed
    t, d_in, d_out, tokens, features = shape
    case = _adversarial(random_case(t, d_in, d_out, 4, seed=16))
    a = case.lora_A.clone()
    a[1, 70] = 40.0
    case = dataclasses.replace(case, lora_A=a, scaling=2.5)
    config = blocked_config(case, tokens, features, memory, rows, cols, rank_term=True)
    run = run_blocked_product(case, tokens, features, config, memory=memory, rank_term=True,
                              stalls=_stalls(5, RUN_STALLS), backend=long_run_backend())
    assert mismatches(step_model(case)["y"], run.y) == 0
    assert run.read_bytes == run.program_read_bytes
    assert run.read_bytes["lora_A"] == d_in * 4 * 4 * (t // tokens)
    assert run.read_bytes["lora_B"] == d_out * 4 * 4 * (t // tokens)
    assert run.written_bytes == run.program_written_bytes == t * d_out * 2
    # the term is there: without it y differs
    base = golden.gemm(case.x, nf4_dequant.dequantize(case.weight, "bf16").T,
                       golden.GemmNumerics(chunk=config.gemm.chunk_steps))
    assert mismatches(base, run.y) > 0


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


def _backward_case(t, d_in, d_out, seed):
    """A case whose dy is adversarial (as x above) and whose W has an outlier column past its first 192: only the
    whole rows' chunk exponents keep each column block's chunks aligned as the whole product's."""
    case = _adversarial(random_case(t, d_in, d_out, 4, seed=seed), "dy")
    w = nf4_dequant.dequantize(case.weight, "bf16").float()
    w[:, 200] *= 50
    return dataclasses.replace(case, weight=nf4_quant.quantize(w.to(torch.bfloat16), SPAN, True))


@pytest.mark.parametrize("memory, rows, cols, shape", [
    # two token blocks; column blocks of 192 and 64, whose absmax codes (3 and 1 per W row) start mid-word on the
    # 16-bit port; two spans of 64 W rows
    ("ulx3s-sdram", 2, 2, (4, 256, 128)),
    # 64-bit port words: column blocks of 192, 192 and 128 whose codes start 0, 3 and 6 codes into a word (the last
    # row's window crossing into the next word); one span
    ("ecpix5-ddr3", 2, 4, (4, 512, 64)),
])
def test_blocked_backward_product_equals_the_golden_product(memory, rows, cols, shape):
    # dx = dy W in blocks of 2 tokens x 192 columns of W, with random stalls; on Verilator where installed
    t, d_in, d_out = shape
    case = _backward_case(t, d_in, d_out, 15)
    config = blocked_config(case, 2, 192, memory, rows, cols, transposed=True)
    run = run_blocked_product(case, 2, 192, config, memory=memory, transposed=True, stalls=_stalls(4, RUN_STALLS),
                              backend=long_run_backend())
    whole = nf4_dequant.dequantize(case.weight, "bf16")
    assert mismatches(golden.gemm(case.dy, whole, config.gemm.numerics, transposed=True), run.y) == 0
    assert run.read_bytes == run.program_read_bytes
    assert run.written_bytes == run.program_written_bytes == t * d_in * 2
    # the column blocks' own exponents would not do: the outlier column's block shifts the first block's chunks
    first = golden.gemm(case.dy, whole[:, :192], config.gemm.numerics, transposed=True)
    assert mismatches(first, run.y[:, :192]) > 0


@pytest.mark.parametrize("memory, rows, cols, shape", [
    ("ulx3s-sdram", 2, 2, (4, 256, 128)),       # two token blocks (gb made twice), column blocks of 192 and 64
    ("ecpix5-ddr3", 2, 4, (4, 512, 64)),        # column blocks of 192, 192 and 128
])
def test_blocked_backward_product_with_the_rank_term_writes_the_steps_dx(memory, rows, cols, shape):
    # dx = bf16(dy W + s gb A) with gb made on chip from B as dy passes and A read from memory (A's rows as they
    # lie, one job each): the step's dx (golden.lora.step_model) to the bit, with the adversarial dy, W's outlier
    # column and random stalls; an outlier in A past the first column block, so that its exponent (the
    # descriptor's) must be A's over all of A; and one in a row of B, whose chunk of 16 rows shares it over all of
    # B's columns; on Verilator where installed
    t, d_in, d_out = shape
    case = _backward_case(t, d_in, d_out, 17)
    a = case.lora_A.clone()
    a[0, 200] = 40.0
    b = case.lora_B.clone()
    b[20, 1] = 30.0
    case = dataclasses.replace(case, lora_A=a, lora_B=b, scaling=-1.5)
    config = blocked_config(case, 2, 192, memory, rows, cols, transposed=True, rank_term=True)
    run = run_blocked_product(case, 2, 192, config, memory=memory, transposed=True, rank_term=True,
                              stalls=_stalls(6, RUN_STALLS), backend=long_run_backend())
    assert mismatches(step_model(case)["dx"], run.y) == 0
    assert run.read_bytes == run.program_read_bytes
    assert run.read_bytes["lora_B"] == d_out * 4 * 4 * (t // 2) and run.read_bytes["lora_A"] == d_in * 4 * 4 * (t // 2)
    assert run.written_bytes == run.program_written_bytes == t * d_in * 2


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
    with pytest.raises(ValueError, match="no transposed mode"):
        run_blocked_product(case, 2, 8, config, transposed=True)
    wide = random_case(4, 256, 128, 4, seed=14)
    with pytest.raises(ValueError, match="whole NF4 blocks of 64"):
        run_blocked_product(wide, 2, 96, blocked_config(wide, 2, 128, "ulx3s-sdram", transposed=True),
                            transposed=True)
    with pytest.raises(ValueError, match="rank must be 0 .no rank-r term. or a power of two up to 16"):
        BlockedConfig(rank=3)
    with pytest.raises(ValueError, match=r"the configuration's rank \(0\) must be the case's \(4\)"):
        run_blocked_product(case, 2, 8, config, rank_term=True)


@pytest.mark.parametrize("memory, rows, cols, shape, features", [
    # one token block of 18 (a chunk of 16 tokens and one of 2); six column blocks of 64: one of x's six spans
    # after each span of the third to fifth
    ("ulx3s-sdram", 2, 2, (18, 384, 128), 64),
    # two column blocks: the pass after the product
    ("ulx3s-sdram", 2, 2, (18, 256, 128), 192),
    # column blocks of 192, 192 and 128, the last one span, followed by x's eight spans; 64-bit port words
    ("ecpix5-ddr3", 2, 4, (4, 512, 64), 192),
])
def test_blocked_backward_product_with_the_gradients_writes_the_steps_grad_b_and_grad_a(memory, rows, cols, shape,
                                                                                      features):
    # the backward product with its rank-r term also writes grad_B = s dy^T hb, made as the second column block's
    # dy passes, with hb read from memory, and gb; and grad_A = s gb^T x in a pass over x (beside the later column
    # blocks, or after the product) with gb and x's chunk fields read back: the step's grad_B, grad_A and gb
    # (golden.lora.step_model) to the bit, with the adversarial dy and x (a zero row, an outlier feature, a
    # subnormal) and random stalls; dx as without it; the byte counters equal the program's; on Verilator where
    # installed
    t, d_in, d_out = shape
    case = _adversarial(_backward_case(t, d_in, d_out, 18))
    x = case.x.clone()
    x[:, 200] *= 1000                  # an outlier past x's first span: it sets every chunk's field over all columns
    case = dataclasses.replace(case, x=x, scaling=0.75)
    config = blocked_config(case, t, features, memory, rows, cols, transposed=True, rank_term=True, gradient=True)
    run = run_blocked_product(case, t, features, config, memory=memory, transposed=True, rank_term=True,
                              stalls=_stalls(7, RUN_STALLS), backend=long_run_backend())
    step = step_model(case)
    assert mismatches(step["dx"], run.y) == 0
    assert np.array_equal(run.grad_B.numpy().view(np.uint32), step["grad_B"].numpy().view(np.uint32))
    assert np.array_equal(run.grad_A.numpy().view(np.uint32), step["grad_A"].numpy().view(np.uint32))
    assert mismatches(backward_rows(case), run.gb) == 0
    assert run.read_bytes == run.program_read_bytes
    assert run.read_bytes["hb+gb"] == 2 * t * 4 * 2
    # dx, grad_B, gb and grad_A
    assert run.written_bytes == run.program_written_bytes == t * d_in * 2 + d_out * 4 * 4 + t * 4 * 2 + 4 * d_in * 4


@pytest.mark.parametrize("memory, rows, cols", [("ulx3s-sdram", 2, 2), ("ecpix5-ddr3", 2, 4)])
def test_blocked_forward_product_with_the_gradient_writes_hb(memory, rows, cols):
    # the design with the gradient, run forward: y as without it, and hb (made on chip) written for the backward
    # product's grad_B: the step's hb to the bit; on Verilator where installed
    case = _adversarial(random_case(18, 128, 16, 4, seed=20))
    config = blocked_config(case, 18, 8, memory, rows, cols, transposed=True, rank_term=True, gradient=True)
    run = run_blocked_product(case, 18, 8, config, memory=memory, rank_term=True, stalls=_stalls(8, RUN_STALLS),
                              backend=long_run_backend())
    assert mismatches(step_model(case)["y"], run.y) == 0
    assert mismatches(forward_rows(case), run.hb) == 0
    # and x's chunk fields over all its columns, which grad_A will take: two chunks of 16 tokens, padded to a word
    assert list(run.x_fields) == list(x_chunk_fields(case.x)) + [0, 0]
    assert run.read_bytes == run.program_read_bytes
    fields = 8 if memory == "ecpix5-ddr3" else 4                 # one 32-bit word in whole port words
    assert run.written_bytes == run.program_written_bytes == 18 * 16 * 2 + 18 * 4 * 2 + fields


def test_the_gradient_refuses_what_it_cannot_run():
    case = _backward_case(4, 256, 128, 19)
    with pytest.raises(ValueError, match=r"needs the rank-r term \(rank 2 or more\)"):
        blocked_config(case, 4, 192, transposed=True, gradient=True)
    config = blocked_config(case, 4, 192, transposed=True, rank_term=True, gradient=True)
    with pytest.raises(ValueError, match="all t .4. tokens in one token block .2."):
        run_blocked_product(case, 2, 192, config, transposed=True, rank_term=True)
    with pytest.raises(ValueError, match="x's chunk fields take all t .4. tokens in one token block .2."):
        run_blocked_product(case, 2, 64, config, rank_term=True)
    with pytest.raises(ValueError, match="a second column block"):
        run_blocked_product(case, 4, 256, dataclasses.replace(config, max_features=256), transposed=True,
                            rank_term=True)
