"""Valid/ready around fixed-latency datapaths.

The arithmetic units of :mod:`.fp` are fixed-latency pipelines without flow control. A stream unit wraps them in
one *stall domain*: every register of the datapath, and the valid/tag bits that travel beside it, advance together
when ``advance`` is high (``EnableInserter(advance)`` on the arithmetic submodules). ``advance`` is high whenever
the last stage is empty or being drained, so nothing is dropped and the datapath never holds a bubble it could
have filled.
"""

from amaranth.hdl import ClockSignal, Const, EnableInserter, Instance, Module, Mux, ResetSignal, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["StallPipeline", "SkidBuffer", "delay_line", "global_fanout", "is_ecp5", "private_register"]


class StallPipeline:
    """Valid bits and tags shifted beside a fixed-latency datapath, all enabled by one ``advance`` signal.

    Parameters
    ----------
    m : Module
        Module to add the registers and logic to.
    latency : int
        Cycles from the datapath's inputs to its outputs (0 is allowed: everything is combinational).
    out_ready : Value
        The consumer can take the pipeline's output this cycle.
    tag_shape : shape-castable, optional
        Side information travelling with each item (a block index, a round number).
    name : str
    platform : Platform or None
        Where given, the registers' enable (:attr:`enable`) goes through :func:`global_fanout`.

    Attributes
    ----------
    advance : Signal
        High when the datapath moves one step; the caller gates its own registers and wraps its arithmetic
        submodules with :meth:`stall`.
    enable : Value
        ``advance`` for the datapath's registers: the same signal, through a global buffer where the platform has
        one (wide datapaths have thousands of enables). Logic that decides something uses ``advance``.
    in_valid, in_tag : Signal
        Driven by the caller: an item enters the pipeline when ``in_valid & advance``.
    out_valid, out_tag : Value
        The item leaving the pipeline; it is taken when ``out_valid & out_ready``.
    """

    def __init__(self, m, latency, out_ready, *, tag_shape=1, name="pipe", platform=None):
        self._m = m
        self.advance = Signal(name=f"{name}_advance")
        self.enable = global_fanout(m, platform, self.advance, f"{name}_enable")
        self.in_valid = Signal(name=f"{name}_in_valid")
        self.in_tag = Signal(tag_shape, name=f"{name}_in_tag")
        valid, tag = self.in_valid, self.in_tag
        for stage in range(latency):
            next_valid = Signal(name=f"{name}_valid_{stage}")
            next_tag = Signal(tag_shape, name=f"{name}_tag_{stage}")
            with m.If(self.enable):
                m.d.sync += [next_valid.eq(valid), next_tag.eq(tag)]
            valid, tag = next_valid, next_tag
        self.out_valid, self.out_tag = valid, tag
        m.d.comb += self.advance.eq(~self.out_valid | out_ready) if latency else self.advance.eq(out_ready)

    def stall(self, elaboratable):
        """Wrap an arithmetic pipeline so it advances with this pipeline (and drive its ``dsp_enable``, if it has
        one: hard DSP registers, which ``EnableInserter`` does not reach)."""
        if hasattr(elaboratable, "dsp_enable"):
            self._m.d.comb += elaboratable.dsp_enable.eq(self.enable)
        return EnableInserter(self.enable)(elaboratable)


class SkidBuffer(wiring.Component):
    """A register slice on a stream: one cycle of latency, full throughput, and ``i.ready`` driven by a register.

    The consumer's ``o.ready`` only enables the output register; it never reaches ``i.ready`` in the same cycle,
    which cuts a long ready path (a hazard check deciding whether a wide pipeline advances) in two.

    Parameters
    ----------
    shape : shape-castable
        Payload of the stream.

    Attributes
    ----------
    i : In(stream.Signature(shape))
        Items in.
    o : Out(stream.Signature(shape))
        The same items, in order, one cycle later at the earliest.
    spare, spare_valid : Signal
        The item accepted while the output was held, if any (registers). ``o`` takes ``spare`` next when
        ``spare_valid``, else ``i.payload``: a consumer that works out a decision about the next item a cycle
        ahead can decide for both and pick late. Driven by the buffer.
    """

    def __init__(self, shape):
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})
        self.spare = Signal(shape)
        self.spare_valid = Signal()

    def elaborate(self, platform):
        m = Module()
        spare, spare_valid = self.spare, self.spare_valid
        m.d.comb += self.i.ready.eq(~spare_valid)
        with m.If(~self.o.valid | self.o.ready):
            m.d.sync += [self.o.payload.eq(Mux(spare_valid, spare, self.i.payload)),
                         self.o.valid.eq(spare_valid | self.i.valid), spare_valid.eq(0)]
        with m.Elif(self.i.valid & ~spare_valid):
            m.d.sync += spare_valid.eq(1)
        # the spare register follows the input while it is empty: its (wide) enable is one register, not the
        # handshake above; what it holds counts only once `spare_valid` is set
        with m.If(~spare_valid):
            m.d.sync += spare.eq(self.i.payload)
        return m


def delay_line(m, enable, value, cycles, name, *, ring_from=None):
    """``value`` delayed by ``cycles`` cycles in which ``enable`` is high (the advances of a stall domain).

    A chain of registers named ``{name}_{stage}``; from ``ring_from`` cycles on (``None``: never), a block-RAM ring
    instead, which spends one RAM where a long wide delay would spend hundreds of flip-flops. Returns the delayed
    value (``value`` itself for 0 cycles).
    """
    value = Value.cast(value)
    if ring_from is None or cycles < ring_from:
        for stage in range(cycles):
            delayed = Signal(len(value), name=f"{name}_{stage}")
            with m.If(enable):
                m.d.sync += delayed.eq(value)
            value = delayed
        return value
    # A ring of ``cycles - 1`` words read one place ahead of the write: each word is read just before it is
    # overwritten, ``cycles - 2`` advances after it was written, and the read port's register and one more (block
    # RAM clock-to-out is slow on ECP5) make up the rest. Read and write never share an address, so the RAM needs
    # no read-during-write behaviour.
    depth = cycles - 1
    m.submodules[name] = ring = Memory(shape=len(value), depth=depth, init=[])
    write, read = ring.write_port(), ring.read_port(domain="sync", transparent_for=())
    write_addr = Signal(range(depth), name=f"{name}_write_addr")
    read_addr = Signal(range(depth), init=1, name=f"{name}_read_addr")
    delayed = Signal(len(value), name=f"{name}_out")
    with m.If(enable):
        m.d.sync += [
            write_addr.eq(Mux(write_addr == depth - 1, 0, write_addr + 1)),
            read_addr.eq(Mux(read_addr == depth - 1, 0, read_addr + 1)),
            delayed.eq(read.data),
        ]
    m.d.comb += [
        write.addr.eq(write_addr), write.data.eq(value), write.en.eq(enable),
        read.addr.eq(read_addr), read.en.eq(enable),
    ]
    return delayed


def is_ecp5(platform):
    """Whether ``platform`` (a Platform or ``None``, as passed to ``elaborate``) is a Lattice ECP5 device."""
    return getattr(platform, "family", None) == "ecp5"


def global_fanout(m, platform, signal, name):
    """``signal``, through a global buffer where the platform has one for logic (ECP5: ``DCCA``).

    A stall domain's enable reaches every register of its datapath: 17k clock enables for an 8x8 PE array. Fabric
    routing cannot fan a net out that far in one cycle (and congests the device trying); the clock network can.
    In simulation and on other families the signal is returned unchanged.

    Parameters
    ----------
    m : Module
    platform : Platform or None
        The platform being elaborated for.
    signal : Value
        One bit.
    name : str
        Name of the buffered copy.
    """
    if not is_ecp5(platform):
        return signal
    buffered = Signal(name=name)
    m.submodules[f"{name}_buffer"] = Instance("DCCA", i_CLKI=signal, i_CE=Const(1), o_CLKO=buffered)
    return buffered


def private_register(m, platform, q, d, enable, name):
    """``q`` takes ``d`` on every ``sync`` cycle with ``enable`` set, in a register synthesis keeps of its own.

    Yosys merges registers with the same input and enable into one (``opt_merge``), so copies made to keep a
    widely used value local to each of its users (a select per column, a flag per PE) fold back into one net that
    spans them all. On ECP5 each bit is a ``TRELLIS_FF`` instance, which it leaves alone; in simulation and on
    other families it is an ordinary register. Either way ``q`` resets to its ``init`` with the domain, whatever
    ``enable`` is, unless it is ``reset_less``.

    Parameters
    ----------
    m : Module
    platform : Platform or None
        The platform being elaborated for.
    q : Signal
        The register.
    d : Value
        Its next value (``len(q)`` bits are taken).
    enable : Value
        One bit: the register loads on cycles where it is set.
    name : str
        Prefix of the instances' names.
    """
    if not is_ecp5(platform):
        with m.If(enable):
            m.d.sync += q.eq(d)
        return
    d = Value.cast(d)
    reset = Const(0) if q.reset_less else ResetSignal("sync")
    for k in range(len(q)):
        m.submodules[f"{name}_{k}"] = Instance(
            "TRELLIS_FF", p_GSR="DISABLED", p_CEMUX="CE", p_CLKMUX="CLK", p_LSRMUX="LSR",
            p_REGSET="SET" if (q.init >> k) & 1 else "RESET", p_SRMODE="LSR_OVER_CE",
            i_CLK=ClockSignal("sync"), i_LSR=reset, i_CE=enable, i_DI=d[k], o_Q=q[k])
