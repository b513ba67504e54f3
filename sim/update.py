"""Run the update pass (``rtl/update.py``) against the DRAM timing model, in Amaranth's simulator or on Verilator:
one LoRA factor's master, gradient and moments placed in memory by ``golden/memmap.py`` (with the gradients' slots),
updated in place, read back.

As for the blocked products (``sim/blocked.py``), the memory returns the read words in the order of the program
(``golden/blockprogram.py``'s ``update_pass``), so a request out of order would corrupt the result; the written
words go back into the image.
"""

from dataclasses import dataclass

import numpy as np

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import dram
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.memmap import layout, read_region, store_region
from edge_qlora.rtl.lora_optim import LoRAOptimizer
from edge_qlora.rtl.memport import port_for
from edge_qlora.rtl.update import UpdateConfig, UpdatePass, descriptor_layout, report_layout
from .memstep import DramBench, _fields, _timing, run_dram_bench

__all__ = ["UpdateBench", "UpdateRun", "stall_cycles", "update_descriptor", "update_memmap", "run_update",
           "model_cycles"]


class UpdateBench(DramBench):
    """The update pass and the DRAM model behind its port (simulation only)."""

    def __init__(self, config, timing):
        self.config = config
        super().__init__(UpdatePass(config), config.port, timing)


@dataclass
class UpdateRun:
    """An update against memory: the new master and moments read back (float32, the factor's shape; the moments
    ``None`` with SGD), the report's counters (bytes: port words times the word; stall cycles by cause, ``memory``
    and ``compute``) and the program's bytes."""

    param: np.ndarray
    m: object
    v: object
    cycles: int
    stall_cycles: dict
    read_bytes: int
    written_bytes: int
    program_read_bytes: int
    program_written_bytes: int
    requests: int


def stall_cycles(report, config):
    """An update report's stalls in cycles: its ``memory`` counts the optimizer's missed entry slots, each
    ``interval`` cycles lost."""
    return {"memory": report["memory"] * config.interval, "compute": report["compute"]}


def update_descriptor(memmap, which, hyper):
    """The fields of :func:`~edge_qlora.rtl.update.descriptor_layout` for the update of factor ``which`` of
    ``memmap``: its tensors' addresses (the moments' 0 with SGD), its element count and the step's constants
    ``hyper`` as float32 bit patterns."""
    names = ("param", "grad", "m", "v") if memmap.optimizer == "adamw" else ("param", "grad")
    addresses = {name: memmap[bp.UPDATE_TENSORS[name].format(which)].address for name in names}
    return {**{name: addresses.get(name, 0) for name in ("param", "grad", "m", "v")},
            "count": memmap[f"lora_{which}"].size // 4,
            "hyper": {k: int(np.float32(v).view(np.uint32)) for k, v in hyper.items()}}


def update_memmap(d_in, d_out, r=16, optimizer="adamw", t=16):
    """The memory map an update runs in: a step's (``golden.memmap.layout``) with the gradients' slots."""
    return layout(d_in, d_out, t, r, optimizer, gradients_out=True)


def _config(memmap, memory):
    return UpdateConfig(port=port_for(_timing(memory)), optimizer=memmap.optimizer)


def run_update(memmap, which, tensors, hyper, config=None, *, memory="ulx3s-sdram", stalls=None, backend=None,
               vcd_path=None, max_cycles=None, progress=None):
    """The update of factor ``which`` (``"A"`` or ``"B"``) of ``memmap`` on :class:`UpdatePass` against the DRAM
    model of ``memory``: ``tensors`` maps ``param``, ``grad`` and (AdamW) ``m`` and ``v`` to float32 arrays of the
    factor's shape, ``hyper`` the step's constants (``golden.lora_optim.hyper_from``). Returns an
    :class:`UpdateRun`. ValueError (one line) for tensors that do not match the map or a configuration that does
    not match the memory."""
    timing = _timing(memory)
    config = config or _config(memmap, memory)
    if config.optimizer != memmap.optimizer:
        raise ValueError(f"the configuration's optimizer ({config.optimizer}) is not the map's ({memmap.optimizer})")
    if config.port != port_for(timing):
        raise ValueError(f"the configuration's port is not {memory}'s")
    program = bp.update_pass(memmap, which, config.group)
    names = config.reads
    image = bytearray(memmap.total)
    for name in names:
        region = bp.UPDATE_TENSORS[name].format(which)
        value = np.asarray(tensors[name], np.float32)
        if value.shape != memmap[region].shape:
            raise ValueError(f"{name} has shape {value.shape}; {region} is {memmap[region].shape}")
        store_region(image, memmap, region, value)
    elements = memmap[f"lora_{which}"].size // 4
    port = mp.PortShape.of(config.port)
    if (elements * 4) % port.word_bytes:
        raise ValueError(f"{elements} float32 elements are not whole {port.word_bytes}-byte port words")
    if memmap.end > config.port.capacity:
        raise ValueError(f"the map's tensors take {memmap.end:,} bytes: more than the {memory} port reaches")
    reqs = bp.requests(port, program)
    reads = [r for r in reqs if r.op == "read"]
    writes = [r for r in reqs if r.op == "write"]
    fill = mp.fill_words(port, image, memmap.base, reads)
    descriptor = descriptor_layout(config).const(update_descriptor(memmap, which, hyper)).as_bits()
    wanted = {"written": sum(w.length for w in writes), "report": 1}
    if max_cycles is None:
        max_cycles = elements * (config.interval + 40) + 40 * (len(fill) + wanted["written"]) + 20_000
    beats, _ = run_dram_bench(lambda: UpdateBench(config, timing), f"UpdateBench {config!r} {timing!r}",
                              {"descriptor": [descriptor], "fill": fill}, wanted, image=image,
                              port_config=config.port, base=memmap.base, stalls=stalls, max_cycles=max_cycles,
                              backend=backend, vcd_path=vcd_path, progress=progress, what="the update")
    report = _fields(beats["report"][0], report_layout())
    out = {name: np.asarray(read_region(image, memmap, memmap.output_region(bp.UPDATE_TENSORS[name].format(which))
                                        .name), np.float32) for name in config.writes}
    wb = port.word_bytes
    return UpdateRun(param=out["param"], m=out.get("m"), v=out.get("v"),
                     cycles=report["cycles"],
                     stall_cycles=stall_cycles(report, config),
                     read_bytes=report["read"] * wb, written_bytes=report["written"] * wb,
                     program_read_bytes=sum(r.length for r in reads) * wb,
                     program_written_bytes=sum(w.length for w in writes) * wb, requests=len(reqs))


def model_cycles(memmap, which, memory="ulx3s-sdram", config=None):
    """The update's cycle model with memory: the slower of the DRAM model's time for its requests in program order
    (plus the optimizer's latency) and the optimizer's pace: the first group's reads up to its last operand's
    first burst, then an element every ``interval`` cycles, each group's writes once its last update has left
    the optimizer and the group before's writes are done."""
    timing = _timing(memory)
    config = config or _config(memmap, memory)
    port = mp.PortShape.of(config.port)
    reqs = bp.requests(port, bp.update_pass(memmap, which, config.group))
    elements = memmap[f"lora_{which}"].size // 4
    latency = _latency(config)

    def time(part):
        return dram.simulate(timing, [(r.address, r.length * port.word_bytes, r.op) for r in part]).cycles

    last_operand = bp.UPDATE_TENSORS[config.reads[-1]].format(which)
    lead = time(reqs[:next(i for i, r in enumerate(reqs) if r.tensor == last_operand) + 1])
    writes, group = [], []
    for r in reqs:
        if r.op == "write":
            group.append(r)
        elif group:
            writes.append(group)
            group = []
    writes.append(group)
    free = 0
    for g, part in enumerate(writes):
        done = lead + min(elements, (g + 1) * config.group) * config.interval + latency
        free = max(done, free) + time(part)
    return max(time(reqs) + latency, free)


def _latency(config):
    core = LoRAOptimizer(config.optim)
    core._MustUse__silence = True
    return core.latency
