"""The DRAM timing model (golden/dram.py): validation, determinism, and agreement with the closed-form predictions
from the datasheet timing on simple patterns, for both board presets and both page policies."""

from dataclasses import replace

import pytest

from edge_qlora.golden import dram
from edge_qlora.golden.dram import (ECPIX5_DDR3, ULX3S_SDRAM, DramTiming, decode, predict_random_words,
                                    predict_sequential, predict_turnaround, random_word_requests,
                                    sequential_requests, simulate)

PRESETS = [ULX3S_SDRAM, ECPIX5_DDR3]
POLICIES = ["open", "closed"]
OPS = ["read", "write"]
NO_REFRESH = 10**9


def ids(t):
    return t.name


def _rel(a, b):
    return abs(a - b) / b


# ---------------------------------------------------------------------------------------------------------------
# presets and geometry

def test_presets_geometry_and_peak():
    u, e = ULX3S_SDRAM, ECPIX5_DDR3
    assert u.capacity_bytes == 32 * 2**20 and u.row_bytes == 1024
    assert u.peak_gbps == pytest.approx(0.2) and u.burst_cycles == 1
    assert (u.cl, u.trcd, u.trp, u.tras, u.trc, u.twr, u.trfc, u.trefi) == (2, 2, 2, 5, 6, 2, 6, 781)
    assert e.capacity_bytes == 512 * 2**20 and e.row_bytes == 2048
    assert e.peak_gbps == pytest.approx(0.8) and e.burst_cycles == 2 and e.words_per_cycle == 4
    assert (e.cl, e.cwl, e.trcd, e.trp, e.tras, e.trc, e.trfc, e.trefi) == (3, 3, 2, 2, 4, 5, 26, 780)
    assert (e.trtp, e.trrd, e.rd_to_wr, e.wr_to_rd) == (2, 2, 4, 7)


def test_from_ns_rounds_up_and_trefi_down():
    t = DramTiming.from_ns(name="x", data_width=16, clock_mhz=133, burst_length=1, cl=3, trcd=15, trp=15.0,
                           tras=42, twr=(2, 1), trfc=60, trefi=7812.5, banks=4, rows=8192, columns=512)
    assert (t.trcd, t.trp, t.tras, t.twr, t.trfc) == (2, 2, 6, 2, 8)
    assert t.trefi == 1039 and t.trc == t.tras + t.trp


def test_address_map_row_bank_col():
    T = ULX3S_SDRAM
    assert decode(T, 0) == (0, 0, 0)
    assert decode(T, 2) == (0, 0, 1)
    assert decode(T, T.row_bytes) == (0, 1, 0)
    assert decode(T, T.row_bytes * T.banks) == (1, 0, 0)
    B = replace(T, address_map="bank-row-col")
    assert decode(B, T.row_bytes) == (1, 0, 0)
    assert decode(B, T.row_bytes * T.rows) == (0, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# validation: one-line ValueError naming the field

@pytest.mark.parametrize("change, word", [
    (dict(data_width=12), "data_width"), (dict(clock_mhz=0), "clock_mhz"), (dict(banks=3), "banks"),
    (dict(rows=0), "rows"), (dict(columns=1.5), "columns"), (dict(burst_length=2, phy_ratio=2, data_rate=2), "burst_length"),
    (dict(cl=0), "cl"), (dict(trcd=-1), "trcd"), (dict(trp=True), "trp"), (dict(tras=0), "tras"),
    (dict(trc=1), "trc"), (dict(twr=0), "twr"), (dict(trfc=0), "trfc"), (dict(trefi=5), "trefi"),
    (dict(page_policy="lazy"), "page_policy"), (dict(address_map="col-row"), "address_map"),
    (dict(phy_ratio=3), "phy_ratio"), (dict(data_rate=4), "data_rate"), (dict(cwl=-1), "cwl"),
    (dict(rd_to_wr=0), "rd_to_wr"), (dict(wr_to_rd=0), "wr_to_rd"), (dict(name=""), "name"),
])
def test_timing_validation(change, word):
    with pytest.raises(ValueError, match=word) as e:
        replace(ULX3S_SDRAM, **change)
    assert "\n" not in str(e.value)


def test_from_ns_validation():
    with pytest.raises(ValueError, match="trcd"):
        DramTiming.from_ns(name="x", data_width=16, clock_mhz=100, burst_length=1, cl=2, trcd=-15, trp=15,
                           tras=42, twr=14, trfc=60, trefi=7812.5, banks=4, rows=8192, columns=512)


@pytest.mark.parametrize("req, word", [
    ((-2, 2, "read"), "address"), ((0, 0, "read"), "length"), ((0, 2, "erase"), "operation"),
    ((ULX3S_SDRAM.capacity_bytes - 1, 2, "w"), "capacity"), ((0, 2), "request 0"),
])
def test_request_validation(req, word):
    with pytest.raises(ValueError, match=word) as e:
        simulate(ULX3S_SDRAM, [req])
    assert "\n" not in str(e.value)


def test_deterministic_and_empty():
    reqs = random_word_requests(ECPIX5_DDR3, 500, "read", "random", seed=3) + \
        sequential_requests(ECPIX5_DDR3, 8192, 256, "write")
    assert simulate(ECPIX5_DDR3, reqs) == simulate(ECPIX5_DDR3, list(reqs))
    r = simulate(ULX3S_SDRAM, [])
    assert r.cycles == 0 and r.efficiency == 0.0


# ---------------------------------------------------------------------------------------------------------------
# exact cycle counts of tiny patterns (hand-checked against the timing rules)

def test_single_read_and_write_latency():
    T = replace(ULX3S_SDRAM, trefi=NO_REFRESH)
    r = simulate(T, [(0, 2, "read")])
    assert r.cycles == T.trcd + T.cl + 1 and (r.activates, r.row_misses, r.row_hits) == (1, 1, 0)
    w = simulate(T, [(0, 2, "write")])
    assert w.cycles == T.trcd + T.cwl + 1
    # a second read to another row of the same bank: PRECHARGE at tRAS, ACTIVATE max(tRP after it, tRC)
    r2 = simulate(T, [(0, 2, "read"), (T.row_bytes * T.banks, 2, "read")])
    act2 = max(T.tras + T.trp, T.trc)
    assert r2.cycles == act2 + T.trcd + T.cl + 1 and r2.precharges == 1


def test_unaligned_request_spans_bursts_and_rows():
    T = ECPIX5_DDR3
    r = simulate(T, [(T.row_bytes - 3, 6, "read")])        # 3 bytes at the end of row 0, 3 at the start of bank 1
    assert r.bursts == 2 and r.activates == 2 and r.bytes == 6 and r.row_misses == 2


def test_refresh_count_and_closes_rows():
    T = ULX3S_SDRAM
    r = simulate(T, sequential_requests(T, 64 * T.row_bytes, 4096, "read"))
    assert r.refreshes == (r.cycles - T.cl - 1) // T.trefi
    # every refresh closes the open row: one extra ACTIVATE per refresh on top of one per row
    assert r.activates == 64 + r.refreshes
    assert r.row_misses == r.activates and r.row_hits == r.bursts - r.row_misses


# ---------------------------------------------------------------------------------------------------------------
# agreement with the closed-form predictions

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T0", PRESETS, ids=ids)
def test_sequential_matches_prediction(T0, policy, op):
    T = replace(T0, page_policy=policy)
    total = 64 * T.row_bytes
    for size in (16, 256, 4096):
        r = simulate(T, sequential_requests(T, total, size, op))
        p = predict_sequential(T, total, size, op)
        assert _rel(r.efficiency, p) < 0.01, (size, r.efficiency, p)
        assert r.bytes == total and r.data_cycles == total // T.burst_bytes * T.burst_cycles


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T0", PRESETS, ids=ids)
def test_sequential_without_refresh_is_exact(T0, policy, op):
    """Without refresh the prediction is exact (to the cycle) for the long-row patterns."""
    T = replace(T0, page_policy=policy, trefi=NO_REFRESH)
    total = 16 * T.row_bytes
    for size in (16, 256, 4096):
        r = simulate(T, sequential_requests(T, total, size, op))
        p = predict_sequential(T, total, size, op)
        assert r.refreshes == 0
        assert _rel(r.efficiency, p) < 1e-6, (size, r.efficiency, p)    # 1e-6: tREFI = 1e9 still enters


def test_long_sequential_efficiency_is_refresh_and_row_limited():
    """ULX3S: a row change costs 1 + tRCD - 1 = 2 cycles per 512, a refresh 1 + tRP + tRFC + tRCD - 1 = 10 cycles
    per tREFI = 781: (1 - 10/781) / (1 + 2/512) = 98.34%."""
    T = ULX3S_SDRAM
    r = simulate(T, sequential_requests(T, 256 * T.row_bytes, 4096, "read"))
    assert r.efficiency == pytest.approx((1 - 10 / 781) / (1 + 2 / 512), rel=2e-3)
    assert r.bandwidth_gbps == pytest.approx(0.2 * r.efficiency)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T0", PRESETS, ids=ids)
def test_random_words_match_prediction(T0, policy, op):
    T = replace(T0, page_policy=policy)
    n = 3000
    for banks in ("rotate", "same"):
        r = simulate(T, random_word_requests(T, n, op, banks, seed=1))
        assert r.row_misses == n and r.row_hits == 0
        p = predict_random_words(T, n, op, banks)
        assert _rel(r.efficiency, p) < 0.01, (banks, r.efficiency, p)
    # uniformly random banks lie between the best (rotating) and worst (one bank) cases
    lo = simulate(T, random_word_requests(T, n, op, "same", seed=2)).efficiency
    hi = simulate(T, random_word_requests(T, n, op, "rotate", seed=2)).efficiency
    mid = simulate(T, random_word_requests(T, n, op, "random", seed=2)).efficiency
    assert lo <= mid <= hi


@pytest.mark.parametrize("T0", PRESETS, ids=ids)
def test_random_words_without_refresh(T0):
    for policy in POLICIES:
        for op in OPS:
            T = replace(T0, page_policy=policy, trefi=NO_REFRESH)
            for banks in ("rotate", "same"):
                r = simulate(T, random_word_requests(T, 400, op, banks, seed=5))
                p = predict_random_words(T, 400, op, banks)
                # the prediction assumes steady state from the first request; the first `banks` requests find
                # their bank closed, which the formula accounts for only after refreshes
                assert _rel(r.efficiency, p) < 0.01, (policy, op, banks, r.efficiency, p)


@pytest.mark.parametrize("T0", PRESETS, ids=ids)
def test_read_write_turnaround(T0):
    T = replace(T0, trefi=NO_REFRESH)
    pairs = min(100, T.row_bytes // T.burst_bytes // 2)      # all in one row
    reqs = []
    for i in range(pairs):
        reqs += [(2 * i * T.burst_bytes, T.burst_bytes, "read"), ((2 * i + 1) * T.burst_bytes, T.burst_bytes, "write")]
    r = simulate(T, reqs)
    assert r.efficiency == pytest.approx(predict_turnaround(T, pairs), rel=1e-12)
    assert r.activates == 1 and r.row_hits == 2 * pairs - 1


def test_open_beats_closed_for_small_sequential_and_closed_beats_open_for_random():
    for T0 in PRESETS:
        o, c = replace(T0, page_policy="open"), replace(T0, page_policy="closed")
        seq = sequential_requests(T0, 8 * T0.row_bytes, 16, "read")
        assert simulate(o, seq).efficiency > simulate(c, seq).efficiency
        rnd = random_word_requests(T0, 1000, "read", "rotate")
        assert simulate(c, rnd).efficiency > simulate(o, rnd).efficiency


def test_main_prints_table(capsys):
    assert dram.main(["--preset", "ulx3s-sdram", "--words", "200"]) == 0
    out = capsys.readouterr().out
    assert "peak 0.200 GB/s" in out and "| ulx3s-sdram | sequential 4096 B | read | open |" in out
    assert dram.main(["--words", "0"]) == 2
