"""The blocked product's schedule, which its simulation (``sim/blocked.py``) and its cycle models
(``sim.blocked.model_cycles``, ``sim/span_model.py``) share: the request order the RTL issues and one span's
block job."""

from edge_qlora.golden import blockprogram as bp
from edge_qlora.golden.gemm import gemm_cycles
from edge_qlora.rtl.blocked import SPAN

__all__ = ["program", "job_cycles", "codes_feed"]


def program(config, memmap, tokens, features, transposed, x_per_span=None):
    """The product's request order (``golden/blockprogram.py``), which the RTL issues."""
    if transposed:
        return bp.backward_product(memmap, tokens, features, config.rows, config.cols, rank_term=bool(config.rank),
                                   gradient=config.gradient, x_per_span=x_per_span)
    return bp.forward_product(memmap, tokens, features, config.cols, rank_term=bool(config.rank),
                              gradient=config.gradient)


def codes_feed(config):
    """NF4 codes a cycle the codes FIFO, one port word wide, gives the engine, where fewer than its ``cols``
    (the ULX3S's 16-bit port: 4 of 8); ``None`` where the engine takes a full beat."""
    per_word = config.port.data_width // 4
    return per_word if per_word < config.gemm.cols else None


def job_cycles(config, nt, nf, transposed, feed=None):
    """``gemm_cycles`` of one span's block job (``feed``: as :func:`codes_feed`; ``None``, the engine's full beat,
    is what the sum of block jobs in ``sim.blocked.model_cycles`` and its "engine alone" figures take)."""
    g = config.gemm
    n, k = (SPAN, nf) if transposed else (nf, SPAN)
    return gemm_cycles(nt, n, k, g.rows, g.cols, g.chunk_steps, transposed=transposed, weights="nf4",
                       out_dtype=g.out_dtype, blocksize=g.blocksize, block=True, feed=feed).cycles
