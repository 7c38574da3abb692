"""align.py: DPO and the reward model against hand computations, the start (policy = reference),
response-only scoring, DDP = accumulation, exact resume, and a synthetic preference task whose
preference an independent function checks."""

import json
import math
import os
import random
import sys

import pytest
import torch
from torch.nn import functional as F

import align
from conftest import ROOT, WORDS, make_llama_folder, read_log, run_script, torchrun
from dataloader import SFTLoader
from model import GPT, GPTConfig


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()


def batch(B=3, L=12, seed=0):
    """(2B, L) inputs and targets shaped as the pair loader makes them: a prompt (targets -1),
    an answer, padding (-1); rows [0, B) chosen, [B, 2B) rejected."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (2 * B, L), generator=g)
    y = torch.full((2 * B, L), -1)
    for i in range(2 * B):
        p, n = 2 + i % 3, L - (i % 4)  # prompt length, real length
        y[i, p - 1:n - 1] = torch.randint(0, 50, (n - p,), generator=g)
    return x, y


def loop_logps(model, x, y):
    """Summed log-probs of the answer tokens, one position at a time: the reference."""
    with torch.no_grad():
        logp = F.log_softmax(model(x)[0].float(), dim=-1)
    out = []
    for i in range(x.size(0)):
        total = 0.0
        for t in range(x.size(1)):
            if y[i, t] != -1:
                total += logp[i, t, y[i, t]].item()
        out.append(total)
    return torch.tensor(out)


def test_sequence_logps_score_only_the_answer_tokens():
    model = tiny()
    x, y = batch()
    with torch.no_grad():
        got = align.sequence_logps(model, x, y)
    torch.testing.assert_close(got, loop_logps(model, x, y), atol=1e-4, rtol=1e-5)
    # the padding after an answer changes nothing (causal attention, never a target)
    pad = torch.zeros_like(y, dtype=torch.bool)
    for i in range(y.size(0)):
        last = int((y[i] != -1).nonzero().max())
        pad[i, last + 1:] = True
    x3 = torch.where(pad, (x + 7) % 50, x)
    with torch.no_grad():
        torch.testing.assert_close(align.sequence_logps(model, x3, y), got)


def test_dpo_loss_equals_a_hand_computation():
    policy, ref = tiny(), tiny()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x, y = batch(B=4, seed=1)
    beta = 0.3
    pi, rf = loop_logps(policy, x, y), loop_logps(ref, x, y)
    losses, right, margins = [], 0, []
    for i in range(4):  # pair i: row i chosen, row 4 + i rejected
        h = beta * ((pi[i] - rf[i]) - (pi[4 + i] - rf[4 + i])).item()
        losses.append(math.log(1 + math.exp(-h)))  # -log sigmoid(h)
        right += h > 0
        margins.append(h)
    with torch.no_grad():
        loss, stats = align.pair_loss(dict(method="dpo", beta=beta), policy,
                                      lambda a, b: align.token_logps(ref, a, b), x, y)
    assert loss.item() == pytest.approx(sum(losses) / 4, rel=1e-4)
    assert stats["acc"].item() == right / 4 and stats["margin"].item() == pytest.approx(sum(margins) / 4, rel=1e-3, abs=1e-6)


def test_at_the_start_the_policy_is_the_reference():
    """DPO's step 0, with a frozen copy and with LoRA's adapters switched off: loss log 2, margins 0."""
    import lora
    x, y = batch(seed=2)
    for use_lora in (False, True):
        model = tiny()
        if use_lora:
            lora.apply_lora(model, rank=2, alpha=4, verbose=False)
            with torch.no_grad():  # adapters that do something, so that switching them off matters
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        cfg = dict(method="dpo", beta=0.1, lora_rank=2 if use_lora else 0)
        ref = align.make_reference(cfg, model, None)
        with torch.no_grad():
            loss, stats = align.pair_loss(cfg, model, ref, x, y)
        if use_lora:  # the reference is the base: not the model with its adapters
            assert stats["margin"].abs().item() > 0
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.zero_()
                loss, stats = align.pair_loss(cfg, model, ref, x, y)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and stats["margin"].item() == 0.0


def test_reward_model_reads_the_last_answer_token_and_starts_at_log_2():
    model = align.add_head(tiny())
    scorer = align.Scorer(model)
    x, y = batch(seed=3)
    with torch.no_grad():
        r = scorer(x, y)
        assert torch.equal(r, torch.zeros(6))  # a zero head: every reward 0, Bradley-Terry loss log 2
        loss, _ = align.reward_loss(r[:3], r[3:])
        assert loss.item() == pytest.approx(math.log(2))
        model.reward_head.weight.normal_()
        r = scorer(x, y)
        h = model.hidden_states(x)
        for i in range(6):
            last = int((y[i] != -1).nonzero().max())
            assert r[i].item() == pytest.approx((h[i, last] @ model.reward_head.weight[0]).item(), rel=1e-5)


def test_pair_loader_keeps_pairs_together(tmp_path):
    from dataloader import write_sft
    # pair i: prompt [1, 2, i], chosen [10 + i, 0], rejected [30 + i, 40, 0]
    examples = [ex for i in range(6) for ex in (([1, 2, i], [10 + i, 0]), ([1, 2, i], [30 + i, 40, 0]))]
    write_sft(str(tmp_path), "train", examples)
    loader = SFTLoader(str(tmp_path), "train", 2, 8, pairs=True, seed=0)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape[0] == 4
        for i in range(2):  # row i chosen, row 2 + i rejected, of the same prompt
            assert x[i, 2] == x[2 + i, 2] and y[i, 2] == 10 + x[i, 2] and y[2 + i, 2] == 30 + x[i, 2]
    # a crafted set whose pair 3 has the same answer twice (prepare_preferences.py refuses such pairs): one line
    same = [ex for i in range(6) for ex in (([1, 2, i], [10 + i, 0]), ([1, 2, i], [10 + i, 0] if i == 3 else [30 + i, 0]))]
    write_sft(str(tmp_path), "val", same)
    from configurator import UserError
    with pytest.raises(UserError, match="1 pair.s. have the same chosen and rejected answer .the first: pair 3"):
        SFTLoader(str(tmp_path), "val", 2, 8, pairs=True)


# -----------------------------------------------------------------------------
# end to end: a synthetic preference whose truth a function checks


def ends_with_king(text):
    return text.strip().endswith("king.")


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    folder, _ = make_llama_folder(d / "llama")
    rng = random.Random(0)
    with open(d / "pairs.jsonl", "w") as f:
        for _ in range(120):
            words = " ".join(rng.choice(WORDS) for _ in range(4))
            f.write(json.dumps({"prompt": f"Tell me about the {rng.choice(WORDS)}.", "chosen": words + " king.",
                                "rejected": words + " war."}) + "\n")
    run_script([os.path.join(ROOT, "prepare_preferences.py"), "--input=pairs.jsonl", "--out_dir=data/prefs",
                f"--tokenizer={folder}", "--max_len=64", "--val_fraction=0.1"], cwd=d)
    # an SFT model that answers in the format, with either ending half of the time (PPO's start)
    with open(d / "pairs.jsonl") as f, open(d / "sft.jsonl", "w") as g:
        for i, line in enumerate(f):
            pair = json.loads(line)
            g.write(json.dumps({"instruction": pair["prompt"], "output": pair["chosen" if i % 2 else "rejected"]}) + "\n")
    run_script([os.path.join(ROOT, "prepare_alpaca.py"), "--input=sft.jsonl", "--out_dir=data/sft",
                f"--tokenizer={folder}", "--max_len=64", "--val_fraction=0.2"], cwd=d)
    run_script([os.path.join(ROOT, "train.py"), f"--init_from={folder}", "--dataset=sft", "--out_dir=sft", "--block_size=64",
                "--batch_size=16", "--max_iters=150", "--eval_interval=150", "--eval_iters=2", "--log_interval=50",
                "--learning_rate=3e-3", "--warmup_iters=20", "--device=cpu"], cwd=d)
    return d, folder


ALIGN = ["--dataset=prefs", "--block_size=64", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
         "--learning_rate=1e-3", "--warmup_iters=2", "--device=cpu"]


def final_weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_dpo_resume_is_exact_and_ddp_equals_accumulation(pref_dir):
    d, folder = pref_dir
    py = lambda *args: run_script([os.path.join(ROOT, "align.py"), *args], cwd=d)
    py(f"--init_from={folder}", "--out_dir=whole", "--max_iters=6", "--eval_interval=3", *ALIGN)
    py(f"--init_from={folder}", "--out_dir=parts", "--max_iters=3", "--eval_interval=3", *ALIGN)
    py("--init_from=resume", "--out_dir=parts", "--max_iters=5", "--eval_interval=3", *ALIGN)
    py("--init_from=resume", "--out_dir=parts", "--max_iters=6", "--eval_interval=3", *ALIGN)  # a resumed run resumed
    a, b = final_weights(d / "whole/ckpt.pt"), final_weights(d / "parts/ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert read_log(d / "whole/log.txt", "train") == read_log(d / "parts/log.txt", "train")
    # 2 ranks x 4 pairs = 1 rank x 2 micro-steps of 4 pairs
    py(f"--init_from={folder}", "--out_dir=accum", "--max_iters=3", "--eval_interval=3", "--total_batch_size=8", *ALIGN)
    torchrun([os.path.join(ROOT, "align.py"), f"--init_from={folder}", "--out_dir=ddp", "--max_iters=3",
              "--eval_interval=3", *ALIGN], cwd=d)
    a, b = final_weights(d / "accum/ckpt.pt"), final_weights(d / "ddp/ckpt.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    losses_a, losses_b = read_log(d / "accum/log.txt", "train"), read_log(d / "ddp/log.txt", "train")
    assert losses_a.keys() == losses_b.keys() and all(losses_a[k] == pytest.approx(losses_b[k], abs=1e-5) for k in losses_a)
    # FSDP (the policy and the reference sharded): 2 steps, then resumed for the third; the same
    # training as one process, up to the order of float additions; its checkpoint is a whole one
    fsdp = [os.path.join(ROOT, "align.py"), "--out_dir=fsdp", "--eval_interval=3", "--fsdp", *ALIGN]
    p = torchrun(fsdp + [f"--init_from={folder}", "--max_iters=2"], cwd=d)
    assert "FSDP: the policy and the reference sharded over 2 ranks" in p.stdout
    torchrun(fsdp + ["--init_from=resume", "--max_iters=3"], cwd=d)
    c = final_weights(d / "fsdp/ckpt.pt")
    assert c.keys() == a.keys() and all(torch.allclose(a[k], c[k], atol=1e-6, rtol=0) for k in a)
    for stream in ("train", "val", "val_acc"):
        one, two = read_log(d / "accum/log.txt", stream), read_log(d / "fsdp/log.txt", stream)
        assert one.keys() <= two.keys() and all(one[k] == pytest.approx(two[k], abs=1e-5) for k in one), stream  # (+ step 2's val)


@pytest.mark.slow
def test_dpo_and_reward_model_learn_the_preference(pref_dir):
    d, folder = pref_dir
    py = lambda script, *args: run_script([os.path.join(ROOT, script), *args], cwd=d)
    py("align.py", "--method=reward", f"--init_from={folder}", "--out_dir=rm", "--max_iters=20", "--eval_interval=10",
       *ALIGN)
    val_acc = read_log(d / "rm/log.txt", "val_acc")
    assert val_acc[0] == 0.0 and val_acc[20] == 1.0  # ties at the start (zero head), every pair right at the end
    rm = torch.load(d / "rm/ckpt.pt", weights_only=True)
    assert "reward_head.weight" in rm["model"]
    out = py("sample.py", "--out_dir=rm", "--start=The king", "--max_new_tokens=3", "--num_samples=1", "--device=cpu",
             "--instruct=False")  # the reward model's checkpoint is still a GPT every script reads
    assert out.stdout.startswith("The king")

    py("align.py", "--method=dpo", f"--init_from={folder}", "--out_dir=dpo", "--max_iters=40", "--eval_interval=20",
       *ALIGN)
    val = read_log(d / "dpo/log.txt", "val")
    assert val[0] == pytest.approx(math.log(2), abs=1e-4) and val[40] < 0.2
    # held-out prompts, greedy: the aligned model ends its answers with "king." far more than the start did
    from checkpoint import load_model
    from dataloader import get_tokenizer, with_bos
    import prepare_alpaca
    share = {}
    for name, kw in (("start", dict(init_from=folder)), ("dpo", dict(out_dir=str(d / "dpo")))):
        model, meta = load_model(**kw)
        meta = meta if name == "dpo" else json.load(open(d / "data/prefs/meta.json"))
        encode, decode = get_tokenizer(meta)
        hits = 0
        for w in WORDS[:8]:
            ids = with_bos(meta, encode(prepare_alpaca.instruction_prompt(meta, f"Tell me about the {w}.")))
            out = model.eval().generate(torch.tensor([ids]), 12, temperature=0, stop_token=meta["eot"])[0, len(ids):]
            hits += ends_with_king(decode([t for t in out.tolist() if t != meta["eot"]]))
        share[name] = hits / 8
    assert share["dpo"] >= share["start"] + 0.5, share


def test_bad_input_is_one_line(pref_dir, tmp_path):
    d, folder = pref_dir
    cases = [
        ('{"prompt": "a", "chosen": "b"}\n', "expected an object with string prompt, chosen and rejected"),
        ('{"prompt": "a", "chosen": "", "rejected": "c"}\n', "must all be non-empty"),
        ('{"prompt": "a", "chosen": "same", "rejected": "same "}\n', "the same text"),
    ]
    for i, (text, words) in enumerate(cases):
        (tmp_path / f"bad{i}.jsonl").write_text(text)
        p = run_script([os.path.join(ROOT, "prepare_preferences.py"), f"--input=bad{i}.jsonl", f"--out_dir=data/b{i}",
                        f"--tokenizer={folder}"], cwd=tmp_path, check=False)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / f"data/b{i}").exists()  # nothing written
    # a dataset of another format: an SFT set is not preference pairs
    os.makedirs(tmp_path / "data/sft")
    (tmp_path / "data/sft/meta.json").write_text('{"tokenizer": "gpt2", "format": "sft"}')
    p = run_script([os.path.join(ROOT, "align.py"), f"--init_from={folder}", "--dataset=sft", "--device=cpu"],
                   cwd=tmp_path, check=False)
    assert p.returncode == 2 and "not a preference dataset" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run_script([os.path.join(ROOT, "align.py"), "--method=kto", f"--init_from={folder}", "--dataset=prefs"],
                   cwd=d, check=False)
    assert p.returncode == 2 and "dpo, reward or ppo" in p.stderr
    p = run_script([os.path.join(ROOT, "align.py"), "--method=ppo", f"--init_from={folder}", "--dataset=prefs"],
                   cwd=d, check=False)
    assert p.returncode == 2 and "PPO needs one reward" in p.stderr


def test_fsdp_is_for_dpo_under_torchrun_and_refused_otherwise_in_one_line(monkeypatch, capsys):
    from configurator import configure
    for extra, rank, words in ((["--method=reward"], "0", "built for --method=dpo"),
                               (["--method=ppo", "--reward_fn=m:f"], "0", "built for --method=dpo"),
                               (["--lora_rank=4"], "0", "drop --lora_rank"),
                               (["--dtype=float16"], "0", "not float16"), ([], None, "under torchrun")):
        monkeypatch.delenv("RANK", raising=False)
        if rank is not None:
            monkeypatch.setenv("RANK", rank)
        cfg = configure(align.DEFAULTS, ["--init_from=x", "--dataset=prefs", "--fsdp", *extra])
        with pytest.raises(SystemExit) as e:
            align.check_settings(cfg)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and err.count("\n") == 0, err
    monkeypatch.setenv("RANK", "0")
    align.check_settings(configure(align.DEFAULTS, ["--init_from=x", "--dataset=prefs", "--fsdp"]))  # DPO: taken


def test_the_sharded_reference_frees_its_gathered_weights(tmp_path):
    # FSDP reshards a root's weights after backward, which DPO's frozen reference never runs: after
    # each of its calls every parameter must be a shard again (one gloo rank, in this process)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        policy = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
        reference = align.make_reference({"lora_rank": 0}, policy, None, torch.float32)
        x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
        with torch.no_grad():
            logps = reference(x, y)
            assert torch.allclose(logps, align.token_logps(policy, x, y), atol=1e-5)  # the starting model's
        params = dict(reference.model.named_parameters())
        assert len(params) == len(dict(policy.named_parameters()))
        assert all(isinstance(p, DTensor) for p in params.values()), [n for n, p in params.items()
                                                                     if not isinstance(p, DTensor)]
    finally:
        dist.destroy_process_group()


def test_split_dialogues_splits_hh_rlhf_at_the_last_shared_assistant_turn():
    import prepare_preferences
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: Why did the chicken cross the road?"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No."
    prompt, c, r = prepare_preferences.split_dialogues(chosen, rejected)
    assert prompt.endswith("A joke?\n\nAssistant:") and c == "Why did the chicken cross the road?" and r == "No."


# -----------------------------------------------------------------------------
# sample.py --chat


class EchoModel:
    """Stands in for a GPT in sample.chat: records each context, answers with fixed tokens."""

    def __init__(self, answer, eot, block_size):
        self.answer, self.eot, self.contexts = answer, eot, []
        self.config = GPTConfig(block_size=block_size)

    def generate(self, x, n, on_token=None, stop_token=None, **kw):
        self.contexts.append(x[0].tolist())
        for t in (self.answer + [stop_token])[:n]:
            on_token(torch.tensor([[t]]))
        return x


def test_chat_keeps_earlier_turns_drops_the_oldest_and_resets(tmp_path, monkeypatch, capsys):
    import io

    import prepare_alpaca
    import sample
    from dataloader import get_hf_tokenizer, get_tokenizer, hf_tokenizer_meta
    folder, _ = make_llama_folder(tmp_path / "m")
    for template in ("chat", "alpaca"):
        meta = dict(hf_tokenizer_meta(folder), template=template)
        encode, decode = get_tokenizer(meta)
        answer = encode(" the king.")
        if template == "chat":  # the whole conversation rendered by the chat template, once
            tok = get_hf_tokenizer(folder)
            convo = lambda n: [m for _ in range(n) for m in ({"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": " the king."})]
            render = lambda n: meta["bos"] + encode(tok.apply_chat_template(convo(n) + [{"role": "user", "content": "Hi"}],
                                                                            tokenize=False, add_generation_prompt=True))
        else:  # Alpaca's: each turn, its answer and the end marker, back to back
            turn = encode(prepare_alpaca.instruction_prompt(meta, "Hi"))
            render = lambda n: meta["bos"] + (turn + answer + [meta["eot"]]) * n + turn
        model = EchoModel(answer, meta["eot"], block_size=len(render(2)) + 8)  # room for two earlier turns
        monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nHi\nHi\nHi\n/reset\nHi\n/exit\nnever read\n"))
        sample.chat(model, meta, decode, dict(sample.DEFAULTS, max_new_tokens=8),
                    torch.autocast("cpu", enabled=False), "cpu")
        out, err = capsys.readouterr()
        assert out.splitlines() == [" the king."] * 5  # five answers, each streamed and ended at the eos
        c = model.contexts
        assert [c[0], c[1], c[2]] == [render(0), render(1), render(2)], template  # the earlier turns kept
        assert c[3] == render(2)  # the 4th turn: the oldest is dropped to make room
        assert err.count("oldest turns are dropped") == 1  # said once
        assert c[4] == render(0) and len(c) == 5  # after /reset the conversation starts again; /exit ends it


def test_chat_keeps_typed_markers_as_text_and_says_its_notes(tmp_path, monkeypatch, capsys):
    import io

    import sample
    from dataloader import encode_chat, get_hf_tokenizer, get_tokenizer, hf_tokenizer_meta
    folder, _ = make_llama_folder(tmp_path / "m")
    for template in ("chat", "alpaca"):
        meta = dict(hf_tokenizer_meta(folder), template=template)
        encode, decode = get_tokenizer(meta)
        marks = lambda ids: (ids.count(meta["eot"]), ids.count(meta["bos"][0]))  # end markers, bos markers
        contexts = []
        for line in ("Say </s> and <s> now", "Say x and y now"):
            model = EchoModel(encode(" ok"), meta["eot"], block_size=200)
            monkeypatch.setattr("sys.stdin", io.StringIO(line + "\n"))
            sample.chat(model, meta, decode, dict(sample.DEFAULTS, max_new_tokens=4),
                        torch.autocast("cpu", enabled=False), "cpu")
            contexts.append(model.contexts[0])
        typed, plain = contexts
        assert marks(typed) == marks(plain), template  # the typed </s> and <s> are text, not markers
        assert "Say </s> and <s> now" in decode(typed)
    # without typed markers, the chat encoding is the template's text encoded whole
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the king."},
             {"role": "user", "content": "More"}]
    text = get_hf_tokenizer(folder).apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert encode_chat(meta, convo) == encode(text)
    # a turn that is just the template's own end marker, after an answer that ends with one: the
    # template's marker stays the marker, the typed one is text
    typed, plain = (encode_chat(meta, convo[:2] + [{"role": "user", "content": c}]) for c in ("</s>", "x"))
    eots = lambda ids: [i for i, t in enumerate(ids) if t == meta["eot"]]
    assert marks(typed) == marks(plain) and eots(typed)[:2] == eots(plain)[:2]  # the answer's end, where it was
    # a first turn longer than block_size is cut, and said
    model = EchoModel(encode(" ok"), meta["eot"], block_size=16)
    monkeypatch.setattr("sys.stdin", io.StringIO("the king " * 20 + "\n"))
    capsys.readouterr()
    sample.chat(model, meta, decode, dict(sample.DEFAULTS, max_new_tokens=4), torch.autocast("cpu", enabled=False),
                "cpu")
    assert "more than the model's 16: it reads only the last 16" in capsys.readouterr().err
    # a model never tuned on instructions is said to be one
    plain_folder, _ = make_llama_folder(tmp_path / "plain", chat=False)
    p = run_script([os.path.join(ROOT, "sample.py"), f"--init_from={plain_folder}", "--chat", "--max_new_tokens=2"])
    assert "was not tuned on instructions" in p.stderr


# -----------------------------------------------------------------------------
# PPO


def test_gae_equals_a_plain_backward_loop():
    g = torch.Generator().manual_seed(0)
    N, T, gamma, lam = 4, 10, 0.9, 0.8
    rewards, values = torch.randn(N, T, generator=g), torch.randn(N, T, generator=g)
    mask = torch.zeros(N, T)
    for i, (a, b) in enumerate([(2, 10), (0, 5), (3, 4), (6, 9)]):  # each row's answer positions [a, b)
        mask[i, a:b] = 1
    adv, ret = align.gae(rewards * mask, values * mask, mask, gamma, lam)
    for i in range(N):
        pos = mask[i].nonzero().flatten().tolist()
        r, v = [rewards[i, t].item() for t in pos], [values[i, t].item() for t in pos]
        deltas = [r[k] + gamma * (v[k + 1] if k + 1 < len(pos) else 0.0) - v[k] for k in range(len(pos))]
        for k, t in enumerate(pos):
            want = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(pos) - k))
            assert adv[i, t].item() == pytest.approx(want, abs=1e-5) and ret[i, t].item() == pytest.approx(want + v[k], abs=1e-5)
        assert (adv[i][mask[i] == 0] == 0).all()


def test_ppo_first_rollout_has_kl_0_and_ratio_1(tmp_path):
    """At the first step the policy is the reference (KL 0) and, in the first epoch, the ratio
    pi / pi_old is 1 (nothing clipped); only answer tokens are in the batch's mask."""
    from dataloader import get_tokenizer, hf_tokenizer_meta
    folder, _ = make_llama_folder(tmp_path / "m")
    meta = hf_tokenizer_meta(folder)
    model = GPT.from_pretrained(folder)
    align.add_head(model, name="value_head")
    cfg = dict(align.DEFAULTS, method="ppo", batch_size=3, max_new_tokens=6, ppo_epochs=1, seed=0)
    module = align.PolicyValue(model)
    prompts = [get_tokenizer(meta)[0](f"Tell me about the {w}.") for w in WORDS[:5]]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step changes nothing
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step_optimizer():
        opt.step()
        opt.zero_grad()
    world = align.setup_world("cpu")
    ctx = dict(raw=model, model=module, module=module, world=world, autocast=torch.autocast("cpu", enabled=False),
               scaler=scaler, reference=align.make_reference(dict(cfg, lora_rank=0), model, None),
               reward=lambda x, y, texts: torch.ones(len(texts)), eot=meta["eot"], decode=get_tokenizer(meta)[1],
               prompts=prompts, step_optimizer=step_optimizer)
    reward, kl, entropy, clip_frac, loss = align.ppo_step(cfg, ctx, 0).tolist()
    assert reward == 1.0 and kl == pytest.approx(0.0, abs=1e-6) and clip_frac == 0.0 and entropy > 0
    x, y, answers = align.rollout(cfg, model, prompts[:2], meta["eot"], torch.Generator().manual_seed(0), "cpu")
    for i, p in enumerate(prompts[:2]):  # targets: the answer (and its end marker, if reached) only
        scored = y[i][y[i] != -1].tolist()
        assert scored[:len(answers[i])] == answers[i] and (y[i, :len(p) - 1] == -1).all()
    # greedy, the prompts of different lengths in one left-padded batch answer as each does alone
    # (block_size 14: the longest prompts get fewer new tokens, and go in a batch of their own)
    assert len({len(p) for p in prompts}) > 1 and max(map(len, prompts)) + 6 - 1 > 14
    for block_size in (cfg["block_size"], 14):
        greedy = dict(cfg, temperature=0.0, block_size=block_size)
        x, y, answers = align.rollout(greedy, model, prompts, meta["eot"], None, "cpu")
        for i, p in enumerate(prompts):
            x1, y1, alone = align.rollout(greedy, model, [p], meta["eot"], None, "cpu")
            assert answers[i] == alone[0], (block_size, i)
            assert torch.equal(x[i, :x1.size(1)], x1[0]) and torch.equal(y[i, :y1.size(1)], y1[0])

    # a diverged policy (NaN weights) samples from NaN probabilities: the divergence stop, in one line
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    from configurator import UserError
    with pytest.raises(UserError, match=r"probabilities are not finite \(sampling answers\) at step 7: stopping "
                                        "without saving"):
        align.rollout(dict(cfg, out_dir=str(tmp_path)), model, prompts[:2], meta["eot"], None, "cpu", step=7)


def reward_module(d):
    (d / "rewards.py").write_text(
        "def king(text):\n    return 1.0 if text.strip().endswith('king.') else 0.0\n"
        "def boom(text):\n    raise ValueError('no')\n"
        "def words(text):\n    return 'good'\n")


@pytest.mark.slow
def test_ppo_raises_the_reward_and_resumes_exactly(pref_dir):
    d, folder = pref_dir
    reward_module(d)
    py = lambda *args, check=True: run_script([os.path.join(ROOT, "align.py"), "--method=ppo", *args], cwd=d, check=check)
    ppo = ["--dataset=prefs", "--block_size=64", "--batch_size=8", "--max_new_tokens=16", "--log_interval=1", "--eval_iters=8",
           "--learning_rate=3e-4", "--warmup_iters=0", "--device=cpu", "--reward_fn=rewards:king"]
    py("--init_from=sft", "--out_dir=ppo", "--max_iters=12", "--eval_interval=6", *ppo)  # from the SFT model
    val = read_log(d / "ppo/log.txt", "val_reward")  # the share of val answers ending "king."
    assert read_log(d / "ppo/log.txt", "val_kl")[0] == 0.0 and val[12] >= val[0] + 0.25, val
    short = ["--ppo_epochs=2", "--max_new_tokens=80"]  # more than block_size leaves room for: cut to fit
    py(f"--init_from={folder}", "--out_dir=p6", "--max_iters=4", "--eval_interval=2", *ppo, *short)
    py(f"--init_from={folder}", "--out_dir=p3", "--max_iters=2", "--eval_interval=2", *ppo, *short)
    py("--init_from=resume", "--out_dir=p3", "--max_iters=4", "--eval_interval=2", *ppo, *short)
    a, b = final_weights(d / "p6/ckpt.pt"), final_weights(d / "p3/ckpt.pt")
    assert "value_head.weight" in a and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    # a reward function that raises or returns no number, a reward_from that is not a reward model
    for fn, words in (("rewards:boom", "raised ValueError: no"), ("rewards:words", "must return a finite number"),
                      ("rewards:nothing", "cannot import it")):
        p = py(f"--init_from={folder}", "--out_dir=bad", "--max_iters=1", *ppo[:-1], f"--reward_fn={fn}", check=False)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = py(f"--init_from={folder}", "--out_dir=bad2", "--max_iters=1", *ppo[:-1], "--reward_from=p6", check=False)
    assert p.returncode == 2 and "is not a reward model" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(d / "bad/ckpt.pt") and not os.path.exists(d / "bad2/ckpt.pt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_a_stop_on_a_checkpoint_step_resumes_to_the_uninterrupted_log(pref_dir, monkeypatch, method):
    # step 3: a checkpoint step, not an eval step. A stop there saves before its evaluation; the
    # resume takes it (and no other twice), so the two logs hold the same lines in the same order
    d, folder = pref_dir
    reward_module(d)
    args = [f"--method={method}", "--init_from=sft", "--dataset=prefs", "--block_size=64", "--batch_size=4",
            "--eval_iters=1", "--eval_interval=5", "--checkpoint_interval=3", "--device=cpu", "--log_interval=1",
            "--max_iters=6"]
    if method == "ppo":
        args += ["--reward_fn=rewards:king", "--max_new_tokens=8", "--ppo_epochs=1"]

    def run(out_dir, *extra, stop_at=None):
        calls = []  # align.py asks once at the top of every step: call k is step k - 1
        agreed = lambda stop, world: calls.append(1) or len(calls) - 1 == stop_at
        monkeypatch.chdir(d)
        monkeypatch.setattr(align, "stop_agreed", agreed)
        monkeypatch.setattr(sys, "argv", ["align.py", *args, f"--out_dir={out_dir}", *extra])
        align.main()
        monkeypatch.undo()
        return open(d / out_dir / "log.txt").read().splitlines()

    whole = run(f"s_{method}_whole")
    run(f"s_{method}_parts", stop_at=3)
    assert torch.load(d / f"s_{method}_parts" / "ckpt.pt", weights_only=True)["step"] == 3
    parts = run(f"s_{method}_parts", "--init_from=resume")
    assert parts == whole
    assert any(line.startswith("3 val") for line in whole)
    # an ordinary end at step 3 (evaluated there), resumed to 6: no evaluation twice (the lr is
    # constant after warmup, so max_iters changes nothing else)
    run(f"s_{method}_end3", "--max_iters=3")
    assert run(f"s_{method}_end3", "--init_from=resume", "--max_iters=6") == whole


def test_align_recipes_are_valid_settings():
    import glob

    from configurator import configure
    recipes = sorted(glob.glob(os.path.join(ROOT, "config", "align_*.py")))
    assert {os.path.basename(p) for p in recipes} == {"align_dpo_hh.py", "align_reward_hh.py", "align_ppo_hh.py"}
    for path in recipes:
        cfg = configure(align.DEFAULTS, [path])  # an unknown key or a wrong type would exit here
        align.check_settings(cfg)
        assert cfg["total_batch_size"] % cfg["batch_size"] == 0


@pytest.mark.slow
def test_reward_model_resume_is_exact(pref_dir):
    d, folder = pref_dir
    py = lambda *args: run_script([os.path.join(ROOT, "align.py"), "--method=reward", *args], cwd=d)
    py(f"--init_from={folder}", "--out_dir=rm6", "--max_iters=6", "--eval_interval=3", *ALIGN)
    py(f"--init_from={folder}", "--out_dir=rm3", "--max_iters=3", "--eval_interval=3", *ALIGN)
    py("--init_from=resume", "--out_dir=rm3", "--max_iters=6", "--eval_interval=3", *ALIGN)
    a, b = final_weights(d / "rm6/ckpt.pt"), final_weights(d / "rm3/ckpt.pt")
    assert "reward_head.weight" in a and all(torch.equal(a[k], b[k]) for k in a)


def align_graphs(d, monkeypatch, *args):
    """Run align.py here with compile=True (dynamo with its eager backend: the guards and the
    recompiles are dynamo's) and return how many graphs it compiled."""
    import functools

    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.chdir(d)
    monkeypatch.setattr(sys, "argv", ["align.py", *args])
    align.main()
    monkeypatch.undo()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "ppo"])
def test_compiled_steps_after_the_first_add_no_graph(pref_dir, monkeypatch, method):
    # compile=True: the batches come in lengths of multiples of 64 (PPO's rollouts padded so too),
    # so more steps (and evaluations) compile nothing new
    d, _ = pref_dir
    reward_module(d)
    args = [f"--method={method}", "--init_from=sft", "--dataset=prefs", "--block_size=64", "--batch_size=4",
            "--eval_iters=1", "--eval_interval=2", "--device=cpu", "--compile", "--log_interval=1"]
    if method == "ppo":
        args += ["--reward_fn=rewards:king", "--max_new_tokens=8", "--ppo_epochs=1"]
    first = align_graphs(d, monkeypatch, *args, "--max_iters=2", f"--out_dir=c_{method}_2")
    assert first >= 2, first  # a training and an evaluation graph at least
    assert align_graphs(d, monkeypatch, *args, "--max_iters=6", f"--out_dir=c_{method}_6") == first


def test_settings_that_cannot_work_or_would_be_ignored_are_one_line(monkeypatch, capsys, tmp_path):
    # PPO's settings under another method (ignored without a word before), GAE's gamma and lambda
    # past 1, LoRA targets that do not exist; and a reward module that does not import
    from configurator import UserError, configure
    for extra, words in ((["--method=dpo", "--reward_fn=m:f"], "--reward_fn is PPO's"),
                         (["--method=reward", "--kl_coef=0.1", "--lam=0.9"], "--kl_coef, --lam are PPO's"),
                         (["--method=ppo", "--reward_fn=m:f", "--lam=5"], "--lam must be between 0 and 1"),
                         (["--method=ppo", "--reward_fn=m:f", "--gamma=3"], "--gamma must be between 0 and 1"),
                         (["--lora_rank=4", "--lora_targets=foo"], "unknown LoRA target(s) foo")):
        cfg = configure(align.DEFAULTS, ["--init_from=x", "--dataset=prefs", *extra])
        with pytest.raises(SystemExit) as e:
            align.check_settings(cfg)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and err.count("\n") == 0, err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_reward.py").write_text("def f(text)\n    return 1.0\n")  # a syntax error
    (tmp_path / "raising_reward.py").write_text("raise RuntimeError('no config')\ndef f(text):\n    return 1.0\n")
    for module in ("broken_reward", "raising_reward"):
        with pytest.raises(UserError, match=f"--reward_fn={module}:f: cannot import it"):
            align.load_reward(dict(align.DEFAULTS, reward_fn=f"{module}:f"), {}, "cpu")
    # a function that exits or raises KeyboardInterrupt itself: a line, not a silent end or a traceback
    (tmp_path / "quitting_reward.py").write_text("import sys\ndef quits(text):\n    sys.exit(0)\n"
                                                 "def interrupts(text):\n    raise KeyboardInterrupt\n")
    for name, words in (("quits", "raised SystemExit"), ("interrupts", "raised KeyboardInterrupt")):
        score = align.load_reward(dict(align.DEFAULTS, reward_fn=f"quitting_reward:{name}"), {}, "cpu")
        with pytest.raises(UserError, match=words):
            score(None, None, ["an answer."])
    # a function that never returns: named on the console after REWARD_WAIT_S, and a Ctrl-C (here
    # 0.5 s in) ends it in one line; the signal handlers are then the run's again
    import signal
    import threading
    (tmp_path / "hanging_reward.py").write_text("import time\ndef f(text):\n    while True:\n"
                                                "        time.sleep(0.01)\n")
    monkeypatch.setattr(align, "REWARD_WAIT_S", 0.2)
    score = align.load_reward(dict(align.DEFAULTS, reward_fn="hanging_reward:f", out_dir="run"), {}, "cpu")
    before = signal.getsignal(signal.SIGINT)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    capsys.readouterr()
    with pytest.raises(UserError, match=r"SIGINT while --reward_fn=hanging_reward:f ran on 'a king.': stopped without "
                                        r"saving this step; run/ckpt.pt"):
        score(None, None, ["a king."])
    assert "still waiting for --reward_fn=hanging_reward:f on 'a king.' after 0.2 s" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before


def test_a_run_is_its_folder_or_one_of_its_checkpoint_files(tmp_path):
    # --init_from=RUN/ckpt_best.pt starts from that checkpoint, as sample.py, hellaswag.py and export_hf.py take it
    # (before, it was taken for a Hub name and refused as offline)
    os.makedirs(tmp_path / "run")
    for f in ("ckpt.pt", "ckpt_best.pt"):
        (tmp_path / "run" / f).write_bytes(b"x")
    assert align.run_of_ours(str(tmp_path / "run")) and align.run_of_ours(str(tmp_path / "run" / "ckpt_best.pt"))
    assert not align.run_of_ours(str(tmp_path / "run" / "nope.pt"))
    assert not align.run_of_ours("HuggingFaceTB/SmolLM2-135M")
