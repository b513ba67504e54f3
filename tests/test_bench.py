"""``edge-qlora bench``: the small mode end to end (JSON, Markdown table with its ratio columns, PNG plots), the
clocks it names, where its RTL cycles come from (the blocked step top by default, the memory-fed step with ``--top
memory-fed``, the on-chip one with ``--memory none``), and its one-line errors. Checks structure and consistency, never speed: the bench measures, tests do not
time."""

import contextlib
import io
import json
from types import SimpleNamespace

import pytest

from edge_qlora import bench
from edge_qlora.boards import fmax

from reference import run_cli



def test_small_mode(tmp_path):
    """One small-mode run (two or three minutes: the blocked step top's model check on pysim), timing the CPU on one
    thread,
    once, checked in three parts (one test, so that the run is made once however the tests are spread)."""
    out = tmp_path / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = run_cli("bench", "--small", "--json", "-q", "--threads", "1", "--warmup", "0", "--repeats", "1",
                         "--out", out)
    small = status, stdout.getvalue(), stderr.getvalue(), out
    check_small_json(small)
    check_small_cycle_model(small)
    check_small_table_and_plots(small)


def check_small_json(small):
    status, stdout, _, out = small
    assert status == 0
    report = json.loads(stdout)
    assert report == json.loads((out / "bench.json").read_text())
    assert report["mode"] == "small"
    threads = [str(n) for n in report["threads"]]
    assert threads[0] == "1"
    assert {(s["projection"], s["t"]) for s in report["steps"]} == {(p, t) for p in ("q_proj", "k_proj")
                                                                     for t in (16, 128)}
    assert report["options"]["memory"] == "ulx3s-sdram"       # the blocked step top by default
    assert report["options"]["top"] == "blocked"
    for step in report["steps"]:
        assert step["memory"] == "ulx3s-sdram" and step["top"] == "blocked"
        assert step["cycles_source"] in ("cycle model (ulx3s-sdram)", "Verilator (this run, ulx3s-sdram)") or \
            (step["cycles_source"].startswith("Verilator (measured") and
             step["cycles_source"].endswith(", ulx3s-sdram)"))
        assert 0 < step["utilization"] <= 1
        # the step runs at the SDRAM controller's 100 MHz, the clock the DRAM timing counts, not the engine's
        assert step["fmax_mhz"] == 100
        assert step["fmax_build"] == "ulx3s-sdram controller clock; GEMM engine 8x8 stands in: 107.71 MHz"
        assert step["rtl_s"] == pytest.approx(step["cycles"] / 100e6)
        assert step["limit_device_s"] < step["limit_array_s"] <= step["rtl_s"]
        for dtype in ("bf16", "fp32"):
            assert set(step["cpu_s"][dtype]) == set(threads)
            for n in threads:
                assert step["cpu_s"][dtype][n] > 0
                assert step["rtl_over_cpu"][dtype][n] == pytest.approx(step["rtl_s"] / step["cpu_s"][dtype][n])
                assert len(step["cpu_samples_s"][dtype][n]) == report["options"]["repeats"]
        assert step["rtl_over_fastest_cpu"] == pytest.approx(step["rtl_s"] / step["fastest_cpu"]["s"])
    for row in report["nf4"]:
        assert row["lanes"] == 8 and row["weights"] == 2048 and row["cycles_source"] == "pysim"
        assert 0 < row["weights_per_cycle"] <= 8
        assert row["rtl_weights_per_s"] <= row["limit_weights_per_s"]
        assert set(row["cpu_weights_per_s"]) == set(threads)
    assert {row["unit"] for row in report["nf4"]} == {"dequantize", "quantize"}
    assert report["limits"]["device_dsps"] == 156
    assert report["limits"]["array_macs_per_s"] == pytest.approx(64 * 100e6)


def check_small_cycle_model(small):
    report = json.loads(small[1])
    (check,) = report["validation"]
    assert check["source"] == "pysim" and (check["rows"], check["cols"]) == (8, 8)
    # the blocked step top at the smallest shape it takes on 8x8 (T a multiple of rows, in two column blocks of
    # 64, out one span of 64)
    assert (check["t"], check["in"], check["out"], check["r"], check["memory"], check["top"]) == \
        (8, 128, 64, 2, "ulx3s-sdram", "blocked")
    assert check["stall_cycles"]["memory"] > 0 and check["bytes_read"] > 0 and check["bytes_written"] > 0
    # the products' span model and the updates' model: -3.7% on this step (docs/bench.md); the bench reports the
    # error as it is
    assert abs(check["model_error"]) < 0.06


def check_small_table_and_plots(small):
    _, _, stderr, out = small
    text = (out / "bench.md").read_text()
    assert "| RTL vs CPU bf16, 1 thread | RTL vs fastest CPU |" in text
    assert "| RTL cycles | cycles from | memory stalls | PE util. |" in text
    assert "The step runs on the **blocked step top** (`BlockedStep`, `--memory ulx3s-sdram`, `--top blocked`" in text
    assert "**memory stall cycles included**" in text
    assert "**The QLoRA step on the blocked step top (ulx3s-sdram) on the 8x8 array" in text
    assert "RTL vs CPU 1 thr." in text
    # the step table's rows (the model-check table below it names measured shapes as "| q_proj: ...")
    step_rows = [line for line in text.splitlines() if line.startswith(("| q_proj |", "| k_proj |"))]
    assert len(step_rows) == 4
    for line in step_rows:
        # T = 128 from the whole steps measured on the top (docs/blocked_step_sdram.json), T = 16 from the model
        source = "Verilator (measured" if "| 128 |" in line else "cycle model (ulx3s-sdram)"
        assert "GEMM engine 8x8 stands in" in line and source in line
        assert line.count("slower") + line.count("faster") == 2
    assert "the 8x8 blocked step top has never been routed (placed only: 34.48 MHz estimated, " \
        "`python scripts/blocked_step.py --build build/step`)" in text
    assert "`edge-qlora build --board ulx3s-85f --rows 8 --cols 8`" in text
    assert "in multiples of one CPU thread's time in bf16" in text
    for name in ("bench_utilization.png", "bench_step_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert "written:" in stderr


def test_clocks_name_their_build():
    own = fmax.step_clock(2, 2)
    assert own.same_config and own.mhz == 72.72 and own.label == "LoRA step 2x2"
    stand_in = fmax.step_clock(8, 8)
    assert not stand_in.same_config and stand_in.label == "GEMM engine 8x8 stands in"
    assert fmax.step_clock(4, 4).build.unit == "gemm"
    assert fmax.nf4_clock("quantizer", 8).mhz == 93.6
    assert fmax.nf4_clock("dequantizer", 8).mhz == 121.91
    with pytest.raises(ValueError, match="no routed build of a 3x3 array"):
        fmax.step_clock(3, 3)
    with pytest.raises(ValueError, match="routed: 1, 4, 8, 16 lanes"):
        fmax.nf4_clock("dequantizer", 2)
    assert bench.options(fmax_mhz=50.0).fmax_mhz == 50.0


def test_measured_steps_are_used_and_dated(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([{"projection": "q_proj", "t": 16, "r": 16, "rows": 8, "cols": 8,
                                 "cycles": 2_250_000, "model_cycles": 2_249_493, "date": "2026-01-02"}]))
    opts = bench.options(small=True, measured=str(path), memory="none")
    measured = bench.load_measured(opts.measured)
    sim = bench.Simulation("pysim")
    row = bench.step_rtl("q_proj", 2048, 2048, 16, opts, measured, sim)
    assert row == {"cycles": 2_250_000, "model_cycles": bench.model_cycles(16, 2048, 2048, 16, opts),
                   "source": "Verilator (measured 2026-01-02)"}
    assert bench.step_rtl("k_proj", 2048, 256, 16, opts, measured, sim)["source"] == "cycle model"


def test_measured_steps_match_on_memory(tmp_path, monkeypatch):
    """An entry of the measured file counts for a row only with the same memory; one naming none is the on-chip
    step's; the default file follows --memory."""
    rows = {"projection": "q_proj", "t": 16, "r": 16, "rows": 8, "cols": 8, "model_cycles": 1, "date": "2026-01-02"}
    path = tmp_path / "steps.json"
    path.write_text(json.dumps([
        dict(rows, cycles=6_000_000, memory="ulx3s-sdram", stall_cycles={"memory": 500_000, "compute": 7},
             bytes_read=9_000_000, bytes_written=40_000),
        dict(rows, cycles=5_000_000, memory="ecpix5-ddr3"),
        dict(rows, cycles=2_250_000)]))
    sim = bench.Simulation("pysim")
    sdram = bench.options(small=True, measured=str(path), top="memory-fed")
    row = bench.step_rtl("q_proj", 2048, 2048, 16, sdram, bench.load_measured(path, "ulx3s-sdram"), sim)
    assert row == {"cycles": 6_000_000, "model_cycles": bench.model_cycles(16, 2048, 2048, 16, sdram),
                   "source": "Verilator (measured 2026-01-02, ulx3s-sdram)",
                   "stall_cycles": {"memory": 500_000, "compute": 7}, "bytes_read": 9_000_000, "bytes_written": 40_000}
    ddr3 = bench.options(small=True, measured=str(path), memory="ecpix5-ddr3", top="memory-fed")
    row = bench.step_rtl("q_proj", 2048, 2048, 16, ddr3, bench.load_measured(path, "ecpix5-ddr3"), sim)
    assert (row["cycles"], row["source"]) == (5_000_000, "Verilator (measured 2026-01-02, ecpix5-ddr3)")
    assert row["stall_cycles"] is None
    on_chip = bench.options(small=True, measured=str(path), memory="none")
    row = bench.step_rtl("q_proj", 2048, 2048, 16, on_chip, bench.load_measured(path), sim)
    assert (row["cycles"], row["source"]) == (2_250_000, "Verilator (measured 2026-01-02)")
    # k_proj was measured on none of them: the memory model, naming its memory
    row = bench.step_rtl("k_proj", 2048, 256, 16, ddr3, bench.load_measured(path, "ecpix5-ddr3"), sim)
    assert row["source"] == "cycle model (ecpix5-ddr3)" and row["cycles"] == row["model_cycles"]
    # the default files: the memory-fed step's with a memory, the on-chip step's with none
    monkeypatch.setattr(bench, "MEASURED_MEMORY_STEPS", path)
    monkeypatch.setattr(bench, "MEASURED_STEPS", tmp_path / "absent.json")
    assert set(bench.load_measured(None, "ulx3s-sdram")) == {("q_proj", 16, 16, 8, 8, m)
                                                             for m in ("ulx3s-sdram", "ecpix5-ddr3", "none")}
    assert bench.load_measured(None) == {} and bench.load_measured(None, "none") == {}


def test_memory_step_runs_on_verilator_within_the_limit(monkeypatch):
    """Under --verilator-max-cycles, a row is a Verilator run of the memory-fed step on the one model of the seven
    projections (as `edge-qlora tinyllama --memory` builds it), its stalls and bytes on the row."""
    calls = []

    def run_mem_step(case, config=None, *, memory=None, backend=None, max_cycles=None, **kwargs):
        calls.append((tuple(case.x.shape) + (case.dy.shape[1],), config, memory, backend, max_cycles))
        return SimpleNamespace(cycles=1_300_000, stall_cycles={"memory": 90_000, "compute": 5}, bytes_read=7,
                               bytes_written=3)

    monkeypatch.setattr("edge_qlora.sim.memstep.run_mem_step", run_mem_step)
    monkeypatch.setattr(bench.Simulation, "unavailable", staticmethod(lambda: None))
    opts = bench.options(small=True, backend="auto", verilator_max_cycles=2_000_000, top="memory-fed")
    sim = bench.Simulation(opts.backend)
    row = bench.step_rtl("k_proj", 2048, 256, 16, opts, {}, sim)
    model = bench.model_cycles(16, 2048, 256, 16, opts)
    assert model <= 2_000_000
    assert row == {"cycles": 1_300_000, "model_cycles": model, "source": "Verilator (this run, ulx3s-sdram)",
                   "stall_cycles": {"memory": 90_000, "compute": 5}, "bytes_read": 7, "bytes_written": 3}
    assert calls == [((16, 2048, 256), bench.memory_step_config(opts), "ulx3s-sdram", "verilator",
                      2 * model + 100_000)]
    # over the limit: the model, no run
    assert bench.step_rtl("q_proj", 2048, 2048, 16, opts, {}, sim)["source"] == "cycle model (ulx3s-sdram)"
    assert len(calls) == 1


def _blocked_entry(projection, memory="ulx3s-sdram", cycles=3_000_000):
    """A row as ``scripts/blocked_step.py --run --json`` writes it (the fields the bench reads)."""
    parts = ("forward", "backward", "update_A", "update_B")
    return {"projection": projection, "tokens": 128, "memory": memory, "cycles": cycles, "model_cycles": cycles - 9,
            "stall_cycles": {p: {"memory": 100, "compute": 2} for p in parts},
            "read_bytes": {p: 1000 for p in parts}, "written_bytes": {p: 10 for p in parts}}


def test_measured_blocked_steps_by_shape(tmp_path, monkeypatch):
    """The blocked top's measured rows (the script's format) count for every projection of their shape and memory,
    the stalls and bytes summed over the step's parts; the default file is docs/blocked_step_sdram.json."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_blocked_entry("k_proj"), _blocked_entry("q_proj", "ecpix5-ddr3", 9_000_000),
                                _blocked_entry("o_proj", "ecpix5-ddr3", 8_000_000)]))
    measured = bench.load_measured_blocked(path)
    assert set(measured) == {(128, 2048, 256, 16, 8, 8, "ulx3s-sdram"), (128, 2048, 2048, 16, 8, 8, "ecpix5-ddr3")}
    # a projection's own run before another of its shape
    ddr3 = bench.options(small=True, measured=str(path), memory="ecpix5-ddr3")
    for name, cycles in (("q_proj", 9_000_000), ("o_proj", 8_000_000)):
        row = bench.step_rtl(name, 2048, 2048, 128, ddr3, measured, bench.Simulation("pysim"))
        assert row["cycles"] == cycles and row["source"].endswith("ecpix5-ddr3)")
    opts = bench.options(small=True, measured=str(path))
    assert opts.blocked
    sim = bench.Simulation("pysim")
    row = bench.step_rtl("v_proj", 2048, 256, 128, opts, measured, sim)
    date = bench._file_date(path)
    assert row == {"cycles": 3_000_000, "model_cycles": bench.model_cycles(128, 2048, 256, 16, opts),
                   "source": f"Verilator (measured {date}, ulx3s-sdram, k_proj's shape)",
                   "stall_cycles": {"memory": 400, "compute": 8}, "bytes_read": 4000, "bytes_written": 40}
    assert bench.step_rtl("k_proj", 2048, 256, 128, opts, measured, sim)["source"] == \
        f"Verilator (measured {date}, ulx3s-sdram)"
    # q_proj was measured on the DDR3 only: on the SDRAM the model, naming its memory
    row = bench.step_rtl("q_proj", 2048, 2048, 128, opts, measured, sim)
    assert row["source"] == "cycle model (ulx3s-sdram)" and row["cycles"] == row["model_cycles"]
    monkeypatch.setattr(bench, "MEASURED_BLOCKED_STEPS", path)
    assert bench.load_measured_blocked(None) == measured
    assert bench.measured_default("ulx3s-sdram", "blocked") == path


def test_blocked_step_runs_on_verilator_within_the_limit(monkeypatch):
    """Under --verilator-max-cycles, a row is a Verilator run of the blocked step top on the one model of the seven
    projections (as scripts/blocked_step.py builds it), its stalls and bytes summed over the parts on the row."""
    calls = []
    parts = ("forward", "backward", "update_A", "update_B")

    def run_blocked_step(case, forward, backward, config=None, *, memory=None, backend=None, max_cycles=None,
                         **kwargs):
        calls.append((tuple(case.x.shape) + (case.dy.shape[1],), forward, backward, config, memory, backend,
                      max_cycles))
        return SimpleNamespace(cycles={p: 1000 for p in parts}, read_bytes={p: 7 for p in parts},
                               written_bytes={p: 3 for p in parts},
                               stall_cycles={p: {"memory": 90, "compute": 5} for p in parts})

    monkeypatch.setattr("edge_qlora.sim.blocked_step.run_blocked_step", run_blocked_step)
    monkeypatch.setattr(bench.Simulation, "unavailable", staticmethod(lambda: None))
    limit = bench.model_cycles(16, 2048, 256, 16, bench.options(small=True))
    opts = bench.options(small=True, backend="auto", verilator_max_cycles=limit)
    sim = bench.Simulation(opts.backend)
    row = bench.step_rtl("k_proj", 2048, 256, 16, opts, {}, sim)
    assert row == {"cycles": 4000, "model_cycles": limit, "source": "Verilator (this run, ulx3s-sdram)",
                   "stall_cycles": {"memory": 360, "compute": 20}, "bytes_read": 28, "bytes_written": 12}
    assert calls == [((16, 2048, 256), (16, 256), (16, 384), bench.blocked_step_config(opts), "ulx3s-sdram",
                      "verilator", 2 * limit + 100_000)]
    # over the limit: the model, no run
    assert bench.step_rtl("q_proj", 2048, 2048, 16, opts, {}, sim)["source"] == "cycle model (ulx3s-sdram)"
    assert len(calls) == 1


@pytest.fixture
def quick_bench(monkeypatch, tmp_path):
    """The small bench with its slow parts replaced (CPU timings, NF4 runs, the machine's description) and the
    two step simulators recorded: returns ``run(*argv) -> (report, bench.md, calls)``. No measured file."""
    calls = []

    def run_step(case, config, backend=None, **kwargs):
        calls.append(("run_step", tuple(case.x.shape) + (case.dy.shape[1], case.lora_A.shape[0]), backend, None))
        return SimpleNamespace(cycles=1000)

    def run_mem_step(case, config=None, *, memory="ulx3s-sdram", backend=None, **kwargs):
        calls.append(("run_mem_step", tuple(case.x.shape) + (case.dy.shape[1], case.lora_A.shape[0]), backend,
                      memory))
        return SimpleNamespace(cycles=2000, stall_cycles={"memory": 300, "compute": 4}, bytes_read=5000,
                               bytes_written=600)

    def run_blocked_step(case, forward, backward, config=None, *, memory="ulx3s-sdram", backend=None, **kwargs):
        calls.append(("run_blocked_step", tuple(case.x.shape) + (case.dy.shape[1], case.lora_A.shape[0]), backend,
                      memory))
        parts = ("forward", "backward", "update_A", "update_B")
        return SimpleNamespace(cycles={p: 750 for p in parts}, read_bytes={p: 1000 for p in parts},
                               written_bytes={p: 100 for p in parts},
                               stall_cycles={p: {"memory": 50, "compute": 1} for p in parts})

    def step_cpu(d_in, d_out, opts):
        one = {"median_s": 0.5, "samples_s": [0.5] * opts.repeats}
        return {t: {d: {str(n): one for n in opts.thread_counts()} for d in bench.DTYPES} for t in opts.tokens}

    monkeypatch.setattr("edge_qlora.sim.lora.run_step", run_step)
    monkeypatch.setattr("edge_qlora.sim.memstep.run_mem_step", run_mem_step)
    monkeypatch.setattr("edge_qlora.sim.blocked_step.run_blocked_step", run_blocked_step)
    monkeypatch.setattr(bench, "step_cpu", step_cpu)
    monkeypatch.setattr(bench, "nf4_cpu", lambda opts: {str(n): {"dequantize": 1e8, "quantize": 1e7}
                                                        for n in opts.thread_counts()})
    monkeypatch.setattr(bench, "nf4_rtl", lambda unit, lanes, weight, sim: (
        {"dequantizer": 300} if unit == "dequantize" else {"quantizer": 400, "absmax pass": 50}, "pysim"))
    monkeypatch.setattr(bench, "_machine", lambda: {
        "cpu": "test", "threads": 2, "load_average_at_start": None, "python": "3", "torch": "t",
        "bitsandbytes": "b", "peft": "p", "date": "2026-01-01"})
    monkeypatch.setattr(bench, "MEASURED_STEPS", tmp_path / "no_steps.json")
    monkeypatch.setattr(bench, "MEASURED_MEMORY_STEPS", tmp_path / "no_memory_steps.json")
    monkeypatch.setattr(bench, "MEASURED_BLOCKED_STEPS", tmp_path / "no_blocked_steps.json")

    def run(*argv):
        out = tmp_path / f"out{len(calls)}"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            assert run_cli("bench", "--small", "--json", "-q", "--threads", "1", "--out", out, *argv) == 0
        return json.loads(stdout.getvalue()), (out / "bench.md").read_text(), calls
    return run


def test_default_memory_runs_the_blocked_step_top(quick_bench):
    report, text, calls = quick_bench()
    # the model check: one step on the blocked top on pysim at a shape it takes; no other step runs
    assert calls == [("run_blocked_step", (8, 128, 64, 2), "pysim", "ulx3s-sdram")]
    assert (report["options"]["memory"], report["options"]["top"]) == ("ulx3s-sdram", "blocked")
    (check,) = report["validation"]
    assert (check["cycles"], check["memory"], check["stall_cycles"], check["source"], check["top"]) == \
        (3000, "ulx3s-sdram", {"memory": 200, "compute": 4}, "pysim", "blocked")
    opts = bench.options(small=True)
    for step in report["steps"]:
        assert step["cycles"] == step["model_cycles"] == bench.model_cycles(step["t"], step["in"], step["out"], 16,
                                                                            opts)
        assert step["cycles_source"] == "cycle model (ulx3s-sdram)" and step["top"] == "blocked"
        assert step["stall_cycles"] is None and step["fmax_mhz"] == 100
    assert "**blocked step top** (`BlockedStep`" in text and "| cycles from | memory stalls |" in text
    assert "| 8x8, ulx3s-sdram | 3,000 | pysim |" in text


def test_top_memory_fed_runs_the_memory_fed_step(quick_bench):
    from edge_qlora.sim.memstep import model_cycles
    from edge_qlora.tinyllama import memory_config
    report, text, calls = quick_bench("--top", "memory-fed")
    # the model check: one memory-fed step on pysim at a shape it takes; the on-chip step never runs
    assert calls == [("run_mem_step", (8, 16, 16, 2), "pysim", "ulx3s-sdram")]
    assert report["options"]["memory"] == "ulx3s-sdram"
    (check,) = report["validation"]
    assert (check["cycles"], check["memory"], check["stall_cycles"], check["source"]) == \
        (2000, "ulx3s-sdram", {"memory": 300, "compute": 4}, "pysim")
    config = memory_config("ulx3s-sdram", 8, 8, 128, 16)       # the one `edge-qlora tinyllama --memory` runs
    for step in report["steps"]:
        model = model_cycles(config, "ulx3s-sdram", step["t"], step["in"], step["out"], 16)["cycles"]
        assert step["cycles"] == step["model_cycles"] == model
        assert step["cycles_source"] == "cycle model (ulx3s-sdram)" and step["memory"] == "ulx3s-sdram"
        assert step["stall_cycles"] is None and step["fmax_mhz"] == 100
    assert "**memory stall cycles included**" in text and "| cycles from | memory stalls |" in text
    assert "The step is the **memory-fed** one (`MemStep`, `--memory ulx3s-sdram`, `--top memory-fed`)" in text
    assert "| 8x8, ulx3s-sdram | 2,000 | pysim |" in text


def test_memory_none_is_the_on_chip_step(quick_bench):
    from edge_qlora.sim.lora import step_cycles
    report, text, calls = quick_bench("--memory", "none")
    assert calls == [("run_step", (2, 16, 16, 2), "pysim", None)]       # the old model check, on the old step
    assert report["options"]["memory"] == "none" and report["options"]["validation"] == [[2, 16, 16, 2]]
    assert report["simulator"]["measured_file"] is None
    for step in report["steps"]:
        model = sum(step_cycles(step["t"], step["in"], step["out"], 16, 8, 8, optimizer="adamw").values())
        assert step["cycles"] == step["model_cycles"] == model
        assert step["cycles_source"] == "cycle model" and step["memory"] == "none"
        assert "stall_cycles" not in step
        assert step["fmax_mhz"] == 107.71 and step["fmax_build"] == "GEMM engine 8x8 stands in"
    assert report["clocks"][0]["mhz"] == 107.71
    # the table as before: no memory column, no memory line
    assert "| projection | in -> out | T | RTL cycles | cycles from | PE util. | Fmax MHz (build) | RTL ms |" in text
    assert "memory-fed" not in text and "memory stall" not in text and "sdram" not in text
    assert "**The QLoRA step on the 8x8 array" in text and "| 8x8 | 1,000 | pysim |" in text


def test_simulation_falls_back_and_labels_truly(monkeypatch):
    calls = []

    def driver(value, backend=None):
        calls.append(backend)
        if backend == "verilator":
            raise RuntimeError("Verilator build failed:\n  no compiler")
        return value

    monkeypatch.setattr(bench.Simulation, "unavailable", staticmethod(lambda: None))
    sim = bench.Simulation("auto")
    assert sim.run(driver, 3) == (3, "pysim")
    assert calls == ["verilator", "pysim"]        # pysim asked for by name, not left to the environment
    assert "Verilator build failed: no compiler" in sim.failure
    assert sim.run(driver, 4, pysim=False) == (None, None)
    with pytest.raises(Exception, match="--backend verilator: driver failed"):
        bench.Simulation("verilator").run(driver, 5)
    assert bench.Simulation("pysim").run(driver, 6) == (6, "pysim")
    assert bench.Simulation("auto").run(lambda value: value, 7) == (7, "pysim")


@pytest.mark.parametrize("argv,fragment", [
    (["--rows", "3", "--cols", "3"], "no routed build of a 3x3 array"),
    (["--threads", "0"], "threads must be counts of at least 1"),
    (["--lanes", "2"], "lanes must be among 1, 4, 8, 16"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--fmax", "-5"], "--fmax must be between 0 and 1000"),
    (["--measured", "{missing}"], "cannot read a JSON list of measured steps"),
    (["--measured", "{bad}", "--top", "memory-fed"], "every entry needs projection, t, r, rows, cols and cycles"),
    (["--measured", "{bad}"], "every entry needs a TinyLlama projection, tokens, memory, cycles"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "{missing}/deeper"], "does not exist"),
    (["--memory", "hbm"], "invalid choice: 'hbm'"),
    (["--memory", "ecpix5-ddr3", "--rows", "2", "--cols", "2", "--top", "memory-fed"],
     "--memory ecpix5-ddr3 on the 2x2 array"),
    (["--memory", "ecpix5-ddr3", "--rows", "2", "--cols", "2"],
     "--memory ecpix5-ddr3 on the blocked step top (2x2): "),
    (["--memory", "ulx3s-sdram", "--rows", "3", "--cols", "4", "--fmax", "50", "--top", "memory-fed"],
     "rows (3) must be a power of two"),
    (["--memory", "ulx3s-sdram", "--rows", "3", "--cols", "4", "--fmax", "50"], "rows must be a power of two"),
    (["--rank", "3"], "q_proj T=16: the rank (3) must be a power of two from 2 to 16"),
    (["--top", "tiled"], "invalid choice: 'tiled'"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, argv, fragment):
    (tmp_path / "file").write_text("")
    (tmp_path / "bad.json").write_text('[{"projection": "q_proj"}]')
    paths = {"missing": tmp_path / "missing", "bad": tmp_path / "bad.json", "file": tmp_path / "file"}
    argv = [a.format(**paths) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert run_cli("bench", "--small", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(("edge-qlora: error:", "edge-qlora bench: error:")) and fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
