"""Random and adversarial weights for the NF4 tests, named so a failure says which case broke."""

import numpy as np
import torch

from edge_qlora.constants import NF4_BOUNDS, NF4_CODE

__all__ = ["DTYPES", "adversarial", "random_weights"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_weights(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(shape, generator=gen))        # log-normal spread of block magnitudes
    return (torch.randn(shape, generator=gen) * scale * 0.02).to(dtype)


def _ties(blocksize, bounds=NF4_BOUNDS, levels=NF4_CODE):
    # Each bound, its float32 neighbours and the levels themselves, in blocks whose absmax is exactly 1.0, so
    # the scaled value equals the weight and the tie rule of bucketize is exercised exactly.
    values = []
    for bound in bounds:
        values += [bound, np.nextafter(bound, np.float32(-2)), np.nextafter(bound, np.float32(2)), -bound]
    values = np.clip(np.array(values + list(levels), np.float32), -1, 1)
    out = []
    for start in range(0, values.size, blocksize - 1):
        out += list(values[start:start + blocksize - 1]) + [1.0]
    return torch.tensor(np.array(out, np.float32))


def adversarial(dtype, blocksize, seed=0, codebook=None):
    """Adversarial weights for one dtype, each with a partial final block and an odd element count; the ties sit
    on the bounds of ``codebook`` (a :class:`~edge_qlora.golden.codebook.Codebook`; NF4's by default)."""
    table = {} if codebook is None else {"bounds": codebook.bounds, "levels": codebook.levels}
    gen = torch.Generator().manual_seed(seed)
    n = blocksize * 6 + blocksize // 2 + 1
    info = torch.finfo(dtype)
    randn = lambda: torch.randn(n, generator=gen)  # noqa: E731
    cases = {"zeros": torch.zeros(n)}
    w = randn(); w[:blocksize] = 0; w[3 * blocksize:4 * blocksize] = 0
    cases["zero_blocks"] = w
    w = randn() * 1e-3; w[5] = 1e3; w[2 * blocksize + 7] = -5e2
    cases["outlier"] = w
    w = randn(); w[-1] = 40.0
    cases["tail_outlier"] = w
    cases["ties"] = _ties(blocksize, **table)
    cases["ties_pow2_scale"] = _ties(blocksize, **table) * 2.0 ** -7
    cases["ties_odd_scale"] = _ties(blocksize, **table) * 3.0
    tiny = info.smallest_normal
    w = randn() * tiny * 4; w[:4] = torch.tensor([tiny / 2, tiny / 4, -tiny / 8, tiny * info.eps])
    cases["subnormal"] = w
    cases["all_subnormal"] = torch.rand(n, generator=gen) * tiny
    w = randn(); w[0] = info.max; w[blocksize] = -info.max; w[2 * blocksize] = info.max * 0.99
    cases["extreme_max"] = w
    cases["huge"] = (torch.rand(n, generator=gen) * 2 - 1) * info.max
    cases["all_max"] = torch.full((n,), float(info.max))
    cases["tiny"] = randn() * 1e-30
    cases["mixed_signs_equal"] = torch.tensor([1.0, -1.0] * (n // 2) + [1.0])
    return {name: w.to(dtype) for name, w in cases.items()}
