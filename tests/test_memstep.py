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
