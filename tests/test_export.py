# amaranth: UnusedElaboratable=no
"""``edge-qlora verilog`` and ``edge-qlora cache``: the Verilog of each unit with its documented header; bad
options end in one line and exit status 2."""

import subprocess
import sys

import pytest

from edge_qlora.cli import main
from edge_qlora.rtl.export import strip_zero_init


def test_strip_zero_init_keeps_tables():
    text = ("  reg [7:0] a [1:0];\n  initial begin\n    a[0] = 8'h00;\n    a[1] = 8'd0;\n  end\n"
            "  reg [7:0] b [1:0];\n  initial begin\n    b[0] = 8'h00;\n    b[1] = 8'h2a;\n  end\n")
    stripped = strip_zero_init(text)
    assert "a[0]" not in stripped and "b[1] = 8'h2a;" in stripped and "b[0] = 8'h00;" in stripped


@pytest.mark.parametrize("unit,options,ports", [
    ("dequantizer", ["--lanes", "2"], ["tensor: input stream", "weights: output stream", "[32:32] last"]),
    ("quantizer", ["--lanes", "2"], ["weights: input stream", "n_weights: input, 32 bits", "absmax: output stream"]),
    ("absmax-quantizer", [], ["absmax: input stream", "absmax2: output stream"]),
    ("gemm", ["--rows", "2", "--cols", "2", "--max-k", "32", "--max-n", "32"], ["job: input stream", "c: output"]),
])
def test_verilog_units(tmp_path, capsys, unit, options, ports):
    out = tmp_path / "unit.v"
    assert main(["verilog", unit, "-o", str(out), *options]) == 0
    text = out.read_text()
    header = [line for line in text.splitlines() if line.startswith("//")]
    assert "module top(" in text and any("rising edge of `clk`" in line for line in header)
    for port in ports:
        assert any(port in line for line in header), port
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["verilog", "step", "--max-t", "0", "-o", "x.v"], "max_t must be"),
    (["verilog", "gemm", "--rows", "0", "-o", "x.v"], "rows must be"),
    (["verilog", "nothing", "-o", "x.v"], "invalid choice"),
    (["verilog", "dequantizer", "-o", "/nonexistent/folder/x.v"], "x.v"),
])
def test_verilog_bad_input(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "edge_qlora.cli", *argv], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cache_lists_and_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_QLORA_CACHE", str(tmp_path))
    model = tmp_path / "verilator" / "abc"
    model.mkdir(parents=True)
    (model / "key.txt").write_text("NF4Dequantizer example\n")
    assert main(["cache"]) == 0
    assert "1 models" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert not (tmp_path / "verilator").exists()
