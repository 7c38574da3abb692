"""hellaswag.py: the batched scores against a one-example-at-a-time reference, the file
checks, the split across ranks, and the command line (HellaSwag and the plain val loss)."""

import json
import math
import os
import random
import sys

import pytest
import torch
from torch.nn import functional as F

from conftest import needs_gpt2_bpe, run_script
import hellaswag
from checkpoint import make_checkpoint, save_checkpoint
from configurator import UserError
from dataloader import write_meta, write_tokens
from model import GPT, GPTConfig

WORDS = ("the man woman dog ball roof ladder kitchen knife slowly then quickly picks up puts down "
         "walks runs into out of a an some water paint brush camera smiles talks").split()


def make_jsonl(path, n, seed=0):
    """n examples in HellaSwag's real format, with contexts and endings of uneven lengths."""
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for i in range(n):
            ctx_a, ctx_b = say(3, 12).capitalize() + ".", say(1, 4)
            f.write(json.dumps(dict(ind=i, activity_label="Painting", ctx_a=ctx_a, ctx_b=ctx_b,
                                    ctx=ctx_a + " " + ctx_b, split="val", split_type="indomain",
                                    label=rng.randint(0, 3), endings=[say(1, 15) + "." for _ in range(4)],
                                    source_id=f"activitynet~v_{i}")) + "\n")
    return str(path)


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**args, **kw}))


def reference_losses(model, examples):
    """The same losses, one ending at a time, no padding: (n, 4) summed and (n, 4) mean."""
    model.eval()
    sums, means = [], []
    with torch.no_grad():
        for ex in examples:
            s, m = [], []
            for end in ex["endings"]:
                row = torch.tensor([ex["ctx"] + end])  # (1, L)
                logits, _ = model(row[:, :-1])  # (1, L-1, V)
                c = len(ex["ctx"])  # logits at c-1 .. L-2 predict the ending's tokens
                loss = F.cross_entropy(logits[0, c - 1:], row[0, c:], reduction="none")
                s.append(loss.sum().item())
                m.append(loss.mean().item())
            sums.append(s)
            means.append(m)
    return torch.tensor(sums), torch.tensor(means)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from threads, and on a busy machine they wait for each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = make_jsonl(tmp_path_factory.mktemp("hs") / "val.jsonl", 7)
    return hellaswag.load_examples(data_file=path)


@pytest.fixture(scope="module")
def reference(examples):
    """A tiny GPT with dropout, and its one-at-a-time losses: (model, sums (7, 4), means (7, 4))."""
    model = tiny_gpt(dropout=0.1)
    return (model, *reference_losses(model, examples))


@needs_gpt2_bpe
def test_rendering(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    path = make_jsonl(tmp_path / "v.jsonl", 3)
    lines = [json.loads(l) for l in open(path)]
    exs = hellaswag.load_examples(data_file=path)
    assert len(exs) == 3 and len(hellaswag.load_examples(data_file=path, limit=2)) == 2
    for ex, line in zip(exs, lines):
        assert ex["label"] == line["label"]
        assert enc.decode(ex["ctx"]) == line["ctx"]
        # each ending is a word of its own after the context: a leading space; with GPT-2's BPE the
        # tokens in the whole text are those of the ending alone
        assert [enc.decode(e) for e in ex["endings"]] == [" " + e for e in line["endings"]]
        assert ex["endings"] == [enc.encode(" " + e) for e in line["endings"]]


@pytest.mark.parametrize("sentencepiece", [False, True])
def test_endings_are_scored_as_transformers_scores_them_in_the_whole_text(tmp_path, sentencepiece):
    """On a Llama folder, byte-level (SmolLM2-style) or laid out as Llama 2's SentencePiece BPE
    (a '▁' before every text): each ending's loss equals transformers' model's on the tokens of
    the whole text, bos + ctx + " " + ending, after the context's. The byte-level tokens are those
    of the ending alone; the SentencePiece ones are not (the test would fail on them otherwise)."""
    from conftest import make_llama_folder
    from dataloader import hf_tokenizer_meta
    from transformers import AutoTokenizer
    folder, hf = make_llama_folder(tmp_path / "m", sentencepiece=sentencepiece)
    tok = AutoTokenizer.from_pretrained(folder)
    path = make_jsonl(tmp_path / "v.jsonl", 6)
    lines = [json.loads(l) for l in open(path)]
    exs = hellaswag.load_examples(data_file=path, meta=hf_tokenizer_meta(folder))
    model = GPT.from_pretrained(folder)
    sum_loss, n_tokens = hellaswag.ending_losses(model, exs, "cpu")
    alone_differs = False
    for i, line in enumerate(lines):
        ctx = tok(line["ctx"])["input_ids"]  # with the bos
        for j, ending in enumerate(line["endings"]):
            whole = tok(line["ctx"] + " " + ending)["input_ids"]
            cont = whole[len(ctx):]
            assert exs[i]["ctx"] == ctx and exs[i]["endings"][j] == cont
            alone_differs |= cont != tok(" " + ending, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
            want = F.cross_entropy(logits, torch.tensor(cont), reduction="sum").item()
            assert sum_loss[i, j].item() == pytest.approx(want, rel=1e-4) and n_tokens[i, j] == len(cont)
    assert alone_differs == sentencepiece


@needs_gpt2_bpe
@pytest.mark.parametrize("batch_size", [1, 3, 7])  # 3 does not divide the 7 examples
def test_batched_equals_one_at_a_time(examples, reference, batch_size):
    model, ref_sums, ref_means = reference
    model.train()  # evaluate() must switch dropout off, and back on after
    lengths = {len(ex["ctx"]) + len(e) for ex in examples for e in ex["endings"]}
    assert len(lengths) > 5  # the rows really are of uneven lengths, so padding is exercised
    sums, counts = [], []
    for i in range(0, len(examples), batch_size):
        s, c = hellaswag.ending_losses(model.eval(), examples[i:i + batch_size], "cpu")
        sums.append(s)
        counts.append(c)
    sums, counts = torch.cat(sums), torch.cat(counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sums / counts, ref_means, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == [[len(e) for e in ex["endings"]] for ex in examples]

    model.train()
    result = hellaswag.evaluate(model, examples, "cpu", batch_size)
    assert model.training  # the caller's mode is restored
    labels = torch.tensor([ex["label"] for ex in examples])
    acc, acc_norm = (ref_sums.argmin(1) == labels).sum().item(), (ref_means.argmin(1) == labels).sum().item()
    assert result == dict(acc=acc / 7, acc_norm=acc_norm / 7, n=7)


@needs_gpt2_bpe
def test_long_rows_are_cropped_to_block_size(examples):
    # a model with a short context sees only the last block_size tokens of each row
    model = tiny_gpt(block_size=12).eval()
    s, c = hellaswag.ending_losses(model, examples[:2], "cpu")
    ex = examples[1]
    for j, end in enumerate(ex["endings"]):
        row = torch.tensor(ex["ctx"] + end)
        x, y = row[:-1][-12:], row[1:][-12:]  # the last 12 positions
        n_end = min(len(end), 12)
        with torch.no_grad():
            logits, _ = model(x[None])
        want = F.cross_entropy(logits[0, -n_end:], y[-n_end:], reduction="sum")
        assert c[1, j].item() == n_end
        torch.testing.assert_close(s[1, j], want, rtol=1e-4, atol=1e-4)


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is the same everywhere: a token's loss is
    -log p(token), whatever comes before it."""

    def __init__(self, logp):
        super().__init__()
        self.logp = logp
        self.config = GPTConfig(block_size=64)

    def logits_at(self, idx, where):  # (B, T), (B, T) bool -> (n, V): the same distribution at every position
        self.ran_in_training_mode = self.training
        return self.logp.expand(int(where.sum()), -1)


@needs_gpt2_bpe
def test_acc_and_acc_norm_disagree_where_they_should(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    short, long_ = " cat", " the the the the the the"
    assert len(enc.encode(short)) == 1 and enc.encode(long_) == enc.encode(" the") * 6
    # short: 1 token of loss 3 (sum 3, mean 3); long: 6 tokens of loss 1 (sum 6, mean 1).
    # Every other token shares the rest of the probability (a loss of about 11.4 each), so
    # the other two endings are far worse either way.
    V, p_short, p_the = 50304, math.exp(-3.0), math.exp(-1.0)
    logp = torch.full((V,), math.log((1 - p_short - p_the) / (V - 2)))
    logp[enc.encode(short)[0]], logp[enc.encode(" the")[0]] = math.log(p_short), math.log(p_the)
    path = tmp_path / "v.jsonl"
    with open(path, "w") as f:
        for label in (0, 1):  # the right answer is the short ending, then the long one
            f.write(json.dumps(dict(ctx="A man walks.", label=label,
                                    endings=["cat", "the the the the the the", "xylophone", "quorum"])) + "\n")
    exs = hellaswag.load_examples(data_file=str(path))
    model = FixedLogits(logp).train()
    # summed loss picks the short ending (3 < 6), mean loss the long one (1 < 3)
    assert hellaswag.evaluate(model, exs[:1], "cpu", 2) == dict(acc=1.0, acc_norm=0.0, n=1)
    assert hellaswag.evaluate(model, exs[1:], "cpu", 2) == dict(acc=0.0, acc_norm=1.0, n=1)
    assert not model.ran_in_training_mode and model.training  # eval mode inside, the caller's after
    s, c = hellaswag.ending_losses(model, exs, "cpu")
    torch.testing.assert_close(s[0, :2], torch.tensor([3.0, 6.0]), atol=1e-3, rtol=0)
    assert c[0, :2].tolist() == [1.0, 6.0]  # the context's tokens are not scored


@needs_gpt2_bpe
def test_ranks_split_the_examples_and_sum_to_the_whole(examples):
    model = tiny_gpt()
    whole = hellaswag.evaluate(model, examples, "cpu", 2)
    parts = [hellaswag.evaluate(model, examples, "cpu", 2, rank=r, world_size=2) for r in range(2)]
    assert [p["n"] for p in parts] == [4, 3]  # 7 examples: rank 0 takes 0,2,4,6, rank 1 takes 1,3,5
    for key in ("acc", "acc_norm"):
        assert round(sum(p[key] * p["n"] for p in parts)) == round(whole[key] * 7)


@needs_gpt2_bpe
def test_a_ddp_wrapped_model_in_a_process_group(examples, tmp_path):
    # a one-process gloo group: enough for a real DDP wrapper (two processes cost ~15 s of
    # CPU for importing torch alone; the 2-process run belongs to train.py's tests)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = tiny_gpt(rope=True)  # RoPE's tables are buffers, which DDP broadcasts every forward
    whole = hellaswag.evaluate(model, examples, "cpu", 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        assert hellaswag.evaluate(ddp, examples, "cpu", 2) == whole
        assert ddp.training
    finally:
        dist.destroy_process_group()


@needs_gpt2_bpe
@pytest.mark.parametrize("line, message", [
    ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "endings must be a list of 4 strings"),
    ('{"ctx": "A man", "endings": ["a", "b", " ", "d"], "label": 0}', "endings must be a list of 4 strings, none empty"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "label must be 0, 1, 2 or 3, got 4"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "x"}', "label must be 0, 1, 2 or 3"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"]}', "no label"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1', "not valid JSON"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', "ctx must be a non-empty string"),
])
def test_a_bad_line_names_its_file_and_number(tmp_path, line, message):
    path = make_jsonl(tmp_path / "v.jsonl", 3)
    with open(path, "a") as f:
        f.write("\n" + line + "\n")  # after a blank line: line 5
    with pytest.raises(UserError) as e:
        hellaswag.load_examples(data_file=path)
    assert f"{path} line 5: " in str(e.value) and message in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    assert len(hellaswag.load_examples(data_file=path, limit=3)) == 3  # a limit stops before it


# -----------------------------------------------------------------------------
# the command line


def save_run(out_dir, model, meta):
    save_checkpoint(make_checkpoint(model, meta, {}, step=0), os.path.join(out_dir, "ckpt.pt"))


def run_main(monkeypatch, capsys, args, cwd=None):
    """hellaswag.main() in this process (no torch import to wait for): (exit code, stdout, stderr)."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["hellaswag.py"] + args)
    code = 0
    try:
        hellaswag.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@needs_gpt2_bpe
def test_cli_scores_a_checkpoint_of_ours(tmp_path):
    model = tiny_gpt()
    save_run(tmp_path / "out", model, {"tokenizer": "gpt2"})
    path = make_jsonl(tmp_path / "val.jsonl", 7)
    # once as a real script, as a user runs it
    p = run_script(["hellaswag.py", f"--out_dir={tmp_path / 'out'}", f"--data_file={path}",
                    "--batch_size=3", "--device=cpu", "--limit=6"])
    line = [l for l in p.stdout.splitlines() if l.startswith("hellaswag")][-1]
    want6 = hellaswag.evaluate(model, hellaswag.load_examples(data_file=path, limit=6), "cpu", 6)
    assert f"acc {want6['acc']:.4f}  acc_norm {want6['acc_norm']:.4f}" in line and "over 6 examples" in line


def test_cli_refuses_a_char_level_checkpoint_and_reports_its_val_loss(tmp_path, monkeypatch, capsys):
    # a char-level run: its tokens are characters, which HellaSwag cannot be put into
    chars = sorted(set("hello world, how are you?\n"))
    model = tiny_gpt(vocab_size=len(chars), block_size=16)
    out = str(tmp_path / "out")
    save_run(out, model, {"tokenizer": "char", "chars": chars})
    code, _, err = run_main(monkeypatch, capsys, [f"--out_dir={out}", "--data_file=x.jsonl"])
    assert code == 2 and "character-level model cannot read it" in err and len(err.strip().splitlines()) == 1

    # the plain val loss on a dataset folder, against the same batches computed here
    g = torch.Generator().manual_seed(1)
    val = torch.randint(len(chars), (1000,), generator=g)
    data = tmp_path / "data" / "tiny"
    write_tokens(str(data / "val.bin"), val.numpy())
    write_meta(str(data), {"tokenizer": "char", "chars": chars})
    code, stdout, _ = run_main(monkeypatch, capsys, [f"--out_dir={out}", "--val_dataset=tiny", "--eval_iters=3",
                                                     "--batch_size=4", "--device=cpu"], cwd=tmp_path)
    line = [l for l in stdout.splitlines() if l.startswith("val loss")][-1]
    got = float(line.split()[2])
    # the first 3 batches of 4 consecutive 16-token sequences (shuffle=False), in order
    x = val[:3 * 4 * 16].view(3 * 4, 16)
    y = val[1:3 * 4 * 16 + 1].view(3 * 4, 16)
    with torch.no_grad():
        want = F.cross_entropy(model.eval()(x)[0].reshape(-1, len(chars)), y.reshape(-1)).item()
    assert code == 0 and abs(got - want) < 2e-4 and " over 192 tokens" in line
    # eval_iters=0: every full batch once (1000 tokens: 62 sequences of 16, 15 batches of 4)
    code, stdout, _ = run_main(monkeypatch, capsys, [f"--out_dir={out}", "--val_dataset=tiny", "--eval_iters=0",
                                                     "--batch_size=4", "--device=cpu"])
    assert code == 0 and f"over {15 * 4 * 16:,} tokens" in stdout

    # a dataset of another tokenizer is refused, in one line
    write_meta(str(data), {"tokenizer": "gpt2"})
    code, _, err = run_main(monkeypatch, capsys, [f"--out_dir={out}", "--val_dataset=tiny"])
    assert code == 2 and "data/tiny uses gpt2" in err and len(err.strip().splitlines()) == 1
