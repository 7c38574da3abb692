"""
Export a run of ours as a Hugging Face GPT-2 folder (or, for a Llama-family model, a
LlamaForCausalLM folder: see the end of this docstring).

    python export_hf.py --out_dir=out --hf_dir=hf/my-gpt2 [--dtype=bfloat16]

The folder holds what transformers reads with no code of ours:

    config.json                      a GPT2Config (model_type "gpt2")
    model.safetensors                the weights, under the names GPT2LMHeadModel uses
    vocab.json, merges.txt           GPT-2's byte-level BPE, rebuilt from tiktoken
    tokenizer_config.json, special_tokens_map.json

so that GPT2LMHeadModel.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(hf_dir), the
Hub and lm-evaluation-harness all take it as they take OpenAI's gpt2.

What changes on the way out, and why it is exact:
  - the vocabulary padded to 50304 (for fast matmuls) is cropped back to GPT-2's 50257 rows:
    the padding rows belong to no token, so no text can ever select them;
  - a LoRA run is merged into its base first (W + B @ A * alpha / r), giving plain weights;
  - a model without biases gets zero biases, which add nothing;
  - our Linear weights are (out, in); GPT-2's Conv1D stores (in, out), so four are transposed.
What cannot be exported is refused, before anything is written: a RoPE model (transformers'
GPT-2 has a learned position table, nothing to put rotations in), a model with any of the
from-scratch options qk_norm, mlp="relu2" or tie_embeddings=False (GPT-2's block has no
query/key norms, its MLP is GELU, and its lm_head is wte; zero_init_proj only changes the
initialisation, so such a model exports), and a character-level
model (its ids are not GPT-2's tokens: the tokenizer, and every score computed through it,
would be nonsense).

A Llama-family model (norm="rmsnorm", mlp="swiglu", rope=True, bias=False: one loaded from a
LlamaForCausalLM, or trained with those settings) is written as a LlamaForCausalLM folder: its
config.json (rope_theta, n_kv_head, the MLP's width, tied or not), its weights with c_attn cut
back into q_proj, k_proj, v_proj and c_fc into gate_proj, up_proj, and its tokenizer's own
files (tokenizer.json, its chat template), so transformers and lm-evaluation-harness load it
as they load the original. No vocabulary crop: the rows are the model's.

The folder is written next to hf_dir under a temporary name and renamed at the end, so an
export that fails half way leaves nothing behind.
"""

import json
import os
import shutil

from configurator import UserError, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch

import lora
from checkpoint import checkpoint_path, load_checkpoint, load_model
from dataloader import EOT, eot_of, get_gpt2_encoding, get_hf_tokenizer
from hf_weights import (ACTIVATIONS, GPT2_VOCAB, hf_gpt2_config, hf_gpt2_weights, hf_llama_config,
                        hf_llama_weights, is_llama)

# -----------------------------------------------------------------------------
# settings; override with config files or --key=value

DEFAULTS = dict(
    out_dir="out",  # the run to export: its out_dir/ckpt.pt, or the .pt file it names (RUN/ckpt_best.pt)
    hf_dir="",  # the folder to write (must not exist yet, or be empty)
    dtype="float32",  # the weights' type in the folder: float32 or bfloat16 (half the size)
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -----------------------------------------------------------------------------
# what can be exported


def why_not_exportable(model, meta):
    """A one-line reason why this model has no exact Hugging Face form (GPT-2's, or for a
    Llama-family model LlamaForCausalLM's), or None."""
    cfg = model.config
    if meta.get("tokenizer") == "char":
        return (f"this is a character-level model ({len(meta.get('chars', []))} characters), not BPE: "
                "its ids mean nothing to a Hugging Face tokenizer, so transformers' tokenizer and lm-eval's "
                "scores would be meaningless; export models trained on BPE-tokenized data")
    if meta.get("tokenizer") not in ("gpt2", "hf"):
        return f"unknown tokenizer {meta.get('tokenizer')!r} in the checkpoint's meta (expected 'gpt2' or 'hf')"
    if is_llama(cfg):
        odd = [name for name, on in (("norm='layernorm'", cfg.norm != "rmsnorm"), ("mlp=" + repr(cfg.mlp), cfg.mlp != "swiglu"),
                                     ("rope=False", not cfg.rope), ("bias=True", cfg.bias), ("qk_norm=True", cfg.qk_norm))
               if on]
        if odd:
            return (f"this Llama-like model has {', '.join(odd)}, which LlamaForCausalLM has no place for (it is "
                    "RMSNorm, SwiGLU, RoPE, no biases, no query/key norms): export a model with all five")
        return None
    if meta.get("tokenizer") != "gpt2":
        return "a GPT-2-shaped model with a Hugging Face tokenizer has no GPT-2 form to export to (GPT-2's is tiktoken's BPE)"
    if cfg.rope:
        return ("this model uses RoPE (rope=True), but GPT-2 in transformers has learned positions (wpe) "
                "and no rotary embeddings: only models trained with rope=False can be exported")
    modern = [name for name, on in (("qk_norm=True", cfg.qk_norm), ("mlp='relu2'", cfg.mlp != "gelu"),
                                     ("tie_embeddings=False", not cfg.tie_embeddings),
                                     (f"n_kv_head={cfg.n_kv_head}", cfg.n_kv_head not in (0, cfg.n_head)),
                                     (f"mlp_hidden={cfg.mlp_hidden}", cfg.mlp_hidden not in (0, 4 * cfg.n_embd))) if on]
    if modern:
        return (f"this model uses {', '.join(modern)}, which transformers' GPT-2 has no place for (no query/key "
                "norms, a GELU MLP 4 x n_embd wide, lm_head tied to wte, every head its own keys): only models "
                "trained without these options can be exported")
    if cfg.vocab_size < GPT2_VOCAB:
        return f"the model has {cfg.vocab_size} token rows, fewer than GPT-2's {GPT2_VOCAB}"
    if cfg.gelu not in ACTIVATIONS:
        return f"GELU variant {cfg.gelu!r} has no transformers name (expected one of {', '.join(ACTIVATIONS)})"
    return None


# -----------------------------------------------------------------------------
# the model: config.json, generation_config.json and model.safetensors (hf_weights.py maps the names)


def write_model(folder, model, dtype="float32", meta=None):
    """config.json, generation_config.json and model.safetensors for `model`: a GPT-2 (learned
    positions) or a Llama-family model."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        die("exporting needs safetensors: pip install safetensors")
    if is_llama(model.config):
        eos = eot_of(meta or {"tokenizer": "gpt2"})
        bos = (meta.get("bos") or [eos])[0]
        tensors, config = hf_llama_weights(model, DTYPES[dtype]), hf_llama_config(model.config, dtype, bos, eos)
        generation = {"bos_token_id": bos, "eos_token_id": eos, "max_new_tokens": min(50, model.config.block_size // 2)}
    else:
        tensors, config = hf_gpt2_weights(model, DTYPES[dtype]), hf_gpt2_config(model.config, dtype)
        # transformers' generation defaults assume GPT-2's 1024 positions: a shorter model would
        # index past its position table, so the lengths here fit n_positions
        generation = {"bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT,
                      "max_new_tokens": min(50, model.config.block_size // 2)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    # metadata format "pt" tells transformers these are PyTorch tensors
    weights = os.path.join(folder, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    # safetensors creates its file readable by the owner only; give it the permissions every
    # other file here gets from the umask, so a shared folder is readable by all of its users
    shutil.copymode(os.path.join(folder, "config.json"), weights)


# -----------------------------------------------------------------------------
# the tokenizer: GPT-2's vocab.json and merges.txt, rebuilt from tiktoken


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters. BPE works on bytes, but
    vocab.json and merges.txt are text, split on spaces and newlines: so every byte is written
    as a visible character. The printable Latin-1 bytes stand for themselves; the other 68
    (control codes, space, ...) take the characters from 256 up, in byte order (space -> 'Ġ')."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def gpt2_merges(ranks):
    """The BPE merge list, in order, from tiktoken's token ranks (bytes -> id).

    tiktoken keeps only the tokens; merges.txt lists which two tokens make each one. The token
    of rank r was made by the r-256th merge, so its two halves are what byte-level BPE reaches
    on its bytes using only the merges before it: start from single bytes and repeatedly join
    the adjacent pair of lowest rank below r. That leaves exactly two pieces (checked)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue  # the 256 single bytes are the alphabet, not merges
        parts = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break  # no merge earlier than this token's own is left
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, f"token {token!r} (rank {rank}) does not split into two earlier tokens"
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(folder, enc, model_max_length):
    """GPT-2's tokenizer files for transformers, from tiktoken's encoding `enc`. GPT-2's ids
    are tiktoken's ranks, so the vocabulary maps each token's printable form to its rank."""
    ranks = enc._mergeable_ranks  # bytes -> id; tiktoken has no public accessor for it
    b2u = bytes_to_unicode()
    text = lambda token: "".join(b2u[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT
    assert len(vocab) == GPT2_VOCAB and sorted(vocab.values()) == list(range(GPT2_VOCAB))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # the header GPT-2's own merges.txt has; readers skip it
        for a, b in gpt2_merges(ranks):
            f.write(f"{text(a)} {text(b)}\n")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "add_prefix_space": False,  # "Hello" and " Hello" stay different tokens, as in tiktoken
            "add_bos_token": False,  # GPT-2 adds nothing to what it is given
            "model_max_length": model_max_length,
        }, f, indent=2)


# -----------------------------------------------------------------------------
# the export


def export(model, meta, hf_dir, dtype="float32"):
    """Write the whole folder: into a temporary sibling first, renamed to hf_dir at the end.
    The tokenizer: GPT-2's rebuilt from tiktoken, or a Hugging Face tokenizer's own files."""
    hf_dir = os.path.abspath(hf_dir)
    # a sibling, so the final rename stays on one file system and is atomic
    tmp = f"{hf_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a killed export with our pid, if any
    os.makedirs(tmp)
    try:
        write_model(tmp, model, dtype, meta)
        if meta["tokenizer"] == "gpt2":
            write_tokenizer(tmp, get_gpt2_encoding(), model.config.block_size)
        else:  # tokenizer.json, tokenizer_config.json (its chat template too), special_tokens_map.json
            get_hf_tokenizer(meta["path"]).save_pretrained(tmp)
        if os.path.isdir(hf_dir):
            os.rmdir(hf_dir)  # main() lets only an empty one through; Windows cannot rename onto it
        os.rename(tmp, hf_dir)
    except BaseException:  # also Ctrl-C: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main():
    cfg = configure(DEFAULTS)
    if not cfg["hf_dir"]:
        die("say where to write the folder: --hf_dir=PATH")
    if cfg["dtype"] not in DTYPES:
        die(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if os.path.exists(cfg["hf_dir"]) and (not os.path.isdir(cfg["hf_dir"]) or os.listdir(cfg["hf_dir"])):
        die(f"{cfg['hf_dir']} already exists and is not an empty folder: remove it or choose another --hf_dir")
    print_config(cfg)

    try:
        model, meta = load_model(out_dir=cfg["out_dir"])  # a LoRA run comes with its adapters applied
    except (UserError, OSError, RuntimeError, ValueError) as e:  # no or a broken checkpoint, a base that won't load
        die(str(e))
    method = (load_checkpoint(checkpoint_path(cfg["out_dir"])).get("config") or {}).get("method")
    if method == "reward":  # a score, not next-token probabilities: a causal LM's folder has no place for its head
        die(f"{cfg['out_dir']} is a reward model (align.py --method=reward): a causal LM folder would drop its "
            "reward head and keep an untrained lm_head; export the policy (a DPO, PPO or SFT run) instead")
    if method == "ppo":
        print("a PPO run: its policy is exported; the value head, used only in training, is left out")
    reason = why_not_exportable(model, meta)
    if reason:
        die(reason)
    if lora.has_lora(model):
        lora.merge_lora(model)  # fold B @ A into the base weights: plain GPT-2 weights again
        print("merged the LoRA adapters into the base weights")
    try:  # the tokenizer loads before anything is written
        get_gpt2_encoding() if meta["tokenizer"] == "gpt2" else get_hf_tokenizer(meta["path"])
    except UserError as e:
        die(str(e))

    from safetensors import SafetensorError  # what a full disk raises from inside save_pretrained

    try:
        export(model.eval(), meta, cfg["hf_dir"], cfg["dtype"])
    except (ValueError, UserError) as e:  # a model our checks let through but the format cannot hold
        die(str(e))
    except (OSError, SafetensorError) as e:  # a full disk, a read-only folder (export() left nothing behind)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        die(f"cannot write {cfg['hf_dir']}: {reason} (nothing was written; free space or choose another --hf_dir)")
    n_bytes = sum(os.path.getsize(os.path.join(cfg["hf_dir"], f)) for f in os.listdir(cfg["hf_dir"]))
    print(f"wrote {cfg['hf_dir']} ({n_bytes / 1e6:.1f} MB): load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({cfg['hf_dir']!r})")


if __name__ == "__main__":
    main()
