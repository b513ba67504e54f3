"""Run the QLoRA step (``rtl/lora.py``) in Amaranth's simulator on a :class:`~edge_qlora.golden.lora.LoraCase`."""

from dataclasses import dataclass

import numpy as np
import torch

from edge_qlora.golden.lora_optim import HYPER_FIELDS
from edge_qlora.golden.nf4_quant import unpack_nibbles
from edge_qlora.rtl.lora import LoraConfig, LoraStep, Phase
from .gemm import _collision_check
from .harness import pack_lanes, simulate, producer, unpack_lanes
from .streams import NO_STALLS

__all__ = ["StepRun", "run_step", "PHASE_NAMES"]

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


def run_step(case, config=None, *, stalls=None, vcd_path=None, max_cycles=2_000_000):
    """One step on :class:`~edge_qlora.rtl.lora.LoraStep`; returns a :class:`StepRun`."""
    stalls = dict(stalls or {})
    t, i = case.x.shape
    o = case.dy.shape[1]
    r = case.lora_A.shape[0]
    if config is None:
        config = LoraConfig(max_t=t, max_in=i, max_out=o, max_rank=r, optimizer=case.optimizer,
                            blocksize=case.weight.blocksize, double_quant=case.weight.double_quant)
    dut = LoraStep(config)
    banks, rows, cols = config.banks, config.rows, config.cols
    q = case.weight
    hyper = case.hyper
    header = 0
    fields = [("t", t, 16), ("in", i, 16), ("out", o, 16), ("r", r, 16),
              ("scaling", int(np.float32(case.scaling).view(np.uint32)), 32), ("n_weights", o * i, 32),
              ("offset", int(np.float32(q.offset if q.double_quant else 0).view(np.uint32)), 32)]
    fields += [(name, int(np.float32(hyper[name]).view(np.uint32)), 32) for name in HYPER_FIELDS]
    position = 0
    for _, value, width in fields:
        header |= value << position
        position += width

    n = o * i
    codes = pack_lanes(unpack_nibbles(q.packed, n), cols, 4)
    tensor = n | (int(np.float32(q.offset).view(np.uint32)) << 32) if q.double_quant else n
    if q.double_quant:
        absmax = [int(v) for v in np.asarray(q.absmax, np.uint8)]
        absmax2 = [int(v) for v in np.asarray(q.absmax2, np.float32).view(np.uint32)]
    else:
        absmax = [int(v) for v in np.asarray(q.absmax, np.float32).view(np.uint32)]
    passes = 2 * -(-t // rows)    # F2 and B4, one pass per tile of x / dy rows

    states = case.states()
    state_beats = []
    for name in "AB":
        m_bits = _bits32(states[f"exp_avg_{name}"]).reshape(-1)
        v_bits = _bits32(states[f"exp_avg_sq_{name}"]).reshape(-1)
        state_beats += [int(a) | (int(b) << 32) for a, b in zip(m_bits, v_bits)]

    producers = [
        producer(dut.header, [header], stalls.get("header", NO_STALLS)),
        producer(dut.x_in, _segments(_bits16(case.x), banks, 16), stalls.get("x_in", NO_STALLS)),
        producer(dut.dy_in, _segments(_bits16(case.dy), banks, 16), stalls.get("dy_in", NO_STALLS)),
        producer(dut.a_in, _segments(_bits32(case.lora_A), banks, 32), stalls.get("a_in", NO_STALLS)),
        producer(dut.b_in, _segments(_bits32(case.lora_B), banks, 32), stalls.get("b_in", NO_STALLS)),
        producer(dut.tensor, [tensor] * passes, stalls.get("tensor", NO_STALLS)),
        producer(dut.codes, codes * passes, stalls.get("codes", NO_STALLS)),
        producer(dut.absmax, absmax * passes, stalls.get("absmax", NO_STALLS)),
        producer(dut.state_in, state_beats, stalls.get("state_in", NO_STALLS)),
    ]
    if q.double_quant:
        producers.append(producer(dut.absmax2, absmax2 * passes, stalls.get("absmax2", NO_STALLS)))

    y_count = -(-t // rows) * -(-o // cols) * rows
    dx_count = -(-t // rows) * -(-i // cols) * rows
    update_count = r * i + o * r
    phase_log = []

    async def watch(ctx):
        previous = None
        cycle = 0
        async for _, _, value in ctx.tick().sample(dut.phase):
            cycle += 1
            if value != previous:
                phase_log.append((cycle, Phase(value).name))
                previous = value

    async def consumer(ctx):
        # y, dx and the updates leave in different phases: take them all in one loop
        beats = {"y": [], "dx": [], "updates": []}
        wanted = {"y": y_count, "dx": dx_count, "updates": update_count}
        ports = {"y": dut.y, "dx": dut.dx, "updates": dut.updates}
        from amaranth.hdl import Value
        raws = {k: Value.cast(p.payload) for k, p in ports.items()}
        for cycle in range(max_cycles):
            if all(len(beats[k]) == wanted[k] for k in beats):
                break
            for key, port in ports.items():
                ctx.set(port.ready, 0 if stalls.get(key, NO_STALLS).stall() else 1)
            sample = await ctx.tick().sample(*[x for k in ports for x in (ports[k].valid, ports[k].ready, raws[k])])
            values = sample[2:]
            for index, key in enumerate(ports):
                valid, ready, payload = values[3 * index:3 * index + 3]
                if valid and ready:
                    beats[key].append(payload)
        return beats

    beats, total = simulate(dut, producers, consumer, vcd_path, processes=[watch, _collision_check(dut.engine)])
    for key, count in (("y", y_count), ("dx", dx_count), ("updates", update_count)):
        if len(beats[key]) != count:
            raise RuntimeError(f"LoRA step produced {len(beats[key])} of {count} '{key}' beats "
                               f"(phases: {phase_log})")
    y = _unpack_tiles(beats["y"], rows, cols, t, o, 16)
    dx = _unpack_tiles(beats["dx"], rows, cols, t, i, 16)
    as16 = lambda a: torch.from_numpy(a.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)  # noqa
    updates = np.array(beats["updates"], dtype=object)
    fields = {name: np.array([(int(b) >> (32 * k)) & 0xFFFFFFFF for b in updates], np.uint32).view(np.float32)
              for k, name in enumerate(("grad", "param", "m", "v"))}
    split = r * i
    outputs = {"y": as16(y), "dx": as16(dx)}
    for name, sl, shape in (("A", slice(0, split), (r, i)), ("B", slice(split, None), (o, r))):
        outputs[f"grad_{name}"] = torch.from_numpy(fields["grad"][sl].reshape(shape).copy())
        outputs[f"lora_{name}"] = torch.from_numpy(fields["param"][sl].reshape(shape).copy())
        outputs[f"exp_avg_{name}"] = torch.from_numpy(fields["m"][sl].reshape(shape).copy())
        outputs[f"exp_avg_sq_{name}"] = torch.from_numpy(fields["v"][sl].reshape(shape).copy())
    phase_cycles = {}
    for (start, name), (end, _) in zip(phase_log, phase_log[1:] + [(total, None)]):
        if name != "IDLE":
            phase_cycles[name] = phase_cycles.get(name, 0) + end - start
    return StepRun(outputs, total, phase_cycles)
