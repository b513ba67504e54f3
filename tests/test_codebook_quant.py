# amaranth: UnusedElaboratable=no
"""The quantizer at 2, 3 and 4 bits, with NormalFloat tables and with tables loaded per tensor, against
``golden.codebook.quantize``, with random stalls on every stream (NF4 itself: ``test_nf4_quant.py``)."""

import numpy as np
import pytest
import torch
from amaranth.hdl import Cat, Module
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from edge_qlora.golden import codebook as golden
from edge_qlora.golden.codebook import Codebook
from edge_qlora.rtl.nf4_quant import (TABLE_SLOTS, NF4QuantConfig, NF4Quantizer, _bound_key, _LoadedEncode,
                                      nf_bounds, nf_pad_code)
from edge_qlora.sim.harness import pack_lanes, unpack_lanes
from edge_qlora.sim.nf4_quant import quantize_rtl, run_quantizer, table_beat
from edge_qlora.sim.streams import Stalls, get, put

from cases import DTYPES, adversarial, random_weights
from reference import bnb_quantize, mismatches

STREAMS = ("weights", "table", "codes", "absmax", "absmax2")

#: Tables a user might load, per code width: a bound exactly 0.0, one sign only, levels outside [-1, 1],
#: subnormal levels and bounds, random levels; and the NF tables themselves through the loaded path.
TABLES = {
    2: {
        "zero_bound": Codebook(np.float32([-1.0, -0.25, 0.25, 1.0])),
        "negative_only": Codebook(np.float32([-1.0, -0.6, -0.3, -0.1])),
        "positive_only": Codebook(np.float32([0.0, 0.2, 0.5, 1.0])),
        "wide": Codebook(np.float32([-4.0, -0.5, 0.75, 3.0])),
        "nf2": Codebook.nf(2),
    },
    3: {
        "zero_bound": Codebook(np.float32([-1, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1])),
        "positive_only": Codebook(np.float32([0.01, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0])),
        "wide": Codebook(np.float32([-7, -3, -1.5, -0.5, 0, 0.5, 2, 9])),
        "subnormal": Codebook(np.float32([-1, -2e-39, -3e-40, -1e-44, 0, 4e-41, 1e-39, 1])),
        "nf3": Codebook.nf(3),
    },
    4: {
        "random": Codebook(np.sort(np.random.default_rng(4).uniform(-1.2, 1.1, 16)).astype(np.float32)),
        "negative_only": Codebook(-np.geomspace(1.0, 1e-3, 16).astype(np.float32)),
        "subnormal": Codebook(np.concatenate([np.float32([-1, -0.5, -1e-39, -1e-42, 0, 1e-45, 1e-41, 1e-39]),
                                              np.linspace(0.1, 1.0, 8).astype(np.float32)])),
        "nf4": Codebook.nf(4),
    },
}


def random_stalls(seed, idle=0.3):
    return {name: Stalls(idle, seed * 10 + i) for i, name in enumerate(STREAMS)}


def check_quantizer(weights, config, seed, codebooks=None):
    """The RTL quantizer against ``golden.codebook.quantize``, tensors back to back (each with its own table when
    loaded), with random stalls on every stream. ``run_quantizer`` checks the beat counts, ``last`` and the pad
    codes; comparing every code and absmax catches anything lost, duplicated or reordered."""
    names = list(weights)
    runs = run_quantizer([weights[name] for name in names], config, codebook=codebooks,
                         stalls=random_stalls(seed))
    books = codebooks or [Codebook.nf(config.bits)] * len(names)
    for name, run, book in zip(names, runs, books):
        expected = golden.quantize(weights[name], codebook=book, blocksize=config.blocksize, double_quant=False)
        assert mismatches(expected.packed, run.packed) == 0, (name, book)
        assert mismatches(expected.absmax, run.absmax) == 0, (name, book)


def ties(book, blocksize):
    """float32 weights in blocks whose absmax is 1.0 (the scaled value is the weight itself): every bound of
    ``book`` inside [-1, 1], its float32 neighbours, its negation, the levels, and both zeros."""
    bounds = book.bounds
    values = np.concatenate([bounds, np.nextafter(bounds, np.float32(2)), np.nextafter(bounds, np.float32(-2)),
                             -bounds, book.levels, np.float32([0.0, -0.0, 1e-45, -1e-45])]).astype(np.float32)
    values = values[np.abs(values) <= 1]
    out = []
    for start in range(0, values.size, blocksize - 1):
        out += list(values[start:start + blocksize - 1]) + [1.0]
    return torch.tensor(np.array(out + [-0.0, 0.5], np.float32))    # and a tail block


# --- the loaded encoder alone ----------------------------------------------------------------------------------------

class _KeyedEncode(wiring.Component):
    """:class:`_LoadedEncode` fed raw float32 bounds through the ingest's key conversion."""

    def __init__(self, bits):
        self.bits = bits
        super().__init__({"scaled": In(32), "bounds": In(data.ArrayLayout(32, 2 ** bits - 1)), "code": Out(bits)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.encode = encode = _LoadedEncode(self.bits)
        m.d.comb += [
            encode.scaled.eq(self.scaled),
            encode.keys.eq(Cat(*(_bound_key(bound) for bound in self.bounds))),
            self.code.eq(encode.code),
        ]
        return m


def _encode_all(bits, bounds, values):
    dut = _KeyedEncode(bits)
    got = []

    async def testbench(ctx):
        ctx.set(dut.bounds, [int(b) for b in np.float32(bounds).view(np.uint32)])
        for value in values.view(np.uint32):
            ctx.set(dut.scaled, int(value))
            await ctx.tick()
            got.append(ctx.get(dut.code))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    return np.array(got, np.uint8)


@pytest.mark.parametrize("bits,name", [(bits, name) for bits in TABLES for name in TABLES[bits]])
def test_loaded_encoder_ties_and_specials(bits, name):
    # every bound, its neighbours and negation, the levels, random values, zeros, subnormals, infinities and NaN
    bounds = TABLES[bits][name].bounds
    values = np.concatenate([
        bounds, np.nextafter(bounds, np.float32(np.inf)), np.nextafter(bounds, np.float32(-np.inf)), -bounds,
        TABLES[bits][name].levels, np.random.default_rng(bits).uniform(-1.1, 1.1, 300).astype(np.float32),
        np.float32([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, 3e38, -3e38, np.inf, -np.inf, np.nan, -np.nan]),
    ]).astype(np.float32)
    expected = np.searchsorted(bounds, values, side="left").astype(np.uint8)
    assert mismatches(expected, _encode_all(bits, bounds, values)) == 0


def test_loaded_encoder_negative_zero_bound():
    # a bound of -0.0 (software never makes one from levels, but the port takes any bits) counts as +0.0
    bounds = np.float32([-0.5, -0.0, 0.5])
    values = np.float32([-0.0, 0.0, -1e-45, 1e-45, -0.5, 0.5, -0.25, 0.25])
    expected = np.searchsorted(bounds, values, side="left").astype(np.uint8)
    assert expected.tolist() == [1, 1, 1, 2, 0, 2, 1, 2]
    assert mismatches(expected, _encode_all(2, bounds, values)) == 0


# --- the whole core --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,lanes,dtype,blocksize", [
    (2, 8, "bf16", 64), (2, 3, "fp32", 32), (3, 16, "fp16", 32), (3, 1, "bf16", 32),
])
def test_rtl_nf_random(bits, lanes, dtype, blocksize):
    # three tensors back to back: neither size a multiple of the block or of the lanes, one below a block
    sizes = [3 * blocksize + 2 * lanes + 1, blocksize // 2 + 3, blocksize + 7]
    weights = {f"tensor {i}": random_weights((n,), DTYPES[dtype], i + bits) for i, n in enumerate(sizes)}
    check_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype, bits=bits),
                    seed=bits * lanes)


@pytest.mark.parametrize("bits,lanes", [(2, 8), (3, 3)])
def test_rtl_nf_adversarial(bits, lanes):
    blocksize, dtype = 32, "fp32"
    book = Codebook.nf(bits)
    weights = adversarial(DTYPES[dtype], blocksize, codebook=book)
    weights["ties"] = ties(book, blocksize)
    check_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype, bits=bits),
                    seed=bits + 20)


@pytest.mark.parametrize("bits,lanes,dtype", [(2, 8, "fp32"), (3, 5, "fp32"), (4, 8, "bf16")])
def test_rtl_loaded_tables_back_to_back(bits, lanes, dtype):
    # every table of the width, each on random weights and on ties with its own bounds, back to back: a table
    # change between every two tensors, tails everywhere
    blocksize = 32
    weights, books = {}, []
    for i, (name, book) in enumerate(TABLES[bits].items()):
        weights[f"{name} random"] = random_weights((2 * blocksize + lanes + 3,), DTYPES[dtype], i)
        weights[f"{name} ties"] = ties(book, blocksize).to(DTYPES[dtype])
        books += [book, book]
    check_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype, bits=bits,
                                            table="loaded"), seed=bits * 7, codebooks=books)


@pytest.mark.parametrize("bits,lanes", [(2, 4), (4, 16)])
def test_rtl_loaded_adversarial(bits, lanes):
    blocksize, dtype = 32, "fp16"
    names = list(TABLES[bits])
    cases = adversarial(DTYPES[dtype], blocksize, codebook=TABLES[bits][names[0]])
    books = [TABLES[bits][names[i % len(names)]] for i in range(len(cases))]
    check_quantizer(cases, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype, bits=bits,
                                          table="loaded"), seed=bits + 30, codebooks=books)


def test_rtl_loaded_tiny_tensors_fill_every_slot():
    # tensors far shorter than the core's latency: more than TABLE_SLOTS in flight at once, so the ingest waits for
    # a slot, and the slot ring wraps many times; each tensor has its own table and its own pad code
    bits, lanes, blocksize = 3, 4, 32
    sizes = [1, 2, 3, 4, 5, 1, 33, 7, 1, 1, 64, 2, 9, 1, 3, 1]
    assert len(sizes) > 3 * TABLE_SLOTS
    names = list(TABLES[bits])
    weights = {f"tensor {i}": random_weights((n,), DTYPES["fp32"], i) for i, n in enumerate(sizes)}
    books = [TABLES[bits][names[i % len(names)]] for i in range(len(sizes))]
    assert len({book.pad_code for book in books}) > 1
    check_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype="fp32", bits=bits,
                                            table="loaded"), seed=41, codebooks=books)


def test_rtl_loaded_table_sent_before_weights():
    # one producer that sends a tensor's table, then its weights, then the next table: the core takes a table
    # while it waits for the tensor's first beat, so a serial producer cannot deadlock it
    bits, lanes, blocksize = 2, 4, 32
    config = NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype="fp32", bits=bits, table="loaded")
    books = list(TABLES[bits].values())
    tensors = [random_weights((n,), torch.float32, n) for n in (70, 5, 32, 1, 100, 9)]
    books = [books[i % len(books)] for i in range(len(tensors))]
    beats = [pack_lanes(t.view(torch.int32).numpy().view(np.uint32), lanes, 32) for t in tensors]
    stalls = random_stalls(5)
    dut = NF4Quantizer(config)

    async def feed(ctx):
        for tensor, tensor_beats, book in zip(tensors, beats, books):
            await put(ctx, dut.table, [table_beat(book.bounds, book.pad_code, bits)], stalls["table"])
            ctx.set(dut.n_weights, tensor.numel())
            await put(ctx, dut.weights, tensor_beats, stalls["weights"])

    blocks = sum(-(-t.numel() // blocksize) for t in tensors)
    absmax, codes = [], []

    async def collect(ctx):
        absmax.extend(await get(ctx, dut.absmax, blocks, stalls["absmax"], max_cycles=20_000))

    async def main(ctx):
        codes.extend(await get(ctx, dut.codes, sum(map(len, beats)), stalls["codes"], max_cycles=20_000))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feed, background=True)
    sim.add_testbench(collect, background=True)
    sim.add_testbench(main)
    sim.run()
    assert len(codes) == sum(map(len, beats))
    start = block = 0
    for tensor, tensor_beats, book in zip(tensors, beats, books):
        expected = golden.quantize(tensor, codebook=book, blocksize=blocksize, double_quant=False)
        got = unpack_lanes(codes[start:start + len(tensor_beats)], lanes, bits, len(tensor_beats) * lanes).tolist()
        assert golden.pack_codes(got[:tensor.numel()], bits, book.pad_code).tolist() == expected.packed.tolist()
        assert got[tensor.numel():] == [book.pad_code] * (len(got) - tensor.numel())
        n_blocks = expected.absmax.size
        assert np.array(absmax[block:block + n_blocks], np.uint32).view(np.float32).tolist() == \
            expected.absmax.tolist()
        start += len(tensor_beats)
        block += n_blocks


def test_rtl_loaded_tables_cost_no_cycles():
    # whole blocks, no stalls, a table change at every tensor: as fast as the NF table's core, cycle for cycle,
    # one beat per cycle after the pipeline fills and a cycle per tensor (the sampling of n_weights)
    bits, lanes, blocksize, tensors = 3, 8, 64, 4
    weights = [random_weights((2 * blocksize,), DTYPES["bf16"], i) for i in range(tensors)]
    books = [TABLES[bits]["wide"], TABLES[bits]["nf3"]] * (tensors // 2)
    config = NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype="bf16", bits=bits)
    nf = run_quantizer(weights, config)
    loaded = run_quantizer(weights, NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype="bf16", bits=bits,
                                                   table="loaded"), codebook=books)
    assert loaded[0].cycles == nf[0].cycles <= tensors * (2 * blocksize // lanes + 1) + blocksize // lanes + 64
    for weight, run, book in zip(weights, loaded, books):
        expected = golden.quantize(weight, codebook=book, blocksize=blocksize, double_quant=False)
        assert mismatches(expected.packed, run.packed) == 0


@pytest.mark.parametrize("shape,dtype,blocksize,double_quant,lanes,bits,book", [
    ((17, 65), "bf16", 64, True, 8, 2, None),
    ((7, 63), "fp32", 32, False, 3, 3, None),
    ((129,), "fp16", 128, True, 16, 3, "wide"),
    ((5, 300), "bf16", 256, True, 16, 2, "negative_only"),
    ((97, 10), "fp32", 32, True, 8, 4, "random"),
])
def test_quantize_rtl_against_golden(shape, dtype, blocksize, double_quant, lanes, bits, book):
    codebook = None if book is None else TABLES[bits][book]
    weight = random_weights(shape, DTYPES[dtype], sum(shape))
    quantized, cycles = quantize_rtl(weight, blocksize, double_quant, lanes=lanes, stalls=random_stalls(lanes),
                                     bits=bits, codebook=codebook)
    expected = golden.quantize(weight, bits, codebook, blocksize, double_quant)
    assert set(cycles) == ({"quantizer", "absmax_quantizer"} if double_quant else {"quantizer"})
    for field in ("shape", "dtype", "blocksize", "bits", "double_quant"):
        assert getattr(quantized, field) == getattr(expected, field), field
    assert quantized.codebook == expected.codebook
    for field in ("packed", "absmax", "absmax2", "offset"):
        if getattr(expected, field) is not None:
            assert mismatches(np.atleast_1d(getattr(expected, field)),
                              np.atleast_1d(getattr(quantized, field))) == 0, field


def test_quantize_rtl_nf4_loaded_matches_bitsandbytes():
    # the NF4 table sent as data through the loaded core: still bitsandbytes' quantize_4bit, byte for byte
    weight = random_weights((45, 33), torch.bfloat16, 3)
    quantized, _ = quantize_rtl(weight, 64, True, lanes=8, stalls=random_stalls(2), codebook=Codebook.nf(4),
                                table="loaded")
    packed, state = bnb_quantize(weight, 64, True)
    assert mismatches(packed.reshape(-1).numpy(), quantized.packed) == 0
    assert mismatches(state.absmax.numpy(), quantized.absmax) == 0
    assert mismatches(state.state2.absmax, torch.from_numpy(quantized.absmax2)) == 0
    assert quantized.bits == 4 and quantized.codebook is None


def test_run_quantizer_refuses_mismatched_tables():
    nf3 = NF4QuantConfig(lanes=4, blocksize=32, in_dtype="fp32", bits=3)
    loaded = NF4QuantConfig(lanes=4, blocksize=32, in_dtype="fp32", bits=3, table="loaded")
    weight = torch.ones(40)
    with pytest.raises(ValueError, match="table='nf'"):
        run_quantizer(weight, nf3, codebook=TABLES[3]["wide"])
    with pytest.raises(ValueError, match="needs a codebook"):
        run_quantizer(weight, loaded)
    with pytest.raises(ValueError, match="2-bit codebook"):
        run_quantizer(weight, loaded, codebook=TABLES[2]["wide"])
    with pytest.raises(ValueError, match="2 codebooks for 1 tensors"):
        run_quantizer([weight], loaded, codebook=[TABLES[3]["wide"]] * 2)
    with pytest.raises(ValueError, match="custom code book"):
        quantize_rtl(weight, codebook=TABLES[3]["wide"], table="nf")
    with pytest.raises(ValueError, match="table"):
        quantize_rtl(weight, codebook=TABLES[3]["wide"], table="rom")


def test_ports_follow_the_config():
    assert "table" not in NF4Quantizer(NF4QuantConfig(bits=3)).signature.members
    dut = NF4Quantizer(NF4QuantConfig(lanes=5, bits=3, table="loaded"))
    assert len(dut.table.payload.as_value()) == 7 * 32 + 3
    assert len(dut.codes.payload.as_value()) == 5 * 3 + 1
    assert [nf_pad_code(b) for b in (2, 3, 4)] == [Codebook.nf(b).pad_code for b in (2, 3, 4)] == [1, 3, 7]
    for bits in (2, 3, 4):
        assert nf_bounds(bits).view(np.uint32).tolist() == Codebook.nf(bits).bounds.view(np.uint32).tolist()
