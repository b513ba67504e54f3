"""The constants module: each literal table derived again and checked bit for bit, and the layering rules it enables
(the hardware loads neither torch nor the golden models; no package imports another in a cycle)."""

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import bitsandbytes.functional as bnbf

from edge_qlora import constants
from edge_qlora.golden import absmax_quant

from reference import mismatches

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the folders of the package namespace, as pyproject.toml maps them
PACKAGES = {"edge_qlora": "edge_qlora", "rtl": "edge_qlora.rtl", "golden": "edge_qlora.golden",
            "sim": "edge_qlora.sim", "boards": "edge_qlora.boards"}


def dynamic_map_from_torch(max_exponent_bits=7, total_bits=8):
    """bitsandbytes' ``create_dynamic_map`` recomputed with the same float32 torch operations (Dettmers 2015): for
    each exponent 10^-6 .. 10^0 a linear fraction grid, mirrored."""
    values = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        values += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32).numpy()


def test_dynamic_code_is_derived_and_matches_bitsandbytes():
    assert mismatches(dynamic_map_from_torch(), constants.DYNAMIC_CODE) == 0
    assert mismatches(bnbf.create_dynamic_map().numpy(), constants.DYNAMIC_CODE) == 0


def test_nf4_code_and_bounds():
    assert mismatches(bnbf.get_4bit_type("nf4", device="cpu").numpy(), constants.NF4_CODE) == 0
    midpoints = ((constants.NF4_CODE[:-1] + constants.NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    assert mismatches(midpoints, constants.NF4_BOUNDS) == 0


def test_absmax_thresholds_are_the_golden_staircase():
    assert mismatches(absmax_quant.derive_thresholds(), constants.ABSMAX_THRESHOLDS) == 0


def test_formats():
    assert [(f.name, f.width) for f in constants.FORMATS.values()] == [("fp32", 32), ("bf16", 16), ("fp16", 16)]
    assert constants.FORMATS == {"fp32": constants.FP32, "bf16": constants.BF16, "fp16": constants.FP16}


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_elaborating_the_hardware_loads_neither_torch_nor_golden():
    modules = sorted(".".join(p.relative_to(ROOT / "rtl").with_suffix("").parts)
                     for p in (ROOT / "rtl").rglob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import edge_qlora.rtl.{m}\n" for m in modules) +
            "print('torch' in sys.modules, any(n.startswith('edge_qlora.golden') for n in sys.modules))")
    assert _run(code) == ["False", "False"]


def _imports(path, package):
    """Modules of the namespace that ``path`` imports, at any depth (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {n for n in found if n and n.startswith("edge_qlora")}


def _module_graph():
    graph = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            own_package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
            graph[name] = _imports(path, own_package)
    # `from package import module` names a module, not an attribute
    for name, targets in graph.items():
        graph[name] = {t if t in graph else t.rsplit(".", 1)[0] for t in targets} - {name}
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layers():
    """constants imports nothing of ours; rtl only constants and rtl; golden never rtl, sim, boards or the tools."""
    for name, targets in _module_graph().items():
        if name == "edge_qlora.constants":
            assert not targets, targets
        elif name.startswith("edge_qlora.rtl"):
            assert all(t == "edge_qlora.constants" or t.startswith("edge_qlora.rtl") for t in targets), (name, targets)
        elif name.startswith("edge_qlora.golden"):
            assert all(t == "edge_qlora.constants" or t.startswith("edge_qlora.golden") for t in targets), \
                (name, targets)
