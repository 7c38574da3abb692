"""train.py with fsdp=True (FSDP2, CPU, gloo) in subprocesses: the same training as one process,
exact resume, checkpoints that every script reads and that DDP runs resume (and the reverse),
two "nodes" on localhost, and the refusals."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_equal_up_to_rounding, read_log, run_script, torchrun
from test_train import TINY, train

TRAIN = os.path.join(ROOT, "train.py")
# 256 tokens per step = 4 x 32 x 2 ranks, or 2 accumulation steps in one process; dropout on,
# so that the per-rank RNG streams have to come back on resume
COMMON = ["--total_batch_size=256", "--eval_interval=3", "--dropout=0.1"]


def same(a, b, tol=1e-5):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_with_accumulation(workdir):
    common = COMMON + ["--max_iters=6", "--dropout=0.0"]
    train(workdir, *common, "--out_dir=out_one", "--eval_iters=4")  # the val batches of both ranks
    p = torchrun([TRAIN] + TINY + common + ["--out_dir=out_fsdp", "--fsdp"], cwd=workdir)
    assert "FSDP" in p.stdout and "2 rank(s)" in p.stdout
    one, two = workdir / "out_one" / "log.txt", workdir / "out_fsdp" / "log.txt"
    same(read_log(one, "train"), read_log(two, "train"))
    same(read_log(one, "norm"), read_log(two, "norm"))  # the clipped norm, summed over the shards
    same(read_log(one, "val"), read_log(two, "val"))
    # the checkpoint is the single-process one: full tensors, the tied weight stored once
    a = torch.load(workdir / "out_one" / "ckpt.pt", weights_only=True)
    b = torch.load(workdir / "out_fsdp" / "ckpt.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert b["model"]["lm_head.weight"] is b["model"]["transformer.wte.weight"]
    for k in a["model"]:  # 6 steps at a peak lr of 1e-2 (see TINY)
        assert_equal_up_to_rounding(a["model"][k], b["model"][k], lr=1e-2, steps=6)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, s in a["optimizer"]["state"].items():
        torch.testing.assert_close(s["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"], atol=1e-7, rtol=1e-3)


@pytest.mark.slow
def test_fsdp_full_gradients_and_unresharded_blocks_train_as_one_process(workdir):
    # fsdp_full_grads (whole gradients through 2 micro-steps, one reduce-scatter a step) and
    # fsdp_reshard=False (each Block's weights kept from its forward to its backward): the same
    # training as one process with 4 accumulation steps
    common = ["--total_batch_size=512", "--eval_interval=3", "--max_iters=4", "--dropout=0.0"]
    train(workdir, *common, "--out_dir=one", "--eval_iters=4")
    torchrun([TRAIN] + TINY + common + ["--out_dir=f", "--fsdp", "--fsdp_full_grads", "--fsdp_reshard=False"],
             cwd=workdir)
    one, two = workdir / "one" / "log.txt", workdir / "f" / "log.txt"
    same(read_log(one, "train"), read_log(two, "train"))
    same(read_log(one, "norm"), read_log(two, "norm"))
    same(read_log(one, "val"), read_log(two, "val"))


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_crosses_with_ddp(workdir):
    common = COMMON + ["--lr_decay_iters=8", "--eval_interval=4"]
    fsdp = [TRAIN] + TINY + common + ["--fsdp"]
    ddp = [TRAIN] + TINY + common
    torchrun(fsdp + ["--max_iters=8", "--out_dir=full"], cwd=workdir)
    # FSDP: 4 steps, stop, resume for 4 more: bit for bit the uninterrupted run
    torchrun(fsdp + ["--max_iters=4", "--out_dir=f"], cwd=workdir)
    os.makedirs(workdir / "f_to_ddp")
    (workdir / "f_to_ddp" / "ckpt.pt").write_bytes((workdir / "f" / "ckpt.pt").read_bytes())
    (workdir / "f_to_ddp" / "log.txt").write_bytes((workdir / "f" / "log.txt").read_bytes())
    torchrun(fsdp + ["--max_iters=8", "--out_dir=f", "--init_from=resume"], cwd=workdir)
    full = read_log(workdir / "full" / "log.txt", "train")
    assert read_log(workdir / "f" / "log.txt", "train") == full
    assert read_log(workdir / "f" / "log.txt", "val") == read_log(workdir / "full" / "log.txt", "val")
    # an FSDP checkpoint resumed under DDP, and a DDP one under FSDP: the same training, up to
    # the order of float additions (DDP all-reduces, FSDP reduce-scatters)
    p = torchrun(ddp + ["--max_iters=8", "--out_dir=f_to_ddp", "--init_from=resume"], cwd=workdir)
    assert "fsdp=False (was True)" in p.stdout
    torchrun(ddp + ["--max_iters=4", "--out_dir=d"], cwd=workdir)
    torchrun(fsdp + ["--max_iters=8", "--out_dir=d", "--init_from=resume"], cwd=workdir)
    same(read_log(workdir / "f_to_ddp" / "log.txt", "train"), full)
    same(read_log(workdir / "d" / "log.txt", "train"), full)


@pytest.mark.slow
def test_fsdp_with_muon_equals_one_process_and_resumes(workdir):
    # under FSDP each rank gathers every Muon matrix's update, orthogonalises it whole (q, k, v
    # apart) and keeps its own rows: the same steps as one process; the sharded momentum
    # buffers go through a stop and a resume, and the checkpoint holds them whole. 33 wide, 3 heads:
    # every matrix but c_fc has an odd number of rows, so the two ranks' shards differ in size
    common = COMMON + ["--optimizer=muon", "--muon_lr=0.02", "--dropout=0.0", "--lr_decay_iters=8",
                       "--eval_interval=4", "--n_embd=33", "--n_head=3"]
    train(workdir, *common, "--max_iters=8", "--out_dir=one", "--eval_iters=4")
    fsdp = [TRAIN] + TINY + common + ["--fsdp", "--out_dir=f"]
    p = torchrun(fsdp + ["--max_iters=4"], cwd=workdir)
    assert "Muon tensors: 8" in p.stdout
    torchrun(fsdp + ["--max_iters=8", "--init_from=resume"], cwd=workdir)
    one, two = workdir / "one" / "log.txt", workdir / "f" / "log.txt"
    same(read_log(one, "train"), read_log(two, "train"))
    same(read_log(one, "val"), read_log(two, "val"))
    a = torch.load(workdir / "one" / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(workdir / "f" / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    buffers = [k for k in a if "momentum_buffer" in a[k]]
    assert len(buffers) == 8 and set(a) == set(b)
    for k in buffers:
        torch.testing.assert_close(a[k]["momentum_buffer"], b[k]["momentum_buffer"], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_sample_and_hellaswag(workdir):
    torchrun([TRAIN] + TINY + COMMON + ["--max_iters=4", "--eval_iters=2", "--out_dir=out_fsdp", "--fsdp"],
             cwd=workdir)
    p = run_script([os.path.join(ROOT, "sample.py"), "--out_dir=out_fsdp", "--start=the king", "--num_samples=1",
                    "--max_new_tokens=20", "--device=cpu"], cwd=workdir)
    assert p.stdout.startswith("the king") and len(p.stdout) >= len("the king") + 20
    # hellaswag.py's val-loss mode on the same val batches as the run's last evaluation (2 per
    # rank, 2 ranks: the first 4 batches of 4 x 32)
    p = run_script([os.path.join(ROOT, "hellaswag.py"), "--out_dir=out_fsdp", "--val_dataset=tiny", "--device=cpu",
                    "--batch_size=4", "--block_size=32", "--eval_iters=4"], cwd=workdir)
    logged = read_log(workdir / "out_fsdp" / "log.txt", "val")[4]
    printed = [float(w) for w in p.stdout.replace(",", " ").split() if w.replace(".", "", 1).isdigit() and "." in w]
    assert any(abs(v - logged) < 1e-4 for v in printed), (logged, p.stdout)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [True], ids=["fsdp"])
def test_two_nodes_on_localhost_equal_one_process(workdir, fsdp):
    """Two torchrun launchers, one process each, meeting through a c10d rendezvous as two
    nodes would (slurm/train.sbatch starts them so). FSDP only: it goes through every collective
    DDP uses and more (DDP == one process is tested on one node)."""
    common = COMMON + ["--max_iters=4", "--dropout=0.0"]
    train(workdir, *common, "--out_dir=out_one", "--eval_iters=4")
    common += ["--fsdp"] if fsdp else []
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=test",
         TRAIN] + TINY + common + ["--out_dir=out_nodes"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert any("2 rank(s)" in out for out in outs)
    for stream in ("train", "val"):
        same(read_log(workdir / "out_one" / "log.txt", stream), read_log(workdir / "out_nodes" / "log.txt", stream))


@pytest.mark.slow
def test_sft_under_fsdp_equals_one_process(tmp_path):
    import json
    from checkpoint import make_checkpoint, save_checkpoint
    from test_sft import make_sft, tiny_model
    make_sft(str(tmp_path / "data" / "sft"), n_train=8, n_val=8)
    os.makedirs(tmp_path / "base")
    meta = json.load(open(tmp_path / "data" / "sft" / "meta.json"))
    save_checkpoint(make_checkpoint(tiny_model(), meta, {}), str(tmp_path / "base" / "ckpt.pt"))
    common = [TRAIN, "--dataset=sft", "--init_from=base", "--block_size=32", "--device=cpu", "--dtype=float32",
              "--batch_size=4", "--total_batch_size=8", "--max_iters=3", "--eval_interval=0", "--eval_iters=1",
              "--warmup_iters=1", "--learning_rate=1e-2", "--min_lr=1e-3"]
    run_script(common + ["--out_dir=one", "--eval_iters=2"], cwd=tmp_path)
    torchrun(common + ["--out_dir=fsdp", "--fsdp"], cwd=tmp_path)
    for stream in ("train", "val"):
        same(read_log(tmp_path / "one" / "log.txt", stream), read_log(tmp_path / "fsdp" / "log.txt", stream))


def test_fsdp_refusals_are_one_line(workdir):
    p = train(workdir, "--max_iters=2", "--fsdp", check=False)  # no torchrun: nothing to shard over
    assert p.returncode == 2 and "under torchrun" in p.stderr and "Traceback" not in p.stderr
    # under torchrun (RANK set), settings FSDP does not take are refused before any work
    for extra, message in ((["--lora_rank=4", "--init_from=gpt2"], "LoRA"),
                           (["--dtype=float16"], "float16")):
        p = run_script([TRAIN] + TINY + ["--fsdp"] + extra, cwd=workdir, env=dict(RANK="0"), check=False)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


SHARD_CHECK = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig
from runtime import fully_shard
from runtime import World, close_world
from train import grad_sync
dist.init_process_group("gloo")
torch.manual_seed(0)
model = fully_shard(GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)))
world = World(True, dist.get_rank(), dist.get_world_size(), "cpu", "cpu", fsdp=True)
total = sum(p.numel() for p in model.parameters())
out = open(f"shard_{dist.get_rank()}.txt", "w")  # one file per rank: printed lines of two ranks interleave
for micro in range(2):  # two micro-steps of one optimizer step, as train.py runs them
    x = torch.randint(0, 64, (2, 16))
    with grad_sync(model, world, last_micro=micro == 1):
        model(x, x)[1].backward()
    local = sum(p.grad.to_local().numel() for p in model.parameters())
    out.write(f"micro {micro}: {local} of {total}\n")
out.close()
close_world(world)  # leaves the group as train.py does (gloo's exit race: see close_world)
'''


@pytest.mark.slow
def test_fsdp_gradients_stay_sharded_through_accumulation(tmp_path):
    # after every micro-step (not only the last) each rank holds its shard of each gradient:
    # about 1/ranks of the model's, never a full fp32 copy
    (tmp_path / "shard_check.py").write_text(SHARD_CHECK)
    torchrun([str(tmp_path / "shard_check.py"), ROOT], cwd=tmp_path)
    lines = [line.split() for rank in range(2) for line in (tmp_path / f"shard_{rank}.txt").read_text().splitlines()]
    assert len(lines) == 4, lines  # 2 micro-steps x 2 ranks
    for _, _, local, _, total in lines:
        assert 0.45 < int(local) / int(total) < 0.55, (local, total)


MUON_SPLIT = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import optim
from model import GPT, GPTConfig
from runtime import fully_shard
dist.init_process_group("gloo")
calls, real = [0], optim.newton_schulz
def counted(*args, **kwargs):
    calls[0] += 1
    return real(*args, **kwargs)
optim.newton_schulz = counted
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=3, n_embd=33))
if len(sys.argv) > 2:  # sharded over the ranks
    fully_shard(model)
opt = optim.configure_optimizers(model, 0.0, 1e-3, (0.9, 0.95), "cpu", verbose=False,
                                 muon=dict(lr=0.02, momentum=0.95, weight_decay=0.0))[0]
model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))[1].backward()
opt.step()
open(f"calls_{dist.get_rank()}_{len(sys.argv)}.txt", "w").write(str(calls[0]))
from runtime import World, close_world
close_world(World(True, dist.get_rank(), dist.get_world_size(), "cpu", "cpu"))  # (gloo's exit race: see there)
'''


@pytest.mark.slow
def test_fsdp_muon_deals_the_matrices_to_the_ranks(tmp_path):
    # each matrix (q, k and v three blocks) is orthogonalised on one rank only: the two ranks'
    # Newton-Schulz calls add up to one process's; the results are the same steps as one
    # process's (test_fsdp_with_muon_equals_one_process_and_resumes)
    (tmp_path / "muon_split.py").write_text(MUON_SPLIT)
    torchrun([str(tmp_path / "muon_split.py"), ROOT, "shard"], cwd=tmp_path)
    torchrun([str(tmp_path / "muon_split.py"), ROOT], cwd=tmp_path, nproc=1)
    sharded = [int((tmp_path / f"calls_{r}_3.txt").read_text()) for r in range(2)]
    whole = int((tmp_path / "calls_0_2.txt").read_text())
    assert whole == 2 * (3 + 1 + 1 + 1) and sum(sharded) == whole and max(sharded) < whole, (sharded, whole)
