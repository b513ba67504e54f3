"""The second-level absmax of each block of an NF4 span (twin: ``golden/nf4_span.py``).

A block job of the output-stationary schedule streams a span of W: a rectangle of whole NF4 blocks whose rows are
``stride`` blocks apart in the weight, so with double quantization its consecutive blocks lie in different groups
of 256 of the weight, and the dequantizer takes one ``absmax2`` per block (``absmax2_per_block`` in its tensor
header). This unit keeps the weight's ``absmax2`` table on chip (one float32 per 256 blocks: 704 entries for
TinyLlama's largest weights, read once per weight pass), walks each span's block indices and gives the dequantizer
each block's entry, one a cycle, so that no span reads ``absmax2`` from external memory block by block.

A span descriptor with ``new_table`` set first takes ``groups`` table entries from ``table`` (a new weight, or a
new pass); the spans after it use that table until the next such descriptor.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import DYNAMIC_BLOCKSIZE

__all__ = ["span_layout", "SpanScales"]

_GROUP_SHIFT = DYNAMIC_BLOCKSIZE.bit_length() - 1


def span_layout():
    """Payload of the ``span`` stream: where the span's blocks lie in the weight (``golden.nf4_span.SpanBlocks``:
    ``first``, ``rows``, ``blocks`` per row, ``stride`` between rows) and, with ``new_table``, the ``groups``
    table entries to load first."""
    return data.StructLayout({"first": 32, "rows": 16, "blocks": 16, "stride": 16, "groups": 16, "new_table": 1})


class SpanScales(wiring.Component):
    """Gives each block of a span its second-level absmax from an on-chip table of the weight's.

    Parameters
    ----------
    max_groups : int
        Table entries: the weight's blocks / 256, rounded up, for the largest weight.

    Attributes
    ----------
    span : In(stream of :func:`span_layout`)
        One beat per span (``rows`` and ``blocks`` at least 1; with ``new_table``, ``groups`` from 1 to
        ``max_groups``; every block's group below the table's length).
    table : In(stream of unsigned(32))
        The weight's float32 ``absmax2`` in group order, ``groups`` beats after each descriptor with ``new_table``.
    absmax2 : Out(stream of unsigned(32))
        One beat per block of each span, in the span's row-major order: the dequantizer's ``absmax2`` stream.
    """

    def __init__(self, max_groups=1024):
        if isinstance(max_groups, bool) or not isinstance(max_groups, int) or not 1 <= max_groups < 1 << 16:
            raise ValueError(f"max_groups must be an integer from 1 to {(1 << 16) - 1}, not {max_groups!r}")
        self.max_groups = max_groups
        super().__init__({
            "span": In(stream.Signature(span_layout())),
            "table": In(stream.Signature(32)),
            "absmax2": Out(stream.Signature(32)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.groups = groups = Memory(shape=32, depth=self.max_groups, init=[])
        write, read = groups.write_port(), groups.read_port(domain="sync")

        span = Signal(span_layout())
        loading, serving = Signal(), Signal()
        load_index = Signal(16)
        row, column = Signal(16), Signal(16)
        block, row_first = Signal(32), Signal(32)   # the weight's index of this block and of its row's first

        # a descriptor is taken when the one before is served (its last beat may still wait in the output register)
        m.d.comb += self.span.ready.eq(~loading & ~serving)
        with m.If(self.span.valid & self.span.ready):
            first = self.span.payload.first
            m.d.sync += [span.eq(self.span.payload), block.eq(first), row_first.eq(first), row.eq(0),
                         column.eq(0), load_index.eq(0)]
            with m.If(self.span.payload.new_table):
                m.d.sync += loading.eq(1)
            with m.Else():
                m.d.sync += serving.eq(1)

        m.d.comb += [
            self.table.ready.eq(loading),
            write.addr.eq(load_index),
            write.data.eq(self.table.payload),
            write.en.eq(self.table.valid & loading),
        ]
        with m.If(self.table.valid & loading):
            m.d.sync += load_index.eq(load_index + 1)
            with m.If(load_index == span.groups - 1):
                m.d.sync += [loading.eq(0), serving.eq(1)]

        # the table read is the output register: it advances whenever the output beat is taken or absent
        out_valid = Signal()
        advance = ~out_valid | self.absmax2.ready
        issue = serving & advance
        m.d.comb += [
            read.addr.eq(block >> _GROUP_SHIFT),
            read.en.eq(advance),
            self.absmax2.valid.eq(out_valid),
            self.absmax2.payload.eq(read.data),
        ]
        with m.If(advance):
            m.d.sync += out_valid.eq(issue)
        with m.If(issue):
            with m.If(column == span.blocks - 1):
                m.d.sync += [column.eq(0), row.eq(row + 1), block.eq(row_first + span.stride),
                             row_first.eq(row_first + span.stride)]
                with m.If(row == span.rows - 1):
                    m.d.sync += serving.eq(0)
            with m.Else():
                m.d.sync += [column.eq(column + 1), block.eq(block + 1)]
        return m
