"""External-memory traffic of one QLoRA step of one linear layer: bytes per tensor per step for three dataflows.

A projection W ``[d_out, d_in]`` (NF4, blocksize 64, double quantization), T tokens, rank r, AdamW. The tensors
that live in external memory and their widths:

==========================  ==============================================================  ==================
 tensor                      bytes                                                            moved as
==========================  ==============================================================  ==================
 ``W``                       ``ceil(n/2)`` codes + ``ceil(n/64)`` uint8 absmax codes +        read per pass
                             ``4 * ceil(ceil(n/64)/256)`` float32 absmax2 + 4 (offset)
 ``x`` [T, in], ``dy``       bf16                                                             read
 ``y``, ``dx``               bf16                                                             written
 ``A`` [r, in], ``B``        float32 master copies (the products read their bf16 roundings)   read and written
 ``m_A, v_A, m_B, v_B``      float32 AdamW moments (none with SGD)                            read and written
 ``grad_A``, ``grad_B``      float32, only with ``gradients_out`` (the RTL's ``updates``)     written
==========================  ==============================================================  ==================

Three dataflows (``docs/traffic.md`` explains them):

* :func:`today`: the step accelerator's phases (``rtl/lora/``, order F1 F3 F2 B1 B5 B4 B2 B3, update) with every
  operand fetched from external memory the way the GEMM engine consumes it and every product written back: the
  engine loads a tile of ``rows`` rows of its A operand once and streams its whole W operand once per such tile,
  so a job ``(M, N, K)`` reads its A operand once, its W operand ``ceil(M / rows)`` times and writes its output
  once. The scratchpads become external memory: intermediates (hb, gb, yl, dxl, the gradients) are written by the
  phase that makes them and read by each phase that uses them, in that phase's pattern.
* :func:`resident`: the memory-fed step as built (``rtl/lora/memstep.py``): every tensor but the weight read once
  into the on-chip scratchpads, the weight streamed once per tile of ``rows`` tokens in F2 and again in B4, the
  outputs and the update written once (its exact requests: ``golden/memprogram.py``).
* :func:`lower_bound`: the issue's definition: W read once for the forward and once for the backward product, x
  and dy read once, y and dx written once, A, B and the moments read and written once.
* :func:`blocked`: an I/O-aware schedule that keeps token blocks of x (or dy) on chip and streams each weight tile
  once per block; the best block sizes, sweep order and gradient handling an on-chip buffer budget allows.

Everything here is integer byte counts from the shapes (numpy only). The step's compute cycles (the cycle model,
``sim.lora.step_cycles``) are the caller's: ``scripts/traffic_table.py`` takes them from there.
"""

from dataclasses import dataclass, field

__all__ = ["StepShape", "Traffic", "TODAY_PHASES", "DEFAULT_BUFFER_BYTES", "ULX3S_SDRAM_BYTES_PER_S",
           "ECPIX5_DDR3_BYTES_PER_S", "DEFAULT_EFFICIENCY", "CLOCK_HZ", "nf4_bytes", "today", "resident", "lower_bound",
           "blocked", "macs", "memory_seconds", "roofline_point"]

#: On-chip buffer budget of the blocked dataflow: 256 KiB of the ECP5-85F's 479,232 bytes of block RAM (114 of 208
#: DP16KD), leaving 94 DP16KD for the GEMM engine (53 in the 8x8 build, with its weight and activation tiles), the
#: dequantizer (1), the AdamW core (2) and the memory port's FIFOs.
DEFAULT_BUFFER_BYTES = 256 * 1024
#: ULX3S: 16-bit SDR SDRAM at 100 MHz, peak.
ULX3S_SDRAM_BYTES_PER_S = 2 * 100e6
#: ECPIX-5: 16-bit DDR3 (amaranth-boards' ``ddr3`` resource has 16 DQ) at an assumed 400 MT/s, peak.
ECPIX5_DDR3_BYTES_PER_S = 2 * 400e6
#: Assumed sustained fraction of the peak (refresh, row misses, turnarounds) until the DRAM timing model exists.
DEFAULT_EFFICIENCY = 0.8
#: Clock of the compute-time figures.
CLOCK_HZ = 100e6

BF16, FP32 = 2, 4

#: The step accelerator's GEMM phases in execution order (``rtl/lora/config.py: PHASES``; tests check the two
#: agree): ``(name, m, n, k, transposed, a_operand, w_operand, destination)``. The W operand ``"W"`` is the NF4
#: weight from the dequantizer; ``"hb^T"``, ``"x"`` etc. are stores read as W operand rows.
TODAY_PHASES = (
    ("F1", "t", "r", "in", False, "x", "A", "hb"),
    ("F3", "t", "out", "r", False, "hb", "B", "yl"),
    ("F2", "t", "out", "in", False, "x", "W", "y"),
    ("B1", "t", "out", "r", True, "dy", "B", "gb"),
    ("B5", "t", "r", "in", True, "gb", "A", "dxl"),
    ("B4", "t", "out", "in", True, "dy", "W", "dx"),
    ("B2", "out", "r", "t", False, "dy", "hb", "grad_B"),
    ("B3", "r", "t", "in", True, "gb", "x", "grad_A"),
)
#: Element bytes of each tensor as stored (A and B: the float32 masters, rounded to bf16 on their way to the
#: engine; hb, gb: bf16, as the RTL stores them; yl, dxl and the gradients: float32).
_WIDTH = {"x": BF16, "dy": BF16, "y": BF16, "dx": BF16, "hb": BF16, "gb": BF16, "A": FP32, "B": FP32,
          "yl": FP32, "dxl": FP32, "grad_A": FP32, "grad_B": FP32}
#: The partner a combining phase adds to its product on the way out.
_PARTNER = {"y": "yl", "dx": "dxl"}


def _ceil(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class StepShape:
    """One step of one projection: ``d_in -> d_out``, ``t`` tokens, rank ``r``.

    ``rows``: the GEMM array's rows (the engine's A tile); ``optimizer``: ``"adamw"`` (two float32 moments per
    LoRA parameter) or ``"sgd"``; ``gradients_out``: the gradients also go out (the RTL's ``updates`` stream
    carries them; not needed for training, off by default, counted alike in every dataflow).
    """

    d_in: int
    d_out: int
    t: int
    r: int = 16
    optimizer: str = "adamw"
    blocksize: int = 64
    double_quant: bool = True
    rows: int = 8
    gradients_out: bool = False

    def __post_init__(self):
        for name in ("d_in", "d_out", "t", "r", "blocksize", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}")

    @property
    def dims(self):
        return {"t": self.t, "in": self.d_in, "out": self.d_out, "r": self.r}

    @property
    def weight_bytes(self):
        """Bytes of one pass of the NF4 weight with its quantization state."""
        return nf4_bytes(self.d_in * self.d_out, self.blocksize, self.double_quant)

    def size(self, tensor):
        """Bytes of one copy of a tensor as stored in external memory."""
        if tensor == "W":
            return self.weight_bytes
        shapes = {"x": ("t", "in"), "dy": ("t", "out"), "y": ("t", "out"), "dx": ("t", "in"), "hb": ("t", "r"),
                  "gb": ("t", "r"), "A": ("r", "in"), "B": ("out", "r"), "yl": ("t", "out"), "dxl": ("t", "in"),
                  "grad_A": ("r", "in"), "grad_B": ("out", "r")}
        rows, cols = shapes[tensor]
        return self.dims[rows] * self.dims[cols] * _WIDTH[tensor]

    @property
    def state_bytes(self):
        """Bytes of the optimizer state (AdamW: both moments of A and B, float32)."""
        return 2 * FP32 * self.r * (self.d_in + self.d_out) if self.optimizer == "adamw" else 0


def nf4_bytes(n, blocksize=64, double_quant=True):
    """Bytes of an NF4 tensor of ``n`` weights as the dequantizer reads it: packed codes, the absmax (uint8 codes
    with double quantization, else float32), one float32 absmax2 per 256 blocks and the float32 offset. The NF4
    levels and the absmax codebook are tables in the dequantizer, not read."""
    if n < 1 or blocksize < 1:
        raise ValueError(f"an NF4 tensor needs at least one weight and a positive blocksize, not {n} and {blocksize}")
    blocks = _ceil(n, blocksize)
    if double_quant:
        return _ceil(n, 2) + blocks + FP32 * _ceil(blocks, 256) + FP32
    return _ceil(n, 2) + FP32 * blocks


@dataclass(frozen=True)
class Traffic:
    """Bytes one step moves across the external-memory port.

    ``read`` / ``written``: tensor -> bytes; ``weight_passes``: passes of the NF4 weight; ``schedule``: the
    dataflow's choices (block sizes, order) as a dict.
    """

    dataflow: str
    shape: StepShape
    read: dict
    written: dict
    weight_passes: int
    schedule: dict = field(default_factory=dict)

    @property
    def bytes_read(self):
        return sum(self.read.values())

    @property
    def bytes_written(self):
        return sum(self.written.values())

    @property
    def total(self):
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self):
        """Arithmetic intensity, multiply-accumulates per byte moved."""
        return macs(self.shape) / self.total


def _add(table, tensor, amount):
    table[tensor] = table.get(tensor, 0) + amount


def _update_traffic(shape, read, written, masters_read=True):
    """The update: masters and moments read and written once; gradients out if asked."""
    if masters_read:
        _add(read, "A", shape.size("A"))
        _add(read, "B", shape.size("B"))
    _add(written, "A", shape.size("A"))
    _add(written, "B", shape.size("B"))
    if shape.state_bytes:
        _add(read, "state", shape.state_bytes)
        _add(written, "state", shape.state_bytes)
    if shape.gradients_out:
        _add(written, "grad_A", shape.size("grad_A"))
        _add(written, "grad_B", shape.size("grad_B"))


def today(shape):
    """The current phase order and tiling with every tensor in external memory (see the module docstring)."""
    read, written, passes = {}, {}, 0
    dims = shape.dims
    for _name, m, _n, _k, _transposed, a_operand, w_operand, destination in TODAY_PHASES:
        tiles = _ceil(dims[m], shape.rows)
        _add(read, a_operand, shape.size(a_operand))              # each A tile loaded once
        _add(read, w_operand, tiles * shape.size(w_operand))      # the W operand streamed once per A tile
        if w_operand == "W":
            passes += tiles
        _add(written, destination, shape.size(destination))
        if destination in _PARTNER:                               # the stored LoRA term, read as it combines
            _add(read, _PARTNER[destination], shape.size(_PARTNER[destination]))
    # the update reads the gradient sums back with the masters and moments
    _add(read, "grad_A", shape.size("grad_A"))
    _add(read, "grad_B", shape.size("grad_B"))
    _update_traffic(shape, read, written)
    return Traffic("today", shape, read, written, passes, {"rows": shape.rows})


def resident(shape):
    """The memory-fed step as built: the scratchpads on chip, the weight streamed ``2 * ceil(T / rows)`` times."""
    passes = 2 * _ceil(shape.t, shape.rows)
    read = {"W": passes * shape.weight_bytes, "x": shape.size("x"), "dy": shape.size("dy")}
    written = {"y": shape.size("y"), "dx": shape.size("dx")}
    _update_traffic(shape, read, written)
    return Traffic("resident", shape, read, written, passes, {"rows": shape.rows})


def lower_bound(shape):
    """Each tensor moved the fewest times the issue allows: W twice (forward, backward), x, dy, y, dx once, A, B
    and the moments read and written once."""
    read = {"W": 2 * shape.weight_bytes, "x": shape.size("x"), "dy": shape.size("dy")}
    written = {"y": shape.size("y"), "dx": shape.size("dx")}
    _update_traffic(shape, read, written)
    return Traffic("lower_bound", shape, read, written, 2)


def _per_feature_bytes(d_red, blocksize):
    """On-chip bytes of one output feature's NF4 codes and absmax codes along a reduction of ``d_red``."""
    return _ceil(d_red, 2) + _ceil(d_red, blocksize)


def _feature_tiles(d_outp, most, align):
    """``(passes, features)``: the fewest tiles of at most ``most`` output features, made of whole groups of
    ``align`` features and as even as that allows (the last may be shorter); None if not even one group fits."""
    if most < d_outp:
        most -= most % align
    if most < 1:
        return None
    passes = _ceil(d_outp, most)
    return passes, min(d_outp, _ceil(_ceil(d_outp, align), passes) * align)


def _product_options(s, activation, d_red, d_outp, available):
    """The loop orders of one base product (forward: x, reduction ``in``; backward: dy, reduction ``out``) that fit
    ``available`` on-chip bytes: ``(bytes moved, W passes, activation passes, choice)`` of each, cheapest first.
    Backward, a tile of output features is a tile of W's columns, and W streams in whole NF4 blocks along its
    rows: such a tile is whole blocks wide."""
    act = s.size(activation)
    align = s.blocksize if activation == "dy" else 1
    options = []
    tokens = min(s.t, available // (BF16 * d_red))
    if tokens >= 1:                     # token-stationary: a block of the activation on chip, W once per block
        passes = _ceil(s.t, tokens)
        options.append((act + passes * s.weight_bytes, passes, 1,
                        {"loop": "token-stationary", "tokens": _ceil(s.t, passes), "footprint": BF16 * _ceil(s.t, passes) * d_red}))
    tiles = _feature_tiles(d_outp, available // _per_feature_bytes(d_red, s.blocksize), align)
    if tiles:                           # weight-stationary: a W tile on chip, the activation once per tile
        passes, features = tiles
        options.append((passes * act + s.weight_bytes, 1, passes,
                        {"loop": "weight-stationary", "features": features,
                         "footprint": features * _per_feature_bytes(d_red, s.blocksize)}))
    seen = set()
    for blocks in range(1, s.t + 1):    # output-stationary: float32 partial sums of tokens x features on chip
        tokens = _ceil(s.t, blocks)
        if tokens in seen:
            continue
        seen.add(tokens)
        tiles = _feature_tiles(d_outp, available // (FP32 * tokens), align)
        if not tiles:
            continue
        passes, features = tiles
        w_passes = _ceil(s.t, tokens)
        options.append((passes * act + w_passes * s.weight_bytes, w_passes, passes,
                        {"loop": "output-stationary", "tokens": tokens, "features": features,
                         "footprint": FP32 * tokens * features}))
    return sorted(options, key=lambda o: (o[0], o[1]))


def blocked(shape, buffer_bytes=DEFAULT_BUFFER_BYTES):
    """The I/O-aware dataflow with the least traffic whose on-chip buffers fit ``buffer_bytes``.

    The forward (F1 h, F3 yl, F2 y) and backward (B1 g, B5 dxl, B4 dx) products run as two sweeps (kept separate:
    a training step has dy only after the rest of the network has run), each with the cheapest of three loop
    orders for its base product that fits the buffer: **token-stationary** (a block of tokens of x, or dy, in
    bf16 on chip; each W tile streamed once per block), **weight-stationary** (a tile of W's output features in
    NF4 on chip; the activation streamed once per tile) and **output-stationary** (float32 partial sums of a block
    of tokens by a tile of features on chip; W streamed once per token block, the activation once per feature
    tile). hb and gb (``[T, r]`` bf16) stay on chip for the whole step. One gradient needs x and dy together: in
    the order ``x-first`` grad_B = dy^T hb is accumulated during the dy sweep and grad_A = gb^T x needs x read
    once more (tile by tile, each tile of grad_A finished and updated at once); ``dy-first`` is the mirror. The
    accumulating gradient is kept on chip in float32 (``resident``) or made by a re-read pass too (``reread``).
    The bf16 copies of A and B are kept on chip (``rank_resident``: read once from the float32 masters) or read
    from the masters once per weight pass.

    Weight and output tiles in flight live in the GEMM engine's own buffers, outside ``buffer_bytes``.
    Returns the :class:`Traffic` of the cheapest schedule; ``schedule`` holds its choices and ``footprint``.
    """
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
        raise ValueError(f"buffer_bytes must be a positive integer, not {buffer_bytes!r}")
    s = shape
    small = 2 * BF16 * s.t * s.r                       # hb and gb for all T
    rank_copy = BF16 * s.r * (s.d_in + s.d_out)
    best = None
    for order in ("x-first", "dy-first"):
        acc, acc_dim, reread, acc_sweep = (("grad_B", s.d_out, "x", "backward") if order == "x-first"
                                           else ("grad_A", s.d_in, "dy", "forward"))
        for rank_resident in (True, False):
            for accumulate in ("resident", "reread"):
                chosen = {}
                for sweep, activation, d_red, d_outp in (("forward", "x", s.d_in, s.d_out),
                                                         ("backward", "dy", s.d_out, s.d_in)):
                    fixed = small + (rank_copy if rank_resident else 0) + \
                        (FP32 * s.r * acc_dim if accumulate == "resident" and acc_sweep == sweep else 0)
                    options = _product_options(s, activation, d_red, d_outp, buffer_bytes - fixed) \
                        if buffer_bytes > fixed else []
                    if not options:
                        break
                    cost, w_passes, act_passes, choice = options[0]
                    chosen[sweep] = (w_passes, act_passes, dict(choice, footprint=choice["footprint"] + fixed))
                else:
                    (wf, af, cf), (wb, ab, cb) = chosen["forward"], chosen["backward"]
                    read = {"W": (wf + wb) * s.weight_bytes, "x": af * s.size("x"), "dy": ab * s.size("dy")}
                    written = {"y": s.size("y"), "dx": s.size("dx")}
                    _add(read, reread, s.size(reread))
                    if accumulate == "reread":
                        _add(read, "dy" if reread == "x" else "x", s.size("dy" if reread == "x" else "x"))
                    rank_reads = 1 if rank_resident else wf + wb
                    _add(read, "A", rank_reads * s.size("A"))
                    _add(read, "B", rank_reads * s.size("B"))
                    _update_traffic(s, read, written)
                    total = sum(read.values()) + sum(written.values())
                    key = (total, wf + wb, order != "x-first", not rank_resident, accumulate != "resident")
                    if best is None or key < best[0]:
                        schedule = {"order": order, "forward": cf, "backward": cb, "accumulate": accumulate,
                                    "rank_resident": rank_resident, "footprint": max(cf["footprint"], cb["footprint"]),
                                    "buffer_bytes": buffer_bytes}
                        best = (key, Traffic("blocked", s, read, written, wf + wb, schedule))
    if best is None:
        raise ValueError(f"an on-chip buffer of {buffer_bytes} bytes cannot hold hb and gb ({small} bytes) and one "
                         f"tile of the step")
    return best[1]


def macs(shape):
    """Multiply-accumulates of one step: the two base products and the six rank-r products."""
    return 2 * shape.t * shape.d_in * shape.d_out + 3 * shape.t * shape.r * (shape.d_in + shape.d_out)


def memory_seconds(traffic_bytes, bytes_per_s=ULX3S_SDRAM_BYTES_PER_S, efficiency=DEFAULT_EFFICIENCY):
    """Seconds to move ``traffic_bytes`` at ``efficiency`` times the peak ``bytes_per_s``."""
    if not bytes_per_s > 0:
        raise ValueError(f"bandwidth must be positive, not {bytes_per_s!r}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], not {efficiency!r}")
    return traffic_bytes / (bytes_per_s * efficiency)


def roofline_point(traffic, cycles, bytes_per_s=ULX3S_SDRAM_BYTES_PER_S, efficiency=DEFAULT_EFFICIENCY,
                   clock_hz=CLOCK_HZ):
    """``(memory s, compute s, bound)`` of one step: ``bound`` is ``"memory"`` when moving the traffic takes longer
    than the compute (with perfect overlap the step takes the larger of the two)."""
    memory = memory_seconds(traffic.total, bytes_per_s, efficiency)
    compute = cycles / clock_hz
    return memory, compute, "memory" if memory > compute else "compute"

