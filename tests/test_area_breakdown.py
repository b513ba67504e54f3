"""scripts/area_breakdown.py on a hand-made netlist: cells go to the deepest module their name starts with."""

import importlib.util
import json
import pathlib

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "area_breakdown.py"
_spec = importlib.util.spec_from_file_location("area_breakdown", _PATH)
area_breakdown = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(area_breakdown)

RTLIL = """module \\top
end
module \\top.design
end
module \\top.design.step
end
module \\top.design.step.engine
end
module \\top.design.step.engine.array
end
module \\top.design.reader
end
"""


def _build(tmp_path):
    cells = {
        "design.step.engine.array.acc_3_LUT4_Z": "LUT4", "design.step.engine.array.acc_3_CCU2C_S0": "CCU2C",
        "design.step.engine.sum_LUT4_Z": "LUT4", "design.step.store.x_LUT4_Z": "LUT4",
        "design.reader.fifo.level_LUT4_Z": "LUT4", "design.start_TRELLIS_FF_Q": "TRELLIS_FF",
        "$abc$123$lut": "LUT4",
    }
    netlist = {"modules": {"top": {"attributes": {"top": "1"},
                                   "cells": {name: {"type": kind} for name, kind in cells.items()}}}}
    (tmp_path / "top.json").write_text(json.dumps(netlist))
    (tmp_path / "top.il").write_text(RTLIL)
    return tmp_path


def test_parts_by_module(tmp_path):
    build = _build(tmp_path)
    modules = area_breakdown.module_paths((build / "top.il").read_text())
    netlist = json.loads((build / "top.json").read_text())
    parts = area_breakdown.breakdown(netlist, modules, depth=2)
    assert parts["step.engine"] == {"LUT4": 2, "CCU2C": 1}          # the array's cells, cut to two levels
    assert parts["step"] == {"LUT4": 1}                             # `store` is a net of step, not a module
    assert parts["reader"] == {"LUT4": 1}
    assert parts["(the top component)"] == {"TRELLIS_FF": 1}
    assert parts["(other)"] == {"LUT4": 1}
    deep = area_breakdown.breakdown(netlist, modules, depth=3)
    assert deep["step.engine.array"] == {"LUT4": 1, "CCU2C": 1} and deep["step.engine"] == {"LUT4": 1}
    assert area_breakdown.lut_sites(parts["step.engine"]) == 4


def test_table_and_errors(tmp_path, capsys):
    assert area_breakdown.main([str(_build(tmp_path)), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "| step.engine | 4 | 2 | 1 |" in text and "(3 smaller parts)" in text and "| **total** | 7 |" in text
    assert area_breakdown.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a build folder" in err
