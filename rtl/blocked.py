"""The block controller of the blocked step: the base products ``y = x W^T`` (forward) and ``dx = dy W``
(transposed, the backward sweep's) with the activations, the NF4 weight and the outputs in external memory, in the
output-stationary order (twin: ``golden/blockprogram.py``'s
:func:`~edge_qlora.golden.blockprogram.forward_product` and
:func:`~edge_qlora.golden.blockprogram.backward_product`).

The memory-fed step (``rtl/lora/memstep.py``) streams the weight once per tile of ``rows`` tokens: 16 passes at
T = 128 on the 8x8 array. Here a block of ``tokens`` token rows by ``features`` outputs keeps its float32 partial
sums in the GEMM engine's accumulator while the reduction streams by in spans of 64 elements: per span one block
job of the engine (``rtl/gemm``: all but the last held, all but the first resumed), its activation piece read
once and its W piece once. So the weight crosses the port once per token block, the activation once per feature
block, and the output is written once, as ``golden/traffic.py``'s blocked dataflow counts them. Forward, the
features are W's rows and a span is one NF4 block of each; transposed, they are W's columns (whole NF4 blocks) and
a span is 64 W rows, each W tile (``chunk`` rows) with the shared exponent of its rows over all of W's columns,
from a table made when the weight is placed in memory, so that the column blocks equal the whole product.

Parts, each a component; six :class:`SpanWalker` walk the same loop nest (token block, feature block, span), each
for one consumer at that consumer's pace, so no part waits for another's bookkeeping:

* :class:`ReadIssuer`: per span the read jobs in program order, each with the job of the unpacker of its
  destination, into a :class:`~.memport.TaggedReader`;
* :class:`XBuffer`: the corner turn: a span's activation piece in token rows from memory, out as the engine's A
  beats (``rows`` tokens of one reduction index);
* :class:`SpanTable` (two): the absmax codes (forward a feature block's, served per span as column ``s``, one per
  W row; transposed a span's W rows' port words, served as each row's codes of the column block) and, transposed,
  the chunk exponent table (per token block; the span's W tiles' exponents per span);
* :class:`JobIssuer`: per span the engine's block job, the dequantizer's tensor beat and the span descriptor of
  :class:`~.nf4_span.SpanScales` (each block's second-level absmax from the on-chip table);
* :class:`OutputIssuer`: after a feature block's last span, its write jobs (forward one per output row of a tile,
  in the engine's order; transposed one per token row, after :class:`OutputTurn`, the output corner turn) and the
  packer's job;
* with the rank-r term (``BlockedConfig.rank``): a :class:`~.rank_product.RankProduct` in the activation's path
  to the x buffer, which makes the token block's hb (transposed gb) from A's (B's) span pieces as the first
  feature block's spans pass, and a :class:`~.rank_term.RankTerm` behind the engine, which adds each output's
  term; with the gradient (``BlockedConfig.gradient``) a :class:`~.rank_gradient.RankGradient` in its place,
  which makes those rows and, transposed, grad_B through the same arithmetic.

One ``report`` beat ends a product: cycles, words per destination and written, and stall cycles.
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..constants import FP32
from .bfp import EXPONENT_SHAPE
from .fp import BF16, FPConvert
from .gearbox import Packer, Unpacker, connect_nf4_codes
from .gemm import GemmConfig, GemmEngine, a_layout
from .gemm import job_layout as engine_job_layout
from .memport import BurstWriter, MemPortConfig, MemPortSignature, TaggedReader, job_layout as write_job_layout
from .nf4_dequant import tensor_layout
from .nf4_span import SpanScales, span_layout
from .memport import WriteArbiter, take_descriptor
from .rank_gradient import RankGradient, RankGradientConfig
from .rank_product import RankProduct, RankProductConfig
from .rank_term import RankTerm, RankTermConfig

__all__ = ["SPAN", "READS", "RANK_READS", "GRADIENT_READS", "absmax2_groups", "BlockedConfig", "shape_layout",
           "span_beat_layout", "descriptor_layout", "report_layout", "plan_layout", "SpanWalker", "ReadIssuer",
           "XBuffer", "SpanTable", "absmax_plan", "exponent_plan", "JobIssuer", "OutputIssuer", "turn_layout",
           "OutputTurn", "BlockedProduct"]

#: Reduction elements per span: one NF4 block, so a W row's piece of a span is one absmax code and 32 bytes.
SPAN = 64
_SPAN_SHIFT = SPAN.bit_length() - 1
#: The read destinations, in the order of the tagged reader's FIFOs and the report's counters.
READS = ("absmax2", "absmax", "x", "codes", "exponents")
#: With the rank-r term (``BlockedConfig.rank``), after :data:`READS`: the operand of the rows' product (A, whose
#: product with x makes hb; transposed B, for gb) and the term's columns (B's rows; transposed A's columns).
RANK_READS = ("rank_operands", "rank_columns")
#: With the gradient (``BlockedConfig.gradient``), after :data:`RANK_READS`: the rows the gradients take (the
#: forward's hb for grad_B; gb, which the backward product writes, for grad_A) and x's chunk fields (grad_A).
GRADIENT_READS = ("rank_rows", "x_fields")
#: Bytes of the codes FIFO at most (four block RAMs): with feature blocks of 384 a span's codes are 12 kB, and the
#: last third of them is requested once the engine has taken the first, which still leaves the next span's x two
#: thirds of the span's compute to load.
CODES_FIFO_BYTES = 8192
#: With the gradient the read issuer's addresses for grad_A's pass over x: x and gb.
_PASS_ADDRESSES = ("pass_x", "gb")
#: The descriptor's addresses the read issuer takes (and :data:`RANK_READS` with the term).
_ADDRESSES = ("x", "codes", "absmax", "absmax2", "exponents")
_ELEM = {"absmax2": 32, "absmax": 8, "x": BF16.width, "codes": 4, "exponents": 8, "rank_operands": FP32.width,
         "rank_columns": FP32.width, "rank_rows": BF16.width, "x_fields": 8}


# bits of an unpacker job's element count: a span's activation rows or W rows, a feature block's absmax codes, and
# the rank-r operands all stay below 2 ** 22 within the limits BlockedConfig checks
_JOB_BITS = 22


def absmax2_groups(d_in, d_out):
    """Entries of a ``[d_out, d_in]`` weight's ``absmax2`` table: one per 256 NF4 blocks of :data:`SPAN`."""
    return -(-(d_out * d_in // SPAN) // 256)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _power_of_two(value):
    return _is_int(value) and value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class BlockedConfig:
    """Elaboration parameters of :class:`BlockedProduct`.

    Parameters
    ----------
    rows, cols : int
        The GEMM engine's PE array, powers of two.
    port : MemPortConfig
        The external-memory port; a ``cols``-wide bf16 output row is whole port words.
    max_tokens, max_features : int
        The largest token block (a multiple of ``rows``) and feature block (a multiple of ``cols``): the engine's
        A buffer holds ``max_tokens / rows`` tiles of a span, its accumulator their partial sums by
        ``max_features / cols`` W tiles.
    max_in : int
        The longest W row, a multiple of :data:`SPAN`: the absmax buffer holds ``max_features * max_in / 64``
        codes.
    max_groups : int
        Entries of the ``absmax2`` table (the weight's blocks / 256, rounded up).
    fifo_words : int
        Words of each read destination's FIFO but the codes' (:attr:`codes_words`), at least ``port.max_burst``.
    transposed : bool
        Build the transposed mode too, ``dx = dy W`` (the engine's W rows then ``max_features`` long).
    max_out : int
        Transposed: the most W rows (the reduction), a multiple of :data:`SPAN`: the table of the whole rows'
        chunk exponents holds ``max_out / chunk`` of them.
    rank : int
        0, or the LoRA rank ``r`` (a power of two up to 16): the forward product then writes the step's
        ``y = bf16(x W^T + s hb B^T)`` through a :class:`~.rank_term.RankTerm` behind the engine (whose outputs
        are then float32), with B (float32 ``[d_out, r]``) read from memory and hb (``bf16(x A^T)``, ``[t, r]``)
        made by a :class:`~.rank_product.RankProduct` from A (float32 ``[r, d_in]``, a span at a time) as the
        first feature block's x passes to the engine; transposed, the step's ``dx = bf16(dy W + s gb A)``, with
        gb (``bf16(dy B)``) made from B the same way, A read from memory and the exponent A's rows share (the
        descriptor's ``rank_exponent``).
    gradient : bool
        With ``rank`` (2 or more) and ``transposed``: the forward product also writes hb (bf16 ``[t, r]``, at the
        descriptor's ``rank_rows``) and x's chunk fields (one byte per 16 token rows over all of x's columns, in
        32-bit words, at ``x_fields``: what grad_A's pass over x takes), and the backward product reads hb and
        writes the step's ``grad_B = s dy^T hb`` (float32 ``[d_out, r]``, at the descriptor's ``gradient``)
        through a :class:`~.rank_gradient.RankGradient` in dy's path, which captures dy in the second column block
        (and, in place of the ``RankProduct``, makes hb and gb in the first); it writes gb (at ``gb``) and makes
        the step's ``grad_A = s gb^T x`` (float32 ``[r, d_in]``, at ``gradient_a``) in a pass over x (at
        ``pass_x``) through the same unit, beside the third column block on and after the product, with gb and x's
        fields read back. The whole reduction (all ``t`` tokens) must be one token block.
    """

    rows: int = 8
    cols: int = 8
    port: MemPortConfig = MemPortConfig()
    max_tokens: int = 128
    max_features: int = 448
    max_in: int = 2048
    max_groups: int = 1024
    fifo_words: int = 128
    transposed: bool = False
    max_out: int = 2048
    rank: int = 0
    gradient: bool = False

    def __post_init__(self):
        for name in ("rows", "cols"):
            if not _power_of_two(getattr(self, name)) or getattr(self, name) > 16:
                raise ValueError(f"{name} must be a power of two from 1 to 16, not {getattr(self, name)!r}")
        if not isinstance(self.port, MemPortConfig):
            raise TypeError(f"port must be a MemPortConfig, not {self.port!r}")
        if (self.cols * BF16.width) % self.port.data_width:
            raise ValueError(f"a row of cols ({self.cols}) bf16 outputs must be whole {self.port.data_width}-bit "
                             f"port words")
        if self.port.data_width > 128:
            raise ValueError(f"the port word must be at most 128 bits, not {self.port.data_width}")
        if not _is_int(self.max_tokens) or self.max_tokens < self.rows or self.max_tokens % self.rows:
            raise ValueError(f"max_tokens must be a positive multiple of rows ({self.rows}), not {self.max_tokens!r}")
        if not _is_int(self.max_features) or self.max_features < self.cols or self.max_features % self.cols:
            raise ValueError(f"max_features must be a positive multiple of cols ({self.cols}), not "
                             f"{self.max_features!r}")
        if not _is_int(self.max_in) or self.max_in < SPAN or self.max_in % SPAN or self.max_in >= 1 << 16:
            raise ValueError(f"max_in must be a multiple of {SPAN} below 65536, not {self.max_in!r}")
        if not _is_int(self.max_groups) or not 1 <= self.max_groups < 1 << 16:
            raise ValueError(f"max_groups must be an integer from 1 to 65535, not {self.max_groups!r}")
        if max(self.max_tokens, self.max_features) * SPAN >= 1 << _JOB_BITS or \
                self.max_features * self.max_in // SPAN >= 1 << _JOB_BITS:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_features ({self.max_features}) times {SPAN}, "
                             f"and max_features times max_in / {SPAN}, must stay below 2 ** {_JOB_BITS}")
        if not _is_int(self.fifo_words) or self.fifo_words < self.port.max_burst:
            raise ValueError(f"fifo_words must be at least the port's max_burst ({self.port.max_burst}), not "
                             f"{self.fifo_words!r}")
        if not isinstance(self.transposed, bool):
            raise ValueError(f"transposed must be a bool, not {self.transposed!r}")
        if not _is_int(self.max_out) or self.max_out < SPAN or self.max_out % SPAN or self.max_out >= 1 << 16:
            raise ValueError(f"max_out must be a multiple of {SPAN} below 65536, not {self.max_out!r}")
        if self.rank != 0 and (not _power_of_two(self.rank) or self.rank > 16):
            raise ValueError(f"rank must be 0 (no rank-r term) or a power of two up to 16, not {self.rank!r}")
        if not isinstance(self.gradient, bool):
            raise ValueError(f"gradient must be a bool, not {self.gradient!r}")
        if self.gradient and not (self.rank >= 2 and self.transposed):
            raise ValueError("the gradient needs the rank-r term (rank 2 or more) and the transposed mode "
                             "(transposed)")
        if SPAN % self.gemm.chunk_steps:
            raise ValueError(f"the engine's chunk ({self.gemm.chunk_steps}) must divide the span ({SPAN})")

    @property
    def absmax_depth(self):
        """Entries of the absmax table: a feature block's codes (``max_features * max_in / 64``) or, transposed,
        a span's 64 W rows of port words that hold a column block's codes."""
        wb = self.port.word_bytes
        span_words = SPAN * (-(-(self.max_features // SPAN + wb - 1) // wb) * wb) if self.transposed else 0
        return max(self.max_features * (self.max_in // SPAN), span_words)

    @property
    def exponent_depth(self):
        """Entries of the chunk exponent table: ``max_out / chunk`` (transposed), else one."""
        return self.max_out // self.gemm.chunk_steps if self.transposed else 1

    @property
    def codes_words(self):
        """Words of the codes FIFO: a whole span's codes of the largest feature block, at most
        :data:`CODES_FIFO_BYTES` bytes (at least ``fifo_words``), so that a span's codes are requested early in
        its job and the next span's x, which follows them in the read order, loads while the engine computes (with
        a FIFO of a few bursts the x would wait for the engine to be nearly through the codes, and the next job
        for the x)."""
        span = -(-self.max_features * SPAN // (2 * self.port.word_bytes))
        return max(self.fifo_words, min(span, CODES_FIFO_BYTES // self.port.word_bytes))

    @property
    def reads(self):
        """The read destinations: :data:`READS`, :data:`RANK_READS` with the rank-r term and
        :data:`GRADIENT_READS` with the gradient."""
        return READS + (RANK_READS if self.rank else ()) + (GRADIENT_READS if self.gradient else ())

    @property
    def rank_product(self):
        """The :class:`~.rank_product.RankProductConfig` of the unit that makes hb (transposed gb)."""
        return RankProductConfig(rank=self.rank, max_tokens=self.max_tokens)

    @property
    def rank_gradient(self):
        """The :class:`~.rank_gradient.RankGradientConfig` of the unit that makes grad_B (and hb and gb): its table
        of 128 x 16 aligned operands in block RAM, where it costs eight block RAMs instead of about 5,400 LUTs."""
        return RankGradientConfig(rank=self.rank, max_tokens=self.max_tokens, table_ram="block")

    @property
    def rank_term(self):
        """The :class:`~.rank_term.RankTermConfig` of the rank-r term, for blocks up to the buffers', its rows'
        table in block RAM in four parts a row (two block RAMs rather than about 600 LUT-RAM cells)."""
        return RankTermConfig(rows=self.rows, cols=self.cols, rank=self.rank, max_tokens=self.max_tokens,
                              max_columns=self.max_features, rows_table_ram="block",
                              rows_parts=min(4, self.rank, self.cols))

    @property
    def tiles(self):
        """A tiles (of ``rows`` tokens) in the largest token block."""
        return self.max_tokens // self.rows

    @property
    def gemm(self):
        """The engine: NF4 with double quantization in blocks of :data:`SPAN`, bf16 outputs (float32 into the
        rank-r term), an A buffer half for a token block's span, an accumulator for a whole output block and half
        as many integer-to-float converters as columns (the array gives a row of chunk sums every two steps)."""
        max_k = max(SPAN, self.max_features) if self.transposed else SPAN
        return GemmConfig(rows=self.rows, cols=self.cols, max_k=max_k, max_n=self.tiles * SPAN, weights="nf4",
                          blocksize=SPAN, double_quant=True, out_dtype="fp32" if self.rank else "bf16",
                          held_tiles=self.tiles * (self.max_features // self.cols),
                          convert_interval=2 if self.cols % 2 == 0 else 1)

    def check_shape(self, t, d_in, d_out, tokens, features, transposed=False):
        """ValueError with a one-line reason if the product ``[t, d_in] x [d_out, d_in]^T`` (``transposed``:
        ``[t, d_out] x [d_out, d_in]``) in blocks of ``tokens x features`` does not fit this configuration."""
        for name, value in (("t", t), ("d_in", d_in), ("d_out", d_out), ("tokens", tokens),
                            ("features", features)):
            if not _is_int(value) or not 1 <= value < 1 << 16:
                raise ValueError(f"{name} must be an integer from 1 to 65535, not {value!r}")
        if t % self.rows or tokens % self.rows:
            raise ValueError(f"t ({t}) and the token block ({tokens}) must be multiples of rows ({self.rows})")
        if transposed:
            self._check_transposed(d_in, d_out, features)
            if self.gradient and (tokens < t or features >= d_in):
                raise ValueError(f"the gradient takes all t ({t}) tokens in one token block ({tokens}) and a "
                                 f"second column block (d_in {d_in}, column blocks of {features})")
        else:
            if self.gradient and tokens < t:
                raise ValueError(f"with the gradient x's chunk fields take all t ({t}) tokens in one token block "
                                 f"({tokens})")
            if d_out % self.cols or features % self.cols:
                raise ValueError(f"d_out ({d_out}) and the feature block ({features}) must be multiples of cols "
                                 f"({self.cols})")
            if (features * (d_in // SPAN)) % self.port.word_bytes:
                raise ValueError(f"a feature block's absmax codes ({features} x {d_in // SPAN} bytes) must start on "
                                 f"a {self.port.word_bytes}-byte port word")
        if d_in % SPAN or d_in > self.max_in:
            raise ValueError(f"d_in ({d_in}) must be a multiple of {SPAN} up to max_in ({self.max_in})")
        if tokens > self.max_tokens or features > self.max_features:
            raise ValueError(f"blocks of {tokens} x {features} exceed the buffers' {self.max_tokens} x "
                             f"{self.max_features}")
        groups = absmax2_groups(d_in, d_out)
        if groups > self.max_groups:
            raise ValueError(f"the weight has {groups} absmax2 groups; the table holds {self.max_groups}")

    def _check_transposed(self, d_in, d_out, features):
        # a span's W rows' absmax codes are read as the port words that hold them: a W row's codes are whole words
        if not self.transposed:
            raise ValueError("this configuration has no transposed mode (BlockedConfig.transposed)")
        if features % SPAN or features % self.cols:
            raise ValueError(f"the column block ({features}) must be whole NF4 blocks of {SPAN} and a multiple of "
                             f"cols ({self.cols})")
        if (d_in // SPAN) % self.port.word_bytes:
            raise ValueError(f"a W row's absmax codes ({d_in // SPAN}) must be whole {self.port.word_bytes}-byte "
                             f"port words")
        if d_out % SPAN or d_out > self.max_out:
            raise ValueError(f"d_out ({d_out}) must be a multiple of {SPAN} up to max_out ({self.max_out})")


def shape_layout():
    """The product's shape, as every walker holds it: ``t`` tokens, ``d_in``, ``d_out``, the block sizes, and
    ``transposed`` (``dx = dy W``: the features are W's columns, the reduction runs over its rows)."""
    return data.StructLayout({"t": 16, "d_in": 16, "d_out": 16, "tokens": 16, "features": 16, "transposed": 1})


def _reduction(shape):
    return Mux(shape.transposed, shape.d_out, shape.d_in)


def _outputs(shape):
    return Mux(shape.transposed, shape.d_in, shape.d_out)


def span_beat_layout():
    """One span of the loop nest: the token block (``t0``, ``nt`` tokens), the feature block (``f0``, ``nf`` W
    rows, or transposed W columns), the span's index ``s``, whether it is the first of its token block and of its
    feature block, the last of its feature block (``final``: its outputs follow), and the walk's last; or
    (``x_pass``) a span of grad_A's pass over x (between the product's spans, or after them): ``s`` the span of
    x's columns, ``nt`` all the tokens, ``f0`` past the outputs, ``final`` the pass's last."""
    return data.StructLayout({"t0": 16, "nt": 16, "f0": 16, "nf": 16, "s": 16, "first_t": 1, "first_f": 1,
                              "final": 1, "last": 1, "x_pass": 1})


def descriptor_layout(config):
    """Payload of ``descriptor``: the byte address of each tensor (``golden/memmap.py``; transposed, ``x`` is dy's
    and ``y`` dx's, and ``exponents`` the whole rows' chunk exponents, ``w_row_exponents``), ``dims`` (the shape,
    the block sizes and the mode, :func:`shape_layout`), the number of ``absmax2`` groups and the double
    quantization's float32 offset; with the rank-r term (``config.rank``) the addresses of A and B (``rank_operands``:
    A, transposed B, the operand that makes hb or gb; ``rank_columns``: B, transposed A, the term's columns), the
    scaling ``s`` (float32) and, transposed, the exponent A's rows share over all of A (``rank_exponent``,
    :func:`~edge_qlora.golden.rank_term.column_exponent`); with the gradient the addresses of hb (``rank_rows``),
    of grad_B (``gradient``) and of x's chunk fields (``x_fields``), and, transposed, of x (``pass_x``), gb
    (``gb``) and grad_A (``gradient_a``) for grad_A's pass over x, with the pass's spans after each span from the
    third column block on (``x_per_span``, ``golden.blockprogram.x_pass_per_span``; 0: all after the product)."""
    aw = config.port.address_width
    term = {"rank_operands": aw, "rank_columns": aw, "scaling": 32,
            "rank_exponent": EXPONENT_SHAPE} if config.rank else {}
    gradient = {"rank_rows": aw, "gradient": aw, "x_fields": aw, "pass_x": aw, "gb": aw,
                "gradient_a": aw, "x_per_span": 4} if config.gradient else {}
    return data.StructLayout({"x": aw, "codes": aw, "absmax": aw, "absmax2": aw, "y": aw, "exponents": aw,
                              "dims": shape_layout(), "groups": 16, "offset": 32, **term, **gradient})


def report_layout(reads=READS):
    """Payload of ``report``: cycles from the descriptor to the last word written, port words delivered to each
    read destination (``reads``: :data:`READS`, or a configuration's :attr:`BlockedConfig.reads`) and written,
    and stall cycles: ``memory`` (one of the engine's inputs, A, codes, absmax or, transposed, the tile exponents,
    is ready and empty: an upper bound on the cycles it waits for memory, since its input buffers also take ahead
    of need) and ``compute`` (a read is ready but its destination's FIFO has no room)."""
    return data.StructLayout({"cycles": 48, **{f"read_{name}": 48 for name in reads}, "written": 48,
                              "memory": 48, "compute": 48})


def _min(m, a, b, name):
    out = Signal(16, name=name)
    m.d.comb += out.eq(Mux(a < b, a, b))
    return out


class SpanWalker(wiring.Component):
    """The loop nest over token blocks, feature blocks and spans: one ``spans`` beat per span after ``start``;
    with ``x_pass`` also one per span of grad_A's pass over x (``d_in / 64``; the whole reduction is one token
    block then): ``x_per_span`` of them after each span from the third feature (column) block on, the rest after
    the product.

    Attributes
    ----------
    shape : In(:func:`shape_layout`), held while the walk runs
    start : In(1): a pulse begins a walk (the shape valid from that cycle on)
    x_pass, x_per_span : In(1), In(4): held with the shape
    spans : Out(stream of :func:`span_beat_layout`)
    """

    def __init__(self):
        super().__init__({"shape": In(shape_layout()), "start": In(1), "x_pass": In(1), "x_per_span": In(4),
                          "spans": Out(stream.Signature(span_beat_layout()))})

    def elaborate(self, platform):
        m = Module()
        shape, out = self.shape, self.spans.payload
        active = Signal()
        t0, f0, s = Signal(16), Signal(16), Signal(16)
        # grad_A's pass: its next span, the spans left in this run of them, and whether the product is done
        passing, tail, xs, burst = Signal(), Signal(), Signal(16), Signal(4)
        outputs = Signal(16)
        m.d.comb += outputs.eq(_outputs(shape))
        nt = _min(m, shape.t - t0, shape.tokens, "nt")
        nf = _min(m, outputs - f0, shape.features, "nf")
        final = s == (_reduction(shape) >> _SPAN_SHIFT) - 1
        last_f = f0 + nf >= outputs
        last_t = t0 + nt >= shape.t
        x_final = xs == (shape.d_in >> _SPAN_SHIFT) - 1
        x_left = self.x_pass & (xs != shape.d_in >> _SPAN_SHIFT)
        # nothing in the cycle of ``start``: a walker that a mode leaves waiting (its consumer disabled) still holds
        # the last walk's beat then, which the next mode's consumer would take
        m.d.comb += self.spans.valid.eq(active & ~self.start)
        with m.If(passing):
            # past the outputs (no feature block), all tokens
            m.d.comb += [out.t0.eq(0), out.nt.eq(nt), out.f0.eq(outputs), out.nf.eq(0), out.s.eq(xs),
                         out.final.eq(x_final), out.last.eq(x_final & tail), out.x_pass.eq(1)]
        with m.Else():
            m.d.comb += [out.t0.eq(t0), out.nt.eq(nt), out.f0.eq(f0), out.nf.eq(nf), out.s.eq(s),
                         out.first_t.eq((f0 == 0) & (s == 0)), out.first_f.eq(s == 0), out.final.eq(final),
                         out.last.eq(final & last_f & last_t & ~x_left)]
        with m.If(self.start):
            m.d.sync += [active.eq(1), passing.eq(0), tail.eq(0), xs.eq(0), t0.eq(0), f0.eq(0), s.eq(0)]
        with m.Elif(self.spans.valid & self.spans.ready & passing):
            m.d.sync += [xs.eq(xs + 1), burst.eq(burst - 1)]
            with m.If(x_final):
                m.d.sync += passing.eq(0)
                with m.If(tail):
                    m.d.sync += active.eq(0)
            with m.Elif((burst == 1) & ~tail):
                m.d.sync += passing.eq(0)
        with m.Elif(self.spans.valid & self.spans.ready):
            # from the third feature block on, a run of the pass's spans after each span
            with m.If(x_left & (self.x_per_span != 0) & (f0 > shape.features)):
                m.d.sync += [passing.eq(1), burst.eq(self.x_per_span)]
            with m.If(~final):
                m.d.sync += s.eq(s + 1)
            with m.Else():
                m.d.sync += s.eq(0)
                with m.If(~last_f):
                    m.d.sync += f0.eq(f0 + nf)
                with m.Else():
                    m.d.sync += f0.eq(0)
                    with m.If(~last_t):
                        m.d.sync += t0.eq(t0 + nt)
                    with m.Elif(x_left):
                        # the pass's spans left follow the product
                        m.d.sync += [passing.eq(1), tail.eq(1)]
                    with m.Else():
                        m.d.sync += active.eq(0)
        return m


def read_beat_layout(config):
    """A :class:`ReadIssuer` beat: a tagged read job (byte ``address``, ``bytes``, ``dest``: an index of the
    configuration's :attr:`~BlockedConfig.reads`) and, with ``unpack``, the job of its destination's unpacker
    (``count`` elements in rows of ``cols``). A span's x rows and its codes rows each take one unpacker job, with
    the first row: every row is whole port words, so the rows' words follow each other as one job's. (An unpacker
    job per row would let the issuer run only as many rows ahead of the engine as the unpacker's job queue holds,
    and the next span's x, which follows the codes in the read order, would wait for the engine to be nearly through
    them.)"""
    aw = config.port.address_width
    return data.StructLayout({"address": aw, "bytes": aw + 1, "dest": range(len(config.reads)), "unpack": 1,
                              "count": _JOB_BITS, "cols": _JOB_BITS})


class _Read(enum.Enum, shape=4):
    IDLE = 0
    ABSMAX2 = 1
    EXPONENTS = 2
    ABSMAX = 3
    X = 4
    CODES = 5
    RANK_OPERANDS = 6
    RANK_COLUMNS = 7
    RANK_ROWS = 8
    X_FIELDS = 9


class ReadIssuer(wiring.Component):
    """Per span, the read jobs of ``golden/blockprogram.py``'s ``forward_product`` (``backward_product`` when
    ``shape.transposed``), in its order.

    Forward: at a token block's start ``absmax2``, at a feature block's start its absmax codes (one job), then per
    span each token row's piece of x and each W row's 32 bytes of codes. Transposed: at a token block's start
    ``absmax2`` and the chunk exponent table, then per span each token row's piece of dy, and each of the span's
    64 W rows' absmax codes and codes of the column block. With the rank-r term, in a token block's first feature
    block before each span's activation the span's piece of A (each of its ``rank`` rows' 64 values) or of B (its
    64 rows), and after a block's first span the block's rows of B or columns of A. With the gradient, transposed,
    the token block's rows of hb before the second column block's first span's dy; and in grad_A's pass over x
    (``x_pass`` spans), gb's rows and x's chunk fields before the first span's x, then per span each token row's
    piece of x.

    Attributes
    ----------
    spans : In(stream of :func:`span_beat_layout`)
    shape : In(:func:`shape_layout`); addresses ``x``, ``codes``, ``absmax``, ``absmax2``, ``exponents`` (and
        ``rank_operands``, ``rank_columns`` with the term); ``groups``: held
    gb_written : In(1), with the gradient: gb's write has left on the port (its read back waits for it, as the
        port's contract asks of a read of data the product wrote)
    jobs : Out(stream of :func:`read_beat_layout`)
    """

    def __init__(self, config):
        self.config = config
        aw = config.port.address_width
        addresses = _ADDRESSES + (RANK_READS if config.rank else ()) + (
            GRADIENT_READS + _PASS_ADDRESSES if config.gradient else ())
        gradient = {"gb_written": In(1)} if config.gradient else {}
        super().__init__({"spans": In(stream.Signature(span_beat_layout())), "shape": In(shape_layout()),
                          **{name: In(aw) for name in addresses}, **gradient,
                          "groups": In(16), "jobs": Out(stream.Signature(read_beat_layout(config)))})

    def elaborate(self, platform):
        m = Module()
        aw = self.config.port.address_width
        chunk_shift = self.config.gemm.chunk_steps.bit_length() - 1
        shape = self.shape
        tr = shape.transposed
        per_row, reduction = Signal(16), Signal(16)
        m.d.comb += [per_row.eq(shape.d_in >> _SPAN_SHIFT), reduction.eq(_reduction(shape))]
        span = Signal(span_beat_layout())
        state = Signal(_Read)
        x_address, codes_address, absmax_address = Signal(aw), Signal(aw), Signal(aw)
        left = Signal(16)                  # rows of the current kind still to issue
        beat = self.jobs.payload
        m.d.comb += self.spans.ready.eq(state == _Read.IDLE)
        take = self.spans.valid & self.spans.ready
        incoming = self.spans.payload
        rank = self.config.rank

        def to_x(beat):
            """The activation's reads, after the span's operand reads in a token block's first feature block and,
            with the gradient, the token block's rows of hb before the second column block's first span."""
            if not rank:
                return _Read.X
            following = Mux(beat.f0 == 0, _Read.RANK_OPERANDS, _Read.X)
            if self.config.gradient:
                following = Mux(tr & (beat.f0 == shape.features) & (beat.s == 0), _Read.RANK_ROWS, following)
            return following

        # the span's first W row and first column: forward the feature block's row f0 and column 64 s, transposed
        # row 64 s and column f0
        row0 = Mux(tr, incoming.s << _SPAN_SHIFT, incoming.f0)
        col0 = Mux(tr, incoming.f0, incoming.s << _SPAN_SHIFT)
        with m.If(take):
            m.d.sync += [
                span.eq(incoming),
                # a token row's piece of span s: x + ((t0 + i) * reduction + 64 s) * 2
                x_address.eq(self.x + ((incoming.t0 * reduction) << 1) + (incoming.s << (_SPAN_SHIFT + 1))),
                codes_address.eq(self.codes + ((row0 * shape.d_in + col0) >> 1)),
                absmax_address.eq(self.absmax + row0 * per_row + (col0 >> _SPAN_SHIFT)),
                left.eq(incoming.nt),
                state.eq(Mux(incoming.first_t, _Read.ABSMAX2,
                             Mux(incoming.first_f & ~tr, _Read.ABSMAX, to_x(incoming)))),
            ]
            if self.config.gradient:
                # grad_A's pass (all tokens, from token 0): x's span s, a row d_in apart; gb's rows first
                with m.If(incoming.x_pass):
                    m.d.sync += [x_address.eq(self.pass_x + (incoming.s << (_SPAN_SHIFT + 1))),
                                 state.eq(Mux(incoming.s == 0, _Read.RANK_ROWS, _Read.X))]
        issued = self.jobs.valid & self.jobs.ready
        with m.Switch(state):
            with m.Case(_Read.ABSMAX2):
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(self.absmax2), beat.bytes.eq(self.groups << 2),
                             beat.dest.eq(READS.index("absmax2")), beat.unpack.eq(1), beat.count.eq(self.groups),
                             beat.cols.eq(self.groups)]
                with m.If(issued):
                    m.d.sync += state.eq(Mux(tr, _Read.EXPONENTS, Mux(span.first_f, _Read.ABSMAX, to_x(span))))
            with m.Case(_Read.EXPONENTS):
                entries = shape.d_out >> chunk_shift
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(self.exponents), beat.bytes.eq(entries),
                             beat.dest.eq(READS.index("exponents")), beat.unpack.eq(1), beat.count.eq(entries),
                             beat.cols.eq(entries)]
                with m.If(issued):
                    m.d.sync += state.eq(to_x(span))
            with m.Case(_Read.ABSMAX):
                # forward: the feature block's codes, one job; transposed: the port words that hold each W row's
                # codes of the column block (the same number for every row), one unpacker job for the span
                wb = self.config.port.word_bytes
                _, _, row_bytes = absmax_window(span, wb)
                codes = Mux(tr, row_bytes, span.nf * per_row)
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(Mux(tr, absmax_address & ~(wb - 1),
                                                                        absmax_address)),
                             beat.bytes.eq(codes), beat.dest.eq(READS.index("absmax")),
                             beat.unpack.eq(~tr | (left == SPAN)), beat.count.eq(Mux(tr, row_bytes << _SPAN_SHIFT,
                                                                                     codes)),
                             beat.cols.eq(codes)]
                with m.If(issued):
                    with m.If(~tr):
                        m.d.sync += state.eq(to_x(span))
                    with m.Else():
                        m.d.sync += [absmax_address.eq(absmax_address + per_row), left.eq(left - 1)]
                        with m.If(left == 1):
                            m.d.sync += [state.eq(_Read.CODES), left.eq(SPAN)]
            with m.Case(_Read.X):
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(x_address), beat.bytes.eq(SPAN * 2),
                             beat.dest.eq(READS.index("x")), beat.unpack.eq(left == span.nt),
                             beat.count.eq(span.nt << _SPAN_SHIFT), beat.cols.eq(SPAN)]
                with m.If(issued):
                    m.d.sync += [x_address.eq(x_address + (Mux(span.x_pass, shape.d_in, reduction) << 1)),
                                 left.eq(left - 1)]
                    with m.If(left == 1):
                        m.d.sync += [state.eq(Mux(span.x_pass, _Read.IDLE, Mux(tr, _Read.ABSMAX, _Read.CODES))),
                                     left.eq(Mux(tr, SPAN, span.nf))]
            with m.Case(_Read.CODES):
                # forward: nf W rows of 32 bytes; transposed: 64 W rows of nf / 2 bytes; nf x 64 codes either way
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(codes_address),
                             beat.bytes.eq(Mux(tr, span.nf >> 1, SPAN // 2)), beat.dest.eq(READS.index("codes")),
                             beat.unpack.eq(left == Mux(tr, SPAN, span.nf)), beat.count.eq(span.nf << _SPAN_SHIFT),
                             beat.cols.eq(SPAN)]
                with m.If(issued):
                    m.d.sync += [codes_address.eq(codes_address + (shape.d_in >> 1)), left.eq(left - 1)]
                    with m.If(left == 1):
                        m.d.sync += state.eq(_Read.IDLE)
                        if self.config.rank:
                            with m.If(span.s == 0):
                                m.d.sync += state.eq(_Read.RANK_COLUMNS)
        if self.config.rank:
            self._rank_reads(m, state, span, beat, issued, take)
        if self.config.gradient:
            shift = rank.bit_length() - 1
            with m.If(state == _Read.RANK_ROWS):
                # hb's rows for grad_B, gb's for grad_A's pass (once gb's write has left)
                m.d.comb += [self.jobs.valid.eq(~span.x_pass | self.gb_written),
                             beat.address.eq(Mux(span.x_pass, self.gb, self.rank_rows) + (span.t0 << (shift + 1))),
                             beat.bytes.eq(span.nt << (shift + 1)),
                             beat.dest.eq(self.config.reads.index("rank_rows")), beat.unpack.eq(1),
                             beat.count.eq(span.nt << shift), beat.cols.eq(span.nt << shift)]
                with m.If(issued):
                    m.d.sync += state.eq(Mux(span.x_pass, _Read.X_FIELDS, _Read.X))
            with m.If(state == _Read.X_FIELDS):
                # x's chunk fields, a byte per 16 token rows
                fields = (shape.t + 15) >> 4
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(self.x_fields), beat.bytes.eq(fields),
                             beat.dest.eq(self.config.reads.index("x_fields")), beat.unpack.eq(1),
                             beat.count.eq(fields), beat.cols.eq(fields)]
                with m.If(issued):
                    m.d.sync += state.eq(_Read.X)
        return m

    def _rank_reads(self, m, state, span, beat, issued, take):
        """Forward the span's piece of each of A's ``rank`` rows (float32, 64 values, one job each) and, after a
        block's first span, the feature block's rows of B (``rank`` values a row, one job); transposed the span's
        64 rows of B (one job) and the column block's piece of each of A's rows (one job each, one unpacker job for
        them all: A's rows ``rank`` columns a segment, as the term takes them)."""
        rank, tr = self.config.rank, self.shape.transposed
        shift = rank.bit_length() - 1
        address, left = Signal.like(self.rank_columns), Signal(range(rank + 1))
        operand, operands_left = Signal.like(self.rank_operands), Signal(range(rank + 1))
        incoming = self.spans.payload
        with m.If(take):
            m.d.sync += [address.eq(self.rank_columns + Mux(tr, incoming.f0 << 2, incoming.f0 << (shift + 2))),
                         left.eq(rank),
                         operand.eq(self.rank_operands + Mux(tr, incoming.s << (_SPAN_SHIFT + 2 + shift),
                                                             incoming.s << (_SPAN_SHIFT + 2))),
                         operands_left.eq(rank)]
        with m.Switch(state):
            with m.Case(_Read.RANK_OPERANDS):
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(operand),
                             beat.bytes.eq(Mux(tr, SPAN * 4 * rank, SPAN * 4)),
                             beat.dest.eq(self.config.reads.index("rank_operands")),
                             beat.unpack.eq(operands_left == rank), beat.count.eq(SPAN * rank), beat.cols.eq(SPAN)]
                with m.If(issued):
                    m.d.sync += [operand.eq(operand + (self.shape.d_in << 2)), operands_left.eq(operands_left - 1)]
                    with m.If(tr | (operands_left == 1)):
                        m.d.sync += state.eq(_Read.X)
            with m.Case(_Read.RANK_COLUMNS):
                m.d.comb += [self.jobs.valid.eq(1), beat.address.eq(address),
                             beat.bytes.eq(Mux(tr, span.nf << 2, span.nf << (shift + 2))),
                             beat.dest.eq(self.config.reads.index("rank_columns")), beat.unpack.eq(left == rank),
                             beat.count.eq(span.nf << shift), beat.cols.eq(rank)]
                with m.If(issued):
                    m.d.sync += [address.eq(address + (self.shape.d_in << 2)), left.eq(left - 1)]
                    with m.If(~tr | (left == 1)):
                        m.d.sync += state.eq(_Read.IDLE)


class XBuffer(wiring.Component):
    """The corner turn of a span's x piece: ``nt`` token rows of :data:`SPAN` bf16 values in, the engine's A
    beats out: for each tile of ``rows`` tokens, per reduction index, the tile's ``rows`` values.

    Token ``i`` lives in bank ``i % rows`` at word ``(i // rows) * 64 + k``: a beat is one word of every bank. The
    buffer loads a span, then serves it; it loads the next while the engine computes (the engine holds a block
    job's A tiles in its own buffer).

    Attributes
    ----------
    values : In(stream of bf16): the x piece, token row after token row
    spans : In(stream of :func:`span_beat_layout`)
    a : Out(stream of :func:`~.gemm.a_layout`)
    """

    def __init__(self, config):
        self.config = config
        super().__init__({"values": In(stream.Signature(BF16.width)),
                          "spans": In(stream.Signature(span_beat_layout())),
                          "a": Out(stream.Signature(a_layout(config.rows)))})

    def elaborate(self, platform):
        m = Module()
        rows, depth = self.config.rows, self.config.tiles * SPAN
        banks = [Memory(shape=BF16.width, depth=depth, init=[]) for _ in range(rows)]
        for b, bank in enumerate(banks):
            m.submodules[f"bank_{b}"] = bank
        loading, serving = Signal(), Signal()
        tiles = Signal(16)
        k = Signal(range(SPAN))
        bank = Signal(range(rows)) if rows > 1 else None
        tile, word = Signal(16), Signal(range(depth))
        m.d.comb += self.spans.ready.eq(~loading & ~serving)
        with m.If(self.spans.valid & self.spans.ready):
            m.d.sync += [loading.eq(1), tiles.eq(self.spans.payload.nt >> (rows.bit_length() - 1)), k.eq(0),
                         tile.eq(0), word.eq(0)]
            if bank is not None:
                m.d.sync += bank.eq(0)

        # load: value k of token (tile * rows + bank) to that bank's word tile * 64 + k
        m.d.comb += self.values.ready.eq(loading)
        for b, memory in enumerate(banks):
            port = memory.write_port()
            m.d.comb += [port.addr.eq(word), port.data.eq(self.values.payload),
                         port.en.eq(self.values.valid & loading & ((bank == b) if bank is not None else 1))]
        with m.If(self.values.valid & loading):
            m.d.sync += [k.eq(k + 1), word.eq(word + 1)]
            with m.If(k == SPAN - 1):
                last_bank = (bank == rows - 1) if bank is not None else 1
                if bank is not None:
                    m.d.sync += bank.eq(bank + 1)
                with m.If(last_bank):
                    m.d.sync += tile.eq(tile + 1)
                    with m.If(tile == tiles - 1):
                        m.d.sync += [loading.eq(0), serving.eq(1), word.eq(0)]
                with m.Else():
                    m.d.sync += word.eq(word - (SPAN - 1))   # the same tile's words, the next bank

        # serve: word w of every bank is the beat (w = tile * 64 + k), in order
        ports = [memory.read_port(domain="sync") for memory in banks]
        out_valid = Signal()
        advance = ~out_valid | self.a.ready
        issue = serving & advance
        for port in ports:
            m.d.comb += [port.addr.eq(word), port.en.eq(advance)]
        m.d.comb += [self.a.valid.eq(out_valid), self.a.payload.eq(Cat(*(port.data for port in ports)))]
        with m.If(advance):
            m.d.sync += out_valid.eq(issue)
        with m.If(issue):
            m.d.sync += word.eq(word + 1)
            with m.If(word == (tiles << _SPAN_SHIFT) - 1):
                m.d.sync += serving.eq(0)
        return m


def plan_layout():
    """A :class:`SpanTable` beat: with ``load``, first take ``load_count`` values into the table; then give
    ``count`` rows of ``width`` consecutive entries, the first row from ``start``, the rows ``step`` apart."""
    return data.StructLayout({"load": 1, "load_count": 32, "start": 32, "count": 16, "width": 16, "step": 16})


class SpanTable(wiring.Component):
    """A table of 8-bit values loaded from memory now and then and served a few per span: a feature block's
    absmax codes (``nf`` W rows of ``d_in / 64``, loaded at its start, column ``s`` served per span: the
    dequantizer's ``absmax`` stream), transposed a span's absmax codes (64 W rows of whole port words, loaded per
    span, each row's codes of the column block served: the port's words hold a few more) or the whole rows' chunk
    exponents (loaded per token block, the span's ``64 / chunk`` served per span: the engine's tile exponents).

    Attributes
    ----------
    plans : In(stream of :func:`plan_layout`): one per span
    values : In(stream of 8 bits): the values loaded, after each plan with ``load``
    out : Out(stream of 8 bits)
    """

    def __init__(self, depth):
        if not _is_int(depth) or depth < 1:
            raise ValueError(f"depth must be a positive integer, not {depth!r}")
        self.depth = depth
        super().__init__({"plans": In(stream.Signature(plan_layout())), "values": In(stream.Signature(8)),
                          "out": Out(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        depth = self.depth
        m.submodules.table = table = Memory(shape=8, depth=depth, init=[])
        loading, serving = Signal(), Signal()
        load_left, left = Signal(32), Signal(16)
        step, width, column = Signal(16), Signal(16), Signal(16)
        write_address, read_address, row_address = Signal(range(depth)), Signal(range(depth)), Signal(range(depth))
        plan = self.plans.payload
        m.d.comb += self.plans.ready.eq(~loading & ~serving)
        with m.If(self.plans.valid & self.plans.ready):
            m.d.sync += [left.eq(plan.count), read_address.eq(plan.start), row_address.eq(plan.start),
                         step.eq(plan.step), width.eq(plan.width), column.eq(0), write_address.eq(0),
                         load_left.eq(plan.load_count)]
            with m.If(plan.load):
                m.d.sync += loading.eq(1)
            with m.Else():
                m.d.sync += serving.eq(1)

        write = table.write_port()
        m.d.comb += [self.values.ready.eq(loading), write.addr.eq(write_address), write.data.eq(self.values.payload),
                     write.en.eq(self.values.valid & loading)]
        with m.If(self.values.valid & loading):
            m.d.sync += [write_address.eq(write_address + 1), load_left.eq(load_left - 1)]
            with m.If(load_left == 1):
                m.d.sync += [loading.eq(0), serving.eq(1)]

        read = table.read_port(domain="sync")
        out_valid = Signal()
        advance = ~out_valid | self.out.ready
        issue = serving & advance
        m.d.comb += [read.addr.eq(read_address), read.en.eq(advance), self.out.valid.eq(out_valid),
                     self.out.payload.eq(read.data)]
        with m.If(advance):
            m.d.sync += out_valid.eq(issue)
        with m.If(issue):
            with m.If(column != width - 1):
                m.d.sync += [column.eq(column + 1), read_address.eq(read_address + 1)]
            with m.Else():
                m.d.sync += [column.eq(0), left.eq(left - 1), read_address.eq(row_address + step),
                             row_address.eq(row_address + step)]
                with m.If(left == 1):
                    m.d.sync += serving.eq(0)
        return m


def absmax_window(beat, word_bytes):
    """Transposed: where a span's W row's absmax codes of the column block lie in the port words read for it:
    ``(head, codes, words_bytes)``, the codes before them in the first word, their number, and the bytes of the
    words (the same for every row: a W row's codes are whole port words)."""
    head = (beat.f0 >> _SPAN_SHIFT) & (word_bytes - 1)
    codes = beat.nf >> _SPAN_SHIFT
    return head, codes, (head + codes + word_bytes - 1) & ~(word_bytes - 1)


def absmax_plan(beat, shape, word_bytes):
    """The :class:`SpanTable` plan of a span: forward, a feature block's absmax codes at its start and column
    ``s`` of its rows per span; transposed, the span's 64 W rows' words each span and each row's codes of the
    column block."""
    per_row = shape.d_in >> _SPAN_SHIFT
    head, codes, row_bytes = absmax_window(beat, word_bytes)
    tr = shape.transposed
    return {"load": beat.first_f | tr, "load_count": Mux(tr, row_bytes << _SPAN_SHIFT, beat.nf * per_row),
            "start": Mux(tr, head, beat.s), "count": Mux(tr, SPAN, beat.nf), "width": Mux(tr, codes, 1),
            "step": Mux(tr, row_bytes, per_row)}


def exponent_plan(beat, shape, chunk):
    """The :class:`SpanTable` plan of a span (transposed): the table of W's chunk exponents at a token block's
    start, the span's ``64 / chunk`` per span."""
    shift = chunk.bit_length() - 1
    return {"load": beat.first_t, "load_count": shape.d_out >> shift, "start": beat.s << (_SPAN_SHIFT - shift),
            "count": SPAN // chunk, "width": 1, "step": 1}


class JobIssuer(wiring.Component):
    """Per span: the engine's block job (all but a feature block's first span resumed, all but its last held;
    transposed when the shape is), the dequantizer's tensor beat (the span's ``nf x 64`` weights, each block with
    its own ``absmax2``) and the
    :class:`~.nf4_span.SpanScales` descriptor (the span's blocks in the weight; a new table at each token block,
    as ``absmax2`` is read then).

    Attributes
    ----------
    spans : In(stream of :func:`span_beat_layout`)
    shape : In(:func:`shape_layout`); ``groups``, ``offset``: held
    job : Out(stream of the engine's job layout)
    tensor : Out(stream of the dequantizer's tensor layout)
    span : Out(stream of :func:`~.nf4_span.span_layout`)
    """

    def __init__(self):
        super().__init__({"spans": In(stream.Signature(span_beat_layout())), "shape": In(shape_layout()),
                          "groups": In(16), "offset": In(32),
                          "job": Out(stream.Signature(engine_job_layout())),
                          "tensor": Out(stream.Signature(tensor_layout(True))),
                          "span": Out(stream.Signature(span_layout()))})

    def elaborate(self, platform):
        m = Module()
        beat = self.spans.payload
        tr = self.shape.transposed
        per_row = Signal(16)
        m.d.comb += per_row.eq(self.shape.d_in >> _SPAN_SHIFT)
        outs = (self.job, self.tensor, self.span)
        sent = [Signal(name=f"sent_{name}") for name in ("job", "tensor", "span")]
        weights = beat.nf << _SPAN_SHIFT
        # forward: the span is nf W rows by one block; transposed: 64 W rows by the column block's nf / 64 blocks
        row0 = Mux(tr, beat.s << _SPAN_SHIFT, beat.f0)
        col0 = Mux(tr, beat.f0, beat.s << _SPAN_SHIFT)
        m.d.comb += [
            self.job.payload.m.eq(beat.nt), self.job.payload.n.eq(Mux(tr, SPAN, beat.nf)),
            self.job.payload.k.eq(Mux(tr, beat.nf, SPAN)), self.job.payload.transposed.eq(tr),
            self.job.payload.weights.eq(weights), self.job.payload.block.eq(1),
            self.job.payload.resume.eq(~beat.first_f), self.job.payload.hold.eq(~beat.final),
            self.tensor.payload.n_weights.eq(weights), self.tensor.payload.offset.eq(self.offset),
            self.tensor.payload.absmax2_per_block.eq(1),
            self.span.payload.first.eq(row0 * per_row + (col0 >> _SPAN_SHIFT)),
            self.span.payload.rows.eq(Mux(tr, SPAN, beat.nf)),
            self.span.payload.blocks.eq(Mux(tr, beat.nf >> _SPAN_SHIFT, 1)), self.span.payload.stride.eq(per_row),
            self.span.payload.groups.eq(self.groups), self.span.payload.new_table.eq(beat.first_t),
        ]
        done = []
        for out, flag in zip(outs, sent):
            m.d.comb += out.valid.eq(self.spans.valid & ~flag)
            done.append(flag | out.ready)
        m.d.comb += self.spans.ready.eq(Cat(*done).all())
        with m.If(self.spans.valid):
            for out, flag in zip(outs, sent):
                with m.If(self.spans.ready):
                    m.d.sync += flag.eq(0)
                with m.Elif(out.valid & out.ready):
                    m.d.sync += flag.eq(1)
        return m


class OutputIssuer(wiring.Component):
    """After a feature block's last span: the packer's job (the block's ``nt * nf / cols`` output rows) and the
    write jobs of the block's outputs, in the order they reach the writer: forward one per output row of each
    ``rows x cols`` tile, W tile by W tile, the block's tokens in order within one (the engine's order);
    transposed, one per token row of the block (``nf`` outputs, contiguous in dx), after the
    :class:`OutputTurn`, whose job it also gives.

    Attributes
    ----------
    spans : In(stream of :func:`span_beat_layout`)
    shape : In(:func:`shape_layout`); ``y``: held
    jobs : Out(stream of :func:`~.memport.job_layout`), to the burst writer
    pack : Out(stream of 32 bits): elements (output rows) per block, to the packer
    turn : Out(stream of :func:`turn_layout`): transposed, the block's job of the output corner turn
    """

    def __init__(self, config):
        self.config = config
        super().__init__({"spans": In(stream.Signature(span_beat_layout())), "shape": In(shape_layout()),
                          "y": In(config.port.address_width),
                          "jobs": Out(stream.Signature(write_job_layout(config.port))),
                          "pack": Out(stream.Signature(32)), "turn": Out(stream.Signature(turn_layout()))})

    def elaborate(self, platform):
        m = Module()
        rows, cols = self.config.rows, self.config.cols
        row_shift, col_shift = rows.bit_length() - 1, cols.bit_length() - 1
        aw = self.config.port.address_width
        shape, beat = self.shape, self.spans.payload
        tr = shape.transposed
        busy = Signal()                                  # the block's write jobs are being issued
        packed, turned = Signal(init=1), Signal(init=1)  # its packer's and turn's jobs are taken
        tokens, left_tiles, token = Signal(16), Signal(16), Signal(16)
        job_bytes = Signal(16)
        column_address, address = Signal(aw), Signal(aw)
        # forward: per W tile (cols outputs, 2 cols bytes apart) the block's tokens, an output row apart;
        # transposed: the block's tokens once, each a run of nf outputs
        m.d.comb += self.spans.ready.eq(~busy & packed & turned)
        with m.If(self.spans.valid & self.spans.ready & beat.final):
            start = self.y + ((beat.t0 * _outputs(shape) + beat.f0) << 1)
            m.d.sync += [
                busy.eq(1), packed.eq(0), turned.eq(~tr), tokens.eq(beat.nt), token.eq(0),
                left_tiles.eq(Mux(tr, 1, beat.nf >> col_shift)), job_bytes.eq(Mux(tr, beat.nf << 1, cols * 2)),
                column_address.eq(start), address.eq(start),
                self.pack.payload.eq((beat.nt * beat.nf) >> col_shift),
                self.turn.payload.tiles.eq(beat.nt >> row_shift), self.turn.payload.col_tiles.eq(beat.nf >> col_shift),
            ]
        m.d.comb += [self.pack.valid.eq(~packed), self.turn.valid.eq(~turned)]
        with m.If(self.pack.valid & self.pack.ready):
            m.d.sync += packed.eq(1)
        with m.If(self.turn.valid & self.turn.ready):
            m.d.sync += turned.eq(1)
        m.d.comb += [self.jobs.valid.eq(busy), self.jobs.payload.address.eq(address),
                     self.jobs.payload.bytes.eq(job_bytes)]
        with m.If(self.jobs.valid & self.jobs.ready):
            with m.If(token == tokens - 1):
                m.d.sync += [token.eq(0), left_tiles.eq(left_tiles - 1), column_address.eq(column_address + cols * 2),
                             address.eq(column_address + cols * 2)]
                with m.If(left_tiles == 1):
                    m.d.sync += busy.eq(0)
            with m.Else():
                m.d.sync += [token.eq(token + 1), address.eq(address + (_outputs(shape) << 1))]
        return m


def turn_layout():
    """An :class:`OutputTurn` job: a block's ``tiles`` token tiles of ``col_tiles`` column tiles each."""
    return data.StructLayout({"tiles": 16, "col_tiles": 16})


class OutputTurn(wiring.Component):
    """The transposed product's output corner turn: a token tile's outputs come from the engine column tile by
    column tile (the tile's ``rows`` output rows within one) and leave token row by token row (each row's column
    tiles in order), so that each token row of a block is one write job of contiguous bytes rather than one
    16-byte write per tile row, each in another DRAM row. Two halves of ``rows x max_features`` outputs: one fills
    while the other drains.

    Attributes
    ----------
    jobs : In(stream of :func:`turn_layout`): one per block
    rows_in : In(stream of ``cols`` bf16): the engine's output rows
    rows_out : Out(stream of ``cols`` bf16)
    """

    def __init__(self, config):
        self.config = config
        width = config.cols * BF16.width
        super().__init__({"jobs": In(stream.Signature(turn_layout())), "rows_in": In(stream.Signature(width)),
                          "rows_out": Out(stream.Signature(width))})

    def elaborate(self, platform):
        m = Module()
        rows, stride = self.config.rows, self.config.max_features // self.config.cols
        half = rows * stride
        m.submodules.buffer = buffer = Memory(shape=self.config.cols * BF16.width, depth=2 * half, init=[])
        write, read = buffer.write_port(), buffer.read_port(domain="sync")
        full = Signal(2)
        col_tiles = [Signal(16, name=f"col_tiles_{h}") for h in range(2)]

        # fill: job by job, token tile by token tile into alternate halves; beat (ct, r) to word r * stride + ct
        busy, w_half = Signal(), Signal()
        tiles_left, w_ct, w_r = Signal(16), Signal(16), Signal(range(rows + 1))
        job = Signal(turn_layout())
        m.d.comb += self.jobs.ready.eq(~busy)
        with m.If(self.jobs.valid & self.jobs.ready):
            m.d.sync += [busy.eq(1), job.eq(self.jobs.payload), tiles_left.eq(self.jobs.payload.tiles), w_ct.eq(0),
                         w_r.eq(0)]
        filling = busy & ~full.bit_select(w_half, 1)
        m.d.comb += [self.rows_in.ready.eq(filling), write.data.eq(self.rows_in.payload),
                     write.addr.eq(w_half * half + w_r * stride + w_ct), write.en.eq(self.rows_in.valid & filling)]
        with m.If(self.rows_in.valid & filling):
            with m.If(w_r != rows - 1):
                m.d.sync += w_r.eq(w_r + 1)
            with m.Else():
                m.d.sync += [w_r.eq(0), w_ct.eq(w_ct + 1)]
                with m.If(w_ct == job.col_tiles - 1):
                    m.d.sync += [w_ct.eq(0), w_half.eq(~w_half), tiles_left.eq(tiles_left - 1)]
                    for h in range(2):
                        with m.If(w_half == h):
                            m.d.sync += [full[h].eq(1), col_tiles[h].eq(job.col_tiles)]
                    with m.If(tiles_left == 1):
                        m.d.sync += busy.eq(0)

        # drain: the full half's token rows in order, each row's column tiles in order
        r_half, r_ct, r_r = Signal(), Signal(16), Signal(range(rows + 1))
        out_valid = Signal()
        advance = ~out_valid | self.rows_out.ready
        issue = full.bit_select(r_half, 1) & advance
        m.d.comb += [read.addr.eq(r_half * half + r_r * stride + r_ct), read.en.eq(advance),
                     self.rows_out.valid.eq(out_valid), self.rows_out.payload.eq(read.data)]
        with m.If(advance):
            m.d.sync += out_valid.eq(issue)
        with m.If(issue):
            with m.If(r_ct != Mux(r_half, col_tiles[1], col_tiles[0]) - 1):
                m.d.sync += r_ct.eq(r_ct + 1)
            with m.Else():
                m.d.sync += r_ct.eq(0)
                with m.If(r_r != rows - 1):
                    m.d.sync += r_r.eq(r_r + 1)
                with m.Else():
                    m.d.sync += [r_r.eq(0), r_half.eq(~r_half)]
                    for h in range(2):
                        with m.If(r_half == h):
                            m.d.sync += full[h].eq(0)
        return m


class BlockedProduct(wiring.Component):
    """``y = x W^T`` through one memory port, output-stationary: x ``[t, d_in]`` bf16, W ``[d_out, d_in]`` NF4
    with double quantization (bitsandbytes' flat codes and absmax codes, ``absmax2``), y ``[t, d_out]`` bf16, at
    the addresses of the descriptor; with ``dims.transposed`` (a configuration with ``transposed``), ``dx = dy W``
    with dy ``[t, d_out]`` and dx ``[t, d_in]`` at the addresses of x and y. Its outputs equal ``golden.gemm.gemm``
    of the activation and the dequantized W to the bit (the block jobs add each output's chunks in reduction order;
    transposed, with the whole rows' chunk exponents).

    Attributes
    ----------
    descriptor : In(stream of :func:`descriptor_layout`)
    mem : Out(:class:`~.memport.MemPortSignature`)
    report : Out(stream of :func:`report_layout`)
    engine, reader, scales : the GEMM engine, the tagged reader and the ``absmax2`` table
    """

    def __init__(self, config=BlockedConfig()):
        if not isinstance(config, BlockedConfig):
            raise TypeError(f"config must be a BlockedConfig, not {config!r}")
        self.config = config
        super().__init__({"descriptor": In(stream.Signature(descriptor_layout(config))),
                          "mem": Out(MemPortSignature(config.port)),
                          "report": Out(stream.Signature(report_layout(config.reads)))})
        self.engine = GemmEngine(config.gemm)
        self.x_buffer = XBuffer(config)

    @staticmethod
    def _plan(m, spans, plans, fields, enable):
        """A walker's spans as a table's plans (only while ``enable``: a mode that does not use the table leaves
        its walker waiting until the next descriptor restarts it)."""
        m.d.comb += [plans.valid.eq(spans.valid & enable), spans.ready.eq(plans.ready & enable)]
        for name, value in fields.items():
            m.d.comb += getattr(plans.payload, name).eq(value)

    @staticmethod
    def _take(m, segments, sink):
        """An unpacker's one-lane segments into ``sink``, a stream of one element."""
        m.d.comb += [sink.valid.eq(segments.valid), segments.ready.eq(sink.ready),
                     sink.payload.eq(segments.payload.data[0])]

    def _reads(self, m, head, walkers):
        """The issuer's jobs into the tagged reader, and each job's unpacker job into its destination's queue;
        returns the reader, the unpackers and the issuer."""
        cfg, port = self.config, self.config.port
        m.submodules.read_issuer = issuer = ReadIssuer(cfg)
        wiring.connect(m, walkers["reads"].spans, issuer.spans)
        m.d.comb += [issuer.shape.eq(head.dims), issuer.groups.eq(head.groups)]
        for name in _ADDRESSES + (RANK_READS if cfg.rank else ()) + (
                GRADIENT_READS + _PASS_ADDRESSES if cfg.gradient else ()):
            m.d.comb += getattr(issuer, name).eq(getattr(head, name))
        # with the rank-r term every block RAM counts: the FIFOs of a few kbit (all but the codes') go to LUT RAM
        styles = ["distributed" if cfg.rank and name != "codes" else "block" for name in cfg.reads]
        m.submodules.reader = reader = TaggedReader(port, [cfg.codes_words if name == "codes" else cfg.fifo_words
                                                           for name in cfg.reads], ram_styles=styles)
        wiring.connect(m, reader.read_cmd, wiring.flipped(self.mem.read_cmd))
        wiring.connect(m, wiring.flipped(self.mem.read_data), reader.read_data)
        job = issuer.jobs.payload
        unpack, queue_ready = {}, Signal()
        for i, name in enumerate(cfg.reads):
            lanes = cfg.cols if name == "codes" else 1
            unit = unpack[name] = m.submodules[f"unpack_{name}"] = Unpacker(port.data_width, _ELEM[name], lanes,
                                                                            count_width=_JOB_BITS)
            queue = m.submodules[f"unpack_jobs_{name}"] = SyncFIFOBuffered(width=unit.job.payload.shape().size,
                                                                           depth=4)
            wiring.connect(m, queue.r_stream, unit.job)
            chosen = job.dest == i
            m.d.comb += [queue.w_stream.valid.eq(issuer.jobs.valid & reader.job.ready & chosen & job.unpack),
                         queue.w_stream.payload.eq(Cat(job.count, job.cols))]
            with m.If(chosen):
                m.d.comb += queue_ready.eq(queue.w_stream.ready | ~job.unpack)
            words = reader.dest[i]
            if name == "codes":
                connect_nf4_codes(m, words, unit.words)
            else:
                wiring.connect(m, words, unit.words)
        m.d.comb += [reader.job.valid.eq(issuer.jobs.valid & queue_ready),
                     reader.job.payload.address.eq(job.address), reader.job.payload.bytes.eq(job.bytes),
                     reader.job.payload.dest.eq(job.dest),
                     issuer.jobs.ready.eq(reader.job.ready & queue_ready)]
        return reader, unpack, issuer

    def _inputs(self, m, head, walkers, unpack):
        """The engine's inputs: A through the corner turn (with the rank-r term, through the unit that makes hb or gb
        on the way, and with the gradient the unit that also makes grad_B), codes straight, absmax per span,
        absmax2 from the table, and the jobs. Returns the rows of hb or gb (``None`` without the term) and the rows
        of grad_B with x's chunk fields (``None`` without the gradient)."""
        cfg, engine = self.config, self.engine
        m.submodules.engine = engine
        m.submodules.x_buffer = xbuf = self.x_buffer
        wiring.connect(m, walkers["x"].spans, xbuf.spans)
        rows = grads = None
        if cfg.gradient:
            rows, *grads = self._gradient(m, head, walkers, unpack, xbuf.values)
        elif cfg.rank:
            rows = self._rank_product(m, head, walkers, unpack, xbuf.values)
        else:
            self._take(m, unpack["x"].segments, xbuf.values)
        wiring.connect(m, xbuf.a, engine.a)
        seg = unpack["codes"].segments
        m.d.comb += [engine.codes.valid.eq(seg.valid), seg.ready.eq(engine.codes.ready),
                     engine.codes.payload.eq(seg.payload.data)]
        # absmax codes through their table: forward a feature block's, transposed a span's rows' port words
        tr = head.dims.transposed
        m.submodules.absmax_table = absmax = SpanTable(cfg.absmax_depth)
        self._plan(m, walkers["absmax"].spans, absmax.plans,
                   absmax_plan(walkers["absmax"].spans.payload, head.dims, cfg.port.word_bytes), 1)
        self._take(m, unpack["absmax"].segments, absmax.values)
        wiring.connect(m, absmax.out, engine.absmax)
        # transposed: each W tile's exponent (over the whole rows) from the table read per token block
        m.submodules.exponent_table = exps = SpanTable(cfg.exponent_depth)
        self._plan(m, walkers["exponents"].spans, exps.plans,
                   exponent_plan(walkers["exponents"].spans.payload, head.dims, cfg.gemm.chunk_steps), tr)
        self._take(m, unpack["exponents"].segments, exps.values)
        m.d.comb += [engine.exponents.valid.eq(exps.out.valid), exps.out.ready.eq(engine.exponents.ready),
                     engine.exponents.payload.eq(exps.out.payload.as_signed())]
        m.submodules.scales = scales = SpanScales(cfg.max_groups)
        self._take(m, unpack["absmax2"].segments, scales.table)
        wiring.connect(m, scales.absmax2, engine.absmax2)
        m.submodules.job_issuer = jobs = JobIssuer()
        wiring.connect(m, walkers["jobs"].spans, jobs.spans)
        m.d.comb += [jobs.shape.eq(head.dims), jobs.groups.eq(head.groups), jobs.offset.eq(head.offset)]
        wiring.connect(m, jobs.job, engine.job)
        wiring.connect(m, jobs.tensor, engine.tensor)
        wiring.connect(m, jobs.span, scales.span)
        return rows, grads

    @staticmethod
    def _gather(m, segments, sink, lanes, convert=None):
        """An unpacker's one-lane segments, one value a cycle (through ``convert``, a comb unit with ports ``a``
        and ``result``, if given), gathered into ``lanes``-wide beats of ``sink``."""
        gathered = Signal.like(sink.payload)
        lane, full = Signal(range(lanes)), Signal()
        value = segments.payload.data[0]
        if convert is not None:
            m.d.comb += convert.a.eq(value)
            value = convert.result
        m.d.comb += [segments.ready.eq(~full), sink.valid.eq(full), sink.payload.eq(gathered)]
        with m.If(sink.valid & sink.ready):
            m.d.sync += full.eq(0)
        with m.If(segments.valid & segments.ready):
            m.d.sync += [gathered[lane].eq(value), lane.eq(lane + 1)]
            with m.If(lane == lanes - 1):
                m.d.sync += [full.eq(1), lane.eq(0)]

    def _gradient(self, m, head, walkers, unpack, values):
        """With the gradient one :class:`~.rank_gradient.RankGradient` in the activation's path to the x buffer
        (``values``) does both: in a token block's first feature block it makes hb (transposed gb) as
        :meth:`_rank_product` does, and transposed it makes grad_B from dy in the second column block, with the
        token block's rows of hb gathered into beats on the way in (the two never capture together, so they share
        the multipliers, the float pipeline, the table and the partial sums). Returns its rows, its grad_B and
        (forward) x's chunk fields."""
        cfg = self.config
        m.submodules.rank_gradient = unit = RankGradient(cfg.rank_gradient)
        spans = walkers["product"].spans
        beat, span = spans.payload, unit.spans.payload
        tr, x_pass = head.dims.transposed, beat.x_pass
        product = (beat.f0 == 0) & ~x_pass
        gradient = tr & (beat.f0 == head.dims.features) & ~x_pass
        # grad_A's pass over x: transposed gradient spans whose values (x) stop in the unit
        m.d.comb += [unit.spans.valid.eq(spans.valid), spans.ready.eq(unit.spans.ready),
                     span.tokens.eq(beat.nt), span.capture.eq(product | gradient | x_pass), span.product.eq(product),
                     span.first.eq(beat.s == 0), span.last.eq(beat.final),
                     span.transposed.eq((tr & product) | x_pass), span.sink.eq(x_pass),
                     span.load.eq((gradient | x_pass) & (beat.s == 0)), span.scale.eq(head.scaling)]
        self._take(m, unpack["x"].segments, unit.values)
        wiring.connect(m, unit.passed, values)
        self._rank_operands(m, unpack, unit.operands)
        self._gather(m, unpack["rank_rows"].segments, unit.rows, cfg.rank)
        self._take(m, unpack["x_fields"].segments, unit.fields)
        return unit.rows_out, unit.grads, unit.x_fields_out

    def _rank_product(self, m, head, walkers, unpack, values):
        """The activation on its way to the x buffer (``values``) through the unit that makes hb (transposed gb)
        from it in a token block's first feature block. Returns its rows."""
        m.submodules.rank_product = product = RankProduct(self.config.rank_product)
        spans = walkers["product"].spans
        beat, span = spans.payload, product.spans.payload
        m.d.comb += [product.spans.valid.eq(spans.valid), spans.ready.eq(product.spans.ready),
                     span.tokens.eq(beat.nt), span.capture.eq(beat.f0 == 0), span.first.eq(beat.s == 0),
                     span.last.eq(beat.final), span.transposed.eq(head.dims.transposed)]
        self._take(m, unpack["x"].segments, product.values)
        wiring.connect(m, product.passed, values)
        self._rank_operands(m, unpack, product.operands)
        return product.rows

    @staticmethod
    def _rank_operands(m, unpack, sink):
        """A's (transposed B's) span pieces rounded to bf16 on their way into ``sink``."""
        operands = unpack["rank_operands"].segments
        m.submodules.rank_operand_round = rounder = FPConvert(FP32, BF16, stages=0)
        m.d.comb += [sink.valid.eq(operands.valid), operands.ready.eq(sink.ready),
                     rounder.a.eq(operands.payload.data[0]), sink.payload.eq(rounder.result)]

    def _term(self, m, head, walkers, unpack, rank_rows):
        """The rank-r term behind the engine: one block per feature block (loading hb's rows, transposed gb's, at a
        token block's first), those rows from the unit that makes them, B's rows (transposed A's) rounded to bf16
        on the way in, one value a cycle (one rounding instead of one per lane: the memory gives at most two a
        cycle, and the columns load while the block's earlier spans compute), gathered into ``rank``-wide beats.
        Returns its output."""
        cfg, engine = self.config, self.engine
        m.submodules.rank_term = term = RankTerm(cfg.rank_term)
        spans = walkers["term"].spans
        beat, block = spans.payload, term.block.payload
        m.d.comb += [term.block.valid.eq(spans.valid & beat.first_f), spans.ready.eq(term.block.ready | ~beat.first_f),
                     block.tokens.eq(beat.nt), block.columns.eq(beat.nf), block.load_rows.eq(beat.first_t),
                     block.load_columns.eq(1), block.scaling.eq(head.scaling),
                     block.transposed.eq(head.dims.transposed), block.exponent.eq(head.rank_exponent)]
        wiring.connect(m, rank_rows, term.row_operands)
        m.submodules.rank_column_round = rounder = FPConvert(FP32, BF16, stages=0)
        self._gather(m, unpack["rank_columns"].segments, term.column_operands, cfg.rank, rounder)
        m.d.comb += [term.c.valid.eq(engine.c.valid), engine.c.ready.eq(term.c.ready),
                     term.c.payload.eq(engine.c.payload.data)]
        return term.o

    def _writes(self, m, head, walkers, unpack, rank_rows, grads, issuer):
        """The engine's rows (transposed: through the corner turn; with the rank-r term: through it) through the
        packer into a staging FIFO; a burst's command goes out only when all its words wait there, so the memory
        never waits for the product inside a burst. With the gradient the second writer's too, and the read
        ``issuer`` learns when gb's write has left."""
        cfg, port, engine = self.config, self.config.port, self.engine
        m.submodules.output_issuer = outs = OutputIssuer(cfg)
        wiring.connect(m, walkers["outputs"].spans, outs.spans)
        m.d.comb += [outs.shape.eq(head.dims), outs.y.eq(head.y)]
        m.submodules.packer = packer = Packer(cfg.cols * BF16.width, port.data_width)
        m.d.comb += [packer.job.valid.eq(outs.pack.valid), packer.job.payload.count.eq(outs.pack.payload),
                     outs.pack.ready.eq(packer.job.ready)]
        hb_rows = None
        if cfg.gradient:
            # hb's (transposed gb's) rows to the term and to the second writer (each takes a row when both can)
            to_term = stream.Signature(rank_rows.payload.shape()).create()
            hb_rows = stream.Signature(rank_rows.payload.shape()).create()
            m.d.comb += [to_term.payload.eq(rank_rows.payload), hb_rows.payload.eq(rank_rows.payload),
                         to_term.valid.eq(rank_rows.valid & hb_rows.ready),
                         hb_rows.valid.eq(rank_rows.valid & to_term.ready),
                         rank_rows.ready.eq(to_term.ready & hb_rows.ready)]
            rank_rows = to_term
        if cfg.rank:
            rows = self._term(m, head, walkers, unpack, rank_rows)
            valid, ready, payload = rows.valid, rows.ready, rows.payload
        else:
            valid, ready, payload = engine.c.valid, engine.c.ready, engine.c.payload.data
        if cfg.transposed:
            # transposed: through the corner turn, so that each token row of a block is one write job
            m.submodules.turn = turn = OutputTurn(cfg)
            wiring.connect(m, outs.turn, turn.jobs)
            m.d.comb += turn.rows_in.payload.eq(payload)
            with m.If(head.dims.transposed):
                m.d.comb += [turn.rows_in.valid.eq(valid), ready.eq(turn.rows_in.ready),
                             packer.elements.valid.eq(turn.rows_out.valid),
                             turn.rows_out.ready.eq(packer.elements.ready),
                             packer.elements.payload.eq(turn.rows_out.payload)]
            with m.Else():
                m.d.comb += [packer.elements.valid.eq(valid), ready.eq(packer.elements.ready),
                             packer.elements.payload.eq(payload)]
        else:
            m.d.comb += [packer.elements.valid.eq(valid), ready.eq(packer.elements.ready),
                         packer.elements.payload.eq(payload), outs.turn.ready.eq(1)]
        if not cfg.gradient:
            self._staged_writes(m, "", outs.jobs, packer.words, self.mem.write_cmd, self.mem.write_data)
            return
        # with the gradient a second writer, and the two writers' bursts onto the port whole
        m.submodules.write_arbiter = arbiter = WriteArbiter(port)
        wiring.connect(m, arbiter.write_cmd, wiring.flipped(self.mem.write_cmd))
        wiring.connect(m, arbiter.write_data, wiring.flipped(self.mem.write_data))
        self._staged_writes(m, "", outs.jobs, packer.words, arbiter.cmds[0], arbiter.beats[0])
        self._gradient_writes(m, head, walkers, *grads, hb_rows, arbiter.cmds[1], arbiter.beats[1])
        # gb's job is the second writer's first in the backward product: it has left on the port once that many
        # words have (the arbiter passes a granted writer's beats straight through)
        taken, gb_words = Signal(16), ((head.dims.t * cfg.rank << 1) + port.word_bytes - 1) >> port.word_shift
        with m.If(self.descriptor.valid & self.descriptor.ready):
            m.d.sync += taken.eq(0)
        with m.Elif(arbiter.beats[1].valid & arbiter.beats[1].ready & (taken < gb_words)):
            m.d.sync += taken.eq(taken + 1)
        m.d.comb += issuer.gb_written.eq(taken >= gb_words)

    def _staged_writes(self, m, name, jobs, words, write_cmd, write_data):
        """Write ``jobs`` with a packer's ``words`` through a staging FIFO onto ``write_cmd`` and ``write_data``;
        a burst's command goes out only when all its words wait in the FIFO, so the memory never waits for the
        product inside a burst."""
        port = self.config.port
        writer = m.submodules[f"{name}writer"] = BurstWriter(port)
        wiring.connect(m, jobs, writer.job)
        staging = m.submodules[f"{name}staging"] = SyncFIFOBuffered(width=port.data_width, depth=port.max_burst)
        m.d.comb += [staging.w_stream.valid.eq(words.valid), words.ready.eq(staging.w_stream.ready),
                     staging.w_stream.payload.eq(words.payload.data)]
        wiring.connect(m, staging.r_stream, writer.data)
        staged = staging.level >= writer.write_cmd.payload.length
        m.d.comb += [write_cmd.valid.eq(writer.write_cmd.valid & staged),
                     write_cmd.payload.eq(writer.write_cmd.payload),
                     writer.write_cmd.ready.eq(write_cmd.ready & staged)]
        m.d.comb += [write_data.valid.eq(writer.write_data.valid), write_data.payload.eq(writer.write_data.payload),
                     writer.write_data.ready.eq(write_data.ready)]

    def _gradient_writes(self, m, head, walkers, grads, x_fields, rows, write_cmd, write_data):
        """The second writer's jobs: after a token block's first feature block its rows (forward hb, transposed gb;
        the unit that makes them gives them as the term takes them), one job, and forward then x's chunk fields
        (which the unit gives after the rows), one job; transposed, per span of the second column block its 64
        rows of grad_B from the unit, one job (``64 * rank`` float32, contiguous in grad_B), and per span of
        grad_A's pass over x the span's 64 columns of each of grad_A's ``rank`` rows, a job each."""
        cfg = self.config
        rank, tr = cfg.rank, head.dims.transposed
        rank_shift = rank.bit_length() - 1
        m.submodules.gradient_packer = packer = Packer(FP32.width, cfg.port.data_width)
        # the rows, each cut into rank / 2 float32-wide elements, low first
        held, left = Signal(len(rows.payload.as_value())), Signal(range(rank // 2 + 1))
        m.d.comb += rows.ready.eq(left == 0)
        with m.If(rows.valid & rows.ready):
            m.d.sync += [held.eq(rows.payload), left.eq(rank // 2)]
        with m.If(packer.elements.ready & (left != 0)):
            m.d.sync += [held.eq(held >> FP32.width), left.eq(left - 1)]
        # then (forward) x's chunk fields, four to a float32-wide element (the first in the low byte; the last
        # zero-padded)
        fields, fields_full = Signal(FP32.width), Signal()
        taken, chunks = Signal(range(cfg.rank_gradient.chunks + 1)), (head.dims.t + 15) >> 4
        m.d.comb += x_fields.ready.eq(~fields_full)
        with m.If(x_fields.valid & x_fields.ready):
            m.d.sync += [fields.word_select(taken[:2], 8).eq(x_fields.payload), taken.eq(taken + 1)]
            with m.If((taken[:2] == 3) | (taken + 1 == chunks)):
                m.d.sync += fields_full.eq(1)
            with m.If(taken + 1 == chunks):
                m.d.sync += taken.eq(0)
        with m.If(packer.elements.ready & (left == 0) & fields_full):
            m.d.sync += [fields.eq(0), fields_full.eq(0)]
        # the unit gives its rows, fields and gradients one after the other: whichever waits goes in
        m.d.comb += [packer.elements.valid.eq((left != 0) | fields_full | grads.valid),
                     packer.elements.payload.eq(Mux(left != 0, held[:FP32.width],
                                                    Mux(fields_full, fields, grads.payload))),
                     grads.ready.eq(packer.elements.ready & (left == 0) & ~fields_full)]
        jobs = stream.Signature(write_job_layout(cfg.port)).create()
        spans = walkers["gradient_writes"].spans
        beat = spans.payload
        x_pass = beat.x_pass
        rows_out = (beat.f0 == 0) & beat.final & ~x_pass
        gradient_out = tr & (beat.f0 == head.dims.features) & ~x_pass
        active = rows_out | gradient_out | x_pass
        # a beat's jobs, each with its packer job: forward hb's rows then x's fields, grad_A's rank pieces
        packed, written = Signal(), Signal()
        part = Signal(range(max(rank, 2)))
        row_offset = Signal(cfg.port.address_width)      # grad_A's row part: part * d_in * 4
        last_part = Mux(x_pass, part == rank - 1, Mux(rows_out & ~tr, part == 1, 1))
        fields_words = (head.dims.t + 63) >> 6
        with m.If(x_pass):
            m.d.comb += [packer.job.payload.count.eq(SPAN), jobs.payload.bytes.eq(SPAN * 4),
                         jobs.payload.address.eq(head.gradient_a + row_offset + (beat.s << (_SPAN_SHIFT + 2)))]
        with m.Elif(gradient_out):
            m.d.comb += [packer.job.payload.count.eq(SPAN * rank), jobs.payload.bytes.eq(SPAN * rank * 4),
                         jobs.payload.address.eq(head.gradient + (beat.s << (_SPAN_SHIFT + rank_shift + 2)))]
        with m.Elif(part == 1):
            m.d.comb += [packer.job.payload.count.eq(fields_words), jobs.payload.bytes.eq(fields_words << 2),
                         jobs.payload.address.eq(head.x_fields)]
        with m.Else():
            m.d.comb += [packer.job.payload.count.eq(beat.nt << (rank_shift - 1)),
                         jobs.payload.bytes.eq(beat.nt << (rank_shift + 1)),
                         jobs.payload.address.eq(Mux(tr, head.gb, head.rank_rows) + (beat.t0 << (rank_shift + 1)))]
        done = (packed | packer.job.ready) & (written | jobs.ready)
        m.d.comb += [packer.job.valid.eq(spans.valid & active & ~packed),
                     jobs.valid.eq(spans.valid & active & ~written),
                     spans.ready.eq(~active | (done & last_part))]
        with m.If(spans.valid & active & done & ~last_part):
            m.d.sync += [part.eq(part + 1), packed.eq(0), written.eq(0),
                         row_offset.eq(row_offset + (head.dims.d_in << 2))]
        with m.Elif(spans.valid & spans.ready):
            m.d.sync += [packed.eq(0), written.eq(0), part.eq(0), row_offset.eq(0)]
        with m.Else():
            with m.If(packer.job.valid & packer.job.ready):
                m.d.sync += packed.eq(1)
            with m.If(jobs.valid & jobs.ready):
                m.d.sync += written.eq(1)
        self._staged_writes(m, "gradient_", jobs, packer.words, write_cmd, write_data)

    def elaborate(self, platform):
        m = Module()
        cfg, port = self.config, self.config.port

        # the descriptor, held for the product; `start` pulses the walkers
        head, running, start, reporting = take_descriptor(m, self.descriptor)
        walkers = {}
        names = ("reads", "x", "absmax", "exponents", "jobs", "outputs") + (("product", "term") if cfg.rank else ())
        for name in names + (("gradient_writes",) if cfg.gradient else ()):
            walker = walkers[name] = m.submodules[f"walk_{name}"] = SpanWalker()
            m.d.comb += [walker.shape.eq(head.dims), walker.start.eq(start)]
            if cfg.gradient and name in ("reads", "product", "gradient_writes"):
                # these three walk grad_A's pass over x too, in the backward product
                m.d.comb += [walker.x_pass.eq(head.dims.transposed), walker.x_per_span.eq(head.x_per_span)]
        reader, unpack, issuer = self._reads(m, head, walkers)
        rank_rows, grads = self._inputs(m, head, walkers, unpack)
        self._writes(m, head, walkers, unpack, rank_rows, grads, issuer)
        engine, tr = self.engine, head.dims.transposed

        # counters and the report, once every output word has gone out
        cycles, written, memory, compute = Signal(48), Signal(48), Signal(48), Signal(48)
        before = [Signal(48, name=f"before_{name}") for name in cfg.reads]
        total = Signal(48)
        words = ((head.dims.t * _outputs(head.dims)) << 1) >> port.word_shift
        if cfg.gradient:
            # and the rows (bf16 [t, r]: forward hb, transposed gb), each job's last word padded; forward x's
            # fields (a 32-bit word per 64 tokens, padded too), transposed grad_B and grad_A (float32 [d_out, r]
            # and [r, d_in])
            rows_bytes = ((head.dims.t * cfg.rank) << 1) + port.word_bytes - 1
            fields = (((head.dims.t + 63) >> 6) << 2) + port.word_bytes - 1
            gradients = ((head.dims.d_out + head.dims.d_in) * cfg.rank) << 2
            words = words + (rows_bytes >> port.word_shift) + (Mux(tr, gradients, fields) >> port.word_shift)
        m.d.comb += total.eq(words)
        with m.If(start):
            m.d.sync += [cycles.eq(0), written.eq(0), memory.eq(0), compute.eq(0),
                         *(b.eq(reader.words[i]) for i, b in enumerate(before))]
        with m.Elif(running):
            m.d.sync += cycles.eq(cycles + 1)
            waits = Cat(engine.a.ready & ~engine.a.valid, engine.codes.ready & ~engine.codes.valid,
                        engine.absmax.ready & ~engine.absmax.valid,
                        tr & engine.exponents.ready & ~engine.exponents.valid)
            with m.If(waits.any()):
                m.d.sync += memory.eq(memory + 1)
            with m.If(reader.starved):
                m.d.sync += compute.eq(compute + 1)
            with m.If(self.mem.write_data.valid & self.mem.write_data.ready):
                m.d.sync += written.eq(written + 1)
            with m.If(~start & (written == total)):
                m.d.sync += [running.eq(0), reporting.eq(1)]
        report = self.report.payload
        m.d.comb += [self.report.valid.eq(reporting), report.cycles.eq(cycles), report.written.eq(written),
                     report.memory.eq(memory), report.compute.eq(compute),
                     *(getattr(report, f"read_{name}").eq(reader.words[i] - before[i])
                       for i, name in enumerate(cfg.reads))]
        with m.If(self.report.valid & self.report.ready):
            m.d.sync += reporting.eq(0)
        return m
