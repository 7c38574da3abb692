"""
Prepare preference pairs for align.py (DPO, a reward model): a prompt, the answer people
preferred and the one they did not.

    python prepare_preferences.py --input=pairs.jsonl --out_dir=data/mine     # your own pairs
    python prepare_preferences.py                      # Anthropic's HH-RLHF (datasets) -> data/hh_rlhf/

A record is {"prompt": ..., "chosen": ..., "rejected": ...}, the format TRL and most preference
sets use; --input takes a JSON list of them or a JSONL file, one a line. HH-RLHF stores two whole
dialogues per record instead ("\\n\\nHuman: ... \\n\\nAssistant: ..."); their shared beginning,
up to the last "Assistant:" both have, is split off as the prompt.

The prompt is rendered with the instruction template that SFT uses (prepare_alpaca.py's: the
tokenizer's chat template, or Alpaca's), so an SFT model continues it as it learned to. Prompt
and answers are tokenized separately, so each boundary is a token boundary, and each answer
ends with the end marker (<|endoftext|>, or a Llama tokenizer's eos). A pair becomes two
examples of an SFT dataset, back to back: (prompt, chosen), then (prompt, rejected), in
SPLIT.bin and SPLIT_index.npy (dataloader.write_sft); meta.json says "format": "preference".
A seeded --val_fraction of the pairs is val. Pairs longer than --max_len + 1 tokens (prompt and
the longer answer) are dropped, not cut, and counted.
"""

from configurator import UserError, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import numpy as np

from dataloader import encode_pair, publish_dataset, staging, with_bos, write_meta, write_sft
from prepare_alpaca import instruction_prompt, instruction_tokenizer, read_json_records

DEFAULTS = dict(
    input="",  # a local JSON list or JSONL of {"prompt", "chosen", "rejected"}; empty = download HH-RLHF
    out_dir="data/hh_rlhf",  # where the token files, indexes and meta.json go
    hf_dataset="Anthropic/hh-rlhf",  # the download (datasets.load_dataset), its train split
    val_fraction=0.05,  # this share of the pairs, drawn at random, is the val split
    max_len=512,  # the block_size you will align with: longer pairs are dropped
    seed=1337,  # the train/val split is drawn with this seed
    tokenizer="gpt2",  # gpt2 or a Hugging Face model's folder or Hub name (docs/llama.md)
    template="auto",  # auto: the tokenizer's chat template if it has one, else alpaca | alpaca | chat
    overwrite=False,  # replace another dataset already in out_dir (the same one, prepared again, is kept)
)


def split_dialogues(chosen, rejected, marker="\n\nAssistant:"):
    """HH-RLHF's two dialogues -> (prompt, chosen answer, rejected answer): the prompt is their
    shared beginning up to (and with) the last assistant turn's marker."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(marker, 0, n)  # the marker wholly inside the shared part
    if cut < 0:
        return None
    cut += len(marker)
    return chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()


def download(name):
    """HH-RLHF's train split through datasets, its dialogues split into prompt and answers."""
    try:
        from datasets import load_dataset
    except ImportError:
        die("the download needs datasets: pip install datasets (or give --input=PATH)")
    try:
        ds = load_dataset(name, split="train")
    except Exception as e:  # offline, a renamed dataset
        die(f"could not load {name} ({type(e).__name__}); give a local copy with --input=PATH")
    items, skipped = [], 0
    for i, row in enumerate(ds):
        parts = split_dialogues(row["chosen"], row["rejected"])
        # left out: no shared assistant turn to split off, an empty answer, or the same answer twice
        # (a published set's rows cannot be edited by the user, unlike an --input file's, which are refused)
        if not parts or not parts[1] or not parts[2] or parts[1] == parts[2]:
            skipped += 1
            continue
        items.append((dict(zip(("prompt", "chosen", "rejected"), parts)), f"{name}: row {i}"))
    if skipped:
        print(f"left out {skipped:,} of {name}'s rows: no shared prompt, an empty answer, or chosen = rejected")
    return items


def check_pairs(items, end_text):
    """(prompt, chosen, rejected) strings, each record checked; a bad one ends the run naming it."""
    pairs = []
    for item, where in items:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("prompt", "chosen", "rejected")):
            die(f"{where}: expected an object with string prompt, chosen and rejected (a preference pair); "
                f"got {type(item).__name__ if not isinstance(item, dict) else sorted(item)}")
        prompt, chosen, rejected = item["prompt"], item["chosen"], item["rejected"]
        if not prompt.strip() or not chosen.strip() or not rejected.strip():
            die(f"{where}: prompt, chosen and rejected must all be non-empty")
        if chosen.strip() == rejected.strip():
            die(f"{where}: chosen and rejected are the same text: the pair prefers nothing; remove it")
        if end_text in chosen or end_text in rejected:
            die(f"{where}: an answer holds the end marker's text {end_text!r}; remove it from the answer")
        pairs.append((prompt, chosen, rejected))
    if not pairs:
        die("no preference pairs in the input")
    return pairs


def prepare(cfg):
    if not 0 < cfg["val_fraction"] < 1:
        die(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    meta, encode, eot, end_text = instruction_tokenizer(cfg, "preference")  # as prepare_alpaca.py's SFT data
    pairs = check_pairs(read_json_records(cfg["input"]) if cfg["input"] else download(cfg["hf_dataset"]), end_text)

    n_val = max(1, round(len(pairs) * cfg["val_fraction"]))
    if len(pairs) - n_val < 1:
        die(f"{len(pairs)} pairs are too few to split into train and val; give more")
    order = np.random.default_rng(cfg["seed"]).permutation(len(pairs))
    splits = {"train": sorted(order[n_val:].tolist()), "val": sorted(order[:n_val].tolist())}
    out_dir, max_len = cfg["out_dir"], cfg["max_len"]
    written = {}
    for split, ids in splits.items():  # every split is made before any file is written
        examples, dropped = [], 0
        for i in ids:
            prompt, chosen, rejected = pairs[i]
            text = instruction_prompt(meta, prompt)  # each answer as it reads after the prompt (encode_pair)
            (p, c), (_, r) = encode_pair(encode, text, chosen), encode_pair(encode, text, rejected)
            p, c, r = with_bos(meta, p), c + [eot], r + [eot]
            if len(p) + max(len(c), len(r)) > max_len + 1:
                dropped += 1
                continue
            examples += [(p, c), (p, r)]  # the pair: chosen, then rejected
        if not examples:
            die(f"every {split} pair is longer than --max_len={max_len} tokens; raise it")
        written[split] = (examples, dropped)
    with staging(out_dir) as tmp:  # written beside out_dir, then moved in: never over another dataset unasked
        for split, (examples, dropped) in written.items():
            write_sft(tmp, split, examples)
            print(f"{split}: {len(examples) // 2:,} pairs, {sum(len(p) + len(a) for p, a in examples):,} tokens; "
                  f"{dropped:,} longer than max_len+1 = {max_len + 1} dropped")
        write_meta(tmp, meta)
        publish_dataset(tmp, out_dir, cfg["overwrite"])
    print(f"-> {out_dir}/")
    return out_dir


def main():
    cfg = configure(DEFAULTS)
    print_config(cfg)
    try:
        prepare(cfg)
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
