"""The QLoRA training step of one linear layer, sequenced in hardware (twin: ``golden/lora.py``).

:class:`LoraStep` holds the step's operands in matrix scratchpads (:class:`~..scratchpad.MatrixStore`, readable
along rows and columns), runs the eight products of the step on one :class:`~..gemm.GemmEngine` (the NF4 base
weight streams through its dequantizer, the LoRA factors and activations come from the scratchpads), combines and
scales in float32, and updates A and B with :class:`~..lora_optim.LoRAOptimizer`. A controller walks the phases
with no host action between them::

    load x, dy, A, B -> F1 h = x A^T -> F3 yl = hb B^T -> F2 y = x W^T + s yl -> B1 g = dy B -> B5 dxl = gb A
    -> B4 dx = dy W + s dxl -> B2 gB = dy^T hb -> B3 gA = gb^T x -> update A -> update B

(hb, gb: bf16 roundings of h, g.) The order puts each LoRA term before the base product it is added to, so the
base product's output is combined on its way out and never stored.

The master copies of A and B are float32 (a bf16 copy could not hold an update smaller than 2**-8 of a weight),
and so are the AdamW moments. The moments live in attached memory: they stream in (``state_in``) during the
update phases and out again (``updates``), element by element.

The parts, each a component of its own, joined by :class:`~.step.LoraStep`:

- :class:`~.controller.PhaseController` takes the header, walks the :class:`~.config.Phase` sequence (the GEMM
  phases as :data:`~.config.PHASES`, one :class:`~.config.GemmPhase` row each) and issues the engine's jobs;
- :class:`~.movers.SegmentLoader` (one per input matrix) fills a scratchpad from its input stream;
- :class:`~.movers.AMover` and :class:`~.movers.WMover` read the scratchpads into the engine's ``a`` and
  ``rows_in`` streams;
- :class:`~.writer.CWriter` drains the engine's ``c`` stream into a scratchpad or, through its
  :class:`~.writer.Combiner` (``c + s * partner``, rounded to bf16), out on ``y`` and ``dx``;
- :class:`~.updater.Updater` feeds the optimizer and sends the updates out.
"""

from .config import (GEMM_ORDER, PHASES, SCRATCHPADS, STORES, GemmPhase, LoraConfig, Phase, StoreSpec, header_layout,
                     segment_in_layout, updates_layout)
from .controller import PhaseController
from .movers import AMover, SegmentLoader, WMover
from .step import LoraStep
from .updater import Updater
from .writer import Combiner, CWriter

__all__ = ["LoraConfig", "LoraStep", "Phase", "GemmPhase", "PHASES", "GEMM_ORDER", "STORES", "SCRATCHPADS", "StoreSpec",
           "header_layout", "segment_in_layout", "updates_layout", "PhaseController", "SegmentLoader", "AMover",
           "WMover", "CWriter", "Combiner", "Updater"]
