# amaranth: UnusedElaboratable=no
"""The memory-fed step against the DRAM model: outputs read back from memory equal the step's bit-accurate model,
the RTL's word counters equal the memory program's bytes per tensor, under random stalls, for both memory
presets, and on Verilator."""

import pytest

from edge_qlora.golden import lora
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.memmap import layout
from edge_qlora.rtl.lora import LoraConfig
from edge_qlora.rtl.lora.memstep import MemStepConfig
from edge_qlora.rtl.memport import MemPortConfig
from edge_qlora.sim import verilator
from edge_qlora.sim.memstep import mem_step_config, run_mem_step
from edge_qlora.sim.streams import Stalls

from reference import mismatches

#: The report's counters against the program's tensors.
READ_TENSORS = {"x": ("x",), "dy": ("dy",), "a": ("lora_A",), "b": ("lora_B",), "absmax2": ("nf4_absmax2",),
                "absmax": ("nf4_absmax",), "codes": ("nf4_codes",), "m": ("exp_avg_A", "exp_avg_B"),
                "v": ("exp_avg_sq_A", "exp_avg_sq_B")}
WRITE_TENSORS = {"y": ("y",), "dx": ("dx",), "param": ("lora_A", "lora_B"), "m": ("exp_avg_A", "exp_avg_B"),
                 "v": ("exp_avg_sq_A", "exp_avg_sq_B")}


def check(case, memory="ulx3s-sdram", rows=2, cols=2, stalls=None, backend="pysim"):
    config = mem_step_config(case, memory, rows, cols)
    run = run_mem_step(case, config, memory=memory, stalls=stalls, backend=backend)
    model = lora.step_model(case, config.step.chunk)
    for name, value in run.outputs.items():
        assert mismatches(model[name], value) == 0, name
    for counters, program, tensors in ((run.read_bytes, run.program_read_bytes, READ_TENSORS),
                                       (run.written_bytes, run.program_written_bytes, WRITE_TENSORS)):
        for name, moved in counters.items():
            assert moved == sum(program.get(t, 0) for t in tensors[name]), name
        assert sum(counters.values()) == sum(program.values())
    assert 0 <= run.stall_cycles["memory"] < run.cycles
    return run


def test_step_through_memory():
    run = check(lora.random_case(4, 64, 32, 4, seed=1, states=True))
    assert run.bytes_read > 0 and run.bytes_written > 0


def test_step_through_memory_random_stalls():
    stalls = {name: Stalls(0.3, k) for k, name in enumerate(("descriptor", "fill", "written", "report"))}
    check(lora.random_case(2, 32, 16, 2, seed=2, states=True), stalls=stalls)


def test_step_through_memory_sgd_plain_absmax():
    check(lora.random_case(2, 32, 16, 3, "sgd", seed=3, double_quant=False))


def test_step_through_ddr3():
    check(lora.random_case(4, 32, 16, 2, seed=4, states=True), "ecpix5-ddr3", rows=2, cols=4)


@pytest.mark.skipif(not verilator.available(), reason=verilator.unavailable_reason() or "")
def test_step_through_memory_verilator():
    case = lora.random_case(4, 64, 32, 4, seed=5, states=True)
    fast = check(case, backend="verilator")
    slow = check(case, backend="pysim")
    assert fast.cycles == slow.cycles


def test_program_splits_and_orders():
    """The read program: whole inputs, then per pass (absmax2, absmax, codes) per 256 blocks, then the moments;
    every request inside one boundary and at most max_burst words."""
    port = mp.PortShape(2, 8, 64)
    memmap = layout(64, 64, 4, 4)
    jobs = mp.read_jobs(memmap, rows=2)
    assert [j.tensor for j in jobs[:4]] == ["x", "dy", "lora_A", "lora_B"]
    weight = [j.tensor for j in jobs[4:] if j.tensor.startswith("nf4_")]
    assert weight == ["nf4_absmax2", "nf4_absmax", "nf4_codes"] * 4     # 64 blocks: one group, 2 + 2 passes
    for r in mp.requests(port, jobs, "read"):
        assert 1 <= r.length <= 8 and r.address // 64 == (r.address + 2 * r.length - 1) // 64
    with pytest.raises(ValueError, match="multiple of the engine's rows"):
        mp.check_shape(layout(64, 64, 3, 4), 2, 2, port)


def test_config_errors():
    with pytest.raises(ValueError, match="power of two"):
        MemStepConfig(step=LoraConfig(rows=2, cols=3))
    with pytest.raises(ValueError, match="power of two"):
        MemStepConfig(step=LoraConfig(rows=3, cols=2))
    with pytest.raises(ValueError, match="whole port words"):
        MemStepConfig(step=LoraConfig(rows=2, cols=2), port=MemPortConfig(data_width=64))


@pytest.mark.parametrize("d_in,d_out,t,rows,word", [(64, 32, 4, 2, 2), (2048, 256, 128, 8, 2), (2048, 256, 128, 8, 8),
                                                    (96, 64, 8, 4, 8)])
def test_program_bytes_equal_the_traffic_model(d_in, d_out, t, rows, word):
    """The memory program moves what golden/traffic.py's resident dataflow counts, but for the NF4 offset (in the
    descriptor, not read) and absmax2 (one port word per group of 256 blocks)."""
    from edge_qlora.golden import traffic
    port = mp.PortShape(word, 64, 1024)
    memmap = layout(d_in, d_out, t, 16)
    program = {**{f"read {k}": v for k, v in mp.bytes_by_tensor(port, mp.requests(port, mp.read_jobs(memmap, rows),
                                                                                    "read")).items()},
               **{f"write {k}": v for k, v in mp.bytes_by_tensor(port, mp.requests(
                   port, mp.write_jobs(memmap, rows, 8), "write")).items()}}
    model = traffic.resident(traffic.StepShape(d_in, d_out, t, 16, rows=rows))
    passes = model.weight_passes
    groups = -(-(-(-d_in * d_out // 64)) // 256)
    weight = sum(program[f"read nf4_{k}"] for k in ("codes", "absmax", "absmax2"))
    assert weight == model.read["W"] - passes * 4 + passes * groups * (max(word, 4) - 4)
    for name in ("x", "dy"):
        assert program[f"read {name}"] == model.read[name]
        assert program[f"write {'y' if name == 'x' else 'dx'}"] == model.written["y" if name == "x" else "dx"]
    assert program["read lora_A"] + program["read lora_B"] == model.read["A"] + model.read["B"]
    assert program["write lora_A"] + program["write lora_B"] == model.written["A"] + model.written["B"]
    state = sum(v for k, v in program.items() if k.startswith("read exp_avg"))
    assert state == model.read["state"] == sum(v for k, v in program.items() if k.startswith("write exp_avg"))
