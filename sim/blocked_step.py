"""Run a whole step of one projection on :class:`~edge_qlora.rtl.blocked_step.BlockedStep` against the DRAM timing
model, in Amaranth's simulator or on Verilator: the forward product, the backward product, the update of A and the
update of B, four descriptors one after another on one design and one memory image.

The memory model returns the read words in the order of the four programs (``golden/blockprogram.py``), taken from
the image as the step would leave it for each read: a unit that reads what an earlier one wrote (the backward
product hb, x's fields and gb; the updates grad_A and grad_B) gets the golden values, while the image the step
writes into starts with those slots empty, so every value checked at the end was written by the design.
"""

import dataclasses
from dataclasses import dataclass

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import memprogram as mp
from edge_qlora.golden.lora import step_model
from edge_qlora.golden.memmap import layout_for, pack_case, read_region, store_region, unpack_outputs
from edge_qlora.rtl import blocked, update
from edge_qlora.rtl.blocked_step import (STEP_UPDATE_GROUP, BlockedStep, StepConfig, StepOp, descriptor_layout,
                                        report_layout)
from edge_qlora.rtl.memport import port_for
from edge_qlora.rtl.update import UpdateConfig
from .blocked import blocked_config, engine_cycles, golden_rows, product_descriptor
from .blocked import model_cycles as product_model
from .memstep import DramBench, _fields, _timing, run_dram_bench
from .update import model_cycles as update_model
from .update import stall_cycles as update_stalls
from .update import update_descriptor

__all__ = ["PARTS", "StepBench", "StepRun", "even_width", "step_blocks", "step_config", "shared_config",
           "check_step_in", "check_step_shape", "step_memmap", "run_blocked_step", "model_cycles"]

#: The step's descriptors, in order.
PARTS = ("forward", "backward", "update_A", "update_B")


class StepBench(DramBench):
    """The step top and the DRAM model behind its port (simulation only)."""

    def __init__(self, config, timing):
        self.config = config
        super().__init__(BlockedStep(config), config.product.port, timing)


@dataclass
class StepRun:
    """A step against memory: ``outputs`` read back from memory (named as ``golden.lora.step_model``'s: y, dx,
    grad_A, grad_B, the new lora_A and lora_B and moments), ``rows`` (hb, gb and x's fields, read back), and per
    part of :data:`PARTS` the report's cycles, stall cycles (``{part: {"memory": n, "compute": n}}``, as each unit
    counts them) and bytes, and the program's bytes."""

    outputs: dict
    rows: dict
    cycles: dict
    stall_cycles: dict
    read_bytes: dict
    written_bytes: dict
    program_read_bytes: dict
    program_written_bytes: dict


def even_width(total, most, unit):
    """The width of as few blocks of at most ``most`` of ``total`` as can be, as even as multiples of ``unit``
    allow."""
    count = -(-total // most)
    return -(-(-(-total // count)) // unit) * unit


def step_blocks(t, d_in, d_out, cols=8, max_features=384):
    """The blocks of a step: forward ``(t, features)``, all tokens in one block (x's chunk fields need them) and
    feature blocks of at most ``max_features`` (multiples of ``cols``); backward ``(t, column block)``, whole NF4
    blocks, at least two column blocks (grad_B is made in the second)."""
    forward = even_width(d_out, max(cols, min(max_features, d_out) // cols * cols), cols)
    backward = even_width(d_in, max(64, min(max_features, d_in // 2) // 64 * 64), 64)
    return (t, min(forward, d_out)), (t, min(backward, d_in))


def step_memmap(case, config):
    """The memory map of a step on the step top: the step's tensors with the gradients, hb, x's fields, gb and the
    whole rows' chunk exponents."""
    return layout_for(case, align=64, row_exponent_chunk=config.product.gemm.chunk_steps, gradients_out=True,
                      rank_rows=True)


def model_cycles(case, forward, backward, config, memory="ulx3s-sdram", x_per_span=None):
    """The step's cycle model with memory, per part of :data:`PARTS`: the products'
    (``sim.blocked.model_cycles``) and the updates' (``sim.update.model_cycles``)."""
    t, d_in = case.x.shape
    d_out, r = case.dy.shape[1], case.lora_A.shape[0]
    if x_per_span is None:
        x_per_span = bp.x_pass_per_span(d_in, d_out, backward[1])
    memmap = step_memmap(case, config)
    pc = config.product
    return {"forward": product_model(pc, memory, t, d_in, d_out, *forward, rank=r),
            "backward": product_model(pc, memory, t, d_in, d_out, *backward, rank=r, transposed=True,
                                      x_per_span=x_per_span),
            "update_A": update_model(memmap, "A", memory, config.update),
            "update_B": update_model(memmap, "B", memory, config.update)}


def step_config(case, forward, backward, memory="ulx3s-sdram", rows=2, cols=2):
    """The smallest :class:`StepConfig` for ``case``'s step with forward blocks ``forward`` and backward blocks
    ``backward`` (each ``(tokens, features)``) on a ``rows x cols`` engine behind ``memory``'s port."""
    product = blocked_config(case, backward[0], backward[1], memory, rows, cols, transposed=True, rank_term=True,
                             gradient=True)
    product = dataclasses.replace(product, max_tokens=max(product.max_tokens, min(forward[0], case.x.shape[0])),
                                  max_features=max(product.max_features, min(forward[1], case.dy.shape[1])))
    return StepConfig(product=product, update=UpdateConfig(port=product.port, optimizer=case.optimizer,
                                                                    group=STEP_UPDATE_GROUP))


def shared_config(shapes, memory="ulx3s-sdram", rows=8, cols=8, rank=16, optimizer="adamw", max_features=384):
    """One :class:`StepConfig` for the steps of every ``(t, d_in, d_out)`` in ``shapes`` in the blocks of
    :func:`step_blocks` (``max_features``), sized for the largest, so that Verilator compiles one model for all of
    them. ValueError (one line) where no configuration takes them."""
    blocks = [step_blocks(t, d_in, d_out, cols, max_features) for t, d_in, d_out in shapes]
    product = blocked.BlockedConfig(
        rows=rows, cols=cols, port=port_for(_timing(memory)), max_tokens=max(t for t, _, _ in shapes),
        max_features=max(max(f[1], b[1]) for f, b in blocks),
        max_in=max(-(-d_in // blocked.SPAN) * blocked.SPAN for _, d_in, _ in shapes),
        max_groups=max(blocked.absmax2_groups(d_in, d_out) for _, d_in, d_out in shapes), rank=rank,
        transposed=True, gradient=True, max_out=max(-(-d_out // blocked.SPAN) * blocked.SPAN for *_, d_out in shapes))
    return StepConfig(product=product, update=UpdateConfig(port=product.port, optimizer=optimizer,
                                                            group=STEP_UPDATE_GROUP))


def check_step_in(d_in):
    """ValueError (one line) unless ``d_in`` is whole spans and at least two column blocks of one (the backward
    product makes grad_B in its second)."""
    if d_in < 2 * blocked.SPAN or d_in % blocked.SPAN:
        raise ValueError(f"in ({d_in}) must be a multiple of {blocked.SPAN} and at least {2 * blocked.SPAN} (two "
                         f"column blocks)")


def check_step_shape(config, t, d_in, d_out, r, max_features=384):
    """ValueError (one line) if the step of ``t`` tokens, ``d_in -> d_out`` at rank ``r`` in the blocks of
    :func:`step_blocks` does not run on ``config``."""
    pc = config.product
    if r != pc.rank:
        raise ValueError(f"the step top's rank is {pc.rank}, not {r}")
    check_step_in(d_in)
    forward, backward = step_blocks(t, d_in, d_out, pc.cols, max_features)
    pc.check_shape(t, d_in, d_out, *forward)
    pc.check_shape(t, d_in, d_out, *backward, transposed=True)


def run_blocked_step(case, forward, backward, config=None, *, memory="ulx3s-sdram", x_per_span=None, parts=PARTS,
                     stalls=None, backend=None, vcd_path=None, max_cycles=None, progress=None):
    """One step of ``case`` (forward blocks ``forward``, backward blocks ``backward``, each ``(tokens,
    features)``) on :class:`BlockedStep` against the DRAM model of ``memory`` (``parts``: only those of
    :data:`PARTS`, in its order); returns a :class:`StepRun` (its ``cycles`` and bytes for the parts run).
    ValueError (one line) for a shape the configuration does not take."""
    timing = _timing(memory)
    config = config or step_config(case, forward, backward, memory)
    pc = config.product
    t, d_in = case.x.shape
    d_out, r = case.dy.shape[1], case.lora_A.shape[0]
    if pc.rank != r:
        raise ValueError(f"the configuration's rank ({pc.rank}) must be the case's ({r})")
    pc.check_shape(t, d_in, d_out, *forward)
    pc.check_shape(t, d_in, d_out, *backward, transposed=True)
    if not case.weight.double_quant or case.weight.blocksize != blocked.SPAN:
        raise ValueError(f"the blocked step takes NF4 with double quantization in blocks of {blocked.SPAN}")
    memmap = step_memmap(case, config)
    if memmap.end > pc.port.capacity:
        raise ValueError(f"the case's tensors take {memmap.end:,} bytes: more than the {memory} port reaches")
    if x_per_span is None:
        x_per_span = bp.x_pass_per_span(d_in, d_out, backward[1])
    golden = step_model(case)
    image = pack_case(case, memmap)
    # what the reads find: the image with what the earlier parts write
    seen = bytearray(image)
    for name, value in (*golden_rows(case, memmap).items(), ("grad_A", golden["grad_A"]),
                        ("grad_B", golden["grad_B"])):
        store_region(seen, memmap, name, value)

    programs = {"forward": bp.forward_product(memmap, *forward, pc.cols, rank_term=True, gradient=True),
                "backward": bp.backward_product(memmap, *backward, pc.rows, pc.cols, rank_term=True, gradient=True,
                                                x_per_span=x_per_span),
                "update_A": bp.update_pass(memmap, "A", config.update.group),
                "update_B": bp.update_pass(memmap, "B", config.update.group)}
    port = mp.PortShape.of(pc.port)
    reqs = {part: bp.requests(port, program) for part, program in programs.items()}
    parts = [part for part in PARTS if part in parts]
    reads = [q for part in parts for q in reqs[part] if q.op == "read"]
    fill = mp.fill_words(port, seen, memmap.base, reads)

    updates = {which: update_descriptor(memmap, which, case.hyper) for which in ("A", "B")}
    layout = descriptor_layout(config)
    descriptors = dict(zip(PARTS, [
        layout.const({"op": StepOp.PRODUCT,
                      "product": product_descriptor(case, memmap, *forward, False, True, True, 0)}).as_bits(),
        layout.const({"op": StepOp.PRODUCT,
                      "product": product_descriptor(case, memmap, *backward, True, True, True, x_per_span)}).as_bits(),
        layout.const({"op": StepOp.UPDATE, "update": updates["A"]}).as_bits(),
        layout.const({"op": StepOp.UPDATE, "update": updates["B"]}).as_bits(),
    ]))
    written_words = sum(q.length for part in parts for q in reqs[part] if q.op == "write")
    wanted = {"written": written_words, "report": len(parts)}
    if max_cycles is None:
        compute = sum(engine_cycles(pc, t, d_in, d_out, *blocks, transposed=tr)
                      for blocks, tr in ((forward, False), (backward, True)))
        max_cycles = 4 * compute + 40 * (len(fill) + written_words) + 20 * (r * (d_in + d_out)) + 40_000
    beats, _ = run_dram_bench(lambda: StepBench(config, timing), f"StepBench {config!r} {timing!r}",
                              {"descriptor": [descriptors[part] for part in parts], "fill": fill}, wanted, image=image,
                              port_config=pc.port, base=memmap.base, stalls=stalls, max_cycles=max_cycles,
                              backend=backend, vcd_path=vcd_path, progress=progress, what="the step")
    reports = [_fields(beat, report_layout(config)) for beat in beats["report"]]
    wb = port.word_bytes
    cycles, waits, read_bytes, written_bytes = {}, {}, {}, {}
    for part, report in zip(parts, reports):
        if part.startswith("update"):
            fields_ = _fields(report["update"], update.report_layout())
            read, written = fields_["read"], fields_["written"]
        else:
            fields_ = _fields(report["product"], blocked.report_layout(pc.reads))
            read, written = sum(fields_[f"read_{name}"] for name in pc.reads), fields_["written"]
        cycles[part], read_bytes[part], written_bytes[part] = fields_["cycles"], read * wb, written * wb
        waits[part] = update_stalls(fields_, config.update) if part.startswith("update") else \
            {"memory": fields_["memory"], "compute": fields_["compute"]}
    outputs = unpack_outputs(image, memmap)
    return StepRun(
        outputs=outputs,
        rows={name: read_region(image, memmap, name) for name in ("hb", "gb", "x_fields")},
        cycles=cycles, stall_cycles=waits, read_bytes=read_bytes, written_bytes=written_bytes,
        program_read_bytes={part: sum(q.length for q in reqs[part] if q.op == "read") * wb for part in parts},
        program_written_bytes={part: sum(q.length for q in reqs[part] if q.op == "write") * wb for part in parts})
