"""Run the NF4 IP cores in Amaranth's simulator on whole tensors.

These drivers turn a quantized tensor (:class:`~edge_qlora.golden.nf4_quant.NF4Quantized`) into the cores' input
streams, run the simulation, and turn the output streams back into arrays. The CLI's ``pysim`` backend and the
tests use them; tests pass random :class:`~.streams.Stalls`, the CLI none (to measure throughput).
"""

from dataclasses import dataclass

import numpy as np

from edge_qlora.golden.codebook import unpack_codes
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer
from .harness import resolve_backend, pack_lanes, producer, simulate, unpack_lanes
from .verilator import VerilatorModel, run_model
from .streams import NO_STALLS, get

__all__ = ["RunResult", "run_dequantizer"]


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

    headers, codes, absmax, absmax2, sizes = [], [], [], [], []
    for q in tensors:
        n = int(np.prod(q.shape))
        sizes.append(n)
        codes += pack_lanes(unpack_codes(q.packed, n, q.bits), lanes, q.bits)
        header = n
        if config.table == "loaded":
            table = sum(int(v) << (32 * i) for i, v in enumerate(np.asarray(q.levels, np.float32).view(np.uint32)))
            header |= table << (64 if q.double_quant else 32)
        if q.double_quant:
            headers.append(header | (int(np.float32(q.offset).view(np.uint32)) << 32))
            absmax += [int(v) for v in np.asarray(q.absmax, np.uint8)]
            absmax2 += [int(v) for v in np.asarray(q.absmax2, np.float32).view(np.uint32)]
        else:
            headers.append(header)
            absmax += [int(v) for v in np.asarray(q.absmax, np.float32).view(np.uint32)]

    inputs = {"tensor": headers, "codes": codes, "absmax": absmax}
    if config.double_quant:
        inputs["absmax2"] = absmax2
    max_cycles = 40 * len(codes) + 1000
    if resolve_backend(backend) == "verilator":
        model = VerilatorModel(lambda: NF4Dequantizer(config), f"NF4Dequantizer {config!r}", trace=bool(vcd_path))
        outputs, cycles, _ = run_model(model, inputs, {"weights": len(codes)}, stalls=stalls,
                                       max_cycles=max_cycles, vcd_path=vcd_path, progress=progress)
        beats = outputs["weights"]
    else:
        dut = NF4Dequantizer(config)
        producers = [producer(getattr(dut, name), beats, stalls.get(name, NO_STALLS))
                     for name, beats in inputs.items()]

        async def consumer(ctx):
            return await get(ctx, dut.weights, len(codes), stalls.get("weights", NO_STALLS),
                             max_cycles=max_cycles, progress=progress)

        beats, cycles = simulate(dut, producers, consumer, vcd_path)
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
