"""Llama-family models (docs/llama.md): our GPT with norm="rmsnorm", mlp="swiglu", n_kv_head and
rope_theta against transformers' LlamaForCausalLM as the reference, built from a random tiny
config and a tokenizer trained here (conftest.make_llama_folder); then the scripts on it: load,
prepare, LoRA and SFT, sample, HellaSwag, export and back. GPT-2's own tests are elsewhere and
unchanged."""

import json
import os

import pytest
import torch

import export_hf
import lora
from conftest import ROOT, make_llama_folder, run_script
from dataloader import get_tokenizer, hf_tokenizer_meta
from hf_weights import llama_config
from model import GPT, GPTConfig
from optim import configure_optimizers, newton_schulz


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def load_ours(folder):
    return GPT.from_pretrained(folder).eval()


@pytest.mark.parametrize("tie,n_kv_head", [(False, 2), (True, 1), (False, 4)])
def test_logits_equal_transformers_llama(tmp_path, tie, n_kv_head):
    """The full forward equals LlamaForCausalLM's to 1e-5: GQA (2 and 1 kv heads; 4 = plain
    multi-head), untied and tied heads, rope_theta 5000, RMSNorm eps 1e-5."""
    folder, hf = make_llama_folder(tmp_path / "m", tie=tie, n_kv_head=n_kv_head)
    model = load_ours(folder)
    assert model.config.n_kv_head == n_kv_head and model.config.tie_embeddings == tie
    assert model.config.rope_theta == 5000.0 and model.config.norm == "rmsnorm" and model.config.mlp == "swiglu"
    assert model.num_params() == sum(p.numel() for p in hf.parameters())  # every weight has its place, once
    idx = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(ours, hf_logits(hf, idx), atol=1e-5, rtol=0)


def test_kv_cache_token_by_token_equals_transformers(tiny_llama_folder):
    """Generation with the KV cache, one token at a time: every step's logits equal the
    reference's full forward over the sequence so far, and the cache holds only the kv heads."""
    folder, hf = tiny_llama_folder
    model = load_ours(folder)
    idx = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want = hf_logits(hf, idx)  # (2, 24, V)
    cache = [{"size": 24} for _ in model.transformer.h]
    with torch.no_grad():
        first = model.lm_head(model.hidden_states(idx[:, :5], kv_cache=cache, pos=0))  # a 5-token prompt
        torch.testing.assert_close(first, want[:, :5], atol=1e-5, rtol=0)
        for t in range(5, 24):
            step = model.lm_head(model.hidden_states(idx[:, t:t + 1], kv_cache=cache, pos=t))  # (2, 1, V)
            torch.testing.assert_close(step[:, 0], want[:, t], atol=1e-5, rtol=0)
    assert cache[0]["k"].shape == (2, 2, 24, 16)  # (B, n_kv_head, size, hs): half of the 4 query heads


def test_generate_greedy_equals_transformers(tiny_llama_folder):
    folder, hf = tiny_llama_folder
    model = load_ours(folder)
    prompt = torch.randint(0, hf.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, 40, temperature=0)
    recompute = model.generate(prompt, 40, temperature=0, use_cache=False)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs) and torch.equal(ours, recompute)


def test_what_cannot_be_represented_is_refused_naming_the_field(tiny_llama_folder):
    folder, _ = tiny_llama_folder
    with open(os.path.join(folder, "config.json")) as f:
        hc = json.load(f)
    cases = [({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "rope_scaling 'llama3'"),
             ({"attention_bias": True}, "attention_bias"),
             ({"mlp_bias": True}, "mlp_bias"),
             ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
             ({"head_dim": 32}, "head_dim=32"),
             ({"num_attention_heads": 0}, "num_attention_heads=0"),
             ({"num_hidden_layers": -1}, "num_hidden_layers=-1"),
             ({"rope_theta": 0, "rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta=0"),
             ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide"),
             ({"num_key_value_heads": 1000}, "num_key_value_heads=1000 must divide")]
    for change, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            llama_config({**hc, **change}, folder)
    for kind in ("qwen2", "mistral"):  # Llama-like, but with q/k/v biases or sliding windows: another type
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**hc, "model_type": kind}, f)
        with pytest.raises(ValueError, match=f"holds a {kind}"):
            GPT.from_pretrained(folder)


def test_an_hf_folder_without_a_tokenizer_is_one_line(tmp_path):
    from checkpoint import load_model
    from configurator import UserError
    folder, hf = make_llama_folder(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(folder, name))
    with pytest.raises(UserError, match="cannot load the tokenizer of"):
        load_model(init_from=folder)


# -----------------------------------------------------------------------------
# the tokenizer


def test_tokenizer_meta_bos_eot_and_fingerprint(tmp_path):
    a, _ = make_llama_folder(tmp_path / "a")
    b, _ = make_llama_folder(tmp_path / "b", seed=1)  # other weights, the same tokenizer
    meta = hf_tokenizer_meta(a)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a)
    assert meta["bos"] == [tok.bos_token_id] and meta["eot"] == tok.eos_token_id and meta["vocab_size"] == len(tok)
    other = hf_tokenizer_meta(_gpt2_like_folder(tmp_path / "d"))
    assert meta["fingerprint"] == hf_tokenizer_meta(b)["fingerprint"] != other["fingerprint"]
    assert other["bos"] == []  # a tokenizer that adds nothing before a text
    encode, decode = get_tokenizer(meta)
    text = "The queen reads a letter."
    assert encode(text) == tok(text, add_special_tokens=False)["input_ids"] and decode(encode(text)) == text


def _gpt2_like_folder(folder):
    """A tokenizer with other merges (vocab 300): its fingerprint differs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["a b c " * 50], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(folder)
    return str(folder)


def test_check_same_tokenizer_tells_hf_vocabularies_apart(tmp_path):
    from checkpoint import check_same_tokenizer
    from configurator import UserError
    meta = hf_tokenizer_meta(make_llama_folder(tmp_path / "a")[0])
    check_same_tokenizer(meta, dict(meta, path="/elsewhere"), "a", "x")  # a copy elsewhere is the same tokenizer
    with pytest.raises(UserError):
        check_same_tokenizer(meta, hf_tokenizer_meta(_gpt2_like_folder(tmp_path / "b")), "a", "x")
    with pytest.raises(UserError):
        check_same_tokenizer(meta, {"tokenizer": "gpt2"}, "a", "x")


# -----------------------------------------------------------------------------
# LoRA and Muon on grouped-query attention


def test_lora_cuts_c_attn_at_the_gqa_rows(tiny_llama_folder):
    folder, hf = tiny_llama_folder
    model = load_ours(folder)
    idx = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(idx)[0]
    lora.apply_lora(model, rank=4, alpha=8, targets="q,k,v,mlp_fc", verbose=False)
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.sizes == [64, 32, 32]  # q: 4 heads x 16, k and v: 2 heads x 16
    assert [tuple(c_attn.lora_B[n].shape) for n in "qkv"] == [(64, 4), (32, 4), (32, 4)]
    with torch.no_grad():
        assert torch.equal(model(idx)[0], base)  # B = 0: a fresh adapter changes nothing
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.1)
        adapted = model(idx)[0]
    lora.merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], adapted, atol=1e-5, rtol=0)  # merged = adapted
    # only the v rows of c_attn changed when only v is adapted
    model2 = load_ours(folder)
    w0 = model2.transformer.h[0].attn.c_attn.weight.detach().clone()
    lora.apply_lora(model2, rank=2, alpha=4, targets="v", verbose=False)
    with torch.no_grad():
        model2.transformer.h[0].attn.c_attn.lora_B["v"].fill_(0.5)
    lora.merge_lora(model2)
    changed = (model2.transformer.h[0].attn.c_attn.weight != w0).any(dim=1)
    assert not changed[:96].any() and changed[96:].all()


def test_muon_orthogonalises_q_k_v_and_gate_up_apart():
    """With GQA, c_attn's q, k, v blocks have different row counts: each is its own matrix, with
    its own shape's scale. Checked against newton_schulz on each block by hand."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=4, n_kv_head=1, n_embd=32, bias=False, rope=True,
                    norm="rmsnorm", mlp="swiglu", mlp_hidden=48, tie_embeddings=False)
    model = GPT(cfg)
    muon, _ = configure_optimizers(model, 0.0, 1e-3, (0.9, 0.95), "cpu",
                                   muon=dict(lr=0.1, momentum=0.0, weight_decay=0.0), verbose=False)
    assert [g["split"] for g in muon.param_groups] == [[32, 8, 8], 1, 2]
    c_attn, c_fc = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].mlp.c_fc.weight
    before = {id(p): p.detach().clone() for p in (c_attn, c_fc)}
    for p in (p for g in muon.param_groups for p in g["params"]):
        p.grad = torch.randn_like(p)
    grads = {id(p): p.grad.clone() for p in (c_attn, c_fc)}
    muon.step()  # momentum 0, Nesterov: the update is the orthogonalised gradient itself
    for p, sizes in ((c_attn, [32, 8, 8]), (c_fc, [48, 48])):
        want = torch.cat([newton_schulz(g, dtype=torch.float32) * max(1, g.size(0) / g.size(1)) ** 0.5
                          for g in grads[id(p)].split(sizes)])
        torch.testing.assert_close(before[id(p)] - p.detach(), 0.1 * want, atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# export and back


def test_export_is_a_llama_folder_and_the_round_trip_is_exact(tmp_path):
    from checkpoint import load_model
    from transformers import AutoTokenizer, LlamaForCausalLM
    folder, hf = make_llama_folder(tmp_path / "m")
    model, meta = load_model(init_from=folder)
    out = str(tmp_path / "exported")
    export_hf.export(model.eval(), meta, out)
    back = GPT.from_pretrained(out)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)  # bitwise
    assert back.config == model.config
    again = LlamaForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    assert torch.equal(hf_logits(again, idx), hf_logits(hf, idx))  # the very weights it came from
    tok, tok0 = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(folder)
    text = "Before winter the army will come home."
    assert tok(text)["input_ids"] == tok0(text)["input_ids"] and tok.chat_template == tok0.chat_template


def test_export_refuses_a_half_llama(tmp_path):
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm", mlp="gelu")
    reason = export_hf.why_not_exportable(GPT(cfg), {"tokenizer": "gpt2"})
    assert "mlp='gelu'" in reason and "rope=False" in reason and "bias=True" in reason


# -----------------------------------------------------------------------------
# the scripts, end to end: a Llama folder in, fine-tuned, sampled, scored and out again


@pytest.mark.slow
def test_llama_folder_through_every_script(tmp_path):
    folder, hf = make_llama_folder(tmp_path / "llama")
    with open(tmp_path / "input.txt", "w") as f:
        from conftest import LLAMA_TEXT
        f.write(LLAMA_TEXT)
    py = lambda script, *args: run_script([os.path.join(ROOT, script), *args], cwd=tmp_path)

    out = py("prepare_shakespeare.py", "--input=input.txt", f"--tokenizer={folder}", "--out_dir=data/tiny_llama")
    assert "vocabulary 320" in out.stdout
    with open(tmp_path / "data/tiny_llama/meta.json") as f:
        meta = json.load(f)
    assert meta["tokenizer"] == "hf" and meta["bos"] == [0] and meta["eot"] == 1

    # full fine-tuning from the folder, then LoRA on top of it: both save checkpoints the other scripts read
    common = ["--dataset=tiny_llama", "--block_size=64", "--batch_size=4", "--max_iters=6", "--eval_interval=3",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=0", "--device=cpu", "--compile=False"]
    py("train.py", f"--init_from={folder}", "--out_dir=out-ft", "--learning_rate=1e-3", *common)
    train = [float(l.split()[2]) for l in open(tmp_path / "out-ft/log.txt") if l.split()[1] == "train"]
    assert len(train) == 6 and train[-1] < train[0]
    py("train.py", f"--init_from={folder}", "--out_dir=out-lora", "--lora_rank=4", "--lora_targets=q,k,v",
       "--learning_rate=1e-2", *common)

    # SFT data with the tokenizer's chat template, and a short SFT run
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": f"Say the word {WORD(i)}.", "output": WORD(i)}) + "\n")
    out = py("prepare_alpaca.py", "--input=pairs.jsonl", "--out_dir=data/sft_llama", f"--tokenizer={folder}",
             "--max_len=64", "--val_fraction=0.2")
    assert "<|im_start|>assistant" in out.stdout  # the first example is shown in the chat template
    with open(tmp_path / "data/sft_llama/meta.json") as f:
        assert json.load(f)["template"] == "chat"
    py("train.py", "--init_from=out-ft", "--dataset=sft_llama", "--out_dir=out-sft", "--block_size=64",
       "--batch_size=4", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=0",
       "--device=cpu", "--learning_rate=1e-3")

    # sample (the chat template and eos from the checkpoint's meta), HellaSwag on a local file, export
    out = py("sample.py", "--out_dir=out-sft", "--start=Say the word king.", "--num_samples=1",
             "--max_new_tokens=8", "--device=cpu")
    assert "Say the word" not in out.stdout and "<|im_start|>" not in out.stdout  # the answer alone, no template
    out = py("sample.py", "--out_dir=out-lora", "--start=The king", "--num_samples=1", "--max_new_tokens=8",
             "--device=cpu", "--temperature=0")
    assert out.stdout.startswith("The king")
    with open(tmp_path / "hs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"ctx": "The king walks to the", "endings": ["castle.", "war.", "letter.", "queen."],
                                "label": i % 4}) + "\n")
    out = py("hellaswag.py", "--out_dir=out-lora", "--data_file=hs.jsonl", "--device=cpu")
    assert "over 4 examples" in out.stdout
    py("export_hf.py", "--out_dir=out-lora", "--hf_dir=hf-out")
    from transformers import LlamaForCausalLM
    exported = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf-out")).eval()
    from checkpoint import load_model
    ours, _ = load_model(out_dir=str(tmp_path / "out-lora"))
    lora.merge_lora(ours)
    idx = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, ours.eval()(idx)[0], atol=1e-5, rtol=0)


def WORD(i):
    from conftest import WORDS
    return WORDS[i % len(WORDS)]


def test_plan_sizes_a_llama_folder_from_its_config(tiny_llama_folder):
    import plan
    import train as train_script
    folder, hf = tiny_llama_folder
    cfg = dict(train_script.DEFAULTS, init_from=folder, block_size=64, lora_rank=0)
    model = plan.plan_model(cfg, {"tokenizer": "hf"})
    assert model.config.n_kv_head == 2 and model.config.mlp_hidden == 96 and model.config.block_size == 64
    assert model.num_params() == sum(p.numel() for p in hf.parameters())  # the meta-device model is the real shape


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_load(tmp_path):
    # its ids past the embedding table would crash the model (IndexError) in train.py and sample.py
    from checkpoint import load_model
    from configurator import UserError
    folder, _ = make_llama_folder(tmp_path / "m")
    with open(os.path.join(folder, "config.json")) as f:
        hc = json.load(f)
    import transformers
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in hc.items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "rms_norm_eps")}, vocab_size=hc["vocab_size"] - 10))
    small.save_pretrained(folder)  # the same tokenizer beside a model of 10 ids fewer
    with pytest.raises(UserError, match="tokenizer has .* ids but the model embeds"):
        load_model(init_from=folder)


def test_a_tied_config_with_its_own_lm_head_is_read_as_transformers_does_and_a_missing_one_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    # tie_word_embeddings true, yet the file holds an lm_head.weight unlike embed_tokens: transformers
    # keeps the two apart (and warns); our logits must be its logits, not those of a tied model
    folder, _ = make_llama_folder(tmp_path / "tied_own_head", tie=False)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(config, tie_word_embeddings=True), f)
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    ours = load_ours(folder)
    assert not ours.config.tie_embeddings
    idx = torch.randint(0, config["vocab_size"], (2, 9))
    torch.testing.assert_close(ours(idx, idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=1e-4)
    # untied with no lm_head.weight in the file: transformers would make a random one; refused in one line
    folder, _ = make_llama_folder(tmp_path / "no_head", tie=False)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    p = run_script([os.path.join(ROOT, "sample.py"), f"--init_from={folder}", "--max_new_tokens=2"], check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(errors) == 1 and "lacks the weights lm_head.weight" in errors[0] and "tie_word_embeddings" in errors[0]
