"""LoRA optimizer core: the elementwise AdamW or SGD update of one float32 parameter tensor (twin:
``golden/lora_optim.py``).

One element (parameter, gradient and the two AdamW moments) enters per cycle and its update leaves a fixed number of
cycles later. Every operation is rounded to float32, to nearest even, in the order :mod:`.golden.lora_optim` spells
out; everything that depends only on the step (bias corrections, the decay factor) is computed by the host once per
step and arrives on the ``hyper`` port, so the core needs no ``pow`` and only one square root and one division per
element.

AdamW datapath (cycles after the element's entry register; ``*``, ``+``, ``-``, ``/`` are ``FPMul``, ``FPAdd``,
``FPDiv``)::

    0    p * decay, beta1 * m, one_minus_beta1 * g, g * g, beta2 * v     (five multipliers in parallel)
    6    m' = beta1 m + one_minus_beta1 g;  one_minus_beta2 * g g
    12   v' = beta2 v + one_minus_beta2 g g
    19   sqrt(v')  (FPSqrt)
    46   * inv_bc2_sqrt,  52  + eps,  59  m' / denom,  89  step_size *,  95  p * decay - ...,  102  out

SGD datapath: ``weight_decay * p`` (0), ``g +`` (6), ``lr *`` (13), ``p -`` (19), out at 26; ``m`` and ``v`` ride
along unchanged.

All arithmetic is one stall domain (:class:`~.pipeline.StallPipeline`): the FP units under ``EnableInserter``, and the
operands that wait for a later unit in delay lines that advance with them. A delay longer than a few cycles is a
ring buffer in a :class:`~amaranth.lib.memory.Memory` (block or distributed RAM) rather than a chain of registers:
the AdamW core delays three float32 values by about 85 cycles each, which as registers would cost some 8000
flip-flops.

Its size and Fmax on the ECP5 are in ``docs/results.md``.
"""

from dataclasses import dataclass
from functools import partial

from amaranth.hdl import C, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..constants import FP32, HYPER_FIELDS
from .fp import FPAdd, FPDiv, FPMul, FPSqrt
from .pipeline import StallPipeline, delay_line

__all__ = ["KINDS", "HYPER_FIELDS", "OptimConfig", "LoRAOptimizer", "element_layout", "update_layout",
           "hyper_layout"]

#: Optimizers the core can be built for.
KINDS = ("adamw", "sgd")

#: Payload of the ``elements`` stream: float32 bit patterns of one element (``m`` and ``v`` unused by SGD).
element_layout = data.StructLayout({"param": 32, "grad": 32, "m": 32, "v": 32})

#: Payload of the ``updated`` stream: the element's new parameter and moments (SGD passes ``m`` and ``v`` through).
update_layout = data.StructLayout({"param": 32, "m": 32, "v": 32})

#: The ``hyper`` port: one float32 bit pattern per name of :data:`HYPER_FIELDS`, the first in the low bits.
hyper_layout = data.StructLayout({name: 32 for name in HYPER_FIELDS})


@dataclass(frozen=True)
class OptimConfig:
    """Elaboration parameters of :class:`LoRAOptimizer`.

    The optimizer is chosen when the core is built, not at run time. SGD's arithmetic would map onto the AdamW
    datapath cheaply (operand multiplexers that put 1 in place of ``decay`` and ``one_minus_beta1`` and of the
    divisor, and a delay line for the moments SGD passes through), but an SGD-only design would then carry AdamW's
    eight multipliers, four adders, square root and divider where it needs two multipliers and two adders. A
    design that needs both builds one core of each.

    Parameters
    ----------
    kind : str
        ``"adamw"`` (decoupled weight decay, bias-corrected moments) or ``"sgd"`` (weight decay, no momentum).
    """

    kind: str = "adamw"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")


# delays up to this many cycles are register chains; a longer one is a RAM ring buffer, which costs two registers
# per bit of its own (the read port's and the output's) and two address counters
_REGISTER_DELAY_MAX = 6


class _Schedule:
    """A fixed-latency float32 dataflow graph, scheduled as it is declared, built as hardware later.

    An operand is a pair ``(source, time)``: ``source`` names an element field (``"param"``), a ``hyper`` field
    (``"hyper.lr"``), a unit's result (the unit's name), or is an ``int`` constant; ``time`` is the cycle, counted
    from the element's entry register, in which the source holds that element's value, ``None`` for a source that
    is constant over a tensor. :meth:`unit` starts a unit when its last operand is ready; :meth:`build` then
    creates the units and delays every early operand to meet its unit. A unit is declared by a factory and its
    ``stages``, which is its latency (as for every unit of :mod:`.fp`), so the core knows its latency when it is
    constructed without creating units that a constructed but never elaborated core would leave unused.
    """

    def __init__(self):
        self.units = {}                     # name -> (factory, stages, {port: operand}, start cycle)

    def unit(self, name, factory, stages, **operands):
        """Add the unit ``factory(stages=stages)`` (an FP unit with a ``result`` port), fed by ``operands`` (port
        name -> operand); returns its result's operand."""
        if name in self.units:
            raise ValueError(f"unit {name!r} declared twice")
        start = max((time for _, time in operands.values() if time is not None), default=0)
        self.units[name] = (factory, stages, operands, start)
        return name, start + stages

    def build(self, m, pipe, sources):
        """Instantiate the units in ``m``, stalled by ``pipe``; ``sources`` maps element and ``hyper`` field names
        to Values. Returns a function that gives an operand's Value delayed to a cycle."""
        taps = {}                           # source -> {time: Value holding it then}

        def at(operand, time):
            source, start = operand
            if isinstance(source, int):
                return C(source, 1)
            if start is None:
                return sources[source]
            if time < start:
                raise ValueError(f"{source} is ready at cycle {start}, after cycle {time}")
            lines = taps[source]
            # delay from the latest tap not after ``time``, so that a value needed twice is delayed once
            begin = max(t for t in lines if t <= time)
            if begin != time:
                lines[time] = delay_line(m, pipe.advance, lines[begin], time - begin, f"{source}_at_{time}",
                                         ring_from=_REGISTER_DELAY_MAX + 1)
            return lines[time]

        for name in ("param", "grad", "m", "v"):
            taps[name] = {0: sources[name]}
        units = {}
        for name, (factory, stages, _, start) in self.units.items():
            units[name] = unit = factory(stages=stages)
            assert unit.latency == stages
            m.submodules[name] = pipe.stall(unit)
            taps[name] = {start + stages: unit.result}
        for name, (_, _, operands, start) in self.units.items():
            for port, operand in operands.items():
                m.d.comb += getattr(units[name], port).eq(at(operand, start))
        return at


# Every unit registers its operands as they arrive (the ``input`` cut; the square root and the divider do by
# default): with fourteen units and their delay lines spread over the chip, the wires from one unit's output to the
# next unit's DSP blocks or exponent compare are long, and an ECP5 DSP is combinational, so they get a cycle of their
# own; the multipliers find their operands' hidden bits ahead of that register (see ``FPMul``).
_MUL_STAGES, _ADD_STAGES = 6, 7
_SQRT_STAGES, _DIV_STAGES = FP32.precision + 3, FP32.precision + 6


def _mul(schedule, name, a, b):
    return schedule.unit(name, partial(FPMul, FP32, FP32, FP32), _MUL_STAGES, a=a, b=b)


def _add(schedule, name, a, b, subtract=False):
    return schedule.unit(name, partial(FPAdd, FP32), _ADD_STAGES, a=a, b=b, sub=(int(subtract), None))


def _hyper(name):
    return f"hyper.{name}", None


def _adamw(schedule):
    """The AdamW update; returns the operands of the new ``param``, ``m`` and ``v``."""
    param, grad, m, v = (("param", 0), ("grad", 0), ("m", 0), ("v", 0))
    decayed = _mul(schedule, "decayed", param, _hyper("decay"))
    m_new = _add(schedule, "m_new", _mul(schedule, "m_kept", _hyper("beta1"), m),
                 _mul(schedule, "m_grad", _hyper("one_minus_beta1"), grad))
    grad_squared = _mul(schedule, "grad_squared", grad, grad)
    v_new = _add(schedule, "v_new", _mul(schedule, "v_kept", _hyper("beta2"), v),
                 _mul(schedule, "v_grad", _hyper("one_minus_beta2"), grad_squared))
    root = schedule.unit("root", partial(FPSqrt, FP32), _SQRT_STAGES, a=v_new)
    denom = _add(schedule, "denom", _mul(schedule, "root_corrected", root, _hyper("inv_bc2_sqrt")), _hyper("eps"))
    ratio = schedule.unit("ratio", partial(FPDiv, FP32), _DIV_STAGES, a=m_new, b=denom)
    step = _mul(schedule, "step", _hyper("step_size"), ratio)
    return _add(schedule, "param_new", decayed, step, subtract=True), m_new, v_new


def _sgd(schedule):
    """The SGD update; ``m`` and ``v`` come out as they went in."""
    param, grad = ("param", 0), ("grad", 0)
    decayed_grad = _add(schedule, "decayed_grad", grad, _mul(schedule, "weight_decay", _hyper("weight_decay"), param))
    step = _mul(schedule, "step", _hyper("lr"), decayed_grad)
    return _add(schedule, "param_new", param, step, subtract=True), ("m", 0), ("v", 0)


class LoRAOptimizer(wiring.Component):
    """Streaming optimizer step for one float32 parameter tensor: one element per cycle, fully pipelined.

    The host streams every element of a tensor with its gradient (and, for AdamW, its two moments) and gets each
    element's update back, in order, ``latency`` cycles later when nothing stalls. ``hyper`` holds the step's
    constants, computed by the host in float64 and rounded once to float32
    (:func:`edge_qlora.golden.lora_optim.hyper_from`); it must hold still from the cycle the first element of a
    tensor is offered until the last update has been taken, so a host changes it between tensors, once every
    update of the previous one has come back.

    Parameters
    ----------
    config : OptimConfig

    Attributes
    ----------
    elements : In(stream of :data:`element_layout`)
        One element per beat: ``param``, ``grad``, ``m``, ``v`` as float32 bit patterns.
    hyper : In(:data:`hyper_layout`)
        The step's constants as float32 bit patterns: ``lr``, ``weight_decay``, ``beta1``, ``one_minus_beta1``,
        ``beta2``, ``one_minus_beta2``, ``eps``, ``step_size = lr / (1 - beta1 ** step)``,
        ``inv_bc2_sqrt = 1 / sqrt(1 - beta2 ** step)``, ``decay = 1 - lr * weight_decay``. AdamW reads all but
        ``lr`` and ``weight_decay`` (they reach it through ``step_size`` and ``decay``); SGD reads only those two.
    updated : Out(stream of :data:`update_layout`)
        One update per element, in order: the new ``param``, ``m`` and ``v`` (SGD: ``m`` and ``v`` as they came).
    latency : int
        Cycles from an element's acceptance to its update's ``valid`` without stalls: 103 for AdamW, 27 for SGD.
    """

    def __init__(self, config=OptimConfig()):
        if not isinstance(config, OptimConfig):
            raise TypeError(f"config must be an OptimConfig, not {config!r}")
        self.config = config
        self._schedule = _Schedule()
        self._outputs = (_adamw if config.kind == "adamw" else _sgd)(self._schedule)
        self._done = max(time for _, time in self._outputs)
        self.latency = 1 + self._done                   # the entry register, then the datapath
        super().__init__({
            "elements": In(stream.Signature(element_layout)),
            "hyper": In(hyper_layout),
            "updated": Out(stream.Signature(update_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        pipe = StallPipeline(m, self.latency, self.updated.ready, name="optim")
        # the element enters a register, and the constants are registered too (they hold still, so they need no
        # enable), so that every unit's operands come from flip-flops
        element = Signal(element_layout)
        hyper = Signal(hyper_layout)
        m.d.sync += hyper.eq(self.hyper)
        with m.If(pipe.advance):
            m.d.sync += element.eq(self.elements.payload)
        sources = {name: element[name] for name in ("param", "grad", "m", "v")}
        sources.update({f"hyper.{name}": hyper[name] for name in HYPER_FIELDS})
        at = self._schedule.build(m, pipe, sources)
        param, m_new, v_new = (at(output, self._done) for output in self._outputs)
        m.d.comb += [
            pipe.in_valid.eq(self.elements.valid),
            self.elements.ready.eq(pipe.advance),
            self.updated.valid.eq(pipe.out_valid),
            self.updated.payload.param.eq(param),
            self.updated.payload.m.eq(m_new),
            self.updated.payload.v.eq(v_new),
        ]
        return m
