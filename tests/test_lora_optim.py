# amaranth: UnusedElaboratable=no
"""LoRA optimizer core: the RTL bit for bit against the golden twin over several steps, and the golden twin against
torch.optim.AdamW and torch.optim.SGD.

The RTL runs one simulation per optimizer and interval (cycles between elements) for several steps: each step
streams the whole tensor through the core with random stalls on both streams, and the next step feeds the core's own
outputs (parameters and moments) back in, with the next step's constants, once every update has come back. Every
step's updates must equal the golden twin's on the same inputs, in order, with nothing lost or duplicated. Without
stalls, the core must take an element every ``interval`` cycles and return its update ``latency`` cycles later.

The golden twin rounds every operation to float32 in its own fixed order; torch, here in float64, uses another order
(and no rounding to speak of), so the two agree to about 1e-7 of the terms each step adds up, not bit for bit.
"""

import numpy as np
import pytest
import torch
from amaranth.hdl import Value

from edge_qlora.golden import lora_optim as golden
from edge_qlora.rtl.lora_optim import FOLD_INTERVAL, HYPER_FIELDS, KINDS, LoRAOptimizer, OptimConfig, hyper_layout
from edge_qlora.sim.harness import pack_lanes, simulate, unpack_lanes
from edge_qlora.sim.streams import Stalls, get, put

ELEMENTS = 240
STEPS = 3
INTERVALS = (1, 2, 4, 8)
# AdamW settings of a LoRA fine-tune, a high learning rate so that the parameters move visibly
ADAMW = {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
SGD = {"lr": 0.05, "weight_decay": 0.01}


# -- tensors ----------------------------------------------------------------------------------------------------------

def _bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def _floats(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _tensors(n, rng, steps=STEPS):
    """Parameters, ``steps`` gradients and starting moments of one LoRA tensor, with its corners mixed in.

    Besides the usual scales (parameters around 0.02, gradients around 1e-3, moments zero as at the first step or
    those of an earlier gradient) a tenth of the elements of each kind: zeros of both signs, tiny gradients (whose
    square underflows), subnormal parameters and gradients, large gradients (up to 1e15: the square stays finite in
    float32), large parameters, and subnormal moments, which leave ``eps`` as the denominator and make
    ``m' / denom`` large. Every value is finite, so that float64 torch is a fair reference.
    """
    kind = rng.integers(0, 10, n)
    param = rng.normal(0, 0.02, n)
    param = np.where(kind == 1, rng.choice([0.0, -0.0], n), param)
    param = np.where(kind == 2, rng.normal(0, 1e-39, n), param)                 # subnormal
    param = np.where(kind == 3, rng.normal(0, 30, n), param)
    grads = []
    for _ in range(steps):
        grad = rng.normal(0, 1e-3, n)
        grad = np.where(kind == 1, rng.choice([0.0, -0.0], n), grad)
        grad = np.where(kind == 4, rng.normal(0, 1e-25, n), grad)               # the square underflows
        grad = np.where(kind == 5, rng.normal(0, 1e-40, n), grad)               # subnormal
        grad = np.where(kind == 6, rng.normal(0, 1, n) * 10.0 ** rng.integers(2, 16, n), grad)
        grads.append(grad.astype(np.float32))
    m = np.where(kind == 7, rng.normal(0, 1e-40, n), rng.normal(0, 1e-3, n) * (kind >= 8))
    v = np.where(kind == 7, np.abs(rng.normal(0, 1e-40, n)), (rng.normal(0, 1e-3, n) ** 2) * (kind >= 8))
    return param.astype(np.float32), grads, m.astype(np.float32), v.astype(np.float32)


def _extremes():
    """Elements only the RTL test gets (float64 torch would not overflow): infinities, NaNs, squares that overflow."""
    big, inf, nan = 3e20, np.inf, np.nan
    param = np.array([1.0, -2.0, inf, 0.5, nan, 1e38, -1e-45, 0.25], np.float32)
    grad = np.array([big, -big, 1.0, inf, 0.5, -3e38, nan, 1e-30], np.float32)
    m = np.array([0.0, 1e38, 0.0, 0.0, 0.0, -3e38, 0.0, inf], np.float32)
    v = np.array([0.0, 3e38, 0.0, 0.0, 0.0, 3e38, 1e-45, 0.0], np.float32)
    return param, grad, m, v


def _hypers(kind):
    if kind == "adamw":
        return [golden.hyper_from(**ADAMW, step=step) for step in range(1, STEPS + 1)]
    hyper = golden.hyper_from(SGD["lr"], weight_decay=SGD["weight_decay"])
    return [hyper] * STEPS


# -- simulation -------------------------------------------------------------------------------------------------------

def _pack_hyper(hyper):
    return sum(int(_bits(hyper[name])) << hyper_layout[name].offset for name in HYPER_FIELDS)


def _run_steps(kind, param, grads, m, v, hypers, seed, interval=1, fold=False):
    """The core's updates for ``len(grads)`` steps, each step's inputs being the previous step's outputs.

    Returns a list, per step, of the ``(param, m, v, grad)`` bit patterns that went in and the ``(param, m, v)``
    that came out.
    """
    dut = LoRAOptimizer(OptimConfig(kind, interval, fold))
    n = len(param)
    carried = {"param": _bits(param), "m": _bits(m), "v": _bits(v)}
    steps = []
    collected = [0]                                   # steps whose every update has come back
    in_stalls, out_stalls = Stalls(0.3, seed), Stalls(0.3, seed + 1)

    async def feed(ctx):
        for step, (grad, hyper) in enumerate(zip(grads, hypers)):
            while collected[0] < step:
                await ctx.tick()
            # the constants change only between tensors, once the previous tensor has drained
            ctx.set(Value.cast(dut.hyper), _pack_hyper(hyper))
            inputs = {**carried, "grad": _bits(grad)}
            steps.append({"in": inputs})
            payloads = np.stack([inputs[name] for name in ("param", "grad", "m", "v")], axis=1).ravel()
            await put(ctx, dut.elements, pack_lanes(payloads, 4, 32), in_stalls)

    async def collect(ctx):
        for step in range(len(grads)):
            beats = await get(ctx, dut.updated, n, out_stalls, max_cycles=4 * interval * n + 4 * dut.latency)
            assert len(beats) == n, f"step {step}: {len(beats)} updates for {n} elements"
            out = unpack_lanes(beats, 3, 32, 3 * n).reshape(n, 3).astype(np.uint32)
            steps[step]["out"] = {"param": out[:, 0], "m": out[:, 1], "v": out[:, 2]}
            carried.update(steps[step]["out"])
            collected[0] = step + 1
        # and nothing more: a duplicated update would come out within the latency
        ctx.set(dut.updated.ready, 1)
        for _ in range(dut.latency + 4):
            _, _, valid = await ctx.tick().sample(dut.updated.valid)
            assert not valid, "an update came out after the last element's"

    simulate(dut, [feed], collect, None)
    return steps


def _assert_same(got, expected, what):
    got, expected = np.asarray(got, np.uint32), np.asarray(expected, np.uint32)
    wrong = np.nonzero(got != expected)[0]
    assert not wrong.size, (f"{what}: {wrong.size} of {got.size} differ, first at {wrong[:6].tolist()}: got "
                            f"{[hex(x) for x in got[wrong[:6]]]}, expected {[hex(x) for x in expected[wrong[:6]]]}")


# -- RTL against the golden twin --------------------------------------------------------------------------------------

@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("kind", KINDS)
def test_rtl_matches_golden(kind, interval):
    _check_against_golden(kind, interval, 10 + KINDS.index(kind) + 2 * INTERVALS.index(interval))


@pytest.mark.parametrize("interval", [FOLD_INTERVAL, 16])
def test_folded_rtl_matches_golden(interval):
    # the square root and the divider folded (several recurrence steps a cycle): the same updates, less latency
    _check_against_golden("adamw", interval, 30 + interval, fold=True)
    assert LoRAOptimizer(OptimConfig("adamw", interval, True)).latency < LoRAOptimizer(
        OptimConfig("adamw", interval)).latency - 30


def _check_against_golden(kind, interval, seed, fold=False):
    rng = np.random.default_rng(KINDS.index(kind))
    param, grads, m, v = _tensors(ELEMENTS, rng)
    extremes = _extremes()
    param, m, v = (np.concatenate([x, e]) for x, e in zip((param, m, v), (extremes[0], extremes[2], extremes[3])))
    grads = [np.concatenate([g, extremes[1]]) for g in grads]
    hypers = _hypers(kind)
    steps = _run_steps(kind, param, grads, m, v, hypers, seed, interval, fold)
    for step, (record, hyper) in enumerate(zip(steps, hypers)):
        inputs = {name: _floats(bits) for name, bits in record["in"].items()}
        if kind == "adamw":
            expected = golden.adamw(inputs["param"], inputs["grad"], inputs["m"], inputs["v"], hyper)
        else:
            expected = (golden.sgd(inputs["param"], inputs["grad"], hyper["weight_decay"], hyper["lr"]),
                        inputs["m"], inputs["v"])
        for name, values in zip(("param", "m", "v"), expected):
            _assert_same(record["out"][name], _bits(values), f"{kind} step {step + 1} {name}")
    # the steps did something: most parameters moved
    moved = steps[-1]["out"]["param"][:ELEMENTS] != steps[0]["in"]["param"][:ELEMENTS]
    assert moved.mean() > 0.8


def _handshake_cycles(dut, n):
    """Cycles, counted from the first, in which each of ``n`` elements was accepted and each update was taken, when
    the host offers an element whenever it can and always takes the updates."""
    async def bench(ctx):
        accepted, taken = [], []
        ctx.set(dut.elements.valid, 1)
        ctx.set(dut.updated.ready, 1)
        for cycle in range(dut.interval * n + dut.latency + 8):
            _, _, ready, valid = await ctx.tick().sample(dut.elements.ready, dut.updated.valid)
            if ready and len(accepted) < n:
                accepted.append(cycle)
                ctx.set(dut.elements.valid, len(accepted) < n)
            if valid:
                taken.append(cycle)
        return accepted, taken

    return simulate(dut, [], bench, None)[0]


@pytest.mark.parametrize("kind, interval, fold", [(kind, interval, False) for kind in KINDS for interval in INTERVALS]
                         + [("adamw", FOLD_INTERVAL, True)])
def test_throughput(kind, interval, fold):
    """Without stalls an element enters every ``interval`` cycles and its update leaves ``latency`` cycles later."""
    dut = LoRAOptimizer(OptimConfig(kind, interval, fold))
    assert dut.interval == interval
    accepted, taken = _handshake_cycles(dut, 10)
    assert accepted == [interval * k for k in range(10)]
    assert taken == [cycle + dut.latency for cycle in accepted]


def test_latency_and_ports():
    adamw, sgd = LoRAOptimizer(), LoRAOptimizer(OptimConfig("sgd"))
    assert (adamw.latency, sgd.latency) == (103, 27)
    assert (adamw.interval, sgd.interval) == (1, 1)
    # sharing a unit makes an operation wait for its slot at most a few cycles
    assert all(103 <= LoRAOptimizer(OptimConfig("adamw", k)).latency <= 110 for k in INTERVALS)
    assert all(LoRAOptimizer(OptimConfig("sgd", k)).latency == 27 for k in INTERVALS)
    assert len(adamw.elements.payload.as_value()) == 128 and len(adamw.updated.payload.as_value()) == 96
    assert len(Value.cast(adamw.hyper)) == 32 * len(HYPER_FIELDS)


def test_arguments_checked():
    with pytest.raises(ValueError, match="kind must be one of \\('adamw', 'sgd'\\), not 'adam'"):
        OptimConfig("adam")
    for interval in (0, 17, 2.0, True, "4"):
        with pytest.raises(ValueError, match=f"interval must be an integer from 1 to 16, not {interval!r}"):
            OptimConfig("adamw", interval)
    with pytest.raises(ValueError, match=f"fold needs an interval of at least {FOLD_INTERVAL}"):
        OptimConfig("adamw", FOLD_INTERVAL - 1, True)
    with pytest.raises(TypeError, match="config must be an OptimConfig, not 'sgd'"):
        LoRAOptimizer("sgd")
    with pytest.raises(ValueError, match="step must be an integer of at least 1, not 0"):
        golden.hyper_from(1e-3, step=0)
    with pytest.raises(ValueError, match="beta2 must be in \\[0, 1\\), not 1.0"):
        golden.hyper_from(1e-3, beta2=1.0)


# -- the golden twin against torch ------------------------------------------------------------------------------------

def _golden_steps(kind, param, grads, m, v):
    history = []
    for step, grad in enumerate(grads, start=1):
        if kind == "adamw":
            param, m, v = golden.adamw(param, grad, m, v, golden.hyper_from(**ADAMW, step=step))
        else:
            hyper = golden.hyper_from(SGD["lr"], weight_decay=SGD["weight_decay"])
            param = golden.sgd(param, grad, hyper["weight_decay"], hyper["lr"])
        history.append((param, m, v))
    return history


def _torch_steps(kind, param, grads):
    weight = torch.nn.Parameter(torch.from_numpy(param.astype(np.float64)))
    if kind == "adamw":
        optimizer = torch.optim.AdamW([weight], **{k: ADAMW[k] for k in ("lr", "eps", "weight_decay")},
                                      betas=(ADAMW["beta1"], ADAMW["beta2"]))
    else:
        optimizer = torch.optim.SGD([weight], lr=SGD["lr"], weight_decay=SGD["weight_decay"])
    history = []
    for grad in grads:
        weight.grad = torch.from_numpy(grad.astype(np.float64))
        optimizer.step()
        state = optimizer.state[weight]
        moments = ((state["exp_avg"].numpy().copy(), state["exp_avg_sq"].numpy().copy())
                   if kind == "adamw" else (None, None))
        history.append((weight.detach().numpy().copy(), *moments))
    return history


@pytest.mark.parametrize("kind", KINDS)
def test_golden_matches_torch(kind):
    """Five steps from zero moments, as a fine-tune starts, against float64 torch on the RTL test's kind of tensor.

    The rounding order differs from torch's (see :mod:`edge_qlora.golden.lora_optim`) but the semantics are the
    same, so the only differences are roundings: the constants rounded once to float32, then a handful of float32
    roundings per step. Each rounding errs by at most 2 ** -24 relative to the terms it adds up, and the error a
    value carries adds up over the steps, so a value is close when its error is within 1e-6 of the sum, over the
    steps so far, of its size before each step and of the step's change (a bound on the terms), or below float32's
    smallest normal 2 ** -126, where float32 has no relative precision left (a tiny gradient's square is 0 in
    float32 and 1e-50 in float64; a subnormal moment keeps a few bits). The worst error seen is below 2e-7 of that
    sum; relative to the value itself it reaches 6e-5 where a moment or a parameter nearly cancels (``0.9 m`` against
    ``0.1 g`` of the other sign), and is above 1e-6 for up to 4% of the values by the fifth step.
    """
    rng = np.random.default_rng(20 + KINDS.index(kind))
    param, grads, _, _ = _tensors(4 * ELEMENTS, rng, steps=5)
    zeros = np.zeros_like(param)
    ours = _golden_steps(kind, param, grads, zeros, zeros)
    reference = _torch_steps(kind, param, grads)
    previous = (param.astype(np.float64), zeros.astype(np.float64), zeros.astype(np.float64))
    scales = [np.zeros_like(x) for x in previous]
    for step, (got, expected) in enumerate(zip(ours, reference), start=1):
        for index, (name, g, e, before) in enumerate(zip(("param", "m", "v"), got, expected, previous)):
            if e is None:
                continue
            # the size of the terms each step has added up (the value before, and the change): errors are relative
            # to them, since a value that passes close to zero keeps the absolute error of its larger past
            scales[index] += np.abs(before) + np.abs(e - before)
            error = np.abs(g.astype(np.float64) - e)
            close = error <= 1e-6 * scales[index] + 2.0 ** -126
            assert close.all(), (f"{kind} step {step} {name}: {np.count_nonzero(~close)} values off, worst "
                                 f"{np.max(error[~close] / scales[index][~close]):.3g}")
        previous = expected


def test_golden_hyper_from():
    hyper = golden.hyper_from(1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3)
    assert list(hyper) == list(HYPER_FIELDS) and all(isinstance(x, np.float32) for x in hyper.values())
    assert hyper["step_size"] == np.float32(1e-3 / (1 - 0.9 ** 3))
    assert hyper["inv_bc2_sqrt"] == np.float32(1 / np.sqrt(1 - 0.999 ** 3))
    assert hyper["decay"] == np.float32(1 - 1e-4)
    assert hyper["one_minus_beta2"] == np.float32(0.001) != np.float32(1) - np.float32(0.999)
