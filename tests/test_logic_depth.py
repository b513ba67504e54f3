"""scripts/logic_depth.py on a hand-made netlist: deeper paths score higher, bad input is a one-line error."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "logic_depth.py"
_spec = importlib.util.spec_from_file_location("logic_depth", _PATH)
logic_depth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(logic_depth)


def _ff(d, q):
    return {"type": "TRELLIS_FF", "port_directions": {"CLK": "input", "DI": "input", "Q": "output"},
            "connections": {"CLK": [1], "DI": [d], "Q": [q]}}


def _lut(inputs, z):
    return {"type": "LUT4", "port_directions": {p: "input" for p in "ABCD"} | {"Z": "output"},
            "connections": {**{p: [b] for p, b in zip("ABCD", inputs)}, "Z": [z]}}


def _netlist():
    # src (bit 2) -> two LUTs -> deep (DI 4); src -> shallow (DI 2, no logic)
    cells = {"src": _ff(10, 2), "l1": _lut([2, 2, 2, 2], 3), "l2": _lut([3, 3, 3, 3], 4),
             "deep": _ff(4, 11), "shallow": _ff(2, 12)}
    names = {"clk": {"bits": [1]}, "src": {"bits": [2]}, "mid": {"bits": [3]}, "d": {"bits": [4]},
             "fb": {"bits": [10]}, "deep_q": {"bits": [11]}, "shallow_q": {"bits": [12]}}
    return {"modules": {"top": {"cells": cells, "netnames": names}}}


def test_deeper_path_scores_higher():
    ends, label, path = logic_depth.analyse(_netlist())
    scores = {cell: score for score, cell, port, bit in ends if port == "DI"}
    assert scores["deep"] > scores["shallow"] + 1.5
    deepest = ends[0]
    assert deepest[1] == "deep"
    assert [label(b).split()[0] for b in path(deepest[3])] == ["src", "mid", "d"]


def test_cli(tmp_path, capsys):
    netlist = tmp_path / "top.json"
    netlist.write_text(json.dumps(_netlist()))
    logic_depth.main([str(netlist), "--top", "2", "--paths"])
    out = capsys.readouterr().out
    assert "`deep DI`" in out and "src [TRELLIS_FF] -> mid [LUT4] -> d [LUT4]" in out


@pytest.mark.parametrize("content", [None, "not json", "{}", '{"modules": {"top": {"cells": {}}}}'])
def test_bad_netlist_is_one_line_error(tmp_path, content):
    netlist = tmp_path / "top.json"
    if content is not None:
        netlist.write_text(content)
    with pytest.raises(SystemExit) as exc:
        logic_depth.main([str(netlist)])
    message = str(exc.value.code)
    assert message.startswith("error:") and "\n" not in message
