"""NF4 quantizer IP core, bit-exact with bitsandbytes' ``quantize_4bit`` (twin: ``golden/nf4_quant.py``).

A weight's code depends on the absmax of its whole block, which is known only after the block's last weight, so the
core is *block-buffered*: every beat is stored in a block buffer while the running absmax of its block is found,
and read back once the block's scale is known. The scale of a full block is ``r = fl(1 / max(absmax, 1e-38))`` and
every lane multiplies, ``fl(w * r)``; the final partial block of a tensor (the *tail*) divides instead,
``fl(w / am)``, one weight per cycle through the same divider that computes the reciprocals. A code is the number
of NF4 bounds strictly below the scaled weight, found from the exponents and three fraction comparisons.

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
always drain, so the core cannot deadlock. Only the ingest stalls, when the buffer or the record queue is full.
"""

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import ABSMAX_FLOOR, BLOCKSIZES, MAX_LANES, NF4_BOUNDS
from .fp import FORMATS, FP32, FPConvert, FPDiv, FPMul, float_layout, fp_abs_key, fp_is_nan
from .nf4_dequant import codes_layout
from .pipeline import StallPipeline, delay_line

__all__ = ["NF4QuantConfig", "NF4Quantizer", "weights_in_layout", "codes_out_layout"]

_ONE = 0x3F800000
_FLOOR = int(np.float32(ABSMAX_FLOOR).view(np.uint32))
#: code of 0.0, which bitsandbytes packs into the nibble past the end of an odd-sized tensor
_PAD_CODE = 7


#: the NF4 bounds as float32 fields; bound i sits below a value ``s`` (code ``>= i + 1``) when ``s`` is larger
_BOUNDS = NF4_BOUNDS.view(np.uint32).astype(np.int64)
_BOUND_SIGN, _BOUND_EXP, _BOUND_FRAC = _BOUNDS >> 31, (_BOUNDS >> 23) & 0xFF, _BOUNDS & 0x7FFFFF


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
    """

    lanes: int = 8
    blocksize: int = 64
    in_dtype: str = "bf16"

    def __post_init__(self):
        if not isinstance(self.lanes, int) or isinstance(self.lanes, bool) or not 1 <= self.lanes <= MAX_LANES:
            raise ValueError(f"lanes must be an integer from 1 to {MAX_LANES}, not {self.lanes!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {self.blocksize!r}")
        if self.in_dtype not in FORMATS:
            raise ValueError(f"in_dtype must be one of {sorted(FORMATS)}, not {self.in_dtype!r}")

    @property
    def in_format(self):
        return FORMATS[self.in_dtype]

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


def codes_out_layout(lanes):
    """Payload of the ``codes`` stream: ``lanes`` NF4 codes in weight order and ``last`` on a tensor's final beat.
    Lanes past the end of the tensor carry code 7, the code of 0.0, which bitsandbytes uses as its pad nibble."""
    return data.StructLayout({"data": codes_layout(lanes), "last": 1})


class _NF4Encode(wiring.Component):
    """NF4 code of an fp32 value: the number of NF4 bounds strictly below it (a tie takes the lower code).

    Comparing with each of the 15 bounds would take 15 full-width comparators per lane. Instead, a bound whose
    exponent differs from the value's is decided by the 8-bit exponents alone, and only bounds with the value's
    exponent and sign compare fractions; there are at most three of those, so three 23-bit comparators serve all
    exponents, their constants looked up by sign and exponent. A positive value counts the 7 negative bounds plus
    the positive bounds below it; a negative value ``-m`` counts the negative bounds ``-n`` with ``n > m``.

    A NaN gets 15, where ``numpy.searchsorted`` (the golden model) sorts it; finite weights never make one.
    The comparisons are registered before they are summed (no enable: the unit's users never stall).

    Attributes
    ----------
    scaled : In(32)
        float32 bits of a scaled weight.
    code : Out(4)
        The code of the value presented :attr:`LATENCY` cycles earlier.
    """

    LATENCY = 1

    scaled: In(32)
    code: Out(4)

    def elaborate(self, platform):
        m = Module()
        value = float_layout(FP32)(self.scaled)
        negative, exponent, fraction = value.sign, value.exponent, value.fraction

        # bounds on the far side of the value by exponent
        count = Signal(4)
        by_exponent = Mux(negative,
                          sum(exponent < int(e) for s, e in zip(_BOUND_SIGN, _BOUND_EXP) if s),
                          7 + sum(exponent > int(e) for s, e in zip(_BOUND_SIGN, _BOUND_EXP) if not s))
        m.d.comb += count.eq(by_exponent)

        # bounds with the value's sign and exponent, compared by fraction: a positive value is above a fraction
        # ``f`` when its own is ``> f``, a negative one below ``-n`` when its fraction is ``< f``, ``not > f - 1``
        lowest = int(_BOUND_EXP.min())
        assert _BOUND_EXP.max() - lowest < 8 and (_BOUND_FRAC > 0).all()
        groups = {}
        for sign, exp, frac in zip(_BOUND_SIGN.tolist(), _BOUND_EXP.tolist(), _BOUND_FRAC.tolist()):
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

        counted, found, nan = Signal(4), Signal(len(hits)), Signal()
        m.d.sync += [counted.eq(count), found.eq(Cat(*hits)), nan.eq(fp_is_nan(self.scaled, FP32))]
        total = Signal(5)
        m.d.comb += [
            total.eq(counted + sum(found)),
            self.code.eq(Mux(nan, 15, total)),
        ]
        return m


def _nf4_code(m, scaled, name):
    """The code of ``scaled`` from an :class:`_NF4Encode` added to ``m`` as ``name``."""
    m.submodules[name] = encode = _NF4Encode()
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


class NF4Quantizer(wiring.Component):
    """Streaming NF4 quantizer: ``lanes`` weights per cycle, block-buffered.

    A tensor of ``n_weights`` weights arrives as ``ceil(n_weights / lanes)`` beats, the final one zero-padded; it
    leaves as the same number of beats of codes and ``ceil(n_weights / blocksize)`` absmax values. ``n_weights`` is
    sampled while a tensor's first beat is offered, so it must be valid from then until that beat is taken (a
    cycle later than it could be: the sampling register keeps wide arithmetic off the input path); tensors may
    follow each other back to back. After the
    pipeline fills, full blocks flow at ``lanes`` weights per cycle with no backpressure; a tail block takes one
    cycle per weight in the divider. NaN or infinite weights give unspecified codes (the software refuses them),
    but the core keeps running.

    Parameters
    ----------
    config : NF4QuantConfig

    Attributes
    ----------
    weights : In(stream of :func:`weights_in_layout`)
        Weights, ``lanes`` per beat, in the configured input format.
    n_weights : In(32)
        Number of weights in the tensor, at least 1 (0 acts as 1).
    codes : Out(stream of :func:`codes_out_layout`)
        NF4 codes, one beat per weights beat.
    absmax : Out(stream of unsigned(32))
        float32 absmax bits, one per block in block order: ``max|w|`` for a full block, ``max(max|w|, 1e-38)`` for
        a tail block, as bitsandbytes stores them.
    """

    def __init__(self, config=NF4QuantConfig()):
        if not isinstance(config, NF4QuantConfig):
            raise TypeError(f"config must be an NF4QuantConfig, not {config!r}")
        self.config = config
        super().__init__({
            "weights": In(stream.Signature(weights_in_layout(config.in_format, config.lanes))),
            "n_weights": In(32),
            "codes": Out(stream.Signature(codes_out_layout(config.lanes))),
            "absmax": Out(stream.Signature(32)),
        })

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
        m.submodules.tail_codes = tail_codes = SyncFIFOBuffered(width=4 * lanes, depth=divide.latency + 4)

        # the ingest writes the buffer and the coder reads it; they share its fill level
        space, written = Signal(name="buffer_space"), Signal(name="buffer_written")
        tail = _TailIssue(fmt, lanes, divide.latency)
        self._elaborate_ingest(m, buffer, space, written, records, record_layout)
        self._elaborate_divider(m, divide, records, record_layout, scales, tail, tail_codes)
        self._elaborate_coder(m, buffer, space, written, scales, scale_layout, tail, tail_codes)
        return m

    # -- ingest: buffer every beat, find each block's absmax ----------------------------------------------------------

    def _elaborate_ingest(self, m, buffer, space, written, records, record_layout):
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

    # -- divider: reciprocals in block order, and the tail's divisions ------------------------------------------------

    def _elaborate_divider(self, m, divide, records, record_layout, scales, tail, tail_codes):
        cfg = self.config
        fmt, lanes = cfg.in_format, cfg.lanes
        tag_layout = data.StructLayout({"record": 1, "tail": 1, "lane": range(lanes), "beat_end": 1})
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
        code = Signal(4)
        m.d.sync += code.eq(_nf4_code(m, divide.result, "tail_encode"))
        # the code's lane and flags, delayed to meet it (the encoder does not stall)
        lane_bits = len(Signal(range(lanes)))
        delayed = delay_line(m, Const(1), Cat(pipe.out_valid & ~done.record, done.lane[:lane_bits], done.beat_end),
                             _NF4Encode.LATENCY + 1, "code")
        code_valid, code_lane, code_ends = delayed[0], delayed[1:1 + lane_bits], delayed[-1]
        assembling = Signal(codes_layout(lanes))
        assembled = Cat(*(Mux(code_lane == lane, code, assembling[lane]) for lane in range(lanes)))
        m.d.comb += [
            tail_codes.w_en.eq(code_valid & code_ends),
            tail_codes.w_data.eq(assembled),
        ]
        with m.If(code_valid):
            m.d.sync += assembling.eq(assembled)

    # -- coder: re-read each beat, scale and compare; tail lanes come back from the divider --------------------------

    def _elaborate_coder(self, m, buffer, space, written, scales, scale_layout, tail, tail_codes):
        cfg = self.config
        fmt, lanes, depth = cfg.in_format, cfg.lanes, buffer.depth

        # the buffer as a first-word-fall-through queue of two registers: the read port's (slow to leave a block
        # RAM), then the head beat, which the issue logic looks at
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
        joined_layout = data.StructLayout({"codes": codes_layout(lanes), "tail": lanes, "last": 1})
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
        tag_layout = data.StructLayout({"tail": lanes, "valid": lanes, "last": 1})
        latency = 1 + multipliers[0].latency + _NF4Encode.LATENCY + 1
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

        codes = Signal(codes_layout(lanes))
        for lane, multiply in enumerate(multipliers):
            m.submodules[f"scale_mul_{lane}"] = multiply
            m.d.sync += [
                multiply.a.eq(head.weights[lane]),
                multiply.b.eq(Mux(head.first[lane], current.value, following.value)),
                codes[lane].eq(_nf4_code(m, multiply.result, f"encode_{lane}")),
            ]

        done = pipe.out_tag
        coded_in = data.View(joined_layout, coded.w_data)
        m.d.comb += [
            coded.w_en.eq(pipe.out_valid),
            coded_in.tail.eq(done.tail),
            coded_in.last.eq(done.last),
        ]
        for lane in range(lanes):
            m.d.comb += coded_in.codes[lane].eq(Mux(done.valid[lane], codes[lane], _PAD_CODE))

        # join: a beat with tail lanes waits for its codes from the divider, which come in beat order
        beat = data.View(joined_layout, coded.r_data)
        divided = data.View(codes_layout(lanes), tail_codes.r_data)
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
