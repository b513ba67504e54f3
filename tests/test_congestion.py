"""scripts/congestion.py: the DSP floorplan pins every PE to its own site, the heatmap readers fold names and sum."""

import collections
import importlib.util
import json
import pathlib
import re

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "congestion.py"
_spec = importlib.util.spec_from_file_location("congestion", _PATH)
congestion = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(congestion)


def _netlist(rows, cols):
    cells = {f"design.array.pe_{r}_{c}_mult": {"type": "MULT18X18D", "attributes": {}, "connections": {}}
             for r in range(rows) for c in range(cols)}
    cells["design.dequantizer.scale_mul.dsp_0_0"] = {"type": "MULT18X18D", "attributes": {}, "connections": {}}
    return {"modules": {"top": {"cells": cells}}}


@pytest.mark.parametrize("rows, cols", [(8, 8), (1, 1), (5, 3), (12, 11)])
def test_floorplan_sites(rows, cols):
    netlist = _netlist(rows, cols)
    assert congestion.floorplan(netlist) == rows * cols
    cells = netlist["modules"]["top"]["cells"]
    bels = {(r, c): cells[f"design.array.pe_{r}_{c}_mult"]["attributes"]["BEL"]
            for r in range(rows) for c in range(cols)}
    assert len(set(bels.values())) == rows * cols                     # one site each
    assert "BEL" not in cells["design.dequantizer.scale_mul.dsp_0_0"]["attributes"]
    parsed = {k: re.fullmatch(r"X(\d+)/Y(\d+)/(MULT18_[0145])", v) for k, v in bels.items()}
    assert all(parsed.values())
    for (r, c), match in parsed.items():
        x, y = int(match[1]), int(match[2])
        assert y in congestion.DSP_ROWS
        block = max(b for b in congestion.DSP_BLOCKS if b <= x)
        assert (x - block, match[3]) in congestion.DSP_SITES             # a real site, its bel named to match
        if c:                                                          # columns run left to right
            assert x > int(parsed[r, c - 1][1])
        if r:                                                          # rows run down the DSP rows
            assert (y, x) > (int(parsed[r - 1, c][2]), int(parsed[r - 1, c][1]))


def test_floorplan_8x8_layout():
    sites = congestion.pe_sites(8, 8)
    assert sites[0, 0] == "X4/Y10/MULT18_0"
    assert sites[2, 0] == "X8/Y10/MULT18_4"
    assert sites[3, 1] == "X13/Y34/MULT18_0"
    assert sites[7, 7] == "X97/Y58/MULT18_1"
    assert collections.Counter(bel.split("/")[1] for bel in sites.values()) == {"Y10": 24, "Y34": 24, "Y58": 16}


def test_one_implementation():
    from edge_qlora.boards import floorplan
    assert congestion.floorplan is floorplan.floorplan and congestion.pe_sites is floorplan.pe_sites


def test_floorplan_of_the_step_accelerator():
    netlist = _netlist(2, 2)
    cells = netlist["modules"]["top"]["cells"]
    netlist["modules"]["top"]["cells"] = {name.replace("design.", "design.engine."): cell
                                          for name, cell in cells.items()}
    assert congestion.floorplan(netlist) == 4


def test_floorplan_errors():
    with pytest.raises(ValueError, match="does not fit"):
        congestion.pe_sites(13, 4)
    with pytest.raises(ValueError, match="does not fit"):
        congestion.pe_sites(4, 12)
    with pytest.raises(ValueError, match="no PE multipliers"):
        congestion.floorplan({"modules": {"top": {"cells": {}}}})


def test_cli(tmp_path, capsys):
    source, out = tmp_path / "top.json", tmp_path / "fp.json"
    source.write_text(json.dumps(_netlist(2, 2)))
    congestion.main(["floorplan", str(source), str(out)])
    assert "pinned 4 PE multipliers" in capsys.readouterr().out
    cells = json.loads(out.read_text())["modules"]["top"]["cells"]
    assert cells["design.array.pe_1_1_mult"]["attributes"]["BEL"] == "X96/Y34/MULT18_0"  # one array row per DSP row

    grid = tmp_path / "heat_congestion_by_coordinate_1.csv"
    grid.write_text("0,0,0,\n0,5,1,\n0,2,9,\n")
    png = tmp_path / "heat.png"
    congestion.main(["heatmap", str(grid), "--png", str(png), "--top", "2"])
    printed = capsys.readouterr().out
    assert "17 overused wire-tiles over 3 x 3 tiles" in printed
    assert "9@2,2 5@1,1" in printed
    assert png.stat().st_size > 0

    nets = tmp_path / "heat_congestion_by_net_1.csv"
    nets.write_text("design.array.pe_0_1_product[3],4\ndesign.array.pe_2_2_product[7],5\nlfsr[1],2\n")
    congestion.main(["nets", str(nets)])
    printed = capsys.readouterr().out
    assert "11 overused wire-nets" in printed
    assert re.search(r"9\s+design\.array\.pe_#_#_product", printed)

    for argv in (["floorplan", str(tmp_path / "missing.json"), str(out)],
                 ["heatmap", str(tmp_path / "missing.csv")]):
        with pytest.raises(SystemExit) as exit_info:
            congestion.main(argv)
        assert str(exit_info.value).startswith("error: ")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text("{}")
    for name in ("bad.json", "other.json"):
        with pytest.raises(SystemExit, match="error: "):
            congestion.main(["floorplan", str(tmp_path / name), str(out)])
