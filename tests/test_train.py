"""train.py end to end, in subprocesses, on a tiny character-level dataset."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, gpt2_encoding_available, needs_gpt2_bpe, read_log, run_script, torchrun, torchrun_cmd

TINY = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--device=cpu", "--compile=False", "--dtype=float32", "--eval_iters=2", "--eval_interval=5",
        "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3"]


def train(workdir, *args, check=True):
    return run_script([os.path.join(ROOT, "train.py")] + TINY + list(args), cwd=workdir, check=check)



def test_end_to_end_then_sample(workdir):
    p = train(workdir, "--max_iters=30", "--out_dir=out")
    assert "evaluating the starting model (2 val batches)..." in p.stdout  # the first wait is said
    log = read_log(workdir / "out" / "log.txt", "train")
    val = read_log(workdir / "out" / "log.txt", "val")
    assert sorted(log) == list(range(30))
    assert sum(list(log.values())[-5:]) / 5 < list(log.values())[0] - 0.5  # it learns
    assert val[30] < val[0]
    ckpt = torch.load(workdir / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["meta"]["tokenizer"] == "char"
    assert ckpt["threads"] == 1  # (run_script's OMP_NUM_THREADS): a resume that picks takes them again
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    # sample.py finds the newest out*/ckpt.pt by itself
    p = run_script([os.path.join(ROOT, "sample.py"), "--start=the king", "--num_samples=1",
                    "--max_new_tokens=40", "--device=cpu"], cwd=workdir)
    assert p.stdout.startswith("the king") and len(p.stdout) >= len("the king") + 40
    assert "out/ckpt.pt" in p.stderr
    # a character the vocabulary lacks: one line, exit 2
    p = run_script([os.path.join(ROOT, "sample.py"), "--start=Zebra", "--device=cpu"], cwd=workdir, check=False)
    assert p.returncode == 2 and "lacks" in p.stderr and "Traceback" not in p.stderr
    # `python sample.py | head -c 20`: the reader closes the pipe early; sample.py ends quietly
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--out_dir=out", "--num_samples=50",
                             "--max_new_tokens=200", "--device=cpu"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert len(proc.stdout.read(20)) == 20
    proc.stdout.close()
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]


@pytest.mark.slow
def test_mfu_is_per_gpu_and_the_first_step_is_timed_apart(workdir):
    # mfu = FLOPs per token x tok/s (every rank's tokens) / (ranks x one device's peak): the same
    # formula on 1 and on 2 processes (before, 2 ranks printed twice their true MFU)
    from checkpoint import load_model
    from model import flops_per_token
    args = ["--max_iters=6", "--log_interval=2", "--peak_flops=1e9", "--eval_interval=0"]
    train(workdir, *args, "--out_dir=one")
    torchrun([os.path.join(ROOT, "train.py")] + TINY + args + ["--out_dir=two"], cwd=workdir)
    for out, ranks in (("one", 1), ("two", 2)):
        fpt = flops_per_token(load_model(out_dir=str(workdir / out))[0], 32)
        log = workdir / out / "log.txt"
        mfu, tok_per_s, dt_ms = (read_log(log, s) for s in ("mfu", "tok_per_s", "dt_ms"))
        assert sorted(mfu) == [1, 3, 5] and set(read_log(log, "warmup_s")) == {1}  # step 0: the warm-up
        for step in mfu:
            assert mfu[step] == pytest.approx(fpt * tok_per_s[step] / (ranks * 1e9), rel=1e-5)
        # tok/s is the global batch's: 4 x 32 tokens per rank and step
        assert tok_per_s[3] == pytest.approx(4 * 32 * ranks / (dt_ms[3] / 1000), rel=1e-5)


@pytest.mark.slow
def test_exact_resume(workdir):
    # 20 steps in one go...
    train(workdir, "--max_iters=20", "--out_dir=out_full", "--dropout=0.1")
    # ...equal 10 steps of the same schedule, a stop, and a resume for 10 more (dropout on, so
    # the RNG state has to come back too, and the data loader's position)
    train(workdir, "--max_iters=10", "--lr_decay_iters=20", "--out_dir=out_stop", "--dropout=0.1")
    p = train(workdir, "--max_iters=20", "--lr_decay_iters=20", "--out_dir=out_stop", "--dropout=0.1",
              "--init_from=resume")
    # the settings that differ from the checkpoint's run are named in one line
    assert "note: resuming with changed settings: max_iters=20 (was 10)" in p.stdout
    full = read_log(workdir / "out_full" / "log.txt", "train")
    resumed = read_log(workdir / "out_stop" / "log.txt", "train")
    assert sorted(resumed) == list(range(20))
    assert [resumed[i] for i in range(20)] == [full[i] for i in range(20)]  # identical, CPU fp32
    assert read_log(workdir / "out_stop" / "log.txt", "val")[20] == read_log(workdir / "out_full" / "log.txt", "val")[20]


@pytest.mark.slow
def test_sigint_saves_and_resume_continues_exactly(workdir):
    args = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + [
        "--max_iters=100000", "--lr_decay_iters=1000", "--out_dir=out_sig", "--eval_interval=0",
        "--checkpoint_interval=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = workdir / "out_sig" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(read_log(log, "train")) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "saving" in out and "--init_from=resume" in out
    stopped = torch.load(workdir / "out_sig" / "ckpt.pt", weights_only=True)["step"]
    assert stopped >= 5 and stopped == len(read_log(log, "train"))
    # resume for 3 more steps; compare with an uninterrupted run of the same length
    end = stopped + 3
    common = ["--lr_decay_iters=1000", "--eval_interval=0", f"--max_iters={end}"]
    train(workdir, *common, "--out_dir=out_sig", "--init_from=resume")
    train(workdir, *common, "--out_dir=out_ref")
    assert read_log(log, "train") == read_log(workdir / "out_ref" / "log.txt", "train")


@pytest.mark.slow
def test_nan_loss_stops_without_touching_checkpoint(workdir):
    train(workdir, "--max_iters=5", "--out_dir=out_nan")
    path = workdir / "out_nan" / "ckpt.pt"
    before = path.read_bytes()
    p = train(workdir, "--max_iters=50", "--out_dir=out_nan", "--init_from=resume", "--learning_rate=1e12",
              "--grad_clip=0.0", "--warmup_iters=0", "--log_interval=10", check=False)
    assert p.returncode != 0
    assert "not finite" in p.stderr and "Traceback" not in p.stderr
    assert path.read_bytes() == before
    # saving every step: whatever was saved before the stop holds only finite weights
    p = train(workdir, "--max_iters=50", "--out_dir=out_nan", "--init_from=resume", "--learning_rate=1e12",
              "--grad_clip=0.0", "--warmup_iters=0", "--checkpoint_interval=1", check=False)
    assert p.returncode != 0 and "not finite" in p.stderr
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow
def test_a_diverging_run_never_replaces_the_best_checkpoint(workdir):
    # a good run, then resumed with a learning rate that wrecks it: whatever the blow-up does
    # (finite garbage or nan), ckpt_best.pt keeps the good weights, and every checkpoint's
    # val_loss is the one logged at its own step (never a stale one)
    train(workdir, "--max_iters=10", "--out_dir=out_div")
    run = workdir / "out_div"
    good = torch.load(run / "ckpt.pt", weights_only=True)
    assert (run / "ckpt_best.pt").read_bytes() == (run / "ckpt.pt").read_bytes()
    assert good["best_val_loss"] == good["val_loss"] == pytest.approx(read_log(run / "log.txt", "val")[10], rel=1e-5)
    best_before = (run / "ckpt_best.pt").read_bytes()
    for lr, extra in (("1e3", ["--grad_clip=0.0"]), ("30.0", ["--grad_clip=0.0"]), ("1e3", [])):
        p = train(workdir, "--max_iters=16", "--out_dir=out_div", "--init_from=resume", f"--learning_rate={lr}",
                  "--warmup_iters=0", "--decay_lr=False", "--checkpoint_interval=3", "--eval_interval=0", *extra,
                  check=False)
        assert p.returncode in (0, 2) and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert (run / "ckpt_best.pt").read_bytes() == best_before, (lr, extra)
        last = torch.load(run / "ckpt.pt", weights_only=True)
        if last["step"] > 10:  # something was saved: with the val loss of its own weights, finite
            assert last["val_loss"] == pytest.approx(read_log(run / "log.txt", "val")[last["step"]], rel=1e-5)
            assert last["best_val_loss"] == good["val_loss"] < last["val_loss"]
        for line in p.stdout.splitlines():  # each val line says so when it is far above the best
            if line.startswith("step ") and ": val loss " in line:
                val = float(line.split(": val loss ")[1].split()[0])
                assert ("ckpt_best.pt keeps it" in line) == (val > 1.1 * good["val_loss"]), line
        if p.returncode == 2:
            assert "not finite" in p.stderr, p.stderr[-2000:]
        (run / "ckpt.pt").unlink()  # the next trial starts from the good run again
        (run / "ckpt.pt").write_bytes(best_before)


def test_settings_a_run_cannot_apply_are_said(workdir):
    # what the loaded model or the checkpoint decides is said in one line, and the run goes on
    train(workdir, "--max_iters=4", "--out_dir=out_src")
    p = train(workdir, "--max_iters=2", "--out_dir=out_ft", "--init_from=out_src", "--rope", "--n_layer=3",
              "--mlp=relu2", "--zero_init_proj", "--lr_decay_iters=100")
    said = [line for line in p.stdout.splitlines() if line.startswith("note: the model is out_src's")]
    assert len(said) == 1 and all(w in said[0] for w in ("rope=False", "n_layer=2", "mlp='gelu'", "zero_init_proj=False"))
    assert "note: lr_decay_iters=100 is past max_iters=2" in p.stdout
    ft = torch.load(workdir / "out_ft" / "ckpt.pt", weights_only=True)["model_args"]
    assert (ft["rope"], ft["n_layer"], ft["mlp"]) == (False, 2, "gelu")  # the note told the truth
    p = train(workdir, "--max_iters=4", "--out_dir=out_src", "--init_from=resume")
    assert "the run is already at step 4 (--max_iters=4): nothing to train" in p.stdout
    assert not (workdir / "out_src" / ".lock").exists()  # the lock file goes with the run
    # a start that fails leaves nothing behind: no empty log.txt, no lock, no folder
    p = train(workdir, "--max_iters=2", "--out_dir=out_failed", "--dataset=missing", check=False)
    assert p.returncode == 2 and not (workdir / "out_failed").exists()


def ddp_equals_accumulation(workdir, *settings):
    """Train 6 steps as 2 DDP processes and as one process with 2 accumulation steps: the same
    losses (1e-5) and val loss. Returns the DDP run's CompletedProcess."""
    common = list(settings) + ["--max_iters=6", "--total_batch_size=256", "--eval_interval=3"]  # 256 = 4 x 32 x 2
    # one process, 2 accumulation steps; twice the val batches, to see what the 2 ranks see
    train(workdir, *common, "--out_dir=out_single", "--eval_iters=4")
    p = torchrun([os.path.join(ROOT, "train.py")] + TINY + common + ["--out_dir=out_ddp"], cwd=workdir)
    assert "2 rank(s)" in p.stdout and "x 1 accumulation" in p.stdout
    single = read_log(workdir / "out_single" / "log.txt", "train")
    ddp = read_log(workdir / "out_ddp" / "log.txt", "train")
    assert sorted(single) == sorted(ddp) == list(range(6))
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])
    v1, v2 = read_log(workdir / "out_single" / "log.txt", "val"), read_log(workdir / "out_ddp" / "log.txt", "val")
    assert abs(v1[6] - v2[6]) < 1e-5  # the ranks' val losses are averaged
    return p


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_accumulation(workdir):
    p = ddp_equals_accumulation(workdir)
    assert p.stdout.count("using fused AdamW") == 1  # rank 0 alone prints


def _children(pid):
    """The PIDs whose parent is pid (from /proc: no psutil needed)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (name) state ppid ...": the name may hold spaces, so split after ")"
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _cmdline(pid):
    """The command line of process pid ("" if it has ended meanwhile)."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_sigterm_twice_to_one_ddp_rank_stops_all_at_once_and_saves(workdir):
    # a preemption signal may reach one rank only, or the ranks a step apart, and under SLURM
    # twice (from the scheduler, and again through torchrun); saving is collective, so the ranks
    # must agree on the step to stop at (or the run hangs), do so within a step or two (not at the
    # next log step, 1000 steps away), and a repeated SIGTERM must not cost the save
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = torchrun_cmd([os.path.join(ROOT, "train.py")] + TINY + [
        "--max_iters=1000000", "--lr_decay_iters=1000", "--out_dir=out_ddp_sig", "--eval_interval=0",
        "--checkpoint_interval=0", "--log_interval=1000"])
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = workdir / "out_ddp_sig" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(read_log(log, "train")) >= 1):
        time.sleep(0.2)  # the first log step (999): training runs, and the next log step is 1000 steps away
    workers = [k for k in _children(proc.pid) if "train.py" in _cmdline(k)]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGTERM)  # one rank only, twice
    time.sleep(0.05)
    os.kill(max(workers), signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in workers:  # torchrun puts its workers in sessions of their own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the ranks did not agree on stopping: the run hung")
    assert proc.returncode == 0 and "exiting now" not in out, out[-3000:]
    assert (workdir / "out_ddp_sig" / "ckpt.pt").exists(), out[-3000:]
    step = torch.load(workdir / "out_ddp_sig" / "ckpt.pt", weights_only=True)["step"]
    assert step > 1000 and step % 1000 and f"stopped at step {step}" in out  # not at a log step


def test_overwrite_clears_every_file_of_the_run_it_replaces(workdir):
    # kept copies, the best checkpoint and the log of the old run are not left beside the new one's
    train(workdir, "--max_iters=4", "--keep_interval=2", "--checkpoint_interval=2", "--out_dir=out_over")
    assert {"ckpt_2.pt", "ckpt_4.pt", "ckpt_best.pt"} <= set(os.listdir(workdir / "out_over"))
    p = train(workdir, "--max_iters=1", "--out_dir=out_over", "--overwrite")
    assert "removing the files of the run this one replaces" in p.stdout
    left = set(os.listdir(workdir / "out_over"))
    assert "ckpt_2.pt" not in left and "ckpt_4.pt" not in left and "ckpt.pt" in left
    assert max(read_log(workdir / "out_over" / "log.txt", "train")) == 0  # the new run's log only


def test_max_iters_0_evaluates_and_writes_nothing(workdir):
    # (settings that cannot work are rows of tests/test_bad_input.py)
    p = train(workdir, "--max_iters=0", "--out_dir=out_eval")
    assert "step 0: val loss" in p.stdout and not (workdir / "out_eval" / "ckpt.pt").exists()


def bpe_workdir(tmp_path, n_examples):
    """data/bpe (random GPT-2 token ids) and hs.jsonl, n_examples HellaSwag-format examples."""
    import json
    import numpy as np
    from dataloader import write_meta, write_tokens
    rng = np.random.default_rng(0)
    d = tmp_path / "data" / "bpe"
    write_tokens(str(d / "train.bin"), rng.integers(0, 50257, size=5000))
    write_tokens(str(d / "val.bin"), rng.integers(0, 50257, size=2000))
    write_meta(str(d), {"tokenizer": "gpt2"})
    with open(tmp_path / "hs.jsonl", "w") as f:
        for i in range(n_examples):
            ending = ["a dog runs", "the cat sleeps on the mat", "rain", "it is over now, said he"]
            f.write(json.dumps({"ind": i, "activity_label": "x", "ctx_a": f"Scene {i}.", "ctx_b": "then",
                                "ctx": f"Scene {i}. then", "split": "val", "split_type": "indomain",
                                "label": i % 4, "endings": ending[i % 4:] + ending[:i % 4], "source_id": "s"}) + "\n")


@pytest.mark.slow
@needs_gpt2_bpe
def test_hellaswag_inside_ddp_and_fsdp_training_equals_one_process(tmp_path):
    bpe_workdir(tmp_path, 7)
    args = TINY + ["--dataset=bpe", "--max_iters=2", "--eval_interval=0", "--total_batch_size=256",
                   "--hellaswag_interval=1", "--hellaswag_limit=5", "--hellaswag_file=hs.jsonl"]
    run_script([os.path.join(ROOT, "train.py")] + args + ["--out_dir=out_one"], cwd=tmp_path)
    one = read_log(tmp_path / "out_one" / "log.txt", "hella")
    assert sorted(one) == [0, 1, 2]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):  # FSDP: each rank scores with its shards
        p = torchrun([os.path.join(ROOT, "train.py")] + args + extra + [f"--out_dir=out_{name}"], cwd=tmp_path)
        assert read_log(tmp_path / f"out_{name}" / "log.txt", "hella") == one, name
        assert "n=5" in p.stdout  # the counts of both ranks, summed


@pytest.mark.slow
def test_one_live_run_per_out_dir_and_stale_temp_files_go(workdir):
    # a run in progress holds out_dir: a second one is refused before it writes anything
    args = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + ["--max_iters=100000", "--out_dir=out_live",
                                                                      "--eval_interval=0", "--checkpoint_interval=0"]
    proc = subprocess.Popen(args, cwd=workdir, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = workdir / "out_live" / "log.txt"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (log.exists() and len(read_log(log, "train")) >= 2):
            time.sleep(0.2)
        before = log.read_bytes()
        p = train(workdir, "--max_iters=3", "--out_dir=out_live", "--overwrite", check=False)
        assert p.returncode == 2 and "another run is training into out_live" in p.stderr
        assert log.read_bytes()[:len(before)] == before  # its log was not reset
    finally:
        proc.kill()  # like a crash: the lock must not outlive the process
        proc.wait()
    (workdir / "out_live" / "ckpt.pt.12345.tmp").write_bytes(b"half a checkpoint")
    p = train(workdir, "--max_iters=3", "--out_dir=out_live", "--overwrite")
    assert "removing out_live/ckpt.pt.12345.tmp" in p.stdout
    assert not list((workdir / "out_live").glob("*.tmp")) and (workdir / "out_live" / "ckpt.pt").exists()


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    import checkpoint
    from configurator import UserError
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"step": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="could not write .*ckpt.pt"):
        checkpoint.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temp file is gone


@pytest.mark.slow
@pytest.mark.parametrize("evaluation, ranks", [("val", 1), ("val", 2), ("hellaswag", 2)])
def test_a_stop_during_evaluation_is_honoured_at_once(workdir, evaluation, ranks):
    # an evaluation that would take minutes: Ctrl-C ends it, and the run, within seconds; under
    # DDP the signal reaches one rank only, and the ranks agree to leave at the same batch
    if ranks > 1 and not os.path.isdir("/proc"):
        pytest.skip("finds torchrun's workers through /proc")
    if evaluation == "val":
        args, started = TINY + ["--eval_iters=1000000"], "using fused AdamW"  # the step-0 evaluation follows
    else:
        if not gpt2_encoding_available():
            pytest.skip("GPT-2 BPE files unavailable")
        bpe_workdir(workdir, 20000)  # 10,000 examples per rank: far longer than the test waits
        args = TINY + ["--dataset=bpe", "--hellaswag_interval=1", "--hellaswag_file=hs.jsonl"]
        started = "step 0: val loss"
    cmd = [os.path.join(ROOT, "train.py")] + args + ["--out_dir=out_evalstop"]
    cmd = torchrun_cmd(cmd) if ranks > 1 else [sys.executable] + cmd
    proc = subprocess.Popen(cmd, cwd=workdir, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(started):
            break
    time.sleep(1.0)
    workers = [k for k in _children(proc.pid) if "train.py" in _cmdline(k)] if ranks > 1 else [proc.pid]
    if len(workers) != ranks:
        proc.kill()
        pytest.fail(f"expected {ranks} training processes, found {workers}:\n{proc.communicate()[0][-2000:]}")
    os.kill(max(workers), signal.SIGINT)  # one rank only
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        pytest.fail("the run did not stop: the evaluation went on, or the ranks hung")
    assert proc.returncode == 0 and "stopped at step 0" in out, out[-2000:]
    assert ("val loss" if evaluation == "val" else "HellaSwag acc_norm") not in out


FAILING_RANK = r'''
import os, sys, time
sys.path.insert(0, sys.argv.pop(1))
import dataloader, train
how, calls, real = sys.argv.pop(1), [0], dataloader.DataLoader.next_step
def next_step(self, device="cpu"):  # rank 1's third training step fails or never comes back
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3:
        if how == "raise":
            raise OSError(28, "No space left on device")
        time.sleep(15)  # 3 x pg_timeout: stuck, as far as rank 0 can tell (then it goes on, and finds rank 0 gone)
    return real(self, device)
dataloader.DataLoader.next_step = next_step
train.main()
'''


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "stall"])
def test_a_failing_or_stuck_rank_ends_every_rank(workdir, how):
    # one rank raising (a full disk) or hanging: the run ends within seconds (raise) or
    # pg_timeout (stall), never waits forever, and says what happened in one line per rank
    (workdir / "failing_rank.py").write_text(FAILING_RANK)
    args = ["failing_rank.py", ROOT, how] + TINY + ["--max_iters=10", "--out_dir=out", "--pg_timeout=5"]
    p = subprocess.run(torchrun_cmd(args), cwd=workdir, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert p.returncode != 0
    if how == "raise":
        assert "rank 1 failed" in p.stderr and "No space left on device" in p.stderr
    assert "rank 0: another rank failed or stopped answering" in p.stderr, p.stderr[-3000:]


SLOW_SAVE = r'''
import os, sys, time
sys.path.insert(0, sys.argv.pop(1))
import checkpoint, train
real = checkpoint.save_checkpoint
def save_checkpoint(ckpt, path):  # a slow shared file system: the write takes 2 x pg_timeout
    time.sleep(10)
    return real(ckpt, path)
checkpoint.save_checkpoint = save_checkpoint
train.main()
'''


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_a_save_slower_than_pg_timeout_does_not_abort_the_run(workdir, fsdp):
    # rank 0 writes while the other ranks wait for it: that wait is not pg_timeout's
    (workdir / "slow_save.py").write_text(SLOW_SAVE)
    args = ["slow_save.py", ROOT] + TINY + ["--max_iters=2", "--out_dir=out", "--pg_timeout=5", "--eval_interval=0"]
    p = subprocess.run(torchrun_cmd(args + (["--fsdp"] if fsdp else [])), cwd=workdir, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(workdir / "out" / "ckpt.pt", weights_only=True)["step"] == 2


def host_syncs_of_a_run(workdir, monkeypatch, max_iters):
    """Run train.py in this process and count the tensor-to-Python conversions it makes
    (.item(), float(t), bool(t): each one waits for the GPU there), with where they came from."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode
    import train as train_script

    class Conversions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                self.where.append(traceback.format_stack(limit=6)[0].strip())
            return func(*args, **(kwargs or {}))

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["train.py"] + TINY + [
        f"--max_iters={max_iters}", "--eval_interval=0", "--log_interval=1000", "--checkpoint_interval=0",
        "--out_dir=out", "--overwrite", "--dtype=bfloat16"])
    with Conversions() as conversions:
        train_script.main()
    return conversions.where


def test_a_step_that_neither_logs_evaluates_nor_saves_makes_no_host_sync(workdir, monkeypatch):
    # the runs differ by 5 plain steps, and the counts not at all: those steps convert nothing
    # (on a GPU the same holds for transfers: tests/test_gpu.py checks with sync debug mode)
    short, long_ = host_syncs_of_a_run(workdir, monkeypatch, 3), host_syncs_of_a_run(workdir, monkeypatch, 8)
    assert len(short) > 0  # the last step's log line, evaluation and save do convert: the counter works
    assert len(long_) == len(short), "\n".join(long_)


def compiles_of_a_run(workdir, monkeypatch, *args):
    """Run train.py here under torch.compile (dynamo with its eager backend: the guards and
    recompiles are dynamo's, whatever the backend) and return how many graphs it compiled."""
    import functools

    import torch._dynamo
    import train as train_script
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["train.py"] + TINY + ["--dataset=bpe", "--compile=True", "--eval_interval=2",
                                                            "--hellaswag_interval=2", "--hellaswag_file=hs.jsonl",
                                                            "--out_dir=out"] + list(args))
    train_script.main()
    monkeypatch.undo()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@needs_gpt2_bpe
def test_compile_round_trip_recompiles_nothing_after_the_first_pass(tmp_path, monkeypatch):
    # train -> eval -> HellaSwag -> train ... : every mode is compiled on its first pass (train
    # and eval are two graphs), and 4 more steps with two more evaluations add none; a resumed
    # run compiles what a fresh one does, no more
    bpe_workdir(tmp_path, 8)
    first = compiles_of_a_run(tmp_path, monkeypatch, "--max_iters=2", "--overwrite")
    assert first >= 2, first
    assert compiles_of_a_run(tmp_path, monkeypatch, "--max_iters=6", "--overwrite") == first
    resumed = compiles_of_a_run(tmp_path, monkeypatch, "--max_iters=10", "--init_from=resume")
    assert resumed == first


GRAPHS = r'''
import json, os, sys
sys.path.insert(0, sys.argv.pop(1))
import torch
graphs = []  # each graph dynamo compiles: how many of its inputs have a symbolic (dynamic) size
def backend(gm, inputs):
    sizes = [s for x in inputs for s in (x.shape if isinstance(x, torch.Tensor) else [x])]
    graphs.append(sum(isinstance(s, torch.SymInt) for s in sizes))  # (a dynamic size is also an input of its own)
    return gm.forward
real_compile = torch.compile
torch.compile = lambda *a, **k: real_compile(*a, **dict(k, backend=backend))
import train
train.main()
if os.environ.get("RANK", "0") == "0":
    print("GRAPHS " + json.dumps(graphs))
'''


@pytest.mark.slow
@needs_gpt2_bpe
@pytest.mark.parametrize("fsdp", [False, True])
def test_hellaswag_leaves_the_compiled_training_graphs_static(tmp_path, fsdp):
    # HellaSwag's batches change shape every call; run through compiled code they would make
    # dynamo recompile with symbolic sizes, and the next training steps would run that dynamic
    # graph. HellaSwag runs eager: every graph stays static, and more steps (with HellaSwag
    # twice more) add none
    bpe_workdir(tmp_path, 8)
    (tmp_path / "graphs.py").write_text(GRAPHS)
    counts = []
    for steps in (2, 6):
        args = ["graphs.py", ROOT] + TINY + ["--dataset=bpe", "--compile=True", "--eval_interval=2",
                                           "--hellaswag_interval=2", "--hellaswag_file=hs.jsonl", f"--max_iters={steps}",
                                           f"--out_dir=out{steps}"] + (["--fsdp"] if fsdp else [])
        p = subprocess.run(torchrun_cmd(args), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr[-3000:]
        graphs = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("GRAPHS "))[7:])
        assert graphs and not any(graphs), graphs  # no graph with a symbolic size
        counts.append(len(graphs))
    assert counts[0] == counts[1], counts


def test_time_left_follows_the_recent_pace(monkeypatch):
    # a slow start (compile) and a slow stretch must not weigh on the estimate for long: the time
    # left is the steps to go times a moving average of the recent laps, evaluations left out
    import runtime
    now = [0.0]
    monkeypatch.setattr(runtime.time, "time", lambda: now[0])
    clock = runtime.StepClock(0, "cpu")
    now[0] = 100.0  # the first step: 100 s of compiling
    clock.count(1)
    clock.lap()
    assert clock.left(1, 1001) is None  # no pace yet: the console prints "?"
    for lap in range(10):  # then steps of 1 s, an evaluation of 50 s between two laps
        for _ in range(10):
            now[0] += 1.0
            clock.count(1)
        if lap == 4:
            clock.pause()
            now[0] += 50.0
            clock.resume()
        clock.lap()
    assert clock.left(101, 1001) == pytest.approx(900.0)  # 900 steps at 1 s, not at the run's average


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_keeps_the_checkpoint(workdir):
    # the first Ctrl-C asks for a stop after this step; a second one, while that step still runs
    # (steps of a wider model: ~0.1 s or more), ends the process at once, with the true reason
    wide = ["--n_embd=256", "--n_head=4", "--n_layer=4", "--block_size=128", "--batch_size=16", "--eval_interval=0",
            "--out_dir=out_twice"]
    train(workdir, *wide, "--max_iters=2")
    before = (workdir / "out_twice" / "ckpt.pt").read_bytes()
    args = [sys.executable, os.path.join(ROOT, "train.py")] + TINY + wide + ["--max_iters=10000", "--init_from=resume"]
    proc = subprocess.Popen(args, cwd=workdir, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line:  # training has begun
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out = line + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "second signal: exiting now" in out, out[-2000:]
    assert "Traceback" not in out and "disk" not in out
    assert (workdir / "out_twice" / "ckpt.pt").read_bytes() == before  # the last checkpoint, whole


def test_a_single_process_on_cuda_n_makes_it_the_current_device(monkeypatch):
    # without torchrun, --device=cuda:1 must make GPU 1 current: else the CUDA RNG state saved and
    # restored, torch.cuda.synchronize and the bf16 capability check would all look at GPU 0
    import runtime
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(runtime, "resolve_device", lambda name: ("cuda:1", "cuda"))
    monkeypatch.setattr(runtime.torch.cuda, "set_device", calls.append)
    world = runtime.setup_world("cuda:1")
    assert calls == ["cuda:1"] and world.device == "cuda:1" and not world.ddp


def run_stopping_at(workdir, monkeypatch, stop_at, *args):
    """train.py in this process, asked to stop (as by Ctrl-C) when it reaches step stop_at (None: never)."""
    import runtime
    import train as train_script

    class StopAt(runtime.StopVote):
        def exchange(self, requested):
            self.calls = getattr(self, "calls", 0) + 1  # one call per step taken: the step just reached
            return super().exchange(requested) or self.calls == stop_at

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(train_script, "StopVote", StopAt)
    monkeypatch.setattr(sys, "argv", ["train.py"] + TINY + list(args))
    train_script.main()
    monkeypatch.undo()


def test_a_stop_on_a_checkpoint_step_resumes_to_the_uninterrupted_log(workdir, monkeypatch):
    # step 3 is a checkpoint step but no eval_interval step: the stop saves there before its
    # evaluation, and the resume must take that evaluation (and none twice) for the log to match
    common = ["--eval_interval=5", "--checkpoint_interval=3", "--max_iters=8", "--lr_decay_iters=8"]
    run_stopping_at(workdir, monkeypatch, None, *common, "--out_dir=whole")
    run_stopping_at(workdir, monkeypatch, 3, *common, "--out_dir=parts")
    assert torch.load(workdir / "parts" / "ckpt.pt", weights_only=True)["step"] == 3
    assert 3 not in read_log(workdir / "parts" / "log.txt", "val")
    run_stopping_at(workdir, monkeypatch, None, *common, "--out_dir=parts", "--init_from=resume")
    whole, parts = (open(workdir / d / "log.txt").read().splitlines() for d in ("whole", "parts"))
    values = lambda lines, stream: [l for l in lines if l.split()[1] == stream]
    for stream in ("train", "val"):  # every value, in order, no line twice
        assert values(parts, stream) == values(whole, stream)
    assert sorted(read_log(workdir / "whole" / "log.txt", "val")) == [0, 3, 5, 6, 8]


@pytest.mark.parametrize("busy", [True, False])
def test_cpu_threads_are_picked_by_timing_the_first_steps(monkeypatch, busy):
    # a fake clock: a step takes what this thread count costs, on a busy machine (fewer threads
    # faster) or an idle one (more threads faster)
    import runtime
    cost = {4: 0.5, 2: 0.2, 1: 0.1} if busy else {4: 0.05, 2: 0.08, 1: 0.15}
    now, lines, threads = [0.0], [], [4]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(runtime.torch, "set_num_threads", lambda n: threads.__setitem__(0, n))
    monkeypatch.delenv("OMP_NUM_THREADS")
    picker = runtime.ThreadPicker("cpu", 0, 1, lambda line, **kw: lines.append(line))
    for _ in range(2):  # two val batches (too few to pick), then training steps: timed again from the start
        picker.start("val batch")
        now[0] += 1.0
        picker.done()
    taken = []
    for _ in range(12):
        taken.append(threads[0])
        picker.start()
        now[0] += cost[threads[0]]
        picker.done()
    if busy:  # 4, then 2, then 1 thread, each for 3 steps after the first: 1 kept
        assert taken == [4] * 4 + [2] * 3 + [1] * 5
        assert lines == ["CPU threads: 1 (4: 500 ms, 2: 200 ms, 1: 100 ms a training step, timed on the first ones); "
                         "cpu_threads=N or OMP_NUM_THREADS=N chooses"]
    else:  # 2 threads were slower than 4: no need to time 1; back to 4
        assert taken == [4] * 4 + [2] * 3 + [4] * 5 and lines[0].startswith("CPU threads: 4 (4: 50 ms, 2: 80 ms a")
    # an evaluation after training steps were timed is not timed: the pick goes on over the steps
    threads[0] = 4
    picker = runtime.ThreadPicker("cpu", 0, 1, lambda line, **kw: lines.append(line))
    for kind in ["training step"] * 3 + ["val batch"] * 5 + ["training step"] * 30:
        picker.start(kind)
        now[0] += cost[threads[0]] if kind == "training step" else 9.0
        picker.done()
    assert picker.counts == [] and max(picker.times) <= 4 and len(lines) == 2
    # a resumed run takes the count its checkpoint recorded: no timing, the same arithmetic as before
    threads[0] = 4
    resumed = runtime.ThreadPicker("cpu", 0, 1, lambda line, **kw: lines.append(line), resumed=2)
    assert threads[0] == 2 and resumed.counts == [] and lines[-1].startswith("CPU threads: 2, as before the resume")
    # a thread count given, or chosen by OMP_NUM_THREADS or torchrun, or a GPU: no timing
    runtime.ThreadPicker("cpu", 3, 1, print)
    assert threads[0] == 3
    for args, env in ((("cpu", 0, 1), "2"), (("cpu", 0, 2), None), (("cuda", 0, 1), None)):
        if env:
            monkeypatch.setenv("OMP_NUM_THREADS", env)
        assert runtime.ThreadPicker(*args, print).counts == []
