"""
Generate text from a trained model, printing it as it comes.

    python sample.py --start "First Citizen:"             # the newest out*/ckpt.pt
    python sample.py --out_dir=out-shakespeare-char-cpu --num_samples=3 --max_new_tokens=500
    python sample.py --init_from=gpt2 --start "The meaning of life is" --top_p=0.9
    python sample.py --init_from=HuggingFaceTB/SmolLM2-135M --start "The capital of France is"   # docs/llama.md
    python sample.py --start=FILE:prompt.txt               # the prompt from a file
    python sample.py --out_dir=out-alpaca --start "Name three primary colors."   # ask an SFT run
    python sample.py --out_dir=out-vision-shapes --image=pic.png --start "What color is the circle?"   # a vision run
    printf 'How many shapes?\nWhere is the red circle?\n' | python sample.py --out_dir=out-vision-shapes \
        --image=pic.png --chat                                            # questions about one picture

    printf 'Hi\nTell me more\n' | python sample.py --out_dir=out-alpaca --chat   # a conversation

A LoRA run's out_dir works as any other: its base is loaded and the adapter applied.
--instruct wraps --start in the Alpaca template as the instruction (prepare_alpaca.py), prints
only the response and ends it at <|endoftext|>; it is on by itself for a run fine-tuned on an
instruction (SFT) or preference dataset (--instruct=False to give the raw prompt).
"""

import os
import sys

from configurator import (UserError, autocast_context, configure, die, exit_on_ctrl_c, print_config, read_lines,
                          resolve_device, resolve_dtype)

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch

from checkpoint import checkpoint_path, load_model, newest_checkpoint
from dataloader import eot_of, get_tokenizer, with_bos

DEFAULTS = dict(
    out_dir="",  # a training run's folder (or one of its .pt files: RUN/ckpt_best.pt); empty = the newest out*/ckpt.pt here
    init_from="",  # or OpenAI's weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl; a local HF folder; a Llama's Hub name
    start="\n",  # the prompt; FILE:path reads it from a file
    num_samples=2,  # how many samples to draw
    max_new_tokens=300,  # tokens per sample
    temperature=0.8,  # < 1 sharper, > 1 more random, 0 = always the likeliest token
    top_k=200,  # sample only among the k likeliest tokens (0 = no limit)
    top_p=1.0,  # nucleus sampling: the smallest set of tokens with this much probability (1 = off)
    instruct=None,  # True: --start is an instruction, wrapped in the Alpaca template; None = True for SFT runs
    seed=1337,
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16
    compile=False,  # torch.compile the model (a minute of compiling first: pays off for long samples)
    chat=False,  # a conversation: each line of stdin is a turn, answered in the instruction template (/reset, /exit)
    image="",  # a picture file: a vision run (train_vision.py, --out_dir) answers --start (or each --chat line)
)


def main():
    cfg = configure(DEFAULTS)
    if cfg["temperature"] < 0 or cfg["top_k"] < 0 or not 0 < cfg["top_p"] <= 1:
        die(f"need temperature >= 0, top_k >= 0 (0 = no limit) and 0 < top_p <= 1; got temperature="
            f"{cfg['temperature']}, top_k={cfg['top_k']}, top_p={cfg['top_p']}")
    if cfg["num_samples"] < 1 or cfg["max_new_tokens"] < 1:
        die(f"--num_samples and --max_new_tokens must be at least 1, got {cfg['num_samples']} and {cfg['max_new_tokens']}")
    if cfg["chat"] and (cfg["start"] != DEFAULTS["start"] or cfg["num_samples"] != DEFAULTS["num_samples"]):
        die("--chat reads each turn from stdin and answers it once: drop --start and --num_samples")
    if cfg["init_from"] and cfg["out_dir"]:
        die(f"give --out_dir (a run of ours) or --init_from (OpenAI's weights, an HF folder), not both: "
            f"--out_dir={cfg['out_dir']} --init_from={cfg['init_from']}")
    if not 0 <= cfg["seed"] < 2**63:
        die(f"--seed must be a whole number from 0 to 2**63-1, got {cfg['seed']}")
    if cfg["instruct"] not in (None, True, False):
        die(f"--instruct must be True or False (or left out), got {cfg['instruct']!r}")
    device, device_type = resolve_device(cfg["device"])
    ptdtype = resolve_dtype(cfg["dtype"], device_type)
    print_config(cfg, file=sys.stderr)  # to stderr: stdout holds only the samples
    if cfg["image"]:  # images in, text out: vision.py's model answers the question in --start
        import vision
        try:
            return vision.sample(cfg, device, autocast_context(device_type, ptdtype))
        except UserError as e:
            die(str(e))
    try:
        if cfg["init_from"]:
            model, meta = load_model(init_from=cfg["init_from"], device=device)
            print(f"loaded {cfg['init_from']}", file=sys.stderr)
        else:
            out_dir = cfg["out_dir"]
            if not out_dir:
                path = newest_checkpoint()
                if path is None:
                    die("no out*/ckpt.pt here: train a model first (see README), or give --out_dir or --init_from=gpt2")
                out_dir = os.path.dirname(path)
            model, meta = load_model(out_dir=out_dir, device=device)
            print(f"loaded {checkpoint_path(out_dir)}", file=sys.stderr)
        encode, decode = get_tokenizer(meta)
        if cfg["chat"]:
            if eot_of(meta) is None:
                die("--chat needs a BPE model that ends its answers (an SFT or aligned run); this one is character-level")
            if meta.get("format") not in ("sft", "preference") and not meta.get("chat_template"):
                print("note: this model was not tuned on instructions: it continues text, it was never taught to "
                      "answer (fine-tune it with prepare_alpaca.py first)", file=sys.stderr)
            model.eval()
            return chat(model, meta, decode, cfg, autocast_context(device_type, ptdtype), device)
        start = cfg["start"]
        if start.startswith("FILE:"):
            path = start[len("FILE:"):]
            if not os.path.isfile(path):
                die(f"prompt file {path} not found")
            try:
                with open(path, encoding="utf-8") as f:
                    start = f.read()
            except UnicodeDecodeError:
                die(f"prompt file {path} is not UTF-8 text; save it as UTF-8")
        instruct = cfg["instruct"]
        if instruct is None:  # on when the checkpoint was fine-tuned on an instruction dataset
            instruct = meta.get("format") in ("sft", "preference")
        if instruct and meta["tokenizer"] == "char":
            die("--instruct wraps the prompt in an instruction template, which needs a BPE model; this one is "
                "character-level: leave --instruct out")
        if instruct:  # the template the run was fine-tuned with (a chat template, or Alpaca's)
            import prepare_alpaca
            start = prepare_alpaca.instruction_prompt(meta, start)
        start_ids = with_bos(meta, encode(start))
    except UserError as e:
        die(str(e))
    if not start_ids:
        die("the prompt is empty; give some text with --start")
    if len(start_ids) > model.config.block_size:
        print(f"note: the prompt has {len(start_ids)} tokens; the model sees only the last "
              f"{model.config.block_size}", file=sys.stderr)

    model.eval()
    if cfg["compile"]:
        # generate() runs hidden_states (everything but lm_head) once per token: compile that.
        # dynamic=True: one graph for every length, not a recompile per cache position
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
        print("compiling the model: the first tokens take a minute or more", file=sys.stderr, flush=True)
    torch.manual_seed(cfg["seed"])
    autocast = autocast_context(device_type, ptdtype)
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)
    eot = eot_of(meta)  # <|endoftext|>, a Llama tokenizer's eos, or None (characters)

    try:
        generate(model, x, cfg, decode, start, instruct, eot, autocast)
    except BrokenPipeError:  # `python sample.py ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        sys.exit(0)


def chat(model, meta, decode, cfg, autocast, device):
    """A conversation on stdin: every line is a turn of the user's, answered after the earlier
    turns and their answers, in the run's instruction template: a chat template renders the whole
    conversation at once (its bos and headers once, as the model was trained), Alpaca's template
    each turn, ended by the end marker. The answer is streamed and ends at the end marker. When the
    conversation outgrows block_size (with room for max_new_tokens), the oldest turns are dropped,
    said once. /reset forgets the conversation, /exit (or the end of stdin) ends it."""
    import prepare_alpaca
    from dataloader import encode_chat
    eot, block_size = eot_of(meta), model.config.block_size
    chat_template = (meta.get("template") or ("chat" if meta.get("chat_template") else "alpaca")) == "chat"
    typed = get_tokenizer(meta, specials=False)[0]  # what a user types is text: "</s>" is not the end marker

    def context(history, line):  # the token ids the model reads before its answer
        if chat_template:
            turns = [m for user, answer in history for m in ({"role": "user", "content": user},
                                                             {"role": "assistant", "content": decode(answer)})]
            return with_bos(meta, encode_chat(meta, turns + [{"role": "user", "content": line}]))
        # Alpaca's turn by turn, on purpose: each prompt encoded on its own, as every SFT example's
        # prompt was; the answers are the model's own tokens, the end marker an id, not text
        prompt = lambda user: typed(prepare_alpaca.instruction_prompt(meta, user))
        ids = [t for user, answer in history for t in prompt(user) + answer + [eot]]
        return with_bos(meta, ids + prompt(line))

    history, told = [], False  # history: (the user's line, the answer's token ids) of each earlier turn
    torch.manual_seed(cfg["seed"])
    for line in read_lines():
        if line == "/reset":
            history = []
            print("(the conversation is forgotten)", file=sys.stderr)
            continue
        ids = context(history, line)
        if len(ids) > block_size and not history:
            print(f"note: this turn is {len(ids)} tokens, more than the model's {block_size}: it reads only the last "
                  f"{block_size} (the template's start among what is cut)", file=sys.stderr)
        while history and len(ids) + cfg["max_new_tokens"] > block_size:
            history.pop(0)  # the oldest turn goes first
            ids = context(history, line)
            if not told:
                print(f"note: the conversation is longer than the model's {block_size} tokens: its oldest turns "
                      "are dropped", file=sys.stderr)
                told = True
        answer, printed = [], 0

        def on_token(tok):  # streamed as in generate() below
            nonlocal printed
            tok = tok.item()
            if tok != eot:
                answer.append(tok)
                text = decode(answer)
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[printed:])
                    sys.stdout.flush()
                    printed = len(text)

        with autocast:
            model.generate(torch.tensor([ids[-block_size:]], device=device), cfg["max_new_tokens"],
                           temperature=cfg["temperature"], top_k=cfg["top_k"] or None, top_p=cfg["top_p"],
                           on_token=on_token, stop_token=eot)
        sys.stdout.write(decode(answer)[printed:] + "\n")
        sys.stdout.flush()
        history.append((line, answer))


def generate(model, x, cfg, decode, start, instruct, eot, autocast):
    """Draw num_samples samples from the prompt x, each streamed to stdout as it is made."""
    for k in range(cfg["num_samples"]):
        # stream: decode the tokens so far and print what is new. Decoding the whole list
        # (not token by token) keeps multi-byte characters that BPE splits across tokens intact.
        new_ids, printed = [], 0

        def on_token(tok):
            nonlocal printed
            tok = tok.item()
            if tok == eot:  # the end marker: not text
                return
            new_ids.append(tok)
            text = decode(new_ids)
            if not text.endswith("\ufffd"):  # wait while a character is incomplete
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)

        if not instruct:  # an answer is printed alone, a continuation after its prompt
            sys.stdout.write(start)
        with autocast:
            # stop at the end marker for BPE models: what follows would be a new, unrelated document
            model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                           top_p=cfg["top_p"], on_token=on_token, stop_token=eot)
        sys.stdout.write(decode(new_ids)[printed:] + "\n")
        if k < cfg["num_samples"] - 1:
            sys.stdout.write("---------------\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
