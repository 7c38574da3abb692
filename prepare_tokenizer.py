"""
Train your own tokenizer: a byte-level BPE of --vocab_size ids learnt from your corpus, with
Hugging Face's `tokenizers`, saved as a folder that transformers and every script here load.

    python prepare_tokenizer.py --data_files=data/tinyshakespeare.txt --vocab_size=4096 --out_dir=tokenizers/shakespeare-4k
    python prepare_tokenizer.py --data_files='corpus/*.jsonl' --vocab_size=32768 --out_dir=tokenizers/mine
    python prepare_tokenizer.py --dataset=HuggingFaceFW/fineweb-edu --name=sample-10BT --streaming \
        --max_chars=2000000000 --vocab_size=32768 --out_dir=tokenizers/fineweb-32k
then prepare data with it, as with any Hugging Face tokenizer:
    python prepare_shakespeare.py --tokenizer=tokenizers/shakespeare-4k --out_dir=data/shakespeare_4k
    python prepare_fineweb.py --tokenizer=tokenizers/fineweb-32k --out_dir=data/fineweb_edu10B_32k

What it learns. Text is first cut as GPT-2 cuts it (words with their leading space, runs of
digits, of punctuation, of whitespace: the same regular expression), then every piece is read
as UTF-8 bytes, and BPE merges the most frequent adjacent pair again and again until the
vocabulary has --vocab_size ids. The 256 bytes are always in it, so every text, in any
language or none, encodes and decodes back exactly (no unknown token). The special tokens:
<|endoftext|>, the eos, which ends every document and every SFT answer (GPT-2's convention,
and prepare_fineweb.py's); with --bos, also <|bos|>, put before every text as Llama's <s> is
(nanochat starts every document with one). No pad token: padding here is never a target and
never attended to, so its id does not matter (the eos is used).

A seeded --val_fraction of the corpus is held out (the end of the text if it is one document,
else that share of the documents, drawn at random): the tokenizer does not learn from it, and
its bytes per token, the compression, is printed for this tokenizer and GPT-2's BPE. More bytes
per token: shorter sequences for the same text, so more text per block_size and per FLOP; but
a larger vocabulary costs a wider wte and lm_head (docs/data.md has measurements).

The corpus options are prepare_fineweb.py's: --data_files (comma-separated paths or globs of
.txt/.jsonl/.parquet, .gz too; a .txt file is one document), or a Hub --dataset and --name;
--text_field names the column. --max_chars caps what is read (training holds the text in memory).
"""

import os
import shutil

from configurator import UserError, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while the libraries load ends in one line, not a traceback

import numpy as np

from dataloader import get_gpt2_encoding
from prepare_fineweb import document_batches, load_corpus, resolve_files

DEFAULTS = dict(
    data_files="",  # the corpus: comma-separated paths or globs of .txt/.jsonl/.parquet (.gz ok)
    dataset="HuggingFaceFW/fineweb-edu",  # or a Hugging Face Hub dataset (when data_files is empty)
    name="sample-10BT",  # its configuration ("" for none)
    text_field="text",  # the column that holds each document's text
    streaming=False,  # read the Hub dataset as a stream (no local copy): best with max_chars
    max_chars=1_000_000_000,  # read at most this many characters of the corpus (0: all of it)
    vocab_size=32768,  # ids in all: the 256 bytes, the special tokens and the merges
    bos=False,  # also a <|bos|> token, put before every text (the eos <|endoftext|> is always there)
    val_fraction=0.1,  # held out: not learnt from, used to report bytes per token (0: none)
    seed=1337,  # which documents are held out
    out_dir="",  # the folder to write (must not exist yet, or be empty)
    num_proc=os.cpu_count() or 1,  # processes for converting a Hub dataset (as in prepare_fineweb.py)
)
EOS, BOS = "<|endoftext|>", "<|bos|>"


def read_corpus(cfg):
    """The corpus's texts, at most max_chars characters in all, in its order."""
    files, builder = resolve_files(cfg["data_files"]) if cfg["data_files"] else ([], None)
    ds = load_corpus(cfg, files, builder)
    texts, n = [], 0
    try:
        for batch in document_batches(ds, cfg["text_field"], 0):
            for text in batch:
                if cfg["max_chars"] and n + len(text) > cfg["max_chars"]:
                    text = text[:cfg["max_chars"] - n]  # the cap falls inside this document
                texts.append(text)
                n += len(text)
                if cfg["max_chars"] and n >= cfg["max_chars"]:
                    return texts
    except (KeyError, ValueError) as e:  # no such column
        die(f"cannot read the column {cfg['text_field']!r} ({type(e).__name__}: {str(e)[:120]}): set --text_field")
    return texts


def split_off_val(texts, fraction, seed):
    """(train texts, val texts): the last `fraction` of the text when the corpus is one document,
    else a seeded random `fraction` of the documents."""
    if not fraction:
        return texts, []
    if len(texts) == 1:
        cut = int(len(texts[0]) * (1 - fraction))
        return [texts[0][:cut]], [texts[0][cut:]]
    held = set(np.random.default_rng(seed).permutation(len(texts))[:max(1, round(len(texts) * fraction))].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def train_tokenizer(texts, vocab_size, bos=False):
    """A byte-level BPE trained on texts: tokenizers' Tokenizer, with GPT-2's pre-tokenization (its
    regular expression, then bytes as characters) and decoder, and <|endoftext|> (and <|bos|>,
    put before every text by the post-processor) as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    specials = [EOS] + ([BOS] if bos else [])
    tk = Tokenizer(models.BPE())
    # add_prefix_space=False: a text's first word has no space before it, as in GPT-2's BPE
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, seen or not
    tk.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if bos:  # every text starts with <|bos|>, as a Llama's with <s> (dataloader.with_bos reads it back)
        tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tk.token_to_id(BOS))])
    return tk


def save_tokenizer(tk, out_dir, bos=False):
    """The folder transformers' AutoTokenizer loads (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json), written beside out_dir and renamed into place at the end."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        die("saving a tokenizer folder needs transformers: pip install transformers")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS, bos_token=BOS if bos else None,
                                  clean_up_tokenization_spaces=False)  # decode gives the text back, spaces and all
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_pretrained(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # main() lets only an empty one through
        os.rename(tmp, out_dir)
    except BaseException:  # also Ctrl-C: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tok


def bytes_per_token(encode, texts):
    """The compression on texts: UTF-8 bytes over tokens (no special tokens counted)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / max(1, sum(len(encode(t)) for t in texts))


def main():
    cfg = configure(DEFAULTS)
    if not cfg["out_dir"]:
        die("say where to write the tokenizer: --out_dir=tokenizers/NAME")
    if os.path.exists(cfg["out_dir"]) and (not os.path.isdir(cfg["out_dir"]) or os.listdir(cfg["out_dir"])):
        die(f"{cfg['out_dir']} already exists and is not an empty folder: remove it or choose another --out_dir")
    if not 256 + 2 <= cfg["vocab_size"] <= 2 ** 32:
        die(f"--vocab_size must be at least 258 (the 256 bytes, the special tokens, a merge), got {cfg['vocab_size']}")
    if not 0 <= cfg["val_fraction"] < 1:
        die(f"--val_fraction must be at least 0 and below 1, got {cfg['val_fraction']}")
    if cfg["max_chars"] < 0:
        die(f"--max_chars must not be negative (0: the whole corpus), got {cfg['max_chars']}")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        die("training a tokenizer needs tokenizers (it comes with transformers): pip install transformers")
    print_config(cfg)

    texts = read_corpus(cfg)
    train, val = split_off_val(texts, cfg["val_fraction"], cfg["seed"])
    n_chars = sum(map(len, train))
    if n_chars < 100:
        die(f"the corpus has {n_chars} characters to learn from, too few: give more text")
    print(f"learning {cfg['vocab_size']:,} ids from {len(train):,} document(s), {n_chars:,} characters")
    tok = save_tokenizer(train_tokenizer(train, cfg["vocab_size"], cfg["bos"]), cfg["out_dir"], cfg["bos"])
    if len(tok) < cfg["vocab_size"]:
        print(f"note: the corpus gave {len(tok):,} ids, not {cfg['vocab_size']:,}: it has no more pairs worth a merge")
    if val:
        ours = bytes_per_token(lambda t: tok(t, add_special_tokens=False)["input_ids"], val)
        line = f"held-out {sum(map(len, val)):,} characters: {ours:.3f} bytes per token"
        try:
            enc = get_gpt2_encoding()
            line += f" (GPT-2's BPE, 50,257 ids: {bytes_per_token(enc.encode_ordinary, val):.3f})"
        except UserError:  # offline without a tiktoken cache: the comparison is left out
            pass
        print(line)
    print(f"wrote {cfg['out_dir']} ({len(tok):,} ids; eos {EOS}{', bos ' + BOS if cfg['bos'] else ''}): "
          f"python prepare_shakespeare.py --tokenizer={cfg['out_dir']} --out_dir=data/NAME")


if __name__ == "__main__":
    main()
