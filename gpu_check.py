"""
The GPU check: train.py itself under torchrun on this machine's GPU(s), in one command that
writes one report, figures and a PASS or FAIL for each check. About 8 minutes on one H100.

    python gpu_check.py                                  # -> gpu_report.md
    python gpu_check.py --nanogpt_model=PATH/model.py    # also nanoGPT's model in the 124M step
    python gpu_check.py --quick --device=cpu             # every part at toy sizes on a CPU (the test)

The parts, in order; each runs even where an earlier one failed, and the report is rewritten
after each, so a run cut short keeps what it had (--parts=1,4 runs some):
  1. train.py under torchrun, one process per GPU: DDP with torch.compile and bf16, HellaSwag
     from a local file during training, a checkpoint at step K, a resume from it to 2K, and the
     resumed run's losses against the uninterrupted run's; the same with --fsdp; the same with
     --optimizer=muon (eager). dynamo's graph count: the resumed run (K steps) compiles as many
     graphs as the uninterrupted one (2K steps, more evaluations), so nothing recompiles after
     the first pass.
  2. one PPO iteration (align.py --compile) from part 1's DDP model, rewarding answers that end
     with a full stop.
  3. the model-level checks: tests/test_gpu.py (bf16 + compile against fp32 and against eager
     bf16, the flash attention kernel, no host sync in a step, the KV cache against a full
     recompute in bf16, --plan's memory against the measured peak).
  4. the GPT-2 124M training step at three micro-batches through bench.py (ms/step, tok/s, MFU
     per GPU, peak memory, --plan's estimate beside it), and nanoGPT's model.py in the same step
     on the same GPU where --nanogpt_model names a copy of it (kept out of this repository).
It needs no network: the data are made here (random GPT-2 ids, a made-up HellaSwag file); part 2
prepares its prompts with GPT-2's BPE, from tiktoken's cache (TIKTOKEN_CACHE_DIR).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from configurator import configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads ends in one line, not a traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    report="gpu_report.md",  # the report to write (markdown)
    device="auto",  # auto (cuda if there is one), cuda, cpu
    quick=False,  # toy sizes (and dynamo's eager backend): every part in a minute or two, on any machine
    parts="1,2,3,4",  # which parts to run
    nanogpt_model="",  # a copy of nanoGPT's model.py: its GPT in part 4's step, for a side-by-side figure
    steps=10,  # K: part 1 saves at step K and runs to 2K
    batch_sizes="16,32,64",  # part 4's micro-batches (T = 1024)
)

# part 1's model: small enough to compile in seconds, big enough for the GPU to do real work
MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16)
TOY = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, batch_size=4)  # (128: PPO's prompts in Alpaca's template)

# run train.py (or align.py) as __main__ and print, from rank 0, dynamo's graph count and the peak memory
WRAPPER = r'''
import os, runpy, sys
sys.path.insert(0, sys.argv.pop(1))
import torch
if os.environ.get("GPU_CHECK_EAGER"):  # toy runs: dynamo's graphs and guards, no C++ compiler needed
    real = torch.compile
    torch.compile = lambda *a, **k: real(*a, **dict(k, backend="eager"))
script = sys.argv[0] = os.path.join(sys.path[0], sys.argv.pop(1))
runpy.run_path(script, run_name="__main__")
if os.environ.get("RANK", "0") == "0":
    print("GRAPHS", torch._dynamo.utils.counters["stats"]["unique_graphs"])
    print("PEAK", torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
'''


class Report:
    """Rows of (part, check, result, verdict), rewritten to the file after every row."""

    def __init__(self, path, header):
        self.path, self.header, self.rows = path, header, []

    def add(self, part, check, result, ok=None):
        verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((part, check, result, verdict))
        print(f"[{verdict}] {part}: {check}: {result}", flush=True)
        lines = [self.header, "", "| part | check | result | verdict |", "| --- | --- | --- | --- |"]
        lines += [f"| {p} | {c} | {r} | {v} |" for p, c, r, v in self.rows]
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def failed(self):
        return sum(v == "FAIL" for *_, v in self.rows)


def launch(script, args, cwd, nproc, env, wait=True):
    """script (train.py, align.py) through WRAPPER under torchrun: (return code, output), or with
    wait=False the running process (finish() it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(cwd, "wrapper.py"), ROOT, script, *args]
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return finish(p) if wait else p


def finish(p, timeout=900):
    """(return code, output) of a launched run; one past timeout is killed."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out = p.communicate()[0] + f"\n(killed after {timeout} s)"
    return p.returncode, out


def found(out, key):
    """The number after `key` in a run's output (the wrapper's GRAPHS and PEAK lines), or None."""
    lines = [l for l in out.splitlines() if l.startswith(key + " ")]
    return int(lines[-1].split()[1]) if lines else None


def train_losses(path):
    """{step: loss} of a run's log.txt."""
    out = {}
    for line in open(path):
        step, stream, value = line.split()
        if stream == "train":
            out[int(step)] = float(value)
    return out


def make_data(work, block_size):
    """data/bpe and hs.jsonl (a made-up HellaSwag file) in work. The tokens: 2,000 random GPT-2 ids
    repeated, a text the model learns fast, so that the losses compared move."""
    from dataloader import write_meta, write_tokens
    pattern = np.random.default_rng(0).integers(0, 50257, size=2000)
    d = os.path.join(work, "data", "bpe")
    write_tokens(os.path.join(d, "train.bin"), np.tile(pattern, 100))
    write_tokens(os.path.join(d, "val.bin"), np.tile(pattern, 25))
    write_meta(d, {"tokenizer": "gpt2"})
    endings = ["a dog runs into the field", "the cat sleeps on the mat all day", "rain", "it is over now, said he"]
    with open(os.path.join(work, "hs.jsonl"), "w") as f:
        for i in range(16):
            f.write(json.dumps({"ind": i, "ctx": f"Scene {i}. Then the {'man' if i % 2 else 'woman'}",
                                "label": i % 4, "endings": endings[i % 4:] + endings[:i % 4]}) + "\n")


# -----------------------------------------------------------------------------
# the parts


def part_train(cfg, report, work, device, nproc, env):
    """1: train.py under torchrun: save, resume, the losses and the graphs, in three modes."""
    size, K = (TOY if cfg["quick"] else MODEL), cfg["steps"]
    common = [f"--{k}={v}" for k, v in size.items()] + [
        "--dataset=bpe", f"--device={device}", "--dtype=" + ("float32" if device == "cpu" else "bfloat16"),
        "--eval_interval=5", "--eval_iters=2", f"--hellaswag_interval={K}", "--hellaswag_file=hs.jsonl",
        "--log_interval=1", f"--checkpoint_interval={K}", f"--keep_interval={K}", "--warmup_iters=2"]
    tol = 0.0 if device == "cpu" else 0.02  # CPU resumes bitwise; a GPU's atomics may round differently
    for mode, extra in (("DDP + compile", ["--compile=True"]), ("FSDP + compile", ["--compile=True", "--fsdp"]),
                        ("Muon (eager)", ["--compile=False", "--optimizer=muon"])):
        name = mode.split()[0].lower()
        whole, first, resumed = (f"--out_dir=out_{name}_{x}" for x in ("whole", "first", "resumed"))
        t0 = time.time()
        # the uninterrupted run and the first half at once: they do not depend on each other
        runs = [launch("train.py", common + extra + [out, f"--max_iters={n}"], work, nproc, env, wait=False)
                for out, n in ((whole, 2 * K), (first, K))]
        (rc_w, out_w), (rc_f, out_f) = (finish(p) for p in runs)
        if rc_w or rc_f:
            report.add(1, f"{mode}: train", "failed: " + (out_w if rc_w else out_f)[-600:].replace("\n", " "), False)
            continue
        os.makedirs(os.path.join(work, f"out_{name}_resumed"), exist_ok=True)
        shutil.copy(os.path.join(work, f"out_{name}_first", "ckpt.pt"), os.path.join(work, f"out_{name}_resumed"))
        rc_r, out_r = launch("train.py", common + extra + [resumed, f"--max_iters={2 * K}", "--init_from=resume"],
                             work, nproc, env)
        if rc_r:
            report.add(1, f"{mode}: resume", "failed: " + out_r[-600:].replace("\n", " "), False)
            continue
        a = train_losses(os.path.join(work, f"out_{name}_whole", "log.txt"))
        b = train_losses(os.path.join(work, f"out_{name}_resumed", "log.txt"))
        after = [s for s in sorted(b) if s >= K]
        diff = max(abs(a[s] - b[s]) for s in after)
        report.add(1, f"{mode}: resumed at step {K} against uninterrupted, steps {K}-{2 * K - 1}",
                   f"max |loss diff| {diff:.2e} (tolerance {tol:g}); loss {a[0]:.3f} -> {a[2 * K - 1]:.3f}; "
                   f"{time.time() - t0:.0f} s for three runs", diff <= tol and a[2 * K - 1] < a[0])
        hella = "hella" in open(os.path.join(work, f"out_{name}_whole", "log.txt")).read()
        report.add(1, f"{mode}: HellaSwag from a local file during training", "logged" if hella else "missing", hella)
        if "--compile=True" in extra:
            g_whole, g_resumed = found(out_w, "GRAPHS"), found(out_r, "GRAPHS")
            report.add(1, f"{mode}: dynamo graphs, {2 * K} steps against a resumed {K}",
                       f"{g_whole} and {g_resumed}", g_whole is not None and g_whole == g_resumed and g_whole > 0)
        peak = found(out_w, "PEAK")
        if peak:
            report.add(1, f"{mode}: peak memory, rank 0", f"{peak / 2 ** 30:.2f} GiB")


def part_ppo(cfg, report, work, device, nproc, env):
    """2: one PPO iteration from part 1's DDP model."""
    if not os.path.isfile(os.path.join(work, "out_ddp_whole", "ckpt.pt")):
        return report.add(2, "PPO", "needs part 1's DDP model", False)
    size = TOY if cfg["quick"] else MODEL
    with open(os.path.join(work, "pairs.jsonl"), "w") as f:
        for i in range(100):
            f.write(json.dumps({"prompt": f"Say something about the number {i}.", "chosen": f"It is {i}.",
                                "rejected": f"it is {i}"}) + "\n")
    with open(os.path.join(work, "ppo_reward.py"), "w") as f:
        f.write("def full_stop(text):\n    return float(text.strip().endswith('.'))\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_preferences.py"), "--input=pairs.jsonl",
                        "--out_dir=data/prefs", f"--max_len={size['block_size']}", "--val_fraction=0.2"],
                       cwd=work, capture_output=True, text=True, env=env, timeout=300)
    if p.returncode:
        return report.add(2, "PPO: prepare_preferences.py", (p.stdout + p.stderr)[-400:].replace("\n", " "), False)
    t0 = time.time()
    rc, out = launch("align.py", ["--method=ppo", "--init_from=out_ddp_whole", "--dataset=prefs", "--out_dir=out_ppo",
                                  "--reward_fn=ppo_reward:full_stop", "--max_iters=1", "--batch_size=4",
                                  "--max_new_tokens=16", f"--block_size={size['block_size']}", f"--device={device}",
                                  "--eval_iters=1", "--compile=True", "--ppo_epochs=2"], work, nproc, env)
    ok = rc == 0 and os.path.isfile(os.path.join(work, "out_ppo", "ckpt.pt"))
    errors = [l for l in out.splitlines() if l.startswith("error:")]  # a one-line refusal, if that is what it was
    detail = f"{time.time() - t0:.0f} s" if ok else (errors[-1] if errors else out[-600:].replace("\n", " "))
    report.add(2, "PPO: one iteration (rollouts with the KV cache, compiled policy), saved", detail, ok)


def part_model_checks(cfg, report, env):
    """3: tests/test_gpu.py."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_gpu.py"), "-m", "gpu",
                        "-q", "-rs", "-s", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=900)  # (-s: the figures the tests print)
    lines = p.stdout.strip().splitlines()
    summary = lines[-1] if lines else p.stderr[-300:]
    for line in lines:  # the figures the tests print (losses, --plan against the peak)
        if line.startswith(("fp32", "bf16", "kv cache")) or " x " in line and "GiB" in line:
            report.add(3, "tests/test_gpu.py printed", line[:300])
    report.add(3, "tests/test_gpu.py -m gpu", f"{summary} ({time.time() - t0:.0f} s)",
               p.returncode == 0 or (p.returncode == 5 and cfg["quick"]))


def nanogpt_step_ms(path, B, device, steps=10, warmup=5):
    """ms per training step (bf16, compile, fused AdamW) of nanoGPT's GPT-2 124M from its model.py."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    torch.manual_seed(0)
    model = m.GPT(m.GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
                              bias=True)).to(device)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda")
    model = torch.compile(model)
    x = torch.randint(0, 50304, (B, 1024), device=device)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def part_bench(cfg, report, device):
    """4: the 124M step at three micro-batches, --plan beside it, nanoGPT's step beside it."""
    import bench
    import plan
    T = 32 if cfg["quick"] else 1024
    toy = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab_size=64"] if cfg["quick"] else []
    for B in [int(b) for b in cfg["batch_sizes"].split(",")]:
        torch._dynamo.reset()  # each size its own static graphs
        args = ["--mode=train", "--model=gpt2", f"--batch_size={B}", f"--block_size={T}", f"--device={device}",
                "--dtype=" + ("float32" if device == "cpu" else "bfloat16"), "--warmup=3", "--steps=6",
                f"--compile={not cfg['quick']}"] + toy
        try:
            r = bench.bench_train(configure(bench.DEFAULTS, args))
        except Exception as e:  # out of memory at the largest size, say: the other sizes still count
            report.add(4, f"124M step, B={B}, T={T}", f"failed: {type(e).__name__}: {str(e)[:200]}", False)
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        tcfg = dict(batch_size=B, block_size=T, optimizer="adamw")  # what plan.memory_per_gpu reads of a run
        with torch.device("meta"):
            meta_model = bench.build_model(configure(bench.DEFAULTS, args), "meta")
        estimate = sum(plan.memory_per_gpu(meta_model, tcfg, 1, False, torch.bfloat16).values())
        report.add(4, f"124M step, B={B}, T={T}, bf16, compile" if not cfg["quick"] else f"toy step, B={B}",
                   f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak "
                   f"{r['peak_mem_bytes'] / 2 ** 30:.2f} GiB; --plan {estimate / 2 ** 30:.2f} GiB")
        if cfg["nanogpt_model"] and device != "cpu" and B == int(cfg["batch_sizes"].split(",")[0]):
            try:
                ms = nanogpt_step_ms(cfg["nanogpt_model"], B, device)
                report.add(4, f"nanoGPT's model.py, the same step, B={B}",
                           f"{ms:.1f} ms/step against this model's {r['ms_per_step']:.1f} ms "
                           f"({ms / r['ms_per_step']:.2f}x)")
            except Exception as e:
                report.add(4, "nanoGPT's model.py", f"failed: {type(e).__name__}: {str(e)[:200]}", False)


def main():
    cfg = configure(DEFAULTS)
    device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        die("no CUDA GPU here: run it on a GPU machine, or try every part at toy sizes with --quick --device=cpu")
    if device == "cpu" and not cfg["quick"]:
        die("the full check is sized for a GPU; on a CPU add --quick (toy sizes)")
    if cfg["nanogpt_model"] and not os.path.isfile(cfg["nanogpt_model"]):
        die(f"--nanogpt_model={cfg['nanogpt_model']}: no such file (a copy of nanoGPT's model.py)")
    print_config(cfg)
    parts = {int(p) for p in cfg["parts"].split(",") if p.strip()}
    nproc = max(1, torch.cuda.device_count()) if device == "cuda" else 1
    what = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    command = " ".join(["python gpu_check.py"] + sys.argv[1:])
    report = Report(cfg["report"], f"# GPU check: {nproc} x {what}, torch {torch.__version__}, "
                                   f"{time.strftime('%Y-%m-%d %H:%M')}\n\n`{command}`")
    work = tempfile.mkdtemp(prefix="gpu_check_")
    with open(os.path.join(work, "wrapper.py"), "w") as f:
        f.write(WRAPPER)
    make_data(work, (TOY if cfg["quick"] else MODEL)["block_size"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if cfg["quick"]:
        env["GPU_CHECK_EAGER"] = "1"
    start = time.time()
    for n, part in ((1, lambda: part_train(cfg, report, work, device, nproc, env)),
                    (2, lambda: part_ppo(cfg, report, work, device, nproc, env)),
                    (3, lambda: part_model_checks(cfg, report, env)),
                    (4, lambda: part_bench(cfg, report, device))):
        if n in parts:
            try:
                part()
            except Exception as e:  # one part's failure is a row of the report, and the next part runs
                report.add(n, "the part itself", f"{type(e).__name__}: {str(e)[:300]}", False)
    report.add("all", "wall time", f"{time.time() - start:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{report.failed} failed; the report is {cfg['report']}")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
