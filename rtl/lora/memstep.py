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

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ...constants import BF16, FP32
from ..gearbox import Packer, Unpacker
from ..memport import BurstWriter, MemPortConfig, MemPortSignature, TaggedReader
from .config import LoraConfig, Phase, header_layout
from .step import LoraStep

__all__ = ["MemStepConfig", "MemStep", "ADDRESSES", "READS", "WRITES", "WEIGHT_GROUP", "STATE_GROUP",
           "descriptor_layout", "report_layout"]

#: Blocks per group of the weight stream (one absmax2 value) and elements per group of the update's transfers
#: (``golden/memprogram.py`` has the same).
WEIGHT_GROUP = 256
STATE_GROUP = 64

#: Byte addresses in the descriptor: the tensors read, then the tensors written (``*_out``; equal to the inputs'
#: when the update is in place).
ADDRESSES = ("codes", "absmax", "absmax2", "x", "dy", "a", "b", "m_a", "v_a", "m_b", "v_b",
             "y", "dx", "a_out", "b_out", "m_a_out", "v_a_out", "m_b_out", "v_b_out")

#: The read destinations, in the order of the reader's FIFOs and the report's counters.
READS = ("x", "dy", "a", "b", "absmax2", "absmax", "codes", "m", "v")
#: The write sources, likewise.
WRITES = ("y", "dx", "param", "m", "v")


class _Read(enum.Enum, shape=4):
    """The read sequencer's place in its program."""
    IDLE = 0
    X = 1
    DY = 2
    A = 3
    B = 4
    PASS = 5      # a weight pass starts: its codes and absmax jobs to the unpackers
    ABSMAX2 = 6
    ABSMAX = 7
    CODES = 8
    STATE = 9     # A's or B's moments start
    M = 10
    V = 11
    DONE = 12


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


def descriptor_layout(config):
    """Payload of ``descriptor``: the step's header and the byte address of every tensor."""
    return data.StructLayout({"header": header_layout(),
                              "address": data.StructLayout({name: config.port.address_width
                                                            for name in ADDRESSES})})


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
        cfg, port = self.config, self.config.port
        scfg = cfg.step
        W, wb, shift = port.data_width, port.word_bytes, port.word_shift
        m.submodules.step = step = self.step
        m.d.comb += self.phase.eq(step.phase)

        # --- the descriptor, held for the step
        held = Signal(descriptor_layout(cfg))
        running, header_sent, reported = Signal(), Signal(), Signal()
        start = Signal()
        m.d.comb += [self.descriptor.ready.eq(~running), start.eq(self.descriptor.valid & ~running)]
        with m.If(start):
            m.d.sync += [held.eq(self.descriptor.payload), running.eq(1), header_sent.eq(0)]
        head, addr = held.header, held.address
        m.d.comb += [step.header.valid.eq(running & ~header_sent), step.header.payload.eq(head)]
        with m.If(step.header.valid & step.header.ready):
            m.d.sync += header_sent.eq(1)

        # sizes of the step, registered once after the descriptor (a few multipliers, off every fast path)
        t, d_in, d_out, r = head["t"], head["in"], head["out"], head["r"]
        n = head.n_weights
        x_elems, dy_elems, a_elems, b_elems = (Signal(32, name=f"{k}_elems") for k in ("x", "dy", "a", "b"))
        blocks, groups = Signal(32), Signal(32)
        m.d.sync += [x_elems.eq(t * d_in), dy_elems.eq(t * d_out), a_elems.eq(r * d_in), b_elems.eq(d_out * r),
                     blocks.eq(_ceil_shift(n, _log2(scfg.blocksize))),
                     groups.eq(_ceil_shift(_ceil_shift(n, _log2(scfg.blocksize)), _log2(WEIGHT_GROUP)))]
        sized = Signal()          # the sizes are valid from the cycle after this one
        m.d.sync += sized.eq(start)
        passes = Signal(16)       # of the weight, in F2 and again in B4: one per tile of token rows
        m.d.sync += passes.eq(_ceil_shift(t, _log2(scfg.rows)))

        # --- the read side: reader, unpackers, the step's input streams
        reads = READS if cfg.adamw else READS[:7]
        dq = scfg.double_quant
        m.submodules.reader = reader = TaggedReader(port, [cfg.fifo_words] * len(reads))
        wiring.connect(m, reader.read_cmd, wiring.flipped(self.mem.read_cmd))
        wiring.connect(m, wiring.flipped(self.mem.read_data), reader.read_data)
        elem = {"x": BF16.width, "dy": BF16.width, "a": FP32.width, "b": FP32.width, "absmax2": FP32.width,
                "absmax": 8 if dq else FP32.width, "codes": 4, "m": FP32.width, "v": FP32.width}
        lanes = {"x": scfg.banks, "dy": scfg.banks, "a": scfg.banks, "b": scfg.banks, "codes": scfg.cols}
        unpack, unpack_jobs = {}, {}
        for i, name in enumerate(reads):
            unit = unpack[name] = m.submodules[f"unpack_{name}"] = Unpacker(W, elem[name], lanes.get(name, 1))
            queue = m.submodules[f"unpack_jobs_{name}"] = SyncFIFOBuffered(width=unit.job.payload.shape().size, depth=4)
            wiring.connect(m, queue.r_stream, unit.job)
            unpack_jobs[name] = queue.w_stream
            words = reader.dest[i]
            if name == "codes":
                # bitsandbytes puts a byte's first weight in its high nibble; the unpacker takes low bits first
                m.d.comb += [unit.words.valid.eq(words.valid), words.ready.eq(unit.words.ready),
                             unit.words.payload.eq(Cat(*(Cat(words.payload[8 * k + 4:8 * k + 8],
                                                             words.payload[8 * k:8 * k + 4])
                                                         for k in range(wb))))]
            else:
                wiring.connect(m, words, unit.words)

        for name, target in (("x", step.x_in), ("dy", step.dy_in), ("a", step.a_in), ("b", step.b_in)):
            seg = unpack[name].segments
            m.d.comb += [target.valid.eq(seg.valid), seg.ready.eq(target.ready),
                         target.payload.data.eq(seg.payload.data), target.payload.row_end.eq(seg.payload.row_end),
                         target.payload.last.eq(seg.payload.last)]
        codes = unpack["codes"].segments
        m.d.comb += [step.codes.valid.eq(codes.valid), codes.ready.eq(step.codes.ready),
                     step.codes.payload.eq(codes.payload.data)]
        absmax = unpack["absmax"].segments
        m.d.comb += [step.absmax.valid.eq(absmax.valid), absmax.ready.eq(step.absmax.ready),
                     step.absmax.payload.eq(absmax.payload.data[0])]
        # an absmax2 job reads the word that holds the value: only the job's final element is it
        absmax2 = unpack["absmax2"].segments
        if dq:
            m.d.comb += [step.absmax2.valid.eq(absmax2.valid & absmax2.payload.last),
                         absmax2.ready.eq(step.absmax2.ready | ~absmax2.payload.last),
                         step.absmax2.payload.eq(absmax2.payload.data[0])]
        else:
            m.d.comb += absmax2.ready.eq(1)
        # the dequantizer's tensor beat, once per pass: the weight count and the double quantization's offset
        tensors_left = Signal(17)
        m.d.comb += [step.tensor.valid.eq(tensors_left != 0),
                     step.tensor.payload.eq(Cat(n, head.offset) if dq else n)]
        with m.If(step.tensor.valid & step.tensor.ready):
            m.d.sync += tensors_left.eq(tensors_left - 1)
        tensors_armed = Signal()
        with m.If(start):
            m.d.sync += tensors_armed.eq(0)
        with m.Elif(running & header_sent & ~tensors_armed):
            m.d.sync += [tensors_left.eq(2 * passes), tensors_armed.eq(1)]
        if cfg.adamw:
            mm, vv = unpack["m"].segments, unpack["v"].segments
            both = mm.valid & vv.valid
            m.d.comb += [step.state_in.valid.eq(both), mm.ready.eq(step.state_in.ready & both),
                         vv.ready.eq(step.state_in.ready & both),
                         step.state_in.payload.m.eq(mm.payload.data[0]), step.state_in.payload.v.eq(vv.payload.data[0])]
        else:
            m.d.comb += step.state_in.valid.eq(1)     # SGD keeps no moments: zeros, one per element

        # --- the read sequencer
        rs = Signal(_Read)
        job = reader.job
        job_sent, unpack_sent = Signal(), Signal()
        dest_index = {name: i for i, name in enumerate(reads)}
        rjob_addr, rjob_bytes, rjob_dest = Signal(port.address_width), Signal(port.address_width + 1), \
            Signal(len(job.payload.dest))
        ujob_dest = Signal(range(len(reads)))
        ujob_count, ujob_cols = Signal(32), Signal(32)
        wants_unpack, wants_job = Signal(), Signal()
        m.d.comb += [job.payload.address.eq(rjob_addr), job.payload.bytes.eq(rjob_bytes),
                     job.payload.dest.eq(rjob_dest), job.valid.eq(wants_job & ~job_sent)]
        for name, queue in unpack_jobs.items():
            m.d.comb += [queue.valid.eq(wants_unpack & ~unpack_sent & (ujob_dest == dest_index[name])),
                         queue.payload.eq(Cat(ujob_count, ujob_cols))]
        unpack_ready = Signal()
        for name, queue in unpack_jobs.items():
            with m.If(ujob_dest == dest_index[name]):
                m.d.comb += unpack_ready.eq(queue.ready)
        job_done = ~wants_job | job_sent | job.ready
        unpack_done = ~wants_unpack | unpack_sent | unpack_ready
        advance = Signal()
        m.d.comb += advance.eq(job_done & unpack_done & (rs != _Read.IDLE) & (rs != _Read.DONE))
        with m.If(job.valid & job.ready):
            m.d.sync += job_sent.eq(1)
        with m.If(wants_unpack & ~unpack_sent & unpack_ready):
            m.d.sync += unpack_sent.eq(1)
        with m.If(advance):
            m.d.sync += [job_sent.eq(0), unpack_sent.eq(0)]

        # the weight pass registers
        pass_left = Signal(17)
        g_absmax, g_codes, g_absmax2 = (Signal(port.address_width, name=n) for n in ("g_absmax", "g_codes",
                                                                                     "g_absmax2"))
        blocks_left, codes_left = Signal(32), Signal(32)
        item = 1 if dq else 4
        group_codes = WEIGHT_GROUP * scfg.blocksize // 2
        codes_bytes = (n + 1) >> 1
        # the moments
        which_b = Signal()
        s_m, s_v, s_left = Signal(port.address_width), Signal(port.address_width), Signal(32)

        def job_of(address, size, dest):
            return [rjob_addr.eq(address), rjob_bytes.eq(size), rjob_dest.eq(dest_index[dest]),
                    wants_job.eq(1)]

        def unpack_of(dest, count, cols):
            return [ujob_dest.eq(dest_index[dest]), ujob_count.eq(count), ujob_cols.eq(cols), wants_unpack.eq(1)]

        whole = {_Read.X: ("x", addr.x, x_elems, d_in, 2), _Read.DY: ("dy", addr.dy, dy_elems, d_out, 2),
                 _Read.A: ("a", addr.a, a_elems, d_in, 4), _Read.B: ("b", addr.b, b_elems, r, 4)}
        order = [_Read.X, _Read.DY, _Read.A, _Read.B]
        with m.Switch(rs):
            with m.Case(_Read.IDLE):
                with m.If(sized):
                    m.d.sync += rs.eq(_Read.X)
            for k, state in enumerate(order):
                with m.Case(state):
                    dest, base, elems, cols, size = whole[state]
                    m.d.comb += job_of(base, elems * size, dest)
                    m.d.comb += unpack_of(dest, elems, cols)
                    with m.If(advance):
                        m.d.sync += rs.eq(order[k + 1] if k + 1 < len(order) else _Read.PASS)
                        if state == _Read.B:
                            m.d.sync += pass_left.eq(2 * passes)
            with m.Case(_Read.PASS):
                # the pass's codes and absmax jobs go to the unpackers, one after the other (job_sent marks the
                # second: no read job is sent here)
                with m.If(~job_sent):
                    m.d.comb += unpack_of("codes", n, n)
                with m.Else():
                    m.d.comb += unpack_of("absmax", blocks, blocks)
                with m.If(~job_sent & unpack_done):
                    m.d.sync += [job_sent.eq(1), unpack_sent.eq(0)]
                with m.If(job_sent & unpack_done):
                    m.d.sync += [job_sent.eq(0), unpack_sent.eq(0), g_absmax.eq(addr.absmax),
                                 g_codes.eq(addr.codes), g_absmax2.eq(addr.absmax2), blocks_left.eq(blocks),
                                 codes_left.eq(codes_bytes), rs.eq(_Read.ABSMAX2 if dq else _Read.ABSMAX)]
            with m.Case(_Read.ABSMAX2):
                offset = g_absmax2[:max(1, shift)] if shift else 0
                m.d.comb += job_of(g_absmax2, (offset + 4) if shift else 4, "absmax2")
                m.d.comb += unpack_of("absmax2", (offset >> 2) + 1 if shift >= 2 else 1, 1)
                with m.If(advance):
                    m.d.sync += [rs.eq(_Read.ABSMAX), g_absmax2.eq(g_absmax2 + 4)]
            with m.Case(_Read.ABSMAX):
                count = Mux(blocks_left < WEIGHT_GROUP, blocks_left, WEIGHT_GROUP)
                m.d.comb += job_of(g_absmax, count * item, "absmax")
                with m.If(advance):
                    m.d.sync += [rs.eq(_Read.CODES), g_absmax.eq(g_absmax + WEIGHT_GROUP * item)]
            with m.Case(_Read.CODES):
                size = Mux(codes_left < group_codes, codes_left, group_codes)
                m.d.comb += job_of(g_codes, size, "codes")
                with m.If(advance):
                    m.d.sync += [g_codes.eq(g_codes + group_codes), codes_left.eq(codes_left - size),
                                 blocks_left.eq(blocks_left - WEIGHT_GROUP)]
                    with m.If(blocks_left > WEIGHT_GROUP):
                        m.d.sync += rs.eq(_Read.ABSMAX2 if dq else _Read.ABSMAX)
                    with m.Elif(pass_left > 1):
                        m.d.sync += [rs.eq(_Read.PASS), pass_left.eq(pass_left - 1)]
                    with m.Else():
                        m.d.sync += [rs.eq(_Read.STATE if cfg.adamw else _Read.DONE), which_b.eq(0)]
            if cfg.adamw:
                with m.Case(_Read.STATE):
                    elems = Mux(which_b, b_elems, a_elems)
                    with m.If(~job_sent):
                        m.d.comb += unpack_of("m", elems, elems)
                    with m.Else():
                        m.d.comb += unpack_of("v", elems, elems)
                    with m.If(~job_sent & unpack_done):
                        m.d.sync += [job_sent.eq(1), unpack_sent.eq(0)]
                    with m.If(job_sent & unpack_done):
                        m.d.sync += [job_sent.eq(0), unpack_sent.eq(0), rs.eq(_Read.M), s_left.eq(elems),
                                     s_m.eq(Mux(which_b, addr.m_b, addr.m_a)),
                                     s_v.eq(Mux(which_b, addr.v_b, addr.v_a))]
                for state, reg, dest in ((_Read.M, s_m, "m"), (_Read.V, s_v, "v")):
                    with m.Case(state):
                        count = Mux(s_left < STATE_GROUP, s_left, STATE_GROUP)
                        m.d.comb += job_of(reg, count * 4, dest)
                        with m.If(advance):
                            m.d.sync += reg.eq(reg + 4 * STATE_GROUP)
                            if state == _Read.M:
                                m.d.sync += rs.eq(_Read.V)
                            else:
                                m.d.sync += s_left.eq(s_left - count)
                                with m.If(s_left > STATE_GROUP):
                                    m.d.sync += rs.eq(_Read.M)
                                with m.Elif(~which_b):
                                    m.d.sync += [rs.eq(_Read.STATE), which_b.eq(1)]
                                with m.Else():
                                    m.d.sync += rs.eq(_Read.DONE)
            with m.Case(_Read.DONE):
                with m.If(reported):
                    m.d.sync += rs.eq(_Read.IDLE)

        # --- the write side: packers, the data in request order, the writer
        writes = WRITES if cfg.adamw else WRITES[:3]
        out_width = scfg.cols * BF16.width
        m.submodules.writer = writer = BurstWriter(port)
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
        pack = {}
        for name in writes:
            width = out_width if name in ("y", "dx") else FP32.width
            pack[name] = m.submodules[f"pack_{name}"] = Packer(width, W)
        for name, source in (("y", step.y), ("dx", step.dx)):
            m.d.comb += [pack[name].elements.valid.eq(source.valid), source.ready.eq(pack[name].elements.ready),
                         pack[name].elements.payload.eq(source.payload.data)]
        # the updates: each element's new master and moments into a queue per source, the groups written in turn
        fields = {"param": step.updates.payload.param, "m": step.updates.payload.m, "v": step.updates.payload.v}
        queues = {}
        for name in writes[2:]:
            q = queues[name] = m.submodules[f"queue_{name}"] = SyncFIFOBuffered(width=FP32.width,
                                                                                depth=2 * STATE_GROUP)
            wiring.connect(m, q.r_stream, pack[name].elements)
        all_room = Cat(*(q.w_stream.ready for q in queues.values())).all()
        m.d.comb += step.updates.ready.eq(all_room)
        for name, q in queues.items():
            m.d.comb += [q.w_stream.valid.eq(step.updates.valid & all_room), q.w_stream.payload.eq(fields[name])]

        # the words of each request, in request order: (source, words) queued with each job
        source_bits = max(1, (len(writes) - 1).bit_length())
        word_bits = port.address_width + 1 - shift
        m.submodules.order = order_q = SyncFIFOBuffered(width=source_bits + word_bits, depth=4)
        head_source = order_q.r_stream.payload[:source_bits]
        head_words = order_q.r_stream.payload[source_bits:]
        sent = Signal(word_bits)
        moving = staging.w_stream.valid & staging.w_stream.ready
        for i, name in enumerate(writes):
            words = pack[name].words
            with m.If(order_q.r_stream.valid & (head_source == i)):
                m.d.comb += [staging.w_stream.valid.eq(words.valid), words.ready.eq(staging.w_stream.ready),
                             staging.w_stream.payload.eq(words.payload.data)]
        m.d.comb += order_q.r_stream.ready.eq(moving & (sent + 1 == head_words))
        with m.If(moving):
            m.d.sync += sent.eq(Mux(sent + 1 == head_words, 0, sent + 1))

        # --- the write sequencer
        ws = Signal(_Write)
        wjob_addr, wjob_bytes = Signal(port.address_width), Signal(port.address_width + 1)
        wjob_source = Signal(source_bits)
        w_wants = Signal()
        w_job_sent, w_order_sent = Signal(), Signal()
        pack_armed = Signal()
        m.d.comb += [writer.job.payload.address.eq(wjob_addr), writer.job.payload.bytes.eq(wjob_bytes),
                     writer.job.valid.eq(w_wants & ~w_job_sent),
                     order_q.w_stream.valid.eq(w_wants & ~w_order_sent),
                     order_q.w_stream.payload.eq(Cat(wjob_source,
                                                     _ceil_shift(wjob_bytes, shift)[:word_bits]))]
        with m.If(writer.job.valid & writer.job.ready):
            m.d.sync += w_job_sent.eq(1)
        with m.If(order_q.w_stream.valid & order_q.w_stream.ready):
            m.d.sync += w_order_sent.eq(1)
        w_advance = Signal()
        m.d.comb += w_advance.eq(w_wants & (w_job_sent | writer.job.ready) & (w_order_sent | order_q.w_stream.ready))
        with m.If(w_advance):
            m.d.sync += [w_job_sent.eq(0), w_order_sent.eq(0)]

        # the packers' jobs: one per tensor, sent when the step starts (each packer takes them in turn)
        pack_counts = {"y": dy_elems >> _log2(scfg.cols), "dx": x_elems >> _log2(scfg.cols)}
        pack_jobs = {name: [] for name in writes}
        for name in ("y", "dx"):
            pack_jobs[name] = [pack_counts[name]]
        for name in writes[2:]:
            pack_jobs[name] = [a_elems, b_elems]
        for name in writes:
            unit = pack[name].job
            counts = pack_jobs[name]
            sent_flag = [Signal(name=f"pack_{name}_sent_{k}") for k in range(len(counts))]
            for k, count in enumerate(counts):
                previous = sent_flag[k - 1] if k else Const(1)
                with m.If(pack_armed & previous & ~sent_flag[k]):
                    m.d.comb += [unit.valid.eq(1), unit.payload.count.eq(count)]
                    with m.If(unit.ready):
                        m.d.sync += sent_flag[k].eq(1)
            with m.If(start):
                m.d.sync += [flag.eq(0) for flag in sent_flag]
        with m.If(start):
            m.d.sync += pack_armed.eq(0)
        with m.Elif(running & header_sent):
            m.d.sync += pack_armed.eq(1)

        # y and dx: for each tile of rows x cols, one request per output row
        rows, cols = scfg.rows, scfg.cols
        tile_row = Signal(port.address_width)       # address of the tile's first row, column 0
        p0, j, m0 = Signal(16), Signal(range(rows + 1)), Signal(16)
        cursor = Signal(port.address_width)         # address of the request
        features = Signal(16)
        u_left, u_param, u_m, u_v, u_which_b = (Signal(32, name="u_left"), Signal(port.address_width, name="u_param"),
                                                Signal(port.address_width, name="u_m"),
                                                Signal(port.address_width, name="u_v"), Signal(name="u_which_b"))
        with m.Switch(ws):
            with m.Case(_Write.IDLE):
                with m.If(start):
                    m.d.sync += ws.eq(_Write.Y)
            for state, name, base, feats in ((_Write.Y, "y", addr.y, d_out), (_Write.DX, "dx", addr.dx, d_in)):
                with m.Case(state):
                    begin = Signal(name=f"begin_{name}")
                    with m.If(~begin):
                        m.d.sync += [begin.eq(1), tile_row.eq(base), cursor.eq(base), p0.eq(0), j.eq(0),
                                     m0.eq(0), features.eq(feats)]
                    with m.Else():
                        m.d.comb += [w_wants.eq(1), wjob_addr.eq(cursor), wjob_bytes.eq(2 * cols),
                                     wjob_source.eq(writes.index(name))]
                    with m.If(w_advance):
                        m.d.sync += [j.eq(j + 1), cursor.eq(cursor + (features << 1))]
                        with m.If(j == rows - 1):
                            m.d.sync += [j.eq(0), p0.eq(p0 + cols), cursor.eq(tile_row + ((p0 + cols) << 1))]
                            with m.If(p0 + cols >= features):
                                m.d.sync += [p0.eq(0), m0.eq(m0 + rows),
                                             tile_row.eq(tile_row + features * (2 * rows)),
                                             cursor.eq(tile_row + features * (2 * rows))]
                                with m.If(m0 + rows >= t):
                                    m.d.sync += begin.eq(0)
                                    if state == _Write.Y:
                                        m.d.sync += ws.eq(_Write.DX)
                                    else:
                                        m.d.sync += [ws.eq(_Write.PARAM), u_left.eq(a_elems), u_which_b.eq(0),
                                                     u_param.eq(addr.a_out), u_m.eq(addr.m_a_out),
                                                     u_v.eq(addr.v_a_out)]
            chain = [(_Write.PARAM, "param", u_param)]
            if cfg.adamw:
                chain += [(_Write.M, "m", u_m), (_Write.V, "v", u_v)]
            for k, (state, name, reg) in enumerate(chain):
                with m.Case(state):
                    count = Mux(u_left < STATE_GROUP, u_left, STATE_GROUP)
                    m.d.comb += [w_wants.eq(1), wjob_addr.eq(reg), wjob_bytes.eq(count * 4),
                                 wjob_source.eq(writes.index(name))]
                    with m.If(w_advance):
                        m.d.sync += reg.eq(reg + 4 * STATE_GROUP)
                        if k + 1 < len(chain):
                            m.d.sync += ws.eq(chain[k + 1][0])
                        else:
                            m.d.sync += [u_left.eq(u_left - count), ws.eq(_Write.PARAM)]
                            with m.If(u_left <= STATE_GROUP):
                                with m.If(~u_which_b):
                                    m.d.sync += [u_which_b.eq(1), u_left.eq(b_elems), u_param.eq(addr.b_out),
                                                 u_m.eq(addr.m_b_out), u_v.eq(addr.v_b_out)]
                                with m.Else():
                                    m.d.sync += ws.eq(_Write.DONE)
            with m.Case(_Write.DONE):
                with m.If(reported):
                    m.d.sync += ws.eq(_Write.IDLE)

        # --- counters and the report
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
        finished = Signal()
        m.d.comb += finished.eq((ws == _Write.DONE) & ~order_q.r_stream.valid & writer.job.ready &
                                ~staging.r_stream.valid &
                                (rs == _Read.DONE) & reader.idle & (step.phase == Phase.IDLE) & header_sent)
        with m.If(start):
            m.d.sync += [cycles.eq(0), mem_stall.eq(0), compute_stall.eq(0), reported.eq(0)]
        with m.Elif(running & ~finished):
            m.d.sync += [cycles.eq(cycles + 1), mem_stall.eq(mem_stall + (waiting & (step.phase != Phase.IDLE))),
                         compute_stall.eq(compute_stall + reader.starved)]
        base_words = {name: Signal(48, name=f"base_{name}") for name in reads}
        with m.If(start):
            m.d.sync += [base_words[name].eq(reader.words[i]) for i, name in enumerate(reads)]
        written = {name: Signal(40, name=f"written_{name}") for name in writes}
        for i, name in enumerate(writes):
            with m.If(start):
                m.d.sync += written[name].eq(0)
            with m.Elif(moving & (head_source == i)):
                m.d.sync += written[name].eq(written[name] + 1)
        m.d.comb += [report.cycles.eq(cycles), report.memory.eq(mem_stall), report.compute.eq(compute_stall)]
        for i, name in enumerate(reads):
            m.d.comb += report[f"read_{name}"].eq(reader.words[i] - base_words[name])
        for name in writes:
            m.d.comb += report[f"write_{name}"].eq(written[name])
        m.d.comb += self.report.valid.eq(running & finished & ~reported)
        with m.If(self.report.valid & self.report.ready):
            m.d.sync += [reported.eq(1), running.eq(0)]
        return m
