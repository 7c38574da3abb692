"""
Whether a training run can work, decided before it starts: train.py's settings checked
against each other, the launcher and this PyTorch, and a run sized for a GPU stopped up front
where none was found. Everything here is one line and exit code 2 when it fails (die), so a
setting that cannot work never becomes a traceback minutes into a run.
"""

import json
import os
import warnings
from dataclasses import fields

import torch

import lora
from configurator import UserError, die
from dataloader import read_meta, vocab_size_of
from hf_weights import HF_CLASSES, gpt2_config, llama_config
from model import GPT, PRESETS, GPTConfig, flops_per_token
from runtime import format_time


def check_settings(cfg, under_torchrun):
    """Settings that parse but cannot work: one line now, not a traceback minutes later.
    under_torchrun: the run has ranks (RANK set, or a plan for more than one GPU)."""
    for key in ("batch_size", "block_size", "log_interval", "eval_iters", "n_layer", "n_head"):
        if cfg[key] < 1:
            die(f"--{key} must be at least 1, got {cfg[key]}")
    for key in ("max_iters", "total_batch_size", "eval_interval", "checkpoint_interval", "keep_interval",
                "warmup_iters", "hellaswag_interval", "hellaswag_limit", "lora_rank", "learning_rate", "min_lr",
                "weight_decay", "grad_clip", "seed", "cpu_threads"):
        if cfg[key] < 0:  # max_iters=0: evaluate the starting model and stop
            die(f"--{key} must not be negative, got {cfg[key]}")
    if not (0 <= cfg["beta1"] < 1 and 0 <= cfg["beta2"] < 1):  # AdamW's moving averages: 1 would never move
        die(f"--beta1 and --beta2 must be in [0, 1), got {cfg['beta1']} and {cfg['beta2']}")
    if not 0 <= cfg["dropout"] < 1 or not 0 <= cfg["lora_dropout"] < 1:
        die(f"dropout must be in [0, 1), got dropout={cfg['dropout']}, lora_dropout={cfg['lora_dropout']}")
    if cfg["n_embd"] % cfg["n_head"] != 0:
        die(f"n_embd={cfg['n_embd']} must be a multiple of n_head={cfg['n_head']} (each head gets n_embd / n_head)")
    if cfg["rope"] and (cfg["n_embd"] // cfg["n_head"]) % 2:
        die(f"rope=True needs an even head size, got n_embd/n_head = {cfg['n_embd'] // cfg['n_head']}")
    if cfg["lora_rank"] > 0:
        if cfg["init_from"] == "scratch":
            die("LoRA adapts a trained model: set init_from to gpt2* or another run's out_dir")
        try:
            lora.parse_targets(cfg["lora_targets"])
        except ValueError as e:
            die(str(e))
    if cfg["mlp"] not in ("gelu", "relu2", "swiglu"):
        die(f"--mlp must be gelu, relu2 or swiglu, got {cfg['mlp']!r}")
    if cfg["norm"] not in ("layernorm", "rmsnorm"):
        die(f"--norm must be layernorm or rmsnorm, got {cfg['norm']!r}")
    if cfg["mlp_hidden"] < 0 or cfg["n_kv_head"] < 0 or cfg["rope_theta"] <= 0:
        die(f"--mlp_hidden and --n_kv_head must not be negative (0 = the GPT-2 default) and --rope_theta must be "
            f"positive, got {cfg['mlp_hidden']}, {cfg['n_kv_head']} and {cfg['rope_theta']}")
    if cfg["n_kv_head"] and cfg["n_head"] % cfg["n_kv_head"]:
        die(f"n_head={cfg['n_head']} must be a multiple of n_kv_head={cfg['n_kv_head']} (each key/value head serves "
            "n_head / n_kv_head query heads)")
    if cfg["optimizer"] not in ("adamw", "muon"):
        die(f"--optimizer must be adamw or muon, got {cfg['optimizer']!r}")
    if cfg["optimizer"] == "muon":
        if cfg["lora_rank"] > 0:  # the adapters are thin (r x C) matrices: AdamW's job
            die("LoRA runs train with AdamW: drop --optimizer=muon (or set lora_rank=0 to train every weight)")
        for key in ("muon_lr", "muon_momentum", "muon_weight_decay"):
            if cfg[key] < 0:
                die(f"--{key} must not be negative, got {cfg[key]}")
        if cfg["muon_momentum"] >= 1:  # a momentum of 1 or more never forgets: the update grows without end
            die(f"--muon_momentum must be below 1 (0.95 is usual), got {cfg['muon_momentum']}")
    if cfg["fsdp"]:  # FSDP shards over the ranks torchrun starts; alone it would only hide a missing launcher
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401 (FSDP2: PyTorch 2.6 and later)
        except ImportError:
            die(f"fsdp=True needs FSDP2 (torch.distributed.fsdp.fully_shard), in PyTorch 2.6 and later (this is "
                f"{torch.__version__}): pip install -U 'torch>=2.6', or drop --fsdp")
        if not under_torchrun:
            die("fsdp=True shards the model over the processes torchrun starts: run it under torchrun "
                "(torchrun --standalone --nproc_per_node=N train.py ...), or drop --fsdp")
        if cfg["dtype"] == "float16":  # GradScaler's overflow check would see one shard per rank
            die("fsdp=True trains in bfloat16 or float32, not float16: set --dtype=bfloat16 (Ampere and newer) or float32")
        if cfg["lora_rank"] > 0:
            die("LoRA trains a few MB of adapters: it needs no sharding; drop --fsdp (DDP) for lora_rank > 0")
    elif cfg.get("fsdp_full_grads") or cfg.get("fsdp_reshard") is False:
        die("fsdp_full_grads and fsdp_reshard are FSDP's settings: add --fsdp, or drop them")


def setting_notes(cfg, world_size, device_type):
    """Settings that work but may not do what was meant: one line each, printed at start."""
    notes = []
    if cfg["decay_lr"] and cfg["lr_decay_iters"] > cfg["max_iters"] > 0:
        notes.append(f"lr_decay_iters={cfg['lr_decay_iters']} is past max_iters={cfg['max_iters']}: the learning rate "
                     "ends above min_lr; --lr_decay_iters=0 decays over max_iters")
    if cfg["total_batch_size"] == 0 and world_size > 1:
        notes.append(f"total_batch_size=0 means one micro-batch per rank: {world_size} ranks train on {world_size}x "
                     "the batch of one process; set total_batch_size to train alike on any number")
    return notes


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


# -----------------------------------------------------------------------------
# the batch arithmetic, shared by the real run and the plan


def batch_layout(cfg, sft, world_size):
    """(total, grad_accum, a line describing the step). total counts tokens, or examples for
    SFT data; one micro-step is batch_size sequences (examples) on each of world_size ranks."""
    B, T = cfg["batch_size"], cfg["block_size"]
    per_micro = B * world_size * (1 if sft else T)  # examples or tokens per micro-step, all ranks
    total = cfg["total_batch_size"] or per_micro
    if total % per_micro != 0:
        die(f"total_batch_size={total:,} is not a multiple of batch_size*{'' if sft else 'block_size*'}ranks "
            f"= {per_micro:,}{' (examples: this is SFT data)' if sft else ''}; change one of them")
    grad_accum = total // per_micro
    if sft:
        layout = (f"{total:,} examples per step = {B} x {world_size} ranks x {grad_accum} accumulation steps, "
                  f"each micro-batch padded to its longest example (at most {T} tokens)")
    else:
        layout = f"{total:,} tokens per step = {B} x {T} x {world_size} ranks x {grad_accum} accumulation steps"
    return total, grad_accum, layout


def model_config(cfg, vocab_size):
    """The GPTConfig of a new model: the settings of the same names (n_layer, rope, ...)."""
    return GPTConfig(vocab_size=vocab_size, **{f.name: cfg[f.name] for f in fields(GPTConfig)
                                               if f.name in cfg and f.name != "vocab_size"})


# -----------------------------------------------------------------------------
# --plan: the run on paper, before any data, GPU or download is at hand

# the datasets the prepare scripts write, for a plan on a machine that has not prepared them
KNOWN_DATA = {"shakespeare_char": dict(tokenizer="char", chars=[""] * 65),  # Tiny Shakespeare's 65 characters
              "alpaca": dict(tokenizer="gpt2", format="sft"),
              "alpaca_smollm2": dict(tokenizer="hf", format="sft", vocab_size=49152)}  # anything else: GPT-2 BPE tokens
# Llama-family Hub models whose shapes --plan and bench.py know without a download (their
# config.json's numbers; from_pretrained reads the real file)
HUB_SHAPES = {
    "HuggingFaceTB/SmolLM2-135M": dict(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3,
                                       n_embd=576, mlp="swiglu", mlp_hidden=1536, norm="rmsnorm", norm_eps=1e-5,
                                       rope=True, rope_theta=100000.0, bias=False, tie_embeddings=True),
}
ASSUMED_WRITE = 1e9  # bytes/s a checkpoint is written at (a shared file system; local NVMe is faster)
ASSUMED_MFU = 0.45  # the README's recipe times assume it too: well-tuned GPT-2 runs on H100s report ~40-55%
ASSUMED_GPU = ("H100 SXM", 989.5e12)  # when --peak_flops is not given: its dense bf16 peak


def plan_meta(cfg):
    """meta.json of the dataset if it is prepared here, else what its prepare script writes."""
    data_dir = os.path.join("data", cfg["dataset"])
    if os.path.isfile(os.path.join(data_dir, "meta.json")):
        return read_meta(data_dir), "prepared"
    return KNOWN_DATA.get(cfg["dataset"], dict(tokenizer="gpt2")), "not prepared here"


def plan_model(cfg, meta):
    """The run's model on the meta device (shapes, no memory): a new one, a GPT-2 preset, or
    the shape recorded in a run's checkpoint or a Hugging Face folder's config.json."""
    init_from = cfg["init_from"]
    folder = cfg["out_dir"] if init_from == "resume" else init_from
    if init_from == "scratch":
        config = model_config(cfg, vocab_size_of(meta))
    elif init_from in PRESETS:
        config = GPTConfig(block_size=1024, vocab_size=50257, **PRESETS[init_from])
    elif init_from in HUB_SHAPES and not os.path.isdir(init_from):
        config = GPTConfig(**HUB_SHAPES[init_from])
    elif os.path.isfile(os.path.join(folder, "ckpt.pt")):
        try:
            config = GPTConfig(**torch.load(os.path.join(folder, "ckpt.pt"), map_location="meta", mmap=True,
                                            weights_only=True)["model_args"])
        except Exception as e:  # not a checkpoint (random bytes, a bare tensor), or one without model_args
            die(f"--plan: {folder}/ckpt.pt is not a checkpoint of this project ({type(e).__name__}: {str(e)[:100]})")
    elif os.path.isfile(os.path.join(folder, "config.json")):  # a Hugging Face folder: GPT-2 or a Llama
        try:
            with open(os.path.join(folder, "config.json")) as f:
                hc = json.load(f)
            if not isinstance(hc, dict):
                raise ValueError(f"config.json holds a {type(hc).__name__}, not a model's settings")
            if hc.get("model_type") not in HF_CLASSES:  # what GPT.from_pretrained refuses, refused here too
                raise ValueError(f"model_type {hc.get('model_type')!r}: only gpt2 and llama models load here")
            config = GPTConfig(**(llama_config if hc.get("model_type") == "llama" else gpt2_config)(hc, folder))
        except (ValueError, KeyError) as e:
            die(f"--plan: {folder}/config.json does not fit this GPT: {e}")
    else:
        die(f"--plan: init_from={init_from!r} has no model here to size (no {folder}/ckpt.pt or config.json); "
            "plan with init_from=scratch or a GPT-2 name")
    if cfg["block_size"] > config.block_size:
        die(f"block_size={cfg['block_size']} is larger than {init_from}'s {config.block_size}")
    config.block_size = cfg["block_size"]  # a fine-tuning run crops the position table
    with torch.device("meta"):
        model = GPT(config)
        if cfg["lora_rank"] > 0:
            lora.apply_lora(model, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                            targets=cfg["lora_targets"], verbose=False)
    return model


def saved_bytes(model, B, T, dtype, sharded):
    """What autograd keeps for the backward pass of one forward at micro-batch (B, T), in
    bytes, measured with saved-tensor hooks on the CPU (storages counted once; the weights
    themselves and autocast's 16-bit weight copies left out: they are counted apart).
    sharded: FSDP's 16-bit gathered weights, under which the residual stream is 16-bit too."""
    from torch.utils._python_dispatch import TorchDispatchMode
    if sharded:
        model = model.to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies, seen = set(), {}

    class WeightCasts(TorchDispatchMode):  # notes the storage of every cast of a weight
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in weights:
                copies.add(out.untyped_storage().data_ptr())
            return out

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, model.config.vocab_size, (B, T))
    with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), WeightCasts():
        warnings.simplefilter("ignore")  # CPU autocast's rms_norm dtype notice
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, x)  # (kept: the saved tensors stay alive until counted)
    return sum(n for ptr, n in seen.items() if ptr not in weights and ptr not in copies)


def activation_bytes(config, B, T, dtype, sharded):
    """Activation memory of one micro-batch: (per block, after the blocks: ln_f, logits, loss).
    Measured on two small CPU models of the same options (1 and 2 blocks, width 64, vocab
    256), whose saved bytes grow as B*T*n_embd per block and B*T*vocab for the loss, and
    scaled to this shape. Activations are all the same kind of tensor at any size, so the
    per-token, per-channel bytes carry over (tests/test_plan.py checks this on a bigger model)."""
    small = dict(vars(config), block_size=128, vocab_size=256, n_embd=64, n_head=4, dropout=0.0)
    if config.mlp_hidden:  # the MLP's width and the kv heads in the same proportion as the model's
        small["mlp_hidden"] = max(1, round(config.mlp_hidden * 64 / config.n_embd))
    if config.n_kv_head:
        small["n_kv_head"] = next(k for k in (4, 2, 1) if k <= 4 * config.n_kv_head // config.n_head or k == 1)
    torch.manual_seed(0)
    one, two = (saved_bytes(GPT(GPTConfig(**dict(small, n_layer=n))), 8, 128, dtype, sharded) for n in (1, 2))
    per_block = (two - one) / (8 * 128 * 64)  # bytes per token and channel, per block
    head = (one - (two - one)) / (8 * 128 * 256)  # bytes per token and vocab entry (ln_f's few are in it)
    return per_block * B * T * config.n_embd, head * B * T * config.vocab_size


def memory_per_gpu(model, cfg, world_size, fsdp, dtype):
    """The per-GPU memory of the training step at its peak (the backward pass of a micro-batch),
    {part: bytes}. A formula: 4 bytes per fp32 weight and gradient, AdamW's two moments 8
    (Muon's momentum 4), the activations measured (activation_bytes). Left out: the CUDA
    context (~0.5 GB), the allocator's slack, NCCL's buffers and compile's workspace."""
    N = world_size if fsdp else 1  # FSDP divides the fp32 state over the ranks
    P = sum(p.numel() for p in model.parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = sum(p.numel() for n, p in trained if cfg["optimizer"] == "muon" and ".h." in n and p.dim() == 2)
    adam = sum(p.numel() for _, p in trained) - muon
    half = dtype.itemsize  # 2 under bf16/fp16 autocast, 4 in fp32
    per_block, head = activation_bytes(model.config, cfg["batch_size"], cfg["block_size"], dtype, fsdp)
    full_grads = fsdp and cfg.get("fsdp_full_grads")  # FSDP holding whole gradients through accumulation
    mem = {"weights (fp32)": 4 * P / N, "gradients (fp32)": 4 * (muon + adam) / (1 if full_grads else N),
           "optimizer state": (8 * adam + 4 * muon) / N}
    if fsdp:
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        root = P - block * model.config.n_layer
        # the root's weights (wte, wpe, ln_f) stay gathered through forward and backward; two
        # blocks at a time are gathered (one computing, the next prefetched), each with its
        # unsharded 16-bit gradient and the fp32 copy reduce-scattered. fsdp_reshard=False: every
        # block stays gathered from its forward to its backward
        gathered = block * (model.config.n_layer if cfg.get("fsdp_reshard") is False else 2)
        mem["gathered weights"] = half * (root + gathered)
        mem["unsharded gradients"] = (half + 4) * 2 * block
    elif half == 2:
        mem["16-bit weight copies"] = 2 * P  # autocast casts each weight once per forward and keeps it for backward
    mem["activations"] = per_block * model.config.n_layer + head
    mem["loss gradient"] = (4 + half) * cfg["batch_size"] * cfg["block_size"] * model.config.vocab_size  # fp32, then 16-bit
    return mem


def checkpoint_bytes(model, cfg):
    """About the size of ckpt.pt: fp32 weights (a LoRA run: its adapters only) and the optimizer's
    state for the trained ones (AdamW: two moments; Muon: one momentum for the blocks' matrices)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = trained if cfg["lora_rank"] > 0 else model.num_params()
    return 4 * weights + (4 if cfg["optimizer"] == "muon" else 8) * trained


def checkpoint_count(cfg):
    """How many checkpoints a run to max_iters writes: every checkpoint_interval steps and at the
    end; a kept copy (keep_interval) or ckpt_best.pt is a copy, not counted."""
    interval = cfg["checkpoint_interval"]
    return (cfg["max_iters"] - 1) // interval + 1 if interval else 1


def print_plan(cfg):
    """python train.py CONFIG --plan: check every setting for the world size asked, then print
    the model's size, the step, the per-GPU memory and the time to max_iters. Reads no data,
    needs no GPU, writes nothing."""
    if cfg["plan_world"] < 0:
        die(f"--plan_world is the number of GPUs to plan for (0: torchrun's, else 1), got {cfg['plan_world']}")
    world_size = cfg["plan_world"] or int(os.environ.get("WORLD_SIZE", 1))
    check_settings(cfg, under_torchrun=world_size > 1 or "RANK" in os.environ)
    try:
        meta, data_note = plan_meta(cfg)
    except UserError as e:  # a broken meta.json
        die(str(e))
    if cfg["hellaswag_interval"] and meta["tokenizer"] != "gpt2":
        die("HellaSwag needs a GPT-2 BPE model; set hellaswag_interval=0 for char-level data")
    sft = meta.get("format") == "sft"
    total, grad_accum, layout = batch_layout(cfg, sft, world_size)
    model = plan_model(cfg, meta)
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(cfg["dtype"], torch.bfloat16)  # auto: bf16 on the GPUs planned for
    mode = "FSDP" if cfg["fsdp"] else ("DDP" if world_size > 1 else "one GPU")
    tokens = total * (cfg["block_size"] if sft else 1)  # SFT: at most, every example a full block
    flops = flops_per_token(model, cfg["block_size"])
    peak, gpu = (cfg["peak_flops"], "--peak_flops") if cfg["peak_flops"] else (ASSUMED_GPU[1], ASSUMED_GPU[0])
    seconds = flops * tokens * cfg["max_iters"] / (world_size * peak * ASSUMED_MFU)
    def size(n):  # GiB, as GPU memory is quoted; small runs in MiB
        return f"{n / 2 ** 30:8.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:8.1f} MiB"
    print(f"plan: {cfg['init_from']} model, data/{cfg['dataset']} ({meta['tokenizer']}"
          f"{', instruction examples' if sft else ''}; {data_note}), {world_size} GPU(s), {mode}, {dtype}".replace("torch.", ""))
    print(f"  parameters       {model.num_params() / 1e6:,.2f}M ({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:,.2f}M trained)")
    print(f"  FLOPs per token  {flops / 1e9:,.3f} GFLOP (forward + backward, PaLM's 6N + 12LCT)")
    print(f"  step             {layout}")
    print(f"  max_iters        {cfg['max_iters']:,} steps, {tokens * cfg['max_iters'] / 1e9:,.3f}B tokens{' at most' if sft else ''}")
    mem = memory_per_gpu(model, cfg, world_size, cfg["fsdp"], dtype)
    print(f"  memory per GPU   {size(sum(mem.values())).strip()} at the peak of a step (estimate: plan.memory_per_gpu), of it:")
    for part, n in mem.items():
        print(f"    {part:<20} {size(n)}")
    print("    (not counted: the CUDA context ~0.5 GB, allocator slack, NCCL buffers; compile usually saves activations)")
    print(f"  time             {format_time(seconds)} to max_iters at {ASSUMED_MFU:.0%} MFU of a {gpu} "
          f"({peak / 1e12:,.1f} TFLOP/s per GPU, assumed)")
    ckpt, saves = checkpoint_bytes(model, cfg), checkpoint_count(cfg)
    print(f"  checkpoints      {saves:,} saves of {ckpt / 1e9:,.2f} GB: {format_time(saves * ckpt / ASSUMED_WRITE)} more at "
          f"{ASSUMED_WRITE / 1e9:.0f} GB/s (assumed; train.py logs each save's time as save_s)")
    print("  nothing was run or written; drop --plan to train")
