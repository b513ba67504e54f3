"""``edge-qlora plan``: the integer program against brute force, the byte accounting, the weight sources (a
checkpoint, TinyLlama's synthetic weights), budget parsing and bad input."""

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edge_qlora.formats import InputError
from edge_qlora.golden import codebook
from edge_qlora.plan import (InfeasibleBudget, checkpoint_source, load_plan, measure_errors, parse_bits, parse_budget,
                             plan, solve)

from reference import run_cli

MB = 10 ** 6
TINYLLAMA = ["model.embed_tokens", "lm_head"] + [
    f"model.layers.{i}.{name}" for i in range(22)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")]


def brute_force(errors, sizes, capacity):
    best = None
    for choice in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        rows = np.arange(errors.shape[0])
        if sizes[rows, choice].sum() <= capacity:
            cost = errors[rows, choice].sum()
            if best is None or cost < best[0]:
                best = (cost, choice)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 9))
    # errors fall and sizes grow with the width, as for NF2/NF3/NF4, on matrices of different sizes
    numel = rng.integers(1, 50, m) * 1000
    sizes = np.stack([numel * b // 8 + 100 for b in (2, 3, 4)], axis=1)
    errors = numel[:, None] * rng.uniform(0.5, 2, (m, 1)) * np.array([16.0, 4.0, 1.0]) * rng.uniform(0.8, 1.2, (m, 3))
    capacity = int(rng.uniform(sizes[:, 0].sum(), sizes[:, 2].sum()))
    choice, info = solve(errors, sizes, capacity)
    cost, expected = brute_force(errors, sizes, capacity)
    assert sizes[np.arange(m), choice].sum() <= capacity
    assert errors[np.arange(m), choice].sum() == pytest.approx(cost, rel=1e-9)
    assert tuple(choice) == expected
    assert info["status"] == 0 and info["variables"] == 3 * m


def test_milp_hand_checked():
    # two matrices; the budget buys one upgrade: the one that removes more error, not the cheaper one
    errors = np.array([[10.0, 1.0], [30.0, 2.0]])
    sizes = np.array([[10, 20], [10, 30]])
    assert tuple(solve(errors, sizes, 40)[0]) == (0, 1)  # 10 + 30 = 40 bytes, error 12 (not 21 for 30 bytes)
    assert tuple(solve(errors, sizes, 39)[0]) == (1, 0)  # only the cheap upgrade fits
    assert tuple(solve(errors, sizes, 50)[0]) == (1, 1)
    assert tuple(solve(errors, sizes, 20)[0]) == (0, 0)
    with pytest.raises(InfeasibleBudget) as info:
        solve(errors, sizes, 19)
    assert info.value.minimum == 20


@pytest.mark.parametrize("text,expected", [
    ("300MB", 300 * MB), ("300M", 300 * MB), ("0.3GB", 300 * MB), ("300000000", 300 * MB), ("300 mb", 300 * MB),
    ("1.5G", 1_500_000_000), ("64kB", 64_000), ("1MiB", 2 ** 20), ("2.5", 2), ("3e8", 300 * MB)])
def test_budget_parsing(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "300XB", "-300MB", "0", "0.1", "3 00MB", "300MB300", "nan", "1e999999GB"])
def test_bad_budgets(text):
    with pytest.raises(ValueError, match="budget must be a positive size"):
        parse_budget(text)


def test_bits_parsing():
    assert parse_bits("2,3,4") == (2, 3, 4) and parse_bits("4,3") == (3, 4) and parse_bits("2") == (2,)
    for text in ("", "1,2", "2,8", "two", "2,,3"):
        with pytest.raises(ValueError):
            parse_bits(text)


@pytest.fixture(scope="module")
def tinyllama():
    # 8 rows per distinct shape keep the test fast; the plan's shape does not depend on it
    return plan(300 * MB, sample_rows=8)


def test_tinyllama_fits_300mb_with_every_matrix(tinyllama):
    d = tinyllama.to_dict()
    assert sorted(d["assignment"]) == sorted(TINYLLAMA) and len(TINYLLAMA) == 7 * 22 + 2
    assert set(d["assignment"].values()) <= {2, 3, 4}
    assert d["total_bytes"] <= d["budget_bytes"] == 300 * MB
    sizes = {m.name: m.numel for m in tinyllama.source.matrices}
    quantized = sum(codebook.stored_bytes(sizes[name], bits) for name, bits in d["assignment"].items())
    assert d["quantized_bytes"] == quantized
    assert d["total_bytes"] == quantized + 2 * (2 * 22 + 1) * 2048  # the RMSNorm weights in bf16
    assert d["quantized_weights"] == 1_100_048_384 - (2 * 22 + 1) * 2048
    assert d["bits_per_weight"] == pytest.approx(8 * quantized / d["quantized_weights"])
    assert 2.1 < d["bits_per_weight"] < 2.2
    assert sum(d["counts"].values()) == 156 and d["counts"]["3"] > 0
    assert d["minimum_bytes"] < 300 * MB < d["all_nf4_bytes"]
    assert d["error_vs_all_nf4"] > 1 and d["solver"]["status"] == 0
    # nothing left on the table: the cheapest further upgrade (NF2 -> NF3 of a k_proj) would break the budget
    smallest = min(codebook.stored_bytes(n, 3) - codebook.stored_bytes(n, 2)
                   for name, n in sizes.items() if d["assignment"][name] == 2)
    assert d["total_bytes"] + smallest > d["budget_bytes"]


def test_tinyllama_errors_are_measured(tinyllama):
    errors = tinyllama.errors
    # the same shape and std: the same measurement, scaled by rows; lower widths lose more
    assert errors["model.layers.0.self_attn.q_proj"] == errors["model.layers.21.self_attn.o_proj"]
    for per_width in errors.values():
        assert per_width[2] > per_width[3] > per_width[4] > 0
    k = errors["model.layers.0.self_attn.k_proj"][4] / 256
    q = errors["model.layers.0.self_attn.q_proj"][4] / 2048
    assert k == pytest.approx(q, rel=0.2)  # per row, i.i.d. weights of the same std and width


def write_checkpoint(path):
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=gen) * 0.05,
        "model.layers.0.mlp.down_proj.weight": (torch.randn(32, 96, generator=gen) * 3).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.ones(32),
        "model.layers.0.mlp.down_proj.bias": torch.zeros(32, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(32),
        "lm_head.weight": torch.randn(64, 32, generator=gen).to(torch.bfloat16),
        "position_ids": torch.arange(16),  # a non-float buffer: kept as stored
    }
    save_file(tensors, str(path))
    return tensors


def test_checkpoint_source(tmp_path):
    path = tmp_path / "tiny.safetensors"
    tensors = write_checkpoint(path)
    source = checkpoint_source(str(path))
    assert {m.name: m.shape for m in source.matrices} == {
        "model.embed_tokens": (64, 32), "model.layers.0.self_attn.q_proj": (32, 32),
        "model.layers.0.mlp.down_proj": (32, 96), "lm_head": (64, 32)}
    assert {m.name: m.kind for m in source.matrices}["lm_head"] == "lm_head"
    assert source.other_params == 3 * 32
    assert source.other_bytes == 2 * 3 * 32 + 8 * 16
    # whole tensors by default, each error exactly the golden quantizer's
    errors, _, rows = measure_errors(source, (2, 3, 4))
    assert rows == 64 + 32 + 32 + 64
    weight = tensors["model.layers.0.mlp.down_proj.weight"]
    for bits in (2, 3, 4):
        q = codebook.quantize(weight, bits)
        expected = float(((weight.float() - codebook.dequantize(q, "fp32")).double() ** 2).sum())
        assert errors["model.layers.0.mlp.down_proj"][bits] == pytest.approx(expected, rel=1e-12)
    # sampled rows are scaled to all rows
    sampled, _, rows = measure_errors(source, (2,), sample_rows=16)
    assert rows == 4 * 16
    assert sampled["lm_head"][2] == pytest.approx(errors["lm_head"][2], rel=0.5)


def test_checkpoint_plan_respects_the_budget(tmp_path):
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path)
    source = checkpoint_source(str(path))
    all2 = plan(10 ** 9, checkpoint=str(path), bits=(2,))
    all4 = plan(10 ** 9, checkpoint=str(path))
    assert set(all4.assignment.values()) == {4}  # an ample budget: the least error everywhere
    budget = (all2.total_bytes + all4.total_bytes) // 2
    p = plan(budget, checkpoint=str(path))
    assert p.total_bytes <= budget and len(set(p.assignment.values())) > 1
    # the MILP's choice is the brute-force optimum
    names = [m.name for m in source.matrices]
    errors = np.array([[p.errors[n][b] for b in (2, 3, 4)] for n in names])
    sizes = np.array([[codebook.stored_bytes(m.numel, b) for b in (2, 3, 4)] for m in source.matrices])
    cost, choice = brute_force(errors, sizes, budget - source.other_bytes)
    assert [p.assignment[n] for n in names] == [(2, 3, 4)[k] for k in choice]
    d = p.to_dict()
    assert d["checkpoint"] == str(path) and d["model"] is None
    assert d["unquantized_bytes"] == source.other_bytes and d["total_bytes"] == p.total_bytes


def test_infeasible_budget(tmp_path):
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path)
    minimum = plan(10 ** 9, checkpoint=str(path), bits=(2,)).total_bytes
    assert plan(minimum, checkpoint=str(path)).total_bytes == minimum
    with pytest.raises(InputError, match=f"takes {minimum:,} bytes"):
        plan(minimum - 1, checkpoint=str(path))


@pytest.mark.parametrize("argv,expected", [
    (("--budget", "300XB"), "argument --budget: budget must be a positive size"),
    (("--budget", "200MB"), "too small: every matrix at NF2 with the norms takes 292,631,856 bytes (292.6 MB)"),
    (("--budget", "300MB", "--bits", "3,4"), "too small: every matrix at NF3"),
    (("--budget", "300MB", "--bits", "5"), "argument --bits"),
    (("--budget", "300MB", "--blocksize", "48"), "blocksize must be one of"),
    (("--budget", "300MB", "--sample-rows", "0"), "sample rows must be a positive integer"),
    (("--budget", "1GB", "--checkpoint", "missing.safetensors"), "missing.safetensors: no such file"),
    (("--model", "gpt-9",), "invalid choice"),
    ((), "required: --budget"),
])
def test_bad_input_gives_one_line_error(argv, expected, capsys):
    assert run_cli("plan", *argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("edge-qlora") and expected in captured.err


def test_bad_checkpoints(tmp_path, capsys):
    text = tmp_path / "text.safetensors"
    text.write_text("not a checkpoint")
    norms = tmp_path / "norms.safetensors"
    save_file({"norm.weight": torch.ones(4)}, str(norms))
    bad = tmp_path / "nan.safetensors"
    save_file({"fc.weight": torch.full((2, 64), float("nan"))}, str(bad))
    quantized = tmp_path / "nf4.safetensors"
    save_file({"fc.weight": torch.zeros(8, dtype=torch.uint8), "fc.weight.absmax": torch.ones(1)}, str(quantized))
    for path, expected in ((text, "not a readable safetensors file"), (norms, "no 2-D float tensor"),
                           (bad, "tensor 'fc.weight'"), (quantized, "already quantized"), (tmp_path, "directory")):
        assert run_cli("plan", "--checkpoint", path, "--budget", "1GB") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and str(path) in err


def test_cli_json_table_and_out(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path)
    out = tmp_path / "plan.json"
    assert run_cli("plan", "--checkpoint", path, "--budget", "4kB", "--json", "--out", out) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert json.loads(out.read_text()) == printed
    for key in ("total_bytes", "budget_bytes", "bits_per_weight", "bits_per_weight_includes", "assignment",
                "counts", "error_total", "error_vs_all_nf4", "solver"):
        assert key in printed
    assert printed["budget_bytes"] == 4000 and printed["total_bytes"] <= 4000
    assert run_cli("plan", "--checkpoint", path, "--budget", "4kB", "--bits", "2,4", "--no-double-quant") == 0
    table = capsys.readouterr().out
    assert "| NF2 |" in table and "| NF4 |" in table and "| NF3 |" not in table
    assert "bits per weight" in table and "that of NF4 everywhere" in table and "float32 absmax" in table


def test_cli_tinyllama_and_saved_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert run_cli("plan", "--budget", "300MB", "--sample-rows", "8", "--out", out) == 0
    table = capsys.readouterr().out
    assert "tinyllama-1.1b: 156 weight matrices" in table and "follows tensor sizes, not learned structure" in table
    assert "on 8 rows (or all, if fewer) of each distinct shape, scaled by rows" in table
    assert f"written: {out}" in table
    loaded = load_plan(str(out), "tinyllama-1.1b")
    saved = json.loads(out.read_text())
    assert loaded.assignment == saved["assignment"] and loaded.total_bytes == saved["total_bytes"] <= 300 * MB
    with pytest.raises(InputError, match="the plan is for tinyllama-1.1b, not phi-2"):
        load_plan(str(out), "phi-2")
    saved["assignment"].pop("lm_head")
    out.write_text(json.dumps(saved))
    with pytest.raises(InputError, match="has no width for lm_head"):
        load_plan(str(out), "tinyllama-1.1b")
