"""Row aligner: a flat stream of matrix elements in, one beat per row segment out (twin: ``golden/row_align.py``).

The NF4 dequantizer (and a bf16 weight stream) delivers a row-major matrix as a flat sequence, ``lanes`` elements
per beat, so a beat may hold the end of one row and the start of the next (NF4 blocks run across rows when the row
length is not a multiple of the block size). The GEMM engine's buffers want each beat to start a word of one row:
elements ``k .. k+lanes-1`` of row ``r`` with ``k`` a multiple of ``lanes``. This unit re-cuts the stream: it holds
up to ``3 * lanes`` elements and emits ``min(lanes, row_length - k)`` of them per beat, zero-filling the rest.
"""

from amaranth.hdl import C, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..constants import BF16, MAX_LANES
from .fp import at_least

__all__ = ["RowAligner", "shape_layout", "flat_layout", "row_layout"]


def shape_layout():
    """Payload of the ``shape`` stream: one beat per matrix; ``elements`` is ``rows * row_length``, given rather
    than multiplied out in hardware."""
    return data.StructLayout({"rows": 32, "row_length": 32, "elements": 32})


def flat_layout(lanes, width):
    return data.ArrayLayout(width, lanes)


def row_layout(lanes, width):
    """Payload of the ``rows`` stream: ``lanes`` elements of one row; ``row_end`` on a row's final beat, ``last`` on
    the matrix's final beat."""
    return data.StructLayout({"data": data.ArrayLayout(width, lanes), "row_end": 1, "last": 1})


def _add3(x, y, z):
    """``x + y - z`` (``x`` signed, ``y`` and ``z`` unsigned) with one carry chain: a carry-save layer (a
    LUT per bit) makes two operands of three (``-z`` is ``~z + 1``, the 1 in the carries' free low bit)."""
    width = max(len(x), len(y) + 1, len(z) + 1) + 2

    def extend(value, signed):
        return Cat(value, (value[-1] if signed else C(0, 1)).replicate(width - len(value)))
    a, b, c = extend(x, True), extend(y, False), ~extend(z, False)
    carries = Cat(C(1, 1), ((a & b) | (a & c) | (b & c))[:width - 1])
    return ((a ^ b ^ c) + carries)[:width].as_signed()


class RowAligner(wiring.Component):
    """Re-cut a flat row-major stream into row-aligned beats.

    A matrix is announced by one ``shape`` beat, then arrives as ``ceil(rows * row_length / lanes)`` flat beats
    (the final one padded) and leaves as ``rows * ceil(row_length / lanes)`` row beats. At most one row boundary
    is handled per cycle, so with ``row_length >= lanes`` the output keeps up with the input except for one extra
    beat per row whose length is not a multiple of ``lanes``. A shape beat is taken a cycle after it is first
    offered, once the previous matrix has left.

    Parameters
    ----------
    lanes : int
        Elements per beat, 1 to 16.
    width : int
        Bits per element.

    Attributes
    ----------
    shape : In(stream of :func:`shape_layout`)
    flat : In(stream of ArrayLayout(width, lanes))
    rows : Out(stream of :func:`row_layout`)
    """

    def __init__(self, lanes, width=BF16.width):
        if not isinstance(lanes, int) or not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be an integer from 1 to {MAX_LANES}, not {lanes!r}")
        self.lanes, self.width = lanes, width
        super().__init__({
            "shape": In(stream.Signature(shape_layout())),
            "flat": In(stream.Signature(flat_layout(lanes, width))),
            "rows": Out(stream.Signature(row_layout(lanes, width))),
        })

    def _one_beat(self, length):
        """``min(length, lanes)``, by a comparison with a constant."""
        lanes = self.lanes
        return Mux(at_least(length, lanes), lanes, length[:lanes.bit_length()])

    def _first_beat(self, length):
        """``need`` and ``row_end`` of a row's first beat, by comparisons of its length with constants."""
        return self._one_beat(length), ~at_least(length, self.lanes + 1)

    def _low(self, value, less):
        """``(value - less) % 2 ** lanes.bit_length()`` for a constant ``less``: a short subtraction, no long carry
        chain (every use wants a result from 0 to ``lanes``)."""
        count_bits = self.lanes.bit_length()
        return (value[:count_bits] - less)[:count_bits]

    def _second_beat(self, row_ends, first, at_least_two, less_one):
        """``need`` of the beat after one: ``first`` (a row's first beat) if that one ends its row, else the
        row's ``length`` left at that beat less one beat, from ``at_least_two`` (``length >= 2 * lanes``) and
        ``less_one`` (``_low(length, lanes)``)."""
        return Mux(row_ends, first, Mux(at_least_two, self.lanes, less_one))

    def elaborate(self, platform):
        m = Module()
        lanes, width = self.lanes, self.width
        count_bits = lanes.bit_length()   # a count of elements, 0 to `lanes`
        slots = 3 * lanes   # room for a beat whatever this cycle emits, so `flat.ready` comes from registers

        active = Signal()
        row_length = Signal(32)
        rows_left = Signal(32)          # rows not yet fully emitted
        to_read = Signal(32)            # flat elements not yet taken from the input
        held = Signal(range(slots + 1))  # elements in the holding buffer
        # the holding buffer is circular: elements are read from slot `read_at` on and written from `read_at + held`
        # (modulo `slots`) on, so which slot takes which element depends on registers only, never on this cycle's
        # handshake (a shift by the emitted count would be a long path behind `ready`). Every input beat of a matrix
        # but its final one carries `lanes` elements, so the write position is always a multiple of `lanes`: the
        # buffer is three banks of `lanes` slots, and a beat fills one bank whole. The read position is kept as a
        # bank and an offset in it (`read_at = lanes * read_bank + read_offset`)
        buffer = Signal(data.ArrayLayout(width, slots))
        read_bank = Signal(3, init=1)               # one-hot
        read_offset = Signal(range(max(lanes, 2)))
        write_bank = Signal(3, init=1)              # one-hot: the bank the next input beat fills

        # what the next beat emits, kept in registers one beat ahead (long compares stay off the handshake)
        rest = Signal(32)               # elements of the current row not yet emitted
        need = Signal(range(lanes + 1))
        row_end = Signal()
        final_row = Signal()            # rows_left == 1
        incoming = Signal(range(lanes + 1))   # real elements in the next input beat
        more = Signal()                 # to_read != 0, kept as a register (a 32-bit test in front of `flat.ready`)
        # held - need: its sign says whether enough is held for the next beat (no compare in front of `emit`), and
        # each of its next values is one carry chain from registers (see `_add3`)
        surplus = Signal(range(-lanes, slots + 1))
        enough = ~surplus[-1]
        after_need = Signal(range(lanes + 1))   # `need` of the beat after the next one, planned a beat ahead


        # the first beat's plan from the shape beat, worked out a cycle before the beat is taken: its comparisons
        # and the negation behind them stay off `surplus` (a long path from the shape's row length otherwise). A
        # beat is taken only once it has been offered for a cycle (`shape_seen`; its payload
        # is held while it waits), which costs a cycle only when a shape beat finds the aligner idle
        payload = self.shape.payload
        shape_seen = Signal()
        planned_need, planned_row_end = Signal.like(need), Signal()
        planned_surplus, planned_after = Signal.like(surplus), Signal.like(after_need)
        first_need_in, first_row_end_in = self._first_beat(payload.row_length)
        m.d.sync += [
            shape_seen.eq(self.shape.valid & ~self.shape.ready),
            planned_need.eq(first_need_in), planned_row_end.eq(first_row_end_in),
            planned_surplus.eq(-first_need_in),
            planned_after.eq(self._second_beat(first_row_end_in, first_need_in,
                                               at_least(payload.row_length, 2 * lanes),
                                               self._low(payload.row_length, lanes))),
        ]
        with m.If(~active):
            m.d.comb += self.shape.ready.eq(shape_seen)
            with m.If(self.shape.valid & shape_seen):
                m.d.sync += [
                    active.eq(payload.rows != 0),
                    row_length.eq(payload.row_length),
                    rows_left.eq(payload.rows),
                    final_row.eq(payload.rows == 1),
                    to_read.eq(payload.elements),
                    more.eq(payload.elements != 0),
                    incoming.eq(self._one_beat(payload.elements)),
                    rest.eq(payload.row_length),
                    held.eq(0),
                    read_bank.eq(1),
                    read_offset.eq(0),
                    write_bank.eq(1),
                ]
                m.d.sync += [need.eq(planned_need), row_end.eq(planned_row_end), surplus.eq(planned_surplus),
                             after_need.eq(planned_after)]

        # buffer[read_at + lane], in two steps: the window of the read bank and the one after it (a 3:1 choice per
        # slot), then `lanes` elements of it from the offset on (a `lanes`:1 choice per lane), not a 3 * lanes:1 one
        window = [Signal(width, name=f"window_{e}") for e in range(2 * lanes)]
        for e, element in enumerate(window):
            choices = [buffer[(b + e // lanes) % 3 * lanes + e % lanes] & read_bank[b].replicate(width)
                       for b in range(3)]
            m.d.comb += element.eq(choices[0] | choices[1] | choices[2])
        reads = [Signal(width, name=f"read_{lane}") for lane in range(lanes)]
        with m.Switch(read_offset):
            for offset in range(lanes):
                with m.Case(offset):
                    m.d.comb += [element.eq(window[offset + lane]) for lane, element in enumerate(reads)]

        # emit: the rest of the row, at most one beat of it
        last = row_end & final_row
        out_free = ~self.rows.valid | self.rows.ready
        emit = Signal()
        m.d.comb += emit.eq(active & enough & out_free)
        # the beats after an emitted one: the next row's first or this row's rest less a beat, all planned by
        # comparisons of registers with constants; `after_need` is kept a beat ahead so that the next `surplus`
        # comes from registers only
        rest_less = rest - lanes
        first_need, first_row_end = self._first_beat(row_length)
        next_row_end = Mux(row_end, first_row_end, ~at_least(rest, 2 * lanes + 1))
        with m.If(emit):
            m.d.sync += [
                self.rows.valid.eq(1),
                self.rows.payload.row_end.eq(row_end),
                self.rows.payload.last.eq(last),
            ]
            advanced = read_offset + need   # below 2 * lanes: the read crosses into the next bank at most once
            crossed = at_least(advanced, lanes)
            m.d.sync += [
                rest.eq(Mux(row_end, row_length, rest_less)),
                need.eq(after_need),
                row_end.eq(next_row_end),
                # the row has `rest` left after this beat: row_length at a row's end, else rest - lanes
                after_need.eq(self._second_beat(
                    next_row_end, first_need,
                    Mux(row_end, at_least(row_length, 2 * lanes), at_least(rest, 3 * lanes)),
                    Mux(row_end, self._low(row_length, lanes), self._low(rest, 2 * lanes)))),
                read_bank.eq(Mux(crossed, read_bank.rotate_left(1), read_bank)),
                read_offset.eq(Mux(crossed, advanced - lanes, advanced)),
            ]
            for lane, element in enumerate(reads):
                m.d.sync += self.rows.payload.data[lane].eq(Mux(lane < need, element, 0))
            with m.If(row_end):
                m.d.sync += [rows_left.eq(rows_left - 1), final_row.eq(rows_left == 2)]
                with m.If(last):
                    m.d.sync += active.eq(0)
        with m.Elif(self.rows.ready):
            m.d.sync += self.rows.valid.eq(0)

        # ready from registers only: with at most 2 * lanes held, a whole beat fits in the free bank whatever this
        # cycle emits, so every lane of it is written (the final beat's padding lanes land in free slots, never read)
        m.d.comb += self.flat.ready.eq(active & more & ~at_least(held, 2 * lanes + 1))
        accept = self.flat.valid & self.flat.ready
        for i in range(3):
            with m.If(accept & write_bank[i]):
                m.d.sync += [buffer[i * lanes + j].eq(self.flat.payload[j]) for j in range(lanes)]
        # the count after this cycle: each outcome from registers, the handshake only selects one
        with m.If(accept):
            # every beat but the final one carries `lanes` elements, so the count falls by a constant and the next
            # beat's size comes from comparing the register with constants: `incoming` is not on a carry chain
            # back into itself (`to_read - incoming` then `left < lanes` would be two chains in series)
            left_over = at_least(to_read, lanes + 1)   # this beat is not the final one
            left = to_read - lanes
            # (held - need + incoming is surplus + incoming; after an emitted beat, `need` becomes `after_need`)
            m.d.sync += [held.eq(Mux(emit, surplus + incoming, held + incoming)),
                         surplus.eq(Mux(emit, _add3(surplus, incoming, after_need), surplus + incoming)),
                         to_read.eq(Mux(left_over, left, 0)),
                         incoming.eq(Mux(at_least(to_read, 2 * lanes), lanes, left[:count_bits])), more.eq(left_over),
                         write_bank.eq(write_bank.rotate_left(1))]
        with m.Elif(active):   # (not while idle: the shape beat sets `held` and `surplus`)
            m.d.sync += [held.eq(Mux(emit, surplus, held)), surplus.eq(Mux(emit, surplus - after_need, surplus))]
        return m
