"""Block diagram of the Edge-QLoRA datapath: the LoRA step around the GEMM engine around the NF4 dequantizer.

    python scripts/block_diagram.py                       # writes docs/architecture.png
    python scripts/block_diagram.py --out diagram.png

Boxes are components (the names of ``rtl/``), yellow boxes are memories, arrows are streams; dashed arrows are
control (jobs, chunk descriptions, phases). The picture is drawn by hand from the RTL's structure: keep it in step
with ``rtl/gemm*.py`` and ``rtl/lora*.py`` when components move.
"""

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

NF4 = "#fde2c4"       # NF4 cores
GEMM = "#cfe3f7"      # GEMM engine components
LORA = "#d5efd0"      # LoRA step components
MEM = "#fff3b0"       # memories
EXT = "#eeeeee"       # outside the chip

FONT = 10.5


def box(ax, x, y, w, h, title, detail="", color=GEMM, title_size=FONT + 1):
    """A component at (x, y) (lower left), its name in bold and a line or two of what it does."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", linewidth=1.2,
                                edgecolor="#333333", facecolor=color, zorder=2))
    if detail:
        ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="top", fontsize=title_size, weight="bold", zorder=3)
        ax.text(x + w / 2, y + h - 0.52, detail, ha="center", va="top", fontsize=FONT - 1.5, zorder=3,
                linespacing=1.25)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size, weight="bold", zorder=3)
    return {"l": (x, y + h / 2), "r": (x + w, y + h / 2), "t": (x + w / 2, y + h), "b": (x + w / 2, y),
            "x": x, "y": y, "w": w, "h": h}


def frame(ax, x, y, w, h, title, color):
    """An enclosing unit, its name in its top left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.2", linewidth=2,
                                edgecolor=color, facecolor="none", zorder=1))
    ax.text(x + 0.15, y + h - 0.12, title, ha="left", va="top", fontsize=FONT + 3, weight="bold", color=color,
            zorder=3)


def group(ax, x, y, w, h, title, color):
    """A component made of the boxes inside it: a dashed outline, its name above its top left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", linewidth=1.3,
                                linestyle="--", edgecolor=color, facecolor="none", zorder=1.2))
    ax.text(x + 0.1, y + h - 0.04, title, ha="left", va="top", fontsize=FONT - 0.5, weight="bold", color=color,
            zorder=3)


def arrow(ax, points, label="", dashed=False, label_at=0, label_offset=(0, 0.12), ha="center", color="#222222"):
    """A stream along a polyline, arrowhead at the last point; the label beside segment ``label_at``."""
    style = "--" if dashed else "-"
    for (x0, y0), (x1, y1) in zip(points[:-2], points[1:-1]):
        ax.plot([x0, x1], [y0, y1], style, color=color, linewidth=1.5, zorder=1.5, solid_capstyle="butt")
    ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle="-|>", mutation_scale=16, linewidth=1.5,
                                 linestyle=style, color=color, shrinkA=0, shrinkB=1, zorder=1.6))
    if label:
        (x0, y0), (x1, y1) = points[label_at], points[label_at + 1]
        ax.text((x0 + x1) / 2 + label_offset[0], (y0 + y1) / 2 + label_offset[1], label, ha=ha, va="bottom",
                fontsize=FONT - 1.5, style="italic", color=color, zorder=3,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))


def draw(path):
    fig, ax = plt.subplots(figsize=(20, 12.5))
    ax.set_xlim(0, 20)
    ax.set_ylim(-0.3, 12.3)
    ax.set_aspect("equal")
    ax.axis("off")

    ax.text(10, 12.2, "Edge-QLoRA: one QLoRA training step of a linear layer in hardware", ha="center", va="top",
            fontsize=FONT + 6, weight="bold")

    # ---- outside the chip (host, attached memory)
    nf4_in = box(ax, 0.1, 8.75, 2.0, 1.1, "NF4 base weight", "tensor, codes,\nabsmax, absmax2", EXT)
    hdr_in = box(ax, 0.1, 6.9, 2.0, 0.95, "header", "dims, scaling,\noptimizer constants", EXT)
    mat_in = box(ax, 0.1, 4.9, 2.0, 1.1, "x, dy, A, B", "row segments\n(x, dy bf16; A, B fp32)", EXT)
    st_in = box(ax, 0.1, 0.9, 2.0, 1.1, "state_in", "AdamW moments,\nfrom attached memory", EXT)
    y_out = box(ax, 17.9, 2.9, 2.0, 1.1, "y, dx", "bf16, tile order", EXT)
    upd_out = box(ax, 17.9, 0.9, 2.0, 1.1, "updates", "grads, new A, B,\nnew moments", EXT)

    # ---- the LoRA step (rtl/lora/) and the GEMM engine inside it (rtl/gemm/)
    frame(ax, 2.35, 0.35, 15.35, 10.45, "LoraStep  (rtl/lora/)", "#2e7d32")
    frame(ax, 9.05, 3.7, 8.45, 6.85, "GemmEngine  (rtl/gemm/)", "#1f5fa8")

    ctrl = box(ax, 2.6, 6.85, 2.15, 1.05, "PhaseController", "the phases, one\nGEMM job per phase", LORA,
               title_size=FONT)
    load = box(ax, 2.6, 4.9, 2.15, 1.1, "SegmentLoader x4", "x, dy, A, B: a row\nsegment per cycle", LORA,
               title_size=FONT)
    pads = box(ax, 5.15, 2.7, 2.05, 5.2, "Scratchpads",
               "MatrixStore,\ndiagonal banks:\na row or a column\nsegment per cycle\n\nx, dy\nA, B (fp32 masters)\n"
               "hb, gb\nyl, dxl\ngA, gB", MEM)
    a_mov = box(ax, 7.55, 6.55, 1.3, 0.95, "AMover", "a operand", LORA, title_size=FONT)
    w_mov = box(ax, 7.55, 8.15, 1.3, 0.95, "WMover", "rank-r W\n(rows_in)", LORA, title_size=FONT)
    c_wr = box(ax, 7.45, 4.0, 1.5, 1.6, "CWriter", "store (hb, gb, yl,\ndxl, gA, gB) or\ncombine\nc + s*yl", LORA,
               title_size=FONT)
    updr = box(ax, 7.55, 0.75, 2.6, 1.35, "Updater", "s*g, parameter,\nmoments: one element\na cycle", LORA)
    opt = box(ax, 11.3, 0.8, 3.3, 1.3, "LoRAOptimizer", "AdamW or SGD, float32,\nrtl/lora_optim.py", LORA)

    # GEMM engine: the W path (top row), the A path (middle row), the compute path (bottom row, right to left);
    # dashed groups are the writer components, which own their buffers
    group(ax, 11.5, 8.15, 5.9, 1.8, "WWriter", "#1f5fa8")
    group(ax, 11.5, 6.35, 5.9, 1.6, "AWriter", "#1f5fa8")
    deq = box(ax, 9.3, 8.3, 1.8, 1.3, "NF4Dequantizer", "16-entry table\nper block,\ncols lanes",
              NF4, title_size=FONT)
    ral = box(ax, 11.65, 8.3, 1.55, 1.3, "RowAligner", "flat -> rows\nof cols\nelements", GEMM, title_size=FONT)
    w_wr = box(ax, 13.45, 8.3, 1.5, 1.3, "W tiles", "tile of W,\nshared\nexponents", GEMM, title_size=FONT)
    w_buf = box(ax, 15.2, 8.3, 2.05, 1.3, "W buffer", "double-buffered,\ncols banks\n+ exponents", MEM,
                title_size=FONT)
    a_sl = box(ax, 11.65, 6.5, 1.55, 1.05, "A slice", "SkidBuffer", GEMM, title_size=FONT)
    a_wr = box(ax, 13.45, 6.5, 1.5, 1.05, "A tiles", "tile of A,\nexponents", GEMM, title_size=FONT)
    a_buf = box(ax, 15.2, 6.5, 1.55, 1.05, "A buffer", "double-buffered\n+ exponents", MEM, title_size=FONT)
    jobc = box(ax, 9.3, 5.95, 1.8, 0.95, "JobControl", "the job to\nevery part", GEMM, title_size=FONT)
    seq = box(ax, 15.05, 4.1, 2.25, 1.45, "Sequencer", "addresses, W select,\nBFP aligners ->\n18-bit integers",
              GEMM, title_size=FONT)
    pe = box(ax, 12.45, 4.1, 2.1, 1.45, "PEArray", "rows x cols DSP MACs,\n44-bit chunk sums\n(rtl/pe_array.py)",
             GEMM, title_size=FONT)
    acc = box(ax, 9.3, 4.1, 2.65, 1.45, "Accumulator", "FixedToFloat, fp32 FPAdd\non the acc memory,\nround to bf16/fp32",
              GEMM, title_size=FONT)

    # external inputs
    arrow(ax, [nf4_in["r"], (deq["x"], nf4_in["r"][1])], "NF4 streams (phases F2, B4)", label_offset=(-0.6, 0.08))
    arrow(ax, [hdr_in["r"], ctrl["l"]])
    arrow(ax, [mat_in["r"], load["l"]])
    arrow(ax, [load["r"], (pads["x"], load["r"][1])])
    arrow(ax, [st_in["r"], updr["l"]], "state_in", label_offset=(-1.6, 0.1))

    # LoRA movers into the engine
    arrow(ax, [(pads["x"] + pads["w"], a_mov["l"][1]), a_mov["l"]])
    arrow(ax, [(pads["x"] + pads["w"], 7.62), (7.35, 7.62), (7.35, w_mov["l"][1]), w_mov["l"]])
    arrow(ax, [a_mov["r"], a_sl["l"]], "a", label_offset=(-0.9, 0.05))
    arrow(ax, [w_mov["r"], (w_mov["r"][0] + 0.2, w_mov["r"][1]), (w_mov["r"][0] + 0.2, 8.05),
               (w_wr["b"][0], 8.05), w_wr["b"]],
          "rows_in (bypasses the aligner)", label_at=2, label_offset=(-1.45, -0.3))

    # W and A paths
    arrow(ax, [deq["r"], ral["l"]])
    arrow(ax, [ral["r"], w_wr["l"]])
    arrow(ax, [w_wr["r"], w_buf["l"]])
    arrow(ax, [a_sl["r"], a_wr["l"]])
    arrow(ax, [a_wr["r"], (a_buf["x"], a_wr["r"][1])])

    # buffers into the sequencer, the compute path, the chunk descriptions
    arrow(ax, [(17.05, w_buf["y"]), (17.05, seq["y"] + seq["h"])], "W", label_offset=(0.12, 0.1), ha="left")
    arrow(ax, [(a_buf["t"][0], a_buf["y"]), (a_buf["t"][0], seq["y"] + seq["h"])], "A",
          label_offset=(-0.15, 0.05), ha="right")
    arrow(ax, [seq["l"], pe["r"]], "steps")
    arrow(ax, [pe["l"], acc["r"]], "partials", label_offset=(0, 0.12))
    arrow(ax, [(seq["b"][0], seq["y"]), (seq["b"][0], 3.95), (acc["b"][0], 3.95), acc["b"]],
          "chunk info FIFO (exponents, address, first/last)", dashed=True, label_at=1, label_offset=(0, -0.02))
    arrow(ax, [acc["l"], c_wr["r"]], "c", label_offset=(0, 0.1))

    # outputs of the engine: stores, or y/dx out
    arrow(ax, [(c_wr["x"], c_wr["y"] + 0.5), (pads["x"] + pads["w"], c_wr["y"] + 0.5)])
    arrow(ax, [c_wr["b"], (c_wr["b"][0], 3.0), (8.5, 3.0), (y_out["x"], 3.0)], "y = c + s*yl,  dx = c + s*dxl",
          label_at=2, label_offset=(0, 0.05))

    # the update phases
    arrow(ax, [(pads["t"][0], pads["y"]), (pads["t"][0], 1.75), (updr["x"], 1.75)], "A, B, gA, gB",
          label_at=0, label_offset=(-0.55, -0.35))
    arrow(ax, [(updr["r"][0], 1.7), (opt["x"], 1.7)], "elements", label_offset=(0, 0.05))
    arrow(ax, [(opt["x"], 1.05), (updr["r"][0], 1.05)], "updated", label_offset=(0, 0.05))
    arrow(ax, [updr["b"], (updr["b"][0], 0.55), (16.9, 0.55), (16.9, 1.2), (upd_out["x"], 1.2)], "updates",
          label_at=1, label_offset=(3.5, 0.03))

    # control
    arrow(ax, [(8.95, jobc["l"][1]), jobc["l"]], dashed=True)
    ax.text(8.9, jobc["l"][1] + 0.05, "job", ha="right", va="bottom", fontsize=FONT - 1.5, style="italic")
    ax.text(ctrl["x"] + ctrl["w"] / 2, ctrl["y"] - 0.1,
            "drives the loaders, movers,\nCWriter, Updater and the\nengine's job stream",
            ha="center", va="top", fontsize=FONT - 2.5, style="italic")

    # phase order and a legend
    ax.text(10, 11.45, "phases: load x, dy, A, B -> F1 h = x A^T -> F3 yl = hb B^T -> F2 y = x W^T + s yl -> "
            "B1 g = dy B -> B5 dxl = gb A -> B4 dx = dy W + s dxl\n"
            "-> B2 gB = dy^T hb -> B3 gA = gb^T x -> update A -> update B",
            ha="center", va="top", fontsize=FONT - 0.5, color="#2e7d32")
    ax.text(0.15, -0.25, "Legend: orange NF4 core, blue GEMM engine, green LoRA step, yellow memory, gray outside "
            "the chip; solid arrows are streams, dashed ones control; a dashed outline is one component.\nNot drawn: the standalone NF4Quantizer and "
            "AbsmaxQuantizer (rtl/nf4_quant.py, rtl/absmax_quant.py), bit-exact with bitsandbytes' quantize_4bit.",
            ha="left", va="bottom", fontsize=FONT - 0.5)

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "docs" /
                                             "architecture.png"), help="PNG to write (default docs/architecture.png)")
    args = parser.parse_args()
    draw(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
