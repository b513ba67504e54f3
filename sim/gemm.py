"""Run the GEMM engine in Amaranth's simulator on whole matrices."""

from dataclasses import dataclass

import numpy as np
import torch

from edge_qlora.constants import DYNAMIC_BLOCKSIZE
from edge_qlora.golden.nf4_quant import NF4Quantized, unpack_nibbles
from edge_qlora.rtl.gemm import GemmConfig, GemmEngine
from .harness import resolve_backend, pack_lanes, simulate, producer, unpack_lanes
from .verilator import VerilatorModel, run_model
from .streams import NO_STALLS, get

__all__ = ["GemmRun", "run_gemm", "run_gemm_jobs", "bf16_bits", "collision_check"]


@dataclass
class GemmRun:
    """Result of a simulated GEMM.

    Attributes
    ----------
    out : torch.Tensor
        ``[M, N]`` (forward) or ``[M, K]`` (transposed), bf16 or float32.
    cycles : int
    """

    out: torch.Tensor
    cycles: int


def bf16_bits(tensor):
    """uint16 bit patterns of a bf16 tensor, as a numpy array."""
    return tensor.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _weight_streams(weights, config):
    """The streams of one pass of W: ``{"w": beats}`` (bf16) or the dequantizer's streams (NF4)."""
    cols = config.cols
    if isinstance(weights, NF4Quantized):
        n = int(np.prod(weights.shape))
        streams = {"codes": pack_lanes(unpack_nibbles(weights.packed, n), cols, 4)}
        if weights.double_quant:
            streams["tensor"] = [n | (int(np.float32(weights.offset).view(np.uint32)) << 32)]
            streams["absmax"] = [int(v) for v in np.asarray(weights.absmax, np.uint8)]
            streams["absmax2"] = [int(v) for v in np.asarray(weights.absmax2, np.float32).view(np.uint32)]
        else:
            streams["tensor"] = [n]
            streams["absmax"] = [int(v) for v in np.asarray(weights.absmax, np.float32).view(np.uint32)]
        assert len(streams.get("absmax2", [])) in (0, -(-len(streams["absmax"]) // DYNAMIC_BLOCKSIZE))
        return streams
    return {"w": pack_lanes(bf16_bits(weights).reshape(-1), cols, 16)}


def collision_check(dut):
    """An observer: fails the run if a memory of the engine marked ``no_rw_check`` reads, for data that is used, an
    address written in the same cycle (the block RAMs would return don't-care there; see
    :attr:`GemmEngine.collisions`)."""
    async def watch(ctx):
        checks = [(name, write, read, used) for name, memory, used in dut.collisions
                  for write in memory.write_ports for read in memory.read_ports]
        signals = [signal for _, write, read, used in checks for signal in (used, write.en, write.addr, read.addr)]
        cycle = 0
        async for _, _, *values in ctx.tick().sample(*signals):
            cycle += 1
            for i, (name, *_) in enumerate(checks):
                used, write_en, write_addr, read_addr = values[4 * i:4 * i + 4]
                if used and write_en and write_addr == read_addr:
                    raise RuntimeError(f"GEMM engine: memory {name} read and written at address {read_addr} in "
                                       f"cycle {cycle}")
    return watch


def run_gemm(a, weights, config=GemmConfig(), *, transposed=False, stalls=None, vcd_path=None, progress=None,
             backend=None):
    """``a @ W.T`` (or ``a @ W`` when ``transposed``) on :class:`~edge_qlora.rtl.gemm.GemmEngine`.

    Parameters
    ----------
    a : torch.Tensor, bf16, [M, K] (forward) or [M, N] (transposed)
    weights : torch.Tensor bf16 [N, K], or NF4Quantized of shape [N, K]
    config : GemmConfig
        ``weights`` must match the kind of ``weights`` given.
    stalls : dict of str to Stalls, optional
        Per stream: ``job``, ``a``, ``w`` or the dequantizer's streams, and ``c``.
    backend : str, optional
        ``"pysim"`` or ``"verilator"`` (default: ``$EDGE_QLORA_SIM_BACKEND``, else ``"pysim"``).
    """
    runs = run_gemm_jobs([(a, weights, transposed)], config, stalls=stalls, vcd_path=vcd_path, progress=progress,
                         backend=backend)
    return runs[0]


def run_gemm_jobs(jobs, config=GemmConfig(), *, stalls=None, vcd_path=None, progress=None, backend=None):
    """Several jobs ``(a, weights, transposed)`` back to back through one engine; a :class:`GemmRun` per job
    (each with the total cycle count of the whole run).

    ``backend``: ``"pysim"`` (with the memory-collision check of :func:`collision_check`) or ``"verilator"``.
    """
    stalls = dict(stalls or {})
    rows, cols = config.rows, config.cols
    job_beats, a_beats, weight_beats, layout = [], [], {}, []
    for a, weights, transposed in jobs:
        n, k = tuple(weights.shape)
        m_rows, q_len = a.shape
        if q_len != (n if transposed else k):
            raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, W is {(n, k)}"
                             f"{' (transposed: a @ W)' if transposed else ' (a @ W.T)'}")
        tiles = -(-m_rows // rows)
        a_bits = bf16_bits(a.to(torch.bfloat16))
        for t in range(tiles):
            tile = np.zeros((rows, q_len), np.uint16)
            part = a_bits[t * rows:(t + 1) * rows]
            tile[:part.shape[0]] = part
            a_beats += pack_lanes(tile.T.reshape(-1), rows, 16)
        job_beats.append(m_rows | (n << 32) | (k << 64) | ((n * k) << 96) | (int(transposed) << 128))
        for name, beats in _weight_streams(weights, config).items():
            weight_beats.setdefault(name, []).extend(beats * tiles)
        out_cols = k if transposed else n
        layout.append((m_rows, out_cols, tiles, -(-out_cols // cols)))

    inputs = {"job": job_beats, "a": a_beats, **weight_beats}
    count = sum(tiles * col_tiles * rows for _, _, tiles, col_tiles in layout)
    longest = max(len(beats) for beats in weight_beats.values())
    max_cycles = 50 * (count + len(a_beats)) + 40 * longest + 5000
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(lambda: GemmEngine(config), f"GemmEngine {config!r}", trace=bool(vcd_path))
        outputs, cycles, _ = run_model(model, inputs, {"c": count}, stalls=stalls, max_cycles=max_cycles,
                                       vcd_path=vcd_path, progress=progress)
        beats = outputs["c"]
    else:
        dut = GemmEngine(config)
        producers = [producer(getattr(dut, name), beats, stalls.get(name, NO_STALLS))
                     for name, beats in inputs.items()]

        async def consumer(ctx):
            return await get(ctx, dut.c, count, stalls.get("c", NO_STALLS), max_cycles=max_cycles,
                             progress=progress)

        beats, cycles = simulate(dut, producers, consumer, vcd_path, processes=[collision_check(dut)])
    if len(beats) != count:
        raise RuntimeError(f"GEMM engine produced {len(beats)} of {count} output beats")
    width = 16 if config.out_dtype == "bf16" else 32
    runs, start = [], 0
    for m_rows, out_cols, tiles, col_tiles in layout:
        part = beats[start:start + tiles * col_tiles * rows]
        start += len(part)
        lasts = [(beat >> (width * cols)) & 1 for beat in part]
        if lasts != [0] * (len(part) - 1) + [1]:
            raise RuntimeError(f"GEMM engine marked beats {[i for i, f in enumerate(lasts) if f]} of a job last")
        values = unpack_lanes([beat & ((1 << (width * cols)) - 1) for beat in part], cols, width, len(part) * cols)
        # beats come tile by tile of output columns, rows in order within a tile
        values = values.reshape(tiles, col_tiles, rows, cols).transpose(0, 2, 1, 3).reshape(tiles * rows,
                                                                                            col_tiles * cols)
        values = values[:m_rows, :out_cols]
        if width == 16:
            out = torch.from_numpy(values.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
        else:
            out = torch.from_numpy(values.astype(np.uint32).view(np.float32).copy())
        runs.append(GemmRun(out, cycles))
    return runs
