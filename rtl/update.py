"""The update pass: one LoRA factor's optimizer step (AdamW or SGD) fed through the external-memory port (twin:
``golden/lora_optim.py`` for the arithmetic, ``golden/blockprogram.py``'s ``update_pass`` for the requests).

The blocked products (``rtl/blocked.py``) leave the step's gradients in memory (float32 grad_A ``[r, d_in]``
and grad_B ``[d_out, r]``); the update then reads, per group of ``group`` elements, the master, its gradient and
(AdamW) its two moments, one read job each, into a :class:`~.memport.TaggedReader`; joins the four streams
element by element into a :class:`~.lora_optim.LoRAOptimizer`; and writes the new master and moments back in
place, one write job each per group, through a :class:`~.memport.BurstWriter`. One descriptor updates one tensor
(A or B): its four addresses, its element count and the step's optimizer constants.

Parts:

* :class:`UpdateReads`: the read jobs, group by group (master, gradient, moments);
* :class:`UpdateWrites`: the write jobs, group by group (master, moments), each issued only when all of its
  words wait in their FIFO, so that the port never holds a write burst that waits for data while the reads it
  depends on queue behind it;
* :class:`UpdatePass`: the reader, one :class:`~.gearbox.Unpacker` per operand, the optimizer, one
  :class:`~.gearbox.Packer` and word FIFO per result, the writer, and the report.

At the optimizer's ``interval`` of 8 (an element every 8 cycles, on one multiplier and one adder) the update is
bound by the memory: the ULX3S's 16-bit SDRAM moves an AdamW element's 28 bytes in 14 cycles at its peak.
"""

from dataclasses import dataclass

from amaranth.hdl import Array, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .gearbox import Packer, Unpacker
from .lora_optim import FOLD_INTERVAL, KINDS, LoRAOptimizer, OptimConfig, hyper_layout
from .memport import (BurstWriter, DistributedFIFO, MemPortConfig, MemPortSignature, TaggedReader, ULX3S_SDRAM_PORT,
                      job_layout, tagged_job_layout, take_descriptor)

__all__ = ["UpdateConfig", "UpdateReads", "UpdateWrites", "UpdatePass", "descriptor_layout", "report_layout",
           "READS", "WRITES"]

#: The tensors an update reads per group, in order (SGD: the first two).
READS = ("param", "grad", "m", "v")
#: The tensors it writes per group, in order (SGD: the first).
WRITES = ("param", "m", "v")

_COUNT_BITS = 24
_ELEM_BYTES = 4


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class UpdateConfig:
    """Elaboration parameters of :class:`UpdatePass`.

    Parameters
    ----------
    port : MemPortConfig
    optimizer : str
        ``"adamw"`` or ``"sgd"``.
    interval : int
        Cycles between two elements in the optimizer core (:class:`~.lora_optim.OptimConfig`), 1 to 16: from 8
        on the core has one unit of each kind.
    group : int
        Elements per read and write job, a power of two whose bytes are whole port words (64: 256-byte jobs).
    fold : bool
        AdamW's square root and divider folded (:class:`~.lora_optim.OptimConfig`'s ``fold``) where the interval
        allows it (8 or more): the same updates from less logic.
    """

    port: MemPortConfig = ULX3S_SDRAM_PORT
    optimizer: str = "adamw"
    interval: int = 8
    group: int = 64
    fold: bool = True

    def __post_init__(self):
        if not isinstance(self.port, MemPortConfig):
            raise TypeError(f"UpdateConfig.port must be a MemPortConfig, not {self.port!r}")
        if self.optimizer not in KINDS:
            raise ValueError(f"UpdateConfig.optimizer must be one of {KINDS}, not {self.optimizer!r}")
        self.optim                                      # checks the interval and the folding
        g = self.group
        if not _is_int(g) or g < 1 or g & (g - 1) or (g * _ELEM_BYTES) % self.port.word_bytes or g > 1024:
            raise ValueError(f"UpdateConfig.group must be a power of two up to 1024 whose {_ELEM_BYTES}-byte "
                             f"elements fill whole {self.port.word_bytes}-byte port words, not {g!r}")

    @property
    def optim(self):
        """The optimizer core's :class:`~.lora_optim.OptimConfig` (SGD has nothing to fold; an interval below
        :data:`~.lora_optim.FOLD_INTERVAL` leaves the units pipelined)."""
        return OptimConfig(self.optimizer, self.interval,
                           self.fold and self.optimizer == "adamw" and self.interval >= FOLD_INTERVAL)

    @property
    def reads(self):
        return READS if self.optimizer == "adamw" else READS[:2]

    @property
    def writes(self):
        return WRITES if self.optimizer == "adamw" else WRITES[:1]

    @property
    def group_words(self):
        """Port words of one tensor's group."""
        return self.group * _ELEM_BYTES // self.port.word_bytes

    @property
    def fifo_words(self):
        """Words of each operand's and each result's FIFO: two groups, at least two bursts."""
        return max(2 * self.group_words, 2 * self.port.max_burst)


def descriptor_layout(config):
    """Payload of ``descriptor``: the byte addresses of the master (``param``), its gradient (``grad``) and the
    moments (``m``, ``v``; unused by SGD), whole words each; the tensor's ``count`` of elements (at least 1, its
    bytes whole port words); and the step's optimizer constants (:data:`~.lora_optim.hyper_layout`,
    ``golden.lora_optim.hyper_from``)."""
    aw = config.port.address_width
    return data.StructLayout({"param": aw, "grad": aw, "m": aw, "v": aw, "count": _COUNT_BITS,
                              "hyper": hyper_layout})


def report_layout():
    """Payload of ``report``: cycles from the descriptor to the last word written, port words read and written,
    ``memory``: the optimizer's entry slots (one every ``interval`` cycles) in which an operand had not arrived (each
    costs ``interval`` cycles), and ``compute``: cycles in which a read burst was ready but its operand's FIFO had
    no room."""
    return data.StructLayout({"cycles": 48, "read": 48, "written": 48, "memory": 48, "compute": 48})


def _walk_groups(m, config, n, start, count, jobs):
    """The group walk both issuers share: from ``start``, per group of ``config.group`` elements of ``count``, ``n``
    jobs (``tensor`` 0 to ``n - 1``), each taken on ``jobs``' handshake. Returns ``(left, offset, tensor)``: the
    elements from this group on (0 when done), the group's byte offset in every tensor, and the job's tensor."""
    left = Signal(_COUNT_BITS)
    offset = Signal(config.port.address_width)
    tensor = Signal(range(max(2, n)))
    with m.If(start):
        m.d.sync += [left.eq(count), offset.eq(0), tensor.eq(0)]
    with m.Elif(jobs.valid & jobs.ready):
        m.d.sync += tensor.eq(tensor + 1)
        with m.If(tensor == n - 1):
            m.d.sync += [tensor.eq(0), offset.eq(offset + config.group * _ELEM_BYTES),
                         left.eq(Mux(left < config.group, 0, left - config.group))]
    return left, offset, tensor


def _group_bytes(config, left):
    return Mux(left < config.group, left, config.group) * _ELEM_BYTES


class UpdateReads(wiring.Component):
    """The read jobs of one update: per group of ``config.group`` elements, one job per tensor of
    ``config.reads`` (master, gradient, moments), each ``dest`` its index there.

    Attributes
    ----------
    start : In(1)
        Starts the jobs (``base`` and ``count`` valid from this cycle on, held for the update).
    base : In(address width), an array of ``len(config.reads)``
    count : In(24)
    jobs : Out(stream of :func:`~.memport.tagged_job_layout`)
    """

    def __init__(self, config):
        self.config = config
        n = len(config.reads)
        super().__init__({"start": In(1), "base": In(config.port.address_width).array(n), "count": In(_COUNT_BITS),
                          "jobs": Out(stream.Signature(tagged_job_layout(config.port, n)))})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        left, offset, tensor = _walk_groups(m, cfg, len(cfg.reads), self.start, self.count, self.jobs)
        job = self.jobs.payload
        m.d.comb += [self.jobs.valid.eq(left != 0), job.address.eq(Array(self.base)[tensor] + offset),
                     job.bytes.eq(_group_bytes(cfg, left)), job.dest.eq(tensor)]
        return m


class UpdateWrites(wiring.Component):
    """The write jobs of one update: per group, one job per tensor of ``config.writes`` (master, moments), each
    offered only when its FIFO holds all of the job's words (``levels``), and with each job ``source``, the
    tensor whose FIFO its words come from.

    Attributes
    ----------
    start : In(1)
    base : In(address width), an array of ``len(config.writes)``
    count : In(24)
    levels : In(range(fifo words + 1)), an array of ``len(config.writes)``: the words waiting in each FIFO
    jobs : Out(stream of :func:`~.memport.job_layout` and ``source``)
    """

    def __init__(self, config):
        self.config = config
        n = len(config.writes)
        layout = data.StructLayout({"job": job_layout(config.port), "source": range(max(2, n))})
        super().__init__({"start": In(1), "base": In(config.port.address_width).array(n), "count": In(_COUNT_BITS),
                          "levels": In(range(config.fifo_words + 1)).array(n),
                          "jobs": Out(stream.Signature(layout))})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        left, offset, tensor = _walk_groups(m, cfg, len(cfg.writes), self.start, self.count, self.jobs)
        size = Signal(cfg.port.address_width + 1)
        level = Signal(range(cfg.fifo_words + 1))
        m.d.comb += [size.eq(_group_bytes(cfg, left)), level.eq(Array(self.levels)[tensor])]
        job = self.jobs.payload
        m.d.comb += [self.jobs.valid.eq((left != 0) & (level >= (size >> cfg.port.word_shift))),
                     job.job.address.eq(Array(self.base)[tensor] + offset), job.job.bytes.eq(size),
                     job.source.eq(tensor)]
        return m


class UpdatePass(wiring.Component):
    """One tensor's optimizer step through one memory port: the master, gradient and moments at the descriptor's
    addresses are read, updated (:class:`~.lora_optim.LoRAOptimizer`, bit for bit as ``golden.lora_optim``) and
    the master and moments written back in place.

    Attributes
    ----------
    descriptor : In(stream of :func:`descriptor_layout`)
    mem : Out(:class:`~.memport.MemPortSignature`)
    report : Out(stream of :func:`report_layout`)
    """

    def __init__(self, config=UpdateConfig()):
        if not isinstance(config, UpdateConfig):
            raise TypeError(f"config must be an UpdateConfig, not {config!r}")
        self.config = config
        super().__init__({"descriptor": In(stream.Signature(descriptor_layout(config))),
                          "mem": Out(MemPortSignature(config.port)),
                          "report": Out(stream.Signature(report_layout()))})

    def elaborate(self, platform):
        m = Module()
        cfg, port = self.config, self.config.port
        head, running, start, reporting = take_descriptor(m, self.descriptor)

        # reads: the jobs into the tagged reader, each operand's words through its unpacker (one job: the tensor)
        m.submodules.reads = reads = UpdateReads(cfg)
        m.d.comb += [reads.start.eq(start), reads.count.eq(head.count),
                     *(reads.base[i].eq(getattr(head, name)) for i, name in enumerate(cfg.reads))]
        m.submodules.reader = reader = TaggedReader(port, [cfg.fifo_words] * len(cfg.reads),
                                                    ram_styles=["distributed"] * len(cfg.reads))
        wiring.connect(m, reads.jobs, reader.job)
        wiring.connect(m, reader.read_cmd, wiring.flipped(self.mem.read_cmd))
        wiring.connect(m, wiring.flipped(self.mem.read_data), reader.read_data)
        m.submodules.optimizer = optimizer = LoRAOptimizer(cfg.optim)
        m.d.comb += optimizer.hyper.eq(head.hyper)
        element = optimizer.elements
        operands = []
        for i, name in enumerate(cfg.reads):
            unit = m.submodules[f"unpack_{name}"] = Unpacker(port.data_width, 32, 1, count_width=_COUNT_BITS)
            wiring.connect(m, reader.dest[i], unit.words)
            self._job(m, unit.job, start, {"count": head.count, "cols": head.count})
            operands.append(unit.segments)
            m.d.comb += [getattr(element.payload, name).eq(unit.segments.payload.data[0]),
                         unit.segments.ready.eq(element.valid & element.ready)]
        m.d.comb += element.valid.eq(_all(s.valid for s in operands))

        # writes: each result through its packer (one job: the tensor) into a word FIFO; the jobs when a group waits
        m.submodules.writes = writes = UpdateWrites(cfg)
        m.d.comb += [writes.start.eq(start), writes.count.eq(head.count),
                     *(writes.base[i].eq(getattr(head, name)) for i, name in enumerate(cfg.writes))]
        m.submodules.writer = writer = BurstWriter(port)
        wiring.connect(m, writer.write_cmd, wiring.flipped(self.mem.write_cmd))
        wiring.connect(m, writer.write_data, wiring.flipped(self.mem.write_data))
        updated, taken = optimizer.updated, []
        # FIFOs of up to 2 kbit in LUT RAM (as the reader's), larger ones in block RAM
        words_fifo = DistributedFIFO if cfg.fifo_words * port.data_width <= 2048 else SyncFIFOBuffered
        source = Signal.like(writes.jobs.payload.source)
        for i, name in enumerate(cfg.writes):
            unit = m.submodules[f"pack_{name}"] = Packer(32, port.data_width)
            fifo = m.submodules[f"words_{name}"] = words_fifo(width=port.data_width, depth=cfg.fifo_words)
            self._job(m, unit.job, start, {"count": head.count})
            m.d.comb += [unit.elements.payload.eq(getattr(updated.payload, name)),
                         fifo.w_stream.valid.eq(unit.words.valid), fifo.w_stream.payload.eq(unit.words.payload.data),
                         unit.words.ready.eq(fifo.w_stream.ready), writes.levels[i].eq(fifo.level)]
            taken.append(unit.elements.ready)
            with m.If(source == i):
                m.d.comb += [writer.data.valid.eq(fifo.r_stream.valid), fifo.r_stream.ready.eq(writer.data.ready),
                             writer.data.payload.eq(fifo.r_stream.payload)]
        # every result leaves together: each packer takes it only when the others can too
        for i, name in enumerate(cfg.writes):
            m.d.comb += m.submodules[f"pack_{name}"].elements.valid.eq(
                updated.valid & _all(t for j, t in enumerate(taken) if j != i))
        m.d.comb += updated.ready.eq(_all(taken))
        m.d.comb += [writer.job.valid.eq(writes.jobs.valid), writer.job.payload.eq(writes.jobs.payload.job),
                     writes.jobs.ready.eq(writer.job.ready)]
        with m.If(writer.job.valid & writer.job.ready):
            m.d.sync += source.eq(writes.jobs.payload.source)

        # counters and the report, once every result word has gone out
        cycles, read, written, memory, compute = (Signal(48, name=n) for n in ("cycles", "read", "written",
                                                                              "memory", "compute"))
        total = Signal(_COUNT_BITS + 4)
        m.d.comb += total.eq(((head.count * _ELEM_BYTES) >> port.word_shift) * len(cfg.writes))
        with m.If(start):
            m.d.sync += [cycles.eq(0), read.eq(0), written.eq(0), memory.eq(0), compute.eq(0)]
        with m.Elif(running):
            m.d.sync += cycles.eq(cycles + 1)
            with m.If(element.ready & ~element.valid):
                m.d.sync += memory.eq(memory + 1)
            with m.If(reader.starved):
                m.d.sync += compute.eq(compute + 1)
            with m.If(self.mem.read_data.valid & self.mem.read_data.ready):
                m.d.sync += read.eq(read + 1)
            with m.If(self.mem.write_data.valid & self.mem.write_data.ready):
                m.d.sync += written.eq(written + 1)
            with m.If(~start & (written == total)):
                m.d.sync += [running.eq(0), reporting.eq(1)]
        m.d.comb += [self.report.valid.eq(reporting), self.report.payload.cycles.eq(cycles),
                     self.report.payload.read.eq(read), self.report.payload.written.eq(written),
                     self.report.payload.memory.eq(memory), self.report.payload.compute.eq(compute)]
        with m.If(self.report.valid & self.report.ready):
            m.d.sync += reporting.eq(0)
        return m

    @staticmethod
    def _job(m, job, start, fields):
        """Offer ``job`` (a mover's job stream) once per update, from the cycle after ``start``."""
        pending = Signal()
        m.d.comb += job.valid.eq(pending)
        for name, value in fields.items():
            m.d.comb += getattr(job.payload, name).eq(value)
        with m.If(start):
            m.d.sync += pending.eq(1)
        with m.Elif(job.ready):
            m.d.sync += pending.eq(0)


def _all(values):
    out = 1
    for value in values:
        out = out & value
    return out
