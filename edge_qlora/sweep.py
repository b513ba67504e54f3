"""Design-space sweeps: many ``edge-qlora build`` or ``edge-qlora tinyllama`` runs at once, as Ray tasks.

A SPEC (TOML) names the command, its fixed options and lists of values to sweep::

    board = "ulx3s-85f"        # builds: the board (required)
    command = "build"          # or "tinyllama" (Verilator step simulations); default "build"
    timeout_s = 5400           # optional: a point still running after this long is stopped and recorded
    memory_gb = 6              # optional: the memory each point declares to Ray (default by board/command)

    [design]                   # fixed options, named as the command's long options without dashes
    rows = 8
    cols = 8

    [sweep]                    # one point per combination of these lists
    seed = [1, 2, 3, 4]

Each point runs the command itself (``python -m edge_qlora.sweep_point``, which is ``edge-qlora`` plus a guard that
takes the point's whole process group down when the Ray worker that started it dies) in its own folder
``DIR/points/<key>``, as a Ray task declaring one CPU and its memory. ``key`` hashes the command, board and options,
so ``--resume`` finds the points already done. Results go to ``DIR/sweep.json`` (rewritten whole after every point),
``DIR/sweep.md`` and, for builds, ``DIR/pareto.png``; the best bitstream of each design point (the options other
than the seed) goes to ``DIR/bitstreams``, and every point's netlists and bitstream are deleted from its folder.
"""

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .outputs import OutputError, atomic_output

__all__ = ["SpecError", "Spec", "load_spec", "points", "run_sweep", "markdown", "pareto_front", "plot", "label",
           "COMMANDS"]

COMMANDS = ("build", "tinyllama")
# options the sweep sets itself for every point
_RESERVED = {"build": {"board", "out", "quiet", "help"}, "tinyllama": {"json", "quiet", "help"}}
# memory each point declares to Ray, in GiB, when the SPEC gives none (peak RSS measured with headroom: an
# iCEBreaker build 0.35 GB, the 8x8 GEMM engine on the ECP5-85F about 3 GB, the TinyLlama Verilator model's compile)
_DEFAULT_MEMORY_GB = {("build", "icebreaker"): 1, ("build", "ulx3s-85f"): 4, ("tinyllama", None): 4}
# nextpnr cell types -> the table's LUT/FF/DSP/BRAM columns
_COLUMNS = {"LUT": ("TRELLIS_COMB", "ICESTORM_LC"), "FF": ("TRELLIS_FF",),
            "DSP": ("MULT18X18D", "ICESTORM_DSP"), "BRAM": ("DP16KD", "ICESTORM_RAM")}
# build outputs too large to keep for every point (the best bitstream is copied out first)
_LARGE = (".json", ".il", ".bit", ".bin", ".config", ".asc", ".v")
_SPEC_KEYS = {"board", "command", "timeout_s", "memory_gb", "design", "sweep"}


class SpecError(Exception):
    """A SPEC that cannot be swept; ``str(error)`` is one line."""


@dataclass(frozen=True)
class Spec:
    """A validated sweep SPEC: ``command``, ``board``, fixed ``design`` options, ``sweep`` lists, limits."""
    command: str
    board: str | None
    design: dict
    sweep: dict
    timeout_s: float | None = None
    memory_gb: float | None = None
    path: str = field(default="", compare=False)
    # the edge-qlora argument parser, whose subcommand checks each point's options
    parser: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.command not in COMMANDS:
            raise SpecError(f"command must be one of {', '.join(COMMANDS)}, not {self.command!r}")
        if self.command == "build" and self.board is None:
            raise SpecError("a build sweep needs board = \"icebreaker\" or \"ulx3s-85f\"")
        if self.command != "build" and self.board is not None:
            raise SpecError(f"board applies to build sweeps, not to {self.command}")
        for name, value in (("timeout_s", self.timeout_s), ("memory_gb", self.memory_gb)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SpecError(f"{name} must be a positive number, not {value!r}")
        for name, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"[sweep] {name} must be a non-empty list, not {values!r}")
            if len(set(map(json.dumps, values))) != len(values):
                raise SpecError(f"[sweep] {name} lists a value twice: {values!r}")
        both = set(self.design) & set(self.sweep)
        if both:
            raise SpecError(f"{', '.join(sorted(both))} is both in [design] and in [sweep]")

    @property
    def memory_bytes(self):
        gb = self.memory_gb or _DEFAULT_MEMORY_GB.get((self.command, self.board), 4)
        return int(gb * (1 << 30))


def load_spec(path, parser):
    """Read and validate a SPEC file: every option known to the command, every point's options accepted by it.

    ``parser`` is ``edge-qlora``'s argument parser (``edge_qlora.cli._parser()``): the options, their types and
    the boards come from the command they run.
    """
    try:
        import tomllib
    except ImportError:             # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as error:
        raise SpecError(f"cannot read SPEC {path} ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"SPEC {path} is not valid TOML ({error})") from None
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise SpecError(f"SPEC {path}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_SPEC_KEYS))})")
    for table in ("design", "sweep"):
        if not isinstance(data.get(table, {}), dict):
            raise SpecError(f"SPEC {path}: [{table}] must be a table")
    spec = Spec(command=data.get("command", "build"), board=data.get("board"), design=dict(data.get("design", {})),
                sweep=dict(data.get("sweep", {})), timeout_s=data.get("timeout_s"),
                memory_gb=data.get("memory_gb"), path=str(path), parser=parser)
    if spec.command == "build":
        boards = _options(parser, "build")["board"][1].choices
        if spec.board not in boards:
            raise SpecError(f"SPEC {path}: board must be one of {', '.join(boards)}, not {spec.board!r}")
    for point in points(spec):
        _check_argv(parser, spec.command, point["argv"], path)
    return spec


def _subparser(parser, command):
    for action in parser._subparsers._group_actions:
        if command in action.choices:
            return action.choices[command]
    raise AssertionError(command)


def _options(parser, command):
    """``{SPEC name: argparse action}`` for the command's long options (``--lut-mapper`` -> ``lut_mapper``)."""
    options = {}
    for action in _subparser(parser, command)._actions:
        for string in action.option_strings:
            if string.startswith("--"):
                options[string[2:].replace("-", "_")] = (string, action)
    return options


def _argv(parser, command, options):
    """The command-line words of one point's options."""
    import argparse
    known = _options(parser, command)
    argv = []
    for name, value in options.items():
        if name not in known or name in _RESERVED[command]:
            choices = sorted(set(known) - _RESERVED[command])
            raise SpecError(f"{name} is not an option of {command} (options: {', '.join(choices)})")
        string, action = known[name]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise SpecError(f"{name} must be true or false, not {value!r}")
            argv.append(string if value else "--no-" + string[2:])
        elif action.nargs == 0:
            if not isinstance(value, bool):
                raise SpecError(f"{name} must be true or false, not {value!r}")
            if value:
                argv.append(string)
        else:
            if isinstance(value, (list, dict)) or isinstance(value, bool):
                raise SpecError(f"{name} takes one value per point, not {value!r}")
            argv += [string, str(value)]
    return argv


def _check_argv(parser, command, argv, path):
    subparser = _subparser(parser, command)

    def error(message):
        raise SpecError(f"SPEC {path}: {command} {' '.join(argv)}: {message}")

    subparser.error = error
    try:
        subparser.parse_args(argv)
    finally:
        del subparser.error


def point_key(spec, options):
    """Hash of what a point builds or simulates: command, board and every option (not the limits)."""
    text = json.dumps({"command": spec.command, "board": spec.board, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def points(spec):
    """Every point of the sweep, in SPEC order: ``{"key", "options", "swept", "design_key", "argv"}``."""
    names = list(spec.sweep)
    out = []
    for values in itertools.product(*(spec.sweep[name] for name in names)) if names else [()]:
        swept = dict(zip(names, values))
        options = {**spec.design, **swept}
        # the design point: every option but the seed, whose builds are repeats of one netlist
        design = {name: value for name, value in options.items() if name != "seed"}
        argv = _argv(spec.parser, spec.command, options)
        if spec.command == "build":
            argv = ["--board", spec.board, *argv]
        out.append({"key": point_key(spec, options), "options": options, "swept": swept,
                    "design_key": point_key(spec, design), "argv": argv})
    return out


# --- one point, in a Ray worker ---------------------------------------------------------------------------------

def _last_line(path, prefix=""):
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    chosen = [line for line in lines if line.startswith(prefix)] if prefix else lines
    return chosen[-1] if chosen else ""


def run_point(command, argv, folder, timeout_s=None):
    """Run one point's command in ``folder``; return its row's results (no exception for a failed point)."""
    import socket

    started = time.monotonic()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if command == "build":
        argv = [*argv, "--out", str(folder / "build")]
    else:
        argv = [*argv, "--json", str(folder / "rows.json")]
    result = {"host": socket.gethostname(), "node": None, "status": "ok", "error": None}
    try:
        import ray
        result["node"] = ray.get_runtime_context().get_node_id()[:12]     # which Ray node ran the point
    except Exception:                   # not in a Ray worker (a direct call)
        pass
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "edge_qlora.sweep_point", command, "-q", *argv],
                                   stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=folder,
                                   start_new_session=True)
        (folder / "pid").write_text(f"worker {os.getpid()}\npoint {process.pid}\n")
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        finally:
            process.stdin.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    if returncode is None:
        doing = _last_line(stdout)
        result.update(status="timeout", error=f"timed out after {timeout_s:g} s" + (f" ({doing})" if doing else ""))
        return result
    if command == "build":
        report_path = folder / "build" / "report.json"
        if returncode != 0 or not report_path.exists():
            line = _last_line(stderr, "edge-qlora: error:").removeprefix("edge-qlora: error:").strip()
            result.update(status="failed", error=line or _last_line(stderr) or f"exit status {returncode}")
            return result
        report = json.loads(report_path.read_text())
        bitstream = report.get("bitstream")
        if bitstream and Path(bitstream).exists():
            result["bitstream_bytes"] = Path(bitstream).read_bytes()
            result["bitstream_suffix"] = Path(bitstream).suffix
        for path in (folder / "build").iterdir():
            if path.suffix in _LARGE and path.name not in ("report.json", "nextpnr-report.json") \
                    and not path.name.startswith("build_"):
                path.unlink()
        result["report"] = report
        return result
    rows_path = folder / "rows.json"
    if returncode not in (0, 1) or not rows_path.exists():
        line = _last_line(stderr, "edge-qlora: error:").removeprefix("edge-qlora: error:").strip()
        result.update(status="failed", error=line or _last_line(stderr) or f"exit status {returncode}")
        return result
    rows = json.loads(rows_path.read_text())
    result["simulation"] = rows[0] if len(rows) == 1 else rows
    return result


# --- the driver -------------------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise SpecError("sweep runs on Ray, which is not installed: pip install -e \".[sweep]\" "
                        "(or pip install \"ray[default,client]>=2.60\")") from None
    return ray


def _connect(ray, address, jobs):
    """Start a local Ray instance of ``jobs`` CPUs, or join the cluster at ``address``; return its CPU count."""
    import logging
    # Ray's start-up chatter (token authentication is on, ...) is not the user's business; its errors are
    logging.getLogger("ray").setLevel(logging.ERROR)
    options = dict(log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address is None:
            # "local": a new instance even where a `ray start` cluster runs (or has run) on this machine
            ray.init(address="local", num_cpus=jobs, include_dashboard=False, **options)
        elif address.startswith("ray://"):
            ray.init(address=address, log_to_driver=False)     # Ray Client passes these on to the cluster
        else:
            # a driver joining a cluster on the loopback must say so, or Ray reaches for the machine's address
            host = address.rsplit(":", 1)[0]
            ray.init(address=address, _node_ip_address="127.0.0.1" if host in ("127.0.0.1", "localhost") else None,
                     **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(f"cannot connect to Ray at {address or 'a new local instance'} ({text})") from None
    return int(ray.cluster_resources().get("CPU", 0))


def _row(point, spec, result):
    row = {"key": point["key"], "design_key": point["design_key"], **point["options"],
           "status": result["status"], "error": result["error"], "seconds": result.get("seconds"),
           "host": result.get("host"), "node": result.get("node"), "timeout_s": spec.timeout_s}
    if spec.command == "build":
        report = result.get("report") or {}
        fmax = report.get("fmax_mhz") or {}
        row.update(fmax_mhz=fmax.get("sync", min(fmax.values()) if fmax else None),
                   timing_met=report.get("timing_met"), utilization=report.get("utilization"),
                   target_mhz=report.get("target_mhz"), placed_only=report.get("placed_only", False),
                   build_seconds=report.get("seconds"), notes=report.get("notes"), bitstream=None)
    else:
        sim = result.get("simulation") or {}
        row.update({name: sim.get(name) for name in ("projection", "t", "r", "cycles", "model_cycles",
                                                      "utilization", "contract_passed", "worst_ratio",
                                                      "sim_seconds")})
    return row


def _done(row, spec):
    """Whether ``--resume`` keeps a row instead of running its point again."""
    if row["status"] in ("ok", "failed"):
        return True
    if row["status"] == "timeout":  # again only with a longer limit than the one it ran out of
        return spec.timeout_s is not None and row.get("timeout_s") is not None and spec.timeout_s <= row["timeout_s"]
    return False                    # lost (worker died, cancelled): run again


def _lost(error):
    name = type(error).__name__
    text = str(error).strip().splitlines()
    detail = next((line for line in text if "SIG" in line or "died" in line or "exit" in line.lower()), "")
    return f"Ray worker died ({name}{': ' + detail.strip()[:160] if detail else ''})"


def _keep_best_bitstream(rows, row, result, out):
    """Copy ``result``'s bitstream to ``out/bitstreams`` if it is the best of its design point so far."""
    data = result.get("bitstream_bytes")
    if data is None or row["fmax_mhz"] is None:
        return
    rivals = [other for other in rows if other["design_key"] == row["design_key"] and other.get("bitstream")]
    if any(other["fmax_mhz"] is not None and other["fmax_mhz"] >= row["fmax_mhz"] for other in rivals):
        return
    folder = out / "bitstreams"
    folder.mkdir(exist_ok=True)
    path = folder / f"{row['design_key']}{result['bitstream_suffix']}"
    with atomic_output(path, "wb") as f:
        f.write(data)
    for other in rivals:
        other["bitstream"] = None
    row["bitstream"] = str(path)


def run_sweep(spec, out, *, jobs=None, address=None, resume=False, progress=None):
    """Run every point of ``spec`` not already done; write ``out/sweep.json`` after each, then the table and plot.

    ``progress(done, total, running, failed, best)`` is called as points start and end. Returns the rows.
    Ctrl-C cancels the running points (their process groups die with their workers) and re-raises, with every
    finished point already in ``sweep.json``.
    """
    out = Path(out)
    all_points = points(spec)
    results = out / "sweep.json"
    old = {}
    if results.exists():
        if not resume:
            raise OutputError(f"{results} exists: pass --resume to continue that sweep, or choose another --out")
        try:
            old = {row["key"]: row for row in json.loads(results.read_text())}
        except (ValueError, KeyError, TypeError) as error:
            raise OutputError(f"{results} is not a sweep's results ({error}); choose another --out") from None
    ray = _import_ray()
    out.mkdir(parents=True, exist_ok=True)
    rows = {point["key"]: old[point["key"]] for point in all_points
            if point["key"] in old and _done(old[point["key"]], spec)}
    todo = [point for point in all_points if point["key"] not in rows]
    cpus = max(1, (os.cpu_count() or 2) - 1)
    jobs = jobs or (cpus if address is None else None)
    cluster_cpus = _connect(ray, address, jobs)
    jobs = jobs or max(1, cluster_cpus)
    try:
        biggest = max(node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"])
        if spec.memory_bytes > biggest:
            raise SpecError(f"each point declares {spec.memory_bytes / (1 << 30):.1f} GiB (memory_gb) but the "
                            f"largest Ray node offers {biggest / (1 << 30):.1f} GiB")
        task = ray.remote(num_cpus=1, memory=spec.memory_bytes, max_retries=0)(run_point)
        return _drive(ray, task, spec, out, all_points, rows, todo, jobs, progress)
    finally:
        ray.shutdown()


def _save(rows, all_points, out):
    ordered = [rows[point["key"]] for point in all_points if point["key"] in rows]
    with atomic_output(out / "sweep.json", "w") as f:
        json.dump(ordered, f, indent=1)
    return ordered


def _drive(ray, task, spec, out, all_points, rows, todo, jobs, progress):
    started = time.monotonic()
    pending = list(todo)
    running = {}
    total = len(all_points)

    def report():
        if progress:
            done = [row for row in rows.values()]
            failed = sum(row["status"] != "ok" for row in done)
            progress(len(done), total, len(running), failed, _best(done, spec))

    report()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                point = pending.pop(0)
                ref = task.remote(spec.command, point["argv"], str((out / "points" / point["key"]).absolute()),
                                  spec.timeout_s)
                running[ref] = point
                report()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                point = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:
                    result = {"status": "lost", "error": _lost(error)}
                row = _row(point, spec, result)
                rows[point["key"]] = row
                if spec.command == "build":
                    _keep_best_bitstream(list(rows.values()), row, result, out)
                _save(rows, all_points, out)
                report()
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    ordered = _save(rows, all_points, out)
    ran = [rows[point["key"]] for point in todo]
    with atomic_output(out / "sweep.md", "w") as f:
        f.write(markdown(ordered, spec, ran, time.monotonic() - started))
    if spec.command == "build" and any(row.get("fmax_mhz") is not None for row in ordered):
        plot(ordered, spec, out / "pareto.png")
    return ordered


# --- results ----------------------------------------------------------------------------------------------------

def _best(rows, spec):
    if spec.command == "build":
        scored = [row for row in rows if row.get("fmax_mhz") is not None]
        return max(scored, key=lambda row: row["fmax_mhz"], default=None)
    scored = [row for row in rows if row.get("cycles") is not None]
    return max(scored, key=lambda row: row["utilization"] or 0, default=None)


def _resource(row, column):
    for cell in _COLUMNS[column]:
        if cell in (row.get("utilization") or {}):
            return row["utilization"][cell][0]
    return None


def pareto_front(rows):
    """The rows no other row beats on both LUTs (fewer) and Fmax (higher), in order of LUTs."""
    scored = [row for row in rows if row.get("fmax_mhz") is not None and _resource(row, "LUT") is not None]
    front = []
    for row in sorted(scored, key=lambda row: (_resource(row, "LUT"), -row["fmax_mhz"])):
        if not front or row["fmax_mhz"] > front[-1]["fmax_mhz"]:
            front.append(row)
    return front


def _text(value):
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def label(row, spec):
    """The options that tell this point from the others (the swept ones with more than one value)."""
    names = [name for name, values in spec.sweep.items() if len(values) > 1] or list(spec.sweep)
    return ", ".join(f"{name}={_text(row[name])}" for name in names) or "the one point"


def summary(rows, spec, ran=None, wall_s=None):
    """Lines of figures over the whole sweep: points by status, Fmax spread, and for the points ``ran`` in this
    invocation (all by default) their wall time ``wall_s`` against the sum of their own times."""
    ok = [row for row in rows if row["status"] == "ok"]
    lines = [f"{len(rows)} points: {len(ok)} ok, {len(rows) - len(ok)} failed or stopped"]
    if spec.command == "build":
        fmax = sorted(row["fmax_mhz"] for row in ok if row.get("fmax_mhz") is not None)
        if fmax:
            median = fmax[len(fmax) // 2] if len(fmax) % 2 else (fmax[len(fmax) // 2 - 1] + fmax[len(fmax) // 2]) / 2
            what = "estimated before routing" if all(row.get("placed_only") for row in ok) else "routed"
            lines.append(f"Fmax ({what}): {fmax[0]:.2f} to {fmax[-1]:.2f} MHz, median {median:.2f} MHz, "
                         f"spread {fmax[-1] - fmax[0]:.2f} MHz ({100 * (fmax[-1] - fmax[0]) / fmax[-1]:.0f}% of "
                         f"the best)")
    ran = rows if ran is None else ran
    total = sum(row["seconds"] or 0 for row in ran)
    if wall_s and ran:
        lines.append(f"this run: {len(ran)} points in {wall_s:.0f} s of wall time for {total:.0f} s of point time "
                     f"summed ({total / wall_s:.2f}x)" + (f"; {len(rows) - len(ran)} points kept from before"
                                                          if len(rows) > len(ran) else ""))
    else:
        lines.append(f"point time {total:.0f} s summed")
    return lines


def markdown(rows, spec, ran=None, wall_s=None):
    """The sweep's table (one row per point) and its summary, as Markdown."""
    lines = [f"# Sweep: {spec.command}" + (f" on {spec.board}" if spec.board else ""), ""]
    fixed = ", ".join(f"{name}={value}" for name, value in spec.design.items())
    if fixed:
        lines += [f"Fixed: {fixed}.", ""]
    swept = list(spec.sweep)
    if spec.command == "build":
        header = [*swept, "Fmax MHz", "timing met", "LUT", "FF", "DSP", "BRAM", "wall s", "error"]
    else:
        header = [*swept, "cycles", "model cycles", "utilization", "accuracy", "wall s", "error"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i < len(swept) or name == "error" else "---:"
                                for i, name in enumerate(header)) + "|")

    def cell(value, fmt="{}"):
        if isinstance(value, bool):
            return _text(value)     # as the SPEC spells it
        return "" if value is None else fmt.format(value)

    for row in rows:
        values = [cell(row.get(name)) for name in swept]
        if spec.command == "build":
            met = None if row.get("timing_met") is None else ("yes" if row["timing_met"] else "no")
            if met and row.get("placed_only"):
                met += " (placed)"
            values += [cell(row.get("fmax_mhz"), "{:.2f}"), cell(met),
                       *(cell(_resource(row, column), "{:,}") for column in _COLUMNS)]
        else:
            accuracy = None if row.get("contract_passed") is None else (
                f"{'passed' if row['contract_passed'] else 'FAILED'} ({row['worst_ratio']:.3f})")
            values += [cell(row.get("cycles"), "{:,}"), cell(row.get("model_cycles"), "{:,}"),
                       cell(None if row.get("utilization") is None else 100 * row["utilization"], "{:.1f}%"),
                       cell(accuracy)]
        values += [cell(row.get("seconds"), "{:.0f}"), cell(row.get("error")).replace("|", "/")]
        lines.append("| " + " | ".join(values) + " |")
    lines += [""] + [f"- {line}" for line in summary(rows, spec, ran, wall_s)]
    if spec.command == "build":
        best = pareto_front(rows)
        if best:
            lines.append("- Pareto front (fewer LUTs, higher Fmax): "
                         + "; ".join(f"{label(row, spec)} ({_resource(row, 'LUT'):,} LUTs, {row['fmax_mhz']:.2f} MHz)"
                                     for row in best))
    return "\n".join(lines) + "\n"


def plot(rows, spec, path):
    """A PNG of Fmax against LUTs, one dot per point, the Pareto front joined and ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if row.get("fmax_mhz") is not None and _resource(row, "LUT") is not None]
    front = pareto_front(scored)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([_resource(row, "LUT") for row in scored], [row["fmax_mhz"] for row in scored], color="tab:blue",
               zorder=3, label="point")
    ax.plot([_resource(row, "LUT") for row in front], [row["fmax_mhz"] for row in front], color="tab:red",
            marker="o", markerfacecolor="none", markersize=11, zorder=2, label="Pareto front")
    for row in scored:
        ax.annotate(label(row, spec), (_resource(row, "LUT"), row["fmax_mhz"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    targets = {row["target_mhz"] for row in scored if row.get("target_mhz")}
    for target in sorted(targets):
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:g} MHz")
    placed = all(row.get("placed_only") for row in scored)
    ax.set_xlabel("LUTs")
    ax.set_ylabel("Fmax, MHz" + (" (estimate before routing)" if placed else ""))
    ax.set_title(f"Sweep on {spec.board}: {len(scored)} points", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
