"""
Hugging Face weights, both ways: GPT-2 (GPT2LMHeadModel) and the Llama family (LlamaForCausalLM:
SmolLM2, TinyLlama, Llama 3.2) into our GPT, and our GPT back out.

    in   read_pretrained(name_or_path) -> (GPTConfig arguments, a state dict under our names)
         GPT.from_pretrained (model.py) builds the GPT from these
    out  hf_gpt2_config / hf_gpt2_weights, hf_llama_config / hf_llama_weights
         export_hf.py writes them into a folder, with the tokenizer files

Our names follow OpenAI's GPT-2 checkpoints (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f), so GPT-2 is a copy with four transposes. A Llama's block is ours
with rope=True, bias=False, norm="rmsnorm", mlp="swiglu" (and n_kv_head for GQA): its q/k/v
projections are stacked into c_attn, gate/up into c_fc (llama_names says which rows are which).

Everything here refuses a model it cannot represent exactly, in one line (a ValueError or an
OSError), before any weights are read: the callers turn it into the user's message.
This file knows configs and state dicts only; it builds no model (model.py does), so it does
not import model.py and model.py can delegate to it.
"""

import json
import os

import torch

from configurator import quiet_offline_hub
from dataloader import EOT

OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # the GPT-2 names from_pretrained takes
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # the model types that load
GPT2_VOCAB = 50257  # GPT-2's real vocabulary: 50000 merges + 256 bytes + <|endoftext|>
# our nn.GELU(approximate=...) -> transformers' name for the same function
ACTIVATIONS = {"tanh": "gelu_new", "none": "gelu"}
# Hugging Face stores GPT-2's four matrices as Conv1D, weight (in, out): the transpose of our Linear's (out, in)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# -----------------------------------------------------------------------------
# in: a Hub name or a local folder -> our config and weights


def read_pretrained(name_or_path):
    """(GPTConfig arguments, state dict under our names) of a Hugging Face model: one of OpenAI's
    GPT-2s by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Llama-family Hub name (e.g.
    HuggingFaceTB/SmolLM2-135M), or a local folder that save_pretrained wrote. Names are
    downloaded and cached by transformers."""
    local = os.path.isdir(name_or_path)
    kind = hf_model_type(name_or_path, local)
    hf = load_hf_model(name_or_path, local, kind)
    if kind == "gpt2":
        return gpt2_config(hf.config.to_dict(), name_or_path), gpt2_weights(hf.state_dict())
    config = llama_config(hf.config.to_dict(), name_or_path)
    sd = hf.state_dict()
    if config["tie_embeddings"] and not torch.equal(sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
                                                    sd["model.embed_tokens.weight"]):
        # tie_word_embeddings, yet the file holds an lm_head.weight of its own: transformers then
        # keeps both apart (it warns), and so do we, so that the logits are its logits
        print(f"note: {name_or_path} says tie_word_embeddings but holds its own lm_head.weight: used untied, "
              "as transformers does")
        config["tie_embeddings"] = False
    return config, llama_weights(sd, config["n_layer"], config["tie_embeddings"])


def hf_model_type(name_or_path, local):
    """"gpt2" or "llama": what a name or a local folder holds, checked before any weights are
    read (a local folder's config.json; a Hub name's config, fetched by transformers)."""
    if not local and name_or_path in OPENAI_MODELS:
        return "gpt2"
    if local:
        return check_hf_folder(name_or_path)
    if "/" not in name_or_path:  # a Hub model is always OWNER/NAME
        raise OSError(f"{name_or_path!r} is neither a local Hugging Face model folder, one of "
                      f"{', '.join(OPENAI_MODELS)}, nor a Hub name (OWNER/NAME, e.g. HuggingFaceTB/SmolLM2-135M)")
    quiet_offline_hub()  # before transformers reads the setting at import
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("loading Hugging Face weights needs transformers: pip install transformers") from None
    try:
        kind = AutoConfig.from_pretrained(name_or_path).model_type
    except Exception as e:  # offline, no such repository, a gated one
        raise OSError(f"could not fetch {name_or_path!r}'s config ({type(e).__name__}): offline, misspelt, or "
                      "gated? Be online once so transformers caches it, or pass a local folder") from None
    if kind not in HF_CLASSES:
        raise ValueError(f"{name_or_path} is a {kind} model; only GPT-2 (gpt2) and Llama-family (llama) models "
                         "load here")
    return kind


def load_hf_model(name_or_path, local, kind):
    """transformers' GPT2LMHeadModel or LlamaForCausalLM, from the Hub (cached) or a local folder,
    with every way it can fail said in one line (an OSError or ValueError)."""
    if not local:
        quiet_offline_hub()
    try:
        import transformers
    except ImportError:
        raise ImportError("loading Hugging Face weights needs transformers: pip install transformers") from None
    try:
        hf, info = getattr(transformers, HF_CLASSES[kind]).from_pretrained(name_or_path, local_files_only=local,
                                                                          output_loading_info=True)
    except OSError:
        if local:
            raise
        raise OSError(f"could not load {name_or_path!r}: offline? Be online once so transformers caches it, "
                      "or pass a local folder written by save_pretrained") from None
    except Exception as e:  # a corrupt or refused weights file in a local folder
        if not local:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise OSError(f"could not read the weights in {name_or_path}: {type(e).__name__}: {first}") from None
    # transformers fills a weight the file lacks with random numbers (a warning): a model that
    # would then sample garbage is refused. (An untied Llama without lm_head.weight is the usual case.)
    missing = sorted(info["missing_keys"])
    if missing:
        hint = (": its config.json says tie_word_embeddings false; if lm_head is embed_tokens, set it true"
                if missing == ["lm_head.weight"] else "")
        raise OSError(f"{name_or_path} lacks the weights {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                      f"(transformers would fill them with random numbers){hint}")
    return hf


def check_hf_folder(path):
    """A local Hugging Face folder must hold a GPT-2 or a Llama: say plainly what else it is
    (another architecture, no weights, a broken config.json) instead of loading it half-right.
    Returns its model type; the config is checked field by field (gpt2_config, llama_config)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hc = json.load(f)
    except FileNotFoundError:
        raise OSError(f"{path} has no config.json: not a Hugging Face model folder (save_pretrained writes "
                      "one)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OSError(f"{path}/config.json is not valid JSON ({e})") from None
    kind = hc.get("model_type") if isinstance(hc, dict) else None
    if kind not in HF_CLASSES:
        raise ValueError(f"{path} holds a {kind or 'model of unknown type'} (config.json's model_type): only "
                         "GPT-2 (model_type gpt2) and Llama-family models (model_type llama) load here")
    try:  # refuses what does not fit, before the weights are read
        (gpt2_config if kind == "gpt2" else llama_config)(hc, path)
    except KeyError as e:
        raise ValueError(f"{path}/config.json has no {e.args[0]}, which a {kind} model's config must give") from None
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
        raise OSError(f"{path} has a config.json but no weights ({' or '.join(weights[:2])})")
    return kind


def gpt2_config(hc, where):
    """GPTConfig's arguments for a GPT2LMHeadModel's config (a dict), or a ValueError naming the
    field that has no place in our GPT."""
    act = hc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"{where}: activation {act!r} is not GPT-2's GELU")
    if hc.get("scale_attn_by_inverse_layer_idx") or hc.get("reorder_and_upcast_attn"):
        raise ValueError(f"{where}: non-standard GPT-2 attention options are not supported")
    defaults = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)  # GPT2Config's
    for field, default in defaults.items():
        value = hc.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {field}={value!r} must be a whole number of at least 1")
    n_embd = hc.get("n_embd", 768)
    if n_embd % hc.get("n_head", 12):
        raise ValueError(f"{where}: n_embd={n_embd} is not a multiple of n_head={hc.get('n_head', 12)}")
    if hc.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{where}: n_inner={hc['n_inner']} is not 4 x n_embd; this GPT's MLP is 4 x n_embd wide")
    return dict(block_size=hc.get("n_positions", 1024), vocab_size=hc.get("vocab_size", 50257),
                n_layer=hc.get("n_layer", 12), n_head=hc.get("n_head", 12), n_embd=n_embd, bias=True,
                gelu="none" if act == "gelu" else "tanh")


def llama_config(hc, where):
    """GPTConfig's arguments for a LlamaForCausalLM's config (a dict: config.json, or transformers'
    to_dict(), which keeps RoPE's settings in rope_parameters), or a ValueError naming the field
    we cannot represent: RoPE scaling (Llama 3.1/3.2's "llama3" long-context variant), biases,
    an activation other than SiLU, a head size other than hidden_size / num_attention_heads."""
    rope = dict(hc.get("rope_parameters") or {})
    scaling = hc.get("rope_scaling") or {}
    types = {rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
    rope_type = types.pop() if types else "default"
    if rope_type != "default":
        raise ValueError(f"{where}: rope_scaling {rope_type!r} is not supported (only plain RoPE, rope_theta alone)")
    if hc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hc['hidden_act']!r} is not supported (Llama's SwiGLU uses silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hc.get(field):
            raise ValueError(f"{where}: {field}=true is not supported (this GPT's Llama form has no biases)")
    for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(hc[field], int) or isinstance(hc[field], bool) or hc[field] < 1:
            raise ValueError(f"{where}: {field}={hc[field]!r} must be a whole number of at least 1")
    n_embd, n_head = hc["hidden_size"], hc["num_attention_heads"]
    n_kv = hc.get("num_key_value_heads") or n_head
    if not isinstance(n_kv, int) or n_kv < 1 or n_head % n_kv:
        raise ValueError(f"{where}: num_key_value_heads={n_kv!r} must divide num_attention_heads={n_head}")
    if n_embd % n_head:
        raise ValueError(f"{where}: hidden_size={n_embd} is not a multiple of num_attention_heads={n_head}")
    if hc.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"{where}: head_dim={hc['head_dim']} is not hidden_size / num_attention_heads "
                         f"= {n_embd // n_head}, which this GPT's heads are")
    theta = rope.get("rope_theta", hc.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"{where}: rope_theta={theta!r} must be positive (RoPE's base, e.g. 10000)")
    return dict(block_size=hc.get("max_position_embeddings", 2048), vocab_size=hc["vocab_size"],
                n_layer=hc["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                n_kv_head=n_kv, bias=False, rope=True,
                rope_theta=float(theta), norm="rmsnorm", norm_eps=hc.get("rms_norm_eps", 1e-6), mlp="swiglu",
                mlp_hidden=hc["intermediate_size"], tie_embeddings=bool(hc.get("tie_word_embeddings", False)))


def gpt2_weights(sd_hf):
    """A GPT2LMHeadModel's state dict under our names: the same names, its Conv1D weights
    transposed, and its causal-mask buffers left out (SDPA builds the mask itself)."""
    return {k: (w.t() if k.endswith(TRANSPOSED) else w) for k, w in sd_hf.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def llama_names(n_layer, tied):
    """Our weight names -> the LlamaForCausalLM weights they are made of, stacked along dim 0
    (both are nn.Linear, (out, in): no transposes). c_attn is q_proj, k_proj, v_proj on top of
    each other, c_fc is gate_proj over up_proj. Loading stacks, export cuts them apart."""
    names = {"transformer.wte.weight": ["model.embed_tokens.weight"], "transformer.ln_f.weight": ["model.norm.weight"]}
    if not tied:  # tied, lm_head is wte
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        names[ours + "ln_1.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "attn.c_attn.weight"] = [theirs + f"self_attn.{x}_proj.weight" for x in "qkv"]
        names[ours + "attn.c_proj.weight"] = [theirs + "self_attn.o_proj.weight"]
        names[ours + "ln_2.weight"] = [theirs + "post_attention_layernorm.weight"]
        names[ours + "mlp.c_fc.weight"] = [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"]
        names[ours + "mlp.c_proj.weight"] = [theirs + "mlp.down_proj.weight"]
    return names


def llama_weights(sd_hf, n_layer, tied):
    """A LlamaForCausalLM's state dict under our names (llama_names); a tied model's lm_head is wte."""
    names = llama_names(n_layer, tied)
    used = {k for parts in names.values() for k in parts}
    # tied models may list lm_head.weight too (the same tensor as embed_tokens); RoPE's tables are recomputed
    extra = sorted(k for k in sd_hf if k not in used and k != "lm_head.weight" and "rotary_emb" not in k)
    missing = sorted(k for k in used if k not in sd_hf)
    if extra or missing:
        raise ValueError(f"weights that do not fit: unexpected {extra[:3]}, missing {missing[:3]}")
    sd = {ours: torch.cat([sd_hf[k] for k in parts], dim=0) for ours, parts in names.items()}
    if tied:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


# -----------------------------------------------------------------------------
# out: our GPT -> GPT2LMHeadModel's or LlamaForCausalLM's config.json and weights


def is_llama(cfg):
    """A Llama-family block: RMSNorm, SwiGLU, RoPE, no biases (what from_pretrained makes of a
    LlamaForCausalLM, or a run trained with those settings)."""
    return cfg.norm == "rmsnorm" or cfg.mlp == "swiglu"


def hf_gpt2_config(cfg, dtype):
    """config.json for transformers' GPT2Config: the fields that differ from its defaults, and
    the ones a reader will look for. Dropout is off, as for inference; set resid_pdrop,
    embd_pdrop and attn_pdrop here before fine-tuning with transformers."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB,
        "n_positions": cfg.block_size,  # the size of wpe: the longest context
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # None means 4 * n_embd, as ours
        "activation_function": ACTIVATIONS[cfg.gelu],
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which ours uses
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # scores / sqrt(head size), as SDPA does
        "tie_word_embeddings": True,  # lm_head is wte: stored once, tied again on load
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "dtype": dtype,
        "use_cache": True,
    }


def hf_gpt2_weights(model, dtype):
    """Our weights under GPT2LMHeadModel's names, as a dict of separate contiguous tensors of
    torch dtype `dtype` (what safetensors stores). Our names are already GPT-2's; the differences
    are the cropped vocabulary, the Conv1D transposes and the biases a bias=False model lacks."""
    cfg = model.config
    sd = model.state_dict()
    C = cfg.n_embd
    used = set()

    def take(name, shape, transpose=False):
        if name not in sd:  # bias=False: the zero bias is the same function
            assert name.endswith(".bias"), f"{name} is missing from the model"
            return torch.zeros(shape, dtype=dtype)
        used.add(name)
        w = sd[name].detach().cpu()
        w = w.t() if transpose else w
        assert tuple(w.shape) == shape, f"{name}: {tuple(w.shape)} vs expected {shape}"
        return w.to(dtype, copy=True).contiguous()  # a copy: no storage shared with the model

    # the tied lm_head is not stored: transformers ties it to wte again (tie_word_embeddings)
    if not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise ValueError("lm_head and wte differ: the model is not tied, GPT-2's format needs them tied")
    used.add("lm_head.weight")
    wte = sd["transformer.wte.weight"][:GPT2_VOCAB]  # (50304, C) -> (50257, C): drop the padding rows
    out = {"transformer.wte.weight": wte.detach().cpu().to(dtype, copy=True).contiguous()}
    used.add("transformer.wte.weight")
    out["transformer.wpe.weight"] = take("transformer.wpe.weight", (cfg.block_size, C))
    # Conv1D weights are (in, out): the transpose of our Linear's (out, in)
    shapes = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = take(p + ln + ".weight", (C,))
            out[p + ln + ".bias"] = take(p + ln + ".bias", (C,))
        for name, (n_in, n_out) in shapes.items():
            out[p + name + ".weight"] = take(p + name + ".weight", (n_in, n_out), transpose=True)
            out[p + name + ".bias"] = take(p + name + ".bias", (n_out,))
    out["transformer.ln_f.weight"] = take("transformer.ln_f.weight", (C,))
    out["transformer.ln_f.bias"] = take("transformer.ln_f.bias", (C,))
    # every tensor of the model must have gone somewhere: a leftover (say, an unmerged LoRA
    # adapter) would otherwise be dropped without a word
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"the model has tensors GPT-2 has no place for: {', '.join(left[:4])}")
    return out


def hf_llama_config(cfg, dtype, bos, eos):
    """config.json for transformers' LlamaConfig. RoPE's base is written as rope_theta, the
    field every transformers release reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden or 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos, "eos_token_id": eos,
        "dtype": dtype,
        "use_cache": True,
    }


def hf_llama_weights(model, dtype):
    """Our weights under LlamaForCausalLM's names (torch dtype `dtype`): c_attn cut back into
    q_proj, k_proj and v_proj at attn.qkv_sizes, c_fc into gate_proj and up_proj (llama_names)."""
    cfg = model.config
    sd = model.state_dict()
    names = llama_names(cfg.n_layer, cfg.tie_embeddings)
    used = set(names) | ({"lm_head.weight"} if cfg.tie_embeddings else set())  # tied: lm_head is wte
    left = sorted(set(sd) - used)
    if left:  # say, an unmerged LoRA adapter: never dropped without a word
        raise ValueError(f"the model has tensors LlamaForCausalLM has no place for: {', '.join(left[:4])}")
    out = {}
    for ours, parts in names.items():
        w = sd[ours].detach().cpu()
        if ours.endswith("attn.c_attn.weight"):
            sizes = model.transformer.h[0].attn.qkv_sizes
        else:
            sizes = [w.size(0) // len(parts)] * len(parts)  # c_fc: gate and up, H rows each
        for name, piece in zip(parts, w.split(sizes, dim=0)):
            out[name] = piece.to(dtype, copy=True).contiguous()
    return out
