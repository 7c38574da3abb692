"""prepare_tokenizer.py: a byte-level BPE trained on a corpus round-trips any UTF-8 text, its special
tokens are where the project expects them, the held-out split, bad settings in one line, and
prepare -> train -> sample on it end to end."""

import json
import os

import pytest

from conftest import LLAMA_TEXT, ROOT, run_script
import prepare_tokenizer

# texts the corpus never showed: accents, emoji, other scripts, code, whitespace runs, CRLF, tabs, NUL
ODD = ["h\u00e9llo w\u00f6rld, na\u00efve caf\u00e9", "\U0001F642\U0001F44D\U0001F3FD family: \U0001F468\u200d\U0001F469\u200d\U0001F467",
       "\u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
       "def f(x):\n\treturn {'a': x ** 2}  # done\r\n", "   leading and trailing   ", "\n\n\n", "a\x00b\x7f",
       "<|endoftext|> as text"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tokenizers learnt from the test corpus, without and with <|bos|>: {bos: (folder, tok)}."""
    from transformers import AutoTokenizer
    out = {}
    for bos in (False, True):
        folder = str(tmp_path_factory.mktemp("tok") / "t")
        prepare_tokenizer.save_tokenizer(prepare_tokenizer.train_tokenizer([LLAMA_TEXT], 320, bos), folder, bos)
        out[bos] = folder, AutoTokenizer.from_pretrained(folder)
    return out


def test_any_text_round_trips_exactly(trained):
    for bos, (folder, tok) in trained.items():
        assert len(tok) == 320
        for text in ODD + [LLAMA_TEXT[:500]]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text, (bos, text)
            assert tok.unk_token_id is None or tok.unk_token_id not in ids
        # the corpus's own words are merged: fewer tokens than bytes
        assert len(tok(LLAMA_TEXT[:500])["input_ids"]) < 500 / 2


def test_the_special_tokens_are_where_the_scripts_look(trained):
    from dataloader import encode_pair, get_tokenizer, hf_tokenizer_meta, with_bos
    for bos, (folder, tok) in trained.items():
        meta = hf_tokenizer_meta(folder)
        assert tok.convert_ids_to_tokens(meta["eot"]) == "<|endoftext|>" and meta["vocab_size"] == 320
        assert meta["bos"] == ([tok.convert_tokens_to_ids("<|bos|>")] if bos else [])
        encode = get_tokenizer(meta)[0]
        # the eos in a text is the marker (as GPT-2's get_tokenizer reads it), and with_bos starts a text
        assert encode("a<|endoftext|>")[-1] == meta["eot"]
        assert with_bos(meta, encode("The king"))[:len(meta["bos"])] == meta["bos"]
        # byte-level: a text after another is tokenized as it is alone (no SentencePiece '\u2581')
        head, tail = encode_pair(encode, "The king", " is dead.")
        assert tail == encode(" is dead.") and head + tail == encode("The king is dead.")


def test_held_out_split():
    train, val = prepare_tokenizer.split_off_val(["abcdefghij"], 0.2, 0)
    assert train == ["abcdefgh"] and val == ["ij"]  # one document: its end
    docs = [f"doc {i}" for i in range(20)]
    train, val = prepare_tokenizer.split_off_val(docs, 0.1, 0)
    assert len(val) == 2 and sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert prepare_tokenizer.split_off_val(docs, 0.0, 0) == (docs, [])


@pytest.mark.parametrize("args, message", [
    (["--vocab_size=100"], "--vocab_size must be at least 258"),
    (["--val_fraction=1"], "--val_fraction must be"),
    (["--data_files=nope/*.txt"], "no files match"),
    ([], "already exists and is not an empty folder"),
])
def test_bad_settings_are_one_line(tmp_path, args, message):
    (tmp_path / "c.txt").write_text(LLAMA_TEXT)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = "--out_dir=new" if args else "--out_dir=full"
    p = run_script([os.path.join(ROOT, "prepare_tokenizer.py"), "--data_files=c.txt", out, *args], cwd=tmp_path,
                   check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_prepare_train_sample_on_a_trained_tokenizer(tmp_path):
    """prepare_tokenizer.py on a text file -> prepare_shakespeare.py with it -> train.py -> sample.py."""
    text = open(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")).read()[:60000] \
        if os.path.isfile(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")) else LLAMA_TEXT
    (tmp_path / "in.txt").write_text(text)
    p = run_script([os.path.join(ROOT, "prepare_tokenizer.py"), "--data_files=in.txt", "--vocab_size=512",
                    "--out_dir=tok", "--bos"], cwd=tmp_path)
    assert "bytes per token" in p.stdout and os.path.isfile(tmp_path / "tok" / "tokenizer.json")
    run_script([os.path.join(ROOT, "prepare_shakespeare.py"), "--input=in.txt", "--tokenizer=tok", "--out_dir=data/mine"],
               cwd=tmp_path)
    meta = json.loads((tmp_path / "data" / "mine" / "meta.json").read_text())
    assert meta["tokenizer"] == "hf" and meta["vocab_size"] == 512 and len(meta["bos"]) == 1
    run_script([os.path.join(ROOT, "train.py"), "--dataset=mine", "--out_dir=out", "--n_layer=2", "--n_head=2",
                "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=20", "--eval_iters=2",
                "--eval_interval=10", "--device=cpu", "--compile=False"], cwd=tmp_path)
    s = run_script([os.path.join(ROOT, "sample.py"), "--out_dir=out", "--start=First Citizen:", "--num_samples=1",
                    "--max_new_tokens=20", "--device=cpu"], cwd=tmp_path)
    assert s.stdout.count("First Citizen:") == 1 and len(s.stdout.split("First Citizen:")[1].strip()) > 0
