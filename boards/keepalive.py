"""A board top-level that keeps every gate of a component alive through synthesis.

A component built on its own has no pins: synthesis would delete it. :class:`KeepAlive` drives all
of its inputs from a free-running LFSR and folds all of its outputs into a few LEDs, with registers
on both sides, so that the bitstream contains the whole design and every timing path of the design
starts and ends at a flip-flop.
"""

from amaranth import Cat, Elaboratable, Module, Signal, Value
from amaranth.lib import io, wiring
from amaranth.lib.wiring import In


__all__ = ["KeepAlive", "split_ports"]


# x^64 + x^63 + x^61 + x^60 + 1 is primitive (Xilinx XAPP052): period 2**64 - 1.
_LFSR_TAPS = (63, 62, 60, 59)
_LFSR_CORE = 64
# A LUT4 XORs four bits, so a tree of fan-in four has one LUT level between registers.
_FOLD_FAN_IN = 4


def split_ports(component):
    """Flatten a component's signature into the bits it reads and the bits it writes.

    Parameters
    ----------
    component : wiring.Component
        Any component; members may be nested signatures (streams, arrays of them) of any shape.

    Returns
    -------
    tuple of (list, list)
        ``(inputs, outputs)``: ``(path, value)`` pairs in signature order, where ``value`` is the
        member cast to a plain :class:`Value`. The ``ready`` of an output stream is an input.
    """
    inputs, outputs = [], []
    for path, member, value in component.signature.flatten(component):
        value = Value.cast(value)
        if len(value) == 0:
            continue
        (inputs if member.flow == In else outputs).append((path, value))
    return inputs, outputs


class KeepAlive(Elaboratable):
    """Board wrapper that exercises any :class:`wiring.Component` from an LFSR.

    Every input port bit (payloads, ``valid``, the ``ready`` of output streams, configuration
    ports) is driven by a register loaded from its own stage of a free-running shift-register LFSR:
    the first 64 stages form a maximal-length LFSR, the rest extend it as a delay line, so every bit
    carries a different phase of the sequence, and none is constant. Every output port bit is
    captured in a register, then enters a pipelined XOR tree, one LUT level per register stage, that
    folds them down to ``digest_width`` bits; on a platform these drive the board LEDs. The
    registers on the design's ports load nothing but the design (inputs) and are loaded by nothing
    but it (outputs), so the placer puts them beside it: the harness lengthens no path of the design.

    Synthesis cannot prove any output irrelevant, so nothing is removed; the only logic outside the
    design is one LUT of LFSR feedback and one LUT per fold register, none of it on a path longer
    than one LUT. Two output bits that are the very same net and land in the same group of four
    cancel; components do not normally export one net twice.

    The wrapper's own registers are reset-less (the LFSR starts from a non-zero initial value), so
    they add no load to the ``sync`` reset.

    Parameters
    ----------
    design : wiring.Component
        The component to keep alive; it runs in the ``sync`` domain of the platform.
    digest_width : int, optional
        Number of folded output bits. By default, the number of ``led`` resources of the platform
        (1 without a platform).
    seed : int
        Non-zero initial value of the 64-bit LFSR core.

    Attributes
    ----------
    design : wiring.Component
    inputs : list of (tuple, Value)
        Input port bits driven by the LFSR, as :func:`split_ports` returns them.
    outputs : list of (tuple, Value)
        Output port bits folded into the digest.
    digest : Signal
        Created by :meth:`elaborate`: the folded outputs, ``digest_width`` bits wide.
    latency : int
        Created by :meth:`elaborate`: register stages from the outputs to the digest.
    """

    def __init__(self, design, *, digest_width=None, seed=1):
        try:
            self.inputs, self.outputs = self._check(design, digest_width, seed)
        except (TypeError, ValueError):
            # Neither this wrapper nor the rejected design will be elaborated: the error says why,
            # Amaranth's "created but never used" warnings on both would only add noise.
            self._MustUse__silence = True
            if isinstance(design, Elaboratable):
                design._MustUse__silence = True
            raise
        self.design = design
        self._digest_width = digest_width
        self._seed = seed

    @staticmethod
    def _check(design, digest_width, seed):
        if not isinstance(design, wiring.Component):
            raise TypeError(f"design must be a wiring.Component, not {design!r}")
        if digest_width is not None and (not isinstance(digest_width, int) or digest_width < 1):
            raise ValueError(f"digest_width must be a positive integer, not {digest_width!r}")
        if not isinstance(seed, int) or not 0 < seed < 2 ** _LFSR_CORE:
            raise ValueError(f"seed must be an integer in [1, 2**{_LFSR_CORE}), not {seed!r}")
        inputs, outputs = split_ports(design)
        if not outputs:
            raise ValueError(f"{type(design).__qualname__} has no output ports: synthesis would "
                             f"remove all of it")
        return inputs, outputs

    @staticmethod
    def _led_count(platform):
        return sum(1 for (name, _number) in platform.resources if name == "led")

    def elaborate(self, platform):
        m = Module()
        m.submodules.design = self.design

        leds = self._led_count(platform) if platform is not None else None
        width = self._digest_width or leds or 1
        if leds is not None and width > leds:
            # an unconnected digest bit, and the logic feeding it, would be optimised away
            raise ValueError(f"digest_width {width} exceeds the {leds} LEDs of the platform")

        # Stimulus: one shift-register stage per input bit, the first 64 being the LFSR proper.
        input_bits = Cat(value for _path, value in self.inputs)
        lfsr = Signal(max(_LFSR_CORE, len(input_bits)), init=self._seed, reset_less=True)
        feedback = 0
        for tap in _LFSR_TAPS:
            feedback ^= lfsr[tap]
        m.d.sync += lfsr.eq(Cat(feedback, lfsr[:-1]))
        if len(input_bits):
            # through a register of its own per bit: the shift chain's registers sit in a line across the die,
            # a register with the design as its only load is placed by the design
            m.d.sync += input_bits.eq(lfsr[:len(input_bits)])

        # Response: every output bit captured in a register of its own (placed beside its source, whatever the
        # fold below groups it with), then XOR groups of four, registered, until the digest is narrow enough.
        captured = Cat(value for _path, value in self.outputs)
        level = Signal(len(captured), name="capture", reset_less=True)
        m.d.sync += level.eq(captured)
        stages = 1
        while len(level) > width:
            groups = [level[i:i + _FOLD_FAN_IN] for i in range(0, len(level), _FOLD_FAN_IN)]
            folded = Signal(len(groups), name=f"fold_{stages}", reset_less=True)
            m.d.sync += folded.eq(Cat(group.xor() for group in groups))
            level = folded
            stages += 1
        self.digest = Signal(width, reset_less=True)
        m.d.sync += self.digest.eq(level)
        self.latency = stages + 1

        if platform is not None:
            for index in range(width):
                led = io.Buffer("o", platform.request("led", index, dir="-"))
                m.submodules[f"led_{index}"] = led
                m.d.comb += led.o.eq(self.digest[index])
        return m
