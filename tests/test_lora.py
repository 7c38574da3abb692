"""LoRA on a tiny GPT (CPU, a few ms each): what the adapters change and what they must not."""

import pytest
import torch
import torch.nn as nn

import lora
from model import GPT, GPTConfig
from optim import configure_optimizers

C = 16  # n_embd of the tiny model
CFG = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=C, dropout=0.0)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG, **overrides}))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG["vocab_size"], (4, CFG["block_size"]), generator=g)
    targets = torch.randint(0, CFG["vocab_size"], (4, CFG["block_size"]), generator=g)
    return idx, targets


def logits_of(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


def train_steps(model, n=3, lr=1e-2):
    """A few AdamW steps through the model's own optimizer set-up (requires_grad params only)."""
    [opt] = configure_optimizers(model, weight_decay=0.1, learning_rate=lr, betas=(0.9, 0.95), device_type="cpu")
    model.train()
    for step in range(n):
        idx, targets = batch(seed=10 + step)
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return opt


def randomize_adapters(model, std=0.2):
    """Give every B (and A) random values, so each adapter makes a sizeable change: a
    stronger test of merge and save/load than the zero B of a fresh adapter."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, p in lora._adapters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_fresh_adapter_changes_nothing_and_keeps_base_keys():
    model = tiny_gpt()
    idx, _ = batch()
    before = logits_of(model, idx)
    base_keys = set(model.state_dict())
    lora.apply_lora(model, rank=4, alpha=8, targets=",".join(lora.TARGETS))
    assert torch.equal(logits_of(model, idx), before)  # B = 0: exactly the base model
    keys = set(model.state_dict())
    assert base_keys <= keys  # the base weights keep their names
    assert all(".lora_A." in k or ".lora_B." in k for k in keys - base_keys)
    assert "transformer.h.0.attn.c_attn.lora_A.q" in keys and "transformer.h.1.mlp.c_proj.lora_B.mlp_proj" in keys
    # the tied embedding / lm_head is never adapted
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_training_changes_only_adapters():
    model = tiny_gpt()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.1, targets="q,v,mlp_fc")
    adapters = dict(lora._adapters(model))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if k not in adapters}
    adapters_before = {k: v.clone() for k, v in adapters.items()}

    opt = train_steps(model)

    # exactly the adapter tensors sit in the optimizer and got gradients
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in adapters.values()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in adapters), name
    # every base tensor is bitwise what it was; every adapter tensor moved
    after = model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed"
    for k, v in adapters_before.items():
        assert not torch.equal(after[k], v), f"adapter tensor {k} did not train"


def test_disable_gives_base_and_merge_gives_adapted_outputs():
    model = tiny_gpt()
    idx, _ = batch()
    base_logits = logits_of(model, idx)
    lora.apply_lora(model, rank=4, alpha=8, targets=",".join(lora.TARGETS))
    randomize_adapters(model)
    adapted = logits_of(model, idx)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters do change the outputs

    lora.set_lora_enabled(model, False)
    assert torch.equal(logits_of(model, idx), base_logits)
    lora.set_lora_enabled(model, True)
    assert torch.equal(logits_of(model, idx), adapted)

    lora.merge_lora(model)
    torch.testing.assert_close(logits_of(model, idx), adapted, atol=1e-5, rtol=0)
    assert not lora.has_lora(model)
    assert all(p.requires_grad for p in model.parameters())  # an ordinary GPT: nothing frozen
    for block in model.transformer.h:
        for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert type(m) is nn.Linear
    # an independent check: the merged weights load, strictly, into an ordinary GPT
    plain = tiny_gpt(seed=99)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits_of(plain, idx), adapted, atol=1e-5, rtol=0)


def test_qk_targets_leave_values_alone():
    model = tiny_gpt()
    W0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (3C, C)
    lora.apply_lora(model, rank=2, alpha=4, targets="q,k")
    train_steps(model)
    c_attn = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        W = c_attn.weight + c_attn.delta_weight()  # the effective weight
    assert torch.equal(W[2 * C:], W0[2 * C:])  # v rows: untouched
    assert not torch.equal(W[:C], W0[:C]) and not torch.equal(W[C:2 * C], W0[C:2 * C])
    # and the same seen from the outputs: only the q and k thirds of c_attn(x) differ
    x = torch.randn(3, 5, C)
    with torch.no_grad():
        q, k, v = c_attn(x).split(C, dim=-1)
        lora.set_lora_enabled(model, False)
        q0, k0, v0 = c_attn(x).split(C, dim=-1)
    assert torch.equal(v, v0)
    assert not torch.allclose(q, q0) and not torch.allclose(k, k0)


def test_save_load_round_trip(tmp_path):
    model = tiny_gpt()
    idx, _ = batch()
    lora.apply_lora(model, rank=3, alpha=6, dropout=0.05, targets="v,q,attn_proj")
    randomize_adapters(model)
    expected = logits_of(model, idx)

    path = tmp_path / "adapter.pt"
    torch.save(lora.lora_state_dict(model), path)
    state = torch.load(path, weights_only=True)
    assert {k: state[k] for k in ("rank", "alpha", "dropout", "targets")} == \
        {"rank": 3, "alpha": 6, "dropout": 0.05, "targets": "q,v,attn_proj"}
    assert all(t.device.type == "cpu" for t in state["tensors"].values())
    assert len(state["tensors"]) == 2 * 3 * CFG["n_layer"]  # A and B, three targets, each layer

    fresh = tiny_gpt()  # the same base weights, no adapters
    lora.load_lora(fresh, state)
    assert torch.equal(logits_of(fresh, idx), expected)
    assert fresh.transformer.h[0].attn.c_attn.dropout_p == 0.05

    # strict: a missing or an unexpected tensor is an error that names it
    name = "transformer.h.1.attn.c_proj.lora_B.attn_proj"
    broken = dict(state, tensors={k: v for k, v in state["tensors"].items() if k != name})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        lora.load_lora(tiny_gpt(), broken)
    extra = dict(state, tensors={**state["tensors"], "transformer.h.0.mlp.c_fc.lora_A.mlp_fc": torch.zeros(3, C)})
    with pytest.raises(ValueError, match="lora_A.mlp_fc"):
        lora.load_lora(tiny_gpt(), extra)
    # an adapter from another model size says so, instead of a shape traceback
    with pytest.raises(ValueError):
        lora.load_lora(tiny_gpt(n_embd=32), state)


@pytest.mark.parametrize("targets,bias", [("q,v", True), (",".join(lora.TARGETS), False)])
def test_trainable_count(targets, bias, capsys):
    model = tiny_gpt(bias=bias)
    total_base = sum(p.numel() for p in model.parameters())
    r = 4
    lora.apply_lora(model, rank=r, alpha=8, targets=targets)
    # A is (r, in) and B is (out_slice, r): r * (in + out_slice) per target and layer
    shapes = {"q": (C, C), "k": (C, C), "v": (C, C), "attn_proj": (C, C), "mlp_fc": (C, 4 * C), "mlp_proj": (4 * C, C)}
    expected = CFG["n_layer"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets.split(","))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    out = capsys.readouterr().out
    assert f"{expected:,} trainable of {total_base + expected:,} parameters" in out
    assert f"({100 * expected / (total_base + expected):.3f}%)" in out


def test_lora_dropout_only_on_the_adapter_path():
    model = tiny_gpt()
    idx, _ = batch()
    base_logits = logits_of(model, idx)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.5, targets="q,v")
    randomize_adapters(model)
    model.train()
    with torch.no_grad():
        a, b = model(idx)[0], model(idx)[0]
        assert not torch.equal(a, b)  # training mode: the adapters' input is dropped at random
        lora.set_lora_enabled(model, False)
        assert torch.equal(model(idx)[0], base_logits)  # the base path sees all of x
    lora.set_lora_enabled(model, True)
    assert torch.equal(logits_of(model, idx), logits_of(model, idx))  # eval: no dropout


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="valid targets .*q,k,v,attn_proj,mlp_fc,mlp_proj") as e:
        lora.apply_lora(tiny_gpt(), rank=4, alpha=8, targets="q,query")
    assert "query" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(tiny_gpt(), rank=0, alpha=8)
    model = lora.apply_lora(tiny_gpt(), rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="differ"):
        lora.load_lora(model, {**lora.lora_state_dict(model), "rank": 2})
    with pytest.raises(ValueError, match="no LoRA"):
        lora.lora_state_dict(tiny_gpt())


def test_checkpoint_load_model_applies_the_adapter(tmp_path):
    """The contract with checkpoint.load_model: a LoRA run's ckpt.pt holds the adapters and
    the base's out_dir; loading it gives the adapted model."""
    from checkpoint import load_model, make_checkpoint, save_checkpoint
    base = tiny_gpt()
    base_dir, run_dir = tmp_path / "base", tmp_path / "lora_run"
    save_checkpoint(make_checkpoint(base, {"tokenizer": "gpt2"}, {}), str(base_dir / "ckpt.pt"))
    lora.apply_lora(base, rank=2, alpha=4, targets="q,k,v")
    randomize_adapters(base)
    idx, _ = batch()
    expected = logits_of(base, idx)
    save_checkpoint(make_checkpoint(base, {"tokenizer": "gpt2"}, {}, base=str(base_dir)), str(run_dir / "ckpt.pt"))
    model, _ = load_model(out_dir=str(run_dir))
    assert lora.has_lora(model)
    assert torch.equal(logits_of(model, idx), expected)


# -----------------------------------------------------------------------------
# end to end through the scripts: base run -> LoRA run -> resume -> sample -> HellaSwag

from conftest import ROOT, needs_gpt2_bpe, read_log, run_script  # noqa: E402

TINY_BPE = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--device=cpu",
            "--compile=False", "--dtype=float32", "--eval_iters=2", "--eval_interval=5", "--warmup_iters=1",
            "--dataset=bpe"]


def _bpe_workdir(tmp_path):
    import json
    import numpy as np
    from dataloader import write_meta, write_tokens
    rng = np.random.default_rng(0)
    words = rng.integers(0, 50257, size=40)  # a small "language": 40 token ids in random order
    d = tmp_path / "data" / "bpe"
    write_tokens(str(d / "train.bin"), words[rng.integers(0, 40, size=6000)])
    write_tokens(str(d / "val.bin"), words[rng.integers(0, 40, size=1000)])
    write_meta(str(d), {"tokenizer": "gpt2"})
    example = {"ind": 0, "activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he",
               "ctx": "A man cuts an onion. he", "split": "val", "split_type": "indomain", "label": 1,
               "endings": ["flies away.", "puts it in a pan.", "sings loudly to the moon.", "is a cat."],
               "source_id": "x"}
    with open(tmp_path / "hs.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps(dict(example, ind=i, label=i)) + "\n")
    return tmp_path


@pytest.mark.slow
@needs_gpt2_bpe
def test_lora_run_end_to_end(tmp_path):
    import os
    w = _bpe_workdir(tmp_path)
    train_py = os.path.join(ROOT, "train.py")
    run_script([train_py] + TINY_BPE + ["--max_iters=8", "--out_dir=out_base", "--learning_rate=3e-3"], cwd=w)
    lora_args = TINY_BPE + ["--init_from=out_base", "--lora_rank=4", "--lora_alpha=8.0", "--lora_dropout=0.1",
                            "--lora_targets=q,v,mlp_fc", "--learning_rate=1e-2", "--lr_decay_iters=8"]
    # uninterrupted LoRA run, and the same run stopped at 4 and resumed
    run_script([train_py] + lora_args + ["--max_iters=8", "--out_dir=out_lora"], cwd=w)
    run_script([train_py] + lora_args + ["--max_iters=4", "--out_dir=out_lora2"], cwd=w)
    run_script([train_py] + lora_args + ["--max_iters=8", "--out_dir=out_lora2", "--init_from=resume"], cwd=w)
    full, resumed = read_log(w / "out_lora" / "log.txt", "train"), read_log(w / "out_lora2" / "log.txt", "train")
    assert full == resumed and len(full) == 8

    ckpt = torch.load(w / "out_lora" / "ckpt.pt", weights_only=True)
    base_ckpt = torch.load(w / "out_base" / "ckpt.pt", weights_only=True)
    # the base by its absolute path, so the run loads from any working directory
    assert os.path.isabs(ckpt["base"]) and os.path.samefile(ckpt["base"], w / "out_base")
    assert "model" not in ckpt and ckpt["lora"]["rank"] == 4
    assert os.path.getsize(w / "out_lora" / "ckpt.pt") < os.path.getsize(w / "out_base" / "ckpt.pt") / 3
    # the base weights the LoRA run trained against are the base run's, untouched
    from checkpoint import load_model
    model, meta = load_model(out_dir=str(w / "out_lora"))  # from this test's cwd, not w
    sd = model.state_dict()
    for k, v in base_ckpt["model"].items():
        assert torch.equal(sd[k], v), k
    assert any(torch.count_nonzero(t) for k, t in ckpt["lora"]["tensors"].items() if "lora_B" in k)

    p = run_script([os.path.join(ROOT, "sample.py"), "--out_dir=out_lora", "--start=Hello", "--num_samples=1",
                    "--max_new_tokens=10", "--device=cpu"], cwd=w)
    assert p.stdout.startswith("Hello")
    p = run_script([os.path.join(ROOT, "hellaswag.py"), "--out_dir=out_lora", "--data_file=hs.jsonl",
                    "--device=cpu"], cwd=w)
    assert "acc_norm" in p.stdout and "over 3 examples" in p.stdout


@pytest.mark.slow
@needs_gpt2_bpe
def test_merged_checkpoint_is_an_ordinary_run(tmp_path):
    import os
    w = _bpe_workdir(tmp_path)
    train_py = os.path.join(ROOT, "train.py")
    run_script([train_py] + TINY_BPE + ["--max_iters=3", "--out_dir=out_base"], cwd=w)
    run_script([train_py] + TINY_BPE + ["--max_iters=3", "--out_dir=out_lora", "--init_from=out_base",
                                        "--lora_rank=2", "--learning_rate=1e-2"], cwd=w)
    run_script([os.path.join(ROOT, "checkpoint.py"), "--out_dir=out_lora", "--merged_dir=out_merged"], cwd=w)
    from checkpoint import load_model
    cwd = os.getcwd()
    os.chdir(w)
    try:
        adapted, _ = load_model(out_dir="out_lora")
        merged, meta = load_model(out_dir="out_merged")
    finally:
        os.chdir(cwd)
    assert not lora.has_lora(merged) and meta == {"tokenizer": "gpt2"}
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(adapted.eval()(x)[0], merged.eval()(x)[0], atol=1e-5)
    p = run_script([os.path.join(ROOT, "checkpoint.py"), "--out_dir=out_base", "--merged_dir=x"], cwd=w, check=False)
    assert p.returncode == 2 and "not a LoRA run" in p.stderr
    # the merge never writes over what it reads, --overwrite or not, nor over a checkpoint without it
    before = {d: (w / d / "ckpt.pt").read_bytes() for d in ("out_base", "out_lora", "out_merged")}
    for target, extra, said in (("out_lora", ["--overwrite"], "reads from"), ("out_base", ["--overwrite"], "reads from"),
                                ("out_merged", [], "--overwrite")):
        p = run_script([os.path.join(ROOT, "checkpoint.py"), "--out_dir=out_lora", f"--merged_dir={target}"] + extra,
                       cwd=w, check=False)
        assert p.returncode == 2 and said in p.stderr, p.stderr
    assert before == {d: (w / d / "ckpt.pt").read_bytes() for d in before}
    run_script([os.path.join(ROOT, "checkpoint.py"), "--out_dir=out_lora", "--merged_dir=out_merged", "--overwrite"], cwd=w)
    # a bad target is one line before any work, not a traceback after loading the base
    p = run_script([train_py] + TINY_BPE + ["--out_dir=out_bad", "--init_from=out_base", "--lora_rank=2",
                                            "--lora_targets=q,query"], cwd=w, check=False)
    assert p.returncode == 2 and "query" in p.stderr and "Traceback" not in p.stderr
    assert not (w / "out_bad").exists()
    # the base moved away: the LoRA run says which path it needs
    os.rename(w / "out_base", w / "moved")
    from configurator import UserError
    with pytest.raises(UserError, match="base .*out_base is not there"):
        load_model(out_dir=str(w / "out_lora"))
