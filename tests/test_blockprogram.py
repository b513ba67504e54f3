"""The blocked step's memory program (golden/blockprogram.py): its bytes equal the traffic model's, every byte of
every tensor is moved as often as its loop order says, and the DRAM model times it."""

import numpy as np
import pytest

from edge_qlora.constants import DRAM_PRESETS, TINYLLAMA_PROJECTIONS
from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden import dram
from edge_qlora.golden import traffic as tr
from edge_qlora.golden.memmap import layout

LOOPS = {
    "TS": {"loop": "token-stationary", "tokens": 8},
    "WS": {"loop": "weight-stationary", "features": 128},
    "OS": {"loop": "output-stationary", "tokens": 8, "features": 128},
}


def _schedule(forward, backward, order="x-first", accumulate="resident", rank_resident=True):
    return {"order": order, "forward": dict(LOOPS[forward], footprint=0),
            "backward": dict(LOOPS[backward], footprint=0), "accumulate": accumulate,
            "rank_resident": rank_resident, "buffer_bytes": 1 << 30}


def _coverage(memmap, prog):
    """``{(op, region): per-byte counts}``; asserts that every job lies inside its region."""
    counts = {}
    for op, job in prog.ops:
        region = memmap[job.tensor]
        start = job.address - region.address
        assert 0 <= start and start + job.bytes <= region.size, (op, job)
        assert op == "read" and region.access != "write" or op == "write" and region.access != "read", (op, job)
        c = counts.setdefault((op, job.tensor), np.zeros(region.size, np.int64))
        c[start:start + job.bytes] += 1
    return counts


@pytest.mark.parametrize("forward", sorted(LOOPS))
@pytest.mark.parametrize("backward", sorted(LOOPS))
def test_every_byte_moves_as_its_loop_says(forward, backward):
    # T = 16 in blocks of 8 tokens, 256 -> 384 features in tiles of 128: two token blocks, two or three tiles
    t, d_in, d_out, r = 16, 256, 384, 4
    memmap = layout(d_in, d_out, t, r)
    for order, accumulate, rank_resident in (("x-first", "resident", True), ("dy-first", "reread", False)):
        prog = bp.program(memmap, _schedule(forward, backward, order, accumulate, rank_resident))
        counts = _coverage(memmap, prog)
        w_fwd = 1 if forward == "WS" else 2
        w_bwd = 1 if backward == "WS" else 2
        assert prog.weight_passes == w_fwd + w_bwd
        for part in ("nf4_codes", "nf4_absmax", "nf4_absmax2"):
            assert (counts["read", part] == w_fwd + w_bwd).all(), part
        x_reads = (1 if forward == "TS" else -(-d_out // 128)) + (order == "x-first" or accumulate == "reread")
        dy_reads = (1 if backward == "TS" else -(-d_in // 128)) + (order == "dy-first" or accumulate == "reread")
        assert (counts["read", "x"] == x_reads).all()
        assert (counts["read", "dy"] == dy_reads).all()
        for out in ("y", "dx"):
            assert (counts["write", out] == 1).all(), out
        rank = 2 if rank_resident else prog.weight_passes + 1
        for name in ("lora_A", "lora_B"):
            assert (counts["read", name] == rank).all() and (counts["write", name] == 1).all()
        for name in ("exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B"):
            assert (counts["read", name] == 1).all() and (counts["write", name] == 1).all()


@pytest.mark.parametrize("t", [16, 128])
def test_bytes_equal_the_traffic_model_on_tinyllama(t):
    """The program of the traffic model's schedule moves the model's bytes (but for the NF4 offset, in the
    descriptor). (Each TinyLlama projection shape once; T = 512 is scripts/blocked_dram.py's.)"""
    for d_in, d_out in dict.fromkeys((d_in, d_out) for _name, d_in, d_out in TINYLLAMA_PROJECTIONS):
        model, memmap, prog = bp.blocked_for(d_in, d_out, t)
        read, written = bp.traffic_bytes(prog)
        assert read == dict(model.read, W=model.read["W"] - 4 * model.weight_passes)
        assert written == model.written and prog.weight_passes == model.weight_passes


def test_rejects_rows_of_partial_blocks():
    with pytest.raises(ValueError, match="multiple of the NF4 blocksize"):
        bp.program(layout(96, 64, 8, 4), _schedule("TS", "TS"))


def test_dram_time_serves_the_bursts_in_order():
    memmap = layout(256, 384, 16, 4)
    prog = bp.program(memmap, _schedule("OS", "OS"))
    timing = DRAM_PRESETS["ulx3s-sdram"]
    port = bp.port_for(timing)
    reqs = bp.requests(port, prog)
    assert all(r.length <= port.max_burst and r.address // port.boundary == (r.address + r.length * 2 - 1)
               // port.boundary for r in reqs)
    result = bp.dram_time(timing, port, reqs)
    assert result == dram.simulate(timing, [(r.address, 2 * r.length, r.op) for r in reqs])
    assert result.bytes == 2 * sum(r.length for r in reqs) >= sum(job.bytes for _, job in prog.ops)
    assert 0.5 < result.efficiency <= 1


def test_the_blocked_schedule_is_what_the_program_follows():
    # q_proj at T = 128: output-stationary both ways, 128 tokens by 410 features forward; backward the features
    # are W's columns, whole NF4 blocks: 5 blocks of 448 (the last 256)
    model, _memmap, prog = bp.blocked_for(2048, 2048, 128)
    assert model.schedule["forward"] == {"loop": "output-stationary", "tokens": 128, "features": 410,
                                         "footprint": model.schedule["forward"]["footprint"]}
    assert model.schedule["backward"]["features"] == 448
    assert tr.blocked(tr.StepShape(2048, 2048, 128)).total == model.total


def test_the_update_follows_the_products():
    prog = bp.program(layout(256, 384, 16, 4), _schedule("OS", "WS"))
    products, update = prog.part("products"), prog.part("update")
    assert products.ops + update.ops == prog.ops and update.ops
    assert {job.tensor for _, job in update.ops} == {"lora_A", "lora_B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B",
                                                     "exp_avg_sq_B"}
    assert {op for op, job in products.ops if job.tensor.startswith("exp_avg")} == set()


@pytest.mark.parametrize("t, d_in, d_out, tokens, features", [(24, 192, 48, 8, 16), (6, 128, 24, 4, 16),
                                                               (128, 2048, 256, 128, 256)])
def test_forward_product_moves_the_forward_sweeps_bytes(t, d_in, d_out, tokens, features):
    # the block controller's program (rtl/blocked.py) cuts y finer than the program of the whole step, but moves
    # the same bytes of every tensor as its forward sweep in the same output-stationary schedule, and every byte of
    # y is written once, every byte of x read once per feature block, of W once per token block
    mm = layout(d_in, d_out, t, 4)
    product = bp.forward_product(mm, tokens, features, cols=8)
    writer = bp._Writer(mm)
    passes = bp._forward(writer, {"loop": "output-stationary", "tokens": tokens, "features": features}, True)
    assert passes == product.weight_passes == -(-t // tokens)
    assert bp.bytes_by_tensor(product) == bp.bytes_by_tensor(bp.Program(tuple(writer.ops), passes, len(writer.ops)))
    counts = _coverage(mm, product)
    assert (counts["write", "y"] == 1).all()
    assert (counts["read", "x"] == -(-d_out // features)).all()
    assert (counts["read", "nf4_codes"] == -(-t // tokens)).all()
    with pytest.raises(ValueError, match="multiples of cols"):
        bp.forward_product(mm, tokens, features + 1, cols=8)


@pytest.mark.parametrize("t, d_in, d_out, tokens, features", [(8, 256, 128, 4, 128), (6, 192, 64, 2, 64)])
def test_forward_product_with_the_rank_term_reads_a_and_b_once_per_token_block(t, d_in, d_out, tokens, features):
    # with the rank-r term the program is the base product's plus A (its span pieces before each span's x in a
    # token block's first feature block: hb is made on chip) and B (after the first span of each feature block)
    mm = layout(d_in, d_out, t, 4)
    base, term = bp.forward_product(mm, tokens, features, 8), bp.forward_product(mm, tokens, features, 8, True)
    added = bp.bytes_by_tensor(term)
    for name, size in bp.bytes_by_tensor(base).items():
        assert added.pop(name) == size
    blocks = -(-t // tokens)
    assert added == {("read", "lora_A"): blocks * d_in * 4 * 4, ("read", "lora_B"): blocks * d_out * 4 * 4}
    counts = _coverage(mm, term)
    assert (counts["read", "lora_A"] == blocks).all() and (counts["read", "lora_B"] == blocks).all()
    ops = [job for _, job in term.ops]
    first_x = next(k for k, job in enumerate(ops) if job.tensor == "x")
    assert [job.tensor for job in ops[first_x - 4:first_x]] == ["lora_A"] * 4     # the first span's piece of A
    first_b = next(k for k, job in enumerate(ops) if job.tensor == "lora_B")
    assert len([job for job in ops[:first_b] if job.tensor == "x"]) == tokens     # after one span of x


@pytest.mark.parametrize("t, d_in, d_out, tokens, features", [(8, 256, 128, 4, 128), (6, 192, 64, 2, 64)])
def test_backward_product_with_the_rank_term_reads_b_and_a_once_per_token_block(t, d_in, d_out, tokens, features):
    mm = layout(d_in, d_out, t, 4, row_exponent_chunk=16)
    base = bp.backward_product(mm, tokens, features, 2, 8)
    term = bp.backward_product(mm, tokens, features, 2, 8, rank_term=True)
    added = bp.bytes_by_tensor(term)
    for name, size in bp.bytes_by_tensor(base).items():
        assert added.pop(name) == size
    blocks = -(-t // tokens)
    assert added == {("read", "lora_B"): blocks * d_out * 4 * 4, ("read", "lora_A"): blocks * d_in * 4 * 4}
    counts = _coverage(mm, term)
    assert (counts["read", "lora_B"] == blocks).all() and (counts["read", "lora_A"] == blocks).all()
    ops = [job for _, job in term.ops]
    first_dy = next(k for k, job in enumerate(ops) if job.tensor == "dy")
    assert ops[first_dy - 1].tensor == "lora_B" and ops[first_dy - 1].bytes == 64 * 4 * 4


@pytest.mark.parametrize("t, d_in, d_out, features", [(8, 256, 128, 128), (18, 192, 64, 64)])
def test_backward_product_with_the_gradients_reads_hb_writes_gb_and_passes_x_once(t, d_in, d_out, features):
    mm = layout(d_in, d_out, t, 4, row_exponent_chunk=16, gradients_out=True, rank_rows=True)
    term = bp.backward_product(mm, t, features, 2, 8, rank_term=True)
    grad = bp.backward_product(mm, t, features, 2, 8, rank_term=True, gradient=True)
    added = bp.bytes_by_tensor(grad)
    for name, size in bp.bytes_by_tensor(term).items():
        assert added.pop(name) == size
    assert added == {("read", "hb"): t * 4 * 2, ("write", "grad_B"): d_out * 4 * 4, ("write", "gb"): t * 4 * 2,
                     ("read", "gb"): t * 4 * 2, ("read", "x_fields"): -(-t // 16), ("read", "x"): t * d_in * 2,
                     ("write", "grad_A"): 4 * d_in * 4}
    counts = _coverage(mm, grad)
    for key in (("read", "hb"), ("write", "grad_B"), ("write", "gb"), ("read", "gb"), ("read", "x"),
                ("write", "grad_A")):
        assert (counts[key] == 1).all(), key
    # hb just before the second column block's first dy
    ops = [job for _, job in grad.ops]
    at = next(k for k, job in enumerate(ops) if job.tensor == "hb")
    assert ops[at + 1].tensor == "dy" and ops[at + 1].address == mm["dy"].address
    assert len([job for job in ops[:at] if job.tensor == "dx"]) == t          # after the first block's outputs
    # gb after the first block's outputs; the pass over x: gb, x's fields, then per span of x's columns its token
    # rows and grad_A's r pieces
    at = next(k for k, job in enumerate(ops) if job.tensor == "gb")
    assert ops[at - 1].tensor == "dx" and len([job for job in ops[:at] if job.tensor == "dx"]) == t
    passing = [op + job.tensor for op, job in grad.ops[at + 1:] if job.tensor in ("gb", "x_fields", "x", "grad_A")]
    assert passing == ["readgb", "readx_fields"] + (["readx"] * t + ["writegrad_A"] * 4) * (d_in // 64)


def test_the_pass_over_x_runs_beside_the_third_column_block_on():
    # six column blocks of two spans: from the third on one of x's six spans after each span's reads (of 8 slots)
    t, d_in, d_out, features = 8, 384, 128, 64
    mm = layout(d_in, d_out, t, 4, row_exponent_chunk=16, gradients_out=True, rank_rows=True)
    assert bp.x_pass_per_span(d_in, d_out, features) == 1
    assert bp.x_pass_per_span(256, 128, 128) == 0 and bp.x_pass_per_span(2048, 256, 384) == 2
    ops = [job for _, job in bp.backward_product(mm, t, features, 2, 8, rank_term=True, gradient=True).ops]
    firsts = [k for k, job in enumerate(ops) if job.tensor == "x" and (job.address - mm["x"].address) // 2 < d_in]
    assert len(firsts) == 6
    for span, k in enumerate(firsts):
        block = len([job for job in ops[:k] if job.tensor == "dx"]) // t     # column blocks finished before it
        assert block == 2 + span // 2
        before = ops[k - 1].tensor if span else ops[k - 3].tensor          # (the first after gb and x's fields)
        assert before == "nf4_codes" or before == "lora_A"
    serial = bp.backward_product(mm, t, features, 2, 8, rank_term=True, gradient=True, x_per_span=0)
    assert [job.tensor for _, job in serial.ops][-(t + 4):] == ["x"] * t + ["grad_A"] * 4
    with pytest.raises(ValueError, match="x_per_span"):
        bp.backward_product(mm, t, features, 2, 8, rank_term=True, gradient=True, x_per_span=16)


def test_forward_product_with_the_gradient_writes_hb_and_x_fields_once():
    mm = layout(128, 32, 8, 4, gradients_out=True, rank_rows=True)
    term = bp.forward_product(mm, 8, 16, 8, rank_term=True)
    grad = bp.forward_product(mm, 8, 16, 8, rank_term=True, gradient=True)
    added = bp.bytes_by_tensor(grad)
    for name, size in bp.bytes_by_tensor(term).items():
        assert added.pop(name) == size
    assert added == {("write", "hb"): 8 * 4 * 2, ("write", "x_fields"): 4}
    assert (_coverage(mm, grad)["write", "hb"] == 1).all()
    # the token block's rows, then x's fields, after its first feature block's outputs
    ops = [job for _, job in grad.ops]
    at = [k for k, job in enumerate(ops) if job.tensor == "hb"]
    assert len(at) == 1 and ops[at[0] - 1].tensor == "y" and ops[at[0] + 1].tensor == "x_fields"
    assert ops[at[0] + 2].tensor == "nf4_absmax"


def test_the_gradients_program_refuses_what_it_cannot_run():
    mm = layout(256, 128, 8, 4, row_exponent_chunk=16, gradients_out=True, rank_rows=True)
    with pytest.raises(ValueError, match="all tokens in one token block"):
        bp.backward_product(mm, 4, 128, 2, 8, rank_term=True, gradient=True)
    with pytest.raises(ValueError, match="a second column block"):
        bp.backward_product(mm, 8, 256, 2, 8, rank_term=True, gradient=True)
    with pytest.raises(ValueError, match="memory map's hb"):
        bp.forward_product(layout(128, 32, 8, 4), 8, 16, 8, rank_term=True, gradient=True)
    with pytest.raises(ValueError, match="all tokens in one token block"):
        bp.forward_product(layout(128, 32, 8, 4, rank_rows=True), 4, 16, 8, rank_term=True, gradient=True)
    with pytest.raises(ValueError, match="hb, gb and the gradients"):
        bp.backward_product(layout(256, 128, 8, 4, row_exponent_chunk=16), 8, 128, 2, 8, rank_term=True,
                            gradient=True)


@pytest.mark.parametrize("t, d_in, d_out, tokens, features", [(8, 256, 128, 4, 128), (6, 192, 64, 2, 64),
                                                               (128, 2048, 2048, 128, 384)])
def test_backward_product_moves_the_backward_sweeps_bytes(t, d_in, d_out, tokens, features):
    # the transposed block controller's program: the backward sweep's bytes in the same output-stationary
    # schedule, and the whole rows' chunk exponents once per token block; every byte of dx written once, of dy read
    # once per column block, of W once per token block
    mm = layout(d_in, d_out, t, 4, row_exponent_chunk=16)
    product = bp.backward_product(mm, tokens, features, rows=2, cols=8)
    writer = bp._Writer(mm)
    passes = bp._backward(writer, {"loop": "output-stationary", "tokens": tokens, "features": features}, True,
                          features)
    assert passes == product.weight_passes == -(-t // tokens)
    got = bp.bytes_by_tensor(product)
    assert got.pop(("read", "w_row_exponents")) == passes * mm["w_row_exponents"].size
    assert got == bp.bytes_by_tensor(bp.Program(tuple(writer.ops), passes, len(writer.ops)))
    counts = _coverage(mm, product)
    assert (counts["write", "dx"] == 1).all()
    assert (counts["read", "dy"] == -(-d_in // features)).all()
    assert (counts["read", "nf4_codes"] == -(-t // tokens)).all()
    assert (counts["read", "nf4_absmax"] == -(-t // tokens)).all()
    with pytest.raises(ValueError, match="whole NF4 blocks"):
        bp.backward_product(mm, tokens, features + 8, rows=2, cols=8)
    with pytest.raises(ValueError, match="w_row_exponents"):
        bp.backward_product(layout(d_in, d_out, t, 4), tokens, features, rows=2, cols=8)
