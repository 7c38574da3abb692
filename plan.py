"""
Whether a training run can work, decided before it starts: train.py's settings checked
against each other, the launcher and this PyTorch, and a run sized for a GPU stopped up front
where none was found. Everything here is one line and exit code 2 when it fails (die), so a
setting that cannot work never becomes a traceback minutes into a run.
"""

import os

import torch

import lora
from configurator import die
from dataloader import read_meta


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
