"""``edge-qlora bench``: the accelerator against the CPU it would replace, measured side by side in one run.

Two jobs, each timed both ways on this machine:

* **NF4 quantize and dequantize**, weights per second. The RTL's rate is the simulated cycles on a TinyLlama-width
  tensor times the Fmax of the matching routed build (:mod:`edge_qlora.boards.fmax`); the CPU's is bitsandbytes'
  ``quantize_4bit`` / ``dequantize_4bit`` on a 2048 x 2048 bf16 weight (blocksize 64, double quantization).
* **One QLoRA step** (forward, backward with ``dx``, AdamW) of each TinyLlama-1.1B projection at T = 16 and 128.
  The RTL's time is its cycles times the clock of the step accelerator's routed build, or of the build that
  stands in for it (named on every row). The cycles come, per row, from a Verilator run (a file of measured runs,
  or a run this bench makes where it is short enough) or from the cycle model
  (:func:`edge_qlora.sim.lora.step_cycles`), which the bench checks against RTL runs of its own. With a memory
  (``memory``, ``--memory``; ``ulx3s-sdram`` by default) the step runs on the blocked step top
  (``rtl/blocked_step.py``; ``top="memory-fed"``: the memory-fed step, ``rtl/lora/memstep.py``): every tensor in
  that DRAM behind a memory port, the cycles (memory stalls included) from a file of measured runs
  (:data:`MEASURED_BLOCKED_STEPS`, :data:`MEASURED_MEMORY_STEPS`), a Verilator run
  (:func:`edge_qlora.sim.blocked_step.run_blocked_step`, :func:`edge_qlora.sim.memstep.run_mem_step`) or the
  cycle model with memory, and the clock at most the memory controller's, whose cycles the DRAM timing counts;
  ``none`` is the step with every tensor on chip. The CPU's time is
  PEFT LoRA on a bitsandbytes NF4 ``Linear4bit``, the same shapes, in bf16 and in fp32, on one thread and on all,
  the median of several runs after warm-up. Beside them: the physical limit, the time the step's useful
  multiply-accumulates take at one per DSP per cycle, on the array and on all of the device's DSPs.

:func:`run` returns the report (the ``--json`` object); :func:`markdown` and :func:`write` turn it into
``bench.md``, ``bench.json`` and two PNG plots.
"""

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

from .boards import fmax as clocks
from .constants import DRAM_PRESETS, TINYLLAMA_PROJECTIONS

__all__ = ["BenchOptions", "options", "Simulation", "run", "markdown", "write", "prepare_out", "load_measured",
           "model_cycles", "step_rtl", "thread_list", "lanes_list", "OUTPUT_FILES", "MEASURED_STEPS",
           "MEASURED_MEMORY_STEPS", "MEASURED_BLOCKED_STEPS", "MEMORY_CHOICES", "TOPS"]

#: where another tool writes TinyLlama steps measured on Verilator: a list of objects with the keys projection,
#: t, r, rows, cols, cycles, model_cycles (and optionally date)
MEASURED_STEPS = Path(__file__).resolve().parent.parent / "docs" / "tinyllama_steps.json"
#: the same for the memory-fed step (``edge-qlora tinyllama --memory M --json``): each entry also names its memory
#: (and gives stall_cycles, bytes_read, bytes_written)
MEASURED_MEMORY_STEPS = Path(__file__).resolve().parent.parent / "docs" / "tinyllama_memory_steps.json"
#: the same for the blocked step top (``python scripts/blocked_step.py --run ... --json``): rows of projection,
#: tokens, memory, cycles, model_cycles and per part stall_cycles, read_bytes and written_bytes; a projection with
#: no row of its own takes one of its shape (v_proj k_proj's)
MEASURED_BLOCKED_STEPS = Path(__file__).resolve().parent.parent / "docs" / "blocked_step_sdram.json"
#: ``--top``: the design a step through memory runs on
TOPS = ("blocked", "memory-fed")
#: the blocked step top's feature (and column) blocks at most, as ``edge-qlora step --blocked`` takes them
BLOCKED_MAX_FEATURES = 384
#: ``--memory``: a DRAM preset (``constants.DRAM_PRESETS``) the step is fed from, or ``none`` (every tensor on chip)
NO_MEMORY = "none"
MEMORY_CHOICES = tuple(DRAM_PRESETS) + (NO_MEMORY,)
OUTPUT_FILES = ("bench.md", "bench.json", "bench_utilization.png", "bench_step_time.png")
DTYPES = ("bf16", "fp32")
CPU_SHAPE = (2048, 2048)


def _input_error(message):
    """The CLI's one-line error for bad input (imported late: it pulls torch)."""
    from .formats import InputError
    return InputError(message)


def all_threads():
    """The CPU threads this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchOptions:
    """What one bench run measures; :func:`options` fills in the small or the full mode."""

    small: bool = False
    rows: int = 8
    cols: int = 8
    rank: int = 16
    threads: tuple = (1, None)            # None: all threads
    lanes: tuple = (1, 4, 8, 16)
    projections: tuple = TINYLLAMA_PROJECTIONS
    tokens: tuple = (16, 128)
    nf4_weights: int = 16384              # simulated weights per NF4 run (TinyLlama rows of 2048)
    warmup: int = 2
    repeats: int = 5
    #: small steps simulated on the RTL to check the cycle model: (T, in, out, rank); with a memory, the default
    #: ones are rounded up to the shapes the step takes (T to a multiple of rows, in and out of cols; on the
    #: blocked top in to 64s, at least 128, and the rank to a power of two from 2)
    validation: tuple = ((2, 16, 16, 2), (8, 64, 64, 8), (16, 64, 64, 16))
    backend: str = "auto"                 # auto, pysim or verilator
    fmax_mhz: float = None                # the user's clock for the step rows, instead of a routed build's
    measured: str = None                  # a file of measured steps; None: MEASURED_STEPS where it exists
    verilator_max_cycles: int = 3_000_000  # TinyLlama steps the bench runs on Verilator (by the model's count)
    seed: int = 0
    memory: str = "ulx3s-sdram"           # the DRAM the step reads and writes; "none": the on-chip step
    top: str = "blocked"                  # with a memory: the blocked step top, or the memory-fed step

    @property
    def through_memory(self):
        return self.memory != NO_MEMORY

    @property
    def blocked(self):
        """Whether the steps run on the blocked step top."""
        return self.through_memory and self.top == "blocked"

    def thread_counts(self):
        return tuple(dict.fromkeys(all_threads() if n is None else n for n in self.threads))


def options(small=False, **given):
    """The options of the full run, or of the small one (CI: q_proj and k_proj, 2048 simulated weights, one lane
    count, one small validation step, fewer timed runs, Amaranth's simulator so that no Verilator model is
    compiled); ``given`` overrides either (None values are ignored)."""
    base = BenchOptions(small=small)
    if small:
        base = replace(base, lanes=(8,), projections=TINYLLAMA_PROJECTIONS[:2], nf4_weights=2048, warmup=1,
                       repeats=3, validation=((2, 16, 16, 2),), verilator_max_cycles=0, backend="pysim")
    given = {key: value for key, value in given.items() if value is not None}
    opts = replace(base, **given)
    if opts.through_memory and "validation" not in given and opts.memory in DRAM_PRESETS:
        fit = functools.partial(_fit_blocked, memory=opts.memory) if opts.top == "blocked" else _fit
        opts = replace(opts, validation=tuple(dict.fromkeys(fit(case, opts.rows, opts.cols)
                                                            for case in opts.validation)))
    _check(opts)
    return opts


def _fit(case, rows, cols):
    """A validation step rounded up to a shape of the memory-fed step: T a multiple of rows, in and out of cols."""
    t, d_in, d_out, r = case
    return (-(-t // rows) * rows, -(-d_in // cols) * cols, -(-d_out // cols) * cols, r)


def _fit_blocked(case, rows, cols, memory):
    """A validation step rounded up to a shape of the blocked step top: T a multiple of rows, in of 64 and at least
    128 (two column blocks), and a W row's absmax codes (in / 64 bytes) whole port words of ``memory``, out of 64
    (the backward product's spans), the rank a power of two from 2."""
    from .rtl.memport import port_for
    t, d_in, d_out, r = _fit(case, rows, cols)
    step = 64 * port_for(DRAM_PRESETS[memory]).word_bytes
    return t, max(128, -(-d_in // step) * step), -(-d_out // 64) * 64, 1 << max(1, (r - 1).bit_length())


def _check(opts):
    for name in ("rows", "cols"):
        if not 1 <= getattr(opts, name) <= 16:
            raise _input_error(f"--{name} must be from 1 to 16, not {getattr(opts, name)}")
    if not 1 <= opts.rank <= 256:
        raise _input_error(f"--rank must be from 1 to 256, not {opts.rank}")
    if opts.repeats < 1 or opts.warmup < 0:
        raise _input_error(f"--repeats must be at least 1 and --warmup at least 0, not {opts.repeats}, {opts.warmup}")
    if opts.verilator_max_cycles < 0:
        raise _input_error(f"--verilator-max-cycles must be at least 0, not {opts.verilator_max_cycles}")
    if any(n is not None and n < 1 for n in opts.threads):
        raise _input_error("--threads takes thread counts of at least 1, or 'all'")
    if opts.backend not in ("auto", "pysim", "verilator"):
        raise _input_error(f"--backend must be auto, pysim or verilator, not {opts.backend!r}")
    if opts.fmax_mhz is not None and not 0 < opts.fmax_mhz < 1000:
        raise _input_error(f"--fmax must be between 0 and 1000 MHz, not {opts.fmax_mhz}")
    for lanes in opts.lanes:
        for unit in ("dequantizer", "quantizer"):
            try:
                clocks.nf4_clock(unit, lanes)
            except ValueError as error:
                raise _input_error(f"--lanes: {error}") from None
    _step_clock(opts)
    if opts.memory not in MEMORY_CHOICES:
        raise _input_error(f"--memory must be one of {', '.join(MEMORY_CHOICES)}, not {opts.memory!r}")
    if opts.top not in TOPS:
        raise _input_error(f"--top must be one of {', '.join(TOPS)}, not {opts.top!r}")
    if opts.blocked:
        _check_blocked_shapes(opts)
    elif opts.through_memory:
        _check_memory_shapes(opts)


def _check_memory_shapes(opts):
    """Every shape the bench would run on the memory-fed step, checked before any work: one line for the first
    the step (its array, its port) cannot take."""
    from .tinyllama import check_memory_shape
    where = f"--memory {opts.memory} on the {opts.rows}x{opts.cols} array"
    try:
        config = memory_step_config(opts)
    except ValueError as error:
        raise _input_error(f"{where}: {error}") from None
    shapes = [(config, (t, d_in, d_out, opts.rank), f"{name} T={t}")
              for name, d_in, d_out in opts.projections for t in opts.tokens]
    if opts.validation:
        checks = memory_step_config(opts, opts.validation)
        shapes += [(checks, case, f"the model check T={case[0]} {case[1]}->{case[2]} r={case[3]}")
                   for case in opts.validation]
    for config, (t, d_in, d_out, r), what in shapes:
        try:
            check_memory_shape(config, t, d_in, d_out, r)
        except ValueError as error:
            raise _input_error(f"{where}: {what}: {error}") from None


def _check_blocked_shapes(opts):
    """Every shape the bench would run on the blocked step top, checked before any work: one line for the first
    the top (its array, its port) cannot take."""
    from .sim.blocked_step import check_step_shape
    where = f"--memory {opts.memory} on the blocked step top ({opts.rows}x{opts.cols})"
    shapes = [(False, (t, d_in, d_out, opts.rank), f"{name} T={t}")
              for name, d_in, d_out in opts.projections for t in opts.tokens]
    shapes += [(True, case, f"the model check T={case[0]} {case[1]}->{case[2]} r={case[3]}")
               for case in opts.validation]
    for validation, (t, d_in, d_out, r), what in shapes:
        try:
            if r < 2 or r > 16 or r & (r - 1):
                raise ValueError(f"the rank ({r}) must be a power of two from 2 to 16")
            check_step_shape(blocked_step_config(opts, opts.validation if validation else None, r), t, d_in, d_out,
                             r, BLOCKED_MAX_FEATURES)
        except ValueError as error:
            raise _input_error(f"{where}: {what}: {error}") from None


def _step_clock(opts):
    """The step's clock; with a memory, at most the memory controller's (the DRAM timing counts its cycles, and
    the step and the controller share them)."""
    choice = _routed_step_clock(opts)
    if opts.through_memory and opts.memory in DRAM_PRESETS:
        memory_mhz = DRAM_PRESETS[opts.memory].clock_mhz
        if memory_mhz < choice.mhz:
            return MemoryClock(memory_mhz, choice, opts.memory)
    return choice


@dataclass(frozen=True)
class MemoryClock:
    """The memory controller's clock, slower than the step's own: the memory-fed step's cycles are the DRAM timing
    model's, counted at the controller's clock, so the step runs no faster."""

    mhz: float
    step: object          # the step's own clock (a ClockChoice)
    memory: str

    @property
    def build(self):
        return self.step.build

    @property
    def same_config(self):
        return self.step.same_config

    @property
    def label(self):
        return f"{self.memory} controller clock; {self.step.label}: {self.step.mhz} MHz"


def _routed_step_clock(opts):
    if opts.fmax_mhz is not None:
        return clocks.ClockChoice(opts.fmax_mhz)
    try:
        return clocks.step_clock(opts.rows, opts.cols)
    except ValueError as error:
        raise _input_error(str(error)) from None


# --- where RTL cycles come from ------------------------------------------------------------------------------------

class Simulation:
    """The one place that picks the simulator: Verilator where the simulation drivers take
    ``backend="verilator"`` and it works here, else Amaranth's simulator (``pysim``). ``wanted`` is ``auto``,
    ``pysim`` or ``verilator``; with ``auto``, the first failure of Verilator (no compiler, a failed build) is
    kept in :attr:`failure` and the rest of the run uses pysim."""

    def __init__(self, wanted="auto"):
        self.wanted = wanted
        self.failure = None

    @staticmethod
    def takes_backend(fn):
        try:
            return "backend" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return False

    @staticmethod
    def unavailable():
        """Why no Verilator model can be built here (no compiler, no verilator package), or None."""
        try:
            from .sim.verilator import unavailable_reason
        except ImportError:
            return None
        return unavailable_reason()

    def verilator(self, fn):
        """Whether ``fn`` will run on Verilator."""
        if self.wanted == "pysim" or self.failure is not None or not self.takes_backend(fn):
            return False
        reason = self.unavailable()
        if reason:
            self.failure = f"Verilator is not available here ({reason}); Amaranth's simulator ran instead"
        return reason is None

    def run(self, fn, *args, pysim=True, **kwargs):
        """``(fn(*args, **kwargs), "Verilator" | "pysim")``; with ``pysim=False``, ``(None, None)`` where Verilator
        is not available (a run too long for Amaranth's simulator)."""
        if self.verilator(fn):
            try:
                return fn(*args, backend="verilator", **kwargs), "Verilator"
            except Exception as error:  # a missing compiler or a failed build: say so, and go on without it
                reason = " ".join(str(error).split()) or type(error).__name__
                reason = reason if len(reason) <= 200 else reason[:197] + "..."
                if self.wanted == "verilator":
                    raise _input_error(f"--backend verilator: {fn.__name__} failed: {reason}") from None
                self.failure = f"{fn.__name__} on Verilator failed ({reason}); Amaranth's simulator ran instead"
        elif self.wanted == "verilator":
            raise _input_error(f"--backend verilator: {fn.__module__}.{fn.__name__} has no Verilator backend here"
                             + (f" ({self.failure})" if self.failure else ""))
        if not pysim:
            return None, None
        if self.takes_backend(fn):
            kwargs["backend"] = "pysim"   # not the environment's default simulator: the label must be true
        return fn(*args, **kwargs), "pysim"


# --- timing on the CPU ---------------------------------------------------------------------------------------------

def _bnb():
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401
    return bitsandbytes


def _median_seconds(fn, warmup, repeats):
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones, and every sample."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


@contextlib.contextmanager
def _threads(count):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def nf4_cpu(opts):
    """bitsandbytes' CPU quantize_4bit / dequantize_4bit on a 2048 x 2048 bf16 weight (blocksize 64, double
    quantization): ``{threads: {"quantize": weights/s, "dequantize": weights/s}}``."""
    import torch
    functional = _bnb().functional
    gen = torch.Generator().manual_seed(opts.seed)
    weight = (torch.randn(CPU_SHAPE, generator=gen) * 0.02).to(torch.bfloat16)

    def quantize():
        return functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")

    packed, state = quantize()
    rates = {}
    for count in opts.thread_counts():
        with _threads(count):
            dequant_s, _ = _median_seconds(lambda: functional.dequantize_4bit(packed, state), opts.warmup,
                                           opts.repeats)
            quant_s, _ = _median_seconds(quantize, opts.warmup, opts.repeats)
        rates[str(count)] = {"dequantize": weight.numel() / dequant_s, "quantize": weight.numel() / quant_s}
    return rates


def _peft_step(d_in, d_out, rank, dtype, seed):
    """A PEFT LoRA model (rank ``rank``, alpha 2 x rank) around a bitsandbytes NF4 ``Linear4bit`` (blocksize 64,
    double quantization) with AdamW, all in ``dtype``, as a user runs QLoRA: returns ``step(x, dy)`` (forward,
    backward with dx, optimizer step) and the torch dtype."""
    from collections import OrderedDict

    import torch
    from peft import LoraConfig, get_peft_model

    bnb = _bnb()
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn((d_out, d_in), generator=gen) * 0.02).to(torch_dtype)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    proj = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch_dtype, compress_statistics=True,
                             quant_type="nf4")
    proj.weight = bnb.nn.Params4bit.from_prequantized(packed, state.as_dict(packed=True), requires_grad=False,
                                                      device="cpu", module=proj)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], lora_dropout=0.0, bias="none")
    model = get_peft_model(torch.nn.Sequential(OrderedDict(proj=proj)), config)
    model.to(torch_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def step(x, dy):
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(dy)
        optimizer.step()
    return step, torch_dtype


def step_cpu(d_in, d_out, opts):
    """One step of a projection on the CPU: ``{T: {dtype: {threads: {"median_s", "samples_s"}}}}``."""
    import torch
    times = {}
    for dtype in DTYPES:
        step, torch_dtype = _peft_step(d_in, d_out, opts.rank, dtype, opts.seed)
        gen = torch.Generator().manual_seed(opts.seed + 1)
        for t in opts.tokens:
            x = torch.randn((t, d_in), generator=gen).to(torch_dtype).requires_grad_(True)
            dy = (torch.randn((t, d_out), generator=gen) * 0.1).to(torch_dtype)
            for count in opts.thread_counts():
                with _threads(count):
                    median, samples = _median_seconds(lambda: step(x, dy), opts.warmup, opts.repeats)
                times.setdefault(t, {}).setdefault(dtype, {})[str(count)] = {"median_s": median,
                                                                             "samples_s": samples}
    return times


# --- cycles on the RTL ---------------------------------------------------------------------------------------------

def _nf4_weight(opts):
    """The simulated tensor: rows of TinyLlama's width (2048), ``nf4_weights`` in all."""
    import torch
    width = min(2048, opts.nf4_weights)
    gen = torch.Generator().manual_seed(opts.seed)
    return (torch.randn((max(1, opts.nf4_weights // width), width), generator=gen) * 0.02).to(torch.bfloat16)


def nf4_rtl(unit, lanes, weight, sim):
    """Cycles of one NF4 job on the RTL: ``({part: cycles}, source)``. Quantizing with double quantization is two
    passes, the codes and absmax on the quantizer, then the absmax values on the absmax quantizer."""
    from .golden import nf4_quant
    if unit == "dequantize":
        from .rtl.nf4_dequant import NF4DequantConfig
        from .sim.nf4 import run_dequantizer
        quantized = nf4_quant.quantize(weight, 64, True)
        run, source = sim.run(run_dequantizer, quantized, NF4DequantConfig(lanes=lanes, blocksize=64))
        return {"dequantizer": run.cycles}, source
    from .rtl.nf4_quant import NF4QuantConfig
    from .sim.nf4_quant import run_absmax_quantizer, run_quantizer
    run, source = sim.run(run_quantizer, weight, NF4QuantConfig(lanes=lanes, blocksize=64, in_dtype="bf16"))
    second, second_source = sim.run(run_absmax_quantizer, run.absmax, nf4_quant.mean(run.absmax))
    source = source if source == second_source else f"{source} + {second_source}"
    return {"quantizer": run.cycles, "absmax pass": second.cycles}, source


def _file_date(path):
    """The date of the last commit of ``path``, or of its modification when git does not know it."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", name], cwd=folder, capture_output=True,
                             text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or date.fromtimestamp(os.path.getmtime(path)).isoformat()


def measured_default(memory=NO_MEMORY, top="memory-fed"):
    """The file of measured steps of the on-chip step (``none``), of the memory-fed step or of the blocked top."""
    if memory == NO_MEMORY:
        return MEASURED_STEPS
    return MEASURED_BLOCKED_STEPS if top == "blocked" else MEASURED_MEMORY_STEPS


def _measured_entries(path, default):
    """``(path, entries, date)`` of a JSON list of measured steps at ``path``, or at ``default`` when ``path`` is
    None (no entries if it does not exist)."""
    if path is None:
        path = default
        if not path.exists():
            return path, [], None
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as error:
        raise _input_error(f"--measured {path}: cannot read a JSON list of measured steps ({error})") from None
    if not isinstance(entries, list):
        raise _input_error(f"--measured {path}: expected a JSON list of measured steps")
    return path, entries, _file_date(path)


def load_measured_blocked(path):
    """Whole steps measured on the blocked step top (``path``, or :data:`MEASURED_BLOCKED_STEPS` where it exists):
    ``{(t, d_in, d_out, r, rows, cols, memory): {projection: {"cycles", "model_cycles", "date", "stall_cycles",
    "bytes_read", "bytes_written", "projection"}}}`` (the stalls and bytes summed over the step's parts)."""
    shapes = {name: (d_in, d_out) for name, d_in, d_out in TINYLLAMA_PROJECTIONS}
    path, entries, when = _measured_entries(path, MEASURED_BLOCKED_STEPS)
    table = {}
    for entry in entries:
        try:
            d_in, d_out = shapes[entry["projection"]]
            key = (int(entry["tokens"]), d_in, d_out, int(entry.get("r", 16)), int(entry.get("rows", 8)),
                   int(entry.get("cols", 8)), str(entry["memory"]))
            stalls = {cause: sum(int(part[cause]) for part in entry["stall_cycles"].values())
                      for cause in ("memory", "compute")}
            table.setdefault(key, {})[entry["projection"]] = {
                "cycles": int(entry["cycles"]), "model_cycles": entry.get("model_cycles"),
                "date": str(entry.get("date") or when), "stall_cycles": stalls,
                "bytes_read": sum(entry["read_bytes"].values()), "bytes_written": sum(entry["written_bytes"].values()),
                "projection": entry["projection"]}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _input_error(f"--measured {path}: every entry needs a TinyLlama projection, tokens, memory, cycles, "
                               f"and per part stall_cycles, read_bytes and written_bytes, not {entry!r:.80}") from None
    return table


def load_measured(path, memory=NO_MEMORY):
    """Steps measured on Verilator (when ``path`` is None, :data:`MEASURED_STEPS`, or with a ``memory``
    :data:`MEASURED_MEMORY_STEPS`, and only if it exists): ``{(projection, t, r, rows, cols, memory): {"cycles",
    "model_cycles", "date", "stall_cycles", "bytes_read", "bytes_written"}}``, ``memory`` being ``none`` for an
    entry that names none (the on-chip step)."""
    path, entries, when = _measured_entries(path, measured_default(memory))
    table = {}
    for entry in entries:
        try:
            key = (str(entry["projection"]), int(entry["t"]), int(entry["r"]), int(entry["rows"]),
                   int(entry["cols"]), str(entry.get("memory") or NO_MEMORY))
            table[key] = {"cycles": int(entry["cycles"]), "model_cycles": entry.get("model_cycles"),
                          "date": str(entry.get("date") or when), "stall_cycles": entry.get("stall_cycles"),
                          "bytes_read": entry.get("bytes_read"), "bytes_written": entry.get("bytes_written")}
        except (KeyError, TypeError, ValueError):
            raise _input_error(f"--measured {path}: every entry needs projection, t, r, rows, cols and cycles, "
                               f"not {entry!r:.80}") from None
    return table


def model_cycles(t, d_in, d_out, r, opts, config=None):
    """The cycle model of the step: the on-chip step's, or with a memory the blocked step top's (``config`` its
    ``StepConfig``, by default :func:`blocked_step_config`) or the memory-fed step's (``config`` its
    ``MemStepConfig``, by default :func:`memory_step_config`)."""
    if opts.blocked:
        return sum(_blocked_model(config or blocked_step_config(opts), opts.memory, t, d_in, d_out, r).values())
    if opts.through_memory:
        return _memory_model(config or memory_step_config(opts), opts.memory, t, d_in, d_out, r)
    from .sim.lora import step_cycles
    return sum(step_cycles(t, d_in, d_out, r, opts.rows, opts.cols, optimizer="adamw").values())


@functools.lru_cache(maxsize=None)
def _memory_model(config, memory, t, d_in, d_out, r):
    """The memory-fed step's cycle model (seconds at TinyLlama's shapes: k_proj and v_proj share theirs)."""
    from .sim.memstep import model_cycles as memory_model
    return memory_model(config, memory, t, d_in, d_out, r)["cycles"]


@functools.lru_cache(maxsize=None)
def _blocked_model(config, memory, t, d_in, d_out, r):
    """The blocked step top's cycle model with memory, per part (a case of the shape: seconds at TinyLlama's)."""
    from .golden.lora import random_case
    from .sim.blocked_step import model_cycles as blocked_model
    from .sim.blocked_step import step_blocks
    case = random_case(t, d_in, d_out, r, "adamw")
    forward, backward = step_blocks(t, d_in, d_out, config.product.cols, BLOCKED_MAX_FEATURES)
    return blocked_model(case, forward, backward, config, memory)


def blocked_step_config(opts, shapes=None, rank=None):
    """The blocked step top behind ``opts.memory``'s port, one for all the TinyLlama rows (``shapes`` None: so that
    Verilator compiles one model, the one ``scripts/blocked_step.py`` runs) or for the ``(t, d_in, d_out, r)`` in
    ``shapes`` (all of ``rank``, by default ``opts.rank``)."""
    from .sim.blocked_step import shared_config
    if shapes is None:
        shapes = [(t, d_in, d_out) for _, d_in, d_out in TINYLLAMA_PROJECTIONS for t in (128, *opts.tokens)]
        rank = opts.rank
    else:
        rank = rank or opts.rank
        shapes = [(t, d_in, d_out) for t, d_in, d_out, r in shapes if r == rank] or \
            [(t, d_in, d_out) for t, d_in, d_out, _ in shapes]
    return shared_config(tuple(shapes), opts.memory, opts.rows, opts.cols, rank, "adamw", BLOCKED_MAX_FEATURES)


def memory_step_config(opts, shapes=None):
    """The memory-fed step behind ``opts.memory``'s port: for the TinyLlama rows (``shapes`` None) the one
    ``edge-qlora tinyllama --memory`` runs (so a compiled model is shared), else sized for ``shapes``."""
    from .tinyllama import memory_config
    if shapes is None:
        return memory_config(opts.memory, opts.rows, opts.cols, max(128, *opts.tokens), opts.rank)
    return memory_config(opts.memory, step=step_config(opts, shapes))


def step_config(opts, shapes):
    """One step accelerator for every ``(t, d_in, d_out, r)`` in ``shapes``, sized for the largest, so that
    Verilator compiles one model for all of them (the cycles depend on the array, not on the buffer sizes). For
    TinyLlama's shapes it is the model ``edge-qlora tinyllama`` runs (in and out up to 5632), so their compiled
    model is shared."""
    from .rtl.lora import LoraConfig
    longest = max(max(d_in, d_out) for _, d_in, d_out, _ in shapes)
    return LoraConfig(rows=opts.rows, cols=opts.cols, max_t=max(t for t, *_ in shapes), max_in=longest,
                      max_out=longest, max_rank=max(r for *_, r in shapes), optimizer="adamw")


def _simulate_step(t, d_in, d_out, r, opts, sim, pysim, config):
    """One step of a random case on the RTL: ``(StepRun or None, source)``."""
    from .golden.lora import random_case
    from .sim.lora import run_step
    case = random_case(t, d_in, d_out, r, "adamw", seed=opts.seed)
    extra = {}
    if "max_cycles" in inspect.signature(run_step).parameters:
        extra["max_cycles"] = 2 * model_cycles(t, d_in, d_out, r, opts) + 100_000
    return sim.run(run_step, case, config, pysim=pysim, **extra)


def _simulate_mem_step(t, d_in, d_out, r, opts, sim, pysim, config):
    """One memory-fed step of a random case against ``opts.memory``'s DRAM model: ``(MemStepRun or None,
    source)``."""
    from .golden.lora import random_case
    from .sim.memstep import run_mem_step
    case = random_case(t, d_in, d_out, r, "adamw", seed=opts.seed)
    limit = 2 * model_cycles(t, d_in, d_out, r, opts, config) + 100_000
    return sim.run(run_mem_step, case, config, memory=opts.memory, max_cycles=limit, pysim=pysim)


def _simulate_blocked_step(t, d_in, d_out, r, opts, sim, pysim, config):
    """One step of a random case on the blocked step top against ``opts.memory``'s DRAM model: ``(run or None,
    source)``, the run a dict of its cycles, stall cycles by cause and bytes (summed over the step's parts)."""
    from .golden.lora import random_case
    from .sim.blocked_step import run_blocked_step, step_blocks
    case = random_case(t, d_in, d_out, r, "adamw", seed=opts.seed)
    forward, backward = step_blocks(t, d_in, d_out, config.product.cols, BLOCKED_MAX_FEATURES)
    limit = 2 * model_cycles(t, d_in, d_out, r, opts, config) + 100_000
    run, source = sim.run(run_blocked_step, case, forward, backward, config, memory=opts.memory, max_cycles=limit,
                          pysim=pysim)
    if run is None:
        return None, source
    return {"cycles": sum(run.cycles.values()), "bytes_read": sum(run.read_bytes.values()),
            "bytes_written": sum(run.written_bytes.values()),
            "stall_cycles": {cause: sum(part[cause] for part in run.stall_cycles.values())
                             for cause in ("memory", "compute")}}, source


def _step_rtl_blocked(name, d_in, d_out, t, opts, measured, sim):
    from .sim.blocked_step import run_blocked_step
    config = blocked_step_config(opts)
    model = model_cycles(t, d_in, d_out, opts.rank, opts, config)
    # the projection's own run, else one of its shape
    runs = measured.get((t, d_in, d_out, opts.rank, opts.rows, opts.cols, opts.memory), {})
    entry = runs.get(name) or next(iter(runs.values()), None)
    if entry is not None:
        shape = "" if entry["projection"] == name else f", {entry['projection']}'s shape"
        return {"cycles": entry["cycles"], "model_cycles": model,
                "source": f"Verilator (measured {entry['date']}, {opts.memory}{shape})", **_memory_fields(entry)}
    if model <= opts.verilator_max_cycles and sim.verilator(run_blocked_step):
        run, _ = _simulate_blocked_step(t, d_in, d_out, opts.rank, opts, sim, False, config)
        if run is not None:
            return {"cycles": run["cycles"], "model_cycles": model,
                    "source": f"Verilator (this run, {opts.memory})", **_memory_fields(run)}
    return {"cycles": model, "model_cycles": model, "source": f"cycle model ({opts.memory})",
            **_memory_fields(None)}


def _memory_fields(run):
    """What a run through memory adds to its row (None where the cycles are the model's)."""
    if run is None:
        return {"stall_cycles": None, "bytes_read": None, "bytes_written": None}
    if isinstance(run, dict):
        return {key: run.get(key) for key in ("stall_cycles", "bytes_read", "bytes_written")}
    return {"stall_cycles": dict(run.stall_cycles), "bytes_read": run.bytes_read, "bytes_written": run.bytes_written}


def _step_rtl_memory(name, d_in, d_out, t, opts, measured, sim):
    from .sim.memstep import run_mem_step
    config = memory_step_config(opts)
    model = model_cycles(t, d_in, d_out, opts.rank, opts, config)
    entry = measured.get((name, t, opts.rank, opts.rows, opts.cols, opts.memory))
    if entry is not None:
        return {"cycles": entry["cycles"], "model_cycles": model,
                "source": f"Verilator (measured {entry['date']}, {opts.memory})", **_memory_fields(entry)}
    if model <= opts.verilator_max_cycles and sim.verilator(run_mem_step):
        run, _ = _simulate_mem_step(t, d_in, d_out, opts.rank, opts, sim, False, config)
        if run is not None:
            return {"cycles": run.cycles, "model_cycles": model, "source": f"Verilator (this run, {opts.memory})",
                    **_memory_fields(run)}
    return {"cycles": model, "model_cycles": model, "source": f"cycle model ({opts.memory})",
            **_memory_fields(None)}


def step_rtl(name, d_in, d_out, t, opts, measured, sim):
    """A TinyLlama step's RTL cycles: measured on Verilator (the file), run on Verilator here (when it is
    available and the model predicts at most ``verilator_max_cycles``), or the cycle model; with a memory, of the
    blocked step top or the memory-fed step (a measured entry must name the same memory), the source naming the
    memory."""
    if opts.blocked:
        return _step_rtl_blocked(name, d_in, d_out, t, opts, measured, sim)
    if opts.through_memory:
        return _step_rtl_memory(name, d_in, d_out, t, opts, measured, sim)
    from .sim.lora import run_step
    model = model_cycles(t, d_in, d_out, opts.rank, opts)
    entry = measured.get((name, t, opts.rank, opts.rows, opts.cols, NO_MEMORY))
    if entry is not None:
        return {"cycles": entry["cycles"], "model_cycles": model, "source": f"Verilator (measured {entry['date']})"}
    if model <= opts.verilator_max_cycles and sim.verilator(run_step):
        shapes = [(t, d_in, d_out, opts.rank) for t in opts.tokens for _, d_in, d_out in TINYLLAMA_PROJECTIONS]
        run, _ = _simulate_step(t, d_in, d_out, opts.rank, opts, sim, False, step_config(opts, shapes))
        if run is not None:
            return {"cycles": run.cycles, "model_cycles": model, "source": "Verilator (this run)"}
    return {"cycles": model, "model_cycles": model, "source": "cycle model"}


def validate(case, opts, sim):
    """A small step on the RTL (Verilator or pysim) against the cycle model."""
    t, d_in, d_out, r = case
    if opts.blocked:
        config = blocked_step_config(opts, opts.validation, r)
        run, source = _simulate_blocked_step(t, d_in, d_out, r, opts, sim, True, config)
        model = model_cycles(t, d_in, d_out, r, opts, config)
        cycles, extra = run["cycles"], _memory_fields(run)
    elif opts.through_memory:
        config = memory_step_config(opts, opts.validation)
        run, source = _simulate_mem_step(t, d_in, d_out, r, opts, sim, True, config)
        model = model_cycles(t, d_in, d_out, r, opts, config)
        cycles, extra = run.cycles, _memory_fields(run)
    else:
        run, source = _simulate_step(t, d_in, d_out, r, opts, sim, True, step_config(opts, opts.validation))
        model = model_cycles(t, d_in, d_out, r, opts)
        cycles, extra = run.cycles, {}
    return {"t": t, "in": d_in, "out": d_out, "r": r, "rows": opts.rows, "cols": opts.cols, "cycles": cycles,
            "model_cycles": model, "model_error": (model - cycles) / cycles, "source": source,
            "memory": opts.memory, "top": _top(opts), **extra}


# --- the rows ------------------------------------------------------------------------------------------------------

def nf4_row(unit, lanes, n, rtl, cpu):
    """One NF4 row: the RTL's rate (cycles at the routed Fmax) beside bitsandbytes' on the CPU."""
    cycles, source = rtl
    clock = clocks.nf4_clock("dequantizer" if unit == "dequantize" else "quantizer", lanes)
    total = sum(cycles.values())
    rate = n / (total / (clock.mhz * 1e6))
    cpu_rates = {threads: rates[unit] for threads, rates in cpu.items()}
    note = "" if unit == "dequantize" else \
        "the absmax pass runs on the AbsmaxQuantizer, which has no build of its own: the quantizer's Fmax stands in"
    return {"unit": unit, "lanes": lanes, "weights": n, "cycles": cycles, "cycles_source": source,
            "weights_per_cycle": n / total, "fmax_mhz": clock.mhz, "fmax_build": clock.label,
            "rtl_weights_per_s": rate, "limit_weights_per_s": lanes * clock.mhz * 1e6,
            "cpu_weights_per_s": cpu_rates,
            "speedup_vs_cpu": {threads: rate / value for threads, value in cpu_rates.items()}, "note": note}


def step_row(name, d_in, d_out, t, rtl, cpu, opts, clock):
    """One step row: the RTL's time at the clock, its physical limits, the CPU's medians and the ratios."""
    pes, hz = opts.rows * opts.cols, clock.mhz * 1e6
    macs = 2 * t * d_in * d_out + 3 * t * opts.rank * (d_in + d_out)   # base products and rank-r products
    rtl_s = rtl["cycles"] / hz
    cpu_s = {dtype: {n: v["median_s"] for n, v in by_threads.items()} for dtype, by_threads in cpu.items()}
    best = min(((s, dtype, n) for dtype, by_threads in cpu_s.items() for n, s in by_threads.items()))
    return {
        "projection": name, "in": d_in, "out": d_out, "t": t, "r": opts.rank, "rows": opts.rows,
        "cols": opts.cols, "useful_macs": macs, "cycles": rtl["cycles"], "model_cycles": rtl["model_cycles"],
        "cycles_source": rtl["source"], "utilization": macs / (pes * rtl["cycles"]), "fmax_mhz": clock.mhz,
        "fmax_build": clock.label, "rtl_s": rtl_s, "limit_array_s": macs / (pes * hz),
        "limit_device_s": macs / (clocks.DEVICE_DSPS * hz), "cpu_s": cpu_s,
        "cpu_samples_s": {dtype: {n: v["samples_s"] for n, v in by.items()} for dtype, by in cpu.items()},
        "cpu_gmac_per_s": {dtype: {n: macs / s / 1e9 for n, s in by.items()} for dtype, by in cpu_s.items()},
        "rtl_over_cpu": {dtype: {n: rtl_s / s for n, s in by.items()} for dtype, by in cpu_s.items()},
        "fastest_cpu": {"dtype": best[1], "threads": best[2], "s": best[0]}, "rtl_over_fastest_cpu": rtl_s / best[0],
        "memory": opts.memory, "top": _top(opts),
        **({key: rtl.get(key) for key in ("stall_cycles", "bytes_read", "bytes_written")}
           if opts.through_memory else {}),
    }


def _top(opts):
    """The design the steps ran on: ``blocked``, ``memory-fed`` or ``on-chip``."""
    return opts.top if opts.through_memory else "on-chip"


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _machine():
    bitsandbytes = _bnb()   # first: peft imports it too
    import peft
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": all_threads(), "load_average_at_start": _load(), "python": platform.python_version(),
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
            "date": date.today().isoformat()}


def _jobs(opts, sim, measured, results):
    """The bench as a list of ``(label, job)``: each job stores its result in ``results``."""
    jobs = [("bitsandbytes NF4 on the CPU", lambda: results.__setitem__("nf4_cpu", nf4_cpu(opts)))]
    weight = []
    for unit in ("dequantize", "quantize"):
        for lanes in opts.lanes:
            def job(unit=unit, lanes=lanes):
                if not weight:
                    weight.append(_nf4_weight(opts))
                results[("nf4", unit, lanes)] = nf4_rtl(unit, lanes, weight[0], sim)
            jobs.append((f"{unit}, {lanes} lanes, RTL", job))
    for name, d_in, d_out in opts.projections:
        def job(name=name, d_in=d_in, d_out=d_out):
            results[("cpu", name)] = step_cpu(d_in, d_out, opts)
        jobs.append((f"{name} on the CPU", job))
        for t in opts.tokens:
            def job(name=name, d_in=d_in, d_out=d_out, t=t):
                results[("rtl", name, t)] = step_rtl(name, d_in, d_out, t, opts, measured, sim)
            jobs.append((f"{name} T={t} RTL", job))
    for case in opts.validation:
        def job(case=case):
            results.setdefault("validation", []).append(validate(case, opts, sim))
        jobs.append((f"cycle model check, T={case[0]} {case[1]}->{case[2]} r={case[3]}", job))
    return jobs


def run(opts, progress=False):
    """Run the bench; returns the report (a JSON-ready dict)."""
    from tqdm import tqdm
    sim, clock = Simulation(opts.backend), _step_clock(opts)
    measured = load_measured_blocked(opts.measured) if opts.blocked else load_measured(opts.measured, opts.memory)
    report = {"mode": "small" if opts.small else "full", "machine": _machine(),
              "options": {k: v for k, v in asdict(opts).items() if k != "threads"},
              "threads": list(opts.thread_counts())}
    results = {}
    bar = tqdm(_jobs(opts, sim, measured, results), desc="bench", unit="job", file=sys.stderr, leave=False,
               disable=not progress)
    for label, job in bar:
        bar.set_postfix_str(label, refresh=True)
        job()
    report["machine"]["load_average_at_end"] = _load()
    weights = _nf4_weight(opts).numel()
    report["nf4"] = [nf4_row(unit, lanes, weights, results[("nf4", unit, lanes)], results["nf4_cpu"])
                     for unit in ("dequantize", "quantize") for lanes in opts.lanes]
    report["steps"] = [step_row(name, d_in, d_out, t, results[("rtl", name, t)], results[("cpu", name)][t], opts,
                                clock)
                       for name, d_in, d_out in opts.projections for t in opts.tokens]
    report["validation"] = results.get("validation", [])
    report["clocks"] = _clocks(opts, clock)
    report["limits"] = {"device": clocks.DEVICE, "device_dsps": clocks.DEVICE_DSPS, "array_pes": opts.rows * opts.cols,
                        "array_macs_per_s": opts.rows * opts.cols * clock.mhz * 1e6,
                        "device_macs_per_s": clocks.DEVICE_DSPS * clock.mhz * 1e6}
    report["simulator"] = {"verilator_failure": sim.failure, "measured_file": _measured_name(opts)}
    return report


def _measured_name(opts):
    if opts.measured is not None:
        return str(opts.measured)
    default = measured_default(opts.memory, opts.top)
    return str(default) if default.exists() else None


def _clocks(opts, clock):
    """Every build whose Fmax the report uses, with its command."""
    used = [("step", clock)] + [(f"{unit}, {lanes} lane{'s' * (lanes > 1)}", clocks.nf4_clock(unit, lanes))
                                for unit in ("dequantizer", "quantizer") for lanes in opts.lanes]
    out = []
    for use, choice in used:
        build = choice.build
        out.append({"used_for": use, "mhz": choice.mhz, "label": choice.label,
                    "build": None if build is None else build.name,
                    "command": None if build is None else build.command, "note": "" if build is None else build.note})
    if clock.build is not None and not clock.same_config:
        unit, what = ("blocked_step", "blocked step top") if opts.blocked else ("lora", "step accelerator")
        own = clocks.placed_only(unit, f"{opts.rows}x{opts.cols}")
        note = (f"the {opts.rows}x{opts.cols} {what} has never been routed"
                + (f" (placed only: {own.mhz} MHz estimated, `{own.command}`)" if own else ""))
        out[0]["note"] = "; ".join(filter(None, [note, out[0]["note"]]))
    return out


# --- the table, the plots, the files -------------------------------------------------------------------------------

def _versus(ratio):
    """A time ratio (accelerator / CPU) in words."""
    return f"{ratio:.1f}x slower" if ratio >= 1 else f"{1 / ratio:.1f}x faster"


def _ms(seconds):
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:,.0f}"


def _nf4_table(report):
    threads = report["threads"]
    head = " | ".join(f"bnb CPU {n} thr. Gw/s" for n in threads)
    versus = " | ".join(f"RTL vs CPU {n} thr." for n in threads)
    lines = [f"| job | lanes | RTL cycles | cycles from | w/cycle | Fmax MHz (build) | RTL Gw/s | limit Gw/s | {head} "
             f"| {versus} |", "|---|---:|---:|---|---:|---|---:|---:|" + "---:|" * (2 * len(threads))]
    for row in report["nf4"]:
        cycles = " + ".join(f"{c:,}" for c in row["cycles"].values())
        cpu = " | ".join(f"{row['cpu_weights_per_s'][str(n)] / 1e9:.3f}" for n in threads)
        vs = " | ".join(_versus(1 / row["speedup_vs_cpu"][str(n)]) for n in threads)
        lines.append(f"| {row['unit']} | {row['lanes']} | {cycles} ({row['weights']:,} weights) | "
                     f"{row['cycles_source']} | {row['weights_per_cycle']:.2f} | {row['fmax_mhz']} "
                     f"({row['fmax_build']}) | {row['rtl_weights_per_s'] / 1e9:.3f} | "
                     f"{row['limit_weights_per_s'] / 1e9:.3f} | {cpu} | {vs} |")
    return lines


def _through_memory(report):
    """The memory the report's steps were fed from, or None (the on-chip step)."""
    memory = report["options"].get("memory", NO_MEMORY)
    return None if memory in (None, NO_MEMORY) else memory


def _step_words(report):
    """The step's name in the summary and the plot: which design, through which memory."""
    memory = _through_memory(report)
    if not memory:
        return "QLoRA step"
    if report["options"].get("top", "memory-fed") == "blocked":
        return f"QLoRA step on the blocked step top ({memory})"
    return f"memory-fed QLoRA step ({memory})"


def _stalls(row):
    stalls = row.get("stall_cycles")
    return "-" if not stalls else f"{stalls.get('memory', 0):,}"


def _step_table(report):
    threads = report["threads"]
    per = " / ".join(str(n) for n in threads)
    memory = _through_memory(report)
    stall_head, stall_rule = (" memory stalls |", "---:|") if memory else ("", "")
    lines = [f"| projection | in -> out | T | RTL cycles | cycles from |{stall_head} PE util. | Fmax MHz (build) | "
             f"RTL ms | limit ms: array / {clocks.DEVICE_DSPS} DSPs | CPU bf16 ms ({per} thr.) | CPU fp32 ms ({per} "
             f"thr.) | RTL vs CPU bf16, 1 thread | RTL vs fastest CPU |",
             f"|---|---|---:|---:|---|{stall_rule}---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["steps"]:
        cpu = {dtype: " / ".join(_ms(row["cpu_s"][dtype][str(n)]) for n in threads) for dtype in DTYPES}
        one = row["rtl_over_cpu"]["bf16"].get("1")
        fastest = row["fastest_cpu"]
        stalls = f" {_stalls(row)} |" if memory else ""
        lines.append(
            f"| {row['projection']} | {row['in']} -> {row['out']} | {row['t']} | {row['cycles']:,} | "
            f"{row['cycles_source']} |{stalls} {row['utilization']:.1%} | {row['fmax_mhz']} ({row['fmax_build']}) | "
            f"{_ms(row['rtl_s'])} | {_ms(row['limit_array_s'])} / {_ms(row['limit_device_s'])} | {cpu['bf16']} | "
            f"{cpu['fp32']} | {'-' if one is None else _versus(one)} | {_versus(row['rtl_over_fastest_cpu'])} "
            f"({fastest['dtype']}, {fastest['threads']} thr.) |")
    return lines


def _validation_table(report):
    """The small steps the bench simulated and the TinyLlama rows with RTL cycles, against the cycle model (rows
    of one shape, such as k_proj and v_proj, merged)."""
    lines = ["| step | array | RTL cycles | cycles from | model cycles | model error |", "|---|---|---:|---|---:|---:|"]
    checks = {}
    for v in report["validation"]:
        checks[(v["t"], v["in"], v["out"], v["r"], v["source"])] = dict(v, names=[])
    for s in report["steps"]:
        if not s["cycles_source"].startswith("cycle model"):
            key = (s["t"], s["in"], s["out"], s["r"], s["cycles_source"])
            checks.setdefault(key, {"t": s["t"], "in": s["in"], "out": s["out"], "r": s["r"], "rows": s["rows"],
                                    "cols": s["cols"], "cycles": s["cycles"], "model_cycles": s["model_cycles"],
                                    "source": s["cycles_source"], "names": [],
                                    "model_error": (s["model_cycles"] - s["cycles"]) / s["cycles"]})
            checks[key]["names"].append(s["projection"])
    memory = _through_memory(report)
    for v in checks.values():
        names = f"{', '.join(v['names'])}: " if v["names"] else ""
        array = f"{v['rows']}x{v['cols']}" + (f", {memory}" if memory else "")
        lines.append(f"| {names}T={v['t']}, {v['in']} -> {v['out']}, r={v['r']} | {array} | "
                     f"{v['cycles']:,} | {v['source']} | {v['model_cycles']:,} | {v['model_error']:+.2%} |")
    return lines, list(checks.values())


def _contention(report):
    """A note when timing on more threads was slower than on one: other jobs held the cores."""
    threads = [str(n) for n in report["threads"]]
    if len(threads) < 2 or threads[0] != "1":
        return []
    slower = [s["cpu_s"][d][threads[-1]] / s["cpu_s"][d]["1"] for s in report["steps"] for d in DTYPES]
    slower += [r["cpu_weights_per_s"]["1"] / r["cpu_weights_per_s"][threads[-1]] for r in report["nf4"]]
    if max(slower, default=0) < 1.5:
        return []
    return [f"Note: {threads[-1]} threads were slower than 1 thread, up to {max(slower):.0f}x: other jobs held cores "
            f"of this machine while it ran, and a CPU job spread over every core waits for the busiest. Those "
            f"columns measure that contention, not the CPU; compare against the 1-thread columns."]


def _ranges(steps, value):
    """``"A-Bx at T=128, C-Dx at T=16"``: the range of ``value(step)`` per T, largest T first."""
    parts = []
    for t in sorted({s["t"] for s in steps}, reverse=True):
        values = [value(s) for s in steps if s["t"] == t]
        parts.append(f"{min(values):.1f}-{max(values):.1f}x at T={t}")
    return ", ".join(parts)


def _summary(report, checks):
    steps = [s for s in report["steps"] if "1" in s["cpu_s"]["bf16"]]
    lines = []
    if steps:
        ratios = [s["rtl_over_cpu"]["bf16"]["1"] for s in steps]
        verdict = " (slower on every row)" if min(ratios) > 1 else " (faster on every row)" if max(ratios) < 1 else ""
        step = _step_words(report)
        lines.append(f"**The {step} on the {steps[0]['rows']}x{steps[0]['cols']} array, in multiples of one "
                     f"CPU thread's time in bf16{verdict}: {_ranges(steps, lambda s: s['rtl_over_cpu']['bf16']['1'])};"
                     f" of the fastest CPU setting measured here: {_ranges(steps, lambda s: s['rtl_over_fastest_cpu'])}"
                     f".** At its physical limit (each of the device's {clocks.DEVICE_DSPS} DSPs doing a useful "
                     f"multiply-accumulate every cycle at the same clock), in multiples of one bf16 thread's time: "
                     f"{_ranges(steps, lambda s: s['limit_device_s'] / s['cpu_s']['bf16']['1'])}.")
    if checks:
        worst = max(checks, key=lambda v: abs(v["model_error"]))
        lines.append(f"The cycle model is within {abs(worst['model_error']):.2%} of every RTL run above "
                     f"(worst: T={worst['t']}, {worst['in']} -> {worst['out']}, r={worst['r']}).")
    return lines


def _memory_line(report, memory):
    """The line under the step table's heading: which step, which memory, stalls included, which clock."""
    timing = DRAM_PRESETS.get(memory)
    clock = "" if timing is None else \
        (f" The clock is at most the memory controller's {timing.clock_mhz:g} MHz, whose cycles the DRAM timing "
         f"counts.")
    if report["options"].get("top", "memory-fed") == "blocked":
        return (f"The step runs on the **blocked step top** (`BlockedStep`, `--memory {memory}`, `--top blocked`; "
                f"forward, backward, the updates of A and B as four descriptors, feature blocks of at most "
                f"{BLOCKED_MAX_FEATURES}): every tensor in the {memory} DRAM behind one memory port, its cycles "
                f"against the DRAM's timing model, **memory stall cycles included** (the cycle model with memory "
                f"where no RTL run gives them).{clock}")
    return (f"The step is the **memory-fed** one (`MemStep`, `--memory {memory}`, `--top memory-fed`): every tensor "
            f"in the {memory} DRAM behind one memory port, its cycles against the DRAM's timing model, **memory "
            f"stall cycles included** (the cycle model with memory where no RTL run gives them).{clock}")


def markdown(report):
    """The report as Markdown: the NF4 table, the step table, the cycle model's check, the clocks."""
    m, opts = report["machine"], report["options"]
    load = "" if m["load_average_at_start"] is None else \
        f", load average {m['load_average_at_start']:.2f} at the start and {m['load_average_at_end']:.2f} at the end"
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['threads']} threads{load}); torch {m['torch']}, bitsandbytes "
             f"{m['bitsandbytes']}, peft {m['peft']}; {report['mode']} mode. CPU times: median of "
             f"{opts['repeats']} timed runs after {opts['warmup']} untimed (other jobs on the machine slow the "
             f"all-thread figures most).", "",
             "**NF4 cores, weights per second.** RTL: simulated cycles on the tensor below times the routed "
             "Fmax; limit: lanes x Fmax. CPU: bitsandbytes `quantize_4bit` / `dequantize_4bit` on a 2048 x 2048 "
             "bf16 weight (blocksize 64, double quantization).", ""]
    lines += _nf4_table(report)
    notes = sorted({row["note"] for row in report["nf4"] if row["note"]})
    lines += [""] + [f"Note: {note}." for note in notes] + [""]
    lines += [f"**One QLoRA step per TinyLlama-1.1B projection** (forward, backward with dx, AdamW; r={opts['rank']}). "
              f"RTL: cycles x Fmax. Limit: the step's useful multiply-accumulates (2 T in out + 3 T r (in + out)) "
              f"at one per PE per cycle, and at one per DSP of the {clocks.DEVICE} per cycle, at the same clock. "
              f"CPU: PEFT LoRA on a bitsandbytes NF4 `Linear4bit` (double quantization), AdamW, same shapes.", ""]
    memory = _through_memory(report)
    if memory:
        lines += [_memory_line(report, memory), ""]
    lines += _step_table(report)
    lines += [""] + _contention(report)
    table, checks = _validation_table(report)
    lines += ["", "**The cycle model against RTL runs** (error = (model - RTL) / RTL):", ""] + table
    lines += ["", "**Clocks** (routed builds on the ULX3S-85F; one seed each):", "",
              "| used for | Fmax MHz | build | note | command |", "|---|---:|---|---|---|"]
    for c in report["clocks"]:
        command = f"`{c['command']}`" if c["command"] else "-"
        lines.append(f"| {c['used_for']} | {c['mhz']} | {c['label']} | {c['note'] or '-'} | {command} |")
    if report["simulator"]["verilator_failure"]:
        lines += ["", f"Simulator: {report['simulator']['verilator_failure']}."]
    return "\n".join(lines + [""] + _summary(report, checks)) + "\n"


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def plot_utilization(report, file):
    """Bars: PE utilization of each projection's step, one bar per T."""
    import numpy as np
    steps = report["steps"]
    names = list(dict.fromkeys(s["projection"] for s in steps))
    tokens = list(dict.fromkeys(s["t"] for s in steps))
    fig = _figure(8, 4)
    ax = fig.subplots()
    width = 0.8 / len(tokens)
    for i, t in enumerate(tokens):
        values = [100 * next(s["utilization"] for s in steps if s["projection"] == n and s["t"] == t) for n in names]
        bars = ax.bar(np.arange(len(names)) + i * width, values, width, label=f"T={t}")
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small")
    ax.set_xticks(np.arange(len(names)) + width * (len(tokens) - 1) / 2, names)
    ax.set_ylim(0, 110)
    ax.set_ylabel("PE utilization, %")
    ax.set_title(f"{_step_words(report)}, {steps[0]['rows']}x{steps[0]['cols']} array, r={steps[0]['r']}: "
                 f"useful MACs / (PEs x cycles)")
    ax.legend(loc="lower right")
    sources = sorted({s["cycles_source"] for s in steps})
    ax.set_xlabel(f"cycles from: {', '.join(sources)}")
    fig.savefig(file, format="png", dpi=120)


def plot_times(report, file):
    """Grouped bars, log scale: each projection's step time on the RTL, at its limits and on the CPU."""
    import numpy as np
    steps, threads = report["steps"], report["threads"]
    tokens = list(dict.fromkeys(s["t"] for s in steps))
    series = [("RTL", lambda s: s["rtl_s"]), (f"limit, {clocks.DEVICE_DSPS} DSPs", lambda s: s["limit_device_s"])]
    series += [(f"CPU {dtype}, {n} thr.", lambda s, d=dtype, n=str(n): s["cpu_s"][d][n])
               for dtype in DTYPES for n in threads]
    fig = _figure(11, 4 * len(tokens))
    axes = np.atleast_1d(fig.subplots(len(tokens), 1))
    for ax, t in zip(axes, tokens):
        rows = [s for s in steps if s["t"] == t]
        width = 0.8 / len(series)
        for i, (label, value) in enumerate(series):
            ax.bar(np.arange(len(rows)) + i * width, [1e3 * value(s) for s in rows], width, label=label)
        ax.set_xticks(np.arange(len(rows)) + width * (len(series) - 1) / 2, [s["projection"] for s in rows])
        ax.set_yscale("log")
        ax.set_ylabel("ms per step")
        ax.set_title(f"T={t}: {rows[0]['rows']}x{rows[0]['cols']} array at {rows[0]['fmax_mhz']} MHz "
                     f"({rows[0]['fmax_build']}) against this CPU")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(file, format="png", dpi=120)


def prepare_out(out):
    """Check, before any work, that the output folder (created if missing) can take every output file."""
    from .outputs import OutputError, check_output
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} exists and is not a folder")
    if not os.path.isdir(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise OutputError(f"--out {out}: cannot create the folder: {parent} does not exist")
        try:
            os.mkdir(out)
        except OSError as error:
            raise OutputError(f"--out {out}: cannot create the folder ({error.strerror})") from None
    for name in OUTPUT_FILES:
        check_output(os.path.join(out, name), "--out")


def write(report, text, out):
    """Write ``bench.md`` (``text``), ``bench.json`` and the two plots into ``out``, each whole or not at all."""
    from .outputs import atomic_output
    paths = [os.path.join(out, name) for name in OUTPUT_FILES]
    with atomic_output(paths[0], "w") as f:
        f.write(text)
    with atomic_output(paths[1], "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with atomic_output(paths[2], "wb") as f:
        plot_utilization(report, f)
    with atomic_output(paths[3], "wb") as f:
        plot_times(report, f)
    return paths


# --- command-line values -------------------------------------------------------------------------------------------

def thread_list(text):
    """``--threads``: comma-separated thread counts, ``all`` for every thread this process may use."""
    counts = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == "all":
            counts.append(None)
        elif item.isdigit() and int(item) >= 1:
            counts.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"threads must be counts of at least 1 or 'all', comma-separated, "
                                             f"not {text!r}")
    return tuple(counts)


def lanes_list(text):
    """``--lanes``: comma-separated lane counts, each with routed builds of both NF4 cores."""
    have = sorted({int(b.config.split()[0]) for b in clocks.ROUTED if b.unit == "quantizer"})
    try:
        lanes = tuple(int(item) for item in text.split(","))
    except ValueError:
        lanes = ()
    if not lanes or any(n not in have for n in lanes):
        raise argparse.ArgumentTypeError(f"lanes must be among {', '.join(map(str, have))} (the routed builds), "
                                         f"comma-separated, not {text!r}")
    return lanes
