"""scripts/blocked_step.py: the two products' committed rows side by side against the step's lower bound; bad
input is a one-line error."""

import importlib.util
import json
import pathlib

import pytest

from edge_qlora.golden import traffic

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("blocked_step", _ROOT / "scripts" / "blocked_step.py")
blocked_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(blocked_step)


def _row(name, cycles, moved, memory="ulx3s-sdram"):
    return {"projection": name, "tokens": 128, "memory": memory, "cycles": cycles, "bytes_moved": moved}


def test_rows_add_the_products_and_divide_by_the_steps_lower_bound():
    rows = blocked_step.step_rows([_row("q_proj", 100, 1000), _row("k_proj", 5, 5)],
                                  [_row("q_proj", 300, 3000)])
    assert len(rows) == 1                              # k_proj has no backward row
    row = rows[0]
    shape = traffic.StepShape(2048, 2048, 128, 16)
    bound = traffic.lower_bound(shape)
    assert row["cycles"] == 400 and row["bytes_moved"] == 4000
    assert row["lower_bound_bytes"] == sum(bound.read.values()) + sum(bound.written.values())
    assert row["utilization"] == 2 * 128 * 2048 * 2048 / (64 * 400)
    # the modelled update: gradients read back, masters and moments read and written
    update = 2 * (shape.size("A") + shape.size("B") + shape.state_bytes) + shape.size("grad_A") + shape.size("grad_B")
    assert row["ratio_with_update"] == (4000 + update) / row["lower_bound_bytes"]


def test_the_committed_rows_and_bad_input(tmp_path, capsys):
    blocked_step.main(["--forward", str(_ROOT / "docs/blocked_gradient384_forward_sdram.json"),
                       "--backward", str(_ROOT / "docs/blocked_gradient384_backward_sdram.json"),
                       "--json", str(tmp_path / "step.json")])
    rows = json.loads((tmp_path / "step.json").read_text())
    assert [r["projection"] for r in rows] == ["q_proj", "k_proj", "gate_proj", "down_proj"]
    assert all(1 < r["ratio"] < r["ratio_with_update"] for r in rows)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="error: .*No such file"):
        blocked_step.main(["--forward", str(tmp_path / "missing.json")])
    mixed = tmp_path / "ddr3.json"
    mixed.write_text(json.dumps([_row("q_proj", 1, 1, memory="ecpix5-ddr3")]))
    with pytest.raises(SystemExit, match="error: q_proj: the forward and backward rows are for different"):
        blocked_step.main(["--forward", str(_ROOT / "docs/blocked_gradient384_forward_sdram.json"),
                           "--backward", str(mixed)])
