"""The external-memory port: burst requests and their data as streams, and the two movers that use it (twin of
the job descriptor: ``golden/memmap.py``; protocol: ``docs/memory-map.md``).

The step accelerator reaches external memory (the ULX3S's 16-bit SDR SDRAM, a DDR3 controller's wider user port,
or a testbench's memory) through one port of four streams, seen from the accelerator:

* ``read_cmd`` (out): a burst read request, :func:`request_layout`: a **byte** address and a length in **beats**
  (words of ``data_width`` bits), 1 to ``max_burst``.
* ``read_data`` (in): the words of the read bursts, in request order, ``last`` on each burst's final beat.
* ``write_cmd`` (out): a burst write request, the same layout.
* ``write_data`` (out): the words of the write bursts, in request order, ``last`` on each burst's final beat. A
  burst's data never leads its command: the memory side may take a command, then its beats.

Addresses are in bytes so that a job descriptor (``golden/memmap.py``) means the same on a 16-bit and a 128-bit bus;
a request's address is word-aligned (its low ``log2(data_width / 8)`` bits are zero). A request never crosses a
multiple of ``boundary`` bytes (a DRAM row: one row activation per burst) and is never longer than ``max_burst``.
Bytes are little-endian within a word: byte ``address + i`` is bits ``8 i .. 8 i + 7`` of the word.

:class:`BurstReader` turns a (base, bytes) job into such requests and forwards the returned words as one stream with
``last`` on the job's final word; :class:`BurstWriter` does the same for writes.
"""

from dataclasses import dataclass

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

__all__ = ["TaggedReader", "tagged_job_layout", "port_for", "MemPortConfig", "ULX3S_SDRAM_PORT", "request_layout", "beat_layout", "job_layout", "MemPortSignature",
           "BurstReader", "BurstWriter", "WriteArbiter", "split_bursts", "take_descriptor", "DistributedFIFO"]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _power_of_two(value):
    return _is_int(value) and value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class MemPortConfig:
    """Shape of an external-memory port.

    Parameters
    ----------
    address_width : int
        Bits of a byte address: 25 for the ULX3S's 32 MB.
    data_width : int
        Bits of a data word, a power of two from 8: 16 for the ULX3S's SDRAM bus, wider for an internal bus.
    max_burst : int
        Most beats in one request.
    boundary : int
        Bytes, a power of two at least a word: no request crosses a multiple of it (a DRAM row: 1024 bytes on the
        ULX3S, 512 columns of 16 bits). At most ``2 ** address_width``.
    """

    address_width: int = 25
    data_width: int = 16
    max_burst: int = 64
    boundary: int = 1024

    def __post_init__(self):
        if not _is_int(self.address_width) or not 4 <= self.address_width <= 48:
            raise ValueError(f"MemPortConfig.address_width must be an integer from 4 to 48, not {self.address_width!r}")
        if not _power_of_two(self.data_width) or self.data_width < 8:
            raise ValueError(f"MemPortConfig.data_width must be a power of two from 8 bits, not {self.data_width!r}")
        if not _is_int(self.max_burst) or self.max_burst < 1:
            raise ValueError(f"MemPortConfig.max_burst must be a positive integer, not {self.max_burst!r}")
        if not _power_of_two(self.boundary) or self.boundary < self.word_bytes:
            raise ValueError(f"MemPortConfig.boundary must be a power of two of at least one word "
                             f"({self.word_bytes} bytes), not {self.boundary!r}")
        if self.boundary > 1 << self.address_width:
            raise ValueError(f"MemPortConfig.boundary ({self.boundary}) exceeds the address space "
                             f"(2 ** {self.address_width} bytes)")

    @property
    def word_bytes(self):
        return self.data_width // 8

    @property
    def word_shift(self):
        """log2 of :attr:`word_bytes`: a byte address shifted right by it is a word address."""
        return self.word_bytes.bit_length() - 1

    @property
    def capacity(self):
        """Bytes the address reaches."""
        return 1 << self.address_width


def port_for(timing, max_burst=64):
    """The port a DRAM (a ``DramTiming``) gets: the data of one controller cycle a word (16 bits for the ULX3S's
    SDR SDRAM, 64 for the ECPIX-5's DDR3 behind a 1:2 PHY), its capacity addressed, its rows the boundary."""
    return MemPortConfig(address_width=(timing.capacity_bytes - 1).bit_length(),
                         data_width=timing.data_width * timing.words_per_cycle, max_burst=max_burst,
                         boundary=timing.row_bytes)


#: The ULX3S's SDRAM: 32 MB, 16-bit words, rows of 1024 bytes.
ULX3S_SDRAM_PORT = MemPortConfig()


def request_layout(config):
    """A burst request: ``address`` in bytes (word-aligned), ``length`` in beats (1 to ``max_burst``)."""
    return data.StructLayout({"address": unsigned(config.address_width),
                              "length": unsigned(config.max_burst.bit_length())})


def beat_layout(config):
    """A data beat: one word and ``last`` (a burst's final beat on the port; a job's final beat out of a mover)."""
    return data.StructLayout({"data": unsigned(config.data_width), "last": 1})


def job_layout(config):
    """A mover's job: ``address`` in bytes (its low bits, below a word, are ignored) and ``bytes``, rounded up to
    whole words (a job of 0 bytes moves nothing)."""
    return data.StructLayout({"address": unsigned(config.address_width),
                              "bytes": unsigned(config.address_width + 1)})


class MemPortSignature(wiring.Signature):
    """The external-memory port as seen from the accelerator (``.flip()`` for the memory side).

    Members
    -------
    read_cmd : Out(stream of :func:`request_layout`)
    read_data : In(stream of :func:`beat_layout`)
    write_cmd : Out(stream of :func:`request_layout`)
    write_data : Out(stream of :func:`beat_layout`)
    """

    def __init__(self, config):
        if not isinstance(config, MemPortConfig):
            raise TypeError(f"config must be a MemPortConfig, not {config!r}")
        self.config = config
        super().__init__({
            "read_cmd": Out(stream.Signature(request_layout(config))),
            "read_data": In(stream.Signature(beat_layout(config))),
            "write_cmd": Out(stream.Signature(request_layout(config))),
            "write_data": Out(stream.Signature(beat_layout(config))),
        })

    def __eq__(self, other):
        return type(other) is MemPortSignature and other.config == self.config

    def __hash__(self):
        return hash((MemPortSignature, self.config))

    def __repr__(self):
        return f"MemPortSignature({self.config!r})"


def take_descriptor(m, descriptor):
    """A unit's job descriptor, taken one at a time: returns ``(head, running, start, reporting)``, the
    descriptor held from the cycle after it is taken, a flag set then (the unit clears it when its job is done and
    sets ``reporting``, which it clears when its report has left), and ``start``, a pulse in the first cycle
    ``head`` holds it. ``descriptor`` is ready while neither flag is set."""
    head = Signal(descriptor.payload.shape())
    running, start, reporting = Signal(), Signal(), Signal()
    m.d.comb += descriptor.ready.eq(~running & ~reporting)
    m.d.sync += start.eq(0)
    with m.If(descriptor.valid & descriptor.ready):
        m.d.sync += [head.eq(descriptor.payload), running.eq(1), start.eq(1)]
    return head, running, start, reporting


def split_bursts(config, address, size):
    """The requests a mover issues for a job, as ``(address, length)`` pairs: the Python statement of the split
    (tests and the cycle model use it)."""
    if size <= 0:
        return []
    address &= ~(config.word_bytes - 1)
    words = -(-size // config.word_bytes)
    bursts = []
    while words:
        to_boundary = (config.boundary - address % config.boundary) // config.word_bytes
        length = min(words, config.max_burst, to_boundary)
        bursts.append((address, length))
        address += length * config.word_bytes
        words -= length
    return bursts


class _Splitter:
    """The registers and logic that cut a job into requests, shared by the reader and the writer (plain logic in
    the mover's own module: no level of hierarchy)."""

    def __init__(self, config):
        self.config = config
        words_bits = config.address_width + 2 - config.word_shift
        self.address = Signal(config.address_width)
        self.words_left = Signal(words_bits)
        self.length = Signal(config.max_burst.bit_length())   # of the next request, from registers

    def job_words(self, job):
        shift = self.config.word_shift
        return ((job.bytes + (self.config.word_bytes - 1)) >> shift)[:len(self.words_left)]

    def elaborate(self, m):
        config, shift = self.config, self.config.word_shift
        boundary_words = config.boundary // config.word_bytes
        row_bits = boundary_words.bit_length() - 1
        to_boundary = Signal(range(boundary_words + 1))
        m.d.comb += to_boundary.eq(boundary_words - self.address[shift:shift + row_bits] if row_bits else 1)
        capped = Signal.like(self.length)
        m.d.comb += capped.eq(Mux(self.words_left < config.max_burst, self.words_left, config.max_burst))
        m.d.comb += self.length.eq(Mux(to_boundary < capped, to_boundary, capped))

    def start(self, m, job, words):
        shift = self.config.word_shift
        m.d.sync += [self.address.eq(job.address >> shift << shift), self.words_left.eq(words)]

    def advance(self, m):
        m.d.sync += [self.address.eq(self.address + (self.length << self.config.word_shift)),
                     self.words_left.eq(self.words_left - self.length)]


class BurstReader(wiring.Component):
    """Read jobs: each (address, bytes) job becomes burst read requests, and its words come out as one stream.

    Requests run ahead of the data: up to ``jobs_in_flight`` jobs may have requests out whose words have not all
    come back. The words pass through without a register (``read_data.ready`` is ``data.ready`` while a job's
    words are expected).

    Parameters
    ----------
    config : MemPortConfig
    jobs_in_flight : int
        Jobs whose word counts are queued between the request side and the data side.

    Attributes
    ----------
    job : In(stream of :func:`job_layout`)
    read_cmd : Out(stream of :func:`request_layout`), to the port's ``read_cmd``
    read_data : In(stream of :func:`beat_layout`), from the port's ``read_data`` (its ``last`` is not needed)
    data : Out(stream of :func:`beat_layout`), ``last`` on each job's final word
    """

    def __init__(self, config, jobs_in_flight=4):
        if not isinstance(config, MemPortConfig):
            raise TypeError(f"config must be a MemPortConfig, not {config!r}")
        if not _is_int(jobs_in_flight) or jobs_in_flight < 1:
            raise ValueError(f"jobs_in_flight must be a positive integer, not {jobs_in_flight!r}")
        self.config, self.jobs_in_flight = config, jobs_in_flight
        super().__init__({
            "job": In(stream.Signature(job_layout(config))),
            "read_cmd": Out(stream.Signature(request_layout(config))),
            "read_data": In(stream.Signature(beat_layout(config))),
            "data": Out(stream.Signature(beat_layout(config))),
        })

    def elaborate(self, platform):
        m = Module()
        split = _Splitter(self.config)
        split.elaborate(m)
        busy = Signal()                             # requests of the current job still to issue
        remaining = Signal.like(split.words_left)   # words of the job being returned still to forward

        # each job's word count goes to the data side through a queue, so requests may run ahead of the data
        m.submodules.counts = counts = SyncFIFOBuffered(width=len(split.words_left), depth=self.jobs_in_flight)
        job = self.job.payload
        words = split.job_words(job)
        m.d.comb += [
            self.job.ready.eq(~busy & counts.w_stream.ready),
            counts.w_stream.valid.eq(self.job.valid & ~busy & (words != 0)),
            counts.w_stream.payload.eq(words),
        ]
        with m.If(self.job.valid & self.job.ready & (words != 0)):
            split.start(m, job, words)
            m.d.sync += busy.eq(1)

        m.d.comb += [
            self.read_cmd.valid.eq(busy),
            self.read_cmd.payload.address.eq(split.address),
            self.read_cmd.payload.length.eq(split.length),
        ]
        with m.If(self.read_cmd.valid & self.read_cmd.ready):
            split.advance(m)
            m.d.sync += busy.eq(split.words_left != split.length)

        # data side: forward the words of the job at the head of the queue, `last` on its final word
        active = remaining != 0
        final = remaining == 1
        beat = Signal()
        m.d.comb += [
            self.data.valid.eq(self.read_data.valid & active),
            self.read_data.ready.eq(self.data.ready & active),
            self.data.payload.data.eq(self.read_data.payload.data),
            self.data.payload.last.eq(final),
            beat.eq(self.data.valid & self.data.ready),
            counts.r_stream.ready.eq(~active | (beat & final)),
        ]
        with m.If(beat):
            m.d.sync += remaining.eq(remaining - 1)
        with m.If(counts.r_stream.valid & counts.r_stream.ready):
            m.d.sync += remaining.eq(counts.r_stream.payload)
        return m


class BurstWriter(wiring.Component):
    """Write jobs: each (address, bytes) job becomes burst write requests, each followed by its words from ``data``.

    The job says how many words it takes (``ceil(bytes / word_bytes)``); ``data`` carries just the words. A
    burst's command is issued before its data, one burst at a time; the next job is taken once the previous one's
    final word has gone out.

    Parameters
    ----------
    config : MemPortConfig

    Attributes
    ----------
    job : In(stream of :func:`job_layout`)
    data : In(stream of ``unsigned(data_width)``)
    write_cmd : Out(stream of :func:`request_layout`), to the port's ``write_cmd``
    write_data : Out(stream of :func:`beat_layout`), to the port's ``write_data``, ``last`` on each burst's end
    """

    def __init__(self, config):
        if not isinstance(config, MemPortConfig):
            raise TypeError(f"config must be a MemPortConfig, not {config!r}")
        self.config = config
        super().__init__({
            "job": In(stream.Signature(job_layout(config))),
            "data": In(stream.Signature(unsigned(config.data_width))),
            "write_cmd": Out(stream.Signature(request_layout(config))),
            "write_data": Out(stream.Signature(beat_layout(config))),
        })

    def elaborate(self, platform):
        m = Module()
        split = _Splitter(self.config)
        split.elaborate(m)
        busy = Signal()                         # the job's final word has not gone out yet
        burst_left = Signal.like(split.length)  # words of the issued burst still to send

        job = self.job.payload
        words = split.job_words(job)
        m.d.comb += self.job.ready.eq(~busy)
        with m.If(self.job.valid & self.job.ready & (words != 0)):
            split.start(m, job, words)
            m.d.sync += busy.eq(1)

        in_burst = burst_left != 0
        m.d.comb += [
            self.write_cmd.valid.eq(busy & ~in_burst),
            self.write_cmd.payload.address.eq(split.address),
            self.write_cmd.payload.length.eq(split.length),
        ]
        with m.If(self.write_cmd.valid & self.write_cmd.ready):
            split.advance(m)
            m.d.sync += burst_left.eq(split.length)

        final = burst_left == 1
        m.d.comb += [
            self.write_data.valid.eq(self.data.valid & in_burst),
            self.data.ready.eq(self.write_data.ready & in_burst),
            self.write_data.payload.data.eq(self.data.payload),
            self.write_data.payload.last.eq(final),
        ]
        with m.If(self.write_data.valid & self.write_data.ready):
            m.d.sync += burst_left.eq(burst_left - 1)
            with m.If(final & (split.words_left == 0)):
                m.d.sync += busy.eq(0)
        return m


class WriteArbiter(wiring.Component):
    """Several writers' bursts onto one port's writes: a burst's command is granted whole, then its writer's data
    until the burst's ``last`` beat, and only then the next command; when several commands wait, the writer with
    the lowest index goes first.

    A writer should offer a command only when its burst's words are ready to follow (the blocked product's staged
    writes), so that the port never waits inside a burst for a writer while another one waits with its words.

    Parameters
    ----------
    config : MemPortConfig
    writers : int
        2 to 8.

    Attributes
    ----------
    cmds : In(stream of :func:`request_layout`), one per writer
    beats : In(stream of :func:`beat_layout`), one per writer
    write_cmd : Out(stream of :func:`request_layout`), to the port's ``write_cmd``
    write_data : Out(stream of :func:`beat_layout`), to the port's ``write_data``
    """

    def __init__(self, config, writers=2):
        if not isinstance(config, MemPortConfig):
            raise TypeError(f"config must be a MemPortConfig, not {config!r}")
        if not _is_int(writers) or not 2 <= writers <= 8:
            raise ValueError(f"writers must be an integer from 2 to 8, not {writers!r}")
        self.config, self.writers = config, writers
        cmd, beat = stream.Signature(request_layout(config)), stream.Signature(beat_layout(config))
        super().__init__({"cmds": In(cmd).array(writers), "beats": In(beat).array(writers),
                          "write_cmd": Out(cmd), "write_data": Out(beat)})

    def elaborate(self, platform):
        m = Module()
        busy, owner = Signal(), Signal(range(self.writers))
        chosen = Signal(range(self.writers))
        for i in reversed(range(self.writers)):
            with m.If(self.cmds[i].valid):
                m.d.comb += chosen.eq(i)
        for i in range(self.writers):
            with m.If(~busy & (chosen == i)):
                m.d.comb += [self.write_cmd.valid.eq(self.cmds[i].valid),
                             self.write_cmd.payload.eq(self.cmds[i].payload),
                             self.cmds[i].ready.eq(self.write_cmd.ready)]
            with m.If(busy & (owner == i)):
                m.d.comb += [self.write_data.valid.eq(self.beats[i].valid),
                             self.write_data.payload.eq(self.beats[i].payload),
                             self.beats[i].ready.eq(self.write_data.ready)]
        with m.If(self.write_cmd.valid & self.write_cmd.ready):
            m.d.sync += [busy.eq(1), owner.eq(chosen)]
        with m.If(self.write_data.valid & self.write_data.ready & self.write_data.payload.last):
            m.d.sync += busy.eq(0)
        return m


def tagged_job_layout(config, destinations):
    """A :class:`TaggedReader` job: :func:`job_layout` and the index of the destination its words go to."""
    return data.StructLayout({"address": unsigned(config.address_width),
                              "bytes": unsigned(config.address_width + 1),
                              "dest": unsigned(max(1, (destinations - 1).bit_length()))})


class DistributedFIFO(SyncFIFOBuffered):
    """A :class:`~amaranth.lib.fifo.SyncFIFOBuffered` whose storage asks for LUT RAM (``ram_style``): a FIFO of a
    few kbit would otherwise take a whole block RAM."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        m.submodules.storage.attrs["ram_style"] = "distributed"
        return m


class TaggedReader(wiring.Component):
    """Read jobs for several destinations over one port, without head-of-line blocking.

    Each job names a destination; its bursts' words go to that destination's FIFO. A burst is requested only when
    its destination's FIFO has room for all of its words beyond what earlier requests have reserved, so the
    port's in-order read data never waits for a consumer, and a consumer that waits for a later destination's
    words cannot block the words it waits for. Words that cross a FIFO are counted per destination.

    Parameters
    ----------
    config : MemPortConfig
    depths : tuple of int
        Words of each destination's FIFO, each at least ``config.max_burst``.
    bursts_in_flight : int
        Requests whose words have not all come back.
    ram_styles : tuple of str, optional
        Per destination, where its FIFO goes: ``"block"`` (the default: the tools choose, a block RAM for a FIFO
        of a hundred words or more) or ``"distributed"`` (LUT RAM).

    Attributes
    ----------
    job : In(stream of :func:`tagged_job_layout`)
    read_cmd : Out(stream of :func:`request_layout`), to the port's ``read_cmd``
    read_data : In(stream of :func:`beat_layout`), from the port's ``read_data`` (``last`` on each burst's end)
    dest : Out(stream of ``unsigned(data_width)``), an array of ``len(depths)``
    words : Out(48), an array of ``len(depths)``: words delivered to each destination so far
    starved : Out(1)
        A burst is ready to be requested but its destination has no room: the memory waits for the consumer.
    idle : Out(1)
        No job is being split and no requested word is outstanding.
    """

    def __init__(self, config, depths, bursts_in_flight=8, ram_styles=None):
        if not isinstance(config, MemPortConfig):
            raise TypeError(f"config must be a MemPortConfig, not {config!r}")
        depths = tuple(depths)
        if not depths or not all(_is_int(d) and d >= config.max_burst for d in depths):
            raise ValueError(f"depths must be one or more FIFO depths of at least max_burst ({config.max_burst}) "
                             f"words, not {depths!r}")
        if not _is_int(bursts_in_flight) or bursts_in_flight < 1:
            raise ValueError(f"bursts_in_flight must be a positive integer, not {bursts_in_flight!r}")
        ram_styles = ("block",) * len(depths) if ram_styles is None else tuple(ram_styles)
        if len(ram_styles) != len(depths) or not set(ram_styles) <= {"block", "distributed"}:
            raise ValueError(f"ram_styles must give 'block' or 'distributed' for each of the {len(depths)} "
                             f"destinations, not {ram_styles!r}")
        self.config, self.depths, self.bursts_in_flight = config, depths, bursts_in_flight
        self.ram_styles = ram_styles
        n = len(depths)
        super().__init__({
            "job": In(stream.Signature(tagged_job_layout(config, n))),
            "read_cmd": Out(stream.Signature(request_layout(config))),
            "read_data": In(stream.Signature(beat_layout(config))),
            "dest": Out(stream.Signature(unsigned(config.data_width))).array(n),
            "words": Out(48).array(n),
            "starved": Out(1),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        config, n = self.config, len(self.depths)
        split = _Splitter(config)
        split.elaborate(m)
        busy = Signal()
        dest = Signal(range(max(2, n)))
        fifos = []
        for i, (depth, style) in enumerate(zip(self.depths, self.ram_styles)):
            kind = DistributedFIFO if style == "distributed" else SyncFIFOBuffered
            fifo = m.submodules[f"fifo_{i}"] = kind(width=config.data_width, depth=depth)
            wiring.connect(m, fifo.r_stream, wiring.flipped(self.dest[i]))
            fifos.append(fifo)
        m.submodules.tags = tags = SyncFIFOBuffered(width=len(dest), depth=self.bursts_in_flight)

        job = self.job.payload
        words = split.job_words(job)
        m.d.comb += self.job.ready.eq(~busy)
        with m.If(self.job.valid & self.job.ready & (words != 0)):
            split.start(m, job, words)
            m.d.sync += [busy.eq(1), dest.eq(job.dest)]

        # room: a FIFO's free words less the words requested for it and not yet arrived
        reserved = [Signal(range(depth + 1), name=f"reserved_{i}") for i, depth in enumerate(self.depths)]
        room = Signal()
        for i, fifo in enumerate(fifos):
            with m.If(dest == i):
                m.d.comb += room.eq(fifo.level + reserved[i] + split.length <= fifo.depth)
        request = busy & tags.w_stream.ready
        m.d.comb += [
            self.read_cmd.valid.eq(request & room),
            self.read_cmd.payload.address.eq(split.address),
            self.read_cmd.payload.length.eq(split.length),
            tags.w_stream.valid.eq(self.read_cmd.valid & self.read_cmd.ready),
            tags.w_stream.payload.eq(dest),
            self.starved.eq(request & ~room),
        ]
        issued = self.read_cmd.valid & self.read_cmd.ready
        with m.If(issued):
            split.advance(m)
            m.d.sync += busy.eq(split.words_left != split.length)

        # data: to the FIFO of the burst at the head of the tag queue
        head = tags.r_stream.payload
        beat = self.read_data.valid & self.read_data.ready
        m.d.comb += [self.read_data.ready.eq(tags.r_stream.valid),
                     tags.r_stream.ready.eq(beat & self.read_data.payload.last)]
        for i, fifo in enumerate(fifos):
            arrive = beat & (head == i)
            m.d.comb += [fifo.w_stream.valid.eq(arrive), fifo.w_stream.payload.eq(self.read_data.payload.data)]
            add = Mux(issued & (dest == i), split.length, 0)
            m.d.sync += reserved[i].eq(reserved[i] + add - arrive)
            with m.If(arrive):
                m.d.sync += self.words[i].eq(self.words[i] + 1)
        m.d.comb += self.idle.eq(~busy & ~tags.r_stream.valid)
        return m
