# amaranth: UnusedElaboratable=no
"""``edge-qlora step --memory`` (the memory-fed step against the DRAM model) and ``--json``, and ``tinyllama
--memory``'s options: the report's lines, one JSON object on stdout, and every refusal in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from reference import run_cli

CASE = ("--tokens", 2, "--in-features", 16, "--out-features", 8, "--rank", 2)


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "case.safetensors"
    assert run_cli("make-case", path, *CASE) == 0
    return path


def one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("edge-qlora: error: "), err


def test_step_memory_report_and_next_case(case_path, tmp_path, capsys):
    from edge_qlora.formats import load_case
    from edge_qlora.golden import lora
    from edge_qlora.sim.memstep import mem_step_config
    out = tmp_path / "next.safetensors"
    capsys.readouterr()
    assert run_cli("step", case_path, out, "--memory", "ulx3s-sdram", "--rows", 2, "--cols", 2, "-q") == 0
    printed = capsys.readouterr().out
    for fragment in ("memory ulx3s-sdram", "results y and dx, no gradients", "LOAD_X", "F2", "UPD_B", "total",
                     "stall cycles: memory ", "compute ", "bytes read: ", "codes ", "absmax2 ", "bytes written: ",
                     "param ", "bandwidth: ", "GB/s", "of ulx3s-sdram's 0.200 GB/s peak", "cycle model with memory: ",
                     "PE utilization"):
        assert fragment in printed, fragment
    # OUT: the next case (factors and moments read back from memory) and y, dx; no gradients
    written = load_file(str(out))
    assert "y" in written and "dx" in written and "grad_A" not in written and "grad_B" not in written
    case = load_case(str(case_path))
    expected = lora.step_model(case, mem_step_config(case, "ulx3s-sdram", 2, 2).step.chunk)
    for name in ("y", "dx", "lora_A", "lora_B", *lora.STATE_NAMES):
        assert torch.equal(written[name], expected[name]), name
    assert load_case(str(out)).step == case.step + 1


def test_step_memory_json_ddr3(case_path, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli("step", case_path, tmp_path / "o.safetensors", "--memory", "ecpix5-ddr3", "--rows", 2,
                   "--cols", 4, "--json", "-q") == 0
    out = capsys.readouterr().out
    report = json.loads(out)            # exactly one JSON object, nothing else on stdout
    assert out.count("\n") == 1 and isinstance(report, dict)
    for key in ("cycles", "phase_cycles", "stall_cycles", "bytes_read", "bytes_written", "read_bytes",
                "written_bytes", "utilization", "bandwidth_gbps", "model_cycles", "memory"):
        assert key in report, key
    assert report["memory"] == "ecpix5-ddr3"
    assert set(report["stall_cycles"]) == {"memory", "compute"}
    assert report["bytes_read"] == sum(report["read_bytes"].values()) > 0
    assert report["bytes_written"] == sum(report["written_bytes"].values()) > 0
    assert set(report["written_bytes"]) == {"y", "dx", "param", "m", "v"}
    t, d_in, d_out, r = 2, 16, 8, 2
    macs = 2 * t * d_in * d_out + 3 * t * r * (d_in + d_out)
    assert report["utilization"] == pytest.approx(macs / (2 * 4 * report["cycles"]))
    moved = report["bytes_read"] + report["bytes_written"]
    assert report["bandwidth_gbps"] == pytest.approx(moved / report["cycles"] * 100 / 1e3)
    assert report["model_cycles"] > 0 and sum(report["phase_cycles"].values()) > 0


def test_step_json_without_memory(case_path, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli("step", case_path, tmp_path / "o.safetensors", "--backend", "golden", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory"] is None and report["cycles"] is None and report["model_cycles"] > 0
    assert "phase_cycles" in report and "stall_cycles" not in report


@pytest.mark.parametrize("argv, fragment", [
    (["--memory", "ulx3s-sdram", "--backend", "golden"], "needs --backend pysim or verilator"),
    (["--memory", "ecpix5-ddr3", "--rows", 2, "--cols", 2], "the DDR3 port needs --cols >= 4"),
    (["--memory", "ulx3s-sdram", "--rows", 8, "--cols", 2], "must be a multiple of the engine's rows"),
    (["--memory", "ulx3s-sdram", "--rows", 3, "--cols", 2], "power of two"),
])
def test_step_memory_refusals(case_path, tmp_path, capsys, argv, fragment):
    out = tmp_path / "o.safetensors"
    capsys.readouterr()
    assert run_cli("step", case_path, out, *argv) == 2
    one_line_error(capsys, fragment)
    assert not out.exists()


def test_step_memory_shape_error_from_run(case_path, tmp_path, capsys, monkeypatch):
    """A ValueError of run_mem_step (its shape checks) ends in one line, exit status 2."""
    import edge_qlora.sim.memstep as memstep

    def refuse(*args, **kwargs):
        raise ValueError("d_in = 32 must be a multiple of the engine's columns (64): the step writes whole tiles")
    monkeypatch.setattr(memstep, "run_mem_step", refuse)
    capsys.readouterr()
    assert run_cli("step", case_path, tmp_path / "o.safetensors", "--memory", "ulx3s-sdram", "--rows", 2,
                   "--cols", 2) == 2
    one_line_error(capsys, "with --memory ulx3s-sdram: d_in = 32 must be a multiple")


def test_tinyllama_memory_option(capsys, monkeypatch):
    capsys.readouterr()
    assert run_cli("tinyllama", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--memory {ulx3s-sdram,ecpix5-ddr3}" in out and "memory-fed step" in out
    assert run_cli("step", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--memory" in out and "--json" in out and "no grad_A/grad_B" in out
    # the shapes are checked before the first run (nothing simulated here)
    import edge_qlora.cli as cli
    import edge_qlora.tinyllama as tinyllama
    monkeypatch.setattr(cli, "_check_outputs", lambda *args, **kwargs: None)
    monkeypatch.setattr(tinyllama, "run_projection", pytest.fail)
    assert run_cli("tinyllama", "--memory", "ecpix5-ddr3", "--cols", 2, "--projections", "q_proj") == 2
    one_line_error(capsys, "the DDR3 port needs --cols >= 4")
    assert run_cli("tinyllama", "--memory", "ulx3s-sdram", "--tokens", 12, "--projections", "q_proj") == 2
    one_line_error(capsys, "q_proj at T=12 on the 8x8 array: t = 12 must be a multiple of the engine's rows")


def test_projection_through_memory(monkeypatch):
    """run_projection(memory=...): the memory-fed step's run (here its bit-accurate outputs, no gradients, and
    made-up counters instead of the Verilator run), the contract on the outputs there are, the memory columns."""
    import edge_qlora.sim.memstep as memstep
    from edge_qlora.golden import lora
    from edge_qlora.rtl.lora import LoraConfig
    from edge_qlora.rtl.lora.memstep import MemStepConfig
    from edge_qlora.tinyllama import ProjectionRun, format_table, run_projection
    calls = []

    def fake_run(case, config, *, memory, backend, progress=None, status=None, **kwargs):
        assert isinstance(config, MemStepConfig) and config.port.data_width == 64 and backend == "verilator"
        calls.append(memory)
        outputs = {k: v for k, v in lora.step_model(case, config.step.chunk).items() if not k.startswith("grad_")}
        return memstep.MemStepRun(outputs, 2000, {"memory": 300, "compute": 900},
                                  {"x": 256, "codes": 1024}, {"y": 128, "dx": 256}, {"F1": 100})
    monkeypatch.setattr(memstep, "run_mem_step", fake_run)
    # a shape where the bit-accurate step meets the contract (the smallest do not: too few values per output)
    step = LoraConfig(rows=2, cols=4, max_t=16, max_in=64, max_out=64, max_rank=4)
    run = run_projection("q_proj", 64, 64, 16, 4, 2, 4, config=step, memory="ecpix5-ddr3")
    assert calls == ["ecpix5-ddr3"] and run.contract_passed and not run.worst_output.startswith("grad_")
    assert (run.memory, run.stall_cycles, run.bytes_read, run.bytes_written) == \
        ("ecpix5-ddr3", {"memory": 300, "compute": 900}, 1280, 384)
    assert run.bandwidth_gbps == pytest.approx(1664 / 2000 * 100 / 1e3) and run.model_cycles > 0
    macs = 2 * 16 * 64 * 64 + 3 * 16 * 4 * (64 + 64)
    assert run.utilization == pytest.approx(macs / (8 * 2000))
    table = format_table([run])
    assert "| memory | memory stalls | compute stalls | bytes read | bytes written | bandwidth |" in table
    assert "| ecpix5-ddr3 | 300 | 900 | 1,280 | 384 | 0.083 GB/s |" in table
    assert json.loads(json.dumps(run.to_dict()))["memory"] == "ecpix5-ddr3"
    # without memory: neither the columns nor the JSON keys
    plain = ProjectionRun("q_proj", 32, 16, 4, 2, 2, 4, 2000, 1900, 0.5, 1.0, True, 0.9, "y", 1000, {})
    assert "bandwidth" not in format_table([plain]) and "memory" not in plain.to_dict()


@pytest.fixture(scope="module")
def blocked_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("blocked") / "case.safetensors"
    assert run_cli("make-case", path, "--tokens", 4, "--in-features", 256, "--out-features", 64, "--rank", 2) == 0
    return path


def test_step_blocked_json_and_next_case(blocked_case, tmp_path, capsys):
    # the blocked step top (forward, backward, update of A and B on one design) on Verilator where installed:
    # every result, the gradients too, equal to the golden step; one JSON object with each part's figures
    from edge_qlora.formats import load_case
    from edge_qlora.golden import lora
    from edge_qlora.sim import verilator
    out = tmp_path / "next.safetensors"
    capsys.readouterr()
    backend = "verilator" if verilator.available() else "pysim"
    assert run_cli("step", blocked_case, out, "--memory", "ulx3s-sdram", "--blocked", "--rows", 2, "--cols", 2,
                   "--backend", backend, "--json", "-q") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top"] == "blocked" and report["blocks"] == {"forward": [4, 64], "backward": [4, 128]}
    assert set(report["phase_cycles"]) == {"forward", "backward", "update_A", "update_B"}
    assert report["cycles"] == sum(report["phase_cycles"].values())
    assert set(report["stall_cycles"]) == {"memory", "compute"}
    assert report["bytes_read"] == sum(report["read_bytes"].values()) > 0
    assert report["read_bytes"]["update_A"] == 16 * 2 * 256 and report["written_bytes"]["update_B"] == 12 * 2 * 64
    assert abs(report["model_error"]) < 0.2
    written = load_file(str(out))
    case = load_case(str(blocked_case))
    expected = lora.step_model(case)
    for name in ("y", "dx", "grad_A", "grad_B", "lora_A", "lora_B", *lora.STATE_NAMES):
        assert torch.equal(written[name], expected[name]), name


@pytest.mark.parametrize("args, fragment", [
    (("--blocked",), "--blocked runs the blocked step top against a DRAM model: it needs --memory"),
    (("--blocked", "--memory", "ulx3s-sdram", "--max-features", 32), "--max-features must be at least 64"),
    (("--blocked", "--memory", "ulx3s-sdram", "--rows", 8), "max_tokens must be a positive multiple of rows (8)"),
])
def test_step_blocked_refusals(blocked_case, tmp_path, capsys, args, fragment):
    capsys.readouterr()
    assert run_cli("step", blocked_case, tmp_path / "o.safetensors", *args, "-q") != 0
    one_line_error(capsys, fragment)


def test_step_blocked_refuses_a_narrow_input(case_path, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli("step", case_path, tmp_path / "o.safetensors", "--memory", "ulx3s-sdram", "--blocked",
                   "-q") != 0
    one_line_error(capsys, "in (16) must be a multiple of 64 and at least 128")
