# amaranth: UnusedElaboratable=no
"""The blocked step: the whole step on one top (rtl/blocked_step.py, sim/blocked_step.py) against the golden step,
and scripts/blocked_step.py, the measured parts side by side against the step's lower bound; bad input is a
one-line error."""

import dataclasses
import importlib.util
import json
import pathlib

import pytest
import torch

from edge_qlora.golden import traffic
from edge_qlora.golden.lora import random_case, step_model
from edge_qlora.golden.rank_gradient import x_chunk_fields
from edge_qlora.golden.rank_term import backward_rows, forward_rows
from edge_qlora.rtl.blocked import BlockedConfig
from edge_qlora.rtl.blocked_step import BlockedStep, StepConfig
from edge_qlora.rtl.memport import MemPortConfig
from edge_qlora.rtl.update import UpdateConfig
from edge_qlora.sim.blocked_step import PARTS, run_blocked_step, step_config
from edge_qlora.sim.streams import Stalls

from reference import long_run_backend, mismatches

RUN_STALLS = ("descriptor", "fill", "written", "report")

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("blocked_step", _ROOT / "scripts" / "blocked_step.py")
blocked_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(blocked_step)


def _row(name, cycles, moved, memory="ulx3s-sdram"):
    return {"projection": name, "tokens": 128, "memory": memory, "cycles": cycles, "bytes_moved": moved}


def _update(name, factor, cycles, moved, memory="ulx3s-sdram"):
    return {"projection": name, "factor": factor, "memory": memory, "cycles": cycles, "bytes": moved}


def test_rows_add_the_parts_and_divide_by_the_steps_lower_bound():
    rows = blocked_step.step_rows([_row("q_proj", 100, 1000), _row("k_proj", 5, 5)],
                                  [_row("q_proj", 300, 3000), _row("k_proj", 5, 5)],
                                  [_update("q_proj", "A", 20, 200), _update("q_proj", "B", 30, 300)])
    assert len(rows) == 1                              # k_proj has no update rows
    row = rows[0]
    bound = traffic.lower_bound(traffic.StepShape(2048, 2048, 128, 16))
    assert row["cycles"] == 450 and row["update_cycles"] == 50 and row["bytes_moved"] == 4500
    assert row["lower_bound_bytes"] == sum(bound.read.values()) + sum(bound.written.values())
    assert row["utilization"] == 2 * 128 * 2048 * 2048 / (64 * 450)
    assert row["ratio"] == 4500 / row["lower_bound_bytes"]


def test_the_committed_rows_and_bad_input(tmp_path, capsys):
    blocked_step.main(["--forward", str(_ROOT / "docs/blocked_gradient384_forward_sdram.json"),
                       "--backward", str(_ROOT / "docs/blocked_gradient384_backward_sdram.json"),
                       "--update", str(_ROOT / "docs/update_pass_sdram.json"),
                       "--json", str(tmp_path / "step.json")])
    rows = json.loads((tmp_path / "step.json").read_text())
    assert [r["projection"] for r in rows] == ["q_proj", "k_proj", "gate_proj", "down_proj"]
    assert all(1 < r["ratio"] < 2 and 0.5 < r["utilization"] < 1 for r in rows)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="error: .*No such file"):
        blocked_step.main(["--forward", str(tmp_path / "missing.json")])
    mixed = tmp_path / "ddr3.json"
    mixed.write_text(json.dumps([_row("q_proj", 1, 1, memory="ecpix5-ddr3")]))
    with pytest.raises(SystemExit, match="error: q_proj: the rows are for different T or memory"):
        blocked_step.main(["--backward", str(mixed)])
    with pytest.raises(SystemExit):
        blocked_step.main(["--run", "lm_head"])
    assert "invalid choice" in capsys.readouterr().err


def _step_case(t, d_in, d_out, seed):
    """A step with adversarial activations (a zero token row, an outlier feature, a bf16 subnormal in x and dy),
    an outlier in x past its first span, AdamW moments from earlier steps and weight decay."""
    case = random_case(t, d_in, d_out, 4, seed=seed, states=True, step=3)
    x, dy = case.x.clone(), case.dy.clone()
    for a in (x, dy):
        a[1] = 0
        a[:, 5] *= 50
        a[0, 7] = torch.finfo(torch.bfloat16).tiny / 4
    x[:, 200 % d_in] *= 1000
    return dataclasses.replace(case, x=x, dy=dy, scaling=0.75, weight_decay=0.01)


@pytest.mark.parametrize("memory, rows, cols, shape, forward, backward", [
    # one token block of 18 (a chunk of 16 and one of 2); forward feature blocks of 64, backward six column
    # blocks of 64 with grad_A's pass beside the later ones
    ("ulx3s-sdram", 2, 2, (18, 384, 128), (18, 64), (18, 64)),
    # 64-bit port words; forward feature blocks of 32, backward column blocks of 192, 192 and 128
    ("ecpix5-ddr3", 2, 4, (4, 512, 64), (4, 32), (4, 192)),
])
def test_blocked_step_runs_a_whole_step_on_one_top(memory, rows, cols, shape, forward, backward):
    # the forward product, the backward product and the updates of A and B, four descriptors on one design and
    # one memory image: y, dx, grad_A, grad_B, hb, gb, x's fields, the new A and B and their moments equal
    # golden.lora.step_model's to the bit (what a later part reads of an earlier one's writes comes from the golden
    # step; every checked value was written by the design); random stalls; on Verilator where installed
    t, d_in, d_out = shape
    case = _step_case(t, d_in, d_out, 22)
    config = step_config(case, forward, backward, memory, rows, cols)
    run = run_blocked_step(case, forward, backward, config, memory=memory,
                           stalls={name: Stalls(0.3, 90 + i) for i, name in enumerate(RUN_STALLS)},
                           backend=long_run_backend())
    want = step_model(case)
    for name, value in want.items():
        assert mismatches(value, run.outputs[name]) == 0, name
    assert mismatches(forward_rows(case), run.rows["hb"]) == 0
    assert mismatches(backward_rows(case), run.rows["gb"]) == 0
    fields = x_chunk_fields(case.x)
    assert list(run.rows["x_fields"][:len(fields)]) == list(fields)
    assert run.read_bytes == run.program_read_bytes and run.written_bytes == run.program_written_bytes
    assert run.read_bytes["update_A"] == 16 * 4 * d_in and run.written_bytes["update_B"] == 12 * 4 * d_out
    assert set(run.cycles) == set(PARTS) and all(c > 0 for c in run.cycles.values())


def test_the_step_top_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="must make the gradients"):
        StepConfig(product=BlockedConfig(transposed=True, rank=16))
    with pytest.raises(ValueError, match="share one memory port"):
        StepConfig(update=UpdateConfig(port=MemPortConfig(data_width=64)))
    with pytest.raises(TypeError, match="config must be a StepConfig"):
        BlockedStep(BlockedConfig())
    case = _step_case(4, 256, 64, 23)
    config = step_config(case, (4, 64), (4, 64))
    with pytest.raises(ValueError, match="exceed the buffers"):
        run_blocked_step(case, (4, 128), (4, 64), config)
