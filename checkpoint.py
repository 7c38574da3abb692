"""
Checkpoints: the format in one place, written safely, and a model loaded from any run; for
train.py, a run's out_dir (its lock and log: claim_out_dir), the checks a resume must pass, and
the training state saved (save_run, with the best checkpoint beside the latest) and put back
(restore_run).

    python checkpoint.py --out_dir=RUN --merged_dir=DIR   # a LoRA run as an ordinary checkpoint

out_dir/ckpt.pt is a plain dict that torch.load(path, weights_only=True) reads (tensors,
numbers, strings, lists, dicts: no pickled classes, so loading a file cannot run code):

    model        the model's state dict, without torch.compile's "_orig_mod." or DDP's
                 "module." prefixes (absent in a LoRA run)
    model_args   the GPTConfig fields, to rebuild the model
    lora         LoRA runs only: the adapter tensors and settings (lora.lora_state_dict)
    base         LoRA runs only: where the frozen base weights come from ("gpt2"..., or the
                 absolute path of another run's out_dir or of a Hugging Face folder)
    parts        LoRA runs only, where the model has parts beside its GPT (a vision run's tower
                 and projector): their weights, which no base holds
    meta         the tokenizer (the dataset's meta.json)
    config       the run's settings                  step      optimizer steps done
    optimizer    the optimizers' full state (AdamW's, and Muon's with optimizer=muon) in one
                 dict keyed by parameter name, so FSDP and DDP runs resume each other
    scaler       the fp16 GradScaler's, or None
    loader       the training loader's position      rng       every rank's RNG states
    threads      torch's CPU threads when it was saved (a resume that picks its own takes them again:
                 the count can change a CPU run's last digits; runtime.ThreadPicker)
    val_loss     the validation loss of these weights (evaluated at this step), or None when
                 a stop cut the evaluation short
    best_val_loss  the lowest val_loss of the run's checkpoints: out_dir/ckpt_best.pt is that one
                 (a second name of the same file while it is also the latest)
Optimizer, scaler, loader, rng and val_loss make the training state that --init_from=resume
continues exactly; a merged checkpoint (python checkpoint.py --merged_dir) has none of them, and
names its LoRA run in merged_from.
"""

import glob
import math
import os
import shutil
from dataclasses import fields

from configurator import UserError, atomic_write, configure, die, exit_on_ctrl_c, lock_folder, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch
import torch.distributed as dist

import lora
from dataloader import hf_tokenizer_meta
from hf_weights import OPENAI_MODELS
from model import GPT, GPTConfig, unwrap
from runtime import RunLog, agree, nonfinite


def make_checkpoint(model, meta, config, state_dict=None, **training_state):
    """The checkpoint dict of `model` (bare or wrapped): its weights, or a LoRA run's
    adapters only, plus whatever training state is given (step, optimizer, ..., base).
    state_dict: the full weights when the model cannot give them itself (an FSDP model holds
    shards; train.py gathers them)."""
    model = unwrap(model)
    ckpt = {"model_args": vars(model.config).copy(), "meta": meta, "config": config, **training_state}
    if lora.has_lora(model):
        ckpt["lora"] = lora.lora_state_dict(model)  # small: the base is named by ckpt["base"]
        parts = {k: v for k, v in model.state_dict().items() if not k.startswith(("transformer.", "lm_head."))}
        if parts:  # gpt.vision and gpt.projector: not the base's, so kept whole
            ckpt["parts"] = parts
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


def checkpoint_path(out_dir):
    """out_dir/ckpt.pt, or out_dir itself where it names a checkpoint file (RUN/ckpt_best.pt)."""
    return out_dir if out_dir.endswith(".pt") else os.path.join(out_dir, "ckpt.pt")


def keep_copy(path, copy):
    """Make `copy` a second name of the file at `path` (a hard link: no second write of gigabytes;
    ckpt.pt is later replaced, never changed in place, so the copy keeps these bytes), or a copy
    where the file system has no links. Atomic like every checkpoint write."""
    tmp = f"{copy}.{os.getpid()}.tmp"
    try:
        os.link(path, tmp)
        os.replace(tmp, copy)
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        with open(path, "rb") as src, atomic_write(copy) as dst:
            shutil.copyfileobj(src, dst)


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
    """Return (model, meta): from out_dir/ckpt.pt of a run of ours, or from the .pt file that
    out_dir names (RUN/ckpt_best.pt, RUN/ckpt_5000.pt); a LoRA run's base is loaded and its
    adapters applied. Or a Hugging Face model when init_from is a GPT-2 name, a Llama-family Hub
    name or a local Hugging Face folder. meta names the tokenizer."""
    if out_dir is None:
        try:
            model = GPT.from_pretrained(init_from, {"dropout": dropout})
        except (OSError, ValueError, ImportError) as e:  # offline, unknown name, odd config
            raise UserError(str(e)) from None
        # a Llama-family model (RMSNorm) comes with its own tokenizer, in its folder or Hub repository
        meta = hf_tokenizer_meta(init_from) if model.config.norm == "rmsnorm" else {"tokenizer": "gpt2"}
        if meta.get("vocab_size", 0) > model.config.vocab_size:  # its ids past the embedding would crash the model
            raise UserError(f"{init_from}: its tokenizer has {meta['vocab_size']:,} ids but the model embeds "
                            f"{model.config.vocab_size:,} (vocab_size): a tokenizer and a model that do not belong together")
        return model.to(device), meta
    path = checkpoint_path(out_dir)
    ckpt = load_checkpoint(path)
    if "vision" in (ckpt.get("config") or {}):  # a tower and a projector in front of the GPT: it needs its image
        raise UserError(f"{path} is a vision run (train_vision.py): ask it with python sample.py --out_dir={out_dir} "
                        "--image=PICTURE, or score it with python vision.py")
    try:
        if "lora" in ckpt:
            model = load_lora_run(ckpt, out_dir, dropout)
        else:
            model = GPT(GPTConfig(**dict(ckpt["model_args"], dropout=dropout)))
            # align.py's reward model and PPO policy are a GPT plus reward_head / value_head: the GPT loads here
            model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith(("reward_head.", "value_head."))})
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as e:  # wrong args, shapes, names
        raise UserError(f"{path} does not fit this project's GPT ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return model.to(device), ckpt["meta"]


def load_lora_run(ckpt, out_dir, dropout=0.0):
    """A LoRA run's GPT: its base loaded (by name, or from its folder: another run of ours or a
    Hugging Face folder), cropped to the run's block_size, and the run's adapters added."""
    base = ckpt["base"]  # a Hugging Face model by name, or a folder (another run, an HF folder) by its absolute path
    if not os.path.exists(base) and (base not in OPENAI_MODELS and os.path.isabs(base)):
        raise UserError(f"{out_dir} is a LoRA run whose base {base} is not there: the adapters "
                        "need those weights, so put the base run back at that path")
    from_run = os.path.isfile(os.path.join(base, "ckpt.pt"))
    model, _ = load_model(out_dir=base, dropout=dropout) if from_run else load_model(init_from=base, dropout=dropout)
    if lora.has_lora(model):  # the base is itself a LoRA run: fold its adapters in first
        lora.merge_lora(model)
    if ckpt["model_args"]["block_size"] < model.config.block_size:  # the run cropped GPT-2's context
        model.crop_block_size(ckpt["model_args"]["block_size"])
    lora.load_lora(model, ckpt["lora"])
    return model


# -----------------------------------------------------------------------------
# a training run's checkpoint: the out_dir it lives in, the checks a resume must pass, and the
# training state (optimizer, scaler, data position, RNG) saved and put back. train.py calls these.

# the settings that decide the model's shape: a resumed run must keep them
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "bias", "rope", "qk_norm", "mlp", "tie_embeddings", "norm", "mlp_hidden",
              "n_kv_head", "rope_theta")


def lock_out_dir(out_dir, resume, overwrite):
    """Lock out_dir for this run (held while the process lives) and refuse to replace the run
    already there unless resuming it or told to (overwrite). Returns the open lock file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file; give a folder")
    lock = lock_folder(out_dir, f"another run is training into {out_dir} right now; wait for it or choose "
                                "another --out_dir")
    path = os.path.join(out_dir, "ckpt.pt")
    if not resume and not overwrite and os.path.exists(path):
        step = load_checkpoint(path)["step"]  # (memory-mapped: the weights are not read)
        raise UserError(f"{out_dir} already holds a run (ckpt.pt at step {step}): continue it with "
                        "--init_from=resume, choose another --out_dir, or replace it with --overwrite")
    # any run file marks a used folder (a run stopped before its first save leaves log.txt; a
    # ckpt_best.pt may outlive its ckpt.pt): refused like a run, and --overwrite clears them all,
    # so that no old checkpoint or log line is taken for the new run's
    old = sorted(f for f in os.listdir(out_dir) if f == "log.txt" or (f.startswith("ckpt") and f.endswith(".pt")))
    if not resume and old and not overwrite:
        raise UserError(f"{out_dir} holds another run's files ({', '.join(old[:4])}{', ...' if len(old) > 4 else ''}): "
                        "choose another --out_dir, or replace them with --overwrite")
    if not resume and old:
        print(f"removing the files of the run this one replaces: {', '.join(old)}")
        for f in old:
            os.remove(os.path.join(out_dir, f))
    return lock


def claim_out_dir(cfg, resume, world):
    """Rank 0 locks out_dir for this run, refuses to replace a run that is there, and makes its
    log.txt's RunLog (the file opens at the first value). Returns (the open lock file, the RunLog);
    the lock is released when the lock file is let go of, or when the process ends, however it ends."""
    lock, log, error = None, RunLog(None, cfg), None
    if world.master:
        try:
            lock = lock_out_dir(cfg["out_dir"], resume, cfg["overwrite"])
            log = RunLog(os.path.join(cfg["out_dir"], "log.txt"), cfg, append=resume)
        except UserError as e:
            error = e
    agree(world, error)
    return lock, log


def check_same_tokenizer(model_meta, data_meta, model_name, dataset):
    """The same token ids must mean the same text for the model and the data."""
    same = lambda m: (m.get("tokenizer"), m.get("chars"), m.get("fingerprint"))  # fingerprint: a Hugging Face vocabulary
    if same(model_meta) != same(data_meta):
        raise UserError(f"{model_name} was trained with the {model_meta.get('tokenizer')} tokenizer (or other "
                        f"characters) but data/{dataset} uses {data_meta.get('tokenizer')}; use a dataset "
                        "of the same tokenizer")


def check_resume(ckpt, cfg, meta, say):
    """A resumed run keeps the checkpoint's model, and says which settings now differ."""
    method = (ckpt.get("config") or {}).get("method")
    if method:  # align.py's run: its own loop, optimizer state and heads
        raise UserError(f"{cfg['out_dir']} is an align.py run (--method={method}): resume it with python align.py "
                        f"--method={method} --out_dir={cfg['out_dir']} --init_from=resume, or start a new train.py run "
                        f"from its model with --init_from={cfg['out_dir']}")
    missing = {"config", "step", "optimizer", "scaler", "loader", "rng", "val_loss"} - ckpt.keys()
    if missing:
        raise UserError(f"{cfg['out_dir']}/ckpt.pt holds a model but no training state to resume (no "
                        f"{', '.join(sorted(missing))}); start a new run from it with --init_from={cfg['out_dir']}")
    old = ckpt["config"]
    check_same_tokenizer(ckpt["meta"], meta, cfg["out_dir"], cfg["dataset"])
    old = {f.name: f.default for f in fields(GPTConfig)} | old  # a run from before a setting existed had its default
    shape = [k for k in SHAPE_KEYS if old[k] != cfg[k]]
    if shape:
        raise UserError(f"resuming {cfg['out_dir']} with another model shape ({', '.join(f'{k}={cfg[k]} vs {old[k]}' for k in shape)}); "
                        "give the settings (config file) the run was started with")
    if cfg["block_size"] > ckpt["model_args"]["block_size"]:
        raise UserError(f"block_size={cfg['block_size']} is longer than the model's {ckpt['model_args']['block_size']} "
                        "positions; resume with the run's block_size")
    def adapters(c):  # what LoRA trains: (rank, targets), or (0, None) for the whole model
        return c["lora_rank"], lora.parse_targets(c["lora_targets"]) if c["lora_rank"] else None
    if adapters(old) != adapters(cfg):  # other adapters are other parameters: the saved state does not fit them
        raise UserError(f"{cfg['out_dir']} was trained with lora_rank={old['lora_rank']}"
                        + (f", lora_targets={old['lora_targets']!r}" if old["lora_rank"] else "")
                        + "; resume it with the same (start a new run, init_from=OUT_DIR, for other adapters)")
    if old["optimizer"] != cfg["optimizer"]:  # the saved state belongs to the other one
        raise UserError(f"{cfg['out_dir']} was trained with optimizer={old['optimizer']}; resume it with the same "
                        "(start a new run, init_from=OUT_DIR, to switch)")
    kept = ("group_by_length",)  # part of the data order: a run keeps the one it began with
    changed = [f"{k}={cfg[k]!r} (was {old[k]!r})" for k in cfg
               if k in old and k not in ("init_from", "overwrite", *kept) and old[k] != cfg[k]]
    if changed:
        say(f"note: resuming with changed settings: {', '.join(changed)}")
    if any(old[k] != cfg[k] for k in kept):
        say(f"note: keeping the checkpoint's {', '.join(f'{k}={old[k]!r}' for k in kept)} (the data order of the run)")


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def save_run(cfg, step, val_loss, best_val_loss, *, model, optimizers, scaler, loader, meta, base, world,
             evaluated=False):
    """Write out_dir/ckpt.pt (atomically), ckpt_STEP.pt every keep_interval steps, and ckpt_best.pt
    when this checkpoint's val loss (evaluated at this step, or None) is the best (the lowest) of
    the run; return the best val loss now. A val loss that is not finite is never saved. Every rank
    must call it: the RNG states (and under FSDP the weights and optimizer state) are gathered.
    evaluated: this step's evaluation was logged (implied by a val loss; PPO's has none)."""
    if val_loss is not None and not math.isfinite(val_loss):  # finite weights can still score nan
        raise nonfinite(cfg["out_dir"], step, val_loss)
    if val_loss is not None and (best_val_loss is None or val_loss < best_val_loss):
        best_val_loss = val_loss  # this checkpoint is also written as ckpt_best.pt
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
                               loader=loader.state_dict(), rng=rngs, val_loss=val_loss, best_val_loss=best_val_loss,
                               base=base, evaluated=evaluated or val_loss is not None,
                               threads=torch.get_num_threads())
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        try:  # a full disk: the last good checkpoint stays, and every rank stops
            save_checkpoint(ckpt, path)
            if cfg["keep_interval"] and step % cfg["keep_interval"] == 0:
                keep_copy(path, os.path.join(cfg["out_dir"], f"ckpt_{step}.pt"))
            best = val_loss is not None and val_loss == best_val_loss
            if best:
                keep_copy(path, os.path.join(cfg["out_dir"], "ckpt_best.pt"))
            print(f"saved {path} at step {step} ({os.path.getsize(path) / 1e6:,.0f} MB)"
                  + (" (the best val loss so far: also ckpt_best.pt)" if best else ""))
        except UserError as e:
            error = e
    agree(world, error, group=world.save_group)  # (the others wait here while rank 0 writes: a long wait)
    return best_val_loss


def restore_run(ckpt, out_dir, raw_model, optimizers, scaler, train_loader, world, say):
    """Put a checkpoint's training state back: optimizers, scaler, data position, RNG. Returns
    the step to continue from, the val loss of the checkpoint's weights, and the best val loss
    of the run (that of out_dir/ckpt_best.pt; None for a checkpoint older than the file). (The
    weights are loaded with the model, by load_model.)"""
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
    best = ckpt.get("best_val_loss") if os.path.exists(os.path.join(out_dir, "ckpt_best.pt")) else None
    return ckpt["step"], ckpt["val_loss"], best


# -----------------------------------------------------------------------------
# python checkpoint.py --out_dir=RUN --merged_dir=DIR

DEFAULTS = dict(
    out_dir="",  # the LoRA run to merge
    merged_dir="",  # where to write the merged ckpt.pt (a new folder, or an empty one)
    overwrite=False,  # True: replace a ckpt.pt already in merged_dir (never the LoRA run's or its base's)
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
        path = os.path.join(cfg["merged_dir"], "ckpt.pt")
        inputs = [cfg["out_dir"]] + ([ckpt["base"]] if os.path.isdir(str(ckpt["base"])) else [])
        if any(os.path.isdir(cfg["merged_dir"]) and os.path.samefile(cfg["merged_dir"], d) for d in inputs):
            # the adapters, or the base, would be gone
            die(f"--merged_dir={cfg['merged_dir']} is where the merge reads from (the LoRA run or its base); "
                "give a new folder")
        if os.path.exists(path) and not cfg["overwrite"]:
            die(f"{path} exists: give a new --merged_dir, or --overwrite to replace it")
        model, meta = load_model(out_dir=cfg["out_dir"])
    except UserError as e:
        die(str(e))
    lora.merge_lora(model)
    try:
        save_checkpoint(make_checkpoint(model, meta, ckpt["config"], step=ckpt["step"], merged_from=cfg["out_dir"]), path)
    except UserError as e:  # a full disk, a read-only folder
        die(str(e))
    print(f"wrote {path}: {cfg['out_dir']}'s adapters merged into its base {ckpt['base']!r}")


if __name__ == "__main__":
    main()
