"""
How fast is this model on this machine? Two measurements, each ending in one line to paste
into an issue:

    python bench.py --mode=train --model=gpt2 --batch_size=16 --block_size=1024 --dtype=bfloat16 --compile=True
    python bench.py --mode=sample --model=gpt2 --prompt_len=16 --new_tokens=200
    python bench.py --mode=dpo --model=gpt2 --batch_size=4 --block_size=256 --compile=False
    python bench.py --mode=rollout --model=gpt2 --prompt_len=60 --new_tokens=64 --sample_batch=8
    python bench.py --mode=serve --model=gpt2 --prompt_len=16 --new_tokens=100 --sample_batch=8
    python bench.py --mode=vision --n_layer=3 --n_head=4 --n_embd=128 --vocab_size=27 --batch_size=32 --block_size=66
    torchrun --standalone --nproc_per_node=2 bench.py --model=gpt2 --fsdp   # per-rank memory, FSDP (or DDP without --fsdp)

train   times whole optimizer steps on random tokens: host-to-device copy, forward, backward
        (gradient accumulation if grad_accum > 1), gradient clipping, AdamW (or Muon + AdamW
        with --optimizer=muon). The same path as train.py, so its ms/step is what a real run
        costs minus the data loading. Reports ms/step, tokens/s, MFU, peak memory, and the
        optimizer update's share of the step (timed apart, in a second round of steps). Under
        torchrun it trains as train.py does on several ranks, in DDP or (--fsdp) FSDP2, and
        reports every rank's peak memory.
sample  times model.generate, with the KV cache and with a full recompute of the context for
        every new token, at batch 1 and batch N. Reports tokens/s and the cache's speed-up.
rollout times PPO's rollouts: prompts of different lengths in one left-padded batch, against
        one prompt at a time.
serve   times serve.py over HTTP: tokens/s for 1 client and for N clients streaming at once,
        decoded together in one batch and one request at a time (a queue).
vision  times train_vision.py's step: a new ViT (vit_layers, n_embd wide) over image_size
        pictures, the pixel-shuffle projector and the GPT, on random pictures and tokens; tokens/s
        counts the LM's positions, text and image.

--profile=True then runs torch.profiler over a few more steps (train) or one generation
(sample) and prints the ops that cost the most time.

MFU (model FLOPs utilisation) = the FLOPs the model needs per second (model.flops_per_token:
6 per parameter per token, plus attention) / the device's peak. Only the FLOPs of the model
count, not the ones a kernel wastes, so it compares implementations fairly.
"""

import os
import platform
import sys
import time
from contextlib import nullcontext

from configurator import autocast_context, configure, die, exit_on_ctrl_c, print_config, resolve_device, resolve_dtype

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, PRESETS, GPTConfig, estimate_mfu
from optim import configure_optimizers
from plan import HUB_SHAPES
from runtime import ddp_wrap, fully_shard, peak_flops

# -----------------------------------------------------------------------------
# settings: python bench.py [config/FILE.py] [--key=value ...]

DEFAULTS = dict(
    mode="train",  # train: optimizer steps; sample: KV cache vs recompute; dpo: DPO vs SFT step; rollout: PPO's; serve; vision
    # the model (random weights: speed does not depend on them)
    model="gpt2",  # a preset of model.py (gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-1.3b) or smollm2-135m (Llama-shaped)
    n_layer=0,  # > 0: override the preset's number of layers
    n_head=0,  # > 0: override the preset's number of heads
    n_embd=0,  # > 0: override the preset's width
    vocab_size=0,  # 0 = the model's: 50304 for GPT-2 (its 50257 padded to a multiple of 128: faster matmuls)
    rope=False,  # rotary position embeddings instead of the learned position table
    qk_norm=False,  # RMS-normalised queries and keys (train.py's setting of the same name)
    mlp="gelu",  # gelu | relu2 (a Llama-shaped model is swiglu whatever this says)
    tie_embeddings=True,  # False: a separate lm_head
    optimizer="adamw",  # train mode: adamw | muon (Muon on the blocks' matrices, AdamW on the rest)
    # train mode
    batch_size=16,  # micro-batch: sequences per forward/backward
    block_size=1024,  # tokens per sequence, and the model's context (sample mode too)
    grad_accum=1,  # micro-batches per optimizer step
    warmup=5,  # untimed steps first: torch.compile, cuBLAS/cuDNN autotuning, the allocator
    steps=10,  # timed steps (sample mode: untouched, one timed generation per row)
    fsdp=False,  # under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2) instead of DDP
    # vision mode: the ViT is n_embd wide with n_head heads
    image_size=32,  # pictures of image_size x image_size pixels
    patch_size=4,  # in patches of patch_size x patch_size
    shuffle=2,  # the projector's pixel shuffle: shuffle x shuffle patches -> one LM token
    vit_layers=3,  # the ViT's Blocks
    # sample mode
    sample_batch=8,  # the batch N timed besides batch 1 (1: batch 1 only); serve mode: the clients at once
    prompt_len=16,  # prompt tokens per sequence
    new_tokens=200,  # tokens generated per sequence
    # both
    device="auto",  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # auto (bf16 on a GPU that has it, else fp16; fp32 on cpu/mps), float32, bfloat16, float16
    compile=True,  # torch.compile the model (train mode only: generation changes shape every step)
    peak_flops=0.0,  # the device's peak FLOP/s for MFU; 0: look the GPU up in runtime.PEAK_FLOPS
    profile=False,  # also run torch.profiler and print the most expensive ops
    seed=1337,  # for the random tokens and weights
)

# the models to time: GPT-2's sizes, and SmolLM2-135M's shape (30 layers, 9 heads sharing 3
# key/value heads, 576 wide, SwiGLU 1536, vocabulary 49152, tied), random weights: speed does not
# depend on them
SHAPES = {**{name: dict(shape, vocab_size=50304) for name, shape in PRESETS.items()},
          "smollm2-135m": HUB_SHAPES["HuggingFaceTB/SmolLM2-135M"]}

# the optimizer settings of train.py's defaults; they do not change the speed, only the numbers
WEIGHT_DECAY, LEARNING_RATE, BETAS, GRAD_CLIP = 0.1, 6e-4, (0.9, 0.95), 1.0
MUON = dict(lr=0.02, momentum=0.95, weight_decay=0.0)


# -----------------------------------------------------------------------------
# set-up: device, precision, model


def setup(cfg):
    """Check the settings and pick the device and dtype. Returns (device, device_type, dtype);
    device_type is what torch.autocast wants: cuda, mps or cpu."""
    if cfg["mode"] not in ("train", "sample", "dpo", "rollout", "serve", "vision"):
        die(f"--mode must be train, sample, dpo, rollout, serve or vision, not {cfg['mode']!r}")
    if cfg["model"] not in SHAPES:
        die(f"unknown --model={cfg['model']}; choose one of {', '.join(SHAPES)}")
    for key in ("batch_size", "block_size", "grad_accum", "steps", "sample_batch", "prompt_len",
                "new_tokens"):
        if cfg[key] < 1:
            die(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["warmup"] < 0 or cfg["peak_flops"] < 0:
        die("--warmup and --peak_flops cannot be negative")
    if cfg["optimizer"] not in ("adamw", "muon"):
        die(f"--optimizer must be adamw or muon, got {cfg['optimizer']!r}")
    if cfg["mlp"] not in ("gelu", "relu2"):
        die(f"--mlp must be gelu or relu2, got {cfg['mlp']!r}")
    if cfg["vocab_size"] < 0:
        die(f"--vocab_size must not be negative (0 = the model's), got {cfg['vocab_size']}")
    n_head = cfg["n_head"] or SHAPES[cfg["model"]]["n_head"]
    n_embd = cfg["n_embd"] or SHAPES[cfg["model"]]["n_embd"]
    if n_embd % n_head:
        die(f"n_embd={n_embd} is not a multiple of n_head={n_head}: change --n_embd or --n_head")
    if cfg["rope"] and (n_embd // n_head) % 2:
        die(f"rope needs an even head size, got {n_embd // n_head}: change --n_embd or --n_head")
    if cfg["mode"] in ("sample", "rollout", "serve") and cfg["prompt_len"] + cfg["new_tokens"] > cfg["block_size"]:
        # past the context the cached path re-runs the whole window every step: not what we time
        die(f"prompt_len + new_tokens = {cfg['prompt_len'] + cfg['new_tokens']} exceeds "
            f"--block_size={cfg['block_size']}: raise --block_size or shorten the generation")

    device, device_type = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device_type)

    if device_type == "cuda":
        if ":" in device:
            torch.cuda.set_device(device)  # cuda:N: allocate and count memory on that GPU
        # fp32 matmuls and convolutions on TF32 tensor cores: 10-bit mantissa inputs, fp32
        # accumulation; several times faster, and what every GPU training run uses
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg["seed"])
    return device, device_type, dtype


def build_model(cfg, device):
    """A randomly initialised GPT of the chosen preset and overrides, on device."""
    overrides = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd") if cfg[k] > 0}
    shape = dict(SHAPES[cfg["model"]])
    if shape.get("mlp") != "swiglu":  # the from-scratch options, on a GPT-2 shape
        shape.update(rope=cfg["rope"], mlp=cfg["mlp"])
    shape.update(qk_norm=cfg["qk_norm"], tie_embeddings=cfg["tie_embeddings"], block_size=cfg["block_size"], **overrides)
    if cfg["vocab_size"]:
        shape["vocab_size"] = cfg["vocab_size"]
    config = GPTConfig(**shape)
    return GPT(config).to(device)


def synchronize(device_type):
    """Wait for the GPU to finish the work queued so far. GPU calls return as soon as the
    work is queued, so a clock read without this measures the queueing, not the work."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def peak_flops_for(cfg, device, device_type, dtype):
    """The peak FLOP/s that MFU divides by: --peak_flops, or the GPU's row of PEAK_FLOPS.
    None where unknown (a CPU, an unlisted GPU): MFU is then reported as n/a."""
    if cfg["peak_flops"] > 0:
        return cfg["peak_flops"]
    if device_type != "cuda":
        return None
    flops = peak_flops(torch.cuda.get_device_name(device))  # runtime.PEAK_FLOPS: bf16 peaks
    if flops is not None and dtype == torch.float32:
        flops /= 2  # fp32 matmuls run on TF32 tensor cores, at half the bf16 rate
    return flops


def start_ranks(cfg, device, device_type):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs), one GPU per rank.
    Returns (device, rank, world_size, distributed); a plain `python bench.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        if cfg["fsdp"]:
            die("--fsdp shards over the processes torchrun starts: torchrun --standalone --nproc_per_node=2 "
                "bench.py --fsdp")
        return device, 0, 1, False
    if device_type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size(), True


def rss_follows_tensors():
    """Linux (glibc): give every allocation over 64 KiB its own mapping, returned to the OS as
    soon as it is freed. By default glibc keeps freed memory for reuse, so the resident set
    stays at its high-water mark: FSDP's ranks would show the whole model each builds before
    sharding it, and DDP and FSDP could not be told apart by RSS. Costs some speed."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: RSS is then an upper bound


def reset_peak_memory(device, device_type):
    """Forget the peak so far (the warm-up's: compilation, and the whole model every rank
    builds before FSDP shards it): the next reading is the steady state of training. On
    Linux, writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM)."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole run


def peak_memory(device, device_type):
    """(bytes, what was measured): the most memory PyTorch held on the GPU since the last
    reset, or the process's peak resident set size on the host (which includes Python, torch
    and everything else: an upper bound on what the model needed)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU mem"
    try:  # Linux: VmHWM, the peak since the last reset_peak_memory
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), "peak RSS"
    except (OSError, StopIteration):
        pass
    try:
        import resource  # Unix only
    except ImportError:
        return None, "RSS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS"  # macOS: bytes; Linux: KiB


def device_name(device, device_type):
    if device_type == "cuda":
        return torch.cuda.get_device_name(device)
    if device_type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() often says only x86_64
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def describe(model, cfg, dtype):
    """The config part of the summary line: enough to reproduce the row."""
    c = model.config
    options = "".join([" rope"] * c.rope + [" qk_norm"] * c.qk_norm + [f" {c.mlp}"] * (c.mlp != "gelu")
                      + [" rmsnorm"] * (c.norm == "rmsnorm") + [f" kv{c.n_kv_head}"] * (c.n_kv_head not in (0, c.n_head))
                      + [" untied"] * (not c.tie_embeddings))
    return (f"{cfg['model']} {model.num_params() / 1e6:.4g}M L{c.n_layer} H{c.n_head} C{c.n_embd} "
            f"V{c.vocab_size}{options} | {str(dtype).replace('torch.', '')}")


def cores_used(device_type, wall, cpu):
    """On a CPU run: the process's CPU time over the wall time, i.e. how many cores it really
    had. Well below torch.get_num_threads() means a busy machine: the timing is then slower
    than this CPU can do. None on a GPU (waiting for the GPU spins the host, so it says nothing)."""
    return cpu / wall if device_type == "cpu" else None


def load_text(cores):
    return "" if cores is None else f" | used {cores:.2f} of {torch.get_num_threads()} threads"


def rate(x):
    """Tokens/s for the summary: whole numbers when large, three digits when small (0.594)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


# -----------------------------------------------------------------------------
# profiling


def profile(fn, device_type, repeats):
    """Run fn() `repeats` times under torch.profiler and print the ops that took the most time
    (self time: inside the op itself, not its children). Returns the table."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        synchronize(device_type)
    # on a GPU the kernels' time is what matters; the CPU time there is mostly launching them
    sort_by = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=20)
    print(f"\nprofile of {repeats} run(s), sorted by {sort_by}:\n{table}")
    return table


# -----------------------------------------------------------------------------
# train mode


def bench_train(cfg):
    """Time cfg['steps'] optimizer steps after cfg['warmup'] untimed ones. Prints and returns
    a dict: ms_per_step, tokens_per_s, mfu (None where the peak is unknown), peak_flops,
    peak_mem_bytes, loss (of the last micro-batch), summary (the one line)."""
    device, device_type, dtype = setup(cfg)
    device, rank, ranks, distributed = start_ranks(cfg, device, device_type)
    say = print if rank == 0 else (lambda *a, **k: None)
    if distributed and device_type == "cpu":
        rss_follows_tensors()  # the per-rank memory is the point of a run under torchrun
    if cfg["fsdp"] and dtype == torch.float16:
        die("--fsdp trains in bfloat16 or float32 (as train.py does), not float16")
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["grad_accum"]
    # FSDP: built on the host, and each rank moves only its shards to the GPU
    raw_model = build_model(cfg, "cpu" if cfg["fsdp"] else device)
    if cfg["fsdp"]:  # before the optimizer, so that AdamW's moments are sharded too
        fully_shard(raw_model, param_dtype=dtype)
    raw_model.train()
    # train.py's optimizers: AdamW (decay on matrices only, fused), or Muon + AdamW
    optimizers = configure_optimizers(raw_model, WEIGHT_DECAY, LEARNING_RATE, BETAS, device_type,
                                      muon=MUON if cfg["optimizer"] == "muon" else None, verbose=rank == 0)
    # fp16 has too little range for small gradients: scale the loss up, unscale before the step.
    # Disabled (every call a no-op) for bf16 and fp32.
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    model = torch.compile(raw_model) if cfg["compile"] else raw_model
    if distributed and not cfg["fsdp"]:
        model = ddp_wrap(model, device, device_type)  # as train.py
    autocast = autocast_context(device_type, dtype)

    # Synthetic batches: random tokens, made once on the host. train.py's loader hands over
    # host tensors; in page-locked (pinned) memory the copy to the GPU runs asynchronously
    # (non_blocking) while the GPU still works, so it costs the step almost nothing.
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)  # each rank its own batches
    xs = torch.randint(raw_model.config.vocab_size, (accum, B, T), generator=gen)  # (accum, B, T)
    ys = torch.randint(raw_model.config.vocab_size, (accum, B, T), generator=gen)
    if device_type == "cuda":
        xs, ys = xs.pin_memory(), ys.pin_memory()

    def step(clock=None):
        """One optimizer step. clock: a list to which the seconds of the update (unscale, clip,
        optimizer steps) are added; it waits for the device on both sides of the update."""
        for micro in range(accum):
            x = xs[micro].to(device, non_blocking=True)  # (B, T)
            y = ys[micro].to(device, non_blocking=True)
            # as train.py: DDP exchanges gradients on the last micro-step only, FSDP on each
            last = micro == accum - 1
            with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
                with autocast:
                    _, loss = model(x, y)
                # the mean over the step's micro-batches, as one big batch would give
                scaler.scale(loss / accum).backward()
        if clock is not None:
            synchronize(device_type)
            t = time.perf_counter()
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP)
        for opt in optimizers:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        if clock is not None:
            synchronize(device_type)
            clock.append(time.perf_counter() - t)
        return loss  # a GPU tensor: reading it (.item()) would wait for the GPU, so we don't here

    say(f"warm-up: {cfg['warmup']} steps{' (the first compiles the model)' if cfg['compile'] else ''}")
    for _ in range(cfg["warmup"]):
        step()
    synchronize(device_type)
    reset_peak_memory(device, device_type)  # count the steady state, not compilation
    # no synchronisation inside the loop: the host queues step after step, the GPU never idles
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(cfg["steps"]):
        loss = step()
    synchronize(device_type)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    dt = wall / cfg["steps"]  # seconds per step
    mem, mem_what = peak_memory(device, device_type)
    mems = [mem]
    if distributed:  # every rank's peak, to rank 0
        mems = [None] * ranks
        dist.all_gather_object(mems, mem)
    # the update's share, in a second round: the synchronisations around it would slow the
    # first round's GPU pipeline down, so they are kept out of the ms/step above
    clock = []
    synchronize(device_type)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step(clock)
    synchronize(device_type)
    opt_share = sum(clock) / (time.perf_counter() - t0)

    tokens = B * T * accum  # tokens per optimizer step on one rank
    peak = peak_flops_for(cfg, device, device_type, dtype)
    mfu = None if peak is None else estimate_mfu(raw_model, tokens, dt, peak, seq_len=T)  # per GPU
    r = dict(ms_per_step=dt * 1000, tokens_per_s=tokens * ranks / dt, mfu=mfu, peak_flops=peak,
             peak_mem_bytes=mem, peak_mem_per_rank=mems, loss=loss.item(),
             cores_used=cores_used(device_type, wall, cpu), optimizer_share=opt_share)
    mfu_text = "MFU n/a (give --peak_flops)" if mfu is None else f"MFU {100 * mfu:.1f}% of {peak / 1e12:.1f} TFLOP/s"
    r["summary"] = (f"bench train | {device_name(device, device_type)} | torch {torch.__version__} | "
                    f"{describe(raw_model, cfg, dtype)} compile={cfg['compile']} | B={B} T={T} accum={accum} | "
                    + (f"{'FSDP' if cfg['fsdp'] else 'DDP'} x{ranks} ranks | " if distributed else "")
                    + f"{r['ms_per_step']:.1f} ms/step ({cfg['optimizer']} update {100 * opt_share:.0f}%) | "
                    + f"{rate(r['tokens_per_s'])} tok/s | {mfu_text} | "
                    + (f"{mem_what} per rank {', '.join(gib(m) for m in mems)}" if distributed else f"{mem_what} {gib(mem)}")
                    + load_text(r["cores_used"]))
    if rank == 0:
        print(r["summary"])
    if cfg["profile"] and not distributed:
        profile(step, device_type, repeats=3)
    if distributed:
        dist.destroy_process_group()
        time.sleep(0.1)  # lets gloo free its last collective before exit (see train.close_world)
    return r


# -----------------------------------------------------------------------------
# sample mode


def bench_sample(cfg):
    """Time model.generate (greedy) with and without the KV cache, at batch 1 and batch
    sample_batch. Prints and returns a dict: for each batch size b, cache_tok_s_b{b},
    recompute_tok_s_b{b} and ratio_b{b} (cache over recompute), plus peak_mem_bytes and summary."""
    device, device_type, dtype = setup(cfg)
    P, N = cfg["prompt_len"], cfg["new_tokens"]
    model = build_model(cfg, device).eval()
    autocast = autocast_context(device_type, dtype)
    gen = torch.Generator().manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def generate(prompt, n, use_cache):
        # greedy (temperature 0): every run does the same work, and sampling's cost is not timed
        with autocast:
            return model.generate(prompt, n, temperature=0.0, use_cache=use_cache)

    r, parts, wall, cpu = {}, [], 0.0, 0.0
    for b in sorted({1, cfg["sample_batch"]}):
        prompt = torch.randint(model.config.vocab_size, (b, P), generator=gen).to(device)  # (b, P)
        for use_cache in (True, False):
            generate(prompt, 2, use_cache)  # warm-up: first-call allocations and kernel choices
            synchronize(device_type)
            t0, c0 = time.perf_counter(), time.process_time()
            generate(prompt, N, use_cache)
            synchronize(device_type)
            dt = time.perf_counter() - t0
            wall, cpu = wall + dt, cpu + time.process_time() - c0
            tok_s = b * N / dt  # new tokens per second, whole batch
            r[f"{'cache' if use_cache else 'recompute'}_tok_s_b{b}"] = tok_s
            print(f"batch {b}, {'KV cache ' if use_cache else 'recompute'}: {rate(tok_s)} tok/s")
        r[f"ratio_b{b}"] = r[f"cache_tok_s_b{b}"] / r[f"recompute_tok_s_b{b}"]
        parts.append(f"B={b}: cache {rate(r[f'cache_tok_s_b{b}'])} tok/s, recompute "
                     f"{rate(r[f'recompute_tok_s_b{b}'])} tok/s, {r[f'ratio_b{b}']:.1f}x")
    mem, mem_what = peak_memory(device, device_type)
    r["peak_mem_bytes"], r["cores_used"] = mem, cores_used(device_type, wall, cpu)
    r["summary"] = (f"bench sample | {device_name(device, device_type)} | torch {torch.__version__} | "
                    f"{describe(model, cfg, dtype)} | prompt {P} + {N} new, greedy | "
                    + " | ".join(parts) + f" | {mem_what} {gib(mem)}{load_text(r['cores_used'])}")
    print(r["summary"])
    if cfg["profile"]:
        prompt = torch.randint(model.config.vocab_size, (1, P), generator=gen).to(device)
        profile(lambda: generate(prompt, N, True), device_type, repeats=1)
    return r


# rollout mode


def bench_rollout(cfg):
    """PPO's rollout (align.rollout, the path align.py runs): sample_batch prompts of lengths spread
    evenly from 5 to prompt_len tokens, new_tokens sampled for each at temperature 1 with the KV
    cache. Timed two ways in one run: all prompts in one left-padded batch (what align.py does), and
    one prompt at a time (what batching by length comes to when every length differs). Returns
    {batched_ms, one_at_a_time_ms, ratio, summary}."""
    import align
    device, device_type, dtype = setup(cfg)
    model = build_model(cfg, device).eval()
    autocast = autocast_context(device_type, dtype)
    n, P = cfg["sample_batch"], cfg["prompt_len"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    lengths = [round(min(5, P) + (P - min(5, P)) * i / max(1, n - 1)) for i in range(n)]
    prompts = [torch.randint(model.config.vocab_size, (k,), generator=gen).tolist() for k in lengths]
    settings = dict(max_new_tokens=cfg["new_tokens"], block_size=model.config.block_size, temperature=1.0)
    eot = model.config.vocab_size - 1  # (random weights: a stop is as unlikely as any token)

    def batched():
        with autocast:
            align.rollout(settings, model, prompts, eot, torch.Generator(device).manual_seed(0), device)

    def one_at_a_time():
        with autocast:
            for p in prompts:
                align.rollout(settings, model, [p], eot, torch.Generator(device).manual_seed(0), device)

    r = {}
    for name, fn in (("batched", batched), ("one_at_a_time", one_at_a_time)):
        fn()  # warm-up
        times = []
        for _ in range(max(1, cfg["steps"] // 2)):
            synchronize(device_type)
            t0 = time.perf_counter()
            fn()
            synchronize(device_type)
            times.append(time.perf_counter() - t0)
        r[f"{name}_ms"] = 1000 * sorted(times)[len(times) // 2]  # the median
        print(f"{name.replace('_', ' ')}: {r[f'{name}_ms']:.0f} ms")
    r["ratio"] = r["one_at_a_time_ms"] / r["batched_ms"]
    r["summary"] = (f"bench rollout | {device_name(device, device_type)} | torch {torch.__version__} | "
                    f"{describe(model, cfg, dtype)} | {n} prompts of {lengths[0]}-{lengths[-1]} tokens + "
                    f"{cfg['new_tokens']} new | left-padded batch {r['batched_ms']:.0f} ms, one at a time "
                    f"{r['one_at_a_time_ms']:.0f} ms, {r['ratio']:.2f}x")
    print(r["summary"])
    return r


# serve mode


def bench_serve(cfg):
    """serve.py under load, over HTTP on this machine: sample_batch clients at once, each streaming
    new_tokens greedy tokens after its own prompt of prompt_len random tokens, served two ways in
    one run: decoded together in one batch (serve.py's default) and one request at a time
    (--max_batch=1: a plain queue); and one client alone. Greedy, so both ways do the same work.
    Returns tok_s_{one,queued,batched} (all clients' new tokens over the wall time), first_s_{...}
    (a client's mean wait for its first token), tokens_{...}, ratio (batched over queued), summary."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import requests

    import serve
    device, device_type, dtype = setup(cfg)
    # at most GPT-2's 50257 ids (not the 50304 rows of its padded table): the random model's text decodes
    vocab = cfg["vocab_size"] or min(SHAPES[cfg["model"]]["vocab_size"], 50257)
    model = build_model(dict(cfg, vocab_size=vocab), device).eval()
    autocast = autocast_context(device_type, dtype)
    n, P, N = cfg["sample_batch"], cfg["prompt_len"], cfg["new_tokens"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    prompts = [torch.randint(vocab, (P,), generator=gen).tolist() for _ in range(n)]

    def client(url, prompt, max_tokens=N):  # (seconds to the first token, new tokens)
        t0, first, tokens = time.perf_counter(), None, 0
        body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=3600) as r:
            r.raise_for_status()
            for line in r.iter_lines(chunk_size=None):  # None: each piece as it comes, not 512 bytes at a time
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[len(b"data: "):])
                    first = first or time.perf_counter() - t0
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return first, tokens

    r, parts, wall, cpu = {}, [], 0.0, 0.0
    for name, max_batch, clients in (("one", 1, 1), ("queued", 1, n), ("batched", n, n)):
        app = serve.make_app(model, {"tokenizer": "gpt2"}, "bench", dict(serve.DEFAULTS, max_batch=max_batch), autocast)
        url, stop = serve.serve_in_thread(app)
        try:
            client(url, prompts[0], 2)  # warm-up: first-call allocations
            t0, c0 = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(lambda p: client(url, p), prompts[:clients]))
            dt = time.perf_counter() - t0
            wall, cpu = wall + dt, cpu + time.process_time() - c0
        finally:
            stop()
        r[f"tokens_{name}"] = sum(t for _, t in done)
        r[f"tok_s_{name}"], r[f"first_s_{name}"] = r[f"tokens_{name}"] / dt, sum(f for f, _ in done) / clients
        label = "1 client" if name == "one" else f"{clients} clients {name}"
        parts.append(f"{label}: {rate(r[f'tok_s_{name}'])} tok/s, first token {r[f'first_s_{name}']:.2f} s")
        print(parts[-1])
    r["ratio"], r["cores_used"] = r["tok_s_batched"] / r["tok_s_queued"], cores_used(device_type, wall, cpu)
    r["summary"] = (f"bench serve | {device_name(device, device_type)} | torch {torch.__version__} | "
                    f"{describe(model, cfg, dtype)} | prompt {P} + {N} new, greedy, over HTTP | " + " | ".join(parts)
                    + f" | batched {r['ratio']:.2f}x the queue{load_text(r['cores_used'])}")
    print(r["summary"])
    return r


# dpo mode


def bench_dpo(cfg):
    """A DPO step next to an SFT step on the same pairs, in one run: batch_size pairs of
    block_size tokens (the first half of each row the prompt, the second the answer), as align.py
    runs them: SFT is the loss on the 2B answers' tokens, DPO the summed log-probs of the same 2B
    rows under the policy (with backward) and a frozen reference (forward only), then the loss.
    AdamW steps both; eager (no compile). Returns {sft_ms, dpo_ms, ratio, summary}."""
    import copy

    import align
    device, device_type, dtype = setup(cfg)
    model = build_model(cfg, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    autocast = autocast_context(device_type, dtype)
    B, T = cfg["batch_size"], cfg["block_size"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randint(model.config.vocab_size, (2 * B, T), generator=gen).to(device)  # rows: B chosen, B rejected
    y = torch.randint(model.config.vocab_size, (2 * B, T), generator=gen).to(device)
    y[:, :T // 2] = -1  # the prompt half: not scored

    def sft():
        with autocast:
            _, loss = model(x, y)
        return loss

    def dpo():
        with autocast:
            logps = align.sequence_logps(model, x, y)
            with torch.no_grad():
                ref = align.sequence_logps(reference, x, y)
            loss, _ = align.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1)
        return loss

    r = {}
    for name, fn in (("sft", sft), ("dpo", dpo)):
        times = []
        for i in range(cfg["warmup"] + cfg["steps"]):
            synchronize(device_type)
            t0 = time.perf_counter()
            fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device_type)
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
        r[f"{name}_ms"] = 1000 * sorted(times)[len(times) // 2]  # the median step
    r["ratio"] = r["dpo_ms"] / r["sft_ms"]
    r["summary"] = (f"bench dpo | {device_name(device, device_type)} | torch {torch.__version__} | "
                    f"{describe(model, cfg, dtype)} | {B} pairs x {T} tokens | SFT step {r['sft_ms']:.1f} ms, "
                    f"DPO step {r['dpo_ms']:.1f} ms, {r['ratio']:.2f}x")
    print(r["summary"])
    return r


def bench_vision(cfg):
    """Optimizer steps of a vision-language model (vision.py) as train_vision.py takes them:
    batch_size rows of block_size LM positions, each an image's tokens spliced into random text at
    its placeholder, the loss on the last quarter. Returns {ms, tok_per_s, summary}."""
    from vision import VisionLM, attach_vision, image_settings, image_tokens
    device, device_type, dtype = setup(cfg)
    gpt = build_model(cfg, device)
    c = gpt.config
    grid = cfg["image_size"] // cfg["patch_size"]
    if grid * cfg["patch_size"] != cfg["image_size"] or grid % cfg["shuffle"] or cfg["vit_layers"] < 1:
        die(f"--image_size={cfg['image_size']} must be a whole number of --patch_size={cfg['patch_size']} patches, "
            f"a multiple of --shuffle={cfg['shuffle']} per side, and --vit_layers at least 1")
    v = dict(tower="", vit_layers=cfg["vit_layers"], vit_heads=c.n_head, vit_embd=c.n_embd, patch_size=cfg["patch_size"],
             shuffle=cfg["shuffle"], image_size=cfg["image_size"], n_patches=grid * grid,
             image=image_settings("", cfg["image_size"]))
    vlm = VisionLM(attach_vision(gpt, v).to(device), image_token=c.vocab_size)
    opt = torch.optim.AdamW(vlm.parameters(), lr=LEARNING_RATE)
    autocast = autocast_context(device_type, dtype)
    B, n_img = cfg["batch_size"], image_tokens(v)
    L = cfg["block_size"] - n_img + 1  # text positions: the placeholder's one becomes n_img
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randint(c.vocab_size, (B, L), generator=gen)
    x[:, 0] = c.vocab_size  # the placeholder, first
    y = torch.randint(c.vocab_size, (B, L), generator=gen)
    y[:, :3 * L // 4] = -1  # the prompt: not scored
    images = torch.randint(0, 256, (B, cfg["image_size"], cfg["image_size"], 3), dtype=torch.uint8, generator=gen)
    x, y, images = x.to(device), y.to(device), images.to(device)
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        synchronize(device_type)
        t0 = time.perf_counter()
        with autocast:
            loss = vlm(x, y, images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device_type)
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    ms = 1000 * sorted(times)[len(times) // 2]  # the median step
    r = dict(ms=ms, tok_per_s=B * cfg["block_size"] / ms * 1000)
    r["summary"] = (f"bench vision | {device_name(device, device_type)} | torch {torch.__version__} | "
                    f"{describe(gpt, cfg, dtype)} | ViT {cfg['vit_layers']} layers, {cfg['image_size']}px in "
                    f"{cfg['patch_size']}px patches, {n_img} image tokens | {B} x {cfg['block_size']} positions | "
                    f"{ms:.1f} ms/step, {r['tok_per_s']:,.0f} tok/s (text + image)")
    print(r["summary"])
    return r


def main():
    cfg = configure(DEFAULTS)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 only
        print_config(cfg)
    try:
        if cfg["mode"] == "sample":
            bench_sample(cfg)
        elif cfg["mode"] == "dpo":
            bench_dpo(cfg)
        elif cfg["mode"] == "rollout":
            bench_rollout(cfg)
        elif cfg["mode"] == "serve":
            bench_serve(cfg)
        elif cfg["mode"] == "vision":
            bench_vision(cfg)
        else:
            bench_train(cfg)
    except torch.OutOfMemoryError:
        # the usual way to find the largest micro-batch that fits: try, and step down on this
        die(f"out of memory at --batch_size={cfg['batch_size']} (--mode={cfg['mode']}): try a smaller "
            "--batch_size (train mode: --grad_accum keeps the tokens per step) or a shorter --block_size")


if __name__ == "__main__":
    main()
