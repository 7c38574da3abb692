"""prepare_vision.py: the synthetic task, the prepared files (SFT tokens with one placeholder, the
images once at the model's resolution, val held out by image), and bad input in one line."""

import json
import os

import numpy as np
import pytest
from conftest import run_script

from dataloader import get_tokenizer, read_meta, read_sft
from vision import read_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(ROOT, "prepare_vision.py")


def test_synthetic_set_is_prepared_with_val_held_out_by_image(tmp_path):
    run_script([PREPARE, "--synthetic=40", "--tokenizer=char", "--image_size=16", "--out_dir=data/s"], cwd=tmp_path)
    meta = read_meta(tmp_path / "data/s")
    assert meta["format"] == "image-sft" and meta["image_size"] == [16, 16]
    assert meta["image_token"] == len(meta["chars"])
    assert set(meta["kinds"]) <= {"count", "color", "shape", "where", "bigger"} and len(meta["kinds"]) >= 4
    records = [json.loads(line) for line in open(tmp_path / "data/s_source/data.jsonl")]
    assert all(len(r["output"].split()) == 1 for r in records)
    decode = get_tokenizer(meta)[1]
    n_images = 0
    for split in ("train", "val"):
        tokens, index = read_sft(tmp_path / "data/s", split)
        images, image_index = read_images(tmp_path / "data/s", split, len(index))
        assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8
        n_images += len(images)
        for (start, p, n), (row, kind) in zip(index.tolist(), image_index.tolist()):
            prompt = tokens[start:start + p].tolist()
            assert prompt.count(meta["image_token"]) == 1  # one placeholder per example, in the prompt
            answer = decode(tokens[start + p:start + n - 1].tolist()).strip()
            assert tokens[start + n - 1] == meta["chars"].index("\n")  # the answer's end
            text = decode([t for t in prompt if t != meta["image_token"]])
            assert any(r["output"] == answer and r["instruction"].replace("<image>", "").strip() in text
                       and r["kind"] == meta["kinds"][kind] for r in records)
    # every distinct image is in one split only: the two splits' images add up to the set's
    assert n_images == len({r["image"] for r in records}) == 40


def test_the_image_goes_where_the_text_says(tmp_path):
    from PIL import Image
    (tmp_path / "pics").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 10), (80 * i, 0, 0)).save(tmp_path / f"pics/{i}.png")
    lines = [{"image": "0.png", "instruction": "What is this?", "output": "dark"},
             {"image": "1.png", "instruction": "Look:", "input": "<image>\nwhich color?", "output": "red"},
             {"image": "2.png", "instruction": "What is this?\n<image>", "input": "", "output": "red"}]
    (tmp_path / "pics/qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run_script([PREPARE, "--input=pics/qa.jsonl", "--tokenizer=char", "--image_size=8", "--val_fraction=0.34",
                "--out_dir=data/q"], cwd=tmp_path)
    meta = read_meta(tmp_path / "data/q")
    decode = get_tokenizer(meta)[1]
    prompts = []
    for split in ("train", "val"):
        tokens, index = read_sft(tmp_path / "data/q", split)
        images, _ = read_images(tmp_path / "data/q", split, len(index))
        assert images.shape[1:] == (8, 8, 3)
        for start, p, _ in index.tolist():
            ids = tokens[start:start + p].tolist()
            cut = ids.index(meta["image_token"])
            prompts.append((decode(ids[:cut]), decode(ids[cut + 1:])))
    assert sorted(prompts) == sorted([("", "\nWhat is this?\nAnswer:"), ("Look:\n", "\nwhich color?\nAnswer:"),
                                      ("What is this?\n", "\nAnswer:")])


BAD = [  # (what the JSONL line is, what the one error line must say)
    ('{"image": "missing.png", "instruction": "q", "output": "a"}', "missing.png not found"),
    ('{"image": "empty.png", "instruction": "q", "output": "a"}', "empty.png is an empty file"),
    ('{"image": "text.png", "instruction": "q", "output": "a"}', "text.png cannot be read"),
    ('{"instruction": "q", "output": "a"}', "'image' is missing"),
    ('{"image": "ok.png", "instruction": "q", "output": "a"', "line 2 is not valid JSON"),
    ('["image", "q"]', "expected an object"),
]


@pytest.mark.parametrize("line,says", BAD)
def test_bad_input_is_one_line_naming_the_file(tmp_path, line, says):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "qa.jsonl").write_text('{"image": "ok.png", "instruction": "q", "output": "a"}\n' + line + "\n")
    p = run_script([PREPARE, "--input=qa.jsonl", "--tokenizer=char", "--out_dir=data/x"], cwd=tmp_path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: ") and says in last and "qa.jsonl" in last, p.stderr[-500:]
    assert "Traceback" not in p.stderr and not (tmp_path / "data/x").exists()


def test_a_hugging_face_dataset_is_read_through_datasets(tmp_path):
    """--hub reads with datasets.load_dataset: here a local folder of parquet files (what a Hub
    repository holds), so no network is needed; an answer given as a list gives its first."""
    import datasets
    from PIL import Image
    pics = [Image.fromarray(np.full((12, 10, 3), (200 * (i % 2), 40, 40), dtype=np.uint8)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"picture": pics, "q": ["What color?"] * 6,
                                     "a": [["red", "dark red"] if i % 2 else ["dark"] for i in range(6)]})
    (tmp_path / "vqa/data").mkdir(parents=True)
    ds.cast_column("picture", datasets.Image()).to_parquet(str(tmp_path / "vqa/data/train-00000.parquet"))
    run_script([PREPARE, "--hub=vqa", "--hub_image=picture", "--hub_question=q", "--hub_answer=a", "--tokenizer=char",
                "--image_size=8", "--val_fraction=0.34", "--out_dir=data/vqa"], cwd=tmp_path,
               env={"HF_HUB_OFFLINE": "1"})
    records = [json.loads(line) for line in open(tmp_path / "data/vqa_source/data.jsonl")]
    assert [r["output"] for r in records] == ["dark", "red"] * 3
    # two pictures, three rows each: one file each, and each picture's three questions in one split
    assert len({r["image"] for r in records}) == 2 and len(os.listdir(tmp_path / "data/vqa_source/images")) == 2
    assert all(r["image"] == records[i % 2]["image"] for i, r in enumerate(records))
    for split in ("train", "val"):
        _, index = read_sft(tmp_path / "data/vqa", split)
        images, _ = read_images(tmp_path / "data/vqa", split, len(index))
        assert len(images) == 1 and len(index) == 3
    assert read_meta(tmp_path / "data/vqa")["format"] == "image-sft"
    bad = run_script([PREPARE, "--hub=vqa", "--tokenizer=char", "--out_dir=data/x"], cwd=tmp_path, check=False,
                     env={"HF_HUB_OFFLINE": "1"})
    assert bad.returncode == 2 and "no column 'image'" in bad.stderr.strip().splitlines()[-1]


def test_synthetic_refuses_a_source_dir_or_out_dir_that_holds_files_before_drawing(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("my own")
    p = run_script([PREPARE, "--synthetic=4", "--source_dir=mine", "--out_dir=data/s"], cwd=tmp_path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "mine already holds notes.txt" in last and "--overwrite" in last, p.stderr[-500:]
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and not (tmp_path / "data/s").exists()
    (tmp_path / "data/s").mkdir(parents=True)
    (tmp_path / "data/s/old.bin").write_bytes(b"0000")
    p = run_script([PREPARE, "--synthetic=4", "--out_dir=data/s"], cwd=tmp_path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "data/s already holds" in last and "--overwrite" in last, p.stderr[-500:]
    assert not (tmp_path / "data/s_source").exists()  # nothing drawn
    run_script([PREPARE, "--synthetic=4", "--source_dir=mine", "--tokenizer=char", "--image_size=8",
                "--out_dir=data/s", "--overwrite"], cwd=tmp_path)
    assert (tmp_path / "mine/notes.txt").exists() and len(os.listdir(tmp_path / "mine/images")) == 4
