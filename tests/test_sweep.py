"""edge-qlora sweep: SPEC validation, points and their keys, tables and the Pareto front (no Ray), then real sweeps
of the iCEBreaker dequantizer on a local Ray instance: a worker killed mid-sweep, --resume, a point that does not
fit, a timeout and Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edge_qlora.cli import _parser
from edge_qlora.sweep import SpecError, load_spec as _load_spec, markdown, pareto_front, points, summary

from reference import run_cli


def load_spec(path):
    return _load_spec(path, _parser())


def spec_file(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


TINY = """
board = "icebreaker"
timeout_s = 900
[design]
lanes = 1
no_double_quant = true
[sweep]
seed = [1, 2]
place_only = [true]
"""


def test_points_and_keys(tmp_path):
    spec = load_spec(spec_file(tmp_path, """
board = "ulx3s-85f"
[design]
rows = 8
cols = 8
floorplan = false
[sweep]
seed = [1, 2, 3]
lut_mapper = ["abc", "abc9"]
place_only = [true]
"""))
    pts = points(spec)
    assert len(pts) == 6
    assert len({p["key"] for p in pts}) == 6
    # a design point is every option but the seed
    assert len({p["design_key"] for p in pts}) == 2
    assert pts[0]["argv"] == ["--board", "ulx3s-85f", "--rows", "8", "--cols", "8", "--no-floorplan", "--seed", "1",
                              "--lut-mapper", "abc", "--place-only"]
    assert pts[0]["swept"] == {"seed": 1, "lut_mapper": "abc", "place_only": True}
    # keys depend on what is built, not on the limits or the order of the tables
    again = load_spec(spec_file(tmp_path, """
board = "ulx3s-85f"
timeout_s = 60
[sweep]
lut_mapper = ["abc", "abc9"]
seed = [1, 2, 3]
place_only = [true]
[design]
floorplan = false
cols = 8
rows = 8
""", "again.toml"))
    assert {p["key"] for p in points(again)} == {p["key"] for p in pts}
    assert load_spec(spec_file(tmp_path, TINY, "tiny.toml")).memory_bytes == 1 << 30


def test_tinyllama_spec(tmp_path):
    spec = load_spec(spec_file(tmp_path, """
command = "tinyllama"
[design]
rank = 16
[sweep]
projections = ["q_proj", "k_proj"]
tokens = [16, 128]
"""))
    pts = points(spec)
    assert len(pts) == 4
    assert pts[0]["argv"] == ["--rank", "16", "--projections", "q_proj", "--tokens", "16"]


@pytest.mark.parametrize("text, message", [
    ('board = "icebreaker"\n[design]\nlane = 1\n', "lane is not an option of build (options: "),
    ('board = "icebreaker"\n[design]\nout = "x"\n', "out is not an option of build"),
    ('[design]\nlanes = 1\n', 'a build sweep needs board = "icebreaker" or "ulx3s-85f"'),
    ('board = "de10"\n', "board must be one of icebreaker, ulx3s-85f, not 'de10'"),
    ('board = "icebreaker"\nboards = 1\n', "unknown key 'boards'"),
    ('board = "icebreaker"\n[sweep]\nseed = 1\n', "[sweep] seed must be a non-empty list, not 1"),
    ('board = "icebreaker"\n[sweep]\nseed = []\n', "[sweep] seed must be a non-empty list"),
    ('board = "icebreaker"\n[sweep]\nseed = [1, 1]\n', "[sweep] seed lists a value twice"),
    ('board = "icebreaker"\n[design]\nseed = 1\n[sweep]\nseed = [2]\n', "seed is both in [design] and in [sweep]"),
    ('board = "icebreaker"\n[sweep]\nseed = ["x"]\n', "argument --seed: invalid int value: 'x'"),
    ('board = "icebreaker"\n[sweep]\nlut_mapper = ["abc8"]\n', "argument --lut-mapper: invalid choice: 'abc8'"),
    ('board = "icebreaker"\n[sweep]\nplace_only = [1]\n', "place_only must be true or false, not 1"),
    ('board = "icebreaker"\n[sweep]\nseed = [[1, 2]]\n', "seed takes one value per point"),
    ('board = "icebreaker"\ntimeout_s = -1\n', "timeout_s must be a positive number, not -1"),
    ('board = "icebreaker"\nmemory_gb = "lots"\n', "memory_gb must be a positive number"),
    ('command = "tinyllama"\nboard = "icebreaker"\n', "board applies to build sweeps, not to tinyllama"),
    ('command = "synth"\n', "command must be one of build, tinyllama, not 'synth'"),
    ('command = "tinyllama"\n[sweep]\nprojections = ["x_proj"]\n', "invalid choice: 'x_proj'"),
    ('board = "icebreaker"\n[sweep\n', "is not valid TOML"),
])
def test_bad_spec(tmp_path, text, message):
    with pytest.raises(SpecError) as error:
        load_spec(spec_file(tmp_path, text))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_errors(tmp_path, capsys):
    assert run_cli("sweep", tmp_path / "missing.toml") == 2
    assert "edge-qlora: error: cannot read SPEC" in capsys.readouterr().err
    path = spec_file(tmp_path, TINY)
    (tmp_path / "file").write_text("")
    assert run_cli("sweep", path, "--out", tmp_path / "file") == 2
    assert capsys.readouterr().err.strip().endswith("exists and is not a folder")
    assert run_cli("sweep", path, "--out", tmp_path / "no" / "such") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "sweep.json").write_text("[]")
    assert run_cli("sweep", path, "--out", tmp_path / "done") == 2
    err = capsys.readouterr().err
    assert "sweep.json exists: pass --resume to continue that sweep" in err and err.count("\n") == 1
    assert run_cli("sweep", path, "--jobs", "0") == 2


def test_cli_without_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray raises ImportError
    assert run_cli("sweep", spec_file(tmp_path, TINY), "--out", tmp_path / "out") == 2
    assert 'sweep runs on Ray, which is not installed: pip install -e ".[sweep]"' in capsys.readouterr().err


def _row(seed, luts, fmax, status="ok", seconds=10.0):
    return {"key": str(seed), "design_key": "d", "seed": seed, "status": status, "seconds": seconds,
            "error": None if status == "ok" else "does not fit", "fmax_mhz": fmax, "timing_met": fmax and fmax > 100,
            "target_mhz": 100.0, "placed_only": False,
            "utilization": {"TRELLIS_COMB": [luts, 83640], "TRELLIS_FF": [900, 83640], "MULT18X18D": [64, 156],
                            "DP16KD": [40, 208]} if status == "ok" else None}


def test_pareto_and_table(tmp_path):
    rows = [_row(1, 5000, 90.0), _row(2, 4000, 80.0), _row(3, 6000, 95.0), _row(4, 5500, 85.0),
            _row(5, None, None, status="failed")]
    front = pareto_front(rows)
    assert [row["seed"] for row in front] == [2, 1, 3]
    spec = load_spec(spec_file(tmp_path, 'board = "ulx3s-85f"\n[sweep]\nseed = [1, 2, 3, 4, 5]\n'))
    text = markdown(rows, spec, rows, 20.0)
    assert "| 3 | 95.00 | no | 6,000 | 900 | 64 | 40 | 10 |  |" in text
    assert "| 5 |  |  |  |  |  |  | 10 | does not fit |" in text
    lines = summary(rows, spec, rows, 20.0)
    assert lines[0] == "5 points: 4 ok, 1 failed or stopped"
    assert lines[1] == "Fmax (routed): 80.00 to 95.00 MHz, median 87.50 MHz, spread 15.00 MHz (16% of the best)"
    assert lines[2] == "this run: 5 points in 20 s of wall time for 50 s of point time summed (2.50x)"


def test_best_bitstream_per_design_point(tmp_path):
    from edge_qlora.sweep import _keep_best_bitstream
    rows = []
    for seed, fmax, design in ((1, 90.0, "d"), (2, 95.0, "d"), (3, 80.0, "d"), (4, 70.0, "e")):
        row = {**_row(seed, 5000, fmax), "design_key": design, "bitstream": None}
        rows.append(row)
        _keep_best_bitstream(rows, row, {"bitstream_bytes": f"seed {seed}".encode(), "bitstream_suffix": ".bit"},
                             tmp_path)
    assert [row["bitstream"] for row in rows] == [None, str(tmp_path / "bitstreams" / "d.bit"), None,
                                                  str(tmp_path / "bitstreams" / "e.bit")]
    assert (tmp_path / "bitstreams" / "d.bit").read_bytes() == b"seed 2"
    assert sorted(p.name for p in (tmp_path / "bitstreams").iterdir()) == ["d.bit", "e.bit"]


# --- real sweeps on a local Ray instance -------------------------------------------------------------------------

@pytest.fixture
def with_ray():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e \".[sweep]\")")


def _restore_sigint():
    # a test run started in the background of a non-interactive shell ignores SIGINT, and a child inherits that:
    # the sweep must see Ctrl-C as a terminal would deliver it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sweep(spec, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "edge_qlora.cli", "sweep", str(spec), "--out", str(out), "-q",
                             *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_restore_sigint)


def _pids(folder, timeout=120):
    """``(worker pid, point process group)`` once the point's task has started."""
    path = folder / "pid"
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    values = dict(line.split() for line in path.read_text().splitlines())
    return int(values["worker"]), int(values["point"])


def _gone(group, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _rows(out):
    return {row["seed"]: row for row in json.loads((out / "sweep.json").read_text())}


@pytest.mark.slow
def test_kill_worker_then_resume(tmp_path, with_ray):
    spec_path = spec_file(tmp_path, TINY)
    spec = load_spec(spec_path)
    first, second = points(spec)
    out = tmp_path / "out"
    process = _sweep(spec_path, out, "--jobs", 2)
    worker, group = _pids(out / "points" / first["key"])
    time.sleep(3)
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert _gone(group), "the killed worker's build kept running"
    rows = _rows(out)
    assert rows[1]["status"] == "lost" and rows[1]["error"].startswith("Ray worker died"), rows[1]
    assert rows[2]["status"] == "ok" and rows[2]["error"] is None
    assert 10 < rows[2]["fmax_mhz"] < 30 and rows[2]["utilization"]["ICESTORM_LC"][0] > 2000
    assert rows[2]["placed_only"] is True
    assert "| 1 | true |" in stdout and "Ray worker died" in stdout
    assert (out / "sweep.md").exists() and (out / "pareto.png").stat().st_size > 10000
    # only the small files of a point stay
    assert not [p for p in (out / "points" / second["key"] / "build").iterdir() if p.suffix in (".json", ".il")
                and p.name not in ("report.json", "nextpnr-report.json", "build_top.json")]

    # --resume runs the lost point only
    process = _sweep(spec_path, out, "--jobs", 2, "--resume")
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    again = _rows(out)
    assert again[2] == rows[2]
    assert again[1]["status"] == "ok" and again[1]["fmax_mhz"] > 10
    assert "this run: 1 points" in stdout and "1 points kept from before" in stdout
    # without --resume a finished sweep is not overwritten
    process = _sweep(spec_path, out)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "pass --resume" in stderr


@pytest.mark.slow
def test_misfit_timeout_and_interrupt(tmp_path, with_ray):
    spec_path = spec_file(tmp_path, """
board = "icebreaker"
timeout_s = 20
[sweep]
lanes = [16, 1]
place_only = [true]
""")
    out = tmp_path / "out"
    process = _sweep(spec_path, out, "--jobs", 2)
    misfit, slow = points(load_spec(spec_path))
    _, group = _pids(out / "points" / slow["key"])
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    rows = {row["lanes"]: row for row in json.loads((out / "sweep.json").read_text())}
    assert rows[16]["status"] == "failed"
    assert rows[16]["error"].startswith("a 16-lane dequantizer does not fit the icebreaker")
    assert rows[1]["status"] == "timeout" and rows[1]["error"].startswith("timed out after 20 s")
    assert _gone(group)
    assert not (out / "pareto.png").exists()     # no point has an Fmax to plot

    # Ctrl-C: exit 130, the running point's processes stopped, the finished rows kept
    process = _sweep(spec_file(tmp_path, TINY.replace("[1, 2]", "[3]"), "one.toml"), tmp_path / "stopped")
    worker, group = _pids(tmp_path / "stopped" / "points" / points(load_spec(tmp_path / "one.toml"))[0]["key"])
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().endswith("edge-qlora: interrupted")
    assert _gone(group)
