"""DRAM model for simulation: external memory behind a memory port, with the timing of a ``DramTiming`` preset
(twin: ``golden/dram.py``).

The model stands where a DRAM controller and its memory will be: requests (address, length, read or write) come in
on ``cmd``, write data on ``wdata``, read data leaves on ``rdata``. It schedules ACTIVATE, PRECHARGE, READ, WRITE and
REFRESH commands with exactly the rules and the in-order policy of :func:`edge_qlora.golden.dram.simulate` (one
command per cycle, no reordering, no look-ahead, per-bank open rows, refresh every ``trefi``), and moves each data
word in the cycle that schedule puts it on the data bus. Data lives in a small ``lib.memory.Memory`` (the backing
store); the timing uses the full address, so a test may spread requests over every bank and row of the real part
while the store holds a few thousand words. Simulation only: never built for a board.
"""

from dataclasses import dataclass
from types import SimpleNamespace

from amaranth.hdl import Array, C, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import DramTiming

__all__ = ["DramModelConfig", "DramModel", "request_layout", "TIME_BITS"]

#: Bits of the model's cycle counter and of every "earliest cycle" register: 2**48 cycles never run out.
TIME_BITS = 48


def _log2(n):
    return n.bit_length() - 1


@dataclass(frozen=True)
class DramModelConfig:
    """Parameters of a :class:`DramModel`.

    Parameters
    ----------
    timing : DramTiming
        Geometry and timing (``ULX3S_SDRAM``, ``ECPIX5_DDR3`` or any other).
    depth : int
        Words in the backing store, a power of two (addresses wrap modulo ``depth``; the timing does not).
    init : tuple of int
        Initial contents of the store from word 0 (the rest are zero).

    A word of the port is what the DRAM moves in one controller cycle: ``data_width * data_rate * phy_ratio`` bits
    (16 bits for the ULX3S's SDR SDRAM, 64 bits for the ECPIX-5's DDR3 behind a 1:2 PHY). Addresses and lengths are
    in these words.
    """
    timing: DramTiming
    depth: int = 4096
    init: tuple = ()

    def __post_init__(self):
        T = self.timing
        if not isinstance(T, DramTiming):
            raise TypeError(f"DramModelConfig.timing must be a DramTiming, not {T!r}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 2 \
                or self.depth & (self.depth - 1) or self.depth > self.capacity_words:
            raise ValueError(f"DramModelConfig.depth must be a power of two from 2 to the capacity "
                             f"({self.capacity_words} words), not {self.depth!r}")
        if not isinstance(self.init, tuple) or len(self.init) > self.depth \
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << self.word_width
                           for v in self.init):
            raise ValueError(f"DramModelConfig.init must be a tuple of at most {self.depth} words of "
                             f"{self.word_width} bits")
        # the bus turnarounds must keep read and write data apart: the model has one data bus
        bc = T.burst_cycles
        if T.rd_to_wr + T.cwl < T.cl + bc or T.wr_to_rd + T.cl < T.cwl + bc:
            raise ValueError(f"timing {T.name!r}: rd_to_wr ({T.rd_to_wr}) or wr_to_rd ({T.wr_to_rd}) lets read and "
                             f"write data overlap on the bus")

    @property
    def word_width(self):
        return self.timing.data_width * self.timing.words_per_cycle

    @property
    def capacity_words(self):
        return self.timing.capacity_bytes // self.timing.peak_bytes_per_cycle

    @property
    def address_bits(self):
        return _log2(self.capacity_words)


def request_layout(config):
    """Payload of ``cmd``: ``address`` and ``length`` in words (a length of 0 is dropped), ``write`` 1 for a write."""
    return data.StructLayout({"address": config.address_bits, "length": config.address_bits + 1, "write": 1})


def _beat_layout(config):
    """One data beat scheduled on the bus: ``valid`` when it carries a word of the request (a burst may hold words
    the request did not ask for), ``write``, and the word's place in the backing store."""
    return data.StructLayout({"valid": 1, "write": 1, "address": _log2(config.depth)})


class DramModel(wiring.Component):
    """Cycle-exact DRAM behind an in-order controller, for simulation.

    Requests are served strictly in order; a request may start as soon as the previous one's last column command
    has issued, in the same cycle ``cmd`` offers it. Without stalls on ``rdata``/``wdata``, word ``j`` of request
    ``i`` moves at cycle ``data_beats(timing, requests)[i][j]`` of :func:`edge_qlora.golden.dram.data_beats`
    (cycle 0: the first clock edge after reset, with ``cmd`` offered from it), given byte addresses
    ``address * word_bytes`` in the golden model.

    Stalls: when a data word is due on the bus and its stream is not ready for it (``rdata`` not ready for a read
    word, no ``wdata`` beat for a write word), the whole memory waits: its clock is held (no command issues, no
    timing counter advances, the due word stays on the bus), so the schedule in the model's own time is the one
    of the golden model, stretched by the stall cycles; a stalled read holds the bank and the bus. When ``cmd``
    has nothing to offer, time runs on (the memory idles, refresh is only issued before the next command, as in
    the golden model).

    Parameters
    ----------
    config : DramModelConfig

    Attributes
    ----------
    cmd : In(stream of :func:`request_layout`)
    wdata : In(stream of ``word_width`` bits)
    rdata : Out(stream of ``word_width`` bits)
    now : Signal
        The model's cycle counter (in the golden model's time), for testbenches.
    """

    def __init__(self, config):
        if not isinstance(config, DramModelConfig):
            raise TypeError(f"config must be a DramModelConfig, not {config!r}")
        self.config = config
        super().__init__({
            "cmd": In(stream.Signature(request_layout(config))),
            "wdata": In(stream.Signature(config.word_width)),
            "rdata": Out(stream.Signature(config.word_width)),
        })
        self.now = Signal(TIME_BITS)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        T = cfg.timing
        bc, nb = T.burst_cycles, T.banks
        row_words = T.columns // T.words_per_cycle
        col_bits, bank_bits = _log2(row_words), _log2(nb)
        row_bits = _log2(T.rows)
        word_bits = cfg.address_bits + 1
        store_bits = _log2(cfg.depth)

        m.submodules.store = store = Memory(shape=cfg.word_width, depth=cfg.depth, init=cfg.init)
        write_port = store.write_port()
        read_port = store.read_port(domain="comb")

        # --- registers: the model's clock, the request being served, bank and bus state
        now = self.now
        cur_valid = Signal()
        cur_word = Signal(word_bits)                 # first word of the request not yet given a column command
        cur_end = Signal(word_bits)                  # last word of the request
        cur_write = Signal()
        is_open = [Signal(name=f"open_{b}") for b in range(nb)]
        open_row = [Signal(row_bits, name=f"open_row_{b}") for b in range(nb)]
        act_ok = [Signal(TIME_BITS, name=f"act_ok_{b}") for b in range(nb)]    # earliest ACTIVATE (tRP, tRC, tRFC)
        col_ok = [Signal(TIME_BITS, name=f"col_ok_{b}") for b in range(nb)]    # earliest READ/WRITE (tRCD)
        pre_ok = [Signal(TIME_BITS, name=f"pre_ok_{b}") for b in range(nb)]    # earliest PRECHARGE
        rrd_ok = Signal(TIME_BITS)                   # earliest ACTIVATE to any bank (tRRD)
        rd_ok = Signal(TIME_BITS)                    # earliest READ (tCCD after a READ, wr_to_rd after a WRITE)
        wr_ok = Signal(TIME_BITS)                    # earliest WRITE (tCCD after a WRITE, rd_to_wr after a READ)
        due = Signal(TIME_BITS, init=T.trefi)        # next refresh
        # data beats already scheduled: line[i] is on the bus at cycle now + i
        depth_line = max(T.cl, T.cwl) + bc - 1
        line = [Signal(_beat_layout(cfg), name=f"line_{i}") for i in range(depth_line)]

        # --- the request to serve this cycle: the held one, else the one on offer
        word, end, write = Signal(word_bits), Signal(word_bits), Signal()
        offered = self.cmd.valid & (self.cmd.payload.length != 0)
        pending = cur_valid | offered
        m.d.comb += self.cmd.ready.eq(~cur_valid)
        with m.If(cur_valid):
            m.d.comb += [word.eq(cur_word), end.eq(cur_end), write.eq(cur_write)]
        with m.Else():
            m.d.comb += [word.eq(self.cmd.payload.address),
                         end.eq(self.cmd.payload.address + self.cmd.payload.length - 1),
                         write.eq(self.cmd.payload.write)]
        if T.address_map == "row-bank-col":
            bank, row = word[col_bits:col_bits + bank_bits], word[col_bits + bank_bits:cfg.address_bits]
        else:
            row, bank = word[col_bits:col_bits + row_bits], word[col_bits + row_bits:cfg.address_bits]
        base = Signal(word_bits)                     # first word of the current burst
        next_word = Signal(word_bits)                # first word of the next burst
        m.d.comb += [base.eq(Cat(C(0, _log2(bc)), word[_log2(bc):])), next_word.eq(base + bc)]
        done = next_word > end                       # this burst is the request's last
        leaving_row = done | (next_word[:col_bits] == 0)

        bank_open, bank_row = Array(is_open)[bank], Array(open_row)[bank]
        hit = bank_open & (bank_row == row)
        refresh = pending & (now >= due)
        any_open = Signal()
        m.d.comb += any_open.eq(sum(is_open) != 0)
        pre_all_ready = Signal()
        ref_ready = Signal()
        m.d.comb += [pre_all_ready.eq(all_of(~is_open[b] | (now >= pre_ok[b]) for b in range(nb))),
                     ref_ready.eq(all_of(now >= act_ok[b] for b in range(nb)))]

        # the one command this cycle may issue, before stalls
        do_pre_all, do_ref, do_pre, do_act, do_col = (Signal(name=n) for n in
                                                      ("do_pre_all", "do_ref", "do_pre", "do_act", "do_col"))
        with m.If(refresh):
            m.d.comb += [do_pre_all.eq(any_open & pre_all_ready), do_ref.eq(~any_open & ref_ready)]
        with m.Elif(pending & hit):
            m.d.comb += do_col.eq((now >= Array(col_ok)[bank]) & (now >= Mux(write, wr_ok, rd_ok)))
        with m.Elif(pending & bank_open):
            m.d.comb += do_pre.eq(now >= Array(pre_ok)[bank])
        with m.Elif(pending):
            m.d.comb += do_act.eq((now >= Array(act_ok)[bank]) & (now >= rrd_ok))

        # the words of this burst: which the request asked for, and where they live in the store
        burst = [Signal(_beat_layout(cfg), name=f"burst_{j}") for j in range(bc)]
        for j, beat in enumerate(burst):
            m.d.comb += [beat.valid.eq((base + j >= word) & (base + j <= end)), beat.write.eq(write),
                         beat.address.eq((base + j)[:store_bits])]

        # --- the bus this cycle; a due word whose stream is not ready holds the model's clock
        bus = Signal(_beat_layout(cfg))
        m.d.comb += bus.eq(line[0])
        if T.cwl == 0:
            # a WRITE's first word moves in the cycle of the command
            with m.If(do_col & write):
                m.d.comb += bus.eq(burst[0])
        read_due = bus.valid & ~bus.write
        write_due = bus.valid & bus.write
        run = Signal()
        m.d.comb += run.eq(~(read_due & ~self.rdata.ready) & ~(write_due & ~self.wdata.valid))
        m.d.comb += [
            read_port.addr.eq(bus.address),
            self.rdata.valid.eq(read_due),
            self.rdata.payload.eq(read_port.data),
            self.wdata.ready.eq(write_due),
            write_port.addr.eq(bus.address),
            write_port.data.eq(self.wdata.payload),
            write_port.en.eq(write_due & self.wdata.valid),
        ]

        # --- next state
        issue_col = do_col & run
        with m.If(~cur_valid & offered):
            m.d.sync += [cur_valid.eq(~(issue_col & done)), cur_word.eq(Mux(issue_col, next_word, word)),
                         cur_end.eq(end), cur_write.eq(write)]
        with m.Elif(cur_valid & issue_col):
            m.d.sync += [cur_word.eq(next_word), cur_valid.eq(~done)]

        banks = SimpleNamespace(is_open=is_open, open_row=open_row, act_ok=act_ok, col_ok=col_ok, pre_ok=pre_ok,
                                rrd_ok=rrd_ok, rd_ok=rd_ok, wr_ok=wr_ok, due=due, line=line)
        commands = SimpleNamespace(pre_all=do_pre_all, ref=do_ref, pre=do_pre, act=do_act, col=do_col)
        self._advance(m, run, banks, commands, bank, row, write, leaving_row, burst)
        return m

    def _advance(self, m, run, st, cmd, bank, row, write, leaving_row, burst):
        """The model's clock, the scheduled bus words and every bank's timing after this cycle's command (``cmd``),
        when the bus runs."""
        T, now = self.config.timing, self.now
        bc, nb = T.burst_cycles, T.banks
        depth_line = len(st.line)

        def at_least(target, value):
            """``target = max(target, value)``."""
            return target.eq(Mux(value > target, value, target))

        with m.If(run):
            m.d.sync += now.eq(now + 1)
            for i in range(depth_line):
                m.d.sync += st.line[i].eq(st.line[i + 1] if i + 1 < depth_line else 0)
            with m.If(cmd.pre_all):
                for b in range(nb):
                    with m.If(st.is_open[b]):
                        m.d.sync += [st.is_open[b].eq(0), at_least(st.act_ok[b], now + T.trp)]
            with m.If(cmd.ref):
                m.d.sync += st.due.eq(st.due + T.trefi)
                for b in range(nb):
                    m.d.sync += at_least(st.act_ok[b], now + T.trfc)
            for b in range(nb):
                with m.If(bank == b):
                    with m.If(cmd.pre):
                        m.d.sync += [st.is_open[b].eq(0), at_least(st.act_ok[b], now + T.trp)]
                    with m.If(cmd.act):
                        m.d.sync += [st.is_open[b].eq(1), st.open_row[b].eq(row), st.act_ok[b].eq(now + T.trc),
                                     st.col_ok[b].eq(now + T.trcd), st.pre_ok[b].eq(now + T.tras)]
                    with m.If(cmd.col):
                        # PRECHARGE waits tRTP after a READ, the write data and tWR after a WRITE
                        new_pre_ok = Signal(TIME_BITS, name=f"new_pre_ok_{b}")
                        after = Mux(write, now + (T.cwl + bc + T.twr), now + T.trtp)
                        m.d.comb += new_pre_ok.eq(Mux(after > st.pre_ok[b], after, st.pre_ok[b]))
                        m.d.sync += st.pre_ok[b].eq(new_pre_ok)
                        if T.page_policy == "closed":
                            # auto-precharge as the request leaves the row: no command slot
                            with m.If(leaving_row):
                                m.d.sync += [st.is_open[b].eq(0), at_least(st.act_ok[b], new_pre_ok + T.trp)]
            with m.If(cmd.act):
                m.d.sync += st.rrd_ok.eq(now + T.trrd)
            with m.If(cmd.col):
                with m.If(write):
                    m.d.sync += [st.wr_ok.eq(now + bc), st.rd_ok.eq(now + T.wr_to_rd)]
                with m.Else():
                    m.d.sync += [st.rd_ok.eq(now + bc), st.wr_ok.eq(now + T.rd_to_wr)]
                # the burst's words go on the bus `cl` (reads) or `cwl` (writes) cycles from now
                for j in range(bc):
                    for latency, op in ((T.cl, 0), (T.cwl, 1)):
                        slot = latency + j - 1          # place in next cycle's line
                        if slot >= 0:
                            with m.If(write == op):
                                m.d.sync += st.line[slot].eq(burst[j])


def all_of(terms):
    """AND of a sequence of 1-bit values."""
    result = 1
    for term in terms:
        result = term & result
    return result
