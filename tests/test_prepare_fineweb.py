"""prepare_fineweb.py: local corpora -> llm.c-format shards, checked against tiktoken directly;
resuming after an interruption; the shards read back by the DataLoader."""

import glob
import json
import os
import sys

import numpy as np
import pytest

from conftest import gpt2_encoding_available, needs_gpt2_bpe, run_script
from dataloader import EOT, MAGIC, DataLoader, read_meta, read_tokens

SHARD = 2000  # tokens per shard: small, so a few hundred documents make several shards


def make_docs(n=300):
    """Documents of varied length, with the cases that could go wrong: an empty one, non-ASCII
    text, and a literal <|endoftext|> inside a text (which must stay text, not a separator)."""
    rng = np.random.default_rng(0)
    words = "the a model learns to predict next token from data of web pages about science history".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + f" ({i})" for i in range(n)]
    docs[3] = ""
    docs[7] = "Ünïcödé text — naïve café, 東京 🙂"
    docs[11] = "a page that quotes <|endoftext|> literally"
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")


def expected_stream(docs):
    """The reference token stream, straight from tiktoken: EOT before every document."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return np.array([t for d in docs for t in [EOT] + enc.encode_ordinary(d)], dtype=np.uint16)


def shard_files(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "fineweb_*.bin")), key=lambda p: p[-10:])  # by index


def folder_bytes(out_dir):
    """Every file a run leaves (shards, meta.json, the progress record), by name."""
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(os.path.join(out_dir, "*"))}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow cache inside the test's folder, and never reach for the network."""
    import datasets
    cache = str(tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def prepare(monkeypatch, *args):
    """Run prepare_fineweb.main() in this process (cheaper than a subprocess: datasets is
    imported once). One process, no pool."""
    import prepare_fineweb
    monkeypatch.setattr(sys, "argv", ["prepare_fineweb.py", "--num_proc=1", *args])
    prepare_fineweb.main()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two jsonl files, and the shards of one uninterrupted command-line run over both
    (made once for the module: the tests only read them)."""
    if not gpt2_encoding_available():
        pytest.skip("GPT-2 BPE files unavailable")
    tmp = tmp_path_factory.mktemp("corpus")
    docs = make_docs()
    write_jsonl(str(tmp / "part_a.jsonl"), docs[:180])
    write_jsonl(str(tmp / "part_b.jsonl"), docs[180:])
    out = str(tmp / "full")
    # a real subprocess, through the pool, and the files given as a glob
    run_script(["prepare_fineweb.py", f"--data_files={tmp}/part_*.jsonl", f"--out_dir={out}",
                f"--shard_size={SHARD}", "--num_proc=2"],
               env={"HF_DATASETS_CACHE": str(tmp / "hf_cache"), "HF_HUB_OFFLINE": "1"})
    return docs, f"{tmp}/part_*.jsonl", out


@needs_gpt2_bpe
def test_shards_hold_the_documents_in_order(corpus):
    docs, _, out = corpus
    files = shard_files(out)
    names = [os.path.basename(f) for f in files]
    ref = expected_stream(docs)
    # sum over documents of 1 + len(BPE tokens), cut into full shards and one shorter last shard
    n_shards = -(-len(ref) // SHARD)
    assert n_shards >= 4
    assert names == ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_shards)]
    lengths = [len(read_tokens(f)) for f in files]
    assert lengths[:-1] == [SHARD] * (n_shards - 1) and sum(lengths) == len(ref)
    stream = np.concatenate([np.asarray(read_tokens(f)) for f in files])
    np.testing.assert_array_equal(stream, ref)
    # decoding between the separators gives back every document, the literal one included
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    cuts = np.flatnonzero(stream == EOT)
    assert len(cuts) == len(docs) and cuts[0] == 0
    pieces = np.split(stream, cuts[1:])
    assert [enc.decode(p[1:].tolist()) for p in pieces] == docs
    assert read_meta(out) == {"tokenizer": "gpt2"}


@needs_gpt2_bpe
def test_header_is_the_llm_c_format(corpus):
    # built here by hand from the published format: 256 int32 [20240520, 1, n, 0...], then uint16
    _, _, out = corpus
    f = shard_files(out)[1]
    raw = open(f, "rb").read()
    n = (len(raw) - 1024) // 2
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, n]
    assert MAGIC == 20240520
    assert raw[:1024] == header.tobytes() and n == SHARD
    np.testing.assert_array_equal(np.frombuffer(raw[1024:], dtype="<u2"), read_tokens(f))


@needs_gpt2_bpe
def test_resume_gives_identical_files(corpus, tmp_path, monkeypatch):
    docs, pattern, full = corpus
    want = folder_bytes(full)
    out = str(tmp_path / "resumed")
    common = [f"--data_files={pattern}", f"--out_dir={out}", f"--shard_size={SHARD}"]
    # 1) stopped early, mid-document and mid-shard, as a --max_tokens run does
    prepare(monkeypatch, *common, f"--max_tokens={2 * SHARD + 777}")
    assert len(read_tokens(os.path.join(out, "fineweb_train_000002.bin"))) == 777
    # 2) a crash: a half-written temp file, and a shard cut short on disk
    open(os.path.join(out, "fineweb_train_000003.bin.tmp"), "wb").write(b"junk")
    full_shard = os.path.join(out, "fineweb_train_000001.bin")
    with open(full_shard, "r+b") as f:
        f.truncate(1024 + 100)
    prepare(monkeypatch, *common)
    got = folder_bytes(out)
    assert got.keys() == want.keys()  # the orphan temp file is gone
    for name in want:
        assert got[name] == want[name], name
    # 3) a shard deleted from a finished folder is written again, the same
    os.remove(os.path.join(out, "fineweb_train_000002.bin"))
    prepare(monkeypatch, *common)
    assert folder_bytes(out)["fineweb_train_000002.bin"] == want["fineweb_train_000002.bin"]


@needs_gpt2_bpe
def test_a_folder_being_written_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from configurator import lock_folder
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    lock = lock_folder(str(tmp_path / "o"), "busy")  # as a live run holds it
    with pytest.raises(SystemExit) as e:
        prepare(monkeypatch, f"--data_files={tmp_path}/d.jsonl", f"--out_dir={tmp_path}/o")
    lock.close()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "another prepare_fineweb.py is writing into" in err


@pytest.mark.slow
@needs_gpt2_bpe
def test_killed_for_real_then_rerun_gives_identical_files(tmp_path):
    # SIGKILL (an OOM kill, a lost node): no handler runs, whatever was half-written stays
    import signal
    import subprocess
    import time
    rng = np.random.default_rng(1)
    words = np.array("the a model learns to predict next token from web pages about science".split())
    write_jsonl(tmp_path / "big.jsonl", [" ".join(rng.choice(words, size=1000)) for _ in range(4000)])
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prepare_fineweb.py")
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, script, "--data_files=big.jsonl", "--shard_size=100000", "--num_proc=1"]
    proc = subprocess.Popen(cmd + ["--out_dir=killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    third = tmp_path / "killed" / "fineweb_train_000003.bin"
    deadline = time.time() + 120
    while not third.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"  # ~40 shards in all
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = len(shard_files(tmp_path / "killed"))
    subprocess.run(cmd + ["--out_dir=killed"], cwd=tmp_path, env=env, check=True, capture_output=True)
    subprocess.run(cmd + ["--out_dir=whole"], cwd=tmp_path, env=env, check=True, capture_output=True)
    got, want = folder_bytes(tmp_path / "killed"), folder_bytes(tmp_path / "whole")
    assert left < len(shard_files(tmp_path / "whole")) and got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name


@needs_gpt2_bpe
def test_parquet_and_txt_give_the_same_tokens(corpus, tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    docs, _, full = corpus
    pq = str(tmp_path / "docs.parquet")
    pd.DataFrame({"content": docs, "n": range(len(docs))}).to_parquet(pq)
    out = str(tmp_path / "pq")
    prepare(monkeypatch, f"--data_files={pq}", "--text_field=content", f"--out_dir={out}", f"--shard_size={SHARD}")
    assert folder_bytes(out).keys() == folder_bytes(full).keys()
    for a, b in zip(shard_files(out), shard_files(full)):
        np.testing.assert_array_equal(read_tokens(a), read_tokens(b))
    # plain text: each .txt file is one document, newlines and all
    texts = ["first file\nwith two lines\n", "second file\n\nwith a blank line"]
    for i, t in enumerate(texts):
        (tmp_path / f"t{i}.txt").write_text(t)
    out = str(tmp_path / "txt")
    prepare(monkeypatch, f"--data_files={tmp_path}/t0.txt,{tmp_path}/t1.txt", f"--out_dir={out}")
    np.testing.assert_array_equal(read_tokens(shard_files(out)[0]), expected_stream(texts))


@needs_gpt2_bpe
def test_dataloader_reads_the_shards(corpus):
    _, _, out = corpus
    B, T = 2, 64
    files = shard_files(out)[1:]  # the train shards, in order
    # without shuffling, the loader walks each shard in windows of T (+1 for the targets)
    want = []
    for f in files:
        tok = np.asarray(read_tokens(f), dtype=np.int64)
        n_seq = (len(tok) - 1) // T
        want += [tok[i * T:i * T + T + 1] for i in range(n_seq - n_seq % B)]
    loader = DataLoader(out, "train", B, T, shuffle=False)
    got = []
    for _ in range(len(want) // B):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T)
        assert (x[:, 1:] == y[:, :-1]).all()
        got += [np.concatenate([xi.numpy(), yi[-1:].numpy()]) for xi, yi in zip(x, y)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))  # across all shard boundaries
    # the val loader reads only the first shard
    x, _ = DataLoader(out, "val", B, T, shuffle=False).next_batch()
    np.testing.assert_array_equal(x[0].numpy(), np.asarray(read_tokens(shard_files(out)[0]))[:T])


def test_no_files_match_is_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        prepare(monkeypatch, f"--data_files={tmp_path}/missing_*.jsonl", f"--out_dir={tmp_path}/o")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "no files match" in err


@needs_gpt2_bpe
def test_missing_text_field_names_the_fields(tmp_path, hf_cache, monkeypatch, capsys):
    write_jsonl(str(tmp_path / "d.jsonl"), ["x", "y"], field="body")
    with pytest.raises(SystemExit) as e:
        prepare(monkeypatch, f"--data_files={tmp_path}/d.jsonl", f"--out_dir={tmp_path}/o")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2
    assert "'text'" in err and "body, id" in err  # names the missing field and the real ones


def test_a_hugging_face_tokenizer_gives_its_own_tokens_and_resumes(tmp_path, hf_cache, monkeypatch, capsys):
    # a Llama-style tokenizer (bos <s> = 0, eos </s> = 1), trained in the test: every document is
    # eos, bos, then its tokens as transformers encodes it (a literal "</s>" stays text); the pool
    # (2 workers, a subprocess) and one process give the same bytes, and so does a resumed run
    from conftest import make_llama_folder
    from transformers import AutoTokenizer
    folder, _ = make_llama_folder(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(folder)
    docs = make_docs(120)
    docs[11] = "a page that quotes </s> and <s> literally"
    write_jsonl(str(tmp_path / "c.jsonl"), docs)
    common = [f"--data_files={tmp_path}/c.jsonl", f"--tokenizer={folder}", "--shard_size=1000"]
    run_script(["prepare_fineweb.py", *common, f"--out_dir={tmp_path}/pool", "--num_proc=2"],
               env={"HF_DATASETS_CACHE": hf_cache, "HF_HUB_OFFLINE": "1"})
    ref = [t for d in docs for t in [1, 0] + tok(d, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    assert tok(docs[11], add_special_tokens=False)["input_ids"] != tok(docs[11], add_special_tokens=False,
                                                                      split_special_tokens=True)["input_ids"]
    stream = np.concatenate([np.asarray(read_tokens(f)) for f in shard_files(tmp_path / "pool")])
    np.testing.assert_array_equal(stream, np.array(ref))
    meta = read_meta(tmp_path / "pool")
    assert meta["tokenizer"] == "hf" and meta["eot"] == 1 and meta["bos"] == [0] and meta["vocab_size"] == len(tok)
    out = str(tmp_path / "one")
    prepare(monkeypatch, *common, f"--out_dir={out}", "--max_tokens=1500")  # stopped mid-shard
    prepare(monkeypatch, *common, f"--out_dir={out}")
    assert folder_bytes(out) == folder_bytes(tmp_path / "pool")
    # GPT-2's BPE into this folder, or an HF tokenizer without a folder of its own: one line each
    for args in ([f"--data_files={tmp_path}/c.jsonl", "--shard_size=1000", f"--out_dir={out}"], common):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            prepare(monkeypatch, *args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count("\n") == 0 and "tokenizer" in err and "--out_dir" in err, err
