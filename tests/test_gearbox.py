# amaranth: UnusedElaboratable=no
"""Width converters: the unpacker and the packer against their Python twins, beat for beat, several jobs back to
back with random stalls on every stream; their sustained rates without stalls; the twins on hand-written cases."""

import gc
import random

import pytest

from edge_qlora.rtl.gearbox import (Packer, Unpacker, pack_elements, segment_layout, unpack_words)
from edge_qlora.sim.harness import producer
from edge_qlora.sim.harness import simulate as _simulate
from edge_qlora.sim.streams import Stalls, get


def simulate(dut, feeds, consumer):
    """The harness's ``simulate``, then a garbage collection: a producer that a broken design left waiting is
    finalised here, before the test's assertions, rather than in the middle of pytest's failure report."""
    result = _simulate(dut, feeds, consumer, None)
    gc.collect()
    return result


def collect(stream, count, stalls, max_cycles):
    """A consumer of ``count`` beats that then watches a while longer: any further beat is an extra one."""
    async def consumer(ctx):
        beats = await get(ctx, stream, count, stalls, max_cycles=max_cycles)
        return beats + await get(ctx, stream, 1, max_cycles=30)
    return consumer


def unpacker_job(count, cols, count_width=32):
    return count | cols << count_width


def decode_segment(raw, elem_width, lanes):
    layout = segment_layout(elem_width, lanes)

    def field(name):
        f = layout[name]
        return raw >> f.offset & ((1 << f.width) - 1)

    lanes_bits = field("data")
    values = [lanes_bits >> (i * elem_width) & ((1 << elem_width) - 1) for i in range(lanes)]
    return values, field("count"), bool(field("row_end")), bool(field("last"))


def unpacker_jobs(word_width, elem_width, lanes, rng):
    """Jobs of every kind: rows a multiple of lanes, rows that are not, one row, a final word the count does not
    fill, a single element, then random ones; small counts so that the whole file stays fast."""
    per_word = max(1, word_width // elem_width)
    return [
        (4 * lanes, 2 * lanes),                    # rows a multiple of lanes
        (3 * lanes + 3, lanes + 1),                # rows that are not, job ending mid-row
        (per_word * 2 + 1, 1000),                  # one row, count not filling the final word
        (1, 1),
        (2 * lanes + 5, 3),                        # short rows
        (5, 5),                                    # one row exactly
        (max(1, per_word - 1), 2),                 # a single, partly filled word
        (lanes + 1, 0),                            # cols 0: one row
        (7, 1),                                    # one element per row
        (0, 4),                                    # an empty job: dropped, no word, no beat
    ] + [(rng.randrange(1, 4 * lanes + 2 * per_word), rng.randrange(1, 3 * lanes + 2)) for _ in range(8)]


def random_words(rng, count, word_width, elem_width):
    return [rng.randrange(1 << word_width) for _ in range(-(-count * elem_width // word_width))]


UNPACKER_CASES = [(16, 16, 8), (16, 32, 8), (16, 4, 8), (64, 4, 8), (64, 16, 4), (16, 8, 1), (64, 32, 1),
                  (128, 16, 16), (16, 4, 2), (8, 32, 2), (32, 8, 4), (128, 4, 16), (8, 4, 1), (8, 16, 1), (32, 32, 4)]


@pytest.mark.parametrize("word_width, elem_width, lanes, count_width",
                         [case + (32,) for case in UNPACKER_CASES] + [(16, 32, 1, 12), (64, 8, 4, 8)])
def test_unpacker_random_stalls(word_width, elem_width, lanes, count_width):
    # (narrower counters for short jobs: the same beats)
    seed = UNPACKER_CASES.index((word_width, elem_width, lanes)) if count_width == 32 else count_width
    rng = random.Random(seed)
    jobs = unpacker_jobs(word_width, elem_width, lanes, rng)
    words, expected = [], []
    for count, cols in jobs:
        job_words = random_words(rng, count, word_width, elem_width)
        words += job_words
        expected += unpack_words(job_words, word_width, elem_width, lanes, count, cols)
    dut = Unpacker(word_width, elem_width, lanes, count_width)
    consumer = collect(dut.segments, len(expected), Stalls(0.3, seed + 3), 6 * (len(words) + len(expected)) + 200)
    feeds = [producer(dut.job, [unpacker_job(c, k, count_width) for c, k in jobs], Stalls(0.4, seed + 1)),
             producer(dut.words, words, Stalls(0.3, seed + 2))]
    beats, _ = simulate(dut, feeds, consumer)
    got = [decode_segment(b, elem_width, lanes) for b in beats]
    assert len(got) == len(expected), "beats lost, or one more after the final job"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"beat {i}"


@pytest.mark.parametrize("word_width, elem_width, lanes, count, cols", [
    (16, 16, 8, 256, 256),     # a word per cycle: a beat every 8 cycles
    (16, 16, 8, 250, 5),       # short rows: a word per cycle still
    (64, 4, 8, 512, 512),      # a beat per cycle, a word every 2 cycles
    (64, 4, 8, 500, 5),        # rows not a multiple of lanes: still a beat per cycle, no gap at row ends
    (16, 32, 1, 64, 64),       # an element is two words: a beat every 2 cycles
    (8, 32, 2, 64, 3),         # four words an element, rows of 2 + 1
    (16, 4, 8, 480, 12),       # rows of 8 + 4 elements: 3 words, 2 beats a row
    (128, 16, 16, 256, 256),   # 8 elements a word: a beat every 2 cycles
    (128, 16, 16, 250, 17),    # rows of 16 + 1
])
def test_unpacker_throughput(word_width, elem_width, lanes, count, cols):
    """The slower of a word per cycle and a beat per cycle, whatever the rows, after a fill of 2 cycles."""
    rng = random.Random(7)
    words = random_words(rng, count, word_width, elem_width)
    expected = unpack_words(words, word_width, elem_width, lanes, count, cols)
    dut = Unpacker(word_width, elem_width, lanes)

    async def consumer(ctx):
        return await get(ctx, dut.segments, len(expected), Stalls(0.0), max_cycles=20 * len(expected) + 100)

    feeds = [producer(dut.job, [unpacker_job(count, cols)], Stalls(0.0)), producer(dut.words, words, Stalls(0.0))]
    beats, cycles = simulate(dut, feeds, consumer)
    assert [decode_segment(b, elem_width, lanes) for b in beats] == expected
    # fill: the job is taken in the first cycle, its first word in the second
    assert cycles <= max(len(words), len(expected)) + 2, cycles


@pytest.mark.parametrize("word_width, elem_width, lanes", [(64, 4, 8), (16, 16, 4)])
def test_unpacker_jobs_back_to_back_gap(word_width, elem_width, lanes):
    """Between jobs the segments stream idles two cycles (both element stores: several elements a word, one)."""
    count, jobs = 64, 4
    rng = random.Random(3)
    job_words = [random_words(rng, count, word_width, elem_width) for _ in range(jobs)]
    dut = Unpacker(word_width, elem_width, lanes)
    per_job = max(len(job_words[0]), count // lanes)   # cycles a job takes once under way

    async def consumer(ctx):
        return await get(ctx, dut.segments, jobs * count // lanes, Stalls(0.0), max_cycles=2000)

    feeds = [producer(dut.job, [unpacker_job(count, count)] * jobs, Stalls(0.0)),
             producer(dut.words, [w for ws in job_words for w in ws], Stalls(0.0))]
    beats, cycles = simulate(dut, feeds, consumer)
    assert len(beats) == jobs * count // lanes
    assert cycles <= jobs * (per_job + 2), cycles


PACKER_CASES = [(16, 16), (32, 16), (32, 64), (128, 16), (128, 64), (16, 64), (64, 8), (8, 128), (512, 128),
                (256, 32)]


@pytest.mark.parametrize("elem_width, word_width", PACKER_CASES)
def test_packer_random_stalls(elem_width, word_width):
    seed = 100 + PACKER_CASES.index((elem_width, word_width))
    rng = random.Random(seed)
    per_word = max(1, word_width // elem_width)
    counts = [1, per_word, per_word + 1, 3 * per_word - 1, 2, 13, 4 * per_word, 0, 5] + \
        [rng.randrange(1, 5 * per_word + 3) for _ in range(6)]
    elements, expected = [], []
    for count in counts:
        job = [rng.randrange(1 << elem_width) for _ in range(count)]
        elements += job
        expected += pack_elements(job, elem_width, word_width)
    dut = Packer(elem_width, word_width)
    consumer = collect(dut.words, len(expected), Stalls(0.3, seed + 3), 6 * (len(elements) + len(expected)) + 200)
    feeds = [producer(dut.job, counts, Stalls(0.4, seed + 1)), producer(dut.elements, elements, Stalls(0.3, seed + 2))]
    beats, _ = simulate(dut, feeds, consumer)
    got = [(b & ((1 << word_width) - 1), bool(b >> word_width & 1)) for b in beats]
    assert len(got) == len(expected), "words lost, or one more after the final job"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"word {i}"


@pytest.mark.parametrize("elem_width, word_width, count", [
    (32, 16, 128),    # a word per cycle, an element every 2 cycles
    (32, 64, 256),    # an element per cycle, a word every 2 cycles
    (16, 16, 256),
    (128, 16, 32),
    (8, 128, 256),
    (512, 128, 64),
])
def test_packer_throughput(elem_width, word_width, count):
    """The slower of a word per cycle and an element per cycle, after a fill of 2 cycles."""
    rng = random.Random(9)
    elements = [rng.randrange(1 << elem_width) for _ in range(count)]
    expected = pack_elements(elements, elem_width, word_width)
    dut = Packer(elem_width, word_width)

    async def consumer(ctx):
        return await get(ctx, dut.words, len(expected), Stalls(0.0), max_cycles=20 * len(expected) + 100)

    feeds = [producer(dut.job, [count], Stalls(0.0)), producer(dut.elements, elements, Stalls(0.0))]
    beats, taken = simulate(dut, feeds, consumer)
    got = [(b & ((1 << word_width) - 1), bool(b >> word_width & 1)) for b in beats]
    assert got == expected
    # fill: the job is taken in the first cycle, its first element in the second
    assert taken <= max(len(expected), count) + 2, taken


@pytest.mark.parametrize("elem_width, word_width", [(32, 16), (16, 64)])
def test_packer_jobs_back_to_back_gap(elem_width, word_width):
    """Between jobs the words stream idles two cycles."""
    count, jobs = 32, 4
    rng = random.Random(4)
    elements = [rng.randrange(1 << elem_width) for _ in range(jobs * count)]
    words_per_job = len(pack_elements(elements[:count], elem_width, word_width))
    dut = Packer(elem_width, word_width)

    async def consumer(ctx):
        return await get(ctx, dut.words, jobs * words_per_job, Stalls(0.0), max_cycles=2000)

    feeds = [producer(dut.job, [count] * jobs, Stalls(0.0)), producer(dut.elements, elements, Stalls(0.0))]
    beats, cycles = simulate(dut, feeds, consumer)
    assert len(beats) == jobs * words_per_job
    assert cycles <= jobs * (max(words_per_job, count) + 2), cycles


def test_unpack_words_by_hand():
    # two 4-bit elements per byte, element 0 in the low nibble; 5 elements in rows of 3, 2 lanes
    beats = unpack_words([0x21, 0x43, 0x65], 8, 4, 2, 5, 3)
    assert beats == [([1, 2], 2, False, False), ([3, 0], 1, True, False), ([4, 5], 2, True, True)]
    # a 32-bit element from two 16-bit words, the first in the low bits
    assert unpack_words([0x5678, 0x1234], 16, 32, 1, 1, 1) == [([0x12345678], 1, True, True)]
    with pytest.raises(ValueError, match="takes 2 words"):
        unpack_words([0], 16, 32, 1, 1, 1)


@pytest.mark.parametrize("elem_width, word_width", [(8, 32), (16, 16), (32, 8), (4, 128)])
def test_twins_round_trip(elem_width, word_width):
    rng = random.Random(elem_width * word_width)
    for count in (1, 2, 7, 16, 33):
        elements = [rng.randrange(1 << elem_width) for _ in range(count)]
        words = [word for word, _ in pack_elements(elements, elem_width, word_width)]
        beats = unpack_words(words, word_width, elem_width, 1, count, count)
        assert [data[0] for data, *_ in beats] == elements


def test_pack_elements_by_hand():
    assert pack_elements([1, 2, 3], 8, 16) == [(0x0201, False), (0x0003, True)]
    assert pack_elements([0x12345678], 32, 16) == [(0x5678, False), (0x1234, True)]
    assert pack_elements([], 32, 16) == []


@pytest.mark.parametrize("args, match", [
    ((12, 8, 4), "word_width"), ((256, 8, 4), "word_width"), ((16, 2, 4), "elem_width"), ((16, 64, 4), "elem_width"),
    ((16, 8, 3), "lanes"), ((16, 8, 32), "lanes"), ((16, 8, 0), "lanes"), ((16, True, 4), "elem_width"),
])
def test_unpacker_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        Unpacker(*args)
    with pytest.raises(ValueError, match="count_width must be an integer from 8 to 32"):
        Unpacker(16, 8, 4, 33)


@pytest.mark.parametrize("args, match", [
    ((4, 16), "elem_width"), ((24, 16), "elem_width"), ((1024, 16), "elem_width"), ((32, 256), "word_width"),
    ((32, 12), "word_width"),
])
def test_packer_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        Packer(*args)


def test_attributes():
    dut = Unpacker(64, 4, 8)
    assert (dut.word_width, dut.elem_width, dut.lanes) == (64, 4, 8)
    assert (dut.elems_per_word, dut.words_per_elem) == (16, 1)
    assert Unpacker(16, 32, 2).words_per_elem == 2
    packer = Packer(32, 16)
    assert (packer.elem_width, packer.word_width) == (32, 16)
