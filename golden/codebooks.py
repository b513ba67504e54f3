"""The code books of bitsandbytes' 4-bit NF4 and 8-bit dynamic quantization, as float32 tables.

Both tables are rebuilt here without importing bitsandbytes; ``tests/test_nf4_quant.py`` checks them against
bitsandbytes bit for bit. The RTL reads its constants from this module, so the hardware and the golden model share
one source of truth.
"""

import numpy as np
import torch

__all__ = ["NF4_CODE", "NF4_BOUNDS", "DYNAMIC_CODE", "DYNAMIC_BLOCKSIZE", "BLOCKSIZES"]

#: Block sizes bitsandbytes accepts for 4-bit quantization; the golden model covers all of them.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Second-level block size of double quantization (``compress_statistics=True``) in ``quantize_4bit``.
DYNAMIC_BLOCKSIZE = 256

#: NF4 levels in code order (code 0 = -1.0, code 7 = 0.0, code 15 = 1.0): quantiles of N(0, 1), QLoRA appendix E.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

#: The 15 decision bounds of NF4 quantization: float32 midpoints of neighbouring levels. A scaled weight ``s`` gets
#: code ``#(bounds < s)``; a tie ``s == bound`` goes to the lower code (``torch.bucketize``, ``right=False``).
NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)


def _dynamic_map(max_exponent_bits=7, total_bits=8):
    # Signed dynamic tree map of Dettmers (2015): for each exponent 10^-6 .. 10^0 a linear fraction grid, mirrored.
    # Computed with the same float32 torch operations bitsandbytes uses, so every level rounds identically.
    values = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        values += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32).numpy()


#: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted float32 levels.
DYNAMIC_CODE = _dynamic_map()
