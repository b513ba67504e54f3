"""Run the NF4 IP cores in Amaranth's simulator on whole tensors.

These drivers turn a quantized tensor (:class:`~edge_qlora.golden.nf4_quant.NF4Quantized`) into the cores' input
streams, run the simulation, and turn the output streams back into arrays. The CLI's ``pysim`` backend and the
tests use them; tests pass random :class:`~.streams.Stalls`, the CLI none (to measure throughput).
"""

from dataclasses import dataclass

import numpy as np

from edge_qlora.golden.codebook import unpack_codes
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer, tensor_layout
from edge_qlora.rtl.nf4_span import SpanScales, span_layout
from .harness import pack_lanes, run_streams, unpack_lanes

__all__ = ["RunResult", "run_dequantizer", "dequantizer_streams", "run_span_scales", "span_descriptor"]


@dataclass
class RunResult:
    """What a simulation run gives back.

    Attributes
    ----------
    values : ndarray
        Output bit patterns (uint16 or uint32) or codes, trimmed to the tensor.
    cycles : int
        Clock cycles from the first input offered to the last output accepted.
    beats : int
        Output beats.
    """

    values: np.ndarray
    cycles: int
    beats: int


def dequantizer_streams(q, lanes, loaded_table=False):
    """The dequantizer's input streams for one tensor ``q`` (an :class:`~edge_qlora.golden.nf4_quant.NF4Quantized`,
    a :func:`~edge_qlora.golden.nf4_span.span` included): ``{port name: beats}``, ``lanes`` codes a beat; with
    ``loaded_table`` the header carries the table's levels."""
    n = int(np.prod(q.shape))
    levels = np.asarray(q.levels, np.float32).view(np.uint32).tolist() if loaded_table else None
    header = {"n_weights": n, **({"levels": levels} if loaded_table else {})}
    streams = {"codes": pack_lanes(unpack_codes(q.packed, n, q.bits), lanes, q.bits)}
    if q.double_quant:
        header.update(offset=int(np.float32(q.offset).view(np.uint32)), absmax2_per_block=int(q.absmax2_per_block))
        streams["absmax"] = [int(v) for v in np.asarray(q.absmax, np.uint8)]
        streams["absmax2"] = [int(v) for v in np.asarray(q.absmax2, np.float32).view(np.uint32)]
    else:
        streams["absmax"] = [int(v) for v in np.asarray(q.absmax, np.float32).view(np.uint32)]
    layout = tensor_layout(q.double_quant, len(levels) if loaded_table else None)
    streams["tensor"] = [layout.const(header).as_bits()]
    return streams


def run_dequantizer(quantized, config=None, *, stalls=None, vcd_path=None, progress=None, backend=None):
    """Dequantize ``quantized`` with :class:`~edge_qlora.rtl.nf4_dequant.NF4Dequantizer` in simulation.

    Parameters
    ----------
    quantized : NF4Quantized, or a list of them
        Any code width and table (:mod:`~edge_qlora.golden.codebook`). A list streams the tensors back to back
        through one core (same blocksize, double quantization and code width; with a loaded table, each tensor
        brings its own).
    config : NF4DequantConfig, optional
        Defaults to 8 lanes and the tensor's blocksize, double quantization and code width, bf16 output, and a
        loaded table when the tensor's is not the NormalFloat table of its width.
    stalls : dict of str to Stalls, optional
        Random stalls per stream (``tensor``, ``codes``, ``absmax``, ``absmax2``, ``weights``).
    vcd_path : path, optional
        Write a VCD waveform there.
    progress : callable(done, total), optional
        Called as output beats arrive.
    backend : str, optional
        ``"pysim"`` (Amaranth's simulator) or ``"verilator"`` (:mod:`~.verilator`) (default:
        ``$EDGE_QLORA_SIM_BACKEND``, else ``"pysim"``).

    Returns
    -------
    RunResult
        ``values`` holds the output bit patterns (uint16 for bf16/fp16, uint32 for fp32); a list of arrays, one per
        tensor, when ``quantized`` is a list.
    """
    tensors = quantized if isinstance(quantized, (list, tuple)) else [quantized]
    first = tensors[0]
    if config is None:
        config = NF4DequantConfig(blocksize=first.blocksize, double_quant=first.double_quant, bits=first.bits,
                                  table="nf" if first.codebook is None else "loaded")
    for q in tensors:
        if config.blocksize != q.blocksize or config.double_quant != q.double_quant or config.bits != q.bits:
            raise ValueError("the core's blocksize, double quantization and code width must match every tensor's")
        if config.table == "nf" and q.codebook is not None and not q.codebook.name.startswith("nf"):
            raise ValueError(f"a {q.codebook.name} table needs a core with table='loaded'")
    stalls = dict(stalls or {})
    lanes, fmt = config.lanes, config.out_format

    inputs, sizes = {}, []
    for q in tensors:
        sizes.append(int(np.prod(q.shape)))
        for name, beats in dequantizer_streams(q, lanes, config.table == "loaded").items():
            inputs.setdefault(name, []).extend(beats)
    codes = inputs["codes"]
    max_cycles = 40 * len(codes) + 1000
    beats, cycles = run_streams(lambda: NF4Dequantizer(config), f"NF4Dequantizer {config!r}", inputs, "weights",
                                len(codes), stalls=stalls, max_cycles=max_cycles, vcd_path=vcd_path,
                                progress=progress, backend=backend)
    data_width = fmt.width * lanes
    last_flags = [(beat >> data_width) & 1 for beat in beats]
    expected_last = []
    for n in sizes:
        expected_last += [0] * (-(-n // lanes) - 1) + [1]
    if len(beats) != len(codes) or last_flags != expected_last:
        raise RuntimeError(f"dequantizer produced {len(beats)} of {len(codes)} beats "
                           f"(last flags at {[i for i, f in enumerate(last_flags) if f]})")
    values, start = [], 0
    for n in sizes:
        count = -(-n // lanes)
        values.append(unpack_lanes(beats[start:start + count], lanes, fmt.width, n).astype(fmt.dtype))
        start += count
    return RunResult(values if isinstance(quantized, (list, tuple)) else values[0], cycles, len(beats))


def span_descriptor(where, groups=None):
    """The ``span`` beat of :class:`~edge_qlora.rtl.nf4_span.SpanScales` for the blocks ``where`` (a
    :class:`~edge_qlora.golden.nf4_span.SpanBlocks`); ``groups``: the length of a new table to load first."""
    return span_layout().const({"first": where.first, "rows": where.rows, "blocks": where.blocks,
                                "stride": where.stride, "groups": groups or 0,
                                "new_table": int(groups is not None)}).as_bits()


def run_span_scales(spans, max_groups=1024, *, stalls=None, vcd_path=None, backend=None):
    """Run :class:`~edge_qlora.rtl.nf4_span.SpanScales` on ``spans``: ``(where, table)`` pairs, ``where`` a
    :class:`~edge_qlora.golden.nf4_span.SpanBlocks`, ``table`` the weight's float32 ``absmax2`` to load before the
    span, or None to keep the one loaded (the first span brings one).

    Returns a :class:`RunResult` whose ``values`` are a float32 array per span: each block's ``absmax2``.
    """
    stalls = dict(stalls or {})
    descriptors, table_beats, counts, length = [], [], [], None
    for where, table in spans:
        if table is not None:
            table = np.asarray(table, np.float32).reshape(-1)
            if not 1 <= table.size <= max_groups:
                raise ValueError(f"a table of {table.size} absmax2 entries; the unit holds 1 to {max_groups}")
            length = table.size
            table_beats += table.view(np.uint32).tolist()
        if length is None:
            raise ValueError("the first span must bring the weight's absmax2 table")
        last_group = int(where.groups()[-1]) if where.rows and where.blocks else -1
        if where.rows < 1 or where.blocks < 1 or last_group >= length:
            raise ValueError(f"span {where} needs groups up to {last_group}; the table has {length}")
        descriptors.append(span_descriptor(where, length if table is not None else None))
        counts.append(where.rows * where.blocks)
    inputs = {"span": descriptors, "table": table_beats}
    total = sum(counts)
    max_cycles = 20 * (total + len(table_beats)) + 1000
    beats, cycles = run_streams(lambda: SpanScales(max_groups), f"SpanScales {max_groups}", inputs, "absmax2", total,
                                stalls=stalls, max_cycles=max_cycles, vcd_path=vcd_path, backend=backend)
    if len(beats) != total:
        raise RuntimeError(f"span scales gave {len(beats)} of {total} absmax2 beats")
    values, start = [], 0
    for count in counts:
        values.append(np.array(beats[start:start + count], np.uint32).view(np.float32))
        start += count
    return RunResult(values, cycles, total)

