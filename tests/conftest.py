"""Shared test set-up: the repo root on sys.path, and helpers that many test files use."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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


def run_script(args, cwd=None, env=None, check=True, timeout=600):
    """Run `python args...` from the repo root (or cwd); return the CompletedProcess with
    stdout/stderr as text. check=True fails the test with the script's output on error."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([sys.executable] + list(args), cwd=cwd or ROOT, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def torchrun(args, cwd, nproc=2, timeout=300):
    """Run `torchrun --standalone --nproc_per_node=nproc args...` (CPU, gloo) and fail the test
    with its output unless it exits 0; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(torchrun_cmd(args, nproc), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    # the ranks' own errors come before torchrun's summary of them: keep enough of stderr
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    return p


def torchrun_cmd(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + list(args)


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
