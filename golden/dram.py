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
import random
import sys
from dataclasses import dataclass, fields, replace

# the timing record and the presets live below both this model and rtl/dram_model.py
from ..constants import ADDRESS_MAPS, DRAM_PRESETS as PRESETS, ECPIX5_DDR3, PAGE_POLICIES, ULX3S_SDRAM, DramTiming

__all__ = ["DramTiming", "PAGE_POLICIES", "ADDRESS_MAPS", "Result", "simulate", "data_beats", "decode", "ULX3S_SDRAM", "ECPIX5_DDR3", "PRESETS",
           "predict_sequential", "predict_random_words", "predict_turnaround", "sequential_requests",
           "random_word_requests", "efficiency_table", "main"]



def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


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
    return _serve(timing, _check_requests(timing, requests), None)


def data_beats(timing, requests):
    """The schedule of :func:`simulate`, beat by beat: for each request, the cycles at which its data is on the bus,
    one per controller-cycle beat (``peak_bytes_per_cycle`` bytes, aligned) that holds some of its bytes, in address
    order. ``beats[i][0]`` and ``beats[i][-1]`` are request ``i``'s first and last data cycles. The Amaranth
    :class:`~edge_qlora.rtl.dram_model.DramModel` moves each data word at exactly these cycles when its streams never
    stall."""
    T = timing
    reqs = _check_requests(T, requests)
    record = []
    _serve(T, reqs, record)
    lat = {"r": T.cl, "w": T.cwl}
    bpc = T.peak_bytes_per_cycle
    beats = [[] for _ in reqs]
    for i, k, m, t, op in record:
        addr, length, _ = reqs[i]
        lo, hi = addr // bpc, (addr + length - 1) // bpc      # the request's beats
        for b in range(m):
            start = (k + b) * T.burst_cycles                   # the burst's first beat
            for j in range(T.burst_cycles):
                if lo <= start + j <= hi:
                    beats[i].append(t + b * max(T.burst_cycles, 1) + lat[op] + j)
    return beats


def _serve(timing, reqs, record):
    """:func:`simulate` on checked requests; appends ``(request, first burst, bursts, first command cycle, op)`` to
    ``record`` (unless ``None``) for each block of column commands."""
    T = timing
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

    for index, (addr, length, op) in enumerate(reqs):
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
            if record is not None:
                record.append((index, k, m, t, op))
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
