"""
The bookkeeping of a training run, apart from the training itself: who this process is among
the ranks (setup_world, close_world), how the model is spread over them (ddp_wrap, or
fully_shard for FSDP), how they agree (a failure, a stop, a non-finite loss), the stop flag that
Ctrl-C and SIGTERM raise, the log file, the console line, and the GPU peaks behind MFU. train.py
uses all of it; align.py and bench.py some.

Every function here that takes a World and does a collective must be called by every rank
at the same point of the run: that is what keeps them in step.
"""

import inspect
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from configurator import UserError, resolve_device


@dataclass
class World:
    """Who this process is: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
    `python train.py` is rank 0 of 1."""
    ddp: bool  # several processes: gradients (DDP) or shards (FSDP) are exchanged
    rank: int
    size: int
    device: str  # cuda:LOCAL_RANK under torchrun on GPUs
    device_type: str  # cuda, mps or cpu: what autocast takes
    fsdp: bool = False  # the model is sharded with FSDP2 (fsdp=True) instead of wrapped in DDP
    cpu_group: object = None  # DDP: a gloo group beside the device's, for the stop vote (StopVote)
    save_group: object = None  # DDP: a gloo group that waits SAVE_WAIT_S, for rank 0's checkpoint write

    @property
    def master(self):  # only rank 0 prints, logs and saves
        return self.rank == 0


SAVE_WAIT_S = 3 * 3600  # how long ranks wait for rank 0's checkpoint write: a failed write says so at once


def setup_world(device_setting, fsdp=False, timeout_s=600):
    """Who this process is (runtime.World): torchrun's RANK, LOCAL_RANK and WORLD_SIZE, one GPU
    per process, or rank 0 of 1 for a plain `python train.py`."""
    device, device_type = resolve_device(device_setting)
    if "RANK" not in os.environ:
        if device_type == "cuda":  # cuda:N: its RNG state, synchronize and capability checks, not GPU 0's
            torch.cuda.set_device(device)
        return World(False, 0, 1, device, device_type)
    rank, local_rank, size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    # timeout: a collective that waits this long means a rank is stuck or gone; it then
    # raises, instead of every other rank hanging forever (NCCL's own default is 10 minutes)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    # two CPU groups beside it: the stop vote's (read a step later, it never waits for the GPU), and
    # one whose collectives may wait as long as a checkpoint write on a slow shared file system
    # takes (the other ranks wait there while rank 0 writes; pg_timeout would abort the run)
    return World(True, rank, size, device, device_type, fsdp,
                 cpu_group=dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)),
                 save_group=dist.new_group(backend="gloo", timeout=timedelta(seconds=SAVE_WAIT_S)))


def ddp_wrap(model, device, device_type):
    """The model in DDP, one GPU per process. Buffers are not re-sent before every forward:
    the only ones are RoPE's tables, the same on every rank. gradient_as_bucket_view: the
    gradients live in DDP's all-reduce buckets instead of beside them (one copy, not two)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device] if device_type == "cuda" else None, gradient_as_bucket_view=True,
               **{buffers: False})  # (PyTorch 2.14 renamed broadcast_buffers)


def fully_shard(model, param_dtype=torch.float32, reshard_after_forward=True):
    """Shard a GPT across the ranks of the process group with FSDP2 (fsdp=True, under torchrun):
    FSDP's counterpart of ddp_wrap. Each rank then keeps 1/N of every weight, of its gradient
    and (the optimizer being built afterwards) of the AdamW moments; a Block's full weights are
    all-gathered just before it runs and freed after, forward and backward. One unit per Block,
    then the root for what is left (wte = lm_head, wpe, ln_f): the tied weight stays one
    parameter, in the root's unit. The weights move to the current device (cuda:LOCAL_RANK) as
    they are sharded. param_dtype bf16/fp16: the gathered weights are cast for compute, while
    gradients are reduced and the shards updated in fp32. reshard_after_forward=False keeps each
    Block's gathered weights from its forward to its backward: one all-gather fewer per Block and
    micro-step, for the whole model's weights (in param_dtype) held on every rank during a step."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, register_fsdp_forward_method
    from torch.distributed.fsdp import fully_shard as fsdp_shard
    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fsdp_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fsdp_shard(model, mp_policy=mp)  # model's class becomes an FSDP subclass of GPT
    # FSDP gathers the root's weights (wte = lm_head, wpe, ln_f) around forward() only: the
    # HellaSwag scorer's own entry point gets the same gathering
    register_fsdp_forward_method(model, "logits_at")
    return model


def reshard(model):
    """Free the gathered weights every FSDP unit of model still holds (fully_shard's
    reshard_after_forward=False keeps them after a forward that no backward follows, as an
    evaluation's): the checkpoint and the optimizer then see the shards again."""
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):  # an FSDP unit
            module.reshard()


def close_world(world):
    """Leave the process group. gloo (the CPU backend) frees each finished collective on a thread
    of its own, and freeing a tensor made in Python needs the GIL: a short sleep lets that thread
    finish before the interpreter shuts down (else about 1 exit in 20 aborted with torch 2.14,
    "terminate called without an active exception")."""
    if world.ddp:
        dist.destroy_process_group()
        time.sleep(0.1)


def rank_failed(world, error, timeout_s):
    """An exception on one rank of several: print it, with the rank, and leave the process at
    once, without destroy_process_group (it may wait on the others). The other ranks' next
    collective then fails (the peer is gone) or times out after pg_timeout, and they leave the
    same way, with one line; torchrun also ends the rest as soon as one rank exits with an
    error. Either way no rank is left hanging."""
    text = str(error)
    if isinstance(error, dist.DistError) or any(s in text for s in ("closed by peer", "reset by peer", "Timed out")):
        print(f"rank {world.rank}: another rank failed or stopped answering (a collective found it gone, or waited "
              f"over pg_timeout={timeout_s} s); its error is above. ({type(error).__name__}: {text.splitlines()[0][:200]})",
              file=sys.stderr)
    else:  # the failure itself: its traceback is what is needed to fix it
        print(f"rank {world.rank} failed:", file=sys.stderr)
        traceback.print_exception(error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# -----------------------------------------------------------------------------
# the ranks agree


def agree(world, error, group=None):
    """Every rank stops if one of them failed (rank 0 alone writes files): raise `error` here,
    or exit quietly where another rank has it to say. Every rank must call it. group: a gloo
    group to agree over (world.save_group after a checkpoint write), else the device's."""
    if world.ddp:
        failed = torch.tensor(float(error is not None), device="cpu" if group is not None else world.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        if failed.item() and error is None:
            sys.exit(2)
    if error is not None:
        raise error


def stop_agreed(stop, world):
    """Whether a stop was asked for on any rank. Under DDP every rank must call it at the same
    point (one all-reduce), so that all of them leave an evaluation at the same batch."""
    if not world.ddp:
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def evaluates_at(step, start_step, last, measured, cfg):
    """Whether the val loss is measured at this step: every eval_interval, at every checkpoint and at
    the end. A resume's first step is measured only if its checkpoint was not (measured: False; a
    stop saved before the evaluation it would have had): so the resumed log.txt equals an
    uninterrupted run's."""
    every = lambda n: bool(n) and step % n == 0
    if step == start_step and measured:  # measured and logged before this checkpoint was saved
        return False
    return every(cfg["eval_interval"]) or last or (every(cfg["checkpoint_interval"]) and step > 0)


def agree_on_step(loss_accum, bad_loss, stop, world):
    """At a log step: (the step's loss over every rank, whether any rank asked to stop, whether
    any rank saw a non-finite loss since the last check). A signal may reach the ranks a step
    apart and saving is collective, so under DDP no rank acts on a stop alone: they agree here.
    The .item() waits for the device, so the step time measured after it is real."""
    if world.ddp:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # the loss of the whole global batch
        flags = torch.stack([torch.tensor(float(stop.requested), device=world.device), bad_loss.float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stopping, bad_loss = bool(flags[0].item()), flags[1] > 0
    else:
        stopping = stop.requested
    loss = loss_accum.item()
    return loss, stopping, bool(bad_loss.item()) or not math.isfinite(loss)


def local(t):
    """This rank's part of a tensor: its shard under FSDP (a DTensor), the tensor otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t  # (a DTensor's method: no import needed)


def all_finite(bad_loss, params, world):
    """No non-finite loss since the last check and no non-finite weight, on any rank (every
    rank must call it, and all get the same answer). Under FSDP each rank checks its shards."""
    bad = (bad_loss | ~torch.stack([torch.isfinite(local(p)).all() for p in params]).all()).float()
    if world.ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def nonfinite(out_dir, step, val_loss=None, what="the loss is not finite"):
    """A NaN/inf loss (or val loss, or what else diverged): the error that stops the run without
    saving, so the checkpoints in out_dir stay as they were."""
    what = f"the val loss is not finite ({val_loss})" if val_loss is not None else what
    kept = ("no checkpoint had been written yet" if not os.path.exists(os.path.join(out_dir, "ckpt.pt")) else
            f"{out_dir}/ckpt.pt, the latest, and ckpt_best.pt, the lowest val loss, are untouched"
            if os.path.exists(os.path.join(out_dir, "ckpt_best.pt")) else f"{out_dir}/ckpt.pt is untouched")
    return UserError(f"{what} at step {step}: stopping without saving ({kept}); lower "
                     "learning_rate, check the data, or try dtype=float32")


def worse_than_best(val_loss, best_val):
    """What to add to the val loss's console line when it is more than 10% above the best
    checkpoint's: a run that is diverging (or overfitting) says so while the best is kept."""
    if val_loss is None or best_val is None or val_loss <= 1.1 * best_val:
        return ""
    return f" (the best checkpoint's was {best_val:.4f}: ckpt_best.pt keeps it)"


# -----------------------------------------------------------------------------
# stopping, logging


class StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to stop after this step (and save). A second Ctrl-C
    exits at once (a checkpoint being written is then abandoned; ckpt.pt is only replaced whole).
    A second SIGTERM changes nothing: under SLURM one stop often arrives twice (to each rank from
    the scheduler, and again through torchrun), and it must not cost the save it asked for."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # at once: not even a checkpoint being written is
            print("\nsecond signal: exiting now", flush=True)  # finished (its temp file is removed by the
            os._exit(130)  # next run in out_dir)
        if self.requested:
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step or evaluation batch (with several ranks: the "
              "next one), then saving and exiting (Ctrl-C again to exit at once)", flush=True)


class StopVote:
    """The ranks agree on a stop at every step, without waiting for the GPU: each step sends this
    rank's flag in an all-reduce over the CPU (world.cpu_group, gloo: started and left running)
    and reads the result of the one sent a step earlier, long finished by then. Every rank reads
    the same result at the same step, so all stop at the same step, one or two steps after the
    signal reached the last of them, not at the next log step. One process: the flag itself."""

    def __init__(self, world):
        self.world, self.pending = world, None

    def exchange(self, requested):
        """Send this step's flag; return whether any rank had asked a step ago (every rank: the same)."""
        if not self.world.ddp:
            return requested
        agreed = self.result()
        flag = torch.tensor([float(requested)])  # on the CPU: reading it syncs nothing
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world.cpu_group, async_op=True), flag)
        return agreed

    def result(self):
        """The last vote sent, waited for (a step after it was sent, it is done); False if none."""
        if self.pending is None:
            return False
        work, flag = self.pending
        work.wait()
        self.pending = None
        return bool(flag.item())


class RunLog:
    """out_dir/log.txt, one 'STEP STREAM VALUE' line per value, and wandb if asked. With no
    path (ranks other than 0) it writes nothing. A write that fails (a full disk) is said once
    and logging stops; the training goes on, and the next checkpoint says whether it can be saved."""

    def __init__(self, path, cfg, append=False):
        self.file = self.wandb = None
        self.path, self.mode = path, "a" if append else "w"  # opened at the first value: a start that fails leaves no empty log
        if path is None:
            return
        if cfg["wandb_log"]:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    def __call__(self, step, **values):
        if self.path is None:
            return
        try:
            if self.file is None:
                self.file = open(self.path, self.mode)
            for k, v in values.items():
                self.file.write(f"{step} {k} {v:.7g}\n" if isinstance(v, float) else f"{step} {k} {v}\n")
            self.file.flush()
        except OSError as e:
            print(f"warning: cannot write {self.path} ({e.strerror}); the log stops here, the training goes on")
            self.path = None
            return
        if self.wandb is not None:
            self.wandb.log(values, step=step)


class ThreadPicker:
    """On the CPU, torch runs one thread per core. On an idle machine that is the fastest; where
    other work shares the cores, the threads wait for each other and a step can take five times
    longer than on one thread. So a one-process CPU run with no thread count given (cpu_threads=0,
    no OMP_NUM_THREADS) times its first val batches (or, with no evaluation at the start, training
    steps) at the default and at halves of it, keeps the fastest and says so in one line. (The
    thread count changes the speed, and can change the last digits: train.py's losses came out
    the same at 1 and 2 threads, a vision run's did not (docs/vision.md). So a checkpoint records
    the count (save_run), and a resumed run takes it again, resumed=, instead of picking anew.)"""

    STEPS = 3  # steps timed at each thread count, after the run's first (warm-up) step

    def __init__(self, device_type, setting, ranks, say, resumed=0):
        self.say, self.times, self.t0, self.warm, self.kind = say, {}, None, False, None
        self.counts = []  # the thread counts left to time: [n, n/2, ..., 1]; empty = nothing to do
        if device_type != "cpu":
            return
        if setting:
            torch.set_num_threads(setting)
            return
        n = torch.get_num_threads()
        if "OMP_NUM_THREADS" in os.environ or ranks > 1 or n == 1:  # chosen already (torchrun sets it)
            return
        if resumed:  # the count the run used before its checkpoint: the same arithmetic from here on
            torch.set_num_threads(resumed)
            say(f"CPU threads: {resumed}, as before the resume; cpu_threads=N or OMP_NUM_THREADS=N chooses", flush=True)
            return
        while n >= 1:
            self.counts.append(n)
            n //= 2

    def start(self, kind="training step"):  # before a training step or a val batch
        self.t0 = None
        if not self.counts or (self.kind == "training step" and kind != self.kind):
            return  # (once training steps are timed, later evaluations' batches are not: the pick ends)
        if kind != self.kind:  # a val batch and a training step do not compare: start again
            self.kind, self.times, self.warm = kind, {}, False
            torch.set_num_threads(self.counts[0])
        self.t0 = time.perf_counter()

    def done(self):  # after it
        if self.t0 is None:
            return
        if not self.warm:  # the first step (allocations, caches) says nothing of the speed
            self.warm = True
            return
        n = torch.get_num_threads()
        self.times.setdefault(n, []).append(time.perf_counter() - self.t0)
        if len(self.times[n]) < self.STEPS:
            return
        pace = {k: sorted(v)[len(v) // 2] for k, v in self.times.items()}  # the median step of each count
        best = min(pace, key=pace.get)
        nxt = self.counts.index(n) + 1
        if best == n and nxt < len(self.counts):  # fewer threads were faster so far: try fewer still
            torch.set_num_threads(self.counts[nxt])
            return
        torch.set_num_threads(best)
        self.counts = []
        self.say(f"CPU threads: {best} ({', '.join(f'{k}: {v * 1000:.0f} ms' for k, v in pace.items())} a "
                 f"{self.kind}, timed on the first ones); cpu_threads=N or OMP_NUM_THREADS=N chooses", flush=True)


class StepClock:
    """The time of the training steps between two log lines, evaluation and saving left out
    (pause/resume around them), and the time the run has left at the pace of recent steps.
    The run's first step (torch.compile, CUDA's caches and kernels warming up) is timed on
    its own, as warmup_s, and is in no lap: the logged ms/step, tok/s and MFU are steady-state."""

    def __init__(self, start_step, device_type):
        self.run_start = self.last = time.time()
        self.start_step, self.device_type = start_step, device_type
        self.steps = self.tokens = 0  # since the last lap
        self.warmup_s, self.warmup_logged = None, False  # the first step's seconds, once it is done
        self.pace = None  # seconds per step, a moving average over the recent laps

    def pause(self):
        self.paused_at = time.time()

    def resume(self):
        self.last += time.time() - self.paused_at

    def count(self, tokens):
        if self.warmup_s is None:  # the first step: wait for it (this once), then start the laps
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            self.warmup_s, self.last = now - self.last, now
            return
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def lap(self):
        """The log values of the steps since the last lap: {dt_ms, tok_per_s} (none when the
        first step is the only one since), with warmup_s at the first lap; and the tokens per
        step (or None). Call it after something that waited for the device (an .item()), so
        the time is real."""
        now = time.time()
        values, per_step = {}, None
        if self.steps:
            dt = (now - self.last) / self.steps  # seconds per step
            values = dict(dt_ms=dt * 1000, tok_per_s=self.tokens / (now - self.last))
            per_step = self.tokens / self.steps
            self.pace = dt if self.pace is None else 0.7 * self.pace + 0.3 * dt  # recent laps weigh most
        if self.warmup_s is not None and not self.warmup_logged:
            values["warmup_s"], self.warmup_logged = self.warmup_s, True
        self.last, self.steps, self.tokens = now, 0, 0
        return values, per_step

    def left(self, step, max_iters):
        """Seconds to max_iters at the recent pace (evaluations not counted), or None before the
        first lap (the first step's time, compile included, says nothing of the pace)."""
        return None if self.pace is None else (max_iters - step) * self.pace


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU. The first key
# found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.5e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989.5e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


def peak_flops(device_name):
    """The bf16 peak of a GPU by name, or None if unknown (then MFU is not reported)."""
    return next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)


def format_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def console_line(step, max_iters, values, left):
    """The console's line for one logged step: the same values as log.txt, and the time left."""
    mfu = f" | mfu {values['mfu'] * 100:.1f}%" if "mfu" in values else ""
    speed = f"{values['dt_ms']:.1f} ms | {values['tok_per_s']:,.0f} tok/s{mfu}" if "dt_ms" in values else ""
    if "warmup_s" in values:  # the first step, timed apart
        speed += f"{' | ' if speed else ''}first step {values['warmup_s']:.1f} s{' (compile)' if values.get('compiled') else ''}"
    return (f"step {step:5d}/{max_iters} | loss {values['train']:.4f} | lr {values['lr']:.2e} | "
            f"norm {values['norm']:.4f} | {speed} | epoch {values['epoch']} | {'?' if left is None else format_time(left)} left")
