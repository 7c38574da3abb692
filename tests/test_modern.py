"""The from-scratch options (qk_norm, mlp=relu2, zero_init_proj, tie_embeddings=False) and the
Muon optimizer: each does what it says, and the rest of the project still holds with them on
(KV cache, checkpoints, export refusal, exact resume, DDP = accumulation)."""

import os

import pytest
import torch
import torch.nn.functional as F

import export_hf
import plan
import train as train_script
from checkpoint import load_model, make_checkpoint, save_checkpoint
from conftest import read_log
from model import GPT, GPTConfig, estimate_mfu, flops_per_token
from optim import Muon, configure_optimizers, newton_schulz
from test_model import assert_chunked_prefill_matches_full_forward, tiny
from test_train import ddp_equals_accumulation, train

ALL_ON = dict(qk_norm=True, mlp="relu2", zero_init_proj=True, tie_embeddings=False)
needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def randomise(model):
    """Move every tensor off its init (zero projections, unit gains), as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# -----------------------------------------------------------------------------
# the architecture options


def test_defaults_are_gpt2():
    cfg = GPTConfig()
    assert (cfg.qk_norm, cfg.mlp, cfg.zero_init_proj, cfg.tie_embeddings) == (False, "gelu", False, True)


def test_kv_cache_equals_recompute_with_every_option_on():
    for rope in (False, True):
        model = randomise(tiny(rope=rope, **ALL_ON))
        prompt = torch.randint(0, 64, (2, 5))
        # 30 new tokens with block_size 16: the context is cropped from step 12 on
        a = model.generate(prompt, 30, temperature=0, use_cache=True)
        b = model.generate(prompt, 30, temperature=0, use_cache=False)
        assert torch.equal(a, b), f"rope={rope}"
        assert_chunked_prefill_matches_full_forward(model)


def test_qk_norm_makes_attention_blind_to_the_scale_of_each_heads_queries_and_keys():
    x = torch.randint(0, 64, (2, 16))
    for qk_norm in (False, True):
        model = tiny(qk_norm=qk_norm)
        with torch.no_grad():
            before, _ = model(x)
            w = model.transformer.h[0].attn.c_attn.weight  # (3C, C): rows of q, then k, then v
            w[0:16] *= 7.0  # head 0's queries (hs = 16)
            w[32 + 16:64] *= 3.0  # head 1's keys
            after, _ = model(x)
        if qk_norm:  # the norms are per head, over hs
            assert model.transformer.h[0].attn.q_norm.weight.shape == (16,)
            assert torch.allclose(before, after, atol=1e-5)
        else:
            assert not torch.allclose(before, after, atol=1e-3)


def test_relu2_mlp_is_relu_squared():
    model = randomise(tiny(mlp="relu2"))
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2)
        assert torch.allclose(mlp(x), expected, atol=1e-6)
        assert not torch.allclose(tiny()(torch.zeros(1, 1, dtype=torch.long))[0],
                                  tiny(mlp="relu2")(torch.zeros(1, 1, dtype=torch.long))[0])


def test_zero_init_makes_every_block_the_identity_at_init():
    model = tiny(zero_init_proj=True)
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_attn.weight.std() > 0.01  # only the residual projections are zero
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        emb = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(10))
        # the whole network is embeddings -> ln_f: the blocks add exact zeros
        assert torch.equal(model.hidden_states(idx), model.transformer.ln_f(emb))


def test_untied_head_has_its_own_weight_and_is_counted_right():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert "lm_head.weight" in untied.state_dict() and "transformer.wte.weight" in untied.state_dict()
    assert untied.num_params() == tied.num_params() + 64 * 32
    # training the head leaves the embedding alone
    logits, loss = untied(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))
    loss.backward()
    wte_before = untied.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        untied.lm_head.weight -= untied.lm_head.weight.grad
    assert torch.equal(untied.transformer.wte.weight, wte_before)


def test_flops_per_token_counts_an_untied_head_once():
    model = GPT(GPTConfig(vocab_size=50257, tie_embeddings=False))
    # 124,439,808 (GPT-2 small) + a second 50257 x 768 table
    assert model.num_params() == 124_439_808 + 38_597_376
    # wte and wpe are lookups; lm_head's matmul stays: the same FLOPs as the tied model,
    # 6 * 123,653,376 + 12 * 12 * 768 * 1024 = 741,920,256 + 113,246,208
    assert model.num_params(non_embedding=True) == 123_653_376
    assert flops_per_token(model, 1024) == 855_166_464
    assert estimate_mfu(model, 1000, 1.0, 1e12) == pytest.approx(0.855166464)
    # and a tiny one by hand: blocks 2 x 12,704 + ln_f 64 + lm_head 64 x 32 = 27,520
    small = tiny(tie_embeddings=False)
    assert small.num_params() == 27_520 + 512 + 2048  # + wpe + wte
    assert flops_per_token(small, 16) == 6 * 27_520 + 12 * 2 * 32 * 16


def test_checkpoint_round_trip_keeps_the_options(tmp_path):
    model = randomise(tiny(rope=True, **ALL_ON))
    save_checkpoint(make_checkpoint(model, {"tokenizer": "gpt2"}, {}, step=1), str(tmp_path / "ckpt.pt"))
    loaded, _ = load_model(out_dir=str(tmp_path))
    for key, value in ALL_ON.items():
        assert getattr(loaded.config, key) == value
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


@pytest.mark.parametrize("option", ["qk_norm", "mlp", "tie_embeddings"])
def test_export_refuses_what_gpt2_cannot_hold_in_one_line(tmp_path, monkeypatch, capsys, option):
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    model = tiny(vocab_size=50304, **{option: ALL_ON[option]})
    save_checkpoint(make_checkpoint(model, {"tokenizer": "gpt2"}, {}, step=3), str(run / "ckpt.pt"))
    monkeypatch.setattr("sys.argv", ["export_hf.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"])
    with pytest.raises(SystemExit) as e:
        export_hf.main()
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "transformers' GPT-2 has no place" in lines[0], lines
    assert os.listdir(tmp_path) == ["run"]  # neither the folder nor a temporary one


def test_zero_init_alone_exports(tmp_path):
    # an initialisation, not an architecture: such a model is plain GPT-2
    assert export_hf.why_not_exportable(tiny(vocab_size=50304, zero_init_proj=True), {"tokenizer": "gpt2"}) is None


# -----------------------------------------------------------------------------
# Muon


def test_muon_gets_exactly_the_block_matrices():
    model = tiny(**ALL_ON)
    muon, adamw = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu",
                                             muon=dict(lr=0.02, momentum=0.95, weight_decay=0.0))
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert [g["split"] for g in muon.param_groups] == [3, 1]  # c_attn's q, k, v apart; the rest whole
    assert all(names_of(model, g["params"]) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
               for g in muon.param_groups[:1])
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    expected = sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert in_muon == expected
    decay, no_decay = [sorted(names[id(p)] for p in g["params"]) for g in adamw.param_groups]
    assert decay == ["lm_head.weight", "transformer.wpe.weight", "transformer.wte.weight"]
    assert "transformer.h.0.attn.q_norm.weight" in no_decay and "transformer.ln_f.bias" in no_decay
    assert all(names[id(p)].endswith((".bias", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
               for g in adamw.param_groups[1:] for p in g["params"])
    # every parameter is in exactly one optimizer
    assert len(in_muon) + len(decay) + len(no_decay) == len(list(model.parameters()))
    assert muon.param_groups[0]["base_lr"] == 0.02 and adamw.param_groups[0]["base_lr"] == 1e-3


def test_the_schedule_scales_both_optimizers():
    cfg = dict(train_script.DEFAULTS, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100,
               lr_decay_iters=0)
    optimizers = configure_optimizers(tiny(), 0.1, 1e-3, (0.9, 0.95), "cpu",
                                              muon=dict(lr=0.02, momentum=0.95, weight_decay=0.0))
    for step in (0, 5, 50, 100):
        lr = train_script.set_lr(optimizers, step, cfg)
        assert lr == train_script.get_lr(step, cfg)
        assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 * lr / 1e-3)  # Muon
        assert all(g["lr"] == pytest.approx(lr) for g in optimizers[1].param_groups)  # AdamW
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.002)  # at the floor: min_lr / learning_rate


def check_one_line_refusal(cfg, capsys, *words):
    with pytest.raises(SystemExit) as e:
        plan.check_settings(cfg, under_torchrun=False)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


def test_muon_with_lora_is_refused_in_one_line(capsys):
    check_one_line_refusal(dict(train_script.DEFAULTS, optimizer="muon", lora_rank=8, init_from="gpt2"), capsys, "LoRA", "AdamW")


def names_of(model, params):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


def muon_steps(opt, params, grads):
    """Run one Muon step per set of gradients; the weights after them."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


@needs_torch_muon
def test_muon_equals_torch_muon_where_the_settings_match():
    # whole matrices, bf16 Newton-Schulz: the project's Muon takes torch.optim.Muon's steps exactly
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 128), (64, 64)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    a = muon_steps(Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.01, ns_dtype=torch.bfloat16), ours, grads)
    b = muon_steps(torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.01, adjust_lr_fn="original"),
                   theirs, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_muon_split_orthogonalises_q_k_v_as_three_matrices():
    # a (3C, C) weight with split=3 moves exactly as three (C, C) weights would, each on its own;
    # the whole-matrix step is a different one
    torch.manual_seed(0)
    C = 16
    start, grads = torch.randn(3 * C, C), [[torch.randn(3 * C, C)] for _ in range(2)]
    fused = [torch.nn.Parameter(start.clone())]
    after = muon_steps(Muon([{"params": fused, "split": 3}], lr=0.02, ns_dtype=torch.float32), fused, grads)[0]
    parts = [torch.nn.Parameter(w.clone()) for w in start.chunk(3)]
    apart = muon_steps(Muon(parts, lr=0.02, ns_dtype=torch.float32), parts, [[g.chunk(3)[i] for i in range(3)]
                                                                             for [g] in grads])
    torch.testing.assert_close(after, torch.cat(apart), rtol=0, atol=1e-6)
    whole = [torch.nn.Parameter(start.clone())]
    assert not torch.allclose(muon_steps(Muon(whole, lr=0.02, ns_dtype=torch.float32), whole, grads)[0], after)


def test_newton_schulz_runs_in_bf16_only_where_it_is_native(monkeypatch):
    import optim
    muon = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    assert configure_optimizers(tiny(), 0.1, 1e-3, (0.9, 0.95), "cpu", muon=muon, verbose=False)[0].ns_dtype == torch.float32
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):  # Ampere and newer / V100, T4
        monkeypatch.setattr(optim, "native_bf16_gpu", lambda: native)
        assert configure_optimizers(tiny(), 0.1, 1e-3, (0.9, 0.95), "cuda", muon=muon, verbose=False)[0].ns_dtype == dtype
    # either way the result is about orthogonal: singular values near 1
    G = torch.randn(64, 32)
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(newton_schulz(G, dtype=dtype).float())
        assert 0.5 < s.min() and s.max() < 1.5


def test_bad_choices_are_one_line(capsys):
    check_one_line_refusal(dict(train_script.DEFAULTS, optimizer="sgd"), capsys, "adamw or muon")
    check_one_line_refusal(dict(train_script.DEFAULTS, mlp="geglu"), capsys, "gelu, relu2 or swiglu")
    check_one_line_refusal(dict(train_script.DEFAULTS, norm="batchnorm"), capsys, "layernorm or rmsnorm")
    check_one_line_refusal(dict(train_script.DEFAULTS, n_kv_head=5), capsys, "multiple of n_kv_head")
    check_one_line_refusal(dict(train_script.DEFAULTS, mlp_hidden=-1), capsys, "--mlp_hidden")


# -----------------------------------------------------------------------------
# end to end (subprocesses)

MODERN = ["--optimizer=muon", "--muon_lr=0.02", "--qk_norm", "--mlp=relu2", "--zero_init_proj", "--tie_embeddings=False"]


@pytest.mark.slow
def test_exact_resume_with_muon_and_every_option(workdir):  # noqa: F811
    train(workdir, *MODERN, "--max_iters=20", "--out_dir=out_full", "--dropout=0.1")
    train(workdir, *MODERN, "--max_iters=10", "--lr_decay_iters=20", "--out_dir=out_stop", "--dropout=0.1")
    ckpt = torch.load(workdir / "out_stop" / "ckpt.pt", weights_only=True)
    assert len(ckpt["optimizer"]) == 2  # Muon's state (momentum buffers), then AdamW's
    assert ckpt["model_args"]["mlp"] == "relu2" and ckpt["model_args"]["tie_embeddings"] is False
    train(workdir, *MODERN, "--max_iters=20", "--lr_decay_iters=20", "--out_dir=out_stop", "--dropout=0.1",
          "--init_from=resume")
    full = read_log(workdir / "out_full" / "log.txt", "train")
    resumed = read_log(workdir / "out_stop" / "log.txt", "train")
    assert sorted(resumed) == list(range(20))
    assert [resumed[i] for i in range(20)] == [full[i] for i in range(20)]  # identical, CPU fp32
    assert read_log(workdir / "out_stop" / "log.txt", "val")[20] == read_log(workdir / "out_full" / "log.txt", "val")[20]
    # the other optimizer cannot take over a run: one line
    p = train(workdir, "--max_iters=30", "--out_dir=out_stop", "--init_from=resume", *MODERN[2:], check=False)
    assert p.returncode == 2 and "optimizer=muon" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_ddp_two_processes_equal_accumulation_with_muon(workdir):  # noqa: F811
    ddp_equals_accumulation(workdir, *MODERN)
