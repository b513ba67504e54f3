"""Layering of the file formats and the output helper: golden never imports formats or the CLI; every writer goes
through one atomic-output helper."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from edge_qlora.outputs import OutputError, atomic_output, check_output

_GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden"


def test_golden_imports_neither_formats_nor_cli():
    for path in sorted(_GOLDEN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(name.split(".")[-1] in ("formats", "cli") for name in names), (path.name, names)
    loaded = subprocess.run([sys.executable, "-c", "import sys, edge_qlora.golden.lora as lora; "
                             "lora.step_peft_bf16; print('edge_qlora.formats' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_formats_uses_golden_quant_state_layout():
    from edge_qlora import formats
    from edge_qlora.golden import bnb_state
    assert formats.quant_state_dict is bnb_state.quant_state_dict


def test_atomic_output(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target, "w") as f:
            f.write("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    with atomic_output(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]
    with pytest.raises(OutputError, match=r"^cannot write .*x\.bin \(disk full\)$"):
        with atomic_output(tmp_path / "x.bin") as temp:
            open(temp, "wb").write(b"1")
            raise OSError(28, "disk full")
    assert os.listdir(tmp_path) == ["report.json"]


def test_check_output(tmp_path):
    assert check_output(tmp_path / "new.bin") == tmp_path / "new.bin"
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "missing" / "x.bin")
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "dir", tmp_path / "link")
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path / "link")
    assert os.listdir(tmp_path / "dir") == []


def test_atomic_output_files(tmp_path):
    from edge_qlora.outputs import atomic_output_files
    adapter = tmp_path / "adapter"
    with atomic_output_files(adapter) as temp:
        (pathlib.Path(temp) / "adapter_model.safetensors").write_bytes(b"one")
        (pathlib.Path(temp) / "adapter_config.json").write_text("{}")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_files(adapter) as temp:
            (pathlib.Path(temp) / "adapter_model.safetensors").write_bytes(b"tw")
            raise KeyboardInterrupt
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"one"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
