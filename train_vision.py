"""
Train a vision-language model: a vision tower and a projector in front of a GPT, on questions
about images with the loss on the answers only (vision.py has the model, prepare_vision.py the
data).

    python prepare_vision.py --synthetic=4000 --tokenizer=char --out_dir=data/shapes
    python train_vision.py config/vision_shapes_cpu.py                 # from scratch, a laptop, ~10 min
    python train_vision.py --dataset=mine_siglip --tower=google/siglip-base-patch16-224 --freeze=tower \\
        --init_from=gpt2 --out_dir=out-vlm                             # a pretrained tower and LM (a GPU)
    torchrun --standalone --nproc_per_node=2 train_vision.py config/vision_shapes_cpu.py --batch_size=32
    python vision.py --out_dir=out-vision-shapes                       # accuracy with and without the image

The LM is any model the project loads (init_from: scratch, a run's out_dir, gpt2..., a Hugging
Face GPT-2 or Llama folder); the tower a new ViT (tower="") or a SigLIP/CLIP one (tower=FOLDER or
Hub name), each frozen if --freeze says so; or, with --lora_rank, the LM frozen and LoRA adapters
trained on it (the checkpoint then holds the adapters, the tower and the projector, and names the
LM as its base, as a train.py LoRA run does). Every step is train.py's: batches of whole examples
(SFTLoader, plus their images), gradient accumulation to total_batch_size examples, AdamW with
warmup and cosine decay, clipping; the settings, log.txt, the checkpoint (ckpt.pt: the GPT with
gpt.vision and gpt.projector, and the vision settings in its config), DDP under torchrun,
Ctrl-C, --init_from=resume (exact) work as in train.py. Each evaluation adds the exact-match
accuracy on the first eval_questions val questions, with their images (val_acc) and with a blank
image (val_acc_blank: what the LM guesses from the question alone).
"""

import json
import math
import os
import time
from contextlib import nullcontext

from configurator import UserError, autocast_context, configure, die, exit_on_ctrl_c, print_config, resolve_dtype

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch
import torch.distributed as dist

import lora
from checkpoint import check_same_tokenizer, claim_out_dir, load_checkpoint, load_model, restore_run, save_run
from dataloader import get_tokenizer, read_meta, vocab_size_of
from model import GPT, GPTConfig
from optim import configure_optimizers
from runtime import (StepClock, StopFlag, ThreadPicker, close_world, console_line, ddp_wrap, evaluates_at, format_time,
                     nonfinite, rank_failed, setup_world, stop_agreed, worse_than_best)
from vision import (ImageSFTLoader, ViT, VisionLM, accuracy, answer_end, attach_vision, image_settings, image_tokens,
                    load_hf_tower, load_vision_model, val_questions)

DEFAULTS = dict(
    # I/O
    out_dir="out-vision",  # where ckpt.pt and log.txt go
    init_from="scratch",  # the LM: scratch | resume (out_dir/ckpt.pt) | gpt2, ... | a run's out_dir | an HF folder
    overwrite=False,  # True: a new run may replace the run already in out_dir (else it is refused)
    dataset="shapes",  # data/<dataset>/ from prepare_vision.py (meta.json "format": "image-sft")
    eval_interval=100,  # validate every this many steps (and at the end)
    eval_iters=20,  # val batches for the val loss (per rank)
    eval_questions=200,  # val questions answered for the accuracy at each evaluation (0 = none)
    log_interval=10,  # a log line every this many steps
    checkpoint_interval=0,  # also save every this many steps (0 = at the end and on a stop only)
    keep_interval=0,  # keep ckpt_STEP.pt every this many steps (0 = only the latest)
    wandb_log=False,  # also log to Weights & Biases (pip install wandb)
    wandb_project="gpt2-vision",  # its W&B project
    wandb_run_name="run",  # its W&B run name
    # data
    batch_size=32,  # examples per micro-batch on each rank
    block_size=128,  # the LM's context: the longest example's text plus its image's tokens
    total_batch_size=0,  # examples per optimizer step over all ranks; 0 = one micro-batch per rank
    # the LM, when new (init_from=scratch)
    n_layer=4,  # the LM's Blocks
    n_head=4,  # its attention heads (n_embd must be a multiple)
    n_embd=128,  # its width
    dropout=0.0,  # dropout in the LM and the ViT (0 for short runs; fine-tuning may want 0.1)
    bias=True,  # biases in the Linears and LayerNorms (GPT-2 has them)
    # the vision tower and the projector
    tower="",  # empty: a new ViT (below); or a SigLIP/CLIP vision model's folder or Hub name (data prepared with it)
    vit_layers=4,  # the new ViT's Blocks
    vit_heads=4,  # its attention heads (vit_embd must be a multiple)
    vit_embd=128,  # its width: each patch's vector
    patch_size=4,  # its patches: patch_size x patch_size pixels
    shuffle=2,  # the projector's pixel shuffle: r x r patches -> one LM token (1 = every patch a token)
    freeze="",  # what does not train: "" (nothing) | tower | lm | tower,lm (the projector always trains)
    # LoRA on the LM (lora.py; train.py's settings): its weights frozen, adapters trained; 0 = off
    lora_rank=0,  # the adapters' rank (needs a trained LM: --init_from)
    lora_alpha=16.0,  # the update is scaled by lora_alpha / lora_rank
    lora_dropout=0.0,  # dropout on the adapters' input
    lora_targets="q,v",  # which of the LM's Linears get adapters: q, k, v, attn_proj, mlp_fc, mlp_proj
    # optimizer (train.py's)
    learning_rate=1e-3,  # AdamW's peak learning rate
    max_iters=1000,  # optimizer steps in all
    weight_decay=0.1,  # AdamW's decoupled weight decay, on the matrices only
    beta1=0.9,  # AdamW's first-moment decay
    beta2=0.95,  # its second-moment decay
    grad_clip=1.0,  # clip the global gradient norm to this (0 = no clipping)
    decay_lr=True,  # False: constant learning_rate after warmup
    warmup_iters=50,  # linear warmup from 0 over this many steps
    lr_decay_iters=0,  # cosine decay ends here (0 = max_iters)
    min_lr=1e-4,  # the floor of the decay
    # system
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16
    pg_timeout=600,  # seconds a rank waits in a collective for the others
    cpu_threads=0,  # CPU: torch's threads; 0 = OMP_NUM_THREADS if set, else the fastest of n, n/2, ..., 1, timed
    seed=1337,  # the initial weights, the batches' order and dropout
    plan=False,  # print the run's parts, FLOPs and memory, then exit: no data, GPU or download needed
)

VISION_KEYS = ("tower", "vit_layers", "vit_heads", "vit_embd", "patch_size", "shuffle")  # a resumed run keeps them


def check_settings(cfg):
    for key in ("batch_size", "block_size", "log_interval", "eval_iters", "n_layer", "n_head", "vit_layers",
                "vit_heads", "patch_size", "shuffle"):
        if cfg[key] < 1:
            die(f"--{key} must be at least 1, got {cfg[key]}")
    for key in ("max_iters", "total_batch_size", "eval_interval", "eval_questions", "checkpoint_interval",
                "keep_interval", "warmup_iters", "learning_rate", "min_lr", "weight_decay", "grad_clip", "seed",
                "cpu_threads"):
        if cfg[key] < 0:
            die(f"--{key} must not be negative, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"] or cfg["vit_embd"] % cfg["vit_heads"]:
        die(f"n_embd must be a multiple of n_head and vit_embd of vit_heads, got {cfg['n_embd']}/{cfg['n_head']} and "
            f"{cfg['vit_embd']}/{cfg['vit_heads']}")
    if not 0 <= cfg["dropout"] < 1:
        die(f"--dropout must be in [0, 1), got {cfg['dropout']}")
    frozen = set(filter(None, cfg["freeze"].replace(" ", "").split(",")))
    if frozen - {"tower", "lm"}:
        die(f"--freeze takes tower, lm or tower,lm (the projector always trains), got {cfg['freeze']!r}")
    if "lm" in frozen and cfg["init_from"] == "scratch":
        die("--freeze=lm keeps a new LM's random weights: give a trained one with --init_from")
    if "tower" in frozen and not cfg["tower"]:
        die("--freeze=tower keeps a new ViT's random weights: give a pretrained --tower, or train it")
    if cfg["lora_rank"] < 0:
        die(f"--lora_rank must not be negative (0 = no LoRA), got {cfg['lora_rank']}")
    if cfg["lora_rank"]:
        if cfg["init_from"] == "scratch":
            die("--lora_rank adapts a trained LM and keeps its weights: give one with --init_from")
        if "lm" in frozen:
            die("--lora_rank trains adapters on the LM, --freeze=lm trains nothing of it: give one of the two")
        try:
            lora.parse_targets(cfg["lora_targets"])
        except ValueError as e:
            die(str(e))
        if not 0 <= cfg["lora_dropout"] < 1 or cfg["lora_alpha"] <= 0:
            die(f"--lora_dropout must be in [0, 1) and --lora_alpha positive, got {cfg['lora_dropout']} and "
                f"{cfg['lora_alpha']}")


def vision_settings(cfg, meta, say):
    """The vision part of the run's config: the tower's settings, how images are normalised, and
    (a pretrained tower) the tower itself and its config."""
    v = {k: cfg[k] for k in VISION_KEYS}
    v["image"] = meta["image"]
    side = meta["image_size"][0]
    tower = None
    if cfg["tower"]:
        if image_settings(cfg["tower"]) != meta["image"]:
            raise UserError(f"data/{cfg['dataset']} was prepared for {meta.get('tower') or 'a new ViT'}, not for "
                            f"{cfg['tower']}: re-run prepare_vision.py with --tower={cfg['tower']}")
        tower, v["tower_config"] = load_hf_tower(cfg["tower"])
        patch = v["tower_config"]["patch_size"]
        say(f"vision tower {cfg['tower']}: {sum(p.numel() for p in tower.parameters()):,} parameters")
    else:
        if meta.get("tower"):
            raise UserError(f"data/{cfg['dataset']} was prepared for the tower {meta['tower']}: "
                            f"give --tower={meta['tower']}")
        patch = cfg["patch_size"]
    grid = side // patch
    if side % patch or grid % cfg["shuffle"]:
        raise UserError(f"{side}x{side} images in {patch}x{patch} patches make a {side / patch:g}-patch grid, which "
                        f"must be whole and a multiple of shuffle={cfg['shuffle']}")
    v["n_patches"], v["image_size"] = grid * grid, side
    return v, tower


def build(cfg, meta, world, say):
    """(gpt with its vision parts, base, the vision settings, checkpoint or None): a new run's
    model (the LM new or loaded, the tower new or pretrained), or a resumed run's."""
    resume = cfg["init_from"] == "resume"
    if resume:
        ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        old = ckpt.get("config") or {}
        if "vision" not in old:
            raise UserError(f"{cfg['out_dir']} is not a train_vision.py run: resume it with the script that made it")
        def trains(c):  # what a run trains on and with: a resume keeps it (the saved adapters and moments fit it)
            adapters = (c["lora_rank"], lora.parse_targets(c["lora_targets"]), c["lora_alpha"], c["lora_dropout"]) \
                if c.get("lora_rank") else 0  # (0: no LoRA, or a run from before it)
            return dict(dataset=c["dataset"], freeze=c["freeze"], lora=adapters)
        was, now = trains(old), trains(cfg)
        for key in was:
            if was[key] != now[key]:
                keys = ("lora_rank", "lora_targets", "lora_alpha", "lora_dropout") if was[key] else ("lora_rank",)
                said = ", ".join(f"{k}={old.get(k, 0)!r}" for k in (keys if key == "lora" else (key,)))
                raise UserError(f"{cfg['out_dir']} was trained with {said}; resume it with the same")
        vlm, _, _ = load_vision_model(cfg["out_dir"])
        check_same_tokenizer(ckpt["meta"], meta, cfg["out_dir"], cfg["dataset"])
        say(f"resuming from {cfg['out_dir']}/ckpt.pt at step {ckpt['step']}")
        set_trainable(vlm.gpt, cfg["freeze"])
        return vlm.gpt, old.get("base"), old["vision"], ckpt
    v, tower = vision_settings(cfg, meta, say)
    if cfg["init_from"] == "scratch":
        gpt = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=vocab_size_of(meta), n_layer=cfg["n_layer"],
                            n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"], bias=cfg["bias"]))
        base = None
    else:
        ours = os.path.isfile(os.path.join(cfg["init_from"], "ckpt.pt"))
        gpt, lm_meta = (load_model(out_dir=cfg["init_from"], dropout=cfg["dropout"]) if ours
                        else load_model(init_from=cfg["init_from"], dropout=cfg["dropout"]))
        check_same_tokenizer(lm_meta, meta, cfg["init_from"], cfg["dataset"])
        if cfg["block_size"] > gpt.config.block_size:
            raise UserError(f"block_size={cfg['block_size']} is larger than {cfg['init_from']}'s "
                            f"{gpt.config.block_size}")
        gpt.crop_block_size(cfg["block_size"])
        base = os.path.abspath(cfg["init_from"]) if os.path.isdir(cfg["init_from"]) else cfg["init_from"]
    if lora.has_lora(gpt):  # the LM is a LoRA run: start from its merged weights (as train.py does)
        lora.merge_lora(gpt)
    if cfg["lora_rank"]:
        lora.apply_lora(gpt, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                        targets=cfg["lora_targets"], verbose=False)
    attach_vision(gpt, v, tower=tower)
    set_trainable(gpt, cfg["freeze"])
    return gpt, base, v, None


def set_trainable(gpt, freeze):
    """What the run trains: the tower unless frozen, the projector always, the LM unless frozen
    (with LoRA: its adapters only). The rest gets no gradient and no optimizer state."""
    frozen, adapted = freeze.replace(" ", "").split(","), lora.has_lora(gpt)
    for name, p in gpt.named_parameters():
        part = "tower" if name.startswith("vision.") else "projector" if name.startswith("projector.") else "lm"
        is_adapter = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(part not in frozen and (part != "lm" or not adapted or is_adapter))


def lr_at(step, cfg):
    """train.py's schedule: a linear warmup to learning_rate, then a cosine to min_lr at lr_decay_iters."""
    end, warmup = cfg["lr_decay_iters"] or cfg["max_iters"], cfg["warmup_iters"]
    top, floor = cfg["learning_rate"], cfg["min_lr"]
    if step < warmup:
        return top * (step + 1) / warmup
    if not cfg["decay_lr"]:
        return top
    done = min(1.0, (step - warmup) / max(1, end - warmup))  # 0 -> 1 over the decay
    return floor + 0.5 * (1.0 + math.cos(math.pi * done)) * (top - floor)


def evaluate(cfg, model, loader, world, autocast, threads):
    """The mean val loss per answer token over eval_iters batches on every rank (the same each time).
    threads: the run's ThreadPicker (its first batches are timed at several thread counts)."""
    model.eval()
    loader.reset()
    totals = torch.zeros(2, device=world.device)  # loss summed over targets, targets
    with torch.no_grad():
        for _ in range(cfg["eval_iters"]):
            x, y, images = loader.next_batch_images()
            n = int((y != -1).sum())
            threads.start("val batch")
            with autocast:
                loss = model(x.to(world.device), y.to(world.device), images.to(world.device))
            threads.done()
            totals += torch.stack([loss.float() * n, torch.tensor(float(n), device=world.device)])
    model.train()
    if world.ddp:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def train(cfg, world):
    stop = StopFlag()  # from here on, Ctrl-C asks for a clean stop
    say = print if world.master else (lambda *a, **k: None)
    ptdtype = resolve_dtype(cfg["dtype"], world.device_type)
    resume = cfg["init_from"] == "resume"
    lock, log = claim_out_dir(cfg, resume, world)  # noqa: F841 (the lock is held while the run lives)
    data_dir = os.path.join("data", cfg["dataset"])
    meta = read_meta(data_dir)
    if meta.get("format") != "image-sft":
        raise UserError(f"data/{cfg['dataset']} is not an image-text dataset (its format is "
                        f"{meta.get('format', 'a token stream')!r}): prepare one with prepare_vision.py")
    if world.master:
        print_config(cfg)
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    gpt, base, v, ckpt = build(cfg, meta, world, say)
    n_img = image_tokens(v)
    text_T = gpt.config.block_size - n_img + 1  # the placeholder's one position becomes n_img
    if text_T < 2:
        raise UserError(f"block_size={gpt.config.block_size} leaves no room for text beside the image's {n_img} "
                        "tokens: raise --block_size")
    step_examples = cfg["total_batch_size"] or cfg["batch_size"] * world.size
    if step_examples % (cfg["batch_size"] * world.size):
        raise UserError(f"total_batch_size={step_examples} examples is not a multiple of batch_size x ranks = "
                        f"{cfg['batch_size'] * world.size}")
    grad_accum = step_examples // (cfg["batch_size"] * world.size)
    common = dict(rank=world.rank, world_size=world.size, vocab_size=meta["image_token"] + 1)
    train_loader = ImageSFTLoader(data_dir, "train", cfg["batch_size"], text_T, seed=cfg["seed"],
                                  grad_accum=grad_accum, **common)
    val_loader = ImageSFTLoader(data_dir, "val", cfg["batch_size"], text_T, shuffle=False, **common)
    say(f"device {world.device}, {world.size} rank(s), {step_examples} examples per step = {cfg['batch_size']} x "
        f"{world.size} ranks x {grad_accum} accumulation steps; {n_img} tokens per image, text up to {text_T - 1}")
    trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    count = lambda module: sum(p.numel() for p in module.parameters())
    say(f"parameters: LM {count(gpt) - count(gpt.vision) - count(gpt.projector):,}, tower {count(gpt.vision):,}, "
        f"projector {count(gpt.projector):,}; {trainable:,} trained")
    gpt.to(world.device)
    torch.manual_seed(cfg["seed"] + world.rank)  # then a stream per rank: different dropout masks
    optimizers = configure_optimizers(gpt, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                      world.device_type, verbose=False)
    scaler = torch.amp.GradScaler(world.device_type, enabled=(ptdtype == torch.float16))
    step, val_loss, best_val = (restore_run(ckpt, cfg["out_dir"], gpt, optimizers, scaler, train_loader, world, say)
                                if resume else (0, None, None))
    saved_threads = ckpt.get("threads", 0) if resume else 0  # the CPU threads the run had picked
    del ckpt
    run_cfg = dict(cfg, vision=v, base=base)  # what the checkpoint keeps: how to rebuild the model
    module = VisionLM(gpt.train(), meta["image_token"])
    model = ddp_wrap(module, world.device, world.device_type) if world.ddp else module
    autocast = autocast_context(world.device_type, ptdtype)
    params = [p for p in gpt.parameters() if p.requires_grad]
    decode, stop_token = get_tokenizer(meta)[1], answer_end(meta)
    questions = val_questions(data_dir, "val", cfg["eval_questions"]) if cfg["eval_questions"] else None

    threads = ThreadPicker(world.device_type, cfg["cpu_threads"], world.size, say, saved_threads)  # (train.py's)
    start_step = step
    clock = StepClock(start_step, world.device_type)
    while True:
        last = step >= cfg["max_iters"]
        stopping = stop_agreed(stop, world)
        due = cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step > start_step
        clock.pause()
        val_loss = None if step > start_step else val_loss  # a checkpoint holds the val loss of its own weights
        if evaluates_at(step, start_step, last, val_loss is not None, cfg) and not stopping:
            val_loss = evaluate(cfg, model, val_loader, world, autocast, threads)
            line = f"step {step}: val loss {val_loss:.4f}" + worse_than_best(val_loss, best_val)
            values = dict(val=val_loss)
            if questions and world.master:  # (answered on rank 0 only: no collective inside)
                with autocast:
                    acc = accuracy(module, *questions, stop_token, decode, world.device)
                    blank = accuracy(module, *questions, stop_token, decode, world.device, blank=True)
                values.update(val_acc=acc["all"], val_acc_blank=blank["all"])
                line += f", accuracy {acc['all']:.1%} (blank image: {blank['all']:.1%})"
            say(line, flush=True)
            log(step, **values)
        if (last or stopping or due) and step > start_step:
            best_val = save_run(run_cfg, step, val_loss, best_val, model=gpt, optimizers=optimizers, scaler=scaler,
                                loader=train_loader, meta=meta, base=base, world=world)
        if last or stopping:
            if stopping:
                say(f"stopped at step {step}; continue with --init_from=resume")
            break
        clock.resume()

        threads.start()
        lr = lr_at(step, cfg)
        for group in optimizers[0].param_groups:
            group["lr"] = lr
        batches, text_tokens = train_loader.next_step(world.device)
        loss_accum = torch.zeros((), device=world.device)
        for micro, (x, y, weight, images) in enumerate(batches):
            # DDP: gradients exchanged on the last micro-step only, as in train.py
            with model.no_sync() if world.ddp and micro < len(batches) - 1 else nullcontext():
                with autocast:
                    loss = model(x, y, images) * weight  # weight: this micro-batch's share of the step's answer tokens
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        scaler.unscale_(optimizers[0])  # clip the true gradients (fp16: not the scaled ones)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        scaler.step(optimizers[0])
        scaler.update()
        optimizers[0].zero_grad(set_to_none=True)
        step += 1
        threads.done()
        clock.count(text_tokens + step_examples * (n_img - 1))  # text and image tokens, the LM's positions
        if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
            if world.ddp:
                dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # the loss of the whole global batch
            loss_val = loss_accum.item()
            if loss_val != loss_val or abs(loss_val) == float("inf"):
                raise nonfinite(cfg["out_dir"], step - 1)
            timing, _ = clock.lap()
            values = dict(train=loss_val, lr=lr, norm=norm.item(), **timing, epoch=train_loader.epoch)
            log(step - 1, **values)
            left = clock.left(step, cfg["max_iters"])
            say(console_line(step - 1, cfg["max_iters"], dict(values, compiled=False), left), flush=True)
    say(f"done in {format_time(time.time() - clock.run_start)}")


# -----------------------------------------------------------------------------
# --plan: the run on paper

# towers whose shapes --plan knows without a download (transformers' defaults are these models')
KNOWN_TOWERS = {"google/siglip-base-patch16-224": ("siglip", {}),
                "openai/clip-vit-base-patch16": ("clip", dict(patch_size=16))}


def plan_tower(cfg):
    """(the tower on the meta device, its side in pixels, its patch side)."""
    try:
        from transformers import AutoConfig, CLIPVisionConfig, SiglipVisionConfig
    except ImportError:
        die("--plan with a pretrained --tower needs transformers: pip install transformers")
    if cfg["tower"] in KNOWN_TOWERS and not os.path.isdir(cfg["tower"]):
        kind, args = KNOWN_TOWERS[cfg["tower"]]
        config = (SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig)(**args)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg["tower"], local_files_only=os.path.isdir(cfg["tower"]))
        except Exception as e:
            die(f"--plan: cannot read the config of --tower={cfg['tower']} ({type(e).__name__}); give a local folder")
        config = getattr(config, "vision_config", config)
    from vision import hf_tower_from_config
    with torch.device("meta"):
        tower = hf_tower_from_config(json.loads(config.to_json_string()))
    return tower, config.image_size, config.patch_size


def print_plan(cfg):
    """The parts of the model, what trains, the tokens and FLOPs of a step and the memory of the
    weights, gradients and AdamW moments (fp32), for one rank (DDP: each holds them all)."""
    from plan import ASSUMED_GPU, ASSUMED_MFU, plan_meta, plan_model
    meta, _ = plan_meta(cfg)
    frozen = cfg["freeze"].replace(" ", "").split(",") + (["lm"] if cfg["lora_rank"] else [])
    gpt = plan_model(dict(cfg, lora_rank=0), meta)  # the LM on the meta device (without adapters)
    if cfg["tower"]:
        tower, side, patch = plan_tower(cfg)
        width = tower.model.config.hidden_size
    else:
        side, patch, width = meta.get("image_size", [32])[0], cfg["patch_size"], cfg["vit_embd"]
        with torch.device("meta"):
            tower = ViT(GPTConfig(n_layer=cfg["vit_layers"], n_head=cfg["vit_heads"], n_embd=width), side, patch)
    n_patches = (side // patch) ** 2
    n_img = n_patches // cfg["shuffle"] ** 2
    parts = dict(LM=gpt.num_params(), tower=sum(p.numel() for p in tower.parameters()),
                 projector=width * cfg["shuffle"] ** 2 * gpt.config.n_embd)
    if cfg["lora_rank"]:  # the adapters, beside the frozen LM
        parts["LoRA"] = plan_model(cfg, meta).num_params() - parts["LM"]
    trains = {k: k.lower() not in frozen for k in parts}  # (LoRA: "lora" is never frozen)
    world = int(os.environ.get("WORLD_SIZE", 1))
    examples = cfg["total_batch_size"] or cfg["batch_size"] * world
    positions = examples * cfg["block_size"]  # at most: text and image tokens, every example padded to block_size
    lm_flops = (6 if trains["LM"] else 4) * gpt.num_params(non_embedding=True) + 12 * gpt.config.n_layer * \
        gpt.config.n_embd * cfg["block_size"]  # frozen: no weight gradients, but the projector's pass through
    flops = positions * lm_flops + examples * n_patches * (6 if trains["tower"] else 2) * parts["tower"] + \
        examples * n_img * 6 * parts["projector"] + positions * 6 * parts.get("LoRA", 0)
    trained = sum(n for k, n in parts.items() if trains[k])
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    print("plan: " + ", ".join(f"{k} {n / 1e6:,.2f}M ({'trained' if trains[k] else 'frozen'})"
                               for k, n in parts.items()))
    print(f"an image: {side}x{side} pixels, {n_patches} patches of {patch}x{patch} -> {n_img} LM tokens "
          f"(pixel shuffle {cfg['shuffle']}x{cfg['shuffle']}); text up to {cfg['block_size'] - n_img} tokens")
    print(f"a step: {examples} examples, at most {positions:,} LM positions, {flops / 1e12:,.2f} TFLOPs")
    print(f"memory per rank: weights {gib(4 * sum(parts.values()))}, gradients {gib(4 * trained)}, AdamW "
          f"{gib(8 * trained)} (fp32; activations come on top)")
    ms = 1000 * flops / (ASSUMED_GPU[1] * ASSUMED_MFU * world)
    print(f"time per step on an {ASSUMED_GPU[0]} at {ASSUMED_MFU:.0%} MFU: {ms:,.1f} ms")


def main():
    cfg = configure(DEFAULTS)
    check_settings(cfg)
    if cfg["plan"]:
        return print_plan(cfg)
    world = setup_world(cfg["device"], timeout_s=cfg["pg_timeout"])
    try:
        train(cfg, world)
    except UserError as e:
        die(str(e))
    except Exception as e:
        if world.ddp:  # one rank's failure must end every rank, never hang them
            rank_failed(world, e, cfg["pg_timeout"])
        raise
    finally:
        close_world(world)


if __name__ == "__main__":
    main()
