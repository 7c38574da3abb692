"""
HellaSwag: does the model know how an everyday scene goes on?

    python hellaswag.py --init_from=gpt2                 # OpenAI's 124M model
    python hellaswag.py --out_dir=out --limit=500        # a run of ours, first 500 examples
    python hellaswag.py --out_dir=out-shakespeare-char-cpu --val_dataset=shakespeare_char
                                                         # a plain val loss instead

Each example is a context ("A man is sitting on a roof. he") and four endings, one of them
right. We score it completion style, the way GPT-2's and GPT-3's papers did: the model reads
context + " " + ending for each of the four endings, and the ending whose tokens it finds
least surprising wins. Two ways to add up the surprise:

    acc        sum of the ending's token losses    (favours short endings)
    acc_norm   mean of the ending's token losses   (the number usually quoted for GPT-2)

Random guessing gets 0.25. The data is the jsonl files of the dataset's own repository
(rowanz/hellaswag); the val split has 10,042 examples, the test split's labels are not public.

train.py renders the examples once with load_examples() and calls evaluate() every
hellaswag_interval steps; evaluate() splits the examples across DDP ranks and all-reduces
the counts, so every rank gets the same numbers.
"""

import json
import math
import os
import time
from contextlib import nullcontext

from configurator import (UserError, atomic_write, autocast_context, configure, die, exit_on_ctrl_c, print_config,
                          resolve_device, resolve_dtype)

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch
from torch.nn import functional as F
from tqdm import tqdm

from checkpoint import check_same_tokenizer, load_model
from dataloader import DataLoader, encode_pair, get_tokenizer, read_meta, with_bos
from model import unwrap

# -----------------------------------------------------------------------------
# settings (python hellaswag.py [config/FILE.py] [--key=value ...])

DEFAULTS = dict(
    init_from="gpt2",  # OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local HF folder; unused with out_dir
    out_dir="",  # a run of ours: load out_dir/ckpt.pt, or the .pt file it names (LoRA runs: base + adapter), not init_from
    split="val",  # which HellaSwag split: val (10,042 examples) or train; test has no public labels
    data_file="",  # a local jsonl in HellaSwag's format instead of the downloaded split
    limit=0,  # score only the first N examples (0 = all): for a quick look
    batch_size=8,  # examples per forward pass (4 rows each); with val_dataset: sequences per batch
    device="auto",  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # auto (bf16 on GPUs that have it, else fp16; fp32 on cpu/mps), float32, bfloat16, float16
    compile=False,  # torch.compile the model (worth it for a full run on a GPU)
    val_dataset="",  # instead of HellaSwag: report the val loss on data/<val_dataset>
    eval_iters=50,  # with val_dataset: batches to average over (0 = the whole val split once)
    block_size=0,  # with val_dataset: sequence length (0 = the model's block_size)
)

DATA_DIR = os.path.join("data", "hellaswag")
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"

# -----------------------------------------------------------------------------
# the data


def download(split):
    """Fetch hellaswag_<split>.jsonl into data/hellaswag/ once; return its path."""
    path = os.path.join(DATA_DIR, f"hellaswag_{split}.jsonl")
    if os.path.isfile(path):
        return path  # cached
    import requests

    url = URL.format(split=split)
    offline = f"could not download {url} ({{}}): be online once, or pass --data_file=PATH to a local copy"
    try:
        r = requests.get(url, stream=True, timeout=30)
        r.raise_for_status()
    except requests.RequestException as e:
        raise UserError(offline.format(type(e).__name__)) from None
    # atomic: an interrupted download is never taken for the cached file. (requests' errors are
    # OSErrors, which atomic_write would report as a disk problem: they are told apart here.)
    with r, atomic_write(path) as f:
        total = int(r.headers.get("content-length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            try:
                for chunk in r.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
            except requests.RequestException as e:
                raise UserError(offline.format(type(e).__name__)) from None
    return path


def load_examples(split="val", data_file=None, limit=None, meta=None):
    """Read and tokenize HellaSwag examples: a list of dicts

        ctx       the context's tokens (after the tokenizer's bos, for a Llama's: its texts start so)
        endings   four token lists, each the tokens of " " + ending after the context's
        label     the index of the right ending (0..3)

    from data_file, or from the split's downloaded file. limit keeps the first N. meta: the
    model's tokenizer (a checkpoint's meta); None = GPT-2 BPE."""
    meta = meta or {"tokenizer": "gpt2"}
    if meta.get("tokenizer") == "char":
        raise UserError("HellaSwag is English text: a character-level model cannot read it (its characters are "
                        "Shakespeare's); score a BPE model, or use --val_dataset=NAME for a val loss")
    if split == "test" and not data_file:
        raise UserError("HellaSwag's test labels are not public, so it cannot be scored here: use split=val")
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown HellaSwag split {split!r}: use val or train")
    path = data_file or download(split)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (--data_file must be a jsonl in HellaSwag's format)")
    encode = get_tokenizer(meta)[0]
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit and len(examples) == limit:
                break
            if not line.strip():
                continue  # a blank line (e.g. at the end) is not an example
            where = f"{path} line {lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(ex, dict):
                raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
            if "label" not in ex:
                raise UserError(f"{where}: no label (HellaSwag's test labels are not public: use the val split)")
            ctx, endings, label = ex.get("ctx"), ex.get("endings"), ex["label"]
            if not isinstance(ctx, str) or not ctx.strip():
                raise UserError(f"{where}: ctx must be a non-empty string, got {ctx!r}")
            if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) and e.strip() for e in endings)):
                raise UserError(f"{where}: endings must be a list of 4 strings, none empty, got {endings!r}")
            # the real files store label as an int; exports (e.g. Hugging Face's) as a string
            if isinstance(label, str) and label.strip().isdigit():
                label = int(label)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
                raise UserError(f"{where}: label must be 0, 1, 2 or 3, got {ex['label']!r}")
            # an ending is its own word after the context, " " + ending, tokenized as it is read in
            # the whole text (encode_pair: a SentencePiece tokenizer would add a token alone)
            pairs = [encode_pair(encode, ctx, " " + e) for e in endings]
            examples.append(dict(ctx=with_bos(meta, pairs[0][0]), endings=[e for _, e in pairs], label=label))
    if not examples:
        raise UserError(f"{path}: no examples in the file")
    return examples


# -----------------------------------------------------------------------------
# scoring


def ending_losses(model, examples, device, autocast_ctx=nullcontext()):
    """Run n examples through the model in one forward pass; return (sum_loss, n_tokens),
    each (n, 4) float32 on the CPU: the summed loss of each ending's tokens and their count.

    Each example makes four rows, context + ending. The rows are padded on the right to one
    length: under the causal mask a token never sees what comes after it, so padding changes
    no real position and needs no attention mask; the targets of padding (and of the context)
    are -1, so they are not scored. A row longer than the model's block_size loses its oldest
    context tokens."""
    gpt = unwrap(model)
    block_size = gpt.config.block_size
    rows = [(ex["ctx"], end) for ex in examples for end in ex["endings"]]  # 4n rows
    T = min(max(len(c) + len(e) for c, e in rows) - 1, block_size)  # inputs drop the last token
    idx = torch.full((len(rows), T), 0, dtype=torch.long)  # (4n, T) inputs, padded with id 0 (any real id will do: never scored)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)  # (4n, T) -1 = not scored
    for r, (ctx, end) in enumerate(rows):
        tokens = ctx + end
        x, y = tokens[:-1], tokens[1:]  # position t predicts token t+1
        first = len(ctx) - 1  # y[first] is the ending's first token
        cut = max(0, len(x) - block_size)  # crop from the left to fit the context window
        x, y, first = x[cut:], y[cut:], max(0, first - cut)
        idx[r, :len(x)] = torch.tensor(x)
        targets[r, first:len(y)] = torch.tensor(y[first:])
    idx, targets = idx.to(device), targets.to(device)
    scored = targets != -1  # (4n, T): the endings' tokens, about a third of the positions
    with torch.no_grad(), autocast_ctx:
        # lm_head on the scored positions only: the context and padding positions would cost
        # as much and be thrown away (on a CPU this made the whole evaluation ~2x faster)
        logits = gpt.logits_at(idx, scored)  # (n_scored, V)
    losses = torch.zeros(targets.shape, device=logits.device)  # (4n, T) fp32
    losses[scored] = F.cross_entropy(logits.float(), targets[scored], reduction="none")
    sum_loss = losses.sum(dim=1).view(-1, 4).cpu()  # (n, 4)
    n_tokens = scored.sum(dim=1).view(-1, 4).float().cpu()  # (n, 4)
    return sum_loss, n_tokens


def evaluate(model, examples, device, batch_size, autocast_ctx=nullcontext(), rank=0, world_size=1,
             progress=False, stop=None):
    """HellaSwag accuracy: dict(acc, acc_norm, n). With DDP, rank r scores
    examples[r::world_size] and the counts are summed over ranks, so all ranks return the
    numbers of the whole set. The model may be wrapped in DDP and/or torch.compile; either way
    the scoring runs the plain model's logits_at, which runs hidden_states (compile that
    method itself for speed, as main() does). An FSDP model scores too, its weights gathered
    block by block as in training. `stop`, if given, is asked before every 16th batch (every
    rank asks it equally often); when it says True the evaluation ends and returns None."""
    # not DDP's forward: it broadcasts buffers (RoPE's tables) every call, a collective, and
    # ranks holding different numbers of batches would wait on each other forever
    model = unwrap(model)
    mine = examples[rank::world_size]
    was_training = model.training
    model.eval()  # no dropout
    counts = [0, 0, 0]  # correct by summed loss, correct by mean loss, examples
    bar = tqdm(total=len(mine), unit="ex", desc="hellaswag", disable=not progress)
    per_rank = -(-len(examples) // world_size)  # the most any rank has: ranks with one fewer loop as often
    try:
        for i in range(0, per_rank, batch_size):
            if stop is not None and i % (16 * batch_size) == 0 and stop():  # every 16 batches: it may cost a sync
                return None
            batch = mine[i:i + batch_size]
            if not batch:
                # under FSDP every forward gathers weights from all ranks, so a rank with
                # nothing left still runs one (on the first example) and counts nothing
                ending_losses(model, examples[:1], device, autocast_ctx)
                continue
            sum_loss, n_tokens = ending_losses(model, batch, device, autocast_ctx)  # (n, 4) each
            labels = torch.tensor([ex["label"] for ex in batch])  # (n,)
            counts[0] += (sum_loss.argmin(dim=1) == labels).sum().item()
            counts[1] += ((sum_loss / n_tokens).argmin(dim=1) == labels).sum().item()
            counts[2] += len(batch)
            bar.update(len(batch))
            bar.set_postfix(acc_norm=f"{counts[1] / counts[2]:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        total = torch.tensor(counts, dtype=torch.long, device=device)  # on the device: nccl needs it there
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        counts = total.tolist()
    n = counts[2]
    return dict(acc=counts[0] / max(n, 1), acc_norm=counts[1] / max(n, 1), n=n)


def val_loss(model, data_dir, batch_size, block_size, eval_iters, device, autocast_ctx=nullcontext()):
    """The mean loss over the first eval_iters batches of data_dir's val split, always the
    same batches (0 = every full batch of the split once). Returns (loss, n_tokens)."""
    loader = DataLoader(data_dir, "val", batch_size, block_size, shuffle=False)
    # full batches in one pass: each file holds (n - 1) // T sequences, cut into batches of B
    available = sum((n - 1) // block_size // batch_size for n in loader.lengths)
    steps = min(eval_iters, available) if eval_iters > 0 else available
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in tqdm(range(steps), unit="batch", desc="val loss", disable=steps < 10):
            x, y = loader.next_batch()
            with torch.no_grad(), autocast_ctx:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()  # every batch has B*T tokens: the mean of means is the mean
    finally:
        model.train(was_training)
    return total / steps, steps * batch_size * block_size


# -----------------------------------------------------------------------------
# the command line


def main():
    cfg = configure(DEFAULTS)
    print_config(cfg)
    device, device_type = resolve_device(cfg["device"])
    # evaluation has no backward pass, so fp16 needs no GradScaler here
    ctx = autocast_context(device_type, resolve_dtype(cfg["dtype"], device_type))
    if cfg["batch_size"] < 1 or cfg["eval_iters"] < 0 or cfg["limit"] < 0 or cfg["block_size"] < 0:
        die(f"need batch_size >= 1 and eval_iters, limit, block_size >= 0; got {cfg['batch_size']}, "
            f"{cfg['eval_iters']}, {cfg['limit']}, {cfg['block_size']}")

    try:
        if cfg["out_dir"]:
            model, meta = load_model(out_dir=cfg["out_dir"], device=device)
        else:
            model, meta = load_model(init_from=cfg["init_from"], device=device)
        source = cfg["out_dir"] or cfg["init_from"]
        if cfg["compile"] and cfg["val_dataset"]:
            model = torch.compile(model)
        elif cfg["compile"]:  # HellaSwag runs the model up to lm_head (see ending_losses): compile that
            model.hidden_states = torch.compile(model.hidden_states, dynamic=True)

        if cfg["val_dataset"]:
            data_dir = os.path.join("data", cfg["val_dataset"])
            data_meta = read_meta(data_dir)
            if data_meta.get("format") == "preference":  # each prompt twice, the rejected answers among the text
                raise UserError(f"data/{cfg['val_dataset']} holds preference pairs: its val loss would score the "
                                "rejected answers as text to learn; align.py reports a preference run's val loss")
            # the same token ids must mean the same text for the model and the data
            check_same_tokenizer(meta, data_meta, source, cfg["val_dataset"])
            block_size = cfg["block_size"] or unwrap(model).config.block_size
            if block_size > unwrap(model).config.block_size:
                die(f"--block_size={block_size} is longer than the model's {unwrap(model).config.block_size}")
            loss, n_tokens = val_loss(model, data_dir, cfg["batch_size"], block_size, cfg["eval_iters"], device, ctx)
            print(f"val loss {loss:.4f} over {n_tokens:,} tokens ({source} on {data_dir})")
            return

        if meta.get("tokenizer") == "gpt2" and unwrap(model).config.vocab_size < 50257:
            die(f"{source} has a vocabulary of {unwrap(model).config.vocab_size} tokens, fewer than GPT-2 BPE's 50257")
        examples = load_examples(cfg["split"], cfg["data_file"] or None, cfg["limit"] or None, meta)
        block_size = unwrap(model).config.block_size
        long = sum(len(ex["ctx"]) + max(map(len, ex["endings"])) - 1 > block_size for ex in examples)
        if long:  # scored all the same, as lm-evaluation-harness does: the oldest context tokens are dropped
            print(f"note: {long:,} example(s) are longer than the model's block_size={block_size}: their contexts are "
                  "cropped from the left")
        t0 = time.time()
        result = evaluate(model, examples, device, cfg["batch_size"], ctx, progress=True)
        dt = time.time() - t0
        n = result["n"]
        # the standard error of an accuracy over n examples, so two runs can be told apart
        se = math.sqrt(result["acc_norm"] * (1 - result["acc_norm"]) / n)
        print(f"hellaswag {cfg['split'] if not cfg['data_file'] else cfg['data_file']}: "
              f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f} (+-{se:.4f})  over {n:,} examples  "
              f"({n / dt:.1f} examples/s, {source})")
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
