"""IEEE-754 floating-point arithmetic units: multiply, add, divide, square root, convert, fixed point to float.

Every unit is a fixed-latency pipeline with plain ``In``/``Out`` ports, one operation accepted per cycle. The units
have no enable of their own: every register is in the ``sync`` domain and nothing counts cycles, so a user stalls a
whole pipeline by wrapping it in ``EnableInserter(advance)``. Results are rounded to nearest with ties to even, with
gradual underflow (subnormal inputs and outputs), overflow to infinity, signed zeros (``x + (-x)`` is ``+0``) and
the format's canonical quiet NaN (sign 0, exponent all ones, top fraction bit set) for every NaN result. The
bit-accurate twin is :mod:`edge_qlora.golden.fp`, which also defines :class:`FloatFormat`.

Where the registers go
----------------------
A unit's datapath is a chain of combinational steps; between two steps is a *cut* where a register stage may go.
Each unit names its cuts in a priority order (in its docstring); ``stages=n`` registers the first ``n`` of them, so
``latency == stages`` and a user trades Fmax for latency without touching the arithmetic. Pipeline registers carry
no reset: a pipeline's contents mean nothing until ``latency`` cycles after its first input. The defaults are
the fewest stages with which fp32 units meet the project's ECP5 clock target with registered inputs (measured
figures: ``docs/timing-closure.md``): ``FPMul`` 5 stages, ``FPAdd`` 6, ``FPDiv`` 30 and ``FPSqrt`` 27 (one recurrence step per cycle);
``FPConvert`` needs 2 for fp32 to fp16 and 1 otherwise; ``FixedToFloat`` 4 for a 44-bit value to fp32.

Every arithmetic unit ends in the same normalise-round-pack datapath (:class:`_Rounder`), written once and
parameterised by :class:`FloatFormat` and by static bounds on its inputs, so that a unit pays only for the shifts its
operands can need.
"""

from amaranth.hdl import C, Cat, ClockSignal, Const, Instance, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..constants import BF16, FORMATS, FP16, FP32, FloatFormat

from .pipeline import is_ecp5

__all__ = [
    "FloatFormat", "FP32", "BF16", "FP16", "FORMATS", "FPDivFolded", "FPSqrtFolded",
    "float_layout", "fp_is_nan", "fp_is_inf", "fp_is_zero", "fp_abs_key", "fp_order_key", "at_least",
    "ecp5_registered_product",
    "FPMul", "FPAdd", "FPDiv", "FPSqrt", "FPConvert", "FixedToFloat",
]


def float_layout(fmt):
    """The ``lib.data`` layout of a packed float of ``fmt``: ``fraction``, ``exponent``, ``sign`` from the LSB."""
    return data.StructLayout({"fraction": fmt.frac_bits, "exponent": fmt.exp_bits, "sign": 1})


# -- combinational helpers --------------------------------------------------------------------------------------------

def fp_is_nan(value, fmt):
    """Whether the packed float ``value`` of ``fmt`` is a NaN (1-bit Value)."""
    view = float_layout(fmt)(value)
    return (view.exponent == fmt.exp_max) & (view.fraction != 0)


def fp_is_inf(value, fmt):
    """Whether the packed float ``value`` of ``fmt`` is an infinity of either sign (1-bit Value)."""
    view = float_layout(fmt)(value)
    return (view.exponent == fmt.exp_max) & (view.fraction == 0)


def fp_is_zero(value, fmt):
    """Whether the packed float ``value`` of ``fmt`` is a zero of either sign (1-bit Value)."""
    return Value.cast(value)[:fmt.width - 1] == 0


def fp_abs_key(value, fmt):
    """Unsigned key that orders non-NaN floats by magnitude: the packed float without its sign bit.

    The exponent sits above the fraction and the bias keeps it non-negative, so for non-NaN ``x`` and ``y``,
    ``|x| < |y|`` exactly when ``fp_abs_key(x) < fp_abs_key(y)`` as unsigned integers.
    """
    return Value.cast(value)[:fmt.width - 1]


def fp_order_key(value, fmt):
    """Unsigned key that orders non-NaN floats by value (IEEE ``totalOrder``, so ``-0`` sorts just below ``+0``).

    Positive floats get their sign bit set, which lifts them above every negative one; negative floats are
    complemented, which reverses their magnitude order. Equal keys mean equal bit patterns.
    """
    value = Value.cast(value)
    sign = value[fmt.width - 1]
    return Mux(sign, ~value, Cat(value[:fmt.width - 1], C(1, 1)))


# -- shared datapath pieces -------------------------------------------------------------------------------------------

def _exponent(value, lo, hi):
    """``value`` truncated to a signed shape just wide enough for the known range ``[lo, hi]``.

    Exponent arithmetic grows a bit with every operation; trimming it keeps the pipeline registers small.
    """
    width = max(abs(lo).bit_length(), abs(hi).bit_length()) + 1
    return Value.cast(value)[:width].as_signed()


def at_least(value, bound):
    """``value >= bound`` for a constant ``bound``, as plain gates: a comparison with a constant needs no carry chain
    (synthesis would build one for ``>=``). A signed ``value`` is compared in offset binary (its sign bit flipped,
    ``2 ** (width - 1)`` added to ``bound``)."""
    value = Value.cast(value)
    width = len(value)
    if value.shape().signed:
        bound += 1 << (width - 1)
        value = Cat(value[:width - 1], ~value[width - 1])
    value = value.as_unsigned()
    if bound <= 0:
        return C(1, 1)
    if bound >= 1 << width:
        return C(0, 1)
    top = value[width - 1]
    if bound >> (width - 1):
        return top & at_least(value[:width - 1], bound - (1 << (width - 1)))
    return top | at_least(value[:width - 1], bound)


def _wire(m, value, name):
    """A combinational signal driven by ``value``.

    Naming intermediate results keeps an expression from being copied into every place that uses it, where the
    simulator would evaluate it once per use, and makes it visible in waveforms.
    """
    value = Value.cast(value)
    wire = Signal(value.shape(), name=name)
    m.d.comb += wire.eq(value)
    return wire


def _count_leading_zeros(m, value, name):
    """Number of leading zeros of ``value``, ``len(value)`` when it is all zeros, as a log-depth tree."""
    width = len(value)
    # pad to a power of two with a one just below the LSB, so an all-zero input counts exactly ``width``
    padded_width = 4
    while padded_width < width + 1:
        padded_width *= 2
    padding = padded_width - width
    bits = _wire(m, Cat(C(1 << (padding - 1), padding), value), f"{name}_input")
    # one signal per tree level; per group of bits it holds the group's count with an all-zero flag above it.
    # The leaves are groups of four, each output bit one LUT4 (a group's count matters only if it is not all zero)
    nodes = [Cat(~bits[i + 3] & (bits[i + 2] | ~bits[i + 1]), ~(bits[i + 3] | bits[i + 2]), ~bits[i:i + 4].any())
             for i in range(0, padded_width, 4)]
    count_width = 2
    while True:
        level = _wire(m, Cat(*nodes), f"{name}_lz{count_width}")
        nodes = [level[i:i + count_width + 1] for i in range(0, len(level), count_width + 1)]
        if len(nodes) == 1:
            return nodes[0][:count_width]
        nodes = [Cat(Mux(hi[-1], lo[:-1], hi[:-1]), hi[-1], hi[-1] & lo[-1])
                 for lo, hi in zip(nodes[0::2], nodes[1::2])]
        count_width += 1


def _pieces(value, width):
    """``value`` split into pieces of at most ``width`` bits, as equal as possible, each with its bit offset."""
    count = -(-len(value) // width)
    size = -(-len(value) // count)
    return [(value[offset:offset + size], offset) for offset in range(0, len(value), size)]


def ecp5_registered_product(a, b, product, enable, *, signed=False, reset=None):
    """``product`` = ``a * b`` two enabled cycles later, in one ECP5 ``MULT18X18D`` with its input and output
    registers (so that the routing to and from a DSP site, which can be far from the fabric, has a cycle each).

    Parameters
    ----------
    a, b : Value
        Operands of at most 18 bits; two's complement if ``signed``, else unsigned.
    product : Signal
        Driven with the product's low ``len(product)`` bits (at most 36).
    enable : Value
        Clock enable of both register levels.
    signed : bool
    reset : Value or None
        Synchronous reset of the registers to 0 (``None``: never reset).
    """
    extend = (lambda value, k: value[k] if k < len(value) else value[-1]) if signed else \
        (lambda value, k: value[k] if k < len(value) else Const(0))
    return Instance(
        "MULT18X18D",
        p_REG_INPUTA_CLK="CLK0", p_REG_INPUTA_CE="CE0", p_REG_INPUTA_RST="RST0",
        p_REG_INPUTB_CLK="CLK0", p_REG_INPUTB_CE="CE0", p_REG_INPUTB_RST="RST0",
        p_REG_OUTPUT_CLK="CLK0", p_REG_OUTPUT_CE="CE0", p_REG_OUTPUT_RST="RST0",
        p_GSR="DISABLED", p_RESETMODE="SYNC",
        **{f"i_A{k}": extend(a, k) for k in range(18)},
        **{f"i_B{k}": extend(b, k) for k in range(18)},
        **{f"i_C{k}": Const(0) for k in range(18)},
        i_SIGNEDA=Const(int(signed)), i_SIGNEDB=Const(int(signed)), i_SOURCEA=Const(0), i_SOURCEB=Const(0),
        i_CLK0=ClockSignal("sync"), i_CE0=enable, i_RST0=Const(0) if reset is None else reset,
        **{f"i_{port}{k}": Const(0) for port in ("CLK", "CE", "RST") for k in (1, 2, 3)},
        **{f"o_P{k}": product[k] for k in range(len(product))},
    )


class _Unpacked:
    """A packed float split into the fields the datapaths use.

    Every finite value is ``sig * 2 ** (exp - bias - frac_bits)``: a subnormal has no hidden bit and the exponent
    of the smallest normal, which spares the datapaths a special case.
    """

    def __init__(self, value, fmt):
        view = float_layout(fmt)(value)
        exp_zero = view.exponent == 0
        exp_ones = view.exponent == fmt.exp_max
        frac_zero = view.fraction == 0
        self.sign = view.sign
        self.exp = view.exponent | exp_zero
        self.sig = Cat(view.fraction, ~exp_zero)
        self.magnitude = Value.cast(value)[:fmt.width - 1]
        self.is_zero = exp_zero & frac_zero
        self.is_inf = exp_ones & frac_zero
        self.is_nan = exp_ones & ~frac_zero


class _Pipeline:
    """Places registers at the cuts a unit chose; an unchosen cut is a set of named wires.

    The logic between two registered cuts goes in its own submodule, ``stage_0``, ``stage_1``, ...: :attr:`m` is
    the current one. Besides grouping the logic by clock cycle, this keeps simulation fast, because the simulator
    re-evaluates a module's combinational logic as a whole whenever one of its inputs changes.
    """

    def __init__(self, m, registered):
        self._top = m
        self._registered = registered
        self._stages = 0
        self._next_stage()

    def _next_stage(self):
        self.m = Module()
        self._top.submodules[f"stage_{self._stages}"] = self.m
        self._stages += 1

    def cut(self, name, state):
        registered = name in self._registered
        domain = self.m.d.sync if registered else self.m.d.comb
        signals = {}
        for key, value in state.items():
            value = Value.cast(value)
            signals[key] = Signal(value.shape(), name=f"{name}_{key}", reset_less=True)
            domain += signals[key].eq(value)
        if registered:
            self._next_stage()
        return signals


def _recurrence_cuts(unit, named, steps, stages):
    """Cuts of a unit with a ``steps``-step recurrence: the ``named`` cuts first, then one cut between every two
    steps, those ``stages`` registers beyond the named ones spread evenly so that every register stage has about
    as many steps. ``stages=None`` registers every cut. Returns ``(cuts, registered, latency)``."""
    iter_cuts = [f"iter_{i}" for i in range(1, steps)]
    if stages is None:
        stages = len(named) + len(iter_cuts)
    if isinstance(stages, int) and not isinstance(stages, bool) and stages > len(named):
        count = min(stages - len(named), len(iter_cuts))
        spacing = steps / (count + 1)
        chosen = [f"iter_{round(j * spacing)}" for j in range(1, count + 1)]
        iter_cuts = chosen + [name for name in iter_cuts if name not in chosen]
    cuts = named + tuple(iter_cuts)
    return cuts, _registered_cuts(unit, stages, cuts), stages


def _registered_cuts(unit, stages, cuts):
    if not isinstance(stages, int) or isinstance(stages, bool):
        raise TypeError(f"{unit} stages must be an integer, not {stages!r}")
    if not 0 <= stages <= len(cuts):
        raise ValueError(f"{unit} has {len(cuts)} cuts ({', '.join(cuts)}), so stages must be from 0 to "
                         f"{len(cuts)}, not {stages}")
    return frozenset(cuts[:stages])


def _check_format(unit, name, fmt):
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"{unit} {name} must be a FloatFormat, not {fmt!r}")


class _Rounder:
    """Normalise, round to nearest even and pack a non-negative significand into ``fmt``.

    The value to round is ``sig / 2 ** (width - 1) * 2 ** (exp - fmt.bias)``, plus less than one unit in the last
    place of ``sig`` when ``sticky`` is set: ``exp`` is the biased exponent the result has if the top bit of ``sig``
    is set. Four steps, :meth:`prepare`, :meth:`count`, :meth:`align` and :meth:`pack`, so that a unit can put cuts
    between them; :meth:`prepare` needs only ``exp``, so a unit runs it as early as ``exp`` is known, in parallel
    with the arithmetic that makes ``sig``. They take and return the unit's state dictionary, whose keys are
    ``sign``, ``exp``, ``sig``, optionally ``sticky``, and the flags ``nan``, ``inf``, ``zero`` that override the
    arithmetic (in that order).

    A normal result needs a left shift by ``min(leading zeros, exp - 1)``, which also leaves a subnormal with the
    smallest exponent. Setting a marker bit at ``sig`` bit ``width - exp`` before counting the leading zeros makes
    the count that minimum, without a comparison after the count. An ``exp`` below 1 needs a right shift by
    ``1 - exp`` instead, which makes a subnormal. The two shifts never happen together, so both are one funnel shift
    that picks the rounding window (hidden bit, fraction, guard bit) out of ``sig``; the sticky bit, every bit of
    ``sig`` below the window, comes from comparing the trailing zero count with the window's position, in parallel
    with the shift rather than after it.

    Rounding adds the round-up bit to the packed exponent and fraction as one integer, so that a carry out of the
    fraction moves to the next binade, turns the largest subnormal into the smallest normal, or the largest finite
    value into infinity, with no special case.

    Parameters
    ----------
    fmt : FloatFormat
        Format of the result.
    width : int
        Width of ``sig``.
    exp_range : tuple of int
        Smallest and largest ``exp`` of a finite result: they decide which shifts and checks exist at all.
    max_lz : int
        Most leading zeros ``sig`` has when it is not zero and ``exp`` is above its smallest value: the width of
        the leading zero count.
    """

    def __init__(self, fmt, width, exp_range, max_lz):
        self.fmt = fmt
        self.width = width
        self.exp_lo, self.exp_hi = exp_range
        self.kept = fmt.frac_bits + 2               # hidden bit, fraction, guard bit
        # the leading zero count looks at the top ``counted`` bits only, so a left shift is at most ``counted``;
        # with ``exp`` never above 1 there is no left shift at all
        self.counted = min(max_lz + 1, width) if max_lz > 0 and self.exp_hi > 1 else 0
        # a count of k bits gives shifts up to 2 ** k - 1; the funnel offset of a left shift ``s`` is ``~s``
        self.left_max = (1 << self.counted.bit_length()) - 1 if self.counted else 0
        # past ``kept`` places every bit of ``sig`` is below the window, so a longer right shift changes nothing
        self.right_max = self.kept if self.exp_lo < 1 else 0
        # the window's lowest bit sits at ``sig`` bit ``first + offset``
        self.first = width - self.kept - self.left_max
        self.shifts = bool(self.left_max or self.right_max)
        self.has_sticky = self.first + self.left_max + self.right_max > 0
        # :meth:`count` counts ``sig``'s trailing zeros (or takes them as ``sig_trailing_zeros``)
        self.counts_trailing_zeros = self.shifts and self.has_sticky
        self.overflows = self.exp_hi >= fmt.exp_max

    @property
    def _offset_width(self):
        return max(1, (self.left_max + self.right_max).bit_length())

    def prepare(self, m, state):
        state = dict(state)
        exp = state["exp"]
        below_one = ~at_least(exp, 1)
        if self.counted:
            # a marker at ``sig`` bit ``width - exp`` caps the leading zero count at ``exp - 1``; for ``exp`` below 1
            # it sits at the top bit, so that nothing shifts left (bit ``i`` here is ``sig`` bit
            # ``width - counted + i``)
            state["marker"] = Cat(*((exp == self.counted - i) | (below_one if i == self.counted - 1 else 0)
                                    for i in range(self.counted)))
        if self.right_max:
            state["denormal"] = below_one
            # the funnel offset of a right shift ``1 - exp`` is ``left_max + 1 - exp``: one subtraction
            offset = Mux(~at_least(exp, 1 - self.right_max), self.left_max + self.right_max, self.left_max + 1 - exp)
            state["right_offset"] = offset[:self._offset_width]
        return state

    def count(self, m, state):
        state = dict(state)
        if not self.shifts:
            return state
        sig = state["sig"]
        offset = C(self.left_max, self._offset_width)
        if self.counted:
            top = sig[self.width - self.counted:] | state.pop("marker")
            state["left"] = _count_leading_zeros(m, top, "round_lz")
            offset = ~state["left"]
        if self.right_max:
            offset = Mux(state.pop("denormal"), state.pop("right_offset"), offset)
        state["offset"] = _wire(m, Value.cast(offset)[:self._offset_width], "round_offset")
        if self.counts_trailing_zeros:
            # bits of ``sig`` below the window are those below ``first + offset``; taking ``first`` off the
            # trailing zero count here, in parallel with the leading zero count, leaves one comparison for later.
            # A unit that can count ``sig``'s trailing zeros a stage earlier gives them as ``sig_trailing_zeros``
            trailing_zeros = state.pop("sig_trailing_zeros", None)
            if trailing_zeros is None:
                trailing_zeros = _count_leading_zeros(m, sig[::-1], "round_tz")
            state["trailing_zeros"] = _wire(m, trailing_zeros - self.first, "round_tz_past_first")
        return state

    def align(self, m, state):
        state = dict(state)
        sig = state.pop("sig")
        sticky = state.pop("sticky", C(0, 1))
        if self.counted:
            state["exp"] = _exponent(state["exp"] - state.pop("left"), self.exp_lo - self.counted, self.exp_hi)
        # ``sig`` from bit ``first`` up, so that the window is the bottom of the shifted value
        if self.first >= 0:
            source = sig[self.first:]
        else:
            source = Cat(C(0, -self.first), sig)
        source = Cat(source, C(0, max(0, self.kept - len(source))))
        if self.shifts:
            offset = state.pop("offset")
            if self.has_sticky:
                sticky = sticky | (state.pop("trailing_zeros") < offset)
            source = source >> offset
        elif self.first > 0:
            # a window at a fixed place: the sticky bit is the plain OR of the bits below it
            sticky = sticky | sig[:self.first].any()
        state["sig"] = _wire(m, Cat(sticky, source[:self.kept]), "round_window")
        return state

    def pack(self, m, state):
        fmt = self.fmt
        window, exp, sign = state["sig"], state["exp"], state["sign"]
        sticky, guard, lsb, hidden = window[0], window[1], window[2], window[-1]
        round_up = guard & (sticky | lsb)
        # a clear hidden bit means a subnormal (or zero), whose exponent field is 0 whatever ``exp`` is
        field = Mux(hidden, exp, 0)[:fmt.exp_bits]
        magnitude = _wire(m, (Cat(window[2:-1], field) + round_up)[:fmt.width - 1], "round_magnitude")
        inf = state.get("inf", C(0, 1))
        if self.overflows:
            inf = inf | (hidden & at_least(exp, fmt.exp_max))
        result = Cat(magnitude, sign)
        result = Mux(state.get("zero", C(0, 1)), Cat(C(0, fmt.width - 1), sign), result)
        result = Mux(inf, Cat(C(fmt.inf_bits, fmt.width - 1), sign), result)
        return Mux(state.get("nan", C(0, 1)), C(fmt.nan_bits, fmt.width), result)


# -- units ------------------------------------------------------------------------------------------------------------

class FPMul(wiring.Component):
    """Pipelined floating-point multiplier: ``result = a * b``, rounded once to ``fmt_out``.

    The operands may have different formats, and the multiplier is as wide as their significands (bf16 x fp32 is
    8 x 24 bits). Each significand is split into pieces of at most ``dsp_width`` bits and every pair of pieces is a
    plain unsigned ``*``, which Yosys maps to one DSP block; the ``partials`` cut can then sit between the DSPs and
    the adder that sums their products (fp32 x fp32 is four 12 x 12 products).

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the packed result.
    2. ``product``: after the sum of the partial products.
    3. ``partials``: after the DSP blocks, before their products are summed.
    4. ``count``: after the leading and trailing zero counts, before the shift.
    5. ``window``: after the rounding window is shifted out of the product, before rounding.
    6. ``input``: the operands as they arrive, and whether each is normal (its hidden bit).
    7. ``spread``: what ``partials`` holds (the partial products, the exponent's rounding preparation) once more,
       in fabric: the route from a DSP block to the adders then has a cycle of its own, so the placer may put the
       two far apart.

    Parameters
    ----------
    fmt_a, fmt_b : FloatFormat
        Formats of the operands.
    fmt_out : FloatFormat
        Format of the result.
    stages : int
        Pipeline register stages, 0 to 7.
    dsp_width : int
        Widest unsigned operand of the target's multiplier blocks (18 for the ECP5 ``MULT18X18D``).

    Attributes
    ----------
    a : In(fmt_a.width)
        Packed operand.
    b : In(fmt_b.width)
        Packed operand.
    result : Out(fmt_out.width)
        Packed product of the operands presented ``latency`` cycles earlier.
    latency : int
        Cycles from operands to result, equal to ``stages``.
    dsp_enable : Signal, in
        On ECP5, with the ``input`` and ``partials`` cuts registered, those registers of the significands are the
        DSP blocks' own, which ``EnableInserter`` does not reach: whoever stalls the unit drives this too
        (:meth:`.pipeline.StallPipeline.stall` does). 1 when undriven.
    """

    CUTS = ("output", "product", "partials", "count", "window", "input", "spread")

    def __init__(self, fmt_a, fmt_b, fmt_out, stages=5, dsp_width=18):
        for name, fmt in (("fmt_a", fmt_a), ("fmt_b", fmt_b), ("fmt_out", fmt_out)):
            _check_format("FPMul", name, fmt)
        if not isinstance(dsp_width, int) or dsp_width < 2:
            raise ValueError(f"FPMul dsp_width must be an integer of at least 2, not {dsp_width!r}")
        self.fmt_a, self.fmt_b, self.fmt_out = fmt_a, fmt_b, fmt_out
        self.dsp_width = dsp_width
        self._registered = _registered_cuts("FPMul", stages, self.CUTS)
        self.latency = stages
        super().__init__({
            "a": In(fmt_a.width),
            "b": In(fmt_b.width),
            "result": Out(fmt_out.width),
        })
        self.dsp_enable = Signal(init=1)

    def elaborate(self, platform):
        fmt_a, fmt_b, fmt_out = self.fmt_a, self.fmt_b, self.fmt_out
        m = Module()
        pipe = _Pipeline(m, self._registered)

        # the hidden bits are found ahead of the ``input`` cut, so that registered operands go straight into the
        # DSP blocks: an ECP5 multiplier is combinational and far from most logic, so its inputs need the slack
        state = pipe.cut("input", {
            "a": self.a, "b": self.b,
            "a_hidden": float_layout(fmt_a)(self.a).exponent != 0,
            "b_hidden": float_layout(fmt_b)(self.b).exponent != 0,
        })
        a, b = _Unpacked(state["a"], fmt_a), _Unpacked(state["b"], fmt_b)
        a.sig, b.sig = Cat(a.sig[:-1], state["a_hidden"]), Cat(b.sig[:-1], state["b_hidden"])
        # the product of two significands has its top bit worth 2 ** 1 when both are normal
        offset = fmt_out.bias - fmt_a.bias - fmt_b.bias + 1
        exp_lo, exp_hi = 2 + offset, fmt_a.exp_max - 1 + fmt_b.exp_max - 1 + offset
        width = fmt_a.precision + fmt_b.precision
        rounder = _Rounder(fmt_out, width, (exp_lo, exp_hi), max_lz=width)
        state = {
            "sign": a.sign ^ b.sign,
            "exp": _exponent(a.exp + b.exp + offset, exp_lo, exp_hi + 2),
            "nan": a.is_nan | b.is_nan | (a.is_inf & b.is_zero) | (a.is_zero & b.is_inf),
            "inf": a.is_inf | b.is_inf,
        }
        hard = (is_ecp5(platform) and self.dsp_width <= 18
                and {"input", "partials"} <= self._registered)
        # on ECP5 the ``input`` and ``partials`` registers of the significands are the MULT18X18D's own: the routing
        # to and from a DSP site each get a whole cycle (the DSP sites can be far from the fabric); the DSP blocks
        # then take the significands ahead of the ``input`` cut
        sig_a, sig_b = (_Unpacked(self.a, fmt_a).sig, _Unpacked(self.b, fmt_b).sig) if hard else (a.sig, b.sig)
        products = {}
        for a_piece, a_shift in _pieces(sig_a, self.dsp_width):
            for b_piece, b_shift in _pieces(sig_b, self.dsp_width):
                key = f"partial_{a_shift}_{b_shift}"
                if hard:
                    products[key] = Signal(len(a_piece) + len(b_piece), name=f"partials_{key}")
                    m.submodules[f"dsp_{a_shift}_{b_shift}"] = ecp5_registered_product(
                        a_piece, b_piece, products[key], self.dsp_enable)
                else:
                    state[key] = a_piece * b_piece
        # the rounder's preparation from the exponent runs in parallel with the sum of the partial products
        state = rounder.prepare(pipe.m, {**pipe.cut("partials", state), **products})
        state = pipe.cut("spread", state)
        product = C(0, width)
        for key in [key for key in state if key.startswith("partial_")]:
            a_shift, b_shift = map(int, key.split("_")[1:])
            product = product + (state.pop(key) << (a_shift + b_shift))
        state["sig"] = product[:width]
        state = pipe.cut("product", state)
        state = pipe.cut("count", rounder.count(pipe.m, state))
        state = pipe.cut("window", rounder.align(pipe.m, state))
        state = pipe.cut("output", {"result": rounder.pack(pipe.m, state)})
        m.d.comb += self.result.eq(state["result"])
        return m


class FPAdd(wiring.Component):
    """Pipelined floating-point adder/subtractor: ``result = a + b``, or ``a - b`` when ``sub`` is set.

    The operand of larger magnitude gives the sign and exponent; the other is aligned to it with three extra bits
    (guard, round, and a sticky bit that collects everything shifted further out), which is enough for a correctly
    rounded sum or difference. An exact cancellation gives ``+0`` (round to nearest even), ``-0 + -0`` gives ``-0``.

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the packed result.
    2. ``sum``: after the significand adder.
    3. ``swap``: after the magnitude comparison that orders the operands.
    4. ``window``: after the rounding window is shifted out of the sum, before rounding.
    5. ``align``: after the alignment shift of the smaller operand.
    6. ``count``: after the leading and trailing zero counts.
    7. ``input``: the operands as they arrive.
    8. ``compare``: after the magnitude comparison and the two exponent differences, before they are clamped
       and the swap muxes use them.

    Parameters
    ----------
    fmt : FloatFormat
        Format of the operands and of the result.
    stages : int
        Pipeline register stages, 0 to 8.

    Attributes
    ----------
    a : In(fmt.width)
        Packed operand.
    b : In(fmt.width)
        Packed operand.
    sub : In(1)
        Subtract ``b`` instead of adding it.
    result : Out(fmt.width)
        Packed sum of the operands presented ``latency`` cycles earlier.
    latency : int
        Cycles from operands to result, equal to ``stages``.
    """

    CUTS = ("output", "sum", "swap", "window", "align", "count", "input", "compare")
    #: alignment bits below the significand: guard, round, sticky
    GUARD_BITS = 3

    def __init__(self, fmt, stages=6):
        _check_format("FPAdd", "fmt", fmt)
        self.fmt = fmt
        self._registered = _registered_cuts("FPAdd", stages, self.CUTS)
        self.latency = stages
        super().__init__({
            "a": In(fmt.width),
            "b": In(fmt.width),
            "sub": In(1),
            "result": Out(fmt.width),
        })

    def elaborate(self, platform):
        fmt = self.fmt
        g = self.GUARD_BITS
        aligned_width = fmt.precision + g
        m = Module()
        pipe = _Pipeline(m, self._registered)

        state = pipe.cut("input", {"a": self.a, "b": self.b, "sub": self.sub})
        a, b = _Unpacked(state["a"], fmt), _Unpacked(state["b"], fmt)
        b_sign = b.sign ^ state["sub"]
        # the larger magnitude has the larger exponent, so both differences are computed in parallel with the
        # comparison, which then picks one, clamped: past ``aligned_width`` places the whole smaller significand is
        # below the guard bits
        trailing_zeros = {name: _count_leading_zeros(pipe.m, operand.sig[::-1], f"{name}_tz")
                          for name, operand in (("a", a), ("b", b))}
        state = pipe.cut("compare", {
            "a": state["a"], "b": state["b"], "b_sign": b_sign, "subtract": a.sign ^ b_sign,
            "swap": b.magnitude > a.magnitude, "equal": a.magnitude == b.magnitude,
            "difference_a": a.exp - b.exp, "difference_b": b.exp - a.exp,
            **{f"trailing_zeros_{name}": value for name, value in trailing_zeros.items()},
        })
        a, b = _Unpacked(state["a"], fmt), _Unpacked(state["b"], fmt)
        b_sign, subtract, swap = state["b_sign"], state["subtract"], state["swap"]
        # the clamp after the cut, so that a cycle holds one carry chain (a difference is only picked when it is not
        # negative; as unsigned, a negative one is clamped too)
        distance = {name: Mux(at_least(state[f"difference_{name}"].as_unsigned(), aligned_width + 1), aligned_width,
                              state[f"difference_{name}"])[:aligned_width.bit_length()] for name in ("a", "b")}
        state = pipe.cut("swap", {
            # the larger operand's sign, except that an exact cancellation is +0
            "sign": Mux(swap, b_sign, a.sign) & ~(subtract & state["equal"]),
            "x_exp": Mux(swap, b.exp, a.exp),
            "x_sig": Mux(swap, b.sig, a.sig),
            "y_sig": Mux(swap, a.sig, b.sig),
            "y_trailing_zeros": Mux(swap, state["trailing_zeros_a"], state["trailing_zeros_b"]),
            "distance": Mux(swap, distance["b"], distance["a"]),
            "subtract": subtract,
            "nan": a.is_nan | b.is_nan | (a.is_inf & b.is_inf & subtract),
            "inf": a.is_inf | b.is_inf,
        })

        distance = state["distance"]
        shifted = _wire(pipe.m, Cat(C(0, g), state["y_sig"]) >> distance, "y_shifted")
        # the sticky bit: whether any bit of the smaller significand is shifted past the guard bits
        sticky = state["y_trailing_zeros"] + g < distance
        # the adder's carry-out bit is worth twice the larger operand's hidden bit
        exp_lo, exp_hi = 2, fmt.exp_max
        rounder = _Rounder(fmt, aligned_width + 1, (exp_lo, exp_hi), max_lz=aligned_width + 1)
        state = pipe.cut("align", rounder.prepare(pipe.m, {
            "sign": state["sign"], "exp": _exponent(state["x_exp"] + 1, exp_lo, exp_hi + 1),
            "subtract": state["subtract"], "x_sig": Cat(C(0, g), state["x_sig"]),
            "y_sig": Cat(shifted[0] | sticky, shifted[1:]),
            "nan": state["nan"], "inf": state["inf"],
        }))

        # one adder for both: x - y is x + ~y + 1, and x >= y, so the difference is never negative
        subtract = state.pop("subtract")
        addend = Cat(state.pop("y_sig"), C(0, 1)) ^ subtract.replicate(aligned_width + 1)
        state["sig"] = (state.pop("x_sig") + addend + subtract)[:aligned_width + 1]
        state = pipe.cut("sum", state)
        state = pipe.cut("count", rounder.count(pipe.m, state))
        state = pipe.cut("window", rounder.align(pipe.m, state))
        state = pipe.cut("output", {"result": rounder.pack(pipe.m, state)})
        m.d.comb += self.result.eq(state["result"])
        return m


def _div_exponents(fmt):
    """The divider's exponent range before rounding: the quotient's top bit is worth ``2 ** 0``, and a zero
    operand counts ``precision`` leading zeros."""
    p = fmt.precision
    return (1 - p) - (fmt.exp_max - 1) + fmt.bias, (fmt.exp_max - 1) - (1 - p) + fmt.bias


def _div_normalize(m, fmt, a_bits, b_bits):
    """The divider's operands unpacked and normalised: sign, exponent (the leading zeros still to take off),
    leading zeros, the normalised dividend (``remainder``) and divisor, and the special cases."""
    p = fmt.precision
    a, b = _Unpacked(a_bits, fmt), _Unpacked(b_bits, fmt)
    leading_zeros = {name: _count_leading_zeros(m, operand.sig, name) for name, operand in (("a", a), ("b", b))}
    exp_lo, exp_hi = _div_exponents(fmt)
    nan = a.is_nan | b.is_nan | (a.is_zero & b.is_zero) | (a.is_inf & b.is_inf)
    return {
        "sign": a.sign ^ b.sign,
        # the leading zeros are taken off the exponent in the first recurrence step, which has time to spare
        "exp": _exponent(a.exp - b.exp + fmt.bias, exp_lo + p, exp_hi - p),
        "a_leading_zeros": leading_zeros["a"],
        "b_leading_zeros": leading_zeros["b"],
        "remainder": _wire(m, (a.sig << leading_zeros["a"])[:p], "a_normalized"),
        "divisor": _wire(m, (b.sig << leading_zeros["b"])[:p], "b_normalized"),
        "nan": nan,
        "inf": (a.is_inf | b.is_zero) & ~nan,
        "zero": (a.is_zero | b.is_inf) & ~nan,
    }


def _sqrt_exponents(fmt):
    """The root's exponent range: with ``x = exp - leading zeros`` the operand's exponent is ``x - bias``, and the
    root's biased exponent is ``floor((x - bias) / 2) + bias = floor((x + bias) / 2)``; ``x`` is at least
    ``2 - p`` (the smallest subnormal), and a zero operand, whose exponent means nothing, counts ``p`` leading
    zeros."""
    return (2 - fmt.precision + fmt.bias) >> 1, (fmt.exp_max - 1 + fmt.bias) >> 1


def _sqrt_normalize(m, fmt, a_bits):
    """The root's operand unpacked and normalised: sign, exponent, leading zeros, the normalised significand and
    the special cases."""
    a = _Unpacked(a_bits, fmt)
    leading_zeros = _count_leading_zeros(m, a.sig, "a")
    return {
        "sign": a.sign,
        # the exponent arithmetic waits for the next stage, where the first recurrence steps are short
        "exp": a.exp,
        "leading_zeros": leading_zeros,
        "sig": _wire(m, (a.sig << leading_zeros)[:fmt.precision], "a_normalized"),
        "nan": a.is_nan | (a.sign & ~a.is_zero),
        "inf": a.is_inf,
        "zero": a.is_zero,
    }


def _sqrt_radicand(m, fmt, state):
    """From :func:`_sqrt_normalize`'s state: pops the exponent fields and the significand, sets the root's
    exponent, and returns the radicand ``sig * 2 ** odd``, ``precision + 1`` bits worth ``[1, 4)``; its two top
    bits are the first digit pair, at least 1, so the root's first bit is 1 and the remainder after it is that
    pair minus 1."""
    p = fmt.precision
    exp_lo, exp_hi = _sqrt_exponents(fmt)
    biased = _wire(m, _exponent(state.pop("exp") + fmt.bias - state.pop("leading_zeros"),
                                1 + fmt.bias - p, fmt.exp_max - 1 + fmt.bias), "biased")
    odd = biased[0]
    state["exp"] = _exponent(biased >> 1, exp_lo, exp_hi)
    sig = state.pop("sig")
    return _wire(m, Mux(odd, Cat(C(0, 1), sig), Cat(sig, C(0, 1))), "radicand")


class FPDiv(wiring.Component):
    """Pipelined floating-point divider: ``result = a / b``, one division accepted per cycle.

    Subnormal operands are normalised first, so that the quotient of the significands lies in ``(1/2, 2)``; a
    restoring recurrence then produces one quotient bit per step, ``precision + 2`` steps in all (the quotient, one
    bit in case it is below 1, and the guard bit), and the final remainder gives the sticky bit. ``x / 0`` is a
    signed infinity, ``0 / 0`` and ``inf / inf`` are NaN, ``x / inf`` is a signed zero.

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the packed result.
    2. ``quotient``: after the last recurrence step.
    3. ``normalize``: after the normalisation of the operands, before the first recurrence step.
    4. ``window``: after the rounding window is shifted out of the quotient, before rounding.
    5. ``input``: the operands as they arrive.
    6. then ``iter_1`` to ``iter_{precision + 1}`` between recurrence steps, spread evenly over the recurrence.

    Parameters
    ----------
    fmt : FloatFormat
        Format of the operands and of the result.
    stages : int or None
        Pipeline register stages, 0 to ``precision + 6``; ``None`` registers every cut (one recurrence step per
        cycle, ``latency = precision + 6``: 30 for fp32).

    Attributes
    ----------
    a : In(fmt.width)
        Packed dividend.
    b : In(fmt.width)
        Packed divisor.
    result : Out(fmt.width)
        Packed quotient of the operands presented ``latency`` cycles earlier.
    latency : int
        Cycles from operands to result, equal to ``stages``.
    """

    NAMED_CUTS = ("output", "quotient", "normalize", "window", "input")

    def __init__(self, fmt, stages=None):
        _check_format("FPDiv", "fmt", fmt)
        self.fmt = fmt
        self.steps = fmt.precision + 2
        self.cuts, self._registered, self.latency = _recurrence_cuts("FPDiv", self.NAMED_CUTS, self.steps, stages)
        super().__init__({
            "a": In(fmt.width),
            "b": In(fmt.width),
            "result": Out(fmt.width),
        })

    def elaborate(self, platform):
        fmt = self.fmt
        p = fmt.precision
        m = Module()
        pipe = _Pipeline(m, self._registered)

        state = pipe.cut("input", {"a": self.a, "b": self.b})
        state = pipe.cut("normalize", _div_normalize(pipe.m, fmt, state["a"], state["b"]))
        exp_lo, exp_hi = _div_exponents(fmt)
        exp = state["exp"] - state.pop("a_leading_zeros") + state.pop("b_leading_zeros")
        state["exp"] = _exponent(exp, exp_lo, exp_hi)

        # restoring recurrence: the remainder stays below twice the divisor, so it fits precision + 1 bits
        for step in range(self.steps):
            if step > 0:
                state = pipe.cut(f"iter_{step}", state)
            remainder, divisor = state.pop("remainder"), state["divisor"]
            difference = _wire(pipe.m, remainder - divisor, f"difference_{step}")
            quotient_bit = ~difference[-1]
            remainder = Mux(quotient_bit, difference, remainder)[:p]
            quotient = state.pop("quotient", None)
            state["quotient"] = quotient_bit if quotient is None else Cat(quotient_bit, quotient)
            if step < self.steps - 1:
                state["remainder"] = Cat(C(0, 1), remainder)
        del state["divisor"]

        rounder = _Rounder(fmt, self.steps, (exp_lo, exp_hi), max_lz=1)
        state["sig"] = state.pop("quotient")
        state["sticky"] = remainder.any()
        state = pipe.cut("quotient", rounder.prepare(pipe.m, state))
        state = pipe.cut("window", rounder.align(pipe.m, rounder.count(pipe.m, state)))
        state = pipe.cut("output", {"result": rounder.pack(pipe.m, state)})
        m.d.comb += self.result.eq(state["result"])
        return m


class FPSqrt(wiring.Component):
    """Pipelined floating-point square root: ``result = sqrt(a)``, rounded to nearest even, one accepted per cycle.

    A subnormal operand is normalised first. The significand, doubled when the unbiased exponent is odd, is a
    radicand in ``[1, 4)`` with an even exponent, whose root lies in ``[1, 2)``: its top bit is always set and needs
    no recurrence step. A restoring recurrence then produces the other ``precision`` root bits (the fraction and the
    guard bit), one per step, consuming two radicand bits per step, and the final remainder gives the sticky bit.
    A root never overflows, and underflows only in formats whose bias is not above their fraction width (none of
    the named ones), so the rounder has no shifts to make in fp32, bf16 or fp16.
    ``sqrt(+-0) = +-0``, ``sqrt(+inf) = +inf``, the root of any other negative operand (``-inf`` included) and of a
    NaN is the canonical NaN.

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the packed result.
    2. ``root``: after the last recurrence step.
    3. ``normalize``: after the normalisation of the operand, before the first recurrence step.
    4. ``input``: the operand as it arrives.
    5. then ``iter_1`` to ``iter_{precision - 1}`` between recurrence steps, spread evenly over the recurrence.

    Parameters
    ----------
    fmt : FloatFormat
        Format of the operand and of the result.
    stages : int or None
        Pipeline register stages, 0 to ``precision + 3``; ``None`` registers every cut (one recurrence step per
        cycle, ``latency = precision + 3``: 27 for fp32).

    Attributes
    ----------
    a : In(fmt.width)
        Packed operand.
    result : Out(fmt.width)
        Packed square root of the operand presented ``latency`` cycles earlier.
    latency : int
        Cycles from operand to result, equal to ``stages``.
    """

    NAMED_CUTS = ("output", "root", "normalize", "input")

    def __init__(self, fmt, stages=None):
        _check_format("FPSqrt", "fmt", fmt)
        self.fmt = fmt
        self.steps = fmt.precision
        self.cuts, self._registered, self.latency = _recurrence_cuts("FPSqrt", self.NAMED_CUTS, self.steps, stages)
        super().__init__({
            "a": In(fmt.width),
            "result": Out(fmt.width),
        })

    def elaborate(self, platform):
        fmt = self.fmt
        p = fmt.precision
        m = Module()
        pipe = _Pipeline(m, self._registered)

        state = pipe.cut("input", {"a": self.a})
        state = pipe.cut("normalize", _sqrt_normalize(pipe.m, fmt, state["a"]))
        exp_lo, exp_hi = _sqrt_exponents(fmt)
        radicand = _sqrt_radicand(pipe.m, fmt, state)
        state["remainder"] = (radicand[p - 1:] - 1)[:2]
        state["root"] = C(1, 1)
        pending = radicand[:p - 1]                 # radicand bits still to bring down, the top ones first

        # restoring recurrence, digit by digit: with root ``q`` so far, bring down the next two radicand bits and
        # subtract ``4q + 1`` if it fits; the remainder stays at most ``2q``, one bit wider than ``q``
        for step in range(1, self.steps + 1):
            if step > 1:
                state = pipe.cut(f"iter_{step - 1}", state)
                pending = state.pop("pending", None)
            remainder, root = state.pop("remainder"), state.pop("root")
            digits = [C(0, 1), C(0, 1)]
            if pending is not None:
                digits = [pending[-2] if len(pending) >= 2 else C(0, 1), pending[-1]]
                pending = pending[:-2] if len(pending) > 2 else None
            shifted = _wire(pipe.m, Cat(*digits, remainder), f"shifted_{step}")
            trial = Cat(C(1, 1), C(0, 1), root)
            difference = _wire(pipe.m, shifted - trial, f"difference_{step}")
            root_bit = ~difference[-1]
            state["root"] = Cat(root_bit, root)
            if step < self.steps:
                state["remainder"] = Mux(root_bit, difference, shifted)[:step + 2]
                if pending is not None:
                    state["pending"] = pending
            else:
                # whether the final remainder is nonzero, by a comparison beside the subtraction rather than after
                # it; it matters only where the last root bit, the guard bit, is set, and the remainder is then
                # ``shifted - trial``
                state["sticky"] = shifted != trial

        rounder = _Rounder(fmt, p + 1, (exp_lo, exp_hi), max_lz=0)
        state["sig"] = state.pop("root")
        state = pipe.cut("root", rounder.prepare(pipe.m, state))
        state = rounder.align(pipe.m, rounder.count(pipe.m, state))
        state = pipe.cut("output", {"result": rounder.pack(pipe.m, state)})
        m.d.comb += self.result.eq(state["result"])
        return m


class _FoldedRecurrence(wiring.Component):
    """A divider or square root that runs its recurrence over several cycles, ``steps_per_cycle`` steps a cycle,
    for a user that starts one operation every few cycles (the optimizer core at an interval of 8): one
    recurrence's logic folded instead of one per step.

    An operation starts in a cycle with ``load`` set (its operands valid in that cycle): the operands are
    normalised into the state registers at its end, the recurrence runs over the next ``cycles`` cycles, and the
    rounded result leaves a cycle later, ``latency = cycles + 2`` cycles after ``load``, and stays until the next
    operation's result. The next ``load`` may come ``occupancy = cycles + 1`` cycles after the last. The result
    equals the pipelined unit's to the bit.
    """

    def __init__(self, fmt, steps, steps_per_cycle, stages, ports):
        _check_format(type(self).__name__, "fmt", fmt)
        if not isinstance(steps_per_cycle, int) or isinstance(steps_per_cycle, bool) or not \
                1 <= steps_per_cycle <= steps:
            raise ValueError(f"steps_per_cycle must be an integer from 1 to {steps}, not {steps_per_cycle!r}")
        self.fmt, self.steps, self.steps_per_cycle = fmt, steps, steps_per_cycle
        self.cycles = -(-steps // steps_per_cycle)
        self.latency, self.occupancy = self.cycles + 2, self.cycles + 1
        if stages is not None and stages != self.latency:
            raise ValueError(f"{type(self).__name__} takes {self.latency} cycles, not {stages}")
        super().__init__({**ports, "load": In(1), "result": Out(fmt.width)})

    def _run(self, m, init, step):
        """The state registers: ``init`` (a dict of Values) on ``load``, then ``step(state, index)`` (the
        recurrence step ``index``, a Value) ``steps_per_cycle`` times a cycle until ``steps`` steps are done.
        Returns the state registers."""
        state = {name: Signal(Value.cast(value).shape(), name=f"folded_{name}") for name, value in init.items()}
        count = Signal(range(self.cycles + 1))
        now = dict(state)
        for j in range(self.steps_per_cycle):
            index = count * self.steps_per_cycle + j
            after = step(now, index)
            if self.steps % self.steps_per_cycle:
                # the last cycle's spare steps leave the state as it is
                after = {name: Mux(index < self.steps, value, now[name]) for name, value in after.items()}
            # each step's results on wires, so that the next step's logic refers to them, not copies of them
            now = {**now, **{name: _wire(m, value, f"step_{j}_{name}") for name, value in after.items()}}
        with m.If(self.load):
            m.d.sync += [count.eq(0), *(state[name].eq(value) for name, value in init.items())]
        with m.Elif(count != self.cycles):
            m.d.sync += [count.eq(count + 1), *(state[name].eq(now[name]) for name in state)]
        return state

    def _finish(self, m, rounder, state):
        result = Signal(self.fmt.width)
        m.d.sync += result.eq(rounder.pack(m, rounder.align(m, rounder.count(m, rounder.prepare(m, state)))))
        m.d.comb += self.result.eq(result)


class FPDivFolded(_FoldedRecurrence):
    """:class:`FPDiv`'s quotient, ``steps_per_cycle`` restoring steps a cycle (see :class:`_FoldedRecurrence`):
    at 4 steps a cycle, 7 cycles of recurrence, ``latency`` 9, an operation every 8 cycles.

    Attributes
    ----------
    a, b : In(fmt.width)
    load : In(1)
    result : Out(fmt.width)
    """

    def __init__(self, fmt, steps_per_cycle=4, stages=None):
        super().__init__(fmt, fmt.precision + 2, steps_per_cycle, stages, {"a": In(fmt.width), "b": In(fmt.width)})

    def elaborate(self, platform):
        fmt, m = self.fmt, Module()
        p = fmt.precision
        state = _div_normalize(m, fmt, self.a, self.b)
        exp_lo, exp_hi = _div_exponents(fmt)
        exp = _exponent(state.pop("exp") - state.pop("a_leading_zeros") + state.pop("b_leading_zeros"),
                        exp_lo, exp_hi)
        # the remainder one bit wider than the divisor from the start (the pipelined unit widens it after its
        # first step): the same values, one shape for every step
        init = {**state, "exp": exp, "remainder": Cat(state["remainder"], C(0, 1)),
                "quotient": C(0, self.steps)}

        def step(now, index):
            difference = now["remainder"] - now["divisor"]
            bit = ~difference[-1]
            kept = Mux(bit, difference, now["remainder"])[:p]
            return {"remainder": Cat(C(0, 1), kept), "quotient": Cat(bit, now["quotient"])[:self.steps]}

        done = self._run(m, init, step)
        final = {name: done[name] for name in ("sign", "exp", "nan", "inf", "zero")}
        # the last step's shift puts a zero below the remainder: whether it is nonzero is unchanged
        final.update(sig=done["quotient"], sticky=done["remainder"].any())
        self._finish(m, _Rounder(fmt, self.steps, (exp_lo, exp_hi), max_lz=1), final)
        return m


class FPSqrtFolded(_FoldedRecurrence):
    """:class:`FPSqrt`'s root, ``steps_per_cycle`` restoring steps a cycle (see :class:`_FoldedRecurrence`): at 4
    steps a cycle, 6 cycles of recurrence, ``latency`` 8, an operation every 7 cycles.

    Attributes
    ----------
    a : In(fmt.width)
    load : In(1)
    result : Out(fmt.width)
    """

    def __init__(self, fmt, steps_per_cycle=4, stages=None):
        super().__init__(fmt, fmt.precision, steps_per_cycle, stages, {"a": In(fmt.width)})

    def elaborate(self, platform):
        fmt, m = self.fmt, Module()
        p = fmt.precision
        state = _sqrt_normalize(m, fmt, self.a)
        radicand = _sqrt_radicand(m, fmt, state)
        width = p + 2                  # the remainder stays at most twice the root so far
        # the radicand's bits still to bring down, the top ones first, padded to whole digit pairs
        init = {**state, "remainder": (radicand[p - 1:] - 1)[:2], "root": C(1, p + 1),
                "pending": Cat(C(0, 1), radicand[:p - 1])}
        init["remainder"] = Cat(init["remainder"], C(0, width - 2))

        def step(now, index):
            pending, remainder, root = now["pending"], now["remainder"], now["root"]
            shifted = Cat(pending[-2], pending[-1], remainder)
            trial = Cat(C(1, 1), C(0, 1), root)
            difference = shifted - trial
            bit = ~difference[-1]
            return {"remainder": Mux(bit, difference, shifted)[:width], "root": Cat(bit, root)[:p + 1],
                    "pending": Cat(C(0, 2), pending[:-2])}

        done = self._run(m, init, step)
        final = {name: done[name] for name in ("sign", "exp", "nan", "inf", "zero")}
        final.update(sig=done["root"], sticky=done["remainder"].any())
        self._finish(m, _Rounder(fmt, p + 1, _sqrt_exponents(fmt), max_lz=0), final)
        return m


class FPConvert(wiring.Component):
    """Floating-point format conversion: exact widening, or narrowing rounded to nearest even.

    Narrowing produces subnormals and overflows to infinity as IEEE requires; widening normalises subnormals of a
    format with a narrower exponent (fp16 to fp32). A NaN becomes the canonical NaN of ``fmt_out``.

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the packed result.
    2. ``window``: after the rounding window is shifted out of the significand, before rounding.
    3. ``input``: the operand as it arrives.

    Parameters
    ----------
    fmt_in, fmt_out : FloatFormat
        Formats of the operand and of the result.
    stages : int
        Pipeline register stages, 0 to 3.

    Attributes
    ----------
    a : In(fmt_in.width)
        Packed operand.
    result : Out(fmt_out.width)
        The operand presented ``latency`` cycles earlier, in ``fmt_out``.
    latency : int
        Cycles from operand to result, equal to ``stages``.
    """

    CUTS = ("output", "window", "input")

    def __init__(self, fmt_in, fmt_out, stages=1):
        _check_format("FPConvert", "fmt_in", fmt_in)
        _check_format("FPConvert", "fmt_out", fmt_out)
        self.fmt_in, self.fmt_out = fmt_in, fmt_out
        self._registered = _registered_cuts("FPConvert", stages, self.CUTS)
        self.latency = stages
        super().__init__({
            "a": In(fmt_in.width),
            "result": Out(fmt_out.width),
        })

    def elaborate(self, platform):
        fmt_in, fmt_out = self.fmt_in, self.fmt_out
        m = Module()
        pipe = _Pipeline(m, self._registered)

        state = pipe.cut("input", {"a": self.a})
        a = _Unpacked(state["a"], fmt_in)
        offset = fmt_out.bias - fmt_in.bias
        exp_lo, exp_hi = 1 + offset, fmt_in.exp_max - 1 + offset
        # only a subnormal operand has leading zeros; it needs normalising only if it becomes a normal result
        max_lz = fmt_in.frac_bits if exp_lo > 1 else 0
        rounder = _Rounder(fmt_out, fmt_in.precision, (exp_lo, exp_hi), max_lz=max_lz)
        state = {
            "sign": a.sign,
            "exp": _exponent(a.exp + offset, exp_lo, exp_hi),
            "sig": a.sig,
            "nan": a.is_nan,
            "inf": a.is_inf,
        }
        state = pipe.cut("window", rounder.align(pipe.m, rounder.count(pipe.m, rounder.prepare(pipe.m, state))))
        state = pipe.cut("output", {"result": rounder.pack(pipe.m, state)})
        m.d.comb += self.result.eq(state["result"])
        return m


class FixedToFloat(wiring.Component):
    """Scaled two's complement integer to float: ``result = value * 2 ** exponent``, rounded once to ``fmt``.

    This is how the GEMM engine turns an exact integer chunk sum ``S`` and its block exponent into a float32 partial
    (:func:`edge_qlora.golden.gemm.partial_to_fp32`). The magnitude of ``value`` is normalised and rounded by the
    same datapath as the other units, to nearest with ties to even, with gradual underflow and overflow to
    infinity; a zero ``value`` gives ``+0`` whatever the exponent. An ``exponent`` outside ``exp_range`` gives an
    unspecified result: the range only sizes the port and decides which shifts and overflow checks exist.

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the packed result.
    2. ``magnitude``: after the absolute value of ``value``.
    3. ``window``: after the rounding window is shifted out of the magnitude, before rounding.
    4. ``count``: after the leading and trailing zero counts.
    5. ``input``: the operands as they arrive.

    Parameters
    ----------
    width : int
        Width of ``value``, 2 to 64 (44 for a chunk sum).
    exp_range : tuple of int
        Smallest and largest ``exponent``. The default is the GEMM engine's: ``Ea + Eb - 32`` for chunk exponents
        ``Ea``, ``Eb`` of bf16 operands, from ``2 * -126 - 32`` to ``2 * 127 - 32``.
    fmt : FloatFormat
        Format of the result.
    stages : int
        Pipeline register stages, 0 to 5.
    biased : bool
        ``exponent`` arrives with ``exponent_offset`` added, so that a caller which sums the exponent anyway folds
        the constant into its own sum (otherwise the addition and the subnormal check behind it share a cycle, a long
        path in the GEMM engine).

    Attributes
    ----------
    value : In(signed(width))
        The integer.
    exponent : In(signed(exponent_width))
        The power of two it is worth (plus ``exponent_offset`` if ``biased``).
    result : Out(fmt.width)
        Packed ``value * 2 ** exponent`` of the operands presented ``latency`` cycles earlier.
    latency : int
        Cycles from operands to result, equal to ``stages``.
    exponent_width : int
        Width of the ``exponent`` port: just enough for ``exp_range`` (shifted by ``exponent_offset`` if
        ``biased``).
    exponent_offset : int
        ``width - 1 + fmt.bias``: the biased exponent of the magnitude's top bit is ``exponent + exponent_offset``.
    """

    CUTS = ("output", "magnitude", "window", "count", "input")

    def __init__(self, width=44, exp_range=(-284, 222), fmt=FP32, stages=4, *, biased=False):
        if not isinstance(width, int) or isinstance(width, bool) or not 2 <= width <= 64:
            raise ValueError(f"FixedToFloat width must be an integer from 2 to 64, not {width!r}")
        if (not isinstance(exp_range, tuple) or len(exp_range) != 2
                or not all(isinstance(e, int) and not isinstance(e, bool) for e in exp_range)
                or exp_range[0] > exp_range[1]):
            raise ValueError(f"FixedToFloat exp_range must be a tuple (lo, hi) of integers with lo <= hi, "
                             f"not {exp_range!r}")
        _check_format("FixedToFloat", "fmt", fmt)
        self.width, self.exp_range, self.fmt = width, exp_range, fmt
        self._registered = _registered_cuts("FixedToFloat", stages, self.CUTS)
        self.latency = stages
        self.biased = bool(biased)
        self.exponent_offset = width - 1 + fmt.bias
        port_range = [e + self.exponent_offset * self.biased for e in exp_range]
        self.exponent_width = max(abs(port_range[0]).bit_length(), abs(port_range[1]).bit_length()) + 1
        super().__init__({
            "value": In(signed(width)),
            "exponent": In(signed(self.exponent_width)),
            "result": Out(fmt.width),
        })

    def elaborate(self, platform):
        fmt, width = self.fmt, self.width
        m = Module()
        pipe = _Pipeline(m, self._registered)

        state = pipe.cut("input", {"value": self.value, "exponent": self.exponent})
        value = state["value"]
        negative = value[-1]
        # the magnitude of the most negative value, 2 ** (width - 1), still fits ``width`` unsigned bits
        magnitude = _wire(pipe.m, Mux(negative, -value, value)[:width], "magnitude")
        # the magnitude's top bit is worth 2 ** (width - 1 + exponent)
        offset = self.exponent_offset
        exp_lo, exp_hi = self.exp_range[0] + offset, self.exp_range[1] + offset
        rounder = _Rounder(fmt, width, (exp_lo, exp_hi), max_lz=width - 1)
        prepared = rounder.prepare(pipe.m, {
            "sign": negative,
            "exp": _exponent(state["exponent"] + (0 if self.biased else offset), exp_lo, exp_hi),
            "sig": magnitude,
        })
        if rounder.counts_trailing_zeros:
            # a negation keeps the trailing zeros, so they are counted on ``value`` beside the negation rather than
            # on the magnitude in the count stage (where that count and the subtraction after it would share a cycle)
            prepared["sig_trailing_zeros"] = _count_leading_zeros(pipe.m, value[::-1], "value_tz")
        state = pipe.cut("magnitude", prepared)
        state = pipe.cut("count", rounder.count(pipe.m, state))
        state = pipe.cut("window", rounder.align(pipe.m, state))
        state = pipe.cut("output", {"result": rounder.pack(pipe.m, state)})
        m.d.comb += self.result.eq(state["result"])
        return m
