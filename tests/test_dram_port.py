# amaranth: UnusedElaboratable=no
"""DRAM port: the memory side of a MemPortSignature with a DRAM model's timing. Without stalls every word moves in
the golden schedule's cycle (``golden.dram.data_beats``), with no latency of the port's own; under random stalls on
every stream the read words are the fill words in order with ``last`` on each burst's end, and the write log holds
every written word once, in order, at its byte address."""

import random
from dataclasses import replace

import pytest
from amaranth.hdl import Elaboratable, Module, Value
from amaranth.lib import wiring
from amaranth.sim import Simulator

from edge_qlora.constants import ECPIX5_DDR3, ULX3S_SDRAM
from edge_qlora.golden.dram import data_beats
from edge_qlora.rtl.dram_port import DramPort
from edge_qlora.rtl.memport import BurstReader, BurstWriter, MemPortConfig, MemPortSignature, split_bursts
from edge_qlora.sim.harness import CLOCK_PERIOD, producer
from edge_qlora.sim.streams import NO_STALLS, Stalls, get, put

from reference import fields

#: Each preset with a port whose word is the DRAM model's word and whose boundary is one DRAM row.
PORTS = {
    "sdram": (ULX3S_SDRAM, MemPortConfig()),
    "ddr3": (ECPIX5_DDR3, MemPortConfig(address_width=29, data_width=64, max_burst=16, boundary=2048)),
}


def request_word(config, address, length):
    return address | length << config.address_width


def bursts(config, jobs):
    """The requests of (address, bytes) jobs, as a mover issues them."""
    return [burst for address, size in jobs for burst in split_bursts(config, address, size)]


def random_jobs(config, timing, count, rng):
    """Jobs of up to a few rows: mostly sequential runs, some at random rows, some just below a row's end."""
    wb, row = config.word_bytes, timing.row_bytes
    jobs, address = [], 0
    for _ in range(count):
        size = rng.randint(1, 12) * wb if rng.random() < 0.7 else rng.randint(1, 3 * config.max_burst) * wb
        if rng.random() < 0.3:
            address = rng.randrange(0, 64 * row, wb)
        if rng.random() < 0.2:
            address = rng.randrange(1, 64) * row - rng.randint(1, 4) * wb
        jobs.append((address, size))
        address += size
    return jobs


def with_last(config, words, requests):
    """Beats of ``beat_layout``: ``words`` with ``last`` on the final word of each (address, length) request."""
    ends = [i == n - 1 for _, n in requests for i in range(n)]
    return [w | last << config.data_width for w, last in zip(words, ends)]


def write_log(config, requests, words):
    """The (byte address, word) log of ``words`` written by ``requests`` in order."""
    addresses = [a + i * config.word_bytes for a, n in requests for i in range(n)]
    return list(zip(addresses, words))


class _Observer:
    """Records, cycle by cycle, what moves on the port: the requests taken (in the order the DRAM serves them),
    each read and write word with the cycle and the DRAM's time, and checks the arbitration rule."""

    def __init__(self, dut):
        self.dut = dut
        self.requests, self.reads, self.writes = [], [], []
        self.conflicts = 0                        # cycles with both requests offered

    async def run(self, ctx):
        port, config = self.dut.port, self.dut.port_config
        aw, lw, dw = config.address_width, config.max_burst.bit_length(), config.data_width
        signals = (port.read_cmd.valid, port.read_cmd.ready, Value.cast(port.read_cmd.payload),
                   port.write_cmd.valid, port.write_cmd.ready, Value.cast(port.write_cmd.payload),
                   port.read_data.valid, port.read_data.ready, port.write_data.valid, port.write_data.ready,
                   Value.cast(port.write_data.payload), self.dut.now)
        cycle = 0
        async for _, _, rv, rr, rp, wv, wr, wp, dv, dr, wdv, wdr, wdp, now in ctx.tick().sample(*signals):
            # a write request offered wins: the read request waits
            assert not (wv and rr), f"cycle {cycle}: read request taken while a write request was offered"
            self.conflicts += bool(wv and rv)
            if rv and rr:
                self.requests.append((*fields(rp, aw, lw), "read"))
            if wv and wr:
                self.requests.append((*fields(wp, aw, lw), "write"))
            if dv and dr:
                self.reads.append((cycle, now))
            if wdv and wdr:
                self.writes.append((cycle, now, bool(wdp >> dw & 1)))
            cycle += 1

    def golden(self, timing):
        """Golden cycles of each read and each write word, in order, for the requests as they were taken."""
        wb = self.dut.port_config.word_bytes
        beats = data_beats(timing, [(a, n * wb, op) for a, n, op in self.requests])
        reads = [c for (*_, op), b in zip(self.requests, beats) if op == "read" for c in b]
        writes = [c for (*_, op), b in zip(self.requests, beats) if op == "write" for c in b]
        return reads, writes

    def check_write_last(self):
        """``write_data.last`` on each write burst's final word, and only there."""
        ends = [i == n - 1 for *_, n, op in self.requests if op == "write" for i in range(n)]
        assert [last for *_, last in self.writes] == ends


def run_port(timing, config, reads, writes, *, idle=0.0, cmd_idle=None, seed=0, program=None):
    """Serve ``reads`` and ``writes`` ((byte address, length in words) requests) through a DramPort, the requests
    from two producers (or, given ``program``, one driver offering ``(op, address, length)`` in that order), every
    stream stalling with probability ``idle`` (the requests with ``cmd_idle``, default ``idle``). Checks the read
    words, their ``last``, the write log and ``write_data.last``; returns the observer."""
    rng = random.Random(seed)
    dw, aw = config.data_width, config.address_width
    dut = DramPort(config, timing)
    fill = [rng.getrandbits(dw) for _, n in reads for _ in range(n)]
    write_words = [rng.getrandbits(dw) for _, n in writes for _ in range(n)]
    expected_log = write_log(config, writes, write_words)
    cmd_idle = idle if cmd_idle is None else cmd_idle

    def stalls(k):
        p = cmd_idle if k in (1, 2) else idle
        return Stalls(p, seed * 10 + k) if p else NO_STALLS

    observer = _Observer(dut)
    log = []

    async def program_driver(ctx):
        for op, address, length in program:
            cmd = dut.port.read_cmd if op == "read" else dut.port.write_cmd
            await put(ctx, cmd, [request_word(config, address, length)], program_stalls)

    async def log_taker(ctx):
        log.extend(await get(ctx, dut.written, len(write_words), stalls(6), max_cycles=10**6))

    program_stalls = stalls(1)      # one pattern for the one driver of both request streams
    limit = 40 * (len(fill) + len(write_words)) + 5000

    async def main(ctx):
        got = await get(ctx, dut.port.read_data, len(fill), stalls(5), max_cycles=limit)
        assert got == with_last(config, fill, reads)   # the fill words in order, `last` on each burst's final word
        for _ in range(limit):
            if len(log) == len(write_words):
                break
            await ctx.tick()
        for _ in range(50):                      # nothing more may move
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD)
    sim.add_process(observer.run)
    if program is None:
        sim.add_testbench(producer(dut.port.read_cmd, [request_word(config, a, n) for a, n in reads], stalls(1)),
                          background=True)
        sim.add_testbench(producer(dut.port.write_cmd, [request_word(config, a, n) for a, n in writes],
                                   stalls(2)), background=True)
    else:
        sim.add_testbench(program_driver, background=True)
    sim.add_testbench(producer(dut.port.write_data, with_last(config, write_words, writes), stalls(3)), background=True)
    sim.add_testbench(producer(dut.fill, fill, stalls(4)), background=True)
    sim.add_testbench(log_taker, background=True)
    sim.add_testbench(main)
    sim.run()
    assert [tuple(fields(entry, aw, dw)) for entry in log] == expected_log
    assert len(observer.reads) == len(fill) and len(observer.writes) == len(write_words)
    observer.check_write_last()
    return observer


# --- 1. timing: the golden schedule, cycle for cycle

def _timing_case(name, config, timing):
    row, wb = timing.row_bytes, config.word_bytes
    if name == "sequential":
        return bursts(config, [(0, 3 * row), (3 * row, 2 * row + 6 * wb)]), [], None
    if name == "across_rows":
        # rows of every bank, the same bank's next rows (row misses), and jobs straddling a row's end
        banks = timing.banks
        jobs = [(row - 10 * wb, 40 * wb), (banks * row + 8 * wb, 3 * wb), (2 * banks * row - 5 * wb, 70 * wb),
                (0, wb), (banks * row * 7 + row // 2, row), (3 * row - wb, 2 * wb), (5 * row, 130 * wb)]
        return bursts(config, jobs), [], None
    if name == "write_then_read":
        # both producers start at once: every write request goes first, then the reads read the same bytes back
        jobs = [(row - 24 * wb, 60 * wb), (4 * row, 9 * wb), (7 * row + 100 * wb, 3 * wb)]
        return bursts(config, jobs), bursts(config, jobs), None
    # interleaved: one driver offers two writes, then a read, over and over, in program order (bus turnarounds)
    rng = random.Random(3)
    program = []
    for k in range(24):
        op = "write" if k % 3 != 2 else "read"
        address = rng.choice([0, row, 5 * row]) + rng.randrange(0, 40) * wb
        program.append((op, address, rng.randint(1, min(9, config.max_burst))))
    reads = [(a, n) for op, a, n in program if op == "read"]
    writes = [(a, n) for op, a, n in program if op == "write"]
    return reads, writes, program


@pytest.mark.parametrize("preset", sorted(PORTS))
@pytest.mark.parametrize("case", ["sequential", "across_rows", "write_then_read", "interleaved"])
def test_golden_timing_without_stalls(preset, case):
    """Without stalls the port adds no latency: each word moves at its golden cycle, and the DRAM's clock is the
    simulator's (cycle 0: the first clock edge, the requests offered from it)."""
    timing, config = PORTS[preset]
    reads, writes, program = _timing_case(case, config, timing)
    observer = run_port(timing, config, reads, writes, program=program)
    golden_reads, golden_writes = observer.golden(timing)
    assert [cycle for cycle, _ in observer.reads] == golden_reads
    assert [cycle for cycle, _, _ in observer.writes] == golden_writes
    assert all(cycle == now for cycle, now, *_ in observer.reads + observer.writes)
    if case == "write_then_read":
        assert [op for *_, op in observer.requests] == ["write"] * len(writes) + ["read"] * len(reads)
        assert observer.conflicts > 0
    if case == "sequential":
        assert golden_reads[-1] > timing.trefi            # a refresh on the way
    if program is not None:
        assert [(op, a, n) for a, n, op in observer.requests] == program


@pytest.mark.parametrize("preset", sorted(PORTS))
def test_data_stalls_stretch_the_golden_schedule(preset):
    """Requests always on offer, random stalls on read_data, fill, write_data and written: the stalls only hold the
    DRAM's clock, so in its own time every word still moves at its golden cycle."""
    timing, config = PORTS[preset]
    reads, writes, program = _timing_case("interleaved", config, timing)
    observer = run_port(timing, config, reads, writes, program=program, idle=0.4, cmd_idle=0.0, seed=4)
    golden_reads, golden_writes = observer.golden(timing)
    assert [now for _, now in observer.reads] == golden_reads
    assert [now for _, now, _ in observer.writes] == golden_writes
    assert observer.reads[-1][0] > observer.reads[-1][1]  # and the simulator's clock ran on while it was held


# --- 2. data: random stalls on every stream

@pytest.mark.parametrize("preset", sorted(PORTS))
@pytest.mark.parametrize("seed", [1, 2])
def test_random_stalls_everywhere(preset, seed):
    timing, config = PORTS[preset]
    rng = random.Random(seed)
    reads = bursts(config, random_jobs(config, timing, 30, rng))
    writes = bursts(config, random_jobs(config, timing, 30, rng))
    assert sum(n for _, n in reads) > 200 and sum(n for _, n in writes) > 200
    observer = run_port(timing, config, reads, writes, idle=0.35, seed=seed)
    kinds = [op for *_, op in observer.requests]
    assert kinds.count("read") == len(reads) and kinds.count("write") == len(writes)
    assert observer.conflicts > 0                         # the rule was exercised
    # stalls only hold the DRAM: its clock lags the simulator's
    assert observer.reads[-1][1] < observer.reads[-1][0]


@pytest.mark.parametrize("preset", sorted(PORTS))
def test_one_cycle_latencies(preset):
    """With ``cl == 1`` or ``cwl == 1`` a word may come before its queued request shows: it waits, nothing is lost."""
    timing, config = PORTS[preset]
    timing = replace(timing, name="fast", cl=1, cwl=1)
    rng = random.Random(8)
    reads = bursts(config, random_jobs(config, timing, 12, rng))
    writes = bursts(config, random_jobs(config, timing, 12, rng))
    run_port(timing, config, reads, writes, idle=0.2, seed=8)
    run_port(timing, config, reads, writes, seed=8)


class _Movers(Elaboratable):
    """A burst reader and a burst writer on one DramPort, as an accelerator holds them."""

    def __init__(self, config, timing):
        self.reader = BurstReader(config)
        self.writer = BurstWriter(config)
        self.memory = DramPort(config, timing)

    def elaborate(self, platform):
        m = Module()
        m.submodules.reader, m.submodules.writer = self.reader, self.writer
        m.submodules.memory = memory = self.memory
        wiring.connect(m, self.reader.read_cmd, memory.port.read_cmd)
        wiring.connect(m, memory.port.read_data, self.reader.read_data)
        wiring.connect(m, self.writer.write_cmd, memory.port.write_cmd)
        wiring.connect(m, self.writer.write_data, memory.port.write_data)
        return m


def test_burst_movers_under_stalls():
    """A BurstReader and a BurstWriter behind the port: the reader's jobs get the fill words, the writer's bursts
    are logged at their addresses, and the writer's ``last`` closes each burst the port counts."""
    timing, config = PORTS["sdram"]
    rng = random.Random(9)
    dw, wb, aw = config.data_width, config.word_bytes, config.address_width
    read_jobs = random_jobs(config, timing, 12, rng)
    write_jobs = random_jobs(config, timing, 12, rng)
    read_total = sum(n for _, n in bursts(config, read_jobs))
    write_bursts = bursts(config, write_jobs)
    write_words = [rng.getrandbits(dw) for _, n in write_bursts for _ in range(n)]
    fill = [rng.getrandbits(dw) for _ in range(read_total)]
    top = _Movers(config, timing)
    reader, writer, memory = top.reader, top.writer, top.memory
    observer = _Observer(memory)
    log = []

    async def log_taker(ctx):
        log.extend(await get(ctx, memory.written, len(write_words), Stalls(0.3, 6), max_cycles=10**6))

    async def main(ctx):
        got = await get(ctx, reader.data, read_total, Stalls(0.3, 5), max_cycles=50 * read_total + 5000)
        # `last` on each job's final word
        assert got == with_last(config, fill, [(a, -(-size // wb)) for a, size in read_jobs])
        for _ in range(50 * len(write_words) + 5000):
            if len(log) == len(write_words):
                break
            await ctx.tick()

    sim = Simulator(top)
    sim.add_clock(CLOCK_PERIOD)
    sim.add_process(observer.run)
    sim.add_testbench(producer(reader.job, [a | s << aw for a, s in read_jobs], Stalls(0.3, 1)), background=True)
    sim.add_testbench(producer(writer.job, [a | s << aw for a, s in write_jobs], Stalls(0.3, 2)), background=True)
    sim.add_testbench(producer(writer.data, write_words, Stalls(0.3, 3)), background=True)
    sim.add_testbench(producer(memory.fill, fill, Stalls(0.3, 4)), background=True)
    sim.add_testbench(log_taker, background=True)
    sim.add_testbench(main)
    sim.run()
    expected_log = write_log(config, write_bursts, write_words)
    assert [tuple(fields(entry, aw, dw)) for entry in log] == expected_log
    assert [(a, n) for a, n, op in observer.requests if op == "read"] == bursts(config, read_jobs)
    assert [(a, n) for a, n, op in observer.requests if op == "write"] == write_bursts
    observer.check_write_last()


def test_status_counters():
    timing, config = PORTS["sdram"]
    reads, writes = [(0, 5), (64, 2)], [(128, 3)]
    dut = DramPort(config, timing)

    async def main(ctx):
        ctx.set(dut.written.ready, 1)
        await get(ctx, dut.port.read_data, 7, max_cycles=500)
        for _ in range(40):
            await ctx.tick()
        assert ctx.get(dut.read_words) == 7 and ctx.get(dut.write_words) == 3
        assert ctx.get(dut.now) > 0

    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD)
    sim.add_testbench(producer(dut.port.read_cmd, [request_word(config, a, n) for a, n in reads], NO_STALLS),
                      background=True)
    sim.add_testbench(producer(dut.port.write_cmd, [request_word(config, a, n) for a, n in writes], NO_STALLS),
                      background=True)
    sim.add_testbench(producer(dut.port.write_data, [1, 2, 3 | 1 << 16], NO_STALLS), background=True)
    sim.add_testbench(producer(dut.fill, list(range(7)), NO_STALLS), background=True)
    sim.add_testbench(main)
    sim.run()


# --- 3. validation

def test_signature():
    timing, config = PORTS["ddr3"]
    dut = DramPort(config, timing)
    members = dut.signature.members
    assert members["port"].flow == wiring.In
    assert members["port"].signature == MemPortSignature(config).flip()
    assert dut.port.signature.members["read_data"].flow == wiring.Out     # flipped: the memory drives it
    assert len(Value.cast(dut.written.payload)) == config.address_width + config.data_width
    assert len(dut.fill.payload) == 64
    assert all(len(getattr(dut, name)) <= 64 for name in ("read_words", "write_words", "now"))


def test_rejects():
    with pytest.raises(ValueError, match=r"data_width \(16\).*word width \(64"):
        DramPort(MemPortConfig(), ECPIX5_DDR3)
    with pytest.raises(ValueError, match=r"data_width \(32\).*word width \(16"):
        DramPort(MemPortConfig(data_width=32), ULX3S_SDRAM)
    with pytest.raises(ValueError, match=r"boundary \(2048 bytes\) exceeds one DRAM row \(1024"):
        DramPort(MemPortConfig(boundary=2048), ULX3S_SDRAM)
    with pytest.raises(ValueError, match="boundary"):
        DramPort(MemPortConfig(data_width=64, boundary=4096), ECPIX5_DDR3)
    with pytest.raises(TypeError, match="port_config"):
        DramPort(16, ULX3S_SDRAM)
    with pytest.raises(TypeError, match="timing"):
        DramPort(MemPortConfig(), "ulx3s-sdram")
