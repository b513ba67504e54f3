"""NF4 quantizer IP core, bit-exact with bitsandbytes' ``quantize_4bit`` (twin: ``golden/nf4_quant.py``), and its
2- and 3-bit siblings with NormalFloat or loaded code books (twin: ``golden/codebook.py``).

A weight's code depends on the absmax of its whole block, which is known only after the block's last weight, so the
core is *block-buffered*: every beat is stored in a block buffer while the running absmax of its block is found,
and read back once the block's scale is known. The scale of a full block is ``r = fl(1 / max(absmax, 1e-38))`` and
every lane multiplies, ``fl(w * r)``; the final partial block of a tensor (the *tail*) divides instead,
``fl(w / am)``, one weight per cycle through the same divider that computes the reciprocals. A code is the number
of the code book's decision bounds strictly below the scaled weight. For a NormalFloat table (NF2, NF3, NF4) the
bounds are constants, found from the exponents and at most three fraction comparisons; for a loaded table they are
data, compared as order-preserving integer keys (see :class:`NF4Quantizer`).

Datapath; the queues between the boxes are FIFOs::

    weights -> [ingest: |w| max trees, running absmax] -> block records -> [divider: 1/am, am/1, tail w/am]
       |                                                                    |                 |
       +--> block buffer (Memory) -> [coder: FPMul x lanes, bounds] <-- scales          tail codes
                                                 |                                          |
                                                 +--> coded beats --> join <----------------+--> codes

The divider takes three kinds of operation, in order: ``1 / max(am, 1e-38)`` for a full block, ``am / 1`` for a
tail block (which passes the clamped absmax through in block order, as the divisor of the tail), and ``w / am``
for each weight of a tail. The coded beats wait for their tail codes in a queue as long as the divider's latency,
so that a tail flows at one weight per cycle.

Work enters the divider and the coder only with a slot reserved for its result in the queue it goes to (credits),
so neither ever waits: both run freely, with no enable on their registers (a large fan-out saved), and results
always drain, so the core cannot deadlock. Only the ingest stalls, when the buffer or the record queue is full
(or, with loaded tables, when every table slot holds a tensor in flight).
"""

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import ABSMAX_FLOOR, BLOCKSIZES, CODE_BITS, MAX_LANES, NF4_BOUNDS, NF_CODES
from .fp import FORMATS, FP32, FPConvert, FPDiv, FPMul, float_layout, fp_abs_key, fp_is_nan, fp_order_key
from .nf4_dequant import codes_layout
from .pipeline import StallPipeline, delay_line

__all__ = ["NF4QuantConfig", "NF4Quantizer", "weights_in_layout", "codes_out_layout", "table_in_layout",
           "nf_bounds", "nf_pad_code", "TABLES", "TABLE_SLOTS"]

_ONE = 0x3F800000
_NEG_ZERO = 0x80000000
_FLOOR = int(np.float32(ABSMAX_FLOOR).view(np.uint32))

#: Where the code book comes from: constants of the NormalFloat table of the code width, or data per tensor.
TABLES = ("nf", "loaded")

#: Loaded tables held at once (a power of two): the tensors between the ingest and the codes output.
TABLE_SLOTS = 4


def nf_bounds(bits):
    """The ``2**bits - 1`` decision bounds of the NormalFloat table of ``bits`` bits: float32 midpoints of
    neighbouring levels (NF4's are :data:`~edge_qlora.constants.NF4_BOUNDS`)."""
    if bits == 4:
        return NF4_BOUNDS
    levels = NF_CODES[bits]
    return ((levels[:-1] + levels[1:]) / np.float32(2)).astype(np.float32)


def nf_pad_code(bits):
    """The code of 0.0 in the NormalFloat table of ``bits`` bits (NF2: 1, NF3: 3, NF4: 7): the pad of lanes past
    a tensor's end, and the code bitsandbytes packs into the nibble past the end of an odd-sized NF4 tensor."""
    return int(np.flatnonzero(NF_CODES[bits] == 0)[0])


@dataclass(frozen=True)
class NF4QuantConfig:
    """Elaboration parameters of :class:`NF4Quantizer`.

    Parameters
    ----------
    lanes : int
        Weights per cycle, 1 to 16.
    blocksize : int
        NF4 block size: 32, 64, ..., 4096.
    in_dtype : str
        Format of the incoming weights: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    bits : int
        Code width: 2, 3 or 4 (a code book of 4, 8 or 16 levels).
    table : str
        ``"nf"``: the NormalFloat table of ``bits`` bits, built into the hardware as constants (``bits=4`` is
        bitsandbytes' NF4, the core this unit always was). ``"loaded"``: any table of ``2**bits`` levels, given per
        tensor as its ``2**bits - 1`` decision bounds on the ``table`` stream.
    """

    lanes: int = 8
    blocksize: int = 64
    in_dtype: str = "bf16"
    bits: int = 4
    table: str = "nf"

    def __post_init__(self):
        if not isinstance(self.lanes, int) or isinstance(self.lanes, bool) or not 1 <= self.lanes <= MAX_LANES:
            raise ValueError(f"lanes must be an integer from 1 to {MAX_LANES}, not {self.lanes!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {self.blocksize!r}")
        if self.in_dtype not in FORMATS:
            raise ValueError(f"in_dtype must be one of {sorted(FORMATS)}, not {self.in_dtype!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in CODE_BITS:
            raise ValueError(f"bits must be one of {CODE_BITS}, not {self.bits!r}")
        if self.table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, not {self.table!r}")

    @property
    def in_format(self):
        return FORMATS[self.in_dtype]

    @property
    def pad_code(self):
        """The code of lanes past a tensor's end with the NormalFloat table (a loaded table brings its own)."""
        return nf_pad_code(self.bits)

    @property
    def tree_levels(self):
        """Register stages of the per-beat absmax tree: one per halving of ``lanes``."""
        return (self.lanes - 1).bit_length()

    def scale_queue_depth(self, divider_latency):
        """Reciprocals in flight or waiting for the coder: enough for the divider's latency at the block rate."""
        cycles_per_block = max(1, self.blocksize // self.lanes)
        return -(-(divider_latency + 8) // cycles_per_block) + 4

    def buffer_depth(self, divider_latency):
        """Beats in the block buffer: a whole block, plus one beat it may share with the next, plus the cycles from
        a block's last beat to its scale reaching the coder (ingest, record queue, divider, scale queue)."""
        beats_per_block = -(-self.blocksize // self.lanes) + 1
        return beats_per_block + self.tree_levels + divider_latency + 16


def weights_in_layout(fmt, lanes):
    """Payload of the ``weights`` stream: ``lanes`` packed values of ``fmt`` in weight order (element 0 first)."""
    return data.ArrayLayout(fmt.width, lanes)


def codes_out_layout(lanes, bits=4):
    """Payload of the ``codes`` stream: ``lanes`` codes of ``bits`` bits in weight order and ``last`` on a tensor's
    final beat. Lanes past the end of the tensor carry the pad code: the code of 0.0 for a NormalFloat table (7 for
    NF4, the pad nibble of bitsandbytes), the table's own ``pad_code`` for a loaded one."""
    return data.StructLayout({"data": codes_layout(lanes, bits), "last": 1})


def table_in_layout(bits):
    """Payload of the ``table`` stream (loaded tables): one beat per tensor.

    ``bounds`` are the ``2**bits - 1`` float32 decision bounds of the code book in increasing order (the midpoints
    of neighbouring levels, :attr:`~edge_qlora.golden.codebook.Codebook.bounds`); ``pad_code`` is the code that
    lanes past the tensor's end carry (:attr:`~edge_qlora.golden.codebook.Codebook.pad_code`: the code of the level
    0.0 where the table has one, else 0).
    """
    return data.StructLayout({"bounds": data.ArrayLayout(32, 2 ** bits - 1), "pad_code": bits})


def _keys_layout(bits):
    return data.ArrayLayout(32, 2 ** bits - 1)


class _NFEncode(wiring.Component):
    """Code of an fp32 value in the NormalFloat table of ``bits`` bits: the number of its bounds strictly below the
    value (a tie takes the lower code).

    Comparing with each of the 15 bounds of NF4 would take 15 full-width comparators per lane. Instead, a bound
    whose exponent differs from the value's is decided by the 8-bit exponents alone, and only bounds with the
    value's exponent and sign compare fractions; there are at most three of those, so three 23-bit comparators
    serve all exponents, their constants looked up by sign and exponent. A positive value counts the negative
    bounds plus the positive bounds below it; a negative value ``-m`` counts the negative bounds ``-n`` with
    ``n > m`` (a bound ``-n`` with a zero fraction is never above a value of its exponent, so it needs no
    comparator: NF2's -0.5).

    A NaN gets the top code, where ``numpy.searchsorted`` (the golden model) sorts it; finite weights never make
    one. The comparisons are registered before they are summed (no enable: the unit's users never stall).

    Parameters
    ----------
    bits : int
        2, 3 or 4.

    Attributes
    ----------
    scaled : In(32)
        float32 bits of a scaled weight.
    code : Out(bits)
        The code of the value presented :attr:`LATENCY` cycles earlier.
    """

    LATENCY = 1

    def __init__(self, bits=4):
        self.bits = bits
        bounds = nf_bounds(bits).view(np.uint32).astype(np.int64)
        self._sign, self._exp, self._frac = bounds >> 31, (bounds >> 23) & 0xFF, bounds & 0x7FFFFF
        # the exponent trick needs normal bounds within 8 binades
        assert (self._exp > 0).all() and self._exp.max() - self._exp.min() < 8
        super().__init__({"scaled": In(32), "code": Out(bits)})

    def elaborate(self, platform):
        m = Module()
        bits = self.bits
        value = float_layout(FP32)(self.scaled)
        negative, exponent, fraction = value.sign, value.exponent, value.fraction

        # bounds on the far side of the value by exponent
        count = Signal(bits)
        by_exponent = Mux(negative,
                          sum(exponent < int(e) for s, e in zip(self._sign, self._exp) if s),
                          int(self._sign.sum()) + sum(exponent > int(e) for s, e in zip(self._sign, self._exp)
                                                      if not s))
        m.d.comb += count.eq(by_exponent)

        # bounds with the value's sign and exponent, compared by fraction: a positive value is above a fraction
        # ``f`` when its own is ``> f``, a negative one below ``-n`` when its fraction is ``< f``, ``not > f - 1``
        lowest = int(self._exp.min())
        groups = {}
        for sign, exp, frac in zip(self._sign.tolist(), self._exp.tolist(), self._frac.tolist()):
            if sign and frac == 0:
                continue
            groups.setdefault(sign << 3 | (exp - lowest), []).append(frac - 1 if sign else frac)
        group = Signal(4)
        m.d.comb += group.eq(Cat((exponent - lowest)[:3], negative))
        in_range = (exponent >= lowest) & (exponent < lowest + 8)
        hits = []
        for slot in range(max(map(len, groups.values()))):
            fractions = [groups[g][slot] if slot < len(groups.get(g, ())) else 0 for g in range(16)]
            present = [int(slot < len(groups.get(g, ()))) for g in range(16)]
            threshold, used = Signal(23, name=f"threshold_{slot}"), Signal(name=f"used_{slot}")
            m.d.comb += [
                threshold.eq(Array(Const(f, 23) for f in fractions)[group]),
                used.eq(Array(Const(p, 1) for p in present)[group] & in_range),
            ]
            hits.append(used & ((fraction > threshold) ^ negative))

        counted, found, nan = Signal(bits), Signal(len(hits)), Signal()
        m.d.sync += [counted.eq(count), found.eq(Cat(*hits)), nan.eq(fp_is_nan(self.scaled, FP32))]
        total = Signal(bits + 1)
        m.d.comb += [
            total.eq(counted + sum(found)),
            self.code.eq(Mux(nan, 2 ** bits - 1, total)),
        ]
        return m


class _LoadedEncode(wiring.Component):
    """Code of an fp32 value in a loaded table of ``bits`` bits: the number of its bounds strictly below the value.

    Every bound is compared with the value as order-preserving unsigned keys (:func:`~.fp.fp_order_key`: a positive
    float with its sign bit set, a negative one complemented), one 32-bit comparator per bound. The bounds arrive
    as keys with -0.0 already made +0.0 (:func:`_bound_key`); then no bound key lies between the keys of -0.0 and
    +0.0, so the value's zeros need no such step and both get the code of 0.0. A NaN gets the top code, as in the
    golden model's ``searchsorted``. The comparisons are registered before they are counted, as in
    :class:`_NFEncode`, with the same latency.

    Parameters
    ----------
    bits : int
        2, 3 or 4.

    Attributes
    ----------
    scaled : In(32)
        float32 bits of a scaled weight.
    keys : In(array of 2**bits - 1 unsigned(32))
        Keys of the table's bounds, held while the value is presented.
    code : Out(bits)
        The code of the value presented :attr:`LATENCY` cycles earlier.
    """

    LATENCY = 1

    def __init__(self, bits):
        self.bits = bits
        super().__init__({"scaled": In(32), "keys": In(_keys_layout(bits)), "code": Out(bits)})

    def elaborate(self, platform):
        m = Module()
        key = fp_order_key(self.scaled, FP32)
        above, nan = Signal(2 ** self.bits - 1), Signal()
        m.d.sync += [
            above.eq(Cat(key > bound for bound in self.keys)),
            nan.eq(fp_is_nan(self.scaled, FP32)),
        ]
        m.d.comb += self.code.eq(Mux(nan, 2 ** self.bits - 1, sum(above)))
        return m


def _bound_key(bound):
    """The comparison key of a float32 bound, -0.0 counted as +0.0."""
    return fp_order_key(Mux(bound == _NEG_ZERO, 0, bound), FP32)


def _encode(m, config, scaled, keys, name):
    """The code of ``scaled`` from an encoder of ``config``'s table added to ``m`` as ``name``; ``keys`` are the
    bound keys of a loaded table (``None`` for a NormalFloat one)."""
    if config.table == "nf":
        m.submodules[name] = encode = _NFEncode(config.bits)
    else:
        m.submodules[name] = encode = _LoadedEncode(config.bits)
        m.d.comb += encode.keys.eq(keys)
    m.d.comb += encode.scaled.eq(scaled)
    return encode.code


def _to_fp32(m, value, fmt, name):
    """``value`` of ``fmt`` widened to fp32 (exact), combinationally."""
    if fmt == FP32:
        return value
    convert = FPConvert(fmt, FP32, stages=0)
    m.submodules[name] = convert
    m.d.comb += convert.a.eq(value)
    return convert.result


def _max_tree(m, keys, advance, name):
    """Registered maximum of unsigned ``keys``: one register stage per halving, all enabled by ``advance``."""
    level = 0
    while len(keys) > 1:
        level += 1
        merged = []
        for i in range(0, len(keys), 2):
            node = Signal(len(keys[i]), name=f"{name}_{level}_{i // 2}")
            pair = keys[i:i + 2]
            with m.If(advance):
                m.d.sync += node.eq(pair[0] if len(pair) == 1 else Mux(pair[0] > pair[1], pair[0], pair[1]))
            merged.append(node)
        keys = merged
    return keys[0]


class _TailIssue:
    """One tail division, presented by the coder in a register; the divider takes it in the same cycle.

    Attributes
    ----------
    valid : Signal
        A division is presented.
    weight : Signal(fmt.width)
        The weight to divide, in the input format.
    divisor : Signal(32)
        The clamped absmax of its tail block, float32.
    lane : Signal(range(lanes))
        The weight's lane in its beat.
    beat_end : Signal
        It is the beat's last tail lane: its code completes the beat's tail codes.
    slot : Signal(range(TABLE_SLOTS))
        The table slot of its tensor (loaded tables only; unused otherwise).
    latency : int
        Cycles from the divider taking it to its result (its code is one more).
    """

    def __init__(self, fmt, lanes, latency):
        self.latency = latency
        self.valid = Signal(name="tail_valid")
        self.weight = Signal(fmt.width, name="tail_weight")
        self.divisor = Signal(32, name="tail_divisor")
        self.lane = Signal(range(lanes), name="tail_lane")
        self.beat_end = Signal(name="tail_beat_end")
        self.slot = Signal(range(TABLE_SLOTS), name="tail_slot")


class _TableSlots:
    """The loaded tables of the tensors in flight, in a ring of :data:`TABLE_SLOTS` slots.

    The coder lags the ingest by up to a few tensors and the tail's codes lag the coder, so a tensor's table must
    travel with it. The ingest writes each tensor's bound keys into the next slot of a small memory (read without a
    clock, so distributed RAM, never block RAM) and its pad code into a register; the coder and the tail encoder
    count their tensors in the same order and read the slot they are at; a slot is freed when its tensor's final
    code beat leaves the core, after every use. Each stage carries only a 2-bit slot number, never a table.

    Attributes
    ----------
    keys : Memory
        Bound keys (:func:`_bound_key`) per slot.
    pads : Array of Signal(bits)
        Pad code per slot.
    write : Memory write port
        Driven by the ingest.
    used : Signal(range(TABLE_SLOTS + 1))
        Slots holding a tensor in flight.
    taken, released : Signal
        A table enters a slot; a tensor's last code beat leaves (driven by the ingest and by the join).
    """

    def __init__(self, m, bits):
        m.submodules.table_keys = self.keys = Memory(shape=_keys_layout(bits), depth=TABLE_SLOTS, init=[])
        self.pads = Array(Signal(bits, name=f"pad_code_{slot}") for slot in range(TABLE_SLOTS))
        self.write = self.keys.write_port()
        self.used = Signal(range(TABLE_SLOTS + 1), name="table_slots_used")
        self.taken, self.released = Signal(name="table_taken"), Signal(name="table_released")
        m.d.sync += self.used.eq(self.used + self.taken - self.released)

    def read(self, m, slot):
        """The bound keys of ``slot``, in the same cycle."""
        port = self.keys.read_port(domain="comb")
        m.d.comb += port.addr.eq(slot)
        return port.data


class NF4Quantizer(wiring.Component):
    """Streaming NF4 quantizer (and NF2/NF3, or any loaded code book of 2, 3 or 4 bits): ``lanes`` weights per
    cycle, block-buffered.

    A tensor of ``n_weights`` weights arrives as ``ceil(n_weights / lanes)`` beats, the final one zero-padded; it
    leaves as the same number of beats of codes and ``ceil(n_weights / blocksize)`` absmax values. ``n_weights`` is
    sampled while a tensor's first beat is offered, so it must be valid from then until that beat is taken (a
    cycle later than it could be: the sampling register keeps wide arithmetic off the input path); tensors may
    follow each other back to back. After the
    pipeline fills, full blocks flow at ``lanes`` weights per cycle with no backpressure; a tail block takes one
    cycle per weight in the divider. NaN or infinite weights give unspecified codes (the software refuses them),
    but the core keeps running.

    With ``table="loaded"`` every tensor brings its code book as one beat of the ``table`` stream: the
    ``2**bits - 1`` float32 decision bounds and the pad code, computed by software from the levels
    (:class:`~edge_qlora.golden.codebook.Codebook`). Bounds rather than levels, because a quantizer only compares:
    levels would need ``2**bits - 1`` float adders and halvings in the hardware for what software computes once per
    tensor (and the golden model's bounds are exactly those float32 midpoints). The core takes a tensor's table
    before its first weights beat, at any time after the previous tensor's last weights beat (the two streams are
    independent: a producer may send the table first, then the weights). Tables ride with their tensors through
    :data:`TABLE_SLOTS` slots (:class:`_TableSlots`), so tensors with different tables follow each other back to
    back; only tensors too short to cover the core's latency wait, when every slot holds a tensor in flight. Each
    lane compares the scaled weight with every bound as order-preserving integer keys (-0.0 counted as +0.0),
    ``2**bits - 1`` 32-bit comparators per lane, with the same latency as the NormalFloat encoder.

    Parameters
    ----------
    config : NF4QuantConfig

    Attributes
    ----------
    weights : In(stream of :func:`weights_in_layout`)
        Weights, ``lanes`` per beat, in the configured input format.
    n_weights : In(32)
        Number of weights in the tensor, at least 1 (0 acts as 1).
    table : In(stream of :func:`table_in_layout`), loaded tables only
        One beat per tensor: its decision bounds and pad code.
    codes : Out(stream of :func:`codes_out_layout`)
        Codes of ``bits`` bits, one beat per weights beat.
    absmax : Out(stream of unsigned(32))
        float32 absmax bits, one per block in block order: ``max|w|`` for a full block, ``max(max|w|, 1e-38)`` for
        a tail block, as bitsandbytes stores them.
    """

    def __init__(self, config=NF4QuantConfig()):
        if not isinstance(config, NF4QuantConfig):
            raise TypeError(f"config must be an NF4QuantConfig, not {config!r}")
        self.config = config
        ports = {
            "weights": In(stream.Signature(weights_in_layout(config.in_format, config.lanes))),
            "n_weights": In(32),
        }
        if config.table == "loaded":
            ports["table"] = In(stream.Signature(table_in_layout(config.bits)))
        ports["codes"] = Out(stream.Signature(codes_out_layout(config.lanes, config.bits)))
        ports["absmax"] = Out(stream.Signature(32))
        super().__init__(ports)

    def elaborate(self, platform):
        cfg = self.config
        fmt, lanes = cfg.in_format, cfg.lanes
        m = Module()

        # One buffer entry per beat: the weights and where the beat's blocks begin and end, so that the coder,
        # which may lag a tensor behind, never reads ``n_weights``. The lane masks are decoded before the buffer,
        # so that little logic follows the block RAM's slow output.
        beat_layout = data.StructLayout({
            "weights": weights_in_layout(fmt, lanes),
            "first": lanes,          # lanes in lane 0's block; the others are in the next block or past the tensor
            "valid": lanes,          # lanes that hold weights of the tensor
            "straddles": 1,          # some lanes are in the block after lane 0's
            "first_ends": 1,         # lane 0's block ends in this beat
            "second_ends": 1,        # so does the next one (a tail of fewer than ``lanes`` weights)
            "last": 1,
        })
        record_layout = data.StructLayout({"absmax": fmt.width, "tail": 1})
        scale_layout = data.StructLayout({"value": 32, "tail": 1})

        divide = FPDiv(FP32)
        # the buffers are sized by the divider's latency: a block's scale is that much later than its last beat
        depth, scale_depth = cfg.buffer_depth(divide.latency), cfg.scale_queue_depth(divide.latency)
        m.submodules.buffer = buffer = Memory(shape=beat_layout, depth=depth, init=[])
        m.submodules.records = records = SyncFIFOBuffered(width=record_layout.size, depth=8)
        m.submodules.scales = scales = SyncFIFOBuffered(width=scale_layout.size, depth=scale_depth)
        m.submodules.tail_codes = tail_codes = SyncFIFOBuffered(width=cfg.bits * lanes, depth=divide.latency + 4)

        # the ingest writes the buffer and the coder reads it; they share its fill level
        space, written = Signal(name="buffer_space"), Signal(name="buffer_written")
        tail = _TailIssue(fmt, lanes, divide.latency)
        tables = _TableSlots(m, cfg.bits) if cfg.table == "loaded" else None
        self._elaborate_ingest(m, buffer, space, written, records, record_layout, tables)
        self._elaborate_divider(m, divide, records, record_layout, scales, tail, tail_codes, tables)
        self._elaborate_coder(m, buffer, space, written, scales, scale_layout, tail, tail_codes, tables)
        return m

    # -- ingest: buffer every beat, find each block's absmax ----------------------------------------------------------

    def _elaborate_ingest(self, m, buffer, space, written, records, record_layout, tables):
        cfg = self.config
        fmt, lanes, blocksize = cfg.in_format, cfg.lanes, cfg.blocksize
        write = buffer.write_port()
        write_index = Signal(range(buffer.depth))

        # Position of the beat in its tensor, kept so that the beat's masks need no wide arithmetic: whether a beat
        # is a tensor's last is decided a beat ahead, and ``n_weights`` is sampled into a register while a tensor's
        # first beat is offered, which takes that beat a cycle later.
        room = Signal(range(1, blocksize + 1), init=blocksize)  # weights of lane 0's block from lane 0 on
        remaining = Signal(32)                # weights left in the tensor from this beat on
        remaining_last = Signal()             # ``remaining <= lanes``
        fresh = Signal(init=1)                # the next beat is a tensor's first
        primed = Signal()                     # ``n_weights`` of the first beat on offer is sampled
        n_weights, n_last = Signal(32), Signal()
        left = Mux(fresh, n_weights, remaining)
        last = Mux(fresh, n_last, remaining_last)
        count = Signal(range(lanes + 1))
        m.d.comb += count.eq(Mux(last, left, lanes))
        straddles = count > room              # a second block starts within the tensor's lanes

        def holds(lane):
            # whether ``lane`` holds a weight of the tensor; lane 0 always does (``n_weights`` = 0 acts as 1), which
            # lets the coder tell from the block flags alone whether a beat has tail lanes
            return (lane < count) if lane else Const(1)

        record_free = Signal()
        flags_layout = data.StructLayout({"start": 1, "first_ends": 1, "first_tail": 1, "second_ends": 1})
        pipe = StallPipeline(m, 1 + cfg.tree_levels, record_free, tag_shape=flags_layout, name="ingest")
        accept = self.weights.valid & self.weights.ready
        takes = space & (~fresh | primed)
        if tables is not None:
            takes &= ~fresh | self._elaborate_table_ingest(m, tables, fresh, accept)
        m.d.comb += [
            pipe.in_valid.eq(self.weights.valid & takes),
            self.weights.ready.eq(pipe.advance & takes),
            written.eq(accept),
            pipe.in_tag.start.eq(room == blocksize),
            pipe.in_tag.first_ends.eq((room <= count) | last),
            pipe.in_tag.first_tail.eq(last & (count < room)),
            pipe.in_tag.second_ends.eq(straddles & last),
            write.addr.eq(write_index),
            write.en.eq(accept),
            write.data.weights.eq(self.weights.payload),
            write.data.first.eq(Cat(*(lane < room for lane in range(lanes)))),
            write.data.valid.eq(Cat(*(holds(lane) for lane in range(lanes)))),
            write.data.straddles.eq(straddles),
            write.data.first_ends.eq(pipe.in_tag.first_ends),
            write.data.second_ends.eq(pipe.in_tag.second_ends),
            write.data.last.eq(last),
        ]
        following = left - lanes
        with m.If(accept):
            m.d.sync += [
                write_index.eq(Mux(write_index == buffer.depth - 1, 0, write_index + 1)),
                remaining.eq(following),
                remaining_last.eq(following <= lanes),
                fresh.eq(last),
                primed.eq(0),
                room.eq(Mux(last, blocksize, Mux(room <= lanes, room + (blocksize - lanes), room - lanes))),
            ]
        with m.Elif(fresh):
            m.d.sync += [
                n_weights.eq(self.n_weights),
                n_last.eq(self.n_weights <= lanes),
                primed.eq(self.weights.valid),
            ]

        # magnitudes of each lane, split between lane 0's block and the next; lanes past the tensor count as 0
        first_keys = [Signal(fmt.width - 1, name=f"first_key_{lane}") for lane in range(lanes)]
        second_keys = [Signal(fmt.width - 1, name=f"second_key_{lane}") for lane in range(lanes)]
        for lane in range(lanes):
            key = fp_abs_key(self.weights.payload[lane], fmt)
            with m.If(pipe.advance):
                m.d.sync += [
                    first_keys[lane].eq(Mux((lane < room) & holds(lane), key, 0)),
                    second_keys[lane].eq(Mux((lane >= room) & holds(lane), key, 0)),
                ]
        first_max = _max_tree(m, first_keys, pipe.advance, "first_max")
        second_max = _max_tree(m, second_keys, pipe.advance, "second_max")

        # running absmax of the open block; a beat can close two blocks, so two record slots drain in order
        running = Signal(fmt.width - 1)
        flags = pipe.out_tag
        base = Mux(flags.start, 0, running)
        block_max = Mux(base > first_max, base, first_max)
        pending = [Signal(name=f"record_pending_{i}") for i in range(2)]
        pending_record = [Signal(record_layout, name=f"record_{i}") for i in range(2)]
        m.d.comb += [
            records.w_en.eq(pending[0] | pending[1]),
            records.w_data.eq(Mux(pending[0], pending_record[0].as_value(), pending_record[1].as_value())),
            record_free.eq(~(pending[0] | pending[1]) | (records.w_rdy & (pending[0] ^ pending[1]))),
        ]
        with m.If(records.w_en & records.w_rdy):
            with m.If(pending[0]):
                m.d.sync += pending[0].eq(0)
            with m.Else():
                m.d.sync += pending[1].eq(0)
        with m.If(pipe.out_valid & record_free):
            m.d.sync += [
                running.eq(Mux(flags.first_ends, second_max, block_max)),
                pending[0].eq(flags.first_ends),
                pending_record[0].absmax.eq(block_max),
                pending_record[0].tail.eq(flags.first_tail),
                pending[1].eq(flags.second_ends),
                pending_record[1].absmax.eq(second_max),
                pending_record[1].tail.eq(1),
            ]

    def _elaborate_table_ingest(self, m, tables, fresh, accept):
        """Take each tensor's table into the next free slot while the ingest waits for its first beat; returns
        whether the table of the tensor at the ingest is in."""
        have_table = Signal(name="have_table")            # the table of the tensor whose first beat is next is in
        slot = Signal(range(TABLE_SLOTS), name="table_write_slot")
        taken = self.table.valid & self.table.ready
        table = self.table.payload
        m.d.comb += [
            self.table.ready.eq(fresh & ~have_table & (tables.used != TABLE_SLOTS)),
            tables.taken.eq(taken),
            tables.write.addr.eq(slot),
            tables.write.en.eq(taken),
            tables.write.data.eq(Cat(*(_bound_key(bound) for bound in table.bounds))),
        ]
        with m.If(taken):
            m.d.sync += [have_table.eq(1), slot.eq(slot + 1), tables.pads[slot].eq(table.pad_code)]
        with m.Elif(accept & fresh):
            m.d.sync += have_table.eq(0)
        return have_table

    # -- divider: reciprocals in block order, and the tail's divisions ------------------------------------------------

    def _elaborate_divider(self, m, divide, records, record_layout, scales, tail, tail_codes, tables):
        cfg = self.config
        fmt, lanes = cfg.in_format, cfg.lanes
        tag_fields = {"record": 1, "tail": 1, "lane": range(lanes), "beat_end": 1}
        if tables is not None:
            tag_fields["slot"] = range(TABLE_SLOTS)     # the table of a tail division's tensor
        tag_layout = data.StructLayout(tag_fields)
        # Every operation enters with a slot reserved for its result: a record's in the scale queue (credits, here),
        # a tail beat's in the tail-code queue (reserved by the coder). The divider never waits, so it runs freely
        # and its registers need no enable.
        pipe = StallPipeline(m, divide.latency, Const(1), tag_shape=tag_layout, name="divide")
        m.submodules.divide = divide

        # block records: 1 / max(am, 1e-38) for a full block, am / 1 (= the clamped am) for a tail block; a tail
        # division, when there is one, goes first: the coder is waiting for it
        record = data.View(record_layout, records.r_data)
        absmax = _to_fp32(m, record.absmax, fmt, "absmax_to_fp32")
        clamped = Mux(absmax < _FLOOR, _FLOOR, absmax)    # sign 0: the bit patterns order like the values
        credits = Signal(range(scales.depth + 1))
        absmax_free = ~self.absmax.valid | self.absmax.ready
        record_ready = records.r_rdy & (credits < scales.depth) & absmax_free
        record_issue = record_ready & ~tail.valid
        weight = _to_fp32(m, tail.weight, fmt, "tail_to_fp32")
        m.d.comb += [
            records.r_en.eq(record_issue),
            pipe.in_valid.eq(tail.valid | record_ready),
            divide.a.eq(Mux(tail.valid, weight, Mux(record.tail, clamped, _ONE))),
            divide.b.eq(Mux(tail.valid, tail.divisor, Mux(record.tail, _ONE, clamped))),
            pipe.in_tag.record.eq(~tail.valid),
            pipe.in_tag.tail.eq(record.tail),
            pipe.in_tag.lane.eq(tail.lane),
            pipe.in_tag.beat_end.eq(tail.beat_end),
        ]
        if tables is not None:
            m.d.comb += pipe.in_tag.slot.eq(tail.slot)
        with m.If(record_issue):
            m.d.sync += [self.absmax.valid.eq(1), self.absmax.payload.eq(Mux(record.tail, clamped, absmax))]
        with m.Elif(self.absmax.ready):
            m.d.sync += self.absmax.valid.eq(0)
        m.d.sync += credits.eq(credits + record_issue - (scales.r_en & scales.r_rdy))

        # results: scales in block order, or one tail code into the beat being assembled; the code is registered
        # after the encoder, as the encoder and the assembly together are too slow for one cycle
        done = pipe.out_tag
        m.d.comb += [
            scales.w_en.eq(pipe.out_valid & done.record),
            scales.w_data.eq(Cat(divide.result, done.tail)),
        ]
        code = Signal(cfg.bits)
        keys = None if tables is None else tables.read(m, done.slot)
        m.d.sync += code.eq(_encode(m, cfg, divide.result, keys, "tail_encode"))
        # the code's lane and flags, delayed to meet it (the encoder does not stall)
        lane_bits = len(Signal(range(lanes)))
        delayed = delay_line(m, Const(1), Cat(pipe.out_valid & ~done.record, done.lane[:lane_bits], done.beat_end),
                             _NFEncode.LATENCY + 1, "code")
        code_valid, code_lane, code_ends = delayed[0], delayed[1:1 + lane_bits], delayed[-1]
        assembling = Signal(codes_layout(lanes, cfg.bits))
        assembled = Cat(*(Mux(code_lane == lane, code, assembling[lane]) for lane in range(lanes)))
        m.d.comb += [
            tail_codes.w_en.eq(code_valid & code_ends),
            tail_codes.w_data.eq(assembled),
        ]
        with m.If(code_valid):
            m.d.sync += assembling.eq(assembled)

    # -- coder: re-read each beat, scale and compare; tail lanes come back from the divider --------------------------

    @staticmethod
    def _buffer_head(m, buffer, space, written):
        """The buffer as a first-word-fall-through queue of two registers: the read port's (slow to leave a block
        RAM), then the head beat, which the issue logic looks at. Returns the head, its valid and the ``take``
        signal that the issue logic drives."""
        depth = buffer.depth
        read = buffer.read_port(domain="sync")
        read_index = Signal(range(depth))
        level = Signal(range(depth + 1))          # beats written and not yet read out
        read_valid, head_valid = Signal(), Signal()
        head = Signal(buffer.shape)
        take = Signal()
        advance_head = read_valid & (~head_valid | take)
        load = read.en & (level != 0)
        m.d.comb += [
            space.eq(level != depth),
            read.addr.eq(read_index),
            read.en.eq(~read_valid | advance_head),
        ]
        with m.If(read.en):
            m.d.sync += read_valid.eq(level != 0)
        with m.If(load):
            m.d.sync += read_index.eq(Mux(read_index == depth - 1, 0, read_index + 1))
        m.d.sync += level.eq(level + written - load)
        with m.If(~head_valid | take):
            m.d.sync += [head_valid.eq(read_valid), head.eq(read.data)]
        return head, head_valid, take

    def _join(self, m, coded, joined_layout, tail_codes, tables):
        """The codes stream: a coded beat with tail lanes waits for its codes from the divider, which come in beat
        order."""
        lanes, bits = self.config.lanes, self.config.bits
        beat = data.View(joined_layout, coded.r_data)
        divided = data.View(codes_layout(lanes, bits), tail_codes.r_data)
        needs_tail = beat.tail.any()
        tail_ok = ~needs_tail | tail_codes.r_rdy
        m.d.comb += [
            self.codes.valid.eq(coded.r_rdy & tail_ok),
            self.codes.payload.last.eq(beat.last),
            coded.r_en.eq(self.codes.ready & tail_ok),
            tail_codes.r_en.eq(coded.r_rdy & needs_tail & self.codes.ready),
        ]
        for lane in range(lanes):
            m.d.comb += self.codes.payload.data[lane].eq(Mux(beat.tail[lane], divided[lane], beat.codes[lane]))
        if tables is not None:
            # a tensor's table is used until its last codes leave
            m.d.comb += tables.released.eq(self.codes.valid & self.codes.ready & beat.last)

    def _elaborate_coder(self, m, buffer, space, written, scales, scale_layout, tail, tail_codes, tables):
        cfg = self.config
        fmt, lanes = cfg.in_format, cfg.lanes

        head, head_valid, take = self._buffer_head(m, buffer, space, written)

        # scales of lane 0's block and of the next; a beat uses the second when it straddles a block boundary
        current, following = Signal(scale_layout), Signal(scale_layout)
        current_valid, following_valid = Signal(), Signal()
        lane_tail = ((head.first & current.tail.replicate(lanes)) |
                     (~head.first & following.tail.replicate(lanes))) & head.valid
        has_tail = current.tail | (head.straddles & following.tail)   # lane 0 and a straddling lane hold weights

        # A beat with tail lanes waits in the serializer, which moves one lane per cycle, lowest first (codes return
        # in order), into the register the divider reads. Whether one lane is left is registered, so that the issue
        # logic sees only registers.
        held, held_weights, held_divisor = Signal(), Signal(weights_in_layout(fmt, lanes)), Signal(32)
        pending, single = Signal(lanes, name="tail_pending"), Signal(name="tail_single")
        lowest = Signal(range(lanes))
        for lane in reversed(range(lanes)):
            with m.If(pending[lane]):
                m.d.comb += lowest.eq(lane)
        rest = pending & (pending - 1)

        def at_most_one(lanes_left):
            return (lanes_left & (lanes_left - 1)) == 0

        m.d.sync += [
            tail.valid.eq(held),
            tail.weight.eq(held_weights[lowest]),
            tail.divisor.eq(held_divisor),
            tail.lane.eq(lowest),
            tail.beat_end.eq(single),
        ]
        with m.If(held):
            m.d.sync += [pending.eq(rest), single.eq(at_most_one(rest))]
            with m.If(single):
                m.d.sync += held.eq(0)
        tail_free = ~held | single

        # Coded beats queue up for the join, so that the coder keeps issuing while a beat waits for its tail codes:
        # with the divider's latency in the queue, a tail flows at up to one weight per cycle. A beat enters the
        # coder only with a slot reserved in that queue (and, if it has tail lanes, in the tail-code queue), so the
        # coder never waits either: it runs freely and its registers need no enable.
        joined_layout = data.StructLayout({"codes": codes_layout(lanes, cfg.bits), "tail": lanes, "last": 1})
        m.submodules.coded = coded = SyncFIFOBuffered(width=joined_layout.size, depth=tail.latency + 8)
        coded_reserved = Signal(range(coded.depth + 1))
        tail_reserved = Signal(range(tail_codes.depth + 1))
        # a reservation count grows by at most one a cycle, so a comparison registered a cycle ago with one slot to
        # spare still holds; it keeps the counters' carry chains off the issue logic
        coded_room, tail_codes_room = Signal(), Signal()
        m.d.sync += [
            coded_room.eq(coded_reserved < coded.depth - 1),
            tail_codes_room.eq(tail_reserved < tail_codes.depth - 1),
        ]
        tail_room = tail_free & tail_codes_room

        # operands are registered, then multiplied, then encoded and registered
        multipliers = [FPMul(fmt, FP32, FP32) for _ in range(lanes)]
        tag_fields = {"tail": lanes, "valid": lanes, "last": 1}
        if tables is not None:
            tag_fields["slot"] = range(TABLE_SLOTS)
        tag_layout = data.StructLayout(tag_fields)
        latency = 1 + multipliers[0].latency + _NFEncode.LATENCY + 1
        pipe = StallPipeline(m, latency, Const(1), tag_shape=tag_layout, name="code")
        m.d.comb += [
            take.eq(head_valid & current_valid & (following_valid | ~head.straddles) &
                    coded_room & (~has_tail | tail_room)),
            pipe.in_valid.eq(take),
            pipe.in_tag.tail.eq(lane_tail),
            pipe.in_tag.valid.eq(head.valid),
            pipe.in_tag.last.eq(head.last),
        ]
        m.d.sync += [
            coded_reserved.eq(coded_reserved + take - (coded.r_en & coded.r_rdy)),
            tail_reserved.eq(tail_reserved + (take & has_tail) - (tail_codes.r_en & tail_codes.r_rdy)),
        ]
        with m.If(take & has_tail):
            m.d.sync += [
                held.eq(1),
                held_weights.eq(head.weights),
                held_divisor.eq(Mux(current.tail, current.value, following.value)),
                pending.eq(lane_tail),
                single.eq(at_most_one(lane_tail)),
            ]

        keys = None
        if tables is not None:
            # the coder counts tensors as the ingest counted their tables; the slot of a beat travels with it to
            # the encoders (where all lanes read its keys) and, for tail lanes, through the divider
            slot, held_slot = Signal(range(TABLE_SLOTS), name="code_slot"), Signal(range(TABLE_SLOTS))
            m.d.comb += pipe.in_tag.slot.eq(slot)
            m.d.sync += tail.slot.eq(held_slot)
            with m.If(take & head.last):
                m.d.sync += slot.eq(slot + 1)
            with m.If(take & has_tail):
                m.d.sync += held_slot.eq(slot)
            keys = tables.read(m, delay_line(m, Const(1), slot, 1 + multipliers[0].latency, "encode_slot"))

        codes = Signal(codes_layout(lanes, cfg.bits))
        for lane, multiply in enumerate(multipliers):
            m.submodules[f"scale_mul_{lane}"] = multiply
            m.d.sync += [
                multiply.a.eq(head.weights[lane]),
                multiply.b.eq(Mux(head.first[lane], current.value, following.value)),
                codes[lane].eq(_encode(m, cfg, multiply.result, keys, f"encode_{lane}")),
            ]

        done = pipe.out_tag
        coded_in = data.View(joined_layout, coded.w_data)
        m.d.comb += [
            coded.w_en.eq(pipe.out_valid),
            coded_in.tail.eq(done.tail),
            coded_in.last.eq(done.last),
        ]
        pad_code = cfg.pad_code if tables is None else tables.pads[done.slot]
        for lane in range(lanes):
            m.d.comb += coded_in.codes[lane].eq(Mux(done.valid[lane], codes[lane], pad_code))

        self._join(m, coded, joined_layout, tail_codes, tables)

        # consume the scales of the blocks this beat finished, then refill from the queue into the first free slot
        consume_two = take & head.second_ends
        consume_one = take & head.first_ends & ~head.second_ends
        current_after = Mux(consume_two, 0, Mux(consume_one, following_valid, current_valid))
        following_after = Mux(consume_two | consume_one, 0, following_valid)
        m.d.comb += scales.r_en.eq(~current_valid | ~following_valid)
        with m.If(consume_one):
            m.d.sync += current.eq(following)
        m.d.sync += [current_valid.eq(current_after), following_valid.eq(following_after)]
        with m.If(scales.r_en & scales.r_rdy):
            with m.If(~current_after):
                m.d.sync += [current.eq(scales.r_data), current_valid.eq(1)]
            with m.Else():
                m.d.sync += [following.eq(scales.r_data), following_valid.eq(1)]
