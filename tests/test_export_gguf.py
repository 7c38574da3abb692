"""export_gguf.py: a run written as a .gguf file reads back with gguf's own reader (GGUFReader,
gguf.quants) as the same tensors (exactly in float32, to the format's rounding otherwise),
llama.cpp's hyperparameters and a working tokenizer; what GGUF cannot hold is refused in one
line with nothing written. Where llama-cpp-python is installed, llama.cpp itself runs the files
and its greedy continuations are ours."""

import json
import os

import pytest
import torch

from conftest import make_llama_folder, needs_gpt2_bpe, run_script
from test_export_hf import make_model, save_run
import export_gguf
from checkpoint import load_model

gguf = pytest.importorskip("gguf")  # requirements-dev.txt has it; without it there is nothing to test

V = 50257  # GPT-2's vocabulary; the models are padded to 50304 as train.py's are
GPT2_META = {"tokenizer": "gpt2"}


def read(path):
    """(fields {key: value}, tensors {name: (ggml type name, float32 tensor in our (out, in) layout)})."""
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, rows first: ggml's shape reversed
        tensors[t.name] = (t.tensor_type.name, torch.from_numpy(w.copy()).reshape(tuple(reversed(t.shape.tolist()))))
    return fields, tensors


def gpt2_expected(model):
    """llama.cpp's gpt2 tensors, written out from our state dict by hand: the same names as
    convert_hf_to_gguf gives a GPT2LMHeadModel, every matrix as our Linear's (out, in)."""
    sd = model.state_dict()
    exp = {"token_embd.weight": sd["transformer.wte.weight"][:V], "position_embd.weight": sd["transformer.wpe.weight"]}
    ours = {"output_norm": "transformer.ln_f"}
    for i in range(model.config.n_layer):
        ours.update({f"blk.{i}.{theirs}": f"transformer.h.{i}.{name}" for theirs, name in (
            ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj"))})
    for theirs, name in ours.items():
        exp[theirs + ".weight"] = w = sd[name + ".weight"]
        exp[theirs + ".bias"] = sd.get(name + ".bias", torch.zeros(w.size(0)))  # bias=False: zeros, the same function
    return exp


def assert_stored(got, want, qtype):
    """A tensor read back equals ours: bit for bit in F32, as torch rounds it in F16 and BF16, and
    for Q8_0 within half a step of its block (step amax / 127, itself kept as float16)."""
    if qtype == "F32":
        assert torch.equal(got, want)
    elif qtype in ("F16", "BF16"):
        assert torch.equal(got, want.to(getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[qtype])).float())
    else:
        assert qtype == "Q8_0"
        blocks = want.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        assert ((got.reshape(-1, 32) - blocks).abs() <= 0.57 * step).all()  # 0.5 + 127 x float16 rounding of the scale
        assert not torch.equal(got, want)  # rounded, so the check above had work to do


# gguf's reader takes seconds over GPT-2's 50257 tokens and 50000 merges: each GPT-2 file is
# written and read once for the whole module
GPT2_FILES = {"float32": dict(block_size=24), "q8_0": dict(bias=False, n_embd=48)}  # the model of each file


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    """file(dtype) -> (model, fields, tensors) of make_model(**GPT2_FILES[dtype]) written in dtype."""
    done = {}

    def file(dtype):
        if dtype not in done:
            path = tmp_path_factory.mktemp("gguf") / "m.gguf"
            model = make_model(**GPT2_FILES[dtype])
            export_gguf.write_gguf(str(path), model, GPT2_META, dtype, "tiny")
            done[dtype] = (model, *read(path))
        return done[dtype]
    return file


def qtype_of(name, w, dtype):
    """The type a tensor should have: F32 for norms, biases and the position table (kept as
    llama.cpp's converter keeps them), else the file's; q8_0 falls back to F16 for rows that are
    not whole blocks of 32."""
    if w.dim() == 1 or name == "position_embd.weight":
        return "F32"
    qtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    return "F16" if qtype == "Q8_0" and w.size(1) % 32 else qtype


@needs_gpt2_bpe
@pytest.mark.parametrize("dtype", list(GPT2_FILES))
def test_gpt2_tensors_read_back(gpt2_file, dtype):
    model, fields, tensors = gpt2_file(dtype)
    exp = gpt2_expected(model)
    assert set(tensors) == set(exp)  # tied: no output.weight, llama.cpp uses token_embd
    for name, (t, w) in tensors.items():
        assert t == qtype_of(name, w, dtype), name
        assert_stored(w, exp[name], t)
    if dtype == "q8_0":  # n_embd 48: only ffn_down's rows (4 x 48 = 192) are whole blocks
        assert {t for name, (t, _) in tensors.items() if name.endswith("ffn_down.weight")} == {"Q8_0"}
    assert fields["general.file_type"] == {"float32": 0, "q8_0": 7}[dtype]


@needs_gpt2_bpe
def test_gpt2_metadata_and_tokenizer(gpt2_file):
    """The hyperparameters llama.cpp reads, and a tokenizer that is GPT-2's: the file's tokens and
    merges, given to Hugging Face's `tokenizers` as a byte-level BPE, encode as tiktoken does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from dataloader import get_gpt2_encoding
    _, f, _ = gpt2_file("float32")
    assert f["general.architecture"] == "gpt2" and f["general.name"] == "tiny"
    assert (f["gpt2.context_length"], f["gpt2.embedding_length"], f["gpt2.block_count"], f["gpt2.feed_forward_length"],
            f["gpt2.attention.head_count"]) == (24, 32, 2, 128, 2)
    assert abs(f["gpt2.attention.layer_norm_epsilon"] - 1e-5) < 1e-12
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types, merges = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.merges"]
    assert len(tokens) == len(types) == V and len(merges) == V - 257
    assert tokens[V - 1] == "<|endoftext|>" and types[V - 1] == gguf.TokenType.CONTROL
    assert set(types[:V - 1]) == {gguf.TokenType.NORMAL}
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == 50256
    assert f["tokenizer.ggml.add_bos_token"] is False and "tokenizer.chat_template" not in f  # a base model
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:V - 1])}, merges=[tuple(m.split(" "))
                                                                                          for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = "First line.\n\n  Indented\ttab, it's naïve café — 日本語 🤖 numbers 12345 and   spaces  \n"
    ids = get_gpt2_encoding().encode(text)
    assert bpe.encode(text).ids == ids and bpe.decode(ids) == text


def test_alpaca_chat_template():
    """An SFT run tuned on Alpaca's template carries it as a Jinja chat template: rendered (with
    jinja2, as transformers and llama.cpp --jinja render it), a conversation reads as sample.py
    --chat puts it to the model. (test_llama_folder sees a template reach the file.)"""
    import jinja2
    from prepare_alpaca import instruction_prompt
    meta = {"tokenizer": "gpt2", "format": "sft", "template": "alpaca"}
    template = jinja2.Template(export_gguf.chat_template(meta))
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "Another?"}]
    text = template.render(messages=turns, eos_token="<|endoftext|>", add_generation_prompt=True)
    expect = instruction_prompt(meta, "Name a colour.") + "Red.<|endoftext|>" + instruction_prompt(meta, "Another?")
    assert text == expect
    assert export_gguf.chat_template({"tokenizer": "gpt2"}) is None  # a base model answers in no template


def llama_expected(hf, n_head, n_kv_head):
    """llama.cpp's llama tensors from transformers' own LlamaForCausalLM, as convert_hf_to_gguf
    makes them: q_proj and k_proj rows reordered per head from rotate_half's halves to pairs."""
    def pairs(w, heads):  # convert_hf_to_gguf's LlamaModel.permute
        return w.reshape(heads, 2, w.size(0) // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    sd = hf.state_dict()
    exp = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not hf.config.tie_word_embeddings:
        exp["output.weight"] = sd["lm_head.weight"]
    names = {"attn_norm": "input_layernorm", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_v": "self_attn.v_proj"}
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}."
        exp.update({f"blk.{i}.{ours}.weight": sd[p + theirs + ".weight"] for ours, theirs in names.items()})
        exp[f"blk.{i}.attn_q.weight"] = pairs(sd[p + "self_attn.q_proj.weight"], n_head)
        exp[f"blk.{i}.attn_k.weight"] = pairs(sd[p + "self_attn.k_proj.weight"], n_kv_head)
    return exp


@pytest.mark.parametrize("tie,dtype", [(False, "float32"), (True, "float32"), (False, "float16"),
                                      (False, "bfloat16"), (False, "q8_0")])
def test_llama_folder(tmp_path, tie, dtype):
    """A Llama-family model (GQA, RoPE base 5000, its own byte-level BPE with bos, a chat template):
    every tensor is transformers' (exactly in float32), the hyperparameters and the tokenizer are complete."""
    folder, hf = make_llama_folder(tmp_path / "llama", tie=tie)
    model, meta = load_model(init_from=folder)
    assert export_gguf.why_not_gguf(model, meta) is None
    export_gguf.write_gguf(str(tmp_path / "m.gguf"), model.eval(), meta, dtype)
    f, tensors = read(tmp_path / "m.gguf")
    exp = llama_expected(hf, 4, 2)
    assert set(tensors) == set(exp)
    for name, (t, w) in tensors.items():
        assert t == qtype_of(name, w, dtype), name
        assert_stored(w, exp[name], t)
    assert f["general.architecture"] == "llama"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (128, 64, 2, 96, 4, 2, 16, hf.config.vocab_size)
    assert f["llama.rope.freq_base"] == 5000.0 and abs(f["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert f["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    special = [f["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids(s)] for s in ("<s>", "</s>", "<|im_start|>")]
    assert special == [gguf.TokenType.CONTROL] * 3
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.chat_template"] == tok.chat_template


def test_rope_pairs_keep_attention_scores():
    """The reordering is the change of RoPE convention it claims to be: queries and keys rotated
    as ours (halves) and, reordered, as llama.cpp's llama rotates them (adjacent pairs) give the
    same scores."""
    from model import apply_rope, rope_tables
    torch.manual_seed(0)
    nh, hs, C, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(nh * hs, C), torch.randn(nh * hs, C), torch.randn(T, C)
    cos, sin = rope_tables(hs, T, 10000.0)  # (T, hs/2)

    def ours(w):  # (nh, T, hs)
        return apply_rope((x @ w.t()).view(T, nh, hs).transpose(0, 1), cos, sin)

    def llama_cpp(w):  # ggml's "normal" RoPE: (x[2i], x[2i+1]) turned by the angle of pair i
        h = (x @ export_gguf.rope_pairs(w, nh).t()).view(T, nh, hs // 2, 2).transpose(0, 1)
        a, b = h[..., 0], h[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(nh, T, hs)

    scores_ours, scores_llama_cpp = ours(wq) @ ours(wk).transpose(1, 2), llama_cpp(wq) @ llama_cpp(wk).transpose(1, 2)
    assert torch.allclose(scores_ours, scores_llama_cpp, atol=1e-4)


def spm_encode(text, tokens, scores):
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), for texts without byte fallback:
    '▁' before the text and for every space, then from single characters join, again and again,
    the adjacent pair whose joined text is a token of the highest score (the leftmost on a tie)."""
    index = {t: i for i, t in enumerate(tokens)}
    pieces = list("▁" + text.replace(" ", "▁"))
    while True:
        joins = [(scores[index[a + b]], -i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if a + b in index]
        if not joins:
            return [index[p] for p in pieces]
        i = -max(joins)[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]


def test_sentencepiece_tokenizer(tmp_path):
    """A Llama 2-style tokenizer (SentencePiece BPE with byte fallback) goes in as llama.cpp's
    "llama" tokenizer: byte tokens marked, <unk> unknown, '▁' before a text, and scores under
    which llama.cpp's way of joining pieces gives transformers' tokens."""
    from conftest import LLAMA_TEXT
    folder, _ = make_llama_folder(tmp_path / "llama", sentencepiece=True)
    model, meta = load_model(init_from=folder)
    export_gguf.write_gguf(str(tmp_path / "m.gguf"), model.eval(), meta)
    f, _ = read(tmp_path / "m.gguf")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.add_space_prefix"]) == ("llama", True)
    assert types[:5] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                         gguf.TokenType.BYTE, gguf.TokenType.BYTE]
    assert f["tokenizer.ggml.unknown_token_id"] == 0 and f["tokenizer.ggml.add_bos_token"] is True
    for line in LLAMA_TEXT.splitlines()[:40]:
        assert spm_encode(line, tokens, scores) == tok(line, add_special_tokens=False)["input_ids"], line


@needs_gpt2_bpe
def test_lora_run_is_merged(tmp_path, monkeypatch, capsys):
    import lora
    from checkpoint import make_checkpoint, save_checkpoint
    base_dir, run, out = tmp_path / "base", tmp_path / "lora_run", tmp_path / "m.gguf"
    save_run(str(base_dir), make_model())
    model = lora.apply_lora(make_model(), rank=4, alpha=8.0, targets="q,k,mlp_proj", verbose=False)
    with torch.no_grad():  # every lora_B starts at zero, adding nothing: give the adapters something to add
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                for B in m.lora_B.values():
                    B.uniform_(-0.1, 0.1)
    save_checkpoint(make_checkpoint(model, GPT2_META, {}, step=1, base=str(base_dir)), str(run / "ckpt.pt"))
    monkeypatch.setattr("sys.argv", ["export_gguf.py", f"--out_dir={run}", f"--gguf_file={out}"])
    export_gguf.main()
    assert "merged the LoRA adapters" in capsys.readouterr().out
    _, tensors = read(out)
    merged = gpt2_expected(lora.merge_lora(model))
    base = make_model().state_dict()
    for name, (_, w) in tensors.items():
        assert torch.equal(w, merged[name]), name
    assert not torch.equal(tensors["blk.0.attn_qkv.weight"][1], base["transformer.h.0.attn.c_attn.weight"])
    assert not torch.equal(tensors["blk.1.ffn_down.weight"][1], base["transformer.h.1.mlp.c_proj.weight"])


def test_rope_refused_in_one_line_writing_nothing(tmp_path):
    run = tmp_path / "run"
    save_run(str(run), make_model(rope=True))
    p = run_script(["export_gguf.py", f"--out_dir={run}", f"--gguf_file={tmp_path / 'm.gguf'}"], check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "RoPE" in lines[0], p.stderr
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("case,says", [
    ("qk_norm", "qk_norm=True"), ("relu2", "mlp='relu2'"), ("erf_gelu", "tanh approximation"),
    ("char", "character-level"), ("llama_qk_norm", "qk_norm=True"), ("exists", "--overwrite"),
    ("folder", "is a folder"), ("no_file", "--gguf_file=PATH"), ("bad_dtype", "q8_0"),
])
def test_refusals(tmp_path, monkeypatch, capsys, case, says):
    # in-process through main(), sparing an interpreter start per case
    run, out = tmp_path / "run", tmp_path / "m.gguf"
    overrides = {"qk_norm": dict(qk_norm=True), "relu2": dict(mlp="relu2"), "erf_gelu": dict(gelu="none"),
                 "llama_qk_norm": dict(norm="rmsnorm", mlp="swiglu", rope=True, bias=False, qk_norm=True)}
    meta = GPT2_META
    if case == "char":
        chars = [chr(i) for i in range(32, 97)]
        overrides[case], meta = dict(vocab_size=len(chars)), {"tokenizer": "char", "chars": chars}
    save_run(str(run), make_model(**overrides.get(case, {})), meta)
    if case == "exists":
        out.write_text("mine")
    if case == "folder":
        out.mkdir()
    argv = [f"--out_dir={run}", f"--gguf_file={out}" if case != "no_file" else "--dtype=float32"]
    monkeypatch.setattr("sys.argv", ["export_gguf.py"] + argv + (["--dtype=int4"] if case == "bad_dtype" else []))
    with pytest.raises(SystemExit) as e:
        export_gguf.main()
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    left = {"exists": ["m.gguf", "run"], "folder": ["m.gguf", "run"]}.get(case, ["run"])
    assert sorted(os.listdir(tmp_path)) == left
    if case == "exists":
        assert out.read_text() == "mine"


def test_unknown_pre_tokenizer_refused(tmp_path):
    """A byte-level BPE whose pre-tokenizer llama.cpp has no name for here (Whitespace splitting)
    is refused in one line, naming it: a wrong pre-tokenizer would tokenize differently."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    folder, _ = make_llama_folder(tmp_path / "llama", chat=False)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save_pretrained(folder)
    model, meta = load_model(init_from=folder)
    reason = export_gguf.why_not_gguf(model, meta)
    assert reason and "Whitespace" in reason and "\n" not in reason


@needs_gpt2_bpe
def test_overwrite_replaces(tmp_path, monkeypatch):
    run, out = tmp_path / "run", tmp_path / "m.gguf"
    save_run(str(run), make_model())
    out.write_text("old")
    monkeypatch.setattr("sys.argv", ["export_gguf.py", f"--out_dir={run}", f"--gguf_file={out}", "--overwrite"])
    export_gguf.main()
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_size > 10**6  # GPT-2's tokenizer alone is a megabyte
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "run"]  # no temporary file left


# -----------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python compiles it: optional, not in requirements-dev.txt). Checked
# with llama-cpp-python 0.3.36, which builds llama.cpp at commit 0c1e570 (2026-10-01): docs/gguf.md.
#
# A random tiny model has nearly flat logits, where llama.cpp's own rounding (its GELU reads a
# float16 table; float16 matmuls round activations too) could swap two near-equal tokens. So the
# matrices are scaled up (x5: a trained model's spread), and the seeds are ones whose greedy
# choices win by 10x or more what the two implementations differ by (about 1e-3 in a logit).
# The logits themselves are compared too: a wrong tensor layout moves them by 1 and more.


def llama_cpp_run(path, ids, n, text):
    """llama.cpp running the file: (its n greedy tokens after ids, its logits (len(ids) + n - 1, V)
    at every position it read on the way, its tokens of text)."""
    import numpy as np
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    try:
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        logits = torch.from_numpy(np.array(llm.scores[:llm.n_tokens]))  # the last token is chosen, not yet read
        return out, logits, llm.tokenize(text.encode(), add_bos=bool(ids[:1] == [llm.token_bos()]))
    finally:
        llm.close()


def assert_llama_cpp_runs_ours(path, model, ids, text, n=20):
    """llama.cpp's greedy continuation is ours (sample.py --temperature=0's: model.generate),
    its logits along it are ours to rounding, and its tokenizer gives ours for text."""
    theirs, logits, tokens = llama_cpp_run(path, ids, n, text)
    assert tokens == ids
    ours = model.generate(torch.tensor([ids]), n, temperature=0.0)[0]
    assert theirs == ours[len(ids):].tolist()
    with torch.no_grad():
        expect = model(ours[None, :-1])[0][0]  # (T, V): every position's
    assert torch.allclose(logits, expect, atol=1e-2, rtol=0), (logits - expect).abs().max()


def scaled(model_or_hf, factor=5.0):
    with torch.no_grad():
        for p in model_or_hf.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model_or_hf


@needs_gpt2_bpe
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_llama_cpp_gpt2(tmp_path, dtype):
    pytest.importorskip("llama_cpp")
    from dataloader import get_gpt2_encoding
    model = scaled(make_model(seed=0, block_size=64, vocab_size=V))
    if dtype == "float16":  # ours with the weights llama.cpp will compute with
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and name != "transformer.wpe.weight":  # the position table stays float32
                    p.copy_(p.half().float())
    export_gguf.write_gguf(str(tmp_path / "m.gguf"), model, GPT2_META, dtype)
    text = "The king said to the queen: my lord, the castle is ours."
    assert_llama_cpp_runs_ours(tmp_path / "m.gguf", model, get_gpt2_encoding().encode(text), text)


@pytest.mark.parametrize("sentencepiece,seed", [(False, 1), (True, 0)])
def test_llama_cpp_llama(tmp_path, sentencepiece, seed):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer
    folder, hf = make_llama_folder(tmp_path / "llama", sentencepiece=sentencepiece, seed=seed)
    scaled(hf).save_pretrained(folder)
    model, meta = load_model(init_from=folder)
    export_gguf.write_gguf(str(tmp_path / "m.gguf"), model.eval(), meta)
    text = "The king and the queen walk to the castle where a man"
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]  # with the <s> the tokenizer puts first
    assert_llama_cpp_runs_ours(tmp_path / "m.gguf", model, ids, text)
