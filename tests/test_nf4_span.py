# amaranth: UnusedElaboratable=no
"""NF4 spans: the golden cut of a quantized weight into rectangles of whole blocks, and the RTL unit that gives each
block of a span its second-level absmax (alone, and feeding the dequantizer) against it."""

import numpy as np
import pytest
import torch
from amaranth.hdl import Module
from amaranth.lib import wiring

from edge_qlora.golden import codebook, nf4_dequant, nf4_quant, nf4_span
from edge_qlora.golden.bnb_state import quant_state_dict
from edge_qlora.rtl.nf4_dequant import NF4DequantConfig, NF4Dequantizer
from edge_qlora.rtl.nf4_span import SpanScales
from edge_qlora.sim.harness import producer, simulate
from edge_qlora.sim.nf4 import dequantizer_streams, run_span_scales, span_descriptor
from edge_qlora.sim.streams import Stalls, get

from cases import DTYPES, random_weights


def as_int16(tensor):
    return tensor.view(torch.int16)


# --- golden ---------------------------------------------------------------------------------------------------------

def test_spans_dequantize_to_the_slices_of_the_whole():
    # spans at the weight's edges, a whole row, a span of a span: the slices of the dequantized whole, to the bit
    weight = random_weights((40, 5632), DTYPES["bf16"], 13)
    for double_quant in (False, True):
        q = nf4_quant.quantize(weight, 64, double_quant)
        full = as_int16(nf4_dequant.dequantize(q))
        for rows, cols in [(slice(0, 40), slice(5568, 5632)), (slice(7, 8), slice(0, 5632)),
                           (slice(3, 37), slice(128, 1024))]:
            part = nf4_span.span(q, rows, cols)
            assert part.absmax2_per_block == double_quant and part.shape == tuple(full[rows, cols].shape)
            assert (as_int16(nf4_dequant.dequantize(part)) == full[rows, cols]).all()
        inner = nf4_span.span(nf4_span.span(q, slice(3, 37), slice(128, 1024)), slice(1, 5), slice(64, 192))
        assert (as_int16(nf4_dequant.dequantize(inner)) == full[4:8, 192:320]).all()


@pytest.mark.parametrize("bits", [2, 3])
def test_spans_of_sub4bit_codes(bits):
    # 2- and 3-bit codes are a bit string across bytes; a block of 64 is still whole bytes of it
    q = codebook.quantize(random_weights((12, 640), DTYPES["bf16"], bits), bits, blocksize=64)
    full = as_int16(codebook.dequantize(q))
    part = nf4_span.span(q, slice(5, 11), slice(192, 448))
    assert part.bits == bits and (as_int16(codebook.dequantize(part)) == full[5:11, 192:448]).all()


def test_span_blocks_by_hand():
    where = nf4_span.span_blocks((10, 640), slice(3, 5), slice(128, 256), 64)
    assert where == nf4_span.SpanBlocks(first=32, rows=2, blocks=2, stride=10)
    assert where.indices().tolist() == [32, 33, 42, 43]
    crossing = nf4_span.SpanBlocks(250, 3, 2, 5)
    assert crossing.indices().tolist() == [250, 251, 255, 256, 260, 261]
    assert crossing.groups().tolist() == [0, 0, 0, 1, 1, 1]


def test_span_checks():
    q = nf4_quant.quantize(random_weights((4, 128), DTYPES["bf16"], 1))
    for rows, cols, match in [(slice(0, 2), slice(3, 64), "whole NF4 blocks of 64"),
                              (slice(0, 2), slice(64, 64), "non-empty"), (slice(0, 4, 2), slice(0, 64), "contiguous")]:
        with pytest.raises(ValueError, match=match):
            nf4_span.span(q, rows, cols)
    with pytest.raises(ValueError, match="2-D"):
        nf4_span.span(nf4_quant.quantize(torch.ones(128)), slice(0, 1), slice(0, 64))
    with pytest.raises(ValueError, match="whole NF4 blocks"):
        nf4_span.span(nf4_quant.quantize(torch.ones(2, 100)), slice(0, 1), slice(0, 64))
    with pytest.raises(ValueError, match="no bitsandbytes quant state"):
        quant_state_dict(nf4_span.span(q, slice(0, 2), slice(0, 64)))


# --- RTL ------------------------------------------------------------------------------------------------------------

STREAMS = ("span", "table", "absmax2", "tensor", "codes", "absmax", "weights")


def random_stalls(seed, idle=0.3):
    return {name: Stalls(idle, seed * 10 + i) for i, name in enumerate(STREAMS)}


def two_weights():
    """Two double-quantized weights of 700 and 300 blocks (three and two groups of 256)."""
    first = nf4_quant.quantize(random_weights((70, 640), DTYPES["bf16"], 2), 64, True)
    second = nf4_quant.quantize(random_weights((30, 640), DTYPES["bf16"], 3), 64, True)
    return first, second


CUTS = [(slice(3, 40), slice(128, 192)), (slice(20, 26), slice(512, 640)), (slice(69, 70), slice(0, 64)),
        (slice(0, 70), slice(0, 640))]


@pytest.mark.parametrize("stalled", [False, True], ids=["no_stalls", "stalls"])
def test_rtl_gives_each_block_its_group(stalled):
    # spans of one weight (groups changing mid-row and mid-span, one block, the whole), then a second weight's
    # table and spans, then the first's again: each block gets its group's entry of the table loaded last
    first, second = two_weights()
    spans, expected = [], []
    for q, new in ((first, True), (second, True), (first, True)):
        for i, (rows, cols) in enumerate(CUTS if q is first else CUTS[:2]):
            where = nf4_span.span_blocks(q.shape, rows, cols, q.blocksize)
            spans.append((where, q.absmax2 if new and i == 0 else None))
            expected.append(nf4_span.span_absmax2(q.absmax2, where))
            assert np.array_equal(expected[-1], nf4_span.span(q, rows, cols).absmax2)
    run = run_span_scales(spans, max_groups=4, stalls=random_stalls(1) if stalled else None)
    for got, want in zip(run.values, expected):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    if not stalled:
        # a beat a cycle: the table loads, then every block of every span streams back to back
        tables = sum(len(q.absmax2) for q in (first, second, first))
        assert run.cycles <= run.beats + tables + 4 * len(spans) + 10


def test_rtl_checks():
    with pytest.raises(ValueError, match="max_groups"):
        SpanScales(0)
    with pytest.raises(ValueError, match="max_groups"):
        SpanScales(1 << 16)
    where = nf4_span.SpanBlocks(0, 2, 1, 600)
    with pytest.raises(ValueError, match="first span must bring"):
        run_span_scales([(where, None)])
    with pytest.raises(ValueError, match="needs groups up to 2"):
        run_span_scales([(where, np.ones(2, np.float32))])
    with pytest.raises(ValueError, match="the unit holds 1 to 4"):
        run_span_scales([(where, np.ones(5, np.float32))], max_groups=4)


class SpanDequantizer(wiring.Component):
    """The NF4 front end of a block job: the span unit's absmax2 into the dequantizer (here only in the test; the
    block controller wires them so)."""

    def __init__(self, config):
        self._config = config
        self._scales, self._dequantizer = SpanScales(4), NF4Dequantizer(config)
        members = {name: member for name, member in self._dequantizer.signature.members.items() if name != "absmax2"}
        scales = self._scales.signature.members
        super().__init__({**members, "span": scales["span"], "table": scales["table"]})

    def elaborate(self, platform):
        m = Module()
        m.submodules.scales, m.submodules.dequantizer = self._scales, self._dequantizer
        wiring.connect(m, self._scales.absmax2, self._dequantizer.absmax2)
        for name in ("span", "table"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(self._scales, name))
        for name in ("tensor", "codes", "absmax"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(self._dequantizer, name))
        wiring.connect(m, self._dequantizer.weights, wiring.flipped(self.weights))
        return m


def test_rtl_front_end_dequantizes_spans():
    # spans cut from two weights through the span unit and the dequantizer under random stalls: each span equals
    # the slice of its dequantized weight to the bit
    first, second = two_weights()
    config = NF4DequantConfig(lanes=8, blocksize=64)
    parts, expected, inputs = [], [], {}
    for q, cuts in ((first, CUTS[:3]), (second, CUTS[:2])):
        full = as_int16(nf4_dequant.dequantize(q)).numpy()
        for i, (rows, cols) in enumerate(cuts):
            part = nf4_span.span(q, rows, cols)
            parts.append(part)
            expected.append(full[rows, cols].reshape(-1))
            where = nf4_span.span_blocks(q.shape, rows, cols, q.blocksize)
            inputs.setdefault("span", []).append(span_descriptor(where, len(q.absmax2) if i == 0 else None))
            if i == 0:
                inputs.setdefault("table", []).extend(np.asarray(q.absmax2, np.float32).view(np.uint32).tolist())
            for name, beats in dequantizer_streams(part, config.lanes).items():
                if name != "absmax2":
                    inputs.setdefault(name, []).extend(beats)
    dut = SpanDequantizer(config)
    stalls = random_stalls(4)
    producers = [producer(getattr(dut, name), beats, stalls[name]) for name, beats in inputs.items()]
    total = len(inputs["codes"])

    async def consumer(ctx):
        return await get(ctx, dut.weights, total, stalls["weights"], max_cycles=40 * total + 2000)

    beats, _ = simulate(dut, producers, consumer, None)
    assert len(beats) == total
    mask = (1 << 16 * config.lanes) - 1
    values = np.array([(beat & mask) >> (16 * lane) & 0xFFFF for beat in beats for lane in range(config.lanes)],
                      np.uint16).view(np.int16)
    assert np.array_equal(values, np.concatenate(expected))
