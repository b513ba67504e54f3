"""Verilog of any unit, for users who integrate it elsewhere and for the Verilator backend.

:func:`verilog` exports a component with :func:`amaranth.back.verilog.convert`, drops the memory initialisers
that only set zeros (a large design has millions of such lines; registers and memories start at zero in every
FPGA flow and simulator this project uses, and Verilator is run with ``--x-initial 0``), and puts a header in front
that documents the ports and the stream protocol.
"""

import re

from amaranth.hdl import Shape, Value
from amaranth.lib import data, stream, wiring

__all__ = ["verilog", "strip_zero_init", "port_header"]

_ZERO_WORD = re.compile(r"[\w$.]+\[\d+\] = \d+'[hd]0+;")

PROTOCOL = """\
Clock and reset: every register changes on the rising edge of `clk`; `rst` is a synchronous, active-high reset
(hold it low in simulation: registers start at their reset values).

Streams (amaranth.lib.stream): a stream NAME is the ports NAME__valid, NAME__ready and NAME__payload. A beat is
transferred on a rising edge of `clk` where valid and ready are both high. The sender holds valid and the payload
unchanged until the beat is taken; valid never waits for ready; ready may depend on valid. Payload fields are
packed from bit 0 upward in the order listed; arrays put element 0 in the low bits."""


def strip_zero_init(text):
    """``text`` without the ``initial`` blocks that set every word of a memory to zero (tables are kept)."""
    out, block = [], None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if block is None:
            if stripped == "initial begin":
                block = [line]
            else:
                out.append(line)
            continue
        block.append(line)
        if stripped == "end":
            if len(block) == 2 or not all(_ZERO_WORD.fullmatch(b.strip()) for b in block[1:-1]):
                out.extend(block)
            block = None
        elif not _ZERO_WORD.fullmatch(stripped):
            out.extend(block)
            block = None
    out.extend(block or [])
    return "".join(out)


def _layout_lines(shape, indent):
    """Field lines of a payload layout (name, bits), nested layouts indented."""
    if isinstance(shape, data.StructLayout):
        lines = []
        for name, field in shape:
            width = Shape.cast(field.shape).width
            lines.append(f"{indent}[{field.offset + width - 1}:{field.offset}] {name}")
            if isinstance(field.shape, data.Layout):
                lines += _layout_lines(field.shape, indent + "    ")
        return lines
    if isinstance(shape, data.ArrayLayout):
        elem = Shape.cast(shape.elem_shape).width
        return [f"{indent}{shape.length} x {elem} bits (element i at [{elem}*i+{elem - 1}:{elem}*i])"]
    return []


def port_header(dut):
    """Comment lines describing ``dut``'s ports: direction, width, payload fields."""
    lines = ["Ports (besides clk and rst):"]
    for name, member in dut.signature.members.items():
        port = getattr(dut, name)
        if member.is_signature and isinstance(member.signature, stream.Signature):
            direction = "output stream" if member.flow == wiring.Out else "input stream"
            shape = member.signature.members["payload"].shape
            lines.append(f"  {name}: {direction}, payload {len(Value.cast(port.payload))} bits")
            lines += _layout_lines(shape, "      ")
        elif member.is_port:
            direction = "output" if member.flow == wiring.Out else "input"
            lines.append(f"  {name}: {direction}, {len(Value.cast(port))} bits")
    return lines


def verilog(dut, title):
    """The Verilog of ``dut`` (top module ``top``), with a header naming ``title`` (the unit and its
    configuration) and documenting its ports and the stream protocol."""
    from amaranth.back import verilog as back
    header = [f"Edge-QLoRA {title}", "", *port_header(dut), "", *PROTOCOL.splitlines()]
    body = strip_zero_init(back.convert(dut, name="top", emit_src=False))
    return "".join(f"// {line}".rstrip() + "\n" for line in header) + "\n" + body
