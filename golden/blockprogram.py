"""The memory program of the blocked step: every burst its block controller would issue, in order, for the schedule
that ``golden/traffic.py``'s :func:`~edge_qlora.golden.traffic.blocked` chooses, so that its bytes per tensor check
the traffic model and the DRAM model (``golden/dram.py``) times its access pattern.

The blocked step is partly built (``docs/blocked.md``): :func:`forward_product` and :func:`backward_product` are
the request orders of its block controller's two base products (``rtl/blocked.py``), request for request; the
rest of this program (the step) is ahead of the RTL. Each sweep runs its base product in the schedule's loop
order over the memory map of ``golden/memmap.py`` (row-major tensors, bitsandbytes' flat NF4 codes and absmax):

- **token-stationary** (``tokens``): per block of tokens the activation's rows (one job), then the weight streamed
  once in groups of :data:`GROUP` W rows (their absmax codes, then their codes); forward, each group's outputs are
  written as it finishes, backward the block's rows of dx at the end;
- **weight-stationary** (``features``): per tile of output features the tile's weight (forward: whole W rows;
  backward: W's columns, a piece of every row), then the activation whole, then the tile's columns of the output;
- **output-stationary** (``tokens`` x ``features``): per block of tokens, per block of features, the block's
  absmax codes (forward) and then, per span of :data:`SPAN` reduction elements (one NF4 block), the activation's
  piece of each token row and the weight's piece of each feature (backward: the span's W rows, the block's columns,
  with their absmax codes); then the block's outputs.

Backward, feature blocks and tiles (W's columns) are whole NF4 blocks, as the traffic model chooses them. The
double quantization's ``absmax2`` (one float32 per 256 blocks) is read whole at the start of every weight pass and
the offset travels in the descriptor, as in the memory-fed step. A and B (float32 masters) are read at the start
(``rank_resident``) or at the start of every weight pass;
the gradient that needs x and dy together re-reads ``x`` (``x-first``) or ``dy`` after the backward sweep (both
when the other gradient is re-read too); the update reads the masters and moments and writes them, 64 elements at
a time, as ``golden/memprogram.py`` does.
"""

import itertools
from dataclasses import dataclass

from . import dram, traffic
from .memmap import layout
from .memprogram import STATE_GROUP, Job, PortShape, Request, split_bursts, state_groups

__all__ = ["SPAN", "GROUP", "Program", "program", "forward_product", "backward_product", "x_pass_per_span",
           "update_pass", "UPDATE_TENSORS", "port_for", "requests", "bytes_by_tensor", "traffic_bytes", "dram_time",
           "blocked_for"]

#: Reduction elements per span of the output-stationary loops: one NF4 block.
SPAN = 64
#: W rows per group of the token-stationary loops' weight stream.
GROUP = 64

_W_PARTS = ("nf4_codes", "nf4_absmax", "nf4_absmax2")
_TRAFFIC_NAME = {"nf4_codes": "W", "nf4_absmax": "W", "nf4_absmax2": "W", "lora_A": "A", "lora_B": "B",
                 "exp_avg_A": "state", "exp_avg_sq_A": "state", "exp_avg_B": "state", "exp_avg_sq_B": "state"}


@dataclass(frozen=True)
class Program:
    """``ops``: ``(op, Job)`` in program order (``op`` is ``"read"`` or ``"write"``); ``weight_passes``;
    ``update``: the index in ``ops`` where the update begins (it needs every gradient, so it follows the products
    and its traffic cannot hide behind theirs)."""

    ops: tuple
    weight_passes: int
    update: int

    def part(self, which):
        """The sub-program of the products (``"products"``) or of the update (``"update"``)."""
        ops = self.ops[:self.update] if which == "products" else self.ops[self.update:]
        return Program(ops, self.weight_passes if which == "products" else 0, len(ops) if which == "products" else 0)


def port_for(timing, max_burst=64):
    """The port a DRAM preset's memory-fed step has (``rtl/memport.py``'s ``port_for``, without importing it)."""
    return PortShape(timing.peak_bytes_per_cycle, max_burst, timing.row_bytes)


class _Writer:
    """Collects jobs; sub-matrices of row-major tensors become one job per row, or one job for whole rows."""

    def __init__(self, memmap):
        self.memmap, self.ops = memmap, []

    def add(self, op, tensor, offset, size):
        if size > 0:
            self.ops.append((op, Job(tensor, self.memmap[tensor].address + offset, size)))

    def rows(self, op, tensor, width, item, row0, nrows, col0, ncols):
        """Rows ``row0..`` and columns ``col0..`` of a row-major ``[*, width]`` tensor of ``item``-byte elements."""
        if col0 == 0 and ncols == width:
            self.add(op, tensor, row0 * width * item, nrows * width * item)
            return
        for row in range(row0, row0 + nrows):
            self.add(op, tensor, (row * width + col0) * item, ncols * item)

    def weight(self, row_length, row0, nrows, col0, ncols, absmax=True, codes=True):
        """W rows ``row0..`` (``row_length`` weights each) and columns ``col0..`` (whole NF4 blocks): the absmax
        codes, then the codes."""
        mm = self.memmap
        item = 1 if mm.double_quant else 4
        if absmax:
            self.rows("read", "nf4_absmax", row_length // mm.blocksize, item, row0, nrows, col0 // mm.blocksize,
                      -(-ncols // mm.blocksize))
        if codes:
            self.rows("read", "nf4_codes", row_length // 2, 1, row0, nrows, col0 // 2, ncols // 2)

    def pass_start(self, rank_resident):
        """The start of a weight pass: absmax2 whole and, unless kept on chip, A and B."""
        if self.memmap.double_quant:
            self.add("read", "nf4_absmax2", 0, self.memmap["nf4_absmax2"].size)
        if not rank_resident:
            self.add("read", "lora_A", 0, self.memmap["lora_A"].size)
            self.add("read", "lora_B", 0, self.memmap["lora_B"].size)


def _blocks(total, size):
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def _forward(w, choice, rank_resident):
    """F: y = x W^T over the memory map ``w.memmap``; returns the weight passes."""
    mm = w.memmap
    t, d_in, d_out = mm.t, mm.d_in, mm.d_out
    loop = choice["loop"]
    if loop == "weight-stationary":
        w.pass_start(rank_resident)
        for f0, nf in _blocks(d_out, choice["features"]):
            w.weight(d_in, f0, nf, 0, d_in)
            w.rows("read", "x", d_in, 2, 0, t, 0, d_in)
            w.rows("write", "y", d_out, 2, 0, t, f0, nf)
        return 1
    blocks = _blocks(t, choice["tokens"])
    for t0, nt in blocks:
        w.pass_start(rank_resident)
        if loop == "token-stationary":
            w.rows("read", "x", d_in, 2, t0, nt, 0, d_in)
            for f0, nf in _blocks(d_out, GROUP):
                w.weight(d_in, f0, nf, 0, d_in)
                w.rows("write", "y", d_out, 2, t0, nt, f0, nf)
            continue
        for f0, nf in _blocks(d_out, choice["features"]):
            w.weight(d_in, f0, nf, 0, d_in, codes=False)
            for k0, nk in _blocks(d_in, SPAN):
                w.rows("read", "x", d_in, 2, t0, nt, k0, nk)
                w.weight(d_in, f0, nf, k0, nk, absmax=False)
            w.rows("write", "y", d_out, 2, t0, nt, f0, nf)
    return len(blocks)


def _backward(w, choice, rank_resident, features):
    """B: dx = dy W over ``w.memmap`` (``features``: W's columns per tile or block, whole NF4 blocks); returns the
    weight passes."""
    mm = w.memmap
    t, d_in, d_out = mm.t, mm.d_in, mm.d_out
    loop = choice["loop"]
    if loop == "weight-stationary":
        w.pass_start(rank_resident)
        for c0, nc in _blocks(d_in, features):
            w.weight(d_in, 0, d_out, c0, nc)
            w.rows("read", "dy", d_out, 2, 0, t, 0, d_out)
            w.rows("write", "dx", d_in, 2, 0, t, c0, nc)
        return 1
    blocks = _blocks(t, choice["tokens"])
    for t0, nt in blocks:
        w.pass_start(rank_resident)
        if loop == "token-stationary":
            w.rows("read", "dy", d_out, 2, t0, nt, 0, d_out)
            for r0, nr in _blocks(d_out, GROUP):
                w.weight(d_in, r0, nr, 0, d_in)
            w.rows("write", "dx", d_in, 2, t0, nt, 0, d_in)
            continue
        for c0, nc in _blocks(d_in, features):
            for r0, nr in _blocks(d_out, SPAN):
                w.rows("read", "dy", d_out, 2, t0, nt, r0, nr)
                w.weight(d_in, r0, nr, c0, nc)
            w.rows("write", "dx", d_in, 2, t0, nt, c0, nc)
    return len(blocks)


def program(memmap, schedule):
    """The blocked step's :class:`Program` for ``memmap`` (``golden/memmap.py``) and ``schedule`` (the ``schedule``
    of :func:`~edge_qlora.golden.traffic.blocked`'s result). Raises ValueError for a map the program does not serve
    (a W row not a whole number of NF4 blocks, gradients out)."""
    mm = memmap
    if mm.d_in % mm.blocksize:
        raise ValueError(f"d_in = {mm.d_in} must be a multiple of the NF4 blocksize ({mm.blocksize}): the blocked "
                         f"step reads W rows in whole blocks")
    if mm.gradients_out:
        raise ValueError("the blocked step does not write the gradients (gradients_out must be False)")
    w = _Writer(mm)
    rank_resident = schedule["rank_resident"]
    if rank_resident:
        w.add("read", "lora_A", 0, mm["lora_A"].size)
        w.add("read", "lora_B", 0, mm["lora_B"].size)
    passes = _forward(w, schedule["forward"], rank_resident)
    back = schedule["backward"]
    features = mm.d_in if back["loop"] == "token-stationary" else back["features"]
    if features % mm.blocksize and features != mm.d_in:
        raise ValueError(f"backward blocks of {features} W columns are not whole NF4 blocks of {mm.blocksize}")
    passes += _backward(w, back, rank_resident, features)
    reread = "x" if schedule["order"] == "x-first" else "dy"
    other = "dy" if reread == "x" else "x"
    if schedule["accumulate"] == "reread":
        w.add("read", other, 0, mm[other].size)
    w.add("read", reread, 0, mm[reread].size)
    update = len(w.ops)
    _update(w)
    return Program(tuple(w.ops), passes, update)


def _update(w):
    """The update: per 64 elements of A, then of B, the master and moments read, then written."""
    for offset, size, names in state_groups(w.memmap):
        for name in names:
            w.add("read", name, offset, size)
        for name in names:
            region = w.memmap.output_region(name)
            w.ops.append(("write", Job(region.name, region.address + offset, size)))


#: The update's tensors of factor ``X`` (``"A"`` or ``"B"``), as ``rtl/update.py`` names its reads: the master,
#: its gradient and the two AdamW moments.
UPDATE_TENSORS = {"param": "lora_{}", "grad": "grad_{}", "m": "exp_avg_{}", "v": "exp_avg_sq_{}"}


def update_pass(memmap, which, group=STATE_GROUP):
    """The update of LoRA factor ``which`` (``"A"`` or ``"B"``) alone, exactly as ``rtl/update.py`` issues it: per
    ``group`` elements the master, its gradient (``grad_A`` or ``grad_B``: the map needs ``gradients_out``) and
    (AdamW) the two moments read, then the master and the moments written (in place, or to their ``_out`` slots).
    A :class:`Program` whose ``update`` is 0: all of it is the update."""
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', not {which!r}")
    if f"grad_{which}" not in memmap:
        raise ValueError("the update reads the gradients: the memory map needs gradients_out=True")
    names = ("param", "grad", "m", "v") if memmap.optimizer == "adamw" else ("param", "grad")
    regions = {name: memmap[UPDATE_TENSORS[name].format(which)] for name in names}
    elements = regions["param"].size // 4
    ops = []
    for e in range(0, elements, group):
        size = 4 * min(group, elements - e)
        ops += [("read", Job(regions[name].name, regions[name].address + 4 * e, size)) for name in names]
        for name in names:
            if name != "grad":
                out = memmap.output_region(regions[name].name)
                ops.append(("write", Job(out.name, out.address + 4 * e, size)))
    return Program(tuple(ops), 0, 0)


def forward_product(memmap, token_block, feature_block, cols, rank_term=False, gradient=False):
    """The forward base product ``y = x W^T`` alone, output-stationary, exactly as the block controller of
    ``rtl/blocked.py`` issues it (its requests, in order, are the order the memory returns words in).

    Per block of ``token_block`` tokens: ``absmax2`` whole; per block of ``feature_block`` W rows: the block's
    absmax codes (one job), then per span of :data:`SPAN` reduction elements (one NF4 block) each token row's piece
    of x and each W row's codes, one job per row; after the block's last span its outputs, one job per output row
    of each ``rows x cols`` tile in the engine's order (W tile by W tile, the block's tokens in order within one).
    Its bytes per tensor equal :func:`program`'s forward sweep in the same schedule (``tests/test_blockprogram.py``);
    only the y writes are cut finer. The NF4 offset travels in the descriptor. Double quantization only.

    With ``rank_term`` (y = x W^T + s hb B^T, the step's y, with hb = bf16(x A^T) made on chip as the token
    block's first feature block streams x): in that feature block, before each span's x, the span's piece of each
    of A's ``r`` rows (one job each); after the first span's reads of each feature block, the feature block's rows
    of B (one job). After a span, not before the block: the unit that takes them is busy with the block before
    until that block's outputs have passed, and reads waiting in front of the block's first span would stall the
    engine; the first span's reads still overlap the block before.

    With ``gradient`` (and ``rank_term``; all tokens one token block): after the token block's first feature
    block's outputs, its rows of hb (``hb`` of the memory map, one job), which the backward product's grad_B
    reads, then x's chunk fields (``x_fields``, one job of ``4 * ceil(t / 64)`` bytes), which grad_A needs."""
    mm = memmap
    if gradient and not (rank_term and "hb" in mm.names and token_block >= mm.t):
        raise ValueError("hb's and x's fields' writes need the rank-r term, the memory map's hb and all tokens in "
                         "one token block")
    t, d_in, d_out = mm.t, mm.d_in, mm.d_out
    if not mm.double_quant or mm.blocksize != SPAN or d_in % SPAN:
        raise ValueError(f"the blocked product takes NF4 with double quantization in blocks of {SPAN} and whole "
                         f"blocks per W row (d_in = {d_in}, blocksize {mm.blocksize})")
    if feature_block % cols or d_out % cols:
        raise ValueError(f"feature blocks ({feature_block}) and d_out ({d_out}) must be multiples of cols ({cols})")
    w = _Writer(mm)
    per_row, r = d_in // SPAN, mm.r
    blocks = _blocks(t, token_block)
    for t0, nt in blocks:
        w.pass_start(True)
        for f0, nf in _blocks(d_out, feature_block):
            w.add("read", "nf4_absmax", f0 * per_row, nf * per_row)
            for s in range(per_row):
                if rank_term and f0 == 0:
                    for k in range(r):
                        w.add("read", "lora_A", (k * d_in + s * SPAN) * 4, SPAN * 4)
                for token in range(t0, t0 + nt):
                    w.add("read", "x", (token * d_in + s * SPAN) * 2, SPAN * 2)
                for row in range(f0, f0 + nf):
                    w.add("read", "nf4_codes", (row * d_in + s * SPAN) // 2, SPAN // 2)
                if rank_term and s == 0:
                    w.add("read", "lora_B", f0 * r * 4, nf * r * 4)
            for c0 in range(f0, f0 + nf, cols):
                for token in range(t0, t0 + nt):
                    w.add("write", "y", (token * d_out + c0) * 2, cols * 2)
            if gradient and f0 == 0:
                w.add("write", "hb", t0 * r * 2, nt * r * 2)
                w.add("write", "x_fields", 0, 4 * -(-nt // 64))
    return Program(tuple(w.ops), len(blocks), len(w.ops))


def requests(port, prog):
    """The burst requests of a :class:`Program` (:class:`~edge_qlora.golden.memprogram.Request`), in order."""
    wb = port.word_bytes
    out = []
    for op, job in prog.ops:
        start = job.address - job.address % wb                  # the words that hold the job's bytes
        end = -(-(job.address + job.bytes) // wb) * wb
        out += [Request(op, job.tensor, address, length) for address, length in split_bursts(port, start, end - start)]
    return out


def bytes_by_tensor(prog):
    """``{(op, tensor): bytes}`` of a program's jobs (exact bytes, before the port rounds them to words)."""
    out = {}
    for op, job in prog.ops:
        out[op, job.tensor] = out.get((op, job.tensor), 0) + job.bytes
    return out


def traffic_bytes(prog):
    """A program's bytes in ``golden/traffic.py``'s terms: ``(read, written)``, each ``{tensor: bytes}`` (W: codes,
    absmax and absmax2; A, B: the masters; state: the moments)."""
    read, written = {}, {}
    for (op, tensor), size in bytes_by_tensor(prog).items():
        name = _TRAFFIC_NAME.get(tensor, tensor)
        table = read if op == "read" else written
        table[name] = table.get(name, 0) + size
    return read, written


def dram_time(timing, port, reqs):
    """The DRAM model's time for a program's bursts (``reqs``, from :func:`requests`) served in order: the
    :class:`~edge_qlora.golden.dram.Result` (its ``efficiency``: requested bytes against the peak over the whole
    time)."""
    wb = port.word_bytes
    return dram.simulate(timing, [(r.address, r.length * wb, r.op) for r in reqs])


def x_pass_per_span(d_in, d_out, feature_block):
    """The spans of grad_A's pass over x that follow each span of the backward product from its third column block
    on (the unit is idle there): ``ceil(d_in / 64 / those spans)``, at most 15, so that the pass ends with the
    product where it can; 0 with two column blocks (the pass then follows the product)."""
    slots = max(-(-d_in // feature_block) - 2, 0) * (d_out // SPAN)
    return min(15, -(-(d_in // SPAN) // slots)) if slots else 0


def backward_product(memmap, token_block, feature_block, rows, cols, rank_term=False, gradient=False,
                     x_per_span=None):
    """The backward base product ``dx = dy W`` alone, output-stationary, exactly as the block controller of
    ``rtl/blocked.py`` issues it in its transposed mode.

    The outputs are W's columns: per block of ``token_block`` tokens, ``absmax2`` whole and the table of the whole
    rows' chunk exponents (``w_row_exponents`` of the memory map) whole; per block of ``feature_block`` columns
    (whole NF4 blocks), per span of :data:`SPAN` W rows (the reduction), each token row's piece of dy, then each
    W row's absmax codes of the block's columns and its codes, one job per row; after the block's last span its
    outputs, one job per token row (the RTL's output corner turn makes each token row's ``feature_block`` outputs
    one run of bytes). Its bytes per tensor are :func:`program`'s backward sweep in the same
    schedule and the exponent table once per token block (``tests/test_blockprogram.py``).

    With ``rank_term`` (dx = dy W + s gb A, the step's dx, with gb = bf16(dy B) made on chip): in the token
    block's first column block, before each span's dy, the span's 64 rows of B (one job); after the first span's
    reads of each column block, the column block's piece of each of A's ``r`` rows (one job each), as
    :func:`forward_product` places A and B.

    With ``gradient`` (and ``rank_term``; the whole reduction one token block): the step's ``grad_B = s dy^T hb``
    too, made as the second column block's dy passes: before its first span's dy, the token block's rows of hb
    (``hb`` of the memory map, one job); after the block's outputs, grad_B (the RTL writes each span's 64 rows
    once the span has passed: one job a span, the same bytes). After the first column block's outputs, gb's rows
    (``gb``, one job). And grad_A's pass over x (``grad_A = s gb^T x``), span by span of 64 of x's columns: each
    token row's piece of x (one job each) and the span's 64 columns of each of grad_A's ``r`` rows (one job
    each), the first span after gb's rows (read back) and x's chunk fields (``ceil(t / 16)`` bytes of
    ``x_fields``). ``x_per_span`` (default :func:`x_pass_per_span`) of them follow each span's reads from the
    third column block on, the rest follow the product."""
    mm = memmap
    if gradient and not (rank_term and token_block >= mm.t and feature_block < mm.d_in and "gb" in mm.names
                         and "grad_B" in mm.names):
        raise ValueError("the gradient needs the rank-r term, all tokens in one token block, a second column block "
                         "and the memory map's hb, gb and the gradients")
    t, d_in, d_out = mm.t, mm.d_in, mm.d_out
    if not mm.double_quant or mm.blocksize != SPAN or d_in % SPAN or d_out % SPAN:
        raise ValueError(f"the blocked backward product takes NF4 with double quantization in blocks of {SPAN}, "
                         f"whole blocks per W row and whole spans of W rows (d_in = {d_in}, d_out = {d_out}, "
                         f"blocksize {mm.blocksize})")
    if mm.row_exponent_chunk is None:
        raise ValueError("the blocked backward product needs the memory map's w_row_exponents (row_exponent_chunk)")
    if feature_block % SPAN or token_block % rows or feature_block % cols:
        raise ValueError(f"column blocks ({feature_block}) must be whole NF4 blocks of {SPAN} and of cols ({cols}), "
                         f"token blocks ({token_block}) multiples of rows ({rows})")
    w = _Writer(mm)
    per_row, r = d_in // SPAN, mm.r
    blocks = _blocks(t, token_block)
    x_spans = iter(range(per_row if gradient else 0))
    if x_per_span is None:
        x_per_span = x_pass_per_span(d_in, d_out, feature_block)
    if not (isinstance(x_per_span, int) and 0 <= x_per_span <= 15):
        raise ValueError(f"x_per_span must be an integer from 0 to 15, not {x_per_span!r}")

    def x_pass(count):
        for s in list(itertools.islice(x_spans, count)):
            if s == 0:
                w.add("read", "gb", 0, t * r * 2)
                w.add("read", "x_fields", 0, -(-t // 16))
            for token in range(t):
                w.add("read", "x", (token * d_in + s * SPAN) * 2, SPAN * 2)
            for k in range(r):
                w.add("write", "grad_A", (k * d_in + s * SPAN) * 4, SPAN * 4)

    for t0, nt in blocks:
        w.pass_start(True)
        w.add("read", "w_row_exponents", 0, mm["w_row_exponents"].size)
        for f0, nf in _blocks(d_in, feature_block):
            for r0 in range(0, d_out, SPAN):
                if rank_term and f0 == 0:
                    w.add("read", "lora_B", r0 * r * 4, SPAN * r * 4)
                if gradient and f0 == feature_block and r0 == 0:
                    w.add("read", "hb", t0 * r * 2, nt * r * 2)
                for token in range(t0, t0 + nt):
                    w.add("read", "dy", (token * d_out + r0) * 2, SPAN * 2)
                for row in range(r0, r0 + SPAN):
                    w.add("read", "nf4_absmax", row * per_row + f0 // SPAN, nf // SPAN)
                for row in range(r0, r0 + SPAN):
                    w.add("read", "nf4_codes", (row * d_in + f0) // 2, nf // 2)
                if rank_term and r0 == 0:
                    for k in range(r):
                        w.add("read", "lora_A", (k * d_in + f0) * 4, nf * 4)
                if f0 > feature_block:
                    x_pass(x_per_span)
            for token in range(t0, t0 + nt):
                w.add("write", "dx", (token * d_in + f0) * 2, nf * 2)
            if gradient and f0 == 0:
                w.add("write", "gb", t0 * r * 2, nt * r * 2)
            if gradient and f0 == feature_block:
                w.add("write", "grad_B", 0, d_out * r * 4)
    x_pass(per_row)
    return Program(tuple(w.ops), len(blocks), len(w.ops))


def blocked_for(d_in, d_out, t, r=16, buffer_bytes=traffic.DEFAULT_BUFFER_BYTES, **layout_kwargs):
    """The traffic model's blocked dataflow for one step and the :class:`Program` that runs it."""
    model = traffic.blocked(traffic.StepShape(d_in, d_out, t, r), buffer_bytes)
    memmap = layout(d_in, d_out, t, r, **layout_kwargs)
    return model, memmap, program(memmap, model.schedule)
