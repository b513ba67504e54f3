"""The LoRA step fed through an external-memory port: :class:`~.step.LoraStep` behind a read sequencer, a write
sequencer and the width converters between the port's words and the step's streams (twin of the request order:
``golden/memprogram.py``).

One job descriptor (the step's header and the byte address of every tensor, ``golden/memmap.py``) starts a step.
The read sequencer walks the read program (x, dy, A, B whole; the NF4 weight once per engine pass in groups of 256
blocks, absmax2, absmax, codes; the AdamW moments in groups of 64 elements) into a :class:`~..memport.TaggedReader`,
whose per-destination FIFOs feed :class:`~..gearbox.Unpacker` units and those the step's input streams. The write
sequencer walks the write program (y and dx one output row of a tile per request, then the new masters and moments
in groups of 64) into a :class:`~..memport.BurstWriter`, its data taken from :class:`~..gearbox.Packer` units in
request order. The order depends on the descriptor only, never on timing. When the last word is written, one
``report`` beat gives the step's cycles, stall cycles and words moved per tensor.

The scratchpads stay on chip (every tensor but the weight crosses the port once), so the shapes are bounded by the
:class:`~.config.LoraConfig` as for :class:`~.step.LoraStep`; the token-blocked dataflow of ``golden/traffic.py``
is the next step.
"""

from dataclasses import dataclass, replace
from types import SimpleNamespace

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..gearbox import Packer, Unpacker, connect_nf4_codes
from ..memport import BurstWriter, MemPortConfig, MemPortSignature, TaggedReader, job_layout, tagged_job_layout
from .config import LoraConfig, Phase, header_layout
from .step import LoraStep

__all__ = ["MemStepConfig", "for_memory", "MemStep", "ReadSequencer", "WriteSequencer", "ADDRESSES", "READS",
           "WRITES", "WEIGHT_GROUP", "STATE_GROUP", "UPDATE_BYTES", "address_layout", "descriptor_layout",
           "sizes_layout", "report_layout"]

#: Blocks per group of the weight stream (one absmax2 value) and elements per group of the update's transfers
#: (``golden/memprogram.py`` has the same).
WEIGHT_GROUP = 256
STATE_GROUP = 64
#: Write jobs the write sequencer may run ahead of the burst writer.
_JOBS_AHEAD = 4

#: Byte addresses in the descriptor: the tensors read, then the tensors written (``*_out``; equal to the inputs'
#: when the update is in place).
ADDRESSES = ("codes", "absmax", "absmax2", "x", "dy", "a", "b", "m_a", "v_a", "m_b", "v_b",
             "y", "dx", "a_out", "b_out", "m_a_out", "v_a_out", "m_b_out", "v_b_out")

#: The read destinations, in the order of the reader's FIFOs and the report's counters.
READS = ("x", "dy", "a", "b", "absmax2", "absmax", "codes", "m", "v")
#: The write sources, likewise.
WRITES = ("y", "dx", "param", "m", "v")


class _Read(enum.Enum, shape=4):
    """The read sequencer's place in its program: each state sends at most one read job and one unpacker job."""
    IDLE = 0
    X = 1
    DY = 2
    A = 3
    B = 4
    PASS_CODES = 5     # a weight pass starts: its codes job to the unpacker
    PASS_ABSMAX = 6    # ... and its absmax job
    ABSMAX2 = 7
    ABSMAX = 8
    CODES = 9
    STATE_M = 10       # A's or B's moments start: their unpacker jobs
    STATE_V = 11
    M = 12
    V = 13
    DONE = 14


class _Write(enum.Enum, shape=3):
    """The write sequencer's place in its program."""
    IDLE = 0
    Y = 1
    DX = 2
    PARAM = 3
    M = 4
    V = 5
    DONE = 6


@dataclass(frozen=True)
class MemStepConfig:
    """Elaboration parameters of :class:`MemStep`: the step's and the port's.

    ``fifo_words``: words of each read destination's FIFO (at least the port's ``max_burst``).
    """

    step: LoraConfig = LoraConfig(rows=2, cols=2)
    port: MemPortConfig = MemPortConfig()
    fifo_words: int = 128

    def __post_init__(self):
        if not isinstance(self.step, LoraConfig):
            raise TypeError(f"MemStepConfig.step must be a LoraConfig, not {self.step!r}")
        if not isinstance(self.port, MemPortConfig):
            raise TypeError(f"MemStepConfig.port must be a MemPortConfig, not {self.port!r}")
        cols = self.step.cols
        if cols & (cols - 1) or cols * BF16.width < self.port.data_width:
            raise ValueError(f"the engine's columns ({cols}) must be a power of two whose bf16 output row fills "
                             f"whole port words ({self.port.data_width} bits)")
        if self.step.rows & (self.step.rows - 1):
            raise ValueError(f"the engine's rows ({self.step.rows}) must be a power of two")
        if not isinstance(self.fifo_words, int) or self.fifo_words < self.port.max_burst:
            raise ValueError(f"MemStepConfig.fifo_words must be at least the port's max_burst "
                             f"({self.port.max_burst}), not {self.fifo_words!r}")
        if self.port.word_bytes > 16:
            raise ValueError("the port word must be at most 16 bytes (absmax2 values are picked out of one word)")

    @property
    def adamw(self):
        return self.step.optimizer == "adamw"


#: Bytes of external memory each element's update moves: AdamW reads the two moments and writes the parameter and
#: both moments (float32); SGD writes the parameter.
UPDATE_BYTES = {"adamw": 20, "sgd": 4}


def for_memory(step, port):
    """The :class:`MemStepConfig` of ``step`` (a :class:`LoraConfig`) behind ``port``, its optimizer taking one
    element every as many cycles as the port needs for the element's traffic at one word a cycle (a power of two,
    at most 8): the update is memory-bound at that pace anyway, and the slower core shares its float units among
    more of an element's operations (on the ULX3S's 16-bit SDRAM an AdamW element moves 10 words: 8 cycles, one
    multiplier and one adder instead of eight and four)."""
    words = max(1, UPDATE_BYTES[step.optimizer] // port.word_bytes)
    interval = min(8, 1 << (words.bit_length() - 1))
    return MemStepConfig(step=replace(step, optimizer_interval=interval), port=port)


def address_layout(config):
    """The byte address of every tensor (:data:`ADDRESSES`)."""
    return data.StructLayout({name: config.port.address_width for name in ADDRESSES})


def descriptor_layout(config):
    """Payload of ``descriptor``: the step's header and the byte address of every tensor."""
    return data.StructLayout({"header": header_layout(), "address": address_layout(config)})


#: The step's sizes, registered by the top once per step for both sequencers: tokens and features, elements of
#: x, dy, A and B, NF4 weights and blocks, weight passes of F2 (and again of B4).
sizes_layout = data.StructLayout({"t": 16, "d_in": 16, "d_out": 16, "r": 16, "x": 32, "dy": 32, "a": 32, "b": 32,
                                  "n": 32, "blocks": 32, "passes": 16})


def report_layout():
    """Payload of ``report``, one beat per step: cycles from the descriptor to the last word written; cycles in
    which the step waited for memory (``memory``) and the memory for the step (``compute``); words read per
    destination (:data:`READS`) and written per source (:data:`WRITES`)."""
    return data.StructLayout({"cycles": 40, "memory": 40, "compute": 40,
                              **{f"read_{n}": 40 for n in READS}, **{f"write_{n}": 40 for n in WRITES}})


def _ceil_shift(value, shift):
    return (value + ((1 << shift) - 1)) >> shift


def _log2(n):
    return n.bit_length() - 1


class _Sender:
    """A stream whose beat is offered while a sequencer state wants it and has not sent it yet in that state: the
    state advances once every stream it wants has sent (in this cycle or an earlier one)."""

    def __init__(self, m, stream_):
        self.stream, self.wants, self.sent = stream_, Signal(), Signal()
        m.d.comb += stream_.valid.eq(self.wants & ~self.sent)
        with m.If(stream_.valid & stream_.ready):
            m.d.sync += self.sent.eq(1)

    @property
    def done(self):
        return ~self.wants | self.sent | self.stream.ready


class ReadSequencer(wiring.Component):
    """The read program of one step (``golden/memprogram.py``'s ``read_jobs``): read jobs for the
    :class:`~..memport.TaggedReader`, and for each tensor the job of its :class:`~..gearbox.Unpacker`.

    Attributes
    ----------
    start : In(1)
        Starts the program (``sizes`` and ``address`` valid from this cycle on, held for the step).
    clear : In(1)
        Back to idle after the step.
    sizes : In(:data:`sizes_layout`)
    address : In(:func:`address_layout`)
    job : Out(stream of :func:`~..memport.tagged_job_layout`), ``dest`` an index of :data:`READS`
    unpack : Out(stream): ``dest``, ``count`` and ``cols`` of an unpacker job
    done : Out(1)
        Every job has been sent.
    """

    def __init__(self, config):
        self.config = config
        self.reads = READS if config.adamw else READS[:7]
        super().__init__({
            "start": In(1), "clear": In(1),
            "sizes": In(sizes_layout), "address": In(address_layout(config)),
            "job": Out(stream.Signature(tagged_job_layout(config.port, len(self.reads)))),
            "unpack": Out(stream.Signature(data.StructLayout({"dest": range(len(self.reads)), "count": 32,
                                                              "cols": 32}))),
            "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, port = self.config, self.config.port
        scfg, shift = cfg.step, port.word_shift
        dq = scfg.double_quant
        size, addr = self.sizes, self.address
        dest_index = {name: i for i, name in enumerate(self.reads)}
        rs = Signal(_Read)
        job, unpack = _Sender(m, self.job), _Sender(m, self.unpack)
        advance = Signal()
        m.d.comb += [advance.eq(job.done & unpack.done & (rs != _Read.IDLE) & (rs != _Read.DONE)),
                     self.done.eq(rs == _Read.DONE)]
        with m.If(advance):
            m.d.sync += [job.sent.eq(0), unpack.sent.eq(0)]

        def read(address, size_, dest):
            return [self.job.payload.address.eq(address), self.job.payload.bytes.eq(size_),
                    self.job.payload.dest.eq(dest_index[dest]), job.wants.eq(1)]

        def unpacked(dest, count, cols):
            return [self.unpack.payload.dest.eq(dest_index[dest]), self.unpack.payload.count.eq(count),
                    self.unpack.payload.cols.eq(cols), unpack.wants.eq(1)]

        pass_left = Signal(17)
        g_absmax, g_codes, g_absmax2 = (Signal(port.address_width, name=n) for n in ("g_absmax", "g_codes",
                                                                                     "g_absmax2"))
        blocks_left, codes_left = Signal(32), Signal(32)
        item = 1 if dq else 4
        group_codes = WEIGHT_GROUP * scfg.blocksize // 2
        which_b = Signal()
        s_m, s_v, s_left = Signal(port.address_width), Signal(port.address_width), Signal(32)

        whole = {_Read.X: ("x", addr.x, size.x, size.d_in, 2), _Read.DY: ("dy", addr.dy, size.dy, size.d_out, 2),
                 _Read.A: ("a", addr.a, size.a, size.d_in, 4), _Read.B: ("b", addr.b, size.b, size.r, 4)}
        order = list(whole)
        with m.Switch(rs):
            with m.Case(_Read.IDLE):
                with m.If(self.start):
                    m.d.sync += rs.eq(_Read.X)
            for k, state in enumerate(order):
                with m.Case(state):
                    dest, base, elems, cols, item_bytes = whole[state]
                    m.d.comb += [*read(base, elems * item_bytes, dest), *unpacked(dest, elems, cols)]
                    with m.If(advance):
                        m.d.sync += rs.eq(order[k + 1] if k + 1 < len(order) else _Read.PASS_CODES)
                        if state == _Read.B:
                            m.d.sync += pass_left.eq(size.passes << 1)
            with m.Case(_Read.PASS_CODES):
                m.d.comb += unpacked("codes", size.n, size.n)
                with m.If(advance):
                    m.d.sync += rs.eq(_Read.PASS_ABSMAX)
            with m.Case(_Read.PASS_ABSMAX):
                m.d.comb += unpacked("absmax", size.blocks, size.blocks)
                with m.If(advance):
                    m.d.sync += [g_absmax.eq(addr.absmax), g_codes.eq(addr.codes), g_absmax2.eq(addr.absmax2),
                                 blocks_left.eq(size.blocks), codes_left.eq((size.n + 1) >> 1),
                                 rs.eq(_Read.ABSMAX2 if dq else _Read.ABSMAX)]
            with m.Case(_Read.ABSMAX2):
                # the port word that holds the group's value: the unpacker's last element of the job is it
                offset = g_absmax2[:shift] if shift else 0
                m.d.comb += [*read(g_absmax2, offset + 4, "absmax2"),
                             *unpacked("absmax2", (offset >> 2) + 1 if shift >= 2 else 1, 1)]
                with m.If(advance):
                    m.d.sync += [rs.eq(_Read.ABSMAX), g_absmax2.eq(g_absmax2 + 4)]
            with m.Case(_Read.ABSMAX):
                count = Mux(blocks_left < WEIGHT_GROUP, blocks_left, WEIGHT_GROUP)
                m.d.comb += read(g_absmax, count * item, "absmax")
                with m.If(advance):
                    m.d.sync += [rs.eq(_Read.CODES), g_absmax.eq(g_absmax + WEIGHT_GROUP * item)]
            with m.Case(_Read.CODES):
                chunk = Mux(codes_left < group_codes, codes_left, group_codes)
                m.d.comb += read(g_codes, chunk, "codes")
                with m.If(advance):
                    m.d.sync += [g_codes.eq(g_codes + group_codes), codes_left.eq(codes_left - chunk),
                                 blocks_left.eq(blocks_left - WEIGHT_GROUP)]
                    with m.If(blocks_left > WEIGHT_GROUP):
                        m.d.sync += rs.eq(_Read.ABSMAX2 if dq else _Read.ABSMAX)
                    with m.Elif(pass_left > 1):
                        m.d.sync += [rs.eq(_Read.PASS_CODES), pass_left.eq(pass_left - 1)]
                    with m.Else():
                        m.d.sync += [rs.eq(_Read.STATE_M if cfg.adamw else _Read.DONE), which_b.eq(0)]
            if cfg.adamw:
                elems = Mux(which_b, size.b, size.a)
                with m.Case(_Read.STATE_M):
                    m.d.comb += unpacked("m", elems, elems)
                    with m.If(advance):
                        m.d.sync += rs.eq(_Read.STATE_V)
                with m.Case(_Read.STATE_V):
                    m.d.comb += unpacked("v", elems, elems)
                    with m.If(advance):
                        m.d.sync += [rs.eq(_Read.M), s_left.eq(elems), s_m.eq(Mux(which_b, addr.m_b, addr.m_a)),
                                     s_v.eq(Mux(which_b, addr.v_b, addr.v_a))]
                for state, reg, dest in ((_Read.M, s_m, "m"), (_Read.V, s_v, "v")):
                    with m.Case(state):
                        count = Mux(s_left < STATE_GROUP, s_left, STATE_GROUP)
                        m.d.comb += read(reg, count * 4, dest)
                        with m.If(advance):
                            m.d.sync += reg.eq(reg + 4 * STATE_GROUP)
                            if state == _Read.M:
                                m.d.sync += rs.eq(_Read.V)
                            else:
                                m.d.sync += s_left.eq(s_left - count)
                                with m.If(s_left > STATE_GROUP):
                                    m.d.sync += rs.eq(_Read.M)
                                with m.Elif(~which_b):
                                    m.d.sync += [rs.eq(_Read.STATE_M), which_b.eq(1)]
                                with m.Else():
                                    m.d.sync += rs.eq(_Read.DONE)
            with m.Case(_Read.DONE):
                with m.If(self.clear):
                    m.d.sync += rs.eq(_Read.IDLE)
        return m


class WriteSequencer(wiring.Component):
    """The write program of one step (``golden/memprogram.py``'s ``write_jobs``): write jobs for the
    :class:`~..memport.BurstWriter`, and with each, which source's words it takes and how many.

    Attributes
    ----------
    start, clear : In(1)
    sizes : In(:data:`sizes_layout`)
    address : In(:func:`address_layout`)
    job : Out(stream of :func:`~..memport.job_layout`)
    order : Out(stream): ``source`` (an index of :data:`WRITES`) and ``words`` of each job
    done : Out(1)
    """

    def __init__(self, config):
        self.config = config
        self.writes = WRITES if config.adamw else WRITES[:3]
        port = config.port
        super().__init__({
            "start": In(1), "clear": In(1),
            "sizes": In(sizes_layout), "address": In(address_layout(config)),
            "job": Out(stream.Signature(job_layout(port))),
            "order": Out(stream.Signature(data.StructLayout({
                "source": range(len(self.writes)), "words": port.address_width + 1 - port.word_shift}))),
            "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, port = self.config, self.config.port
        rows, cols = cfg.step.rows, cfg.step.cols
        size, addr = self.sizes, self.address
        ws = Signal(_Write)
        job, order = _Sender(m, self.job), _Sender(m, self.order)
        advance = Signal()
        m.d.comb += [advance.eq(job.done & order.done & job.wants), self.done.eq(ws == _Write.DONE)]
        with m.If(advance):
            m.d.sync += [job.sent.eq(0), order.sent.eq(0)]

        def write(address, size_, source):
            return [self.job.payload.address.eq(address), self.job.payload.bytes.eq(size_), job.wants.eq(1),
                    self.order.payload.source.eq(self.writes.index(source)),
                    self.order.payload.words.eq(_ceil_shift(size_, port.word_shift)), order.wants.eq(1)]

        # y and dx: for each tile of rows x cols, one request per output row
        tile_row = Signal(port.address_width)       # the tile's first row, column 0
        cursor = Signal(port.address_width)         # the request's address
        p0, j, m0, features = Signal(16), Signal(range(rows + 1)), Signal(16), Signal(16)
        begun = Signal()
        u_left, u_which_b = Signal(32), Signal()
        u_param, u_m, u_v = (Signal(port.address_width, name=n) for n in ("u_param", "u_m", "u_v"))
        with m.Switch(ws):
            with m.Case(_Write.IDLE):
                with m.If(self.start):
                    m.d.sync += ws.eq(_Write.Y)
            for state, name, base, feats in ((_Write.Y, "y", addr.y, size.d_out), (_Write.DX, "dx", addr.dx,
                                                                                     size.d_in)):
                with m.Case(state):
                    with m.If(~begun):
                        m.d.sync += [begun.eq(1), tile_row.eq(base), cursor.eq(base), p0.eq(0), j.eq(0), m0.eq(0),
                                     features.eq(feats)]
                    with m.Else():
                        m.d.comb += write(cursor, 2 * cols, name)
                    with m.If(advance):
                        m.d.sync += [j.eq(j + 1), cursor.eq(cursor + (features << 1))]
                        with m.If(j == rows - 1):
                            m.d.sync += [j.eq(0), p0.eq(p0 + cols), cursor.eq(tile_row + ((p0 + cols) << 1))]
                            with m.If(p0 + cols >= features):
                                next_tile = tile_row + features * (2 * rows)
                                m.d.sync += [p0.eq(0), m0.eq(m0 + rows), tile_row.eq(next_tile), cursor.eq(next_tile)]
                                with m.If(m0 + rows >= size.t):
                                    m.d.sync += begun.eq(0)
                                    if state == _Write.Y:
                                        m.d.sync += ws.eq(_Write.DX)
                                    else:
                                        m.d.sync += [ws.eq(_Write.PARAM), u_left.eq(size.a), u_which_b.eq(0),
                                                     u_param.eq(addr.a_out), u_m.eq(addr.m_a_out),
                                                     u_v.eq(addr.v_a_out)]
            # the updates: per group of elements, the new master, then the moments
            chain = [(_Write.PARAM, "param", u_param)]
            if cfg.adamw:
                chain += [(_Write.M, "m", u_m), (_Write.V, "v", u_v)]
            for k, (state, name, reg) in enumerate(chain):
                with m.Case(state):
                    count = Mux(u_left < STATE_GROUP, u_left, STATE_GROUP)
                    m.d.comb += write(reg, count * 4, name)
                    with m.If(advance):
                        m.d.sync += reg.eq(reg + 4 * STATE_GROUP)
                        if k + 1 < len(chain):
                            m.d.sync += ws.eq(chain[k + 1][0])
                        else:
                            m.d.sync += [u_left.eq(u_left - count), ws.eq(_Write.PARAM)]
                            with m.If(u_left <= STATE_GROUP):
                                with m.If(~u_which_b):
                                    m.d.sync += [u_which_b.eq(1), u_left.eq(size.b), u_param.eq(addr.b_out),
                                                 u_m.eq(addr.m_b_out), u_v.eq(addr.v_b_out)]
                                with m.Else():
                                    m.d.sync += ws.eq(_Write.DONE)
            with m.Case(_Write.DONE):
                with m.If(self.clear):
                    m.d.sync += ws.eq(_Write.IDLE)
        return m


class MemStep(wiring.Component):
    """One QLoRA step with every tensor in external memory.

    Parameters
    ----------
    config : MemStepConfig

    Attributes
    ----------
    descriptor : In(stream of :func:`descriptor_layout`)
        One beat starts a step (taken when the previous step has reported).
    mem : Out(:class:`~..memport.MemPortSignature`)
    report : Out(stream of :func:`report_layout`)
    phase : Out(:class:`~.config.Phase`)
    step : LoraStep
    """

    def __init__(self, config=MemStepConfig()):
        if not isinstance(config, MemStepConfig):
            raise TypeError(f"config must be a MemStepConfig, not {config!r}")
        self.config = config
        self.step = LoraStep(config.step)
        super().__init__({
            "descriptor": In(stream.Signature(descriptor_layout(config))),
            "mem": Out(MemPortSignature(config.port)),
            "report": Out(stream.Signature(report_layout())),
            "phase": Out(Phase),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        scfg = cfg.step
        m.submodules.step = step = self.step
        m.submodules.read_sequencer = rseq = ReadSequencer(cfg)
        m.submodules.write_sequencer = wseq = WriteSequencer(cfg)
        m.d.comb += self.phase.eq(step.phase)

        # --- the descriptor, held for the step; the sizes, registered once (a few multipliers off every fast path)
        held = Signal(descriptor_layout(cfg))
        running, header_sent, start, sized = Signal(), Signal(), Signal(), Signal()
        m.d.comb += [self.descriptor.ready.eq(~running), start.eq(self.descriptor.valid & ~running)]
        with m.If(start):
            m.d.sync += [held.eq(self.descriptor.payload), running.eq(1), header_sent.eq(0)]
        head = held.header
        m.d.comb += [step.header.valid.eq(running & ~header_sent), step.header.payload.eq(head)]
        with m.If(step.header.valid & step.header.ready):
            m.d.sync += header_sent.eq(1)
        sizes = Signal(sizes_layout)
        t, d_in, d_out, r, n = head["t"], head["in"], head["out"], head["r"], head.n_weights
        m.d.sync += [
            sizes.t.eq(t), sizes.d_in.eq(d_in), sizes.d_out.eq(d_out), sizes.r.eq(r), sizes.n.eq(n),
            sizes.x.eq(t * d_in), sizes.dy.eq(t * d_out), sizes.a.eq(r * d_in), sizes.b.eq(d_out * r),
            sizes.blocks.eq(_ceil_shift(n, _log2(scfg.blocksize))), sizes.passes.eq(_ceil_shift(t, _log2(scfg.rows))),
            sized.eq(start),
        ]
        for seq in (rseq, wseq):
            m.d.comb += [seq.start.eq(sized), seq.sizes.eq(sizes), seq.address.eq(held.address)]

        ctl = SimpleNamespace(start=start, running=running, header_sent=header_sent, head=head, sizes=sizes)
        reader = self._reads(m, step, rseq, ctl)
        writes = self._writes(m, step, wseq, ctl)
        self._report(m, step, rseq, wseq, reader, writes, ctl)
        return m

    def _reads(self, m, step, rseq, ctl):
        """The read sequencer's jobs through the tagged reader, each destination through an unpacker into the
        step's input streams; returns the reader."""
        cfg, port = self.config, self.config.port
        scfg, W, dq = cfg.step, port.data_width, cfg.step.double_quant
        reads, sizes, head, n = rseq.reads, ctl.sizes, ctl.head, ctl.head.n_weights
        start, running, header_sent = ctl.start, ctl.running, ctl.header_sent
        m.submodules.reader = reader = TaggedReader(port, [cfg.fifo_words] * len(reads))
        wiring.connect(m, rseq.job, reader.job)
        wiring.connect(m, reader.read_cmd, wiring.flipped(self.mem.read_cmd))
        wiring.connect(m, wiring.flipped(self.mem.read_data), reader.read_data)
        elem = {"x": BF16.width, "dy": BF16.width, "a": FP32.width, "b": FP32.width, "absmax2": FP32.width,
                "absmax": 8 if dq else FP32.width, "codes": 4, "m": FP32.width, "v": FP32.width}
        lanes = {"x": scfg.banks, "dy": scfg.banks, "a": scfg.banks, "b": scfg.banks, "codes": scfg.cols}
        unpack = {}
        unpack_ready = Signal()
        for i, name in enumerate(reads):
            unit = unpack[name] = m.submodules[f"unpack_{name}"] = Unpacker(W, elem[name], lanes.get(name, 1))
            queue = m.submodules[f"unpack_jobs_{name}"] = SyncFIFOBuffered(width=unit.job.payload.shape().size,
                                                                           depth=4)
            wiring.connect(m, queue.r_stream, unit.job)
            chosen = rseq.unpack.payload.dest == i
            m.d.comb += [queue.w_stream.valid.eq(rseq.unpack.valid & chosen),
                         queue.w_stream.payload.eq(Cat(rseq.unpack.payload.count, rseq.unpack.payload.cols))]
            with m.If(chosen):
                m.d.comb += unpack_ready.eq(queue.w_stream.ready)
            words = reader.dest[i]
            if name == "codes":
                connect_nf4_codes(m, words, unit.words)
            else:
                wiring.connect(m, words, unit.words)
        m.d.comb += rseq.unpack.ready.eq(unpack_ready)

        for name, target in (("x", step.x_in), ("dy", step.dy_in), ("a", step.a_in), ("b", step.b_in)):
            seg = unpack[name].segments
            m.d.comb += [target.valid.eq(seg.valid), seg.ready.eq(target.ready),
                         target.payload.data.eq(seg.payload.data), target.payload.row_end.eq(seg.payload.row_end),
                         target.payload.last.eq(seg.payload.last)]
        for name, target in (("codes", step.codes), ("absmax", step.absmax)):
            seg = unpack[name].segments
            m.d.comb += [target.valid.eq(seg.valid), seg.ready.eq(target.ready),
                         target.payload.eq(seg.payload.data if name == "codes" else seg.payload.data[0])]
        absmax2 = unpack["absmax2"].segments
        if dq:
            # an absmax2 job reads the word that holds the value: only the job's final element is it
            m.d.comb += [step.absmax2.valid.eq(absmax2.valid & absmax2.payload.last),
                         absmax2.ready.eq(step.absmax2.ready | ~absmax2.payload.last),
                         step.absmax2.payload.eq(absmax2.payload.data[0])]
        else:
            m.d.comb += absmax2.ready.eq(1)
        # the dequantizer's tensor beat, once per pass: the weight count and the double quantization's offset
        tensors_left, tensors_armed = Signal(17), Signal()
        m.d.comb += [step.tensor.valid.eq(tensors_left != 0),
                     step.tensor.payload.eq(Cat(n, head.offset) if dq else n)]
        with m.If(step.tensor.valid & step.tensor.ready):
            m.d.sync += tensors_left.eq(tensors_left - 1)
        with m.If(start):
            m.d.sync += tensors_armed.eq(0)
        with m.Elif(running & header_sent & ~tensors_armed):
            m.d.sync += [tensors_left.eq(sizes.passes << 1), tensors_armed.eq(1)]
        if cfg.adamw:
            mm, vv = unpack["m"].segments, unpack["v"].segments
            both = mm.valid & vv.valid
            m.d.comb += [step.state_in.valid.eq(both), mm.ready.eq(step.state_in.ready & both),
                         vv.ready.eq(step.state_in.ready & both),
                         step.state_in.payload.m.eq(mm.payload.data[0]), step.state_in.payload.v.eq(vv.payload.data[0])]
        else:
            m.d.comb += step.state_in.valid.eq(1)     # SGD keeps no moments: zeros, one per element

        return reader

    def _writes(self, m, step, wseq, ctl):
        """Packers, their words in request order through a staging FIFO, the burst writer; returns the parts the
        report watches."""
        cfg, port = self.config, self.config.port
        scfg, W = cfg.step, port.data_width
        writes, sizes, start, running, header_sent = wseq.writes, ctl.sizes, ctl.start, ctl.running, ctl.header_sent
        m.submodules.writer = writer = BurstWriter(port)
        # the sequencer runs a few jobs ahead of the writer (jobs and their word orders queued alike), so the next
        # job's words are staged while the current one's are written
        m.submodules.jobs = jobs = SyncFIFOBuffered(width=wseq.job.payload.shape().size, depth=_JOBS_AHEAD)
        wiring.connect(m, wseq.job, jobs.w_stream)
        m.d.comb += [writer.job.valid.eq(jobs.r_stream.valid), jobs.r_stream.ready.eq(writer.job.ready),
                     writer.job.payload.eq(jobs.r_stream.payload)]
        # a burst's command goes out only when all its words wait in the staging FIFO, so the memory, which takes
        # a write's words at the pace of its own schedule, never waits for the step in the middle of a burst
        m.submodules.staging = staging = SyncFIFOBuffered(width=W, depth=max(cfg.fifo_words, port.max_burst))
        wiring.connect(m, staging.r_stream, writer.data)
        staged = Signal()
        m.d.comb += [staged.eq(staging.level >= writer.write_cmd.payload.length),
                     self.mem.write_cmd.valid.eq(writer.write_cmd.valid & staged),
                     self.mem.write_cmd.payload.eq(writer.write_cmd.payload),
                     writer.write_cmd.ready.eq(self.mem.write_cmd.ready & staged)]
        wiring.connect(m, writer.write_data, wiring.flipped(self.mem.write_data))
        pack = {name: Packer(scfg.cols * BF16.width if name in ("y", "dx") else FP32.width, W) for name in writes}
        for name, unit in pack.items():
            m.submodules[f"pack_{name}"] = unit
        for name, source in (("y", step.y), ("dx", step.dx)):
            m.d.comb += [pack[name].elements.valid.eq(source.valid), source.ready.eq(pack[name].elements.ready),
                         pack[name].elements.payload.eq(source.payload.data)]
        # the updates: each element's new master and moments into a queue each; the groups are written in turn
        fields = {"param": step.updates.payload.param, "m": step.updates.payload.m, "v": step.updates.payload.v}
        queues = {name: SyncFIFOBuffered(width=FP32.width, depth=2 * STATE_GROUP) for name in writes[2:]}
        for name, q in queues.items():
            m.submodules[f"queue_{name}"] = q
            wiring.connect(m, q.r_stream, pack[name].elements)
        all_room = Cat(*(q.w_stream.ready for q in queues.values())).all()
        m.d.comb += step.updates.ready.eq(all_room)
        for name, q in queues.items():
            m.d.comb += [q.w_stream.valid.eq(step.updates.valid & all_room), q.w_stream.payload.eq(fields[name])]
        # each packer's jobs (y: t * out / cols rows of cols; dx likewise; A's elements then B's), once per step
        pack_jobs = {"y": [sizes.dy >> _log2(scfg.cols)], "dx": [sizes.x >> _log2(scfg.cols)]}
        pack_jobs.update({name: [sizes.a, sizes.b] for name in writes[2:]})
        for name, counts in pack_jobs.items():
            unit = pack[name].job
            sent = [Signal(name=f"pack_{name}_sent_{k}") for k in range(len(counts))]
            for k, count in enumerate(counts):
                with m.If(running & header_sent & (sent[k - 1] if k else 1) & ~sent[k]):
                    m.d.comb += [unit.valid.eq(1), unit.payload.count.eq(count)]
                    with m.If(unit.ready):
                        m.d.sync += sent[k].eq(1)
            with m.If(start):
                m.d.sync += [flag.eq(0) for flag in sent]
        # the words of each request from the source the write sequencer names
        m.submodules.order = order = SyncFIFOBuffered(width=wseq.order.payload.shape().size, depth=_JOBS_AHEAD)
        wiring.connect(m, wseq.order, order.w_stream)
        head_order = data.View(wseq.order.payload.shape(), order.r_stream.payload)
        taken = Signal.like(head_order.words)
        moving = staging.w_stream.valid & staging.w_stream.ready
        for i, name in enumerate(writes):
            words = pack[name].words
            with m.If(order.r_stream.valid & (head_order.source == i)):
                m.d.comb += [staging.w_stream.valid.eq(words.valid), words.ready.eq(staging.w_stream.ready),
                             staging.w_stream.payload.eq(words.payload.data)]
        last_word = taken + 1 == head_order.words
        m.d.comb += order.r_stream.ready.eq(moving & last_word)
        with m.If(moving):
            m.d.sync += taken.eq(Mux(last_word, 0, taken + 1))

        return SimpleNamespace(writer=writer, jobs=jobs, staging=staging, order=order, source=head_order.source,
                               moving=moving)

    def _report(self, m, step, rseq, wseq, reader, w, ctl):
        """Cycles, stall cycles and words moved, and the report beat once the last word is written."""
        reads, writes = rseq.reads, wseq.writes
        start, running, header_sent = ctl.start, ctl.running, ctl.header_sent
        reported, finished = Signal(), Signal()
        m.d.comb += [rseq.clear.eq(self.report.valid & self.report.ready),
                     wseq.clear.eq(self.report.valid & self.report.ready)]
        report = self.report.payload
        cycles, mem_stall, compute_stall = Signal(40), Signal(40), Signal(40)
        # the step waits for memory: an input it takes in this phase is empty, or an output it gives is not taken
        # (absmax2 is prefetched a group ahead and its ready is high between groups: not counted)
        weight_phase = (step.phase == Phase.F2) | (step.phase == Phase.B4)
        update_phase = (step.phase == Phase.UPD_A) | (step.phase == Phase.UPD_B)
        starving = [s.ready & ~s.valid for s in (step.x_in, step.dy_in, step.a_in, step.b_in)]
        starving += [weight_phase & s.ready & ~s.valid for s in (step.codes, step.absmax)]
        starving += [update_phase & step.state_in.ready & ~step.state_in.valid]
        blocked = [s.valid & ~s.ready for s in (step.y, step.dx, step.updates)]
        waiting = Cat(*starving, *blocked).any()
        m.d.comb += finished.eq(wseq.done & rseq.done & ~w.jobs.r_stream.valid & ~w.order.r_stream.valid &
                                w.writer.job.ready & ~w.staging.r_stream.valid & reader.idle &
                                (step.phase == Phase.IDLE) & header_sent)
        with m.If(start):
            m.d.sync += [cycles.eq(0), mem_stall.eq(0), compute_stall.eq(0), reported.eq(0)]
        with m.Elif(running & ~finished):
            m.d.sync += [cycles.eq(cycles + 1), mem_stall.eq(mem_stall + (waiting & (step.phase != Phase.IDLE))),
                         compute_stall.eq(compute_stall + reader.starved)]
        base_words = [Signal(48, name=f"base_{name}") for name in reads]
        with m.If(start):
            m.d.sync += [base.eq(reader.words[i]) for i, base in enumerate(base_words)]
        written = [Signal(40, name=f"written_{name}") for name in writes]
        for i, count in enumerate(written):
            with m.If(start):
                m.d.sync += count.eq(0)
            with m.Elif(w.moving & (w.source == i)):
                m.d.sync += count.eq(count + 1)
        m.d.comb += [report.cycles.eq(cycles), report.memory.eq(mem_stall), report.compute.eq(compute_stall)]
        for i, name in enumerate(reads):
            m.d.comb += report[f"read_{name}"].eq(reader.words[i] - base_words[i])
        for i, name in enumerate(writes):
            m.d.comb += report[f"write_{name}"].eq(written[i])
        m.d.comb += self.report.valid.eq(running & finished & ~reported)
        with m.If(self.report.valid & self.report.ready):
            m.d.sync += [reported.eq(1), running.eq(0)]
