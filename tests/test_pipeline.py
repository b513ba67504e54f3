# amaranth: UnusedElaboratable=no
"""Pipeline helpers: the skid buffer under random stalls (nothing lost, duplicated or reordered; full throughput)."""

import random

import pytest

from edge_qlora.rtl.pipeline import SkidBuffer
from edge_qlora.sim.nf4 import _simulate, producer
from edge_qlora.sim.streams import Stalls, get


def run(count, idle_in, idle_out, seed):
    dut = SkidBuffer(12)
    rng = random.Random(seed)
    items = [rng.randrange(1 << 12) for _ in range(count)]

    async def consumer(ctx):
        return await get(ctx, dut.o, count, Stalls(idle_out, seed + 1), max_cycles=50 * count + 10)

    beats, cycles = _simulate(dut, [producer(dut.i, items, Stalls(idle_in, seed))], consumer, None)
    assert beats == items
    return cycles


@pytest.mark.parametrize("idle_in, idle_out", [(0.3, 0.3), (0.0, 0.5), (0.5, 0.0), (0.7, 0.7)])
def test_random_stalls(idle_in, idle_out):
    run(300, idle_in, idle_out, seed=int(10 * idle_in + 100 * idle_out))


def test_full_throughput():
    assert run(200, 0.0, 0.0, seed=3) <= 200 + 3
