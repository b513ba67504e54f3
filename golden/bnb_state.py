"""An NF4 weight in bitsandbytes' serialized layout: the tensors of a ``Linear4bit`` state dict.

The packed uint8 weight under ``W`` and, for each key of ``QuantState.as_dict(packed=True)``, a tensor under
``W.<key>``: ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map`` and the JSON-in-uint8 tensor
``quant_state.bitsandbytes__nf4``. ``QuantState.from_dict`` and ``Params4bit.from_prequantized`` load it. The file
format around it (safetensors, validation of what users bring) is ``edge_qlora.formats``.
"""

import json

import numpy as np
import torch

from ..constants import DYNAMIC_BLOCKSIZE, DYNAMIC_CODE, NF4_CODE

__all__ = ["QS_KEY", "DTYPE_NAMES", "quant_state_dict"]

#: the key of the JSON quant-state tensor, as bitsandbytes names it for NF4
QS_KEY = "quant_state.bitsandbytes__nf4"
#: dtype names of the project (``NF4Quantized.dtype``) -> bitsandbytes' names in the quant state
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def quant_state_dict(q, name="weight"):
    """Tensors of a quantized weight (an ``NF4Quantized``), keyed as bitsandbytes' ``Linear4bit`` state dict keys
    them."""
    meta = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": DTYPE_NAMES[q.dtype],
        "shape": list(q.shape),
    }
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(q.packed, np.uint8)).reshape(-1, 1),
        f"{name}.absmax": torch.from_numpy(np.ascontiguousarray(q.absmax)),
        f"{name}.quant_map": torch.from_numpy(NF4_CODE.copy()),
    }
    if q.double_quant:
        meta.update({
            "nested_blocksize": DYNAMIC_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": float(np.float32(q.offset)),
        })
        tensors[f"{name}.nested_absmax"] = torch.from_numpy(np.ascontiguousarray(q.absmax2, np.float32))
        tensors[f"{name}.nested_quant_map"] = torch.from_numpy(DYNAMIC_CODE.copy())
    tensors[f"{name}.{QS_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return tensors
