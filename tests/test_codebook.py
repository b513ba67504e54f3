# amaranth: UnusedElaboratable=no
"""Code books of 2, 3 and 4 bits: the NF tables, the packed layout, the golden model, and the RTL dequantizer
against it (NF tables as constants and tables loaded per tensor)."""

import numpy as np
import pytest
import torch

from edge_qlora.constants import CODE_BITS, NF_CODES, NF4_CODE
from edge_qlora.golden import codebook, nf4_dequant, nf4_quant
from edge_qlora.golden.codebook import Codebook

from cases import DTYPES, adversarial, random_weights
from reference import mismatches

#: user tables: uneven, one-sided, beyond [-1, 1], symmetric (a bound at 0.0), no zero level
CUSTOM = {
    "uniform2": Codebook(np.array([-1, -1 / 3, 1 / 3, 1], np.float32)),
    "positive3": Codebook(np.linspace(0, 1, 8, dtype=np.float32)),
    "wide3": Codebook(np.array([-3, -1.5, -0.5, -0.1, 0.1, 0.5, 1.5, 3], np.float32)),
    "int4": Codebook(np.arange(-8, 8, dtype=np.float32) / 8),
    "negative2": Codebook(np.array([-1, -0.5, -0.25, 0], np.float32)),
}


def test_nf_tables_follow_the_construction():
    for bits in CODE_BITS:
        assert mismatches(codebook.nf_levels(bits), NF_CODES[bits]) == 0
    assert mismatches(codebook.nf_levels(4), NF4_CODE) == 0  # the same construction gives bitsandbytes' NF4
    for bits in CODE_BITS:
        table = NF_CODES[bits]
        assert table.size == 2 ** bits and (table > 0).sum() == 2 ** (bits - 1) and (table == 0).sum() == 1
        assert table[0] == -1 and table[-1] == 1


def test_codebook_validation():
    assert Codebook.nf(3).name == "nf3" and Codebook(NF_CODES[2]).name == "nf2"
    assert CUSTOM["int4"].name == "custom" and CUSTOM["int4"].quant_type == "cb4"
    for levels, match in [(np.zeros(5, np.float32), "4, 8 or 16"), (np.array([0, 1, 1, 2], np.float32), "increasing"),
                          (np.array([0, 1, np.inf, 2], np.float32), "finite"), (np.arange(4), "floats")]:
        with pytest.raises(ValueError, match=match):
            Codebook(levels)
    with pytest.raises(ValueError, match="bits"):
        Codebook.nf(5)
    with pytest.raises(ValueError, match="name"):
        Codebook(NF_CODES[3], name="custom")


@pytest.mark.parametrize("bits", CODE_BITS)
def test_packing(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 2, 3, 7, 8, 9, 63, 64, 1001):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        packed = codebook.pack_codes(codes, bits, pad_code=1)
        assert packed.size == codebook.packed_bytes(n, bits) == -(-n * bits // 8)
        assert np.array_equal(codebook.unpack_codes(packed, n, bits), codes)
        if bits == 4:
            assert np.array_equal(codebook.pack_codes(codes, 4, 7), nf4_quant.pack_nibbles(codes))
    # big-endian: the first weight in the most significant bits
    assert codebook.pack_codes([1, 2, 3, 0], 2).tolist() == [0b01101100]
    assert codebook.pack_codes([5, 1, 7, 0, 0, 0, 0, 2], 3).tolist() == [0b10100111, 0b10000000, 0b00000010]


def test_nf4_is_bitsandbytes_format():
    weight = random_weights((33, 70), torch.bfloat16, 0)
    for dq in (False, True):
        a, b = codebook.quantize(weight, 4, blocksize=64, double_quant=dq), nf4_quant.quantize(weight, 64, dq)
        assert np.array_equal(a.packed, b.packed) and np.array_equal(a.absmax, b.absmax) and a.is_nf4


def nearest_level_violations(weight, q):
    """Weights of full blocks whose code is not a nearest level of the scaled value (ties either way)."""
    values = weight.float().reshape(-1).numpy().astype(np.float64)
    n = values.size
    full = n - n % q.blocksize
    scales = np.repeat(nf4_dequant.block_scales(q).astype(np.float64), q.blocksize)[:full]
    live = scales > 0
    scaled = values[:full][live] / scales[live]
    codes = codebook.codes(q)[:full][live]
    distance = np.abs(scaled[:, None] - q.levels.astype(np.float64)[None, :])
    chosen = distance[np.arange(codes.size), codes]
    return int((chosen > distance.min(axis=1) * (1 + 1e-6) + 1e-7).sum())


@pytest.mark.parametrize("table", ["nf2", "nf3", *CUSTOM])
def test_golden_codes_are_nearest_levels(table):
    book = Codebook.nf(int(table[2])) if table.startswith("nf") else CUSTOM[table]
    for seed, shape in enumerate([(16, 64), (7, 200), (1000,)]):
        weight = random_weights(shape, torch.float32, seed)
        q = codebook.quantize(weight, codebook=book, blocksize=64, double_quant=False)
        assert q.bits == book.bits and q.packed.size == codebook.packed_bytes(weight.numel(), book.bits)
        assert nearest_level_violations(weight, q) == 0
        assert (q.codebook is None) == book.name.startswith("nf")


@pytest.mark.parametrize("bits", CODE_BITS)
def test_error_falls_with_bits(bits):
    weight = random_weights((64, 256), torch.float32, 1)
    errors = {b: float(((codebook.dequantize(codebook.quantize(weight, b), "fp32") - weight) ** 2).sum())
              for b in CODE_BITS}
    assert errors[2] > errors[3] > errors[4] > 0


def test_stored_bytes():
    n, blocksize = 2048 * 256, 64
    for bits in CODE_BITS:
        q = codebook.quantize(torch.randn(2048, 256), bits, blocksize=blocksize)
        counted = q.packed.size + q.absmax.size + 4 * q.absmax2.size + 4 + 4 * 2 ** bits
        assert codebook.stored_bytes(n, bits, blocksize) == counted
    assert codebook.stored_bytes(n, 2, 64, double_quant=False) == n // 4 + 4 * n // 64 + 16


# --- RTL dequantizer ------------------------------------------------------------------------------------------------

from edge_qlora.rtl.nf4_dequant import NF4DequantConfig  # noqa: E402
from edge_qlora.sim.nf4 import run_dequantizer  # noqa: E402
from edge_qlora.sim.streams import Stalls  # noqa: E402

STREAMS = ("tensor", "codes", "absmax", "absmax2", "weights")


def check_rtl(tensors, config, seed):
    stalls = {name: Stalls(0.3, seed * 10 + i) for i, name in enumerate(STREAMS)}
    run = run_dequantizer(tensors, config, stalls=stalls)
    for q, values in zip(tensors, run.values):
        golden = nf4_dequant.dequantize(q, config.out_dtype).reshape(-1)
        got = torch.from_numpy(values.view(np.int16 if golden.element_size() == 2 else np.int32)).view(golden.dtype)
        assert mismatches(golden, got) == 0


def test_config_validation():
    assert NF4DequantConfig(bits=2, lanes=16, blocksize=32).table_multipliers == 2
    assert NF4DequantConfig(bits=3, lanes=1, blocksize=64).table_multipliers == 1
    for kwargs, match in [({"bits": 5}, "bits"), ({"bits": True}, "bits"), ({"table": "rom"}, "table"),
                          ({"bits": 2, "multipliers": 8}, "multipliers")]:
        with pytest.raises(ValueError, match=match):
            NF4DequantConfig(**kwargs)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("lanes", [1, 3, 8, 16])
def test_rtl_nf_tables(bits, lanes):
    # three tensors back to back: odd sizes, one below a block, a tail
    blocksize = 64 if lanes != 3 else 32
    tensors = [codebook.quantize(random_weights(shape, torch.bfloat16, seed), bits, blocksize=blocksize,
                                 double_quant=seed != 1)
               for seed, shape in enumerate([(7, 63), (5,), (3, 129)])]
    for dq in (False, True):
        group = [codebook.quantize(random_weights(t.shape, torch.bfloat16, 9), bits, blocksize=blocksize,
                                   double_quant=dq) for t in tensors]
        check_rtl(group, NF4DequantConfig(lanes=lanes, blocksize=blocksize, bits=bits, double_quant=dq,
                                          out_dtype="bf16" if dq else "fp16"), seed=lanes + bits)


@pytest.mark.parametrize("bits", CODE_BITS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_rtl_loaded_tables_back_to_back(bits, out_dtype):
    # every tensor brings its own table: custom tables and the NF table of the width, one after another
    books = [b for b in CUSTOM.values() if b.bits == bits] + [Codebook.nf(bits)]
    tensors = []
    for seed, book in enumerate(books * 2):
        shape = [(5, 64), (1,), (3, 33), (2, 64)][seed % 4]
        tensors.append(codebook.quantize(random_weights(shape, torch.bfloat16, seed), codebook=book, blocksize=32))
    config = NF4DequantConfig(lanes=4, blocksize=32, bits=bits, table="loaded", out_dtype=out_dtype)
    check_rtl(tensors, config, seed=bits)


@pytest.mark.parametrize("table", ["nf3", "wide3", "int4"])
def test_rtl_adversarial(table):
    book = Codebook.nf(3) if table == "nf3" else CUSTOM[table]
    cases = adversarial(torch.float32, 32, codebook=book)
    tensors = [codebook.quantize(w, codebook=book, blocksize=32, double_quant=dq)
               for dq in (False,) for w in cases.values()]
    config = NF4DequantConfig(lanes=8, blocksize=32, bits=book.bits, double_quant=False, out_dtype="bf16",
                              table="nf" if table.startswith("nf") else "loaded")
    check_rtl(tensors, config, seed=5)


def test_rtl_refuses_a_custom_table_on_an_nf_core():
    q = codebook.quantize(torch.randn(64), codebook=CUSTOM["uniform2"])
    with pytest.raises(ValueError, match="loaded"):
        run_dequantizer(q, NF4DequantConfig(bits=2))


# --- files and the command line -------------------------------------------------------------------------------------

import json  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from edge_qlora import formats  # noqa: E402
from reference import run_cli  # noqa: E402


def same_quantized(a, b):
    return (np.array_equal(a.packed, b.packed) and np.array_equal(a.absmax, b.absmax) and a.bits == b.bits
            and a.codebook == b.codebook and a.shape == b.shape and a.blocksize == b.blocksize
            and a.double_quant == b.double_quant)


@pytest.mark.parametrize("table", ["nf2", "nf3", "nf4", "uniform2", "wide3", "int4"])
def test_file_round_trip(tmp_path, table):
    book = Codebook.nf(int(table[2])) if table.startswith("nf") else CUSTOM[table]
    for dq in (False, True):
        q = codebook.quantize(torch.randn(9, 70), codebook=book, double_quant=dq)
        formats.save_quantized(tmp_path / "q.safetensors", q)
        tensors = load_file(tmp_path / "q.safetensors")
        keys = [k for k in tensors if "quant_state" in k]
        assert keys == (["weight.quant_state.bitsandbytes__nf4"] if table == "nf4"
                        else [f"weight.quant_state.edge_qlora__{book.quant_type}"])
        assert same_quantized(formats.load_quantized(str(tmp_path / "q.safetensors")), q)


def test_bad_files(tmp_path):
    q = codebook.quantize(torch.randn(8, 64), 3)
    good = formats.quant_state_dict(q)
    key = "weight.quant_state.edge_qlora__nf3"

    def broken(change, match):
        tensors = {k: v.clone() for k, v in good.items()}
        change(tensors)
        with pytest.raises(formats.InputError, match=match):
            formats.parse_quantized(tensors)

    def meta(**fields):
        def change(tensors):
            data = json.loads(bytes(tensors[key].numpy()))
            data.update(fields)
            tensors[key] = torch.tensor(list(json.dumps(data).encode()), dtype=torch.uint8)
        return change

    broken(meta(bits=4), "bits=4")
    broken(meta(quant_type="nf5"), "nf5")
    broken(lambda t: t.__setitem__("weight", t["weight"][:-1]), "packed bytes")
    broken(lambda t: t.__setitem__("weight.quant_map", t["weight.quant_map"][:4]), "8 float32 levels")
    broken(lambda t: t.__setitem__("weight.quant_map", t["weight.quant_map"] * 2), "NF3 code book")
    broken(lambda t: t.__setitem__("weight.quant_state.edge_qlora__cb3", t.pop(key)), "cb3")
    broken(lambda t: t.__setitem__("weight.quant_state.bitsandbytes__nf4", t[key]), "2 quant states")
    custom = formats.quant_state_dict(codebook.quantize(torch.randn(64), codebook=CUSTOM["wide3"]))
    custom["weight.quant_map"] = custom["weight.quant_map"].flip(0)
    with pytest.raises(formats.InputError, match="increasing"):
        formats.parse_quantized(custom)


def test_cli_quantize_and_dequant(tmp_path, capsys):
    weight = random_weights((16, 100), torch.bfloat16, 3)
    save_file({"weight": weight}, tmp_path / "w.safetensors")
    (tmp_path / "t.json").write_text(json.dumps(CUSTOM["wide3"].levels.tolist()))
    save_file({"levels": torch.from_numpy(CUSTOM["uniform2"].levels.copy())}, tmp_path / "t.safetensors")
    runs = {"nf2": ["--bits", "2"], "nf3": ["--bits", "3"], "wide3": ["--codebook", tmp_path / "t.json"],
            "uniform2": ["--codebook", tmp_path / "t.safetensors", "--bits", "2"]}
    for name, options in runs.items():
        out = tmp_path / f"{name}.safetensors"
        assert run_cli("quantize", tmp_path / "w.safetensors", out, *options, "--backend", "golden", "-q") == 0
        book = Codebook.nf(int(name[2])) if name.startswith("nf") else CUSTOM[name]
        assert same_quantized(formats.load_quantized(str(out)), codebook.quantize(weight, codebook=book))
        for backend in ("golden", "pysim"):
            deq = tmp_path / f"{name}-{backend}.safetensors"
            assert run_cli("dequant", out, deq, "--backend", backend, "--lanes", "4", "-q") == 0
            golden = codebook.dequantize(codebook.quantize(weight, codebook=book))
            assert mismatches(golden, load_file(deq)["weight"]) == 0
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("[1, 0, 2, 3]")
    for options, message in [(["--codebook", tmp_path / "t.json", "--bits", "2"], "has 8 levels (3 bits)"),
                             (["--codebook", tmp_path / "bad.json"], "increasing"),
                             (["--codebook", tmp_path / "none.json"], "no such file")]:
        assert run_cli("quantize", tmp_path / "w.safetensors", tmp_path / "x.safetensors", *options,
                       "--backend", "golden") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    # the GEMM engine and the step accelerator take NF4 only: said in one line
    save_file({"x": torch.randn(2, 100).to(torch.bfloat16)}, tmp_path / "x.safetensors")
    assert run_cli("matmul", tmp_path / "x.safetensors", tmp_path / "nf3.safetensors", tmp_path / "y.safetensors",
                   "--backend", "golden") == 2
    assert "takes NF4" in capsys.readouterr().err


def test_cli_quantize_on_the_rtl(tmp_path):
    weight = random_weights((6, 70), torch.bfloat16, 4)
    save_file({"weight": weight}, tmp_path / "w.safetensors")
    (tmp_path / "t.json").write_text(json.dumps(CUSTOM["negative2"].levels.tolist()))
    for name, options in {"nf3": ["--bits", "3"], "negative2": ["--codebook", tmp_path / "t.json"]}.items():
        out = tmp_path / f"{name}.safetensors"
        assert run_cli("quantize", tmp_path / "w.safetensors", out, *options, "--lanes", "4", "-q") == 0
        book = Codebook.nf(3) if name == "nf3" else CUSTOM[name]
        assert same_quantized(formats.load_quantized(str(out)), codebook.quantize(weight, codebook=book))


def test_cli_builds_and_verilog_take_the_width(tmp_path, monkeypatch, capsys):
    import edge_qlora.boards.build as build_module
    designs = []

    def fake_build(design, board, out, **settings):
        design._MustUse__silence = True
        designs.append(design)
        return {"board": board, "device": "d", "target_mhz": 100.0, "fmax_mhz": {"sync": 101.0},
                "timing_met": True, "utilization": {}, "bitstream": "x.bit", "seed": settings["seed"], "seconds": 1.0}

    monkeypatch.setattr(build_module, "build", fake_build)
    assert run_cli("build", "--board", "ulx3s-85f", "--bits", "3", "--table", "loaded", "--out", tmp_path / "d") == 0
    assert run_cli("build", "--board", "ulx3s-85f", "--quantizer", "--bits", "2", "--out", tmp_path / "q") == 0
    assert [(type(d).__name__, d.config.bits, d.config.table) for d in designs] == [
        ("NF4Dequantizer", 3, "loaded"), ("NF4Quantizer", 2, "nf")]
    capsys.readouterr()
    assert run_cli("build", "--board", "ulx3s-85f", "--rows", "2", "--cols", "2", "--bits", "2",
                   "--out", tmp_path / "g") == 2
    assert "take NF4" in capsys.readouterr().err
    assert run_cli("verilog", "dequantizer", "--bits", "2", "--table", "loaded", "--lanes", "2",
                   "-o", tmp_path / "d.v") == 0
    assert "levels" in (tmp_path / "d.v").read_text()
