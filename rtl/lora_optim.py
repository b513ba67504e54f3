"""LoRA optimizer core: the elementwise AdamW or SGD update of one float32 parameter tensor (twin:
``golden/lora_optim.py``).

One element (parameter, gradient and the two AdamW moments) enters per cycle, or one every ``interval`` cycles
(:class:`OptimConfig`), and its update leaves a fixed number of cycles later. Every operation is rounded to float32,
to nearest even, in the order :mod:`.golden.lora_optim` spells out; everything that depends only on the step (bias
corrections, the decay factor) is computed by the host once per step and arrives on the ``hyper`` port, so the core
needs no ``pow`` and only one square root and one division per element.

AdamW datapath at ``interval`` 1 (cycles after the element's entry register; ``*``, ``+``, ``-``, ``/`` are
``FPMul``, ``FPAdd``, ``FPDiv``)::

    0    p * decay, beta1 * m, one_minus_beta1 * g, g * g, beta2 * v     (five multipliers in parallel)
    6    m' = beta1 m + one_minus_beta1 g;  one_minus_beta2 * g g
    12   v' = beta2 v + one_minus_beta2 g g
    19   sqrt(v')  (FPSqrt)
    46   * inv_bc2_sqrt,  52  + eps,  59  m' / denom,  89  step_size *,  95  p * decay - ...,  102  out

SGD datapath: ``weight_decay * p`` (0), ``g +`` (6), ``lr *`` (13), ``p -`` (19), out at 26; ``m`` and ``v`` ride
along unchanged.

With an ``interval`` of k the n multiplications of an element share ``ceil(n / k)`` multipliers, and its
additions likewise share adders (modulo scheduling): a unit takes the operands of a different operation in each of
the k cycles of an element, chosen by a phase counter, and an operation whose operands are ready in a cycle that no
unit of its kind has free waits for the next free one, so AdamW's update leaves a few cycles later than at
``interval`` 1 (SGD's does not). A consumer that takes an update every few cycles at best, such as the update phase
of a step fed from external memory, loses nothing to a longer interval, and AdamW's eight multipliers and four
adders shrink to one of each at an ``interval`` of 8.

All arithmetic is one stall domain (:class:`~.pipeline.StallPipeline`): the FP units under ``EnableInserter``, and the
operands that wait for a later unit in delay lines that advance with them. A delay longer than a few cycles is a
ring buffer in a :class:`~amaranth.lib.memory.Memory` (block or distributed RAM) rather than a chain of registers:
the AdamW core delays three float32 values by about 85 cycles each, which as registers would cost some 8000
flip-flops.

Its size and Fmax on the ECP5 are in ``docs/results.md``.
"""

from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

from amaranth.hdl import C, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..constants import FP32, HYPER_FIELDS
from .fp import FPAdd, FPDiv, FPDivFolded, FPMul, FPSqrt, FPSqrtFolded
from .pipeline import StallPipeline, delay_line

__all__ = ["KINDS", "HYPER_FIELDS", "FOLD_INTERVAL", "OptimConfig", "LoRAOptimizer", "element_layout", "update_layout",
           "hyper_layout"]

#: Optimizers the core can be built for.
KINDS = ("adamw", "sgd")

# the most cycles between two elements: from eight on (AdamW's multiplications) a unit of each kind is left, and a
# longer interval only paces the input
_INTERVAL_MAX = 16

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
    interval : int
        Cycles between two elements, 1 to 16. With ``interval`` k the core shares each multiplier and adder among
        up to k operations of an element (AdamW: ``ceil(8 / k)`` multipliers and ``ceil(4 / k)`` adders), for a
        consumer that takes one update every k cycles at best anyway, such as an update fed from external memory.
    fold : bool
        AdamW at an interval of at least :data:`FOLD_INTERVAL`: the square root and the divider run their
        recurrences over several cycles, a few steps a cycle (``rtl/fp.py``'s ``FPSqrtFolded`` and
        ``FPDivFolded``), instead of one pipelined step per cycle; the same results, a shorter latency, less logic.
    """

    kind: str = "adamw"
    interval: int = 1
    fold: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if (not isinstance(self.interval, int) or isinstance(self.interval, bool)
                or not 1 <= self.interval <= _INTERVAL_MAX):
            raise ValueError(f"interval must be an integer from 1 to {_INTERVAL_MAX}, not {self.interval!r}")
        if not isinstance(self.fold, bool):
            raise ValueError(f"fold must be a bool, not {self.fold!r}")
        if self.fold and self.interval < FOLD_INTERVAL:
            raise ValueError(f"fold needs an interval of at least {FOLD_INTERVAL} (the folded divider's occupancy), "
                             f"not {self.interval}")


# delays up to this many cycles are register chains; a longer one is a RAM ring buffer, which costs two registers
# per bit of its own (the read port's and the output's) and two address counters
_REGISTER_DELAY_MAX = 6


class _Op(NamedTuple):
    """One operation of the dataflow graph: its unit's kind and how to build one, and where it was placed."""
    kind: str
    factory: Callable
    stages: int
    operands: dict          # port name -> operand
    start: int              # the cycle its operands enter the unit
    unit: int               # which unit of its kind, counted from 0


class _Schedule:
    """A fixed-latency float32 dataflow graph, modulo-scheduled as it is declared, built as hardware later.

    An operand is a pair ``(source, time)``: ``source`` names an element field (``"param"``), a ``hyper`` field
    (``"hyper.lr"``), an operation's result (the operation's name), or is an ``int`` constant; ``time`` is the
    cycle, counted from the element's entry register, in which the source holds that element's value, ``None`` for
    a source that is constant over a tensor. An operation is declared by its kind (``"mul"``), a factory of its unit
    and the unit's ``stages``, which is its latency (as for every unit of :mod:`.fp`), so the core knows its latency
    when it is constructed without creating units that a constructed but never elaborated core would leave unused.

    A new element enters every ``interval`` cycles, and ``units`` gives how many units of each kind there are. A
    unit takes operands in every cycle, so over ``interval`` cycles it has ``interval`` slots (the cycle modulo
    ``interval``), each of which serves one operation of every element. :meth:`unit` starts an operation in the
    first cycle, from the one its last operand is ready in, whose slot is free on some unit of its kind (the first
    such unit): with ``interval`` 1 and a unit per operation, as soon as its operands are ready. :meth:`build` then
    creates the units, feeds each the operands of the operation whose slot it is, and delays every early operand
    to meet its operation.
    """

    def __init__(self, interval=1, units=None):
        self.interval = interval
        self.ops = {}                       # name -> _Op
        self._slots = {kind: [set() for _ in range(count)] for kind, count in (units or {}).items()}
        self._unlimited = units is None

    @classmethod
    def modulo(cls, declare, interval):
        """The schedule ``declare(schedule)`` makes with one element every ``interval`` cycles, on the fewest units
        that can do it (``ceil(operations / interval)`` of each kind); returns it and what ``declare`` returns."""
        counting = cls()
        declare(counting)
        kinds = Counter(op.kind for op in counting.ops.values())
        schedule = cls(interval, {kind: -(-count // interval) for kind, count in kinds.items()})
        return schedule, declare(schedule)

    def unit(self, name, kind, factory, stages, **operands):
        """Add an operation on a unit ``factory(stages=stages)`` (an FP unit with a ``result`` port), fed by
        ``operands`` (port name -> operand); returns its result's operand."""
        if name in self.ops:
            raise ValueError(f"unit {name!r} declared twice")
        ready = max((time for _, time in operands.values() if time is not None), default=0)
        start, unit = self._place(kind, ready)
        self.ops[name] = _Op(kind, factory, stages, operands, start, unit)
        return name, start + stages

    def _place(self, kind, ready):
        units = self._slots.setdefault(kind, [])
        if self._unlimited:
            units.append(set())
        for start in range(ready, ready + self.interval):
            for unit, taken in enumerate(units):
                if start % self.interval not in taken:
                    taken.add(start % self.interval)
                    return start, unit
        raise ValueError(f"every slot of the {len(units)} {kind} units is taken")

    def build(self, m, pipe, phase, sources):
        """Instantiate the units in ``m``, stalled by ``pipe``; ``sources`` maps element and ``hyper`` field names
        to Values, the element's held from cycle 0 to ``interval - 1``, and ``phase`` is the cycle of the element
        in the entry register plus 1, modulo ``interval``. Returns a function that gives an operand's Value
        delayed to a cycle."""
        taps = {name: dict.fromkeys(range(self.interval), sources[name]) for name in ("param", "grad", "m", "v")}

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

        shared = {}                         # (kind, unit) -> names of the operations on it
        for name, op in self.ops.items():
            shared.setdefault((op.kind, op.unit), []).append(name)
        units = {}
        for (kind, index), names in shared.items():
            first = self.ops[names[0]]
            units[kind, index] = unit = first.factory(stages=first.stages)
            assert unit.latency == first.stages
            m.submodules[names[0] if len(names) == 1 else f"{kind}_{index}"] = pipe.stall(unit)
            if hasattr(unit, "load"):
                # a folded unit (one operation an element) starts in its operation's slot
                assert len(names) == 1
                m.d.comb += unit.load.eq(phase == (first.start + 1) % self.interval)
            taps.update({name: {self.ops[name].start + unit.latency: unit.result} for name in names})
        for key, names in shared.items():
            for port in self.ops[names[0]].operands:
                m.d.comb += getattr(units[key], port).eq(self._select(phase, names, port, at))
        return at

    def _select(self, phase, names, port, at):
        """The operand on ``port`` of a unit shared by the operations ``names``: each one's in its own slot."""
        value = None
        for name in reversed(names):
            op = self.ops[name]
            operand = at(op.operands[port], op.start)
            value = operand if value is None else Mux(phase == (op.start + 1) % self.interval, operand, value)
        return value


# Every unit registers its operands as they arrive (the ``input`` cut; the square root and the divider do by
# default): with up to fourteen units and their delay lines spread over the chip, the wires from one unit's output to
# the next unit's DSP blocks or exponent compare are long, and an ECP5 DSP is combinational, so they get a cycle of
# their own; the multipliers find their operands' hidden bits ahead of that register (see ``FPMul``), and a shared
# unit's operand multiplexer is ahead of it too.
_MUL_STAGES, _ADD_STAGES = 6, 7
_SQRT_STAGES, _DIV_STAGES = FP32.precision + 3, FP32.precision + 6
# recurrence steps a cycle of the folded square root and divider: the divider's 26 steps in 7 cycles, so that it
# takes an operation every 8 cycles
_FOLD_STEPS = 4
#: The shortest interval with folded units: the folded divider's occupancy.
FOLD_INTERVAL = -(-(FP32.precision + 2) // _FOLD_STEPS) + 1


def _mul(schedule, name, a, b):
    return schedule.unit(name, "mul", partial(FPMul, FP32, FP32, FP32), _MUL_STAGES, a=a, b=b)


def _add(schedule, name, a, b, subtract=False):
    return schedule.unit(name, "add", partial(FPAdd, FP32), _ADD_STAGES, a=a, b=b, sub=(int(subtract), None))


def _hyper(name):
    return f"hyper.{name}", None


def _folded_latency(steps):
    """The latency of a folded divider or square root of ``steps`` recurrence steps (``rtl/fp.py``)."""
    return -(-steps // _FOLD_STEPS) + 2


def _adamw(schedule, fold=False):
    """The AdamW update; returns the operands of the new ``param``, ``m`` and ``v``. With ``fold`` the square root
    and the divider run their recurrences over several cycles."""
    param, grad, m, v = (("param", 0), ("grad", 0), ("m", 0), ("v", 0))
    # the longest path first (v', the square root, the division), so that it gets the first free slots
    grad_squared = _mul(schedule, "grad_squared", grad, grad)
    v_grad = _mul(schedule, "v_grad", _hyper("one_minus_beta2"), grad_squared)
    v_new = _add(schedule, "v_new", _mul(schedule, "v_kept", _hyper("beta2"), v), v_grad)
    m_new = _add(schedule, "m_new", _mul(schedule, "m_kept", _hyper("beta1"), m),
                 _mul(schedule, "m_grad", _hyper("one_minus_beta1"), grad))
    decayed = _mul(schedule, "decayed", param, _hyper("decay"))
    if fold:
        root = schedule.unit("root", "sqrt", partial(FPSqrtFolded, FP32, _FOLD_STEPS), _folded_latency(FP32.precision),
                             a=v_new)
    else:
        root = schedule.unit("root", "sqrt", partial(FPSqrt, FP32), _SQRT_STAGES, a=v_new)
    denom = _add(schedule, "denom", _mul(schedule, "root_corrected", root, _hyper("inv_bc2_sqrt")), _hyper("eps"))
    if fold:
        ratio = schedule.unit("ratio", "div", partial(FPDivFolded, FP32, _FOLD_STEPS),
                              _folded_latency(FP32.precision + 2), a=m_new, b=denom)
    else:
        ratio = schedule.unit("ratio", "div", partial(FPDiv, FP32), _DIV_STAGES, a=m_new, b=denom)
    step = _mul(schedule, "step", _hyper("step_size"), ratio)
    return _add(schedule, "param_new", decayed, step, subtract=True), m_new, v_new


def _sgd(schedule):
    """The SGD update; ``m`` and ``v`` come out as they went in."""
    param, grad = ("param", 0), ("grad", 0)
    decayed_grad = _add(schedule, "decayed_grad", grad, _mul(schedule, "weight_decay", _hyper("weight_decay"), param))
    step = _mul(schedule, "step", _hyper("lr"), decayed_grad)
    return _add(schedule, "param_new", param, step, subtract=True), ("m", 0), ("v", 0)


class LoRAOptimizer(wiring.Component):
    """Streaming optimizer step for one float32 parameter tensor: one element every ``interval`` cycles, pipelined.

    The host streams every element of a tensor with its gradient (and, for AdamW, its two moments) and gets each
    element's update back, in order, ``latency`` cycles later when nothing stalls. With an ``interval`` of k the
    core takes an element in one cycle of every k (a phase counter that advances with the pipeline), and each
    multiplier and adder serves up to k operations of an element, one in each of those cycles. ``hyper`` holds the
    step's constants, computed by the host in float64 and rounded once to float32
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
        Cycles from an element's acceptance to its update's ``valid`` without stalls: at ``interval`` 1, 103 for
        AdamW and 27 for SGD (operations that wait for a shared unit's slot add a few cycles at longer intervals).
    interval : int
        Cycles from one element's acceptance to the next one's at the earliest, ``config.interval``.
    """

    def __init__(self, config=OptimConfig()):
        if not isinstance(config, OptimConfig):
            raise TypeError(f"config must be an OptimConfig, not {config!r}")
        self.config = config
        self.interval = config.interval
        declare = partial(_adamw, fold=config.fold) if config.kind == "adamw" else _sgd
        self._schedule, self._outputs = _Schedule.modulo(declare, self.interval)
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
        # advances with the pipeline; an element may enter when it is 0, so the element in the entry register is
        # at cycle ``phase - 1`` (modulo the interval) of its schedule, and that selects each shared unit's operands
        phase = C(0, 1)
        if self.interval > 1:
            phase = Signal(range(self.interval), name="phase")
            with m.If(pipe.advance):
                m.d.sync += phase.eq(Mux(phase == self.interval - 1, 0, phase + 1))
        accept = self.elements.valid & self.elements.ready
        # the element enters a register, and the constants are registered too (they hold still, so they need no
        # enable), so that every unit's operands come from flip-flops; the element's register holds it until the
        # next one enters, so the operations in its first ``interval`` cycles read it there
        element = Signal(element_layout)
        hyper = Signal(hyper_layout)
        m.d.sync += hyper.eq(self.hyper)
        with m.If(accept):
            m.d.sync += element.eq(self.elements.payload)
        sources = {name: element[name] for name in ("param", "grad", "m", "v")}
        sources.update({f"hyper.{name}": hyper[name] for name in HYPER_FIELDS})
        at = self._schedule.build(m, pipe, phase, sources)
        param, m_new, v_new = (at(output, self._done) for output in self._outputs)
        m.d.comb += [
            pipe.in_valid.eq(self.elements.valid & (phase == 0)),
            self.elements.ready.eq(pipe.advance & (phase == 0)),
            self.updated.valid.eq(pipe.out_valid),
            self.updated.payload.param.eq(param),
            self.updated.payload.m.eq(m_new),
            self.updated.payload.v.eq(v_new),
        ]
        return m
