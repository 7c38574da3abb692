"""serve.py: the server started on a free local port and spoken to with the official openai client.
Its answers equal sample.py's for the same prompt, seed and settings; several requests decode
together in one batch and each equals its answer alone; a client that hangs up frees its row; bad
requests get OpenAI's error JSON with a 4xx status."""

import os
import re
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import openai
import pytest
import requests
import torch

from conftest import ROOT, make_llama_folder, needs_gpt2_bpe

import serve  # noqa: E402  (after conftest: the repo root on sys.path)


@contextmanager
def running(**settings):
    """serve.py's app for settings (out_dir or init_from ...), under uvicorn in a thread: (url, app, client)."""
    cfg = dict(serve.DEFAULTS, **settings)
    model, meta, name = serve.load(cfg, "cpu")
    app = serve.make_app(model, meta, name, cfg, nullcontext())
    url, stop = serve.serve_in_thread(app)
    try:
        yield url, app, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder (byte-level BPE, <s> before every text, a chat template ended by </s>)
    served with --init_from: (folder, url, app, client)."""
    folder, _ = make_llama_folder(tmp_path_factory.mktemp("serve") / "llama")
    with running(init_from=folder) as (url, app, client):
        yield folder, url, app, client


@pytest.fixture
def sample_py(monkeypatch, capsys):
    """sample.py's stdout for these settings (one sample), its main() run here: the model's
    tokenizer and transformers are loaded already."""
    import sample

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--num_samples=1", "--device=cpu", *args])
        capsys.readouterr()
        sample.main()
        return capsys.readouterr().out
    return run


def complete(client, name, stream, **kw):
    """(text, finish_reason, usage) of a one-choice completion (a chat one if kw has messages)."""
    create = client.chat.completions.create if "messages" in kw else client.completions.create
    if not stream:
        r = create(model=name, **kw)
        c = r.choices[0]
        return (c.message.content if "messages" in kw else c.text), c.finish_reason, r.usage
    text, finish, usage = "", None, None
    for chunk in create(model=name, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += (c.delta.content or "") if "messages" in kw else c.text
            finish = c.finish_reason or finish
    return text, finish, usage


# -----------------------------------------------------------------------------
# the same text as sample.py


def test_completion_and_chat_streamed_or_not_equal_sample_py(llama, sample_py):
    folder, _, _, client = llama
    start = "The king and the queen walk"
    for sampling in (["--temperature=0"], ["--temperature=0.9", "--top_k=0", "--seed=7"]):
        settings = dict(temperature=0) if sampling[0] == "--temperature=0" else dict(temperature=0.9, seed=7)
        want = sample_py(f"--init_from={folder}", f"--start={start}", "--max_new_tokens=12", *sampling)
        # a chat turn: sample.py --instruct wraps --start in the same chat template
        want_chat = sample_py(f"--init_from={folder}", "--instruct=True", "--start=Tell me about the war.",
                              "--max_new_tokens=12", *sampling)
        for stream in (False, True):
            text, finish, usage = complete(client, folder, stream, prompt=start, max_tokens=12, **settings)
            assert start + text + "\n" == want  # sample.py prints the prompt, then the continuation
            assert finish == "stop" or usage.completion_tokens == 12
            text, finish, usage = complete(client, folder, stream, max_tokens=12, **settings,
                                           messages=[{"role": "user", "content": "Tell me about the war."}])
            assert text + "\n" == want_chat and finish in ("stop", "length")
            assert usage.prompt_tokens > 5 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_conversation_equals_sample_py_chat(llama, monkeypatch, capsys):
    """Two turns: the second request carries the first answer back, as the chat page does; sample.py
    --chat keeps it itself. Greedy, so that both draw the same."""
    import io

    import sample
    from checkpoint import load_model
    from dataloader import get_tokenizer
    folder, _, _, client = llama
    model, meta = load_model(init_from=folder)
    decode = get_tokenizer(meta)[1]
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about the king.\nAnd the queen?\n"))
    sample.chat(model, meta, decode, dict(sample.DEFAULTS, max_new_tokens=10, temperature=0.0), nullcontext(), "cpu")
    messages, answers = [], []
    for line in ("Tell me about the king.", "And the queen?"):
        messages.append({"role": "user", "content": line})
        answer = client.chat.completions.create(model=folder, messages=messages, max_tokens=10, temperature=0)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
        answers.append(answer.choices[0].message.content)
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers)


def test_n_choices_stop_strings_and_seeds(llama, sample_py):
    folder, _, _, client = llama
    start = "The army will come"
    r = client.completions.create(model=folder, prompt=start, max_tokens=10, temperature=1.0, seed=3, n=2)
    for i in range(2):  # choice i draws what sample.py draws with seed + i
        want = sample_py(f"--init_from={folder}", f"--start={start}", "--max_new_tokens=10", "--temperature=1.0",
                         "--top_k=0", f"--seed={3 + i}")
        assert start + r.choices[i].text + "\n" == want
    assert r.usage.prompt_tokens == r.usage.total_tokens - r.usage.completion_tokens  # the prompt counted once
    full, _, _ = complete(client, folder, False, prompt=start, max_tokens=30, temperature=0)
    stop = next(full[i:i + 3] for i in range(2, len(full) - 3) if "\ufffd" not in full[i:i + 3])  # (whole characters)
    for stream in (False, True):  # the text ends before the stop string, also when it comes token by token
        text, finish, _ = complete(client, folder, stream, prompt=start, max_tokens=30, temperature=0,
                                   stop=[stop, "zzz"])
        assert (text, finish) == (full[:full.index(stop)], "stop")


# -----------------------------------------------------------------------------
# several clients at once


def greedy(client, name, prompt, max_tokens=40):
    return client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def stream_text(client, name, prompt, out, max_tokens=40):
    out[prompt] = complete(client, name, True, prompt=prompt, max_tokens=max_tokens, temperature=0)[0]


def test_four_streams_decode_in_one_batch_and_each_equals_its_answer_alone(llama):
    folder, _, app, client = llama
    engine = app.state.engine
    prompts = ["The king", "A man is reading a letter about the war and", "She asks him what", "The castle where"]
    alone = {p: greedy(client, folder, p) for p in prompts}  # one at a time: a batch of one row
    engine.stats["most_rows"], out = 0, {}
    with engine.lock:  # the decoding thread waits: all four requests are in before it takes any
        before = engine.stats["submitted"]
        threads = [threading.Thread(target=stream_text, args=(client, folder, p, out)) for p in prompts]
        for t in threads:
            t.start()
        wait_for(lambda: engine.stats["submitted"] == before + 4)
    for t in threads:
        t.join(timeout=60)
    assert out == alone
    assert engine.stats["most_rows"] == 4  # decoded together (prompts of different lengths, left-padded)


def test_requests_join_a_running_batch_and_each_equals_its_answer_alone(llama):
    """A long answer is under way when two more requests come, one with a longer prompt than the
    batch's columns (the batch is padded on the left to take it), one shorter."""
    folder, _, app, client = llama
    engine = app.state.engine
    first, later = "The king", ["A man is reading a letter about the war where the queen and", "She"]
    alone = {p: greedy(client, folder, p, 60) for p in [first] + later}
    out, text = {}, ""
    stream = client.completions.create(model=folder, prompt=first, max_tokens=60, temperature=0, stream=True)
    chunks = iter(stream)
    text += next(chunks).choices[0].text
    with engine.lock:  # between two steps of the first request
        before = engine.stats["submitted"]
        threads = [threading.Thread(target=stream_text, args=(client, folder, p, out, 60)) for p in later]
        for t in threads:
            t.start()
        wait_for(lambda: engine.stats["submitted"] == before + 2)
    text += "".join(c.choices[0].text for c in chunks)
    for t in threads:
        t.join(timeout=60)
    assert {first: text, **out} == alone


def test_a_client_that_hangs_up_frees_its_row(llama, monkeypatch):
    folder, url, app, client = llama
    engine = app.state.engine
    dropped, gone = engine.stats["dropped"], engine.stats["disconnected"]
    resume, step = threading.Event(), engine.step

    def held_step():  # the row's first step waits until its client has hung up: it is surely under way then
        resume.wait(30)
        step()
    monkeypatch.setattr(engine, "step", held_step)
    stream = client.chat.completions.create(model=folder, messages=[{"role": "user", "content": "Hi"}], max_tokens=100,
                                            temperature=0, stream=True)
    next(iter(stream))  # the first chunk (the role) has come
    wait_for(lambda: engine.rows)  # the row is in the batch, its first step waiting
    stream.close()
    wait_for(lambda: engine.stats["disconnected"] == gone + 1)  # the server saw the client go
    resume.set()
    wait_for(lambda: not engine.rows)
    assert engine.stats["dropped"] == dropped + 1  # left the batch long before its 100 tokens
    monkeypatch.undo()
    assert greedy(client, folder, "The king", 5) == greedy(client, folder, "The king", 5)  # and the server goes on


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# -----------------------------------------------------------------------------
# errors


def test_bad_requests_get_openai_errors(llama):
    folder, url, _, client = llama
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert e.value.body["code"] == "model_not_found"
    refused = [dict(prompt="Hi", max_tokens=-1), dict(prompt="Hi", n=0), dict(prompt="Hi", temperature=3),
               dict(prompt="Hi", stop=["a", "b", "c", "d", "e"]), dict(prompt="Hi", logprobs=2),
               dict(prompt="the king " * 100, max_tokens=5), dict(prompt="Hi", max_tokens=200),
               dict(prompt=[1, 2, 10**6])]
    for kw in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=folder, **kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError) as e:  # the prompt alone is longer than the context
        client.chat.completions.create(model=folder, messages=[{"role": "user", "content": "the king " * 100}])
    assert e.value.body["code"] == "context_length_exceeded" and "128 tokens" in e.value.body["message"]
    for messages in ([], [{"role": "robot", "content": "Hi"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=folder, messages=messages)
    # not JSON, not an object, a wrong method, a path that is not there: still OpenAI's error JSON
    for method, path, body, status in (("post", "/v1/chat/completions", b"{bad json", 400),
                                       ("post", "/v1/completions", b"[1, 2]", 400),
                                       ("get", "/v1/completions", None, 405), ("get", "/v2/nothing", None, 404)):
        r = getattr(requests, method)(url + path, data=body, timeout=30)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


# -----------------------------------------------------------------------------
# other kinds of model: a character-level run, an SFT run as a LoRA adapter on GPT-2's BPE


def tiny_run(folder, model, meta, **extra):
    from checkpoint import make_checkpoint, save_checkpoint
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(make_checkpoint(model, meta, {}, **extra), os.path.join(folder, "ckpt.pt"))
    return str(folder)


def test_a_character_level_run_completes_as_sample_py_and_refuses_chat(tmp_path, sample_py):
    from model import GPT, GPTConfig
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz ,.:\n"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32))
    run = tiny_run(tmp_path / "char", model, {"tokenizer": "char", "chars": chars})
    with running(out_dir=run) as (url, _, client):
        text, finish, _ = complete(client, run, True, prompt="the king:", max_tokens=20, temperature=0.8, seed=1)
        assert "the king:" + text + "\n" == sample_py(f"--out_dir={run}", "--start=the king:", "--max_new_tokens=20",
                                                      "--temperature=0.8", "--top_k=0", "--seed=1")
        assert finish == "length"  # no end marker in a character vocabulary
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=run, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.body["code"] == "chat_unsupported"
        with pytest.raises(openai.BadRequestError) as e:  # a character the vocabulary lacks
            client.completions.create(model=run, prompt="KING!")
        assert "lacks" in e.value.body["message"]
        assert requests.get(url + "/v1/models", timeout=30).json()["data"][0]["chat_template"] is None


@needs_gpt2_bpe
def test_an_sft_lora_run_answers_in_its_instruction_template(tmp_path, sample_py):
    import lora
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    base = tiny_run(tmp_path / "base", model, {"tokenizer": "gpt2"})
    lora.apply_lora(model, rank=4, alpha=8, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # adapters that change the answers
    run = tiny_run(tmp_path / "sft", model, {"tokenizer": "gpt2", "format": "sft", "template": "alpaca"},
                   base=os.path.abspath(base))
    with running(out_dir=run) as (url, _, client):
        text, _, _ = complete(client, run, True, messages=[{"role": "user", "content": "Name a colour."}],
                              max_tokens=8, temperature=0)
        # sample.py wraps --start in the run's Alpaca template by itself, and prints the answer alone
        assert text + "\n" == sample_py(f"--out_dir={run}", "--start=Name a colour.", "--max_new_tokens=8",
                                        "--temperature=0")


def test_alpaca_conversations_are_rendered_turn_by_turn(tmp_path):
    """Alpaca's template (an SFT run of a model without a chat template): each user turn an
    instruction, each answer after it ended by the end marker, a system message before the next
    instruction; turns out of order are refused."""
    import prepare_alpaca
    from dataloader import get_tokenizer, hf_tokenizer_meta
    folder, _ = make_llama_folder(tmp_path / "m")
    meta = dict(hf_tokenizer_meta(folder), template="alpaca")
    encode, _ = get_tokenizer(meta, specials=False)
    turn = lambda text: encode(prepare_alpaca.instruction_prompt(meta, text))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": " the king."}, {"role": "user", "content": "Hi"}]
    assert serve.chat_prompt(meta, messages) == (meta["bos"] + turn("Be brief.\n\nHi") + encode(" the king.")
                                                         + [meta["eot"]] + turn("Hi"))
    with pytest.raises(serve.RequestError):
        serve.chat_prompt(meta, messages[:3])  # the last turn is the assistant's


def test_the_chat_page_needs_no_network(llama):
    _, url, _, _ = llama
    page = requests.get(url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "/v1/completions" in page.text
    assert not re.search(r"https?:|\b(src|href)\s*=|url\(|@import", page.text)  # nothing loaded from elsewhere
    assert open(os.path.join(ROOT, "assets", "chat.html")).read() == page.text
