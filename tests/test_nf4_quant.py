# amaranth: UnusedElaboratable=no
"""NF4 quantizer: golden model against bitsandbytes, and the RTL against the golden model."""

import numpy as np
import pytest
import torch

from edge_qlora.golden import nf4_quant
from edge_qlora.constants import DYNAMIC_CODE, NF4_CODE

from cases import DTYPES, adversarial, random_weights
from reference import bnb_quantize, mismatches

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


# --- RTL ------------------------------------------------------------------------------------------------------------

from amaranth.sim import Simulator  # noqa: E402

from edge_qlora.rtl.nf4_quant import NF4QuantConfig, NF4Quantizer  # noqa: E402
from edge_qlora.sim.harness import pack_lanes  # noqa: E402
from edge_qlora.sim.nf4_quant import quantize_rtl, run_quantizer  # noqa: E402
from edge_qlora.sim.streams import Stalls, get, put  # noqa: E402

STREAMS = ("weights", "codes", "absmax", "absmax2")


def random_stalls(seed, idle=0.3):
    return {name: Stalls(idle, seed * 10 + i) for i, name in enumerate(STREAMS)}


def check_quantizer(weights, config, seed):
    """The RTL quantizer against the golden model, tensors back to back, with random stalls on every stream.

    ``run_quantizer`` itself checks the beat counts, the ``last`` flags and that padded lanes carry code 7; the
    bit-exact comparison of every code and absmax catches anything lost, duplicated or reordered.
    """
    if not isinstance(weights, dict):
        weights = {f"tensor {i}": weight for i, weight in enumerate(weights)}
    runs = run_quantizer(list(weights.values()), config, stalls=random_stalls(seed))
    assert len(runs) == len(weights)
    for (name, weight), run in zip(weights.items(), runs):
        golden = nf4_quant.quantize(weight, config.blocksize, double_quant=False)
        assert mismatches(golden.packed, run.packed) == 0, name
        assert mismatches(golden.absmax, run.absmax) == 0, name


def bnb_mismatches(weight, quantized):
    """Mismatch counts between bitsandbytes and an :class:`NF4Quantized` for every output of ``quantize_4bit``."""
    packed, state = bnb_quantize(weight, quantized.blocksize, quantized.double_quant)
    counts = {"packed": mismatches(packed.reshape(-1).numpy(), quantized.packed)}
    if quantized.double_quant:
        counts["absmax_codes"] = mismatches(state.absmax.numpy(), quantized.absmax)
        counts["offset"] = mismatches(np.float32(state.offset.item()).reshape(1),
                                      np.float32(quantized.offset).reshape(1))
        counts["absmax2"] = mismatches(state.state2.absmax, torch.from_numpy(quantized.absmax2))
    else:
        counts["absmax"] = mismatches(state.absmax, torch.from_numpy(quantized.absmax))
    return counts


@pytest.mark.parametrize("lanes,dtype,blocksize", [
    (1, "fp32", 32), (3, "fp16", 64), (3, "bf16", 256), (8, "bf16", 128), (8, "fp16", 32), (16, "bf16", 256),
    (16, "fp32", 32),
])
def test_rtl_random(lanes, dtype, blocksize):
    # three tensors back to back: neither size a multiple of the block or of the lanes, one below a block
    sizes = [3 * blocksize + 2 * lanes + 1, blocksize // 2 + 3, blocksize + 7]
    weights = [random_weights((n,), DTYPES[dtype], seed) for seed, n in enumerate(sizes)]
    check_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype), seed=lanes)


@pytest.mark.parametrize("dtype,lanes,blocksize", [("fp32", 3, 32), ("fp16", 16, 32), ("bf16", 8, 64)])
def test_rtl_adversarial(dtype, lanes, blocksize):
    # every case, back to back through one core (each has a partial final block and an odd size)
    cases = {}
    for name, weight in adversarial(DTYPES[dtype], blocksize).items():
        try:
            nf4_quant.quantize(weight, blocksize, double_quant=False)
        except ValueError:
            continue  # refused by the golden model (and by the software layer in front of the RTL)
        cases[name] = weight
    assert len(cases) >= 12
    check_quantizer(cases, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype), seed=blocksize)


@pytest.mark.parametrize("lanes,dtype", [(3, "fp16"), (16, "bf16")])
def test_rtl_tiny_tensors_back_to_back(lanes, dtype):
    # sizes around the lanes and the block: a tail of one weight sharing a beat with the end of a full block
    # closes two blocks in one beat; a one-weight tensor is all tail
    blocksize = 32
    sizes = [1, 2, lanes - 1 or 1, lanes, lanes + 1, blocksize - 1, blocksize, blocksize + 1, 2 * blocksize + 1, 1]
    weights = [random_weights((n,), DTYPES[dtype], seed) for seed, n in enumerate(sizes)]
    check_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype), seed=lanes + 1)


@pytest.mark.parametrize("lanes,blocks", [(1, 16), (8, 64), (16, 128)])
def test_rtl_sustains_lanes_per_cycle(lanes, blocks, record_property):
    # whole blocks, no stalls: after the pipeline fills (a block, then the reciprocal), one beat per cycle
    blocksize = 64
    weight = random_weights((blocks * blocksize,), DTYPES["bf16"], 2)
    run = run_quantizer(weight, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype="bf16"))
    golden = nf4_quant.quantize(weight, blocksize, double_quant=False)
    assert mismatches(golden.packed, run.packed) == 0
    beats = weight.numel() // lanes
    rate = weight.numel() / run.cycles
    record_property("weights_per_cycle", round(rate, 3))
    print(f"lanes {lanes}: {weight.numel()} weights in {run.cycles} cycles, {rate:.3f} weights/cycle")
    assert run.cycles <= beats + blocksize // lanes + 64


def test_rtl_tail_flows_one_weight_per_cycle():
    # the tail block divides each weight: after its absmax (an am / 1 through the divider), one weight per cycle
    blocksize, lanes, tail = 64, 8, 63
    config = NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype="bf16")
    whole = run_quantizer(random_weights((8 * blocksize,), DTYPES["bf16"], 3), config)
    weight = random_weights((8 * blocksize + tail,), DTYPES["bf16"], 3)
    run = run_quantizer(weight, config)
    assert mismatches(nf4_quant.quantize(weight, blocksize, double_quant=False).packed, run.packed) == 0
    print(f"a tail of {tail} weights costs {run.cycles - whole.cycles} cycles")
    assert run.cycles - whole.cycles <= tail + 32


@pytest.mark.parametrize("shape,dtype,blocksize,double_quant,lanes", [
    ((33, 65), "bf16", 64, True, 8),
    ((7, 63), "fp32", 32, False, 3),
    ((129,), "fp16", 128, True, 16),
    ((5, 300), "bf16", 256, False, 16),
    ((97, 100), "bf16", 32, True, 16),     # 304 blocks: two groups of double quantization
])
def test_quantize_rtl_against_bitsandbytes(shape, dtype, blocksize, double_quant, lanes):
    weight = random_weights(shape, DTYPES[dtype], sum(shape))
    quantized, cycles = quantize_rtl(weight, blocksize, double_quant, lanes=lanes, stalls=random_stalls(lanes))
    assert quantized.shape == shape and quantized.dtype == dtype and quantized.blocksize == blocksize
    assert set(cycles) == ({"quantizer", "absmax_quantizer"} if double_quant else {"quantizer"})
    counts = bnb_mismatches(weight, quantized)
    assert counts == dict.fromkeys(counts, 0)
    golden = nf4_quant.quantize(weight, blocksize, double_quant)
    for field in ("packed", "absmax", "absmax2"):
        if getattr(golden, field) is not None:
            assert mismatches(getattr(golden, field), getattr(quantized, field)) == 0, field


def test_quantize_rtl_refuses_bad_input():
    weight = torch.ones(100)
    weight[37] = float("nan")
    with pytest.raises(ValueError, match="flat index 37"):
        quantize_rtl(weight)
    with pytest.raises(ValueError, match="dtype"):
        quantize_rtl(torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        quantize_rtl(torch.ones(0))
    with pytest.raises(ValueError, match="in_dtype"):
        run_quantizer(torch.ones(64), NF4QuantConfig(in_dtype="bf16"))


def test_rtl_survives_non_finite_weights():
    # the software refuses NaN/Inf, but the core must not hang on them: the next tensor still comes out right
    config = NF4QuantConfig(lanes=4, blocksize=32, in_dtype="fp32")
    bad = torch.randn(75)
    bad[[3, 40, 70]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    good = random_weights((70,), torch.float32, 5)
    dut = NF4Quantizer(config)
    tensors = [bad, good]
    beats = [pack_lanes(t.view(torch.int32).numpy().view(np.uint32), 4, 32) for t in tensors]
    stalls = random_stalls(9)

    async def feed(ctx):
        for tensor, tensor_beats in zip(tensors, beats):
            ctx.set(dut.n_weights, tensor.numel())
            await put(ctx, dut.weights, tensor_beats, stalls["weights"])

    absmax = []

    async def collect(ctx):
        absmax.extend(await get(ctx, dut.absmax, 3 + 3, stalls["absmax"], max_cycles=20_000))

    codes = []

    async def main(ctx):
        codes.extend(await get(ctx, dut.codes, sum(map(len, beats)), stalls["codes"], max_cycles=20_000))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feed, background=True)
    sim.add_testbench(collect, background=True)
    sim.add_testbench(main)
    sim.run()
    assert len(codes) == sum(map(len, beats))
    golden = nf4_quant.quantize(good, 32, double_quant=False)
    good_codes = [(beat >> (4 * lane)) & 0xF for beat in codes[len(beats[0]):] for lane in range(4)][:70]
    assert nf4_quant.pack_nibbles(good_codes).tolist() == golden.packed.tolist()
    assert np.array(absmax[3:], np.uint32).view(np.float32).tolist() == golden.absmax.tolist()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtl_encoder_ties_and_specials(bits):
    # the per-lane bound comparison of the NormalFloat tables on its own: every bound, its float32 neighbours, both
    # signs, the levels, random values, zeros, subnormals, infinities and NaN, against the golden model's
    # searchsorted
    from edge_qlora.rtl.nf4_quant import _NFEncode, nf_bounds
    from edge_qlora.constants import NF_CODES

    table = nf_bounds(bits)
    bounds = np.concatenate([table, -table])
    values = np.concatenate([
        bounds, np.nextafter(bounds, np.float32(2)), np.nextafter(bounds, np.float32(-2)), NF_CODES[bits],
        -NF_CODES[bits], np.random.default_rng(bits).uniform(-1.1, 1.1, 1000).astype(np.float32),
        np.float32([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, 1.5, -1.5, 3e38, -3e38, np.inf, -np.inf, np.nan, -np.nan]),
    ]).astype(np.float32)
    expected = np.searchsorted(table, values, side="left")
    dut = _NFEncode(bits)
    got = []

    async def testbench(ctx):
        for value in values.view(np.uint32):
            ctx.set(dut.scaled, int(value))
            for _ in range(dut.LATENCY):
                await ctx.tick()
            got.append(ctx.get(dut.code))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    assert mismatches(expected.astype(np.uint8), np.array(got, np.uint8)) == 0


def test_rtl_config_checks():
    with pytest.raises(ValueError, match="lanes"):
        NF4QuantConfig(lanes=17)
    with pytest.raises(ValueError, match="lanes"):
        NF4QuantConfig(lanes=True)
    with pytest.raises(ValueError, match="blocksize"):
        NF4QuantConfig(blocksize=48)
    with pytest.raises(ValueError, match="in_dtype"):
        NF4QuantConfig(in_dtype="fp8")
    for bits in (1, 5, 8, True, 4.0, "4"):
        with pytest.raises(ValueError, match="bits"):
            NF4QuantConfig(bits=bits)
    with pytest.raises(ValueError, match="table"):
        NF4QuantConfig(table="nf4")
    with pytest.raises(TypeError, match="config"):
        NF4Quantizer("bf16")
