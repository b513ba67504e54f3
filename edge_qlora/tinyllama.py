"""One QLoRA step of each of TinyLlama-1.1B's seven projections, cycle by cycle on Verilator.

For every projection (``constants.TINYLLAMA_PROJECTIONS``) and token count, a random step case at the real shape
(x ~ N(0, 1), dy ~ N(0, 0.01), an N(0, 0.02) base weight quantized to NF4 with double quantization, rank-r LoRA
factors, AdamW; weights built locally, nothing downloaded) runs on the step accelerator compiled with Verilator.
Each row gives the measured cycles beside the cycle model's, the PE utilization, and the accuracy contract of the
LoRA step: every output's relative Frobenius error against float64 at most 1.1 times that of PEFT +
bitsandbytes in bf16. All projections run on one model sized for the largest (``max_in = max_out = 5632``).

The accelerator keeps every tensor on chip: the scratchpads a projection needs are listed against the
ECP5-85F's block RAM, which cannot hold them (the external-memory issue fixes that).

With ``memory`` (a DRAM preset of ``constants.DRAM_PRESETS``), each projection runs on the memory-fed step
(``rtl/lora/memstep.py``) against the DRAM timing model instead: every tensor in external memory behind the port,
the rows also giving the memory stall cycles, the bytes read and written and the bandwidth achieved, the cycle model
being the one with memory (``sim/memstep.py``'s ``model_cycles``). That step writes no gradients: the accuracy
contract covers the outputs it has (y, dx, the new factors and moments).
"""

import time
from dataclasses import asdict, dataclass

from .constants import TINYLLAMA_PROJECTIONS

__all__ = ["ProjectionRun", "ECP5_85F_BRAM_BYTES", "model_config", "memory_config", "check_memory_shape",
           "scratchpad_bytes", "run_projection", "format_table", "layer_totals"]

#: The LFE5U-85F's block RAM: 208 DP16KD of 18 kbit.
ECP5_85F_BRAM_BYTES = 208 * 18 * 1024 // 8
CONTRACT_RATIO = 1.1


@dataclass
class ProjectionRun:
    projection: str
    d_in: int
    d_out: int
    t: int
    r: int
    rows: int
    cols: int
    cycles: int
    model_cycles: int
    utilization: float
    sim_seconds: float
    contract_passed: bool
    worst_ratio: float          # worst over the outputs of our error / PEFT's error
    worst_output: str
    scratchpad_bytes: int
    phase_cycles: dict
    # the memory-fed step (``memory`` a DRAM preset's name); None on the step with its tensors on chip
    memory: str = None
    stall_cycles: dict = None   # {"memory": cycles, "compute": cycles}
    bytes_read: int = None
    bytes_written: int = None
    bandwidth_gbps: float = None

    @property
    def model_error(self):
        """The cycle model against the measured cycles (negative: the model is short), as every table has it."""
        return self.model_cycles / self.cycles - 1

    def to_dict(self):
        """The run as JSON: the memory fields only where the step ran through memory."""
        values = asdict(self)
        if self.memory is None:
            for name in MEMORY_FIELDS:
                del values[name]
        return {**values, "model_error": self.model_error}


#: The fields of a run through memory.
MEMORY_FIELDS = ("memory", "stall_cycles", "bytes_read", "bytes_written", "bandwidth_gbps")


def model_config(rows=8, cols=8, t=128, r=16):
    """The one step accelerator all seven projections run on."""
    from .rtl.lora import LoraConfig
    longest = max(max(d_in, d_out) for _, d_in, d_out in TINYLLAMA_PROJECTIONS)
    return LoraConfig(rows=rows, cols=cols, max_t=t, max_in=longest, max_out=longest, max_rank=r)


def memory_config(memory, rows=8, cols=8, t=128, r=16, step=None):
    """The memory-fed step all seven projections run on with ``memory``: :func:`model_config` (or ``step``, a
    ``LoraConfig``) behind the port of that DRAM preset. Raises ValueError for a shape the port does not take."""
    from .constants import DRAM_PRESETS
    from .rtl.lora.memstep import for_memory
    from .rtl.memport import port_for
    if memory not in DRAM_PRESETS:
        raise ValueError(f"unknown memory {memory!r}; choose one of {', '.join(DRAM_PRESETS)}")
    return for_memory(step or model_config(rows, cols, t, r), port_for(DRAM_PRESETS[memory]))


def check_memory_shape(config, t, d_in, d_out, r):
    """Raise ValueError (one line) if the memory-fed step of ``config`` (a ``MemStepConfig``) cannot run the shape:
    the checks ``run_mem_step`` makes, before any simulation."""
    from .golden import memprogram
    from .golden.memmap import layout
    step = config.step
    memmap = layout(d_in, d_out, t, r, step.optimizer, step.blocksize, step.double_quant, align=64)
    memprogram.check_shape(memmap, step.rows, step.cols, memprogram.PortShape.of(config.port))
    if memmap.end > config.port.capacity:
        raise ValueError(f"the step's tensors take {memmap.end:,} bytes: more than the port reaches "
                         f"({config.port.capacity:,})")


def scratchpad_bytes(t, d_in, d_out, r, rows=8, cols=8):
    """Bytes of the step's scratchpads sized for one shape (the GEMM engine's buffers come on top)."""
    from .rtl.lora import SCRATCHPADS, STORES, LoraConfig
    config = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=d_out, max_rank=r)
    return sum(config.banks * config.scratchpad_depth(name) * STORES[matrices[0]].width
               for name, matrices in SCRATCHPADS.items()) // 8


def _contract(case, outputs):
    """``(passed, worst ratio, output)``: our error against float64 over PEFT + bitsandbytes bf16's."""
    from .golden import gemm, lora
    reference = lora.step_reference_fp64(case)
    peft = lora.step_peft_bf16(case)
    worst, worst_name = 0.0, None
    for name in lora.OUTPUT_NAMES:
        if name not in outputs:
            continue        # the memory-fed step writes no gradients
        exact = reference[name].numpy()
        ours = gemm.rel_frobenius(outputs[name], exact)
        theirs = gemm.rel_frobenius(peft[name].float(), exact)
        ratio = ours / theirs if theirs > 0 else (0.0 if ours == 0 else float("inf"))
        if ratio >= worst:
            worst, worst_name = ratio, name
    return worst <= CONTRACT_RATIO, worst, worst_name


def run_projection(name, d_in, d_out, t, r=16, rows=8, cols=8, seed=0, config=None, progress=None, status=None,
                   memory=None):
    """One step of one projection on Verilator; a :class:`ProjectionRun`. With ``memory`` (a DRAM preset's name)
    the memory-fed step against that DRAM's timing model (``config`` then a ``MemStepConfig``, or the ``LoraConfig``
    to put behind the port)."""
    from .golden import lora
    from .sim import verilator
    from .sim.lora import run_step, step_cycles
    case = lora.random_case(t, d_in, d_out, r, "adamw", seed=seed)
    macs = 2 * t * d_in * d_out + 3 * t * r * (d_in + d_out)
    if memory is not None:
        return _run_through_memory(name, case, macs, r, rows, cols, config, memory, progress, status)
    config = config or model_config(rows, cols, max(t, 128), r)
    start = time.perf_counter()
    run = run_step(case, config, backend="verilator", progress=progress, status=status)
    seconds = verilator.LAST_RUN.get("seconds", time.perf_counter() - start)
    model = sum(step_cycles(t, d_in, d_out, r, rows, cols).values())
    passed, worst, worst_name = _contract(case, run.outputs)
    return ProjectionRun(name, d_in, d_out, t, r, rows, cols, run.cycles, model, macs / (rows * cols * run.cycles),
                         seconds, passed, worst, worst_name, scratchpad_bytes(t, d_in, d_out, r, rows, cols),
                         run.phase_cycles)


def _run_through_memory(name, case, macs, r, rows, cols, config, memory, progress, status):
    from .constants import DRAM_PRESETS
    from .rtl.lora.memstep import MemStepConfig
    from .sim import verilator
    from .sim.memstep import model_cycles, run_mem_step
    t, d_in = case.x.shape
    d_out = case.dy.shape[1]
    if not isinstance(config, MemStepConfig):
        config = memory_config(memory, rows, cols, max(t, 128), r, step=config)
    start = time.perf_counter()
    run = run_mem_step(case, config, memory=memory, backend="verilator", progress=progress, status=status)
    seconds = verilator.LAST_RUN.get("seconds", time.perf_counter() - start)
    model = model_cycles(config, memory, t, d_in, d_out, r, double_quant=case.weight.double_quant)["cycles"]
    passed, worst, worst_name = _contract(case, run.outputs)
    moved = run.bytes_read + run.bytes_written
    bandwidth = moved / run.cycles * DRAM_PRESETS[memory].clock_mhz / 1e3
    return ProjectionRun(name, d_in, d_out, t, r, rows, cols, run.cycles, model, macs / (rows * cols * run.cycles),
                         seconds, passed, worst, worst_name, scratchpad_bytes(t, d_in, d_out, r, rows, cols),
                         run.phase_cycles, memory=memory, stall_cycles=dict(run.stall_cycles),
                         bytes_read=run.bytes_read, bytes_written=run.bytes_written, bandwidth_gbps=bandwidth)


def layer_totals(runs):
    """Per token count: cycles of one decoder layer (the seven projections), measured and modelled."""
    totals = {}
    for run in runs:
        cycles, model = totals.get(run.t, (0, 0))
        totals[run.t] = (cycles + run.cycles, model + run.model_cycles)
    return totals


def format_table(runs, fmax_mhz=None, memory_bytes=None):
    """A Markdown table of the runs, the per-layer totals and the on-chip memory against the ECP5-85F; runs through
    memory add the memory stall cycles, the bytes read and written and the bandwidth achieved."""
    through_memory = any(run.memory is not None for run in runs)
    header = ("| projection | in -> out | T | r | cycles (Verilator) | cycle model | model error | PE utilization | "
              "accuracy (worst ratio to PEFT bf16) | scratchpads | simulated in |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    if through_memory:
        header += " memory | memory stalls | compute stalls | bytes read | bytes written | bandwidth |"
        rule += "---|---:|---:|---:|---:|---:|"
    lines = [header, rule]
    for run in runs:
        verdict = "passed" if run.contract_passed else "FAILED"
        line = (f"| {run.projection} | {run.d_in} -> {run.d_out} | {run.t} | {run.r} | {run.cycles:,} | "
                f"{run.model_cycles:,} | {100 * run.model_error:+.2f}% | {100 * run.utilization:.1f}% | "
                f"{verdict} ({run.worst_ratio:.3f}, {run.worst_output}) | "
                f"{run.scratchpad_bytes / 1e6:.2f} MB | {run.sim_seconds:.0f} s |")
        if through_memory:
            if run.memory is None:
                line += " - | - | - | - | - | - |"
            else:
                stalls = run.stall_cycles or {}
                line += (f" {run.memory} | {stalls.get('memory', 0):,} | {stalls.get('compute', 0):,} | "
                         f"{run.bytes_read:,} | {run.bytes_written:,} | {run.bandwidth_gbps:.3f} GB/s |")
        lines.append(line)
    lines.append("")
    for t, (cycles, model) in sorted(layer_totals(runs).items()):
        text = f"One decoder layer (seven projections), T={t}: {cycles:,} cycles measured, {model:,} modelled"
        if fmax_mhz:
            text += f"; {cycles / fmax_mhz / 1e3:.1f} ms at {fmax_mhz} MHz, {22 * cycles / fmax_mhz / 1e6:.2f} s " \
                    f"for TinyLlama's 22 layers"
        lines.append(text + ".")
    worst = max(runs, key=lambda run: run.scratchpad_bytes)
    lines.append(f"On chip: the largest projection's scratchpads need {worst.scratchpad_bytes / 1e6:.2f} MB "
                 f"({worst.projection}, T={worst.t}); the ECP5-85F has {ECP5_85F_BRAM_BYTES / 1e3:.0f} kB of block "
                 f"RAM, {worst.scratchpad_bytes / ECP5_85F_BRAM_BYTES:.1f} times too little. These runs enlarge the "
                 f"buffers beyond what the chip holds" + (f" (the model's memories: {memory_bytes / 1e6:.2f} MB)"
                                                          if memory_bytes else "") + ".")
    if through_memory:
        lines.append("Through memory: every tensor in the DRAM behind the port (the scratchpads stay on chip); the "
                     "step writes no gradients, so the accuracy covers y, dx and the new factors and moments.")
    return "\n".join(lines)
