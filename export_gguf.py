"""
Export a run (or a Hugging Face model) as one .gguf file, the format llama.cpp and Ollama load.

    python export_gguf.py --out_dir=out --gguf_file=model.gguf [--dtype=q8_0]
    python export_gguf.py --init_from=HuggingFaceTB/SmolLM2-135M --gguf_file=smollm2.gguf
    llama-completion -m model.gguf -p "Once upon a time" -n 50     # then run it (docs/gguf.md)

The file is written with `gguf`, llama.cpp's own Python package, and holds everything
llama.cpp needs and nothing of ours:

  - the architecture and its hyperparameters: `gpt2` for GPT-2's block (LayerNorm, learned
    positions, GELU), `llama` for the Llama family's (RMSNorm, RoPE, SwiGLU, GQA);
  - the weights under llama.cpp's names (token_embd, blk.N.attn_qkv, ...), in float32,
    float16, bfloat16 or q8_0 (8-bit blocks of 32 with one scale each: about half of float16);
  - the tokenizer: GPT-2's BPE rebuilt from tiktoken (tokens, merges, <|endoftext|>), or a
    Hugging Face tokenizer's vocabulary, merges or scores, bos/eos and whether bos starts a
    text; and the chat template the model was tuned with, where it has one.

What reaches the file is what export_hf.py writes to a Hugging Face folder, taken the way
llama.cpp's convert_hf_to_gguf.py takes such a folder; the same checks refuse what has no form
there (why_not_exportable: RoPE on a GPT-2 block, QK-norm, ReLU^2, an untied or GQA GPT-2, a
character vocabulary...). GGUF adds its own refusals: the exact-erf GELU (llama.cpp's gpt2 graph
computes the tanh form) and a Hugging Face tokenizer whose pre-tokenizer llama.cpp has no name
for. Everything is checked before a byte is written. On the way:
  - GPT-2's four Conv1D matrices stay as our Linear's (out, in), which is what ggml wants;
  - a LoRA run is merged into its base (W + B @ A * alpha / r);
  - the llama architecture rotates (x[2i], x[2i+1]) pairs, our RoPE (and Hugging Face's)
    (x[i], x[i + hs/2]): the query and key rows of each head are reordered so that both
    compute the same thing (convert_hf_to_gguf does the same);
  - GPT-2's padded vocabulary (50304) is cropped to its 50257 tokens; a Hugging Face
    tokenizer keeps every row of the model, the rows past its last token named [PAD<id>].
Norms, biases and the position table stay float32 in every file, as llama.cpp's converter
keeps them; a q8_0 file keeps a matrix whose rows are not a multiple of 32 in float16.
The file is written under a temporary name beside --gguf_file and renamed when complete.
"""

import functools
import json
import os
import re

from configurator import UserError, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch

import lora
from checkpoint import checkpoint_path, load_checkpoint, load_model
from dataloader import EOT, eot_of, get_gpt2_encoding, get_hf_tokenizer
from export_hf import bytes_to_unicode, gpt2_merges, why_not_exportable
from hf_weights import TRANSPOSED, hf_gpt2_weights, hf_llama_weights, is_llama

# -----------------------------------------------------------------------------
# settings; override with config files or --key=value

DEFAULTS = dict(
    out_dir="",  # the run to export: its out_dir/ckpt.pt, or the .pt file it names (RUN/ckpt_best.pt)
    init_from="",  # or a Hugging Face model: gpt2 ... gpt2-xl, a Llama-family Hub name, a local HF folder
    gguf_file="",  # the file to write, e.g. model.gguf
    dtype="float32",  # the matrices' type: float32 | float16 | bfloat16 | q8_0 (8-bit, about a quarter of float32)
    overwrite=False,  # replace --gguf_file if it exists
)

# our dtype name -> (ggml's tensor type, the file type llama.cpp reports), names in gguf's enums
DTYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"), "bfloat16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# the pre-tokenizer of Llama 3's tokenizer.json (llama.cpp's "llama-bpe"): GPT-2's, with digits in threes
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs llama.cpp's gguf package: pip install gguf") from None
    return gguf


# -----------------------------------------------------------------------------
# what can be written


def why_not_gguf(model, meta):
    """A one-line reason why this model has no exact GGUF form, or None. The Hugging Face
    export's rules first (llama.cpp's gpt2 and llama are those two models), then GGUF's own."""
    reason = why_not_exportable(model, meta)
    if reason:
        return reason
    if not is_llama(model.config) and model.config.gelu != "tanh":
        return ("this model's GELU is the exact erf form (gelu='none'), but llama.cpp's gpt2 architecture computes "
                "the tanh approximation: export it to a Hugging Face folder instead (export_hf.py)")
    if meta["tokenizer"] == "hf":
        return hf_tokenizer_kind(get_hf_tokenizer(meta["path"]))[1]
    return None


def hf_tokenizer_kind(tok):
    """(kind, None) or (None, a one-line reason): how llama.cpp reads this Hugging Face tokenizer.
    kind is "gpt2" (byte-level BPE: SmolLM2, Llama 3, prepare_tokenizer.py's) with its
    pre-tokenizer's llama.cpp name, or "llama" (SentencePiece-style BPE with byte fallback: Llama 2,
    TinyLlama), as ("gpt2", pre) or ("llama", None)."""
    tj = json.loads(tok.backend_tokenizer.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        return None, (f"the tokenizer is a {model.get('type')} model; this export writes BPE tokenizers only "
                      "(byte-level, or SentencePiece-style with byte fallback)")
    if model.get("byte_fallback"):
        return ("llama", None), None
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    last = parts[-1] if parts else {}
    if types[-1:] == ["ByteLevel"] and not last.get("add_prefix_space") and not tj.get("normalizer"):
        regex = last.get("use_regex", True)  # ByteLevel's own regex is GPT-2's
        if types == ["ByteLevel"] and regex:
            return ("gpt2", "gpt-2"), None
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
            return ("gpt2", "smollm"), None  # SmolLM's: every digit on its own, then GPT-2's
        split = (parts[0].get("pattern") or {}).get("Regex")
        if types == ["Split", "ByteLevel"] and split == LLAMA3_SPLIT and not regex:
            return ("gpt2", "llama-bpe"), None
    return None, (f"the tokenizer's pre-tokenizer ({'+'.join(map(str, types)) or 'none'}"
                  f"{', with a normalizer' if tj.get('normalizer') else ''}) is none that this export names for "
                  "llama.cpp (GPT-2's, SmolLM's, Llama 3's): export a Hugging Face folder (export_hf.py) and convert "
                  "it with llama.cpp's convert_hf_to_gguf.py")


# -----------------------------------------------------------------------------
# the weights


def rope_pairs(w, n_head):
    """w (n_head * hs, ...): the rows of each head reordered from (x[i], x[i + hs/2]) pairs, our
    RoPE's, to (x[2i], x[2i+1]), the llama architecture's: row i goes to 2i, row i + hs/2 to 2i + 1.
    Queries and keys move alike, so their dot products, the attention scores, are unchanged."""
    return w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model):
    """[(llama.cpp's name, float32 tensor in ggml's layout)]: hf_weights' export of the model
    (names, cropping, zero biases, every tensor accounted for), renamed by gguf's own map from
    Hugging Face names, with the Conv1D transposes undone and the llama RoPE rows reordered."""
    gguf = import_gguf()
    cfg = model.config
    if is_llama(cfg):
        arch, tensors = gguf.MODEL_ARCH.LLAMA, hf_llama_weights(model, torch.float32)
    else:
        arch, tensors = gguf.MODEL_ARCH.GPT2, hf_gpt2_weights(model, torch.float32)
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    out = []
    for hf_name, w in tensors.items():
        if hf_name.endswith(TRANSPOSED):  # Conv1D's (in, out) back to (out, in): ggml's (ne0 = in) order
            w = w.t().contiguous()
        if hf_name.endswith("q_proj.weight"):
            w = rope_pairs(w, cfg.n_head)
        if hf_name.endswith("k_proj.weight"):
            w = rope_pairs(w, cfg.n_kv_head or cfg.n_head)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name, f"gguf has no name for {hf_name}"
        out.append((name, w))
    return out


def encode_tensor(name, w, dtype):
    """(the tensor's data as gguf writes it, its ggml type). Norms, biases and the position
    table stay float32 (llama.cpp's converter keeps them so; its kernels expect 1-D tensors in
    float32); q8_0 needs rows that are whole blocks of 32, else float16, as the converter falls back."""
    gguf = import_gguf()
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype][0])
    if w.dim() == 1 or name.endswith("_norm.weight") or name.startswith("position_embd"):
        qtype = gguf.GGMLQuantizationType.F32
    data = w.numpy()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # a row length that is not a multiple of 32
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


# -----------------------------------------------------------------------------
# the tokenizer


@functools.lru_cache(maxsize=1)  # seconds of work (the merges), the same every time
def gpt2_vocab():
    """GPT-2's BPE from tiktoken, as llama.cpp's "gpt2" tokenizer reads it: (tokens, token types,
    merges). A token is its bytes written in bytes_to_unicode's printable characters (as in
    vocab.json), a merge is its two halves so written, joined by a space (as in merges.txt)."""
    gguf = import_gguf()
    ranks = get_gpt2_encoding()._mergeable_ranks  # bytes -> id; tiktoken has no public accessor for it
    b2u = bytes_to_unicode()
    text = lambda token: "".join(b2u[b] for b in token)
    tokens = [text(token) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1])] + ["<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * EOT + [gguf.TokenType.CONTROL]  # <|endoftext|> is a control token, not text
    merges = [f"{text(a)} {text(b)}" for a, b in gpt2_merges(ranks)]
    return tokens, types, merges


def hf_vocab(tok, kind):
    """A Hugging Face tokenizer as llama.cpp reads it: (tokens, token types, merges, scores).
    Byte-level BPE ("gpt2") keeps its merges; SentencePiece-style BPE ("llama") is read by
    llama.cpp as SentencePiece reads it, joining the adjacent pair whose result scores highest:
    a token made by merge r scores -r, so the earliest merge wins, as in BPE."""
    gguf = import_gguf()
    tj = json.loads(tok.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    added = tok.added_tokens_decoder  # id -> AddedToken
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    tokens, types, scores = tok.convert_ids_to_tokens(list(range(len(tok)))), [], []
    for i, token in enumerate(tokens):
        if i in added:
            kind_of = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kind_of = gguf.TokenType.BYTE  # byte fallback: what the pieces cannot spell, byte by byte
        else:
            kind_of = gguf.TokenType.NORMAL
        if i == tok.unk_token_id:
            kind_of = gguf.TokenType.UNKNOWN
        types.append(kind_of)
        scores.append(-float(rank[token]) if token in rank and i not in added else 0.0)
    return tokens, types, merges, scores


def space_prefix(tok):
    """True where the tokenizer puts '▁' before a text (SentencePiece's add_dummy_prefix), as
    Llama 2's normalizer (Prepend) or a Metaspace pre-tokenizer does."""
    tj = json.dumps([json.loads(tok.backend_tokenizer.to_str()).get(k) for k in ("normalizer", "pre_tokenizer")])
    return '"type": "Prepend"' in tj or re.search(r'"prepend_scheme": "(first|always)"', tj) is not None


def alpaca_chat_template():
    """prepare_alpaca.py's template as a Jinja chat template (what llama.cpp and transformers
    render): each user turn in the template, each answer ended by the eos, as sample.py --chat
    puts a conversation together for an Alpaca-tuned run."""
    from prepare_alpaca import PROMPT_NO_INPUT
    before, after = PROMPT_NO_INPUT.split("{instruction}")
    return ("{% for message in messages %}{% if message['role'] == 'user' %}" + before + "{{ message['content'] }}"
            + after + "\n{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
            "{% endfor %}")


def chat_template(meta):
    """The chat template the model answers in, or None: the one its SFT data was rendered in
    (meta "template": Alpaca's or its tokenizer's), else its tokenizer's own (an instruct model's)."""
    template = meta.get("template") or ("chat" if meta.get("chat_template") else None)
    if template == "alpaca":
        return alpaca_chat_template()
    if template == "chat":
        return get_hf_tokenizer(meta["path"]).chat_template
    return None


def add_tokenizer(writer, meta, n_vocab):
    """The tokenizer.ggml.* keys and the chat template. The token list is padded to the model's
    n_vocab rows with unused [PAD<id>] entries (llama.cpp wants one token per row)."""
    gguf = import_gguf()
    eos = eot_of(meta)
    if meta["tokenizer"] == "gpt2":
        tokens, types, merges = gpt2_vocab()
        kind, pre, scores, bos, unk = "gpt2", "gpt-2", None, EOT, None
    else:
        tok = get_hf_tokenizer(meta["path"])
        (kind, pre), _ = hf_tokenizer_kind(tok)
        tokens, types, merges, scores = hf_vocab(tok, kind)
        bos, unk = (meta.get("bos") or [tok.bos_token_id])[0], tok.unk_token_id
    assert len(tokens) <= n_vocab, f"{len(tokens)} tokens for {n_vocab} rows"
    pad = range(len(tokens), n_vocab)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(pad))
    if kind == "llama":  # SentencePiece-style: scores, not merges, decide; '▁' before a text or not
        writer.add_token_scores(scores + [0.0] * len(pad))
        writer.add_add_space_prefix(space_prefix(tok))
    else:
        writer.add_token_merges(merges)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if unk is not None:
        writer.add_unk_token_id(unk)
    writer.add_add_bos_token(bool(meta.get("bos")))  # Llama's <s> before every text; GPT-2 adds nothing
    writer.add_add_eos_token(False)
    template = chat_template(meta)
    if template:
        writer.add_chat_template(template)


# -----------------------------------------------------------------------------
# the file


def add_hyperparameters(writer, cfg):
    """{arch}.* keys: llama.cpp reads its hyperparameters from these, and nothing else."""
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    if is_llama(cfg):
        writer.add_head_count_kv(cfg.n_kv_head or cfg.n_head)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)  # every channel of a head is rotated
        writer.add_vocab_size(cfg.vocab_size)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)


def write_gguf(path, model, meta, dtype="float32", name="model"):
    """Write the whole file: into a temporary sibling, renamed to path when complete."""
    gguf = import_gguf()
    cfg = model.config
    writer = gguf.GGUFWriter(None, "llama" if is_llama(cfg) else "gpt2")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, DTYPES[dtype][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, cfg)
    n_vocab = 0
    for tensor_name, w in gguf_tensors(model):
        if tensor_name == "token_embd.weight":
            n_vocab = w.size(0)  # GPT-2's cropped to 50257, a Llama's every row
        data, qtype = encode_tensor(tensor_name, w, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    add_tokenizer(writer, meta, n_vocab)

    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C: leave nothing half-written
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main():
    cfg = configure(DEFAULTS)
    if not cfg["gguf_file"]:
        die("say where to write the file: --gguf_file=PATH (e.g. model.gguf)")
    if bool(cfg["out_dir"]) == bool(cfg["init_from"]):
        die("give the run to export as --out_dir=RUN, or a Hugging Face model as --init_from=NAME_OR_FOLDER (one)")
    if cfg["dtype"] not in DTYPES:
        die(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if os.path.isdir(cfg["gguf_file"]):
        die(f"{cfg['gguf_file']} is a folder: --gguf_file names the file to write "
            f"(e.g. {cfg['gguf_file']}/model.gguf)")
    if os.path.exists(cfg["gguf_file"]) and not cfg["overwrite"]:
        die(f"{cfg['gguf_file']} already exists: add --overwrite to replace it, or choose another --gguf_file")
    print_config(cfg)
    try:
        import_gguf()
        if cfg["init_from"]:
            model, meta = load_model(init_from=cfg["init_from"])
        else:
            model, meta = load_model(out_dir=cfg["out_dir"])  # a LoRA run comes with its adapters applied
            method = (load_checkpoint(checkpoint_path(cfg["out_dir"])).get("config") or {}).get("method")
            if method == "reward":  # a score head, not next-token probabilities
                die(f"{cfg['out_dir']} is a reward model (align.py --method=reward): llama.cpp would run its "
                    "untrained lm_head without the reward head; export the policy (a DPO, PPO or SFT run) instead")
            if method == "ppo":
                print("a PPO run: its policy is exported; the value head, used only in training, is left out")
        reason = why_not_gguf(model, meta)  # a Hugging Face tokenizer is loaded here, before anything is written
        if not reason and meta["tokenizer"] == "gpt2":
            get_gpt2_encoding()  # tiktoken's files, before anything is written
    except (UserError, OSError, RuntimeError, ValueError) as e:  # no or a broken checkpoint, a base that won't load
        die(str(e))
    if reason:
        die(reason)
    if lora.has_lora(model):
        lora.merge_lora(model)  # fold B @ A into the base weights: plain weights again
        print("merged the LoRA adapters into the base weights")
    source = os.path.normpath(cfg["out_dir"] or cfg["init_from"])
    name = os.path.basename(os.path.dirname(source) if source.endswith(".pt") else source)  # the run's folder
    try:
        write_gguf(cfg["gguf_file"], model.eval(), meta, cfg["dtype"], name)
    except (OSError, UserError) as e:  # a full disk, a read-only folder (nothing was left behind)
        die(f"cannot write {cfg['gguf_file']}: {getattr(e, 'strerror', None) or e} (nothing was written)")
    print(f"wrote {cfg['gguf_file']} ({os.path.getsize(cfg['gguf_file']) / 1e6:.1f} MB, "
          f"{'llama' if is_llama(model.config) else 'gpt2'} architecture, {cfg['dtype']}): run it with "
          f"llama-completion -m {cfg['gguf_file']} -p TEXT, or see docs/gguf.md")


if __name__ == "__main__":
    main()
