"""The LoRA step's updater: feeds the optimizer A, then B, element by element, and sends the updates out."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ...constants import FP32
from ..fp import FPMul
from ..lora_optim import element_layout, update_layout
from ..pipeline import StallPipeline, delay_line
from ..scratchpad import ReadPort
from .config import UPDATE_ORDER, STORES, Task, dims_layout, moments_layout, row_words, updates_layout

__all__ = ["Updater", "READ_LATENCY", "pipeline_depth"]

#: Cycles of the scratchpads' parameter and gradient reads.
READ_LATENCY = 2


def _scale_unit():
    """The gradient's scaling multiplier (operands registered ahead of the DSP blocks)."""
    return FPMul(FP32, FP32, FP32, stages=6)


def pipeline_depth():
    """Elements the updater holds between taking an element's moments and handing it to the optimizer core: the
    reads and the scaling multiply (the memory-fed step's cycle model frees the moments' FIFO room this far ahead
    of the core)."""
    unit = _scale_unit()
    unit._MustUse__silence = True   # only its latency is wanted
    return READ_LATENCY + unit.latency


class Updater(wiring.Component):
    """The update phases: for each element of A (first task), then of B (second), the parameter and the GEMM's
    gradient sum are read from the scratchpads, the gradient scaled (``scaling * g``), the moments taken from
    ``state_in``, and the four sent to the optimizer; each update leaves on ``updates`` with its gradient beside
    it. A task is done when its last update has left.

    Parameters
    ----------
    banks, address_width : int
        Scratchpad banks and request address width.
    optimizer_latency : int
        The optimizer's latency without stalls: the gradients wait for its results in a FIFO that deep (plus a
        margin).

    Attributes
    ----------
    tensors : In(:class:`~.config.Task`), one per update phase (:data:`~.config.UPDATE_ORDER`)
    dims : In(:data:`~.config.dims_layout`)
    scaling : In(32)
        The LoRA scaling ``s``, float32.
    param, grad : Out(:class:`~..scratchpad.ReadPort`), float32
        The tensor's parameters and gradient sums, one element a read.
    state_in : In(stream of :data:`~.config.moments_layout`)
    elements : Out(stream of :data:`~.lora_optim.element_layout`), to the optimizer
    updated : In(stream of :data:`~.lora_optim.update_layout`), from the optimizer
    updates : Out(stream of :func:`~.config.updates_layout`)
    """

    def __init__(self, banks, address_width, optimizer_latency):
        self.banks, self.optimizer_latency = banks, optimizer_latency
        super().__init__({
            "tensors": In(Task()).array(len(UPDATE_ORDER)),
            "dims": In(dims_layout),
            "scaling": In(FP32.width),
            "param": Out(ReadPort(banks, FP32.width, address_width)),
            "grad": Out(ReadPort(banks, FP32.width, address_width)),
            "state_in": In(stream.Signature(moments_layout)),
            "elements": Out(stream.Signature(element_layout)),
            "updated": In(stream.Signature(update_layout)),
            "updates": Out(stream.Signature(updates_layout())),
        })

    def elaborate(self, platform):
        m = Module()
        banks = self.banks
        scale = _scale_unit()
        read_latency = READ_LATENCY
        pipe = StallPipeline(m, read_latency + scale.latency, self.elements.ready, name="upd")
        m.submodules.scale = pipe.stall(scale)

        # the tensor: A [r, in] in the first task, B [out, r] in the second
        first, second = self.tensors
        active = first.active | second.active
        (a_name, _), (b_name, _) = UPDATE_ORDER.values()
        shape = {name: (self.dims[STORES[name].rows], self.dims[STORES[name].cols]) for name in (a_name, b_name)}
        rows_n = Mux(first.active, shape[a_name][0], shape[b_name][0])
        cols_n = Mux(first.active, shape[a_name][1], shape[b_name][1])
        words = Mux(first.active, row_words(shape[a_name][1], banks), row_words(shape[b_name][1], banks))

        row, col = Signal(16), Signal(16)
        row_address = Signal(32)
        issued_all, issue = Signal(), Signal()
        m.d.comb += [
            issue.eq(active & ~issued_all & self.state_in.valid & pipe.advance),
            pipe.in_valid.eq(issue),
            self.state_in.ready.eq(active & ~issued_all & pipe.advance),
        ]
        with m.If(issue):
            m.d.sync += col.eq(col + 1)
            with m.If(col == cols_n - 1):
                m.d.sync += [col.eq(0), row.eq(row + 1), row_address.eq(row_address + words)]
            with m.If((row == rows_n - 1) & (col == cols_n - 1)):
                m.d.sync += issued_all.eq(1)
        for port in (self.param, self.grad):
            m.d.comb += [
                port.request.row_address.eq(row_address), port.request.row_words.eq(words),
                port.request.row.eq(row), port.request.col.eq(col), port.request.column.eq(0),
                port.request.count.eq(1), port.en.eq(pipe.advance),
            ]

        # the moments ride beside the read and the scaling multiply, the parameter beside the multiply
        m.d.comb += [scale.a.eq(self.grad.data[0]), scale.b.eq(self.scaling)]
        moments = data.View(moments_layout, delay_line(m, pipe.advance, self.state_in.payload,
                                                       read_latency + scale.latency, "moments"))
        param = delay_line(m, pipe.advance, self.param.data[0], scale.latency, "param")
        element = self.elements.payload
        m.d.comb += [
            self.elements.valid.eq(pipe.out_valid),
            element.param.eq(param), element.grad.eq(scale.result), element.m.eq(moments.m),
            element.v.eq(moments.v),
        ]

        # the gradient waits beside the optimizer for its result
        m.submodules.grads = grads = SyncFIFOBuffered(width=FP32.width, depth=self.optimizer_latency + 4)
        update = self.updates.payload
        m.d.comb += [
            grads.w_stream.valid.eq(self.elements.valid & self.elements.ready),
            grads.w_stream.payload.eq(scale.result),
            self.updates.valid.eq(self.updated.valid),
            update.param.eq(self.updated.payload.param), update.m.eq(self.updated.payload.m),
            update.v.eq(self.updated.payload.v), update.grad.eq(grads.r_stream.payload),
            self.updated.ready.eq(self.updates.ready),
            grads.r_stream.ready.eq(self.updates.valid & self.updates.ready),
        ]

        # a task ends when its last element has left
        outstanding = Signal(32)
        m.d.sync += outstanding.eq(outstanding + issue - (self.updates.valid & self.updates.ready))
        with m.If(active & issued_all & (outstanding == 0)):
            m.d.comb += [first.done.eq(first.active), second.done.eq(second.active)]
            m.d.sync += [issued_all.eq(0), row.eq(0), col.eq(0), row_address.eq(0)]
        return m
