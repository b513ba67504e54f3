"""Bit budget planner: a code width (NF2, NF3 or NF4) for every weight matrix of a model, embeddings and lm_head
included, that minimizes the total quantization error under a byte budget.

The problem is a multiple-choice knapsack, solved as a mixed-integer program by ``scipy.optimize.milp`` (HiGHS):
a binary ``x[m, k]`` says that matrix ``m`` is stored with width ``k``;

    minimize    sum_{m,k} E[m, k] x[m, k]
    subject to  sum_k x[m, k] = 1                      for every matrix m (one width each)
                sum_{m,k} S[m, k] x[m, k] <= B - F     (the budget)

where ``E[m, k] = ||W_m - dequant(quant_k(W_m))||_F^2`` is measured by quantizing the tensor with the golden
code-book quantizer (:mod:`edge_qlora.golden.codebook`, dequantized to float32), ``S[m, k]`` is
:func:`~edge_qlora.golden.codebook.stored_bytes` (packed codes, uint8 absmax per block, the nested float32 absmax
per 256 blocks and the offset with double quantization, the table of ``2**k`` float32 levels), ``B`` the budget
and ``F`` the bytes of what is not quantized: every other float parameter (norms, biases) as bf16, 2 bytes each,
and a checkpoint's non-float tensors as stored.

Weights come from a safetensors checkpoint (every 2-D float tensor named ``*.weight`` is a linear or embedding
weight, named by its module as transformers names it: ``model.layers.0.self_attn.q_proj``, ``lm_head``), or, for a
model of :data:`~edge_qlora.footprint.MODELS` whose weights cannot be downloaded here, are built locally: i.i.d.
normal with the standard deviation transformers initializes that model's linear and embedding weights with
(``initializer_range``). Such a plan follows tensor sizes, not learned structure. For a model the error is measured
on a sample of rows of each distinct shape and scaled by rows (quantizing 1.1 billion weights three times in numpy
takes minutes); a checkpoint's tensors are quantized whole unless ``sample_rows`` is given.
"""

import functools
import json
import math
import re
import sys
import time
import zlib
from dataclasses import dataclass
from decimal import Decimal, DecimalException

import numpy as np

from .cli_shared import blocksize as _blocksize_option
from .constants import BLOCKSIZES, CODE_BITS

__all__ = ["Matrix", "Source", "Plan", "parse_budget", "parse_bits", "model_source", "checkpoint_source",
           "measure_errors", "solve", "plan", "load_plan", "add_plan_parser", "run_plan", "add_footprint_options",
           "footprint_plan", "InfeasibleBudget", "DEFAULT_SAMPLE_ROWS"]

MB = 10 ** 6
DEFAULT_SAMPLE_ROWS = 64  # rows measured per distinct shape of a model's synthetic weights
REFERENCE_BITS = 4  # the error is reported against NF4 everywhere
TIME_LIMIT_S = 60.0
BITS_INCLUDE = ("packed codes, uint8 absmax per block, the nested float32 absmax per 256 blocks and the float32 "
                "offset (double quantization; float32 absmax per block without), and the 2^k-entry float32 table "
                "of every quantized matrix; norms and biases excluded")
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# safetensors dtype names: bytes per element
_ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                  "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def _input_error(message):
    from .formats import InputError
    return InputError(message)


# --- options ---------------------------------------------------------------------------------------------------------

def parse_budget(text):
    """Bytes from a size: ``300MB``, ``300M``, ``0.3GB``, ``300000000``, ``286MiB`` (MB = 10^6 bytes, MiB = 2^20;
    case and a space before the unit do not matter). A fraction of a byte is dropped. Raises ``ValueError``."""
    match = _SIZE.fullmatch(str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    value = None
    if unit:
        try:
            number = Decimal(match.group(1)) * unit
            value = int(number) if number.adjusted() < 19 else None  # no budget is an exabyte
        except DecimalException:
            value = None
    if value is None or value <= 0:
        raise ValueError(f"budget must be a positive size such as 300MB, 300M, 0.3GB or 300000000 (bytes; "
                         f"MB = 10^6 bytes), not {text!r}")
    return value


def parse_bits(text):
    """Code widths from ``"2,3,4"`` (any non-empty subset of 2, 3, 4), sorted. Raises ``ValueError``."""
    try:
        bits = sorted({int(part) for part in str(text).split(",")})
    except ValueError:
        bits = None
    if not bits or any(b not in CODE_BITS for b in bits):
        raise ValueError(f"bits must be code widths from {', '.join(map(str, CODE_BITS))} separated by commas "
                         f"(e.g. 2,3,4), not {text!r}")
    return tuple(bits)


def _check_options(budget, bits, blocksize, double_quant, sample_rows):
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive integer of bytes, not {budget!r}")
    if not bits or any(b not in CODE_BITS for b in bits) or len(set(bits)) != len(bits):
        raise ValueError(f"bits must be distinct code widths from {CODE_BITS}, not {bits!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, not {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, not {double_quant!r}")
    if sample_rows not in ("auto", None) and (isinstance(sample_rows, bool) or not isinstance(sample_rows, int)
                                              or sample_rows <= 0):
        raise ValueError(f"sample_rows must be a positive integer, None (all rows) or 'auto', not {sample_rows!r}")


# --- weight sources --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Matrix:
    """A weight matrix to quantize: its module's name (``model.layers.0.self_attn.q_proj``), shape and kind."""

    name: str
    shape: tuple  # (rows, cols) as stored: (out, in) for a linear layer, (vocab, hidden) for embeddings
    kind: str  # "linear", "embedding" or "lm_head"
    std: float = None  # synthetic weights: the normal distribution's standard deviation

    @property
    def numel(self):
        return self.shape[0] * self.shape[1]

    @property
    def layer(self):
        """The decoder layer the matrix belongs to, or None."""
        match = _LAYER.search(f".{self.name}.")
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Source:
    """Where the weights come from: a model of :data:`~edge_qlora.footprint.MODELS` (synthetic weights) or a
    safetensors checkpoint. ``other_bytes`` is what is stored unquantized: ``other_params`` float parameters in bf16
    and a checkpoint's non-float tensors as they are."""

    kind: str  # "model" or "checkpoint"
    name: str  # the model's key or the checkpoint's path
    matrices: tuple
    params: int  # every parameter (float elements of a checkpoint)
    other_params: int
    other_bytes: int

    @property
    def weights(self):
        """How the weights were obtained, in words."""
        if self.kind == "checkpoint":
            return f"the checkpoint's tensors ({self.name})"
        stds = sorted({m.std for m in self.matrices})
        return (f"synthetic: i.i.d. normal, std {', '.join(f'{s:g}' for s in stds)} (transformers' "
                f"initializer_range for this model), not the published learned weights, so the plan follows "
                f"tensor sizes, not learned structure")


@functools.lru_cache(maxsize=None)
def model_source(model):
    """The weight matrices of a model in :data:`~edge_qlora.footprint.MODELS`, from its meta-device instance: every
    ``nn.Linear`` and ``nn.Embedding`` weight (a tied lm_head once), with the std of transformers' initialization."""
    import torch
    from transformers import AutoModelForCausalLM

    from .footprint import MODELS, model_config

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    config = model_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    head = net.get_output_embeddings()
    seen, matrices = set(), []
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            kind = "lm_head" if module is head else "embedding" if isinstance(module, torch.nn.Embedding) else "linear"
            matrices.append(Matrix(name, tuple(module.weight.shape), kind, float(config.initializer_range)))
    params = sum(p.numel() for p in net.parameters())
    other = params - sum(m.numel for m in matrices)
    return Source("model", model, tuple(matrices), params, other, 2 * other)


def _open_checkpoint(path):
    import os

    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise _input_error(f"{path}: no such file")
    if os.path.isdir(path):
        raise _input_error(f"{path}: is a directory, not a safetensors file")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _input_error(f"{path}: not a readable safetensors file ({reason})") from None


def checkpoint_source(path):
    """The weight matrices of a safetensors checkpoint: each 2-D float tensor named ``NAME.weight`` is the weight of
    module ``NAME``. Other float tensors (norms, biases) count 2 bytes per element (bf16), non-float tensors as
    stored. Only the header is read. Raises :class:`~edge_qlora.formats.InputError`."""
    matrices, params, other_params, other_bytes = [], 0, 0, 0
    with _open_checkpoint(path) as f:
        names = list(f.keys())
        quantized = [n for n in names if n.endswith((".absmax", ".quant_map")) or ".quant_state." in n]
        if quantized:
            raise _input_error(f"{path}: already quantized (tensor '{quantized[0]}'); plan needs a checkpoint of "
                               "float weights")
        for name in names:
            tensor = f.get_slice(name)
            shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
            numel = math.prod(shape)
            if not (dtype.startswith("F") or dtype == "BF16"):
                other_bytes += numel * _ELEMENT_BYTES.get(dtype, 8)
                continue
            params += numel
            if len(shape) == 2 and name.endswith(".weight") and numel:
                module = name[: -len(".weight")]
                kind = ("lm_head" if module.split(".")[-1] == "lm_head"
                        else "embedding" if "embed" in module.split(".")[-1] or module.endswith(("wte", "wpe"))
                        else "linear")
                matrices.append(Matrix(module, shape, kind))
            else:
                other_params += numel
    if not matrices:
        raise _input_error(f"{path}: no 2-D float tensor named '*.weight' to quantize")
    return Source("checkpoint", path, tuple(matrices), params, other_params, other_bytes + 2 * other_params)


# --- the error of each width -----------------------------------------------------------------------------------------

def _squared_errors(weight, widths, blocksize, double_quant):
    """``({bits: ||W - dequant(quant_bits(W))||^2}, ||W||^2)`` of a float tensor, quantized by the golden model."""
    import torch

    from .golden import codebook

    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        weight = weight.float()
    exact = weight.double()
    errors = {}
    for bits in widths:
        q = codebook.quantize(weight, bits, blocksize=blocksize, double_quant=double_quant)
        diff = exact - codebook.dequantize(q, "fp32").double()
        errors[bits] = float(torch.sum(diff * diff))
    return errors, float(torch.sum(exact * exact))


@functools.lru_cache(maxsize=64)
def _synthetic(shape, std, rows, widths, blocksize, double_quant):
    """Errors of ``rows`` rows of an i.i.d. normal bf16 weight of ``shape`` (seeded by shape and std)."""
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape[0]}x{shape[1]}:{std!r}".encode()))
    weight = (torch.randn(rows, shape[1], generator=gen) * std).to(torch.bfloat16)
    return _squared_errors(weight, widths, blocksize, double_quant)


def _sample(rows, sample_rows, name):
    """The rows measured: all, or ``sample_rows`` of them chosen by a seed from the name, in order."""
    if sample_rows is None or sample_rows >= rows:
        return None
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return np.sort(rng.choice(rows, sample_rows, replace=False))


def measure_errors(source, widths, blocksize=64, double_quant=True, sample_rows="auto", progress=None):
    """The squared error of every matrix at every width in ``widths``, scaled from the rows measured to all rows.

    Returns ``(errors, signal, rows_measured)``: ``errors[name][bits]``, the weights' squared norm (scaled the same
    way), the rows quantized in all. A model's synthetic weights are measured once per distinct (shape, std);
    ``sample_rows="auto"`` is :data:`DEFAULT_SAMPLE_ROWS` for a model and every row for a checkpoint.
    ``progress(done, total)`` after each matrix or shape.
    """
    widths = tuple(sorted(widths))
    if sample_rows == "auto":
        sample_rows = DEFAULT_SAMPLE_ROWS if source.kind == "model" else None
    errors, signal, measured = {}, 0.0, 0
    if source.kind == "model":
        groups = {}
        for m in source.matrices:
            groups.setdefault((m.shape, m.std), []).append(m)
        for done, ((shape, std), members) in enumerate(groups.items(), 1):
            rows = shape[0] if sample_rows is None else min(sample_rows, shape[0])
            errs, energy = _synthetic(shape, std, rows, widths, blocksize, double_quant)
            scale = shape[0] / rows
            measured += rows
            for m in members:
                errors[m.name] = {b: e * scale for b, e in errs.items()}
                signal += energy * scale
            if progress:
                progress(done, len(groups))
        return errors, signal, measured
    import torch

    with _open_checkpoint(source.name) as f:
        for done, m in enumerate(source.matrices, 1):
            rows = _sample(m.shape[0], sample_rows, m.name)
            key = f"{m.name}.weight"
            if rows is None:
                weight = f.get_tensor(key)
            else:
                part = f.get_slice(key)
                weight = torch.cat([part[int(r):int(r) + 1] for r in rows])
            try:
                errs, energy = _squared_errors(weight, widths, blocksize, double_quant)
            except ValueError as error:
                raise _input_error(f"{source.name}: tensor '{key}': {error}") from None
            scale = 1.0 if rows is None else m.shape[0] / len(rows)
            measured += m.shape[0] if rows is None else len(rows)
            errors[m.name] = {b: e * scale for b, e in errs.items()}
            signal += energy * scale
            if progress:
                progress(done, len(source.matrices))
    return errors, signal, measured


# --- the mixed-integer program ---------------------------------------------------------------------------------------

class InfeasibleBudget(ValueError):
    """Even the smallest width of every matrix exceeds the capacity; ``minimum`` is the bytes that takes."""

    def __init__(self, minimum, capacity):
        super().__init__(f"capacity {capacity} is below the smallest choice, {minimum} bytes")
        self.minimum, self.capacity = minimum, capacity


def solve(errors, sizes, capacity, time_limit=TIME_LIMIT_S):
    """Choose one column of each row of ``errors`` (shape [M, K]) minimizing their sum while the chosen ``sizes``
    (integers, [M, K]) sum to at most ``capacity``, by ``scipy.optimize.milp`` on binaries ``x[m, k]``.

    Returns ``(choice, info)``: the chosen column of each row and the solver's status, message, gap and time.
    Raises :class:`InfeasibleBudget` when no choice fits, ``RuntimeError`` when the solver finds none in time.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    errors = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if errors.ndim != 2 or errors.shape != sizes.shape or errors.size == 0:
        raise ValueError(f"errors and sizes must be [M, K] arrays of the same shape, not {errors.shape} and "
                         f"{sizes.shape}")
    rows, cols = errors.shape
    base = sizes.min(axis=1)
    minimum = int(base.sum())
    if minimum > capacity:
        raise InfeasibleBudget(minimum, capacity)
    # upgrade bytes above each row's smallest choice: small coefficients, and the row's budget starts at zero
    extra = (sizes - base[:, None]).astype(np.float64).ravel()
    scale = float(np.abs(errors).max()) or 1.0
    cost = errors.ravel() / scale
    one_each = LinearConstraint(sparse.kron(sparse.eye_array(rows), np.ones((1, cols))), 1, 1)
    spare = capacity - minimum
    start = time.perf_counter()
    for _ in range(8):
        budget = LinearConstraint(extra[None, :], -np.inf, spare)
        result = milp(cost, integrality=np.ones_like(cost), bounds=Bounds(0, 1), constraints=[one_each, budget],
                      options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        if result.x is None:
            raise RuntimeError(f"scipy.optimize.milp found no assignment: {result.message} (status {result.status})")
        choice = result.x.reshape(rows, cols).argmax(axis=1)
        over = int(sizes[np.arange(rows), choice].sum()) - capacity
        if over <= 0:
            break
        spare -= over  # a binary within the solver's tolerance of 0 or 1 may have let a few bytes through
    else:
        raise RuntimeError("scipy.optimize.milp: the rounded assignment stays over the budget")
    info = {"solver": "scipy.optimize.milp (HiGHS)", "status": int(result.status), "message": result.message,
            "variables": int(cost.size), "mip_gap": float(getattr(result, "mip_gap", 0.0) or 0.0),
            "time_s": time.perf_counter() - start}
    return choice, info


# --- the plan --------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A code width for every matrix of ``source`` and what it costs. ``errors`` (``name -> {bits: error}``) is None
    for a plan loaded from a file, whose error figures are kept as read in ``summary``."""

    source: Source
    bits: tuple
    blocksize: int
    double_quant: bool
    budget: int
    assignment: dict  # name -> bits
    errors: dict = None
    signal: float = None
    rows_measured: int = None
    sample_rows: object = None
    solver: dict = None
    time_s: dict = None
    summary: dict = None

    def size(self, matrix, bits=None):
        from .golden.codebook import stored_bytes
        bits = self.assignment[matrix.name] if bits is None else bits
        return stored_bytes(matrix.numel, bits, self.blocksize, self.double_quant)

    def module_bytes(self):
        """Bytes of every quantized matrix under the plan."""
        return {m.name: self.size(m) for m in self.source.matrices}

    @property
    def quantized_bytes(self):
        return sum(self.module_bytes().values())

    @property
    def total_bytes(self):
        return self.quantized_bytes + self.source.other_bytes

    @property
    def quantized_weights(self):
        return sum(m.numel for m in self.source.matrices)

    @property
    def bits_per_weight(self):
        return 8 * self.quantized_bytes / self.quantized_weights

    def widths(self):
        """``{bits: {"matrices", "weights", "bytes"}}`` for each allowed width (and any other the plan uses)."""
        sizes = self.module_bytes()
        out = {b: {"matrices": 0, "weights": 0, "bytes": 0} for b in sorted(set(self.bits)
                                                                            | set(self.assignment.values()))}
        for m in self.source.matrices:
            row = out[self.assignment[m.name]]
            row["matrices"] += 1
            row["weights"] += m.numel
            row["bytes"] += sizes[m.name]
        return out

    def _uniform_bytes(self, bits):
        return sum(self.size(m, bits) for m in self.source.matrices) + self.source.other_bytes

    def error_figures(self):
        """The error total, NF4 everywhere's, their ratio, and both relative to the weights' squared norm."""
        if self.errors is None:
            return {k: (self.summary or {}).get(k) for k in ("error_total", "error_all_nf4", "error_vs_all_nf4",
                                                             "relative_error", "relative_error_all_nf4")}
        total = sum(self.errors[name][bits] for name, bits in self.assignment.items())
        nf4 = sum(e[REFERENCE_BITS] for e in self.errors.values())
        return {"error_total": total, "error_all_nf4": nf4, "error_vs_all_nf4": total / nf4 if nf4 else None,
                "relative_error": total / self.signal if self.signal else None,
                "relative_error_all_nf4": nf4 / self.signal if self.signal else None}

    def to_dict(self):
        src = self.source
        widths = self.widths()
        return {
            "model": src.name if src.kind == "model" else None,
            "checkpoint": src.name if src.kind == "checkpoint" else None,
            "weights": src.weights,
            "budget_bytes": self.budget, "total_bytes": self.total_bytes,
            "under_budget_bytes": self.budget - self.total_bytes,
            "quantized_bytes": self.quantized_bytes, "unquantized_bytes": src.other_bytes,
            "bits_per_weight": self.bits_per_weight, "bits_per_weight_includes": BITS_INCLUDE,
            "bits_per_parameter": 8 * self.total_bytes / src.params if src.params else None,
            "params": src.params, "quantized_weights": self.quantized_weights,
            "unquantized_params": src.other_params, "matrices": len(src.matrices),
            "bits_allowed": list(self.bits), "codebooks": [f"nf{b}" for b in self.bits],
            "blocksize": self.blocksize, "double_quant": self.double_quant,
            "minimum_bytes": self._uniform_bytes(min(self.bits)), "all_nf4_bytes": self._uniform_bytes(4),
            "widths": {str(b): row for b, row in widths.items()},
            "counts": {str(b): row["matrices"] for b, row in widths.items()},
            **self.error_figures(),
            "error_measured_on": {"sample_rows": self.sample_rows, "rows_measured": self.rows_measured,
                                  "rows_total": sum(m.shape[0] for m in src.matrices),
                                  "note": self._measured_note()},
            "solver": self.solver, "time_s": self.time_s,
            "assignment": dict(self.assignment),
        }

    def _measured_note(self):
        if self.errors is None:
            return (self.summary or {}).get("error_measured_on", {}).get("note")
        what = ("||W - dequant(quant(W))||_F^2 with the golden NF code-book quantizer, dequantized to float32")
        if self.sample_rows is None:
            return f"{what}, every row of every tensor"
        per = "each distinct shape" if self.source.kind == "model" else "each tensor"
        return f"{what}, on {self.sample_rows} rows (or all, if fewer) of {per}, scaled by rows"

    def format_table(self):
        src, d = self.source, self.to_dict()
        title = (f"{src.name}" if src.kind == "model" else f"checkpoint {src.name}")
        lines = [f"{title}: {len(src.matrices)} weight matrices (embeddings and lm_head included), budget "
                 f"{self.budget / MB:,.1f} MB; NF tables, blocksize {self.blocksize}, "
                 f"{'double quantization' if self.double_quant else 'float32 absmax'} (MB = 10^6 bytes)", "",
                 "| code width | matrices | weights | MB | bits/weight |", "|---|---:|---:|---:|---:|"]
        for bits, row in self.widths().items():
            bpw = f"{8 * row['bytes'] / row['weights']:.3f}" if row["weights"] else ""
            lines.append(f"| NF{bits} | {row['matrices']} | {row['weights']:,} | {row['bytes'] / MB:,.1f} | {bpw} |")
        lines += [f"| norms, biases, other (bf16) | | {src.other_params:,} | {src.other_bytes / MB:,.1f} | |",
                  f"| **total** | {len(src.matrices)} | {src.params:,} | **{self.total_bytes / MB:,.1f}** | "
                  f"{8 * self.total_bytes / src.params:.3f} |", ""]
        lines.append(f"- total: {self.total_bytes:,} bytes against the budget of {self.budget:,}, "
                     f"{self.budget - self.total_bytes:,} under; every matrix at NF{min(self.bits)}: "
                     f"{d['minimum_bytes'] / MB:,.1f} MB, NF4 everywhere: {d['all_nf4_bytes'] / MB:,.1f} MB.")
        lines.append(f"- bits per weight: {self.bits_per_weight:.3f} over the {self.quantized_weights:,} quantized "
                     f"weights (packed codes, absmax, nested absmax, offset and table; norms excluded); "
                     f"{d['bits_per_parameter']:.3f} per parameter with the norms.")
        if d["error_total"] is not None:
            ratio = d["error_vs_all_nf4"]
            rel = d["relative_error"]
            lines.append(f"- quantization error (sum over matrices of ||W - dequant(quant(W))||_F^2): "
                         f"{d['error_total']:.4g}, {ratio:.2f}x that of NF4 everywhere ({d['error_all_nf4']:.4g})"
                         + (f"; {100 * rel:.2f}% of the weights' squared norm (NF4 everywhere: "
                            f"{100 * d['relative_error_all_nf4']:.2f}%)" if rel is not None else "") + ".")
        note = d["error_measured_on"]["note"]
        if note:
            lines.append(f"- error measured as {note}.")
        lines.append(f"- weights: {src.weights}.")
        if self.solver:
            s = self.solver
            lines.append(f"- solver: {s['solver']}, {s['variables']} binary variables: {s['message']} "
                         f"(gap {100 * s['mip_gap']:.4f}%, {s['time_s']:.2f} s).")
        return "\n".join(lines)


def plan(budget, model="tinyllama-1.1b", checkpoint=None, bits=CODE_BITS, blocksize=64, double_quant=True,
         sample_rows="auto", progress=None, time_limit=TIME_LIMIT_S):
    """Plan the code width of every weight matrix of ``model`` (synthetic weights) or of a safetensors
    ``checkpoint`` under ``budget`` bytes, minimizing the total squared quantization error (see the module's text).

    ``sample_rows``: rows measured per distinct shape (model) or per tensor (checkpoint); ``None`` for all,
    ``"auto"`` for :data:`DEFAULT_SAMPLE_ROWS` (model) or all (checkpoint). ``progress(done, total)`` as errors are
    measured. Raises :class:`~edge_qlora.formats.InputError` for a budget below every matrix at the smallest width
    or an unusable checkpoint, ``ValueError`` for bad arguments.
    """
    bits = tuple(sorted(bits))
    _check_options(budget, bits, blocksize, double_quant, sample_rows)
    source = checkpoint_source(checkpoint) if checkpoint is not None else model_source(model)
    from .golden.codebook import stored_bytes

    sizes = np.array([[stored_bytes(m.numel, b, blocksize, double_quant) for b in bits] for m in source.matrices],
                     dtype=np.int64)
    capacity = budget - source.other_bytes
    minimum = int(sizes.min(axis=1).sum()) + source.other_bytes
    if minimum > budget:  # before the minutes of measuring
        raise _input_error(f"budget {budget:,} bytes ({budget / MB:,.1f} MB) is too small: every matrix at "
                           f"NF{bits[0]} with the norms takes {minimum:,} bytes ({minimum / MB:,.1f} MB)")
    start = time.perf_counter()
    errors, signal, measured = measure_errors(source, sorted(set(bits) | {REFERENCE_BITS}), blocksize,
                                              double_quant, sample_rows, progress)
    measure_s = time.perf_counter() - start
    table = np.array([[errors[m.name][b] for b in bits] for m in source.matrices])
    choice, info = solve(table, sizes, capacity, time_limit)
    assignment = {m.name: bits[k] for m, k in zip(source.matrices, choice)}
    if sample_rows == "auto":
        sample_rows = DEFAULT_SAMPLE_ROWS if source.kind == "model" else None
    return Plan(source, bits, blocksize, double_quant, budget, assignment, errors, signal, measured, sample_rows,
                info, {"measure": measure_s, "solve": info["time_s"]})


def load_plan(path, model):
    """A plan saved by ``edge-qlora plan --out`` for ``model``, checked against the model's matrices; its bytes are
    counted again from the assignment. Raises :class:`~edge_qlora.formats.InputError`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as error:
        raise _input_error(f"{path}: cannot read ({error.strerror or error})") from None
    except ValueError as error:
        raise _input_error(f"{path}: not a JSON plan ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("assignment"), dict):
        raise _input_error(f"{path}: not a plan of 'edge-qlora plan' (no 'assignment' object)")
    if data.get("model") != model:
        made = data.get("model") or f"checkpoint {data.get('checkpoint')}"
        raise _input_error(f"{path}: the plan is for {made}, not {model}")
    source = model_source(model)
    names = {m.name for m in source.matrices}
    assignment = data["assignment"]
    missing, extra = sorted(names - set(assignment)), sorted(set(assignment) - names)
    if missing or extra:
        what = f"has no width for {missing[0]}" if missing else f"names {extra[0]}, not a matrix of {model}"
        raise _input_error(f"{path}: the plan {what}")
    bad = [name for name, b in assignment.items() if isinstance(b, bool) or b not in CODE_BITS]
    if bad:
        raise _input_error(f"{path}: {bad[0]}: code width {assignment[bad[0]]!r} is not one of {CODE_BITS}")
    blocksize, double_quant = data.get("blocksize", 64), data.get("double_quant", True)
    budget = data.get("budget_bytes")
    if blocksize not in BLOCKSIZES or not isinstance(double_quant, bool) or isinstance(budget, bool) \
            or not isinstance(budget, int) or budget <= 0:
        raise _input_error(f"{path}: blocksize, double_quant or budget_bytes missing or invalid")
    bits = tuple(sorted(set(data.get("bits_allowed") or ()) & set(CODE_BITS) or set(assignment.values())))
    return Plan(source, bits, blocksize, double_quant, budget, {m.name: assignment[m.name] for m in source.matrices},
                sample_rows=(data.get("error_measured_on") or {}).get("sample_rows"), solver=data.get("solver"),
                summary=data)


# --- command line ----------------------------------------------------------------------------------------------------

def _argtype(parse):
    import argparse

    def wrapped(text):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    wrapped.__name__ = parse.__name__
    return wrapped


def _sample_rows(text):
    if text in ("auto", "all"):
        return {"auto": "auto", "all": None}[text]
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"sample rows must be a positive integer, 'all' or 'auto', not {text!r}")
    return value


def add_plan_parser(command):
    """Add ``edge-qlora plan`` with ``command(name, **kwargs)``, the CLI's sub-parser factory."""
    import argparse

    from .footprint import MODELS

    parser = command(
        "plan", help="a code width (NF2/NF3/NF4) per weight matrix under a byte budget, by integer programming",
        description="Assign a code width (2, 3 or 4 bits, NormalFloat tables) to every weight matrix of a model, "
                    "embeddings and lm_head included, minimizing the total squared quantization error (each "
                    "matrix quantized and dequantized by the golden code-book model) while the stored bytes (codes, "
                    "absmax, nested absmax, tables, and the norms in bf16) stay within --budget. Solved as a "
                    "mixed-integer program by scipy.optimize.milp (HiGHS). --model builds synthetic weights (i.i.d. "
                    "normal, transformers' initialization std; TinyLlama's weights cannot be downloaded here), so "
                    "its plan follows tensor sizes, not learned structure; --checkpoint plans a safetensors file's "
                    "own tensors. See docs/plan.md.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=tuple(MODELS), default="tinyllama-1.1b",
                        help="a model by its published configuration, with synthetic weights")
    source.add_argument("--checkpoint", metavar="FILE.safetensors", default=None,
                        help="plan a checkpoint's tensors: every 2-D float '*.weight' tensor is a matrix, named by "
                             "its module (model.layers.0.self_attn.q_proj, lm_head); other tensors kept as bf16 "
                             "(default: none; --model is used)")
    parser.add_argument("--budget", type=_argtype(parse_budget), required=True, metavar="SIZE",
                        help="bytes the stored model may take: 300MB, 300M, 0.3GB or 300000000 (MB = 10^6 bytes; "
                             "required)")
    parser.add_argument("--bits", type=_argtype(parse_bits), default=CODE_BITS, metavar="2,3,4",
                        help="code widths allowed, separated by commas (default: 2,3,4)")
    parser.add_argument("--blocksize", type=_blocksize_option, default=64, help="weights per absmax block")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="quantize the absmax to 8 bits as bitsandbytes does (default: on)")
    parser.add_argument("--sample-rows", type=_argtype(_sample_rows), default="auto", metavar="N",
                        help="rows quantized to measure each tensor's error, scaled by rows; 'all' for every row "
                             f"(default: {DEFAULT_SAMPLE_ROWS} per distinct shape for --model, all for --checkpoint)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", metavar="FILE.json", default=None,
                        help="also save the plan as JSON there, for 'edge-qlora footprint --plan' (default: none)")
    return parser


def _with_progress(args, desc, unit, run):
    from .cli_shared import progress_bar

    bar, update = progress_bar(args, None, desc, unit=unit)

    def progress(done, total):
        bar.total = total
        update(done)

    with bar:
        return run(progress)


def run_plan(args):
    """The handler of ``edge-qlora plan``."""
    from .outputs import atomic_output, check_output

    if args.out:
        check_output(args.out, "--out")
    unit = "shape" if args.checkpoint is None else "tensor"
    result = _with_progress(args, "measuring quantization errors", unit, lambda progress: plan(
        args.budget, model=args.model, checkpoint=args.checkpoint, bits=args.bits, blocksize=args.blocksize,
        double_quant=args.double_quant, sample_rows=args.sample_rows, progress=progress))
    data = result.to_dict()
    print(json.dumps(data) if args.json else result.format_table())
    if args.out:
        with atomic_output(args.out, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        print(f"written: {args.out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_footprint_options(parser):
    """``--budget SIZE`` and ``--plan FILE.json`` of ``edge-qlora footprint``: show the model as stored under a
    plan as well."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--budget", type=_argtype(parse_budget), default=None, metavar="SIZE",
                       help="also show the model stored under a plan for this budget (300MB, 0.3GB, ...), made "
                            "by the planner with its defaults: NF2/NF3/NF4, blocksize 64, double quantization, "
                            "synthetic weights (see 'edge-qlora plan') (default: none)")
    group.add_argument("--plan", metavar="FILE.json", default=None,
                       help="also show the model stored under a plan saved by 'edge-qlora plan --out' "
                            "(default: none)")


def footprint_plan(args):
    """The plan ``edge-qlora footprint`` shows (``--plan`` or ``--budget``), or None."""
    if getattr(args, "plan", None):
        return load_plan(args.plan, args.model)
    if getattr(args, "budget", None):
        return _with_progress(args, "planning code widths", "shape", lambda progress: plan(
            args.budget, model=args.model, progress=progress))
    return None
