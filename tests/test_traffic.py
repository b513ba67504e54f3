"""The external-memory traffic model (golden/traffic.py): hand-checked bytes, orderings, validation."""

import subprocess
import sys
from pathlib import Path

import pytest

from edge_qlora.constants import TINYLLAMA_PROJECTIONS
from edge_qlora.golden import traffic as tr

SMALL = tr.StepShape(16, 16, 8, r=4)      # a 16x16 weight, T=8, rank 4, AdamW, 8 array rows


def test_nf4_bytes_by_hand():
    # 256 weights: 128 bytes of codes, 4 uint8 absmax, one float32 absmax2, the float32 offset
    assert tr.nf4_bytes(256) == 128 + 4 + 4 + 4
    assert tr.nf4_bytes(256, double_quant=False) == 128 + 4 * 4
    # TinyLlama q_proj: 2048*2048 weights, 65536 blocks, 256 absmax2
    assert tr.nf4_bytes(2048 * 2048) == 2048 * 2048 // 2 + 65536 + 4 * 256 + 4


def test_lower_bound_by_hand():
    w = 16 * 16 // 2 + 4 + 4 + 4                   # 140 bytes a pass
    x = dy = y = dx = 8 * 16 * 2                   # 256 bytes each, bf16
    a = b = 4 * 16 * 4                             # 256 bytes each, float32 masters
    state = 4 * 256                                # m and v of A and B
    lb = tr.lower_bound(SMALL)
    assert lb.read == {"W": 2 * w, "x": x, "dy": dy, "A": a, "B": b, "state": state}
    assert lb.written == {"y": y, "dx": dx, "A": a, "B": b, "state": state}
    assert lb.total == 2 * w + 4 * 256 + 4 * 256 + 2 * state
    assert lb.weight_passes == 2


def test_today_by_hand():
    # T=8 on 8 rows: every job with M=t has one A tile, so W operands stream once; B2 (M=out=16) streams hb^T
    # twice, B3 (M=r=4) streams x once.
    t = tr.today(SMALL)
    w = 140
    assert t.weight_passes == 2
    assert t.read["W"] == 2 * w
    assert t.read["x"] == 3 * 256                  # F1, F2 (A operand), B3 (W operand)
    assert t.read["dy"] == 3 * 256                 # B1, B4, B2
    assert t.read["A"] == 2 * 256 + 256            # F1, B5 (W operand), the update
    assert t.read["B"] == 2 * 256 + 256            # F3, B1, the update
    assert t.read["hb"] == 8 * 4 * 2 * (1 + 2)     # F3 (A operand) and B2 (W operand, 2 tiles of dy^T)
    assert t.read["gb"] == 8 * 4 * 2 * 2           # B5, B3
    assert t.read["yl"] == 8 * 16 * 4 and t.read["dxl"] == 8 * 16 * 4      # the combines
    assert t.read["grad_A"] == t.read["grad_B"] == 256
    assert t.written == {"hb": 64, "yl": 512, "y": 256, "gb": 64, "dxl": 512, "dx": 256, "grad_B": 256,
                         "grad_A": 256, "A": 256, "B": 256, "state": 1024}
    # doubling T doubles the A tiles: the weight streams twice per product
    assert tr.today(tr.StepShape(16, 16, 16, r=4)).weight_passes == 4


def test_today_phase_table_matches_rtl():
    from edge_qlora.rtl.lora import PHASES
    names = {"x": "x", "dy": "dy", "hb": "hb", "gb": "gb", "a": "A", "b": "B", None: "W", "yl": "yl", "y": "y",
             "dxl": "dxl", "dx": "dx", "gbs": "grad_B", "ga": "grad_A"}
    rtl = [(p.name, row.m, row.n, row.k, row.transposed, names[row.a_store], names[row.w_store],
            names[row.destination]) for p, row in PHASES.items()]
    assert rtl == list(tr.TODAY_PHASES)


def test_issue_figures():
    # issue 29: 32 passes of each weight at T=128; 190 MB of weight for gate/up/down; about 6.5 MB lower bound
    # for q_proj without the LoRA factors and state
    gate = tr.StepShape(2048, 5632, 128)
    assert tr.today(gate).weight_passes == 32
    assert tr.today(gate).read["W"] == pytest.approx(190e6, rel=0.01)
    q = tr.lower_bound(tr.StepShape(2048, 2048, 128))
    without_update = q.read["W"] + q.read["x"] + q.read["dy"] + q.written["y"] + q.written["dx"]
    assert without_update == pytest.approx(6.43e6, rel=0.01)


@pytest.mark.parametrize("t", [1, 8, 16, 128, 512])
@pytest.mark.parametrize("projection", TINYLLAMA_PROJECTIONS, ids=lambda p: p[0])
def test_lower_bound_blocked_today(projection, t):
    _, d_in, d_out = projection
    shape = tr.StepShape(d_in, d_out, t)
    lb, bl, td = tr.lower_bound(shape), tr.blocked(shape), tr.today(shape)
    assert lb.total <= bl.total <= td.total
    assert bl.schedule["footprint"] <= tr.DEFAULT_BUFFER_BYTES
    # backward, a tile of features is a tile of W's columns, streamed in whole NF4 blocks
    backward = bl.schedule["backward"].get("features", d_in)
    assert backward % shape.blocksize == 0 or backward == d_in
    for traffic in (lb, bl, td):
        assert all(v >= 0 for v in list(traffic.read.values()) + list(traffic.written.values()))


def test_small_case_fits_entirely():
    # everything of the 16x16 case fits 256 KiB: W twice, x and dy re-read at most once
    bl, lb = tr.blocked(SMALL), tr.lower_bound(SMALL)
    assert bl.weight_passes == 2
    assert bl.total - lb.total <= 256 + 2 * 256    # one re-read activation, A and B read once more


@pytest.mark.parametrize("projection", TINYLLAMA_PROJECTIONS[:2] + TINYLLAMA_PROJECTIONS[4:5], ids=lambda p: p[0])
def test_blocked_approaches_lower_bound(projection):
    _, d_in, d_out = projection
    shape = tr.StepShape(d_in, d_out, 128)
    lb = tr.lower_bound(shape).total
    ratios = [tr.blocked(shape, kib * 1024).total / lb for kib in (64, 128, 256, 512, 1024, 4096, 16384)]
    assert ratios == sorted(ratios, reverse=True)
    # what remains with a large buffer: x or dy read once more for the second gradient, A and B read twice
    assert ratios[-1] < 1.11


@pytest.mark.parametrize("dataflow", ["today", "blocked", "lower_bound"])
def test_monotonic_in_t(dataflow):
    for _, d_in, d_out in TINYLLAMA_PROJECTIONS[:2]:
        totals = [getattr(tr, dataflow)(tr.StepShape(d_in, d_out, t)).total for t in (1, 2, 8, 16, 64, 128, 256)]
        assert totals == sorted(totals)


def test_sgd_and_gradients_out():
    adamw, sgd = tr.lower_bound(SMALL), tr.lower_bound(tr.StepShape(16, 16, 8, r=4, optimizer="sgd"))
    assert adamw.total - sgd.total == 2 * 1024
    out = tr.lower_bound(tr.StepShape(16, 16, 8, r=4, gradients_out=True))
    assert out.total - adamw.total == 2 * 256


def test_roofline_point():
    shape = tr.StepShape(2048, 2048, 128)
    traffic = tr.lower_bound(shape)
    memory, compute, bound = tr.roofline_point(traffic, 17_341_885)
    assert memory == pytest.approx(traffic.total / (0.2e9 * 0.8))
    assert compute == pytest.approx(0.1734, rel=1e-3) and bound == "compute"
    assert tr.roofline_point(tr.today(shape), 17_341_885)[2] == "memory"
    assert tr.macs(shape) == 2 * 128 * 2048 * 2048 + 3 * 128 * 16 * 4096


@pytest.mark.parametrize("call, message", [
    (lambda: tr.StepShape(0, 16, 8), "d_in must be a positive integer"),
    (lambda: tr.StepShape(16, 16, 8, r=True), "r must be a positive integer"),
    (lambda: tr.StepShape(16, 16, 8, optimizer="adam"), "optimizer must be 'adamw' or 'sgd'"),
    (lambda: tr.blocked(SMALL, 0), "buffer_bytes must be a positive integer"),
    (lambda: tr.blocked(tr.StepShape(2048, 2048, 128), 100), "cannot hold"),
    (lambda: tr.memory_seconds(1, efficiency=1.5), "efficiency must be in (0, 1]"),
    (lambda: tr.memory_seconds(1, bytes_per_s=0), "bandwidth must be positive"),
    (lambda: tr.nf4_bytes(0), "at least one weight"),
])
def test_validation_one_line(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_module_imports_no_torch():
    code = "import sys, edge_qlora.golden.traffic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_script_bad_input_one_line():
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "traffic_table.py"), "--efficiency", "2", "--no-plot"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "efficiency" in result.stderr
