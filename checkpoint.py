"""
Checkpoints: the format in one place, written safely, and a model loaded from any run.

    python checkpoint.py --out_dir=RUN --merged_dir=DIR   # a LoRA run as an ordinary checkpoint

out_dir/ckpt.pt is a plain dict that torch.load(path, weights_only=True) reads (tensors,
numbers, strings, lists, dicts: no pickled classes, so loading a file cannot run code):

    model        the model's state dict, without torch.compile's "_orig_mod." or DDP's
                 "module." prefixes (absent in a LoRA run)
    model_args   the GPTConfig fields, to rebuild the model
    lora         LoRA runs only: the adapter tensors and settings (lora.lora_state_dict)
    base         LoRA runs only: where the frozen base weights come from ("gpt2"..., or the
                 absolute path of another run's out_dir or of a Hugging Face folder)
    meta         the tokenizer (the dataset's meta.json)
    config       the run's settings                  step      optimizer steps done
    optimizer    the optimizers' full state (AdamW's, and Muon's with optimizer=muon) in one
                 dict keyed by parameter name, so FSDP and DDP runs resume each other
    scaler       the fp16 GradScaler's, or None
    loader       the training loader's position      rng       every rank's RNG states
    val_loss     the last validation loss, or None
Optimizer, scaler, loader, rng and val_loss make the training state that --init_from=resume
continues exactly; a merged checkpoint (python checkpoint.py --merged_dir) has none of them, and
names its LoRA run in merged_from.
"""

import glob
import os

from configurator import UserError, atomic_write, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch

import lora
from model import GPT, OPENAI_MODELS, GPTConfig, unwrap


def make_checkpoint(model, meta, config, state_dict=None, **training_state):
    """The checkpoint dict of `model` (bare or wrapped): its weights, or a LoRA run's
    adapters only, plus whatever training state is given (step, optimizer, ..., base).
    state_dict: the full weights when the model cannot give them itself (an FSDP model holds
    shards; train.py gathers them)."""
    model = unwrap(model)
    ckpt = {"model_args": vars(model.config).copy(), "meta": meta, "config": config, **training_state}
    if lora.has_lora(model):
        ckpt["lora"] = lora.lora_state_dict(model)  # small: the base is named by ckpt["base"]
    else:
        ckpt["model"] = model.state_dict() if state_dict is None else state_dict
    return ckpt


def save_checkpoint(ckpt, path):
    """Write atomically: a crash or a Ctrl-C during the write leaves the previous file as it was."""
    with atomic_write(path) as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos ..." or "write failed"
            raise OSError(f"torch.save failed: {e}") from None


def load_checkpoint(path):
    """The checkpoint dict at path, loaded with weights_only=True and checked to be one of
    ours; any problem is a UserError naming the file. Memory-mapped: a tensor is read from
    disk when it is used, and the ranks of a node share one copy in the page cache."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} could not be read ({type(e).__name__}); it is not a checkpoint of this project, "
                        "or it is corrupt") from None
    if not isinstance(ckpt, dict) or not {"model_args", "meta"} <= ckpt.keys() or not ({"model", "lora"} & ckpt.keys()):
        raise UserError(f"{path} is not a checkpoint of this project (it needs model_args, meta and model or lora)")
    return ckpt


def newest_checkpoint(pattern="out*/ckpt.pt"):
    """The most recently written checkpoint matching pattern, or None."""
    found = glob.glob(pattern)
    return max(found, key=os.path.getmtime) if found else None


def load_model(out_dir=None, init_from=None, device="cpu", dropout=0.0):
    """Return (model, meta): from out_dir/ckpt.pt of a run of ours (a LoRA run's base is
    loaded and its adapters applied), or OpenAI's weights when init_from is a GPT-2 name or a
    local Hugging Face folder. meta names the tokenizer."""
    if out_dir is None:
        try:
            model = GPT.from_pretrained(init_from, {"dropout": dropout})
        except (OSError, ValueError, ImportError) as e:  # offline, unknown name, odd config
            raise UserError(str(e)) from None
        return model.to(device), {"tokenizer": "gpt2"}
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    try:
        if "lora" in ckpt:
            base = ckpt["base"]  # OpenAI's weights by name, or another run's checkpoint
            if not os.path.exists(base) and base not in OPENAI_MODELS:
                raise UserError(f"{out_dir} is a LoRA run whose base {base} is not there: the adapters "
                                "need those weights, so put the base run back at that path")
            from_run = os.path.isfile(os.path.join(base, "ckpt.pt"))
            model, _ = load_model(out_dir=base, dropout=dropout) if from_run else load_model(init_from=base, dropout=dropout)
            if lora.has_lora(model):  # the base is itself a LoRA run: fold its adapters in first
                lora.merge_lora(model)
            if ckpt["model_args"]["block_size"] < model.config.block_size:  # the run cropped GPT-2's context
                model.crop_block_size(ckpt["model_args"]["block_size"])
            lora.load_lora(model, ckpt["lora"])
        else:
            model = GPT(GPTConfig(**dict(ckpt["model_args"], dropout=dropout)))
            model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as e:  # wrong args, shapes, names
        raise UserError(f"{path} does not fit this project's GPT ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return model.to(device), ckpt["meta"]


# -----------------------------------------------------------------------------
# python checkpoint.py --out_dir=RUN --merged_dir=DIR

DEFAULTS = dict(
    out_dir="",  # the LoRA run to merge
    merged_dir="",  # where to write the merged ckpt.pt
)


def main():
    """Fold a LoRA run's adapters into its base and write DIR/ckpt.pt as any other run's: a
    full model that sample.py, hellaswag.py, export_hf.py and init_from=DIR read with no LoRA
    involved (not a resumable training state: it has no optimizer)."""
    cfg = configure(DEFAULTS)
    print_config(cfg)
    if not cfg["out_dir"] or not cfg["merged_dir"]:
        die("give both --out_dir=LORA_RUN and --merged_dir=WHERE_TO_WRITE")
    if os.path.exists(cfg["merged_dir"]) and not os.path.isdir(cfg["merged_dir"]):
        die(f"--merged_dir={cfg['merged_dir']} is a file; give a folder")
    try:
        ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        if "lora" not in ckpt:
            die(f"{cfg['out_dir']} is not a LoRA run: its ckpt.pt already holds the whole model")
        model, meta = load_model(out_dir=cfg["out_dir"])
    except UserError as e:
        die(str(e))
    lora.merge_lora(model)
    path = os.path.join(cfg["merged_dir"], "ckpt.pt")
    try:
        save_checkpoint(make_checkpoint(model, meta, ckpt["config"], step=ckpt["step"], merged_from=cfg["out_dir"]), path)
    except UserError as e:  # a full disk, a read-only folder
        die(str(e))
    print(f"wrote {path}: {cfg['out_dir']}'s adapters merged into its base {ckpt['base']!r}")


if __name__ == "__main__":
    main()
