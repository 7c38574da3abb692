"""prepare_shakespeare.py with --input, for both tokenizers."""

import json
import os

import numpy as np

from conftest import ROOT, needs_gpt2_bpe, run_script
from dataloader import read_tokens

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def test_char(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    p = run_script([os.path.join(ROOT, "prepare_shakespeare.py"), "--input=in.txt"], cwd=tmp_path)
    d = tmp_path / "data" / "shakespeare_char"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["chars"] == sorted(set(TEXT))
    train, val = read_tokens(str(d / "train.bin")), read_tokens(str(d / "val.bin"))
    assert len(val) == int(len(TEXT) * 0.1) and len(train) + len(val) == len(TEXT)
    decoded = "".join(meta["chars"][i] for i in np.concatenate([train, val]))
    assert decoded == TEXT
    assert "train" in p.stdout and f"{len(train):,}" in p.stdout


@needs_gpt2_bpe
def test_gpt2(tmp_path):
    import tiktoken
    (tmp_path / "in.txt").write_text(TEXT)
    run_script([os.path.join(ROOT, "prepare_shakespeare.py"), "--input=in.txt", "--tokenizer=gpt2"], cwd=tmp_path)
    d = tmp_path / "data" / "shakespeare"
    assert json.loads((d / "meta.json").read_text()) == {"tokenizer": "gpt2"}
    ids = np.concatenate([read_tokens(str(d / "train.bin")), read_tokens(str(d / "val.bin"))]).tolist()
    assert tiktoken.get_encoding("gpt2").decode(ids) == TEXT


def test_missing_input_is_one_line(tmp_path):
    p = run_script([os.path.join(ROOT, "prepare_shakespeare.py"), "--input=nope.txt"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "nope.txt" in p.stderr and "Traceback" not in p.stderr


def test_the_same_preparation_again_changes_nothing_and_another_needs_overwrite(tmp_path):
    # the README's main command prepares the data every time it is run: the same dataset again is
    # left as it is; a different one into the same folder is refused, then --overwrite replaces it
    (tmp_path / "in.txt").write_text(TEXT)
    (tmp_path / "other.txt").write_text(TEXT.upper())
    prepare = lambda *a, check=True: run_script([os.path.join(ROOT, "prepare_shakespeare.py"), *a], cwd=tmp_path,
                                                check=check)
    prepare("--input=in.txt")
    d = tmp_path / "data" / "shakespeare_char"
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    assert "nothing changed" in prepare("--input=in.txt").stdout
    p = prepare("--input=other.txt", check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before  # untouched, no temp folder left
    assert sorted(os.listdir(tmp_path / "data")) == ["shakespeare_char"]
    prepare("--input=other.txt", "--overwrite")
    assert json.loads((d / "meta.json").read_text())["chars"] == sorted(set(TEXT.upper()))
