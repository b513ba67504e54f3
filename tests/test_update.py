"""The update pass (rtl/update.py): its read and write issuers alone under random stalls, and the whole pass
against the DRAM model: the new master and moments equal golden.lora_optim's to the bit on adversarial values,
every request in the order of golden/blockprogram.py's update_pass, the RTL's byte counters equal to that
program's."""

import importlib.util
import pathlib

import numpy as np
import pytest
from amaranth.sim import Simulator

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import lora_optim
from edge_qlora.golden.memmap import layout
from edge_qlora.rtl.memport import MemPortConfig
from edge_qlora.rtl.update import UpdateConfig, UpdateReads, UpdateWrites
from edge_qlora.sim import verilator
from edge_qlora.sim.streams import Stalls
from edge_qlora.sim.update import model_cycles, run_update, update_memmap

from reference import long_run_backend

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("update_pass", _ROOT / "scripts" / "update_pass.py")
update_pass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_pass)

HYPER = lora_optim.hyper_from(1e-3, weight_decay=0.01, step=3)
RUN_STALLS = ("descriptor", "fill", "written", "report")


def _stalls(seed, names):
    return {name: Stalls(0.35, seed * 10 + i) for i, name in enumerate(names)}


def _bits(values):
    return np.asarray(values, np.float32).view(np.uint32)


def _issued(dut, start_fields, levels, count, seed):
    """Run an issuer (``levels``: the FIFO levels it sees, or None) and collect ``count`` jobs, ready withheld at
    random; nothing more after them."""
    got = []
    rng = np.random.default_rng(seed)

    async def bench(ctx):
        for name, value in start_fields.items():
            ports = getattr(dut, name)
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                ctx.set(ports[i] if isinstance(value, list) else ports, v)
        for i, level in enumerate(levels or []):
            ctx.set(dut.levels[i], level)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        for _ in range(40 * count + 100):
            ready = int(rng.random() > 0.35)
            ctx.set(dut.jobs.ready, ready)
            if ready and ctx.get(dut.jobs.valid):
                got.append(ctx.get(dut.jobs.payload))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got


def test_update_reads_issue_the_programs_read_jobs():
    # 80 elements of B in groups of 32: three groups (32, 32, 16) of master, gradient and the two moments
    config = UpdateConfig(group=32)
    memmap = update_memmap(64, 40, 2)
    program = bp.update_pass(memmap, "B", 32)
    want = [(job.address, job.bytes) for op, job in program.ops if op == "read"]
    bases = [memmap[bp.UPDATE_TENSORS[n].format("B")].address for n in config.reads]
    got = _issued(UpdateReads(config), {"base": bases, "count": 80}, None, len(want), 1)
    assert [(j.address, j.bytes) for j in got] == want
    assert [j.dest for j in got] == [0, 1, 2, 3] * 3


@pytest.mark.parametrize("levels, issued", [((64, 64, 64), 9), ((64, 63, 64), 1), ((0, 64, 64), 0)])
def test_update_writes_wait_for_a_whole_group_in_its_fifo(levels, issued):
    # 80 elements in groups of 32 (64 words of a 16-bit port a group): a job only while its FIFO holds its words
    # (the levels are held, so a FIFO that holds a whole group lets every job of its tensor through)
    config = UpdateConfig(group=32)
    memmap = update_memmap(64, 40, 2)
    program = bp.update_pass(memmap, "B", 32)
    want = [(job.address, job.bytes) for op, job in program.ops if op == "write"]
    bases = [memmap[bp.UPDATE_TENSORS[n].format("B")].address for n in config.writes]
    got = _issued(UpdateWrites(config), {"base": bases, "count": 80}, list(levels), len(want), 2)
    assert [(j.job.address, j.job.bytes) for j in got] == want[:issued]
    assert [j.source for j in got] == [0, 1, 2] * 3 if issued == 9 else len(got) == issued


def _tensors(shape, seed):
    return update_pass.tensors(shape, seed)


@pytest.mark.parametrize("memory, which, d_in, d_out, backend", [
    ("ulx3s-sdram", "A", 64, 32, None),                 # 128 elements: two whole groups, pysim
    ("ecpix5-ddr3", "B", 64, 40, "long"),               # 80: a group and a partial one, 64-bit words
])
def test_update_pass_equals_golden_adamw(memory, which, d_in, d_out, backend):
    memmap = update_memmap(d_in, d_out, 2)
    shape = memmap[f"lora_{which}"].shape
    given = _tensors(shape, 5)
    run = run_update(memmap, which, given, HYPER, memory=memory, stalls=_stalls(4, RUN_STALLS),
                     backend=long_run_backend() if backend else None)
    want = lora_optim.adamw(given["param"], given["grad"], given["m"], given["v"], HYPER)
    for got, expected in zip((run.param, run.m, run.v), want):
        assert (_bits(got) == _bits(expected)).all()
    assert np.isnan(run.param.reshape(-1)[6]) and np.isnan(run.m.reshape(-1)[6])    # the NaN gradient
    assert run.read_bytes == run.program_read_bytes == 16 * given["param"].size
    assert run.written_bytes == run.program_written_bytes == 12 * given["param"].size


def test_update_pass_sgd():
    memmap = layout(64, 32, 16, 2, "sgd", gradients_out=True)
    given = _tensors((2, 64), 6)
    del given["m"], given["v"]
    hyper = lora_optim.hyper_from(1e-2, weight_decay=0.1)
    run = run_update(memmap, "A", given, hyper, stalls=_stalls(5, RUN_STALLS))
    want = lora_optim.sgd(given["param"], given["grad"], hyper["weight_decay"], hyper["lr"])
    assert (_bits(run.param) == _bits(want)).all() and run.m is None
    assert run.read_bytes == 8 * 128 and run.written_bytes == 4 * 128


@pytest.mark.skipif(not verilator.available(), reason="Verilator is not installed")
def test_update_pass_cycles_and_model_on_verilator():
    # 4,096 elements of B (k_proj's shape): memory-bound on the SDRAM (about 15 cycles an element against the
    # optimizer's 8), and the cycle model within 3%
    memmap = update_memmap(2048, 256, 16)
    given = _tensors((256, 16), 7)
    run = run_update(memmap, "B", given, HYPER, backend="verilator")
    want = lora_optim.adamw(given["param"], given["grad"], given["m"], given["v"], HYPER)
    assert all((_bits(g) == _bits(w)).all() for g, w in zip((run.param, run.m, run.v), want))
    assert 14 * 4096 < run.cycles < 16 * 4096
    assert abs(model_cycles(memmap, "B") / run.cycles - 1) < 0.03


def test_update_pass_program_and_refusals():
    memmap = update_memmap(64, 40, 2)
    program = bp.update_pass(memmap, "B")
    assert bp.bytes_by_tensor(program) == {("read", "lora_B"): 320, ("read", "grad_B"): 320,
                                           ("read", "exp_avg_B"): 320, ("read", "exp_avg_sq_B"): 320,
                                           ("write", "lora_B"): 320, ("write", "exp_avg_B"): 320,
                                           ("write", "exp_avg_sq_B"): 320}
    assert [job.tensor for _, job in program.ops[:7]] == ["lora_B", "grad_B", "exp_avg_B", "exp_avg_sq_B",
                                                          "lora_B", "exp_avg_B", "exp_avg_sq_B"]
    with pytest.raises(ValueError, match="gradients_out=True"):
        bp.update_pass(layout(64, 40, 16, 2), "A")
    with pytest.raises(ValueError, match="which must be 'A' or 'B'"):
        bp.update_pass(memmap, "C")
    with pytest.raises(ValueError, match="group must be a power of two"):
        UpdateConfig(group=48)
    with pytest.raises(ValueError, match="whole 16-byte port words"):
        UpdateConfig(port=MemPortConfig(data_width=128), group=2)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        UpdateConfig(optimizer="adam")
    with pytest.raises(ValueError, match="interval must be"):
        UpdateConfig(interval=17)
    with pytest.raises(ValueError, match=r"param has shape \(3, 64\)"):
        run_update(memmap, "A", {**_tensors((2, 64), 1), "param": np.zeros((3, 64), np.float32)}, HYPER)


def test_update_pass_script_refuses_bad_input(capsys):
    with pytest.raises(SystemExit):
        update_pass.main(["--projections", "lm_head"])
    assert "invalid choice" in capsys.readouterr().err
