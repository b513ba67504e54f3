"""Bit-accurate model of the GEMM engine's arithmetic (twin of ``rtl/gemm/`` and ``rtl/pe_array.py``).

The engine computes ``C = A @ B`` with A ``[M, Q]`` bf16 activations and B ``[Q, P]`` bf16 weights (dequantized
NF4 or given in bf16). Forward: ``y = x @ W.T`` (A = x, B = W.T, Q = K). Backward: ``dx = dy @ W`` (A = dy, B = W,
Q = N). The arithmetic is block floating point over *chunks* of the reduction dimension:

1. **Alignment.** Along the reduction dimension, every ``chunk`` consecutive elements of a row of A (and of a column
   of B; in the backward mode, all of a chunk of B's rows) share one exponent ``E``: the largest exponent among
   them (bf16 subnormals count as exponent -126). Each
   element becomes an 18-bit signed integer ``q = rne(v * 2**(16 - E))``; elements within 9 binades of the largest
   are exact, smaller ones are rounded to nearest, ties to even. 18 bits because that is an ECP5 DSP operand.
2. **Chunk products.** Each processing element sums the exact products ``qa * qb`` of one chunk in a 44-bit
   integer: exact, no rounding (|q| <= 2**17 - 1, chunk <= 512).
3. **Chunk partials to float32.** The chunk sum ``S`` is worth ``S * 2**(Ea + Eb - 32)``; it is rounded once to
   float32 (round to nearest even, gradual underflow).
4. **Accumulation.** The partials of successive chunks are added in float32, in chunk order: ``acc = p0``, then
   ``acc = fl32(acc + p_c)``.
5. **Output.** ``acc`` is rounded to bf16 (round to nearest even), or given as float32.

Float adders are expensive in FPGA fabric, DSPs are cheap: this keeps every multiply-accumulate in a DSP and an
integer adder, and spends one float32 adder per array column on ``rows`` partials every ``chunk`` cycles.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..constants import EXP_MIN, OPERAND_FRAC, GemmNumerics
from . import nf4_dequant, nf4_quant

__all__ = ["GemmNumerics", "align", "row_chunk_exponents", "chunk_partials", "gemm", "reference_fp64", "bnb_style",
           "rel_frobenius", "ACTIVATION_KINDS", "CONTRACT_SHAPES", "CYCLE_MODEL_CASES", "random_activations",
           "random_nf4_weight"]

def _bf16_values(t):
    """float32 numpy array holding exactly the values of a bf16 tensor/array."""
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.bfloat16:
            raise ValueError(f"operands must be bfloat16, not {t.dtype}")
        return t.float().numpy()
    return np.asarray(t, dtype=np.float32)


def exponents(values):
    """Unbiased exponent of each float32 value holding a bf16 (subnormals and zeros: -126)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    biased = ((bits >> 23) & 0xFF).astype(np.int64)
    return np.maximum(biased - 127, EXP_MIN)


def align(values, chunk, axis):
    """Block-floating-point alignment along ``axis`` in groups of ``chunk``.

    Returns
    -------
    q : int64 array, same shape
        18-bit signed fixed-point operands.
    e : int64 array
        Shared exponent per group: shape of ``values`` with ``axis`` replaced by the number of groups.
    """
    values = np.moveaxis(np.asarray(values, dtype=np.float32), axis, -1)
    length = values.shape[-1]
    groups = -(-length // chunk)
    padded = np.zeros(values.shape[:-1] + (groups * chunk,), np.float32)
    padded[..., :length] = values
    grouped = padded.reshape(values.shape[:-1] + (groups, chunk))
    shared = exponents(grouped).max(axis=-1)                       # [..., groups]
    scale = np.ldexp(1.0, (OPERAND_FRAC - shared))[..., None]      # exact powers of two (float64)
    q = np.rint(grouped.astype(np.float64) * scale).astype(np.int64)  # rint: round half to even
    q = q.reshape(values.shape[:-1] + (groups * chunk,))[..., :length]
    return np.moveaxis(q, -1, axis), np.moveaxis(shared, -1, axis) if shared.ndim > 1 else shared


def row_chunk_exponents(b, chunk):
    """The backward mode's shared exponent of each chunk of ``chunk`` rows of B (W itself) over all its columns."""
    b = np.asarray(b, dtype=np.float32)
    return np.array([exponents(b[g * chunk:(g + 1) * chunk]).max() for g in range(-(-b.shape[0] // chunk))])


def chunk_partials(a, b, chunk, transposed=False, row_exponents=None):
    """Exact chunk sums and their exponents.

    Parameters
    ----------
    a : array [M, Q] of bf16 values
    b : array [Q, P] of bf16 values
    transposed : bool
        B is W itself (backward): one shared exponent per chunk of B's rows for *all* its columns (the engine's
        W buffer holds a chunk of W rows and finds one maximum while loading them). Forward, B is ``W.T``: one
        exponent per column (a W row) and chunk.
    row_exponents : array [groups] of int, optional
        Backward only: the chunks' shared exponents, as :func:`row_chunk_exponents` gives them for the whole W, so
        that a block of W's columns is computed as the engine computes it with all of them.

    Returns
    -------
    sums : int64 array [groups, M, P]
    exps : int64 array [groups, M, P]   (the partial is ``sums * 2**(exps - 32)``)
    """
    if row_exponents is not None and not transposed:
        raise ValueError("row_exponents applies to the backward mode (transposed=True) only")
    qa, ea = align(a, chunk, axis=1)      # ea [M, groups]
    if transposed:
        b = np.asarray(b, dtype=np.float32)
        eb = row_chunk_exponents(b, chunk) if row_exponents is None else np.asarray(row_exponents, np.int64)
        if eb.shape != (-(-b.shape[0] // chunk),):
            raise ValueError(f"row_exponents must hold one exponent per chunk of B's rows ({-(-b.shape[0] // chunk)}), "
                             f"not shape {eb.shape}")
        eb = np.repeat(eb[:, None], b.shape[1], axis=1)   # [groups, P]
        scale = np.ldexp(1.0, OPERAND_FRAC - np.repeat(eb, chunk, axis=0)[:b.shape[0]])
        qb = np.rint(b.astype(np.float64) * scale).astype(np.int64)
    else:
        qb, eb = align(b, chunk, axis=0)  # eb [groups, P]
    q = qa.shape[1]
    groups = -(-q // chunk)
    sums = np.empty((groups, qa.shape[0], qb.shape[1]), np.int64)
    for g in range(groups):
        sl = slice(g * chunk, min(q, (g + 1) * chunk))
        sums[g] = qa[:, sl] @ qb[sl, :]   # |sum| < 2**43: exact in int64
    exps = ea.T[:, :, None] + eb[:, None, :]
    return sums, exps


def partial_to_fp32(sums, exps):
    """``fl32(S * 2**(E - 32))``: exact in float64 (|S| < 2**53), then one rounding to float32."""
    with np.errstate(over="ignore"):
        return np.ldexp(sums.astype(np.float64), exps - 2 * OPERAND_FRAC).astype(np.float32)


def gemm(a, b, numerics=GemmNumerics(), transposed=False, row_exponents=None):
    """The engine's ``a @ b`` for bf16 ``a`` [M, Q] and ``b`` [Q, P]; returns a torch tensor (bf16 or fp32).

    ``transposed``: the backward mode, ``b`` is W itself (see :func:`chunk_partials`, also for ``row_exponents``);
    forward, ``b`` is ``W.T``.
    """
    a, b = _bf16_values(a), _bf16_values(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {a.shape} and {b.shape} cannot be multiplied")
    sums, exps = chunk_partials(a, b, numerics.chunk, transposed, row_exponents)
    partials = partial_to_fp32(sums, exps)
    acc = partials[0]
    with np.errstate(over="ignore", invalid="ignore"):
        for p in partials[1:]:
            acc = (acc + p).astype(np.float32)
    out = torch.from_numpy(np.ascontiguousarray(acc))
    return out.to(torch.bfloat16) if numerics.out_dtype == "bf16" else out


def reference_fp64(a, b):
    """Exact-operand float64 product, the accuracy reference."""
    return _bf16_values(a).astype(np.float64) @ _bf16_values(b).astype(np.float64)


def bnb_style(a, b):
    """What bitsandbytes does in software: bf16 operands, a bf16 torch matmul (float32 accumulation inside)."""
    return torch.from_numpy(_bf16_values(a)).to(torch.bfloat16) @ torch.from_numpy(_bf16_values(b)).to(torch.bfloat16)


def rel_frobenius(result, reference):
    """``||result - reference||_F / ||reference||_F`` in float64."""
    result = result.double().numpy() if isinstance(result, torch.Tensor) else np.asarray(result, np.float64)
    diff = np.linalg.norm(result - reference)
    norm = np.linalg.norm(reference)
    return float(diff / norm) if norm else float(diff)


# --- test operands (tests/test_gemm.py, scripts/gemm_accuracy.py) ---------------------------------------------------

#: activation families of the accuracy contract
ACTIVATION_KINDS = ("normal", "outliers", "tiny", "sparse", "wide")
#: (M, N, K) shapes of the accuracy contract
CONTRACT_SHAPES = ((1, 64, 64), (16, 256, 2048), (7, 33, 100), (64, 1, 300), (16, 2048, 512), (3, 5, 1))


def random_activations(shape, seed, kind="normal"):
    """bf16 activations of one of :data:`ACTIVATION_KINDS`: ``normal`` (standard normal), ``outliers`` (every fifth
    channel 100x larger, as in LLM activations), ``tiny`` (scaled by 1e-38: bf16 subnormals and near-underflow),
    ``sparse`` (70% zeros), ``wide`` (every row spans 60 binades)."""
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"kind must be one of {ACTIVATION_KINDS}, not {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "outliers":
        x[:, :: max(1, shape[1] // 5)] *= 100
    elif kind == "tiny":
        x = x * 1e-38
    elif kind == "sparse":
        x[torch.rand(shape, generator=gen) < 0.7] = 0
    elif kind == "wide":
        x = x * torch.exp2(torch.randint(-30, 30, shape, generator=gen).float())
    return x.to(torch.bfloat16)


def random_nf4_weight(shape, seed, double_quant=True):
    """``(quantized, bf16 weight)``: a N(0, 0.02) weight quantized to NF4 (blocksize 64) and dequantized to bf16
    exactly as bitsandbytes does."""
    gen = torch.Generator().manual_seed(seed)
    q = nf4_quant.quantize(torch.randn(shape, generator=gen) * 0.02, 64, double_quant)
    return q, nf4_dequant.dequantize(q, "bf16")


# --- cycle model ----------------------------------------------------------------------------------------------------

#: Jobs on which the cycle model is checked against the RTL, ``(M, N, K, rows, cols, transposed, weights)``
#: (``tests/test_gemm.py``, ``scripts/gemm_cycles.py --regression``).
CYCLE_MODEL_CASES = [
    (4, 4, 32, 2, 2, False, "bf16"),
    (3, 5, 40, 2, 2, False, "bf16"),
    (8, 16, 64, 4, 4, False, "bf16"),
    (8, 16, 64, 4, 4, True, "bf16"),
    (5, 9, 100, 2, 4, False, "nf4"),
    (5, 9, 100, 2, 4, True, "nf4"),
    (16, 24, 64, 8, 8, True, "nf4"),
    (8, 64, 128, 4, 4, False, "nf4"),
]


@dataclass(frozen=True)
class CycleModel:
    """Analytical cycle count of the engine (``rtl/gemm/``) for one job, from its schedule.

    The engine overlaps three things: loading W tiles (row-aligned beats, one per cycle:
    ``rows_in_tile * ceil(K / cols)`` cycles a tile), loading A tiles (one beat per reduction index), and
    computing (one PE-array step per cycle: forward, a tile of ``cols`` W rows takes ``sum over chunks of
    max(chunk length, min_chunk)`` steps; transposed, a tile of ``chunk`` W rows takes ``ceil(K / cols) *
    max(rows in the tile, min_chunk)`` steps). Both buffers have two halves: a tile can load while the previous
    one computes, and a half is free again when the tile two before has issued its last step. The constants are
    the RTL's fixed latencies.

    Attributes
    ----------
    cycles : int
        Total cycles, from the job beat to the last output beat.
    steps : int
        PE-array steps issued (useful and padding).
    macs : int
        Useful multiply-accumulates, ``M * N * K``.
    utilization : float
        ``macs / (rows * cols * cycles)``.
    """

    cycles: int
    steps: int
    macs: int
    utilization: float


# fixed latencies of the RTL, in cycles (rtl/gemm/ and the units it instantiates)
START_LATENCY = 2          # job beat accepted -> writers and sequencer running
FLAG_LATENCY = 1           # last write of a tile -> the sequencer sees the half full
WRITE_LATENCY = 1          # A or W beat taken -> written (the buffers' write ports are registered)
ALIGNER_LATENCY = 3        # flat beat in -> row beat written
SHAPE_LATENCY = 1          # bf16 W: the row aligner takes its shape beat a cycle after it is offered
DEQUANT_LATENCY = 29       # NF4 dequantizer, first inputs -> first weights, besides one table build (double quant)
ISSUE_TO_ARRAY = 6         # sequencer issue -> step taken by the PE array (read, register, select, align x3)
# a partial leaving the array -> its output beat taken: array output register 1, partials FIFO 2, operand register
# 1, FixedToFloat 5, register slice 1, hand-off 1, memory read 1, FPAdd 8, rounding to bf16 1, output FIFO 2
# (measured on the RTL, tests/test_gemm.py)
ACCUMULATE_LATENCY = 1 + 2 + 1 + 5 + 1 + 1 + 1 + 8 + 1 + 2


def dequant_rounds(lanes, blocksize=64):
    """Cycles the NF4 dequantizer spends building one block's level table (16 products on 16 / rounds
    multipliers), as ``NF4DequantConfig.table_multipliers`` sizes it."""
    return max(r for r in (1, 2, 4, 8, 16) if r <= max(1, blocksize // lanes))


def gemm_cycles(m, n, k, rows, cols, chunk, transposed=False, weights="bf16", out_dtype="bf16", blocksize=64,
                block=False, feed=None):
    """Cycles of one GEMM job on the engine; see :class:`CycleModel`.

    ``weights``: ``"bf16"`` (the ``w`` stream), ``"nf4"`` (the dequantizer) or ``"rows"`` (bf16 rows on the
    ``rows_in`` stream, as the LoRA step feeds its rank-r operands: no row aligner, so no shape beat to wait for).
    With NF4 weights, a pass of W also cannot be faster than the dequantizer's table builder: one table of
    ``dequant_rounds`` cycles per block, which shows when a short final block ends a pass.

    ``block``: a block job (``rtl/gemm/config.py: job_layout``): all A tiles load into one half before the first
    step, W comes in one pass and each W tile computes for every A tile (a held job's end, the last partial
    written, is counted like an output's).

    ``feed``: weights a cycle the W stream gives the engine, when fewer than ``cols`` (NF4 codes through a FIFO as
    wide as a 16-bit memory port: 4); each W tile then loads ``ceil(cols / feed)`` times as long.
    """
    min_steps = max(2 * rows - 1, 12)          # GemmConfig.min_steps
    flush_steps = 2 * rows + cols + 2           # PEArray.flush_steps
    words = -(-k // cols)
    a_tiles = -(-m // rows)
    if transposed:
        tile_rows = [min(chunk, n - n0) for n0 in range(0, n, chunk)]
        compute = [words * max(r, min_steps) for r in tile_rows]
        q_len = n
    else:
        tile_rows = [min(cols, n - p0) for p0 in range(0, n, cols)]
        chunk_steps = sum(max(min(chunk, k - q0), min_steps) for q0 in range(0, k, chunk))
        compute = [chunk_steps] * len(tile_rows)
        q_len = k
    loads = [r * words * (-(-cols // feed) if feed else 1) for r in tile_rows]
    pass_extra = 0
    if weights == "nf4":
        build = -(-(n * k) // blocksize) * dequant_rounds(cols, blocksize)
        pass_extra = max(0, build - sum(loads))

    source = START_LATENCY + ALIGNER_LATENCY
    if weights == "nf4":
        source += DEQUANT_LATENCY + dequant_rounds(cols, blocksize)   # (hides SHAPE_LATENCY)
    elif weights == "bf16":
        source += SHAPE_LATENCY
    a_ready, a_load_end, a_release = [], [], []
    w_load_end, compute_end = [], []
    steps = 0
    t_compute = 0
    tile_index = 0
    if block:
        block_ready = START_LATENCY + a_tiles * q_len + WRITE_LATENCY + FLAG_LATENCY
        for j, (load, work) in enumerate(zip(loads, compute)):
            w_load_end.append(max(w_load_end[-1] if w_load_end else source,
                                  compute_end[j - 2] if j >= 2 else 0) + load)
            t_compute = max(t_compute, w_load_end[-1] + WRITE_LATENCY + FLAG_LATENCY, block_ready) + a_tiles * work
            compute_end.append(t_compute)
            steps += a_tiles * work
        a_tiles = 0     # (no tile by tile loop below)
    for i in range(a_tiles):
        start = max(START_LATENCY, a_load_end[-1] if a_load_end else 0, a_release[i - 2] if i >= 2 else 0)
        a_load_end.append(start + q_len)
        a_ready.append(a_load_end[-1] + WRITE_LATENCY + FLAG_LATENCY)
        for j, (load, work) in enumerate(zip(loads, compute)):
            previous = w_load_end[-1] if w_load_end else source
            if j == 0 and i > 0:
                # the dequantizer starts a pass only after building the previous one's tables: its shortfall
                # delays the next pass's data, not the tiles already loaded
                previous += pass_extra
            free = compute_end[tile_index - 2] if tile_index >= 2 else 0
            w_load_end.append(max(previous, free) + load)
            begin = max(t_compute, w_load_end[-1] + WRITE_LATENCY + FLAG_LATENCY, a_ready[i])
            t_compute = begin + work
            compute_end.append(t_compute)
            steps += work
            tile_index += 1
        a_release.append(t_compute)
    cycles = t_compute + flush_steps + ISSUE_TO_ARRAY + ACCUMULATE_LATENCY - (1 if out_dtype == "fp32" else 0)
    macs = m * n * k
    return CycleModel(cycles, steps, macs, macs / (rows * cols * cycles))
