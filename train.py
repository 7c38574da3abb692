"""
Train a GPT: from a laptop CPU to several 8-GPU nodes, with one script.

    python train.py config/shakespeare_char_cpu.py                    # laptop, a few minutes
    python train.py config/shakespeare_char.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py   # one 8-GPU node

What one optimizer step does:
  1. read grad_accum micro-batches (B x T tokens each) on every rank: together exactly
     total_batch_size tokens;
  2. forward/backward each one under autocast (bf16, or fp16 with a gradient scaler), the loss
     divided by grad_accum so the summed gradients are the mean over the whole batch; DDP
     averages across ranks on the last micro-step only (no_sync on the others);
  3. clip the gradient norm, set the learning rate (linear warmup, cosine decay), AdamW step.
Around it: validation every eval_interval steps, HellaSwag every hellaswag_interval, a checkpoint
every checkpoint_interval and at the end, one line of log per log_interval.

Instruction fine-tuning (an SFT dataset, made by prepare_alpaca.py; its meta.json says
"format": "sft"): the batches are whole examples, one a row, padded to the longest of the
micro-batch (dataloader.SFTLoader), so batch_size and total_batch_size count EXAMPLES there,
not tokens. The loss is on the response tokens only, averaged over all of them in the whole
optimizer step (every micro-step, every rank), so accumulation and DDP give the gradient of
one big batch; tok/s counts the real tokens, not the padding.

Exact resume: the checkpoint holds the model, the optimizer, the step, the data loader's
position and every rank's RNG state, so `--init_from=resume` continues as if never stopped.
Ctrl-C or SIGTERM finishes the current step, saves and exits 0 (twice: exits at once).
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lora
from checkpoint import clean_state_dict, load_checkpoint, load_model, save_checkpoint
from configurator import autocast_context, configure, die, print_config, resolve_device, resolve_dtype
from dataloader import DataError, DataLoader, SFTLoader, read_meta
from model import GPT, GPTConfig, peak_flops

# -----------------------------------------------------------------------------
# settings: every one can be changed by a config file or --key=value (see configurator.py)
DEFAULTS = dict(
    # I/O
    out_dir="out",  # where ckpt.pt and log.txt go
    init_from="scratch",  # scratch | resume (out_dir/ckpt.pt) | gpt2, gpt2-medium, ... | a run's out_dir | an HF folder
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
    batch_size=12,  # micro-batch: sequences per forward/backward on each rank (SFT: examples)
    block_size=1024,  # tokens per sequence
    total_batch_size=0,  # tokens per optimizer step over all ranks; 0 = batch_size * block_size * ranks
    # (SFT data: examples per optimizer step; 0 = batch_size * ranks)
    group_by_length=False,  # SFT data: fill each step with examples of similar length (far less padding)
    # model (ignored when the weights come from a checkpoint or GPT-2)
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,  # 0 for pretraining, 0.1+ for fine-tuning / small data
    bias=True,  # biases in Linears and LayerNorms, like GPT-2
    rope=False,  # rotary position embeddings instead of learned ones
    # LoRA (lora.py): rank 0 = off, train all weights
    lora_rank=0,
    lora_alpha=16.0,  # the update is scaled by lora_alpha / lora_rank
    lora_dropout=0.0,
    lora_targets="q,v",  # which linears get adapters: q, k, v, attn_proj, mlp_fc, mlp_proj
    # AdamW
    learning_rate=6e-4,  # the peak learning rate
    max_iters=5000,  # optimizer steps in all
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # clip the global gradient norm to this (0 = no clipping)
    # learning-rate schedule
    decay_lr=True,  # False: constant learning_rate after warmup
    warmup_iters=100,  # linear warmup from 0 over this many steps
    lr_decay_iters=0,  # cosine decay ends here (0 = max_iters)
    min_lr=6e-5,  # the floor of the decay, usually learning_rate / 10
    # system
    device="auto",  # auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16 (float16 uses a GradScaler)
    compile=False,  # torch.compile the model (first steps slower, then faster; GPU)
    seed=1337,
)

# -----------------------------------------------------------------------------


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


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to stop after this step (and save); the second
    exits at once. A checkpoint being written then is left unfinished as ckpt.pt.tmp; ckpt.pt
    itself is only ever replaced whole."""

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
        print(f"\n{signal.Signals(signum).name}: finishing this step (with several GPUs: the next "
              "log step), then saving and exiting (again to exit at once)", flush=True)


def format_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def check_settings(cfg):
    """Settings that parse but cannot work: one line now, not a traceback minutes later."""
    for key in ("batch_size", "block_size", "log_interval", "eval_iters", "n_layer", "n_head"):
        if cfg[key] < 1:
            die(f"--{key} must be at least 1, got {cfg[key]}")
    for key in ("max_iters", "total_batch_size", "eval_interval", "checkpoint_interval", "warmup_iters"):
        if cfg[key] < 0:  # max_iters=0: evaluate the starting model and stop
            die(f"--{key} must not be negative, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"] != 0:
        die(f"n_embd={cfg['n_embd']} must be a multiple of n_head={cfg['n_head']} (each head gets n_embd / n_head)")
    if cfg["lora_rank"] > 0:
        try:
            lora.parse_targets(cfg["lora_targets"])
        except ValueError as e:
            die(str(e))


def main():
    cfg = configure(DEFAULTS)
    check_settings(cfg)

    # --- processes and devices ---------------------------------------------------------
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` has none
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = resolve_device(cfg["device"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, local_rank, world_size = 0, 0, 1
        device = resolve_device(cfg["device"])
    master = rank == 0  # only rank 0 prints, logs and saves
    device_type = "cuda" if device.startswith("cuda") else device
    ptdtype = resolve_dtype(cfg["dtype"], device_type)
    say = print if master else (lambda *a, **k: None)

    # TF32 for fp32 matmuls on Ampere and newer: 10-bit mantissa inputs, fp32 accumulation
    torch.set_float32_matmul_precision("high")

    try:
        meta = read_meta(os.path.join("data", cfg["dataset"]))
    except DataError as e:
        die(str(e))
    sft = meta.get("format") == "sft"  # an instruction dataset: whole examples, loss on responses

    # --- batch arithmetic ------------------------------------------------------------
    B, T = cfg["batch_size"], cfg["block_size"]
    if sft:  # examples differ in length: here the batch sizes count examples, not tokens
        per_micro = B * world_size
        total = cfg["total_batch_size"] or per_micro
        if total % per_micro != 0:
            die(f"total_batch_size={total:,} (examples, for this SFT dataset) is not a multiple of "
                f"batch_size*ranks = {B}*{world_size} = {per_micro:,}; change one of them")
        grad_accum = total // per_micro
    else:
        tokens_per_micro = B * T * world_size
        total = cfg["total_batch_size"] or tokens_per_micro
        if total % tokens_per_micro != 0:
            die(f"total_batch_size={total:,} is not a multiple of batch_size*block_size*ranks = "
                f"{B}*{T}*{world_size} = {tokens_per_micro:,}; change one of them")
        grad_accum = total // tokens_per_micro

    if master:
        print("config:")
        print_config(cfg)
        if sft:
            print(f"device {device}, dtype {str(ptdtype).replace('torch.', '')}, {world_size} rank(s), "
                  f"{total:,} examples per step = {B} x {world_size} ranks x {grad_accum} accumulation steps, "
                  f"each micro-batch padded to its longest example (at most {T} tokens)")
        else:
            print(f"device {device}, dtype {str(ptdtype).replace('torch.', '')}, {world_size} rank(s), "
                  f"{total:,} tokens per step = {B} x {T} x {world_size} ranks x {grad_accum} accumulation steps")

    try:
        run(cfg, meta, rank, local_rank, world_size, master, device, device_type, ptdtype, grad_accum, say)
    except DataError as e:  # expected failures (bad data, missing checkpoint, NaN loss): one line
        if dist.is_initialized():
            dist.destroy_process_group()
        die(str(e))
    if ddp:
        dist.destroy_process_group()


def build_model(cfg, meta, device, say):
    """Return (model, base, ckpt): the model (LoRA applied if asked), the reference to its
    frozen base for LoRA checkpoints, and the checkpoint when resuming (else None)."""
    init_from, ckpt, base = cfg["init_from"], None, None
    if meta["tokenizer"] == "char":
        vocab_size = len(meta["chars"])
    else:
        vocab_size = 50304  # GPT-2's 50257, padded to a multiple of 128 for fast matmuls
    if init_from == "scratch":
        say(f"a new model: {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide")
        model = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=vocab_size, n_layer=cfg["n_layer"],
                              n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                              bias=cfg["bias"], rope=cfg["rope"]))
    elif init_from == "resume":
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        say(f"resuming from {path}")
        ckpt = load_checkpoint(path)
        model, _ = load_model(out_dir=cfg["out_dir"], dropout=cfg["dropout"])
        base = ckpt.get("base")
        if base is not None and os.path.isdir(base):  # (older runs stored a relative path)
            base = os.path.abspath(base)
    else:
        # fine-tuning: another run of ours, or OpenAI's GPT-2 (by name or a local HF folder)
        ours = os.path.isfile(os.path.join(init_from, "ckpt.pt"))
        say(f"initialising from {init_from}")
        if ours:
            model, init_meta = load_model(out_dir=init_from, dropout=cfg["dropout"])
        else:
            model, init_meta = load_model(init_from=init_from, dropout=cfg["dropout"])
        if init_meta.get("tokenizer") != meta["tokenizer"] or init_meta.get("chars") != meta.get("chars"):
            raise DataError(f"{init_from} was trained with the {init_meta.get('tokenizer')} tokenizer but "
                            f"data/{cfg['dataset']} uses {meta['tokenizer']}; use a dataset of the same tokenizer")
        # a LoRA checkpoint names its base; a folder by its absolute path, so sample.py and
        # hellaswag.py find it from any working directory
        base = os.path.abspath(init_from) if os.path.isdir(init_from) else init_from
        if lora.has_lora(model):  # fine-tuning a LoRA run: start from its merged weights
            lora.merge_lora(model)
        if cfg["block_size"] < model.config.block_size:
            model.crop_block_size(cfg["block_size"])
        if cfg["block_size"] > model.config.block_size:
            raise DataError(f"block_size={cfg['block_size']} is larger than {init_from}'s {model.config.block_size}")
    if cfg["lora_rank"] > 0 and init_from != "resume":
        if init_from == "scratch":
            raise DataError("LoRA adapts a trained model: set init_from to gpt2* or another run's out_dir")
        lora.apply_lora(model, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                        targets=cfg["lora_targets"], verbose=say is print)
    return model.to(device), base, ckpt


def run(cfg, meta, rank, local_rank, world_size, master, device, device_type, ptdtype, grad_accum, say):
    ddp = world_size > 1 or dist.is_initialized()
    data_dir = os.path.join("data", cfg["dataset"])
    sft = meta.get("format") == "sft"
    B, T = cfg["batch_size"], cfg["block_size"]
    Loader = SFTLoader if sft else DataLoader  # SFTLoader: whole examples, targets -1 but on responses
    extra = dict(group_by_length=cfg["group_by_length"]) if sft else {}
    train_loader = Loader(data_dir, "train", B, T, rank, world_size, seed=cfg["seed"], shuffle=True,
                          grad_accum=grad_accum, **extra)
    val_loader = Loader(data_dir, "val", B, T, rank, world_size, shuffle=False)

    # the same seed on every rank: identical initial weights (DDP also broadcasts rank 0's)
    torch.manual_seed(cfg["seed"])
    model, base, ckpt = build_model(cfg, meta, device, say)
    say(f"number of parameters: {model.num_params() / 1e6:.2f}M")
    raw_model = model  # the plain module: its state dict has clean names, and HellaSwag runs on it
    # then a different stream per rank, so dropout masks differ between ranks
    torch.manual_seed(cfg["seed"] + rank)

    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                               (cfg["beta1"], cfg["beta2"]), device_type)
    # fp16 needs loss scaling (its small range underflows gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        train_loader.load_state_dict(ckpt["loader"])
        if sft and train_loader.group_by_length != cfg["group_by_length"]:
            say(f"note: group_by_length={train_loader.group_by_length} as in the checkpoint: a run keeps "
                "the data order it began with")
        rngs = ckpt.get("rng", [])
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        else:
            say(f"note: the checkpoint has RNG states for {len(rngs)} ranks, this run has {world_size}: "
                "dropout will not repeat the original run exactly")
        if ckpt["config"].get("total_batch_size", 0) != cfg["total_batch_size"] or ckpt["config"]["block_size"] != T:
            say("note: the batch layout changed since the checkpoint; the data order will differ")
    if cfg["compile"]:
        say("compiling the model (the first steps are slow)...")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    autocast = autocast_context(device_type, ptdtype)

    hella_examples = None
    if cfg["hellaswag_interval"] > 0:
        if meta["tokenizer"] != "gpt2":
            raise DataError("HellaSwag needs a GPT-2 BPE model; set hellaswag_interval=0 for char-level data")
        import hellaswag
        hella_examples = hellaswag.load_examples(split="val", data_file=cfg["hellaswag_file"] or None,
                                                 limit=cfg["hellaswag_limit"] or None)

    wandb = None
    if cfg["wandb_log"] and master:
        try:
            import wandb
        except ImportError:
            raise DataError("wandb_log=True needs wandb: pip install wandb") from None
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_path = os.path.join(cfg["out_dir"], "log.txt")
    log_file = open(log_path, "a" if cfg["init_from"] == "resume" else "w") if master else None

    def log(step, **values):
        """One 'STEP STREAM VALUE' line per value in log.txt (rank 0), and to wandb."""
        if not master:
            return
        for k, v in values.items():
            log_file.write(f"{step} {k} {v:.7g}\n" if isinstance(v, float) else f"{step} {k} {v}\n")
        log_file.flush()
        if wandb is not None:
            wandb.log(values, step=step)

    def evaluate():
        """Mean validation loss over eval_iters batches per rank, averaged across ranks (SFT:
        over every response token of them). The val loader restarts each time, so every
        evaluation sees the same tokens."""
        model.eval()
        val_loader.reset()
        total_loss = torch.zeros((), device=device)
        n_targets = torch.zeros((), device=device)  # SFT: response tokens seen
        with torch.no_grad():
            for _ in range(cfg["eval_iters"]):
                x, y = val_loader.next_batch()
                x, y = x.to(device), y.to(device)
                with autocast:
                    _, loss = model(x, y)
                if sft:  # the mean over every response token, not over batches of unequal counts
                    n = (y != -1).sum()
                    total_loss += loss.float() * n
                    n_targets += n
                else:
                    total_loss += loss.float()
        model.train()
        if sft:
            if ddp:
                dist.all_reduce(total_loss)  # sums over ranks
                dist.all_reduce(n_targets)
            return (total_loss / n_targets).item()
        mean = total_loss / cfg["eval_iters"]
        if ddp:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        return mean.item()

    def save(step, val_loss):
        # every rank's RNG state, so that a resume with the same ranks repeats dropout exactly
        rngs = [None] * world_size
        if ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if not master:
            return
        ckpt = {
            "model_args": vars(raw_model.config).copy(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": step,
            "config": cfg,
            "meta": meta,
            "loader": train_loader.state_dict(),
            "rng": rngs,
            "val_loss": val_loss,
        }
        if lora.has_lora(raw_model):
            ckpt["lora"], ckpt["base"] = lora.lora_state_dict(raw_model), base  # small: adapters only
        else:
            ckpt["model"] = clean_state_dict(raw_model.state_dict())
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        save_checkpoint(ckpt, path)
        if cfg["keep_interval"] and step % cfg["keep_interval"] == 0:
            save_checkpoint(ckpt, os.path.join(cfg["out_dir"], f"ckpt_{step}.pt"))
        print(f"saved {path} at step {step}")

    # --- the loop ------------------------------------------------------------------------
    stop = StopFlag()
    max_iters, start_step = cfg["max_iters"], step
    tokens_per_step = B * T * world_size * grad_accum
    peak = peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    params = [p for p in raw_model.parameters() if p.requires_grad]
    pin = device_type == "cuda"  # page-locked host memory lets the copy overlap with compute
    val_loss = ckpt.get("val_loss") if ckpt else None
    t_last, steps_since_log, run_start = time.time(), 0, time.time()
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
    real_tokens = torch.zeros((), device=device)  # SFT: non-padding tokens trained on since the last log

    while True:
        last = step >= max_iters
        t_pause = time.time()  # evaluation and saving are not counted in the step time
        if (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or last:
            val_loss = evaluate()
            say(f"step {step}: val loss {val_loss:.4f}")
            log(step, val=val_loss)
        if hella_examples is not None and (step % cfg["hellaswag_interval"] == 0 or last):
            import hellaswag
            res = hellaswag.evaluate(raw_model, hella_examples, device, batch_size=max(1, B // 4),
                                     autocast_ctx=autocast, rank=rank, world_size=world_size)
            say(f"step {step}: HellaSwag acc_norm {res['acc_norm']:.4f} (acc {res['acc']:.4f}, n={res['n']})")
            log(step, hella=res["acc_norm"])
        due = cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0
        if (due or last) and step > start_step:
            # never overwrite the last good checkpoint with a diverged model
            bad = (bad_loss | ~torch.stack([torch.isfinite(p).all() for p in params]).all()).float()
            if ddp:  # every rank stops, or none: one rank alone leaving would hang the others
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                raise_nonfinite(cfg)
            save(step, val_loss)
        if last:
            break
        t_last += time.time() - t_pause

        # one optimizer step
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_accum = torch.zeros((), device=device)
        if sft:
            # count the response tokens of the whole step (every micro-step, every rank) before
            # the first forward, so that the step's loss is the mean over all of them however the
            # step is split (a mean of the micro-batches' means would weigh a token more in a
            # micro-batch of short responses)
            batches, n_real = train_loader.next_step()
            n_micro = [int((y != -1).sum()) for _, y in batches]  # response tokens per micro-batch
            counts = torch.tensor([sum(n_micro), n_real], dtype=torch.float32, device=device)
            if ddp:
                dist.all_reduce(counts)  # sums over ranks
            n_targets = counts[0]
            real_tokens += counts[1]
        for micro in range(grad_accum):
            x, y = batches[micro] if sft else train_loader.next_batch()
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP all-reduces gradients during backward; skip it on all but the last micro-step
            sync = nullcontext() if (not ddp or micro == grad_accum - 1) else model.no_sync()
            with sync:
                with autocast:
                    _, loss = model(x, y)  # SFT: the mean over this micro-batch's response tokens
                    if sft:
                        # weighted by the micro-batch's share of the step's response tokens, the
                        # sum over micro-steps and ranks is the mean over all of them; x world_size
                        # because DDP averages the ranks' gradients instead of adding them
                        loss = loss * (n_micro[micro] / n_targets * world_size)
                    else:
                        loss = loss / grad_accum  # the sum over micro-steps is then the batch mean
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
        scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        bad_loss |= ~torch.isfinite(loss_accum)  # no sync: checked at log and save time
        step += 1
        steps_since_log += 1

        # A signal may reach the ranks a step apart, and saving is collective: under DDP no rank
        # acts on its own, they agree at the next log step (one all-reduce there).
        stopping = stop.requested and not ddp
        if step % cfg["log_interval"] == 0 or step == max_iters or stopping:
            if ddp:  # the loss of the whole global batch, and agreement on stopping (and on NaNs)
                dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)
                flags = torch.stack([torch.tensor(float(stop.requested), device=device), bad_loss.float()])
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stopping, bad_loss = bool(flags[0].item()), flags[1] > 0
            loss_val = loss_accum.item()  # waits for the GPU: the timing below is real
            if bad_loss.item() or not math.isfinite(loss_val):
                raise_nonfinite(cfg, step - 1)
            t_now = time.time()
            dt = (t_now - t_last) / steps_since_log
            step_tokens = tokens_per_step
            if sft:  # the real tokens of these steps, all ranks: padding is not counted
                step_tokens = real_tokens.item() / steps_since_log
                real_tokens.zero_()
            t_last, steps_since_log = t_now, 0
            tok_per_s = step_tokens / dt
            values = dict(train=loss_val, lr=lr, norm=norm.item(), dt_ms=dt * 1000, tok_per_s=tok_per_s)
            mfu_text = ""
            if peak is not None:
                values["mfu"] = raw_model.estimate_mfu(step_tokens, dt, peak, seq_len=T)
                mfu_text = f" | mfu {values['mfu'] * 100:.1f}%"
            epoch_text = ""
            if sft:  # the pass over the training examples this step was in, from 0
                values["epoch"] = train_loader.epoch
                epoch_text = f" | epoch {train_loader.epoch}"
            log(step - 1, **values)
            left = (max_iters - step) * (t_now - run_start) / max(1, step - start_step)
            say(f"step {step - 1:5d}/{max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | norm {values['norm']:.4f} | "
                f"{dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s{mfu_text}{epoch_text} | {format_time(left)} left", flush=True)
        if stopping:
            save(step, val_loss)
            say(f"stopped at step {step}; continue with --init_from=resume")
            break

    if log_file is not None:
        log_file.close()
    say(f"done in {format_time(time.time() - run_start)}")


def raise_nonfinite(cfg, step=None):
    """A NaN/inf loss: stop without saving, so ckpt.pt stays the last good one."""
    where = f" at step {step}" if step is not None else ""
    raise DataError(f"the loss is not finite{where}: stopping without saving (the last good checkpoint in "
                    f"{cfg['out_dir']} is untouched); lower learning_rate, check the data, or try dtype=float32")


if __name__ == "__main__":
    main()
