# amaranth: UnusedElaboratable=no
"""The QLoRA training step: the accuracy contract against PEFT + bitsandbytes in bf16, and the RTL controller
against its bit-accurate model, over several steps with carried optimizer state."""

import pytest

from edge_qlora.golden import gemm as gemm_model
from edge_qlora.golden import lora
from edge_qlora.rtl.lora import LoraConfig, LoraStep
from edge_qlora.sim.lora import run_step
from edge_qlora.sim.streams import Stalls

from reference import long_run_backend, mismatches


def make_case(t, i, o, r, optimizer="adamw", step=1, seed=0, states=False, double_quant=True, weight_decay=0.01):
    return lora.random_case(t, i, o, r, optimizer, step, seed, states, double_quant, weight_decay)


CONTRACT_CASES = [
    dict(t=4, i=64, o=48, r=8),
    dict(t=1, i=32, o=16, r=1, optimizer="sgd"),
    dict(t=16, i=128, o=96, r=64, step=5, states=True),
    dict(t=7, i=100, o=33, r=3, step=2, states=True),
    dict(t=2, i=70, o=20, r=16, optimizer="sgd", weight_decay=0.1),
]


@pytest.mark.parametrize("spec", CONTRACT_CASES, ids=lambda s: "x".join(str(s[k]) for k in "tior"))
def test_accuracy_contract(spec):
    """Every output's relative Frobenius error against float64 is no worse than PEFT + bitsandbytes in bf16 +10%."""
    case = make_case(**spec)
    reference = lora.step_reference_fp64(case)
    ours = lora.step_model(case, chunk=16)
    peft = lora.step_peft_bf16(case)
    for name in lora.OUTPUT_NAMES:
        exact = reference[name].numpy()
        our_error = gemm_model.rel_frobenius(ours[name], exact)
        peft_error = gemm_model.rel_frobenius(peft[name].float(), exact)
        assert our_error <= peft_error * 1.1 + 1e-12, (name, our_error, peft_error)


STEP_STREAMS = ("header", "x_in", "dy_in", "a_in", "b_in", "tensor", "codes", "absmax", "absmax2", "state_in",
                "y", "dx", "updates")


def check_rtl(case, rows, cols, stalls=None, backend=None):
    config = LoraConfig(rows=rows, cols=cols, max_t=case.x.shape[0], max_in=case.x.shape[1],
                        max_out=case.dy.shape[1], max_rank=case.lora_A.shape[0], optimizer=case.optimizer,
                        double_quant=case.weight.double_quant)
    run = run_step(case, config, stalls=stalls, backend=backend)
    model = lora.step_model(case, config.chunk)
    for name in lora.OUTPUT_NAMES:
        assert mismatches(model[name], run.outputs[name]) == 0, name
    return run


@pytest.mark.parametrize("t,i,o,r,rows,cols,optimizer", [
    (3, 20, 12, 2, 2, 2, "adamw"),
    (1, 9, 6, 1, 2, 3, "sgd"),          # a single token, rank 1
    (5, 16, 7, 4, 3, 2, "adamw"),       # odd sizes, partial tiles everywhere
])
def test_rtl_equals_model(t, i, o, r, rows, cols, optimizer):
    check_rtl(make_case(t, i, o, r, optimizer, seed=t + i), rows, cols)


def test_b4_queues_its_outputs_for_the_combiner():
    """On 4x4 B4 gives a tile's 16 beats in its last sweep (16 steps a column tile) and the one-lane combiner takes
    24 cycles a column tile: with the tiles' beats queued the engine goes on, and only the last tile's drain
    follows it (without the queue the engine waited 8 cycles a column tile at each tile boundary: 384 cycles here,
    B4 about 8% more). A cycle count, on :func:`long_run_backend`."""
    from edge_qlora.rtl.lora import Phase
    from edge_qlora.sim.lora import combine_cycles, engine_cycles
    t, i, o, r = 16, 64, 64, 2
    run = check_rtl(make_case(t, i, o, r, seed=7), 4, 4, backend=long_run_backend())
    model = combine_cycles(Phase.B4, engine_cycles(Phase.B4, t, i, o, r, 4, 4), t, i, o, r, 4, 4)
    assert abs(run.phase_cycles["B4"] / model - 1) < 0.03, (run.phase_cycles["B4"], model)


def test_rtl_random_stalls_plain_absmax():
    stalls = {name: Stalls(0.3, k) for k, name in enumerate(STEP_STREAMS)}
    check_rtl(make_case(2, 12, 10, 2, "adamw", seed=3, double_quant=False), 2, 2, stalls)


def test_rtl_several_steps_with_carried_state():
    case = make_case(2, 10, 8, 2, "adamw", seed=5)
    for step in (1, 2):
        case.step = step
        run = check_rtl(case, 2, 2)
        case.lora_A, case.lora_B = run.outputs["lora_A"], run.outputs["lora_B"]
        case.state = {name: run.outputs[name] for name in lora.STATE_NAMES}
    assert set(run.phase_cycles) >= {"F1", "F2", "B4", "UPD_A", "UPD_B"}


def test_config_checks():
    with pytest.raises(ValueError, match="optimizer"):
        LoraConfig(optimizer="lion")
    with pytest.raises(ValueError, match="max_t"):
        LoraConfig(max_t=0)
    with pytest.raises(TypeError, match="config"):
        LoraStep("4x4")
