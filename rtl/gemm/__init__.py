"""Tiled streaming GEMM engine fed by the NF4 dequantizer (twin: ``golden/gemm.py``, which holds both the
bit-accurate arithmetic and the cycle model of the schedule, :func:`~edge_qlora.golden.gemm.gemm_cycles`).

The engine computes ``C = A @ B`` on a ``rows x cols`` :class:`~..pe_array.PEArray`, with the block-floating-point
arithmetic of :mod:`edge_qlora.golden.gemm`:

* **forward**, ``y = x @ W.T``: A = x ``[M, K]``, B = ``W.T``; the reduction runs over K.
* **transposed** (backward), ``dx = dy @ W``: A = dy ``[M, N]``, B = W; the reduction runs over N.

W ``[N, K]`` always arrives row-major and flat: from the NF4 dequantizer (``weights="nf4"``) or as bf16 beats
(``weights="bf16"``), once per tile of ``rows`` output rows, and never exists in memory in full precision. A
:class:`~..row_align.RowAligner` re-cuts it into row-aligned beats of ``cols`` elements.

Buffers (all :class:`~amaranth.lib.memory.Memory`, all double-buffered so loading overlaps computing):

* the A buffer holds one tile of A: ``rows`` rows of the whole reduction (``max_q`` deep);
* the W buffer holds ``cols`` rows of W (forward: one column tile of B) or ``chunk`` rows (transposed: one chunk
  of B's rows), in ``cols`` banks of ``cols``-element words;
* exponent memories hold each chunk's shared exponents (per A row; per W row in forward, one per W tile in
  transposed);
* the accumulator memory holds float32 partial results: ``rows`` of them in forward, ``rows`` per column tile of
  the output in transposed (``max_k`` wide).

Datapath, one component per part (joined in :class:`~.engine.GemmEngine` with ``wiring.connect``):
:class:`~.engine.JobControl` gives each job to the parts; :class:`~.writers.AWriter` and
:class:`~.writers.WWriter` fill the buffers they own; the :class:`~.sequencer.Sequencer` reads them, aligns the
operands to 18-bit integers and feeds the PE array; the :class:`~.accumulator.Accumulator` turns the chunk sums into
float32 (:class:`~..fp.FixedToFloat`), accumulates them on the accumulator memory (:class:`~..fp.FPAdd`) and rounds
the outputs onto ``c``.

Modules: :mod:`.config` (the configuration, the stream payloads and the handshakes between the parts),
:mod:`.writers`, :mod:`.sequencer`, :mod:`.accumulator`, :mod:`.engine`.
"""

from .config import GemmConfig, a_layout, c_layout, job_layout
from .engine import GemmEngine

__all__ = ["GemmConfig", "GemmEngine", "job_layout", "a_layout", "c_layout"]
