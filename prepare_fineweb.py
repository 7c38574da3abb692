"""
Prepare FineWeb-edu (or any text corpus) for pretraining: tokenize it with GPT-2's BPE (or a
Hugging Face model's tokenizer) and cut the token stream into shards in the llm.c format (see
dataloader.py).

    python prepare_fineweb.py                                   # FineWeb-edu sample-10BT, ~10B tokens
    python prepare_fineweb.py --name=sample-100BT --out_dir=data/fineweb_edu100B
    python prepare_fineweb.py --dataset=HuggingFaceFW/fineweb --name=sample-10BT --out_dir=data/fineweb10B
    python prepare_fineweb.py --data_files='corpus/*.jsonl' --out_dir=data/mycorpus --shard_size=10000000
    python prepare_fineweb.py --max_tokens=20000000 --shard_size=5000000   # a quick try
    python prepare_fineweb.py --tokenizer=HuggingFaceTB/SmolLM2-135M --out_dir=data/fineweb_edu10B_smol

Every document becomes <|endoftext|> followed by its tokens, and the documents follow each
other in the dataset's order into shards of exactly `shard_size` tokens (a document that does
not fit is continued in the next shard; only the last shard is shorter). The first shard is
the validation split, the rest are training: fineweb_val_000000.bin, fineweb_train_000001.bin,
... the names and format of llm.c's and modded-nanogpt's FineWeb shards, so shards from either
work here and these work there. With --tokenizer=FOLDER_OR_NAME (a Llama-family model's, see
docs/llama.md) a document is its eos, then the tokenizer's bos if it has one (Llama's <s>), then
its tokens: the eos still separates documents, and each starts as that model's texts did.
A shard whose ids all fit in 16 bits is written as uint16 (the format's version 1), any other
as uint32 (version 2); the readers take both.

Resuming. Tokenizing 10B tokens takes hours, so an interrupted run must not start over. After
each shard is written (atomically), prepare_progress.json records where in the corpus that
shard ends: the index of the next document and how many of its tokens are already used. A
rerun keeps the complete shards that this file vouches for (present, with the recorded length),
reopens the corpus at the recorded document, re-tokenizes just that one document to drop the
tokens already used, and goes on. Tokenization is deterministic and the document order is
fixed, so the result is byte for byte what one uninterrupted run writes; documents before the
resume point are skipped, not re-tokenized.
"""

import glob
import json
import os
import time
from multiprocessing import Pool

from configurator import (UserError, atomic_write, configure, die, exit_on_ctrl_c, lock_folder, print_config,
                          quiet_offline_hub)

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import numpy as np

from dataloader import (EOT, dataset_files, describe_folder, get_gpt2_encoding, get_hf_tokenizer, hf_tokenizer_meta,
                        read_tokens, write_meta, write_tokens)

# -----------------------------------------------------------------------------
# settings; override with a config file or --key=value
DEFAULTS = dict(
    dataset="HuggingFaceFW/fineweb-edu",  # a Hugging Face Hub dataset (used when data_files is empty)
    name="sample-10BT",  # its configuration: sample-10BT, sample-100BT, sample-350BT, ... ("" for none)
    data_files="",  # local corpus instead: comma-separated paths or globs of .jsonl/.json/.parquet/.txt (.gz ok)
    text_field="text",  # the column holding each document's text (a .txt file is one document, field "text")
    streaming=False,  # read the Hub dataset as a stream: no local Arrow copy (saves ~disk), slower to resume
    out_dir="",  # where the shards, meta.json and prepare_progress.json go; "" = data/fineweb_edu10B, or data/<first file's name> for data_files
    shard_size=100_000_000,  # tokens per shard (100M tokens = 200 MB); the first shard is validation
    max_tokens=0,  # stop after this many tokens in all (0: the whole corpus); for a quick try
    num_proc=os.cpu_count() or 1,  # tokenizer processes (1: tokenize in this process, no pool)
    tokenizer="gpt2",  # "gpt2" (GPT-2's BPE), or a Hugging Face model's folder or Hub name (e.g. HuggingFaceTB/SmolLM2-135M)
    overwrite=False,  # replace another dataset in out_dir (a preparation of the same corpus resumes instead)
)

PROGRESS = "prepare_progress.json"  # the resume record, in out_dir
DOCS_PER_TASK = 256  # documents sent to a worker at once: big enough that pickling is cheap


# -----------------------------------------------------------------------------
# reading the corpus

# file name ending -> the datasets builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}  # datasets decompresses these itself


def resolve_files(spec):
    """'a.jsonl,dir/*.parquet' -> sorted absolute paths, and the one builder that reads them all."""
    files = []
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            die(f"--data_files: no files match {pattern!r}")
        files += [os.path.abspath(m) for m in matches]
    if not files:
        die("--data_files is empty: give paths or globs, comma-separated")
    kinds = set()
    for f in files:
        stem, ext = os.path.splitext(f.lower())
        if ext in COMPRESSION:  # data.jsonl.gz is read as jsonl
            stem, ext = os.path.splitext(stem)
        if ext not in BUILDERS:
            die(f"--data_files: cannot read {f} (expected {', '.join(BUILDERS)}, optionally compressed)")
        kinds.add(BUILDERS[ext])
    if len(kinds) > 1:
        die(f"--data_files mixes formats ({', '.join(sorted(kinds))}): prepare one format at a time")
    return files, kinds.pop()


def load_corpus(cfg, files, builder):
    """The corpus as a datasets Dataset (or IterableDataset when streaming), in a fixed order."""
    if not files:
        quiet_offline_hub()  # offline: the cached copy at once, or one line, not half a minute of retries
    import datasets

    try:
        if files:
            # a .txt file is read whole as one document, not line by line
            extra = {"sample_by": "document"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg["streaming"], **extra)
        # num_proc speeds up downloading and converting the Hub's many parquet files
        extra = {} if cfg["streaming"] else {"num_proc": cfg["num_proc"]}
        return datasets.load_dataset(cfg["dataset"], name=cfg["name"] or None, split="train",
                                     streaming=cfg["streaming"], **extra)
    except Exception as e:  # offline, a typo in the name, a broken file: one line, not a page
        what = ", ".join(files) if files else f"{cfg['dataset']} ({cfg['name']})"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        die(f"cannot load {what}: {type(e).__name__}: {msg}")


def document_batches(ds, text_field, start_doc):
    """Lists of DOCS_PER_TASK texts, in corpus order, from document number start_doc on."""
    ds = ds.skip(start_doc) if start_doc else ds  # map-style: a slice; streaming: reads past them
    for batch in ds.select_columns([text_field]).iter(batch_size=DOCS_PER_TASK):
        yield batch[text_field]


# -----------------------------------------------------------------------------
# tokenizing (runs in the worker processes)

_spec = ("gpt2", [EOT], np.uint16)  # what to tokenize with: set in every process by use_tokenizer
_enc = None  # each process loads its tokenizer once, on its first task


def use_tokenizer(name, head, dtype):
    """The pool's initializer: the tokenizer's name ("gpt2", or a Hugging Face folder or Hub
    name), the ids every document starts with, and the token dtype."""
    global _spec, _enc
    _spec, _enc = (name, head, dtype), None


def tokenize(texts):
    """A list of texts -> a list of arrays, one per document: [EOT, its tokens...] (GPT-2), or
    [eos, bos..., its tokens...] (a Hugging Face tokenizer)."""
    global _enc
    name, head, dtype = _spec
    if _enc is None:
        _enc = get_gpt2_encoding() if name == "gpt2" else get_hf_tokenizer(name)
    texts = ["" if t is None else t for t in texts]  # an empty document still counts: numbers stay aligned
    for t in texts:
        if not isinstance(t, str):
            raise UserError(f"the text field holds {type(t).__name__} values, not text: pick another --text_field")
    # a literal "<|endoftext|>" (or "</s>") inside a web page is text, not a separator
    if name == "gpt2":
        ids = [_enc.encode_ordinary(t) for t in texts]
    else:  # the whole batch at once: the Rust tokenizer's own loop
        ids = _enc(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    out = []
    for doc_ids in ids:
        doc = np.empty(len(head) + len(doc_ids), dtype=dtype)  # uint16: GPT-2's 50,257 ids fit
        doc[:len(head)] = head  # every document starts with the separator: the model learns where texts begin
        doc[len(head):] = doc_ids
        out.append(doc)
    return out


# -----------------------------------------------------------------------------
# shards and the resume record


def shard_name(index):
    return f"fineweb_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def save_progress(out_dir, progress):
    # atomic like the shards: a crash leaves the old record or the new one, never half of one
    with atomic_write(os.path.join(out_dir, PROGRESS), "w") as f:
        json.dump(progress, f, indent=1)


def same_preparation(out_dir, source):
    """Whether out_dir holds this preparation's resume record (the same corpus and settings)."""
    try:
        with open(os.path.join(out_dir, PROGRESS)) as f:
            return json.load(f)["source"] == source
    except (OSError, ValueError, KeyError, TypeError):
        return False


def completed_shards(out_dir, source):
    """The resume record's shards that are still intact, and whether the corpus was finished.

    A shard counts when its file is there with the recorded number of tokens and it is full
    (a short shard is the end of a --max_tokens run, which a longer run rewrites), or it is
    the last shard of a corpus that was read to the end."""
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.isfile(path):
        if dataset_files(out_dir):  # another dataset (or shards whose record is gone): never mixed with these
            die(f"{out_dir} already holds {describe_folder(out_dir)} (no {PROGRESS}: not a preparation to resume): "
                "choose another --out_dir, or replace it with --overwrite")
        return [], False
    try:
        with open(path) as f:
            progress = json.load(f)
        progress["source"], progress["shards"], progress["finished"]  # noqa: B018 (the keys a record has)
    except (ValueError, KeyError, TypeError) as e:  # damaged (a disk error, an edit): not a record to trust
        die(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}): delete it to prepare {out_dir} again from the "
            "start, or use --overwrite")
    if progress["source"] != source:
        keys = sorted(set(source) | set(progress["source"]))
        show = lambda k, v: (f"{k}={v!r}" if k != "tokenizer" else "--tokenizer=gpt2" if v is None else
                             f"the tokenizer of vocabulary fingerprint {v} (its path is in meta.json)")
        diff = ", ".join(show(k, progress["source"].get(k)) for k in keys if progress["source"].get(k) != source.get(k))
        die(f"{out_dir} was prepared with {diff}; rerun with those settings, use another --out_dir, or replace it "
            "with --overwrite")
    kept = []
    for i, shard in enumerate(progress["shards"]):
        try:
            n = len(read_tokens(os.path.join(out_dir, shard["file"])))
        except UserError:
            break  # missing or damaged: it and everything after it are written again
        last_of_corpus = progress["finished"] and i == len(progress["shards"]) - 1
        if n != shard["tokens"] or (n != source["shard_size"] and not last_of_corpus):
            break
        kept.append(shard)
    finished = progress["finished"] and len(kept) == len(progress["shards"])
    return kept, finished


# -----------------------------------------------------------------------------


def main():
    cfg = configure(DEFAULTS)
    print_config(cfg)
    if cfg["shard_size"] < 1 or cfg["max_tokens"] < 0 or cfg["num_proc"] < 1:
        die("--shard_size and --num_proc must be >= 1, --max_tokens >= 0 (0 means the whole corpus)")
    shard_size, max_tokens, gpt2 = cfg["shard_size"], cfg["max_tokens"], cfg["tokenizer"] == "gpt2"
    if not gpt2 and not cfg["out_dir"]:  # the default folders hold GPT-2 tokens
        die(f"--tokenizer={cfg['tokenizer']}: give --out_dir=data/NAME for these tokens (the default folder is "
            "for GPT-2's)")
    files, builder = resolve_files(cfg["data_files"]) if cfg["data_files"] else ([], None)
    out_dir = cfg["out_dir"] or (os.path.join("data", os.path.basename(files[0]).split(".")[0]) if files
                                 else os.path.join("data", "fineweb_edu10B"))
    print(f"writing the shards to {out_dir}/ (train.py --dataset={os.path.basename(out_dir)})")
    try:  # the tokenizer loads now, to fail in one line rather than inside every worker
        if gpt2:
            get_gpt2_encoding()
            meta, head = {"tokenizer": "gpt2"}, [EOT]
        else:
            meta = hf_tokenizer_meta(cfg["tokenizer"])
            head = [meta["eot"]] + meta["bos"]  # the eos ends the previous document, the bos starts this one
            # a page that quotes "</s>" must not end its document there: tokenize() asks for
            # split_special_tokens, which a transformers too old to know it would ignore
            tok = get_hf_tokenizer(cfg["tokenizer"])
            if meta["eot"] in tok(f"a {tok.eos_token} b", add_special_tokens=False, split_special_tokens=True)["input_ids"]:
                import transformers
                raise UserError(f"transformers {transformers.__version__} reads a literal {tok.eos_token} in the text "
                                f"as the eos token: pip install -U transformers")
        dtype = np.uint16 if meta.get("vocab_size", 50257) <= 2 ** 16 else np.uint32
        # one writer per folder, held while this process lives; what a killed one half-wrote (*.tmp) is removed
        busy = f"another prepare_fineweb.py is writing into {out_dir}; wait for it or choose another --out_dir"
        lock = lock_folder(out_dir, busy)  # noqa: F841
    except UserError as e:
        die(str(e))

    # what the shards are made from: a rerun must match it exactly to reuse them
    source = dict(data_files=files, text_field=cfg["text_field"], shard_size=shard_size, streaming=cfg["streaming"])
    if not files:
        source.update(dataset=cfg["dataset"], name=cfg["name"])
    if not gpt2:  # (GPT-2's records have no such key: they stay valid)
        source["tokenizer"] = meta["fingerprint"]  # the vocabulary, wherever the tokenizer lives
    if cfg["overwrite"] and not same_preparation(out_dir, source):
        for name in dataset_files(out_dir):  # another dataset's files: this one replaces them, as told
            os.remove(os.path.join(out_dir, name))
    kept, finished = completed_shards(out_dir, source)
    done_tokens = sum(s["tokens"] for s in kept)
    if finished or (max_tokens and done_tokens >= max_tokens):
        print(f"{out_dir} is already complete: {len(kept)} shards, {done_tokens:,} tokens")
        write_meta(out_dir, meta)
        return
    progress = dict(source=source, shards=kept, finished=False)
    start_doc, start_skip = (kept[-1]["next_doc"], kept[-1]["next_token"]) if kept else (0, 0)
    if kept:
        print(f"resuming after {len(kept)} complete shards ({done_tokens:,} tokens), at document {start_doc:,}")

    ds = load_corpus(cfg, files, builder)
    columns = ds.column_names or list(next(iter(ds)).keys())  # a stream may not know its columns up front
    if cfg["text_field"] not in columns:
        die(f"the data has no field {cfg['text_field']!r}; its fields are: {', '.join(columns)} (set --text_field)")
    n_docs = len(ds) if hasattr(ds, "__len__") else None

    from tqdm import tqdm

    shard = np.empty(shard_size, dtype=dtype)  # the shard being filled
    fill = 0  # tokens in it so far
    total = done_tokens  # tokens in all shards, written or being filled
    doc = start_doc  # number of the document being consumed

    def flush(next_doc, next_token):
        # write the current shard and record where in the corpus it ends
        nonlocal fill
        index = len(progress["shards"])
        write_tokens(os.path.join(out_dir, shard_name(index)), shard[:fill])
        progress["shards"].append(dict(file=shard_name(index), tokens=fill, next_doc=next_doc, next_token=next_token))
        save_progress(out_dir, progress)
        fill = 0

    t0 = time.time()
    bar = tqdm(total=max_tokens or None, initial=total, unit="tok", unit_scale=True, desc="tokenizing")
    use_tokenizer(cfg["tokenizer"], head, dtype)
    if cfg["num_proc"] > 1:  # the processes are the parallelism: no Rust threads inside each as well
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = Pool(cfg["num_proc"], use_tokenizer, (cfg["tokenizer"], head, dtype)) if cfg["num_proc"] > 1 else None
    try:
        batches = document_batches(ds, cfg["text_field"], start_doc)
        # imap keeps the corpus order, whichever worker finishes first
        results = pool.imap(tokenize, batches) if pool else map(tokenize, batches)
        stop = False
        for docs in results:
            before = total
            for tokens in docs:
                used = start_skip if doc == start_doc else 0  # skip what the kept shards already hold
                while used < len(tokens):
                    take = min(len(tokens) - used, shard_size - fill)
                    if max_tokens:
                        take = min(take, max_tokens - total)
                    shard[fill:fill + take] = tokens[used:used + take]
                    fill, used, total = fill + take, used + take, total + take
                    # resume point: the next unused token (a finished document means the next one)
                    here = (doc, used) if used < len(tokens) else (doc + 1, 0)
                    if fill == shard_size:
                        flush(*here)
                    if max_tokens and total >= max_tokens:
                        stop = True
                        break
                doc += 1
                if stop:
                    break
            bar.update(total - before)
            bar.set_postfix_str(f"shard {len(progress['shards'])}, doc {doc:,}" + (f"/{n_docs:,}" if n_docs else ""))
            if stop:
                break
        if fill:
            flush(*here)  # the last, shorter shard
        if total == 0:
            raise UserError("the corpus has no documents")
        progress["finished"] = not stop  # a --max_tokens run can be continued later
        save_progress(out_dir, progress)
    except UnicodeDecodeError as e:  # (datasets reads a .jsonl's strings only here, batch by batch)
        bar.close()
        die(f"the corpus is not UTF-8 text (document {doc:,} or near it: {e.reason} at byte {e.start}); convert "
            "the files to UTF-8")
    except UserError as e:
        bar.close()  # first: the error line on a line of its own, not glued to the bar
        die(str(e))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    write_meta(out_dir, meta)
    # a shorter rerun (a smaller --max_tokens) leaves a longer run's later shards behind
    stale = sorted(set(map(os.path.basename, glob.glob(os.path.join(out_dir, "fineweb_*.bin"))))
                   - {s["file"] for s in progress["shards"]})
    if stale:
        print(f"warning: {out_dir} also holds {len(stale)} shards of an earlier, longer run ({stale[0]} ...): "
              "delete them, or rerun without --max_tokens")

    dt = time.time() - t0
    n = len(progress["shards"])
    print(f"wrote {total - done_tokens:,} tokens in {dt:.1f}s ({(total - done_tokens) / dt:,.0f} tokens/s); "
          f"{out_dir} has {n} shards (1 val, {n - 1} train), {total:,} tokens")
    if n == 1:
        print("note: there is only the val shard; training needs train shards: lower --shard_size")


if __name__ == "__main__":
    main()
