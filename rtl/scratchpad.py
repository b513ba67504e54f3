"""Matrix scratchpad: a matrix in ``banks`` memories, readable along rows and along columns at full rate
(twin: ``golden/scratchpad.py``).

Element ``(row, col)`` of a matrix lives in bank ``(row + col) % banks`` at word
``base + row * row_words + col // banks`` (``row_words = ceil(cols / banks)``): a diagonal layout, so any
``banks`` consecutive elements of a row, and any ``banks`` consecutive elements of a column, sit in different
banks. One read per port per cycle returns such a segment in order; one write per cycle stores a row segment.
That is what the LoRA controller needs to feed the GEMM engine ``x``, ``x^T``, ``h``, ``h^T`` ... from the same
copy.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["MatrixStore", "ReadPort", "WritePort", "segment_layout"]


def segment_layout(banks, address_width):
    """A segment request: ``count`` (0..banks) elements from ``(row, col)`` along the row, or down the column
    with ``column`` set. ``row_address`` is ``base + row * row_words`` of the matrix (the requester keeps it as a
    running sum, so the store needs no multiplier); ``row_words`` is ``ceil(cols / banks)``."""
    return data.StructLayout({
        "row_address": address_width, "row_words": address_width, "row": 16, "col": 16,
        "column": 1, "count": range(banks + 1),
    })


class ReadPort(wiring.Signature):
    """A segment read, from the reader's side: ``request`` and ``en`` out, ``data`` (the segment, in order) in.

    The read is a two-stage pipeline that moves on cycles with ``en``: a request's data is in ``data`` after the
    second ``en`` cycle counting its own. Elements past ``count`` read as zero.

    Parameters
    ----------
    banks, width, address_width : int
        Elements per segment, bits per element, bits of a word address.
    """

    def __init__(self, banks, width, address_width):
        super().__init__({
            "request": Out(segment_layout(banks, address_width)),
            "en": Out(1),
            "data": In(data.ArrayLayout(width, banks)),
        })


class WritePort(wiring.Signature):
    """A row segment write, from the writer's side: ``request`` (``column`` clear), ``en`` and ``data`` out;
    ``data[e]`` is element ``col + e``."""

    def __init__(self, banks, width, address_width):
        super().__init__({
            "request": Out(segment_layout(banks, address_width)),
            "en": Out(1),
            "data": Out(data.ArrayLayout(width, banks)),
        })


class MatrixStore(wiring.Component):
    """Diagonally banked matrix memory with segment reads and row-segment writes.

    Parameters
    ----------
    banks : int
        A power of two, 1 to 16: the longest segment.
    width : int
        Bits per element.
    depth : int
        Words per bank (the store holds ``banks * depth`` elements, for one or several matrices).
    read_ports : int
        Independent read ports.

    Attributes
    ----------
    read : In(:class:`ReadPort`), an array of ``read_ports``
        Independent segment reads: ``read[i].request``, ``read[i].en`` in, ``read[i].data`` out.
    write : In(:class:`WritePort`)
        Row segment writes.
    latency : int
        2: the memory read, then the rotation into order (registered).
    """

    def __init__(self, banks, width, depth, read_ports=1):
        if banks not in (1, 2, 4, 8, 16):
            raise ValueError(f"banks must be a power of two from 1 to 16, not {banks!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, not {width!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, not {depth!r}")
        if not isinstance(read_ports, int) or read_ports < 1:
            raise ValueError(f"read_ports must be a positive integer, not {read_ports!r}")
        self.banks, self.width, self.depth, self.read_ports = banks, width, depth, read_ports
        self.address_width = max(1, (depth - 1).bit_length())
        self.latency = 2
        super().__init__({
            "read": In(ReadPort(banks, width, self.address_width)).array(read_ports),
            "write": In(WritePort(banks, width, self.address_width)),
        })

    def _placement(self, m, request, name):
        """Per bank: which element of the segment it holds (``index``), whether it holds one, and its word."""
        banks = self.banks
        shift = banks.bit_length() - 1
        mask = banks - 1
        rotation = (request.row + request.col)[:shift] if banks > 1 else 0
        placements = []
        for bank in range(banks):
            index = Signal(range(banks), name=f"{name}_index_{bank}")
            m.d.comb += index.eq((bank - rotation) & mask if banks > 1 else 0)
            live = index < request.count
            # along a row: word of col + index; down a column: word of col in row + index (index < 16: a few adds)
            col_word = (request.col >> shift)
            carry = ((request.col & mask) + index) >> shift if banks > 1 else 0
            step = sum(Mux(index[b], request.row_words << b, 0) for b in range(shift)) if banks > 1 else 0
            offset = Mux(request.column, col_word + step, col_word + carry)
            address = Signal(self.address_width, name=f"{name}_address_{bank}")
            m.d.comb += address.eq(request.row_address + offset)
            placements.append((index, live, address))
        return placements

    def elaborate(self, platform):
        m = Module()
        banks, width = self.banks, self.width
        memories = [Memory(shape=width, depth=self.depth, init=[]) for _ in range(banks)]
        for bank, memory in enumerate(memories):
            m.submodules[f"bank_{bank}"] = memory

        # writes: element index e of the segment goes to bank (row + col + e) % banks
        write = self.write
        for bank, (index, live, address) in enumerate(self._placement(m, write.request, "write")):
            port = memories[bank].write_port()
            m.d.comb += [
                port.addr.eq(address),
                port.data.eq(write.data[index] if banks > 1 else write.data[0]),
                port.en.eq(write.en & live),
            ]

        for i, read in enumerate(self.read):
            request, enable, out = read.request, read.en, read.data
            placement = self._placement(m, request, f"read_{i}")
            ports = [memory.read_port(domain="sync") for memory in memories]
            for (_, _, address), port in zip(placement, ports):
                m.d.comb += [port.addr.eq(address), port.en.eq(enable)]
            # element e of the segment is in bank (row + col + e) % banks, and only e < count is live: hold the
            # rotation and the count beside the memory read, then rotate back into segment order with a barrel
            # rotator (log2(banks) levels of two-way multiplexers) and zero the tail; registered on `en` too, so
            # that a stalled user (en low) finds its data where it left it
            shift = banks.bit_length() - 1
            rotation = Signal(range(banks), name=f"read_{i}_rotation")
            count = Signal(range(banks + 1), name=f"read_{i}_count")
            with m.If(enable):
                m.d.sync += count.eq(request.count)
                if shift:
                    m.d.sync += rotation.eq((request.row + request.col)[:shift])
            lanes = [port.data for port in ports]
            for level in range(shift):
                step = 1 << level
                lanes = [Mux(rotation[level], lanes[(e + step) % banks], lanes[e]) for e in range(banks)]
            for e in range(banks):
                with m.If(enable):
                    m.d.sync += out[e].eq(Mux(e < count, lanes[e], 0))
        return m
