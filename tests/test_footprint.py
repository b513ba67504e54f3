"""``edge-qlora footprint``: parameter counts on the meta-device models, NF4 bytes measured with bitsandbytes, the
report's internal consistency, and bad input."""

import json

import pytest
import torch

from edge_qlora.footprint import activation_terms, footprint, format_table, inventory, measure_nf4, model_config

import reference  # noqa: F401  (quiets bitsandbytes before it loads)
from reference import run_cli  # noqa: E402
import bitsandbytes as bnb  # noqa: E402

KEYS = ("params", "linear_params", "fp16_bytes", "nf4_linear_bytes", "total_bytes", "reduction_vs_fp16",
        "lora_bytes", "optimizer_bytes", "activation_bytes", "streamed_working_set_bytes")
TINYLLAMA_PROJECTIONS = {  # (out, in) of each linear layer of one decoder layer
    "self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (256, 2048), "self_attn.v_proj": (256, 2048),
    "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (5632, 2048), "mlp.up_proj": (5632, 2048),
    "mlp.down_proj": (2048, 5632)}



@pytest.fixture(scope="module")
def tiny():
    return footprint("tinyllama-1.1b")


def test_parameter_counts_of_the_published_models():
    inv = inventory("tinyllama-1.1b")
    assert inv.params == 1_100_048_384
    per_layer = sum(out * inp for out, inp in TINYLLAMA_PROJECTIONS.values())
    assert per_layer == 44_040_192
    assert inv.linear_params == 22 * per_layer and inv.layers == 22
    assert inv.projections == tuple(TINYLLAMA_PROJECTIONS)
    assert inv.embed_params == inv.head_params == 32000 * 2048
    assert inv.other_params == (2 * 22 + 1) * 2048  # RMSNorm weights
    assert inventory("mistral-7b").params == 7_241_732_096
    phi = inventory("phi-2")
    assert phi.params == 2_779_683_840
    assert phi.projections == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                               "mlp.fc1", "mlp.fc2")


@pytest.mark.parametrize("shape", [(5632, 2048), (256, 2048)])
def test_nf4_bytes_are_what_bitsandbytes_stores(shape):
    rows, cols = shape
    n = rows * cols
    measured = measure_nf4(rows, cols)
    assert measured.packed == n // 2 and measured.absmax == n // 64  # 4-bit codes, one uint8 absmax per block
    assert measured.nested == 4 * -(-(n // 64) // 256) + 4 * 256  # fp32 absmax per 256 absmax; nested code
    # the same bytes as a Linear4bit's state dict (the packed metadata may differ by a byte with the offset's digits)
    weight = torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02
    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     blocksize=64)
    state = layer.to("cpu").state_dict()
    assert abs(sum(t.numel() * t.element_size() for t in state.values()) - measured.total) <= 8


def test_nf4_bits_per_weight(tiny):
    assert 4.127 < measure_nf4(5632, 2048).bits_per_weight < 4.128  # 4 + 8/64 + 32/(64*256) + fixed overhead
    assert 4.127 < tiny.values["nf4_bits_per_linear_weight"] < 4.13


def test_report_is_consistent(tiny):
    v, inv = tiny.values, tiny.inventory
    assert v["fp16_bytes"] == 2 * inv.params
    assert v["total_bytes"] == (v["nf4_linear_bytes"] + v["embedding_bytes"] + v["lm_head_bytes"]
                                + v["norm_and_bias_bytes"])
    assert v["reduction_vs_fp16"] == pytest.approx(1 - v["total_bytes"] / v["fp16_bytes"], abs=1e-12)
    assert v["embedding_bytes"] == v["lm_head_bytes"] == 2 * 32000 * 2048
    assert v["nf4_linear_bytes"] == sum(measure_nf4(*shape).total * 22 for shape in TINYLLAMA_PROJECTIONS.values())
    lora = 22 * sum(16 * (out + inp) for out, inp in TINYLLAMA_PROJECTIONS.values())
    assert v["lora_params"] == lora == 12_615_680
    assert (v["lora_bytes"], v["lora_grad_bytes"], v["optimizer_bytes"]) == (4 * lora, 4 * lora, 8 * lora)
    assert v["training_bytes"] == v["total_bytes"] + 16 * lora + v["activation_bytes"]
    assert 22 * v["streamed_layer_nf4_bytes"] == v["nf4_linear_bytes"]
    per_layer, _, scratch = tiny.activations
    assert v["streamed_working_set_bytes"] == (v["streamed_layer_nf4_bytes"] + 16 * lora // 22
                                               + sum(n * b for _, n, b in per_layer + scratch))
    assert v["streamed_working_set_bytes"] < v["total_bytes"] / 10


def test_activations_scale_with_sequence_length():
    config, projections = model_config("tinyllama-1.1b"), tuple(TINYLLAMA_PROJECTIONS)

    def layer_bytes(s, r=16):
        return sum(n * b for _, n, b in activation_terms(config, s, r, projections)[0])
    # linear in S but for the attention probabilities [32 heads, S, S] in bf16
    assert layer_bytes(256) - 2 * layer_bytes(128) == 2 * 32 * (256 ** 2 - 2 * 128 ** 2)
    assert layer_bytes(128, 32) - layer_bytes(128, 16) == 2 * 7 * 128 * 16  # one [S, r] per projection


def test_nf4_embeddings_are_measured(tiny):
    nf4 = footprint("tinyllama-1.1b", embeddings="nf4")
    embed = measure_nf4(32000, 2048).total
    assert nf4.values["embedding_bytes"] == nf4.values["lm_head_bytes"] == embed
    assert nf4.values["total_bytes"] == tiny.values["total_bytes"] - 2 * (2 * 32000 * 2048 - embed)


def test_cli_json_and_table(tiny, capsys):
    assert run_cli("footprint", "--model", "tinyllama-1.1b", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    for key in KEYS:
        assert report[key] == tiny.values.get(key, tiny.to_dict()[key])
    assert report["params"] == 1_100_048_384 and report["seq_len"] == 128 and report["lora_r"] == 16
    assert run_cli("footprint", "--model", "tinyllama-1.1b", "--seq-len", "64", "--lora-r", "8") == 0
    table = capsys.readouterr().out
    assert table == format_table(footprint("tinyllama-1.1b", 8, 64)) + "\n"
    assert "300 MB target" in table and "75% reduction target" in table and "bits/parameter" in table


@pytest.mark.parametrize("argv,expected", [
    (("--model", "llama-70b"), "invalid choice: 'llama-70b'"),
    (("--model", "phi-2", "--lora-r", "0"), "LoRA rank must be a positive integer, not 0"),
    (("--model", "phi-2", "--lora-r", "-4"), "LoRA rank must be a positive integer"),
    (("--model", "phi-2", "--seq-len", "0"), "sequence length must be a positive integer, not 0"),
    (("--model", "phi-2", "--seq-len", "12.5"), "sequence length must be a positive integer"),
    (("--lora-r", "8",), "required: --model"),
])
def test_bad_input_gives_one_line_error(argv, expected, capsys):
    assert run_cli("footprint", *argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("edge-qlora footprint: error:") and expected in captured.err


@pytest.mark.parametrize("kwargs", [dict(model="gpt-2"), dict(lora_r=0), dict(seq_len=-1), dict(lora_r=2.5),
                                    dict(embeddings="fp8")])
def test_api_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        footprint(**{"model": "tinyllama-1.1b", **kwargs})


@pytest.fixture(scope="module")
def planned():
    from edge_qlora.plan import plan
    p = plan(300 * 10 ** 6, sample_rows=8)
    return p, footprint("tinyllama-1.1b", plan=p)


def test_the_model_under_a_plan(tiny, planned):
    from edge_qlora.golden.codebook import stored_bytes
    p, fp = planned
    v, inv = fp.planned, fp.inventory
    shapes = {m.name: m.numel for m in p.source.matrices}
    assert len(shapes) == 7 * 22 + 2 and {"model.embed_tokens", "lm_head"} <= set(shapes)
    assert v["total_bytes"] == p.total_bytes <= 300 * 10 ** 6
    assert v["total_bytes"] == (v["linear_bytes"] + v["embedding_bytes"] + v["lm_head_bytes"]
                                + v["norm_and_bias_bytes"])
    assert v["embedding_bytes"] == stored_bytes(32000 * 2048, p.assignment["model.embed_tokens"])
    assert v["lm_head_bytes"] == stored_bytes(32000 * 2048, p.assignment["lm_head"])
    assert v["norm_and_bias_bytes"] == tiny.values["norm_and_bias_bytes"]
    assert v["reduction_vs_fp16"] > 0.75 and v["under_target"]
    # the training working set beside it, counted as for NF4
    lora = tiny.values["lora_params"]
    assert v["training_bytes"] == v["total_bytes"] + 16 * lora + tiny.values["activation_bytes"]
    layer = max(sum(stored_bytes(shapes[f"model.layers.{i}.{name}"], p.assignment[f"model.layers.{i}.{name}"])
                    for name in inv.projections) for i in range(22))
    assert v["streamed_layer_bytes"] == layer
    assert (v["streamed_working_set_bytes"] - v["streamed_layer_bytes"]
            == tiny.values["streamed_working_set_bytes"] - tiny.values["streamed_layer_nf4_bytes"])
    # the NF4 report is unchanged beside it
    assert fp.values == tiny.values and "plan" not in tiny.to_dict() and fp.to_dict()["plan"] == v
    table = format_table(fp)
    assert table.startswith(format_table(tiny).split("\n\nNF4 measured")[0])
    assert "**quantized model as stored under the plan**" in table and "- under the plan:" in table
    assert "Under the plan" not in format_table(tiny)


def test_a_plan_of_another_model_is_refused(planned):
    with pytest.raises(ValueError, match="the plan is for tinyllama-1.1b, not phi-2"):
        footprint("phi-2", plan=planned[0])


def test_cli_budget_and_plan(planned, tmp_path, capsys):
    assert run_cli("footprint", "--model", "tinyllama-1.1b", "--budget", "300MB", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["total_bytes"] <= 300 * 10 ** 6 and report["plan"]["budget_bytes"] == 300 * 10 ** 6
    assert report["total_bytes"] == planned[1].values["total_bytes"]  # the NF4 figures as without a plan
    saved = tmp_path / "plan.json"
    assert run_cli("plan", "--budget", "0.3GB", "--sample-rows", "8", "--out", saved, "--json") == 0
    capsys.readouterr()
    assert run_cli("footprint", "--model", "tinyllama-1.1b", "--plan", saved) == 0
    table = capsys.readouterr().out
    assert table == format_table(planned[1]) + "\n"  # the same plan, read back from the file


@pytest.mark.parametrize("argv,expected", [
    (("--budget", "200MB"), "edge-qlora: error: budget 200,000,000 bytes (200.0 MB) is too small"),
    (("--budget", "lots"), "edge-qlora footprint: error: argument --budget: budget must be a positive size"),
    (("--budget", "300MB", "--plan", "p.json"), "not allowed with argument"),
    (("--plan", "missing.json"), "edge-qlora: error: missing.json: cannot read"),
])
def test_bad_plan_options(argv, expected, capsys):
    assert run_cli("footprint", "--model", "tinyllama-1.1b", *argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and expected in captured.err
