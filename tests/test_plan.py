"""plan.py: the checks that stop a run before it starts."""

import pytest

import plan
import train


@pytest.mark.parametrize("fmt, stopped", [(None, False), ("sft", True)])
def test_no_gpu_estimate_counts_instruction_examples_as_whole_blocks(tmp_path, monkeypatch, capsys, fmt, stopped):
    # 64 per step x 2300 steps at 124M: 147k tokens would be 25 minutes (it runs); 64 examples of
    # up to 512 tokens are ~200 hours (stopped up front)
    from dataloader import write_meta
    monkeypatch.chdir(tmp_path)
    write_meta("data/d", dict({"tokenizer": "gpt2"}, **({"format": fmt, "template": "alpaca"} if fmt else {})))
    cfg = dict(train.DEFAULTS, dataset="d", device="auto", n_layer=12, n_embd=768, block_size=512,
               batch_size=16, total_batch_size=64, max_iters=2300)
    if stopped:
        with pytest.raises(SystemExit):
            plan.check_gpu_recipe(cfg, "cpu")
        assert "hours" in capsys.readouterr().err
    else:
        plan.check_gpu_recipe(cfg, "cpu")  # returns
    plan.check_gpu_recipe(dict(cfg, device="cpu"), "cpu")  # asked for the CPU: always runs


# -----------------------------------------------------------------------------
# --plan

import glob  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from configurator import configure  # noqa: E402
from conftest import ROOT, run_script  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optim import configure_optimizers  # noqa: E402

RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "config", "*.py"))
                 if not os.path.basename(p).startswith(("align_", "vision_")))  # (align.py's, train_vision.py's)
# the recipes sized for a node: their steps divide over 8 GPUs; the rest are one-GPU (or CPU) runs
NODE_RECIPES = {"gpt2_124m.py", "gpt2_124m_modern.py", "gpt2_355m.py", "gpt2_1.3b.py"}


def modes(path):
    """The launches a recipe is made for: one GPU always; DDP and FSDP on 8 for node recipes,
    FSDP except where it is refused by design (LoRA adapters)."""
    cfg = configure(train.DEFAULTS, [path])
    out = [["--plan_world=1"]]
    if os.path.basename(path) in NODE_RECIPES:
        out.append(["--plan_world=8"])
        if cfg["lora_rank"] == 0:
            out.append(["--plan_world=8", "--fsdp"])
    return out


def test_every_recipe_passes_plan_in_every_mode_it_is_made_for(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data prepared here: the plan needs none
    monkeypatch.delenv("RANK", raising=False)
    assert {os.path.basename(p) for p in RECIPES} >= NODE_RECIPES
    planned = 0
    for path in RECIPES:
        for extra in modes(path):
            cfg = configure(train.DEFAULTS, [path, "--plan"] + extra)
            try:
                plan.print_plan(cfg)
            except SystemExit:
                pytest.fail(f"{os.path.basename(path)} {' '.join(extra)} was refused: {capsys.readouterr().err}")
            out = capsys.readouterr().out
            assert "memory per GPU" in out and "time" in out, out
            planned += 1
    assert planned >= len(RECIPES) + 8  # the node recipes in DDP, and in FSDP
    assert os.listdir(tmp_path) == []  # nothing written


def test_plan_of_the_sharded_1_3b_run_prints_its_memory_per_gpu(tmp_path):
    p = run_script([os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "gpt2_1.3b.py"), "--fsdp", "--plan",
                    "--plan_world=8"], cwd=tmp_path)
    assert "8 GPU(s), FSDP" in p.stdout and "1,048,576 tokens per step = 8 x 1024 x 8 ranks x 16" in p.stdout
    total = float(p.stdout.split("memory per GPU")[1].split()[0])
    ddp = run_script([os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "gpt2_1.3b.py"), "--plan",
                      "--plan_world=8"], cwd=tmp_path).stdout
    assert 10 < total < float(ddp.split("memory per GPU")[1].split()[0])  # GiB: sharding saves memory
    assert os.listdir(tmp_path) == []
    # the checks are the real run's, for the world planned: FSDP on one GPU is refused
    p = run_script([os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "gpt2_1.3b.py"), "--fsdp", "--plan"],
                   cwd=tmp_path, check=False)
    assert p.returncode == 2 and "torchrun" in p.stderr and "Traceback" not in p.stderr


def measured_saved_bytes(config, B, T, dtype, sharded):
    torch.manual_seed(0)
    return plan.saved_bytes(GPT(config), B, T, dtype, sharded)


@pytest.mark.parametrize("options", [{}, dict(rope=True, qk_norm=True, mlp="relu2", bias=False),
                                     dict(rope=True, norm="rmsnorm", mlp="swiglu", mlp_hidden=256, n_kv_head=1, bias=False)])
@pytest.mark.parametrize("dtype, sharded", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_activation_estimate_scales_to_a_bigger_model(options, dtype, sharded):
    # the plan measures two small models and scales; measured directly, a model of another
    # depth, width, vocabulary and micro-batch saves what the scaled figure says
    config = GPTConfig(block_size=96, vocab_size=300, n_layer=3, n_head=3, n_embd=96, **options)
    per_block, head = plan.activation_bytes(config, 3, 96, dtype, sharded)
    measured = measured_saved_bytes(config, 3, 96, dtype, sharded)
    assert measured == pytest.approx(per_block * 3 + head, rel=0.05)


def test_weights_gradients_and_optimizer_state_are_what_torch_allocates():
    # one AdamW step on a CPU model: its parameters, gradients and moments, in bytes, are the
    # plan's figures for one GPU (and FSDP's are those over the ranks)
    cfg = dict(train.DEFAULTS, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=2)
    model = GPT(plan.model_config(cfg, vocab_size=64))
    opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)[0]
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    mem = plan.memory_per_gpu(model, cfg, 1, False, torch.bfloat16)
    assert mem["weights (fp32)"] == nbytes(model.parameters())
    assert mem["gradients (fp32)"] == nbytes(p.grad for p in model.parameters())
    assert mem["optimizer state"] == nbytes(t for s in opt.state.values() for t in s.values() if t.dim() > 0)
    sharded = plan.memory_per_gpu(model, cfg, 8, True, torch.bfloat16)
    for part in ("weights (fp32)", "gradients (fp32)", "optimizer state"):
        assert sharded[part] == mem[part] / 8


def test_setting_notes_say_what_may_not_be_meant(monkeypatch):
    cfg = dict(train.DEFAULTS, max_iters=200, lr_decay_iters=2000, total_batch_size=0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notes = plan.setting_notes(cfg, world_size=2, device_type="cpu")
    assert len(notes) == 2 and "lr_decay_iters=2000 is past max_iters=200" in notes[0] and "2x the batch" in notes[1]
    assert plan.setting_notes(dict(cfg, lr_decay_iters=0, total_batch_size=8192), 2, "cpu") == []
    assert plan.setting_notes(dict(cfg, decay_lr=False), 1, "cpu") == []  # no decay: nothing to say
    # (the CPU's thread count is no note: train.py times it, runtime.ThreadPicker)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert not plan.setting_notes(dict(cfg, lr_decay_iters=0), 1, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--optimizer=muon"], ["--lora_rank=4", "--init_from=base"]])
def test_the_checkpoints_plan_counts_are_the_files_train_writes(tmp_path, monkeypatch, extra):
    """--plan's checkpoint size against the ckpt.pt a real run writes (whole model and AdamW or
    Muon state; a LoRA run: adapters only), its count of saves, and each save's time in the log."""
    from conftest import read_log
    from dataloader import write_meta, write_tokens
    write_meta(str(tmp_path / "data" / "d"), {"tokenizer": "char", "chars": [chr(65 + i) for i in range(40)]})
    ids = torch.randint(0, 40, (5000,)).tolist()
    write_tokens(str(tmp_path / "data" / "d" / "train.bin"), ids)
    write_tokens(str(tmp_path / "data" / "d" / "val.bin"), ids[:1000])
    tiny = ["--dataset=d", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--batch_size=4",
            "--device=cpu", "--compile=False", "--dtype=float32", "--eval_iters=1", "--eval_interval=0"]
    if "--init_from=base" in extra:
        run_script([os.path.join(ROOT, "train.py"), *tiny, "--max_iters=1", "--out_dir=base"], cwd=tmp_path)
    args = tiny + extra + ["--max_iters=7", "--checkpoint_interval=3", "--out_dir=out"]
    p = run_script([os.path.join(ROOT, "train.py"), *args, "--plan"], cwd=tmp_path)
    assert any(l.split()[:2] == ["checkpoints", "3"] for l in p.stdout.splitlines()), p.stdout  # at 3, 6 and 7
    run_script([os.path.join(ROOT, "train.py"), *args], cwd=tmp_path)
    assert len(read_log(tmp_path / "out" / "log.txt", "save_s")) == 3
    monkeypatch.chdir(tmp_path)
    cfg = configure(train.DEFAULTS, args)
    planned = plan.checkpoint_bytes(plan.plan_model(cfg, plan.plan_meta(cfg)[0]), cfg)
    size = os.path.getsize(tmp_path / "out" / "ckpt.pt")
    # the file adds names, settings, the RNG and loader state: a few tens of kB, whatever the model
    assert planned <= size < 1.05 * planned + 32_000, (planned, size)


def test_the_fsdp_trades_are_in_the_memory_estimate(capsys):
    # fsdp_full_grads holds the whole model's fp32 gradients on every rank, fsdp_reshard=False
    # every Block's 16-bit weights: --plan's parts grow by exactly that; without --fsdp they are refused
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512))
    cfg = dict(train.DEFAULTS, batch_size=2, block_size=64)
    P = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    base = plan.memory_per_gpu(model, cfg, 8, True, torch.bfloat16)
    full = plan.memory_per_gpu(model, dict(cfg, fsdp_full_grads=True), 8, True, torch.bfloat16)
    kept = plan.memory_per_gpu(model, dict(cfg, fsdp_reshard=False), 8, True, torch.bfloat16)
    assert base["gradients (fp32)"] == 4 * P / 8 and full["gradients (fp32)"] == 4 * P
    assert kept["gathered weights"] - base["gathered weights"] == 2 * block * (4 - 2)
    with pytest.raises(SystemExit):
        plan.check_settings(dict(train.DEFAULTS, fsdp_full_grads=True), under_torchrun=True)
    assert "add --fsdp" in capsys.readouterr().err
