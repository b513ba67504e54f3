"""Run the GEMM engine in Amaranth's simulator on whole matrices."""

from dataclasses import dataclass

import numpy as np
import torch

from edge_qlora.golden.gemm import row_chunk_exponents
from edge_qlora.golden.nf4_dequant import dequantize
from edge_qlora.golden.nf4_quant import NF4Quantized
from edge_qlora.golden.nf4_span import span as nf4_span
from edge_qlora.rtl.gemm import GemmConfig, GemmEngine, job_layout
from .nf4 import dequantizer_streams
from .harness import pack_lanes, run_streams, unpack_lanes

__all__ = ["GemmRun", "run_gemm", "run_gemm_jobs", "run_blocked_gemm", "block_jobs", "place_blocks", "bf16_bits",
           "collision_check"]

#: what a job of :func:`run_gemm_jobs` may ask for beyond its operands (see :func:`~edge_qlora.rtl.gemm.job_layout`)
JOB_FLAGS = frozenset({"block", "hold", "resume"})


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
        return dequantizer_streams(weights, cols)
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


def _check_flags(flags, config, m_rows, n, k, transposed, exponents):
    """A job's flags (a subset of :data:`JOB_FLAGS`) and tile exponents against its shape and the engine's
    buffers."""
    flags = frozenset(flags)
    if not flags <= JOB_FLAGS:
        raise ValueError(f"unknown job flags {sorted(flags - JOB_FLAGS)}; known: {sorted(JOB_FLAGS)}")
    chunk = config.chunk_steps
    wants_exponents = transposed and "block" in flags
    if wants_exponents != (exponents is not None):
        raise ValueError("a transposed block job, and only such a job, takes tile exponents")
    if wants_exponents and len(exponents) != -(-n // chunk):
        raise ValueError(f"a transposed block job takes one exponent per {chunk} W rows: {-(-n // chunk)}, "
                         f"not {len(exponents)}")
    if not flags:
        return flags
    if "block" not in flags:
        raise ValueError("hold and resume need a block job")
    tiles, q_len = -(-m_rows // config.rows), n if transposed else k
    if tiles * q_len > config.max_q or tiles * -(-q_len // chunk) > config.chunks_q:
        raise ValueError(f"a block job of {m_rows} rows and a reduction of {q_len} needs {tiles * q_len} A words "
                         f"and {tiles * -(-q_len // chunk)} exponent entries; the buffer half holds "
                         f"{config.max_q} and {config.chunks_q}")
    out_tiles, keeps = tiles * -(-(k if transposed else n) // config.cols), config.acc_depth // config.rows
    if (transposed or flags & {"hold", "resume"}) and out_tiles > keeps:
        raise ValueError(f"{out_tiles} output tiles to hold; the accumulator keeps {keeps}")
    if "hold" in flags and q_len % chunk:
        raise ValueError(f"a held job's reduction ({q_len}) must be a multiple of the chunk ({chunk})")
    return flags


def run_gemm_jobs(jobs, config=GemmConfig(), *, stalls=None, vcd_path=None, progress=None, backend=None):
    """Several jobs ``(a, weights, transposed)`` or ``(a, weights, transposed, flags[, exponents])`` back to back
    through one engine; a :class:`GemmRun` per job (each with the total cycle count of the whole run; ``out`` is
    None for a ``hold`` job). ``flags``: a subset of :data:`JOB_FLAGS`; ``exponents``: a transposed block job's
    tile exponents (see :func:`block_jobs`).

    ``backend``: ``"pysim"`` (with the memory-collision check of :func:`collision_check`) or ``"verilator"``.
    """
    stalls = dict(stalls or {})
    rows, cols = config.rows, config.cols
    job_beats, a_beats, exponent_beats, weight_beats, layout = [], [], [], {}, []
    for a, weights, transposed, *rest in jobs:
        n, k = tuple(weights.shape)
        m_rows, q_len = a.shape
        if q_len != (n if transposed else k):
            raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, W is {(n, k)}"
                             f"{' (transposed: a @ W)' if transposed else ' (a @ W.T)'}")
        flags, exponents = (rest[0] if rest else ()), (rest[1] if len(rest) > 1 else None)
        flags = _check_flags(flags, config, m_rows, n, k, transposed, exponents)
        if exponents is not None:
            exponent_beats += [int(e) & 0x1FF for e in exponents]
        tiles = -(-m_rows // rows)
        a_bits = bf16_bits(a.to(torch.bfloat16))
        for t in range(tiles):
            tile = np.zeros((rows, q_len), np.uint16)
            part = a_bits[t * rows:(t + 1) * rows]
            tile[:part.shape[0]] = part
            a_beats += pack_lanes(tile.T.reshape(-1), rows, 16)
        job_beats.append(job_layout().const({
            "m": m_rows, "n": n, "k": k, "weights": n * k, "transposed": int(transposed),
            **{flag: int(flag in flags) for flag in JOB_FLAGS}}).as_bits())
        for name, beats in _weight_streams(weights, config).items():
            weight_beats.setdefault(name, []).extend(beats * (1 if "block" in flags else tiles))
        out_cols = k if transposed else n
        layout.append((m_rows, out_cols, tiles, -(-out_cols // cols), flags, "block" in flags and not transposed))

    inputs = {"job": job_beats, "a": a_beats, **weight_beats, **({"exponents": exponent_beats} if exponent_beats
                                                                  else {})}
    count = sum(tiles * col_tiles * rows for _, _, tiles, col_tiles, flags, _ in layout if "hold" not in flags)
    longest = max(len(beats) for beats in weight_beats.values())
    max_cycles = 50 * (count + len(a_beats)) + 40 * longest + 5000
    beats, cycles = run_streams(lambda: GemmEngine(config), f"GemmEngine {config!r}", inputs, "c", count,
                                stalls=stalls, max_cycles=max_cycles, vcd_path=vcd_path, progress=progress,
                                backend=backend, observers=[collision_check])
    if len(beats) != count:
        raise RuntimeError(f"GEMM engine produced {len(beats)} of {count} output beats")
    width = 16 if config.out_dtype == "bf16" else 32
    runs, start = [], 0
    for m_rows, out_cols, tiles, col_tiles, flags, forward_block in layout:
        if "hold" in flags:
            runs.append(GemmRun(None, cycles))
            continue
        part = beats[start:start + tiles * col_tiles * rows]
        start += len(part)
        lasts = [(beat >> (width * cols)) & 1 for beat in part]
        if lasts != [0] * (len(part) - 1) + [1]:
            raise RuntimeError(f"GEMM engine marked beats {[i for i, f in enumerate(lasts) if f]} of a job last")
        values = unpack_lanes([beat & ((1 << (width * cols)) - 1) for beat in part], cols, width, len(part) * cols)
        # beats come tile by tile of output columns, rows in order within a tile (a forward block job: A tile by A
        # tile within each tile of output columns)
        values = values.reshape(col_tiles, tiles, rows, cols).transpose(1, 0, 2, 3) if forward_block else \
            values.reshape(tiles, col_tiles, rows, cols)
        values = values.transpose(0, 2, 1, 3).reshape(tiles * rows, col_tiles * cols)
        values = values[:m_rows, :out_cols]
        if width == 16:
            out = torch.from_numpy(values.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
        else:
            out = torch.from_numpy(values.astype(np.uint32).view(np.float32).copy())
        runs.append(GemmRun(out, cycles))
    return runs


def block_jobs(a, weights, token_block, feature_block, span, transposed=False, chunk=None):
    """The output-stationary schedule of ``a @ W.T`` (or, ``transposed``, ``a @ W``) as block jobs: for each block
    of ``token_block`` rows of ``a`` and ``feature_block`` output features (rows of W, or transposed its columns),
    one job per span of the reduction, all but the last held and all but the first resumed. W is bf16, or an
    NF4Quantized of which each job streams its rectangle of whole NF4 blocks (:func:`~edge_qlora.golden.nf4_span.span`:
    the span and, transposed, the feature block are whole blocks). A transposed job also takes the exponent of each
    of its chunks of W rows over all of W's columns (``golden.gemm.row_chunk_exponents``; ``chunk``, the engine's,
    divides ``span``), so that the blocks equal the whole product. Returns the jobs and, per job, the output block
    it gives (``(rows, features)`` slices, None for a held job)."""
    m_rows, reduction = a.shape
    features_all = weights.shape[1] if transposed else weights.shape[0]
    nf4 = isinstance(weights, NF4Quantized)
    cut = (lambda rows, cols: nf4_span(weights, rows, cols)) if nf4 else (lambda rows, cols: weights[rows, cols])
    if transposed:
        if chunk is None or span % chunk:
            raise ValueError(f"a transposed schedule needs the engine's chunk, a divisor of the span ({span})")
        table = row_chunk_exponents((dequantize(weights) if nf4 else weights).float().numpy(), chunk)
    jobs, places = [], []
    for t0 in range(0, m_rows, token_block):
        for f0 in range(0, features_all, feature_block):
            tokens, features = slice(t0, t0 + token_block), slice(f0, f0 + feature_block)
            for s0 in range(0, reduction, span):
                flags = frozenset({"block"} | ({"resume"} if s0 else set())
                                  | ({"hold"} if s0 + span < reduction else set()))
                part = slice(s0, s0 + span)
                if transposed:
                    groups = table[s0 // chunk:-(-min(s0 + span, reduction) // chunk)]
                    jobs.append((a[tokens, part], cut(part, features), True, flags, [int(e) for e in groups]))
                else:
                    jobs.append((a[tokens, part], cut(features, part), False, flags))
                places.append(None if "hold" in flags else (tokens, features))
    return jobs, places


def run_blocked_gemm(a, weights, config, token_block, feature_block, span, *, transposed=False, stalls=None,
                     backend=None):
    """``a @ W.T`` (``a @ W`` if ``transposed``) on the engine in the output-stationary schedule of
    :func:`block_jobs`: a :class:`GemmRun`."""
    jobs, places = block_jobs(a, weights, token_block, feature_block, span, transposed, config.chunk_steps)
    runs = run_gemm_jobs(jobs, config, stalls=stalls, backend=backend)
    return GemmRun(place_blocks(runs, places, (a.shape[0], weights.shape[1] if transposed else weights.shape[0])),
                   runs[-1].cycles)


def place_blocks(runs, places, shape):
    """The whole product of shape ``shape`` from the runs of :func:`block_jobs`' jobs and their places."""
    out = None
    for run, place in zip(runs, places):
        if place is not None:
            if out is None:
                out = torch.zeros(shape, dtype=run.out.dtype)
            out[place] = run.out
    return out
