# amaranth: UnusedElaboratable=no
"""Row aligner: RTL against its golden twin, random stalls, odd shapes, back-to-back matrices."""

import numpy as np
import pytest

from edge_qlora.golden.row_align import row_beats
from edge_qlora.rtl.row_align import RowAligner
from edge_qlora.sim.harness import pack_lanes, simulate, producer, unpack_lanes
from edge_qlora.sim.streams import Stalls, get


def run(lanes, shapes, seed, idle=0.3):
    dut = RowAligner(lanes)
    rng = np.random.default_rng(seed)
    matrices = [rng.integers(1, 1 << 16, size=shape, dtype=np.uint64) for shape in shapes]
    headers, flat, expected, flags = [], [], [], []
    for matrix in matrices:
        rows, length = matrix.shape
        headers.append(rows | (length << 32) | ((rows * length) << 64))
        flat += pack_lanes(matrix.reshape(-1), lanes, 16)
        data, row_end = row_beats(matrix, lanes)
        expected += [int(v) for v in data.reshape(-1)]
        last = np.zeros(len(row_end), bool)
        last[-1] = True
        flags += list(zip(row_end.tolist(), last.tolist()))
    beats_expected = len(flags)

    async def consumer(ctx):
        return await get(ctx, dut.rows, beats_expected, Stalls(idle, seed + 2), max_cycles=20 * beats_expected + 500)

    producers = [producer(dut.shape, headers, Stalls(idle, seed)), producer(dut.flat, flat, Stalls(idle, seed + 1))]
    beats, cycles = simulate(dut, producers, consumer, None)
    assert len(beats) == beats_expected
    width = 16 * lanes
    got = unpack_lanes([b & ((1 << width) - 1) for b in beats], lanes, 16, beats_expected * lanes)
    assert [int(v) for v in got] == expected
    assert [(bool((b >> width) & 1), bool((b >> (width + 1)) & 1)) for b in beats] == flags
    return cycles, beats_expected


@pytest.mark.parametrize("lanes", [1, 3, 8, 16])
def test_random_shapes_back_to_back(lanes):
    # row lengths around one, two and three beats: the next beat's plan switches at lanes and 2 * lanes
    around = [length for beats in (1, 2, 3) for length in (beats * lanes - 1, beats * lanes, beats * lanes + 1)]
    shapes = [(5, 37), (3, 1), (2, lanes), (1, 2 * lanes + 1), (4, 2)] + [(2, n) for n in around if n > 0]
    run(lanes, shapes, seed=lanes)


def test_throughput_without_stalls():
    cycles, beats = run(8, [(16, 64)], seed=1, idle=0.0)
    assert cycles <= beats + 5


def test_rejects_bad_lanes():
    with pytest.raises(ValueError, match="lanes"):
        RowAligner(0)
