"""
Prepare an instruction data set for supervised fine-tuning (SFT): Stanford Alpaca's 52K
examples, or your own.

    python prepare_alpaca.py                        # download alpaca_data.json -> data/alpaca/
    python prepare_alpaca.py --input=mine.jsonl --out_dir=data/mine    # your own examples

An example is a record {"instruction": ..., "input": ..., "output": ...} ("input" may be empty
or missing); --input takes a JSON list of them or a JSONL file, one a line. Each is rendered
with the Alpaca prompt template (render_prompt) and becomes

    prompt tokens  |  response tokens  <|endoftext|>
    (no loss)      |  (the loss is here)

The <|endoftext|> teaches the model to stop: sample.py --instruct ends the answer there.
The response's tokens are those of the whole text prompt + response after the prompt's own
(dataloader.encode_pair): what the model reads in running text, also with a SentencePiece-family
tokenizer, while the prompt is tokenized exactly as sample.py tokenizes a question.

--tokenizer=FOLDER (or a Hub name) prepares the data for a Llama-family model instead
(docs/llama.md): its tokenizer, its bos before each prompt, its eos in place of <|endoftext|>,
and its chat template in place of Alpaca's when it has one (--template=alpaca keeps Alpaca's).

A seeded random --val_fraction of the examples is val, the rest train. Written to --out_dir:
train.bin and val.bin (token files, the examples back to back), train_index.npy and
val_index.npy ((start, prompt_len, length) per example) and meta.json (format "sft",
template "alpaca"); see dataloader.py. train.py recognises the format and batches whole
examples, with the loss on the responses only.

Examples longer than --max_len + 1 tokens are DROPPED, not truncated: cutting the prompt would
cut the template or the question the response answers, cutting the response would teach the
model to stop mid-sentence without its <|endoftext|>. Set --max_len to the block_size you will
train with (an example's last token, the <|endoftext|>, is only a target, hence the + 1).
"""

import json
import os

from configurator import UserError, atomic_write, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import numpy as np
import requests
from tqdm import tqdm

from dataloader import (EOT, encode_pair, get_gpt2_encoding, get_hf_tokenizer, get_tokenizer, hf_tokenizer_meta,
                        publish_dataset, staging, with_bos, write_meta, write_sft)

DEFAULTS = dict(
    input="",  # a local JSON list or JSONL of {"instruction", "input", "output"}; empty = download Alpaca
    out_dir="data/alpaca",  # where the token files, indexes and meta.json go
    url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",  # Alpaca's 52K
    val_fraction=0.05,  # this share of the examples, drawn at random, is the val split
    max_len=512,  # the block_size you will train with: longer examples are dropped (see above)
    seed=1337,  # the train/val split is drawn with this seed
    tokenizer="gpt2",  # gpt2 (tiktoken's BPE) or a Hugging Face model's: its folder or Hub name (docs/llama.md)
    template="auto",  # auto: the tokenizer's chat template if it has one, else alpaca | alpaca | chat
    overwrite=False,  # replace another dataset already in out_dir (the same one, prepared again, is kept)
)

# The Alpaca prompt template, word for word as in the stanford_alpaca repository (train.py's
# PROMPT_DICT): one form for examples with an input, one for those without. Both end at
# "### Response:"; we add a newline after it, as the Alpaca README lays it out (and alpaca-lora
# and torchtune render it): LLaMA's tokenizer starts the response with a space of its own,
# GPT-2's BPE would glue the first word to the colon.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def render_prompt(instruction, input=""):
    """The prompt the model sees before its response: the template with or without input."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input) + "\n"
    return PROMPT_NO_INPUT.format(instruction=instruction) + "\n"


def instruction_prompt(meta, instruction, input=""):
    """The prompt text before a response in meta's template: an SFT dataset's "template", or for
    a model that names none, its tokenizer's chat template if it has one (a Llama-family
    instruct model's), else Alpaca's. The chat template gets one user turn (the input after the
    instruction) and the start of the assistant's turn."""
    template = meta.get("template") or ("chat" if meta.get("chat_template") else "alpaca")
    if template != "chat":
        return render_prompt(instruction, input)
    tok = get_hf_tokenizer(meta["path"])
    content = instruction + (f"\n\n{input}" if input else "")
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


# -----------------------------------------------------------------------------
# reading the records


def read_json_records(path):
    """The items of a JSON list or a JSONL file (one record a line, blank lines skipped), each with
    where it is for error lines: [(item, "PATH: line N" or "PATH: record I"), ...]. A file that is
    missing, not UTF-8 or not valid JSON ends the run with one line (prepare_preferences.py too)."""
    if not os.path.isfile(path):
        die(f"--input file {path} not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors write one) is skipped
            text = f.read()
    except UnicodeDecodeError:
        die(f"{path} is not UTF-8 text (JSON files are UTF-8); convert it")
    if text.lstrip().startswith("["):  # one JSON list
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            die(f"{path}: not valid JSON at line {e.lineno}: {e.msg}")
        return [(item, f"{path}: record {i} (counting from 0)") for i, item in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}: line {lineno}"))
        except json.JSONDecodeError as e:
            die(f"{path}: line {lineno} is not valid JSON ({e.msg}); expected one record a line")
    return out


def load_records(path, end_text="<|endoftext|>"):
    """A JSON list or a JSONL file -> ([(instruction, input, output), ...], {reason: records
    left out}). A bad record is an error naming its line (JSONL) or index (JSON list) and what
    is wrong with it; one with nothing to learn from is left out and counted."""
    items = read_json_records(path)
    records, skipped = [], {"an empty output": 0, f"{end_text} in the output": 0}
    for item, loc in items:
        if not isinstance(item, dict):
            die(f"{loc}: expected an object with instruction, input and output, got {type(item).__name__}")
        instruction, inp, output = item.get("instruction"), item.get("input", ""), item.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            die(f"{loc}: 'instruction' is missing or not a non-empty string")
        if not isinstance(inp, str):
            die(f"{loc}: 'input' must be a string (or left out), got {type(inp).__name__}")
        if not isinstance(output, str):
            die(f"{loc}: 'output' is missing or not a string")
        if not output.strip():  # an empty answer teaches only to stop at once
            skipped["an empty output"] += 1
        elif end_text in output:  # the end marker's text inside an answer: the model would learn to write it
            skipped[f"{end_text} in the output"] += 1
        else:
            records.append((instruction, inp, output))
    if not records:
        left_out = ", ".join(f"{n} with {why}" for why, n in skipped.items() if n)
        die(f"{path} holds no records" + (f" to train on ({left_out})" if left_out else ""))
    return records, skipped


def download(url):
    """Alpaca's alpaca_data.json, fetched once into data/ and read from there afterwards."""
    cache = os.path.join("data", "alpaca_data.json")
    if not os.path.isfile(cache):
        print(f"downloading {url}")
        try:
            r = requests.get(url, timeout=60)
            r.raise_for_status()
        except requests.RequestException as e:
            die(f"download failed ({type(e).__name__}); give a local copy with --input=PATH")
        with atomic_write(cache) as f:  # an interrupted download is never taken for the cache
            f.write(r.content)
    return cache


# -----------------------------------------------------------------------------


def instruction_tokenizer(cfg, data_format):
    """(meta, encode, eot, end_text) for --tokenizer and --template: GPT-2's BPE, or a Hugging Face
    model's (its end marker, its bos, its chat template); meta names the format ("sft" here,
    "preference" for prepare_preferences.py) and the template the prompts are rendered in."""
    if cfg["template"] not in ("auto", "alpaca", "chat"):
        die(f"--template must be auto, alpaca or chat, got {cfg['template']!r}")
    if cfg["tokenizer"] == "gpt2":
        enc = get_gpt2_encoding()
        # encode_ordinary: a literal "<|endoftext|>" in the data stays text, not the marker
        meta, encode, eot, end_text = {"tokenizer": "gpt2"}, enc.encode_ordinary, EOT, "<|endoftext|>"
    else:
        meta = hf_tokenizer_meta(cfg["tokenizer"])
        encode, eot, end_text = get_tokenizer(meta)[0], meta["eot"], get_hf_tokenizer(meta["path"]).eos_token
    template = cfg["template"] if cfg["template"] != "auto" else ("chat" if meta.get("chat_template") else "alpaca")
    if template == "chat" and not meta.get("chat_template"):
        die(f"--template=chat needs a tokenizer with a chat template; {cfg['tokenizer']} has none: use --template=alpaca")
    return {**meta, "format": data_format, "template": template}, encode, eot, end_text


def prepare(cfg):
    if not 0 < cfg["val_fraction"] < 1:
        die(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    meta, encode, eot, end_text = instruction_tokenizer(cfg, "sft")
    records, skipped = load_records(cfg["input"] or download(cfg["url"]), end_text)
    for reason, n in skipped.items():
        if n:
            print(f"left out {n:,} record(s) with {reason}")

    # a seeded split of the records (not of the tokens): whole examples go to train or val
    n_val = max(1, round(len(records) * cfg["val_fraction"]))
    if len(records) - n_val < 1:
        die(f"{len(records)} examples are too few to split into train and val; give more")
    order = np.random.default_rng(cfg["seed"]).permutation(len(records))
    splits = {"train": order[n_val:], "val": order[:n_val]}

    out_dir, max_len = cfg["out_dir"], cfg["max_len"]
    stats = {}
    for split, ids in splits.items():
        examples, dropped = [], 0
        for i in tqdm(sorted(ids.tolist()), desc=split, unit="ex"):  # file order within a split
            instruction, inp, output = records[i]
            prompt, response = encode_pair(encode, instruction_prompt(meta, instruction, inp), output)
            prompt, response = with_bos(meta, prompt), response + [eot]
            if len(prompt) + len(response) > max_len + 1:
                dropped += 1
                continue
            examples.append((prompt, response))
        if not examples:
            die(f"every {split} example is longer than --max_len={max_len} tokens; raise it")
        stats[split] = (examples, dropped)
    with staging(out_dir) as tmp:  # written beside out_dir, then moved in: never over another dataset unasked
        for split, (examples, _) in stats.items():
            write_sft(tmp, split, examples)
        write_meta(tmp, meta)
        publish_dataset(tmp, out_dir, cfg["overwrite"])

    for split, (examples, dropped) in stats.items():
        n_prompt = sum(len(p) for p, _ in examples)
        n_response = sum(len(r) for _, r in examples)
        longest = max(len(p) + len(r) for p, r in examples)
        print(f"{split}: {len(examples):,} examples, {n_prompt + n_response:,} tokens ({n_prompt:,} prompt, "
              f"{n_response:,} response incl. {end_text}), mean {(n_prompt + n_response) / len(examples):.0f} "
              f"and longest {longest} tokens; {dropped:,} longer than max_len+1 = {max_len + 1} dropped")
    all_dropped = sum(d for _, d in stats.values())
    if all_dropped > 0.05 * len(records):
        print(f"note: {all_dropped / len(records):.0%} of the examples were dropped; a larger --max_len "
              "(and block_size) keeps them")
    prompt, response = stats["train"][0][0]
    decode = get_tokenizer(meta)[1]
    print(f"the first train example, as the model sees it:\n{decode(prompt)}{decode(response)}")
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
