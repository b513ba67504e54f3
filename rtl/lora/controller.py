"""The LoRA step's controller: takes the header, walks the phases, and issues one engine job per GEMM phase."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..gemm import job_layout
from .config import DIMENSIONS, GEMM_ORDER, LOAD_ORDER, PHASES, UPDATE_ORDER, GemmRun, Phase, Task, header_layout

__all__ = ["PhaseController"]


class PhaseController(wiring.Component):
    """Phase sequencing of one step: IDLE, the loads, the GEMM phases, the updates, back to IDLE.

    A phase ends on its part's ``done``; the next starts in the following cycle. In IDLE the controller takes one
    ``header`` beat and holds it in ``params`` for the step.

    Attributes
    ----------
    header : In(stream of :func:`~.config.header_layout`)
    params : Out(:func:`~.config.header_layout`)
        The step's header, held from IDLE on.
    phase : Out(:class:`~.config.Phase`)
        The running phase.
    load : Out(:class:`~.config.Task`), one per load phase (:data:`~.config.LOAD_ORDER`)
    gemm : Out(:class:`~.config.GemmRun`)
        The running GEMM phase, for the parts that feed and drain the engine.
    gemm_task : Out(:class:`~.config.Task`)
        Active with ``gemm.active``; ``done`` from the part that takes the engine's last output.
    update : Out(:class:`~.config.Task`), one per update phase (:data:`~.config.UPDATE_ORDER`)
    job : Out(stream of :func:`~.gemm.job_layout`)
        One engine job per GEMM phase.
    """

    def __init__(self):
        super().__init__({
            "header": In(stream.Signature(header_layout())),
            "params": Out(header_layout()),
            "phase": Out(Phase),
            "load": Out(Task()).array(len(LOAD_ORDER)),
            "gemm": Out(GemmRun()),
            "gemm_task": Out(Task()),
            "update": Out(Task()).array(len(UPDATE_ORDER)),
            "job": Out(stream.Signature(job_layout())),
        })

    def elaborate(self, platform):
        m = Module()
        phase, params = self.phase, self.params
        advance = Signal()        # the running phase ends this cycle
        fresh = Signal()          # the first cycle of a phase: the parts restart, the GEMM dimensions settle
        m.d.sync += fresh.eq(advance)
        with m.If(advance):     # the next phase in Phase order; IDLE after the last
            m.d.sync += phase.eq(Mux(phase.as_value() == len(Phase) - 1, 0, phase.as_value() + 1))

        with m.If(phase == Phase.IDLE):
            m.d.comb += self.header.ready.eq(1)
            with m.If(self.header.valid):
                m.d.sync += params.eq(self.header.payload)
                m.d.comb += advance.eq(1)

        for task, name in zip(self.load, LOAD_ORDER):
            m.d.comb += task.active.eq(phase == name)
        for task, name in zip(self.update, UPDATE_ORDER):
            m.d.comb += task.active.eq(phase == name)
        for task in (*self.load, *self.update):
            with m.If(task.active & task.done):
                m.d.comb += advance.eq(1)

        # the GEMM phases
        current = {name: phase == name for name in GEMM_ORDER}
        gemm_phase = Signal()
        m.d.comb += gemm_phase.eq(Cat(*current.values()).any())

        def select(values):
            """A per-phase value chosen by the running phase (0 outside the GEMM phases)."""
            value = Const(0, 32)
            for name, v in values.items():
                value = Mux(current[name], v, value)
            return value

        # the phase's dimensions and flags, registered: they settle in its first cycle (no GEMM active yet), so the
        # phase's mux tree is not in front of the movers' address and count logic
        dims = self.gemm.dims
        size = {name: params[name] for name in DIMENSIONS}
        next_n = select({name: size[row.n] for name, row in PHASES.items()})
        next_k = select({name: size[row.k] for name, row in PHASES.items()})
        next_transposed = select({name: int(row.transposed) for name, row in PHASES.items()})[0]
        m.d.sync += [
            dims.m.eq(select({name: size[row.m] for name, row in PHASES.items()})), dims.n.eq(next_n),
            dims.k.eq(next_k),
            dims.q.eq(Mux(next_transposed, next_n, next_k)), dims.p.eq(Mux(next_transposed, next_k, next_n)),
            dims.transposed.eq(next_transposed),
            dims.nf4.eq(select({name: int(row.nf4) for name, row in PHASES.items()})[0]),
        ]
        active = Signal()
        m.d.comb += [
            active.eq(gemm_phase & ~fresh),
            self.gemm.phase.eq(phase), self.gemm.active.eq(active), self.gemm_task.active.eq(active),
        ]

        # one job per GEMM phase
        job_sent = Signal()
        job = self.job.payload
        m.d.comb += [
            self.job.valid.eq(active & ~job_sent),
            job.m.eq(dims.m), job.n.eq(dims.n), job.k.eq(dims.k), job.weights.eq(params.n_weights),
            job.transposed.eq(dims.transposed), job.rows_in.eq(~dims.nf4),
        ]
        with m.If(self.job.valid & self.job.ready):
            m.d.sync += job_sent.eq(1)
        with m.If(active & self.gemm_task.done):
            m.d.comb += advance.eq(1)
            m.d.sync += job_sent.eq(0)
        return m
