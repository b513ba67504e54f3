"""Block floating point: a chunk's shared exponent, and bf16 values aligned to it (twin: ``golden/gemm.py``).

The GEMM engine turns every ``chunk`` consecutive bf16 elements of a row of A (or of a column of B) into 18-bit
signed integers that share one exponent ``E``, the largest exponent among them (see
:func:`edge_qlora.golden.gemm.align`): ``q = rne(v * 2 ** (16 - E))``. :class:`ExponentMax` finds ``E`` while a
chunk streams into the operand buffers, :class:`AlignLanes` converts the chunk's values once ``E`` is known.

A bf16 value is ``(-1) ** s * sig * 2 ** (e - 7)``, with ``sig`` the 8-bit significand (hidden bit and fraction)
and ``e`` its unbiased exponent; a subnormal has no hidden bit and ``e = -126``, so that one formula covers both.
With ``d = E - e >= 0``, ``q = rne(+-sig * 2 ** (9 - d))``: exact while ``d <= 9`` (the chunk's largest element
lands in ``[2 ** 16, 2 ** 17)``), rounded to nearest even below that, and zero from ``d = 18`` on. Rounding to
nearest even is symmetric in the sign, so the magnitude is rounded and then negated.

NaNs and infinities are outside this arithmetic: the engine refuses them before they reach these units, whose
results for them are unspecified.
"""

from amaranth.hdl import C, Cat, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..constants import BF16, EXP_MIN, OPERAND_BITS, OPERAND_FRAC

from .fp import at_least

__all__ = ["EXP_MIN", "EXPONENT_SHAPE", "BF16_BIAS", "bf16_exponent", "biased_exponent", "exponent_field",
           "max_exponent", "partial_maxima", "max_of_partials", "ExponentMax", "AlignLanes"]

#: shape of an unbiased bf16 exponent: -126 to 127 (128 for NaN and infinity)
EXPONENT_SHAPE = signed(9)
#: bias of a bf16 exponent field
BF16_BIAS = 127
_BF16_FRAC = 7
MAX_LANES = 64
# ``q = rne(sig * 2 ** (_UNIT_SHIFT - d))``: the significand's last place lands 9 places up when ``d = 0``
_UNIT_SHIFT = OPERAND_FRAC - _BF16_FRAC
# from this distance on, every significand (< 2 ** 8) aligns to less than half: zero
_ZERO_DISTANCE = _UNIT_SHIFT + 9


def biased_exponent(value):
    """The exponent field of a packed bf16, with zeros and subnormals at 1, the field of the smallest normal.

    Comparisons between exponents work on this unsigned 8-bit value: narrower than the unbiased exponent, and no
    adder in front of the comparator.
    """
    field = exponent_field(value)
    return field | (field == 0)


def exponent_field(value):
    """The raw exponent field of a packed bf16: 0 for zeros and subnormals.

    Where a maximum is taken against something that starts at 1 (the field of the smallest normal), this field
    gives the same maximum as :func:`biased_exponent` without the 8-input gate in front of the comparator.
    """
    return Value.cast(value)[_BF16_FRAC:15]


def bf16_exponent(value):
    """Unbiased exponent of a packed bf16 as :func:`edge_qlora.golden.gemm.exponents` defines it.

    Zeros and subnormals give -126, the exponent of the smallest normal (a subnormal is scaled like one, without
    the hidden bit); NaNs and infinities give 128.

    Parameters
    ----------
    value : Value
        16-bit packed bf16.

    Returns
    -------
    Value of shape :data:`EXPONENT_SHAPE`
    """
    return biased_exponent(value) - BF16_BIAS


def _max(m, a, b, name):
    wire = Signal(8, name=name)
    m.d.comb += wire.eq(Mux(a > b, a, b))
    return wire


def _reduce(m, fields, name, level_done=lambda level, nodes: nodes, levels=None):
    """Pairwise max tree over biased exponent ``fields``; ``level_done(level, nodes)`` may register the nodes of a
    level (level 0: the fields themselves) and returns what the next level reads. Stops after ``levels`` levels
    (``None``: at the root) and returns the nodes left."""
    nodes = level_done(0, list(fields))
    level = 0
    while len(nodes) > 1 and (levels is None or level < levels):
        level += 1
        pairs = [_max(m, nodes[i], nodes[i + 1], f"{name}_l{level}_{i // 2}") for i in range(0, len(nodes) - 1, 2)]
        nodes = level_done(level, pairs + nodes[len(nodes) & ~1:])
    return nodes


def _lane_fields(m, values, name, raw=False):
    fields = []
    for lane, value in enumerate(values):
        field = Signal(8, name=f"{name}_lane_{lane}")
        m.d.comb += field.eq(exponent_field(value) if raw else biased_exponent(value))
        fields.append(field)
    return fields


def max_exponent(m, values, name="exponent_max"):
    """Combinational maximum of the bf16 exponents of ``values``, as a balanced tree of comparisons.

    Parameters
    ----------
    m : Module
        Module to add the comparison tree to (one named wire per node, which keeps the simulator from evaluating
        shared subexpressions more than once).
    values : iterable of Value
        Packed bf16 values.
    name : str
        Prefix of the tree's wires.

    Returns
    -------
    Signal of shape :data:`EXPONENT_SHAPE`
    """
    return max_of_partials(m, partial_maxima(m, values, 0, name), name)


def partial_maxima(m, values, levels, name="exponent_max", raw=False):
    """The first ``levels`` levels of :func:`max_exponent`'s tree: the maxima of groups of ``2 ** levels`` values,
    as biased 8-bit exponent fields, for a user to register before :func:`max_of_partials` finishes the tree.

    With ``raw``, the tree compares :func:`exponent_field` (0 for zeros and subnormals) rather than
    :func:`biased_exponent`: :func:`max_of_partials` then gives -127 for a beat of zeros and subnormals, which is
    right only for a user that takes the maximum of it and something at least -126.

    Returns
    -------
    list of Signal(8)
    """
    values = list(values)
    if not values:
        raise ValueError("max_exponent needs at least one value")
    return _reduce(m, _lane_fields(m, values, name, raw), name, levels=levels)


def max_of_partials(m, nodes, name="exponent_max"):
    """The rest of :func:`max_exponent`'s tree over the fields :func:`partial_maxima` returned.

    Returns
    -------
    Signal of shape :data:`EXPONENT_SHAPE`
    """
    exponent = Signal(EXPONENT_SHAPE, name=name)
    root, = _reduce(m, nodes, f"{name}_rest")
    m.d.comb += exponent.eq(root - BF16_BIAS)
    return exponent


def _check_lanes(unit, lanes):
    if not isinstance(lanes, int) or isinstance(lanes, bool):
        raise TypeError(f"{unit} lanes must be an integer, not {lanes!r}")
    if not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"{unit} lanes must be from 1 to {MAX_LANES}, not {lanes}")


def _check_stages(unit, stages, most):
    if not isinstance(stages, int) or isinstance(stages, bool):
        raise TypeError(f"{unit} stages must be an integer, not {stages!r}")
    if not 0 <= stages <= most:
        raise ValueError(f"{unit} stages must be from 0 to {most}, not {stages}")


class ExponentMax(wiring.Component):
    """Running maximum of bf16 exponents over the beats of a chunk: the chunk's shared exponent ``E``.

    The engine shows this unit every beat it writes into an operand buffer (``lanes`` bf16 values; padding lanes
    should be zeros, which never raise the maximum) and marks the chunk's final beat with ``last``. ``latency``
    cycles after that beat, ``done`` is high for one cycle and ``exponent`` holds the chunk's ``E`` until the next
    ``done``; the next chunk may start on the very next beat. A chunk starts after reset and after every ``last``
    beat: the running maximum restarts from -126, the exponent of zero, so an all-zero chunk has ``E = -126``, as
    in :func:`edge_qlora.golden.gemm.align`.

    The lane maximum is a tree of ``ceil(log2(lanes))`` levels of 8-bit comparisons of exponent fields, one carry
    chain and one multiplexer each; the running maximum is one more. ``stages`` registers are spread evenly over
    the tree (the last one after it), each delaying ``done`` by one cycle; the default, one register every two
    levels, meets the ECP5 clock target for 16 lanes. All registers are in ``sync``, so
    ``EnableInserter`` stalls the unit as a whole (the simplest use, though, is to hold ``valid`` low).

    Parameters
    ----------
    lanes : int
        Values per beat, 1 to 64.
    stages : int or None
        Registers in the lane maximum, 0 to ``ceil(log2(lanes)) + 1``; ``None``: ``ceil(levels / 2)``.

    Attributes
    ----------
    values : In(ArrayLayout(BF16.width, lanes))
        Packed bf16 values of one beat; ignored unless ``valid``.
    valid : In(1)
        The beat belongs to the current chunk.
    last : In(1)
        With ``valid``: the beat is the chunk's final one.
    exponent : Out(signed(9))
        The shared exponent of the last finished chunk.
    done : Out(1)
        High for one cycle when ``exponent`` takes a new chunk's value.
    latency : int
        ``stages + 1``: cycles from the ``last`` beat to ``done``.
    """

    def __init__(self, lanes, stages=None):
        _check_lanes("ExponentMax", lanes)
        levels = (lanes - 1).bit_length()
        if stages is None:
            stages = -(-levels // 2)
        _check_stages("ExponentMax", stages, levels + 1)
        self.lanes, self.stages = lanes, stages
        # a register after level ceil(levels * (s + 1) / stages) for each s: evenly spread, the last after the tree
        self._registered_levels = [-(-levels * (s + 1) // stages) for s in range(stages)]
        self.latency = stages + 1
        super().__init__({
            "values": In(data.ArrayLayout(BF16.width, lanes)),
            "valid": In(1),
            "last": In(1),
            "exponent": Out(EXPONENT_SHAPE, init=EXP_MIN),
            "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        # ``valid`` and ``last`` travel beside the tree's registers
        flags = {"valid": self.valid, "last": self.last}
        stage = 0

        def level_done(level, nodes):
            nonlocal stage
            for _ in range(self._registered_levels.count(level)):
                registers = [Signal(8, name=f"max_s{stage}_{i}", reset_less=True) for i in range(len(nodes))]
                m.d.sync += [r.eq(n) for r, n in zip(registers, nodes)]
                for key, value in flags.items():
                    flags[key] = Signal(name=f"{key}_s{stage}")
                    m.d.sync += flags[key].eq(value)
                nodes = registers
                stage += 1
            return nodes

        # raw exponent fields: the running maximum starts at 1, which lifts a beat of zeros as biased_exponent would
        beat_max, = _reduce(m, _lane_fields(m, [self.values[lane] for lane in range(self.lanes)], "lane_exponent",
                                            raw=True), "exponent_max", level_done)

        # biased, like the tree: 1 is the field of zeros and subnormals
        running = Signal(8, init=1)
        chunk_max = Signal(8)
        m.d.comb += chunk_max.eq(Mux(beat_max > running, beat_max, running))
        m.d.sync += self.done.eq(flags["valid"] & flags["last"])
        with m.If(flags["valid"]):
            m.d.sync += running.eq(Mux(flags["last"], 1, chunk_max))
            with m.If(flags["last"]):
                m.d.sync += self.exponent.eq(chunk_max - BF16_BIAS)
        return m


class AlignLanes(wiring.Component):
    """Align ``lanes`` bf16 values to a chunk's shared exponent: ``q = rne(v * 2 ** (16 - shared))``.

    Per lane: the distance ``d = shared - e`` shifts the 8-bit significand, with 9 bits below the unit place to
    keep the guard bit and the sticky bits exactly; a distance of 32 or more clears it (from 18 on everything
    aligns to zero anyway, so only the low 5 bits of ``d`` need a shifter). The rounding increment and the
    negation of a negative value then share one adder (``-(x + r) = ~x + (1 - r)``). Bit-exact with
    :func:`edge_qlora.golden.gemm.align` when ``shared`` is the chunk's largest exponent; any ``shared`` not below
    the lane exponents is allowed, a smaller one gives unspecified results.

    Cuts, in priority order (``stages=n`` registers the first ``n``):

    1. ``output``: the aligned operands.
    2. ``shift``: after the alignment shift, before rounding.
    3. ``distance``: after the distance adder (its low bits and the clear flag), before the shifter.

    The first two are needed for the ECP5 clock target: the distance subtraction, the shifter, and the rounding adder
    do not fit one cycle together; the third keeps the adder and the shifter apart where the placer spreads them.
    Fixed latency, registers only in ``sync`` and no enable of their own: wrap the unit in ``EnableInserter(advance)``
    to stall it with the rest of a pipeline (see :mod:`edge_qlora.rtl.pipeline`).

    Parameters
    ----------
    lanes : int
        Values per cycle, 1 to 64.
    stages : int
        Pipeline register stages, 0 to 3.

    Attributes
    ----------
    values : In(ArrayLayout(BF16.width, lanes))
        Packed bf16 values.
    shared : In(signed(9))
        The chunk exponent ``E``, at least every lane's :func:`bf16_exponent`.
    q : Out(ArrayLayout(signed(18), lanes))
        Aligned operands of the values presented ``latency`` cycles earlier.
    latency : int
        Equal to ``stages``.
    """

    CUTS = ("output", "shift", "distance")

    def __init__(self, lanes, stages=2):
        _check_lanes("AlignLanes", lanes)
        _check_stages("AlignLanes", stages, len(self.CUTS))
        self.lanes = lanes
        self._registered = frozenset(self.CUTS[:stages])
        self.latency = stages
        super().__init__({
            "values": In(data.ArrayLayout(BF16.width, lanes)),
            "shared": In(EXPONENT_SHAPE),
            "q": Out(data.ArrayLayout(signed(OPERAND_BITS), lanes)),
        })

    def _cut(self, m, cut, name, value):
        value = Value.cast(value)
        wire = Signal(value.shape(), name=f"{name}_{cut}", reset_less=True)
        if cut in self._registered:
            m.d.sync += wire.eq(value)
        else:
            m.d.comb += wire.eq(value)
        return wire

    def elaborate(self, platform):
        m = Module()
        fraction_bits = _ZERO_DISTANCE - _UNIT_SHIFT    # kept below the unit place: guard and sticky, exactly
        shift_bits = (_ZERO_DISTANCE - 1).bit_length()
        # one adder per lane: with the 8-bit biased field x, ~x = 255 - x, so d = shared - (x - 127) is the sum
        # ``shared + ~x`` less 128. As 128 is a multiple of 32, d's low 5 bits, which drive the shifter, are the
        # sum's, and d >= 32 exactly when the sum's bits from 5 up are 5 or more: gates (at_least), not a second
        # carry chain
        far_from = (32 + 128) >> shift_bits
        for lane in range(self.lanes):
            value = Value.cast(self.values[lane])
            field = value[_BF16_FRAC:15]
            significand = Cat(value[:_BF16_FRAC], field != 0)
            total = Signal(signed(11), name=f"distance_{lane}")
            m.d.comb += total.eq(self.shared + ~biased_exponent(value))
            far = self._cut(m, "distance", f"clear_{lane}", at_least(total[shift_bits:], far_from))
            distance = self._cut(m, "distance", f"shift_by_{lane}", total[:shift_bits])
            significand = self._cut(m, "distance", f"significand_{lane}", significand)
            sign = self._cut(m, "distance", f"sign_{lane}", value[15])
            # ``significand * 2 ** (_UNIT_SHIFT - d)`` with ``fraction_bits`` bits below the unit place: exact
            source = Cat(C(0, fraction_bits + _UNIT_SHIFT), significand)
            aligned = Mux(far, 0, source >> distance)
            aligned = self._cut(m, "shift", f"aligned_{lane}", aligned[:len(source)])
            sign = self._cut(m, "shift", f"sign_{lane}", sign)

            integer = aligned[fraction_bits:]
            guard = aligned[fraction_bits - 1]
            sticky = aligned[:fraction_bits - 1].any()
            round_up = guard & (sticky | integer[0])
            q = (Cat(integer, C(0, OPERAND_BITS - len(integer))) ^ sign.replicate(OPERAND_BITS)) + (round_up ^ sign)
            q = self._cut(m, "output", f"q_{lane}", q[:OPERAND_BITS].as_signed())
            m.d.comb += self.q[lane].eq(q)
        return m
