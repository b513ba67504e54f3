"""Run the blocked forward product (``rtl/blocked.py``) against the DRAM timing model, in Amaranth's simulator or
on Verilator, on a :class:`~edge_qlora.golden.lora.LoraCase` placed in memory by ``golden/memmap.py`` (the product
reads its x and W and writes its y; the rest of the image is untouched).

As for the memory-fed step (``sim/memstep.py``), a :class:`~edge_qlora.rtl.dram_port.DramPort` stands behind the
port: the read words come from the image in the order of ``golden/blockprogram.py``'s ``forward_product`` (the
product issues its requests in exactly that order, so a word out of order would corrupt y), the written words go
back into the image, and y is read from it.
"""

from dataclasses import dataclass

import numpy as np
import torch

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.memmap import layout, layout_for, pack_case, read_region, store_region, unpack_outputs
from edge_qlora.golden.rank_gradient import x_chunk_fields
from edge_qlora.golden.rank_term import backward_rows, column_exponent, forward_rows
from edge_qlora.rtl.blocked import (SPAN, BlockedConfig, BlockedProduct, absmax2_groups, descriptor_layout,
                                    report_layout)
from edge_qlora.rtl.memport import port_for

from .blocked_schedule import job_cycles, program
from .memstep import DramBench, _fields, _timing, run_dram_bench
from .span_model import backward_cycles, forward_cycles

__all__ = ["BlockedBench", "BlockedRun", "blocked_config", "golden_rows", "product_descriptor", "run_blocked_product",
           "engine_cycles", "model_cycles"]

#: The program's tensor of each read destination.
_TENSOR = {"absmax2": "nf4_absmax2", "absmax": "nf4_absmax", "x": "x", "codes": "nf4_codes",
           "exponents": "w_row_exponents", "rank_operands": "lora_A", "rank_columns": "lora_B",
           "rank_rows": "hb", "x_fields": "x_fields"}


def _tensor(name, transposed, gradient=False):
    """The tensors a read destination's counter covers, joined by ``+`` (the backward product with the gradient
    reads dy and, in grad_A's pass, x through one destination; hb and gb through another)."""
    backward = {"x": "dy+x" if gradient else "dy", "rank_operands": "lora_B", "rank_columns": "lora_A",
                "rank_rows": "hb+gb"}
    return backward[name] if transposed and name in backward else _TENSOR[name]


class BlockedBench(DramBench):
    """The blocked product and the DRAM model behind its port (simulation only)."""

    def __init__(self, config, timing):
        self.config = config
        super().__init__(BlockedProduct(config), config.port, timing)


@dataclass
class BlockedRun:
    """A blocked product against memory: ``y``, its output read back from memory (bf16: y, or dx when
    transposed), ``grad_B``, ``grad_A`` (float32) and ``gb`` (bf16), read back from a backward product with the
    gradient (else ``None``), ``hb`` (bf16, read back, from a forward product with the gradient; else ``None``)
    and ``x_fields`` (uint8, x's chunk fields, read back from the same), the report's counters (bytes are port
    words times the word; per read destination, named by the tensors it reads, ``dy+x`` for one that reads both),
    the program's requests' bytes (whole words) and their count."""

    y: object
    cycles: int
    stall_cycles: dict
    read_bytes: dict
    written_bytes: int
    program_read_bytes: dict
    program_written_bytes: int
    requests: int
    grad_B: object = None
    hb: object = None
    x_fields: object = None
    grad_A: object = None
    gb: object = None


def blocked_config(case, tokens, features, memory="ulx3s-sdram", rows=2, cols=2, transposed=False, rank_term=False,
                   gradient=False):
    """The smallest :class:`BlockedConfig` for ``case``'s forward product (``transposed``: the backward product
    ``dx = dy W`` too; ``rank_term``: the products with their rank-r terms, the step's y and dx; ``gradient``: the
    backward product's grad_B too) in blocks of ``tokens x features`` on a ``rows x cols`` engine behind
    ``memory``'s port; the backward product with the gradient also makes grad_A in a pass over x beside it)."""
    t, d_in = case.x.shape
    d_out = case.dy.shape[1]
    extra = {"transposed": True, "max_out": -(-d_out // SPAN) * SPAN} if transposed else {}
    return BlockedConfig(rows=rows, cols=cols, port=port_for(_timing(memory)), max_tokens=min(tokens, t),
                         max_features=min(features, d_in if transposed else d_out), max_in=d_in,
                         max_groups=absmax2_groups(d_in, d_out), rank=case.lora_A.shape[0] if rank_term else 0,
                         gradient=gradient, **extra)


def engine_cycles(config, t, d_in, d_out, tokens, features, transposed=False):
    """The engine's cycle model for the product's block jobs (``gemm_cycles(..., block=True)`` per job), streams
    that never stall: the compute the memory has to keep up with."""
    reduction, outputs = (d_out, d_in) if transposed else (d_in, d_out)
    total = 0
    for t0 in range(0, t, tokens):
        nt = min(tokens, t - t0)
        for f0 in range(0, outputs, features):
            total += (reduction // SPAN) * job_cycles(config, nt, min(features, outputs - f0), transposed)
    return total


def golden_rows(case, memmap):
    """The rows the products write for each other, as the step makes them: hb and x's chunk fields (the forward
    product's, zero-padded to the slot) and gb (the backward product's), by region name."""
    fields = x_chunk_fields(case.x)
    return {"hb": forward_rows(case), "x_fields": np.array(fields + [0] * (memmap["x_fields"].size - len(fields)),
                                                           np.uint8), "gb": backward_rows(case)}


def product_descriptor(case, memmap, tokens, features, transposed, rank_term, gradient, x_per_span):
    """The fields of :func:`~edge_qlora.rtl.blocked.descriptor_layout` for one product of ``case`` placed by
    ``memmap``: its tensors' addresses, its shape and blocks, the double quantization's groups and offset; with
    ``rank_term`` A's and B's addresses, the scaling and (backward) A's shared exponent; with ``gradient`` the
    addresses of hb, grad_B, x's fields, x, gb and grad_A and ``x_per_span``."""
    t, d_in = case.x.shape
    d_out = case.dy.shape[1]
    activation, output = ("dy", "dx") if transposed else ("x", "y")
    q = case.weight
    term = {"rank_operands": memmap["lora_B" if transposed else "lora_A"].address,
            "rank_columns": memmap["lora_A" if transposed else "lora_B"].address,
            "scaling": int(np.float32(case.scaling).view(np.uint32)),
            "rank_exponent": column_exponent(case.lora_A.to(torch.bfloat16)) if transposed else 0} if rank_term else {}
    if gradient:
        term.update({"rank_rows": memmap["hb"].address, "gradient": memmap["grad_B"].address,
                     "x_fields": memmap["x_fields"].address, "pass_x": memmap["x"].address,
                     "gb": memmap["gb"].address, "gradient_a": memmap["grad_A"].address,
                     "x_per_span": x_per_span or 0})
    return {
        "x": memmap[activation].address, "codes": memmap["nf4_codes"].address,
        "absmax": memmap["nf4_absmax"].address, "absmax2": memmap["nf4_absmax2"].address,
        "y": memmap.output_region(output).address,
        "exponents": memmap["w_row_exponents"].address if transposed else 0,
        "dims": {"t": t, "d_in": d_in, "d_out": d_out, "tokens": tokens, "features": features,
                 "transposed": int(transposed)},
        "groups": len(q.absmax2), "offset": int(np.float32(q.offset).view(np.uint32)), **term,
    }


def run_blocked_product(case, tokens, features, config=None, *, memory="ulx3s-sdram", transposed=False, rank_term=False,
                        x_per_span=None, stalls=None, backend=None, vcd_path=None, max_cycles=None, progress=None):
    """``y = x W^T`` of ``case`` (``transposed``: ``dx = dy W``; ``rank_term``: the step's ``y = bf16(x W^T + s hb
    B^T)`` or ``dx = bf16(dy W + s gb A)``, as a ``config`` with ``rank`` computes them; with ``config.gradient``
    the backward product's grad_B, gb and grad_A, the forward's hb and x's fields too) on :class:`BlockedProduct`
    against the DRAM model of ``memory``, in blocks of ``tokens x features`` (``x_per_span``: grad_A's x spans
    after each backward span from the third column block on, default ``golden.blockprogram.x_pass_per_span``);
    returns a :class:`BlockedRun`.
    ValueError (one line) for a shape the configuration does not take."""
    timing = _timing(memory)
    config = config or blocked_config(case, tokens, features, memory, transposed=transposed, rank_term=rank_term)
    if bool(config.rank) != bool(rank_term) or config.rank and config.rank != case.lora_A.shape[0]:
        raise ValueError(f"the configuration's rank ({config.rank}) must be the case's ({case.lora_A.shape[0]}) "
                         f"with rank_term, 0 without")
    t, d_in = case.x.shape
    d_out = case.dy.shape[1]
    config.check_shape(t, d_in, d_out, tokens, features, transposed)
    if not case.weight.double_quant or case.weight.blocksize != SPAN:
        raise ValueError(f"the blocked product takes NF4 with double quantization in blocks of {SPAN}")
    port = mp.PortShape.of(config.port)
    gradient = config.gradient and transposed
    memmap = layout_for(case, align=64, row_exponent_chunk=config.gemm.chunk_steps if transposed else None,
                        gradients_out=config.gradient, rank_rows=config.gradient)
    if memmap.end > config.port.capacity:
        raise ValueError(f"the case's tensors take {memmap.end:,} bytes: more than the {memory} port reaches")
    image = pack_case(case, memmap)
    if gradient:
        # the forward product's hb and x's chunk fields, which that product writes; and gb, which this one writes
        # before it reads it back (the model serves the reads from the image as it was at the start)
        for name, values in golden_rows(case, memmap).items():
            store_region(image, memmap, name, values)
    if gradient and x_per_span is None:
        x_per_span = bp.x_pass_per_span(d_in, d_out, features)
    reqs = bp.requests(port, program(config, memmap, tokens, features, transposed, x_per_span))
    activation, output = ("dy", "dx") if transposed else ("x", "y")
    reads = [r for r in reqs if r.op == "read"]
    writes = [r for r in reqs if r.op == "write"]
    fill = mp.fill_words(port, image, memmap.base, reads)
    descriptor = descriptor_layout(config).const(product_descriptor(case, memmap, tokens, features, transposed,
                                                                    rank_term, config.gradient, x_per_span)).as_bits()
    wanted = {"written": sum(w.length for w in writes), "report": 1}
    if max_cycles is None:
        max_cycles = 4 * engine_cycles(config, t, d_in, d_out, tokens, features, transposed) + 30 * (len(fill) +
                                                                                       wanted["written"]) + 20_000
    inputs = {"descriptor": [descriptor], "fill": fill}
    beats, _ = run_dram_bench(lambda: BlockedBench(config, timing), f"BlockedBench {config!r} {timing!r}", inputs,
                              wanted, image=image, port_config=config.port, base=memmap.base, stalls=stalls,
                              max_cycles=max_cycles, backend=backend, vcd_path=vcd_path, progress=progress,
                              what="the blocked product")
    report = _fields(beats["report"][0], report_layout(config.reads))
    wb = port.word_bytes
    program_reads = mp.bytes_by_tensor(port, reads)
    outputs = unpack_outputs(image, memmap)
    names = {name: _tensor(name, transposed, gradient) for name in config.reads}
    return BlockedRun(
        y=outputs[output], grad_B=outputs["grad_B"] if gradient else None,
        grad_A=outputs["grad_A"] if gradient else None, gb=read_region(image, memmap, "gb") if gradient else None,
        hb=read_region(image, memmap, "hb") if config.gradient and not transposed else None,
        x_fields=read_region(image, memmap, "x_fields") if config.gradient and not transposed else None,
        cycles=report["cycles"],
        stall_cycles={"memory": report["memory"], "compute": report["compute"]},
        read_bytes={names[name]: report[f"read_{name}"] * wb for name in config.reads},
        written_bytes=report["written"] * wb,
        program_read_bytes={names[name]: sum(program_reads.get(tensor, 0) for tensor in names[name].split("+"))
                            for name in config.reads},
        program_written_bytes=sum(w.length for w in writes) * wb, requests=len(reqs))



def model_cycles(config, memory, t, d_in, d_out, tokens, features, rank=16, transposed=False, x_per_span=None):
    """The blocked product's cycle model with memory: per block of ``tokens x features``, its loads before the
    first job (absmax2 and, transposed, the chunk exponent table at a token block's start; forward the block's
    absmax codes; the first span's activation rows and, transposed, absmax codes: the DRAM model's time for their
    requests alone, the buffers being single, so they wait for the block before), the engine's block jobs
    (``gemm_cycles(..., block=True)``; the later spans' loads overlap the job before), and in the block's last job
    the output writes beside the engine: forward from the job's start, the longer of the two, then the writes of
    the last W tile's outputs; transposed from the first token tile of its last W tile (every output's last chunk
    is there, and the corner turn writes a token tile's rows once it has them all), the longer of the job and
    that. ``rank``: the memory map's (tensor addresses). With the rank-r term (``config.rank``) a token block's
    first span also waits for its piece of A (transposed B), from which hb (gb) is made as the activation passes,
    and for its alignment in place (``64 r`` cycles);
    the term's other reads are taken as hidden behind the jobs; forward its arithmetic keeps pace with the
    engine's outputs; transposed, where a block's outputs come together, it passes them one a cycle ahead of the
    writes.

    With the gradient (``config.gradient``: the step top's products, hb and grad_B, gb and grad_A's pass over x)
    :mod:`~edge_qlora.sim.span_model`'s model instead, which follows the product span by span: with few token rows
    its reads, the rank-r unit and the writes set the pace, not the jobs. ``x_per_span``: as
    :func:`run_blocked_product`'s."""
    if config.gradient:
        if transposed:
            return backward_cycles(config, memory, t, d_in, d_out, tokens, features, rank, x_per_span)
        return forward_cycles(config, memory, t, d_in, d_out, tokens, features, rank)
    timing = _timing(memory)
    port = mp.PortShape.of(config.port)
    g = config.gemm
    memmap = layout(d_in, d_out, t, rank, row_exponent_chunk=g.chunk_steps if transposed else None)
    reqs = bp.requests(port, program(config, memmap, tokens, features, transposed, x_per_span))
    activation = "dy" if transposed else "x"

    def alone(group):
        """The DRAM model's time for ``group``'s requests alone, in order."""
        return bp.dram_time(timing, port, group).cycles if group else 0

    reduction, outputs = (d_out, d_in) if transposed else (d_in, d_out)
    spans = reduction // SPAN
    total, i = 0, 0
    for t0 in range(0, t, tokens):
        nt = min(tokens, t - t0)
        for f0 in range(0, outputs, features):
            nf = min(features, outputs - f0)
            load = []
            for names in (("nf4_absmax2", "nf4_absmax", "w_row_exponents"), ("lora_B" if transposed else "lora_A",),
                          (activation,),
                          ("nf4_absmax",) if transposed else ()):
                while reqs[i].tensor in names:
                    load.append(reqs[i])
                    i += 1
            while reqs[i].op == "read":
                i += 1
            writes = []
            while i < len(reqs) and reqs[i].op == "write":
                writes.append(reqs[i])
                i += 1
            job = job_cycles(config, nt, nf, transposed)
            written = alone(writes)
            if transposed:
                # the writes start with the last W tile's first token tile of outputs; with the rank-r term, which
                # passes the outputs one a cycle, after it has passed that tile, and the last token tile's writes
                # after it has passed them all
                last_tile = job * g.chunk_steps // SPAN
                tiles = nt // g.rows
                if config.rank:
                    end = max(g.rows * nf + written, nt * nf + written // tiles)
                else:
                    end = last_tile // tiles + written
                final = max(job, job - last_tile + end)
            else:
                final = max(job, written) + written // (nf // g.cols)
            # transposed, a block's first span loads while the block before computes its last job (the x buffer
            # and the absmax table are free by then), but for a token block's first, which waits for the tables
            hidden = transposed and f0 > 0
            # with the term, a token block's first span also waits while the piece of A (B) is aligned in place
            aligning = SPAN * config.rank if config.rank and f0 == 0 else 0
            total += (0 if hidden else alone(load) + aligning) + (spans - 1) * job + final
    return total
