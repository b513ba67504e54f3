#!/usr/bin/env python3
"""One QLoRA step of each of TinyLlama-1.1B's seven projections, cycle by cycle on Verilator, written to the file
the docs and ``edge-qlora bench`` read.

    python scripts/tinyllama_steps.py                          # T=16 and 128, all seven: about 50 minutes here
    python scripts/tinyllama_steps.py --tokens 16 --projections k_proj v_proj   # a minute or two

The same as ``edge-qlora tinyllama --json docs/tinyllama_steps.json`` (see ``edge_qlora.tinyllama``); any option
of that command can be added. Exits 1 if a projection fails the accuracy contract.
"""

import sys

from edge_qlora.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--json" not in arguments:
        arguments += ["--json", "docs/tinyllama_steps.json"]
    sys.exit(main(["tinyllama", *arguments]))
