"""
Prepare Tiny Shakespeare (about 1.1M characters of plays) for training.

    python prepare_shakespeare.py                      # characters -> data/shakespeare_char/
    python prepare_shakespeare.py --tokenizer=gpt2     # GPT-2 BPE  -> data/shakespeare/
    python prepare_shakespeare.py --input=PATH         # any local text file instead of the download
    python prepare_shakespeare.py --tokenizer=HF_FOLDER --out_dir=data/shakespeare_smol
                                                       # a Hugging Face model's tokenizer (docs/llama.md)

The first 90% of the text is train.bin, the last 10% val.bin (a contiguous split: the
validation text is plays the model has never seen, not lines shuffled out of its training
plays). Both are token files in the format of dataloader.py, beside a meta.json that names the
tokenizer; the char-level one lists its characters, sorted, so a char's id is its index.
"""

import os

from configurator import UserError, atomic_write, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import requests

from dataloader import (get_gpt2_encoding, get_tokenizer, hf_tokenizer_meta, publish_dataset, staging, with_bos,
                        write_meta, write_tokens)

DEFAULTS = dict(
    tokenizer="char",  # "char" (65 characters), "gpt2" (BPE, 50257 tokens), or a Hugging Face model's folder or Hub name
    input="",  # a local text file to use instead of downloading Tiny Shakespeare
    out_dir="",  # where to write; default data/shakespeare_char or data/shakespeare
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    val_fraction=0.1,  # the last 10% of the text is validation
    overwrite=False,  # replace another dataset already in out_dir (the same one, prepared again, is kept)
)


def get_text(cfg):
    """The text: --input, or the download (cached in data/ so it is fetched once)."""
    if cfg["input"]:
        if not os.path.isfile(cfg["input"]):
            die(f"--input file {cfg['input']} not found")
        try:
            with open(cfg["input"], encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError:
            die(f"--input file {cfg['input']} is not UTF-8 text; convert it (e.g. iconv -t UTF-8)")
    cache = os.path.join("data", "tinyshakespeare.txt")
    if not os.path.isfile(cache):
        print(f"downloading {cfg['url']}")
        try:
            r = requests.get(cfg["url"], timeout=30)
            r.raise_for_status()
        except requests.RequestException as e:
            die(f"download failed ({type(e).__name__}); give a local copy with --input=PATH")
        with atomic_write(cache, "w", encoding="utf-8") as f:  # never half a cache
            f.write(r.text)
    with open(cache, encoding="utf-8") as f:
        return f.read()


def prepare(cfg):
    if not 0 < cfg["val_fraction"] < 1:
        die(f"--val_fraction must be between 0 and 1 (e.g. 0.1), got {cfg['val_fraction']}")
    text = get_text(cfg)
    if len(text) < 100:
        die(f"the input has {len(text)} characters, too few to train on; give a real text with --input=PATH")
    if cfg["tokenizer"] == "char":
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = [stoi[c] for c in text]
        meta = {"tokenizer": "char", "chars": chars}
        out_dir = cfg["out_dir"] or os.path.join("data", "shakespeare_char")
    elif cfg["tokenizer"] == "gpt2":
        enc = get_gpt2_encoding()
        # one document: no <|endoftext|> needed inside it
        ids = enc.encode_ordinary(text)
        meta = {"tokenizer": "gpt2"}
        out_dir = cfg["out_dir"] or os.path.join("data", "shakespeare")
    else:  # a Llama-family model's tokenizer; the text starts with its bos, as its training texts did
        if not cfg["out_dir"]:
            die(f"--tokenizer={cfg['tokenizer']}: give --out_dir=data/NAME for these tokens (the default folders "
                "are for char and gpt2)")
        meta = hf_tokenizer_meta(cfg["tokenizer"])
        ids = with_bos(meta, get_tokenizer(meta)[0](text))
        out_dir = cfg["out_dir"]
    # split the tokens (not the characters) so the two files add up to the whole text
    n_val = int(len(ids) * cfg["val_fraction"])
    train_ids, val_ids = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    with staging(out_dir) as tmp:  # written beside out_dir, then moved in: never over another dataset unasked
        write_tokens(os.path.join(tmp, "train.bin"), train_ids)
        write_tokens(os.path.join(tmp, "val.bin"), val_ids)
        write_meta(tmp, meta)
        publish_dataset(tmp, out_dir, cfg["overwrite"])
    vocab = {"char": len(meta.get("chars", [])), "gpt2": 50257}.get(meta["tokenizer"], meta.get("vocab_size"))
    print(f"{len(text):,} characters, vocabulary {vocab:,}: train {len(train_ids):,} tokens, "
          f"val {len(val_ids):,} tokens -> {out_dir}/")
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
