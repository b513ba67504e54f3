# amaranth: UnusedElaboratable=no
"""GEMM engine: the numerics contract against bitsandbytes-style bf16 software, the RTL against its bit-accurate
model, and the cycle model against the RTL."""

import re

import numpy as np
import pytest
import torch
from amaranth.back import rtlil

from edge_qlora.golden import gemm as golden
from edge_qlora.golden import nf4_dequant, nf4_quant
from edge_qlora.rtl.gemm import GemmConfig, GemmEngine
from edge_qlora.sim.gemm import block_jobs, run_blocked_gemm, run_gemm, run_gemm_jobs
from edge_qlora.sim.streams import Stalls

from reference import long_run_backend, mismatches

STREAMS = ("job", "a", "w", "c", "tensor", "codes", "absmax", "absmax2", "exponents")


activations = golden.random_activations
BF16_TINY = torch.finfo(torch.bfloat16).tiny   # the smallest normal bf16
nf4_weight = golden.random_nf4_weight


# --- numerics contract ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", golden.ACTIVATION_KINDS)
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_accuracy_contract(kind, transposed):
    """Relative Frobenius error against fp64 no worse than dequantize-to-bf16 + bf16 matmul, plus 10%."""
    for seed, (m, n, k) in enumerate(golden.CONTRACT_SHAPES):
        _, w = nf4_weight((n, k), seed)
        a = activations((m, n if transposed else k), seed, kind)
        b = w if transposed else w.T
        reference = golden.reference_fp64(a, b)
        software = golden.rel_frobenius(golden.bnb_style(a, b), reference)
        for out_dtype in ("bf16", "fp32"):
            ours = golden.gemm(a, b, golden.GemmNumerics(out_dtype=out_dtype), transposed)
            ours = golden.rel_frobenius(ours, reference)
            assert ours <= software * 1.1 + 1e-12, (kind, (m, n, k), out_dtype, ours, software)


def test_align_rounds_to_nearest_even():
    chunk = 8
    values = np.float32([1.0, 2.0 ** -9, 3 * 2.0 ** -10, 2.0 ** -10, -3 * 2.0 ** -10, 0, 0, 0])
    q, e = golden.align(values[None, :], chunk, axis=1)
    assert e.tolist() == [[0]]
    # 2**-9 is exactly 128 units; 3 * 2**-10 is 192; 2**-10 is 64: all exact at 17 magnitude bits
    assert q.tolist() == [[65536, 128, 192, 64, -192, 0, 0, 0]]
    q, _ = golden.align(np.float32([[1.0, 2.0 ** -17, 3 * 2.0 ** -17, 5 * 2.0 ** -17, -3 * 2.0 ** -17,
                                     2.0 ** -18]]), chunk, axis=1)
    assert q.tolist() == [[65536, 0, 2, 2, -2, 0]]    # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2, 0.25 -> 0


def test_numerics_checks():
    with pytest.raises(ValueError, match="chunk"):
        golden.GemmNumerics(chunk=4)
    with pytest.raises(ValueError, match="out_dtype"):
        golden.GemmNumerics(out_dtype="fp16")
    with pytest.raises(ValueError, match="multiplied"):
        golden.gemm(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 2, dtype=torch.bfloat16))


# --- RTL against the bit-accurate model -----------------------------------------------------------------------------

def random_stalls(seed):
    return {name: Stalls(0.3, seed * 10 + i) for i, name in enumerate(STREAMS)}


def check_rtl(m, n, k, rows, cols, transposed, weights="bf16", out_dtype="bf16", stalls=True, kind="normal",
              seed=0, double_quant=True, weight=None, convert_interval=1, backend=None):
    """Run one job on the RTL and compare with the model; ``weight`` (bf16, [N, K]) replaces the random one."""
    config = GemmConfig(rows=rows, cols=cols, max_k=max(k, 64), max_n=max(n, 64), weights=weights,
                        out_dtype=out_dtype, double_quant=double_quant, convert_interval=convert_interval)
    if weight is not None:
        source = w = weight
    elif weights == "nf4":
        source, w = nf4_weight((n, k), seed, double_quant)
    else:
        gen = torch.Generator().manual_seed(seed + 100)
        w = (torch.randn((n, k), generator=gen) * 0.05).to(torch.bfloat16)
        source = w
    a = activations((m, n if transposed else k), seed, kind)
    run = run_gemm(a, source, config, transposed=transposed, stalls=random_stalls(seed) if stalls else None,
                   backend=backend)
    expected = golden.gemm(a, w if transposed else w.T, config.numerics, transposed)
    assert run.out.shape == expected.shape
    assert mismatches(expected, run.out) == 0
    return run, config


@pytest.mark.parametrize("m,n,k,rows,cols", [
    (1, 7, 33, 3, 2),      # 1 x K activations
    (5, 1, 9, 2, 3),       # a single output feature
    (6, 9, 1, 2, 2),       # K = 1
    (2, 3, 5, 4, 4),       # smaller than the array everywhere
    (9, 11, 70, 4, 3),     # odd sizes, partial tiles and chunks
])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_rtl_shapes_bf16_weights(m, n, k, rows, cols, transposed):
    check_rtl(m, n, k, rows, cols, transposed, seed=m * 7 + k)


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_rtl_nf4_weights(transposed, double_quant):
    # K = 100: NF4 blocks of 64 run across W rows, the row aligner re-cuts them
    check_rtl(5, 9, 100, 2, 4, transposed, weights="nf4", double_quant=double_quant, seed=3)


@pytest.mark.parametrize("kind", ["outliers", "tiny", "sparse", "wide"])
def test_rtl_adversarial_activations(kind):
    check_rtl(4, 6, 40, 2, 3, kind == "wide", kind=kind, seed=5)


def edge_weight(n, k, chunk, seed):
    """bf16 weights whose shared exponents sit at the bottom of the range: the first ``chunk`` rows (a transposed
    tile) all subnormal, a row of zeros, a row whose first K chunk is all subnormal, the rest 60 binades wide."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((n, k), generator=gen) * torch.exp2(torch.randint(-30, 30, (n, k), generator=gen).float())
    # subnormals with their top fraction bit set: aligned to a shared exponent one too low, a forward chunk of them
    # leaves the operand range (a mutation test shows it; a transposed tile of them happens to stay exact)
    w[:chunk] = subnormals((chunk, k), gen)
    w[chunk] = 0
    w[chunk + 1, :chunk] = subnormals((chunk,), gen)
    return w.to(torch.bfloat16)


def subnormals(shape, gen):
    sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    return sign * (0.5 + 0.49 * torch.rand(shape, generator=gen)) * BF16_TINY


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_rtl_edge_weights(transposed):
    # the W writer's exponent tree compares raw exponent fields (0 for subnormals); its running maxima must lift a
    # chunk or tile of subnormals to -126, as the model does
    chunk = GemmConfig(rows=2, cols=3).chunk_steps
    w = edge_weight(40, 40, chunk, seed=11)
    assert (w[:chunk] != 0).any() and (w[:chunk].abs() < BF16_TINY).all()
    check_rtl(3, 40, 40, 2, 3, transposed, seed=12, weight=w)


@pytest.mark.parametrize("weights", ["bf16", "nf4"])
def test_rtl_jobs_back_to_back(weights):
    # every mode change between jobs: transposed after forward and forward after transposed, other shapes
    config = GemmConfig(rows=2, cols=2, max_k=64, max_n=64, weights=weights, out_dtype="fp32")
    jobs, expected = [], []
    for seed, (m, n, k, transposed) in enumerate([(3, 12, 20, True), (12, 2, 3, False), (5, 7, 9, False),
                                                  (4, 6, 10, True)]):
        if weights == "nf4":
            source, w = nf4_weight((n, k), seed)
        else:
            w = (torch.randn((n, k), generator=torch.Generator().manual_seed(seed)) * 0.1).to(torch.bfloat16)
            source = w
        a = activations((m, n if transposed else k), seed)
        jobs.append((a, source, transposed))
        expected.append(golden.gemm(a, w if transposed else w.T, config.numerics, transposed))
    runs = run_gemm_jobs(jobs, config, stalls=random_stalls(4))
    for run, reference in zip(runs, expected):
        assert mismatches(reference, run.out) == 0


# --- block jobs: the output-stationary mode -------------------------------------------------------------------------

def block_config(**kw):
    return GemmConfig(**{"rows": 2, "cols": 3, "max_k": 64, "max_n": 256, "held_tiles": 40, "weights": "bf16",
                         **kw})


@pytest.mark.parametrize("kind,out_dtype,transposed", [("normal", "bf16", False), ("tiny", "fp32", False),
                                                       ("normal", "bf16", True), ("outliers", "fp32", True)])
def test_rtl_block_jobs_over_spans_equal_one_job(kind, out_dtype, transposed):
    # blocks of 5 tokens x 7 features (partial A and W tiles), spans of two chunks with a short last one (a
    # reduction of 88): every output's chunks still add up in reduction order, so the whole is the one-job model's
    # to the bit. Transposed, the blocks are of W's columns, one of them 50 times larger: only the whole rows'
    # chunk exponents, given with the jobs, keep the blocks equal to the whole
    config = block_config(out_dtype=out_dtype)
    a = activations((11, 88), 21, kind)
    w = torch.randn((88, 10) if transposed else (10, 88), generator=torch.Generator().manual_seed(22)) * 0.05
    if transposed:
        w[:, 8] *= 50
    w = w.to(torch.bfloat16)
    run = run_blocked_gemm(a, w, config, token_block=5, feature_block=7, span=2 * config.chunk_steps,
                           transposed=transposed, stalls=random_stalls(2))
    assert mismatches(golden.gemm(a, w if transposed else w.T, config.numerics, transposed), run.out) == 0


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_rtl_nf4_block_jobs_stream_spans_of_whole_blocks(transposed):
    # NF4 W in the output-stationary schedule: each job streams its rectangle of whole blocks of 32 (a feature
    # block's rows by a span; transposed, a span of rows by a block of columns), every block with its own absmax2
    # beat; the blocks equal the one-job model of the whole dequantized W to the bit, an outlier column included
    config = block_config(cols=4, max_k=128, weights="nf4", blocksize=32, out_dtype="fp32")
    w = torch.randn((64, 64) if transposed else (10, 96), generator=torch.Generator().manual_seed(23)) * 0.05
    if transposed:
        w[:, 40] *= 50
    q = nf4_quant.quantize(w.to(torch.bfloat16), 32, True)
    a = activations((7, 64) if transposed else (11, 96), 24)
    run = run_blocked_gemm(a, q, config, token_block=5, feature_block=32 if transposed else 7, span=32,
                           transposed=transposed, stalls=random_stalls(5))
    whole = nf4_dequant.dequantize(q, "bf16")
    assert mismatches(golden.gemm(a, whole if transposed else whole.T, config.numerics, transposed), run.out) == 0
    with pytest.raises(ValueError, match="whole NF4 blocks of 32"):
        block_jobs(a, q, 5, 7 if transposed else 5, 16 if not transposed else 32, transposed, config.chunk_steps)


@pytest.mark.parametrize("weights", ["bf16", "nf4"])
def test_rtl_block_jobs_between_other_jobs(weights):
    # a token-stationary block job (whole K, W in one pass for 3 A tiles) after a transposed job and before a forward
    # one, and (bf16 W: spans of a sub-block need no NF4 blocks) three held/resumed spans between them: the modes
    # hand the buffers and the accumulator over cleanly
    config = block_config(weights=weights, out_dtype="fp32")
    if weights == "nf4":
        source, w = nf4_weight((7, 40), 8)
    else:
        w = source = (torch.randn((7, 40), generator=torch.Generator().manual_seed(8)) * 0.1).to(torch.bfloat16)
    x, dy = activations((6, 40), 9), activations((3, 7), 10)
    spans = block_jobs(x, w, 6, 7, config.chunk_steps)[0] if weights == "bf16" else []
    jobs = [(dy, source, True), (x, source, False, {"block"}), *spans, (x[:5], source, False)]
    runs = run_gemm_jobs(jobs, config, stalls=random_stalls(3))
    forward = golden.gemm(x, w.T, config.numerics, False)
    assert mismatches(golden.gemm(dy, w, config.numerics, True), runs[0].out) == 0
    assert mismatches(forward, runs[1].out) == 0
    if spans:
        assert [run.out is None for run in runs[2:-1]] == [True, True, False]
        assert mismatches(forward, runs[-2].out) == 0
    assert mismatches(forward[:5], runs[-1].out) == 0


@pytest.mark.parametrize("m,n,k,rows,cols,weights,transposed", [
    (16, 24, 128, 8, 8, "bf16", False), (12, 9, 100, 2, 4, "nf4", False), (16, 48, 40, 8, 8, "bf16", True)])
def test_block_job_cycle_model_within_2_percent(m, n, k, rows, cols, weights, transposed):
    config = block_config(rows=rows, cols=cols, max_k=128, max_n=1024, weights=weights, out_dtype="bf16")
    source, w = nf4_weight((n, k), 4) if weights == "nf4" else (None, None)
    if w is None:
        source = w = (torch.randn((n, k), generator=torch.Generator().manual_seed(4)) * 0.05).to(torch.bfloat16)
    a = activations((m, n if transposed else k), 4)
    exponents = [[int(e) for e in golden.row_chunk_exponents(w.float().numpy(), config.chunk_steps)]]
    run = run_gemm_jobs([(a, source, transposed, {"block"}, *(exponents if transposed else []))], config)[0]
    assert mismatches(golden.gemm(a, w if transposed else w.T, config.numerics, transposed), run.out) == 0
    model = golden.gemm_cycles(m, n, k, rows, cols, config.chunk_steps, transposed, weights, block=True)
    assert abs(model.cycles - run.cycles) <= 0.02 * run.cycles, (model.cycles, run.cycles)


def test_block_job_checks():
    config = block_config()
    x, w = torch.ones((6, 40), dtype=torch.bfloat16), torch.ones((7, 40), dtype=torch.bfloat16)
    for flags, match in [({"hold"}, "need a block job"), ({"block", "sideways"}, "unknown job flags"),
                         ({"block", "hold"}, "multiple of the chunk")]:
        with pytest.raises(ValueError, match=match):
            run_gemm_jobs([(x, w, False, flags)], config)
    dy = torch.ones((6, 7), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="only such a job, takes tile exponents"):
        run_gemm_jobs([(dy, w, True, {"block"})], config)
    with pytest.raises(ValueError, match="one exponent per 18 W rows: 1, not 2"):
        run_gemm_jobs([(dy, w, True, {"block"}, [0, 0])], config)
    with pytest.raises(ValueError, match="only such a job, takes tile exponents"):
        run_gemm_jobs([(x, w, False, {"block"}, [0])], config)
    with pytest.raises(ValueError, match="divisor of the span"):
        block_jobs(dy, w, 6, 7, 20, transposed=True, chunk=18)
    with pytest.raises(ValueError, match="buffer half holds"):
        run_gemm_jobs([(torch.ones((20, 64), dtype=torch.bfloat16), torch.ones((7, 64), dtype=torch.bfloat16),
                        False, {"block"})], config)
    with pytest.raises(ValueError, match="accumulator keeps"):
        run_gemm_jobs([(x[:, :32], torch.ones((90, 32), dtype=torch.bfloat16), False, {"block", "hold"})], config)


class BurstStalls(Stalls):
    """The consumer withholds ``ready`` for ``length`` cycles out of every ``period``: long enough to fill the
    output FIFO, so that the partial sums queued behind it reach the accumulator back to back."""

    def __init__(self, period, length):
        super().__init__(0.0)
        self.period, self.length, self.cycle = period, length, 0

    def stall(self):
        self.cycle += 1
        return self.cycle % self.period < self.length


@pytest.mark.parametrize("rows,n,k", [(1, 64, 20), (2, 40, 32), (3, 30, 40)])
def test_rtl_accumulator_hazards(rows, n, k):
    # K of 2-3 chunks and many output tiles: a long output stall fills the output FIFO, the partial sums queue up
    # behind it, and when it drains, partials of consecutive chunks for the same outputs (rows apart) reach the
    # accumulator in consecutive cycles, while the earlier one is still in the adder (without the hazard check,
    # 24 to 32 outputs of each case are wrong)
    config = GemmConfig(rows=rows, cols=2, max_k=128, max_n=64, weights="bf16")
    w = (torch.randn((n, k), generator=torch.Generator().manual_seed(rows)) * 0.05).to(torch.bfloat16)
    a = activations((2 * rows, k), rows)
    stalls = {**random_stalls(rows), "c": BurstStalls(600, 500)}
    stalls = {name: stall for name, stall in stalls.items() if name in ("a", "w", "c", "job")}
    run = run_gemm(a, w, config, stalls=stalls)
    assert mismatches(golden.gemm(a, w.T, config.numerics, False), run.out) == 0


def test_rtl_fp32_output():
    check_rtl(3, 5, 24, 2, 2, False, out_dtype="fp32", seed=9)
    check_rtl(3, 5, 24, 2, 2, True, out_dtype="fp32", seed=10)


@pytest.mark.parametrize("m,n,k,rows,cols,transposed,out_dtype", [
    (5, 7, 40, 2, 2, False, "bf16"), (6, 33, 20, 4, 4, True, "fp32"), (3, 12, 70, 3, 6, False, "fp32"),
])
def test_rtl_converters_shared(m, n, k, rows, cols, transposed, out_dtype):
    """``convert_interval=2``: each converter takes two columns in turn; bit-exact under random stalls, and no
    slower than the one-converter-per-column front on a job whose chunks are short."""
    shared, _ = check_rtl(m, n, k, rows, cols, transposed, out_dtype=out_dtype, seed=31, convert_interval=2)
    whole, _ = check_rtl(m, n, k, rows, cols, transposed, out_dtype=out_dtype, seed=31, stalls=False)
    alone, _ = check_rtl(m, n, k, rows, cols, transposed, out_dtype=out_dtype, seed=31, stalls=False,
                         convert_interval=2)
    assert alone.cycles <= whole.cycles * 1.05, (alone.cycles, whole.cycles)


def test_rtl_8x8_nf4():
    check_rtl(8, 16, 128, 8, 8, False, weights="nf4", stalls=False, seed=11)


# --- cycle model ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k,rows,cols,transposed,weights", golden.CYCLE_MODEL_CASES)
def test_cycle_model_within_2_percent(m, n, k, rows, cols, transposed, weights):
    backend = long_run_backend() if m * n * k > 50_000 else None       # the largest case
    run, config = check_rtl(m, n, k, rows, cols, transposed, weights=weights, stalls=False, seed=2, backend=backend)
    model = golden.gemm_cycles(m, n, k, rows, cols, config.chunk_steps, transposed, weights)
    assert abs(model.cycles - run.cycles) <= 0.02 * run.cycles, (model.cycles, run.cycles)


def test_utilization_goal_on_tinyllama_projections():
    # from the validated model: forward projections of TinyLlama, M = 16 .. 128, arrays 4x4, 8x8, 16x8
    for rows, cols in ((4, 4), (8, 8), (16, 8)):
        chunk = GemmConfig(rows=rows, cols=cols).chunk_steps
        for n, k in ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)):
            for m in (16, 32, 64, 128):
                assert golden.gemm_cycles(m, n, k, rows, cols, chunk, False, "nf4").utilization >= 0.9


def test_engine_hierarchy():
    """The parts are submodules of the engine, one level deep; the PE multipliers stay at ``array.pe_R_C_mult``,
    the names the DSP floorplan pins (``design.array.pe_R_C_mult`` once Yosys flattens the design)."""
    class ECP5:
        family = "ecp5"
    engine = GemmEngine(GemmConfig(rows=2, cols=3, max_k=16, max_n=16, weights="nf4"))
    text = rtlil.convert(engine, name="design", platform=ECP5())
    modules = dict(re.findall(r"^module \\(\S+)\n(.*?)^end$", text, re.M | re.S))
    for part in ("array", "dequantizer", "control", "a_writer", "w_writer", "sequencer", "accumulator"):
        assert f"design.{part}" in modules
    cells = re.findall(r"cell \\MULT18X18D \\(\S+)", modules["design.array"])
    assert sorted(cells) == sorted(f"pe_{r}_{c}_mult" for r in range(2) for c in range(3))
    assert [name for name, _, _ in engine.collisions] == ["a", "ea", "ew", "w0", "w1", "w2", "acc"]


def test_w_buffer_ram_marks_the_banks():
    """``w_buffer_ram="block"`` asks Yosys for block RAM (``ram_style``) for each bank of the W writer."""
    from amaranth.back import rtlil
    from edge_qlora.rtl.gemm.writers import WWriter
    for ram, marked in (("auto", 0), ("block", 2)):
        text = rtlil.convert(WWriter(GemmConfig(rows=2, cols=2, weights="bf16", w_buffer_ram=ram)), name="top")
        assert text.count('attribute \\ram_style "block"') == marked


def test_config_checks():
    with pytest.raises(ValueError, match="rows"):
        GemmConfig(rows=17)
    with pytest.raises(ValueError, match="cols"):
        GemmConfig(cols=0)
    with pytest.raises(ValueError, match="chunk"):
        GemmConfig(rows=8, cols=8, chunk=12)
    with pytest.raises(ValueError, match="weights"):
        GemmConfig(weights="int8")
    with pytest.raises(ValueError, match="convert_interval must be 1 or 2"):
        GemmConfig(cols=3, convert_interval=2)
    with pytest.raises(ValueError, match="w_buffer_ram must be 'auto' or 'block'"):
        GemmConfig(w_buffer_ram="lut")
    with pytest.raises(TypeError, match="config"):
        GemmEngine("8x8")
    with pytest.raises(ValueError, match="inner dimensions"):
        run_gemm(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 5, dtype=torch.bfloat16),
                 GemmConfig(rows=2, cols=2, weights="bf16"))


def test_backward_in_column_blocks_needs_the_whole_rows_exponents():
    """The blocked step's transposed product over blocks of W's columns equals the engine's over all of them, bit
    for bit, when each block takes the chunks' exponents of the whole W rows (``row_chunk_exponents``); with each
    block's own, an outlier column moves the others' results."""
    from edge_qlora.golden import gemm as g
    numerics = g.GemmNumerics(out_dtype="fp32")
    dy = g.random_activations((8, 64), seed=1)
    weight = torch.randn((64, 256), generator=torch.Generator().manual_seed(2)) * 0.02
    weight[:, 5] *= 50
    w = g.nf4_dequant.dequantize(g.nf4_quant.quantize(weight, 64, True), "bf16")
    whole = g.gemm(dy, w, numerics, transposed=True).numpy().view(np.int32)
    exps = g.row_chunk_exponents(g._bf16_values(w), numerics.chunk)

    def blocked(row_exponents):
        return np.concatenate([g.gemm(dy, w[:, c:c + 64], numerics, transposed=True,
                                      row_exponents=row_exponents).numpy() for c in range(0, 256, 64)],
                              axis=1).view(np.int32)

    assert (blocked(exps) == whole).all()
    assert (blocked(None) != whole).mean() > 0.5
    with pytest.raises(ValueError, match="backward mode"):
        g.gemm(dy, w, numerics, row_exponents=exps)
    with pytest.raises(ValueError, match="one exponent per chunk"):
        g.gemm(dy, w, numerics, transposed=True, row_exponents=exps[:-1])
