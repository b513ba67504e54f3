# amaranth: UnusedElaboratable=no
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from amaranth import Instance, Module, Mux, Signal, unsigned
from amaranth.back import rtlil
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from edge_qlora.boards.build import BuildError, build, format_report, toolchain_env, undefined_collisions
from edge_qlora.boards.floorplan import pe_sites
from edge_qlora.boards.keepalive import KeepAlive, split_ports
from edge_qlora.boards.platforms import (
    BOARDS, ICEBreakerPlatform, ULX3S85FPlatform, ecp5_pll_params, ice40_pll_params, make_platform)


class MultiplyAccumulate(wiring.Component):
    """Accumulates products of operand pairs; a small design that uses DSPs, carries and FFs.

    Attributes
    ----------
    operands : stream in, ``unsigned(2 * width)``; ``a`` in the low half, ``b`` in the high half
    total : stream out, ``unsigned(2 * width)``; the running sum after each product
    clear : In(1); the next sum starts from zero
    """

    def __init__(self, width=32):
        self._width = width
        super().__init__({
            "operands": In(stream.Signature(unsigned(2 * width))),
            "total": Out(stream.Signature(unsigned(2 * width))),
            "clear": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        a = self.operands.payload[:self._width]
        b = self.operands.payload[self._width:]
        product = Signal(2 * self._width)
        product_valid = Signal()
        advance = self.total.ready | ~self.total.valid
        m.d.comb += self.operands.ready.eq(advance)
        with m.If(advance):
            m.d.sync += [product.eq(a * b), product_valid.eq(self.operands.valid),
                         self.total.valid.eq(product_valid)]
            with m.If(product_valid):
                m.d.sync += self.total.payload.eq(Mux(self.clear, 0, self.total.payload) + product)
        return m


class DelayLine(wiring.Component):
    """``depth`` stages of 32 flip-flops: one logic cell per bit, cheap to synthesise."""

    def __init__(self, depth):
        self._depth = depth
        super().__init__({"sample": In(32), "delayed": Out(32)})

    def elaborate(self, platform):
        m = Module()
        taps = [Signal(32, name=f"tap_{k}") for k in range(self._depth)]
        m.d.sync += taps[0].eq(self.sample)
        m.d.sync += [later.eq(earlier) for earlier, later in zip(taps, taps[1:])]
        m.d.comb += self.delayed.eq(taps[-1])
        return m


class Buffer(wiring.Component):
    """A 64-bit by 512 memory with one write and one read port, marked ``no_rw_check`` or not."""

    def __init__(self, no_rw_check):
        self._attrs = {"no_rw_check": 1} if no_rw_check else {}
        super().__init__({"write_addr": In(9), "write_data": In(64), "write_en": In(1),
                          "read_addr": In(9), "read_en": In(1), "read_data": Out(64)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.buffer = buffer = Memory(shape=64, depth=512, init=[], attrs=self._attrs)
        write, read = buffer.write_port(), buffer.read_port()
        m.d.comb += [write.addr.eq(self.write_addr), write.data.eq(self.write_data), write.en.eq(self.write_en),
                     read.addr.eq(self.read_addr), read.en.eq(self.read_en), self.read_data.eq(read.data)]
        return m


class MissingCell(wiring.Component):
    flag: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.submodules.cell = Instance("no_such_cell", o_Y=self.flag)
        return m


class NoOutputs(wiring.Component):
    sample: In(8)

    def elaborate(self, platform):
        return Module()


# --- fast checks: PLL arithmetic, the wrapper in simulation, argument errors ----------------------

@pytest.mark.parametrize("f_in, f_out, expected", [
    (12, 24, (0, 63, 5, 1, 24.0)),      # icepll -i 12 -o 24
    (12, 30, (0, 79, 5, 1, 30.0)),      # icepll -i 12 -o 30
])
def test_ice40_pll_matches_icepll(f_in, f_out, expected):
    p = ice40_pll_params(f_in, f_out)
    assert (p.divr, p.divf, p.divq, p.filter_range, p.f_out_mhz) == expected


@pytest.mark.parametrize("f_in, f_out, expected", [
    (25, 100, (1, 4, 6, 2, 100.0)),     # ecppll -i 25 -o 100
    (25, 66, (8, 21, 9, 4, 65.625)),    # ecppll -i 25 -o 66
])
def test_ecp5_pll_matches_ecppll(f_in, f_out, expected):
    p = ecp5_pll_params(f_in, f_out)
    assert (p.clki_div, p.clkfb_div, p.clkop_div, p.clkop_cphase, p.f_out_mhz) == expected


def test_platform_targets():
    assert set(BOARDS) == {"icebreaker", "ulx3s-85f"}
    assert ICEBreakerPlatform().default_clk_frequency == 24e6
    assert ULX3S85FPlatform().default_clk_frequency == 100e6
    assert ULX3S85FPlatform(target_mhz=25).pll is None
    assert "openFPGALoader" not in ULX3S85FPlatform().required_tools
    with pytest.raises(ValueError, match=r"iCE40 PLL cannot make 10 MHz from 12 MHz"):
        ICEBreakerPlatform(target_mhz=10)
    with pytest.raises(ValueError, match=r"unknown board 'de10'"):
        make_platform("de10")


def test_split_ports_flows():
    inputs, outputs = split_ports(MultiplyAccumulate(8))
    assert [path for path, _ in inputs] == [
        ("operands", "payload"), ("operands", "valid"), ("total", "ready"), ("clear",)]
    assert [path for path, _ in outputs] == [
        ("operands", "ready"), ("total", "payload"), ("total", "valid")]


def test_keepalive_exercises_design():
    dut = KeepAlive(MultiplyAccumulate(8), digest_width=2)
    mac = dut.design
    seen = {"operands_valid": set(), "total_ready": set(), "clear": set(), "digest": set()}

    async def watch(ctx):
        for _ in range(300):
            await ctx.tick()
            seen["operands_valid"].add(ctx.get(mac.operands.valid))
            seen["total_ready"].add(ctx.get(mac.total.ready))
            seen["clear"].add(ctx.get(mac.clear))
            seen["digest"].add(ctx.get(dut.digest))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(watch)
    sim.run()
    # every control input takes both values, and the folded outputs keep changing
    assert seen["operands_valid"] == seen["total_ready"] == seen["clear"] == {0, 1}
    assert seen["digest"] == {0, 1, 2, 3}
    assert dut.latency == 4    # capture, 18 output bits -> 5 -> 2, then the digest register


def test_keepalive_rejects():
    with pytest.raises(ValueError, match=r"NoOutputs has no output ports"):
        KeepAlive(NoOutputs())
    with pytest.raises(TypeError, match=r"design must be a wiring.Component"):
        KeepAlive("mac")


def test_build_argument_errors(tmp_path):
    with pytest.raises(BuildError, match=r"unknown board 'de10'"):
        build(MultiplyAccumulate(), "de10", tmp_path / "out")
    with pytest.raises(BuildError, match=r"does not exist"):
        build(MultiplyAccumulate(), "icebreaker", tmp_path / "missing" / "out")
    with pytest.raises(BuildError, match=r"has no output ports"):
        build(NoOutputs(), "icebreaker", tmp_path / "out")
    with pytest.raises(BuildError, match=r"^router must be 'router1' or 'router2', not 'pathfinder'$"):
        build(MultiplyAccumulate(), "icebreaker", tmp_path / "out", router="pathfinder")
    with pytest.raises(BuildError, match=r"^lut_mapper must be 'abc9' or 'abc', not 'flowmap'$"):
        build(MultiplyAccumulate(), "icebreaker", tmp_path / "out", lut_mapper="flowmap")


@pytest.mark.slow
@pytest.mark.parametrize("no_rw_check", [False, True], ids=["plain", "no_rw_check"])
def test_undefined_collisions(tmp_path, no_rw_check):
    text = undefined_collisions(rtlil.convert(Buffer(no_rw_check)))
    masks = re.findall(r"parameter \\COLLISION_X_MASK (\S+)", text)
    assert masks == (["1'1"] if no_rw_check else ["1'0"])
    # Yosys: a bare block RAM when marked; otherwise soft logic emulates read-before-write on collisions
    (tmp_path / "top.il").write_text(text)
    script = "read_rtlil top.il; synth_ecp5 -top top; tee -q -o stat.txt stat"
    subprocess.run([toolchain_env()["YOSYS"], "-q", "-p", script], cwd=tmp_path, capture_output=True, check=True)
    stat = (tmp_path / "stat.txt").read_text()
    cells = {name: int(count) for count, name in re.findall(r"^\s+(\d+)\s+(\w+)$", stat, re.M)}
    assert cells["DP16KD"] == 2
    if no_rw_check:
        assert "TRELLIS_FF" not in cells and "LUT4" not in cells
    else:
        assert cells["TRELLIS_FF"] > 64


# --- bitstream builds -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("board, suffix, lut, ff, dsp", [
    ("icebreaker", ".bin", "ICESTORM_LC", "ICESTORM_LC", "ICESTORM_DSP"),
    ("ulx3s-85f", ".bit", "TRELLIS_COMB", "TRELLIS_FF", "MULT18X18D"),
])
def test_smoke_build(tmp_path, board, suffix, lut, ff, dsp):
    steps = []
    report = build(MultiplyAccumulate(32), board, tmp_path / board, progress=steps.append)

    assert [step.split(":")[0] for step in steps[:4]] == [
        "elaborate", "yosys", f"nextpnr-{'ice40' if board == 'icebreaker' else 'ecp5'}",
        "icepack" if board == "icebreaker" else "ecppack"]
    bitstream = Path(report["bitstream"])
    assert bitstream.suffix == suffix and bitstream.stat().st_size > 0
    assert json.loads((tmp_path / board / "report.json").read_text()) == report
    assert report["board"] == board
    assert report["target_mhz"] == BOARDS[board].default_target_mhz
    assert report["fmax_mhz"]["sync"] > 0
    assert all(mhz > 0 for mhz in report["fmax_mhz"].values())
    for cell in (lut, ff, dsp):
        used, available = report["utilization"][cell]
        assert 0 < used <= available
    assert report["seconds"] > 0
    assert "fmax" in format_report(report)


@pytest.mark.slow
def test_place_only(tmp_path):
    # with classic ABC for the LUT mapping too (one build for both options)
    report = build(MultiplyAccumulate(32), "ulx3s-85f", tmp_path / "placed", place_only=True, lut_mapper="abc")
    assert "abc -lut 4:7" in (tmp_path / "placed" / "top.ys").read_text()
    assert report["notes"] == ["LUTs mapped with classic ABC (lut_mapper='abc')"]
    assert report["placed_only"] and report["bitstream"] is None
    assert not list((tmp_path / "placed").glob("*.bit"))
    assert report["fmax_mhz"]["sync"] > 0          # nextpnr's estimate before routing, from its log
    assert report["utilization"]["MULT18X18D"][0] > 0
    assert "placed only" in format_report(report)


@pytest.mark.slow
def test_too_large_for_up5k(tmp_path):
    # 180 x 32 flip-flops, one logic cell each, against 5280 logic cells
    with pytest.raises(BuildError, match=r"^design needs \d+ LUT4 logic cells \(ICESTORM_LC\) "
                                         r"but iCE40UP5K-SG48 has 5280$"):
        build(DelayLine(180), "icebreaker", tmp_path / "big")


@pytest.mark.slow
def test_toolchain_failure(tmp_path):
    with pytest.raises(BuildError, match=r"^yosys \(synthesis\) failed: Module `\\no_such_cell' "
                                         r"referenced .* is not part of the design"):
        build(MissingCell(), "icebreaker", tmp_path / "missing_cell")


# --- the DSP floorplan inside the build, with stand-ins for the tools ----------------------------

_FAKE_TOOLS = {
    # Yosys: a netlist holding a 2x3 PE array and one other DSP
    "YOSYS": """
cells = {f"design.array.pe_{r}_{c}_mult": {"type": "MULT18X18D", "attributes": {}} for r in range(2) for c in range(3)}
cells["design.dequantizer.scale_mul"] = {"type": "MULT18X18D", "attributes": {}}
json.dump({"modules": {"top": {"cells": cells}}}, open("top.json", "w"))
""",
    # nextpnr: records the BEL attributes it was given, reports a routed 100 MHz clock
    "NEXTPNR_ECP5": """
cells = json.load(open(sys.argv[sys.argv.index("--json") + 1]))["modules"]["top"]["cells"]
json.dump({name: cell["attributes"].get("BEL") for name, cell in cells.items()}, open("bels.json", "w"))
json.dump({"fmax": {"$glbnet$cd_sync.clk": {"achieved": 101.5, "constraint": 100.0}},
           "utilization": {"MULT18X18D": {"used": 7, "available": 156}}}, open("nextpnr-report.json", "w"))
open("top.tim", "w").write("Info: done\\n")
""",
    "ECPPACK": 'open("top.bit", "wb").write(b"bits")\n',
}


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    import edge_qlora.boards.build as build_module
    env = dict(toolchain_env())
    for var, body in _FAKE_TOOLS.items():
        script = tmp_path / f"fake_{var.lower()}.py"
        script.write_text(f"#!{sys.executable}\nimport json, sys\n{body}")
        script.chmod(0o755)
        env[var] = str(script)
    monkeypatch.setattr(build_module, "toolchain_env", lambda: env)
    return env


def test_floorplan_between_yosys_and_nextpnr(tmp_path, fake_toolchain):
    steps = []
    report = build(MultiplyAccumulate(8), "ulx3s-85f", tmp_path / "fp", floorplan=True, progress=steps.append)
    assert [step.split(":")[0] for step in steps] == ["elaborate", "yosys", "floorplan", "nextpnr-ecp5", "ecppack",
                                                       "done"]
    bels = json.loads((tmp_path / "fp" / "bels.json").read_text())
    assert bels.pop("design.dequantizer.scale_mul") is None
    assert bels == {f"design.array.pe_{r}_{c}_mult": site for (r, c), site in pe_sites(2, 3).items()}
    assert report["floorplan"] == 6 and report["fmax_mhz"] == {"sync": 101.5}
    assert report["notes"] == ["6 PE multipliers pinned to the DSP floorplan"]

    report = build(MultiplyAccumulate(8), "ulx3s-85f", tmp_path / "plain")
    assert set(json.loads((tmp_path / "plain" / "bels.json").read_text()).values()) == {None}
    assert "floorplan" not in report and "notes" not in report


def test_floorplan_refused_where_it_does_not_apply(tmp_path, fake_toolchain):
    with pytest.raises(BuildError, match=r"^the DSP floorplan is for the LFE5U-85F \(ulx3s-85f\), not the "
                                         r"iCE40UP5K of icebreaker$"):
        build(MultiplyAccumulate(8), "icebreaker", tmp_path / "ice", floorplan=True)
    yosys = Path(fake_toolchain["YOSYS"])
    yosys.write_text(yosys.read_text().replace("range(2)", "range(0)"))
    with pytest.raises(BuildError, match=r"^floorplan: no PE multipliers"):
        build(MultiplyAccumulate(8), "ulx3s-85f", tmp_path / "none", floorplan=True)


def test_clock_constraint_follows_the_pll_output(tmp_path, fake_toolchain):
    # Yosys kept the PLL output under another name than the constrained cd_sync.clk
    yosys = Path(fake_toolchain["YOSYS"])
    yosys.write_text(yosys.read_text().replace(
        'json.dump({"modules": {"top": {"cells": cells}}}',
        'cells["cd_sync.pll"] = {"type": "EHXPLLL", "attributes": {}, "connections": {"CLKOP": [7]}}\n'
        'netnames = {"cd_sync.lock_sync.por_clk": {"bits": [7], "hide_name": 0}, '
        '"$auto$clk": {"bits": [7], "hide_name": 1}, "design.x": {"bits": [8], "hide_name": 0}}\n'
        'json.dump({"modules": {"top": {"cells": cells, "netnames": netnames}}}'))
    nextpnr = Path(fake_toolchain["NEXTPNR_ECP5"])
    nextpnr.write_text(nextpnr.read_text() + 'open("constraints.txt", "w").write(open("top.lpf").read())\n')
    build(MultiplyAccumulate(8), "ulx3s-85f", tmp_path / "b")
    lpf = (tmp_path / "b" / "constraints.txt").read_text()
    assert 'FREQUENCY NET "cd_sync.lock_sync.por_clk" 100000000.0 HZ;' in lpf
    assert "cd_sync.clk" not in lpf and 'FREQUENCY PORT "clk25_0__io" 25000000.0 HZ;' in lpf


def test_live_status_from_the_tool_logs(tmp_path, fake_toolchain):
    nextpnr = Path(fake_toolchain["NEXTPNR_ECP5"])
    nextpnr.write_text(nextpnr.read_text().replace('open("top.tim", "w").write("Info: done\\n")', '''
import time
with open("top.tim", "w") as log:
    for line in ["Info: Packing IOs..", "Info:     at iteration #3, type ALL: wirelen solved = 1",
                 "Info: Routing..", "Info:       1000 |        0        999 |    0   999 |    122457|  0.4  0.4|"]:
        log.write(line + "\\n")
        log.flush()
        time.sleep(0.6)
'''))
    seen = []
    build(MultiplyAccumulate(8), "ulx3s-85f", tmp_path / "b", status=seen.append)
    phases = [text for i, text in enumerate(seen) if text.startswith("nextpnr") and text not in seen[:i]]
    assert "nextpnr-ecp5: routing (router1, 122457 arcs left)" in phases
    assert all(text.startswith(("yosys: ", "nextpnr-ecp5: ", "ecppack: ")) for text in seen)
    assert phases.index("nextpnr-ecp5: routing (router1, 122457 arcs left)") > 0
