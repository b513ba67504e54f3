"""Run the memory-fed QLoRA step (``rtl/lora/memstep.py``) against the DRAM timing model, in Amaranth's simulator or
on Verilator, on a :class:`~edge_qlora.golden.lora.LoraCase` placed in memory by ``golden/memmap.py``.

The bench is the step and a :class:`~edge_qlora.rtl.dram_port.DramPort` behind its port. The read words come
from the case's memory image in the order of ``golden/memprogram.py``'s read program (the step issues its requests
in exactly that order), every word written comes back with its address and is stored into the image, and the
step's outputs are read back from the image. The step's one ``report`` beat gives cycles, stall cycles and the
words moved per tensor (the RTL's counters).
"""

from dataclasses import dataclass, field

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from edge_qlora.constants import DRAM_PRESETS
from edge_qlora.golden import dram
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.memmap import layout_for, pack_case, unpack_outputs
from edge_qlora.rtl.dram_port import DramPort, written_layout as dram_written_layout
from edge_qlora.rtl.lora import LoraConfig, Phase
from edge_qlora.rtl.lora.memstep import (ADDRESSES, READS, STATE_GROUP, WRITES, MemStep, descriptor_layout,
                                         for_memory, report_layout)
from edge_qlora.rtl.memport import port_for
from .harness import producer, resolve_backend, simulate
from .lora import _collector, _header, _phase_watch, optimizer_latency, step_cycles
from .streams import NO_STALLS
from .verilator import Source, VerilatorModel, run_model

__all__ = ["MEMORIES", "port_for", "MemStepBench", "MemStepRun", "run_mem_step", "mem_step_config"]

#: ``--memory`` names: the DRAM presets of ``edge_qlora.constants``.
MEMORIES = tuple(DRAM_PRESETS)


class MemStepBench(wiring.Component):
    """The step and the DRAM model behind its port (simulation only).

    Attributes
    ----------
    descriptor : In(stream), fill : In(stream of port words), written : Out(stream of (address, word)),
    report : Out(stream), phase : Out(Phase)
    """

    def __init__(self, config, timing):
        self.config, self.timing = config, timing
        self.dut = MemStep(config)
        self.memory = DramPort(config.port, timing)
        super().__init__({
            "descriptor": In(stream.Signature(descriptor_layout(config))),
            "fill": In(stream.Signature(config.port.data_width)),
            "written": Out(stream.Signature(self.memory.written.payload.shape())),
            "report": Out(stream.Signature(report_layout())),
            "phase": Out(Phase),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        m.submodules.memory = memory = self.memory
        wiring.connect(m, dut.mem, memory.port)
        wiring.connect(m, wiring.flipped(self.descriptor), dut.descriptor)
        wiring.connect(m, wiring.flipped(self.fill), memory.fill)
        wiring.connect(m, memory.written, wiring.flipped(self.written))
        wiring.connect(m, dut.report, wiring.flipped(self.report))
        m.d.comb += self.phase.eq(dut.phase)
        return m


@dataclass
class MemStepRun:
    """A step against memory: the outputs read back from memory (named as ``golden.lora``'s ``step_model``), the
    report's counters, cycles per phase, and the program's bytes per tensor."""

    outputs: dict
    cycles: int
    stall_cycles: dict
    read_bytes: dict
    written_bytes: dict
    phase_cycles: dict
    program_read_bytes: dict = field(default_factory=dict)
    program_written_bytes: dict = field(default_factory=dict)

    @property
    def bytes_read(self):
        return sum(self.read_bytes.values())

    @property
    def bytes_written(self):
        return sum(self.written_bytes.values())


def _timing(memory):
    """The ``DramTiming`` of a ``--memory`` name; ValueError naming the choices otherwise."""
    if memory not in DRAM_PRESETS:
        raise ValueError(f"unknown memory {memory!r}; choose one of {', '.join(MEMORIES)}")
    return DRAM_PRESETS[memory]


def mem_step_config(case, memory="ulx3s-sdram", rows=2, cols=2):
    """The :class:`MemStepConfig` sized for ``case`` with ``rows x cols`` engine behind ``memory``'s port (see
    :func:`~edge_qlora.rtl.lora.memstep.for_memory`)."""
    timing = _timing(memory)
    t, d_in = case.x.shape
    step = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=case.dy.shape[1],
                      max_rank=case.lora_A.shape[0], optimizer=case.optimizer, blocksize=case.weight.blocksize,
                      double_quant=case.weight.double_quant)
    return for_memory(step, port_for(timing))


def _descriptor(case, memmap, config):
    t, d_in = case.x.shape
    header = _header(case, t, d_in, case.dy.shape[1], case.lora_A.shape[0])
    names = {"codes": "nf4_codes", "absmax": "nf4_absmax", "absmax2": "nf4_absmax2", "x": "x", "dy": "dy",
             "a": "lora_A", "b": "lora_B", "m_a": "exp_avg_A", "v_a": "exp_avg_sq_A", "m_b": "exp_avg_B",
             "v_b": "exp_avg_sq_B", "y": "y", "dx": "dx"}
    outputs = {"a_out": "lora_A", "b_out": "lora_B", "m_a_out": "exp_avg_A", "v_a_out": "exp_avg_sq_A",
               "m_b_out": "exp_avg_B", "v_b_out": "exp_avg_sq_B"}
    aw = config.port.address_width
    header_bits = descriptor_layout(config).members["header"].size
    value = header
    for k, name in enumerate(ADDRESSES):
        if name in outputs:
            address = memmap.output_region(outputs[name]).address if outputs[name] in memmap else 0
        else:
            address = memmap[names[name]].address if names[name] in memmap else 0
        value |= address << (header_bits + k * aw)
    return value


def _fields(value, layout):
    out = {}
    for name, member in layout:
        out[name] = (value >> member.offset) & ((1 << member.width) - 1)
    return out


def run_mem_step(case, config=None, *, memory="ulx3s-sdram", stalls=None, backend=None, vcd_path=None,
                 max_cycles=None, progress=None, status=None):
    """One step of :class:`MemStep` against the DRAM model of ``memory``; returns a :class:`MemStepRun`."""
    timing = _timing(memory)
    config = config or mem_step_config(case, memory)
    port = mp.PortShape.of(config.port)
    memmap = layout_for(case, align=64)
    scfg = config.step
    mp.check_shape(memmap, scfg.rows, scfg.cols, port)
    if memmap.end > config.port.capacity:
        raise ValueError(f"the step's tensors take {memmap.end:,} bytes: more than the {memory} port reaches")
    image = pack_case(case, memmap)
    reads = mp.requests(port, mp.read_jobs(memmap, scfg.rows), "read")
    writes = mp.requests(port, mp.write_jobs(memmap, scfg.rows, scfg.cols), "write")
    fill = mp.fill_words(port, image, memmap.base, reads)
    wanted = {"written": sum(w.length for w in writes), "report": 1}
    t, d_in = case.x.shape
    if max_cycles is None:
        compute = sum(step_cycles(t, d_in, case.dy.shape[1], case.lora_A.shape[0], scfg.rows, scfg.cols,
                                  scfg.optimizer, scfg.optimizer_interval).values())
        max_cycles = 4 * compute + 20 * (len(fill) + wanted["written"]) + 100_000
    stalls = dict(stalls or {})
    inputs = {"descriptor": [_descriptor(case, memmap, config)], "fill": fill}
    written_layout = dram_written_layout(config.port)
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(lambda: MemStepBench(config, timing), f"MemStepBench {config!r} {timing!r}",
                               trace=bool(vcd_path))
        beats, total, watches = run_model(model, {k: Source(v) for k, v in inputs.items()}, wanted, stalls=stalls,
                                          max_cycles=max_cycles, vcd_path=vcd_path, progress=progress,
                                          status=status)
        phase_log = [(cycle, Phase(value).name) for cycle, value in watches["phase"]]
    else:
        bench = MemStepBench(config, timing)
        producers = [producer(getattr(bench, name), beats, stalls.get(name, NO_STALLS))
                     for name, beats in inputs.items()]
        phase_log = []
        consumer = _collector({"written": bench.written, "report": bench.report}, wanted, stalls, max_cycles)
        beats, total = simulate(bench, producers, consumer, vcd_path, processes=[_phase_watch(bench.phase,
                                                                                              phase_log)])
    for key, count in wanted.items():
        if len(beats[key]) != count:
            raise RuntimeError(f"the memory-fed step produced {len(beats[key])} of {count} '{key}' beats "
                               f"(phases: {phase_log[-6:]})")
    written = [_fields(b, written_layout) for b in beats["written"]]
    mp.apply_writes(port, image, memmap.base, [(w["address"], w["data"]) for w in written])
    report = _fields(beats["report"][0], report_layout())
    wb = port.word_bytes
    phase_cycles = {}
    for (start, name), (end, _) in zip(phase_log, phase_log[1:] + [(total, None)]):
        if name != "IDLE":
            phase_cycles[name] = phase_cycles.get(name, 0) + end - start
    return MemStepRun(
        outputs=unpack_outputs(image, memmap), cycles=report["cycles"],
        stall_cycles={"memory": report["memory"], "compute": report["compute"]},
        read_bytes={name: report[f"read_{name}"] * wb for name in READS},
        written_bytes={name: report[f"write_{name}"] * wb for name in WRITES},
        phase_cycles=phase_cycles,
        program_read_bytes=mp.bytes_by_tensor(port, reads), program_written_bytes=mp.bytes_by_tensor(port, writes))



def _interleave(reads, writes):
    """Reads in program order with the writes spread evenly among them (a phase writes as it computes)."""
    out, k, n, m = [], 0, len(reads), len(writes)
    for i, request in enumerate(reads):
        out.append(request)
        while k < m and (k + 1) * n <= (i + 1) * m:
            out.append(writes[k])
            k += 1
    return out + list(writes[k:])


def _dram_cycles(timing, port, reqs):
    """Cycles the DRAM takes to serve ``reqs`` back to back (``golden/dram.py``)."""
    if not reqs:
        return 0
    return dram.simulate(timing, [(q.address, q.length * port.word_bytes, q.op) for q in reqs]).cycles


def _write_path(timing, port, writes):
    """Cycles the write path needs for ``writes`` one after another: the step hands the writer a job only when the
    previous one has gone out, so each job's words are packed into the staging FIFO, then written (its own row
    activation, from a closed row), then the next job starts."""
    return sum(q.length + _WRITE_HANDOFF + _dram_cycles(timing, port, [q]) for q in writes)


#: Cycles between one write job's last word and the next job's first packed word (the sequencer's and the order
#: FIFO's handshakes).
_WRITE_HANDOFF = 3


def _update_startup(config, timing, port, state, elements):
    """Cycles at the start of the update in which the memory waits for the optimizer: the first write burst goes
    out once its last element is out of the core, and until then the memory can only read ahead as far as the
    moments' FIFOs have room (a FIFO-full of each, beyond what B2 and B3 prefetched)."""
    scfg = config.step
    burst = min(STATE_GROUP, elements, port.max_burst * port.word_bytes // 4)
    first = burst * scfg.optimizer_interval + optimizer_latency(scfg.optimizer, scfg.optimizer_interval)
    ahead = []
    for name in ("exp_avg_A", "exp_avg_sq_A"):
        prefetched = taken = 0
        for q in (q for q in state if q.tensor == name):
            if prefetched < config.fifo_words:
                prefetched += q.length
            elif taken < config.fifo_words:
                ahead.append(q)
                taken += q.length
    return max(0, first - _dram_cycles(timing, port, ahead))


def model_cycles(config, memory, t, d_in, d_out, r, double_quant=True):
    """The cycle model of :class:`MemStep` against ``memory``.

    Each part of the step takes the longer of its compute (``sim/lora.py``'s :func:`step_cycles`, the step with
    streams that never stall) and the DRAM's time for that part's requests (``golden/dram.py`` on the requests of
    ``golden/memprogram.py``): the loads; F2 and B4, one weight pass each per tile of token rows, with the y or dx
    writes spread among the reads, less the words the read FIFOs prefetched during the compute-only phases before
    them; the update's reads and writes, a read burst ahead, then read and write bursts in turn. The compute-only phases (F1, F3,
    B1, B5, B2, B3) take their compute cycles.

    Returns ``{"cycles": total, "phases": {phase or group: cycles}, "compute": cycles without memory,
    "memory": DRAM cycles of the whole program}``.
    """
    from edge_qlora.golden.memmap import layout
    scfg = config.step
    timing = _timing(memory)
    compute = step_cycles(t, d_in, d_out, r, scfg.rows, scfg.cols, scfg.optimizer, scfg.optimizer_interval)
    memmap = layout(d_in, d_out, t, r, scfg.optimizer, scfg.blocksize, double_quant, align=64)
    port = mp.PortShape.of(config.port)
    reads = mp.requests(port, mp.read_jobs(memmap, scfg.rows), "read")
    writes = mp.requests(port, mp.write_jobs(memmap, scfg.rows, scfg.cols), "write")
    passes = -(-t // scfg.rows)
    loads = [q for q in reads if q.tensor in ("x", "dy", "lora_A", "lora_B")]
    weight = [q for q in reads if q.tensor.startswith("nf4_")]
    state = [q for q in reads if q.tensor.startswith("exp_avg")]
    per_pass = len(weight) // (2 * passes)
    phases = {"load": max(compute["load"], _dram_cycles(timing, port, loads))}
    for name in ("F1", "F3"):
        phases[name] = compute[name]
    # the weight FIFOs fill while the compute-only phases before F2 and B4 run
    fifo_words = config.fifo_words
    prefetch = sum(min(fifo_words, sum(q.length for q in weight[:per_pass] if q.tensor == name))
                   for name in ("nf4_codes", "nf4_absmax", "nf4_absmax2"))
    for name, out in (("F2", "y"), ("B4", "dx")):
        outs = [q for q in writes if q.tensor == out]
        one_pass = _interleave(weight[:per_pass], outs[:len(outs) // passes])
        memory_time = passes * _dram_cycles(timing, port, one_pass) - prefetch
        phases[name] = max(compute[name], memory_time, _write_path(timing, port, outs))
        if name == "F2":
            for before in ("B1", "B5"):
                phases[before] = compute[before]
    for name in ("B2", "B3"):
        phases[name] = compute[name]
    # the update: the reader a burst ahead, then a read burst and a write burst in turn
    updates = [q for q in writes if q.tensor not in ("y", "dx")]
    order, k = list(state[:1]), 1
    for request in updates:
        if k < len(state):
            order.append(state[k])
            k += 1
        order.append(request)
    order += state[k:]
    # the moments' FIFOs fill during B2 and B3; the last group's writes go out after the optimizer's last element
    state_prefetch = sum(min(fifo_words, sum(q.length for q in state if q.tensor == name))
                         for name in ("exp_avg_A", "exp_avg_sq_A"))
    last_group = updates[-(3 if scfg.optimizer == "adamw" else 1):]
    phases["update"] = max(compute["update"] + _dram_cycles(timing, port, last_group),
                           _dram_cycles(timing, port, order) - state_prefetch
                           + _update_startup(config, timing, port, state, d_in * r + d_out * r))
    total = sum(phases.values())
    return {"cycles": total, "phases": phases, "compute": sum(compute.values()),
            "memory": _dram_cycles(timing, port, reads + writes)}
