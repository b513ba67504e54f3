"""The ``edge-qlora`` command line: round trips through bitsandbytes' own loaders, and every bad-input path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file


from reference import bnb_dequantize, bnbf, mismatches, run_cli



@pytest.fixture
def weight_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"weight": (torch.randn(24, 100) * 0.02).to(torch.bfloat16)}, str(path))
    return path


def bnb_load(path):
    tensors = load_file(str(path))
    state = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    return tensors["weight"], bnbf.QuantState.from_dict(state, device="cpu")


@pytest.mark.parametrize("double_quant", ["--double-quant", "--no-double-quant"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_matches_bitsandbytes_and_loads_in_it(tmp_path, weight_file, double_quant, blocksize, capsys):
    out = tmp_path / "q.safetensors"
    assert run_cli("quantize", weight_file, out, "--backend", "golden", "--blocksize", blocksize, double_quant) == 0
    packed, state = bnb_load(out)
    weight = load_file(str(weight_file))["weight"]
    ref_packed, ref_state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
                                               compress_statistics=double_quant == "--double-quant")
    assert mismatches(ref_packed.numpy(), packed.numpy()) == 0
    assert json.dumps(ref_state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].tolist()) == \
        json.dumps(load_file(str(out))["weight.quant_state.bitsandbytes__nf4"].tolist())
    assert mismatches(bnbf.dequantize_4bit(ref_packed, ref_state), bnbf.dequantize_4bit(packed, state)) == 0
    assert "backend golden" in capsys.readouterr().out


@pytest.mark.parametrize("backend,lanes", [("golden", 8), ("pysim", 5)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_dequant_of_bitsandbytes_state_dict(tmp_path, backend, lanes, dtype, capsys):
    # input written by bitsandbytes itself, the way a Linear4bit state dict stores its weight
    weight = torch.randn(12, 80)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    src, out = tmp_path / "q.safetensors", tmp_path / "d.safetensors"
    save_file(tensors, str(src))
    assert run_cli("dequant", src, out, "--dtype", dtype, "--backend", backend, "--lanes", lanes) == 0
    result = load_file(str(out))["weight"]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    assert result.shape == weight.shape and result.dtype == torch_dtype
    assert mismatches(bnb_dequantize(packed, state, torch_dtype), result.reshape(-1)) == 0
    printed = capsys.readouterr().out
    if backend == "pysim":
        assert "weights/cycle" in printed and "cycles" in printed


def test_pysim_quantize_round_trip(tmp_path, weight_file):
    pytest.importorskip("edge_qlora.sim.nf4_quant")
    golden, rtl = tmp_path / "g.safetensors", tmp_path / "r.safetensors"
    assert run_cli("quantize", weight_file, golden, "--backend", "golden") == 0
    assert run_cli("quantize", weight_file, rtl, "--backend", "pysim", "--lanes", 4) == 0
    expected, got = load_file(str(golden)), load_file(str(rtl))
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert mismatches(expected[key].numpy(), got[key].numpy()) == 0, key


def test_vcd_on_request(tmp_path, weight_file):
    quantized, vcd = tmp_path / "q.safetensors", tmp_path / "wave.vcd"
    assert run_cli("quantize", weight_file, quantized, "--backend", "golden") == 0
    assert run_cli("dequant", quantized, tmp_path / "d.safetensors", "--lanes", 16, "--vcd", vcd) == 0
    assert vcd.stat().st_size > 1000 and b"$enddefinitions" in vcd.read_bytes()


def corrupt_inputs(tmp_path, weight_file):
    """(name, argv tail, expected message fragment) for every bad-input path."""
    quantized = tmp_path / "q.safetensors"
    assert run_cli("quantize", weight_file, quantized, "--backend", "golden") == 0
    good = load_file(str(quantized))

    def variant(name, change):
        tensors = dict(good)
        change(tensors)
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        return path

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(quantized.read_bytes()[:-50])
    text = tmp_path / "text.safetensors"
    text.write_text("this is not a safetensors file")
    nan_weight = tmp_path / "nan.safetensors"
    bad = torch.randn(4, 64)
    bad[2, 5] = float("nan")
    save_file({"weight": bad}, str(nan_weight))
    int_weight = tmp_path / "int.safetensors"
    save_file({"weight": torch.ones(4, 4, dtype=torch.int32)}, str(int_weight))
    other_name = tmp_path / "other.safetensors"
    save_file({"bias": torch.ones(4)}, str(other_name))

    def set_meta(key, value):
        def change(tensors):
            meta = json.loads(bytes(tensors["weight.quant_state.bitsandbytes__nf4"].numpy()))
            meta[key] = value
            tensors["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                                           dtype=torch.uint8)
        return change

    return [
        ("missing file", ["quantize", tmp_path / "nope.safetensors", tmp_path / "o.safetensors"], "no such file"),
        ("not safetensors", ["quantize", text, tmp_path / "o.safetensors"], "not a readable safetensors"),
        ("truncated", ["dequant", truncated, tmp_path / "o.safetensors"], "not a readable safetensors"),
        ("no weight tensor", ["quantize", other_name, tmp_path / "o.safetensors"], "no tensor 'weight'"),
        ("integer weight", ["quantize", int_weight, tmp_path / "o.safetensors"], "dtype int32"),
        ("NaN weight", ["quantize", nan_weight, tmp_path / "o.safetensors", "--backend", "golden"], "NaN/Inf"),
        ("missing output folder", ["quantize", weight_file, tmp_path / "no" / "o.safetensors"],
         "does not exist"),
        ("dequant of plain weight", ["dequant", weight_file, tmp_path / "o.safetensors"], "missing tensor"),
        ("missing absmax", ["dequant", variant("noabsmax", lambda t: t.pop("weight.absmax")),
                            tmp_path / "o.safetensors"], "'weight.absmax'"),
        ("missing nested absmax", ["dequant", variant("nonested", lambda t: t.pop("weight.nested_absmax")),
                                   tmp_path / "o.safetensors"], "'weight.nested_absmax'"),
        ("short absmax", ["dequant", variant("short", lambda t: t.update({"weight.absmax": t["weight.absmax"][:-1]})),
                          tmp_path / "o.safetensors"], "absmax' has"),
        ("absmax dtype", ["dequant", variant("f32absmax", lambda t: t.update(
            {"weight.absmax": t["weight.absmax"].float()})), tmp_path / "o.safetensors"], "dtype float32"),
        ("packed dtype", ["dequant", variant("i8", lambda t: t.update({"weight": t["weight"].to(torch.int8)})),
                          tmp_path / "o.safetensors"], "dtype int8"),
        ("packed length", ["dequant", variant("len", lambda t: t.update({"weight": t["weight"][:-3]})),
                           tmp_path / "o.safetensors"], "packed bytes"),
        ("bad shape", ["dequant", variant("shape", set_meta("shape", [7, -1])), tmp_path / "o.safetensors"],
         "shape"),
        ("bad quant type", ["dequant", variant("fp4", set_meta("quant_type", "fp4")), tmp_path / "o.safetensors"],
         "quant_type"),
        ("bad blocksize", ["dequant", variant("bs", set_meta("blocksize", 48)), tmp_path / "o.safetensors"],
         "blocksize"),
        ("non-finite absmax2", ["dequant", variant("inf", lambda t: t.update(
            {"weight.nested_absmax": torch.full_like(t["weight.nested_absmax"], float("inf"))})),
            tmp_path / "o.safetensors"], "non-finite"),
        ("garbage quant state", ["dequant", variant("json", lambda t: t.update(
            {"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 250], dtype=torch.uint8)})),
            tmp_path / "o.safetensors"], "JSON"),
        ("unknown option", ["dequant", quantized, tmp_path / "o.safetensors", "--frobnicate"], "unrecognized"),
        ("lanes out of range", ["dequant", quantized, tmp_path / "o.safetensors", "--lanes", 17], "lanes"),
        ("bad blocksize option", ["quantize", weight_file, tmp_path / "o.safetensors", "--blocksize", 100],
         "blocksize"),
        ("unknown board", ["build", "--board", "arty"], "invalid choice"),
        ("build folder parent missing", ["build", "--board", "icebreaker", "--out", tmp_path / "x" / "y"],
         "does not exist"),
        ("lora build without an array", ["build", "--board", "ulx3s-85f", "--lora"], "--rows"),
        ("lora build, bad rank", ["build", "--board", "ulx3s-85f", "--lora", "--rows", 2, "--cols", 2,
                                  "--max-rank", 0], "max_rank"),
    ]


def test_bad_input_gives_one_line_error(tmp_path, weight_file, capsys):
    for name, argv, fragment in corrupt_inputs(tmp_path, weight_file):
        capsys.readouterr()
        status = run_cli(*argv)
        err = capsys.readouterr().err
        assert status == 2, name
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert "error" in err and fragment in err, (name, err)


@pytest.fixture
def matmul_files(tmp_path):
    x = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(5, 70).to(torch.bfloat16)}, str(x))
    w = tmp_path / "w.safetensors"
    save_file({"weight": (torch.randn(6, 70) * 0.02).to(torch.bfloat16)}, str(w))
    wq = tmp_path / "wq.safetensors"
    assert run_cli("quantize", w, wq, "--backend", "golden") == 0
    xt = tmp_path / "xt.safetensors"
    save_file({"x": torch.randn(3, 6).to(torch.bfloat16)}, str(xt))
    return x, w, wq, xt


@pytest.mark.parametrize("weights", ["bf16", "nf4"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_matmul_rtl_equals_golden(tmp_path, matmul_files, weights, transposed, capsys):
    x, w, wq, xt = matmul_files
    source = wq if weights == "nf4" else w
    activations = xt if transposed else x
    extra = ["--transpose-w"] if transposed else []
    rtl, model = tmp_path / "rtl.safetensors", tmp_path / "golden.safetensors"
    assert run_cli("matmul", activations, source, rtl, "--rows", 2, "--cols", 3, *extra) == 0
    printed = capsys.readouterr().out
    assert "cycles" in printed and "PE utilization" in printed
    assert run_cli("matmul", activations, source, model, "--rows", 2, "--cols", 3, "--backend", "golden",
                   *extra) == 0
    y_rtl, y_golden = load_file(str(rtl))["y"], load_file(str(model))["y"]
    assert y_rtl.shape == ((3, 70) if transposed else (5, 6))
    assert mismatches(y_golden, y_rtl) == 0


def test_matmul_bad_inputs(tmp_path, matmul_files, capsys):
    x, w, wq, xt = matmul_files
    out = tmp_path / "y.safetensors"
    fp32_x = tmp_path / "x32.safetensors"
    save_file({"x": torch.randn(5, 70)}, str(fp32_x))
    x3d = tmp_path / "x3.safetensors"
    save_file({"x": torch.randn(2, 5, 70).to(torch.bfloat16)}, str(x3d))
    nan_x = tmp_path / "xnan.safetensors"
    bad = torch.randn(5, 70)
    bad[1, 1] = float("inf")
    save_file({"x": bad.to(torch.bfloat16)}, str(nan_x))
    fp32_w = tmp_path / "w32.safetensors"
    save_file({"weight": torch.randn(6, 70)}, str(fp32_w))
    cases = [
        (["matmul", xt, w, out], "inner dimensions"),
        (["matmul", x, w, out, "--transpose-w"], "inner dimensions"),
        (["matmul", fp32_x, w, out], "dtype float32"),
        (["matmul", x3d, w, out], "2 dimensions"),
        (["matmul", nan_x, w, out], "NaN/Inf"),
        (["matmul", x, fp32_w, out], "expected bfloat16"),
        (["matmul", w, w, out], "no tensor 'x'"),
        (["matmul", x, w, out, "--rows", 0], "rows must be"),
        (["matmul", x, w, out, "--cols", 17], "cols must be"),
        (["matmul", x, w, tmp_path / "nope" / "y.safetensors"], "does not exist"),
    ]
    for argv, fragment in cases:
        capsys.readouterr()
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def same(a, b):
    """Bit for bit, whatever the dtype."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def write_case(path, spec=(2, 12, 10, 2), meta_changes=None, tensor_changes=None):
    from test_lora import make_case
    from edge_qlora.formats import quant_state_dict
    case = make_case(*spec, optimizer="adamw", seed=3)
    tensors = {"x": case.x, "dy": case.dy, "lora_A": case.lora_A, "lora_B": case.lora_B}
    tensors.update({f"base.{k}": v for k, v in quant_state_dict(case.weight).items()})
    meta = {"scaling": "2.0", "optimizer": "adamw", "lr": "0.001", "beta1": "0.9", "beta2": "0.999",
            "eps": "1e-8", "weight_decay": "0.01", "step": "1"}
    for key, value in (meta_changes or {}).items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    for key, value in (tensor_changes or {}).items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(path), metadata=meta)
    return case


def test_step_rtl_equals_golden_and_prints_phases(tmp_path, capsys):
    case_path = tmp_path / "case.safetensors"
    write_case(case_path)
    rtl, model = tmp_path / "rtl.safetensors", tmp_path / "golden.safetensors"
    assert run_cli("step", case_path, rtl, "--rows", 2, "--cols", 2) == 0
    printed = capsys.readouterr().out
    for phase in ("F1", "F2", "B4", "UPD_A", "total"):
        assert phase in printed
    assert run_cli("step", case_path, model, "--backend", "golden", "--rows", 2, "--cols", 2) == 0
    a, b = load_file(str(rtl)), load_file(str(model))
    assert sorted(a) == sorted(["dx", "exp_avg_A", "exp_avg_B", "exp_avg_sq_A", "exp_avg_sq_B", "grad_A", "grad_B",
                                "lora_A", "lora_B", "y", "x", "dy", "base.weight", "base.weight.absmax",
                                "base.weight.nested_absmax", "base.weight.nested_quant_map", "base.weight.quant_map",
                                "base.weight.quant_state.bitsandbytes__nf4"])
    for key in a:
        assert same(b[key], a[key]), key


def test_step_bad_cases(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    cases = [
        ({"meta_changes": {"scaling": None}}, "lacks 'scaling'"),
        ({"meta_changes": {"optimizer": "lion"}}, "optimizer 'lion'"),
        ({"meta_changes": {"lr": "fast"}}, "'lr' is 'fast'"),
        ({"meta_changes": {"step": "0"}}, "step must be"),
        ({"tensor_changes": {"dy": None}}, "no tensor 'dy'"),
        ({"tensor_changes": {"lora_B": torch.zeros(10, 3)}}, "'lora_B' has shape"),
        ({"tensor_changes": {"x": torch.zeros(2, 12)}}, "dtype float32"),
        ({"tensor_changes": {"base.weight.absmax": None}}, "missing tensor 'base.weight.absmax'"),
        ({"tensor_changes": {"exp_avg_A": torch.zeros(3, 3)}}, "'exp_avg_A' has shape"),
    ]
    for index, (changes, fragment) in enumerate(cases):
        path = tmp_path / f"case{index}.safetensors"
        write_case(path, **changes)
        capsys.readouterr()
        assert run_cli("step", path, out, "--backend", "golden") == 2, changes
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, (changes, err)


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edge_qlora.cli", "dequant", str(tmp_path / "missing"),
                             str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("edge-qlora: error:") and "Traceback" not in result.stderr


def test_help_lists_commands(capsys):
    assert run_cli("--help") == 0
    out = capsys.readouterr().out
    for command in ("quantize", "dequant", "build"):
        assert command in out


@pytest.mark.slow
@pytest.mark.parametrize("board", ["icebreaker", "ulx3s-85f"])
def test_build_smoke(tmp_path, board, capsys):
    # the smallest dequantizer (one lane, plain absmax) to a bitstream through the CLI
    out = tmp_path / board
    assert run_cli("build", "--board", board, "--lanes", 1, "--no-double-quant", "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert os.path.getsize(report["bitstream"]) > 0
    assert set(report) >= {"fmax_mhz", "target_mhz", "utilization"}
    assert all(mhz > 0 for mhz in report["fmax_mhz"].values())
    assert all(len(pair) == 2 and pair[0] <= pair[1] for pair in report["utilization"].values())
    assert "fmax" in capsys.readouterr().out


def test_make_case_feeds_step(tmp_path, capsys):
    case = tmp_path / "case.safetensors"
    assert run_cli("make-case", case, "--tokens", 3, "--in-features", 20, "--out-features", 12, "--rank", 2,
                   "--optimizer", "sgd") == 0
    out = tmp_path / "out.safetensors"
    assert run_cli("step", case, out, "--backend", "golden") == 0
    result = load_file(str(out))
    assert tuple(result["y"].shape) == (3, 12) and tuple(result["lora_A"].shape) == (2, 20)
    assert run_cli("make-case", tmp_path / "c.safetensors", "--rank", 0) == 2
    assert "--rank" in capsys.readouterr().err


@pytest.fixture
def captured_build(monkeypatch):
    """Replaces the toolchain run of ``build`` with a stub recording the design and its settings."""
    import edge_qlora.boards.build as build_module
    calls = []

    def fake_build(design, board, out, **settings):
        design._MustUse__silence = True
        calls.append({"design": type(design).__name__, "board": board, "out": str(out), **settings})
        return {"board": board, "device": "d", "target_mhz": 100.0, "fmax_mhz": {"sync": 101.0},
                "timing_met": True, "utilization": {}, "bitstream": "x.bit", "seed": settings["seed"],
                "seconds": 1.0}
    monkeypatch.setattr(build_module, "build", fake_build)
    return calls


def test_build_gemm_defaults_to_the_floorplanned_settings(tmp_path, captured_build, capsys):
    assert run_cli("build", "--board", "ulx3s-85f", "--rows", 8, "--cols", 8, "--out", tmp_path / "b") == 0
    call = captured_build.pop()
    assert call["design"] == "GemmEngine"
    assert (call["seed"], call["lut_mapper"], call["floorplan"], call["router"]) == (5, "abc", True, None)
    assert "PE multipliers on the DSP floorplan" in capsys.readouterr().out
    # explicit choices win; the dequantizer and arrays beyond the floorplan get no floorplan
    assert run_cli("build", "--board", "ulx3s-85f", "--rows", 8, "--cols", 8, "--no-floorplan", "--seed", 7,
                   "--lut-mapper", "abc9", "--out", tmp_path / "b") == 0
    call = captured_build.pop()
    assert (call["seed"], call["lut_mapper"], call["floorplan"]) == (7, "abc9", False)
    assert run_cli("build", "--board", "ulx3s-85f", "--rows", 16, "--cols", 8, "--out", tmp_path / "b",
                   "--place-only") == 0
    assert captured_build.pop()["floorplan"] is False
    assert run_cli("build", "--board", "ulx3s-85f", "--lanes", 4, "--out", tmp_path / "b") == 0
    call = captured_build.pop()
    assert (call["design"], call["seed"], call["lut_mapper"], call["floorplan"]) == \
        ("NF4Dequantizer", 1, "abc9", False)


@pytest.mark.parametrize("argv, fragment", [
    (["--board", "icebreaker", "--floorplan"], "does not apply"),
    (["--board", "ulx3s-85f", "--floorplan"], "does not apply"),
    (["--board", "ulx3s-85f", "--rows", 16, "--cols", 8, "--floorplan"], "does not fit the DSP floorplan"),
])
def test_build_floorplan_errors(tmp_path, captured_build, capsys, argv, fragment):
    assert run_cli("build", *argv, "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not captured_build



def test_step_chains(tmp_path, capsys, monkeypatch):
    from edge_qlora.formats import load_case
    from edge_qlora.golden import lora
    first, second, third = (tmp_path / f"c{i}.safetensors" for i in range(3))
    assert run_cli("make-case", first, "--tokens", 3, "--in-features", 20, "--out-features", 12, "--rank", 2) == 0
    assert run_cli("step", first, second, "--backend", "golden") == 0
    assert run_cli("step", second, third, "--backend", "golden") == 0
    case = load_case(str(first))
    expected = lora.step_model(case, 16)
    after_one = load_case(str(second))
    assert after_one.step == 2 and after_one.scaling == case.scaling and after_one.lr == case.lr
    assert torch.equal(after_one.x, case.x) and torch.equal(after_one.dy, case.dy)
    assert torch.equal(after_one.lora_A, expected["lora_A"]) and torch.equal(after_one.lora_B, expected["lora_B"])
    assert all(torch.equal(after_one.state[name], expected[name]) for name in lora.STATE_NAMES)
    expected_two = lora.step_model(after_one, 16)
    written = load_file(str(third))
    assert load_case(str(third)).step == 3
    for name in ("y", "dx", "grad_A", "grad_B", "lora_A", "lora_B"):
        assert torch.equal(written[name], expected_two[name]), name
    assert not torch.equal(written["lora_A"], load_file(str(second))["lora_A"])  # the second step moved on
    # OUT may not be CASE, however it is spelled
    (tmp_path / "link.safetensors").symlink_to(second)
    monkeypatch.chdir(tmp_path)
    for out in (second, "c1.safetensors", "./c1.safetensors", tmp_path / "link.safetensors"):
        capsys.readouterr()
        assert run_cli("step", "c1.safetensors", out, "--backend", "golden") == 2, out
        err = capsys.readouterr().err
        assert "is the same file as CASE" in err and err.count("\n") == 1


def test_step_pysim_chain(tmp_path):
    first, second, third = (tmp_path / f"c{i}.safetensors" for i in range(3))
    golden = tmp_path / "g.safetensors"
    assert run_cli("make-case", first, "--tokens", 2, "--in-features", 16, "--out-features", 16, "--rank", 2) == 0
    assert run_cli("step", first, second, "--backend", "golden") == 0
    assert run_cli("step", second, third, "--rows", 2, "--cols", 2) == 0
    assert run_cli("step", second, golden, "--backend", "golden", "--rows", 2, "--cols", 2) == 0
    rtl, model = load_file(str(third)), load_file(str(golden))
    assert sorted(rtl) == sorted(model)
    for key in rtl:
        assert same(model[key], rtl[key]), key


def _fail_if_called(*args, **kwargs):
    raise AssertionError("ran the long work before checking the outputs")


def test_outputs_checked_before_work(tmp_path, weight_file, monkeypatch, capsys):
    import edge_qlora.sim.lora
    import edge_qlora.sim.nf4
    import edge_qlora.sim.nf4_quant
    for module, name in ((edge_qlora.sim.nf4_quant, "quantize_rtl"), (edge_qlora.sim.nf4, "run_dequantizer"),
                         (edge_qlora.sim.lora, "run_step")):
        monkeypatch.setattr(module, name, _fail_if_called)
    quantized, case = tmp_path / "q.safetensors", tmp_path / "case.safetensors"
    assert run_cli("quantize", weight_file, quantized, "--backend", "golden") == 0
    assert run_cli("make-case", case) == 0
    folder = tmp_path / "folder"
    folder.mkdir()
    out = tmp_path / "o.safetensors"
    cases = [
        (["quantize", weight_file, folder], "is a folder"),
        (["quantize", weight_file, out, "--vcd", tmp_path / "no" / "w.vcd"], "does not exist"),
        (["quantize", weight_file, weight_file], "same file as IN"),
        (["dequant", quantized, out, "--vcd", folder], "is a folder"),
        (["dequant", quantized, out, "--vcd", out], "same file as OUT"),
        (["dequant", quantized, out, "--backend", "golden", "--vcd", tmp_path / "w.vcd"], "needs --backend pysim"),
        (["make-case", folder], "is a folder"),
        (["make-case", tmp_path / "no" / "c.safetensors"], "does not exist"),
        (["step", case, out, "--vcd", tmp_path / "no" / "w.vcd"], "does not exist"),
        (["build", "--board", "icebreaker", "--out", weight_file], "not a folder"),
    ]
    if os.geteuid() != 0:   # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["make-case", locked / "c.safetensors"], "cannot write in folder"))
    for argv, fragment in cases:
        capsys.readouterr()
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.safetensors", "folder", "q.safetensors",
                                                          "w.safetensors"] + (["locked"] if os.geteuid() else [])


@pytest.mark.parametrize("failure", ["full disk", "ctrl-c"])
def test_failed_write_keeps_the_old_output(tmp_path, weight_file, monkeypatch, capsys, failure):
    import safetensors.torch
    from safetensors import SafetensorError
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"older output")
    real_save = safetensors.torch.save_file

    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)          # half written, then the failure
        if failure == "full disk":
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    status = run_cli("quantize", weight_file, out, "--backend", "golden")
    err = capsys.readouterr().err
    if failure == "full disk":
        assert status == 2 and err == f"edge-qlora: error: cannot write {out} (No space left on device)\n"
    else:
        assert status == 130 and err == "edge-qlora: interrupted\n"
    assert out.read_bytes() == b"older output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors", "w.safetensors"]  # no temporary left


def test_output_keeps_permissions_of_a_plain_write(tmp_path, weight_file):
    out = tmp_path / "q.safetensors"
    assert run_cli("quantize", weight_file, out, "--backend", "golden") == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_help_shows_every_default(capsys):
    from edge_qlora.cli import _HelpFormatter, _parser
    parser = _parser()
    subcommands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subcommands.choices.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help" or action.required:
                continue
            assert action.help, (name, action.dest)
            shown = _HelpFormatter(name)._get_help_string(action)
            assert "default" in shown or action.default is False, (name, action.dest, shown)
        capsys.readouterr()
        assert run_cli(name, "--help") == 0
        assert "(default: " in capsys.readouterr().out, name
    assert run_cli("make-case", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    for fragment in ("learning rate (default: 0.001)", "(default: 0.01)", "optimizer of the step (default: adamw)",
                     "seed of the random tensors (default: 0)"):
        assert fragment in out


def test_build_board_defaults_and_fits(tmp_path, captured_build, capsys, monkeypatch):
    assert run_cli("build", "--board", "icebreaker", "--out", tmp_path / "ice") == 0
    assert captured_build.pop()["design"] == "NF4Dequantizer"
    assert "NF4Dequantizer(lanes=1," in capsys.readouterr().out
    assert run_cli("build", "--board", "ulx3s-85f", "--out", tmp_path / "ulx") == 0
    assert "NF4Dequantizer(lanes=8," in capsys.readouterr().out
    captured_build.clear()
    refused = [
        (["--board", "icebreaker", "--lanes", 2], "a 2-lane dequantizer does not fit the icebreaker"),
        (["--board", "icebreaker", "--dtype", "fp32"], "fp32 output does not fit"),
        (["--board", "icebreaker", "--rows", 1, "--cols", 1], "the GEMM engine does not fit the icebreaker"),
        (["--board", "ulx3s-85f", "--rows", 16, "--cols", 16], "needs at least 276 DSP blocks"),
    ]
    for argv, fragment in refused:
        capsys.readouterr()
        assert run_cli("build", *argv, "--out", tmp_path / "x") == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and "largest measured fit" in err and err.count("\n") == 1, err
    assert not captured_build

    import edge_qlora.boards.build as build_module
    from edge_qlora.boards.build import BuildError

    def too_big(design, board, out, **settings):
        design._MustUse__silence = True
        raise BuildError("design needs 5439 LUT4 logic cells (ICESTORM_LC) but iCE40UP5K-SG48 has 5280")
    monkeypatch.setattr(build_module, "build", too_big)
    assert run_cli("build", "--board", "icebreaker", "--no-compact", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-qlora: error: design needs 5439") and "; largest measured fit on icebreaker: the " \
        "1-lane dequantizer" in err and err.count("\n") == 1


def test_build_default_folder_in_a_fresh_directory(tmp_path, captured_build, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("build", "--board", "icebreaker") == 0
    assert captured_build.pop()["out"] == os.path.join("build", "icebreaker")
    assert (tmp_path / "build").is_dir()
