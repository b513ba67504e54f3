"""Run the memory-fed QLoRA step (``rtl/lora/memstep.py``) against the DRAM timing model, in Amaranth's simulator or
on Verilator, on a :class:`~edge_qlora.golden.lora.LoraCase` placed in memory by ``golden/memmap.py``.

The bench is the step and a :class:`~edge_qlora.rtl.dram_port.DramPort` behind its port. The read words come
from the case's memory image in the order of ``golden/memprogram.py``'s read program (the step issues its requests
in exactly that order), every word written comes back with its address and is stored into the image, and the
step's outputs are read back from the image. The step's one ``report`` beat gives cycles, stall cycles and the
words moved per tensor (the RTL's counters).
"""

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache

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
from edge_qlora.rtl.lora.updater import pipeline_depth
from edge_qlora.rtl.memport import port_for
from .harness import producer, resolve_backend, simulate
from .lora import (COMBINE_LATENCY, _collector, _header, _phase_watch, engine_cycles, first_output,
                   optimizer_latency, step_cycles)
from .streams import NO_STALLS
from .verilator import Source, VerilatorModel, run_model

__all__ = ["MEMORIES", "port_for", "DramBench", "run_dram_bench", "MemStepBench", "MemStepRun", "run_mem_step", "mem_step_config"]

#: ``--memory`` names: the DRAM presets of ``edge_qlora.constants``.
MEMORIES = tuple(DRAM_PRESETS)


class DramBench(wiring.Component):
    """An accelerator with a memory port (``dut``: its ``mem``, ``descriptor`` and ``report``) and the DRAM model
    behind the port (simulation only): the testbench feeds the descriptor and the read words (``fill``, in
    request order) and takes every written word with its address and the report.

    Attributes
    ----------
    descriptor : In(stream), fill : In(stream of port words), written : Out(stream of (address, word)),
    report : Out(stream); ``extra``: more outputs, driven by :meth:`observe`
    """

    def __init__(self, dut, port, timing, extra=None):
        self.timing = timing
        self.dut = dut
        self.memory = DramPort(port, timing)
        super().__init__({
            "descriptor": In(dut.descriptor.signature.flip()),
            "fill": In(stream.Signature(port.data_width)),
            "written": Out(stream.Signature(self.memory.written.payload.shape())),
            "report": Out(dut.report.signature),
            **(extra or {}),
        })

    def observe(self, m, dut):
        """Drive the ``extra`` outputs from the design (none here)."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        m.submodules.memory = memory = self.memory
        wiring.connect(m, dut.mem, memory.port)
        wiring.connect(m, wiring.flipped(self.descriptor), dut.descriptor)
        wiring.connect(m, wiring.flipped(self.fill), memory.fill)
        wiring.connect(m, memory.written, wiring.flipped(self.written))
        wiring.connect(m, dut.report, wiring.flipped(self.report))
        self.observe(m, dut)
        return m


class MemStepBench(DramBench):
    """The step and the DRAM model behind its port; ``phase`` out: the step's phase."""

    def __init__(self, config, timing):
        self.config = config
        super().__init__(MemStep(config), config.port, timing, {"phase": Out(Phase)})

    def observe(self, m, dut):
        m.d.comb += self.phase.eq(dut.phase)


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


def run_dram_bench(factory, key, inputs, wanted, *, image, port_config, base, stalls=None, max_cycles, backend=None,
                   vcd_path=None, progress=None, status=None, phase_log=None, what="the design"):
    """Run a :class:`DramBench` (``factory()``; its Verilator model cached under ``key``) on pysim or Verilator:
    ``inputs`` the descriptor and fill beats, ``wanted`` the ``written`` and ``report`` beat counts. Every written
    word is stored into ``image`` (a bytearray from ``base``; ``port_config`` the port's ``MemPortConfig``). With
    ``phase_log`` (a list), the bench's ``phase`` output is logged into it as ``(cycle, Phase name)`` at each
    change. Returns the beats (``{"written": ..., "report": ...}``) and the cycles; RuntimeError naming ``what``
    if a count falls short."""
    stalls = dict(stalls or {})
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(factory, key, trace=bool(vcd_path))
        beats, total, watches = run_model(model, {k: Source(v) for k, v in inputs.items()}, wanted, stalls=stalls,
                                          max_cycles=max_cycles, vcd_path=vcd_path, progress=progress,
                                          status=status)
        if phase_log is not None:
            phase_log += [(cycle, Phase(value).name) for cycle, value in watches["phase"]]
    else:
        bench = factory()
        producers = [producer(getattr(bench, name), beats, stalls.get(name, NO_STALLS))
                     for name, beats in inputs.items()]
        consumer = _collector({"written": bench.written, "report": bench.report}, wanted, stalls, max_cycles)
        processes = [_phase_watch(bench.phase, phase_log)] if phase_log is not None else []
        beats, total = simulate(bench, producers, consumer, vcd_path, processes=processes)
    for key, count in wanted.items():
        if len(beats[key]) != count:
            raise RuntimeError(f"{what} produced {len(beats[key])} of {count} '{key}' beats"
                               + (f" (phases: {phase_log[-6:]})" if phase_log else ""))
    layout = dram_written_layout(port_config)
    written = [_fields(b, layout) for b in beats["written"]]
    mp.apply_writes(mp.PortShape.of(port_config), image, base, [(w["address"], w["data"]) for w in written])
    return beats, total


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
    inputs = {"descriptor": [_descriptor(case, memmap, config)], "fill": fill}
    phase_log = []
    beats, total = run_dram_bench(lambda: MemStepBench(config, timing), f"MemStepBench {config!r} {timing!r}",
                                  inputs, wanted, image=image, port_config=config.port, base=memmap.base,
                                  stalls=stalls, max_cycles=max_cycles, backend=backend, vcd_path=vcd_path,
                                  progress=progress, status=status, phase_log=phase_log, what="the memory-fed step")
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


@lru_cache(maxsize=None)
def _burst_alone(timing, port, op, length):
    """Cycles of one burst of ``length`` words on an idle DRAM (``golden/dram.py``; a burst never crosses a row)."""
    return dram.simulate(timing, [(0, length * port.word_bytes, op)]).cycles


def _b4_tiles(timing, port, scfg, shape, engine, outs, write_path, one_pass, tiles):
    """B4 tile by tile: a tile's outputs queue at its end and leave through the combiner while the next tile
    computes, so each later tile takes the longest of its engine, its predecessor's drain at the combiner's pace
    and, on the port, that drain's writes with its own weight pass; the last tile's drain follows. ``engine``:
    the engine's cycles for the phase; ``write_path``: the writes' (:func:`_write_path`)."""
    rows, cols = scfg.rows, scfg.cols
    first = first_output(Phase.B4, *shape, rows, cols)
    beats = len(outs) // tiles
    write = write_path / len(outs)
    drain = beats * max(cols + 2, write)
    tile = max(engine / tiles, drain, beats * write + _dram_cycles(timing, port, one_pass))
    return round(first + (tiles - 1) * tile + drain) + COMBINE_LATENCY


def _write_path(timing, port, writes):
    """Cycles the write path needs for ``writes``: one request at a time, each with its own row activation (the
    next request's words are packed while one is written)."""
    return sum(_burst_alone(timing, port, q.op, q.length) for q in writes)


def _update_cycles(config, timing, port, state, updates, elements_a, elements_b):
    """Cycles of the update, from its first element to its last write, burst by burst.

    The parts and the rules are the RTL's: the updater takes an element's moments from their FIFOs
    (``fifo_words`` each, a FIFO-full read ahead during B2 and B3) :func:`~edge_qlora.rtl.lora.updater.
    pipeline_depth` elements before the optimizer core, which takes one every ``optimizer_interval`` cycles and
    gives its update ``optimizer_latency`` cycles later (B's first element after A's last update); each update's
    master and moments wait in queues of ``2 * STATE_GROUP`` elements, are packed at a word a cycle into the
    staging FIFO in write order, and a write burst goes once all its words are staged. The port serves one burst
    at a time, a read when its FIFO has room for all its words (it wins a tie: its command is taken while a write
    burst's data is still moving), else the next write; each burst takes the DRAM's cycles (``golden/dram.py``)
    for it alone or after the burst before it, whichever is more (the port does not overlap one burst's row
    activation with another's data, but pays a row change in the same bank), and a refresh's when one falls due
    during it.
    """
    scfg = config.step
    interval, depth = scfg.optimizer_interval, pipeline_depth()
    latency = optimizer_latency(scfg.optimizer, interval)
    wb, fifo, staging = port.word_bytes, config.fifo_words, max(config.fifo_words, port.max_burst)
    n = elements_a + elements_b
    queue = 2 * STATE_GROUP
    served = []

    def cost(q):
        after = _dram_cycles(timing, port, served[-1:] + [q]) - _dram_cycles(timing, port, served[-1:])
        served[:] = [q]
        return max(_burst_alone(timing, port, q.op, q.length), after)

    def kind(q):
        return "v" if "_sq_" in q.tensor else "m" if q.tensor.startswith("exp_avg") else "p"

    # each burst with the elements complete once its words have come (reads) or that it needs (writes)
    words = {"p": 0, "m": 0, "v": 0}
    reads, writes = [], []
    for q in state:
        words[kind(q)] += q.length
        reads.append((kind(q), q, min(n, words[kind(q)] * wb // 4)))
    words = {"p": 0, "m": 0, "v": 0}
    for q in updates:
        words[kind(q)] += q.length
        writes.append((kind(q), q, min(n, -(-words[kind(q)] * wb // 4))))
    # per FIFO or queue, in burst order: the elements complete (read) or written, and the cycle
    arrived = {k: ([], []) for k in ("m", "v")}
    left = {k: ([], []) for k in ("p", "m", "v")}
    filled = {"m": 0, "v": 0}               # words requested into each FIFO
    ri = wi = 0
    while ri < len(reads) and filled[reads[ri][0]] + reads[ri][1].length <= fifo:    # read during B2 and B3
        k, q, done = reads[ri]
        filled[k] += q.length
        arrived[k][0].append(done)
        arrived[k][1].append(0)
        ri += 1
    moments = ("m", "v") if state else ()
    start = []                              # the core's cycle for each element

    def when(log, element):
        """The cycle of the first burst in ``log`` that covers ``element``, None if none does yet."""
        i = bisect_right(log[0], element)
        return log[1][i] if i < len(log[0]) else None

    def run_core():
        while len(start) < n:
            e = len(start)
            t = start[-1] + interval if start else depth
            if e == elements_a and e:
                t = max(t, start[-1] + latency + depth)
            for k in moments:
                come = when(arrived[k], e)
                if come is None:
                    return
                t = max(t, come + depth)
            if e >= queue:
                for k in ("p",) + moments:
                    gone = when(left[k], e - queue)
                    if gone is None:
                        return
                    t = max(t, gone)
            start.append(t)

    firsts, data_at = [], []                # per write burst sent: its first word, the cycle its data starts
    packed = 0                              # the cycle the last staged word was packed
    base = 0                                # words of the write stream before the next burst

    def staged(q, need):
        """The cycle the next write burst's last word is staged: packed after the one before, each word once
        its element is out of the core and the word ``staging`` places ahead has left."""
        def gone(w):
            if w < 0:
                return 0
            i = bisect_right(firsts, w) - 1
            return data_at[i] + w - firsts[i]
        first_element = max(0, need - q.length * wb // 4)
        begin = max(packed + 1, start[first_element] + latency, gone(base - staging))
        return max(begin + q.length - 1, start[need - 1] + latency, gone(base + q.length - 1 - staging)) + 1

    refresh = {"due": timing.trefi, "cost": timing.trp + timing.trfc + timing.trcd + 2}

    def serve(begin, q):
        """The cycle a burst begun at ``begin`` is done: its cost, and a refresh's if one falls due meanwhile (one
        due while the port idles costs nothing)."""
        end = begin + cost(q)
        while refresh["due"] <= end:
            if refresh["due"] >= begin:
                end += refresh["cost"]
            refresh["due"] += timing.trefi
        return end

    port_free = 0
    while ri < len(reads) or wi < len(writes):
        run_core()
        t_write = t_read = None
        if wi < len(writes) and len(start) >= writes[wi][2]:
            ready = staged(writes[wi][1], writes[wi][2])
            t_write = max(port_free, ready)
        if ri < len(reads):
            k, q, _ = reads[ri]
            # room once the updater has taken the element that frees enough words
            element = -(-(filled[k] + q.length - fifo) * wb // 4) - 1
            if element < depth:
                t_read = port_free
            elif element - depth < len(start):
                t_read = max(port_free, start[element - depth])
        if t_read is not None and (t_write is None or t_read <= t_write):
            k, q, done = reads[ri]
            port_free = serve(t_read, q)
            filled[k] += q.length
            arrived[k][0].append(done)
            arrived[k][1].append(port_free)
            ri += 1
        elif t_write is not None:
            k, q, need = writes[wi]
            packed = ready - 1
            firsts.append(base)
            data_at.append(t_write + 2)
            left[k][0].append(need)
            left[k][1].append(t_write)
            base += q.length
            port_free = serve(t_write, q)
            wi += 1
        else:
            raise RuntimeError("the update's cycle model found no burst to serve")
    run_core()
    return max(port_free, start[-1] + latency if start else 0)


def model_cycles(config, memory, t, d_in, d_out, r, double_quant=True):
    """The cycle model of :class:`MemStep` against ``memory``.

    Each part of the step takes the longest of its compute (``sim/lora.py``'s :func:`step_cycles`, the step with
    streams that never stall) and the DRAM's time for that part's requests (``golden/dram.py`` on the requests of
    ``golden/memprogram.py``): the loads; F2 and B4, one weight pass each per tile of token rows, with the y or dx
    writes spread among the reads, less the words the read FIFOs prefetched during the compute-only phases before
    them, and no faster than their last pass (its outputs leave tile by tile at the combiner's or the writes' pace,
    after the reads) or their writes one request at a time; the update burst by burst (:func:`_update_cycles`),
    including its last writes after the step's last phase. The compute-only phases (F1, F3, B1, B5, B2, B3) take
    their compute cycles.

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
    # words read ahead during F2 for B4 and during B4 for the update
    state_prefetch = sum(min(fifo_words, sum(q.length for q in state if q.tensor == name))
                         for name in ("exp_avg_A", "exp_avg_sq_A"))
    ahead = {"F2": prefetch, "B4": state_prefetch}
    for name, out in (("F2", "y"), ("B4", "dx")):
        outs = [q for q in writes if q.tensor == out]
        one_pass = _interleave(weight[:per_pass], outs[:len(outs) // passes])
        memory_time = passes * _dram_cycles(timing, port, one_pass) - prefetch
        # the last pass's outputs leave once the engine is through it and its reads are in (with the next
        # phase's prefetch, which goes first and stands in for the words this phase had prefetched), at the
        # combiner's pace or the writes'
        last = outs[len(outs) - len(outs) // passes:]
        drain = max(len(last) * (scfg.cols + 2) + COMBINE_LATENCY, _write_path(timing, port, last))
        engine = engine_cycles(Phase[name], t, d_in, d_out, r, scfg.rows, scfg.cols)
        pass_reads = _dram_cycles(timing, port, weight[:per_pass]) - prefetch + ahead[name]
        last_pass = max(engine // passes, pass_reads) + drain
        write_path = _write_path(timing, port, outs)
        phases[name] = max(compute[name], memory_time, last_pass, write_path)
        if name == "B4":
            phases[name] = max(phases[name], _b4_tiles(timing, port, scfg, (t, d_in, d_out, r), engine, outs,
                                                       write_path, weight[passes * per_pass:(passes + 1) * per_pass],
                                                       passes))
        if name == "F2":
            for before in ("B1", "B5"):
                phases[before] = compute[before]
    for name in ("B2", "B3"):
        phases[name] = compute[name]
    # the update, burst by burst (its last writes go out after the step's last phase)
    phases["update"] = _update_cycles(config, timing, port, state, [q for q in writes if q.tensor not in ("y", "dx")],
                                      d_in * r, d_out * r)
    total = sum(phases.values())
    return {"cycles": total, "phases": phases, "compute": sum(compute.values()),
            "memory": _dram_cycles(timing, port, reads + writes)}
