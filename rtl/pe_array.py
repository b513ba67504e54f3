"""Output-stationary systolic array of integer multiply-accumulate PEs (twin: ``golden/pe_array.py``).

The GEMM engine's inner loop (see :mod:`edge_qlora.golden.gemm`): ``rows x cols`` processing elements, each summing
the exact products of one *chunk* of the reduction dimension for one element of the output tile, with the 18-bit
block-floating-point operands the aligner makes. Each PE is one signed 18 x 18 product (one ECP5 ``MULT18X18D``)
and a 44-bit accumulator, which holds a chunk sum exactly (``|q| <= 2**17 - 1``, chunk <= 512).

Dataflow
--------
One input beat is one step of the reduction: ``a[i]`` for every array row and ``b[j]`` for every array column.
Row ``i``'s ``a`` is delayed ``i`` steps and column ``j``'s ``b`` is delayed ``j`` steps (triangular delay lines at
the edges), then ``a`` (with the step's ``last`` flag) moves one PE to the right per step and ``b`` one PE down, so
``PE(i, j)`` sees the operands of step ``k`` at array time ``k + i + j``. On a chunk's ``last`` step a PE moves its
finished sum into a shadow register and restarts its accumulator with the next chunk's first product, so chunks
follow each other without a bubble.

The shadows of a column form a shift chain that drains *upward*, one place per step: ``shadow[i]`` takes its own
PE's sum when that PE finishes a chunk and ``shadow[i + 1]`` otherwise. Row ``i`` finishes one step after row
``i - 1``, so its sum reaches the top ``2 * i`` steps after row 0's: rows come out every :attr:`PEArray.row_interval`
(2) steps, and a chunk must be at least :attr:`PEArray.min_chunk` (``2 * rows - 1``) steps long so that the last row
of one chunk is out of the chain before the first row of the next one enters it. Column ``j`` finishes ``j`` steps
after column 0; its top output is delayed ``cols - 1 - j`` steps, so that the partials of one row leave together.

Flow control
------------
The whole array is one stall domain: every register moves when, and only when, an input beat is accepted. A
partial sum is therefore *due* after a fixed number of steps; if the consumer is not ready then, the array stops
taking steps until it is (a partial on the output is never shifted away unread). The last chunk's partials come out
only as later steps push them through, so a user flushes the array with :attr:`PEArray.flush_steps` steps of zeros
(``last`` clear) after the final chunk; the zeros accumulate into nothing and may equally be the start of the next
chunk.

Timing
------
Every path is register to register within a PE or between neighbours, and the multiplier has a cycle to itself:
the systolic operand registers feed the neighbours and a pair of multiplier operand registers; the product is
registered twice (once beside the multiplier, once beside the accumulator), so the 44-bit accumulator adder has a
cycle of its own. On ECP5 the operand and first product registers are the ``MULT18X18D``'s own input and output
registers (an instance; elsewhere, and in simulation, fabric registers around ``*``): the routing from the fabric to
a DSP site, several nanoseconds, then has a whole cycle instead of sharing one with the multiplier. With fabric
registers the critical path is an operand register placed far from its DSP site. The one global net is the step enable (``steps.valid`` and ``partials.ready`` through two
LUT levels to every register's clock enable: 17k of them at 8 x 8); on ECP5 it rides the clock network through a
``DCCA`` buffer (:func:`~.pipeline.global_fanout`), and for the best Fmax the user drives both from registers.
The PEs of one anti-diagonal have identical ``last`` delay lines, which synthesis merges into one; each PE's
``done`` flag, which drives its accumulator and shadow selects (88 loads), is still its own register
(:func:`~.pipeline.private_register`), so no flag spans the array.
"""

from amaranth.hdl import Cat, Module, Mux, ResetSignal, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..constants import ACC_BITS, MAX_LANES, OPERAND_BITS
from .fp import ecp5_registered_product
from .pipeline import global_fanout, is_ecp5, private_register

__all__ = ["PEArray", "steps_layout", "partials_layout", "OPERAND_BITS", "ACC_BITS"]



def steps_layout(rows, cols):
    """Payload of the ``steps`` stream: one step of the reduction.

    ``a[i]``: A's operand for array row ``i``; ``b[j]``: B's operand for array column ``j``; ``last``: this is the
    final step of a chunk.
    """
    return data.StructLayout({
        "a": data.ArrayLayout(signed(OPERAND_BITS), rows),
        "b": data.ArrayLayout(signed(OPERAND_BITS), cols),
        "last": 1,
    })


def partials_layout(rows, cols):
    """Payload of the ``partials`` stream: one array row's chunk sums, ``data[j]`` for column ``j``."""
    return data.StructLayout({
        "data": data.ArrayLayout(signed(ACC_BITS), cols),
        "row": range(rows),
    })


class _PE:
    """The registers of one processing element (the array is built inline, for simulation speed)."""

    def __init__(self, r, c):
        prefix = f"pe_{r}_{c}"
        self.a = Signal(signed(OPERAND_BITS), name=f"{prefix}_a")           # moves right
        self.last = Signal(name=f"{prefix}_last")                           # moves right with ``a``
        # private copies of the operands for the multiplier, which the placer can put beside the DSP site, however
        # far the neighbours that the systolic registers also feed are. A copy has the same input and enable as the
        # neighbour's systolic register, and synthesis would merge the two back into one, were their reset values
        # not different in every bit: the ``a`` side resets to 0 and its copy to -1, the ``b`` side to -1 and its
        # copy to 0. Every product after a reset is still 0 until the first step arrives (-1 * 0, then 0 * -1, as
        # the ``a`` side and the skew lines hold 0), so the accumulators start clean.
        self.b = Signal(signed(OPERAND_BITS), name=f"{prefix}_b", init=-1)  # moves down
        self.mul_a = Signal(signed(OPERAND_BITS), name=f"{prefix}_mul_a", init=-1)
        self.mul_b = Signal(signed(OPERAND_BITS), name=f"{prefix}_mul_b")
        self.mul_last = Signal(name=f"{prefix}_mul_last")
        self.product = Signal(signed(2 * OPERAND_BITS), name=f"{prefix}_product")
        self.product_last = Signal(name=f"{prefix}_product_last")
        # a second product register: the first can sit beside the DSP, the second beside the accumulator (the
        # placer puts DSP sites several nanoseconds of routing away from the fabric around them)
        self.product2 = Signal(signed(2 * OPERAND_BITS), name=f"{prefix}_product2")
        self.product2_last = Signal(name=f"{prefix}_product2_last")
        self.acc = Signal(signed(ACC_BITS), name=f"{prefix}_acc")
        # ``acc`` holds a finished chunk sum: it moves to the shadow, and the accumulator restarts, on the next step
        self.done = Signal(name=f"{prefix}_done")
        self.shadow = Signal(signed(ACC_BITS), name=f"{prefix}_shadow", reset_less=True)


class PEArray(wiring.Component):
    """Output-stationary ``rows x cols`` systolic array of exact integer MACs with a chunked drain.

    After each chunk (the steps up to and including one with ``last`` set), the array emits ``rows`` beats on
    ``partials``, in row order: beat ``i`` holds ``S[i][j] = sum over the chunk's steps of a[i] * b[j]`` for every
    column ``j``, exactly (44-bit two's complement). Chunks must be at least :attr:`min_chunk` steps long; the
    array does not check it (a shorter chunk corrupts the partials of its neighbours).

    Parameters
    ----------
    rows : int
        Array rows (elements of A's column per step), 1 to 16.
    cols : int
        Array columns (elements of B's row per step), 1 to 16.

    Attributes
    ----------
    steps : In(stream of :func:`steps_layout`)
        One step of the reduction per beat.
    partials : Out(stream of :func:`partials_layout`)
        Chunk sums, one array row per beat, rows in order.
    latency : int
        ``cols + 3``: row ``i``'s partials of a chunk whose last step is step ``k`` (counting accepted steps from
        0) are presented on ``partials`` as soon as step ``k + latency + row_interval * i`` has been accepted, and
        the array takes no further step until that beat is taken.
    row_interval : int
        2: steps between the partials of consecutive rows of one chunk.
    flush_steps : int
        ``latency + row_interval * (rows - 1) = 2 * rows + cols + 1``: zero steps (``last`` clear) to feed after the
        final chunk for its last row to come out.
    min_chunk : int
        ``2 * rows - 1``: the shortest chunk, in steps, that the drain chain keeps apart from the next one.
    """

    def __init__(self, rows, cols):
        for name, value in (("rows", rows), ("cols", cols)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"PEArray {name} must be an integer, not {value!r}")
            if not 1 <= value <= MAX_LANES:
                raise ValueError(f"PEArray {name} must be from 1 to {MAX_LANES}, not {value}")
        self.rows, self.cols = rows, cols
        # systolic, multiplier operand and two product registers, accumulator: a PE's shadow loads 5 steps after its
        # systolic registers take the chunk's last operands
        self.latency = cols + 4
        self.row_interval = 2
        self.flush_steps = self.latency + self.row_interval * (rows - 1)
        self.min_chunk = 2 * rows - 1
        super().__init__({
            "steps": In(stream.Signature(steps_layout(rows, cols))),
            "partials": Out(stream.Signature(partials_layout(rows, cols))),
        })

    def elaborate(self, platform):
        rows, cols = self.rows, self.cols
        m = Module()
        pes = [[_PE(r, c) for c in range(cols)] for r in range(rows)]
        # the top of column ``cols - 1``'s drain chain is valid when ``chain_valid[0]`` is; no column is later
        chain_valid = [Signal(name=f"chain_valid_{r}") for r in range(rows)]
        advance = Signal()
        # the partial on the output was taken, but the array has not stepped yet: do not offer it again
        sent = Signal()
        row = Signal(range(rows))

        payload = self.steps.payload
        stepped = []
        # the step enable reaches every register of the array: on the clock network where there is one for logic
        step_enable = global_fanout(m, platform, advance, "step_enable")
        hard_registers = is_ecp5(platform)
        # edge skew: row r's ``a`` and ``last`` are r steps late, column c's ``b`` is c steps late
        a_in, last_in = [], []
        for r in range(rows):
            a, last = payload.a[r], payload.last
            for k in range(r):
                a_delayed = Signal(signed(OPERAND_BITS), name=f"a_skew_{r}_{k}")
                last_delayed = Signal(name=f"last_skew_{r}_{k}")
                stepped += [a_delayed.eq(a), last_delayed.eq(last)]
                a, last = a_delayed, last_delayed
            a_in.append(a)
            last_in.append(last)
        b_in = []
        for c in range(cols):
            b = payload.b[c]
            for k in range(c):
                b_delayed = Signal(signed(OPERAND_BITS), name=f"b_skew_{c}_{k}")
                stepped.append(b_delayed.eq(b))
                b = b_delayed
            b_in.append(b)

        for r in range(rows):
            for c in range(cols):
                pe = pes[r][c]
                left = pes[r][c - 1] if c else None
                above = pes[r - 1][c] if r else None
                below = pes[r + 1][c] if r + 1 < rows else None
                stepped += [
                    pe.a.eq(left.a if left else a_in[r]),
                    pe.last.eq(left.last if left else last_in[r]),
                    pe.b.eq(above.b if above else b_in[c]),
                    pe.mul_last.eq(pe.last),
                    pe.product_last.eq(pe.mul_last),
                    pe.product2.eq(pe.product),
                    pe.product2_last.eq(pe.product_last),
                    pe.acc.eq(Mux(pe.done, 0, pe.acc) + pe.product2),
                    pe.shadow.eq(Mux(pe.done, pe.acc, below.shadow if below else 0)),
                ]
                # each PE's own `done`: the PEs of an anti-diagonal share a `last` delay line, and one merged flag
                # would drive the accumulator and shadow selects of all of them (663 loads at 8 x 8)
                private_register(m, platform, pe.done, pe.product2_last, step_enable, f"pe_{r}_{c}_done")
                # registered on both sides, the DSP has a whole cycle; the accumulator adder has the next one
                if hard_registers:
                    # (reset with sync, so that the first products after a reset are 0 as in simulation)
                    m.submodules[f"pe_{r}_{c}_mult"] = ecp5_registered_product(
                        pe.a, pe.b, pe.product, step_enable, signed=True, reset=ResetSignal("sync"))
                else:
                    stepped += [pe.mul_a.eq(pe.a), pe.mul_b.eq(pe.b), pe.product.eq(pe.mul_a * pe.mul_b)]
        for r in range(rows):
            # shifts exactly like column ``cols - 1``'s shadows
            stepped.append(chain_valid[r].eq(pes[r][cols - 1].done | (chain_valid[r + 1] if r + 1 < rows else 0)))

        # output deskew: column c's top finishes ``cols - 1 - c`` steps before the last column's
        outputs = []
        for c in range(cols):
            top = pes[0][c].shadow
            for k in range(cols - 1 - c):
                top_delayed = Signal(signed(ACC_BITS), name=f"deskew_{c}_{k}", reset_less=True)
                stepped.append(top_delayed.eq(top))
                top = top_delayed
            outputs.append(top)

        with m.If(step_enable):
            m.d.sync += stepped
        with m.If(advance):
            m.d.sync += sent.eq(0)
        with m.Elif(self.partials.valid & self.partials.ready):
            m.d.sync += sent.eq(1)
        with m.If(self.partials.valid & self.partials.ready):
            m.d.sync += row.eq(Mux(row == rows - 1, 0, row + 1))

        m.d.comb += [
            self.partials.valid.eq(chain_valid[0] & ~sent),
            self.partials.payload.data.eq(Cat(*outputs)),
            self.partials.payload.row.eq(row),
            # a due partial that has not been taken holds the whole array
            self.steps.ready.eq(~chain_valid[0] | sent | self.partials.ready),
            advance.eq(self.steps.valid & self.steps.ready),
        ]
        return m
