"""
Train a GPT: from a laptop CPU to several 8-GPU nodes, with one script.

    python train.py config/shakespeare_char_cpu.py                    # laptop, a few minutes
    python train.py config/shakespeare_char.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py   # one 8-GPU node
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_1.3b.py --fsdp  # sharded: 24 GB GPUs
    python train.py config/finetune_alpaca.py                         # instruction fine-tuning

One optimizer step reads grad_accum micro-batches on every rank, runs forward and backward on
each under autocast, clips the gradient norm, sets the learning rate (warmup, then cosine) and
steps AdamW (or, with optimizer=muon, Muon on the blocks' matrices and AdamW on the rest).
Around it: validation, HellaSwag, checkpoints, a log line. Ctrl-C or SIGTERM
finishes the step, saves and exits (a second one exits at once); --init_from=resume continues
exactly where the run stopped.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

from configurator import (UserError, autocast_context, configure, die, exit_on_ctrl_c, lock_folder, print_config,
                          resolve_device, resolve_dtype)

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
import lora
from checkpoint import load_checkpoint, load_model, make_checkpoint, save_checkpoint
from dataloader import DataLoader, SFTLoader, read_meta, vocab_size_of
from model import GPT, GPTConfig, peak_flops

# -----------------------------------------------------------------------------
# settings: every one can be changed by a config file or --key=value (python train.py -h lists them)
DEFAULTS = dict(
    # I/O
    out_dir="out",  # where ckpt.pt and log.txt go
    init_from="scratch",  # scratch | resume (out_dir/ckpt.pt) | gpt2, gpt2-medium, ... | a run's out_dir | an HF folder
    overwrite=False,  # True: a scratch run may replace the run already in out_dir (else it is refused)
    dataset="shakespeare_char",  # the folder data/<dataset>/ with train/val token files and meta.json
    eval_interval=250,  # validate every this many steps (0 = only at the end)
    eval_iters=200,  # validation batches per evaluation (per rank)
    log_interval=1,  # a log line every this many steps (each costs a host-device sync)
    checkpoint_interval=1000,  # overwrite out_dir/ckpt.pt every this many steps (and at the end); 0 = end only
    keep_interval=0,  # also keep a copy out_dir/ckpt_STEP.pt every this many steps (0 = never)
    hellaswag_interval=0,  # HellaSwag every this many steps and at the end (0 = off); needs GPT-2 BPE data
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
    mlp="gelu",  # gelu (GPT-2) | relu2 (ReLU squared: trains faster from scratch)
    zero_init_proj=False,  # the residual projections start at zero: every block the identity at step 0
    tie_embeddings=True,  # False: lm_head gets its own weight instead of sharing wte's
    # LoRA (lora.py): rank 0 = off, train all weights
    lora_rank=0,
    lora_alpha=16.0,  # the update is scaled by lora_alpha / lora_rank
    lora_dropout=0.0,
    lora_targets="q,v",  # which linears get adapters: q, k, v, attn_proj, mlp_fc, mlp_proj
    # optimizer
    optimizer="adamw",  # adamw | muon: Muon for the blocks' matrices, AdamW for the rest (torch >= 2.9)
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
    seed=1337,
)

# the settings that decide the model's shape: a resumed run must keep them
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "bias", "rope", "qk_norm", "mlp", "tie_embeddings")

# -----------------------------------------------------------------------------
# helpers, in the order main() uses them


def check_settings(cfg):
    """Settings that parse but cannot work: one line now, not a traceback minutes later."""
    for key in ("batch_size", "block_size", "log_interval", "eval_iters", "n_layer", "n_head"):
        if cfg[key] < 1:
            die(f"--{key} must be at least 1, got {cfg[key]}")
    for key in ("max_iters", "total_batch_size", "eval_interval", "checkpoint_interval", "keep_interval",
                "warmup_iters", "hellaswag_interval", "hellaswag_limit", "lora_rank", "learning_rate", "min_lr",
                "weight_decay", "grad_clip"):
        if cfg[key] < 0:  # max_iters=0: evaluate the starting model and stop
            die(f"--{key} must not be negative, got {cfg[key]}")
    if not 0 <= cfg["dropout"] < 1 or not 0 <= cfg["lora_dropout"] < 1:
        die(f"dropout must be in [0, 1), got dropout={cfg['dropout']}, lora_dropout={cfg['lora_dropout']}")
    if cfg["n_embd"] % cfg["n_head"] != 0:
        die(f"n_embd={cfg['n_embd']} must be a multiple of n_head={cfg['n_head']} (each head gets n_embd / n_head)")
    if cfg["rope"] and (cfg["n_embd"] // cfg["n_head"]) % 2:
        die(f"rope=True needs an even head size, got n_embd/n_head = {cfg['n_embd'] // cfg['n_head']}")
    if cfg["lora_rank"] > 0:
        try:
            lora.parse_targets(cfg["lora_targets"])
        except ValueError as e:
            die(str(e))
    if cfg["mlp"] not in ("gelu", "relu2"):
        die(f"--mlp must be gelu or relu2, got {cfg['mlp']!r}")
    if cfg["optimizer"] not in ("adamw", "muon"):
        die(f"--optimizer must be adamw or muon, got {cfg['optimizer']!r}")
    if cfg["optimizer"] == "muon":
        if cfg["lora_rank"] > 0:  # the adapters are thin (r x C) matrices: AdamW's job
            die("LoRA runs train with AdamW: drop --optimizer=muon (or set lora_rank=0 to train every weight)")
        if not hasattr(torch.optim, "Muon"):
            die(f"optimizer=muon needs torch.optim.Muon, in PyTorch 2.9 and later (this is {torch.__version__}): "
                "pip install -U 'torch>=2.9', or use --optimizer=adamw")
        for key in ("muon_lr", "muon_momentum", "muon_weight_decay"):
            if cfg[key] < 0:
                die(f"--{key} must not be negative, got {cfg[key]}")
    if cfg["fsdp"] and cfg["optimizer"] == "muon":  # Newton-Schulz of a shard is not that of the matrix
        die("Muon orthogonalises whole matrices, and under FSDP each rank holds a shard of each: use DDP "
            "(drop --fsdp) with optimizer=muon")
    if cfg["fsdp"]:  # FSDP shards over the ranks torchrun starts; alone it would only hide a missing launcher
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401 (FSDP2: PyTorch 2.6 and later)
        except ImportError:
            die(f"fsdp=True needs FSDP2 (torch.distributed.fsdp.fully_shard), in PyTorch 2.6 and later (this is "
                f"{torch.__version__}): pip install -U 'torch>=2.6', or drop --fsdp")
        if "RANK" not in os.environ:
            die("fsdp=True shards the model over the processes torchrun starts: run it under torchrun "
                "(torchrun --standalone --nproc_per_node=N train.py ...), or drop --fsdp")
        if cfg["lora_rank"] > 0:
            die("LoRA trains a few MB of adapters: it needs no sharding; drop --fsdp (DDP) for lora_rank > 0")
        if cfg["hellaswag_interval"]:
            die("HellaSwag during training needs the whole model on every rank: with --fsdp set hellaswag_interval=0 "
                "and score the checkpoint with hellaswag.py")


def check_gpu_recipe(cfg, device_type):
    """A run sized for a GPU, where device=auto found none, would go on for days on the CPU
    without a word: say so up front, with the rough time, and ask for --device=cpu to go ahead.
    (Under 10 hours, such as fine-tuning GPT-2 124M on Shakespeare, it just runs.)"""
    if cfg["device"] != "auto" or device_type != "cpu":
        return
    data_dir = os.path.join("data", cfg["dataset"])
    meta = read_meta(data_dir) if os.path.isfile(os.path.join(data_dir, "meta.json")) else {}
    # instruction data counts examples (of up to block_size tokens each) where other data counts tokens
    unit = cfg["block_size"] if meta.get("format") == "sft" else 1
    params = 12 * cfg["n_layer"] * cfg["n_embd"] ** 2  # the blocks' weights, roughly
    tokens = (cfg["total_batch_size"] * unit or cfg["batch_size"] * cfg["block_size"]) * cfg["max_iters"]
    hours = 6 * params * tokens / 50e9 / 3600  # 6 FLOPs per weight and token; a CPU does very roughly 50 GFLOP/s
    if hours >= 10:
        die(f"this run is sized for a GPU but none was found; on this CPU it would take very roughly {hours:,.0f} "
            f"hours. To run it here anyway: --device=cpu" + (" --compile=False" if cfg["compile"] else ""))


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

    @property
    def master(self):  # only rank 0 prints, logs and saves
        return self.rank == 0


def setup_world(device_setting, fsdp=False):
    device, device_type = resolve_device(device_setting)
    if "RANK" not in os.environ:
        return World(False, 0, 1, device, device_type)
    rank, local_rank, size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(True, rank, size, device, device_type, fsdp)


def close_world(world):
    """Leave the process group. gloo (the CPU backend) frees each finished collective on a thread
    of its own, and freeing a tensor made in Python needs the GIL: a short sleep lets that thread
    finish before the interpreter shuts down (else about 1 exit in 20 aborted with torch 2.14,
    "terminate called without an active exception")."""
    if world.ddp:
        dist.destroy_process_group()
        time.sleep(0.1)


def make_loaders(cfg, meta, world):
    """Return (train_loader, val_loader, a line describing the step). The one place
    where the kind of dataset matters: token streams cut into (B, T) blocks, or whole
    instruction examples (SFT data, from prepare_alpaca.py) whose batch sizes count examples."""
    sft = meta.get("format") == "sft"
    B, T = cfg["batch_size"], cfg["block_size"]
    per_micro = B * world.size * (1 if sft else T)  # examples or tokens per micro-step, all ranks
    total = cfg["total_batch_size"] or per_micro
    if total % per_micro != 0:
        die(f"total_batch_size={total:,} is not a multiple of batch_size*{'' if sft else 'block_size*'}ranks "
            f"= {per_micro:,}{' (examples: this is SFT data)' if sft else ''}; change one of them")
    grad_accum = total // per_micro
    data_dir = os.path.join("data", cfg["dataset"])
    common = dict(rank=world.rank, world_size=world.size, vocab_size=vocab_size_of(meta))  # ids are checked
    if sft:
        train_loader = SFTLoader(data_dir, "train", B, T, seed=cfg["seed"], grad_accum=grad_accum,
                                 group_by_length=cfg["group_by_length"], **common)
        val_loader = SFTLoader(data_dir, "val", B, T, shuffle=False, **common)
        layout = (f"{total:,} examples per step = {B} x {world.size} ranks x {grad_accum} accumulation steps, "
                  f"each micro-batch padded to its longest example (at most {T} tokens)")
    else:
        train_loader = DataLoader(data_dir, "train", B, T, seed=cfg["seed"], grad_accum=grad_accum, **common)
        val_loader = DataLoader(data_dir, "val", B, T, shuffle=False, **common)
        layout = f"{total:,} tokens per step = {B} x {T} x {world.size} ranks x {grad_accum} accumulation steps"
    return train_loader, val_loader, layout


def build_model(cfg, meta, say):
    """Return (model, base): a new model, or one loaded from OpenAI's weights or another run
    (LoRA added if asked). base names where a LoRA run's frozen weights come from."""
    init_from = cfg["init_from"]
    if init_from == "scratch":
        say(f"a new model: {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide")
        model = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=vocab_size_of(meta), n_layer=cfg["n_layer"],
                              n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                              bias=cfg["bias"], rope=cfg["rope"], qk_norm=cfg["qk_norm"], mlp=cfg["mlp"],
                              zero_init_proj=cfg["zero_init_proj"], tie_embeddings=cfg["tie_embeddings"]))
        if cfg["lora_rank"] > 0:
            raise UserError("LoRA adapts a trained model: set init_from to gpt2* or another run's out_dir")
        return model, None
    # fine-tuning: another run of ours, or OpenAI's GPT-2 (by name or a local HF folder)
    say(f"initialising from {init_from}")
    ours = os.path.isfile(os.path.join(init_from, "ckpt.pt"))
    if ours:
        model, init_meta = load_model(out_dir=init_from, dropout=cfg["dropout"])
    else:
        model, init_meta = load_model(init_from=init_from, dropout=cfg["dropout"])
    check_same_tokenizer(init_meta, meta, init_from, cfg["dataset"])
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


def check_same_tokenizer(model_meta, data_meta, model_name, dataset):
    """The same token ids must mean the same text for the model and the data."""
    if (model_meta.get("tokenizer"), model_meta.get("chars")) != (data_meta.get("tokenizer"), data_meta.get("chars")):
        raise UserError(f"{model_name} was trained with the {model_meta.get('tokenizer')} tokenizer (or other "
                        f"characters) but data/{dataset} uses {data_meta.get('tokenizer')}; use a dataset "
                        "of the same tokenizer")


def check_resume(ckpt, cfg, meta, say):
    """A resumed run keeps the checkpoint's model, and says which settings now differ."""
    missing = {"config", "step", "optimizer", "scaler", "loader", "rng", "val_loss"} - ckpt.keys()
    if missing:
        raise UserError(f"{cfg['out_dir']}/ckpt.pt holds a model but no training state to resume (no "
                        f"{', '.join(sorted(missing))}); start a new run from it with --init_from={cfg['out_dir']}")
    old = ckpt["config"]
    check_same_tokenizer(ckpt["meta"], meta, cfg["out_dir"], cfg["dataset"])
    shape = [k for k in SHAPE_KEYS if old[k] != cfg[k]]
    if shape:
        raise UserError(f"resuming {cfg['out_dir']} with another model shape ({', '.join(f'{k}={cfg[k]} vs {old[k]}' for k in shape)}); "
                        "give the settings (config file) the run was started with")
    if cfg["block_size"] > ckpt["model_args"]["block_size"]:
        raise UserError(f"block_size={cfg['block_size']} is longer than the model's {ckpt['model_args']['block_size']} "
                        "positions; resume with the run's block_size")
    if old["optimizer"] != cfg["optimizer"]:  # the saved state belongs to the other one
        raise UserError(f"{cfg['out_dir']} was trained with optimizer={old['optimizer']}; resume it with the same "
                        "(start a new run, init_from=OUT_DIR, to switch)")
    kept = ("group_by_length",)  # part of the data order: a run keeps the one it began with
    changed = [f"{k}={cfg[k]!r} (was {old[k]!r})" for k in cfg if k not in ("init_from", "overwrite", *kept) and old[k] != cfg[k]]
    if changed:
        say(f"note: resuming with changed settings: {', '.join(changed)}")
    if any(old[k] != cfg[k] for k in kept):
        say(f"note: keeping the checkpoint's {', '.join(f'{k}={old[k]!r}' for k in kept)} (the data order of the run)")


def agree(world, error):
    """Every rank stops if one of them failed (rank 0 alone writes files): raise `error` here,
    or exit quietly where another rank has it to say. Every rank must call it."""
    if world.ddp:
        failed = torch.tensor(float(error is not None), device=world.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            sys.exit(2)
    if error is not None:
        raise error


def claim_out_dir(cfg, resume, world):
    """Rank 0 locks out_dir for this run, refuses to replace a run that is there, and opens
    log.txt. Returns (the open lock file, the RunLog); the OS releases the lock when the
    process ends, however it ends."""
    lock, log, error = None, RunLog(None, cfg), None
    if world.master:
        try:
            lock = lock_out_dir(cfg["out_dir"], resume, cfg["overwrite"])
            log = RunLog(os.path.join(cfg["out_dir"], "log.txt"), cfg, append=resume)
        except UserError as e:
            error = e
    agree(world, error)
    return lock, log


def lock_out_dir(out_dir, resume, overwrite):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file; give a folder")
    lock = lock_folder(out_dir, f"another run is training into {out_dir} right now; wait for it or choose "
                                "another --out_dir")
    path = os.path.join(out_dir, "ckpt.pt")
    if not resume and not overwrite and os.path.exists(path):
        step = load_checkpoint(path)["step"]  # (memory-mapped: the weights are not read)
        raise UserError(f"{out_dir} already holds a run (ckpt.pt at step {step}): continue it with "
                        "--init_from=resume, choose another --out_dir, or replace it with --overwrite")
    return lock


def load_hellaswag(cfg, meta):
    """The rendered HellaSwag examples to evaluate during training, or None if it is off."""
    if cfg["hellaswag_interval"] == 0:
        return None
    if meta["tokenizer"] != "gpt2":
        raise UserError("HellaSwag needs a GPT-2 BPE model; set hellaswag_interval=0 for char-level data")
    return hellaswag.load_examples(split="val", data_file=cfg["hellaswag_file"] or None,
                                   limit=cfg["hellaswag_limit"] or None)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def setup_model(cfg, world, meta, ckpt, ptdtype, say):
    """The model on its device with its optimizers and fp16 gradient scaler: a new one, one
    fine-tuned from init_from, or (ckpt given) the checkpoint's. Returns (raw_model, base,
    optimizers, scaler): optimizers is [AdamW] or [Muon, AdamW]; base names a LoRA run's
    frozen weights."""
    if world.fsdp and ptdtype == torch.float16:  # GradScaler's overflow check would see one shard per rank
        raise UserError("fsdp=True trains in bfloat16 or float32, not float16: set --dtype=bfloat16 (Ampere and newer) or float32")
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
        raw_model.fully_shard(param_dtype=ptdtype)
        say(f"FSDP: weights, gradients and AdamW state sharded over {world.size} ranks, one unit per Block")
    else:
        raw_model.to(world.device)
    torch.manual_seed(cfg["seed"] + world.rank)  # then a stream per rank: different dropout masks
    muon = None
    if cfg["optimizer"] == "muon":
        if lora.has_lora(raw_model):  # a resumed LoRA run; check_settings refuses the rest
            raise UserError("LoRA runs train with AdamW: drop --optimizer=muon")
        muon = dict(lr=cfg["muon_lr"], momentum=cfg["muon_momentum"], weight_decay=cfg["muon_weight_decay"])
    optimizers = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                                world.device_type, muon=muon, verbose=world.master)
    # fp16 needs loss scaling (its small range underflows gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(world.device_type, enabled=(ptdtype == torch.float16))
    return raw_model, base, optimizers, scaler


def restore(ckpt, raw_model, optimizers, scaler, train_loader, world, say):
    """Put a checkpoint's training state back: optimizers, scaler, data position, RNG. Returns
    the step to continue from. The weights came back in setup_model."""
    # the moments come from the checkpoint, the settings (peak lr, betas, weight decay, momentum)
    # from this run: loading brings back the saved group settings, so they are put back after
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups] for opt in optimizers]
    load_optimizer(raw_model, optimizers, ckpt["optimizer"])
    for opt, saved in zip(optimizers, settings):
        for group, values in zip(opt.param_groups, saved):
            group.update(values)
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    train_loader.load_state_dict(ckpt["loader"])
    rngs = ckpt["rng"]
    if len(rngs) == world.size:
        set_rng_state(rngs[world.rank])
    else:
        say(f"note: the checkpoint has RNG states for {len(rngs)} ranks, this run has {world.size}: "
            "dropout will not repeat the original run exactly")
    return ckpt["step"]


def wrap(raw_model, cfg, world, say):
    """The model the loop calls: compiled if asked, in DDP under torchrun (an FSDP model
    needs no wrapper: it is sharded in place, and compiled after sharding)."""
    model = raw_model
    if cfg["compile"]:
        say("compiling the model (the first steps are slow)...")
        model = torch.compile(model)
    if world.ddp and not world.fsdp:
        model = DDP(model, device_ids=[world.device] if world.device_type == "cuda" else None)
    return model


def grad_sync(model, raw_model, world, last_micro):
    """Exchange gradients on the last micro-step only: before it, every rank accumulates its
    own, as one big batch would, without communicating. DDP: no_sync() skips the all-reduce.
    FSDP: set_requires_gradient_sync(False) skips the reduce-scatter; each rank keeps full
    (unsharded) gradients until the last micro-step reduces and shards them, so accumulation
    costs one gradient copy of memory but no communication per micro-step."""
    if world.fsdp:
        raw_model.set_requires_gradient_sync(last_micro)
        return nullcontext()
    return model.no_sync() if world.ddp and not last_micro else nullcontext()


def local(t):
    """This rank's part of a tensor: its shard under FSDP (a DTensor), the tensor otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t  # (a DTensor's method: no import needed)


# The checkpoint holds full (unsharded) tensors in every run, so any script reads it. The
# optimizer state is keyed by parameter name ("transformer.h.0.attn.c_attn.weight"), not by
# position: an FSDP run resumes a DDP or single-process checkpoint, and the reverse. (The
# torch.distributed.checkpoint helpers take most of a second to import: only when needed.)


def gather_state(raw_model, optimizers, world):
    """(model state dict or None, the optimizers' state dict) to save, whole, on rank 0 (other ranks
    get empty dicts). Under FSDP it gathers the shards: every rank must call it. None for the
    model means make_checkpoint takes it from the model itself (not sharded)."""
    from torch.distributed.checkpoint import state_dict as dcp
    # FSDP: gathered to rank 0, on the host. Otherwise every rank already holds the whole state:
    # no offload, no collective (an offloaded gather outside FSDP could abort a rank at exit, torch 2.14)
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=world.fsdp)
    if world.fsdp:  # after evaluation (forward only) the root unit still holds its gathered weights
        raw_model.reshard()
    optim = dcp.get_optimizer_state_dict(raw_model, optimizers, options=full)  # one dict for all of them
    if not world.fsdp:
        return None, optim
    model = dcp.get_model_state_dict(raw_model, options=full)
    if model and raw_model.config.tie_embeddings:  # the tied weight under both names, as model.state_dict() has it
        model["lm_head.weight"] = model["transformer.wte.weight"]
    return model, optim


def load_optimizer(raw_model, optimizers, state):
    """Load a full, name-keyed optimizer state (every rank read the file); under FSDP each
    rank keeps its shard of the moments."""
    from torch.distributed.checkpoint import state_dict as dcp
    dcp.set_optimizer_state_dict(raw_model, optimizers, state, options=dcp.StateDictOptions(full_state_dict=True))


def stop_agreed(stop, world):
    """Whether a stop was asked for on any rank. Under DDP every rank must call it at the same
    point (one all-reduce), so that all of them leave an evaluation at the same batch."""
    if not world.ddp:
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def evaluate(model, loader, eval_iters, world, autocast, stop):
    """The mean validation loss per target token over eval_iters batches on every rank. The
    loader restarts each time, so every evaluation sees the same tokens. None if a stop was
    asked for meanwhile, on any rank."""
    model.eval()
    loader.reset()
    loss_sum = torch.zeros((), device=world.device)
    n_targets = 0
    with torch.no_grad():
        for _ in range(eval_iters):
            if stop_agreed(stop, world):
                model.train()
                return None
            x, y = loader.next_batch()
            n = int((y != -1).sum())  # every token, or (SFT) the response tokens
            with autocast:
                _, loss = model(x.to(world.device), y.to(world.device))
            loss_sum += loss.float() * n
            n_targets += n
    model.train()
    totals = torch.stack([loss_sum, torch.tensor(float(n_targets), device=world.device)])
    if world.ddp:
        dist.all_reduce(totals)  # sums over ranks
    return (totals[0] / totals[1]).item()


def save(cfg, step, val_loss, *, model, optimizers, scaler, loader, meta, base, world):
    """Write out_dir/ckpt.pt (atomically). Every rank must call it: the RNG states (and under
    FSDP the weights and optimizer state) are gathered."""
    model_state, optim_state = gather_state(model, optimizers, world)
    rngs = [None] * world.size
    if world.ddp:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    error = None
    if world.master:
        ckpt = make_checkpoint(model, meta, cfg, state_dict=model_state, step=step, optimizer=optim_state,
                               scaler=scaler.state_dict() if scaler.is_enabled() else None,
                               loader=loader.state_dict(), rng=rngs, val_loss=val_loss, base=base)
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        try:  # a full disk: the last good checkpoint stays, and every rank stops
            save_checkpoint(ckpt, path)
            if cfg["keep_interval"] and step % cfg["keep_interval"] == 0:
                save_checkpoint(ckpt, os.path.join(cfg["out_dir"], f"ckpt_{step}.pt"))
            print(f"saved {path} at step {step}")
        except UserError as e:
            error = e
    agree(world, error)


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


def all_finite(bad_loss, params, world):
    """No non-finite loss since the last check and no non-finite weight, on any rank (every
    rank must call it, and all get the same answer). Under FSDP each rank checks its shards."""
    bad = (bad_loss | ~torch.stack([torch.isfinite(local(p)).all() for p in params]).all()).float()
    if world.ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def set_lr(optimizers, step, cfg):
    """Every param group follows the same schedule, scaled to its own peak (base_lr): AdamW's
    learning_rate, Muon's muon_lr. Returns AdamW's lr, the one logged."""
    lr = get_lr(step, cfg)
    scale = lr / cfg["learning_rate"] if cfg["learning_rate"] > 0 else 0.0
    for opt in optimizers:
        for group in opt.param_groups:  # (AdamW's groups take lr itself: no rounding from the scale)
            group["lr"] = lr if group["base_lr"] == cfg["learning_rate"] else group["base_lr"] * scale
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


def nonfinite(cfg, step):
    """A NaN/inf loss: stop without saving, so ckpt.pt stays the last good one."""
    kept = (f"the last good checkpoint in {cfg['out_dir']} is untouched" if os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt"))
            else "no checkpoint had been written yet")
    return UserError(f"the loss is not finite at step {step}: stopping without saving ({kept}); lower "
                     "learning_rate, check the data, or try dtype=float32")


class StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to stop after this step (and save); the second
    exits at once (a checkpoint being written is then abandoned; ckpt.pt is only replaced whole)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            print("\nsecond signal: exiting now", flush=True)
            sys.exit(130)
        self.requested = True
        # (under DDP the ranks agree at the next log step, so that all of them stop at the same one)
        print(f"\n{signal.Signals(signum).name}: finishing this step or evaluation batch (with several GPUs, "
              "training: the next log step), then saving and exiting (again to exit at once)", flush=True)


class RunLog:
    """out_dir/log.txt, one 'STEP STREAM VALUE' line per value, and wandb if asked. With no
    path (ranks other than 0) it writes nothing. A write that fails (a full disk) is said once
    and logging stops; the training goes on, and the next checkpoint says whether it can be saved."""

    def __init__(self, path, cfg, append=False):
        self.file = self.wandb = None
        if path is None:
            return
        try:
            self.file = open(path, "a" if append else "w")
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        if cfg["wandb_log"]:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    def __call__(self, step, **values):
        if self.file is None:
            return
        try:
            for k, v in values.items():
                self.file.write(f"{step} {k} {v:.7g}\n" if isinstance(v, float) else f"{step} {k} {v}\n")
            self.file.flush()
        except OSError as e:
            print(f"warning: cannot write {self.file.name} ({e.strerror}); the log stops here, the training goes on")
            self.file = None
            return
        if self.wandb is not None:
            self.wandb.log(values, step=step)


def format_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------


def main():
    cfg = configure(DEFAULTS)
    check_settings(cfg)
    world = setup_world(cfg["device"], fsdp=cfg["fsdp"])
    try:
        check_gpu_recipe(cfg, world.device_type)
        train(cfg, world)
    except UserError as e:  # bad data, a missing checkpoint, a NaN loss: one line, no traceback
        die(str(e))
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
    train_loader, val_loader, layout = make_loaders(cfg, meta, world)
    say("config:")
    if world.master:
        print_config(cfg)
    say(f"device {world.device}, dtype {str(ptdtype).replace('torch.', '')}, {world.size} rank(s), {layout}")

    raw_model, base, optimizers, scaler = setup_model(cfg, world, meta, ckpt, ptdtype, say)
    step = restore(ckpt, raw_model, optimizers, scaler, train_loader, world, say) if resume else 0
    val_loss = ckpt["val_loss"] if resume else None
    del ckpt  # the file is memory-mapped: let it go before this run replaces it
    model = wrap(raw_model, cfg, world, say)
    autocast = autocast_context(world.device_type, ptdtype)
    hella_examples = load_hellaswag(cfg, meta)
    checkpoint_args = dict(model=raw_model, optimizers=optimizers, scaler=scaler, loader=train_loader, meta=meta,
                           base=base, world=world)

    # --- the loop ------------------------------------------------------------------------
    max_iters, start_step = cfg["max_iters"], step
    peak = peak_flops(torch.cuda.get_device_name(world.device)) if world.device_type == "cuda" else None
    params = [p for p in raw_model.parameters() if p.requires_grad]
    pin = world.device_type == "cuda"  # page-locked host memory lets the copy overlap with compute
    run_start = t_last = time.time()
    steps_since_log, tokens_since_log = 0, 0
    bad_loss = torch.zeros((), dtype=torch.bool, device=world.device)  # a non-finite loss since the last check
    stopping = stop_agreed(stop, world)  # a stop (Ctrl-C, SIGTERM) that every rank has agreed on; one
    # asked for during the set-up ends the run here, before any step
    while True:
        last = step >= max_iters or stopping
        t_pause = time.time()  # evaluation and saving are not counted in the step time
        if ((cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or last) and not stopping:
            loss = evaluate(model, val_loader, cfg["eval_iters"], world, autocast, stop)
            if loss is None:  # a stop during the evaluation: save (if there is anything new) and exit
                last = stopping = True
            else:
                val_loss = loss
                say(f"step {step}: val loss {val_loss:.4f}")
                log(step, val=val_loss)
        if hella_examples and (step % cfg["hellaswag_interval"] == 0 or last) and not stopping:
            res = hellaswag.evaluate(raw_model, hella_examples, world.device, batch_size=max(1, cfg["batch_size"] // 4),
                                     autocast_ctx=autocast, rank=world.rank, world_size=world.size,
                                     stop=lambda: stop_agreed(stop, world))
            if res is None:  # a stop during HellaSwag, as during the val loss
                last = stopping = True
            else:
                say(f"step {step}: HellaSwag acc_norm {res['acc_norm']:.4f} (acc {res['acc']:.4f}, n={res['n']})")
                log(step, hella=res["acc_norm"])
        due = cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0
        if (due or last) and step > start_step:
            if not all_finite(bad_loss, params, world):  # never overwrite a good checkpoint with a diverged model
                raise nonfinite(cfg, step - 1)
            save(cfg, step, val_loss, **checkpoint_args)
        if last:
            if stopping:
                say(f"stopped at step {step}" + ("; continue with --init_from=resume" if step > start_step else ""))
            break
        t_last += time.time() - t_pause

        # one optimizer step: this rank's micro-batches, and the count of loss targets in the
        # whole step (every micro-batch of every rank)
        lr = set_lr(optimizers, step, cfg)
        batches, step_targets, step_tokens = train_loader.next_step()
        loss_accum = torch.zeros((), device=world.device)
        for micro, (x, y) in enumerate(batches):
            # the micro-batch's share of the step's targets (1/grad_accum for full token batches):
            # the weighted sum over micro-steps and ranks is the mean over every target of the
            # step. x world.size because DDP (and FSDP) average the ranks' gradients, not add them.
            weight = int((y != -1).sum()) * world.size / step_targets
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            with grad_sync(model, raw_model, world, last_micro=micro == len(batches) - 1):
                with autocast:
                    _, loss = model(x, y)  # the mean over this micro-batch's targets
                    loss = loss * weight
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        norm = step_optimizers(optimizers, scaler, params, cfg["grad_clip"])  # FSDP: over the ranks' shards
        bad_loss |= ~torch.isfinite(loss_accum)  # no sync here: checked at log and save time
        step += 1
        steps_since_log += 1
        tokens_since_log += step_tokens

        # A signal may reach the ranks a step apart, and saving is collective: under DDP no rank
        # acts on its own, they agree at the next log step (one all-reduce there).
        stopping = stop.requested and not world.ddp
        if step % cfg["log_interval"] == 0 or step == max_iters or stopping:
            if world.ddp:  # the loss of the whole global batch, and agreement on stopping and NaNs
                dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)
                flags = torch.stack([torch.tensor(float(stop.requested), device=world.device), bad_loss.float()])
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stopping, bad_loss = bool(flags[0].item()), flags[1] > 0
            loss_val = loss_accum.item()  # waits for the GPU: the timing below is real
            if bad_loss.item() or not math.isfinite(loss_val):
                raise nonfinite(cfg, step - 1)
            t_now = time.time()
            dt = (t_now - t_last) / steps_since_log
            tok_per_s = tokens_since_log / (t_now - t_last)  # real tokens: SFT padding is not counted
            values = dict(train=loss_val, lr=lr, norm=(norm.full_tensor() if world.fsdp else norm).item(),
                          dt_ms=dt * 1000, tok_per_s=tok_per_s, epoch=train_loader.epoch)
            if peak is not None:
                values["mfu"] = raw_model.estimate_mfu(tokens_since_log / steps_since_log, dt, peak,
                                                       seq_len=cfg["block_size"])
            t_last, steps_since_log, tokens_since_log = t_now, 0, 0
            log(step - 1, **values)
            left = (max_iters - step) * (t_now - run_start) / max(1, step - start_step)
            mfu_text = f" | mfu {values['mfu'] * 100:.1f}%" if peak is not None else ""
            say(f"step {step - 1:5d}/{max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | norm {values['norm']:.4f} | "
                f"{dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s{mfu_text} | epoch {train_loader.epoch} | "
                f"{format_time(left)} left", flush=True)
    say(f"done in {format_time(time.time() - run_start)}")


if __name__ == "__main__":
    main()
