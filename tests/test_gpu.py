"""The checks that need an NVIDIA GPU: `python -m pytest tests/ -m gpu -rs` runs them (each one
skips where there is no CUDA). They prove on the real device what the CPU tests cannot: bf16 and
compile train like fp32, attention runs the flash kernel, a steady-state step never waits for
the GPU, the KV cache holds in bf16, and --plan's memory estimate is near what the allocator
reports. Sized for one H100 or H200 in a few minutes; gpu_check.py runs them as its part 3, beside
train.py under torchrun and the speed figures."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]


def gpt2_124m():
    from model import GPT, GPTConfig, PRESETS
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=1024, vocab_size=50304, **PRESETS["gpt2"])).cuda()


def learnable_batches(n, B, T, seed=0):
    """n (x, y) batches of a text-like stream: a fixed sequence of 2,000 random tokens repeated,
    so the loss falls fast and two numerics can be compared on a curve that moves."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 50257, (2000,), generator=g)
    stream = pattern.repeat((n * B * (T + 1)) // 2000 + 2)
    rows = stream[: n * B * (T + 1)].view(n, B, T + 1)
    return [(r[:, :-1].cuda(), r[:, 1:].cuda()) for r in rows]


def train_losses(model, batches, dtype, steps):
    from configurator import autocast_context
    from optim import configure_optimizers
    opt = configure_optimizers(model, 0.1, 6e-4, (0.9, 0.95), "cuda", verbose=False)[0]
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        with autocast_context("cuda", dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_and_compile_train_like_fp32_eager():
    # 20 steps of GPT-2 124M: bf16 autocast under torch.compile against fp32 eager (TF32 off),
    # the same weights and batches. Tolerance: 0.05 nats at every step (bf16 rounds to ~3
    # significant digits; the loss starts near 11 and falls by more than 0.5 over these steps)
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = learnable_batches(4, 8, 1024)
    ref = train_losses(gpt2_124m(), batches, torch.float32, 20)
    fast = train_losses(torch.compile(gpt2_124m()), batches, torch.bfloat16, 20)
    torch.backends.cuda.matmul.allow_tf32 = True
    print("fp32 eager:", [round(v, 3) for v in ref])
    print("bf16 compile:", [round(v, 3) for v in fast])
    assert ref[-1] < ref[0] - 0.5  # the curve moves
    assert max(abs(a - b) for a, b in zip(ref, fast)) < 0.05


def test_bf16_compiled_trains_like_bf16_eager():
    # the compiler alone: the same bf16 autocast, compiled against eager, 20 steps of 124M on the
    # same weights and batches. Tighter than against fp32: only the kernels' rounding differs
    batches = learnable_batches(4, 8, 1024)
    eager = train_losses(gpt2_124m(), batches, torch.bfloat16, 20)
    compiled = train_losses(torch.compile(gpt2_124m()), batches, torch.bfloat16, 20)
    print("bf16 eager:", [round(v, 3) for v in eager])
    print("bf16 compile vs eager, max |diff|:", round(max(abs(a - b) for a, b in zip(eager, compiled)), 4))
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 0.02


def test_kv_cache_equals_recompute_in_bf16():
    # generation's path in bf16: a 64-token prefill then 64 one-token steps over the cache give
    # the logits of one full forward, to bf16's rounding
    model = gpt2_124m().eval()
    x = learnable_batches(1, 2, 128)[0][0]  # (2, 128)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(x)[0].float()
        cache = [{"size": 128} for _ in model.transformer.h]
        parts = [model(x[:, :64], kv_cache=cache, pos=0)[0]]
        parts += [model(x[:, t:t + 1], kv_cache=cache, pos=t)[0] for t in range(64, 128)]
    err = ((torch.cat(parts, dim=1).float() - full).abs().max() / full.abs().max()).item()
    print(f"kv cache in bf16: max |logit diff| / max |logit| = {err:.2e}")
    assert err < 0.02


def test_attention_runs_the_flash_kernel():
    # only flash allowed: the model's attention call (causal, no mask, bf16) must be one
    # flash takes, else SDPA raises instead of falling back to a slower kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = gpt2_124m()
    x, y = learnable_batches(1, 4, 1024)[0]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
        loss.backward()
    assert torch.isfinite(loss)


def test_a_steady_state_step_never_waits_for_the_gpu(tmp_path):
    # train.py's step (loader, micro-steps, clipping, fused AdamW) with CUDA's sync debug mode
    # set to error: any device-to-host wait in it raises
    import train
    from dataloader import DataLoader, write_tokens
    from optim import configure_optimizers
    os.makedirs(tmp_path / "d")
    write_tokens(str(tmp_path / "d" / "train.bin"), np.random.randint(0, 50257, 300_000))
    loader = DataLoader(str(tmp_path / "d"), "train", 8, 1024, grad_accum=2, vocab_size=50304)
    model = gpt2_124m()
    optimizers = configure_optimizers(model, 0.1, 6e-4, (0.9, 0.95), "cuda", verbose=False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    bad_loss = torch.zeros((), dtype=torch.bool, device="cuda")
    for step in range(5):
        if step == 3:  # warm: the allocator and cuBLAS have what they need
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            batches, _ = loader.next_step("cuda")
            loss_accum = torch.zeros((), device="cuda")
            for x, y, weight in batches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(x, y)
                    loss = loss * weight
                loss_accum += loss.detach()
                loss.backward()
            train.step_optimizers(optimizers, scaler, params, 1.0)
            bad_loss |= ~torch.isfinite(loss_accum)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not bad_loss.item()


PEAK = r'''
import sys, torch
sys.path.insert(0, sys.argv.pop(1))
import train
train.main()
print(f"peak_bytes {torch.cuda.max_memory_allocated()}")
'''


def peak_of_a_run(tmp_path, args, nproc):
    """A short train.py run on random GPT-2 tokens; rank 0's torch.cuda.max_memory_allocated."""
    from dataloader import write_meta, write_tokens
    os.makedirs(tmp_path / "data" / "rnd", exist_ok=True)
    for split in ("train", "val"):
        write_tokens(str(tmp_path / "data" / "rnd" / f"{split}.bin"), np.random.randint(0, 50257, 2_000_000))
    write_meta(str(tmp_path / "data" / "rnd"), {"tokenizer": "gpt2"})
    (tmp_path / "peak.py").write_text(PEAK)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    common = ["--dataset=rnd", "--max_iters=4", "--eval_interval=0", "--eval_iters=2", "--checkpoint_interval=0",
              "--out_dir=out", "--overwrite", "--compile=False", "--dtype=bfloat16"]
    p = subprocess.run(launch + ["peak.py", ROOT] + common + args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    plan = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--plan", f"--plan_world={nproc}"] + common + args,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    estimate = plan.stdout.split("memory per GPU")[1].split()
    estimate = float(estimate[0]) * (2 ** 30 if estimate[1] == "GiB" else 2 ** 20)
    peak = int(p.stdout.split("peak_bytes")[1].split()[0])
    print(f"{args} x {nproc}: --plan {estimate / 2**30:.2f} GiB, measured peak {peak / 2**30:.2f} GiB")
    return estimate, peak


def test_plan_memory_is_within_15_percent_of_the_measured_peak_124m(tmp_path):
    estimate, peak = peak_of_a_run(tmp_path, ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024",
                                              "--batch_size=16"], nproc=1)
    assert abs(estimate - peak) < 0.15 * peak


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP's estimate needs two GPUs")
def test_plan_memory_is_within_15_percent_of_the_measured_peak_fsdp(tmp_path):
    estimate, peak = peak_of_a_run(tmp_path, ["--n_layer=24", "--n_head=16", "--n_embd=2048", "--block_size=1024",
                                              "--batch_size=4", "--fsdp"], nproc=2)
    assert abs(estimate - peak) < 0.15 * peak
