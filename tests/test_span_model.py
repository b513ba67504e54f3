"""The step top's products' cycle model with memory (``sim/span_model.py``) against the cycles measured on
Verilator (``docs/span_model.json``, ``docs/blocked_step_sdram.json``; the runs themselves take minutes:
``scripts/span_model_check.py``, ``scripts/blocked_step.py --run``)."""

import json
from pathlib import Path

import pytest

from edge_qlora import bench
from edge_qlora.sim.blocked_schedule import codes_feed, job_cycles
from edge_qlora.sim.span_model import backward_cycles, forward_cycles

DOCS = Path(__file__).resolve().parent.parent / "docs"
SHAPES = {"q_proj": (2048, 2048), "k_proj": (2048, 256), "gate_proj": (2048, 5632), "down_proj": (5632, 2048)}


def _config(memory):
    return bench.blocked_step_config(bench.options(memory=memory)).product


@pytest.mark.parametrize("memory", ["ulx3s-sdram", "ecpix5-ddr3"])
def test_small_shapes(memory):
    config = _config(memory)
    rows = [row for row in json.loads((DOCS / "span_model.json").read_text()) if row["memory"] == memory]
    assert len(rows) >= 20
    assert {row.get("set") for row in rows} == {"fit", "held-out"}
    for row in rows:
        model = forward_cycles if row["part"] == "forward" else backward_cycles
        cycles = model(config, memory, *row["shape"], *row["blocks"], config.rank)
        # the model's figure is the one recorded: within 3% of the RTL's on the shapes it was written against, and
        # on those held out within 3% but one backward product at -3.5% (docs/blocked.md)
        assert cycles == row["model_cycles"], row
        assert abs(cycles / row["cycles"] - 1) < (0.03 if row["set"] == "fit" else 0.04), row


def test_tinyllama_k_proj():
    config = _config("ulx3s-sdram")
    (row,) = [row for row in json.loads((DOCS / "blocked_step_sdram.json").read_text())
              if row["projection"] == "k_proj"]
    t, (d_in, d_out) = row["tokens"], SHAPES["k_proj"]
    for part, model in (("forward", forward_cycles), ("backward", backward_cycles)):
        cycles = model(config, "ulx3s-sdram", t, d_in, d_out, *row["blocks"][part], config.rank)
        assert cycles == row["part_model_cycles"][part]
        assert abs(cycles / row["part_cycles"][part] - 1) < 0.03


def test_fewer_tokens_take_fewer_cycles():
    config = _config("ulx3s-sdram")
    for model, blocks in ((forward_cycles, 256), (backward_cycles, 128)):
        cycles = [model(config, "ulx3s-sdram", t, 256, 256, t, blocks, config.rank) for t in (8, 16, 32, 64)]
        assert cycles == sorted(cycles) and cycles[0] > 0


def test_narrow_codes_feed_slows_the_transposed_job():
    """On the ULX3S's 16-bit port the codes FIFO gives the engine 4 NF4 codes a cycle: a transposed W tile loads in
    twice the cycles, which a short block job shows (Verilator: 13,878 cycles a job at 32 x 384, 13,154 with the
    full feed) and a long one hides."""
    sdram, ddr3 = _config("ulx3s-sdram"), _config("ecpix5-ddr3")
    assert codes_feed(sdram) == 4 and codes_feed(ddr3) is None
    short = [job_cycles(sdram, 32, 384, True, feed=feed) for feed in (None, 4)]
    assert 600 < short[1] - short[0] < 800
    long = [job_cycles(sdram, 128, 384, True, feed=feed) for feed in (None, 4)]
    assert long[1] - long[0] < short[1] - short[0]
    assert job_cycles(ddr3, 32, 384, True, feed=codes_feed(ddr3)) == job_cycles(ddr3, 32, 384, True)
