"""bench.py on a tiny model on CPU: both modes run, return sane numbers and print their
summary line. Timings themselves are never asserted (they depend on the machine's load)."""

import math
import sys

import pytest

import bench
from configurator import configure
from conftest import needs_gpt2_bpe
from model import GPT, GPTConfig

# 2 layers, 32 wide, a 64-token vocabulary: a step takes milliseconds
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab_size=64", "--device=cpu", "--compile=False"]


def positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def summary_printed(out, summary):
    # the whole summary is one line of the output, so it can be pasted as it is
    return summary in out.splitlines()


def test_train_numbers_and_summary(capsys):
    cfg = configure(bench.DEFAULTS, TINY + ["--mode=train", "--batch_size=2", "--block_size=16",
                                            "--grad_accum=2", "--warmup=1", "--steps=2", "--peak_flops=1e12"])
    r = bench.bench_train(cfg)
    for key in ("ms_per_step", "tokens_per_s", "mfu", "loss", "cores_used"):
        assert positive_finite(r[key]), (key, r[key])
    assert r["peak_mem_bytes"] > 0
    # tokens/s is the tokens of one optimizer step (B * T * accum) over its time
    assert r["tokens_per_s"] == pytest.approx(2 * 16 * 2 / (r["ms_per_step"] / 1000), rel=1e-6)
    # MFU against the given peak, with the FLOP count worked out here: 6 per non-embedding
    # parameter per token plus 12 * n_layer * n_embd * T for attention
    n = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)).num_params()
    n -= 16 * 32  # the position table: a lookup, not a matmul
    flops_per_token = 6 * n + 12 * 2 * 32 * 16
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token / 1e12, rel=1e-6)
    # random weights predict about uniformly: the loss is near ln(vocab), so a real step ran
    assert abs(r["loss"] - math.log(64)) < 0.5
    out = capsys.readouterr().out
    assert summary_printed(out, r["summary"])
    assert "ms/step" in r["summary"] and "tok/s" in r["summary"] and "MFU" in r["summary"]


def test_train_bf16_cpu_mfu_na_and_profile(capsys):
    # no peak for a CPU: MFU is n/a, not a made-up number; bf16 autocast runs on CPU too
    cfg = configure(bench.DEFAULTS, TINY + ["--batch_size=2", "--block_size=16", "--warmup=0", "--steps=2",
                                            "--dtype=bfloat16", "--rope=True", "--profile=True"])
    r = bench.bench_train(cfg)
    assert r["mfu"] is None and "MFU n/a" in r["summary"]
    assert positive_finite(r["ms_per_step"]) and positive_finite(r["loss"])
    out = capsys.readouterr().out
    assert summary_printed(out, r["summary"])
    assert "bfloat16" in r["summary"] and "rope" in r["summary"]
    # the profiler's table: op names with their self CPU time
    assert "Self CPU" in out and "aten::" in out


def test_sample_numbers_and_summary(capsys):
    cfg = configure(bench.DEFAULTS, TINY + ["--mode=sample", "--block_size=32", "--sample_batch=3",
                                            "--prompt_len=4", "--new_tokens=8"])
    r = bench.bench_sample(cfg)
    for b in (1, 3):
        for key in (f"cache_tok_s_b{b}", f"recompute_tok_s_b{b}", f"ratio_b{b}"):
            assert positive_finite(r[key]), (key, r[key])
    assert positive_finite(r["cores_used"]) and r["peak_mem_bytes"] > 0
    out = capsys.readouterr().out
    assert summary_printed(out, r["summary"])
    assert "B=1:" in r["summary"] and "B=3:" in r["summary"]


@pytest.mark.parametrize("args, message", [
    (["--model=gpt5"], "unknown --model=gpt5"),
    (["--mode=sample", "--block_size=32", "--prompt_len=16", "--new_tokens=20"], "exceeds --block_size=32"),
    (["--n_embd=30", "--n_head=4"], "not a multiple of n_head"),
    (["--dtype=fp8"], "unknown --dtype=fp8"),
    (["--device=gpu"], "unknown --device=gpu"),
    (["--fsdp"], "torchrun"),  # a plain process has nothing to shard over
])
def test_bad_settings_say_what_is_wrong(args, message, capsys):
    cfg = configure(bench.DEFAULTS, TINY + args)
    run = bench.bench_sample if cfg["mode"] == "sample" else bench.bench_train
    with pytest.raises(SystemExit) as e:
        run(cfg)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line(monkeypatch, capsys):
    # main() as `python bench.py ...` runs it, in this process (a subprocess would spend
    # longer importing torch than benchmarking)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--mode=train", "--batch_size=1", "--block_size=8",
                                      "--warmup=0", "--steps=1"] + TINY)
    bench.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench train | CPU")]
    assert len(lines) == 1 and "ms/step" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_report_memory_per_rank(fsdp):
    import os
    from conftest import ROOT, torchrun
    p = torchrun([os.path.join(ROOT, "bench.py"), "--batch_size=2", "--block_size=16", "--grad_accum=2",
                  "--warmup=1", "--steps=1"] + TINY + (["--fsdp"] if fsdp else []), cwd=ROOT)
    lines = [line for line in p.stdout.splitlines() if line.startswith("bench train | CPU")]
    assert len(lines) == 1, p.stdout  # rank 0 prints the summary, with both ranks' memory
    assert f"{'FSDP' if fsdp else 'DDP'} x2 ranks" in lines[0]
    per_rank = lines[0].split("peak RSS per rank ")[1].split(" |")[0].split(", ")
    assert len(per_rank) == 2 and all(m.endswith(" GiB") and float(m.split()[0]) > 0 for m in per_rank)


@pytest.mark.skipif(not hasattr(__import__("torch").optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_train_with_muon_and_the_options_reports_the_update_share(capsys):
    cfg = configure(bench.DEFAULTS, TINY + ["--batch_size=2", "--block_size=16", "--warmup=1", "--steps=2",
                                            "--optimizer=muon", "--qk_norm", "--mlp=relu2", "--tie_embeddings=False"])
    r = bench.bench_train(cfg)
    assert 0 < r["optimizer_share"] < 1  # a share of the step, not a time
    assert "muon update" in r["summary"] and "qk_norm relu2 untied" in r["summary"]
    assert summary_printed(capsys.readouterr().out, r["summary"])


def test_dpo_mode_times_both_steps_and_prints_the_ratio(capsys):
    cfg = configure(bench.DEFAULTS, TINY + ["--mode=dpo", "--batch_size=2", "--block_size=16", "--warmup=1", "--steps=2"])
    r = bench.bench_dpo(cfg)
    assert positive_finite(r["sft_ms"]) and positive_finite(r["dpo_ms"])
    assert r["ratio"] == pytest.approx(r["dpo_ms"] / r["sft_ms"])
    assert summary_printed(capsys.readouterr().out, r["summary"]) and "2 pairs x 16 tokens" in r["summary"]


def test_rollout_mode_times_the_batch_and_one_prompt_at_a_time(capsys):
    cfg = configure(bench.DEFAULTS, TINY + ["--mode=rollout", "--block_size=32", "--prompt_len=12", "--new_tokens=6",
                                            "--sample_batch=3", "--steps=2"])
    r = bench.bench_rollout(cfg)
    assert positive_finite(r["batched_ms"]) and positive_finite(r["one_at_a_time_ms"])
    assert r["ratio"] == pytest.approx(r["one_at_a_time_ms"] / r["batched_ms"])
    assert summary_printed(capsys.readouterr().out, r["summary"]) and "3 prompts of 5-12 tokens + 6 new" in r["summary"]


def test_smollm2_shape_is_llama_shaped():
    cfg = configure(bench.DEFAULTS, ["--model=smollm2-135m", "--block_size=16", "--device=cpu"])
    import torch
    with torch.device("meta"):
        model = bench.build_model(cfg, "meta")
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.mlp_hidden, c.vocab_size) == (30, 9, 3, 576, 1536, 49152)
    assert c.mlp == "swiglu" and c.norm == "rmsnorm" and c.rope and not c.bias and c.tie_embeddings
    assert 134e6 < model.num_params() < 135e6  # SmolLM2-135M's 134.5M parameters


@needs_gpt2_bpe
def test_serve_mode_times_one_client_and_many_queued_or_batched(capsys):
    cfg = configure(bench.DEFAULTS, TINY + ["--mode=serve", "--block_size=32", "--prompt_len=4", "--new_tokens=6",
                                            "--sample_batch=3"])
    r = bench.bench_serve(cfg)
    for name in ("one", "queued", "batched"):
        assert positive_finite(r[f"tok_s_{name}"]) and positive_finite(r[f"first_s_{name}"])
    # greedy: the queue and the batch make the same tokens (3 clients x 6, fewer where one drew <|endoftext|>)
    assert r["tokens_queued"] == r["tokens_batched"] and 3 <= r["tokens_batched"] <= 18
    assert r["ratio"] == pytest.approx(r["tok_s_batched"] / r["tok_s_queued"])
    assert summary_printed(capsys.readouterr().out, r["summary"]) and "3 clients batched" in r["summary"]
