"""An NF4 weight in bitsandbytes' serialized layout: the tensors of a ``Linear4bit`` state dict.

The packed uint8 weight under ``W`` and, for each key of ``QuantState.as_dict(packed=True)``, a tensor under
``W.<key>``: ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` and the JSON-in-uint8 tensor
``quant_state.bitsandbytes__nf4``. ``QuantState.from_dict`` and ``Params4bit.from_prequantized`` load it. The file
format around it (safetensors, validation of what users bring) is ``edge_qlora.formats``.

Code books other than NF4 (2- and 3-bit codes, user tables: :mod:`.codebook`) are stored the same way, with the
packed codes of :func:`.codebook.pack_codes` under ``W``, the table under ``W.quant_map``, ``bits`` in the JSON
dict, and the JSON tensor under ``W.quant_state.edge_qlora__<type>`` (``nf2``, ``nf3``, or ``cb2``/``cb3``/``cb4``
for a user table), a key bitsandbytes does not take for one of its own: it refuses such a file rather than
misreading it.
"""

import json

import numpy as np
import torch

from ..constants import DYNAMIC_BLOCKSIZE, DYNAMIC_CODE

__all__ = ["QS_KEY", "QS_PREFIX", "DTYPE_NAMES", "quant_state_dict", "quant_state_key"]

#: the key of the JSON quant-state tensor, as bitsandbytes names it for NF4
QS_KEY = "quant_state.bitsandbytes__nf4"
#: the key of the JSON quant-state tensor of the other code books, followed by their type
QS_PREFIX = "quant_state.edge_qlora__"
#: dtype names of the project (``NF4Quantized.dtype``) -> bitsandbytes' names in the quant state
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def quant_state_dict(q, name="weight"):
    """Tensors of a quantized weight (an ``NF4Quantized`` of any code width), keyed as bitsandbytes'
    ``Linear4bit`` state dict keys them."""
    if q.absmax2_per_block:
        raise ValueError("a span of a weight (one absmax2 per block) has no bitsandbytes quant state; save the "
                         "whole weight")
    meta = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": DTYPE_NAMES[q.dtype],
        "shape": list(q.shape),
    }
    if not q.is_nf4:
        meta["quant_type"] = q.codebook.quant_type if q.codebook is not None else f"nf{q.bits}"
        meta["bits"] = q.bits
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(q.packed, np.uint8)).reshape(-1, 1),
        f"{name}.absmax": torch.from_numpy(np.ascontiguousarray(q.absmax)),
        f"{name}.quant_map": torch.from_numpy(np.array(q.levels, np.float32)),
    }
    if q.double_quant:
        meta.update({
            "nested_blocksize": DYNAMIC_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": float(np.float32(q.offset)),
        })
        tensors[f"{name}.nested_absmax"] = torch.from_numpy(np.ascontiguousarray(q.absmax2, np.float32))
        tensors[f"{name}.nested_quant_map"] = torch.from_numpy(DYNAMIC_CODE.copy())
    tensors[f"{name}.{quant_state_key(meta['quant_type'])}"] = torch.tensor(list(json.dumps(meta).encode()),
                                                                           dtype=torch.uint8)
    return tensors


def quant_state_key(quant_type):
    """The key (after ``W.``) of the JSON quant-state tensor of ``quant_type``: bitsandbytes' for NF4."""
    return QS_KEY if quant_type == "nf4" else QS_PREFIX + quant_type
