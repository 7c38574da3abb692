"""
Checkpoints: writing them safely and loading a model from one.

out_dir/ckpt.pt is a plain dict that torch.load(path, weights_only=True) can read (tensors,
numbers, strings, lists, dicts: no pickled classes, so loading a file cannot run code):

    model        the model's state dict, without torch.compile's "_orig_mod." or DDP's
                 "module." prefixes (absent in a LoRA run)
    model_args   the GPTConfig fields, to rebuild the model
    lora         LoRA runs only: the adapter tensors and settings (lora.lora_state_dict)
    base         LoRA runs only: where the frozen base weights come from (init_from of the
                 run: "gpt2"..., or the absolute path of another run's out_dir or
                 of a Hugging Face folder, so any working directory finds it)
    optimizer    the optimizer's state dict          scaler  the fp16 GradScaler's, or None
    step         optimizer steps done                config  the run's settings
    meta         the tokenizer (a dataset's meta.json)
    loader       the training loader's position     rng     the RNG states
    val_loss     the last validation loss, or None
"""

import glob
import os

import torch

from dataloader import DataError
from model import GPT, OPENAI_MODELS, GPTConfig


def save_checkpoint(ckpt, path):
    """Write atomically: to a temp file in the same folder, then os.replace. A crash or a
    Ctrl-C during the write leaves the previous checkpoint as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise DataError(f"{path} could not be read ({type(e).__name__}); it is not a checkpoint of this project, "
                           "or it is corrupt") from None


def clean_state_dict(state_dict):
    """Strip the prefixes that torch.compile (_orig_mod.) and DDP (module.) add to names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def newest_checkpoint(pattern="out*/ckpt.pt"):
    """The most recently written checkpoint matching pattern, or None."""
    found = glob.glob(pattern)
    return max(found, key=os.path.getmtime) if found else None


def load_model(out_dir=None, init_from=None, device="cpu", dropout=0.0):
    """Return (model, meta): from out_dir/ckpt.pt of a run of ours (a
    LoRA run's base is loaded and its adapter applied), or OpenAI's weights when init_from is
    a GPT-2 name or a local Hugging Face folder. meta names the tokenizer."""
    if out_dir is not None:
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        meta = ckpt.get("meta") or {"tokenizer": "gpt2"}
        if "lora" in ckpt:
            import lora
            # the base: OpenAI's weights by name, or another run's checkpoint
            base = ckpt["base"]
            if not os.path.exists(base) and base not in OPENAI_MODELS:
                raise DataError(f"{out_dir} is a LoRA run whose base {base} is not there: the adapters "
                                f"need those weights, so put the base run back at that path")
            if os.path.isfile(os.path.join(base, "ckpt.pt")):
                model, _ = load_model(out_dir=base, dropout=dropout)
            else:
                model, _ = load_model(init_from=base, dropout=dropout)
            if lora.has_lora(model):  # the base is itself a LoRA run: fold its adapters in first
                lora.merge_lora(model)
            block_size = ckpt.get("model_args", {}).get("block_size", model.config.block_size)
            if block_size < model.config.block_size:  # the run cropped GPT-2's context
                model.crop_block_size(block_size)
            lora.load_lora(model, ckpt["lora"])
        else:
            args = dict(ckpt["model_args"], dropout=dropout)
            model = GPT(GPTConfig(**args))
            model.load_state_dict(clean_state_dict(ckpt["model"]))
    else:
        try:
            model = GPT.from_pretrained(init_from, {"dropout": dropout})
        except (OSError, ValueError, ImportError) as e:  # offline, unknown name, odd config
            raise DataError(str(e)) from None
        meta = {"tokenizer": "gpt2"}
    return model.to(device), meta
