"""
Train a GPT: from a laptop CPU to several 8-GPU nodes, with one script.

    python train.py config/shakespeare_char_cpu.py                    # laptop, a few minutes
    python train.py config/shakespeare_char.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py   # one 8-GPU node
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_1.3b.py --fsdp  # sharded: ~20 GiB/GPU (--plan's estimate)
    python train.py config/finetune_alpaca.py                         # instruction fine-tuning
    python train.py config/gpt2_1.3b.py --fsdp --plan --plan_world=8  # checks and sizes only: memory, time

One optimizer step reads grad_accum micro-batches on every rank, runs forward and backward on
each under autocast, clips the gradient norm, sets the learning rate (warmup, then cosine) and
steps AdamW (or, with optimizer=muon, Muon on the blocks' matrices and AdamW on the rest).
Around it: validation, HellaSwag, checkpoints, a log line. Ctrl-C or SIGTERM
finishes the step, saves and exits (a second one exits at once); --init_from=resume continues
exactly where the run stopped.
"""

import math
import os
import time
from contextlib import nullcontext

from configurator import UserError, autocast_context, configure, die, exit_on_ctrl_c, print_config, resolve_dtype

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch
import torch.distributed as dist

import hellaswag
import lora
from checkpoint import (SHAPE_KEYS, check_resume, check_same_tokenizer, claim_out_dir, load_checkpoint, load_model,
                        restore_run, save_run)
from dataloader import DataLoader, SFTLoader, read_meta, vocab_size_of
from model import GPT, estimate_mfu
from optim import configure_optimizers
from plan import batch_layout, check_gpu_recipe, check_settings, model_config, print_plan, setting_notes
from runtime import (StepClock, StopFlag, StopVote, ThreadPicker, agree_on_step, all_finite, close_world, console_line,
                     ddp_wrap, evaluates_at, format_time, fully_shard, nonfinite, peak_flops, rank_failed, reshard,
                     setup_world, stop_agreed, worse_than_best)

# -----------------------------------------------------------------------------
# settings: every one can be changed by a config file or --key=value (python train.py -h lists them)
DEFAULTS = dict(
    # I/O
    out_dir="out",  # where ckpt.pt and log.txt go
    init_from="scratch",  # scratch | resume (out_dir/ckpt.pt) | gpt2, gpt2-medium, ... | a run's out_dir | an HF folder
    overwrite=False,  # True: a scratch run may replace the run already in out_dir (else it is refused)
    dataset="shakespeare_char",  # the folder data/<dataset>/ with train/val token files and meta.json
    eval_interval=250,  # validate every this many steps (0 = only at the end), and at every checkpoint
    eval_iters=200,  # validation batches per evaluation (per rank)
    log_interval=1,  # a log line every this many steps (each costs a host-device sync)
    checkpoint_interval=1000,  # overwrite out_dir/ckpt.pt every this many steps (and at the end); 0 = end only
    keep_interval=0,  # also keep a copy out_dir/ckpt_STEP.pt every this many steps (0 = never)
    hellaswag_interval=0,  # HellaSwag every this many steps and at the end (0 = off); needs BPE data
    hellaswag_limit=0,  # evaluate only the first N HellaSwag examples (0 = all 10,042)
    hellaswag_file="",  # a local hellaswag_val.jsonl instead of the download
    wandb_log=False,  # also log to Weights & Biases (pip install wandb)
    wandb_project="gpt2",
    wandb_run_name="run",
    # data
    batch_size=12,  # micro-batch: sequences per forward/backward on each rank (SFT data: examples)
    block_size=1024,  # tokens per sequence (SFT data: the longest example)
    total_batch_size=0,  # tokens per optimizer step over all ranks (SFT data: examples); 0 = one micro-batch per rank
    group_by_length=False,  # SFT data: fill each step with examples of similar length (far less padding)
    # model (ignored when the weights come from a checkpoint or GPT-2)
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,  # 0 for pretraining, 0.1+ for fine-tuning / small data
    bias=True,  # biases in Linears and LayerNorms, like GPT-2
    rope=False,  # rotary position embeddings instead of learned ones
    # from-scratch options (docs/modern.md); all off = GPT-2, so OpenAI's weights load and export
    qk_norm=False,  # RMS-normalise queries and keys per head before attention (stabler at high lr)
    mlp="gelu",  # gelu (GPT-2) | relu2 (ReLU squared: trains faster from scratch) | swiglu (Llama)
    zero_init_proj=False,  # the residual projections start at zero: every block the identity at step 0
    tie_embeddings=True,  # False: lm_head gets its own weight instead of sharing wte's
    # Llama-family shape (docs/llama.md; a Llama loaded with init_from brings its own)
    norm="layernorm",  # layernorm (GPT-2) | rmsnorm (Llama)
    mlp_hidden=0,  # the MLP's hidden width (0 = 4 * n_embd); SwiGLU models use ~8/3 * n_embd
    n_kv_head=0,  # key/value heads for grouped-query attention (0 = n_head)
    rope_theta=10000.0,  # RoPE's base (rope=True)
    # LoRA (lora.py): rank 0 = off, train all weights
    lora_rank=0,
    lora_alpha=16.0,  # the update is scaled by lora_alpha / lora_rank
    lora_dropout=0.0,
    lora_targets="q,v",  # which linears get adapters: q, k, v, attn_proj, mlp_fc, mlp_proj
    # optimizer
    optimizer="adamw",  # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (optim.Muon)
    learning_rate=6e-4,  # AdamW's peak learning rate
    max_iters=5000,  # optimizer steps in all
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # clip the global gradient norm to this (0 = no clipping)
    muon_lr=0.02,  # Muon's peak learning rate (the schedule scales it like learning_rate)
    muon_momentum=0.95,  # Muon's (Nesterov) momentum
    muon_weight_decay=0.0,  # Muon's decoupled weight decay (lr * wd per step)
    # learning-rate schedule
    decay_lr=True,  # False: constant learning_rate after warmup
    warmup_iters=100,  # linear warmup from 0 over this many steps
    lr_decay_iters=0,  # cosine decay ends here (0 = max_iters)
    min_lr=6e-5,  # the floor of the decay, usually learning_rate / 10
    # system
    device="auto",  # auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16 (float16 uses a GradScaler)
    compile=False,  # torch.compile the model (first steps slower, then faster; GPU)
    fsdp=False,  # under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2) instead of DDP's full copies
    fsdp_full_grads=False,  # FSDP with accumulation: full gradients until the last micro-step, one reduce-scatter a step
    fsdp_reshard=True,  # FSDP: free a Block's gathered weights after its forward (False: keep them for its backward)
    pg_timeout=600,  # seconds a rank waits in a collective for the others before the run is ended as stuck
    cpu_threads=0,  # CPU: torch's threads; 0 = OMP_NUM_THREADS if set, else the fastest of n, n/2, ..., 1, timed
    peak_flops=0.0,  # one device's peak FLOP/s, for MFU; 0 = the GPU's bf16 peak from runtime.PEAK_FLOPS (CPU: no MFU)
    seed=1337,
    # --plan: check the settings and print the run's sizes, per-GPU memory and time, then exit
    plan=False,  # no data, GPU or download needed; nothing is written
    plan_world=0,  # the GPUs to plan for (0 = torchrun's WORLD_SIZE, else 1)
)

# -----------------------------------------------------------------------------
# set-up: the data, the model, its wrapping (the world: runtime.setup_world; out_dir: checkpoint.claim_out_dir)


def say_settings(cfg, world, ptdtype, layout, say):
    """The effective settings, the device and the batch layout, and a note for each setting that
    may not do what was meant (plan.setting_notes): what a log of the run should start with."""
    say("config:")
    if world.master:
        print_config(cfg)
    say(f"device {world.device}, dtype {str(ptdtype).replace('torch.', '')}, {world.size} rank(s), {layout}")
    for note in setting_notes(cfg, world.size, world.device_type):
        say(f"note: {note}")


def make_loaders(cfg, meta, world):
    """Return (train_loader, val_loader, a line describing the step). The one place
    where the kind of dataset matters: token streams cut into (B, T) blocks, or whole
    instruction examples (SFT data, from prepare_alpaca.py) whose batch sizes count examples."""
    sft = meta.get("format") == "sft"
    B, T = cfg["batch_size"], cfg["block_size"]
    _, grad_accum, layout = batch_layout(cfg, sft, world.size)
    data_dir = os.path.join("data", cfg["dataset"])
    common = dict(rank=world.rank, world_size=world.size, vocab_size=vocab_size_of(meta))  # ids are checked
    if cfg["group_by_length"] and not sft:
        raise UserError(f"group_by_length groups instruction examples by length, and data/{cfg['dataset']} is a token "
                        "stream (no examples): drop --group_by_length")
    if sft:
        train_loader = SFTLoader(data_dir, "train", B, T, seed=cfg["seed"], grad_accum=grad_accum,
                                 group_by_length=cfg["group_by_length"], **common)
        val_loader = SFTLoader(data_dir, "val", B, T, shuffle=False, **common)
    else:
        train_loader = DataLoader(data_dir, "train", B, T, seed=cfg["seed"], grad_accum=grad_accum, **common)
        val_loader = DataLoader(data_dir, "val", B, T, shuffle=False, **common)
    return train_loader, val_loader, layout


def build_model(cfg, meta, say):
    """Return (model, base): a new model, or one loaded from OpenAI's weights or another run
    (LoRA added if asked). base names where a LoRA run's frozen weights come from."""
    init_from = cfg["init_from"]
    if init_from == "scratch":
        say(f"a new model: {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide")
        return GPT(model_config(cfg, vocab_size_of(meta))), None  # (LoRA needs trained weights: refused before)
    # fine-tuning: another run of ours, or OpenAI's GPT-2 (by name or a local HF folder)
    say(f"initialising from {init_from}")
    ours = os.path.isfile(os.path.join(init_from, "ckpt.pt"))
    if ours:
        model, init_meta = load_model(out_dir=init_from, dropout=cfg["dropout"])
    else:
        model, init_meta = load_model(init_from=init_from, dropout=cfg["dropout"])
    check_same_tokenizer(init_meta, meta, init_from, cfg["dataset"])
    # the loaded weights decide the architecture: say which of this run's settings it overrides
    ignored = [f"{k}={getattr(model.config, k)!r}" for k in SHAPE_KEYS + ("zero_init_proj",)
               if cfg[k] != getattr(model.config, k)]
    if ignored:
        say(f"note: the model is {init_from}'s, so its settings hold, not this run's: {', '.join(ignored)}")
    if lora.has_lora(model):  # fine-tuning a LoRA run: start from its merged weights
        lora.merge_lora(model)
    if cfg["block_size"] > model.config.block_size:
        raise UserError(f"block_size={cfg['block_size']} is larger than {init_from}'s {model.config.block_size}")
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])
    if cfg["lora_rank"] > 0:
        lora.apply_lora(model, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                        targets=cfg["lora_targets"], verbose=say is print)
    # a folder by its absolute path, so sample.py and hellaswag.py find the base from anywhere
    return model, os.path.abspath(init_from) if os.path.isdir(init_from) else init_from


def load_hellaswag(cfg, meta):
    """The rendered HellaSwag examples to evaluate during training, or None if it is off."""
    if cfg["hellaswag_interval"] == 0:
        return None
    if meta["tokenizer"] == "char":
        raise UserError("HellaSwag needs a BPE model (GPT-2's or a Llama's tokenizer); set hellaswag_interval=0 for char-level data")
    return hellaswag.load_examples(split="val", data_file=cfg["hellaswag_file"] or None,
                                   limit=cfg["hellaswag_limit"] or None, meta=meta)


def setup_model(cfg, world, meta, ckpt, ptdtype, say):
    """The model on its device with its optimizers and fp16 gradient scaler: a new one, one
    fine-tuned from init_from, or (ckpt given) the checkpoint's. Returns (raw_model, base,
    optimizers, scaler): optimizers is [AdamW] or [Muon, AdamW]; base names a LoRA run's
    frozen weights."""
    if world.fsdp and ptdtype == torch.float16:  # dtype=auto on a GPU without native bf16 (an explicit float16 is refused before)
        raise UserError("this GPU has no native bfloat16 and FSDP does not train in float16: set --dtype=float32")
    # the same seed on every rank: identical initial weights (DDP also broadcasts rank 0's)
    torch.manual_seed(cfg["seed"])
    if ckpt is not None:
        check_resume(ckpt, cfg, meta, say)
        say(f"resuming from {cfg['out_dir']}/ckpt.pt at step {ckpt['step']}")
        raw_model, _ = load_model(out_dir=cfg["out_dir"], dropout=cfg["dropout"])
        base = ckpt.get("base")  # a LoRA run's
    else:
        raw_model, base = build_model(cfg, meta, say)
    say(f"number of parameters: {raw_model.num_params() / 1e6:.2f}M")
    if world.fsdp:
        # sharded before the optimizer is built, so that AdamW's moments are sharded too; the
        # weights reach the GPU as shards, never as a whole model per rank
        fully_shard(raw_model, param_dtype=ptdtype, reshard_after_forward=cfg["fsdp_reshard"])
        say(f"FSDP: weights, gradients and AdamW state sharded over {world.size} ranks, one unit per Block")
    else:
        raw_model.to(world.device)
    torch.manual_seed(cfg["seed"] + world.rank)  # then a stream per rank: different dropout masks
    muon = None
    if cfg["optimizer"] == "muon":
        if lora.has_lora(raw_model):  # a resumed LoRA run; check_settings refuses the rest
            raise UserError("LoRA runs train with AdamW: drop --optimizer=muon")
        muon = dict(lr=cfg["muon_lr"], momentum=cfg["muon_momentum"], weight_decay=cfg["muon_weight_decay"])
    optimizers = configure_optimizers(raw_model, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                      world.device_type, muon=muon, verbose=world.master)
    # fp16 needs loss scaling (its small range underflows gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(world.device_type, enabled=(ptdtype == torch.float16))
    return raw_model, base, optimizers, scaler


def wrap(raw_model, cfg, world, say):
    """The model the loop calls: compiled if asked, in DDP under torchrun. An FSDP model needs
    no wrapper (it is sharded in place); under FSDP each Block's forward is compiled on its
    own: FSDP's gathering and freeing around every Block stay outside the compiled graphs,
    which stay small (one Block's, the same for all of them) and let the next Block's
    all-gather overlap with this one's compute."""
    model = raw_model
    if cfg["compile"] and world.fsdp:
        say("compiling each Block (the first steps are slow)...")
        for block in raw_model.transformer.h:
            block.forward = torch.compile(block.forward)
    elif cfg["compile"]:
        say("compiling the model (the first steps are slow)...")
        model = torch.compile(model)
    if world.ddp and not world.fsdp:
        model = ddp_wrap(model, world.device, world.device_type)
    return model


def eager_stance():
    """A context in which compiled code runs eager, compiling nothing (torch.compiler.set_stance,
    PyTorch 2.6 and later; before, nothing changes)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else nullcontext()


def grad_sync(model, world, last_micro, fsdp_full_grads=False):
    """DDP: exchange gradients on the last micro-step only; before it, no_sync() lets every
    rank accumulate its own full copy, as one big batch would, without communicating.
    FSDP reduce-scatters on every micro-step instead and accumulates the shards: holding
    full gradients until the last micro-step would put the whole model's gradients on every
    rank (5.2 GB in fp32 at 1.3B), the memory sharding is there to save; the price is one
    reduce-scatter per micro-step, which overlaps with the backward pass. fsdp_full_grads=True
    makes the other trade, where --plan says the memory is there: one reduce-scatter a step."""
    if world.fsdp and fsdp_full_grads:
        model.set_requires_gradient_sync(last_micro)
    return model.no_sync() if world.ddp and not world.fsdp and not last_micro else nullcontext()


# -----------------------------------------------------------------------------
# evaluation, the learning rate, the optimizer step


def evaluate(model, loader, eval_iters, world, autocast, stop, threads):
    """The mean validation loss per target token over eval_iters batches on every rank. The
    loader restarts each time, so every evaluation sees the same tokens. None if a stop was
    asked for meanwhile, on any rank. (threads: the CPU's thread count is timed on its batches.)"""
    model.eval()
    loader.reset()
    loss_sum = torch.zeros((), device=world.device)
    n_targets = 0
    with torch.no_grad():
        for i in range(eval_iters):
            if i % 16 == 0 and stop_agreed(stop, world):  # (an all-reduce and a sync: not every batch)
                model.train()
                return None
            x, y = loader.next_batch()
            n = int((y != -1).sum())  # every token, or (SFT) the response tokens
            threads.start("val batch")
            with autocast:
                _, loss = model(x.to(world.device), y.to(world.device))
            loss_sum += loss.float() * n
            threads.done()
            n_targets += n
    model.train()
    totals = torch.stack([loss_sum, torch.tensor(float(n_targets), device=world.device)])
    if world.ddp:
        dist.all_reduce(totals)  # sums over ranks
    return (totals[0] / totals[1]).item()


def get_lr(step, cfg):
    """Linear warmup to learning_rate, then a cosine down to min_lr at lr_decay_iters."""
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / cfg["warmup_iters"]
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if step >= decay_iters:
        return cfg["min_lr"]
    progress = (step - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


def set_lr(optimizers, step, cfg):
    """Every param group follows the same schedule, scaled to its own peak (base_lr: AdamW's
    learning_rate, Muon's muon_lr). Returns AdamW's lr, the one logged."""
    lr = get_lr(step, cfg) if cfg["learning_rate"] > 0 else 0.0  # (learning_rate 0: nothing moves)
    for opt in optimizers:
        for group in opt.param_groups:  # (AdamW's ratio is exactly 1: its groups take lr itself)
            group["lr"] = lr * (group["base_lr"] / cfg["learning_rate"]) if lr else 0.0
    return lr


def step_optimizers(optimizers, scaler, params, grad_clip):
    """Clip the global gradient norm (0 = no clipping), step every optimizer (AdamW, or Muon
    and AdamW) and clear the gradients. Returns the norm before clipping."""
    for opt in optimizers:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    for opt in optimizers:
        scaler.step(opt)  # skipped by the scaler if fp16 gradients overflowed
        opt.zero_grad(set_to_none=True)
    scaler.update()  # once per step, after every optimizer's
    return norm


# -----------------------------------------------------------------------------
# the run


def main():
    cfg = configure(DEFAULTS)
    if cfg["plan"]:
        return print_plan(cfg)
    check_settings(cfg, under_torchrun="RANK" in os.environ)
    world = setup_world(cfg["device"], fsdp=cfg["fsdp"], timeout_s=cfg["pg_timeout"])
    try:
        check_gpu_recipe(cfg, world.device_type)
        train(cfg, world)
    except UserError as e:  # bad data, a missing checkpoint, a NaN loss: one line, no traceback
        die(str(e))
    except Exception as e:
        if world.ddp:  # one rank's failure (a bug, a full disk) must end every rank, never hang them
            rank_failed(world, e, cfg["pg_timeout"])  # (exits)
        raise
    finally:
        close_world(world)


def train(cfg, world):
    stop = StopFlag()  # from here on, Ctrl-C asks for a clean stop
    say = print if world.master else (lambda *a, **k: None)
    ptdtype = resolve_dtype(cfg["dtype"], world.device_type)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    out_dir, resume = cfg["out_dir"], cfg["init_from"] == "resume"
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt")) if resume else None
    lock, log = claim_out_dir(cfg, resume, world)  # noqa: F841 (the lock is held while the run lives)
    meta = read_meta(os.path.join("data", cfg["dataset"]))
    if meta.get("format") == "preference":  # pairs of answers, not a text to continue nor examples to imitate
        raise UserError(f"data/{cfg['dataset']} holds preference pairs (prepare_preferences.py): train on them with "
                        f"python align.py --dataset={cfg['dataset']} (DPO, a reward model, PPO)")
    if meta.get("format") == "image-sft":  # questions about images: the model needs a vision tower
        raise UserError(f"data/{cfg['dataset']} holds questions about images (prepare_vision.py): train on them with "
                        f"python train_vision.py --dataset={cfg['dataset']}")
    train_loader, val_loader, layout = make_loaders(cfg, meta, world)
    say_settings(cfg, world, ptdtype, layout, say)
    raw_model, base, optimizers, scaler = setup_model(cfg, world, meta, ckpt, ptdtype, say)
    # val_loss: of the weights now; best_val: of out_dir/ckpt_best.pt
    step, val_loss, best_val = (restore_run(ckpt, out_dir, raw_model, optimizers, scaler, train_loader, world, say)
                                if resume else (0, None, None))
    saved_threads = ckpt.get("threads", 0) if resume else 0  # the CPU threads the run had picked
    del ckpt  # the file is memory-mapped: let it go before this run replaces it
    model = wrap(raw_model, cfg, world, say)
    autocast = autocast_context(world.device_type, ptdtype)
    hella_examples = load_hellaswag(cfg, meta)

    # --- the loop ------------------------------------------------------------------------
    max_iters, start_step = cfg["max_iters"], step
    peak = cfg["peak_flops"] or (peak_flops(torch.cuda.get_device_name(world.device)) if world.device_type == "cuda" else None)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    clock = StepClock(start_step, world.device_type)
    threads = ThreadPicker(world.device_type, cfg["cpu_threads"], world.size, say, saved_threads)  # (CPU only)
    vote = StopVote(world)  # the ranks' stop, agreed at every step
    bad_loss = torch.zeros((), dtype=torch.bool, device=world.device)  # a non-finite loss since the last check
    stopping = stop_agreed(stop, world)  # a stop every rank agreed on; one during the set-up ends the run here
    if resume and step >= max_iters:
        say(f"the run is already at step {step} (--max_iters={max_iters}): nothing to train; a larger --max_iters goes on")
    while True:
        last = step >= max_iters or stopping
        due = bool(cfg["checkpoint_interval"]) and step % cfg["checkpoint_interval"] == 0 and step > start_step
        clock.pause()  # evaluation and saving are not counted in the step time
        val_loss = None if step > start_step else val_loss  # a checkpoint holds the val loss of its own weights
        if evaluates_at(step, start_step, last, val_loss is not None, cfg) and not stopping:
            if step == start_step:  # the first thing a run does, and on a slow machine not a short one
                say(f"evaluating the starting model ({cfg['eval_iters']} val batches)...", flush=True)
            val = evaluate(model, val_loader, cfg["eval_iters"], world, autocast, stop, threads)
            if val is None:  # a stop during the evaluation: save (if there is anything new) and exit
                last = stopping = True
            else:
                val_loss = val
                say(f"step {step}: val loss {val_loss:.4f}" + worse_than_best(val_loss, best_val))
                log(step, val=val_loss)
        if hella_examples and (step % cfg["hellaswag_interval"] == 0 or last) and not stopping:
            # eager: its batches change shape every call, and through compiled code (FSDP's compiled
            # blocks) dynamo would recompile with symbolic sizes, which training would then run
            with eager_stance():
                res = hellaswag.evaluate(raw_model, hella_examples, world.device,
                                         batch_size=max(1, cfg["batch_size"] // 4), autocast_ctx=autocast,
                                         rank=world.rank, world_size=world.size, stop=lambda: stop_agreed(stop, world))
            if res is None:  # a stop during HellaSwag, as during the val loss
                last = stopping = True
            else:
                say(f"step {step}: HellaSwag acc_norm {res['acc_norm']:.4f} (acc {res['acc']:.4f}, n={res['n']})")
                log(step, hella=res["acc_norm"])
        if world.fsdp and not cfg["fsdp_reshard"]:  # the evaluations' forwards left the Blocks gathered
            reshard(raw_model)
        if (last or due) and step > start_step:  # (last: also a stop during the evaluations above)
            # never overwrite a good checkpoint with a diverged model (nor with one scoring nan: save_run)
            if not all_finite(bad_loss, params, world):
                raise nonfinite(out_dir, step - 1)
            save_start = time.time()  # (outside the step time: logged apart, as save_s, so MFU hides nothing)
            best_val = save_run(cfg, step, val_loss, best_val, model=raw_model, optimizers=optimizers, scaler=scaler,
                                loader=train_loader, meta=meta, base=base, world=world)
            log(step, save_s=time.time() - save_start)
        if last:
            if stopping:
                say(f"stopped at step {step}" + ("; continue with --init_from=resume" if step > start_step else ""))
            if worse_than_best(val_loss, best_val):
                say(f"the best checkpoint, val loss {best_val:.4f}, is {os.path.join(out_dir, 'ckpt_best.pt')}")
            break
        clock.resume()

        # one optimizer step: this rank's micro-batches, each with its weight, the share of the
        # step's loss targets it holds (x world.size: DDP and FSDP average the ranks' gradients)
        threads.start()
        lr = set_lr(optimizers, step, cfg)
        batches, step_tokens = train_loader.next_step(world.device)
        loss_accum = torch.zeros((), device=world.device)
        for micro, (x, y, weight) in enumerate(batches):
            with grad_sync(model, world, last_micro=micro == len(batches) - 1, fsdp_full_grads=cfg["fsdp_full_grads"]):
                with autocast:
                    _, loss = model(x, y)  # the mean over this micro-batch's targets
                    loss = loss * weight  # summed over micro-steps and ranks: the mean over the step's
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        norm = step_optimizers(optimizers, scaler, params, cfg["grad_clip"])  # FSDP: over the ranks' shards
        bad_loss |= ~torch.isfinite(loss_accum)  # no sync here: checked at log and save time
        step += 1
        threads.done()  # (the first steps on a CPU: timed at several thread counts, the fastest kept)
        clock.count(step_tokens)  # real tokens: SFT padding is not counted

        stopping = vote.exchange(stop.requested)  # every rank's stop, agreed a step later (no GPU wait)
        if step % cfg["log_interval"] == 0 or step == max_iters or stopping:
            loss_val, agreed, diverged = agree_on_step(loss_accum, bad_loss, stop, world)
            stopping = stopping or agreed
            if diverged:
                raise nonfinite(out_dir, step - 1)
            timing, tokens_per_step = clock.lap()  # the first step (compile, warm-up) apart, as warmup_s
            values = dict(train=loss_val, lr=lr, norm=(norm.full_tensor() if world.fsdp else norm).item(),
                          **timing, epoch=train_loader.epoch)
            if peak and tokens_per_step:  # tok_per_s counts every rank's tokens, mfu is per GPU
                values["mfu"] = estimate_mfu(raw_model, tokens_per_step / world.size, values["dt_ms"] / 1000, peak,
                                             seq_len=cfg["block_size"])
            log(step - 1, **values)
            say(console_line(step - 1, max_iters, dict(values, compiled=cfg["compile"]),
                             clock.left(step, max_iters)), flush=True)
    vote.result()  # the last vote sent: every rank waits for it before leaving the process group
    say(f"done in {format_time(time.time() - clock.run_start)}")


if __name__ == "__main__":
    main()
