# amaranth: UnusedElaboratable=no
"""External-memory port: the burst reader and writer against a memory written in the testbench, random stalls on
every stream; requests split at max_burst and the boundary, words in order, nothing lost or duplicated."""

import random

import pytest
from amaranth.hdl import Module, Value
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from edge_qlora.rtl.memport import (BurstReader, BurstWriter, MemPortConfig, MemPortSignature, WriteArbiter,
                                    beat_layout, job_layout, request_layout, split_bursts)
from edge_qlora.sim.harness import producer, simulate
from edge_qlora.sim.streams import Stalls, get, put

from reference import fields

CONFIGS = {
    "sdram16": MemPortConfig(address_width=12, data_width=16, max_burst=5, boundary=32),
    "wide64": MemPortConfig(address_width=12, data_width=64, max_burst=3, boundary=64),
    "row_is_word": MemPortConfig(address_width=10, data_width=32, max_burst=4, boundary=4),
    "long_burst": MemPortConfig(address_width=12, data_width=16, max_burst=40, boundary=64),
}


def job_word(config, address, size):
    return address | (size << config.address_width)


def random_jobs(config, count, seed):
    """Jobs around the interesting sizes: empty, one byte, a word, one burst, across a boundary, many bursts."""
    rng = random.Random(seed)
    wb, top = config.word_bytes, config.capacity
    sizes = [0, 1, wb, wb + 1, config.max_burst * wb, config.max_burst * wb + wb, config.boundary + 3 * wb,
             3 * config.boundary]
    jobs = []
    for i in range(count):
        size = sizes[i] if i < len(sizes) else rng.randrange(0, 4 * config.boundary)
        address = rng.randrange(0, top - size - wb) // wb * wb
        if i % 5 == 4:   # just below a boundary
            address = (rng.randrange(1, top // config.boundary - 4) * config.boundary - wb) % top
        jobs.append((address, size))
    return jobs


def check_requests(config, requests, jobs, ordered=True):
    """The requests split the jobs into bursts within the port's rows (``ordered``: in the jobs' order)."""
    aw, lw = config.address_width, config.max_burst.bit_length()
    got = [tuple(fields(r, aw, lw)) for r in requests]
    for address, length in got:
        assert 1 <= length <= config.max_burst
        assert address % config.word_bytes == 0
        first_row = address // config.boundary
        last_row = (address + length * config.word_bytes - 1) // config.boundary
        assert first_row == last_row, f"request ({address:#x}, {length}) crosses a {config.boundary}-byte boundary"
    expected = [burst for address, size in jobs for burst in split_bursts(config, address, size)]
    assert got == expected if ordered else sorted(got) == sorted(expected)


def words_of(config, memory, address, length):
    wb = config.word_bytes
    return [int.from_bytes(memory[address + i * wb:address + (i + 1) * wb], "little") for i in range(length)]


def read_memory(config, port_cmd, port_data, memory, requests, stalls_cmd, stalls_data):
    """A memory side: takes read requests (recording them) and returns their words, ``last`` on each burst's end."""
    queue = []

    async def take(ctx):
        raw = Value.cast(port_cmd.payload)
        while True:
            ctx.set(port_cmd.ready, 0 if stalls_cmd.stall() else 1)
            _, _, valid, ready, payload = await ctx.tick().sample(port_cmd.valid, port_cmd.ready, raw)
            if valid and ready:
                requests.append(payload)
                queue.append(payload)

    async def answer(ctx):
        aw, lw, dw = config.address_width, config.max_burst.bit_length(), config.data_width
        while True:
            if not queue:
                await ctx.tick()
                continue
            address, length = fields(queue.pop(0), aw, lw)
            words = words_of(config, memory, address, length)
            await put(ctx, port_data, [w | (int(i == length - 1) << dw) for i, w in enumerate(words)], stalls_data)

    return [take, answer]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reader_random_jobs(name):
    config = CONFIGS[name]
    seed = sorted(CONFIGS).index(name)
    rng = random.Random(seed)
    memory = bytes(rng.randrange(256) for _ in range(config.capacity))
    jobs = random_jobs(config, 24, seed)
    dut = BurstReader(config, jobs_in_flight=3)
    expected = []
    for address, size in jobs:
        words = words_of(config, memory, address, -(-size // config.word_bytes))
        expected += [(w, i == len(words) - 1) for i, w in enumerate(words)]
    requests = []
    memory_side = read_memory(config, dut.read_cmd, dut.read_data, memory, requests, Stalls(0.3, seed + 1),
                              Stalls(0.3, seed + 2))

    async def consumer(ctx):
        return await get(ctx, dut.data, len(expected), Stalls(0.3, seed + 3), max_cycles=20 * len(expected) + 500)

    feed = producer(dut.job, [job_word(config, a, s) for a, s in jobs], Stalls(0.4, seed))
    beats, _ = simulate(dut, [feed] + memory_side, consumer, None)
    dw = config.data_width
    got = [(b & ((1 << dw) - 1), bool(b >> dw & 1)) for b in beats]
    assert len(got) == len(expected)
    assert got == expected
    check_requests(config, requests, jobs)


def test_reader_streams_without_stalls():
    """With a memory that never stalls, a long job's words leave at one per cycle."""
    config = MemPortConfig(address_width=12, data_width=16, max_burst=8, boundary=64)
    memory = bytes(range(256)) * (config.capacity // 256)
    dut = BurstReader(config)
    size = 512
    requests = []
    memory_side = read_memory(config, dut.read_cmd, dut.read_data, memory, requests, Stalls(0.0), Stalls(0.0))

    async def consumer(ctx):
        return await get(ctx, dut.data, size // 2, Stalls(0.0), max_cycles=5 * size)

    beats, cycles = simulate(dut, [producer(dut.job, [job_word(config, 0, size)], Stalls(0.0))] + memory_side,
                             consumer, None)
    assert len(beats) == size // 2
    assert cycles <= size // 2 + 12


def _write_memory(dut, config, memory, requests, received, stalls_cmd, stalls_data):
    """A memory behind ``dut``'s write port: each burst's words into ``memory``, its command into ``requests``,
    its words into ``received``; ``last`` must close each burst."""
    wb = config.word_bytes

    async def memory_side(ctx):
        aw, lw, dw = config.address_width, config.max_burst.bit_length(), config.data_width
        cmd_raw, data_raw = Value.cast(dut.write_cmd.payload), Value.cast(dut.write_data.payload)
        while True:
            ctx.set(dut.write_cmd.ready, 0 if stalls_cmd.stall() else 1)
            _, _, valid, ready, payload = await ctx.tick().sample(dut.write_cmd.valid, dut.write_cmd.ready, cmd_raw)
            if not (valid and ready):
                continue
            ctx.set(dut.write_cmd.ready, 0)
            requests.append(payload)
            address, length = fields(payload, aw, lw)
            taken = 0
            while taken < length:
                ctx.set(dut.write_data.ready, 0 if stalls_data.stall() else 1)
                _, _, valid, ready, beat = await ctx.tick().sample(dut.write_data.valid, dut.write_data.ready,
                                                                   data_raw)
                if valid and ready:
                    word, last = beat & ((1 << dw) - 1), bool(beat >> dw & 1)
                    assert last == (taken == length - 1), "last must close each burst, and only there"
                    memory[address + taken * wb:address + (taken + 1) * wb] = word.to_bytes(wb, "little")
                    received.append(word)
                    taken += 1
            ctx.set(dut.write_data.ready, 0)

    return memory_side


def test_writer_random_jobs():
    for name in ("sdram16", "wide64", "row_is_word"):
        config = CONFIGS[name]
        seed = 10 + sorted(CONFIGS).index(name)
        rng = random.Random(seed)
        wb = config.word_bytes
        # jobs that do not overlap, so the final memory image is known whatever the order of their bytes
        jobs, address = [], 0
        for size in [0, 1, wb, config.max_burst * wb + 1, config.boundary + 2 * wb] + \
                [rng.randrange(0, 3 * config.boundary) for _ in range(8)]:
            address += rng.randrange(0, 4) * wb
            jobs.append((address, size))
            address += -(-size // wb) * wb
        assert address < config.capacity
        words = [[rng.randrange(1 << config.data_width) for _ in range(-(-size // wb))] for _, size in jobs]
        expected = bytearray(config.capacity)
        for (address, _), ws in zip(jobs, words):
            for i, w in enumerate(ws):
                expected[address + i * wb:address + (i + 1) * wb] = w.to_bytes(wb, "little")
        total = sum(len(ws) for ws in words)

        dut = BurstWriter(config)
        memory = bytearray(config.capacity)
        requests, received = [], []
        memory_side = _write_memory(dut, config, memory, requests, received, Stalls(0.3, seed + 1),
                                    Stalls(0.3, seed + 2))

        async def consumer(ctx):
            for _ in range(30 * total + 500):
                if len(received) == total:
                    break
                await ctx.tick()
            for _ in range(20):   # nothing more may come
                await ctx.tick()
            return len(received)

        feeds = [producer(dut.job, [job_word(config, a, s) for a, s in jobs], Stalls(0.4, seed)),
                 producer(dut.data, [w for ws in words for w in ws], Stalls(0.3, seed + 3))]
        count, _ = simulate(dut, feeds + [memory_side], consumer, None)
        assert count == total
        assert received == [w for ws in words for w in ws]
        assert memory == expected
        check_requests(config, requests, jobs)


class _TwoWriters(wiring.Component):
    """Two burst writers onto one port through the arbiter, as the blocked product joins its outputs' writes and
    its gradients'."""

    def __init__(self, config):
        self.config = config
        job, words = stream.Signature(job_layout(config)), stream.Signature(config.data_width)
        super().__init__({"job_0": In(job), "data_0": In(words), "job_1": In(job), "data_1": In(words),
                          "write_cmd": Out(stream.Signature(request_layout(config))),
                          "write_data": Out(stream.Signature(beat_layout(config)))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.arbiter = arbiter = WriteArbiter(self.config)
        for i in range(2):
            writer = m.submodules[f"writer_{i}"] = BurstWriter(self.config)
            wiring.connect(m, wiring.flipped(getattr(self, f"job_{i}")), writer.job)
            wiring.connect(m, wiring.flipped(getattr(self, f"data_{i}")), writer.data)
            wiring.connect(m, writer.write_cmd, arbiter.cmds[i])
            wiring.connect(m, writer.write_data, arbiter.beats[i])
        wiring.connect(m, arbiter.write_cmd, wiring.flipped(self.write_cmd))
        wiring.connect(m, arbiter.write_data, wiring.flipped(self.write_data))
        return m


def test_arbiter_keeps_each_burst_whole():
    """Two writers' random jobs through the arbiter with random stalls everywhere: every burst's command is followed
    by its own words, and the memory ends as the jobs say."""
    config = CONFIGS["sdram16"]
    wb = config.word_bytes
    rng = random.Random(5)
    jobs, address = [[], []], 0
    for i in range(16):
        size = rng.randrange(1, 3 * config.max_burst * wb)
        jobs[i % 2].append((address, size))
        address += -(-size // wb) * wb + rng.randrange(0, 4) * wb
    words = [[[rng.randrange(1 << config.data_width) for _ in range(-(-size // wb))] for _, size in js] for js in jobs]
    expected = bytearray(config.capacity)
    for js, wss in zip(jobs, words):
        for (address, _), ws in zip(js, wss):
            for i, w in enumerate(ws):
                expected[address + i * wb:address + (i + 1) * wb] = w.to_bytes(wb, "little")
    total = sum(len(ws) for wss in words for ws in wss)
    dut = _TwoWriters(config)
    memory = bytearray(config.capacity)
    requests, received = [], []
    memory_side = _write_memory(dut, config, memory, requests, received, Stalls(0.3, 1), Stalls(0.3, 2))

    async def consumer(ctx):
        for _ in range(30 * total + 500):
            if len(received) == total:
                break
            await ctx.tick()
        return len(received)

    feeds = []
    for i in range(2):
        feeds += [producer(getattr(dut, f"job_{i}"), [job_word(config, a, n) for a, n in jobs[i]], Stalls(0.4, 3 + i)),
                  producer(getattr(dut, f"data_{i}"), [w for ws in words[i] for w in ws], Stalls(0.3, 5 + i))]
    count, _ = simulate(dut, feeds + [memory_side], consumer, None)
    assert count == total
    assert memory == expected
    check_requests(config, requests, sorted(jobs[0] + jobs[1]), ordered=False)


def test_arbiter_refuses_bad_writers():
    with pytest.raises(ValueError, match="writers"):
        WriteArbiter(CONFIGS["sdram16"], writers=1)
    with pytest.raises(TypeError, match="MemPortConfig"):
        WriteArbiter("sdram")


def test_split_bursts_python():
    config = MemPortConfig(address_width=16, data_width=16, max_burst=4, boundary=16)
    assert split_bursts(config, 12, 14) == [(12, 2), (16, 4), (24, 1)]
    assert split_bursts(config, 0, 0) == []
    assert split_bursts(config, 5, 1) == [(4, 1)]


def test_signature_directions():
    config = MemPortConfig()
    sig = MemPortSignature(config)
    assert sig.members["read_cmd"].flow == wiring.Out
    assert sig.members["read_data"].flow == wiring.In
    assert sig.members["write_data"].flow == wiring.Out
    assert sig.flip().members["read_cmd"].flow == wiring.In
    assert sig == MemPortSignature(MemPortConfig())
    assert job_layout(config).size == 2 * config.address_width + 1
    # a reader's ports connect to the memory side of the port
    reader = BurstReader(config)
    assert reader.read_cmd.signature == sig.members["read_cmd"].signature


@pytest.mark.parametrize("kwargs, match", [
    ({"data_width": 12}, "data_width"), ({"data_width": 4}, "data_width"), ({"max_burst": 0}, "max_burst"),
    ({"boundary": 1000}, "boundary"), ({"boundary": 1}, "boundary"), ({"address_width": 2}, "address_width"),
    ({"address_width": 8, "boundary": 1024}, "address space"), ({"max_burst": True}, "max_burst"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemPortConfig(**kwargs)


def test_tagged_reader_puts_a_fifo_in_lut_ram_on_request():
    from amaranth.back import rtlil

    from edge_qlora.rtl.memport import TaggedReader

    config = MemPortConfig()
    text = rtlil.convert(TaggedReader(config, [128, 128], ram_styles=("block", "distributed")))
    assert text.count('attribute \\ram_style "distributed"') == 1
    assert "ram_style" not in rtlil.convert(TaggedReader(config, [128, 128]))
    with pytest.raises(ValueError, match="ram_styles"):
        TaggedReader(config, [128, 128], ram_styles=("block",))
    with pytest.raises(ValueError, match="ram_styles"):
        TaggedReader(config, [128], ram_styles=("lut",))


def test_movers_reject():
    with pytest.raises(TypeError, match="MemPortConfig"):
        BurstReader(16)
    with pytest.raises(ValueError, match="jobs_in_flight"):
        BurstReader(MemPortConfig(), jobs_in_flight=0)
    with pytest.raises(TypeError, match="MemPortConfig"):
        BurstWriter(None)


# --- the job descriptor (golden/memmap.py) ---

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_qlora.golden import memmap as mm  # noqa: E402
from edge_qlora.golden.lora import random_case, step_model  # noqa: E402
from edge_qlora.golden.traffic import StepShape, nf4_bytes  # noqa: E402


@pytest.mark.parametrize("kwargs", [
    dict(d_in=2048, d_out=2048, t=128), dict(d_in=37, d_out=5, t=3, r=2, optimizer="sgd", align=1),
    dict(d_in=100, d_out=33, t=7, r=4, double_quant=False, align=1024, base=4096, in_place=False,
         gradients_out=True),
    dict(d_in=5632, d_out=2048, t=512, blocksize=128),
    dict(d_in=256, d_out=128, t=18, r=4, gradients_out=True, row_exponent_chunk=16, rank_rows=True),
])
def test_layout_no_overlap_aligned_sized(kwargs):
    memmap = mm.layout(**kwargs)
    assert memmap.regions[0].address == memmap.base
    for region, after in zip(memmap.regions, memmap.regions[1:]):
        assert region.end == after.address           # packed in order, no overlap, no gap beyond padding
    for region in memmap.regions:
        assert region.address % memmap.align == 0
        assert region.size <= region.slot < region.size + memmap.align
    n = memmap.d_in * memmap.d_out
    assert memmap.weight_bytes == nf4_bytes(n, memmap.blocksize, memmap.double_quant)
    shape = StepShape(memmap.d_in, memmap.d_out, memmap.t, memmap.r, memmap.optimizer, memmap.blocksize,
                      memmap.double_quant)
    for name in ("x", "dy", "y", "dx"):
        assert memmap[name].size == shape.size(name)
    assert memmap["lora_A"].size == shape.size("A") and memmap["lora_B"].size == shape.size("B")
    state = sum(memmap[name].size for name in mm.STATE_NAMES if name in memmap)
    assert state == shape.state_bytes
    assert len(set(memmap.names)) == len(memmap.names)
    if "hb" in memmap:
        # hb (bf16 [t, r]), x's chunk fields (whole 32-bit words) and gb (bf16 [t, r]) after every other region, so
        # that no other address moves
        assert [region.name for region in memmap.regions[-3:]] == ["hb", "x_fields", "gb"]
        assert memmap["hb"].size == memmap.t * memmap.r * 2 and memmap["x_fields"].size == 4 * -(-memmap.t // 64)
        assert memmap["gb"].size == memmap["hb"].size


def test_tinyllama_steps_fit_ulx3s():
    rows = mm.tinyllama_table(128, 16)
    assert [row[0] for row in rows[:7]] == [p[0] for p in mm.TINYLLAMA_PROJECTIONS]
    assert all(row[7] for row in rows[:7])
    q = mm.layout(2048, 2048, 128, 16)
    assert q.total == 5_047_360 and q.fits()


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_in=0, d_out=4, t=1), "d_in"), (dict(d_in=4, d_out=4, t=1, align=48), "align"),
    (dict(d_in=4, d_out=4, t=1, base=32), "base"), (dict(d_in=4, d_out=4, t=1, optimizer="adam"), "optimizer"),
    (dict(d_in=4, d_out=4, t=1, blocksize=50), "blocksize"),
])
def test_layout_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mm.layout(**kwargs)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = a.contiguous().view(torch.uint8).numpy(), b.contiguous().view(torch.uint8).numpy()
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("in_place, double_quant, optimizer", [(True, True, "adamw"), (False, False, "adamw"),
                                                               (True, True, "sgd")])
def test_pack_unpack_round_trip(in_place, double_quant, optimizer):
    case = random_case(5, 70, 9, 3, optimizer=optimizer, states=True, double_quant=double_quant, seed=4)
    memmap = mm.layout_for(case, in_place=in_place, gradients_out=True, base=1 << 20)
    image = mm.pack_case(case, memmap)
    assert len(image) == memmap.total
    inputs = mm.unpack_inputs(image, memmap)
    q = case.weight
    _same(inputs["nf4_codes"], q.packed)
    _same(inputs["nf4_absmax"], q.absmax)
    if double_quant:
        _same(inputs["nf4_absmax2"], q.absmax2)
        _same(inputs["nf4_offset"], np.float32(q.offset).reshape(1))
    for name in ("x", "dy", "lora_A", "lora_B"):
        _same(inputs[name], getattr(case, name))
    if optimizer == "adamw":
        for name, value in case.states().items():
            _same(inputs[name], value)
    outputs = step_model(case)
    mm.store_outputs(image, memmap, outputs)
    got = mm.unpack_outputs(image, memmap)
    assert set(got) == {"y", "dx", "lora_A", "lora_B", "grad_A", "grad_B"} | \
        (set(mm.STATE_NAMES) if optimizer == "adamw" else set())
    for name, value in got.items():
        _same(value, outputs[name])
    # the step's inputs other than the in-place ones are untouched by the outputs
    for name in ("nf4_codes", "x", "dy"):
        _same(mm.unpack_inputs(image, memmap)[name], inputs[name])
    if not in_place:
        _same(mm.unpack_inputs(image, memmap)["lora_A"], case.lora_A)


def test_pack_rejects_mismatched_case():
    case = random_case(4, 64, 8, 2, seed=1)
    with pytest.raises(ValueError, match="does not match"):
        mm.pack_case(case, mm.layout(64, 8, 5, 2))


def test_memmap_cli(capsys):
    assert mm.main(["--map", "q_proj"]) == 0
    out = capsys.readouterr().out
    assert "| q_proj | 2048 | 2048 |" in out and "| nf4_offset | float32 | 1 |" in out
    with pytest.raises(SystemExit):
        mm.main(["--map", "lm_head"])
