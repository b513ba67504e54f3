"""The one simulation harness of the project: run a design in Amaranth's simulator with stream producers, a
consumer and observers, and count its cycles; pack and unpack multi-lane stream beats.

Every driver in ``sim/`` (dequantizer, quantizer, GEMM engine, LoRA step) and the unit tests use it.
"""

import os

import numpy as np
from amaranth.sim import Simulator

from .streams import NO_STALLS, get, put
from .verilator import VerilatorModel, run_model

__all__ = ["CLOCK_PERIOD", "BACKENDS", "check_backend", "resolve_backend", "pack_lanes", "unpack_lanes", "producer",
           "simulate", "run_streams", "run_outputs"]

CLOCK_PERIOD = 1e-8  # 100 MHz, the ULX3S target; only the VCD time axis depends on it

#: The cycle-accurate simulators every driver runs on: Amaranth's own, and the design compiled with Verilator.
BACKENDS = ("pysim", "verilator")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")


def resolve_backend(backend):
    """``backend``, or when ``None`` the one named by ``$EDGE_QLORA_SIM_BACKEND`` (default ``pysim``): so that
    ``EDGE_QLORA_SIM_BACKEND=verilator pytest ...`` runs a test suite's simulations on Verilator."""
    backend = backend or os.environ.get("EDGE_QLORA_SIM_BACKEND") or "pysim"
    check_backend(backend)
    return backend


def pack_lanes(values, lanes, width):
    """Group ``values`` into beats of ``lanes`` elements of ``width`` bits (element 0 in the low bits), zero-padding
    the final beat; returns a list of Python ints, one per beat."""
    values = np.asarray(values, dtype=np.uint64)
    beats = -(-values.size // lanes)
    padded = np.zeros(beats * lanes, np.uint64)
    padded[:values.size] = values
    padded = padded.reshape(beats, lanes)
    return [sum(int(v) << (width * j) for j, v in enumerate(row)) for row in padded]


def unpack_lanes(beats, lanes, width, count):
    """Inverse of :func:`pack_lanes`: the first ``count`` elements of ``width`` bits from ``lanes``-wide beats."""
    mask = (1 << width) - 1
    out = np.array([(beat >> (width * j)) & mask for beat in beats for j in range(lanes)], dtype=np.uint64)
    return out[:count]


class _Clock:
    """Counts cycles from the first input offered to the last output taken."""

    def __init__(self):
        self.cycle = 0

    async def run(self, ctx):
        async for _ in ctx.tick():
            self.cycle += 1


def producer(stream, payloads, stalls):
    """A testbench that feeds ``payloads`` into ``stream``."""
    async def feed(ctx):
        await put(ctx, stream, payloads, stalls)
    return feed


def simulate(dut, producers, consumer, vcd_path, processes=()):
    """Run ``producers`` (background testbenches) and ``processes`` (observers) until ``consumer`` returns;
    returns its result and the cycles taken."""
    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD)
    clock = _Clock()
    sim.add_process(clock.run)
    for process in processes:
        sim.add_process(process)
    for producer in producers:
        sim.add_testbench(producer, background=True)
    result = {}

    async def main(ctx):
        result["out"] = await consumer(ctx)
        result["cycles"] = clock.cycle

    sim.add_testbench(main)
    if vcd_path:
        with sim.write_vcd(str(vcd_path)):
            sim.run()
    else:
        sim.run()
    return result["out"], result["cycles"]


def run_streams(factory, key, inputs, output, count, *, stalls=None, max_cycles, vcd_path=None, progress=None,
                backend=None, observers=()):
    """Drive ``inputs`` (``{port: beats}``) into ``factory()``'s input streams and collect ``count`` beats of its
    output stream ``output``, on Amaranth's simulator or on Verilator (the model cached under ``key``, the unit and
    its configuration); ``observers``: functions of the design giving pysim processes (checks that watch it).
    Returns ``(beats, cycles)``; fewer beats than ``count`` if the design stopped within ``max_cycles``."""
    stalls = stalls or {}
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(factory, key, trace=bool(vcd_path))
        outputs, cycles, _ = run_model(model, inputs, {output: count}, stalls=stalls, max_cycles=max_cycles,
                                       vcd_path=vcd_path, progress=progress)
        return outputs[output], cycles
    dut = factory()
    producers = [producer(getattr(dut, name), beats, stalls.get(name, NO_STALLS)) for name, beats in inputs.items()]

    async def consumer(ctx):
        return await get(ctx, getattr(dut, output), count, stalls.get(output, NO_STALLS), max_cycles=max_cycles,
                         progress=progress)

    return simulate(dut, producers, consumer, vcd_path, processes=[observe(dut) for observe in observers])



def run_outputs(factory, key, inputs, outputs, *, stalls=None, max_cycles, backend=None):
    """:func:`run_streams` for a design with several output streams: ``outputs`` is ``{port: count}``, each
    collected at its own pace (and with its own stalls). Returns ``({port: beats}, cycles)``."""
    stalls = stalls or {}
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(factory, key)
        got, cycles, _ = run_model(model, inputs, outputs, stalls=stalls, max_cycles=max_cycles)
        return got, cycles
    dut = factory()
    collected = {}

    def collector(name, count):
        async def take(ctx):
            collected[name] = await get(ctx, getattr(dut, name), count, stalls.get(name, NO_STALLS),
                                        max_cycles=max_cycles)
        return take

    async def consumer(ctx):
        for _ in range(max_cycles):
            if len(collected) == len(outputs):
                break
            await ctx.tick()
        return {name: collected.get(name, []) for name in outputs}

    producers = [producer(getattr(dut, name), beats, stalls.get(name, NO_STALLS)) for name, beats in inputs.items()]
    producers += [collector(name, count) for name, count in outputs.items()]
    return simulate(dut, producers, consumer, None)
