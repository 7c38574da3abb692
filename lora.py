"""
LoRA: fine-tune a large model by training a small low-rank change to a few of its matrices.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A pretrained Linear
keeps its weight W (out, in) frozen and learns only how W should change, as the product of
two thin matrices:

    y = W x + b + (alpha / r) * B A dropout(x)        A (r, in), B (out, r), r << in, out

A starts random and B starts at zero, so a fresh adapter adds exactly nothing: training
starts from the pretrained model itself. Only A and B are trained. For GPT-2 124M with r=8
on the queries and values that is 0.29M parameters (0.24% of the model), so AdamW keeps
moments for 0.29M numbers instead of 124M, and a checkpoint holds ~1 MB instead of ~500 MB.
Afterwards B A can be added into W (merge_lora): the model is an ordinary GPT again, exactly
as fast as before.

    apply_lora(model, rank, alpha, dropout, targets)    add adapters, freeze everything else
    set_lora_enabled(model, flag)                       switch them off and on (A/B comparisons)
    merge_lora(model)                                   fold them into W: plain nn.Linear again
    lora_state_dict(model) / load_lora(model, state)    the adapters and their settings only
    has_lora(model)

Targets are named for what they compute. GPT-2 computes queries, keys and values in one
fused Linear, attn.c_attn, whose output rows are [q | k | v] (C each; with grouped-query
attention k and v have n_kv_head * hs rows); so q, k and v are adapted separately, each by its
own A, B acting on its rows of c_attn's output, and "q,k" leaves the values exactly as they were.
A SwiGLU model's mlp_fc is its gate and up projections together (one adapter). attn_proj, mlp_fc and mlp_proj are attn.c_proj,
mlp.c_fc and mlp.c_proj whole. The embeddings and lm_head are never adapted.

An adapted Linear is replaced by a LoRALinear that holds the *same* weight and bias
Parameters under the same names, so the base keys of the state dict do not change
(transformer.h.0.attn.c_attn.weight stays where it was) and the adapters are added beside
them (transformer.h.0.attn.c_attn.lora_A.q, ...lora_B.q). Call apply_lora on the bare model,
before torch.compile and DDP: the frozen base has requires_grad=False, so DDP leaves it
alone, and every adapter gets a gradient on every step, as DDP requires.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import unwrap

# Each Linear of a Block that LoRA can adapt, and the target names of the parts its output is
# split into (at the rows of attn.qkv_sizes for c_attn). The order of all names is the order of
# the valid targets.
LINEARS = {
    "attn.c_attn": ("q", "k", "v"),  # (3C, C): rows [0:C] queries, [C:2C] keys, [2C:3C] values (GQA: fewer k, v rows)
    "attn.c_proj": ("attn_proj",),  # (C, C)
    "mlp.c_fc": ("mlp_fc",),  # (4C, C)
    "mlp.c_proj": ("mlp_proj",),  # (C, 4C)
}
TARGETS = [name for parts in LINEARS.values() for name in parts]

# The default adapts queries and values, as the LoRA paper's GPT-2 code does. Its Table 5
# (GPT-3, the same number of trainable parameters in each row) is why: Wq and Wv at rank 4
# beat Wq or Wk or Wv alone at rank 8, and all four attention matrices at rank 2 did only
# about as well. So q,v gets most of the benefit for a third less than q,k,v. "q,k,v" or all
# six names are there for data far from the pretraining text.
DEFAULT_TARGETS = "q,v"


class LoRALinear(nn.Module):
    """A frozen Linear plus low-rank adapters on some of the parts of its output.

    parts: the names of the output's parts, in order (("q", "k", "v") for c_attn, one name for
    the others); sizes: their rows (None: equal parts); targets: those of them to adapt.
    """

    def __init__(self, linear, parts, targets, rank, alpha, dropout, sizes=None):
        super().__init__()
        # the very same Parameters as the Linear: no copy, and the same state dict keys
        self.weight = linear.weight  # (out, in)
        self.register_parameter("bias", linear.bias)  # (out,) or None
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.parts = list(parts)
        # rows per part: C for each of q, k, v (C, nkv * hs, nkv * hs with grouped-query attention)
        self.sizes = list(sizes or [self.out_features // len(parts)] * len(parts))
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        # alpha / r: the update's size then hardly depends on r, so changing r needs no new
        # learning rate (the paper sets alpha to the first r it tries and never tunes it)
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        w = self.weight
        for name in targets:
            A = torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype)  # (r, in)
            # nn.Linear's own default init, which the LoRA paper's code uses for A
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(A)
            rows = self.sizes[self.parts.index(name)]
            self.lora_B[name] = nn.Parameter(torch.zeros(rows, rank, device=w.device, dtype=w.dtype))  # (rows, r)
        self.enabled = True  # set_lora_enabled(model, False) gives back the base model's outputs

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)  # the frozen layer
        if not self.enabled:
            return y
        h = self.lora_dropout(x)  # dropout on the adapters' input only; the base sees all of x
        # split the output into its parts (q, k, v for c_attn, one part otherwise), add each
        # adapted part's low-rank update, and join them again
        ys = list(y.split(self.sizes, dim=-1))
        for i, name in enumerate(self.parts):
            if name in self.lora_A:
                update = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name])  # (..., r) -> (..., rows)
                ys[i] = ys[i] + self.scale * update
        return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]

    def delta_weight(self):
        """What the adapters add to W: scale * B A for adapted parts, zeros elsewhere; (out, in)."""
        rows = [self.lora_B[n] @ self.lora_A[n] if n in self.lora_A
                else self.weight.new_zeros(size, self.in_features) for n, size in zip(self.parts, self.sizes)]
        return self.scale * torch.cat(rows, dim=0)


def parse_targets(targets):
    """Target names from "q, v" or ["q", "v"], in the canonical order; unknown ones are an error."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if "" in names:  # q,,v: a name left out by mistake, most likely
        raise ValueError(f"LoRA targets {targets!r} has an empty name; valid targets (comma-separated): {','.join(TARGETS)}")
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown) or repr(targets)}; "
                         f"valid targets (comma-separated): {','.join(TARGETS)}")
    return [t for t in TARGETS if t in names]


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model, rank, alpha, dropout=0.0, targets=DEFAULT_TARGETS, verbose=True):
    """Add LoRA adapters to the target Linears of every Block, freeze every other parameter,
    and (verbose) print how many are left to train. Returns the model (changed in place)."""
    model = unwrap(model)
    names = parse_targets(targets)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r} (lora_rank=0 means no LoRA)")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: apply them to a fresh model, or merge_lora first")
    # freeze the whole base first (embeddings, LayerNorms and biases too): the adapters made
    # below are the only parameters left with requires_grad=True
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for path, parts in LINEARS.items():
            chosen = [n for n in parts if n in names]
            if chosen:
                parent_path, attr = path.rsplit(".", 1)  # "attn", "c_attn"
                parent = block.get_submodule(parent_path)
                sizes = block.attn.qkv_sizes if path == "attn.c_attn" else None
                setattr(parent, attr, LoRALinear(getattr(parent, attr), parts, chosen, rank, alpha, dropout, sizes))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"LoRA rank {rank}, alpha {alpha}, dropout {dropout}, targets {','.join(names)}: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    return model


def set_lora_enabled(model, enabled):
    """Switch every adapter off (the base model's outputs, exactly) or on again."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.enabled = enabled


def merge_lora(model):
    """Fold every adapter into its base weight, W <- W + scale * B A, and put plain nn.Linear
    layers back: the same outputs (up to float rounding), no LoRA cost at inference, and a
    state dict an ordinary GPT loads. The adapters are folded in even if they are disabled.
    Every parameter is trainable again, as in any GPT (apply_lora froze them). Returns the
    model (changed in place)."""
    model = unwrap(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        with torch.no_grad():
            m.weight += m.delta_weight().to(m.weight.dtype)  # in place: the same Parameter
        # device="meta" builds the Linear without allocating or initialising a weight, since
        # its weight and bias are replaced by the adapted layer's at once
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        parent_path, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _adapters(model):
    """(name, Parameter) of every adapter tensor, names as in the bare model's state dict."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if n.split(".")[-2] in ("lora_A", "lora_B")]


def _settings(model):
    layers = [m for m in unwrap(model).modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA adapters (apply_lora or load_lora first)")
    first = layers[0]  # apply_lora gives every layer the same rank, alpha and dropout
    targets = [t for t in TARGETS if any(t in m.lora_A for m in layers)]
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout_p, "targets": ",".join(targets)}


def lora_state_dict(model):
    """The adapters and the settings to rebuild them: plain numbers, a string and CPU
    tensors, which torch.load(weights_only=True) reads back. A few MB at most."""
    return {**_settings(model), "tensors": {n: p.detach().cpu().clone() for n, p in _adapters(model)}}


def load_lora(model, state):
    """Load lora_state_dict's output into a model: adapters with the saved settings are added
    first if the model has none. Every adapter must be in `state` and nothing more, with the
    same shape. Returns the model."""
    model = unwrap(model)
    settings = {k: state[k] for k in ("rank", "alpha", "dropout", "targets")}
    if not has_lora(model):
        apply_lora(model, **settings, verbose=False)  # loading, not training: no counts to print
    elif _settings(model) != settings:
        raise ValueError(f"the model's LoRA settings {_settings(model)} differ from the saved ones {settings}")
    own = dict(_adapters(model))
    tensors = state["tensors"]
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"({len(missing)} and {len(unexpected)} in all); was the adapter trained on another model size?")
    with torch.no_grad():
        for name, p in own.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"LoRA tensor {name} has shape {tuple(tensors[name].shape)}, the model needs {tuple(p.shape)}")
            p.copy_(tensors[name])
    return model
