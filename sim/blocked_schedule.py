"""The blocked product's schedule, which its simulation (``sim/blocked.py``) and its cycle models
(``sim.blocked.model_cycles``, ``sim/span_model.py``) share: the request order the RTL issues and one span's
block job."""

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden.gemm import gemm_cycles
from edge_qlora.rtl.blocked import SPAN

__all__ = ["program", "job_cycles"]


def program(config, memmap, tokens, features, transposed, x_per_span=None):
    """The product's request order (``golden/blockprogram.py``), which the RTL issues."""
    if transposed:
        return bp.backward_product(memmap, tokens, features, config.rows, config.cols, rank_term=bool(config.rank),
                                   gradient=config.gradient, x_per_span=x_per_span)
    return bp.forward_product(memmap, tokens, features, config.cols, rank_term=bool(config.rank),
                              gradient=config.gradient)


def job_cycles(config, nt, nf, transposed):
    """``gemm_cycles`` of one span's block job."""
    g = config.gemm
    n, k = (SPAN, nf) if transposed else (nf, SPAN)
    return gemm_cycles(nt, n, k, g.rows, g.cols, g.chunk_steps, transposed=transposed, weights="nf4",
                       out_dtype=g.out_dtype, blocksize=g.blocksize, block=True).cycles
