# amaranth: UnusedElaboratable=no
"""DRAM model: a functional memory under random stalls on every stream, and cycle-exact with the golden schedule
(``golden.dram.data_beats``) on random request sequences, on scaled-down and full presets, open and closed page."""

import random
from dataclasses import replace

import pytest
from amaranth.sim import Simulator

from edge_qlora.golden.dram import ECPIX5_DDR3, ULX3S_SDRAM, data_beats
from edge_qlora.rtl.dram_model import DramModel, DramModelConfig
from edge_qlora.sim import verilator
from edge_qlora.sim.harness import CLOCK_PERIOD, producer
from edge_qlora.sim.streams import NO_STALLS, Stalls, get

# Small geometries (a few rows per bank, short rows) and a short refresh interval, so that a few hundred requests
# cross many rows and banks and several refreshes
SMALL_SDRAM = replace(ULX3S_SDRAM, name="small-sdram", rows=64, columns=16, trefi=97)
SMALL_DDR3 = replace(ECPIX5_DDR3, name="small-ddr3", rows=64, columns=32, trefi=131)
SMALL = {"sdram": SMALL_SDRAM, "ddr3": SMALL_DDR3}


def requests(config, count, seed):
    """Random reads and writes: runs of sequential requests, random addresses, a few long ones across rows."""
    rng = random.Random(seed)
    cap = config.capacity_words
    out, address = [], 0
    for _ in range(count):
        kind = rng.random()
        length = rng.randint(1, 40) if kind < 0.1 else rng.randint(1, 9)
        if kind > 0.6:
            address = rng.randrange(cap)            # random address
        address = min(address, cap - length)
        out.append((address, length, rng.random() < 0.5))
        address += length                           # next one sequential unless random
    return out


def run(timing, reqs, *, idle=0.0, cmd_idle=None, seed=0, depth=None, init=None):
    """Serve ``reqs`` ((address, length, write) in words); returns reads, writes: lists of (model cycle, clock
    cycle, word) per transferred word, and the expected read words."""
    depth = depth or min(4096, timing.capacity_bytes // timing.peak_bytes_per_cycle)
    rng = random.Random(seed)
    config = DramModelConfig(timing, depth=depth, init=init if init is not None else ())
    width = config.word_width
    dut = DramModel(config)
    store = list(config.init) + [0] * (depth - len(config.init))
    write_words, expected = [], []
    for address, length, write in reqs:
        for a in range(address, address + length):
            if write:
                word = rng.getrandbits(width)
                write_words.append(word)
                store[a % depth] = word
            else:
                expected.append(store[a % depth])
    commands = [a | (n << config.address_bits) | (int(w) << (2 * config.address_bits + 1)) for a, n, w in reqs]
    cmd_idle = idle if cmd_idle is None else cmd_idle
    seen = {"reads": [], "writes": []}
    clock = {"cycle": 0}

    async def observe(ctx):
        async for _, _, now, wv, wr, wp, rv, rr, rp in ctx.tick().sample(
                dut.now, dut.wdata.valid, dut.wdata.ready, dut.wdata.payload,
                dut.rdata.valid, dut.rdata.ready, dut.rdata.payload):
            if wv and wr:
                seen["writes"].append((now, clock["cycle"], wp))
            if rv and rr:
                seen["reads"].append((now, clock["cycle"], rp))
            clock["cycle"] += 1

    async def main(ctx):
        await get(ctx, dut.rdata, len(expected), Stalls(idle, seed + 3) if idle else NO_STALLS,
                  max_cycles=50 * (len(expected) + len(write_words)) + 5000)
        for _ in range(50 * len(write_words) + 5000):
            if len(seen["writes"]) >= len(write_words):
                break
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD)
    sim.add_process(observe)
    sim.add_testbench(producer(dut.cmd, commands, Stalls(cmd_idle, seed + 1)), background=True)
    sim.add_testbench(producer(dut.wdata, write_words, Stalls(idle, seed + 2)), background=True)
    sim.add_testbench(main)
    sim.run()
    assert [w for *_, w in seen["writes"]] == write_words
    assert [w for *_, w in seen["reads"]] == expected        # nothing lost, duplicated, reordered or corrupted
    return seen, store


def golden_cycles(timing, reqs):
    """Cycles of each read word and each write word, in order, from the golden schedule."""
    bpc = timing.peak_bytes_per_cycle
    beats = data_beats(timing, [(a * bpc, n * bpc, "write" if w else "read") for a, n, w in reqs])
    reads = [c for (_, _, w), b in zip(reqs, beats) if not w for c in b]
    writes = [c for (_, _, w), b in zip(reqs, beats) if w for c in b]
    return reads, writes


@pytest.mark.parametrize("preset", ["sdram", "ddr3"])
@pytest.mark.parametrize("page", ["open", "closed"])
def test_cycle_exact_without_stalls(preset, page):
    timing = replace(SMALL[preset], page_policy=page)
    config = DramModelConfig(timing, depth=64)
    reqs = requests(config, 150, seed=len(preset) + 10 * len(page))
    seen, _ = run(timing, reqs, depth=64)
    reads, writes = golden_cycles(timing, reqs)
    assert [now for now, _, _ in seen["reads"]] == reads
    assert [now for now, _, _ in seen["writes"]] == writes
    # without stalls the model's clock is the simulator's
    assert all(now == cycle for now, cycle, _ in seen["reads"] + seen["writes"])


@pytest.mark.parametrize("preset", ["sdram", "ddr3"])
def test_data_stalls_stretch_the_golden_schedule(preset):
    """Stalls on rdata and wdata only hold the model's clock: in its own time the schedule stays the golden one."""
    timing = replace(SMALL[preset], address_map="bank-row-col")
    config = DramModelConfig(timing, depth=256)
    reqs = requests(config, 80, seed=7)
    seen, _ = run(timing, reqs, idle=0.4, cmd_idle=0.0, seed=11, depth=256)
    reads, writes = golden_cycles(timing, reqs)
    assert [now for now, _, _ in seen["reads"]] == reads
    assert [now for now, _, _ in seen["writes"]] == writes


@pytest.mark.parametrize("preset", ["sdram", "ddr3"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_stalls_everywhere(preset, seed):
    timing = replace(SMALL[preset], page_policy="closed" if seed == 2 else "open")
    config = DramModelConfig(timing, depth=128)
    run(timing, requests(config, 100, seed), idle=0.35, seed=seed, depth=128,
        init=tuple(random.Random(seed).getrandbits(config.word_width) for _ in range(100)))


@pytest.mark.parametrize("timing", [ULX3S_SDRAM, ECPIX5_DDR3], ids=lambda t: t.name)
def test_full_presets(timing):
    """The real geometry and refresh interval: sequential streams across rows and a refresh, random words."""
    config = DramModelConfig(timing, depth=1024)
    row = timing.columns // timing.words_per_cycle
    reqs = [(a, 64, w) for w in (True, False) for a in range(row - 96, row + 96, 64)]
    rng = random.Random(5)
    reqs += [(a, 64, False) for a in range(0, 640, 64)]                       # past the first refresh
    reqs += [(rng.randrange(config.capacity_words), 1, rng.random() < 0.5) for _ in range(30)]
    seen, _ = run(timing, reqs, depth=1024)
    reads, writes = golden_cycles(timing, reqs)
    assert [now for now, _, _ in seen["reads"]] == reads
    assert [now for now, _, _ in seen["writes"]] == writes
    assert max(reads) > timing.trefi


def test_zero_length_requests_are_dropped():
    timing = SMALL_SDRAM
    run(timing, [(5, 3, True), (9, 0, True), (5, 3, False), (0, 0, False), (6, 1, False)], idle=0.3, seed=3,
        depth=64)


def test_config_errors():
    with pytest.raises(TypeError, match="timing"):
        DramModelConfig("ulx3s")
    with pytest.raises(ValueError, match="depth"):
        DramModelConfig(ULX3S_SDRAM, depth=1000)
    with pytest.raises(ValueError, match="init"):
        DramModelConfig(ULX3S_SDRAM, depth=16, init=(1 << 16,))
    with pytest.raises(ValueError, match="overlap"):
        DramModelConfig(replace(ECPIX5_DDR3, rd_to_wr=1))
    with pytest.raises(TypeError, match="config"):
        DramModel(ULX3S_SDRAM)


@pytest.mark.skipif(not verilator.available(),
                    reason=f"Verilator backend unavailable: {verilator.unavailable_reason()}")
@pytest.mark.parametrize("preset", ["sdram", "ddr3"])
def test_verilator(preset):
    """The compiled model: the same words as the golden memory under random stalls, and without stalls the cycle
    count of the golden schedule (the run ends as the last read word is taken)."""
    timing = SMALL[preset]
    config = DramModelConfig(timing, depth=64)
    model = verilator.VerilatorModel(lambda: DramModel(config), key=f"dram_model {config!r}")
    reqs = requests(config, 150, seed=4) + [(0, 64, False)]     # ends by reading back the whole store
    rng = random.Random(4)
    store, write_words, expected = [0] * 64, [], []
    for address, length, write in reqs:
        for a in range(address, address + length):
            if write:
                write_words.append(rng.getrandbits(config.word_width))
                store[a % 64] = write_words[-1]
            else:
                expected.append(store[a % 64])
    commands = [a | (n << config.address_bits) | (int(w) << (2 * config.address_bits + 1)) for a, n, w in reqs]
    sources = {"cmd": commands, "wdata": write_words}
    reads, _ = golden_cycles(timing, reqs)
    beats, cycles, _ = verilator.run_model(model, sources, {"rdata": len(expected)})
    assert beats["rdata"] == expected
    assert cycles == reads[-1] + 1
    stalls = {name: Stalls(0.35, i + 1) for i, name in enumerate(("cmd", "wdata", "rdata"))}
    beats, _, _ = verilator.run_model(model, sources, {"rdata": len(expected)}, stalls=stalls)
    assert beats["rdata"] == expected
