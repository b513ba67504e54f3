"""Width converters between an external-memory port's words and the elements the engines consume or produce.

:class:`Unpacker` turns the words of a read job (``memport.BurstReader``'s ``data``) into row segments of
``lanes`` elements for the matrix loaders and the NF4 dequantizer; :class:`Packer` turns a stream of result
elements into the words of a write job (``memport.BurstWriter``'s ``data``). Both follow the port's little-endian
order: the first element (or the first word of a wide element) sits in the low bits.

:func:`unpack_words` and :func:`pack_elements` are their Python twins, beat for beat.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UNPACKER_WORD_WIDTHS", "UNPACKER_ELEM_WIDTHS", "PACKER_WORD_WIDTHS", "unpacker_job_layout",
           "segment_layout", "packer_job_layout", "word_layout", "Unpacker", "Packer", "unpack_words",
           "pack_elements", "connect_nf4_codes"]

UNPACKER_WORD_WIDTHS = (8, 16, 32, 64, 128)
UNPACKER_ELEM_WIDTHS = (4, 8, 16, 32)
PACKER_WORD_WIDTHS = UNPACKER_WORD_WIDTHS


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _power_of_two(value):
    return _is_int(value) and value >= 1 and value & (value - 1) == 0


def _log2(value):
    return value.bit_length() - 1


def unpacker_job_layout(count_width=32):
    """An unpacking job: ``count`` elements in rows of ``cols`` elements (``cols >= count``: one row), each
    ``count_width`` bits."""
    return data.StructLayout({"count": unsigned(count_width), "cols": unsigned(count_width)})


def segment_layout(elem_width, lanes):
    """A row segment: ``count`` elements in ``data[0:count]`` (the other lanes zero), ``row_end`` on a row's final
    segment, ``last`` on the job's final segment."""
    return data.StructLayout({"data": data.ArrayLayout(elem_width, lanes), "count": range(lanes + 1),
                              "row_end": 1, "last": 1})


def packer_job_layout():
    """A packing job: ``count`` elements."""
    return data.StructLayout({"count": unsigned(32)})


def word_layout(word_width):
    """A memory word and ``last``, the job's final word (``memport.beat_layout`` for the same width)."""
    return data.StructLayout({"data": unsigned(word_width), "last": 1})


def connect_nf4_codes(m, words, unpacker_words):
    """Connect a stream of port words holding bitsandbytes' packed NF4 codes to a 4-bit :class:`Unpacker`'s
    ``words``: bitsandbytes puts a byte's first weight in its high nibble and the unpacker takes low bits first,
    so each byte's two nibbles swap on the way."""
    word = words.payload
    swapped = Cat(*(Cat(word[8 * k + 4:8 * k + 8], word[8 * k:8 * k + 4]) for k in range(len(word) // 8)))
    m.d.comb += [unpacker_words.valid.eq(words.valid), words.ready.eq(unpacker_words.ready),
                 unpacker_words.payload.eq(swapped)]


def _window(value, offset, elem_width, elems):
    """``elems`` elements of ``value`` from element ``offset`` on (zeros past its end). The shift is in whole
    elements, one two-way mux per bit of ``offset``, the largest step first so that each stage is only as wide as
    the stages after it still need."""
    for k in reversed(range(len(offset))):
        keep = (elems + (1 << k) - 1) * elem_width
        step = elem_width << k
        value = Mux(offset[k], value[step:step + keep], value[:keep])
    return value[:elems * elem_width]


class Unpacker(wiring.Component):
    """Memory words in, row segments of up to ``lanes`` elements out.

    A job of ``count`` elements arrives as ``ceil(count * elem_width / word_width)`` words (no word is shared with
    the next job; elements past ``count`` in the final word are dropped). When ``elem_width <= word_width``, element
    ``i`` of a word is its bits ``[i * elem_width, (i + 1) * elem_width)``; otherwise an element is
    ``elem_width / word_width`` consecutive words, the first in the low bits. The elements leave in rows of
    ``cols``: each beat carries the next ``min(lanes, elements left in the row)`` of them, so a row is
    ``ceil(cols / lanes)`` beats and no beat spans two rows.

    When a word holds one element or less, each element is written straight into its lane of the beat on offer
    (``lanes * elem_width`` bits, no data multiplexer). When a word holds several, the elements wait in an
    assembly register of ``word_width + lanes * elem_width`` bits: a word enters at its top end, shifting the rest
    down by a whole word, and a beat is read through a window at the oldest element, a shifter in whole elements
    (log2(lanes + elements per word) stages). Rows need not align with words or lanes.

    Throughput, output always ready and words always offered: the slower of one word per cycle and one beat per
    cycle, whatever the row length (a beat per cycle when ``word_width / elem_width >= lanes``); between jobs, two
    idle cycles on ``segments`` (the next job is taken the cycle after the final beat, its first word the cycle
    after that).

    Parameters
    ----------
    word_width : int
        Bits of a memory word: 8, 16, 32, 64 or 128.
    elem_width : int
        Bits of an element: 4, 8, 16 or 32.
    lanes : int
        Elements per beat, a power of two from 1 to 16.
    count_width : int
        Bits of a job's ``count`` and ``cols``, 8 to 32: the unit's counters are that wide (a user whose jobs are
        short saves their logic).

    Attributes
    ----------
    job : In(stream of :func:`unpacker_job_layout` of ``count_width``)
        ``count`` and ``cols`` of at least 1 (``cols`` 0 is taken as one row; a job of ``count`` 0 is dropped:
        it takes no word and gives no beat). The next job is taken after the previous job's final beat.
    words : In(stream of ``unsigned(word_width)``)
    segments : Out(stream of :func:`segment_layout`)
    """

    def __init__(self, word_width, elem_width, lanes, count_width=32):
        if word_width not in UNPACKER_WORD_WIDTHS or not _is_int(word_width):
            raise ValueError(f"word_width must be one of {UNPACKER_WORD_WIDTHS}, not {word_width!r}")
        if elem_width not in UNPACKER_ELEM_WIDTHS or not _is_int(elem_width):
            raise ValueError(f"elem_width must be one of {UNPACKER_ELEM_WIDTHS}, not {elem_width!r}")
        if not _power_of_two(lanes) or lanes > 16:
            raise ValueError(f"lanes must be a power of two from 1 to 16, not {lanes!r}")
        if not _is_int(count_width) or not 8 <= count_width <= 32:
            raise ValueError(f"count_width must be an integer from 8 to 32, not {count_width!r}")
        self.word_width, self.elem_width, self.lanes = word_width, elem_width, lanes
        self.count_width = count_width
        super().__init__({
            "job": In(stream.Signature(unpacker_job_layout(count_width))),
            "words": In(stream.Signature(unsigned(word_width))),
            "segments": Out(stream.Signature(segment_layout(elem_width, lanes))),
        })

    @property
    def elems_per_word(self):
        """Elements in one word (1 when an element spans several words)."""
        return max(1, self.word_width // self.elem_width)

    @property
    def words_per_elem(self):
        """Words in one element (1 when a word holds one or more elements)."""
        return max(1, self.elem_width // self.word_width)

    def elaborate(self, platform):
        m = Module()
        E, W, L = self.elem_width, self.word_width, self.lanes
        P, R = self.elems_per_word, self.words_per_elem   # elements stored at once; words per store
        C = self.count_width

        busy = Signal()
        need_row = Signal()              # a job was just taken: its first row is loaded in the next cycle
        seg_left = Signal(C)             # elements of the current row not yet sent (the job's end cuts a row)
        after = Signal(C)                # elements of the job after the current row
        final_row = Signal()             # the current row is the job's last
        cols = Signal(C)
        words_left = Signal(C + _log2(R))
        more_words = Signal()            # words_left != 0
        # the beat's size and whether it ends its row are registered with `seg_left`, so that the handshakes
        # depend on a few small registers only
        n = Signal(range(L + 1))
        row_end = Signal()

        segment = self.segments.payload
        m.d.comb += [
            segment.count.eq(n),
            segment.row_end.eq(row_end),
            segment.last.eq(row_end & final_row),
        ]
        beat = Signal()
        m.d.comb += beat.eq(self.segments.valid & self.segments.ready)
        job_done = beat & row_end & final_row

        # --- words in; for wide elements, the first R - 1 words of an element wait in `partial`
        if R > 1:
            chunk = Signal(range(R))
            partial = Signal(E - W)
            completes = chunk == R - 1
            group = Cat(partial, self.words.payload)     # P = 1 element
        else:
            completes = Const(1)
            group = self.words.payload                   # P elements
        room = Signal()                                  # the store can take a group this cycle
        store = Signal()
        m.d.comb += [
            self.words.ready.eq(busy & more_words & (~completes | room)),
            store.eq(self.words.valid & self.words.ready & completes),
        ]
        with m.If(self.words.valid & self.words.ready):
            m.d.sync += [words_left.eq(words_left - 1), more_words.eq(words_left != 1)]
            if R > 1:
                m.d.sync += [chunk.eq(chunk + 1), partial.eq(Cat(partial[W:], self.words.payload))]

        if P == 1:
            # One element at a time: it is written straight into its lane of the beat on offer, no data mux. The
            # beat is offered once `n` lanes are filled; the element arriving as it leaves starts the next beat
            # in lane 0, and the lanes are cleared as it leaves so that a short beat's unused lanes read zero.
            lanes = Signal(data.ArrayLayout(E, L))
            fill = Signal(range(L + 1))
            position = Mux(beat, 0, fill)
            m.d.comb += [
                self.segments.valid.eq(busy & ~need_row & (fill == n)),
                segment.data.eq(lanes),
                room.eq(~self.segments.valid | beat),
            ]
            with m.If(beat):
                m.d.sync += fill.eq(0)
            with m.If(store):
                m.d.sync += fill.eq(position + 1)
            for lane in range(L):
                # only lane 0 is ever written in the cycle its beat leaves (the next beat starts there)
                with m.If(store & (position == lane)):
                    m.d.sync += lanes[lane].eq(group)
                with m.Elif(beat):
                    m.d.sync += lanes[lane].eq(0)
        else:
            # Several elements a word: they wait at the top of a register of P + L elements, the oldest at
            # element `oldest`, the newest at its top. A word enters at the top, shifting the rest down by a whole
            # word; a beat is read through a window at `oldest` (the one variable shifter, in whole elements) and
            # leaves by moving `oldest` up. Rows need not align with words or lanes: the register runs on across
            # row ends without a gap.
            Q = L + P
            buffer = Signal(Q * E)
            oldest = Signal(range(Q + 1), init=Q)
            window = _window(buffer, oldest, E, L)
            popped = Mux(beat, n, 0)
            m.d.comb += [
                self.segments.valid.eq(busy & ~need_row & (oldest + n <= Q)),
                # counting the beat leaving this cycle keeps a word per cycle flowing while the register is
                # nearly full
                room.eq(oldest + popped >= P),
            ]
            for lane in range(L):
                m.d.comb += segment.data[lane].eq(Mux(lane < n, window[lane * E:(lane + 1) * E], 0))
            with m.If(store):
                m.d.sync += buffer.eq(Cat(buffer[P * E:], group))
            m.d.sync += oldest.eq(oldest + popped - Mux(store, P, 0))
            with m.If(job_done):
                # elements past `count` in the final word are dropped with the job
                m.d.sync += oldest.eq(Q)

        # --- rows and jobs: a row is loaded the cycle after its job is taken (its first word cannot have gone
        # into the store before then) and with the final beat of the row before, so rows follow without a gap
        with m.If(job_done):
            m.d.sync += busy.eq(0)
        load_row = need_row | (beat & row_end & ~final_row)
        short = after <= cols
        with m.If(load_row):
            m.d.sync += [need_row.eq(0), after.eq(Mux(short, 0, after - cols)), final_row.eq(short)]
        seg_next = Signal(C)
        m.d.comb += seg_next.eq(Mux(load_row, Mux(short, after, cols), seg_left - L))  # n is L inside a row
        with m.If(load_row | (beat & ~row_end)):
            m.d.sync += [seg_left.eq(seg_next), row_end.eq(seg_next <= L), n.eq(Mux(seg_next <= L, seg_next, L))]

        job = self.job.payload
        job_cols = Mux(job.cols == 0, (1 << C) - 1, job.cols)
        if R > 1:
            job_words = job.count << _log2(R)
        else:
            job_words = (job.count + (P - 1)) >> _log2(P)
        m.d.comb += self.job.ready.eq(~busy)
        with m.If(self.job.valid & self.job.ready & (job.count != 0)):
            m.d.sync += [
                busy.eq(1),
                need_row.eq(1),
                after.eq(job.count),
                cols.eq(job_cols),
                words_left.eq(job_words),
                more_words.eq(1),
            ]
        return m


class Packer(wiring.Component):
    """Elements in, memory words out: the inverse of :class:`Unpacker` without rows.

    A job of ``count`` elements becomes ``ceil(count * elem_width / word_width)`` words, ``last`` on the final one.
    An element wider than a word splits into ``elem_width / word_width`` words, low bits first; narrower elements
    share a word, element 0 in the low bits, and a job's final word is padded with zero bits when the elements do
    not fill it.

    Throughput, output always ready and elements always offered: a word per cycle when an element is at least a
    word, an element per cycle when it is narrower; between jobs, two idle cycles on ``words``.

    Parameters
    ----------
    elem_width : int
        Bits of an element, a power of two from 8 to 512.
    word_width : int
        Bits of a memory word: 8, 16, 32, 64 or 128.

    Attributes
    ----------
    job : In(stream of :func:`packer_job_layout`)
        A job of ``count`` 0 is dropped (it takes no element and gives no word). The next job is taken after the
        previous job's final word.
    elements : In(stream of ``unsigned(elem_width)``)
    words : Out(stream of :func:`word_layout`)
    """

    def __init__(self, elem_width, word_width):
        if not _power_of_two(elem_width) or not 8 <= elem_width <= 512:
            raise ValueError(f"elem_width must be a power of two from 8 to 512, not {elem_width!r}")
        if word_width not in PACKER_WORD_WIDTHS or not _is_int(word_width):
            raise ValueError(f"word_width must be one of {PACKER_WORD_WIDTHS}, not {word_width!r}")
        self.elem_width, self.word_width = elem_width, word_width
        super().__init__({
            "job": In(stream.Signature(packer_job_layout())),
            "elements": In(stream.Signature(unsigned(elem_width))),
            "words": Out(stream.Signature(word_layout(word_width))),
        })

    def elaborate(self, platform):
        m = Module()
        E, W = self.elem_width, self.word_width
        busy = Signal()                  # the job's final word has not left yet
        elem_left = Signal(32)           # elements of the job not yet taken
        final = elem_left == 1
        # the word on offer; when an element is at least a word wide it is the whole element, shifting down a
        # word at a time
        word = Signal(max(E, W))
        word_valid = Signal()
        word_last = Signal()             # the word (or element) is the job's last
        take = Signal()
        accept = Signal()
        m.d.comb += [
            self.words.valid.eq(word_valid),
            self.words.payload.data.eq(word[:W]),
            take.eq(self.words.valid & self.words.ready),
            accept.eq(self.elements.valid & self.elements.ready),
        ]
        with m.If(accept):
            m.d.sync += elem_left.eq(elem_left - 1)

        if E >= W:
            R = E // W
            if R > 1:
                chunk = Signal(range(R))
                drained = chunk == R - 1
                with m.If(take):
                    m.d.sync += [chunk.eq(chunk + 1), word.eq(word[W:])]
            else:
                drained = Const(1)
            m.d.comb += [
                self.words.payload.last.eq(word_last & drained),
                self.elements.ready.eq(busy & (elem_left != 0) & (~word_valid | (take & drained))),
            ]
            with m.If(take & drained):
                m.d.sync += word_valid.eq(0)
            with m.If(accept):
                m.d.sync += [word.eq(self.elements.payload), word_valid.eq(1), word_last.eq(final)]
        else:
            # the first P - 1 elements of a word wait in slots written in place (a decoder, no data mux);
            # the element that completes the word joins them on its way into the output register
            P = W // E
            slots = Signal(data.ArrayLayout(E, P - 1))
            slot = Signal(range(P))
            completes = (slot == P - 1) | final
            assembled = Cat(*(Mux(slot == i, self.elements.payload, slots[i]) for i in range(P - 1)),
                            Mux(slot == P - 1, self.elements.payload, 0))
            m.d.comb += [
                self.words.payload.last.eq(word_last),
                self.elements.ready.eq(busy & (elem_left != 0) & (~completes | ~word_valid | take)),
            ]
            with m.If(take):
                m.d.sync += word_valid.eq(0)
            with m.If(accept):
                with m.If(completes):
                    # slots above the completing element are still zero: the padding of a short final word
                    m.d.sync += [word.eq(assembled), word_valid.eq(1), word_last.eq(final), slot.eq(0),
                                 slots.eq(0)]
                with m.Else():
                    m.d.sync += slot.eq(slot + 1)
                    for i in range(P - 1):
                        with m.If(slot == i):
                            m.d.sync += slots[i].eq(self.elements.payload)

        with m.If(take & self.words.payload.last):
            m.d.sync += busy.eq(0)

        m.d.comb += self.job.ready.eq(~busy)
        with m.If(self.job.valid & self.job.ready & (self.job.payload.count != 0)):
            m.d.sync += [busy.eq(1), elem_left.eq(self.job.payload.count)]
        return m


def unpack_words(words, word_width, elem_width, lanes, count, cols):
    """The beats :class:`Unpacker` gives for one job, as ``(data, count, row_end, last)`` tuples (``data``: a list
    of ``lanes`` ints, unused lanes 0)."""
    if count <= 0:
        return []
    cols = cols or count
    expected = -(-count * elem_width // word_width)
    if len(words) != expected:
        raise ValueError(f"a job of {count} elements of {elem_width} bits takes {expected} words of {word_width} "
                         f"bits, not {len(words)}")
    elements = []
    if elem_width <= word_width:
        for word in words:
            elements += [word >> (i * elem_width) & ((1 << elem_width) - 1)
                         for i in range(word_width // elem_width)]
    else:
        per = elem_width // word_width
        for k in range(0, len(words), per):
            elements.append(sum(word << (j * word_width) for j, word in enumerate(words[k:k + per])))
    elements = elements[:count]
    beats = []
    for start in range(0, count, cols):
        row = elements[start:start + cols]
        for at in range(0, len(row), lanes):
            segment = row[at:at + lanes]
            row_end = at + lanes >= len(row)
            beats.append((segment + [0] * (lanes - len(segment)), len(segment), row_end,
                          row_end and start + cols >= count))
    return beats


def pack_elements(elements, elem_width, word_width):
    """The words :class:`Packer` gives for one job of ``elements``, as ``(word, last)`` tuples."""
    words = []
    if elem_width >= word_width:
        for element in elements:
            words += [element >> (j * word_width) & ((1 << word_width) - 1)
                      for j in range(elem_width // word_width)]
    else:
        per = word_width // elem_width
        for k in range(0, len(elements), per):
            words.append(sum(element << (i * elem_width) for i, element in enumerate(elements[k:k + per])))
    return [(word, i == len(words) - 1) for i, word in enumerate(words)]
