#!/usr/bin/env python3
"""What storing weights in 2, 3 and 4 bits costs in accuracy, measured on a small Llama trained here.

    python scripts/sub4bit_accuracy.py --corpus build/corpus --plot docs/sub4bit_loss.png   # docs/sub4bit.md
    python scripts/sub4bit_accuracy.py --tiny                                                # CI (seconds)

1. A byte-level BPE tokenizer (``tokenizers``) and a small ``LlamaForCausalLM`` are trained on text A; the model is
   saved as safetensors (``OUT/model``).
2. Perplexity on held-out text A with every weight matrix (the decoder's linear layers, the embeddings and lm_head)
   stored in full precision, bf16, NF4, NF3, NF2 (golden code-book quantizer, blocksize 64, double quantization,
   dequantized to bf16 as the engine multiplies by them), the same widths with embeddings and lm_head kept in bf16,
   and the planner's mix (``edge_qlora.plan`` on this checkpoint) at the bits per weight of TinyLlama's 300 MB plan.
3. A short QLoRA fine-tune on text B, every decoder linear layer a :class:`~edge_qlora.qlora.QLoRALinear` (the
   golden backend: the GEMM engine's arithmetic, bit-accurate), from PEFT's default initialization (A Kaiming, B
   zero) and from LoftQ's (:func:`~edge_qlora.loftq.loftq_init`), for NF4 and the planner's mix (NF2 where no plan
   is given); a full-precision PEFT LoRA run on the same batches is the reference. Loss curves to ``--plot``.

The corpus (``--corpus DIR``) is either a folder with ``a.txt`` and ``b.txt`` (plain text, one paragraph a line)
or the two Debian documentation packages extracted (see ``FETCH``): text A is The Debian Administrator's Handbook
(package ``debian-handbook``, GPL-2+ or CC-BY-SA-3.0), text B the Debian Developer's Reference (package
``developers-reference``, GPL-2+). ``--tiny`` runs on ``tests/data/sub4bit`` (written for this project) with a tiny
model. Results go to ``OUT/results.json`` and ``OUT/results.md`` and are printed.
"""

import argparse
import copy
import hashlib
import html.parser
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

# PEFT calls transformers' is_gradient_checkpointing, deprecated in transformers 5
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ROOT = Path(__file__).resolve().parent.parent
TINY_CORPUS = ROOT / "tests" / "data" / "sub4bit"
HANDBOOK = "debian-handbook/usr/share/doc/debian-handbook/html/en-US"
DEVREF = "developers-reference/usr/share/developers-reference"
FETCH = ("mkdir -p build/corpus && cd build/corpus && apt-get download debian-handbook=11.20220922 "
         "developers-reference=12.18 && for f in *.deb; do dpkg-deb -x \"$f\" \"${f%%_*}\"; done")
SOURCES = {
    "handbook": {"title": "The Debian Administrator's Handbook (en-US), Raphael Hertzog and Roland Mas",
                 "package": "debian-handbook 11.20220922", "licence": "GPL-2.0+ or CC-BY-SA-3.0"},
    "devref": {"title": "Debian Developer's Reference", "package": "developers-reference 12.18",
               "licence": "GPL-2.0+"},
    "tiny": {"title": "tests/data/sub4bit (short texts written for this project)", "package": None,
             "licence": "BSD-2-Clause (the project's)"},
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKSIZE = 64
TINYLLAMA_BUDGET = "300MB"


class InputError(Exception):
    """A problem with the user's input, reported in one line."""


@dataclass(frozen=True)
class Settings:
    vocab: int = 2048
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    seq: int = 128
    batch: int = 8
    pretrain_steps: int = 400
    lr: float = 2e-3
    ft_steps: int = 40
    ft_batch: int = 2
    ft_lr: float = 2e-3
    rank: int = 16
    alpha: int = 16
    loftq_iters: int = 5
    engine_eval_tokens: int = 516   # held-out B tokens also evaluated on the engine's arithmetic (4 windows)
    eval_every: int = 5             # fine-tune steps between held-out evaluations
    array: int = 8       # the GEMM engine is array x array
    seed: int = 0


FULL = Settings()
TINY = Settings(vocab=300, hidden=64, layers=2, heads=2, intermediate=128, seq=32, batch=8, pretrain_steps=40,
                lr=3e-3, ft_steps=3, ft_batch=2, ft_lr=2e-3, rank=4, alpha=4, loftq_iters=2, engine_eval_tokens=66,
                eval_every=2, array=4)


# --- corpus ----------------------------------------------------------------------------------------------------------

class _Paragraphs(html.parser.HTMLParser):
    """Text of the prose paragraphs of a DocBook (``div.para``) or Sphinx (``p``) HTML page, one string each."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self._parts, self._tag, self._depth, self._skip = [], None, None, 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        if self._parts is None:
            classes = (dict(attrs).get("class") or "").split()
            if (tag == "div" and "para" in classes) or tag == "p":
                self._parts, self._tag, self._depth = [], tag, 1
        elif tag == self._tag:
            self._depth += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        if self._parts is not None and tag == self._tag:
            self._depth -= 1
            if self._depth == 0:
                text = " ".join("".join(self._parts).split())
                if len(text) >= 40:
                    self.paragraphs.append(text)
                self._parts = None

    def handle_data(self, data):
        if self._parts is not None and not self._skip:
            self._parts.append(data)


def html_paragraphs(files):
    out = []
    for path in files:
        parser = _Paragraphs()
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        out += parser.paragraphs
    return out


def load_corpus(root):
    """``{"a": (source key, paragraphs), "b": ...}`` from ``a.txt``/``b.txt`` or the extracted Debian packages."""
    root = Path(root)
    if (root / "a.txt").is_file() and (root / "b.txt").is_file():
        key = "tiny" if root.resolve() == TINY_CORPUS.resolve() else "plain"
        texts = {}
        for part in ("a", "b"):
            lines = [" ".join(line.split()) for line in (root / f"{part}.txt").read_text(encoding="utf-8")
                     .splitlines()]
            texts[part] = (key, [line for line in lines if line])
        return texts
    handbook, devref = root / HANDBOOK, root / DEVREF
    if not (handbook.is_dir() and devref.is_dir()):
        raise InputError(f"{root}: no corpus there (a.txt and b.txt, or the extracted packages debian-handbook "
                         f"and developers-reference); get it with: {FETCH}")
    skip = {"developers-reference.html", "index.html", "search.html", "genindex.html"}
    texts = {"a": ("handbook", html_paragraphs(sorted(handbook.glob("*.html")))),
             "b": ("devref", html_paragraphs(sorted(p for p in devref.glob("*.html") if p.name not in skip)))}
    for part, (_, paragraphs) in texts.items():
        if len(paragraphs) < 10:
            raise InputError(f"{root}: text {part.upper()} has only {len(paragraphs)} paragraphs; extract the "
                             f"packages again with: {FETCH}")
    return texts


def split_heldout(paragraphs, every=10):
    """``(train, heldout)``: the paragraphs in about 100 runs of consecutive ones, every ``every``-th run held
    out (spread over the whole document, not its last pages)."""
    run = max(1, len(paragraphs) // 100)
    train, heldout = [], []
    for i in range(0, len(paragraphs), run):
        (heldout if (i // run) % every == every - 1 else train).extend(paragraphs[i:i + run])
    return train, heldout


def join(paragraphs):
    return "\n".join(paragraphs) + "\n"


# --- tokenizer and model ---------------------------------------------------------------------------------------------

def train_tokenizer(paragraphs, vocab):
    """A byte-level BPE (GPT-2's pre-tokenizer, the 256 bytes as the initial alphabet, no special tokens) trained on
    ``paragraphs``: every text is encodable, merges are learned from text A's training part only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator([join(paragraphs)], trainer)
    return tok


def encode(tok, paragraphs):
    return np.array(tok.encode(join(paragraphs)).ids, dtype=np.int64)


def model_config(s, vocab):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                       max_position_embeddings=s.seq, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def lm_loss(model, ids):
    """Mean next-token cross entropy of ``ids`` [batch, seq + 1] (nats)."""
    logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, tokens, seq, max_tokens=None, batch=16):
    """Mean next-token loss over non-overlapping windows of ``seq + 1`` tokens (each window its own context)."""
    model.eval()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    windows = torch.from_numpy(tokens[: len(tokens) // (seq + 1) * (seq + 1)].reshape(-1, seq + 1))
    if not len(windows):
        raise InputError(f"held-out text shorter than one window of {seq + 1} tokens")
    total = 0.0
    for i in range(0, len(windows), batch):
        part = windows[i:i + batch]
        total += lm_loss(model, part).item() * part.shape[0] * seq
    return total / (len(windows) * seq)


def batches(rng, tokens, steps, batch, seq):
    """Start offsets of ``steps`` random batches of windows of ``seq + 1`` tokens."""
    if len(tokens) < seq + 2:
        raise InputError(f"training text shorter than one window of {seq + 1} tokens")
    return rng.integers(0, len(tokens) - seq - 1, size=(steps, batch))


def window_batch(tokens, starts, seq):
    return torch.from_numpy(np.stack([tokens[s:s + seq + 1] for s in starts]))


def pretrain(s, vocab, tokens, progress):
    from transformers import LlamaForCausalLM

    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(model_config(s, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, s.pretrain_steps // 20)

    def lr_at(step):  # linear warm-up, then cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, s.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    starts = batches(np.random.default_rng(s.seed), tokens, s.pretrain_steps, s.batch, s.seq)
    losses = []
    model.train()
    for step in progress(range(s.pretrain_steps), "pretraining on text A", "step"):
        loss = lm_loss(model, window_batch(tokens, starts[step], s.seq))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model, losses


# --- quantization ----------------------------------------------------------------------------------------------------

def matrices(model):
    """Every weight matrix by module name as transformers names it: ``model.embed_tokens``,
    ``model.layers.0.self_attn.q_proj``, ..., ``lm_head``."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}


def is_projection(name):
    return name.rsplit(".", 1)[-1] in PROJECTIONS


def uniform(model, bits, linear_only=False):
    """``bits`` for every matrix (``linear_only``: the decoder's projections; embeddings and lm_head in bf16)."""
    return {name: (bits if is_projection(name) or not linear_only else 16) for name in matrices(model)}


def stored_bits(numel, bits):
    from edge_qlora.golden.codebook import stored_bytes

    return 8 * stored_bytes(numel, bits, BLOCKSIZE, True) if bits in (2, 3, 4) else numel * bits


def quantized_copy(model, assignment):
    """A copy of ``model`` whose matrices hold what the engine multiplies by: 2/3/4 -> the NF code book quantized
    and dequantized to bf16, 16 -> rounded to bf16, 32 -> as trained. Returns ``(model, bits per weight)``."""
    from edge_qlora.golden.codebook import dequantize, quantize

    out = copy.deepcopy(model)
    total_bits = total = 0
    for name, module in matrices(out).items():
        bits = assignment[name]
        w = module.weight.data
        if bits in (2, 3, 4):
            w = dequantize(quantize(w, bits, blocksize=BLOCKSIZE, double_quant=True), "bf16").float()
        elif bits == 16:
            w = w.to(torch.bfloat16).float()
        elif bits != 32:
            raise ValueError(f"{name}: width {bits} is not 2, 3, 4, 16 or 32")
        module.weight.data = w
        total_bits += stored_bits(w.numel(), bits)
        total += w.numel()
    return out, total_bits / total


def read_assignment(path, model):
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    except ValueError as error:
        raise InputError(f"{path}: not JSON ({str(error).splitlines()[0]})") from None
    assignment = data.get("assignment", data) if isinstance(data, dict) else None
    names = set(matrices(model))
    if not isinstance(assignment, dict) or set(assignment) != names \
            or any(b not in (2, 3, 4) or isinstance(b, bool) for b in assignment.values()):
        raise InputError(f"{path}: needs a map of every matrix of the model ({len(names)}: {sorted(names)[0]}, ...) "
                         f"to a code width 2, 3 or 4, alone or as 'assignment' of a plan")
    return {name: int(assignment[name]) for name in matrices(model)}, {"source": str(path)}


def planned_assignment(checkpoint, target_bpw):
    """The planner's widths for this checkpoint at the bits per weight of TinyLlama's 300 MB plan (or
    ``target_bpw``): the budget is the checkpoint's unquantized bytes plus ``target_bpw`` bits per matrix weight."""
    from edge_qlora import plan as planner

    info = {}
    if target_bpw is None:
        reference = planner.plan(planner.parse_budget(TINYLLAMA_BUDGET), model="tinyllama-1.1b")
        target_bpw = reference.bits_per_weight
        info["reference"] = {"model": "tinyllama-1.1b", "budget": TINYLLAMA_BUDGET,
                             "total_bytes": reference.total_bytes, "bits_per_weight": reference.bits_per_weight,
                             "counts": reference.to_dict()["counts"]}
    source = planner.checkpoint_source(str(checkpoint))
    weights = sum(m.numel for m in source.matrices)
    budget = source.other_bytes + int(target_bpw * weights / 8)
    result = planner.plan(budget, checkpoint=str(checkpoint))
    d = result.to_dict()
    info.update({"source": "edge_qlora.plan", "target_bits_per_weight": target_bpw, "budget_bytes": budget,
                 "bits_per_weight": result.bits_per_weight, "counts": d["counts"],
                 "error_vs_all_nf4": d.get("error_vs_all_nf4")})
    return dict(result.assignment), info


# --- fine-tune -------------------------------------------------------------------------------------------------------

def qlora_model(base, assignment, init, s):
    """``base`` with every decoder projection a golden-backend :class:`QLoRALinear` at its width and the other
    matrices (embeddings, lm_head) frozen at theirs; LoRA factors from PEFT's default or LoftQ's initialization."""
    from edge_qlora.golden.codebook import quantize
    from edge_qlora.loftq import loftq_init
    from edge_qlora.qlora import QLoRALinear

    scaling = s.alpha / s.rank
    rest = {name: (bits if not is_projection(name) else 32) for name, bits in assignment.items()}
    model, _ = quantized_copy(base, rest)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(s.seed)
    errors = []
    for name, module in list(matrices(model).items()):
        if not is_projection(name):
            continue
        w, bits = module.weight.data, assignment[name]
        if init == "loftq":
            r = loftq_init(w, bits, rank=s.rank, iters=s.loftq_iters, blocksize=BLOCKSIZE, double_quant=True,
                           scaling=scaling)
            layer = QLoRALinear(r.quantized, s.rank, scaling, rows=s.array, cols=s.array, lora_a=r.lora_A,
                                lora_b=r.lora_B)
            errors.append((r.quant_error, r.errors[-1]))
        else:
            layer = QLoRALinear(quantize(w, bits, blocksize=BLOCKSIZE, double_quant=True), s.rank, scaling,
                                rows=s.array, cols=s.array)
        model.set_submodule(name, layer)
    return model, errors


def peft_model(base, s):
    """The full-precision reference: PEFT LoRA on the same projections, float32 torch arithmetic."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(s.seed)
    config = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(PROJECTIONS), lora_dropout=0.0,
                        bias="none")
    return get_peft_model(copy.deepcopy(base), config)


def merged_copy(model):
    """A float32 copy of a QLoRA model, each :class:`QLoRALinear` an ``nn.Linear`` holding its bf16 dequantized
    weight plus ``scaling * B @ A``: the model the factors describe, evaluated with float32 torch arithmetic."""
    from edge_qlora.qlora import QLoRALinear

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = (module.weight_bf16.float()
                                  + module.scaling * module.lora_B.detach() @ module.lora_A.detach())
            merged[name] = linear
    if not merged:
        return model
    out = copy.deepcopy(model)
    for name, linear in merged.items():
        out.set_submodule(name, linear)
    return out


def heldout_loss(model, tokens, seq):
    return eval_loss(merged_copy(model), tokens, seq)


def finetune(model, s, train_tokens, starts, heldout, progress, label):
    """Train the LoRA factors on ``starts``' batches. Held-out loss of the merged model (float32) on all of
    ``heldout`` before, every ``eval_every`` steps and after; after, also on its first ``engine_eval_tokens`` with
    the model itself (for QLoRALinear, the engine's arithmetic) against the merged model on the same tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.ft_lr, weight_decay=0.0)
    before = heldout_loss(model, heldout, s.seq)
    curve = [(0, before)]
    losses = []
    train_s = 0.0
    for step in progress(range(s.ft_steps), label, "step"):
        start = time.perf_counter()
        model.train()
        loss = lm_loss(model, window_batch(train_tokens, starts[step], s.seq))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        train_s += time.perf_counter() - start
        if (step + 1) % s.eval_every == 0 or step + 1 == s.ft_steps:
            curve.append((step + 1, heldout_loss(model, heldout, s.seq)))
    after = curve[-1][1]
    engine = eval_loss(model, heldout, s.seq, s.engine_eval_tokens)
    engine_float = heldout_loss(model, heldout[:s.engine_eval_tokens], s.seq)
    return {"heldout_loss_before": before, "heldout_loss_after": after, "heldout_ppl_after": math.exp(after),
            "engine_check": {"tokens": s.engine_eval_tokens, "engine_loss": engine, "float_loss": engine_float},
            "heldout_curve": curve, "train_losses": losses, "train_s": train_s,
            "trainable_params": sum(p.numel() for p in params)}


# --- output ----------------------------------------------------------------------------------------------------------

SMOOTH = 8


def smooth(values, width=SMOOTH):
    """Trailing mean over up to ``width`` steps."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - width)
    return (sums[idx] - sums[lo]) / (idx - lo)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["finetune"]
    configs = [c for c in dict.fromkeys(r["config"] for r in runs) if c != "fp32"]
    reference = next((r for r in runs if r["config"] == "fp32"), None)
    fig, axes = plt.subplots(2, len(configs), figsize=(5.5 * len(configs), 7), sharey="row", sharex=True,
                             squeeze=False)
    for col, config in enumerate(configs):
        top, bottom = axes[0][col], axes[1][col]
        for r in [reference] + [r for r in runs if r["config"] == config]:
            if r is None:
                continue
            color = "0.55" if r["config"] == "fp32" else "C1" if r["init"] == "loftq" else "C0"
            name = "fp32 + LoRA" if r["config"] == "fp32" else f"{r['init']} init"
            steps, held = zip(*r["heldout_curve"])
            top.plot(steps, held, color=color, marker="o", ms=3,
                     label=f"{name}: {r['heldout_loss_before']:.3f} -> {r['heldout_loss_after']:.3f}")
            steps = np.arange(1, len(r["train_losses"]) + 1)
            bottom.plot(steps, smooth(r["train_losses"]), color=color, label=name)
        top.set_title(next(r["weights"] for r in runs if r["config"] == config), fontsize=10)
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss on text B (nats/token)")
    axes[1][0].set_ylabel(f"training loss, mean of {SMOOTH} steps")
    s = results["settings"]
    fig.suptitle(f"QLoRA fine-tune through QLoRALinear (golden GEMM arithmetic), rank {s['rank']}, "
                 f"{s['ft_batch']}x{s['seq']} tokens/step, the same batches for every run", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results):
    lines = []
    c, m = results["corpus"], results["model"]
    lines.append(f"Small Llama: {m['params']:,} parameters ({m['layers']} layers, hidden {m['hidden']}, "
                 f"{m['heads']} heads, MLP {m['intermediate']}, vocabulary {m['vocab']} byte-level BPE), trained "
                 f"{results['pretrain']['steps']} steps on text A ({c['a']['title']}, "
                 f"{results['pretrain']['tokens']:,} tokens seen, {results['pretrain']['time_s']:.0f} s).")
    lines.append("")
    lines.append(f"**Perplexity on held-out text A** ({c['a']['heldout_tokens']:,} tokens, windows of "
                 f"{results['settings']['seq']}):")
    lines.append("")
    lines.append("| weights | bits/weight | loss (nats) | perplexity | vs fp32 | vs NF4 |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    rows = results["perplexity"]
    fp = next(r for r in rows if r["row"] == "fp32")["ppl"]
    nf4 = next(r for r in rows if r["row"] == "nf4")["ppl"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['loss']:.4f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / fp - 1):+.1f}% | {100 * (r['ppl'] / nf4 - 1):+.1f}% |")
    lines.append("")
    lines.append("bits/weight: stored bits of every weight matrix (embeddings and lm_head included) over their "
                 "weights: codes, absmax, nested absmax, offset and table for NF; norms excluded.")
    lines.append("")
    s = results["settings"]
    lines.append(f"**QLoRA fine-tune on text B** ({c['b']['title']}): rank {s['rank']}, alpha {s['alpha']}, "
                 f"every decoder projection, AdamW lr {s['ft_lr']}, {s['ft_steps']} steps of {s['ft_batch']}x"
                 f"{s['seq']} tokens (the same batches for every run), trained through QLoRALinear (golden "
                 f"backend); held-out loss on all {c['b']['heldout_tokens']:,} held-out tokens of text B, of the "
                 f"merged model (bf16 dequantized weight + scaling B A, float32); the engine column evaluates the "
                 f"first {s['engine_eval_tokens']} of them on the engine's arithmetic against the merged model:")
    lines.append("")
    lines.append("| weights | init | held-out A perplexity at init | held-out B loss before | after | B perplexity "
                 "after | mean train loss, last 10 steps | engine - float, after | train time |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["finetune"]:
        last = r["train_losses"][-10:]
        check = r["engine_check"]
        init_a = f"{r['heldout_a_ppl_at_init']:.3f}" if "heldout_a_ppl_at_init" in r else ""
        lines.append(f"| {r['weights']} | {r['init']} | {init_a} | {r['heldout_loss_before']:.4f} | "
                     f"{r['heldout_loss_after']:.4f} | {r['heldout_ppl_after']:.3f} | {sum(last) / len(last):.4f} | "
                     f"{check['engine_loss'] - check['float_loss']:+.1e} | {r['train_s']:.0f} s |")
    errors = [r for r in results["finetune"] if "loftq_relative_error" in r]
    if errors:
        lines.append("")
        lines.append("LoftQ, mean over the decoder projections of ||W - W_eff||_F / ||W||_F: " + "; ".join(
            f"{r['weights']}: {r['loftq_relative_error']['quantization']:.4f} quantized alone, "
            f"{r['loftq_relative_error']['with_lora']:.4f} with the rank-{s['rank']} factors" for r in errors)
            + ". Embeddings and lm_head carry no LoRA factors and are quantized alone in every run.")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------------------------

def make_progress(quiet):
    from tqdm import tqdm

    def progress(iterable, desc, unit):
        return tqdm(iterable, desc=desc, unit=unit, disable=quiet, leave=False, file=sys.stderr)
    return progress


def sha256(paragraphs):
    return hashlib.sha256(join(paragraphs).encode()).hexdigest()


def run(args):
    s = TINY if args.tiny else FULL
    if args.steps is not None:
        s = replace(s, pretrain_steps=args.steps)
    if args.ft_steps is not None:
        s = replace(s, ft_steps=args.ft_steps)
    torch.set_num_threads(args.threads)
    progress = make_progress(args.quiet)
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    corpus = load_corpus(args.corpus or (TINY_CORPUS if args.tiny else ROOT / "build" / "corpus"))
    parts = {}
    for part, (key, paragraphs) in corpus.items():
        train, heldout = split_heldout(paragraphs)
        parts[part] = (key, train, heldout)
    tok = train_tokenizer(parts["a"][1], s.vocab)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    tokens = {part: (encode(tok, train), encode(tok, heldout)) for part, (_, train, heldout) in parts.items()}
    corpus_info = {}
    for part, (key, train, heldout) in parts.items():
        corpus_info[part] = {**SOURCES.get(key, {"title": f"{part}.txt", "package": None, "licence": "unknown"}),
                             "paragraphs": len(train) + len(heldout), "heldout_paragraphs": len(heldout),
                             "chars": len(join(train)) + len(join(heldout)), "sha256": sha256(train + heldout),
                             "train_tokens": int(len(tokens[part][0])), "heldout_tokens": int(len(tokens[part][1]))}

    # 1. pretraining (or the checkpoint of an earlier run with the same settings and text)
    from transformers import LlamaForCausalLM

    ckpt = out / "model"
    key = {"settings": asdict(s), "corpus_a": corpus_info["a"]["sha256"], "threads": args.threads}
    meta = ckpt / "edge_qlora_run.json"
    t0 = time.perf_counter()
    if args.reuse and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        saved = json.loads(meta.read_text())
        model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        pre_losses, pre_time = saved["losses"], saved["time_s"]
    else:
        model, pre_losses = pretrain(s, vocab, tokens["a"][0], progress)
        pre_time = time.perf_counter() - t0
        model.save_pretrained(str(ckpt), safe_serialization=True)
        meta.write_text(json.dumps({"key": key, "losses": pre_losses, "time_s": pre_time}))
    model.eval()
    params = sum(p.numel() for p in model.parameters())

    # 2. perplexity on held-out text A
    if args.assignment:
        mix, plan_info = read_assignment(args.assignment, model)
    else:
        try:
            mix, plan_info = planned_assignment(ckpt / "model.safetensors", args.target_bpw)
        except ImportError:
            mix, plan_info = None, {"source": None, "note": "edge_qlora.plan not available and no --assignment"}
    rows = [("fp32", "fp32 (as trained)", {n: 32 for n in matrices(model)}),
            ("bf16", "bf16", {n: 16 for n in matrices(model)})]
    for bits in (4, 3, 2):
        rows.append((f"nf{bits}", f"NF{bits}, every matrix", uniform(model, bits)))
    for bits in (4, 3, 2):
        rows.append((f"nf{bits}-linear", f"NF{bits}, embeddings and lm_head bf16", uniform(model, bits, True)))
    if mix is not None:
        counts = {b: sum(1 for v in mix.values() if v == b) for b in (2, 3, 4)}
        rows.append(("mix", "planner's mix (" + ", ".join(f"{n} NF{b}" for b, n in counts.items() if n) + ")", mix))
    perplexity = []
    for row, label, assignment in progress(rows, "perplexity on held-out A", "row"):
        quantized, bpw = quantized_copy(model, assignment)
        loss = eval_loss(quantized, tokens["a"][1], s.seq)
        perplexity.append({"row": row, "label": label, "bits_per_weight": bpw, "loss": loss, "ppl": math.exp(loss)})

    # 3. QLoRA fine-tunes on text B, the same batches for every run
    configs = args.finetune.split(",") if args.finetune else ["nf4", "mix" if mix is not None else "nf2"]
    assignments = {"nf4": uniform(model, 4), "nf3": uniform(model, 3), "nf2": uniform(model, 2), "mix": mix}
    labels = {r[0]: r[1] for r in rows}
    for config in configs:
        if config not in assignments or assignments[config] is None:
            raise InputError("--finetune: mix needs the planner (edge_qlora.plan) or --assignment")
    starts = batches(np.random.default_rng(s.seed + 1), tokens["b"][0], s.ft_steps, s.ft_batch, s.seq)
    runs = []
    reference = peft_model(model, s)
    runs.append({"config": "fp32", "init": "plain", "weights": "fp32 (PEFT LoRA, float32 torch)",
                 "label": "fp32 + LoRA (PEFT, float32 torch)", "heldout_a_ppl_at_init": perplexity[0]["ppl"],
                 **finetune(reference, s, tokens["b"][0], starts, tokens["b"][1], progress, "fine-tune fp32")})
    del reference
    for config in configs:
        for init in ("plain", "loftq"):
            t1 = time.perf_counter()
            qmodel, errors = qlora_model(model, assignments[config], init, s)
            init_s = time.perf_counter() - t1
            init_ppl_a = math.exp(heldout_loss(qmodel, tokens["a"][1], s.seq))
            result = finetune(qmodel, s, tokens["b"][0], starts, tokens["b"][1], progress,
                              f"fine-tune {config} {init}")
            entry = {"config": config, "init": init, "weights": labels[config],
                     "label": f"{labels[config]}, {init} init", "init_s": init_s,
                     "heldout_a_ppl_at_init": init_ppl_a, **result}
            if errors:
                entry["loftq_relative_error"] = {"quantization": float(np.mean([e[0] for e in errors])),
                                                 "with_lora": float(np.mean([e[1] for e in errors]))}
            runs.append(entry)
            del qmodel

    results = {
        "settings": {**asdict(s), "threads": args.threads, "blocksize": BLOCKSIZE, "double_quant": True},
        "corpus": corpus_info,
        "tokenizer": {"kind": "byte-level BPE (tokenizers), trained on text A's training part", "vocab": vocab},
        "model": {"params": params, "vocab": vocab, "hidden": s.hidden, "layers": s.layers, "heads": s.heads,
                  "intermediate": s.intermediate, "checkpoint": str(ckpt / "model.safetensors")},
        "pretrain": {"steps": s.pretrain_steps, "tokens": s.pretrain_steps * s.batch * s.seq, "time_s": pre_time,
                     "final_loss": float(np.mean(pre_losses[-10:])), "losses": pre_losses},
        "perplexity": perplexity,
        "plan": {**plan_info, "assignment": mix},
        "finetune": runs,
    }
    results["time_s"] = time.perf_counter() - start
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_path = Path(args.plot) if args.plot else out / "sub4bit_loss.png"
    plot(results, plot_path)
    print(table)
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {plot_path} "
          f"({results['time_s']:.0f} s in all)")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on tests/data/sub4bit for CI (seconds)")
    parser.add_argument("--corpus", metavar="DIR", default=None,
                        help="a.txt and b.txt, or the extracted Debian packages (default: build/corpus; "
                             "tests/data/sub4bit with --tiny)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="checkpoint, tokenizer and results (default: build/sub4bit, build/sub4bit-tiny)")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="loss curves (default: OUT/sub4bit_loss.png)")
    parser.add_argument("--assignment", metavar="FILE.json", default=None,
                        help="the mix's code widths: a JSON map of every matrix to 2, 3 or 4, or a plan's JSON "
                             "(default: edge_qlora.plan on the checkpoint)")
    parser.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                        help="the planner's bits per weight (default: that of TinyLlama's 300 MB plan)")
    parser.add_argument("--finetune", default=None, metavar="nf4,mix",
                        help="quantized models to fine-tune, each from plain and LoftQ init (default: nf4 and mix, "
                             "nf2 where there is no mix)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"pretraining steps (default: {FULL.pretrain_steps}; {TINY.pretrain_steps} with --tiny)")
    parser.add_argument("--ft-steps", type=int, default=None,
                        help=f"fine-tune steps (default: {FULL.ft_steps}; {TINY.ft_steps} with --tiny)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; results depend on it)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse OUT/model when it was trained with the same settings and text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "build" / ("sub4bit-tiny" if args.tiny else "sub4bit"))
    for name in ("steps", "ft_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.finetune is not None:
        bad = [c for c in args.finetune.split(",") if c not in ("nf4", "nf3", "nf2", "mix")]
        if bad or not args.finetune:
            parser.error(f"--finetune takes nf4, nf3, nf2 and mix separated by commas, not {args.finetune!r}")
    if args.target_bpw is not None and not 2 < args.target_bpw <= 4.2:
        parser.error(f"--target-bpw must be above 2 and at most 4.2, not {args.target_bpw}")
    from edge_qlora.formats import InputError as FormatError

    try:
        run(args)
    except (InputError, FormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
