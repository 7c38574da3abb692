"""export_hf.py: an exported folder is the same model to transformers, reloads bit for bit, carries
GPT-2's tokenizer, and what cannot be exported is refused without writing anything."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, needs_gpt2_bpe, run_script
import export_hf
from checkpoint import make_checkpoint, save_checkpoint
from model import GPT, GPTConfig

V = 50257  # GPT-2's vocabulary; the models here are padded to 50304 as train.py's are


def make_model(seed=0, **overrides):
    """A small random GPT with every tensor random: GPT-2's init leaves biases at 0 and
    LayerNorm gains at 1, where a bias or gain put in the wrong place would go unnoticed."""
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    model = GPT(GPTConfig(**{**args, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_run(run_dir, model, meta=None):
    """A checkpoint in train.py's format (the parts export reads)."""
    save_checkpoint(make_checkpoint(model, meta or {"tokenizer": "gpt2"}, {}, step=3), os.path.join(run_dir, "ckpt.pt"))


@pytest.mark.parametrize("bias,gelu", [(True, "tanh"), (False, "none")])
def test_transformers_gives_same_logits_and_loss(tmp_path, bias, gelu):
    from transformers import GPT2LMHeadModel
    model = make_model(bias=bias, gelu=gelu)
    export_hf.write_model(str(tmp_path), model)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert hf.config.activation_function == {"tanh": "gelu_new", "none": "gelu"}[gelu]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied again

    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)[0][..., :V]  # (B, T, V): the padding rows are gone from the export
        out = hf(idx, labels=idx)  # transformers shifts the labels itself
    assert out.logits.shape == ours.shape
    assert torch.allclose(out.logits, ours, atol=1e-5, rtol=0)
    loss = F.cross_entropy(ours[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    assert abs(out.loss.item() - loss.item()) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_is_bitwise(tmp_path, bias):
    from safetensors.torch import load_file
    model = make_model(bias=bias)
    export_hf.write_model(str(tmp_path), model)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in stored  # tied: stored once, as wte
    if not bias:  # zero biases, 6 a layer and ln_f's: the same function as none
        biases = [k for k in stored if k.endswith(".bias")]
        assert len(biases) == 2 * 6 + 1 and all(not stored[k].any() for k in biases)

    back = GPT.from_pretrained(str(tmp_path))
    assert back.lm_head.weight is back.transformer.wte.weight
    assert back.config.vocab_size == V and back.config.block_size == 16
    theirs = back.state_dict()
    for k, w in model.state_dict().items():
        expect = w[:V] if k in ("transformer.wte.weight", "lm_head.weight") else w
        assert torch.equal(theirs[k], expect), k
    for k in set(theirs) - set(model.state_dict()):  # only the biases a bias=False model lacks
        assert k.endswith(".bias") and not theirs[k].any(), k


def test_bfloat16(tmp_path):
    from safetensors.torch import load_file
    model = make_model()
    export_hf.write_model(str(tmp_path), model, "bfloat16")
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert {w.dtype for w in stored.values()} == {torch.bfloat16}
    wpe = model.transformer.wpe.weight
    assert torch.equal(stored["transformer.wpe.weight"], wpe.to(torch.bfloat16))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_bytes_to_unicode_and_merges():
    # GPT-2's printable stand-ins for bytes: space is 'Ġ' and newline 'Ċ', as in its vocab.json
    b2u = export_hf.bytes_to_unicode()
    assert len(set(b2u.values())) == 256 and b2u[ord(" ")] == "Ġ" and b2u[ord("\n")] == "Ċ" and b2u[ord("a")] == "a"
    # "abc" could be a+bc or ab+c, both earlier tokens; BPE reaches it through ab (rank 3 < 4)
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"cc": 6, b"cccc": 7}
    assert export_hf.gpt2_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"c"), (b"cc", b"cc")]


@pytest.mark.slow
@needs_gpt2_bpe
def test_train_export_reload(tmp_path, monkeypatch, capsys):
    """A model trained 3 steps by train.py, then exported: transformers gives its logits and
    loss, GPT.from_pretrained its exact weights, AutoTokenizer tiktoken's ids."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from checkpoint import load_model
    from dataloader import get_gpt2_encoding, write_meta, write_tokens
    # a tiny GPT-2-tokenized dataset: random ids (training only needs ids, not sense)
    rng = torch.Generator().manual_seed(0)
    data = tmp_path / "data" / "tiny"
    write_tokens(str(data / "train.bin"), torch.randint(0, V, (4000,), generator=rng).numpy())
    write_tokens(str(data / "val.bin"), torch.randint(0, V, (1000,), generator=rng).numpy())
    write_meta(str(data), {"tokenizer": "gpt2"})
    run_script([os.path.join(ROOT, "train.py"), "--dataset=tiny", "--out_dir=run", "--n_layer=2", "--n_head=2",
                "--n_embd=32", "--block_size=16", "--batch_size=2", "--max_iters=3", "--warmup_iters=1",
                "--eval_interval=0", "--eval_iters=1", "--device=cpu", "--compile=False", "--dtype=float32"],
               cwd=tmp_path)
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    # main() in-process: the command line itself is run by the RoPE test; this spares an interpreter start
    monkeypatch.setattr("sys.argv", ["export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"])
    export_hf.main()
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["data", "hf", "run"]  # no temporary folder left behind
    assert sorted(os.listdir(hf_dir)) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                          "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]

    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    back = GPT.from_pretrained(str(hf_dir)).state_dict()
    for k, w in ckpt["model"].items():
        assert torch.equal(back[k], w[:V] if k in ("transformer.wte.weight", "lm_head.weight") else w), k

    model, _ = load_model(out_dir=str(run))
    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    idx = torch.randint(0, V, (2, 16), generator=rng)
    with torch.no_grad():
        ours = model.eval()(idx)[0][..., :V]
        out = hf(idx, labels=idx)
    assert torch.allclose(out.logits, ours, atol=1e-5, rtol=0)
    loss = F.cross_entropy(ours[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    assert abs(out.loss.item() - loss.item()) < 1e-5

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    text = ("First line.\n\n  Indented\ttab, 'quotes' it's\r\nnaïve café — 日本語 ∑ 🤖👍🏽 "
            "<|endoftext|>A new document   with trailing spaces   \n")
    ids = get_gpt2_encoding().encode(text, allowed_special={"<|endoftext|>"})
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.bos_token_id == 50256 and len(tok) == V
    assert tok.model_max_length == 16


@needs_gpt2_bpe
def test_lora_run_is_merged(tmp_path, monkeypatch):
    import lora
    from transformers import GPT2LMHeadModel
    base_dir, run, hf_dir = tmp_path / "base", tmp_path / "lora_run", tmp_path / "hf"
    save_run(str(base_dir), make_model())
    model = lora.apply_lora(make_model(), rank=2, alpha=4.0, targets="q,v,mlp_fc")
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_checkpoint(make_checkpoint(model, {"tokenizer": "gpt2"}, {}, step=1, base=str(base_dir)), str(run / "ckpt.pt"))
    monkeypatch.setattr("sys.argv", ["export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"])
    export_hf.main()
    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_adapters = model(idx)[0][..., :V]
        assert torch.allclose(hf(idx).logits, with_adapters, atol=1e-5, rtol=0)
        lora.set_lora_enabled(model, False)
        assert not torch.allclose(hf(idx).logits, model(idx)[0][..., :V], atol=1e-3)  # the adapters mattered


def test_rope_refused_in_one_line_writing_nothing(tmp_path):
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    save_run(str(run), make_model(rope=True))
    p = run_script(["export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"], check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "RoPE" in lines[0], p.stderr
    assert os.listdir(tmp_path) == ["run"]  # neither the folder nor a temporary one


@pytest.mark.parametrize("case", ["char", "hf_dir_not_empty"])
def test_other_refusals(tmp_path, monkeypatch, capsys, case):
    # in-process through main(), to spare the test a second interpreter start
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    if case == "char":
        chars = [chr(i) for i in range(32, 97)]
        save_run(str(run), make_model(vocab_size=len(chars)), {"tokenizer": "char", "chars": chars})
    else:
        save_run(str(run), make_model())
        hf_dir.mkdir()
        (hf_dir / "keep.txt").write_text("mine")
    monkeypatch.setattr("sys.argv", ["export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"])
    with pytest.raises(SystemExit) as e:
        export_hf.main()
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert {"char": "character-level", "hf_dir_not_empty": "already exists"}[case] in lines[0]
    if case == "char":
        assert os.listdir(tmp_path) == ["run"]
    else:
        assert sorted(os.listdir(tmp_path)) == ["hf", "run"] and os.listdir(hf_dir) == ["keep.txt"]


@needs_gpt2_bpe
def test_pipeline_generates_from_a_short_context_model(tmp_path):
    """transformers' text-generation pipeline on an export whose context is far below GPT-2's
    1024: its generation defaults must fit the model's position table."""
    from transformers import pipeline
    model = make_model()  # block_size 32
    export_hf.export(model, {"tokenizer": "gpt2"}, str(tmp_path / "hf"))
    out = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")("Hello,", do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("Hello,") and len(text) > len("Hello,")
