"""One QLoRA step of each of TinyLlama-1.1B's seven projections, cycle by cycle on Verilator.

For every projection (``constants.TINYLLAMA_PROJECTIONS``) and token count, a random step case at the real shape
(x ~ N(0, 1), dy ~ N(0, 0.01), an N(0, 0.02) base weight quantized to NF4 with double quantization, rank-r LoRA
factors, AdamW; weights built locally, nothing downloaded) runs on the step accelerator compiled with Verilator.
Each row gives the measured cycles beside the cycle model's, the PE utilization, and the accuracy contract of the
LoRA step: every output's relative Frobenius error against float64 at most 1.1 times that of PEFT +
bitsandbytes in bf16. All projections run on one model sized for the largest (``max_in = max_out = 5632``).

The accelerator keeps every tensor on chip: the scratchpads a projection needs are listed against the
ECP5-85F's block RAM, which cannot hold them (the external-memory issue fixes that).
"""

import time
from dataclasses import asdict, dataclass

from .constants import TINYLLAMA_PROJECTIONS

__all__ = ["ProjectionRun", "ECP5_85F_BRAM_BYTES", "model_config", "scratchpad_bytes", "run_projection",
           "format_table", "layer_totals"]

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

    @property
    def model_error(self):
        return self.cycles / self.model_cycles - 1

    def to_dict(self):
        return {**asdict(self), "model_error": self.model_error}


def model_config(rows=8, cols=8, t=128, r=16):
    """The one step accelerator all seven projections run on."""
    from .rtl.lora import LoraConfig
    longest = max(max(d_in, d_out) for _, d_in, d_out in TINYLLAMA_PROJECTIONS)
    return LoraConfig(rows=rows, cols=cols, max_t=t, max_in=longest, max_out=longest, max_rank=r)


def scratchpad_bytes(t, d_in, d_out, r, rows=8, cols=8):
    """Bytes of the step's scratchpads sized for one shape (the GEMM engine's buffers come on top)."""
    from .rtl.lora import STORES, LoraConfig
    config = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=d_out, max_rank=r)
    return sum(config.banks * config.store_depth(name) * spec.width for name, spec in STORES.items()) // 8


def _contract(case, outputs):
    """``(passed, worst ratio, output)``: our error against float64 over PEFT + bitsandbytes bf16's."""
    from .golden import gemm, lora
    reference = lora.step_reference_fp64(case)
    peft = lora.step_peft_bf16(case)
    worst, worst_name = 0.0, None
    for name in lora.OUTPUT_NAMES:
        exact = reference[name].numpy()
        ours = gemm.rel_frobenius(outputs[name], exact)
        theirs = gemm.rel_frobenius(peft[name].float(), exact)
        ratio = ours / theirs if theirs > 0 else (0.0 if ours == 0 else float("inf"))
        if ratio >= worst:
            worst, worst_name = ratio, name
    return worst <= CONTRACT_RATIO, worst, worst_name


def run_projection(name, d_in, d_out, t, r=16, rows=8, cols=8, seed=0, config=None, progress=None, status=None):
    """One step of one projection on Verilator; a :class:`ProjectionRun`."""
    from .golden import lora
    from .sim import verilator
    from .sim.lora import run_step, step_cycles
    case = lora.random_case(t, d_in, d_out, r, "adamw", seed=seed)
    config = config or model_config(rows, cols, max(t, 128), r)
    start = time.perf_counter()
    run = run_step(case, config, backend="verilator", progress=progress, status=status)
    seconds = verilator.LAST_RUN.get("seconds", time.perf_counter() - start)
    model = sum(step_cycles(t, d_in, d_out, r, rows, cols).values())
    macs = 2 * t * d_in * d_out + 3 * t * r * (d_in + d_out)
    passed, worst, worst_name = _contract(case, run.outputs)
    return ProjectionRun(name, d_in, d_out, t, r, rows, cols, run.cycles, model, macs / (rows * cols * run.cycles),
                         seconds, passed, worst, worst_name, scratchpad_bytes(t, d_in, d_out, r, rows, cols),
                         run.phase_cycles)


def layer_totals(runs):
    """Per token count: cycles of one decoder layer (the seven projections), measured and modelled."""
    totals = {}
    for run in runs:
        cycles, model = totals.get(run.t, (0, 0))
        totals[run.t] = (cycles + run.cycles, model + run.model_cycles)
    return totals


def format_table(runs, fmax_mhz=None, memory_bytes=None):
    """A Markdown table of the runs, the per-layer totals and the on-chip memory against the ECP5-85F."""
    lines = ["| projection | in -> out | T | r | cycles (Verilator) | cycle model | model error | PE utilization | "
             "accuracy (worst ratio to PEFT bf16) | scratchpads | simulated in |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for run in runs:
        verdict = "passed" if run.contract_passed else "FAILED"
        lines.append(f"| {run.projection} | {run.d_in} -> {run.d_out} | {run.t} | {run.r} | {run.cycles:,} | "
                     f"{run.model_cycles:,} | {100 * run.model_error:+.2f}% | {100 * run.utilization:.1f}% | "
                     f"{verdict} ({run.worst_ratio:.3f}, {run.worst_output}) | "
                     f"{run.scratchpad_bytes / 1e6:.2f} MB | {run.sim_seconds:.0f} s |")
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
    return "\n".join(lines)

