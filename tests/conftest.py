"""Shared test set-up: the repo root on sys.path, and helpers that many test files use."""

import json
import os
import subprocess
import sys
import tempfile
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# runs inside the test process keep its thread count: train.py times thread counts only where none
# was chosen (runtime.ThreadPicker), and would leave its pick to the tests after it
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))
# subprocesses run in temp folders: a relative tiktoken cache path must not break there
if os.environ.get("TIKTOKEN_CACHE_DIR"):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])


def gpt2_encoding_available():
    """True when tiktoken's GPT-2 files can be had (a cache via TIKTOKEN_CACHE_DIR, or the network)."""
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


# tests that need the GPT-2 BPE files are skipped, with the reason, on a machine that has none
needs_gpt2_bpe = pytest.mark.skipif(not gpt2_encoding_available(),
                                    reason="GPT-2 BPE files unavailable: set TIKTOKEN_CACHE_DIR or go online")


# Most tests run the scripts as a user does, `python SCRIPT.py ...`, a hundred times and more. Each
# such process would spend ~2.5 s of CPU importing torch before its first line of work, a third of
# the suite. So they are forked from a "zygote": one process per test worker that imported numpy
# and torch once (and ran no torch op, so no thread pool is forked half-way) and then forks a child
# for each script: the child takes the cwd, environment, stdout/stderr files and limits of a fresh
# process and runs the script as __main__ with runpy, as `python SCRIPT.py` would. Scripts that
# must start for real (Ctrl-C while importing, torchrun's ranks, signals) use subprocess directly.
ZYGOTE = r"""
import atexit, io, json, os, resource, runpy, signal, sys, threading, time
import numpy, torch  # noqa: F401  the slow imports, once
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group: a timeout ends it and whatever it started (torchrun's ranks)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((0, os.devnull), (1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), "utf-8", line_buffering=True, write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), "utf-8", "backslashreplace", write_through=True)
        if req["fsize"]:  # a full disk, as `ulimit -f` makes one (see test_bad_input.py)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        module = req["argv"][1] if req["argv"][0] == "-m" else None  # python -m torch.distributed.run ...
        sys.argv = req["argv"][1:] if module else req["argv"]
        sys.path.remove("")  # python -c put the cwd first; `python SCRIPT.py` puts the script's folder
        sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(sys.argv[0])))
        code = 0
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:  # what the interpreter does with sys.exit's argument
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if code == 1 and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            code = 128 + signal.SIGINT
        except BaseException:
            sys.excepthook(*sys.exc_info())  # the traceback an uncaught exception prints
            code = 1
        threading._shutdown()  # what the interpreter does at exit: wait for threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline, status = time.time() + req["timeout"], None
    while status is None:  # wait for it here, so the test process only ever reads whole answers
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
        elif time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.01)
    print(json.dumps({"rc": status}), flush=True)
"""
_zygotes = threading.local()


def run_python(args, cwd, env, timeout, fsize=0):
    """`python args...` (a script and its arguments, or -m MODULE ...) in cwd with env: (exit code,
    stdout, stderr), forked from this thread's zygote (a real subprocess where there is no fork).
    fsize > 0 limits the size of files it writes (RLIMIT_FSIZE)."""
    if not hasattr(os, "fork"):  # Windows: a real process each time (and no file-size limit there)
        p = subprocess.run([sys.executable] + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    z = getattr(_zygotes, "proc", None)
    if z is None or z.poll() is not None:
        z = _zygotes.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        req = dict(argv=list(args), cwd=os.path.abspath(cwd), env=env, stdout=out, stderr=err, fsize=fsize,
                   timeout=timeout)
        z.stdin.write(json.dumps(req) + "\n")
        z.stdin.flush()
        rc = json.loads(z.stdout.readline())["rc"]
        if rc == "timeout":
            raise subprocess.TimeoutExpired(args, timeout)
        with open(out, encoding="utf-8", errors="replace") as f, open(err, encoding="utf-8", errors="replace") as g:
            return rc, f.read(), g.read()


def run_script(args, cwd=None, env=None, check=True, timeout=600):
    """Run `python args...` from the repo root (or cwd); return the CompletedProcess with
    stdout/stderr as text. check=True fails the test with the script's output on error."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    if str(args[0]).endswith(".py") or args[0] == "-m":
        p = subprocess.CompletedProcess(args, *run_python([str(a) for a in args], cwd or ROOT, full_env, timeout))
    else:  # python -c CODE
        p = subprocess.run([sys.executable] + list(args), cwd=cwd or ROOT, env=full_env,
                           capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def torchrun(args, cwd, nproc=2, timeout=300):
    """Run `torchrun --standalone --nproc_per_node=nproc args...` (CPU, gloo) and fail the test
    with its output unless it exits 0; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(a) for a in torchrun_cmd(args, nproc)[1:]]  # the launcher forked from the zygote; its ranks start for real
    p = subprocess.CompletedProcess(cmd, *run_python(cmd, cwd, env, timeout))
    # the ranks' own errors come before torchrun's summary of them: keep enough of stderr
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    return p


def torchrun_cmd(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + list(args)


def assert_equal_up_to_rounding(a, b, lr, steps):
    """Two trainings of the same weights under another process layout (or summation order) end
    equal up to float32 rounding. Rounding moves most weights by ~lr x (relative rounding of a
    gradient, ~1e-6) per step: far below 1e-6 in all. AdamW's normalised step can magnify it
    for the odd weight whose gradient is itself at rounding level (m / sqrt(v) is then nearly
    its sign), by at most ~lr a step. A real difference (a gradient not averaged, a shard
    missed) moves most weights, so: nearly all within 1e-6, none more than lr x steps."""
    diff = (a.double() - b.double()).abs()
    assert diff.max() <= lr * steps, (diff.max().item(), lr * steps)
    assert (diff > 1e-6).double().mean() <= 0.01, (diff > 1e-6).double().mean().item()


def read_log(path, stream):
    """{step: value} of one stream ("train", "val", ...) of a run's log.txt."""
    out = {}
    for line in open(path):
        step, name, value = line.split()
        if name == stream:
            out[int(step)] = float(value)
    return out


@pytest.fixture
def workdir(tmp_path):
    """A folder with data/tiny/: a character-level dataset of a few thousand characters."""
    import random
    rnd = random.Random(0)
    words = ["the", "king", "shall", "speak", "to", "thee", "my", "lord", "and", "good", "night"]
    text = "\n".join(" ".join(rnd.choice(words) for _ in range(8)) for _ in range(600))
    (tmp_path / "input.txt").write_text(text)
    run_script([os.path.join(ROOT, "prepare_shakespeare.py"), "--input=input.txt", "--out_dir=data/tiny"], cwd=tmp_path)
    return tmp_path


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """A small random transformers GPT2LMHeadModel saved with save_pretrained: (folder, hf_model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=96,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    folder = tmp_path / "hf_tiny"
    hf.save_pretrained(folder)
    return str(folder), hf


# a small English text for a tokenizer trained in the test: every word often enough to be merged
WORDS = ("the king and the queen walk to the castle where a man is reading a letter about the war "
         "she asks him what it says and he answers that the army will come home before winter").split()
LLAMA_TEXT = "\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)).capitalize() + "."
                       for i in range(400))
# a ChatML-like chat template whose turns end at the eos </s>, as an instruct model's do
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def sentencepiece_tokenizer(text, vocab_size):
    """A tokenizer laid out as Llama 2's and TinyLlama's (a SentencePiece BPE in transformers' fast
    form): <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> (byte fallback for what the pieces
    lack), then pieces learnt from `text`; a normalizer that puts '▁' before every text and for
    every space, so that a text encoded alone gets a '▁' it would not have inside a longer one."""
    import json
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    learner = Tokenizer(models.BPE())  # the merges, learnt within words
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size - 259, special_tokens=[]))
    learnt = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return tk


def make_llama_folder(folder, tie=False, n_kv_head=2, chat=True, seed=0, text=LLAMA_TEXT, vocab_size=320,
                      sentencepiece=False):
    """A random transformers LlamaForCausalLM (GQA, rope_theta 5000, untied unless tie) and a
    byte-level BPE tokenizer trained here by `tokenizers` (or with sentencepiece=True one laid out
    as Llama 2's: sentencepiece_tokenizer), bos <s> added before every text, as Llama's does; eos
    </s>; a chat template if chat; about vocab_size ids, from `text`), saved with save_pretrained:
    (folder, hf_model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    if sentencepiece:
        tk = sentencepiece_tokenizer(text, vocab_size + 259)
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        specials = ["<s>", "</s>", "<|im_start|>"]
        tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  **({"unk_token": "<unk>"} if sentencepiece else {}))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), hf


@pytest.fixture
def tiny_llama_folder(tmp_path):
    """make_llama_folder in tmp_path/llama_tiny: (folder, hf_model)."""
    return make_llama_folder(tmp_path / "llama_tiny")
