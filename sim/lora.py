"""Run the QLoRA step (``rtl/lora/``) in Amaranth's simulator on a :class:`~edge_qlora.golden.lora.LoraCase`."""

from dataclasses import dataclass

import numpy as np
import torch
from amaranth.hdl import Value

from edge_qlora.constants import BF16, FP32, HYPER_FIELDS
from edge_qlora.golden.gemm import gemm_cycles
from edge_qlora.rtl.lora import PHASES, LoraConfig, LoraStep, Phase
from edge_qlora.rtl.lora_optim import LoRAOptimizer, OptimConfig
from .gemm import collision_check
from .nf4 import dequantizer_streams
from .harness import resolve_backend, simulate, producer, unpack_lanes
from .verilator import Source, VerilatorModel, run_model
from .streams import NO_STALLS

__all__ = ["StepRun", "run_step", "step_cycles", "engine_cycles", "PHASE_NAMES"]

PHASE_NAMES = [phase.name for phase in Phase]


@dataclass
class StepRun:
    """Outputs of a simulated step (named as ``golden.lora.OUTPUT_NAMES``), total cycles and cycles per phase."""

    outputs: dict
    cycles: int
    phase_cycles: dict


def _bits16(t):
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _bits32(t):
    return t.detach().float().contiguous().numpy().view(np.uint32)


def _segments(bits, banks, width):
    """Row segments of a 2-D bit array: beats of ``banks`` elements, ``row_end`` and ``last`` flags above them."""
    rows, cols = bits.shape
    beats = []
    for r in range(rows):
        for c in range(0, cols, banks):
            chunk = [int(v) for v in bits[r, c:c + banks]] + [0] * (banks - min(banks, cols - c))
            value = sum(v << (width * i) for i, v in enumerate(chunk))
            row_end = c + banks >= cols
            last = row_end and r == rows - 1
            beats.append(value | (int(row_end) << (width * banks)) | (int(last) << (width * banks + 1)))
    return beats


def _unpack_tiles(beats, rows, cols, m, p, width):
    """Engine output beats (tile order) -> [m, p] bit array."""
    tiles_m, tiles_p = -(-m // rows), -(-p // cols)
    values = unpack_lanes([b & ((1 << (width * cols)) - 1) for b in beats], cols, width, len(beats) * cols)
    values = values.reshape(tiles_m, tiles_p, rows, cols).transpose(0, 2, 1, 3).reshape(tiles_m * rows,
                                                                                        tiles_p * cols)
    return values[:m, :p]


def _header(case, t, i, o, r):
    """The ``header`` beat of a step, as raw bits of :func:`~edge_qlora.rtl.lora.header_layout`."""
    q, hyper = case.weight, case.hyper
    as_bits = lambda value: int(np.float32(value).view(np.uint32))  # noqa: E731
    fields = [("t", t, 16), ("in", i, 16), ("out", o, 16), ("r", r, 16),
              ("scaling", as_bits(case.scaling), FP32.width), ("n_weights", o * i, 32),
              ("offset", as_bits(q.offset if q.double_quant else 0), FP32.width)]
    fields += [(name, as_bits(hyper[name]), FP32.width) for name in HYPER_FIELDS]
    header, position = 0, 0
    for _, value, width in fields:
        header |= value << position
        position += width
    return header


def _state_beats(case):
    """``state_in``: the moments of A, then B, element by element (``m`` in the low word)."""
    states = case.states()
    beats = []
    for name in "AB":
        m_bits = _bits32(states[f"exp_avg_{name}"]).reshape(-1)
        v_bits = _bits32(states[f"exp_avg_sq_{name}"]).reshape(-1)
        beats += [int(a) | (int(b) << FP32.width) for a, b in zip(m_bits, v_bits)]
    return beats


def _collector(ports, wanted, stalls, max_cycles):
    """A consumer for the output streams ``ports`` ({name: stream}), which leave in different phases: takes
    ``wanted[name]`` beats of each in one loop, withholding ``ready`` at random."""
    async def consumer(ctx):
        beats = {name: [] for name in ports}
        raws = {name: Value.cast(port.payload) for name, port in ports.items()}
        for _ in range(max_cycles):
            if all(len(beats[name]) == wanted[name] for name in beats):
                break
            for name, port in ports.items():
                ctx.set(port.ready, 0 if stalls.get(name, NO_STALLS).stall() else 1)
            sample = await ctx.tick().sample(*[x for name in ports
                                               for x in (ports[name].valid, ports[name].ready, raws[name])])
            values = sample[2:]
            for index, name in enumerate(ports):
                valid, ready, payload = values[3 * index:3 * index + 3]
                if valid and ready:
                    beats[name].append(payload)
        return beats
    return consumer


def _phase_watch(phase, log):
    """An observer that logs ``(cycle, phase name)`` at every change of the step's phase."""
    async def watch(ctx):
        previous, cycle = None, 0
        async for _, _, value in ctx.tick().sample(phase):
            cycle += 1
            if value != previous:
                log.append((cycle, Phase(value).name))
                previous = value
    return watch


def _outputs(beats, config, t, i, o, r):
    """The step's outputs (named as ``golden.lora.OUTPUT_NAMES``) from the collected beats."""
    rows, cols = config.rows, config.cols
    as16 = lambda a: torch.from_numpy(a.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)  # noqa
    outputs = {"y": as16(_unpack_tiles(beats["y"], rows, cols, t, o, BF16.width)),
               "dx": as16(_unpack_tiles(beats["dx"], rows, cols, t, i, BF16.width))}
    updates = np.array(beats["updates"], dtype=object)
    mask = (1 << FP32.width) - 1
    fields = {name: np.array([(int(b) >> (FP32.width * k)) & mask for b in updates], np.uint32).view(np.float32)
              for k, name in enumerate(("grad", "param", "m", "v"))}
    split = r * i
    for name, sl, shape in (("A", slice(0, split), (r, i)), ("B", slice(split, None), (o, r))):
        outputs[f"grad_{name}"] = torch.from_numpy(fields["grad"][sl].reshape(shape).copy())
        outputs[f"lora_{name}"] = torch.from_numpy(fields["param"][sl].reshape(shape).copy())
        outputs[f"exp_avg_{name}"] = torch.from_numpy(fields["m"][sl].reshape(shape).copy())
        outputs[f"exp_avg_sq_{name}"] = torch.from_numpy(fields["v"][sl].reshape(shape).copy())
    return outputs


def run_step(case, config=None, *, stalls=None, vcd_path=None, max_cycles=None, backend=None, progress=None,
             status=None):
    """One step on :class:`~edge_qlora.rtl.lora.LoraStep`; returns a :class:`StepRun`.

    ``backend``: ``"pysim"`` (with the engine's memory-collision check) or ``"verilator"``. ``progress(done,
    total)`` follows the output beats (Verilator) or the cycles against the cycle model's estimate (pysim);
    ``status(text)`` reports a Verilator model's build.
    """
    stalls = dict(stalls or {})
    t, i = case.x.shape
    o = case.dy.shape[1]
    r = case.lora_A.shape[0]
    if config is None:
        config = LoraConfig(max_t=t, max_in=i, max_out=o, max_rank=r, optimizer=case.optimizer,
                            blocksize=case.weight.blocksize, double_quant=case.weight.double_quant)
    banks, rows, cols = config.banks, config.rows, config.cols
    if max_cycles is None:
        max_cycles = 2 * sum(step_cycles(t, i, o, r, rows, cols, config.optimizer,
                                         config.optimizer_interval).values()) + 100_000
    passes = 2 * -(-t // rows)    # F2 and B4, one pass per tile of x / dy rows
    inputs = {
        "header": [_header(case, t, i, o, r)],
        "x_in": _segments(_bits16(case.x), banks, BF16.width),
        "dy_in": _segments(_bits16(case.dy), banks, BF16.width),
        "a_in": _segments(_bits32(case.lora_A), banks, FP32.width),
        "b_in": _segments(_bits32(case.lora_B), banks, FP32.width),
        "state_in": _state_beats(case),
    }
    weights = dequantizer_streams(case.weight, cols)
    wanted = {"y": -(-t // rows) * -(-o // cols) * rows, "dx": -(-t // rows) * -(-i // cols) * rows,
              "updates": r * i + o * r}
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(lambda: LoraStep(config), f"LoraStep {config!r}", trace=bool(vcd_path))
        sources = {**inputs, **{name: Source(beats, passes) for name, beats in weights.items()}}
        beats, total, watches = run_model(model, sources, wanted, stalls=stalls, max_cycles=max_cycles,
                                          vcd_path=vcd_path, progress=progress, status=status)
        phase_log = [(cycle, Phase(value).name) for cycle, value in watches["phase"]]
    else:
        inputs.update({name: beats * passes for name, beats in weights.items()})
        beats, total, phase_log = _run_pysim(config, inputs, wanted, stalls, vcd_path, max_cycles, progress)
    for key, count in wanted.items():
        if len(beats[key]) != count:
            raise RuntimeError(f"LoRA step produced {len(beats[key])} of {count} '{key}' beats "
                               f"(phases: {phase_log})")
    phase_cycles = {}
    for (start, name), (end, _) in zip(phase_log, phase_log[1:] + [(total, None)]):
        if name != "IDLE":
            phase_cycles[name] = phase_cycles.get(name, 0) + end - start
    return StepRun(_outputs(beats, config, t, i, o, r), total, phase_cycles)


def _cycle_counter(total, progress):
    """An observer calling ``progress(cycles, total)`` every 256 cycles."""
    async def count(ctx):
        cycles = 0
        async for _ in ctx.tick():
            cycles += 1
            if cycles % 256 == 0:
                progress(min(cycles, total), total)
    return count


def _run_pysim(config, inputs, wanted, stalls, vcd_path, max_cycles, progress):
    dut = LoraStep(config)
    producers = [producer(getattr(dut, name), beats, stalls.get(name, NO_STALLS)) for name, beats in inputs.items()]
    phase_log = []
    consumer = _collector({"y": dut.y, "dx": dut.dx, "updates": dut.updates}, wanted, stalls, max_cycles)
    processes = [_phase_watch(dut.phase, phase_log), collision_check(dut.engine)]
    if progress:
        t, i, o, r = (config.max_t, config.max_in, config.max_out, config.max_rank)
        processes.append(_cycle_counter(sum(step_cycles(t, i, o, r, config.rows, config.cols, config.optimizer,
                                                        config.optimizer_interval).values()), progress))
    beats, total = simulate(dut, producers, consumer, vcd_path, processes=processes)
    return beats, total, phase_log

def optimizer_latency(kind="adamw", interval=1):
    """Cycles from an element's acceptance by the optimizer core to its update (:class:`LoRAOptimizer`)."""
    unit = LoRAOptimizer(OptimConfig(kind=kind, interval=interval))
    unit._MustUse__silence = True   # only its latency is wanted: no "created but never used" warning
    return unit.latency


#: Cycles from a beat's acceptance by the combiner to its output: the partner read, then one lane's multiply, add
#: and rounding (:class:`~edge_qlora.rtl.lora.writer.Combiner`).
COMBINE_LATENCY = 16


def engine_cycles(phase, t, d_in, d_out, r, rows, cols):
    """The GEMM engine's cycles for ``phase`` (a :class:`~edge_qlora.rtl.lora.Phase` of ``PHASES``) alone, without
    the combiner (:func:`~edge_qlora.golden.gemm.gemm_cycles`: NF4 weights for F2 and B4, bf16 from the
    scratchpads otherwise)."""
    row = PHASES[phase]
    dims = {"t": t, "in": d_in, "out": d_out, "r": r}
    chunk = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=d_out, max_rank=r).chunk
    return gemm_cycles(dims[row.m], dims[row.n], dims[row.k], rows, cols, chunk, row.transposed,
                       "nf4" if row.nf4 else "rows", "fp32").cycles


def _b4_shape(phase, t, d_in, d_out, r, rows, cols):
    """A transposed combining phase's column tiles, tiles, output beats and the cycles of its last sweep over the
    reduction (one column tile every ``steps``: the chunk, padded)."""
    row = PHASES[phase]
    dims = {"t": t, "in": d_in, "out": d_out, "r": r}
    col_tiles, tiles = -(-dims[row.out_columns] // cols), -(-dims[row.m] // rows)
    config = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=d_out, max_rank=r)
    steps = max(min(config.chunk, dims[row.k]), config.gemm.min_steps)
    return col_tiles, tiles, tiles * col_tiles * rows, col_tiles * steps, steps


def first_output(phase, t, d_in, d_out, r, rows, cols, sweep=None):
    """Cycles from the start of B4 (a transposed combining ``phase``) to its first output beat: the engine
    through its first tile (its start-up included) less that tile's last sweep (``sweep``, worked out here when
    the caller has not)."""
    row = PHASES[phase]
    dims = {"t": t, "in": d_in, "out": d_out, "r": r}
    dims[row.m] = min(dims[row.m], rows)
    if sweep is None:
        sweep = _b4_shape(phase, t, d_in, d_out, r, rows, cols)[3]
    return engine_cycles(phase, dims["t"], dims["in"], dims["out"], r, rows, cols) - sweep


def combine_cycles(phase, engine, t, d_in, d_out, r, rows, cols):
    """Cycles of F2 or B4 (``phase``) with the combiner draining the engine's outputs (``engine``: the engine's
    cycles alone, :func:`engine_cycles`).

    The combiner's one lane takes ``cols + 2`` cycles a beat and the engine's outputs queue for it
    (``LoraConfig.c_queue_depth``: one B4 tile's). F2 gives a tile's beats as each of its output tiles finishes,
    so only the last tile's drain follows the engine. B4 gives each tile's beats in its last sweep over the
    reduction; the last tile's drain follows the engine by what it is slower than that sweep. Where tiles are
    short the combiner sets the pace from the first beat on (:func:`first_output`).
    """
    row = PHASES[phase]
    if not row.transposed:
        dims = {"t": t, "in": d_in, "out": d_out, "r": r}
        beats = -(-dims[row.m] // rows) * -(-dims[row.out_columns] // cols) * rows
        return max(engine + rows * (cols + 1), beats * (cols + 2) + COMBINE_LATENCY)
    col_tiles, _, beats, sweep, steps = _b4_shape(phase, t, d_in, d_out, r, rows, cols)
    tail = max(0, col_tiles * rows * (cols + 2) - sweep + steps)
    first = first_output(phase, t, d_in, d_out, r, rows, cols, sweep)
    return max(engine + tail, first + beats * (cols + 2)) + COMBINE_LATENCY


def step_cycles(t, d_in, d_out, r, rows, cols, optimizer="adamw", optimizer_interval=1):
    """The cycle model of one step: estimated cycles per phase (dict in execution order: ``load``, the GEMM
    phases by name, ``update``).

    Each GEMM phase is costed with the engine's validated model (:func:`~edge_qlora.golden.gemm.gemm_cycles`, NF4
    weights for F2 and B4, bf16 from the scratchpads otherwise), F2 and B4 with their combiner's pace
    (:func:`combine_cycles`); the loads stream ``banks`` elements per cycle and the optimizer takes one element
    every ``optimizer_interval`` cycles plus its latency.
    """
    config = LoraConfig(rows=rows, cols=cols, max_t=t, max_in=d_in, max_out=d_out, max_rank=r,
                        optimizer=optimizer)
    dims = {"t": t, "in": d_in, "out": d_out, "r": r}
    banks = config.banks
    phases = {"load": sum(-(-dims[a] // banks) * dims[b] for a, b in (("in", "t"), ("out", "t"),
                                                                       ("in", "r"), ("r", "out")))}
    for phase, row in PHASES.items():
        cycles = engine_cycles(phase, t, d_in, d_out, r, rows, cols)
        if row.combining:
            cycles = combine_cycles(phase, cycles, t, d_in, d_out, r, rows, cols)
        phases[phase.name] = cycles
    phases["update"] = (r * d_in + d_out * r) * optimizer_interval + 2 * optimizer_latency(optimizer,
                                                                                        optimizer_interval)
    return phases
