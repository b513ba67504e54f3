# amaranth: UnusedElaboratable=no
"""Matrix scratchpad: row and column segments of random matrices read back exactly, at one segment per cycle."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from edge_qlora.golden.scratchpad import placement, row_words
from edge_qlora.rtl.scratchpad import MatrixStore


@pytest.mark.parametrize("banks,rows,cols", [(1, 3, 5), (4, 7, 10), (8, 5, 19), (16, 17, 3)])
def test_segments_round_trip(banks, rows, cols):
    rng = np.random.default_rng(banks + rows)
    matrix = rng.integers(1, 1 << 16, size=(rows, cols))
    words = row_words(cols, banks)
    base = 3
    depth = base + rows * words + 1
    dut = MatrixStore(banks, 16, depth, read_ports=2)
    # every bank/word the layout uses is distinct
    assert len({placement(r, c, cols, banks, base) for r in range(rows) for c in range(cols)}) == rows * cols
    got = {}

    def request(port, r, c, column, count):
        return {"row_address": base + r * words, "row_words": words, "row": r, "col": c, "column": column,
                "count": count}

    async def bench(ctx):
        # write every row in segments of `banks`
        for r in range(rows):
            for c in range(0, cols, banks):
                count = min(banks, cols - c)
                ctx.set(dut.write.request, request(None, r, c, 0, count))
                ctx.set(dut.write.data, [int(v) for v in matrix[r, c:c + count]] + [0] * (banks - count))
                ctx.set(dut.write.en, 1)
                await ctx.tick()
        ctx.set(dut.write.en, 0)
        # read rows on port 0 and columns on port 1, one segment per cycle, results 2 cycles later
        reads = [(0, r, c, 0, min(banks, cols - c)) for r in range(rows) for c in range(0, cols, banks)]
        reads += [(1, r, c, 1, min(banks, rows - r)) for c in range(cols) for r in range(0, rows, banks)]
        pending = []
        for cycle in range(len(reads) + dut.latency + 1):
            for port in (0, 1):
                ctx.set(dut.read[port].en, 1)   # the read pipeline moves every cycle
                ctx.set(dut.read[port].request, request(port, 0, 0, 0, 0))
            issued = reads[cycle] if cycle < len(reads) else None
            if issued:
                port, r, c, column, count = issued
                ctx.set(dut.read[port].request, request(port, r, c, column, count))
                ctx.set(dut.read[port].en, 1)
            await ctx.tick()
            pending.append(issued)
            if len(pending) >= dut.latency:  # request set, then `latency` clock edges
                done = pending.pop(0)
                if done:
                    port, r, c, column, count = done
                    got[done] = [int(v) for v in ctx.get(dut.read[port].data)]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert len(got) == -(-cols // banks) * rows + cols * -(-rows // banks)
    for (port, r, c, column, count), values in got.items():
        expected = matrix[r:r + count, c] if column else matrix[r, c:c + count]
        assert values[:count] == [int(v) for v in expected], (port, r, c, column)
        assert values[count:] == [0] * (banks - count)


def test_rejects_bad_banks():
    with pytest.raises(ValueError, match="banks"):
        MatrixStore(3, 16, 8)


@pytest.mark.parametrize("args,name", [((4, 0, 8), "width"), ((4, 16, 0), "depth"), ((4, 16, 8, 0), "read_ports")])
def test_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        MatrixStore(*args)
