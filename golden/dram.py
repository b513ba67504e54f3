"""Transaction-level cycle model of an SDRAM / DDR3 memory behind an in-order controller, with closed-form
predictions for simple access patterns.

Everything is counted in controller clock cycles. One command (ACTIVATE, PRECHARGE, READ, WRITE, REFRESH) issues
per cycle at most; requests are served strictly in order, one column burst after the other, without reordering
(no FR-FCFS) and without looking ahead to open the next row early. A column command moves one burst of
``burst_length`` DRAM words, which occupies the data bus for ``burst_cycles`` controller cycles.

Timing rules (per bank unless said otherwise):

* ACTIVATE: ``tRP`` after the bank's PRECHARGE, ``tRC`` after its previous ACTIVATE, ``tRRD`` after any ACTIVATE,
  ``tRFC`` after a REFRESH.
* READ / WRITE: ``tRCD`` after the bank's ACTIVATE; ``burst_cycles`` after the previous column command of the same
  kind (tCCD); a WRITE ``rd_to_wr`` after a READ, a READ ``wr_to_rd`` after a WRITE (bus turnaround, tWTR).
  Read data occupies cycles ``[t + cl, t + cl + burst_cycles)``, write data ``[t + cwl, t + cwl + burst_cycles)``.
* PRECHARGE: ``tRAS`` after the ACTIVATE, ``tRTP`` after a READ, ``cwl + burst_cycles + tWR`` after a WRITE.
* Refresh: a REFRESH is due every ``tREFI`` cycles (at ``tREFI``, ``2 tREFI``, ...). When the next command would
  issue at or after the due time, the controller first closes every open row (one PRECHARGE ALL), waits ``tRP``,
  issues REFRESH, and every bank may be activated again ``tRFC`` later.

Page policies: ``open`` keeps a row open until an access to another row of its bank (or a refresh) closes it;
``closed`` closes a row (auto-precharge, no command slot) as soon as the request using it moves on to another row or
ends, so the next request to that bank starts with an ACTIVATE but never waits for an explicit PRECHARGE.

Address map (byte address -> word -> row, bank, column): ``row-bank-col`` (default) puts the column in the low bits,
then the bank, then the row, so a sequential stream fills one row, then the same row number in the next bank.
``bank-row-col`` puts the bank in the top bits (each bank one contiguous quarter/eighth of the memory).
"""

import argparse
import math
import random
import sys
from dataclasses import dataclass, fields, replace

__all__ = ["DramTiming", "Result", "simulate", "decode", "ULX3S_SDRAM", "ECPIX5_DDR3", "PRESETS",
           "predict_sequential", "predict_random_words", "predict_turnaround", "sequential_requests",
           "random_word_requests", "efficiency_table", "main"]

PAGE_POLICIES = ("open", "closed")
ADDRESS_MAPS = ("row-bank-col", "bank-row-col")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DramTiming:
    """Geometry and timing of one DRAM device (or a rank of devices on one bus) behind a controller.

    All ``t*`` fields, ``cl``, ``cwl``, ``rd_to_wr`` and ``wr_to_rd`` are in controller clock cycles (use
    :meth:`from_ns` to convert datasheet nanoseconds). ``data_rate`` is 1 for SDR and 2 for DDR; ``phy_ratio`` is
    the number of memory clocks per controller clock (1 for an SDR PHY, 2 for a 1:2 DDR PHY, 4 for 1:4), so the
    controller moves ``data_rate * phy_ratio`` DRAM words per cycle at peak. ``trc`` defaults to ``tras + trp``.
    """
    name: str
    data_width: int            # bits of the DRAM data bus
    clock_mhz: float           # controller clock
    burst_length: int          # DRAM words per READ/WRITE command
    cl: int                    # READ command to first read data
    trcd: int
    trp: int
    tras: int
    twr: int                   # end of write data to PRECHARGE
    trfc: int
    trefi: int
    banks: int
    rows: int
    columns: int
    trc: int = None
    cwl: int = 0               # WRITE command to first write data (0 for SDR)
    trtp: int = 1              # READ to PRECHARGE
    trrd: int = 1              # ACTIVATE to ACTIVATE, different banks
    rd_to_wr: int = None       # READ command to WRITE command; default cl + burst_cycles + 1 (one idle cycle)
    wr_to_rd: int = None       # WRITE command to READ command; default cwl + burst_cycles
    data_rate: int = 1
    phy_ratio: int = 1
    page_policy: str = "open"
    address_map: str = "row-bank-col"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("DramTiming.name must be a non-empty string")
        if not isinstance(self.clock_mhz, (int, float)) or isinstance(self.clock_mhz, bool) \
                or not math.isfinite(self.clock_mhz) or self.clock_mhz <= 0:
            raise ValueError(f"DramTiming.clock_mhz must be a positive number, not {self.clock_mhz!r}")
        if not _is_int(self.data_width) or self.data_width < 8 or self.data_width % 8:
            raise ValueError(f"DramTiming.data_width must be a positive multiple of 8 bits, not {self.data_width!r}")
        if self.data_rate not in (1, 2):
            raise ValueError(f"DramTiming.data_rate must be 1 (SDR) or 2 (DDR), not {self.data_rate!r}")
        if self.phy_ratio not in (1, 2, 4):
            raise ValueError(f"DramTiming.phy_ratio must be 1, 2 or 4 (memory clocks per controller clock), "
                             f"not {self.phy_ratio!r}")
        for f in ("banks", "rows", "columns", "burst_length"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1 or v & (v - 1):
                raise ValueError(f"DramTiming.{f} must be a positive power of two, not {v!r}")
        wpc = self.data_rate * self.phy_ratio
        if self.burst_length % wpc:
            raise ValueError(f"DramTiming.burst_length ({self.burst_length}) must be a multiple of the words per "
                             f"controller cycle ({wpc})")
        if self.burst_length > self.columns:
            raise ValueError(f"DramTiming.burst_length ({self.burst_length}) exceeds the columns ({self.columns})")
        for f in ("cl", "trcd", "trp", "tras", "twr", "trfc", "trtp", "trrd"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1:
                raise ValueError(f"DramTiming.{f} must be a positive whole number of cycles, not {v!r}")
        if not _is_int(self.cwl) or self.cwl < 0:
            raise ValueError(f"DramTiming.cwl must be a whole number of cycles >= 0, not {self.cwl!r}")
        if self.trc is None:
            object.__setattr__(self, "trc", self.tras + self.trp)
        elif not _is_int(self.trc) or self.trc < self.tras:
            raise ValueError(f"DramTiming.trc must be a whole number of cycles >= tras ({self.tras}), "
                             f"not {self.trc!r}")
        if self.rd_to_wr is None:
            object.__setattr__(self, "rd_to_wr", self.cl + self.burst_cycles + 1)
        elif not _is_int(self.rd_to_wr) or self.rd_to_wr < 1:
            raise ValueError(f"DramTiming.rd_to_wr must be a positive whole number of cycles, not {self.rd_to_wr!r}")
        if self.wr_to_rd is None:
            object.__setattr__(self, "wr_to_rd", max(1, self.cwl + self.burst_cycles))
        elif not _is_int(self.wr_to_rd) or self.wr_to_rd < 1:
            raise ValueError(f"DramTiming.wr_to_rd must be a positive whole number of cycles, not {self.wr_to_rd!r}")
        refresh_cost = self.trp + self.trfc + self.trcd + 2
        if not _is_int(self.trefi) or self.trefi <= refresh_cost:
            raise ValueError(f"DramTiming.trefi must be a whole number of cycles > trp + trfc + trcd + 2 "
                             f"({refresh_cost}), not {self.trefi!r}")
        if self.page_policy not in PAGE_POLICIES:
            raise ValueError(f"DramTiming.page_policy must be one of {', '.join(PAGE_POLICIES)}, "
                             f"not {self.page_policy!r}")
        if self.address_map not in ADDRESS_MAPS:
            raise ValueError(f"DramTiming.address_map must be one of {', '.join(ADDRESS_MAPS)}, "
                             f"not {self.address_map!r}")

    # Derived quantities
    @property
    def word_bytes(self):
        return self.data_width // 8

    @property
    def words_per_cycle(self):
        return self.data_rate * self.phy_ratio

    @property
    def burst_cycles(self):
        """Controller cycles of data bus one READ/WRITE occupies."""
        return self.burst_length // (self.data_rate * self.phy_ratio)

    @property
    def burst_bytes(self):
        return self.burst_length * self.word_bytes

    @property
    def row_bytes(self):
        return self.columns * self.word_bytes

    @property
    def capacity_bytes(self):
        return self.banks * self.rows * self.row_bytes

    @property
    def peak_bytes_per_cycle(self):
        return self.word_bytes * self.words_per_cycle

    @property
    def peak_gbps(self):
        """Peak bandwidth in GB/s (10**9 bytes per second)."""
        return self.peak_bytes_per_cycle * self.clock_mhz * 1e6 / 1e9

    @classmethod
    def from_ns(cls, *, clock_mhz, trcd, trp, tras, twr, trfc, trefi, trc=None, trtp=None, trrd=None, **kw):
        """Build from datasheet times. Each time is nanoseconds, or ``(n_ck, ns)`` meaning max(n_ck memory clocks,
        ns). Minimum times round up to whole controller cycles; ``trefi`` (a maximum) rounds down. Everything else
        (``cl``, ``cwl``, turnarounds, geometry, ...) passes through in controller cycles."""
        phy_ratio = kw.get("phy_ratio", 1)
        if not isinstance(clock_mhz, (int, float)) or isinstance(clock_mhz, bool) or not clock_mhz > 0:
            raise ValueError(f"DramTiming.clock_mhz must be a positive number, not {clock_mhz!r}")

        def cyc(name, v):
            nck, ns = v if isinstance(v, tuple) else (0, v)
            if not isinstance(ns, (int, float)) or isinstance(ns, bool) or not ns > 0 or not math.isfinite(ns):
                raise ValueError(f"DramTiming.{name} must be a positive time in ns, not {ns!r}")
            return max(-(-nck // phy_ratio), math.ceil(ns * clock_mhz / 1000 - 1e-9))

        args = dict(trcd=cyc("trcd", trcd), trp=cyc("trp", trp), tras=cyc("tras", tras), twr=cyc("twr", twr),
                    trfc=cyc("trfc", trfc))
        if trc is not None:
            args["trc"] = cyc("trc", trc)
        if trtp is not None:
            args["trtp"] = cyc("trtp", trtp)
        if trrd is not None:
            args["trrd"] = cyc("trrd", trrd)
        if not isinstance(trefi, (int, float)) or isinstance(trefi, bool) or not trefi > 0:
            raise ValueError(f"DramTiming.trefi must be a positive time in ns, not {trefi!r}")
        args["trefi"] = math.floor(trefi * clock_mhz / 1000 + 1e-9)
        return cls(clock_mhz=clock_mhz, **args, **kw)

    def describe(self):
        """One line per parameter: for docs and --help."""
        return "\n".join(f"{f.name} = {getattr(self, f.name)}" for f in fields(self))


# ULX3S: 32 MB of 16-bit SDR SDRAM, IS42S16160J-7 (ISSI) or AS4C16M16SA (Alliance) as fitted. 4 banks x 8192 rows x
# 512 columns x 16 bit. At 100 MHz (10 ns) CAS latency 2 is allowed (both parts' CL2 minimum tCK is <= 10 ns), and
# it is the CAS latency of LiteDRAM's GENSDRPHY. Datasheet (IS42S16160J, -7 grade): tRCD 15 ns, tRP 15 ns, tRAS 42 ns,
# tRC 60 ns, tWR (tDPL) 14 ns, tRRD 14 ns, auto-refresh period tRFC 60 ns, 8192 refreshes per 64 ms (7.8125 us).
# Burst length 1 with one column command per cycle (as LiteDRAM's SDR controller), so any length streams gaplessly.
ULX3S_SDRAM = DramTiming.from_ns(
    name="ulx3s-sdram", data_width=16, clock_mhz=100, burst_length=1, cl=2,
    trcd=15, trp=15, tras=42, trc=60, twr=14, trrd=14, trfc=60, trefi=64e6 / 8192,
    banks=4, rows=8192, columns=512)

# ECPIX-5 (85F): one 16-bit DDR3L device, Micron MT41K256M16TW-107 (4 Gb: 8 banks x 32768 rows x 1024 columns x
# 16 bit, 512 MB; amaranth-boards' ecpix5 has 15 address, 3 bank and 16 DQ pins), behind LiteDRAM's ECP5DDRPHY:
# 1:2, controller 100 MHz, DDR3 clock 200 MHz, 400 MT/s, BL8 = 2 controller cycles per burst. At this clock
# the PHY programs CL 6, CWL 5 memory clocks (3 and 3 controller cycles, rounded up). Datasheet (-107 grade,
# DDR3L-1866): tRCD = tRP = 13.91 ns, tRAS 34 ns, tRC 47.91 ns, tWR 15 ns, tRTP = tWTR = max(4 nCK, 7.5 ns),
# tRRD = max(4 nCK, 10 ns) (2 KB page), tRFC 260 ns (4 Gb), tREFI 7.8 us (<= 85 C). Turnarounds from the JEDEC
# rules in memory clocks, then rounded up: READ->WRITE = CL + tCCD + 2 - CWL = 7 nCK -> 4; WRITE->READ =
# CWL + BL/2 + tWTR = 13 nCK -> 7.
ECPIX5_DDR3 = DramTiming.from_ns(
    name="ecpix5-ddr3", data_width=16, clock_mhz=100, burst_length=8, data_rate=2, phy_ratio=2, cl=3, cwl=3,
    trcd=13.91, trp=13.91, tras=34, trc=47.91, twr=15, trtp=(4, 7.5), trrd=(4, 10), trfc=260, trefi=7800,
    rd_to_wr=4, wr_to_rd=7, banks=8, rows=32768, columns=1024)

PRESETS = {t.name: t for t in (ULX3S_SDRAM, ECPIX5_DDR3)}


def decode(timing, address):
    """(row, bank, column) of a byte address (the column of its word)."""
    word = address // timing.word_bytes
    col = word % timing.columns
    if timing.address_map == "row-bank-col":
        bank = (word // timing.columns) % timing.banks
        row = word // (timing.columns * timing.banks)
    else:
        row = (word // timing.columns) % timing.rows
        bank = word // (timing.columns * timing.rows)
    return row, bank, col


@dataclass(frozen=True)
class Result:
    """Outcome of :func:`simulate`. ``cycles``: from cycle 0 to the end of the last data beat. ``data_cycles``:
    cycles the data bus carried bursts. ``bytes``: the bytes the requests asked for (efficiency counts these, not
    the whole bursts moved). Hits and misses count column bursts; precharges count rows closed (explicit, by
    auto-precharge, or by the PRECHARGE ALL before a refresh)."""
    cycles: int
    data_cycles: int
    bytes: int
    bursts: int
    efficiency: float
    bandwidth_gbps: float
    activates: int
    precharges: int
    refreshes: int
    row_hits: int
    row_misses: int

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


_OPS = {"r": "r", "read": "r", "w": "w", "write": "w"}


def _check_requests(timing, requests):
    out = []
    for i, req in enumerate(requests):
        try:
            addr, length, op = req
        except (TypeError, ValueError):
            raise ValueError(f"request {i} must be (address, length, 'read'|'write'), not {req!r}") from None
        if not _is_int(addr) or addr < 0:
            raise ValueError(f"request {i}: address must be a whole number of bytes >= 0, not {addr!r}")
        if not _is_int(length) or length < 1:
            raise ValueError(f"request {i}: length must be a whole number of bytes >= 1, not {length!r}")
        if addr + length > timing.capacity_bytes:
            raise ValueError(f"request {i}: bytes {addr}..{addr + length - 1} exceed the capacity "
                             f"({timing.capacity_bytes} bytes)")
        o = _OPS.get(op.lower() if isinstance(op, str) else op)
        if o is None:
            raise ValueError(f"request {i}: operation must be 'read' or 'write', not {op!r}")
        out.append((addr, length, o))
    return out


def simulate(timing, requests):
    """Serve ``requests`` (an iterable of ``(address, length, 'read'|'write')`` in bytes) in order; return a
    :class:`Result`. Deterministic: the same inputs give the same result."""
    T = timing
    reqs = _check_requests(T, requests)
    bc, bb = T.burst_cycles, T.burst_bytes
    closed = T.page_policy == "closed"
    nb = T.banks
    NEG = -(1 << 40)
    open_row = [None] * nb
    act_t = [NEG] * nb          # last ACTIVATE
    act_ok = [0] * nb           # earliest next ACTIVATE
    col_ok = [0] * nb           # earliest column command (tRCD)
    pre_ok = [0] * nb           # earliest PRECHARGE
    last_cmd = -1
    last_act = NEG
    last_rd = NEG
    last_wr = NEG
    end = 0
    due = T.trefi
    n_act = n_pre = n_ref = hits = misses = bursts = 0
    total_bytes = 0

    def refresh():
        nonlocal last_cmd, due, n_ref, n_pre
        tp = max(last_cmd + 1, due)
        opened = [b for b in range(nb) if open_row[b] is not None]
        if opened:
            tp = max([tp] + [pre_ok[b] for b in opened])
            last_cmd = tp
            for b in opened:
                act_ok[b] = max(act_ok[b], tp + T.trp)
                open_row[b] = None
            n_pre += len(opened)
        tr = max([last_cmd + 1] + act_ok)
        last_cmd = tr
        for b in range(nb):
            act_ok[b] = max(act_ok[b], tr + T.trfc)
        n_ref += 1
        due += T.trefi

    for addr, length, op in reqs:
        total_bytes += length
        first = addr // bb
        last = (addr + length - 1) // bb
        k = first
        while k <= last:
            row, bank, _ = decode(T, k * bb)
            # plan and issue PRECHARGE / ACTIVATE until the row is open
            hit = open_row[bank] == row
            if not hit:
                while True:
                    if open_row[bank] is not None:
                        t = max(last_cmd + 1, pre_ok[bank])
                        if t >= due:
                            refresh()
                            continue
                        last_cmd = t
                        open_row[bank] = None
                        act_ok[bank] = max(act_ok[bank], t + T.trp)
                        n_pre += 1
                    t = max(last_cmd + 1, act_ok[bank], last_act + T.trrd)
                    if t >= due:
                        refresh()
                        continue
                    last_cmd = last_act = t
                    act_t[bank] = t
                    open_row[bank] = row
                    act_ok[bank] = t + T.trc
                    col_ok[bank] = t + T.trcd
                    pre_ok[bank] = t + T.tras
                    n_act += 1
                    break
            # column commands: this burst and the following ones in the same row, as a block
            row_end = ((k * bb) // T.row_bytes + 1) * T.row_bytes // bb   # first burst of the next row
            n = min(last + 1, row_end) - k
            if op == "r":
                t = max(last_cmd + 1, col_ok[bank], last_rd + bc, last_wr + T.wr_to_rd)
            else:
                t = max(last_cmd + 1, col_ok[bank], last_wr + bc, last_rd + T.rd_to_wr)
            if t >= due:
                refresh()
                continue   # replan this burst: the refresh closed the row
            step = max(bc, 1)
            m = min(n, (due - 1 - t) // step + 1)     # bursts that issue before the refresh is due
            tl = t + (m - 1) * step
            last_cmd = tl
            if op == "r":
                last_rd = tl
                pre_ok[bank] = max(pre_ok[bank], tl + T.trtp)
                end = max(end, tl + T.cl + bc)
            else:
                last_wr = tl
                pre_ok[bank] = max(pre_ok[bank], tl + T.cwl + bc + T.twr)
                end = max(end, tl + T.cwl + bc)
            if hit:
                hits += m
            else:
                misses += 1
                hits += m - 1
            bursts += m
            k += m
            leaving = k > last or k == row_end
            if closed and leaving:
                # auto-precharge as soon as allowed; no command slot
                open_row[bank] = None
                act_ok[bank] = max(act_ok[bank], pre_ok[bank] + T.trp)
                n_pre += 1
    end = max(end, last_cmd + 1) if bursts else 0
    data_cycles = bursts * bc
    eff = total_bytes / (end * T.peak_bytes_per_cycle) if end else 0.0
    return Result(cycles=end, data_cycles=data_cycles, bytes=total_bytes, bursts=bursts, efficiency=eff,
                  bandwidth_gbps=eff * T.peak_gbps, activates=n_act, precharges=n_pre, refreshes=n_ref,
                  row_hits=hits, row_misses=misses)


# ---------------------------------------------------------------------------------------------------------------
# Access patterns

def sequential_requests(timing, total_bytes, request_bytes, op="read", base=0):
    """``total_bytes`` from ``base`` upwards as consecutive requests of ``request_bytes``."""
    return [(base + a, min(request_bytes, total_bytes - a), op) for a in range(0, total_bytes, request_bytes)]


def random_word_requests(timing, count, op="read", banks="random", seed=0):
    """``count`` single-word requests, each to a row not used before (so every one is a row miss), at a random
    column. ``banks``: ``random`` (uniform), ``rotate`` (0, 1, 2, ... round robin: the best case for random rows)
    or ``same`` (all in bank 0: the worst case)."""
    if banks not in ("random", "rotate", "same"):
        raise ValueError(f"banks must be random, rotate or same, not {banks!r}")
    rng = random.Random(seed)
    T = timing
    rows = rng.sample(range(T.rows), min(count, T.rows))
    if count > T.rows:
        raise ValueError(f"count ({count}) exceeds the rows ({T.rows}) that give a fresh row per request")
    out = []
    for i in range(count):
        b = {"random": rng.randrange(T.banks), "rotate": i % T.banks, "same": 0}[banks]
        col = rng.randrange(T.columns)
        if T.address_map == "row-bank-col":
            word = (rows[i] * T.banks + b) * T.columns + col
        else:
            word = (b * T.rows + rows[i]) * T.columns + col
        out.append((word * T.word_bytes, T.word_bytes, op))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Closed-form predictions from the timing (see docs/dram.md for the derivations)

def _pre_after(T, op):
    """Cycles from a column command to the earliest PRECHARGE of its bank."""
    return T.trtp if op == "read" else T.cwl + T.burst_cycles + T.twr


def _latency(T, op):
    return T.cl if op == "read" else T.cwl


def predict_sequential(timing, total_bytes, request_bytes, op="read"):
    """Predicted efficiency of ``sequential_requests(timing, total_bytes, request_bytes, op)`` from address 0
    (requests aligned to bursts, ``total_bytes`` a whole number of rows)."""
    T = timing
    bc = T.burst_cycles
    bursts = total_bytes // T.burst_bytes
    rows = total_bytes // T.row_bytes
    row_cycles = T.row_bytes // T.burst_bytes * bc
    gap_free = max(0, 1 + T.trcd - bc)                      # row change, new bank already closed
    # open page: row changes that find their bank's row open (more rows than banks between refreshes) also pay tRP
    per_interval = min(rows, T.trefi / (row_cycles + gap_free))
    f_pre = max(0.0, (per_interval - T.banks) / per_interval) if T.page_policy == "open" else 0.0
    # refresh: PRECHARGE ALL waits for the current bank, then tRP + tRFC, then the row is re-opened (tRCD)
    g_ref = max(_pre_after(T, op), bc) + T.trp + T.trfc + T.trcd - bc
    if T.page_policy == "closed" and request_bytes < T.row_bytes:
        b = request_bytes // T.burst_bytes
        last_col = T.trcd + (b - 1) * bc
        pre = max(T.tras, last_col + _pre_after(T, op))
        p_same = max(T.trc, pre + T.trp, last_col + 1)       # next request, same row: re-activate the same bank
        p_diff = max(last_col + 1, T.trrd)                   # next request in the next bank
        n = T.row_bytes // request_bytes
        body = rows * ((n - 1) * p_same + p_diff) - p_diff + last_col + bc - T.trcd
        # a refresh lands in the middle of a request on average; it costs tRFC plus re-opening the row
        g_ref = T.trp + T.trfc + T.trcd + (p_same - b * bc) / 2
    else:
        body = bursts * bc + (rows - 1) * gap_free + rows * f_pre * T.trp
    cycles = (T.trcd + body + _latency(T, op)) / (1 - g_ref / T.trefi)
    return total_bytes / (cycles * T.peak_bytes_per_cycle)


def predict_random_words(timing, count, op="read", banks="rotate"):
    """Predicted efficiency of ``random_word_requests(timing, count, op, banks)`` (``rotate`` or ``same``)."""
    T = timing
    bc = T.burst_cycles
    pre_after = _pre_after(T, op)
    opn = T.page_policy == "open"
    if banks == "same":
        p = max(T.trc, max(T.tras, T.trcd + pre_after) + T.trp, T.trcd + 1 + (1 if opn else 0))
        p_fresh = p                                          # the bank is closed after a refresh: same chain
        fresh = 0
    elif banks == "rotate":
        # open page: PRECHARGE the next bank the cycle after the column command, ACTIVATE tRP later, column tRCD
        # later; the bank was last used `banks` requests ago, so its tRAS/tRC/tWR have long expired
        p = max((1 + T.trp + T.trcd) if opn else (1 + T.trcd), T.trrd, bc,
                -(-T.trc // T.banks), -(-(max(T.tras, T.trcd + pre_after) + T.trp) // T.banks))
        p_fresh = max(1 + T.trcd, T.trrd, bc)               # after a refresh every bank is closed: no PRECHARGE
        fresh = T.banks if opn else 0
    else:
        raise ValueError(f"banks must be rotate or same, not {banks!r}")
    # refresh: PRECHARGE ALL once the newest row may close (tRAS after its ACTIVATE), tRP, REFRESH, tRFC, then the
    # next request's ACTIVATE and column; on average the refresh falls mid-request
    g_ref = max(T.tras - T.trcd, pre_after, 1) + T.trp + T.trfc + T.trcd + 1 - p / 2
    per_interval = (T.trefi - g_ref + fresh * (p - p_fresh)) / p
    per_interval = max(per_interval, fresh)
    n_ref = count / per_interval
    cycles = count * p - min(count, (n_ref + 1) * fresh) * (p - p_fresh) + n_ref * g_ref + _latency(T, op) + bc
    return count * T.word_bytes / (cycles * T.peak_bytes_per_cycle)


def predict_turnaround(timing, pairs):
    """Predicted efficiency of ``pairs`` READ/WRITE pairs of one burst each, alternating, within one open row
    (refresh-free): each pair costs ``rd_to_wr + wr_to_rd`` cycles."""
    T = timing
    cycles = T.trcd + pairs * (T.rd_to_wr + T.wr_to_rd) - T.wr_to_rd + T.cwl + T.burst_cycles
    return pairs * 2 * T.burst_bytes / (cycles * T.peak_bytes_per_cycle)


# ---------------------------------------------------------------------------------------------------------------
# Table for docs/dram.md

def efficiency_table(timings=None, stream_bytes=None, words=4000):
    """Rows of (preset, pattern, op, policy, simulated efficiency, GB/s, predicted efficiency or None)."""
    rows = []
    for T0 in timings or PRESETS.values():
        total = stream_bytes or 64 * T0.row_bytes
        for policy in PAGE_POLICIES:
            T = replace(T0, page_policy=policy)
            for op in ("read", "write"):
                for size in (16, 256, 4096):
                    r = simulate(T, sequential_requests(T, total, size, op))
                    rows.append((T.name, f"sequential {size} B", op, policy, r.efficiency, r.bandwidth_gbps,
                                 predict_sequential(T, total, size, op)))
                for banks in ("rotate", "random", "same"):
                    r = simulate(T, random_word_requests(T, words, op, banks))
                    pred = None if banks == "random" else predict_random_words(T, words, op, banks)
                    rows.append((T.name, f"random words, {banks} bank", op, policy, r.efficiency,
                                 r.bandwidth_gbps, pred))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m edge_qlora.golden.dram",
                                 description="Efficiency of the DRAM timing model's presets on simple patterns "
                                             "(simulated and predicted from the datasheet timing), as Markdown.")
    ap.add_argument("--preset", choices=sorted(PRESETS), action="append",
                    help="preset to tabulate (repeatable; default: all)")
    ap.add_argument("--words", type=int, default=4000, help="requests in the random-word patterns (default 4000)")
    ap.add_argument("--params", action="store_true", help="print each preset's parameters in cycles first")
    args = ap.parse_args(argv)
    if args.words < 1:
        print("error: --words must be at least 1", file=sys.stderr)
        return 2
    timings = [PRESETS[n] for n in args.preset] if args.preset else list(PRESETS.values())
    for T in timings:
        print(f"{T.name}: {T.data_width}-bit, {T.clock_mhz:g} MHz controller, {T.words_per_cycle} words/cycle, "
              f"peak {T.peak_gbps:.3f} GB/s, {T.capacity_bytes // 2**20} MiB, row {T.row_bytes} B")
        if args.params:
            print(T.describe())
    print()
    print("| preset | pattern | op | page | simulated eff. | GB/s | predicted eff. |")
    print("|---|---|---|---|---:|---:|---:|")
    try:
        table = efficiency_table(timings, words=args.words)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, pat, op, pol, eff, gbps, pred in table:
        p = "" if pred is None else f"{pred:.2%}"
        print(f"| {name} | {pat} | {op} | {pol} | {eff:.2%} | {gbps:.4f} | {p} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
