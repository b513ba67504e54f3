"""The memory side of an external-memory port for simulation: DRAM timing from a :class:`~.dram_model.DramModel`,
read data from a stream the testbench fills in request order, write data out as a log of (address, word).

An accelerator issues its read requests in a fixed program order, so a testbench that can only feed precomputed
input streams and collect output streams (Amaranth's simulator, or the Verilator stream harness) can supply the
words of every read in that order and rebuild the memory image from the log of writes; the simulated design holds
no memory image. The timing is the DRAM model's: requests are served in order, one at a time, each word moves in
the cycle the DRAM schedule puts it on the bus (:func:`edge_qlora.golden.dram.data_beats`), and a word that cannot
move holds the DRAM's clock. Simulation only: never built for a board.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..constants import DramTiming
from .dram_model import TIME_BITS, DramModel, DramModelConfig
from .memport import MemPortConfig, MemPortSignature

__all__ = ["DramPort", "written_layout", "QUEUE_DEPTH"]

#: Requests each side remembers between their command and their final word. The DRAM model takes a command only
#: once the previous one has issued its last column command, and a word is due at most ``max(cl, cwl) +
#: burst_cycles`` cycles after its column command, so no more than a few requests are ever in flight.
QUEUE_DEPTH = 8


def written_layout(config):
    """One word of the write log: its byte ``address`` (word-aligned) and its ``data``."""
    return data.StructLayout({"address": unsigned(config.address_width), "data": unsigned(config.data_width)})


class DramPort(wiring.Component):
    """A DRAM behind a :class:`~.memport.MemPortSignature`, with read data supplied and write data logged.

    Commands. The DRAM model serves one in-order stream of requests; the port fills it from ``read_cmd`` and
    ``write_cmd`` by one rule: in a cycle the model can take a request, it is offered the write request when
    ``write_cmd`` is valid, else the read request. A write request offered in the same cycle as a read request
    therefore always goes first (the accelerator offers a write only once the burst's data is buffered, so a write
    never holds the memory waiting for its data). Byte addresses become word addresses (``address >> word_shift``,
    modulo the DRAM's capacity for the timing; the log keeps the port's full address); lengths pass through.

    Read data. ``read_data`` carries the DRAM's read words with their payload from ``fill``: a word leaves when the
    DRAM has it on the bus, ``fill`` holds a word and ``read_data`` is ready, and ``fill`` is taken with it. If
    ``fill`` is empty or ``read_data`` not ready, the DRAM's clock is held (:class:`~.dram_model.DramModel`).
    ``last`` marks each request's final word (the requests' lengths wait in a queue).

    Write data. A word the DRAM takes from ``write_data`` also leaves on ``written`` with its byte address, in the
    same cycle; ``written`` not ready holds the DRAM's clock like a missing ``write_data`` word. ``write_data.last``
    is not looked at: the port counts each burst's words from its request.

    Latency. The port adds none: without stalls, word ``j`` of the ``i``-th request taken (in the order of the
    rule above) moves at cycle ``data_beats(timing, requests)[i][j]`` of the golden model, cycle 0 being the first
    clock edge after reset with a request offered from it. This holds when the queues of lengths and addresses,
    whose entries show two cycles after they are written, are never late: read data comes ``cl >= 2`` cycles after
    its request is taken, and write data either in the same cycle (``cwl == 0``, served without the queue) or
    ``cwl >= 2`` cycles later. Both presets qualify; with ``cl == 1`` or ``cwl == 1`` a word may wait a cycle.

    Parameters
    ----------
    port_config : MemPortConfig
        Its ``data_width`` must be the DRAM model's word (``timing.data_width * timing.words_per_cycle``), its
        ``boundary`` at most one DRAM row (``timing.row_bytes``), so that a request never crosses a row.
    timing : DramTiming

    Attributes
    ----------
    port : In(MemPortSignature(port_config))
        The memory side: ``read_cmd``, ``write_cmd`` and ``write_data`` come in, ``read_data`` goes out.
    fill : In(stream of ``unsigned(data_width)``)
        The words of the read requests, in request order.
    written : Out(stream of :func:`written_layout`)
        Every word written, in order, with its byte address.
    read_words : Out(48)
        Words delivered on ``read_data``.
    write_words : Out(48)
        Words taken from ``write_data`` (and logged on ``written``).
    now : Out(48)
        The DRAM model's clock (the golden model's time: it stands still while a stall holds the memory).
    """

    def __init__(self, port_config, timing):
        if not isinstance(port_config, MemPortConfig):
            raise TypeError(f"port_config must be a MemPortConfig, not {port_config!r}")
        if not isinstance(timing, DramTiming):
            raise TypeError(f"timing must be a DramTiming, not {timing!r}")
        model_config = DramModelConfig(timing, depth=2)    # the store is unused: read data comes from `fill`
        if port_config.data_width != model_config.word_width:
            raise ValueError(f"port_config.data_width ({port_config.data_width}) must equal the DRAM model's word "
                             f"width ({model_config.word_width} bits: {timing.data_width} x {timing.words_per_cycle}"
                             f" words per cycle of {timing.name!r})")
        if port_config.boundary > timing.row_bytes:
            raise ValueError(f"port_config.boundary ({port_config.boundary} bytes) exceeds one DRAM row "
                             f"({timing.row_bytes} bytes of {timing.name!r}): a request could cross a row")
        self.port_config, self.timing, self.model_config = port_config, timing, model_config
        super().__init__({
            "port": In(MemPortSignature(port_config)),
            "fill": In(stream.Signature(unsigned(port_config.data_width))),
            "written": Out(stream.Signature(written_layout(port_config))),
            "read_words": Out(TIME_BITS),
            "write_words": Out(TIME_BITS),
            "now": Out(TIME_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.port_config
        shift = cfg.word_shift
        length_bits = cfg.max_burst.bit_length()
        burst_layout = data.StructLayout({"address": unsigned(cfg.address_width - shift),
                                          "length": unsigned(length_bits)})
        port, read_cmd, write_cmd = self.port, self.port.read_cmd.payload, self.port.write_cmd.payload

        # --- registers: the place in the read burst being delivered and in the write burst being logged
        read_beat = Signal(length_bits)                       # words of the head read request delivered
        write_address = Signal(cfg.address_width - shift)     # word address of the next word to log
        write_left = Signal(length_bits)                      # words of the current write burst still to log

        # --- submodules: the DRAM and the two queues of requests waiting for their words
        m.submodules.dram = dram = DramModel(self.model_config)
        m.submodules.read_lengths = read_lengths = SyncFIFOBuffered(width=length_bits, depth=QUEUE_DEPTH)
        m.submodules.write_bursts = write_bursts = SyncFIFOBuffered(width=burst_layout.size, depth=QUEUE_DEPTH)
        queued_write = data.View(burst_layout, write_bursts.r_stream.payload)
        m.d.comb += self.now.eq(dram.now)

        # --- commands: a write request wins; a request is taken only when its queue has room
        write_first = port.write_cmd.valid
        with m.If(write_first):
            m.d.comb += [dram.cmd.valid.eq(write_bursts.w_stream.ready),
                         dram.cmd.payload.address.eq(write_cmd.address[shift:]),
                         dram.cmd.payload.length.eq(write_cmd.length),
                         dram.cmd.payload.write.eq(1)]
        with m.Else():
            m.d.comb += [dram.cmd.valid.eq(port.read_cmd.valid & read_lengths.w_stream.ready),
                         dram.cmd.payload.address.eq(read_cmd.address[shift:]),
                         dram.cmd.payload.length.eq(read_cmd.length)]
        m.d.comb += [
            port.write_cmd.ready.eq(dram.cmd.ready & write_bursts.w_stream.ready),
            port.read_cmd.ready.eq(dram.cmd.ready & ~write_first & read_lengths.w_stream.ready),
        ]
        # the DRAM model drops a request of no words, so no word will ever come for it: it is not queued
        write_taken = Signal()
        m.d.comb += write_taken.eq(port.write_cmd.valid & port.write_cmd.ready & (write_cmd.length != 0))
        m.d.comb += [
            read_lengths.w_stream.valid.eq(port.read_cmd.valid & ~write_first & dram.cmd.ready
                                           & (read_cmd.length != 0)),
            read_lengths.w_stream.payload.eq(read_cmd.length),
        ]

        # --- read data: the DRAM's timing, the fill's payload, `last` from the head request's length
        read_final = Signal()
        read_moves = Signal()
        m.d.comb += [
            read_final.eq(read_beat + 1 == read_lengths.r_stream.payload),
            port.read_data.valid.eq(dram.rdata.valid & self.fill.valid & read_lengths.r_stream.valid),
            port.read_data.payload.data.eq(self.fill.payload),
            port.read_data.payload.last.eq(read_final),
            dram.rdata.ready.eq(port.read_data.ready & self.fill.valid & read_lengths.r_stream.valid),
            self.fill.ready.eq(port.read_data.ready & dram.rdata.valid & read_lengths.r_stream.valid),
            read_moves.eq(port.read_data.valid & port.read_data.ready),
            read_lengths.r_stream.ready.eq(read_moves & read_final),
        ]
        with m.If(read_moves):
            m.d.sync += [read_beat.eq(Mux(read_final, 0, read_beat + 1)), self.read_words.eq(self.read_words + 1)]

        # --- write data: the address of the word the DRAM may take now. With cwl == 0 a write's first word is due
        # in the cycle its request is taken, before any queue could show it: a request that finds nothing ahead of
        # it is logged from the port directly and never queued.
        nothing_ahead = (write_left == 0) & (write_bursts.level == 0)
        head_address = Signal.like(write_address)
        head_valid = Signal()
        with m.If(write_left != 0):
            m.d.comb += [head_address.eq(write_address), head_valid.eq(1)]
        with m.Elif(write_bursts.level != 0):
            m.d.comb += [head_address.eq(queued_write.address), head_valid.eq(write_bursts.r_stream.valid)]
        with m.Else():
            m.d.comb += [head_address.eq(write_cmd.address[shift:]), head_valid.eq(write_taken)]
        m.d.comb += [
            write_bursts.w_stream.valid.eq(port.write_cmd.valid & dram.cmd.ready & (write_cmd.length != 0)
                                           & ~nothing_ahead),
            write_bursts.w_stream.payload.eq(Cat(write_cmd.address[shift:], write_cmd.length)),
            write_bursts.r_stream.ready.eq(write_left == 0),
        ]

        # a write word moves only when the DRAM takes it and the log takes it too
        write_moves = Signal()
        m.d.comb += [
            dram.wdata.valid.eq(port.write_data.valid & self.written.ready & head_valid),
            dram.wdata.payload.eq(port.write_data.payload.data),
            port.write_data.ready.eq(dram.wdata.ready & self.written.ready & head_valid),
            self.written.valid.eq(dram.wdata.ready & port.write_data.valid & head_valid),
            self.written.payload.address.eq(Cat(Const(0, shift), head_address)),
            self.written.payload.data.eq(port.write_data.payload.data),
            write_moves.eq(self.written.valid & self.written.ready),
        ]
        with m.If(write_left != 0):
            with m.If(write_moves):
                m.d.sync += [write_address.eq(write_address + 1), write_left.eq(write_left - 1)]
        with m.Elif(write_bursts.r_stream.valid):
            m.d.sync += [write_address.eq(queued_write.address + write_moves),
                         write_left.eq(queued_write.length - write_moves)]
        with m.Elif(nothing_ahead & write_taken):
            m.d.sync += [write_address.eq(write_cmd.address[shift:] + write_moves),
                         write_left.eq(write_cmd.length - write_moves)]
        with m.If(write_moves):
            m.d.sync += self.write_words.eq(self.write_words + 1)
        return m
