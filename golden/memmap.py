"""The job descriptor of one step: where every tensor a step reads or writes lives in external memory (the byte
addresses the accelerator's memory port, ``rtl/memport.py``, is given), and a memory image of a step case.

:func:`layout` packs the tensors of one step of one projection (``d_in -> d_out``, ``t`` tokens, rank ``r``) one
after another from a base address, each at a multiple of ``align`` bytes, in the order of :data:`INPUTS` then
:data:`OUTPUTS`; ``docs/memory-map.md`` has the table. All multi-byte values are little-endian, as numpy and the
port (byte ``a + i`` is bits ``8 i ..`` of a word) store them.

The LoRA masters and the AdamW moments are updated **in place** by default: the accelerator's update reads each
element once and writes it back once, after the step's last product has read it (the update runs after both
sweeps, ``golden/traffic.py``), so one slot serves both; training steps chain without a copy, as torch's
optimizers update in place, and the footprint of the trainable state is halved. ``in_place=False`` gives them
separate output slots (a testbench that compares a step's inputs and outputs in one image, or a step that must
be retried).

Run ``python -m edge_qlora.golden.memmap`` for the TinyLlama table of ``docs/memory-map.md``.
"""

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from ..constants import BLOCKSIZES
from .gemm import row_chunk_exponents
from .lora import STATE_NAMES
from .nf4_dequant import dequantize

__all__ = ["Region", "MemoryMap", "INPUTS", "OUTPUTS", "TINYLLAMA_PROJECTIONS", "ULX3S_SDRAM_BYTES", "layout",
           "layout_for", "pack_case", "unpack_inputs", "store_outputs", "store_region", "read_region", "unpack_outputs",
           "tinyllama_table", "main"]

#: The ULX3S's SDRAM: 32 MB.
ULX3S_SDRAM_BYTES = 32 * 1024 * 1024

#: TinyLlama-1.1B's projections, ``(name, d_in, d_out)`` (hidden 2048, MLP 5632, 4 KV heads of 64).
TINYLLAMA_PROJECTIONS = (
    ("q_proj", 2048, 2048), ("k_proj", 2048, 256), ("v_proj", 2048, 256), ("o_proj", 2048, 2048),
    ("gate_proj", 2048, 5632), ("up_proj", 2048, 5632), ("down_proj", 5632, 2048),
)

#: Regions a step reads, in address order (the NF4 state first; ``nf4_absmax2`` and ``nf4_offset`` with double
#: quantization only, the moments with AdamW only).
INPUTS = ("nf4_codes", "nf4_absmax", "nf4_absmax2", "nf4_offset", "x", "dy", "lora_A", "lora_B") + STATE_NAMES
#: Regions a step writes that are not also read: the outputs, the updated masters and moments when not in place
#: (named ``<name>_out``), the gradients when asked for.
OUTPUTS = ("y", "dx", "lora_A_out", "lora_B_out") + tuple(f"{n}_out" for n in STATE_NAMES) + ("grad_A", "grad_B")

_DTYPES = {"nf4": np.uint8, "uint8": np.uint8, "int8": np.int8, "bf16": np.uint16, "float32": np.float32}
_ITEM = {"uint8": 1, "int8": 1, "bf16": 2, "float32": 4}


@dataclass(frozen=True)
class Region:
    """One tensor in external memory.

    Attributes
    ----------
    name : str
    dtype : str
        ``"nf4"`` (packed codes, two per byte, the first weight in the high nibble), ``"uint8"``, ``"int8"``,
        ``"bf16"`` or ``"float32"``.
    shape : tuple of int
        The tensor's shape (``nf4``: the weight's ``(d_out, d_in)``).
    address : int
        Byte address, a multiple of the map's alignment.
    size : int
        Bytes of the tensor.
    slot : int
        Bytes reserved: ``size`` rounded up to the alignment (the padding is zero).
    access : str
        ``"read"``, ``"write"`` or ``"read-write"`` (updated in place).
    """

    name: str
    dtype: str
    shape: tuple
    address: int
    size: int
    slot: int
    access: str

    @property
    def end(self):
        return self.address + self.slot


@dataclass(frozen=True)
class MemoryMap:
    """The job descriptor: the step's shape and the :class:`Region` of every tensor it moves.

    ``regions`` are in address order, without overlap, from ``base`` to :attr:`end`.
    """

    d_in: int
    d_out: int
    t: int
    r: int
    optimizer: str
    blocksize: int
    double_quant: bool
    base: int
    align: int
    in_place: bool
    gradients_out: bool
    regions: tuple
    row_exponent_chunk: int = None

    def __getitem__(self, name):
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"the memory map has no region {name!r}; it has {', '.join(self.names)}")

    def __contains__(self, name):
        return name in self.names

    @property
    def names(self):
        return tuple(region.name for region in self.regions)

    @property
    def end(self):
        return self.regions[-1].end

    @property
    def total(self):
        """Bytes from ``base`` to :attr:`end`, padding included."""
        return self.end - self.base

    @property
    def weight_bytes(self):
        """Bytes of the NF4 weight and its quantization state (``golden/traffic.py``'s ``nf4_bytes``)."""
        return sum(region.size for region in self.regions if region.name.startswith("nf4_"))

    def fits(self, capacity=ULX3S_SDRAM_BYTES):
        return self.end <= capacity

    def output_region(self, name):
        """The region a step's output ``name`` (as ``golden/lora.py``'s ``OUTPUT_NAMES``) is written to."""
        return self[name] if name in self.names and self[name].access != "read" else self[f"{name}_out"]

    def markdown(self):
        """The map as a markdown table."""
        lines = ["| tensor | dtype | shape | address | bytes | slot | access |",
                 "|---|---|---|---:|---:|---:|---|"]
        for g in self.regions:
            shape = " x ".join(str(n) for n in g.shape)
            lines.append(f"| {g.name} | {g.dtype} | {shape} | 0x{g.address:08x} | {g.size:,} | {g.slot:,} | "
                         f"{g.access} |")
        lines.append(f"| **total** | | | 0x{self.end:08x} (end) | {sum(g.size for g in self.regions):,} | "
                     f"{self.total:,} | |")
        return "\n".join(lines)


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def layout(d_in, d_out, t, r=16, optimizer="adamw", blocksize=64, double_quant=True, *, base=0, align=64,
           in_place=True, gradients_out=False, row_exponent_chunk=None, rank_rows=False):
    """The memory map of one step: every tensor at a multiple of ``align`` bytes from ``base``, without overlap.

    Parameters
    ----------
    d_in, d_out, t, r : int
        The projection's input and output features, the tokens and the LoRA rank.
    optimizer : str
        ``"adamw"`` (four float32 moments) or ``"sgd"`` (none).
    blocksize : int
        NF4 block size (one of bitsandbytes' sizes).
    double_quant : bool
        uint8 absmax codes, float32 absmax2 (one per 256 blocks) and a float32 offset; else float32 absmax.
    base : int
        Byte address of the first region, a multiple of ``align``.
    align : int
        Alignment of every region in bytes, a power of two: 64 by default (a 512-bit line of a wide bus); a DRAM
        row (1024 on the ULX3S) makes every tensor start a row.
    in_place : bool
        The updated masters and moments overwrite their inputs (see the module docstring).
    gradients_out : bool
        Slots for grad_A and grad_B (float32) too.
    row_exponent_chunk : int, optional
        A slot ``w_row_exponents`` after all others (so that no other address moves): the backward product's
        shared exponent of each ``row_exponent_chunk`` W rows over all of W's columns
        (``golden.gemm.row_chunk_exponents`` of the dequantized weight, int8), which a column block of
        ``dx = dy W`` needs to equal the whole product (``rtl/blocked.py``). The weight is frozen, so the table is
        made once, when the weight is placed in memory (:func:`pack_case`).
    rank_rows : bool
        A slot ``hb`` (bf16 ``[t, r]``) after all others: the step's ``hb = bf16(x A^T)``, which the forward
        product makes and the backward product's ``grad_B = s dy^T hb`` takes (``rtl/blocked.py``); and after it
        ``x_fields`` (uint8, ``4 * ceil(t / 64)``): x's chunk fields, the biased exponent each 16 token rows of x
        share over all its columns (``golden.rank_gradient.x_chunk_fields``), zero-padded to whole 32-bit words,
        which the forward product finds and ``grad_A = s gb^T x`` needs; and after those ``gb`` (bf16
        ``[t, r]``): the step's ``gb = bf16(dy B)``, which the backward product makes and writes, and reads back for
        grad_A's pass over x.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("t", t), ("r", r), ("align", align)):
        _positive(name, value)
    if align & (align - 1):
        raise ValueError(f"align must be a power of two, not {align}")
    if isinstance(base, bool) or not isinstance(base, int) or base < 0 or base % align:
        raise ValueError(f"base must be a non-negative multiple of align ({align}), not {base!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {optimizer!r}")
    if row_exponent_chunk is not None:
        _positive("row_exponent_chunk", row_exponent_chunk)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {blocksize!r}")
    n = d_in * d_out
    blocks = -(-n // blocksize)
    shapes = {"x": (t, d_in), "dy": (t, d_out), "y": (t, d_out), "dx": (t, d_in), "A": (r, d_in), "B": (d_out, r)}
    specs = [("nf4_codes", "nf4", (d_out, d_in), -(-n // 2), "read")]
    if double_quant:
        specs += [("nf4_absmax", "uint8", (blocks,), blocks, "read"),
                  ("nf4_absmax2", "float32", (-(-blocks // 256),), 4 * -(-blocks // 256), "read"),
                  ("nf4_offset", "float32", (1,), 4, "read")]
    else:
        specs.append(("nf4_absmax", "float32", (blocks,), 4 * blocks, "read"))

    def tensor(name, dtype, shape, access):
        return (name, dtype, shape, _ITEM[dtype] * int(np.prod(shape)), access)

    updated = "read-write" if in_place else "read"
    specs += [tensor("x", "bf16", shapes["x"], "read"), tensor("dy", "bf16", shapes["dy"], "read"),
              tensor("lora_A", "float32", shapes["A"], updated), tensor("lora_B", "float32", shapes["B"], updated)]
    states = STATE_NAMES if optimizer == "adamw" else ()
    specs += [tensor(name, "float32", shapes[name[-1]], updated) for name in states]
    specs += [tensor("y", "bf16", shapes["y"], "write"), tensor("dx", "bf16", shapes["dx"], "write")]
    if not in_place:
        specs += [tensor(f"{name}_out", "float32", shapes[name[-1]], "write")
                  for name in ("lora_A", "lora_B") + states]
    if gradients_out:
        specs += [tensor("grad_A", "float32", shapes["A"], "write"), tensor("grad_B", "float32", shapes["B"], "write")]
    if row_exponent_chunk is not None:
        specs.append(tensor("w_row_exponents", "int8", (-(-d_out // row_exponent_chunk),), "read"))
    if rank_rows:
        specs.append(tensor("hb", "bf16", (t, r), "read-write"))
        specs.append(tensor("x_fields", "uint8", (4 * -(-t // 64),), "read-write"))
        specs.append(tensor("gb", "bf16", (t, r), "read-write"))

    regions, address = [], base
    for name, dtype, shape, size, access in specs:
        slot = -(-size // align) * align
        regions.append(Region(name, dtype, tuple(shape), address, size, slot, access))
        address += slot
    return MemoryMap(d_in, d_out, t, r, optimizer, blocksize, double_quant, base, align, in_place, gradients_out,
                     tuple(regions), row_exponent_chunk)


def layout_for(case, **kwargs):
    """:func:`layout` for a ``golden/lora.py`` :class:`LoraCase` (keyword arguments as :func:`layout`'s)."""
    t, d_in = case.x.shape
    r = case.lora_A.shape[0]
    return layout(d_in, case.dy.shape[1], t, r, case.optimizer, case.weight.blocksize, case.weight.double_quant,
                  **kwargs)


def _as_numpy(value, dtype):
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            return value.contiguous().view(torch.int16).numpy().view(np.uint16)
        return value.detach().contiguous().numpy().astype(dtype, copy=False)
    return np.asarray(value, dtype)


def _write(image, memmap, region, values):
    values = np.ascontiguousarray(_as_numpy(values, _DTYPES[region.dtype])).reshape(-1)
    raw = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(raw) != region.size:
        raise ValueError(f"{region.name} holds {len(raw)} bytes, its region {region.size}: the case does not match "
                         f"the memory map")
    start = region.address - memmap.base
    image[start:start + region.size] = raw


def store_region(image, memmap, name, values):
    """Write ``values`` (a tensor or array of the region's dtype and size) into region ``name`` of ``image``."""
    _write(image, memmap, memmap[name], values)


def read_region(image, memmap, name):
    """Region ``name`` of ``image`` as a tensor of its dtype and shape (bf16, float32, ...)."""
    region = memmap[name]
    return _tensor(region, _read(image, memmap, region))


def _read(image, memmap, region):
    start = region.address - memmap.base
    dtype = np.dtype(_DTYPES[region.dtype]).newbyteorder("<")
    values = np.frombuffer(bytes(image[start:start + region.size]), dtype=dtype).astype(_DTYPES[region.dtype])
    if region.dtype == "nf4":
        return values
    return values.reshape(region.shape)


def _tensor(region, values):
    if region.dtype == "bf16":
        return torch.from_numpy(values.astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(values))


def _check_case(case, memmap):
    q = case.weight
    got = (case.x.shape[1], case.dy.shape[1], case.x.shape[0], case.lora_A.shape[0], case.optimizer, q.blocksize,
           q.double_quant)
    want = (memmap.d_in, memmap.d_out, memmap.t, memmap.r, memmap.optimizer, memmap.blocksize, memmap.double_quant)
    if tuple(got) != want:
        raise ValueError(f"the case (d_in, d_out, t, r, optimizer, blocksize, double_quant) = {tuple(got)} does not "
                         f"match the memory map's {want}")
    if q.bits != 4 or tuple(q.shape) != (memmap.d_out, memmap.d_in):
        raise ValueError(f"the weight must be 4-bit codes of shape ({memmap.d_out}, {memmap.d_in}), not "
                         f"{q.bits}-bit of shape {tuple(q.shape)}")
    if case.x.dtype != torch.bfloat16 or case.dy.dtype != torch.bfloat16:
        raise ValueError(f"x and dy must be bfloat16, not {case.x.dtype} and {case.dy.dtype}")


def pack_case(case, memmap):
    """The memory image of a step's inputs: ``bytearray`` of ``memmap.total`` bytes, byte ``i`` at address
    ``memmap.base + i``; output slots and padding are zero."""
    _check_case(case, memmap)
    image = bytearray(memmap.total)
    q = case.weight
    _write(image, memmap, memmap["nf4_codes"], q.packed)
    _write(image, memmap, memmap["nf4_absmax"], q.absmax)
    if memmap.double_quant:
        _write(image, memmap, memmap["nf4_absmax2"], q.absmax2)
        _write(image, memmap, memmap["nf4_offset"], np.float32(q.offset).reshape(1))
    for name, value in (("x", case.x), ("dy", case.dy), ("lora_A", case.lora_A), ("lora_B", case.lora_B)):
        _write(image, memmap, memmap[name], value)
    if memmap.optimizer == "adamw":
        for name, value in case.states().items():
            _write(image, memmap, memmap[name], value)
    if memmap.row_exponent_chunk is not None:
        w = dequantize(q, "bf16").float().numpy()
        _write(image, memmap, memmap["w_row_exponents"], row_chunk_exponents(w, memmap.row_exponent_chunk))
    return image


def unpack_inputs(image, memmap):
    """The inputs as an image holds them: a dict of numpy arrays (``nf4_*``) and torch tensors, named as
    :data:`INPUTS` (what a memory holds before the step runs)."""
    return {name: (_read(image, memmap, memmap[name]) if name.startswith("nf4_")
                   else _tensor(memmap[name], _read(image, memmap, memmap[name])))
            for name in INPUTS if name in memmap}


def _output_names(memmap):
    names = ["y", "dx", "lora_A", "lora_B"]
    names += list(STATE_NAMES) if memmap.optimizer == "adamw" else []
    names += ["grad_A", "grad_B"] if memmap.gradients_out else []
    return names


def store_outputs(image, memmap, outputs):
    """Write a step's outputs (``golden/lora.py``'s ``step_model`` dict) into ``image`` where the accelerator
    writes them: the golden memory side of a testbench."""
    for name in _output_names(memmap):
        _write(image, memmap, memmap.output_region(name), outputs[name])
    return image


def unpack_outputs(image, memmap):
    """A step's outputs from a memory image after the step: a dict of torch tensors named as ``step_model``'s
    (y and dx bf16, the rest float32; the moments with AdamW, the gradients when the map has them)."""
    return {name: _tensor(memmap.output_region(name), _read(image, memmap, memmap.output_region(name)))
            for name in _output_names(memmap)}


def tinyllama_table(t=128, r=16, optimizer="adamw", align=64, capacity=ULX3S_SDRAM_BYTES):
    """Rows ``(name, d_in, d_out, weight_bytes, activation_bytes, lora_bytes, total, fits)`` for the seven
    projections (activations: x, dy, y, dx; LoRA: masters and moments), then a row for all seven side by side."""
    rows, together = [], 0
    for name, d_in, d_out in TINYLLAMA_PROJECTIONS:
        memmap = layout(d_in, d_out, t, r, optimizer, align=align)
        activations = sum(memmap[n].slot for n in ("x", "dy", "y", "dx"))
        lora = sum(g.slot for g in memmap.regions if g.name.startswith(("lora_", "exp_avg")))
        rows.append((name, d_in, d_out, memmap.weight_bytes, activations, lora, memmap.total,
                     memmap.total <= capacity))
        together += memmap.total
    rows.append(("all seven", None, None, sum(r[3] for r in rows), sum(r[4] for r in rows), sum(r[5] for r in rows),
                 together, together <= capacity))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m edge_qlora.golden.memmap",
                                     description="Memory maps of TinyLlama's projection steps against the ULX3S's "
                                                 "32 MB SDRAM (markdown on stdout).")
    parser.add_argument("--t", type=int, default=128, help="tokens per step (default 128)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--align", type=int, default=64, help="region alignment in bytes (default 64)")
    parser.add_argument("--map", metavar="PROJECTION", help="print the full map of one projection too")
    args = parser.parse_args(argv)
    try:
        rows = tinyllama_table(args.t, args.r, args.optimizer, args.align)
        detail = None
        if args.map:
            shapes = {name: (d_in, d_out) for name, d_in, d_out in TINYLLAMA_PROJECTIONS}
            if args.map not in shapes:
                raise ValueError(f"--map must be one of {', '.join(shapes)}, not {args.map!r}")
            detail = layout(*shapes[args.map], args.t, args.r, args.optimizer, align=args.align)
    except ValueError as error:
        parser.error(str(error))
    mb = 1024 * 1024
    print(f"T = {args.t}, r = {args.r}, {args.optimizer}, regions aligned to {args.align} bytes, masters and moments "
          f"in place; capacity {ULX3S_SDRAM_BYTES // mb} MiB\n")
    print("| projection | in | out | NF4 weight + state | x, dy, y, dx | A, B, moments | total | fits 32 MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, d_in, d_out, weight, activations, lora, total, fits in rows:
        print(f"| {name} | {d_in or ''} | {d_out or ''} | {weight:,} | {activations:,} | {lora:,} | "
              f"{total:,} ({total / mb:.2f} MiB) | {'yes' if fits else 'no'} |")
    if detail is not None:
        print(f"\n{args.map}:\n\n{detail.markdown()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
