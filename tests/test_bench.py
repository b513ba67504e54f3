"""``edge-qlora bench``: the small mode end to end (JSON, Markdown table with its ratio columns, PNG plots), the
clocks it names, where its RTL cycles come from, and its one-line errors. Checks structure and consistency, never
speed: the bench measures, tests do not time."""

import contextlib
import io
import json

import pytest

from edge_qlora import bench
from edge_qlora.boards import fmax

from reference import run_cli



@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small-mode run (about half a minute): its exit status, stdout (the JSON), stderr and output folder."""
    out = tmp_path_factory.mktemp("bench") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = run_cli("bench", "--small", "--json", "-q", "--out", out)
    return status, stdout.getvalue(), stderr.getvalue(), out


def test_small_mode_json(small):
    status, stdout, _, out = small
    assert status == 0
    report = json.loads(stdout)
    assert report == json.loads((out / "bench.json").read_text())
    assert report["mode"] == "small"
    threads = [str(n) for n in report["threads"]]
    assert threads[0] == "1"
    assert {(s["projection"], s["t"]) for s in report["steps"]} == {(p, t) for p in ("q_proj", "k_proj")
                                                                     for t in (16, 128)}
    for step in report["steps"]:
        assert step["cycles_source"] in ("cycle model", "Verilator (this run)") or \
            step["cycles_source"].startswith("Verilator (measured")
        assert 0 < step["utilization"] <= 1
        assert step["fmax_mhz"] == 107.71 and step["fmax_build"] == "GEMM engine 8x8 stands in"
        assert step["rtl_s"] == pytest.approx(step["cycles"] / 107.71e6)
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
    assert report["limits"]["array_macs_per_s"] == pytest.approx(64 * 107.71e6)


def test_small_mode_checks_the_cycle_model(small):
    report = json.loads(small[1])
    (check,) = report["validation"]
    assert check["source"] == "pysim" and (check["rows"], check["cols"]) == (8, 8)
    assert abs(check["model_error"]) < 0.02


def test_small_mode_table_and_plots(small):
    _, _, stderr, out = small
    text = (out / "bench.md").read_text()
    assert "| RTL vs CPU bf16, 1 thread | RTL vs fastest CPU |" in text
    assert "RTL vs CPU 1 thr." in text
    # the step table's rows (the model-check table below it names measured shapes as "| q_proj: ...")
    step_rows = [line for line in text.splitlines() if line.startswith(("| q_proj |", "| k_proj |"))]
    assert len(step_rows) == 4
    for line in step_rows:
        assert "GEMM engine 8x8 stands in" in line
        assert line.count("slower") + line.count("faster") == 2
    assert "the 8x8 step accelerator has never been routed" in text
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
    opts = bench.options(small=True, measured=str(path))
    measured = bench.load_measured(opts.measured)
    sim = bench.Simulation("pysim")
    row = bench.step_rtl("q_proj", 2048, 2048, 16, opts, measured, sim)
    assert row == {"cycles": 2_250_000, "model_cycles": bench.model_cycles(16, 2048, 2048, 16, opts),
                   "source": "Verilator (measured 2026-01-02)"}
    assert bench.step_rtl("k_proj", 2048, 256, 16, opts, measured, sim)["source"] == "cycle model"


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
    (["--measured", "{bad}"], "every entry needs projection, t, r, rows, cols and cycles"),
    (["--out", "{file}"], "exists and is not a folder"),
    (["--out", "{missing}/deeper"], "does not exist"),
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
