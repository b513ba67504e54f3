"""File formats users already have: safetensors weights and bitsandbytes' serialized ``QuantState``.

A quantized weight ``W`` is stored as bitsandbytes stores a ``Linear4bit`` weight in a state dict
(:func:`~edge_qlora.golden.bnb_state.quant_state_dict`): the packed uint8 tensor under ``W`` and, for each key of
``QuantState.as_dict(packed=True)``, a tensor under ``W.<key>`` (``absmax``, ``quant_map``, ``nested_absmax``,
``nested_quant_map`` and the JSON-in-uint8 tensor ``quant_state.bitsandbytes__nf4``). ``QuantState.from_dict``
loads it. Code books below four bits and user tables (:mod:`~edge_qlora.golden.codebook`) use the same
tensors with their own quant-state key (:mod:`~edge_qlora.golden.bnb_state`). Everything the user can get wrong in a file raises :class:`InputError` with a one-line message; a file
that cannot be written raises :class:`~edge_qlora.outputs.OutputError`. Files are written whole or not at all
(:func:`~edge_qlora.outputs.atomic_output`).
"""

import dataclasses
import json
import os

import numpy as np
import torch

from .constants import BLOCKSIZES, CODE_BITS, DYNAMIC_BLOCKSIZE, DYNAMIC_CODE, NF_CODES
from .golden.bnb_state import DTYPE_NAMES as _DTYPE_NAMES, QS_KEY, QS_PREFIX, quant_state_dict
from .golden.lora import STATE_NAMES, LoraCase
from .golden.nf4_quant import NF4Quantized
from .outputs import OutputError, atomic_output, check_output

__all__ = ["InputError", "OutputError", "load_weight", "save_weight", "load_quantized", "save_quantized",
           "load_codebook", "QUANT_TYPES",
           "quant_state_dict", "load_tensor", "save_tensors", "load_quantized_or_weight", "load_case", "save_case",
           "next_case", "CASE_METADATA"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHORT_NAMES = {v: k for k, v in _DTYPE_NAMES.items()}


class InputError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def _read(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a safetensors file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: not a readable safetensors file ({reason})") from None


def _write(path, tensors, metadata=None):
    from safetensors.torch import save_file

    check_output(path)
    with atomic_output(path) as temp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temp, metadata=metadata)


def load_weight(path, name="weight"):
    """The float tensor ``name`` (fp32, fp16 or bf16) of a safetensors file."""
    tensors = _read(path)
    if name not in tensors:
        raise InputError(f"{path}: no tensor '{name}' (found: {', '.join(sorted(tensors)) or 'none'})")
    weight = tensors[name]
    if weight.dtype not in _TORCH_DTYPES.values():
        raise InputError(f"{path}: tensor '{name}' has dtype {str(weight.dtype)[6:]}; "
                         "expected float32, float16 or bfloat16")
    if weight.numel() == 0:
        raise InputError(f"{path}: tensor '{name}' is empty")
    return weight


def save_weight(path, weight, name="weight"):
    _write(path, {name: weight})


def load_tensor(path, name):
    """Tensor ``name`` of a safetensors file."""
    tensors = _read(path)
    if name not in tensors:
        raise InputError(f"{path}: no tensor '{name}' (found: {', '.join(sorted(tensors)) or 'none'})")
    if tensors[name].numel() == 0:
        raise InputError(f"{path}: tensor '{name}' is empty")
    return tensors[name]


def save_tensors(path, tensors):
    _write(path, tensors)


def load_quantized_or_weight(path, name="weight"):
    """``(weight, quantized)``: a bf16 weight as it is (``quantized`` None), or a quantized weight in state-dict
    form with its bit-exact bf16 dequantization as ``weight``."""
    tensors = _read(path)
    if name not in tensors:
        raise InputError(f"{path}: no tensor '{name}' (found: {', '.join(sorted(tensors)) or 'none'})")
    if _state_key(tensors, name):
        from .golden.nf4_dequant import dequantize
        quantized = parse_quantized(tensors, name, where=path)
        return dequantize(quantized, "bf16"), quantized
    weight = tensors[name]
    if weight.dtype != torch.bfloat16:
        raise InputError(f"{path}: tensor '{name}' has dtype {str(weight.dtype)[6:]}; expected bfloat16 "
                         "(or an NF4 weight with its quant state)")
    return weight, None


def load_codebook(path):
    """A user's code book: a JSON list of 4, 8 or 16 numbers, or a safetensors file with a 1-D tensor 'levels'."""
    from .golden.codebook import Codebook

    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a readable JSON file ({str(error).splitlines()[0]})") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise InputError(f"{path}: expected a JSON list of numbers, the levels in code order")
        levels = np.array(values, np.float64)
        if np.any(np.abs(levels) > np.finfo(np.float32).max):
            raise InputError(f"{path}: a level is beyond float32's range")
        levels = levels.astype(np.float32)
    else:
        tensor = load_tensor(path, "levels")
        if tensor.dim() != 1 or not tensor.is_floating_point():
            raise InputError(f"{path}: tensor 'levels' must be 1-D floats, not {tuple(tensor.shape)} "
                             f"{str(tensor.dtype)[6:]}")
        levels = tensor.float().numpy()
    try:
        return Codebook(levels)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


def save_quantized(path, q, name="weight"):
    _write(path, quant_state_dict(q, name))


def load_quantized(path, name="weight"):
    """An :class:`~edge_qlora.golden.nf4_quant.NF4Quantized` from a file in bitsandbytes' state-dict form."""
    tensors = _read(path)
    return parse_quantized(tensors, name, where=path)


def _require(tensors, key, where):
    if key not in tensors:
        raise InputError(f"{where}: missing tensor '{key}' of the NF4 quant state")
    return tensors[key]


def _check_dtype(tensor, key, dtype, where):
    if tensor.dtype != dtype:
        raise InputError(f"{where}: tensor '{key}' has dtype {str(tensor.dtype)[6:]}; expected {str(dtype)[6:]}")


#: quant types of the code books: name -> code width (``cb``: a table the user gave)
QUANT_TYPES = {"nf4": 4, **{f"nf{b}": b for b in CODE_BITS if b != 4}, **{f"cb{b}": b for b in CODE_BITS}}


def _state_key(tensors, name):
    """The key of the JSON quant-state tensor of ``name`` in ``tensors``, or None."""
    keys = [key for key in tensors if key == f"{name}.{QS_KEY}" or key.startswith(f"{name}.{QS_PREFIX}")]
    return keys[0] if len(keys) == 1 else (keys or None)


def parse_quantized(tensors, name="weight", where="input"):
    """Validate and unpack the tensors of one quantized weight of any code book (see :func:`quant_state_dict`)."""
    from .golden.codebook import Codebook, packed_bytes

    packed = _require(tensors, name, where)
    key = _state_key(tensors, name)
    if key is None:
        raise InputError(f"{where}: missing tensor '{name}.{QS_KEY}' (or '{name}.{QS_PREFIX}<type>') of the quant "
                         "state")
    if isinstance(key, list):
        raise InputError(f"{where}: '{name}' has {len(key)} quant states ({', '.join(key)}); expected one")
    qs = tensors[key]
    _check_dtype(qs, key, torch.uint8, where)
    try:
        meta = json.loads(bytes(qs.reshape(-1).numpy()).decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{where}: tensor '{key}' does not hold the JSON quant-state dict") from None
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise InputError(f"{where}: quant state lacks '{field}'")
    quant_type = meta["quant_type"]
    if key.endswith(QS_KEY) and quant_type != "nf4":
        raise InputError(f"{where}: quant_type is {quant_type!r}; bitsandbytes' quant state here must be 'nf4'")
    if not key.endswith(QS_KEY) and (quant_type not in QUANT_TYPES or quant_type == "nf4"
                                     or key != f"{name}.{QS_PREFIX}{quant_type}"):
        raise InputError(f"{where}: quant_type {quant_type!r} under '{key}' is not one of "
                         f"{', '.join(t for t in QUANT_TYPES if t != 'nf4')} (NF4 is stored as bitsandbytes does)")
    bits = QUANT_TYPES[quant_type]
    if quant_type != "nf4" and meta.get("bits") != bits:
        raise InputError(f"{where}: quant state says bits={meta.get('bits')!r}; {quant_type} codes have {bits}")
    if meta["blocksize"] not in BLOCKSIZES:
        raise InputError(f"{where}: blocksize {meta['blocksize']!r} is not one of {BLOCKSIZES}")
    if meta["dtype"] not in _TORCH_DTYPES:
        raise InputError(f"{where}: dtype {meta['dtype']!r} is not float32, float16 or bfloat16")
    shape = meta["shape"]
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of positive integers")
    n = int(np.prod(shape))
    blocksize = meta["blocksize"]
    blocks = -(-n // blocksize)

    _check_dtype(packed, name, torch.uint8, where)
    if packed.numel() != packed_bytes(n, bits):
        raise InputError(f"{where}: '{name}' holds {packed.numel()} packed bytes; shape {tuple(shape)} "
                         f"at {bits} bits needs {packed_bytes(n, bits)}")
    quant_map = _require(tensors, f"{name}.quant_map", where)
    if quant_map.dtype != torch.float32 or quant_map.numel() != 2 ** bits:
        raise InputError(f"{where}: '{name}.quant_map' must hold {2 ** bits} float32 levels for {quant_type}")
    levels = quant_map.reshape(-1).numpy().copy()
    if quant_type.startswith("nf"):
        if not np.array_equal(levels.view(np.uint32), NF_CODES[bits].view(np.uint32)):
            raise InputError(f"{where}: '{name}.quant_map' is not the {quant_type.upper()} code book")
        extra = {} if bits == 4 else {"bits": bits}
    else:
        try:
            extra = {"bits": bits, "codebook": Codebook(levels)}
        except ValueError as error:
            raise InputError(f"{where}: '{name}.quant_map': {error}") from None
        if extra["codebook"].name != "custom":  # an NF table stored as a user table is read as the NF table
            extra["codebook"] = None

    absmax = _require(tensors, f"{name}.absmax", where)
    double_quant = "nested_absmax" in meta or f"{name}.nested_absmax" in tensors or "nested_offset" in meta
    if absmax.numel() != blocks:
        raise InputError(f"{where}: '{name}.absmax' has {absmax.numel()} values; "
                         f"{n} weights in blocks of {blocksize} need {blocks}")
    if not double_quant:
        _check_dtype(absmax, f"{name}.absmax", torch.float32, where)
        absmax = absmax.reshape(-1).numpy().copy()
        _check_finite(absmax, f"{name}.absmax", where)
        return NF4Quantized(packed.reshape(-1).numpy().copy(), absmax, tuple(shape),
                            _SHORT_NAMES[meta["dtype"]], blocksize, **extra)

    _check_dtype(absmax, f"{name}.absmax", torch.uint8, where)
    for key in ("nested_blocksize", "nested_offset", "nested_dtype"):
        if key not in meta:
            raise InputError(f"{where}: double-quantized quant state lacks '{key}'")
    if meta["nested_blocksize"] != DYNAMIC_BLOCKSIZE or meta["nested_dtype"] != "float32":
        raise InputError(f"{where}: nested blocksize/dtype {meta['nested_blocksize']!r}/{meta['nested_dtype']!r} "
                         f"unsupported (bitsandbytes uses {DYNAMIC_BLOCKSIZE}/float32)")
    absmax2 = _require(tensors, f"{name}.nested_absmax", where)
    _check_dtype(absmax2, f"{name}.nested_absmax", torch.float32, where)
    if absmax2.numel() != -(-blocks // DYNAMIC_BLOCKSIZE):
        raise InputError(f"{where}: '{name}.nested_absmax' has {absmax2.numel()} values; {blocks} blocks need "
                         f"{-(-blocks // DYNAMIC_BLOCKSIZE)}")
    nested_map = _require(tensors, f"{name}.nested_quant_map", where)
    if nested_map.dtype != torch.float32 or nested_map.numel() != 256 or \
            not np.array_equal(nested_map.numpy().view(np.uint32), DYNAMIC_CODE.view(np.uint32)):
        raise InputError(f"{where}: '{name}.nested_quant_map' is not bitsandbytes' dynamic 8-bit map")
    try:
        offset = np.float32(float(meta["nested_offset"]))
    except (TypeError, ValueError):
        raise InputError(f"{where}: nested_offset {meta['nested_offset']!r} is not a number") from None
    absmax2 = absmax2.reshape(-1).numpy().copy()
    _check_finite(absmax2, f"{name}.nested_absmax", where)
    _check_finite(np.array([offset]), "nested_offset", where)
    return NF4Quantized(packed.reshape(-1).numpy().copy(), absmax.reshape(-1).numpy().copy(), tuple(shape),
                        _SHORT_NAMES[meta["dtype"]], blocksize, offset, absmax2, **extra)


def _check_finite(values, what, where):
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(f"{where}: '{what}' holds a non-finite value at index {int(np.flatnonzero(bad)[0])}")


#: Metadata strings of a step case, and their parsers.
CASE_METADATA = {"scaling": float, "optimizer": str, "lr": float, "beta1": float, "beta2": float, "eps": float,
                 "weight_decay": float, "step": int}


def load_case(path):
    """A :class:`~edge_qlora.golden.lora.LoraCase` from a step-case safetensors file (see ``edge-qlora step -h``)."""
    from safetensors import safe_open

    tensors = _read(path)
    try:
        with safe_open(path, "pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:  # the file already read once: this only fails on odd metadata
        raise InputError(f"{path}: cannot read its metadata ({error})") from None
    values = {}
    for key, parse in CASE_METADATA.items():
        if key not in meta:
            raise InputError(f"{path}: metadata lacks '{key}' (needs {', '.join(CASE_METADATA)})")
        try:
            values[key] = parse(meta[key])
        except ValueError:
            raise InputError(f"{path}: metadata '{key}' is {meta[key]!r}, not a {parse.__name__}") from None
    if values["optimizer"] not in ("sgd", "adamw"):
        raise InputError(f"{path}: optimizer {values['optimizer']!r} is not 'sgd' or 'adamw'")
    if values["step"] < 1:
        raise InputError(f"{path}: step must be at least 1, not {values['step']}")
    for key in ("beta1", "beta2"):
        if not 0 <= values[key] < 1:
            raise InputError(f"{path}: {key} must be in [0, 1), not {values[key]}")

    def need(name, dtypes, dims):
        if name not in tensors:
            raise InputError(f"{path}: no tensor '{name}'")
        tensor = tensors[name]
        if tensor.dtype not in dtypes:
            raise InputError(f"{path}: tensor '{name}' has dtype {str(tensor.dtype)[6:]}; expected "
                             f"{' or '.join(str(d)[6:] for d in dtypes)}")
        if tensor.dim() != dims:
            raise InputError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}; expected {dims} dimensions")
        if tensor.numel() and not torch.isfinite(tensor.float()).all():
            raise InputError(f"{path}: tensor '{name}' holds NaN/Inf")
        return tensor

    x = need("x", (torch.bfloat16,), 2)
    dy = need("dy", (torch.bfloat16,), 2)
    lora_a = need("lora_A", (torch.float32, torch.bfloat16), 2).float()
    lora_b = need("lora_B", (torch.float32, torch.bfloat16), 2).float()
    weight = parse_quantized(tensors, "base.weight", where=path)
    if not weight.is_nf4:
        raise InputError(f"{path}: base.weight is {weight.bits}-bit "
                         f"{weight.codebook.name if weight.codebook else 'NF'}; the step accelerator takes NF4")
    if len(weight.shape) != 2:
        raise InputError(f"{path}: base.weight has shape {weight.shape}; expected [out, in]")
    out_features, in_features = weight.shape
    tokens, rank = x.shape[0], lora_a.shape[0]
    checks = [("x", x, (tokens, in_features)), ("dy", dy, (tokens, out_features)),
              ("lora_A", lora_a, (rank, in_features)), ("lora_B", lora_b, (out_features, rank))]
    for name, tensor, shape in checks:
        if tuple(tensor.shape) != shape:
            raise InputError(f"{path}: '{name}' has shape {tuple(tensor.shape)}; with base.weight "
                             f"{(out_features, in_features)}, x {tuple(x.shape)} and lora_A {tuple(lora_a.shape)} "
                             f"it must be {shape}")
    state = {}
    for name in STATE_NAMES:
        if name in tensors:
            shape = (rank, in_features) if name.endswith("A") else (out_features, rank)
            tensor = need(name, (torch.float32, torch.bfloat16), 2).float()
            if tuple(tensor.shape) != shape:
                raise InputError(f"{path}: '{name}' has shape {tuple(tensor.shape)}; it must be {shape}")
            state[name] = tensor
    return LoraCase(x=x, dy=dy, weight=weight, lora_A=lora_a, lora_B=lora_b, state=state, **values)


def save_case(path, case, extra=None):
    """Write a :class:`~edge_qlora.golden.lora.LoraCase` as a step-case file that :func:`load_case` reads, with the
    tensors of ``extra`` (a dict, e.g. a step's outputs ``y``, ``dx``, ``grad_A``, ``grad_B``) beside it."""
    tensors = {"x": case.x, "dy": case.dy, "lora_A": case.lora_A, "lora_B": case.lora_B}
    tensors.update({f"base.{k}": v for k, v in quant_state_dict(case.weight).items()})
    tensors.update(case.state)
    for name, tensor in (extra or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor {name!r} would replace the case's own")
        tensors[name] = tensor
    meta = {key: str(getattr(case, key)) if parse is str else repr(parse(getattr(case, key)))
            for key, parse in CASE_METADATA.items()}
    _write(path, tensors, metadata=meta)


def next_case(case, outputs):
    """The case of the step after ``case``, given the ``outputs`` of ``case``'s step: the updated ``lora_A`` and
    ``lora_B`` and optimizer state, ``step`` + 1, the same x, dy, base weight and hyperparameters."""
    state = {name: outputs[name] for name in STATE_NAMES if name in outputs}
    return dataclasses.replace(case, lora_A=outputs["lora_A"].float(), lora_B=outputs["lora_B"].float(),
                               state=state, step=case.step + 1)
