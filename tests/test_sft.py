"""Instruction fine-tuning: prepare_alpaca.py, dataloader.SFTLoader, train.py on an SFT dataset,
model.generate's per-sequence stop, sample.py --instruct."""

import json
import os
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, needs_gpt2_bpe, read_log, run_script, torchrun
from checkpoint import make_checkpoint, save_checkpoint
from configurator import UserError
from dataloader import EOT, SFTLoader, read_sft, write_meta, write_sft, write_tokens
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# the template and prepare_alpaca.py


def test_template_is_the_published_alpaca_one():
    from prepare_alpaca import render_prompt
    # stanford_alpaca's PROMPT_DICT, written out here by hand, plus the newline after "### Response:"
    assert render_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert render_prompt("Name a colour.") == render_prompt("Name a colour.", "") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n")


RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate to French.", "input": "Good morning, café?", "output": "Bonjour, un café ? ☕"},
    {"instruction": "Quote the marker.", "output": "It is written <|endoftext|> in the text."},  # left out
    {"instruction": "Sum them: 1, 2.", "output": "3"},  # no "input" key
    {"instruction": "Say nothing.", "output": "  "},  # left out: an empty answer
    {"instruction": "Be verbose.", "input": "", "output": "word " * 400},  # too long for max_len=256: dropped
] + [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(15)]


@needs_gpt2_bpe
def test_prepare_splits_renders_and_drops_overlong(tmp_path, capsys):
    from prepare_alpaca import DEFAULTS, prepare, render_prompt
    from dataloader import get_gpt2_encoding
    path = tmp_path / "data.jsonl"
    path.write_text("\ufeff" + "\n".join(json.dumps(r) for r in RECORDS) + "\n\n")  # a byte-order mark, a blank line: fine
    out = str(tmp_path / "sft")
    prepare(dict(DEFAULTS, input=str(path), out_dir=out, max_len=256, val_fraction=0.2))
    printed = capsys.readouterr().out
    assert sum(map(int, re.findall(r"(\d+) longer than max_len\+1 = 257 dropped", printed))) == 1  # "word " * 400
    assert "left out 1 record(s) with an empty output" in printed
    assert "left out 1 record(s) with <|endoftext|> in the output" in printed
    assert json.load(open(os.path.join(out, "meta.json"))) == {"tokenizer": "gpt2", "format": "sft", "template": "alpaca"}

    dec = get_gpt2_encoding().decode
    expected = {(render_prompt(r["instruction"], r.get("input", "")), r["output"]) for r in RECORDS[:2] + RECORDS[3:4] + RECORDS[6:]}
    seen = []
    for split in ("train", "val"):
        tokens, index = read_sft(out, split)
        assert index[0, 0] == 0 and (index[1:, 0] == index[:-1, 0] + index[:-1, 2]).all()  # back to back
        assert index[-1, 0] + index[-1, 2] == len(tokens)
        for start, p, n in index.tolist():
            ex = tokens[start:start + n].tolist()
            assert ex[-1] == EOT and EOT not in ex[:-1]  # one end marker, at the end
            seen.append((dec(ex[:p]), dec(ex[p:-1])))  # prompt and response, decoded apart
    assert len(seen) == 18 and set(seen) == expected  # every kept record exactly once, nothing else


def test_malformed_records_name_their_place(tmp_path, capsys):
    from prepare_alpaca import load_records
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"instruction": "x", "output": 3}\n')
    with pytest.raises(SystemExit) as e:
        load_records(str(bad))
    assert e.value.code == 2 and "line 3" in capsys.readouterr().err
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(SystemExit):
        load_records(str(bad))
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    lst = tmp_path / "bad.json"
    lst.write_text(json.dumps([RECORDS[0], {"instruction": "", "output": "y"}]))
    with pytest.raises(SystemExit):
        load_records(str(lst))
    err = capsys.readouterr().err
    assert "record 1" in err and "'instruction'" in err


# -----------------------------------------------------------------------------
# the loader


def make_sft(data_dir, n_train=24, n_val=8, vocab=16, seed=0):
    """A char-level SFT dataset of random examples of very different lengths (prompts of 2-12
    tokens, responses of 1-10): small vocabulary, so models on it are fast."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        examples = [(rng.integers(0, vocab, rng.integers(2, 13)).tolist(), rng.integers(0, vocab, rng.integers(1, 11)).tolist())
                    for _ in range(n)]
        write_sft(data_dir, split, examples)
        splits[split] = examples
    write_meta(data_dir, {"tokenizer": "char", "chars": [chr(97 + i) for i in range(vocab)], "format": "sft"})
    return splits


def test_loader_batches_whole_examples_with_response_targets(tmp_path):
    d = str(tmp_path / "d")
    examples = make_sft(d)["train"]
    loader = SFTLoader(d, "train", 4, 200, shuffle=False)
    x, y = loader.next_batch()
    lengths = [len(p) + len(r) for p, r in examples[:4]]
    assert max(lengths) - 1 <= 64
    assert x.shape == y.shape == (4, 64)  # the longest, rounded up to a multiple of 64, not block_size
    assert SFTLoader(d, "train", 4, 32, shuffle=False).next_batch()[0].shape == (4, 32)  # at most block_size
    for i, (p, r) in enumerate(examples[:4]):
        tok = p + r
        n = len(tok)
        assert x[i, :n - 1].tolist() == tok[:-1]
        assert y[i, :len(p) - 1].eq(-1).all() and y[i, n - 1:].eq(-1).all()  # prompt and padding
        assert y[i, len(p) - 1:n - 1].tolist() == r  # exactly the response is a target
    with pytest.raises(UserError, match="max_len=8"):
        SFTLoader(d, "train", 4, 8)  # some examples are longer than block_size + 1


def test_too_few_examples_names_the_right_numbers(tmp_path):
    d = str(tmp_path / "d")
    make_sft(d, n_train=24, n_val=6)
    with pytest.raises(UserError) as e:  # validation: one batch of every rank, no accumulation
        SFTLoader(d, "val", 4, 32, rank=0, world_size=2, shuffle=False)
    assert "6 val examples, fewer than one batch needs (8 = batch_size 4 x 2 ranks)" in str(e.value)
    assert "total_batch_size" not in str(e.value)
    with pytest.raises(UserError) as e:
        SFTLoader(d, "train", 4, 32, world_size=2, grad_accum=4)
    assert "24 train examples, fewer than one step needs (32 = batch_size 4 x 2 ranks x 4 accumulation steps)" in str(e.value)


@pytest.mark.parametrize("group", [False, True])
def test_loader_ranks_epochs_and_resume(tmp_path, group):
    d = str(tmp_path / "d")
    make_sft(d, n_train=26)
    single = SFTLoader(d, "train", 3, 32, seed=5, grad_accum=2, group_by_length=group)
    ranks = [SFTLoader(d, "train", 3, 32, rank=r, world_size=2, seed=5, group_by_length=group) for r in range(2)]
    epochs = defaultdict(list)
    for _ in range(12):  # 26 // 6 = 4 steps per epoch (2 examples left over each time): 3 epochs
        batches, n_real = single.next_step()
        (a0, ya0, w0), (a1, ya1, w1) = batches
        (b0, yb0), (b1, yb1) = ranks[0].next_batch(), ranks[1].next_batch()
        assert all(torch.equal(*pair) for pair in ((a0, b0), (a1, b1), (ya0, yb0), (ya1, yb1)))  # 2 ranks = accumulation
        n_targets = int((ya0 != -1).sum() + (ya1 != -1).sum())  # the step's response tokens
        # each micro-batch weighs its share of them: the weighted losses add up to the step's mean
        assert (w0, w1) == (int((ya0 != -1).sum()) / n_targets, int((ya1 != -1).sum()) / n_targets)
        # every example ends in a response token: its length is where its last target is, plus one
        last = [int(row.nonzero().max()) + 1 for y in (ya0, ya1) for row in (y != -1)]
        assert n_real == sum(last)  # real tokens, the padding not counted
        rows = a0.tolist() + a1.tolist()
        epochs[single.epoch] += [tuple(row[:n]) for row, n in zip(rows, last)]  # each example's real tokens
    assert sorted(epochs) == [0, 1, 2]
    assert all(len(set(v)) == 24 for v in epochs.values())  # no example twice within an epoch
    assert epochs[0] != epochs[1]  # reshuffled
    state = single.state_dict()
    expected = [single.next_batch()[0] for _ in range(5)]
    # resumed with the other setting: the checkpoint's grouping wins, the batches go on as before
    fresh = SFTLoader(d, "train", 3, 32, seed=5, grad_accum=2, group_by_length=not group)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, fresh.next_batch()[0]) for a in expected)


def test_group_by_length_cuts_padding(tmp_path, monkeypatch):
    import dataloader
    monkeypatch.setattr(dataloader, "PAD_MULTIPLE", 1)  # these examples are short: no buckets, every length its own
    d = str(tmp_path / "d")
    make_sft(d, n_train=400)
    seen = {}
    for group in (False, True):
        loader = SFTLoader(d, "train", 8, 32, seed=1, group_by_length=group)
        computed, real, examples = 0, 0, []
        for _ in range(400 // 8):  # one epoch
            [(x, y, w)], n_real = loader.next_step()
            assert w == 1.0  # one micro-batch holds all of the step's targets
            computed, real = computed + x.numel(), real + n_real
            last = [int((row != -1).nonzero().max()) + 1 for row in y]  # each example's length - 1
            examples += [tuple(row[:n].tolist()) for row, n in zip(x, last)]
        assert loader.epoch == 0
        seen[group] = (computed, real, sorted(examples))
    # the same examples in the epoch, and far fewer padding positions computed
    assert seen[False][1:] == seen[True][1:]
    assert seen[True][0] < 0.8 * seen[False][0], (seen[True][0], seen[False][0])


# -----------------------------------------------------------------------------
# the loss, padding, and generation


def tiny_model(vocab=16, block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32)).eval()


def test_loss_is_response_only_and_padding_changes_nothing(tmp_path):
    d = str(tmp_path / "d")
    examples = make_sft(d, n_train=6)["train"]
    model = tiny_model()
    x, y = SFTLoader(d, "train", 6, 32, shuffle=False).next_batch()
    with torch.no_grad():
        logits, loss = model(x, y)  # train.py's loss of a micro-batch: the mean over its response tokens
        # the reference: each example alone, no padding, the cross-entropy of its response tokens
        total, count = 0.0, 0
        for i, (p, r) in enumerate(examples):
            tok = torch.tensor(p + r)
            alone, _ = model(tok[None, :-1])  # (1, n-1, V)
            assert torch.allclose(alone[0], logits[i, :len(tok) - 1], atol=1e-5)  # padding changes nothing
            logp = F.log_softmax(alone[0], dim=-1)
            for j in range(len(p), len(tok)):  # response token j, predicted at position j-1
                total -= logp[j - 1, tok[j]].item()
                count += 1
    assert count == sum(len(r) for _, r in examples)
    assert abs(loss.item() - total / count) < 1e-5

    # the data's boundary: a new last prompt token changes no target and so not the loss (the
    # inputs are kept as they were); a new first response token changes one target and the loss
    tokens, index = read_sft(d, "train")
    start, p, n = index[2].tolist()
    raw = np.array(tokens)
    for pos, changes in ((start + p - 1, False), (start + p, True)):
        edited = raw.copy()
        edited[pos] = (edited[pos] + 1) % 16
        write_tokens(os.path.join(d, "train.bin"), edited)
        _, y2 = SFTLoader(d, "train", 6, 32, shuffle=False).next_batch()
        with torch.no_grad():
            _, loss2 = model(x, y2)
        assert (y2 != y).sum().item() == int(changes)
        assert (abs(loss2.item() - loss.item()) > 1e-4) == changes
    write_tokens(os.path.join(d, "train.bin"), raw)


def test_generate_stops_each_sequence_at_the_stop_token():
    model = tiny_model(vocab=16, block_size=64)
    prompt = torch.tensor([[1, 2, 3], [9, 8, 7]])
    sample = lambda **kw: model.generate(prompt, 20, generator=torch.Generator().manual_seed(0), **kw)[:, 3:]
    free = sample().tolist()  # no stop token
    # a token the two rows first sample at different steps: each stops on its own there
    firsts = [{t: row.index(t) for t in row} for row in free]
    stop = next(t for t in firsts[0] if t in firsts[1] and firsts[0][t] != firsts[1][t])
    a, b = firsts[0][stop], firsts[1][stop]
    out = sample(stop_token=stop)
    assert out.size(1) == max(a, b) + 1  # ends when the later row has stopped
    for row, k in ((0, a), (1, b)):
        assert out[row, :k + 1].tolist() == free[row][:k + 1]  # the same tokens up to its stop...
        assert out[row, k:].eq(stop).all()  # ...then only the stop token


# -----------------------------------------------------------------------------
# train.py on an SFT dataset



@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9"))])
def test_train_loss_accumulation_ddp_and_resume(tmp_path, optimizer):
    """The step's loss is the mean over all its response tokens, and the same with two
    accumulated micro-batches as with two ranks; resuming continues exactly (with either
    optimizer)."""
    splits = make_sft(str(tmp_path / "data" / "sft"), n_train=8, n_val=8)
    base = tiny_model()
    os.makedirs(tmp_path / "base")
    meta = json.load(open(tmp_path / "data" / "sft" / "meta.json"))
    save_checkpoint(make_checkpoint(base, meta, {}), str(tmp_path / "base" / "ckpt.pt"))
    common = ["--dataset=sft", "--init_from=base", "--block_size=32", "--device=cpu", "--dtype=float32",
              "--batch_size=4", "--total_batch_size=8",  # 8 examples a step: the whole train split
              "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--log_interval=1", "--warmup_iters=1",
              "--learning_rate=1e-2", "--min_lr=1e-3", f"--optimizer={optimizer}"]
    train = os.path.join(ROOT, "train.py")
    # one process, 2 accumulation steps: 2 steps, stop, resume for 2 more; val on all 8 examples
    p = run_script([train] + common + ["--out_dir=acc", "--eval_iters=2", "--max_iters=2"], cwd=tmp_path)
    assert "8 examples per step = 4 x 1 ranks x 2 accumulation" in p.stdout
    run_script([train] + common + ["--out_dir=acc", "--eval_iters=2", "--init_from=resume"], cwd=tmp_path)
    # two processes, no accumulation, in one go
    p = torchrun([train] + common + ["--out_dir=ddp", "--eval_iters=1"], cwd=tmp_path)
    assert "4 x 2 ranks x 1 accumulation" in p.stdout

    acc, ddp = tmp_path / "acc" / "log.txt", tmp_path / "ddp" / "log.txt"
    for stream, steps in (("train", [0, 1, 2, 3]), ("val", [0, 2, 4])):
        a, b = read_log(acc, stream), read_log(ddp, stream)
        assert sorted(a) == sorted(b) == steps
        for step in steps:
            assert abs(a[step] - b[step]) < 1e-5 * a[step], (stream, step, a[step], b[step])
    assert read_log(ddp, "epoch") == {0: 0, 1: 1, 2: 2, 3: 3}  # one step is one epoch here

    # step 0 is the untouched base: its loss is the mean over every response token of the 8
    # examples (not the mean of the micro-batches' means, which weighs tokens unequally)
    with torch.no_grad():
        for split, stream in (("train", "train"), ("val", "val")):
            total, count = 0.0, 0
            for prompt, response in splits[split]:
                tok = torch.tensor(prompt + response)
                logits, _ = base(tok[None, :-1])
                total += F.cross_entropy(logits[0, len(prompt) - 1:], tok[len(prompt):], reduction="sum").item()
                count += len(response)
            logged = read_log(acc, stream)[0]
            assert abs(logged - total / count) < 1e-5 * logged, split


# -----------------------------------------------------------------------------
# end to end: a synthetic instruction task, learned


LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ["Ann", "Bob", "Carl", "Dora", "Eve", "Finn", "Gus", "Hana"]  # of 1 or 2 tokens: prompts differ in length


def task(name, letter):
    return {"instruction": f"{name} asks you to repeat this letter: {letter}", "input": "", "output": letter}


def held_out_accuracy(model, records, meta):
    """Greedy answers to the records' instructions, batched by prompt length; the share that is
    exactly the expected output followed by the end marker."""
    from dataloader import eot_of, get_tokenizer, with_bos
    from prepare_alpaca import render_prompt
    encode, decode = get_tokenizer(meta)
    eot = eot_of(meta)
    groups = defaultdict(list)
    for r in records:
        prompt = with_bos(meta, encode(render_prompt(r["instruction"], r["input"])))
        groups[len(prompt)].append((prompt, r["output"]))
    right = 0
    for n, group in groups.items():
        out = model.generate(torch.tensor([p for p, _ in group]), 4, temperature=0, stop_token=eot)[:, n:]
        for row, expected in zip(out.tolist(), group):
            right += eot in row and decode(row[:row.index(eot)]) == expected[1]
    return right / len(records)


@pytest.mark.slow
def test_end_to_end_learns_an_instruction_task(tmp_path):
    from checkpoint import load_model
    from conftest import make_llama_folder
    # "repeat this letter", asked by different people: every letter and every name is seen in
    # training, 48 of the 208 (name, letter) pairs only at test time. Copying needs attention from
    # the answer back over the template to the letter, which a 1-layer model from scratch finds
    # in a few hundred steps. The tokens are those of a small BPE tokenizer trained in the test
    # (conftest.make_llama_folder, 400 ids; Alpaca's template kept): with GPT-2's 50K-way lm_head
    # at every position the same run took ~85 s of this suite's time, with 320 ids a few seconds.
    from prepare_alpaca import render_prompt
    pairs = [(n, c) for c in LETTERS for n in NAMES]
    # the tokenizer learns its merges from the template and the names, as a real one has seen English
    folder, _ = make_llama_folder(tmp_path / "tok", text=" ".join(render_prompt(task(n, "")["instruction"])
                                                                    for n in NAMES) * 20, vocab_size=400)
    np.random.default_rng(0).shuffle(pairs)
    train_pairs, test_pairs = pairs[:160], pairs[160:]
    with open(tmp_path / "task.jsonl", "w") as f:
        for n, c in train_pairs:
            f.write(json.dumps(task(n, c)) + "\n")
    run_script([os.path.join(ROOT, "prepare_alpaca.py"), "--input=task.jsonl", "--out_dir=data/task", "--max_len=48",
                "--val_fraction=0.1", f"--tokenizer={folder}", "--template=alpaca"], cwd=tmp_path)
    run_script([os.path.join(ROOT, "train.py"), "--dataset=task", "--out_dir=out", "--n_layer=1", "--n_head=8",
                "--n_embd=64", "--block_size=48", "--batch_size=8", "--device=cpu", "--dtype=float32",
                "--max_iters=250", "--warmup_iters=0", "--learning_rate=1e-2", "--decay_lr=False", "--grad_clip=0.0",
                "--weight_decay=0.0", "--eval_interval=0", "--eval_iters=2", "--log_interval=50"], cwd=tmp_path)

    test = [task(n, c) for n, c in test_pairs]
    trained, meta = load_model(out_dir=str(tmp_path / "out"))
    assert meta["format"] == "sft" and meta["template"] == "alpaca"
    untrained = GPT(GPTConfig(**vars(trained.config)))
    acc, acc0 = held_out_accuracy(trained, test, meta), held_out_accuracy(untrained, test, meta)
    assert acc >= 0.6 and acc0 <= 0.05, (acc, acc0)  # guessing a letter: 0.04

    # sample.py: instruct mode by itself for an SFT run; prints the answer alone, and stops there
    n, c = next(pair for pair in test_pairs if held_out_accuracy(trained, [task(*pair)], meta) == 1)
    p = run_script([os.path.join(ROOT, "sample.py"), "--out_dir=out", f"--start={n} asks you to repeat this letter: {c}",
                    "--num_samples=1", "--max_new_tokens=20", "--temperature=0", "--device=cpu"], cwd=tmp_path)
    assert p.stdout == f"{c}\n"  # no template, no end marker, nothing after it


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prepared_examples_are_the_whole_texts_tokens_with_a_sentencepiece_tokenizer(tmp_path, capsys, template):
    """prepare_alpaca.py and prepare_preferences.py on a tokenizer laid out as Llama 2's (a '\u2581'
    before every text it is given): every example is bos + the tokens of the whole text prompt +
    answer, split after the prompt's own tokens, + eos. Encoding the answer alone would differ."""
    import prepare_alpaca
    import prepare_preferences
    from conftest import make_llama_folder
    from dataloader import get_hf_tokenizer, hf_tokenizer_meta
    folder, _ = make_llama_folder(tmp_path / "sp", sentencepiece=True)
    tok, meta = get_hf_tokenizer(folder), hf_tokenizer_meta(folder)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    records = [r for r in RECORDS if r["output"].strip() and "<|endoftext|>" not in r["output"]][:8]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": "No. " + r["output"]} for r in records]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    common = dict(tokenizer=folder, template=template, max_len=1024, val_fraction=0.25)
    sft = prepare_alpaca.prepare(dict(prepare_alpaca.DEFAULTS, input=str(tmp_path / "sft.jsonl"),
                                      out_dir=str(tmp_path / "d_sft"), **common))
    prefs = prepare_preferences.prepare(dict(prepare_preferences.DEFAULTS, input=str(tmp_path / "pairs.jsonl"),
                                             out_dir=str(tmp_path / "d_prefs"), **common))
    capsys.readouterr()
    expect, alone_differs = set(), False
    for r in records:  # (the SFT prompt has the record's input, the preference prompt not)
        render = lambda inp: prepare_alpaca.instruction_prompt(dict(meta, template=template), r["instruction"], inp)
        answers = (r["output"], "No. " + r["output"])
        for prompt, answer in [(render(inp), a) for inp in {r.get("input", ""), ""} for a in answers]:
            head, whole = enc(prompt), enc(prompt + answer)
            assert whole[:len(head)] == head  # no merge across the join in this tokenizer
            expect.add((tuple(meta["bos"] + head), tuple(whole[len(head):] + [meta["eot"]])))
            alone_differs |= whole[len(head):] != enc(answer)
    assert alone_differs
    for out in (sft, prefs):
        for split in ("train", "val"):
            tokens, index = read_sft(out, split)
            for start, p, n in index.tolist():
                ex = tokens[start:start + n].tolist()
                assert (tuple(ex[:p]), tuple(ex[p:])) in expect, (out, split)
