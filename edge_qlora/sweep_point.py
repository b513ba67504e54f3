"""One point of a sweep: ``python -m edge_qlora.sweep_point COMMAND ARGS...`` runs ``edge-qlora COMMAND ARGS...``
and dies, with every process it started, when the Ray worker that started it dies.

:func:`edge_qlora.sweep.run_point` starts it in a session of its own with a pipe on its stdin; end of file on that
pipe means the worker is gone (killed, cancelled, its node lost), and the guard kills the whole process group: the
command and the Yosys, nextpnr or Verilator process it runs. Nothing imports this module; it is an entry point.
"""

import os
import signal
import sys
import threading


def _die_with_parent():
    while os.read(0, 4096):     # the raw descriptor: a buffered reader's lock would stall interpreter shutdown
        pass
    os.killpg(0, signal.SIGKILL)


def main():
    threading.Thread(target=_die_with_parent, daemon=True).start()
    from .cli import main as edge_qlora
    code = edge_qlora(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)              # not sys.exit: the guard thread is still blocked reading stdin


if __name__ == "__main__":
    main()
