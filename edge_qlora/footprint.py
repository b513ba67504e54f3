"""Memory footprint of QLoRA fine-tuning a model: counted on the model itself, NF4 bytes measured with bitsandbytes.

Each model is built from its published configuration with transformers' own config class, instantiated on the
meta device (no weights, no download), so parameters are counted and the linear layers enumerated by their real
module names. For every distinct shape of the decoder layers' linear layers, one representative weight is quantized
for real by ``bitsandbytes.functional.quantize_4bit`` (NF4, blocksize 64, double quantization) and the tensors it
would be stored as are summed: the packed weight and the QuantState in the form a ``Linear4bit`` state dict keeps
it (``QuantState.as_dict(packed=True)``: uint8 absmax, the nested float32 absmax and 256-entry nested code, the
16-entry NF4 code and the packed metadata holding shape, dtype, blocksize and the nested offset). Those bytes are
scaled to every layer of that shape.

What is counted (bf16 is 2 bytes, fp32 4; MB means 10^6 bytes):

* the quantized model as stored (``total_bytes``): the decoder layers' linear layers in NF4, the embeddings and
  lm_head in bf16 (or NF4, measured the same way), the norms and biases in bf16;
* LoRA on every linear layer of the decoder layers (Llama and Mistral: q, k, v, o, gate, up, down; Phi-2: q, k, v,
  dense, fc1, fc2) at rank r: r * (in + out) parameters each, kept as fp32 masters (the step accelerator's format,
  and what PEFT keeps for a k-bit model), with fp32 gradients and AdamW's two fp32 moments;
* activations for one sequence of S tokens (batch 1, bf16, base model frozen, LoRA and attention dropout off, no
  gradient checkpointing): the tensors the backward pass reads, counted once each as an ideal implementation
  keeps them (see :func:`activation_terms`). Attention keeps its softmax probabilities [heads, S, S]; a fused
  (flash) kernel would keep S log-sum-exp values per head instead, a framework may keep extra copies;
* the streamed working set: what the device holds while one decoder layer runs its backward pass, when the layers
  stream through it one at a time (the stage with the most live data): that layer's NF4 weights, its LoRA masters,
  gradients and AdamW moments, the activations it saved in the forward pass, the gradient entering and leaving it
  ([S, hidden] each) and the largest set of intermediate gradients live at once. The other layers' weights and
  activations wait in host memory; prefetching the next layer's weights adds one more layer's NF4 bytes
  (``streamed_layer_nf4_bytes``). The lm_head and loss stage is reported on its own (``head_stage_bytes``).

With a plan of :mod:`edge_qlora.plan` (``footprint(..., plan=...)``, ``edge-qlora footprint --budget 300MB`` or
``--plan FILE.json``), the report adds the model as stored under the plan: every weight matrix, embeddings and lm_head
included, at its planned code width (NF2, NF3 or NF4, counted by :func:`edge_qlora.golden.codebook.stored_bytes`:
packed codes, absmax, nested absmax, offset and table; bitsandbytes' 1 kB nested code and the state dict's metadata,
which the NF4 figures above include, are constants of the hardware and not counted there), the norms and biases in
bf16, and the same LoRA, optimizer and activation bytes beside it (``plan`` in the JSON).
"""

import functools
import logging
from dataclasses import dataclass, field

__all__ = ["MODELS", "EMBEDDINGS", "TARGET_BYTES", "TARGET_REDUCTION", "ModelSpec", "Inventory", "NF4Bytes", "Footprint",
           "model_config", "inventory", "measure_nf4", "activation_terms", "footprint", "targets", "format_table"]

MB = 10 ** 6
TARGET_BYTES = 300 * MB  # the seed's target: a model under 300 MB
TARGET_REDUCTION = 0.75  # ... and 75% less memory than FP16
EMBEDDINGS = ("bf16", "nf4")
BLOCKSIZE = 64


@dataclass(frozen=True)
class ModelSpec:
    """A model by its published configuration: the transformers config class and its non-default values."""

    config_class: str
    values: dict
    source: str


MODELS = {
    "tinyllama-1.1b": ModelSpec(
        "LlamaConfig",
        dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=2048,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json"),
    "mistral-7b": ModelSpec(
        "MistralConfig",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
             rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
        "mistralai/Mistral-7B-v0.1 config.json"),
    "phi-2": ModelSpec(
        "PhiConfig",
        dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, hidden_act="gelu_new", max_position_embeddings=2048,
             layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.4, qk_layernorm=False,
             tie_word_embeddings=False),
        "microsoft/phi-2 config.json"),
}


def _check(model, lora_r, seq_len, embeddings):
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    for name, value in (("LoRA rank", lora_r), ("sequence length", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, not {embeddings!r}")


def model_config(model):
    """The transformers config of a model in :data:`MODELS`."""
    import transformers

    spec = MODELS[model]
    return getattr(transformers, spec.config_class)(**spec.values)


@dataclass(frozen=True)
class Inventory:
    """A model's parameters as counted on its meta-device instance.

    ``linear_shapes`` maps each distinct (out, in) shape of the decoder layers' linear layers to the module names
    of layer 0 with that shape and the number of such layers in the whole model.
    """

    params: int
    linear_params: int
    projections: tuple  # names of the linear layers in one decoder layer, e.g. ("self_attn.q_proj", ...)
    linear_shapes: dict  # (out, in) -> (names in layer 0, count in the model)
    embed_params: int
    head_params: int  # lm_head's weight (0 when tied to the embeddings)
    other_params: int  # norms and biases (kept in bf16)
    layers: int


@functools.lru_cache(maxsize=None)
def inventory(model):
    """Count a model's parameters and enumerate its linear layers on a meta-device instance."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(model_config(model))
    params = sum(p.numel() for p in net.parameters())  # shared (tied) parameters once
    embed = net.get_input_embeddings().weight
    head = net.get_output_embeddings().weight
    layers = net.model.layers
    shapes, linear = {}, 0
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                shape = tuple(module.weight.shape)
                names, count = shapes.get(shape, ((), 0))
                shapes[shape] = (names + (name,) if index == 0 else names, count + 1)
                linear += module.weight.numel()
    projections = tuple(name for name, module in layers[0].named_modules() if isinstance(module, torch.nn.Linear))
    head_params = 0 if head is embed else head.numel()
    return Inventory(params=params, linear_params=linear, projections=projections, linear_shapes=shapes,
                     embed_params=embed.numel(), head_params=head_params,
                     other_params=params - linear - embed.numel() - head_params, layers=len(layers))


@dataclass(frozen=True)
class NF4Bytes:
    """Bytes of one weight quantized by bitsandbytes, as a Linear4bit state dict stores it."""

    shape: tuple
    packed: int  # the packed 4-bit codes
    absmax: int  # one uint8 per block (double quantization)
    nested: int  # nested float32 absmax (one per 256 absmax) and the 256-entry nested code
    other: int  # the 16-entry NF4 code and the packed metadata (shape, dtype, blocksize, nested offset)

    @property
    def total(self):
        return self.packed + self.absmax + self.nested + self.other

    @property
    def bits_per_weight(self):
        return 8 * self.total / (self.shape[0] * self.shape[1])


@functools.lru_cache(maxsize=None)
def measure_nf4(rows, cols, blocksize=BLOCKSIZE):
    """Quantize a random bf16 [rows, cols] weight with bitsandbytes (NF4, double quantization) and measure it."""
    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(rows * 65537 + cols)
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.bfloat16) * 0.02
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    stored = {key: value.numel() * value.element_size() for key, value in state.as_dict(packed=True).items()}
    nested = stored.pop("nested_absmax") + stored.pop("nested_quant_map")
    absmax = stored.pop("absmax")
    return NF4Bytes(shape=(rows, cols), packed=packed.numel() * packed.element_size(), absmax=absmax,
                    nested=nested, other=sum(stored.values()))


def _dims(config):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return dict(h=config.hidden_size, i=config.intermediate_size, heads=heads, q=heads * head_dim,
                kv=kv_heads * head_dim, v=config.vocab_size)


def _gated(config):
    """Llama and Mistral: two RMSNorms, attention then a gated (SiLU) MLP. Phi-2: one LayerNorm feeding attention
    and an ungated (GELU) MLP in parallel."""
    return type(config).__name__ != "PhiConfig"


def activation_terms(config, seq_len, lora_r, projections):
    """What the backward pass reads, as ``(what, elements, bytes per element)``.

    Returns ``(per_layer, head, scratch)``: the tensors each decoder layer saves in the forward pass, those of the
    final norm and the loss, and the largest set of gradients live at once while one layer runs backward.
    """
    d, s = _dims(config), seq_len
    gated = _gated(config)
    norm_stats = ("RMSNorm 1/rms, both norms", 2 * s, 4) if gated else ("LayerNorm mean and 1/std", 2 * s, 4)
    layer = [("layer input (residual, norm input)", s * d["h"], 2), norm_stats,
             ("normed input of q/k/v" + ("" if gated else "/fc1") + " and their LoRA A", s * d["h"], 2),
             ("q, k after rotary; v", s * (d["q"] + 2 * d["kv"]), 2),
             ("attention probabilities [heads, S, S]", d["heads"] * s * s, 2),
             ("attention output (o_proj/dense input)", s * d["q"], 2)]
    if gated:
        layer += [("residual after attention (second norm input)", s * d["h"], 2),
                  ("normed input of gate/up and their LoRA A", s * d["h"], 2),
                  ("gate output, SiLU(gate), up output", 3 * s * d["i"], 2),
                  ("SiLU(gate) * up (down_proj input)", s * d["i"], 2)]
    else:
        layer += [("fc1 output (GELU input)", s * d["i"], 2), ("GELU output (fc2 input)", s * d["i"], 2)]
    layer.append((f"LoRA A outputs x A^T [S, r], {len(projections)} projections", len(projections) * s * lora_r, 2))
    head = [("final norm input", s * d["h"], 2), ("final norm statistics", (1 if gated else 2) * s, 4),
            ("lm_head input", s * d["h"], 2), ("softmax of the logits for the loss [S, vocab], fp32", s * d["v"], 4)]
    attention = 2 * d["heads"] * s * s + s * (d["q"] + 2 * d["kv"])  # dP and dscores; dq, dk, dv
    mlp = (3 if gated else 2) * s * d["i"]  # d(SiLU*up), dgate, dup / d(GELU out), d(fc1 out)
    scratch = [("gradients entering and leaving the layer [S, hidden]", 2 * s * d["h"], 2),
               ("largest set of intermediate gradients live at once", max(attention, mlp), 2)]
    return layer, head, scratch


def _bytes(terms):
    return sum(elements * size for _, elements, size in terms)


@dataclass
class Footprint:
    """The figures of one model at one LoRA rank and sequence length (bytes unless named otherwise)."""

    model: str
    lora_r: int
    seq_len: int
    embeddings: str
    inventory: Inventory
    nf4: dict  # (out, in) -> NF4Bytes
    nf4_linear_bytes: int
    embed_bytes: int
    head_bytes: int
    other_bytes: int
    lora_params: int
    activations: tuple  # (per_layer, head, scratch) terms
    values: dict = field(default_factory=dict)
    plan: object = None  # an edge_qlora.plan.Plan, or None
    planned: dict = field(default_factory=dict)  # the figures under the plan

    def to_dict(self):
        inv = self.inventory
        nf4 = self.nf4.values()
        parts = {part: sum(getattr(m, part) * inv.linear_shapes[m.shape][1] for m in nf4)
                 for part in ("packed", "absmax", "nested", "other")}
        extra = {"plan": self.planned} if self.plan is not None else {}
        return {"model": self.model, "lora_r": self.lora_r, "seq_len": self.seq_len, "batch": 1,
                "embeddings": self.embeddings, "params": inv.params, "linear_params": inv.linear_params,
                "layers": inv.layers, "projections": list(inv.projections), **self.values,
                "nf4_linear_parts": parts,
                "nf4_measured": [{"shape": list(m.shape), "names": list(inv.linear_shapes[m.shape][0]),
                                  "count": inv.linear_shapes[m.shape][1], "bytes": m.total,
                                  "bits_per_weight": m.bits_per_weight} for m in nf4],
                "activation_terms": {group: [{"what": what, "elements": n, "bytes": n * size}
                                             for what, n, size in terms]
                                     for group, terms in zip(("per_layer", "head", "scratch"), self.activations)},
                **extra}


def _measure_all(inv, config, embeddings, progress):
    """Measure each distinct linear-layer shape once, and the embeddings' shape when they are stored in NF4.

    Returns ``({(out, in): NF4Bytes}, NF4Bytes of the embeddings or None)``; ``progress(done, total)`` after each.
    """
    embed_shape = (config.vocab_size, config.hidden_size)
    shapes = list(inv.linear_shapes) + ([embed_shape] if embeddings == "nf4" else [])
    measured = []
    for done, shape in enumerate(shapes, 1):
        measured.append(measure_nf4(*shape))
        if progress:
            progress(done, len(shapes))
    linear = dict(zip(inv.linear_shapes, measured))
    return linear, measured[-1] if embeddings == "nf4" else None


def footprint(model, lora_r=16, seq_len=128, embeddings="bf16", progress=None, plan=None):
    """The memory footprint of QLoRA fine-tuning ``model`` (a key of :data:`MODELS`); see the module's text.

    ``embeddings``: how the embeddings and lm_head are stored, ``"bf16"`` or ``"nf4"``. ``progress(done, total)``
    is called as each distinct weight shape is measured with bitsandbytes. ``plan``: an
    :class:`edge_qlora.plan.Plan` of this model, whose stored model the report adds (``planned``).
    """
    _check(model, lora_r, seq_len, embeddings)
    if plan is not None and (plan.source.kind != "model" or plan.source.name != model):
        made = plan.source.name if plan.source.kind == "model" else f"checkpoint {plan.source.name}"
        raise ValueError(f"the plan is for {made}, not {model}")
    config, inv = model_config(model), inventory(model)
    measured, embed_nf4 = _measure_all(inv, config, embeddings, progress)
    nf4_linear = sum(measured[shape].total * count for shape, (_, count) in inv.linear_shapes.items())
    if embed_nf4 is not None:
        embed_bytes, head_bytes = embed_nf4.total, embed_nf4.total if inv.head_params else 0
    else:
        embed_bytes, head_bytes = 2 * inv.embed_params, 2 * inv.head_params
    lora_params = sum(lora_r * (out + inp) * count for (out, inp), (_, count) in inv.linear_shapes.items())
    terms = activation_terms(config, seq_len, lora_r, inv.projections)
    fp = Footprint(model, lora_r, seq_len, embeddings, inv, measured, nf4_linear, embed_bytes, head_bytes,
                   2 * inv.other_params, lora_params, terms)
    fp.values = _values(fp, config)
    if plan is not None:
        fp.plan = plan
        fp.planned = _planned(fp, config, plan)
    return fp


def _planned(fp, config, plan):
    """The figures of the model as stored under ``plan``, with the training working set beside it."""
    inv, v, (per_layer, head, scratch), s = fp.inventory, fp.values, fp.activations, fp.seq_len
    sizes = plan.module_bytes()
    parts = {"linear": 0, "embedding": 0, "lm_head": 0}
    layers, linear_weights = {}, 0
    for m in plan.source.matrices:
        parts[m.kind] += sizes[m.name]
        if m.kind == "linear":
            linear_weights += m.numel
        if m.layer is not None:
            layers[m.layer] = layers.get(m.layer, 0) + sizes[m.name]
    other = plan.source.other_bytes
    total = sum(parts.values()) + other
    assert total == plan.total_bytes and other == fp.other_bytes and plan.source.params == inv.params
    kinds = {kind: sorted({plan.assignment[m.name] for m in plan.source.matrices if m.kind == kind})
             for kind in parts}
    layer_bytes = max(layers.values())
    layer_lora = 16 * fp.lora_params // inv.layers
    widths = plan.widths()
    return {
        "budget_bytes": plan.budget, "weights": plan.source.weights, "blocksize": plan.blocksize,
        "double_quant": plan.double_quant,
        "counts": {str(b): row["matrices"] for b, row in widths.items()},
        "widths": {str(b): row for b, row in widths.items()},
        "embedding_bits": kinds["embedding"], "lm_head_bits": kinds["lm_head"],
        "linear_bytes": parts["linear"], "bits_per_linear_weight": 8 * parts["linear"] / linear_weights,
        "embedding_bytes": parts["embedding"], "lm_head_bytes": parts["lm_head"], "norm_and_bias_bytes": other,
        "total_bytes": total, "bits_per_weight": plan.bits_per_weight, "bits_per_param": 8 * total / inv.params,
        "reduction_vs_fp16": 1 - total / v["fp16_bytes"], "under_target": total <= TARGET_BYTES,
        "training_bytes": total + 16 * fp.lora_params + v["activation_bytes"],
        "streamed_layer_bytes": layer_bytes,
        "streamed_working_set_bytes": layer_bytes + layer_lora + _bytes(per_layer) + _bytes(scratch),
        "head_stage_bytes": parts["lm_head"] + _bytes(head) + s * (4 * config.vocab_size + 2 * config.hidden_size),
        **{key: value for key, value in plan.error_figures().items() if key in ("error_vs_all_nf4",)},
    }


def _values(fp, config):
    """The report's figures (the JSON keys) from the counted and measured parts."""
    inv, (per_layer, head, scratch), s = fp.inventory, fp.activations, fp.seq_len
    total = fp.nf4_linear_bytes + fp.embed_bytes + fp.head_bytes + fp.other_bytes
    activations = inv.layers * _bytes(per_layer) + _bytes(head)
    layer_nf4 = sum(fp.nf4[shape].total * len(names) for shape, (names, _) in inv.linear_shapes.items())
    layer_lora = 16 * fp.lora_params // inv.layers  # fp32 masters, gradients, two moments
    values = {
        "fp16_bytes": 2 * inv.params, "nf4_linear_bytes": fp.nf4_linear_bytes,
        "nf4_bits_per_linear_weight": 8 * fp.nf4_linear_bytes / inv.linear_params,
        "embedding_bytes": fp.embed_bytes, "lm_head_bytes": fp.head_bytes, "norm_and_bias_bytes": fp.other_bytes,
        "total_bytes": total, "reduction_vs_fp16": 1 - total / (2 * inv.params), "lora_params": fp.lora_params,
        "lora_bytes": 4 * fp.lora_params, "lora_grad_bytes": 4 * fp.lora_params,
        "optimizer_bytes": 8 * fp.lora_params, "activation_bytes": activations,
        "training_bytes": total + 16 * fp.lora_params + activations,
        "streamed_layer_nf4_bytes": layer_nf4,
        "streamed_working_set_bytes": layer_nf4 + layer_lora + _bytes(per_layer) + _bytes(scratch),
        # lm_head's weights, the final norm's and the loss's activations, the logits' and lm_head input's gradients
        "head_stage_bytes": fp.head_bytes + _bytes(head) + s * (4 * config.vocab_size + 2 * config.hidden_size),
    }
    values.update(targets(values, inv))
    return values


def targets(values, inv):
    """How far the model is from 300 MB and from 75% less than FP16, and the bits per weight that reach them.

    ``*_bits_per_param`` is the average over every parameter; ``*_linear_bits`` is what the linear layers would
    need with the embeddings, lm_head, norms and biases stored as they are (negative: out of reach that way).
    """
    rest = values["total_bytes"] - values["nf4_linear_bytes"]
    reduction_bytes = (1 - TARGET_REDUCTION) * values["fp16_bytes"]
    return {
        "bits_per_param": 8 * values["total_bytes"] / inv.params,
        "target_bytes": TARGET_BYTES, "over_target_bytes": values["total_bytes"] - TARGET_BYTES,
        "target_bits_per_param": 8 * TARGET_BYTES / inv.params,
        "target_linear_bits": 8 * (TARGET_BYTES - rest) / inv.linear_params,
        "target_reduction": TARGET_REDUCTION,
        "reduction_short_by": TARGET_REDUCTION - values["reduction_vs_fp16"],
        "reduction_bits_per_param": 8 * reduction_bytes / inv.params,
        "reduction_linear_bits": 8 * (reduction_bytes - rest) / inv.linear_params,
    }


def _mb(nbytes):
    return f"{nbytes / MB:,.1f}"


def _summary_rows(fp):
    """``(part, parameters, MB, note)`` rows of the main table."""
    v, inv, r = fp.values, fp.inventory, fp.lora_r
    parts = fp.to_dict()["nf4_linear_parts"]
    emb = "NF4, measured" if fp.embeddings == "nf4" else "bf16"
    bits = {part: 8 * nbytes / inv.linear_params for part, nbytes in parts.items()}
    nf4_note = (f"{v['nf4_bits_per_linear_weight']:.3f} bits/weight: packed {bits['packed']:.3f}, absmax "
                f"{bits['absmax']:.3f}, nested state and metadata {bits['nested'] + bits['other']:.4f}")
    return [
        ("linear layers, NF4 + double quant", inv.linear_params, v["nf4_linear_bytes"], nf4_note),
        (f"embed_tokens ({emb})", inv.embed_params, v["embedding_bytes"], ""),
        (f"lm_head ({emb})", inv.head_params, v["lm_head_bytes"], "untied" if inv.head_params else "tied"),
        ("norms and biases (bf16)", inv.other_params, v["norm_and_bias_bytes"], ""),
        ("**quantized model as stored**", inv.params, v["total_bytes"],
         f"{v['bits_per_param']:.2f} bits/parameter; **{100 * v['reduction_vs_fp16']:.1f}% less than FP16**"),
        ("FP16 model", inv.params, v["fp16_bytes"], "16 bits/parameter"),
        (f"LoRA r={r} masters (fp32)", v["lora_params"], v["lora_bytes"], f"{len(inv.projections)} projections "
         f"x {inv.layers} layers: {', '.join(name.split('.')[-1] for name in inv.projections)}"),
        ("LoRA gradients (fp32)", v["lora_params"], v["lora_grad_bytes"], ""),
        ("AdamW moments (2 x fp32)", 2 * v["lora_params"], v["optimizer_bytes"], ""),
        (f"activations, S={fp.seq_len}, batch 1", None, v["activation_bytes"],
         f"{inv.layers} layers x {_mb(_bytes(fp.activations[0]))} MB + final norm and loss "
         f"{_mb(_bytes(fp.activations[1]))} MB"),
        ("**fine-tuning total**", None, v["training_bytes"], "model + LoRA + gradients + moments + activations"),
        ("**streamed working set**", None, v["streamed_working_set_bytes"],
         f"one decoder layer in its backward pass: NF4 weights {_mb(v['streamed_layer_nf4_bytes'])} + LoRA, "
         f"gradients and moments {_mb(16 * v['lora_params'] // inv.layers)} + activations "
         f"{_mb(_bytes(fp.activations[0]))} + gradients in flight {_mb(_bytes(fp.activations[2]))} MB"),
        ("lm_head and loss stage", None, v["head_stage_bytes"], "lm_head weights, logits, their gradients"),
    ]


def _target_lines(fp):
    v = fp.values
    rest = v["total_bytes"] - v["nf4_linear_bytes"]
    over = v["over_target_bytes"]
    where = (f"{_mb(over)} MB over it ({v['total_bytes'] / TARGET_BYTES:.2f}x)" if over > 0
             else f"{_mb(-over)} MB under it")

    def linear(bits):
        if bits <= 0:
            return (f"out of reach by the linear layers alone: the embeddings, lm_head, norms and biases take "
                    f"{_mb(rest)} MB")
        return f"the linear layers {bits:.2f} bits/weight with the rest as stored ({_mb(rest)} MB)"

    short = v["reduction_short_by"]
    nf4_short = (", more than 4: NF4 at blocksize 64 misses 75% even with every parameter in it"
                 if v["nf4_bits_per_linear_weight"] > v["reduction_bits_per_param"] else "")
    reached = (f"{100 * short:.1f} points short" if short > 0 else f"reached, {100 * -short:.1f} points beyond")
    return [f"- 300 MB target: the quantized model is {_mb(v['total_bytes'])} MB, {where}. Reaching 300 MB takes "
            f"{v['target_bits_per_param']:.2f} bits/parameter over all parameters (now {v['bits_per_param']:.2f}), "
            f"or {linear(v['target_linear_bits'])}.",
            f"- 75% reduction target: {100 * v['reduction_vs_fp16']:.1f}% less than FP16, {reached}. 75% means "
            f"{v['reduction_bits_per_param']:.2f} bits/parameter over all parameters, or "
            f"{linear(v['reduction_linear_bits'])}; NF4 with double quantization stores "
            f"{v['nf4_bits_per_linear_weight']:.3f}{nf4_short}.",
            f"- the streamed working set, {_mb(v['streamed_working_set_bytes'])} MB, is "
            f"{'under' if v['streamed_working_set_bytes'] < TARGET_BYTES else 'over'} 300 MB."]


def _margin(nbytes):
    """A distance to a budget: in MB, or in bytes below 0.1 MB."""
    return f"{_mb(abs(nbytes))} MB" if abs(nbytes) >= MB // 10 else f"{abs(nbytes):,} bytes"


def _widths(bits):
    return "/".join(f"NF{b}" for b in bits)


def _plan_lines(fp):
    """The section of the model as stored under the plan, the training working set beside it."""
    p, v, inv, r = fp.planned, fp.values, fp.inventory, fp.lora_r
    counts = ", ".join(f"NF{b} x {n}" for b, n in p["counts"].items())
    under = TARGET_BYTES - p["total_bytes"]
    rows = [
        ("linear layers, planned", inv.linear_params, p["linear_bytes"],
         f"{p['bits_per_linear_weight']:.3f} bits/weight"),
        (f"embed_tokens ({_widths(p['embedding_bits'])})", inv.embed_params, p["embedding_bytes"], ""),
        (f"lm_head ({_widths(p['lm_head_bits'])})", inv.head_params, p["lm_head_bytes"],
         "untied" if inv.head_params else "tied"),
        ("norms and biases (bf16)", inv.other_params, p["norm_and_bias_bytes"], ""),
        ("**quantized model as stored under the plan**", inv.params, p["total_bytes"],
         f"{p['bits_per_param']:.2f} bits/parameter; **{100 * p['reduction_vs_fp16']:.1f}% less than FP16**; "
         f"{_margin(under)} {'under' if under >= 0 else 'over'} 300 MB"),
        (f"LoRA r={r}: masters, gradients, AdamW moments (fp32)", v["lora_params"], 16 * v["lora_params"],
         "as above"),
        (f"activations, S={fp.seq_len}, batch 1", None, v["activation_bytes"], "as above"),
        ("**fine-tuning total under the plan**", None, p["training_bytes"],
         "model + LoRA + gradients + moments + activations"),
        ("**streamed working set under the plan**", None, p["streamed_working_set_bytes"],
         f"the largest decoder layer's planned weights {_mb(p['streamed_layer_bytes'])} MB + LoRA state and "
         f"activations as above"),
        ("lm_head and loss stage under the plan", None, p["head_stage_bytes"], ""),
    ]
    lines = ["", f"Under the plan (edge-qlora plan, budget {_mb(p['budget_bytes'])} MB: {counts} matrices, "
             f"blocksize {p['blocksize']}, {'double quantization' if p['double_quant'] else 'float32 absmax'}; "
             f"bytes by golden.codebook.stored_bytes; weights {p['weights']}):", "",
             "| part | parameters | MB | note |", "|---|---:|---:|---|"]
    for part, params, nbytes, note in rows:
        lines.append(f"| {part} | {'' if params is None else f'{params:,}'} | {_mb(nbytes)} | {note} |")
    return lines


def format_table(fp):
    """The report as Markdown: the summary, the model under a plan if any, the measured NF4 shapes, the activations
    per layer, the targets."""
    inv = fp.inventory
    spec = MODELS[fp.model]
    context = spec.values["max_position_embeddings"]
    beyond = f", beyond the model's {context}-token context" if fp.seq_len > context else ""
    lines = [f"{fp.model}: {spec.config_class} from {spec.source}, {inv.params:,} parameters, {inv.layers} decoder "
             f"layers; LoRA r={fp.lora_r}, sequence length {fp.seq_len}{beyond}, batch 1 (MB = 10^6 bytes)", "",
             "| part | parameters | MB | note |", "|---|---:|---:|---|"]
    for part, params, nbytes, note in _summary_rows(fp):
        lines.append(f"| {part} | {'' if params is None else f'{params:,}'} | {_mb(nbytes)} | {note} |")
    if fp.plan is not None:
        lines += _plan_lines(fp)
    lines += ["", "NF4 measured with bitsandbytes.functional.quantize_4bit (blocksize 64, double quantization), one "
              "weight per shape:", "", "| layers (in each decoder layer) | shape | in the model | bytes each "
              "| bits/weight |", "|---|---|---:|---:|---:|"]
    for shape, measured in fp.nf4.items():
        names, count = inv.linear_shapes[shape]
        lines.append(f"| {', '.join(names)} | {shape[0]} x {shape[1]} | {count} | {measured.total:,} | "
                     f"{measured.bits_per_weight:.4f} |")
    lines += ["", f"Activations kept for the backward pass, per decoder layer (bf16 unless noted, S={fp.seq_len}):",
              "", "| tensor | elements | bytes |", "|---|---:|---:|"]
    for what, elements, size in fp.activations[0]:
        lines.append(f"| {what}{' (fp32)' if size == 4 else ''} | {elements:,} | {elements * size:,} |")
    targets = _target_lines(fp)
    if fp.plan is not None:
        p = fp.planned
        over = p["total_bytes"] - TARGET_BYTES
        targets.append(f"- under the plan: the quantized model is {p['total_bytes']:,} bytes "
                       f"({p['total_bytes'] / MB:,.2f} MB), "
                       f"{_margin(over)} {'over' if over > 0 else 'under'} 300 MB, "
                       f"{100 * p['reduction_vs_fp16']:.1f}% less than FP16 (75% target "
                       f"{'reached' if p['reduction_vs_fp16'] >= TARGET_REDUCTION else 'missed'}); fine-tuning "
                       f"takes {_mb(p['training_bytes'])} MB in all, {_mb(p['streamed_working_set_bytes'])} MB "
                       f"streamed.")
    return "\n".join(lines + ["", *targets])
