"""The LoRA step's top: the controller, the movers, the GEMM engine, the optimizer and the scratchpads, wired."""

from amaranth.hdl import Cat, Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..gemm import GemmEngine
from ..lora_optim import LoRAOptimizer
from ..scratchpad import MatrixStore
from .config import (DIMENSIONS, LOAD_ORDER, PHASES, SCRATCHPADS, STORES, UPDATE_ORDER, LoraConfig, Phase, dims_layout,
                     header_layout, moments_layout, out_layout, segment_in_layout, updates_layout)
from .controller import PhaseController
from .movers import AMover, SegmentLoader, WMover
from .updater import Updater
from .writer import CWriter

__all__ = ["LoraStep"]

#: The dequantizer's input streams, passed through to the engine (``absmax2`` only with double quantization).
WEIGHT_STREAMS = ("tensor", "codes", "absmax", "absmax2")


class LoraStep(wiring.Component):
    """One QLoRA training step of a linear layer, all phases sequenced in hardware.

    Parameters
    ----------
    config : LoraConfig

    Attributes
    ----------
    header : In(stream of :func:`~.config.header_layout`)
    x_in, dy_in, a_in, b_in : In(stream of :func:`~.config.segment_in_layout`)
        x [T, in] and dy [T, out] (bf16), A [r, in] and B [out, r] (float32), row-major in row segments.
    tensor, codes, absmax, absmax2 : In(stream)
        The NF4 base weight, as the dequantizer takes it (see :class:`~..nf4_dequant.NF4Dequantizer`).
    state_in : In(stream of :data:`~.config.moments_layout`)
        AdamW moments of A, then B, element by element in row-major order (SGD: zeros, still one per element).
    y, dx : Out(stream of :func:`~.config.out_layout`)
        y = x W^T + s yl and dx = dy W + s dxl, bf16, in the engine's tile order.
    updates : Out(stream of :func:`~.config.updates_layout`)
    phase : Out(:class:`~.config.Phase`)
        The running phase (for waveforms and cycle accounting).
    engine : GemmEngine
        The engine the step runs its products on.
    """

    def __init__(self, config=LoraConfig()):
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, not {config!r}")
        self.config = config
        self.engine = GemmEngine(config.gemm)
        banks = config.banks
        members = {
            "header": In(stream.Signature(header_layout())),
            "x_in": In(stream.Signature(segment_in_layout(banks, BF16.width))),
            "dy_in": In(stream.Signature(segment_in_layout(banks, BF16.width))),
            "a_in": In(stream.Signature(segment_in_layout(banks, FP32.width))),
            "b_in": In(stream.Signature(segment_in_layout(banks, FP32.width))),
            "state_in": In(stream.Signature(moments_layout)),
            "y": Out(stream.Signature(out_layout(config))),
            "dx": Out(stream.Signature(out_layout(config))),
            "updates": Out(stream.Signature(updates_layout())),
            "phase": Out(Phase),
        }
        for name in WEIGHT_STREAMS:
            if name in self.engine.signature.members:
                members[name] = self.engine.signature.members[name]
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        banks, address_width = cfg.banks, cfg.address_width
        m.submodules.engine = engine = self.engine
        m.submodules.controller = controller = PhaseController()
        m.submodules.a_mover = a_mover = AMover(cfg.rows, banks, address_width)
        m.submodules.w_mover = w_mover = WMover(cfg.rows, cfg.cols, banks, address_width)
        m.submodules.c_writer = c_writer = CWriter(cfg)
        m.submodules.optimizer = optimizer = LoRAOptimizer(cfg.optim)
        m.submodules.updater = updater = Updater(banks, address_width, optimizer.latency)
        stores = {}     # matrix name -> the scratchpad that holds it
        for name, matrices in SCRATCHPADS.items():
            store = m.submodules[f"store_{name}"] = MatrixStore(banks, STORES[matrices[0]].width,
                                                                 cfg.scratchpad_depth(name))
            stores.update(dict.fromkeys(matrices, store))

        params = controller.params
        dims = data.View(dims_layout, Cat(*(params[name] for name in DIMENSIONS)))
        m.d.comb += self.phase.eq(controller.phase)
        wiring.connect(m, wiring.flipped(self.header), controller.header)

        # loads
        inputs = {"x": self.x_in, "dy": self.dy_in, "a": self.a_in, "b": self.b_in}
        writers = []
        for task, (phase, name) in zip(controller.load, LOAD_ORDER.items()):
            loader = m.submodules[f"load_{name}"] = SegmentLoader(banks, STORES[name].width,
                                                                 stores[name].address_width)
            wiring.connect(m, wiring.flipped(inputs[name]), loader.segments)
            wiring.connect(m, task, loader.task)
            m.d.comb += loader.cols.eq(dims[STORES[name].cols])
            writers.append((loader.write, {phase: name}))

        # the GEMM phases: the movers feed the engine, the C writer drains it
        wiring.connect(m, controller.job, engine.job)
        wiring.connect(m, controller.gemm, a_mover.run, w_mover.run, c_writer.run)
        wiring.connect(m, controller.gemm_task, c_writer.task)
        wiring.connect(m, a_mover.a, engine.a)
        wiring.connect(m, w_mover.rows_in, engine.rows_in)
        # the engine's outputs queue for the C writer (see LoraConfig.c_queue_depth)
        m.submodules.c_queue = c_queue = SyncFIFOBuffered(width=engine.c.payload.shape().size,
                                                          depth=cfg.c_queue_depth)
        wiring.connect(m, engine.c, c_queue.w_stream)
        wiring.connect(m, c_queue.r_stream, c_writer.c)
        wiring.connect(m, c_writer.y, wiring.flipped(self.y))
        wiring.connect(m, c_writer.dx, wiring.flipped(self.dx))
        for name in WEIGHT_STREAMS:
            if name in engine.signature.members:
                wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(engine, name))
        m.d.comb += [a_mover.dims.eq(dims), w_mover.dims.eq(dims), c_writer.dims.eq(dims),
                     c_writer.scaling.eq(params.scaling)]

        # the update phases
        for task, tensor in zip(controller.update, updater.tensors):
            wiring.connect(m, task, tensor)
        wiring.connect(m, wiring.flipped(self.state_in), updater.state_in)
        wiring.connect(m, updater.elements, optimizer.elements)
        wiring.connect(m, optimizer.updated, updater.updated)
        wiring.connect(m, updater.updates, wiring.flipped(self.updates))
        m.d.comb += [updater.dims.eq(dims), updater.scaling.eq(params.scaling), optimizer.hyper.eq(params.hyper)]

        # each store's ports serve the part that uses them in the running phase
        readers = [
            (a_mover.read, {phase: row.a_store for phase, row in PHASES.items()}),
            (w_mover.read, {phase: row.w_store for phase, row in PHASES.items() if row.w_store is not None}),
            (c_writer.partner, {phase: row.partner for phase, row in PHASES.items() if row.combining}),
            (updater.param, {phase: param for phase, (param, _) in UPDATE_ORDER.items()}),
            (updater.grad, {phase: grad for phase, (_, grad) in UPDATE_ORDER.items()}),
        ]
        writers.append((c_writer.write, {phase: row.destination for phase, row in PHASES.items()
                                         if not row.combining}))
        _route(m, controller.phase, stores, readers, writers)
        return m


def _route(m, phase, stores, readers, writers):
    """Drive each store's read and write port from the part that uses it in the running phase, and each reader's
    data from the store it reads. ``readers`` and ``writers`` are ``(port, {phase: store name})``; elements of a
    narrower store travel in the low bits of the part's lanes."""

    def fields(target, source):
        return [target[name].eq(source[name]) for name in target.shape().members]

    def lanes(target, source):
        return [target[e].eq(source[e]) for e in range(len(target))]

    def during(uses, name):
        return Cat(*(phase == p for p, used in uses.items() if used == name)).any()

    for part, uses in readers:
        for name in dict.fromkeys(uses.values()):
            port = stores[name].read[0]
            with m.If(during(uses, name)):
                m.d.comb += [*fields(port.request, part.request), port.en.eq(part.en)]
        with m.Switch(phase):
            for p, name in uses.items():
                with m.Case(p):
                    m.d.comb += lanes(part.data, stores[name].read[0].data)
    for part, uses in writers:
        for name in dict.fromkeys(uses.values()):
            port = stores[name].write
            with m.If(during(uses, name)):
                m.d.comb += [*fields(port.request, part.request), port.en.eq(part.en), *lanes(port.data, part.data)]
