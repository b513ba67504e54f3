"""Run the NF4 quantizer (or its 2- and 3-bit and loaded-table siblings) and the absmax double quantizer in
Amaranth's simulator on whole tensors.

:func:`quantize_rtl` is the hardware counterpart of :func:`edge_qlora.golden.codebook.quantize` (for NF4,
:func:`edge_qlora.golden.nf4_quant.quantize`): it streams a weight through
:class:`~edge_qlora.rtl.nf4_quant.NF4Quantizer` (with a user's table, the table's decision bounds go with it on the
``table`` stream), takes the mean of the absmax values on the host (as the hardware's user does), and streams them
through :class:`~edge_qlora.rtl.absmax_quant.AbsmaxQuantizer`. Given a list, the drivers send the tensors back to
back through one simulation, as ``run_dequantizer`` does. The CLI's ``pysim`` backend and the tests use these
drivers; tests pass random :class:`~.streams.Stalls`, the CLI none (to measure throughput).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_qlora.golden import nf4_quant
from edge_qlora.constants import DYNAMIC_BLOCKSIZE
from edge_qlora.golden.codebook import Codebook, pack_codes
from edge_qlora.golden.nf4_quant import NF4Quantized, check_finite
from edge_qlora.rtl.absmax_quant import AbsmaxQuantizer
from edge_qlora.rtl.nf4_quant import NF4QuantConfig, NF4Quantizer
from .harness import pack_lanes, producer, resolve_backend, simulate, unpack_lanes
from .verilator import VerilatorModel, run_model
from .streams import NO_STALLS, get, put

__all__ = ["QuantRun", "AbsmaxRun", "run_quantizer", "run_absmax_quantizer", "quantize_rtl", "table_beat"]

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class QuantRun:
    """What a quantizer run gives back for one tensor.

    Attributes
    ----------
    packed : ndarray of uint8
        Codes packed by :func:`~edge_qlora.golden.codebook.pack_codes` (NF4: two per byte, exactly as bitsandbytes
        packs them); the pad codes are the hardware's, checked in every lane past the tensor's end.
    absmax : ndarray of float32
        One per block.
    cycles : int
        Clock cycles of the whole simulation, from the first input offered to the last output taken.
    """

    packed: np.ndarray
    absmax: np.ndarray
    cycles: int


@dataclass
class AbsmaxRun:
    """What an absmax quantizer run gives back for one tensor.

    Attributes
    ----------
    codes : ndarray of uint8
        One per absmax value.
    absmax2 : ndarray of float32
        One per group of 256 absmax values.
    cycles : int
        Clock cycles of the whole simulation.
    """

    codes: np.ndarray
    absmax2: np.ndarray
    cycles: int


def _weight_bits(weight):
    """Bit patterns of a flattened float tensor, as uint16 or uint32."""
    weight = weight.detach().contiguous().reshape(-1)
    if weight.dtype == torch.float32:
        return weight.view(torch.int32).numpy().view(np.uint32)
    return weight.view(torch.int16).numpy().view(np.uint16)


def _f32_bits(values):
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def _collector(stream, count, stalls, into, max_cycles):
    """A background testbench that takes ``count`` beats from ``stream`` into the list ``into``."""
    async def collect(ctx):
        into.extend(await get(ctx, stream, count, stalls, max_cycles=max_cycles))
    return collect


async def _await_all(ctx, beats, count, limit=10_000):
    # a side stream ends before the main one by construction; wait a little in case the design is late
    for _ in range(limit):
        if len(beats) >= count:
            return
        await ctx.tick()


def _check_beats(unit, stream, beats, ends, data_width):
    """Raise if ``beats`` are not exactly the expected number with ``last`` set on each tensor's final beat."""
    last_flags = [(beat >> data_width) & 1 for beat in beats]
    expected = [0] * ends[-1]
    for end in ends:
        expected[end - 1] = 1
    if last_flags != expected:
        raise RuntimeError(f"{unit} gave {len(beats)} of {ends[-1]} {stream} beats "
                           f"(last flags at {[i for i, f in enumerate(last_flags) if f]}, expected at "
                           f"{[end - 1 for end in ends]})")


def table_beat(bounds, pad_code, bits):
    """The ``table`` beat of a loaded-table quantizer (raw payload bits, :func:`~.rtl.nf4_quant.table_in_layout`):
    ``2**bits - 1`` float32 bounds and the pad code."""
    bounds = _f32_bits(np.asarray(bounds, np.float32).reshape(-1))
    if bounds.size != 2 ** bits - 1:
        raise ValueError(f"a {bits}-bit table has {2 ** bits - 1} bounds, not {bounds.size}")
    if not 0 <= pad_code < 2 ** bits:
        raise ValueError(f"pad code {pad_code} does not fit in {bits} bits")
    return pack_lanes(bounds, bounds.size, 32)[0] | int(pad_code) << (32 * bounds.size)


def _quantizer_pysim(config, sizes, beats, tables, total_beats, total_blocks, absmax_beats, stalls, max_cycles,
                     vcd_path, progress):
    dut = NF4Quantizer(config)

    async def feed(ctx):
        for n, tensor_beats in zip(sizes, beats):
            ctx.set(dut.n_weights, n)
            await put(ctx, dut.weights, tensor_beats, stalls.get("weights", NO_STALLS))

    async def consumer(ctx):
        codes = await get(ctx, dut.codes, total_beats, stalls.get("codes", NO_STALLS), max_cycles=max_cycles,
                          progress=progress)
        await _await_all(ctx, absmax_beats, total_blocks)
        return codes

    producers = [feed, _collector(dut.absmax, total_blocks, stalls.get("absmax", NO_STALLS), absmax_beats,
                                  max_cycles)]
    if tables is not None:
        producers.append(producer(dut.table, tables, stalls.get("table", NO_STALLS)))
    return simulate(dut, producers, consumer, vcd_path)


def _codebooks(config, codebook, count):
    """One :class:`Codebook` per tensor for ``config``: the NF table of its width, or the loaded tables given."""
    if config.table == "nf":
        nf = Codebook.nf(config.bits)
        if codebook is not None and any(c != nf for c in (codebook if isinstance(codebook, (list, tuple))
                                                           else [codebook])):
            raise ValueError(f"a core with table='nf' quantizes with the NF{config.bits} table only; "
                             "use table='loaded' for another code book")
        return [nf] * count
    if codebook is None:
        raise ValueError("a core with table='loaded' needs a codebook for every tensor")
    codebooks = list(codebook) if isinstance(codebook, (list, tuple)) else [codebook] * count
    if len(codebooks) != count:
        raise ValueError(f"{len(codebooks)} codebooks for {count} tensors")
    for book in codebooks:
        if not isinstance(book, Codebook):
            raise TypeError(f"codebook must be a Codebook, not {book!r}")
        if book.bits != config.bits:
            raise ValueError(f"a {book.bits}-bit codebook does not fit a core of {config.bits} bits")
    return codebooks


def run_quantizer(weight, config, *, codebook=None, stalls=None, vcd_path=None, progress=None, backend=None):
    """Quantize ``weight`` with :class:`~edge_qlora.rtl.nf4_quant.NF4Quantizer` in simulation.

    Parameters
    ----------
    weight : torch.Tensor, or a list of them
        Of the configured input dtype, any shape (flattened); refused if it holds NaN or Inf. A list streams the
        tensors back to back through one core, each with its own ``n_weights`` (and table).
    config : NF4QuantConfig
    codebook : Codebook, or a list of them (one per tensor), optional
        The tables of a ``table="loaded"`` core, sent as their decision bounds and pad codes; with
        ``table="nf"``, ``None`` (or the NF table of ``config.bits``).
    stalls : dict of str to Stalls, optional
        Random stalls per stream (``weights``, ``table``, ``codes``, ``absmax``).
    vcd_path : path, optional
        Write a VCD waveform there.
    progress : callable(done, total), optional
        Called as code beats arrive.
    backend : str, optional
        ``"pysim"`` or ``"verilator"`` (default: ``$EDGE_QLORA_SIM_BACKEND``, else ``"pysim"``).

    Returns
    -------
    QuantRun, or a list of them (one per tensor, all with the cycle count of the whole run)
    """
    weights = weight if isinstance(weight, (list, tuple)) else [weight]
    if not isinstance(config, NF4QuantConfig):
        raise TypeError(f"config must be an NF4QuantConfig, not {config!r}")
    fmt, lanes, blocksize, bits = config.in_format, config.lanes, config.blocksize, config.bits
    codebooks = _codebooks(config, codebook, len(weights))
    stalls = dict(stalls or {})
    sizes, beats, blocks = [], [], []
    for tensor in weights:
        if _DTYPES.get(tensor.dtype) != config.in_dtype:
            raise ValueError(f"weight dtype {tensor.dtype} does not match the core's in_dtype {config.in_dtype!r}")
        if tensor.numel() == 0:
            raise ValueError("weight is empty")
        check_finite(tensor.detach().reshape(-1).float().numpy())
        sizes.append(tensor.numel())
        beats.append(pack_lanes(_weight_bits(tensor), lanes, fmt.width))
        blocks.append(-(-tensor.numel() // blocksize))
    tables = None
    if config.table == "loaded":
        tables = [table_beat(book.bounds, book.pad_code, bits) for book in codebooks]
    absmax_beats = []
    total_beats, total_blocks = sum(map(len, beats)), sum(blocks)
    # generous: random stalls, and a tail block takes a cycle per weight
    max_cycles = 60 * total_beats + 4 * sum(sizes) + 2000
    if resolve_backend(backend) == "verilator":
        starts = np.cumsum([0] + [len(b) for b in beats[:-1]]).tolist()
        sources = {"weights": [beat for tensor_beats in beats for beat in tensor_beats]}
        if tables is not None:
            sources["table"] = tables
        outputs, cycles, _ = run_model(
            VerilatorModel(lambda: NF4Quantizer(config), f"NF4Quantizer {config!r}", trace=bool(vcd_path)),
            sources, {"codes": total_beats, "absmax": total_blocks},
            sides={"n_weights": [("weights", start, n) for start, n in zip(starts, sizes)]},
            stalls=stalls, max_cycles=max_cycles, vcd_path=vcd_path, progress=progress)
        code_beats, absmax_beats = outputs["codes"], outputs["absmax"]
    else:
        code_beats, cycles = _quantizer_pysim(config, sizes, beats, tables, total_beats, total_blocks,
                                              absmax_beats, stalls, max_cycles, vcd_path, progress)
    _check_beats("quantizer", "codes", code_beats, np.cumsum([len(b) for b in beats]).tolist(), bits * lanes)
    if len(absmax_beats) != total_blocks:
        raise RuntimeError(f"quantizer gave {len(absmax_beats)} of {total_blocks} absmax values")

    runs = []
    beat_start = block_start = 0
    for n, tensor_beats, tensor_blocks, book in zip(sizes, beats, blocks, codebooks):
        tensor_codes = code_beats[beat_start:beat_start + len(tensor_beats)]
        codes = unpack_lanes(tensor_codes, lanes, bits, len(tensor_beats) * lanes).astype(np.uint8)
        if np.any(codes[n:] != book.pad_code):
            raise RuntimeError(f"quantizer padded lanes with codes {codes[n:].tolist()}, not {book.pad_code}")
        # the hardware's pad lanes are the packed tail's pad codes; past the final beat software adds the same
        packed = pack_codes(codes[:n], bits, book.pad_code)
        absmax = np.array(absmax_beats[block_start:block_start + tensor_blocks], np.uint32).view(np.float32)
        runs.append(QuantRun(packed, absmax, cycles))
        beat_start += len(tensor_beats)
        block_start += tensor_blocks
    return runs if isinstance(weight, (list, tuple)) else runs[0]


def _absmax_pysim(values, offsets, total, total_groups, absmax2_beats, stalls, max_cycles, vcd_path):
    dut = AbsmaxQuantizer()

    async def feed(ctx):
        for tensor_values, offset in zip(values, offsets):
            ctx.set(dut.n_blocks, tensor_values.size)
            ctx.set(dut.offset, offset)
            await put(ctx, dut.absmax, [int(v) for v in tensor_values], stalls.get("absmax", NO_STALLS))

    async def consumer(ctx):
        codes = await get(ctx, dut.codes, total, stalls.get("codes", NO_STALLS), max_cycles=max_cycles)
        await _await_all(ctx, absmax2_beats, total_groups)
        return codes

    producers = [feed, _collector(dut.absmax2, total_groups, stalls.get("absmax2", NO_STALLS), absmax2_beats,
                                  max_cycles)]
    return simulate(dut, producers, consumer, vcd_path)


def run_absmax_quantizer(absmax, offset, *, stalls=None, vcd_path=None, backend=None):
    """Double-quantize float32 ``absmax`` around ``offset`` with
    :class:`~edge_qlora.rtl.absmax_quant.AbsmaxQuantizer` in simulation.

    Parameters
    ----------
    absmax : ndarray of float32, or a list of them
        A list streams the vectors back to back through one core, each with its own ``n_blocks`` and offset.
    offset : float32, or a list of them (one per vector)
    stalls : dict of str to Stalls, optional
        Random stalls per stream (``absmax``, ``codes``, ``absmax2``).
    vcd_path : path, optional
        Write a VCD waveform there.
    backend : str, optional
        ``"pysim"`` or ``"verilator"`` (default: ``$EDGE_QLORA_SIM_BACKEND``, else ``"pysim"``).

    Returns
    -------
    AbsmaxRun, or a list of them (one per vector, all with the cycle count of the whole run)
    """
    several = isinstance(absmax, (list, tuple))
    tensors = list(zip(absmax, offset)) if several else [(absmax, offset)]
    stalls = dict(stalls or {})
    values = [_f32_bits(np.asarray(absmax, np.float32).reshape(-1)) for absmax, _ in tensors]
    offsets = [int(_f32_bits(np.float32(offset).reshape(1))[0]) for _, offset in tensors]
    if any(v.size == 0 for v in values):
        raise ValueError("absmax is empty")
    groups = [-(-v.size // DYNAMIC_BLOCKSIZE) for v in values]
    absmax2_beats = []
    total, total_groups = sum(v.size for v in values), sum(groups)
    max_cycles = 40 * total + 2000
    if resolve_backend(backend) == "verilator":
        starts = np.cumsum([0] + [v.size for v in values[:-1]]).tolist()
        outputs, cycles, _ = run_model(
            VerilatorModel(AbsmaxQuantizer, "AbsmaxQuantizer", trace=bool(vcd_path)),
            {"absmax": [int(v) for tensor_values in values for v in tensor_values]},
            {"codes": total, "absmax2": total_groups},
            sides={"n_blocks": [("absmax", start, v.size) for start, v in zip(starts, values)],
                   "offset": [("absmax", start, offset) for start, offset in zip(starts, offsets)]},
            stalls=stalls, max_cycles=max_cycles, vcd_path=vcd_path)
        code_beats, absmax2_beats = outputs["codes"], outputs["absmax2"]
    else:
        code_beats, cycles = _absmax_pysim(values, offsets, total, total_groups, absmax2_beats, stalls,
                                           max_cycles, vcd_path)
    _check_beats("absmax quantizer", "codes", code_beats, np.cumsum([v.size for v in values]).tolist(), 8)
    if len(absmax2_beats) != total_groups:
        raise RuntimeError(f"absmax quantizer gave {len(absmax2_beats)} of {total_groups} absmax2 values")

    runs = []
    start = group_start = 0
    for tensor_values, tensor_groups in zip(values, groups):
        codes = np.array([beat & 0xFF for beat in code_beats[start:start + tensor_values.size]], np.uint8)
        absmax2 = np.array(absmax2_beats[group_start:group_start + tensor_groups], np.uint32).view(np.float32)
        runs.append(AbsmaxRun(codes, absmax2, cycles))
        start += tensor_values.size
        group_start += tensor_groups
    return runs if several else runs[0]


def quantize_rtl(weight, blocksize=64, double_quant=True, lanes=8, stalls=None, vcd_path=None, progress=None,
                 backend=None, bits=4, codebook=None, table=None):
    """Quantize ``weight`` with the RTL cores in simulation, as :func:`~edge_qlora.golden.codebook.quantize` (for
    NF4, :func:`~edge_qlora.golden.nf4_quant.quantize`) does in software.

    Parameters
    ----------
    weight : torch.Tensor (fp32, fp16 or bf16)
        Refused if it holds NaN or Inf.
    blocksize : int
    double_quant : bool
        Quantize the absmax values again; the offset (their mean) is computed on the host.
    lanes : int
        Weights per cycle of the quantizer.
    stalls : dict of str to Stalls, optional
        Random stalls per stream name, given to both cores (``weights``, ``table``, ``codes``, ``absmax``,
        ``absmax2``).
    vcd_path : path, optional
        VCD of the quantizer; the absmax quantizer's goes beside it, with ``_absmax`` added to the stem.
    progress : callable(done, total), optional
        Called as the quantizer's code beats arrive.
    backend : str, optional
        ``"pysim"`` or ``"verilator"`` (default: ``$EDGE_QLORA_SIM_BACKEND``, else ``"pysim"``).
    bits : int
        2, 3 or 4; ignored when ``codebook`` is given (its size sets the width).
    codebook : Codebook, optional
        Defaults to the NormalFloat table of ``bits``.
    table : str, optional
        The core's table: ``"nf"`` (constants) or ``"loaded"`` (bounds sent with the tensor); by default ``"nf"``
        for a NormalFloat code book and ``"loaded"`` for any other.

    Returns
    -------
    quantized : NF4Quantized
        The record :func:`~edge_qlora.golden.codebook.quantize` returns, field for field (``bits``; ``codebook``
        ``None`` for a NormalFloat table, else the code book).
    cycles : dict of str to int
        Cycles of each core: ``quantizer`` and, with double quantization, ``absmax_quantizer``.
    """
    if codebook is None:
        codebook = Codebook.nf(bits)
    if not isinstance(codebook, Codebook):
        raise TypeError(f"codebook must be a Codebook, not {codebook!r}")
    nf = codebook.name != "custom"
    table = table or ("nf" if nf else "loaded")
    if table == "nf" and not nf:
        raise ValueError("table='nf' quantizes with a NormalFloat table only; a custom code book needs 'loaded'")
    if not isinstance(weight, torch.Tensor):
        weight = torch.from_numpy(np.asarray(weight, dtype=np.float32))
    dtype = _DTYPES.get(weight.dtype)
    if dtype is None:
        raise ValueError(f"weight dtype must be float32, float16 or bfloat16, not {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    check_finite(weight.detach().reshape(-1).float().numpy())
    shape = tuple(weight.shape)
    config = NF4QuantConfig(lanes=lanes, blocksize=blocksize, in_dtype=dtype, bits=codebook.bits, table=table)
    run = run_quantizer(weight, config, codebook=codebook if table == "loaded" else None, stalls=stalls,
                        vcd_path=vcd_path, progress=progress, backend=backend)
    cycles = {"quantizer": run.cycles}
    extra = {"bits": codebook.bits, "codebook": None if nf else codebook}
    if not double_quant:
        return NF4Quantized(run.packed, run.absmax, shape, dtype, blocksize, **extra), cycles
    offset = nf4_quant.mean(run.absmax)
    absmax_vcd = None if vcd_path is None else Path(vcd_path).with_stem(Path(vcd_path).stem + "_absmax")
    second = run_absmax_quantizer(run.absmax, offset, stalls=stalls, vcd_path=absmax_vcd, backend=backend)
    cycles["absmax_quantizer"] = second.cycles
    return NF4Quantized(run.packed, second.codes, shape, dtype, blocksize, offset, second.absmax2, **extra), cycles
