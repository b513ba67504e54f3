"""Double quantization of NF4 absmax values, bit-exact with bitsandbytes (twin: ``golden/absmax_quant.py``).

Every absmax ``a`` becomes ``d = fl(a - offset)``; per group of 256, ``absmax2 = max|d|`` and each ``d`` gets the
8-bit code of ``normed = fl(d * fl(1 / absmax2))`` on the staircase of
:data:`~edge_qlora.constants.ABSMAX_THRESHOLDS` (the number of thresholds ``<= normed``); a group whose
``absmax2`` is zero gets code 0 throughout.

A code needs its group's ``absmax2``, so the differences are buffered while the group's maximum is found, as the
NF4 quantizer buffers a block; the group then takes one reciprocal and each difference one product and a binary
search of the 255 thresholds, eight pipelined steps (a 2**i-entry threshold ROM at step i), one value per cycle::

    absmax -> [FPAdd: a - offset] -> group buffer (Memory, 512) -> [FPMul: d * r] -> [search x 8] -> codes
                                  \\-> max|d| -> group records -> [FPDiv: 1 / absmax2] -> scales --^
                                                              \\-> absmax2

The offset is the mean of the tensor's absmax values, which the host computes (its rounding follows torch's
summation order) and holds on ``offset`` while the tensor streams in.
"""

import numpy as np
from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import ABSMAX_THRESHOLDS, DYNAMIC_BLOCKSIZE
from .fp import FP32, FPAdd, FPDiv, FPMul, fp_abs_key, fp_is_nan, fp_order_key
from .pipeline import StallPipeline

__all__ = ["AbsmaxQuantizer", "codes_out_layout"]

_ONE = 0x3F800000
_GROUP = DYNAMIC_BLOCKSIZE
#: search steps: the 255 thresholds split [-inf, inf] into 256 codes
_STEPS = 8


def _order_key_const(bits):
    # fp_order_key on a Python int: positives above negatives, negatives reversed
    return (~bits & 0xFFFFFFFF) if bits >> 31 else bits | 0x80000000


#: Order keys of the thresholds. None is a zero, so -0 and +0 (which the keys tell apart) get the same code.
_THRESHOLD_KEYS = [_order_key_const(int(t)) for t in ABSMAX_THRESHOLDS.view(np.uint32)]
assert not any(t == 0 for t in ABSMAX_THRESHOLDS)


def codes_out_layout():
    """Payload of the ``codes`` stream: one 8-bit code and ``last`` on a tensor's final code."""
    return data.StructLayout({"data": 8, "last": 1})


class AbsmaxQuantizer(wiring.Component):
    """Streaming double quantizer of NF4 absmax values: one value per cycle.

    A tensor's ``n_blocks`` absmax values arrive in order and leave as the same number of 8-bit codes, plus one
    float32 ``absmax2`` per group of 256 (the final group may be shorter). ``n_blocks`` is read at a tensor's first
    value and ``offset`` with every value, so both must hold still until the tensor's last value is taken; tensors
    may follow each other back to back. NaN and infinities follow IEEE arithmetic through the float units: a NaN
    ``normed`` gets code 0, an infinite reciprocal (``absmax2`` below about ``2.9e-39``) gives the end codes, and a
    NaN difference makes its group's ``absmax2`` the canonical NaN.

    Attributes
    ----------
    absmax : In(stream of unsigned(32))
        float32 absmax bits, one per NF4 block.
    offset : In(32)
        float32 bits of the mean of the tensor's absmax values.
    n_blocks : In(32)
        Number of absmax values in the tensor, at least 1.
    codes : Out(stream of :func:`codes_out_layout`)
        Code of each absmax value, in order.
    absmax2 : Out(stream of unsigned(32))
        float32 bits of ``max|absmax - offset|`` of each group of 256.
    """

    #: entries of the group buffer: a group, plus the cycles until its reciprocal reaches the coder
    BUFFER_DEPTH = 2 * _GROUP
    #: group reciprocals in flight or waiting; more only helps tensors of a few values back to back
    SCALE_QUEUE_DEPTH = 8

    def __init__(self):
        super().__init__({
            "absmax": In(stream.Signature(32)),
            "offset": In(32),
            "n_blocks": In(32),
            "codes": Out(stream.Signature(codes_out_layout())),
            "absmax2": Out(stream.Signature(32)),
        })

    def elaborate(self, platform):
        m = Module()
        depth = self.BUFFER_DEPTH
        record_layout = data.StructLayout({"absmax2": 32, "length": range(1, _GROUP + 1), "last": 1})
        scale_layout = data.StructLayout({"reciprocal": 32, "zero": 1, "length": range(1, _GROUP + 1), "last": 1})
        m.submodules.buffer = buffer = Memory(shape=32, depth=depth, init=[])
        m.submodules.records = records = SyncFIFOBuffered(width=record_layout.size, depth=4)
        m.submodules.scales = scales = SyncFIFOBuffered(width=scale_layout.size, depth=self.SCALE_QUEUE_DEPTH)

        # -- difference: d = absmax - offset, tagged with where it falls in its group and tensor -----------------
        subtract = FPAdd(FP32)
        buffered = Signal()
        group_layout = data.StructLayout({"group_end": 1, "last": 1})
        # the operands are registered first: the float units leave their input cut to the user
        sub_pipe = StallPipeline(m, 1 + subtract.latency, buffered, tag_shape=group_layout, name="subtract")
        m.submodules.subtract = sub_pipe.stall(subtract)
        remaining = Signal(32)
        fresh = Signal(init=1)
        position = Signal(range(_GROUP))
        left = Mux(fresh, self.n_blocks, remaining)
        last = left <= 1
        group_end = last | (position == _GROUP - 1)
        with m.If(sub_pipe.advance):
            m.d.sync += [subtract.a.eq(self.absmax.payload), subtract.b.eq(self.offset)]
        m.d.comb += [
            subtract.sub.eq(1),
            sub_pipe.in_valid.eq(self.absmax.valid),
            sub_pipe.in_tag.group_end.eq(group_end),
            sub_pipe.in_tag.last.eq(last),
            self.absmax.ready.eq(sub_pipe.advance),
        ]
        with m.If(self.absmax.valid & self.absmax.ready):
            m.d.sync += [
                remaining.eq(left - 1),
                fresh.eq(last),
                position.eq(Mux(group_end, 0, position + 1)),
            ]

        # -- group buffer and max|d|: a group's record leaves with its last difference --------------------------
        write = buffer.write_port()
        write_index = Signal(range(depth))
        level = Signal(range(depth + 1))        # differences buffered and not yet coded
        issued = Signal()
        d = subtract.result
        tag = sub_pipe.out_tag
        running, running_nan = Signal(31), Signal()
        length = Signal(range(_GROUP))
        key = fp_abs_key(d, FP32)
        group_max = Mux(running > key, running, key)
        group_nan = running_nan | fp_is_nan(d, FP32)
        space = level != depth
        m.d.comb += [
            buffered.eq(space & (~tag.group_end | records.w_rdy)),
            write.addr.eq(write_index),
            write.data.eq(d),
            write.en.eq(sub_pipe.out_valid & buffered),
            records.w_en.eq(sub_pipe.out_valid & tag.group_end & space),
        ]
        record_in = data.View(record_layout, records.w_data)
        m.d.comb += [
            record_in.absmax2.eq(Mux(group_nan, FP32.nan_bits, group_max)),
            record_in.length.eq(length + 1),
            record_in.last.eq(tag.last),
        ]
        with m.If(write.en):
            m.d.sync += [
                write_index.eq(write_index + 1),
                running.eq(Mux(tag.group_end, 0, group_max)),
                running_nan.eq(~tag.group_end & group_nan),
                length.eq(Mux(tag.group_end, 0, length + 1)),
            ]
        m.d.sync += level.eq(level + write.en - issued)

        self._reciprocal(m, records, scales, record_layout, scale_layout)
        self._coder(m, buffer, scales, scale_layout, level, issued)
        return m

    def _reciprocal(self, m, records, scales, record_layout, scale_layout):
        """Per group record: ``absmax2`` out, and the reciprocal of it into the scale queue."""
        # issued against credits in the scale queue
        divide = FPDiv(FP32)
        div_pipe = StallPipeline(m, divide.latency, scales.w_rdy, tag_shape=record_layout, name="divide")
        m.submodules.divide = div_pipe.stall(divide)
        record = data.View(record_layout, records.r_data)
        credits = Signal(range(self.SCALE_QUEUE_DEPTH + 1))
        absmax2_free = ~self.absmax2.valid | self.absmax2.ready
        record_ready = records.r_rdy & (credits < self.SCALE_QUEUE_DEPTH) & absmax2_free
        record_issue = record_ready & div_pipe.advance
        m.d.comb += [
            div_pipe.in_valid.eq(record_ready),
            div_pipe.in_tag.eq(record),
            records.r_en.eq(record_issue),
            divide.a.eq(_ONE),
            divide.b.eq(record.absmax2),
        ]
        with m.If(record_issue):
            m.d.sync += [self.absmax2.valid.eq(1), self.absmax2.payload.eq(record.absmax2)]
        with m.Elif(self.absmax2.ready):
            m.d.sync += self.absmax2.valid.eq(0)
        m.d.sync += credits.eq(credits + record_issue - (scales.r_en & scales.r_rdy))
        done = div_pipe.out_tag
        scale_in = data.View(scale_layout, scales.w_data)
        m.d.comb += [
            scales.w_en.eq(div_pipe.out_valid),
            scale_in.reciprocal.eq(divide.result),
            scale_in.zero.eq(fp_abs_key(done.absmax2, FP32) == 0),
            scale_in.length.eq(done.length),
            scale_in.last.eq(done.last),
        ]


    def _coder(self, m, buffer, scales, scale_layout, level, issued):
        """Read back each difference with its group's scale, multiply, and search the thresholds for its code."""
        depth = self.BUFFER_DEPTH
        multiply = FPMul(FP32, FP32, FP32)
        # buffer read, operand registers, product, then the search: two stages per step but the last
        latency = 2 + multiply.latency + 2 * _STEPS - 1
        code_ready = Signal()
        code_layout = data.StructLayout({"zero": 1, "last": 1})
        pipe = StallPipeline(m, latency, code_ready, tag_shape=code_layout, name="code")
        m.submodules.normalize = pipe.stall(multiply)
        read = buffer.read_port(domain="sync")
        read_index = Signal(range(depth))
        scale = data.View(scale_layout, scales.r_data)
        coded = Signal(range(_GROUP))              # differences of the head group already issued
        group_done = coded == scale.length - 1
        ready_to_issue = (level != 0) & scales.r_rdy
        m.d.comb += [
            issued.eq(ready_to_issue & pipe.advance),
            pipe.in_valid.eq(ready_to_issue),
            pipe.in_tag.zero.eq(scale.zero),
            pipe.in_tag.last.eq(scale.last & group_done),
            scales.r_en.eq(issued & group_done),
            read.addr.eq(read_index),
            read.en.eq(pipe.advance),
        ]
        with m.If(issued):
            m.d.sync += [read_index.eq(read_index + 1), coded.eq(Mux(group_done, 0, coded + 1))]
        # the reciprocal travels one cycle beside the buffer read, which the read port's register delays
        reciprocal = Signal(32)
        with m.If(pipe.advance):
            m.d.sync += [reciprocal.eq(scale.reciprocal), multiply.a.eq(read.data), multiply.b.eq(reciprocal)]

        # binary search: step i compares against the threshold halfway through the codes left, from a ROM of the
        # 2**i candidates. A ROM may be a block RAM, whose output is slow, so each read gets a cycle of its own
        # and a fabric register before the comparison: two stages per step, still one value per cycle.
        normed = multiply.result
        search_key = Signal(32)
        m.d.comb += search_key.eq(Mux(fp_is_nan(normed, FP32), 0, fp_order_key(normed, FP32)))  # NaN: code 0
        code = Signal(8)
        threshold = _THRESHOLD_KEYS[(1 << (_STEPS - 1)) - 1]
        for step in range(_STEPS):
            span = 1 << (_STEPS - 1 - step)       # the code bit this step decides
            decided = code | Mux(threshold <= search_key, span, 0)
            search_key, code = self._stage(m, pipe, search_key, decided, f"search_{step}")
            if step < _STEPS - 1:
                rom = Memory(shape=32, depth=1 << (step + 1), init=[
                    _THRESHOLD_KEYS[(prefix << (_STEPS - 1 - step)) + span // 2 - 1]
                    for prefix in range(1 << (step + 1))])
                m.submodules[f"thresholds_{step + 1}"] = rom
                port = rom.read_port(domain="sync")
                m.d.comb += [port.addr.eq(decided >> (_STEPS - 1 - step)), port.en.eq(pipe.advance)]
                threshold = Signal(32, name=f"threshold_{step + 1}")
                with m.If(pipe.advance):
                    m.d.sync += threshold.eq(port.data)
                search_key, code = self._stage(m, pipe, search_key, code, f"search_{step}_read")

        out = pipe.out_tag
        m.d.comb += [
            code_ready.eq(self.codes.ready),
            self.codes.valid.eq(pipe.out_valid),
            self.codes.payload.data.eq(Mux(out.zero, 0, code)),
            self.codes.payload.last.eq(out.last),
        ]

    @staticmethod
    def _stage(m, pipe, search_key, code, name):
        """The search key and the code decided so far, registered as one pipeline stage."""
        key, decided = Signal(32, name=f"{name}_key"), Signal(8, name=f"{name}_code")
        with m.If(pipe.advance):
            m.d.sync += [key.eq(search_key), decided.eq(code)]
        return key, decided
