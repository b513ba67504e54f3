"""The blocked step on one memory port: the blocked products (``rtl/blocked.py``) and the update pass
(``rtl/update.py``) behind one descriptor stream and one report stream.

A step of one projection is four descriptors, run one after another in this order (``sim/blocked_step.py`` gives
them, ``docs/blocked.md`` the figures):

1. the forward product ``y = bf16(x W^T + s hb B^T)``, which also writes hb and x's chunk fields;
2. the backward product ``dx = bf16(dy W + s gb A)``, which also writes gb, grad_B and grad_A;
3. the update of A (master, grad_A, moments; written back in place);
4. the update of B.

Each descriptor names its unit (``op``); the top takes a descriptor only when the previous one has reported, and
gives the port to the unit that runs it, so the units' requests never interleave: a unit's reads of what an
earlier one wrote come after those writes have left on the port (the memory map's contract,
``docs/memory-map.md``).
"""

from dataclasses import dataclass

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from . import blocked, update
from .blocked import BlockedConfig, BlockedProduct
from .memport import MemPortSignature
from .update import UpdateConfig, UpdatePass

__all__ = ["StepOp", "StepConfig", "STEP_UPDATE_GROUP", "BlockedStep", "descriptor_layout", "report_layout"]


class StepOp(enum.Enum, shape=1):
    """The unit a descriptor runs on."""
    PRODUCT = 0
    UPDATE = 1


#: The update's group on the step top: its operand and result FIFOs of 128 words go to LUT RAM, as the products'
#: do, since the products leave no block RAM for them (groups of 64 take three block RAMs; 32 make the update
#: about 3% slower)
STEP_UPDATE_GROUP = 32


@dataclass(frozen=True)
class StepConfig:
    """Elaboration parameters of :class:`BlockedStep`: the products' (both products, with the rank-r terms and the
    gradients) and the update's, on the same port (by default in groups of :data:`STEP_UPDATE_GROUP`)."""

    product: BlockedConfig = BlockedConfig(transposed=True, rank=16, gradient=True)
    update: UpdateConfig = None

    def __post_init__(self):
        if not isinstance(self.product, BlockedConfig):
            raise TypeError(f"StepConfig.product must be a BlockedConfig, not {self.product!r}")
        if not self.product.gradient:
            raise ValueError("the step's products must make the gradients (BlockedConfig.gradient): the update "
                             "reads them")
        if self.update is None:
            object.__setattr__(self, "update", UpdateConfig(port=self.product.port, group=STEP_UPDATE_GROUP))
        if not isinstance(self.update, UpdateConfig):
            raise TypeError(f"StepConfig.update must be an UpdateConfig, not {self.update!r}")
        if self.update.port != self.product.port:
            raise ValueError("the products and the update must share one memory port configuration")


def descriptor_layout(config):
    """Payload of ``descriptor``: ``op``, and the chosen unit's descriptor (the other's fields are ignored)."""
    return data.StructLayout({"op": StepOp, "product": blocked.descriptor_layout(config.product),
                              "update": update.descriptor_layout(config.update)})


def report_layout(config):
    """Payload of ``report``: ``op``, and the report of the unit that ran the descriptor."""
    return data.StructLayout({"op": StepOp, "product": blocked.report_layout(config.product.reads),
                              "update": update.report_layout()})


class BlockedStep(wiring.Component):
    """The products and the update behind one port; one descriptor at a time.

    Attributes
    ----------
    descriptor : In(stream of :func:`descriptor_layout`)
    mem : Out(:class:`~.memport.MemPortSignature`)
    report : Out(stream of :func:`report_layout`)
    """

    def __init__(self, config=StepConfig()):
        if not isinstance(config, StepConfig):
            raise TypeError(f"config must be a StepConfig, not {config!r}")
        self.config = config
        super().__init__({"descriptor": In(stream.Signature(descriptor_layout(config))),
                          "mem": Out(MemPortSignature(config.product.port)),
                          "report": Out(stream.Signature(report_layout(config)))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.product = product = BlockedProduct(self.config.product)
        m.submodules.update = update_ = UpdatePass(self.config.update)
        units = {StepOp.PRODUCT: product, StepOp.UPDATE: update_}

        busy, owner = Signal(), Signal(StepOp)
        op = self.descriptor.payload.op
        m.d.comb += self.descriptor.ready.eq(~busy & Mux(op == StepOp.UPDATE, update_.descriptor.ready,
                                                         product.descriptor.ready))
        for kind, unit in units.items():
            mine = owner == kind
            m.d.comb += [unit.descriptor.valid.eq(self.descriptor.valid & ~busy & (op == kind)),
                         unit.descriptor.payload.eq(getattr(self.descriptor.payload,
                                                            "update" if kind == StepOp.UPDATE else "product")),
                         unit.report.ready.eq(self.report.ready & busy & mine)]
            # the port: the owner's requests and data out, the read data to the owner
            for name in ("read_cmd", "write_cmd", "write_data"):
                mine_out, port = getattr(unit.mem, name), getattr(self.mem, name)
                with m.If(mine):
                    m.d.comb += [port.valid.eq(mine_out.valid), port.payload.eq(mine_out.payload)]
                m.d.comb += mine_out.ready.eq(port.ready & mine)
            m.d.comb += [unit.mem.read_data.valid.eq(self.mem.read_data.valid & mine),
                         unit.mem.read_data.payload.eq(self.mem.read_data.payload)]
            with m.If(mine):
                m.d.comb += self.mem.read_data.ready.eq(unit.mem.read_data.ready)
        with m.If(self.descriptor.valid & self.descriptor.ready):
            m.d.sync += [busy.eq(1), owner.eq(op)]

        report = self.report.payload
        m.d.comb += [self.report.valid.eq(busy & Mux(owner == StepOp.UPDATE, update_.report.valid,
                                                     product.report.valid)),
                     report.op.eq(owner), report.product.eq(product.report.payload),
                     report.update.eq(update_.report.payload)]
        with m.If(self.report.valid & self.report.ready):
            m.d.sync += busy.eq(0)
        return m
