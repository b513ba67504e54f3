"""The sub-4-bit accuracy measurement (scripts/sub4bit_accuracy.py) end to end in its --tiny mode: a tiny Llama
trained on tests/data/sub4bit (short texts written for this project, the project's licence), perplexity with every
code width and the planner's mix, QLoRA fine-tunes through QLoRALinear from plain and LoftQ initializations; the
table, the JSON and the loss plot. The full run's figures are in docs/sub4bit.md."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sub4bit_accuracy.py"
PERPLEXITY_ROWS = ["fp32", "bf16", "nf4", "nf3", "nf2", "nf4-linear", "nf3-linear", "nf2-linear", "mix"]
FINETUNE_RUNS = [("fp32", "plain"), ("nf4", "plain"), ("nf4", "loftq"), ("mix", "plain"), ("mix", "loftq")]


def load_script():
    spec = importlib.util.spec_from_file_location("sub4bit_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def tiny_run(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("sub4bit")
    # --target-bpw: the planner runs on the tiny checkpoint without first planning TinyLlama (seconds)
    assert script.main(["--tiny", "--quiet", "--out", str(out), "--target-bpw", "2.18"]) == 0
    return out


def test_tiny_run_has_every_row(tiny_run, capsys):
    results = json.loads((tiny_run / "results.json").read_text())
    rows = [r["row"] for r in results["perplexity"]]
    assert rows == PERPLEXITY_ROWS
    for r in results["perplexity"]:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    by_row = {r["row"]: r for r in results["perplexity"]}
    assert by_row["fp32"]["bits_per_weight"] == 32 and by_row["bf16"]["bits_per_weight"] == 16
    assert by_row["nf2"]["bits_per_weight"] < by_row["nf3"]["bits_per_weight"] < by_row["nf4"]["bits_per_weight"]
    # the mix is the planner's, within the bits per weight it was given
    assert results["plan"]["source"] == "edge_qlora.plan"
    assert by_row["mix"]["bits_per_weight"] <= 2.18
    assert "lm_head" in results["plan"]["assignment"] and "model.embed_tokens" in results["plan"]["assignment"]
    runs = [(r["config"], r["init"]) for r in results["finetune"]]
    assert runs == FINETUNE_RUNS
    settings = results["settings"]
    for r in results["finetune"]:
        assert len(r["train_losses"]) == settings["ft_steps"]
        assert all(math.isfinite(x) for x in r["train_losses"])
        assert math.isfinite(r["heldout_loss_after"]) and math.isfinite(r["heldout_a_ppl_at_init"])
        steps = [step for step, _ in r["heldout_curve"]]
        assert steps[0] == 0 and steps[-1] == settings["ft_steps"] and steps == sorted(steps)
        assert r["heldout_curve"][-1][1] == r["heldout_loss_after"]
        # the engine's arithmetic and the float32 merged model agree on the same tokens
        check = r["engine_check"]
        assert abs(check["engine_loss"] - check["float_loss"]) < 0.05
    loftq = [r for r in results["finetune"] if r["init"] == "loftq"]
    assert all(r["loftq_relative_error"]["with_lora"] < r["loftq_relative_error"]["quantization"] for r in loftq)
    table = (tiny_run / "results.md").read_text()
    for r in results["perplexity"]:
        assert f"| {r['label']} |" in table
    assert table.count(" | plain | ") == 3 and table.count(" | loftq | ") == 2
    assert (tiny_run / "sub4bit_loss.png").stat().st_size > 10_000
    assert (tiny_run / "model" / "model.safetensors").is_file() and (tiny_run / "tokenizer.json").is_file()


def test_missing_corpus(script, tmp_path, capsys):
    assert script.main(["--tiny", "--quiet", "--corpus", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get download debian-handbook" in err


def test_bad_assignment(script, tiny_run, tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"assignment": {"lm_head": 2}}))
    assert script.main(["--tiny", "--quiet", "--reuse", "--out", str(tiny_run), "--assignment", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a map of every matrix" in err
