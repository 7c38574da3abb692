"""vision.py: the ViT, the projector, splicing an image into the prompt, batched answers, the
pretrained SigLIP/CLIP tower and its preprocessing against transformers; train_vision.py's
runs (resume, DDP = accumulation, a trained model's answers need the image) and sample.py --image."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equal_up_to_rounding, read_log, run_script, torchrun

from model import GPT, GPTConfig
from vision import (HFTower, Projector, ViT, VisionLM, attach_vision, image_settings, load_hf_tower, load_vision_model,
                    normalize, resize_image)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = dict(tower="", vit_layers=2, vit_heads=2, vit_embd=32, patch_size=4, shuffle=2, image_size=16, n_patches=16,
           image=image_settings("", 16))


def tiny_vlm(image_token=40, vocab=40):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    return VisionLM(attach_vision(gpt, VIT).eval(), image_token)


def test_vit_sees_every_patch_and_projector_shuffles():
    torch.manual_seed(0)
    vit = ViT(GPTConfig(n_layer=2, n_head=2, n_embd=32), image_size=16, patch_size=4).eval()
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[..., 12:, 12:] += 1.0  # only the last patch changes
    a, b = vit(x), vit(y)
    assert a.shape == (1, 16, 32)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first patch saw it: no causal mask
    proj = Projector(3, 5, shuffle=2)
    feats = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)  # a 4 x 4 grid of 3-vectors
    out = proj(feats)  # (2, 4, 5)
    grid = feats.view(2, 4, 4, 3)
    square = torch.cat([grid[:, 0, 2], grid[:, 0, 3], grid[:, 1, 2], grid[:, 1, 3]], dim=-1)  # top-right 2x2
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out[:, 1], square @ proj.c_proj.weight.T)


def test_the_image_goes_where_the_placeholder_is_and_the_loss_is_on_answers():
    vlm = tiny_vlm()
    gpt = vlm.gpt
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    # row 0: image first; row 1: the question, then the image. y: -1 on prompts, the answer after
    x = torch.tensor([[40, 5, 6, 7, 8, 9], [5, 6, 40, 7, 8, 0]])
    y = torch.tensor([[-1, -1, -1, 8, 9, 3], [-1, -1, -1, -1, 0, 3]])
    loss = vlm(x, y, images)
    img = vlm.image_embeds(images)  # (2, 4, 32)
    wte = gpt.transformer.wte.weight
    losses = []
    for b, p in ((0, 0), (1, 2)):  # the reference: the sequence written out by hand
        emb = torch.cat([wte[x[b, :p]], img[b], wte[x[b, p + 1:]]])[None]
        tgt = torch.cat([y[b, :p], torch.full((3,), -1), y[b, p:]])
        logits = gpt.lm_head(gpt.hidden_states(None, embeds=emb))[0]
        losses.append(F.cross_entropy(logits, tgt, ignore_index=-1, reduction="sum"))
    n = int((y != -1).sum())
    torch.testing.assert_close(loss, sum(losses) / n)
    with pytest.raises(Exception, match="placeholder"):
        vlm(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, 7, 8]]), images[:1])


def test_batched_answers_equal_one_at_a_time():
    vlm = tiny_vlm()
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    prompts = [[40, 5, 6], [7, 40, 8, 9, 10, 11], [12, 13, 40]]  # different lengths: left-padded together
    together = vlm.answer(prompts, images, max_new_tokens=6, stop_token=39)
    alone = [vlm.answer([p], images[i:i + 1], max_new_tokens=6, stop_token=39)[0] for i, p in enumerate(prompts)]
    assert together == alone and all(len(a) >= 1 for a in alone)


def test_bench_vision_times_a_step():
    p = run_script([os.path.join(ROOT, "bench.py"), "--mode=vision", "--n_layer=1", "--n_head=2", "--n_embd=32",
                    "--vocab_size=30", "--batch_size=2", "--block_size=24", "--image_size=16", "--vit_layers=1",
                    "--steps=1", "--warmup=0", "--device=cpu"])
    assert "bench vision" in p.stdout and "4 image tokens" in p.stdout and "tok/s (text + image)" in p.stdout
    bad = run_script([os.path.join(ROOT, "bench.py"), "--mode=vision", "--image_size=30"], check=False)
    assert bad.returncode == 2 and "--image_size=30" in bad.stderr.strip().splitlines()[-1]


def test_plan_sizes_a_run_with_a_pretrained_tower_without_a_download(tmp_path):
    p = run_script([os.path.join(ROOT, "train_vision.py"), "--tower=google/siglip-base-patch16-224",
                    "--init_from=gpt2", "--freeze=tower", "--dataset=none", "--batch_size=16", "--block_size=256",
                    "--plan"], cwd=tmp_path)
    assert "tower 92.88M (frozen)" in p.stdout and "LM 123.85M (trained)" in p.stdout
    assert "196 patches of 16x16 -> 49 LM tokens" in p.stdout and not os.listdir(tmp_path)
    p = run_script([os.path.join(ROOT, "train_vision.py"), "--tower=google/siglip-base-patch16-224",
                    "--init_from=gpt2", "--freeze=tower", "--lora_rank=8", "--dataset=none", "--batch_size=16",
                    "--block_size=256", "--plan"],
                   cwd=tmp_path)
    assert "LM 123.85M (frozen)" in p.stdout and "LoRA 0.29M (trained)" in p.stdout  # GPT-2's q,v at r=8


def hf_folder(tmp_path, kind):
    """A random tiny SigLIP or CLIP vision model and its image processor (saved as a Hub folder)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
        proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**common))
        proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path / kind
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder), model.eval(), proc


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_pretrained_tower_preprocessing_and_features_equal_transformers(tmp_path, kind):
    from PIL import Image
    folder, hf, proc = hf_folder(tmp_path, kind)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (41, 33))]
    want = proc(pics, return_tensors="pt")["pixel_values"]  # (2, 3, 32, 32)
    settings = image_settings(folder)
    ours = torch.from_numpy(np.stack([resize_image(p, settings) for p in pics]))  # (2, 32, 32, 3) uint8
    pixels = normalize(ours, torch.tensor(settings["mean"]), torch.tensor(settings["std"]), settings["rescale"])
    assert (pixels - want).abs().max() < 1e-6
    tower, config = load_hf_tower(folder)
    assert isinstance(tower, HFTower) and config["model_type"] == f"{kind}_vision_model"
    with torch.no_grad():
        feats = tower.eval()(pixels)
        ref = hf(pixel_values=want).last_hidden_state[:, 1 if kind == "clip" else 0:]  # CLIP: no class token
    assert feats.shape == (2, 16, 32)
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-5)


def test_a_run_with_a_frozen_pretrained_tower(tmp_path):
    """Data prepared for a SigLIP tower's processor, two steps with the tower frozen (the second
    after a resume): the tower's weights are transformers' still, and the run loads back with them."""
    folder, hf, _ = hf_folder(tmp_path, "siglip")
    run_script([os.path.join(ROOT, "prepare_vision.py"), "--synthetic=20", "--tokenizer=char", f"--tower={folder}",
                "--out_dir=data/s"], cwd=tmp_path)
    run = [os.path.join(ROOT, "train_vision.py"), "--dataset=s", f"--tower={folder}", "--freeze=tower",
           "--device=cpu", "--batch_size=4", "--block_size=60", "--n_layer=1", "--n_head=2", "--n_embd=32",
           "--eval_iters=1", "--eval_questions=4", "--warmup_iters=1", "--out_dir=o"]
    run_script(run + ["--max_iters=1"], cwd=tmp_path)
    run_script(run + ["--max_iters=2", "--init_from=resume"], cwd=tmp_path)  # a resume keeps the tower frozen too
    vlm, meta, cfg = load_vision_model(str(tmp_path / "o"))
    assert meta["image_size"] == [32, 32] and cfg["vision"]["n_patches"] == 16
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(vlm.gpt.vision.model.state_dict()[name], p, rtol=0, atol=0)
    bad = run_script([os.path.join(ROOT, "train_vision.py"), "--dataset=s", "--device=cpu", "--out_dir=o2"],
                     cwd=tmp_path, check=False)  # the data was resized for the SigLIP tower, not for a new ViT
    assert bad.returncode == 2 and f"--tower={folder}" in bad.stderr.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# runs of train_vision.py on a small synthetic set (prepared once per module)

TRAIN = ["--dataset=shapes", "--device=cpu", "--batch_size=8", "--block_size=56", "--n_layer=2", "--n_head=2",
         "--n_embd=32", "--vit_layers=1", "--vit_heads=2", "--vit_embd=32", "--eval_iters=2", "--eval_questions=16",
         "--log_interval=1", "--warmup_iters=2", "--dropout=0.1"]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision")
    run_script([os.path.join(ROOT, "prepare_vision.py"), "--synthetic=60", "--tokenizer=char", "--image_size=16",
                "--out_dir=data/shapes"], cwd=d)
    return d


@pytest.fixture(scope="module")
def full_run(shapes_dir):
    """shapes_dir with a 6-step run in full/ (evaluated at steps 0, 3 and 6)."""
    run_script([os.path.join(ROOT, "train_vision.py")] + TRAIN + ["--out_dir=full", "--max_iters=6",
                                                                  "--eval_interval=3"], cwd=shapes_dir)
    return shapes_dir


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_resume_is_exact_and_the_checkpoint_has_everything_to_answer(full_run):
    d = full_run
    train = [os.path.join(ROOT, "train_vision.py")] + TRAIN
    run_script(train + ["--out_dir=half", "--max_iters=3", "--eval_interval=3"], cwd=d)
    run_script(train + ["--out_dir=half", "--max_iters=6", "--eval_interval=3", "--init_from=resume"], cwd=d)
    a, b = weights(d / "full"), weights(d / "half")
    assert any(k.startswith("vision.") for k in a) and any(k.startswith("projector.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_log(d / "full" / "log.txt", "train") == read_log(d / "half" / "log.txt", "train")
    # the evaluations, in order: the resume does not measure step 3 again (its checkpoint holds it)
    val_lines = lambda run: [line for line in open(d / run / "log.txt") if line.split()[1].startswith("val")]
    assert val_lines("full") == val_lines("half")
    assert [int(line.split()[0]) for line in val_lines("full")] == [0, 0, 0, 3, 3, 3, 6, 6, 6]
    vlm, meta, cfg = load_vision_model(str(d / "full"))
    assert meta["format"] == "image-sft" and cfg["vision"]["n_patches"] == 16
    # sample.py answers a question about a picture file
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "red.png")
    p = run_script([os.path.join(ROOT, "sample.py"), "--out_dir=full", "--image=red.png",
                    "--start=What color is the circle?", "--num_samples=1", "--max_new_tokens=8", "--temperature=0"],
                   cwd=d)
    from dataloader import get_tokenizer
    from vision import answer_end, encode_example, read_image, render_prompt
    encode, decode = get_tokenizer(meta)
    image = torch.from_numpy(read_image(str(d / "red.png"), cfg["vision"]["image"]))[None]  # (1, H, W, 3)
    prompt, _ = encode_example(meta, encode, render_prompt(meta["template"], meta, "What color is the circle?"), "",
                               meta["image_token"], answer_end(meta))
    assert p.stdout.strip() == decode(vlm.answer([prompt], image, 8, answer_end(meta))[0]).strip()
    bad = run_script([os.path.join(ROOT, "sample.py"), "--out_dir=full", "--image=none.png"], cwd=d, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: image none.png not found"
    assert "Traceback" not in bad.stderr


def test_chat_about_a_picture_answers_each_line_as_start_would(full_run, monkeypatch, capsys):
    """sample.py --image --chat: every stdin line is a question about the picture, answered as
    --start answers it; an overlong one is an error line and the next is still answered."""
    import io
    from contextlib import nullcontext

    from PIL import Image

    import sample
    from vision import sample as ask
    d = full_run
    Image.new("RGB", (16, 16), (40, 180, 60)).save(d / "green.png")
    cfg = dict(sample.DEFAULTS, out_dir=str(d / "full"), image=str(d / "green.png"), max_new_tokens=8,
               temperature=0.0, num_samples=1)
    questions = ["How many shapes?", "What shape is it? " * 4, "What color is the circle?"]
    expected = []
    for q in questions[::2]:
        ask(dict(cfg, start=q), "cpu", nullcontext())
        expected.append(capsys.readouterr().out)
    lines = questions + ["/reset", "/exit", "How many shapes?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    ask(dict(cfg, chat=True), "cpu", nullcontext())
    out, err = capsys.readouterr()
    assert out == "".join(expected) and len(out.splitlines()) == 2
    assert err.count("error: the question is too long") == 1 and "nothing to forget" in err


def test_vision_py_scores_with_the_image_a_blank_one_and_another_picture(full_run):
    """python vision.py prints, per kind, the accuracy with each question's picture, a blank one,
    and another picture of the split; each equals vision.accuracy's, computed here."""
    from dataloader import get_tokenizer
    from vision import accuracy, answer_end, val_questions
    d = full_run
    p = run_script([os.path.join(ROOT, "vision.py"), "--out_dir=full", "--device=cpu"], cwd=d)
    lines = p.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if "exact-match accuracy" in line) + 1:]
    rows = {line.split()[0]: line.split()[1:] for line in table}
    vlm, meta, _ = load_vision_model(str(d / "full"))
    questions, images, kinds = val_questions(str(d / "data/shapes"))
    decode, stop = get_tokenizer(meta)[1], answer_end(meta)
    others = images[np.random.default_rng(0).permutation(len(images))]
    expected = [accuracy(vlm, questions, images, kinds, stop, decode, "cpu"),
                accuracy(vlm, questions, images, kinds, stop, decode, "cpu", blank=True),
                accuracy(vlm, questions, others, kinds, stop, decode, "cpu")]
    assert rows["kind"] == ["image", "blank", "another"] and "all" in rows
    for kind, got in rows.items():
        if kind != "kind":
            assert got == [f"{e[kind]:.1%}" for e in expected], kind

def test_a_question_or_a_dataset_that_does_not_fit_the_run_is_one_line(full_run):
    d = full_run
    sample = [os.path.join(ROOT, "sample.py"), "--out_dir=full", "--image=red.png", "--max_new_tokens=2"]
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 30, 30)).save(d / "red.png")
    # 72 characters, the template and 4 image tokens: more than block_size=56
    for start, says in (("What shape is it? " * 4, "--start is too long"),
                        ("<image> or <image>?", "--start holds <image> 2 times")):
        p = run_script(sample + [f"--start={start}"], cwd=d, check=False)
        assert p.returncode == 2 and says in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr
    for name, change, says in (("chars", lambda m: m["chars"].append("~"), "tokenizer"),
                               ("size", lambda m: m["image"].update(size=[8, 8]), "holds 8x8 images")):
        shutil.copytree(d / "data/shapes", d / f"data/{name}", dirs_exist_ok=True)
        meta = json.loads((d / f"data/{name}/meta.json").read_text())
        change(meta)
        (d / f"data/{name}/meta.json").write_text(json.dumps(meta))
        p = run_script([os.path.join(ROOT, "vision.py"), "--out_dir=full", f"--dataset={name}", "--device=cpu"],
                       cwd=d, check=False)
        assert p.returncode == 2 and says in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def test_each_training_script_refuses_the_others_data_in_one_line(shapes_dir, workdir):
    p = run_script([os.path.join(ROOT, "train.py"), "--dataset=shapes", "--device=cpu", "--out_dir=o"], cwd=shapes_dir,
                   check=False)
    assert p.returncode == 2 and "python train_vision.py --dataset=shapes" in p.stderr.strip().splitlines()[-1]
    p = run_script([os.path.join(ROOT, "train_vision.py"), "--dataset=tiny", "--device=cpu"], cwd=workdir, check=False)
    assert p.returncode == 2 and "not an image-text dataset" in p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr


def test_lora_on_the_lm_keeps_its_weights_and_saves_the_tower(shapes_dir):
    """--lora_rank on a trained LM: the LM's weights stay as they were, the adapters, tower and
    projector train; the checkpoint holds those three (not the LM, named as its base), loads back,
    and a resume is exact. Without a trained LM, or with --freeze=lm, it is one line."""
    from checkpoint import make_checkpoint, save_checkpoint
    from dataloader import vocab_size_of
    d = shapes_dir
    meta = json.loads((d / "data/shapes/meta.json").read_text())
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=64, vocab_size=vocab_size_of(meta), n_layer=2, n_head=2, n_embd=32))
    (d / "lm").mkdir(exist_ok=True)
    save_checkpoint(make_checkpoint(lm, meta, {}, step=0), str(d / "lm" / "ckpt.pt"))
    train = [os.path.join(ROOT, "train_vision.py")] + TRAIN + ["--init_from=lm", "--lora_rank=2", "--eval_interval=2"]
    run_script(train + ["--out_dir=lora", "--max_iters=4"], cwd=d)
    run_script(train + ["--out_dir=lora_half", "--max_iters=2"], cwd=d)
    run_script(train + ["--out_dir=lora_half", "--max_iters=4", "--init_from=resume"], cwd=d)
    ck = torch.load(d / "lora" / "ckpt.pt", weights_only=True)
    assert "model" not in ck and ck["base"] == str(d / "lm") and ck["lora"]["rank"] == 2
    assert {k.split(".")[0] for k in ck["parts"]} == {"vision", "projector"}
    half = torch.load(d / "lora_half" / "ckpt.pt", weights_only=True)
    for k in ck["parts"]:
        assert torch.equal(ck["parts"][k], half["parts"][k]), k
    for k in ck["lora"]["tensors"]:
        assert torch.equal(ck["lora"]["tensors"][k], half["lora"]["tensors"][k]), k
    assert read_log(d / "lora" / "log.txt", "train") == read_log(d / "lora_half" / "log.txt", "train")
    vlm, _, _ = load_vision_model(str(d / "lora"))
    got = vlm.gpt.state_dict()
    for k, v in lm.state_dict().items():  # the base, untouched (its positions cropped to the run's block_size)
        assert torch.equal(got[k], v[:56] if k == "transformer.wpe.weight" else v), k
    for k in ck["parts"]:
        assert torch.equal(got[k], ck["parts"][k]), k
    assert any(k.endswith(".lora_B.q") and v.abs().sum() > 0 for k, v in got.items())  # the adapters trained
    for args, says in ((["--init_from=scratch", "--out_dir=bad"], "give one with --init_from"),
                       (["--freeze=lm", "--out_dir=bad"], "give one of the two"),
                       (["--lora_dropout=1.5", "--out_dir=bad"], "--lora_dropout must be in [0, 1)"),
                       (["--out_dir=lora", "--init_from=resume", "--max_iters=6", "--lora_alpha=8"],
                        "lora_alpha=16.0")):
        p = run_script(train + args, cwd=d, check=False)
        assert p.returncode == 2 and says in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_the_resumed_run_goes_on_as_an_uninterrupted_one(shapes_dir):
    d, common = shapes_dir, TRAIN + ["--eval_interval=0", "--lr_decay_iters=1000", "--dropout=0.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_vision.py")] + common +
                            ["--max_iters=100000", "--out_dir=sig"], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log, deadline = d / "sig" / "log.txt", time.time() + 120
    while time.time() < deadline and not (log.exists() and len(read_log(log, "train")) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "continue with --init_from=resume" in out, out[-2000:]
    stopped = torch.load(d / "sig" / "ckpt.pt", weights_only=True)["step"]
    assert stopped >= 3 and stopped == len(read_log(log, "train"))
    end = [f"--max_iters={stopped + 2}"]
    run_script([os.path.join(ROOT, "train_vision.py")] + common + end + ["--out_dir=sig", "--init_from=resume"], cwd=d)
    run_script([os.path.join(ROOT, "train_vision.py")] + common + end + ["--out_dir=ref"], cwd=d)
    assert read_log(log, "train") == read_log(d / "ref" / "log.txt", "train")


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_accumulation(shapes_dir):
    d = shapes_dir
    common = TRAIN + ["--max_iters=3", "--eval_interval=0", "--total_batch_size=16", "--dropout=0.0"]
    run_script([os.path.join(ROOT, "train_vision.py")] + common + ["--out_dir=one"], cwd=d)
    torchrun([os.path.join(ROOT, "train_vision.py")] + common + ["--out_dir=two"], cwd=d)
    a, b = weights(d / "one"), weights(d / "two")
    for k in a:
        assert_equal_up_to_rounding(a[k], b[k], lr=1e-3, steps=3)
    la, lb = read_log(d / "one" / "log.txt", "train"), read_log(d / "two" / "log.txt", "train")
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-5 for s in la)


@pytest.mark.slow
def test_a_trained_model_needs_the_right_image(tmp_path):
    """A small model trained for a few hundred steps on "what color is it?" about pictures of one
    color (and some noise) answers far better with its pictures than with a blank one; the same
    pictures given to the wrong questions (permuted) bring it down to the blank image's level."""
    from PIL import Image

    from dataloader import get_tokenizer
    from vision import accuracy, answer_end, val_questions
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
    rng = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    with open(tmp_path / "pics/qa.jsonl", "w") as f:
        for i in range(400):
            name = list(colors)[i % 4]
            pixels = np.clip(np.array(colors[name]) + rng.normal(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"pics/{i}.png")
            question = ["What color is it?", "Which color?", "Name the color."][i % 3]
            f.write(json.dumps({"image": f"{i}.png", "instruction": question, "output": name}) + "\n")
    run_script([os.path.join(ROOT, "prepare_vision.py"), "--input=pics/qa.jsonl", "--tokenizer=char", "--image_size=8",
                "--val_fraction=0.2", "--out_dir=data/colors"], cwd=tmp_path)
    run_script([os.path.join(ROOT, "train_vision.py"), "--dataset=colors", "--device=cpu", "--batch_size=32",
                "--block_size=40", "--n_layer=1", "--n_head=2", "--n_embd=32", "--vit_layers=1", "--vit_heads=2",
                "--vit_embd=32", "--max_iters=200", "--eval_interval=0", "--eval_questions=0", "--learning_rate=3e-3",
                "--warmup_iters=10", "--weight_decay=0", "--log_interval=50", "--out_dir=out"], cwd=tmp_path)
    vlm, meta, _ = load_vision_model(str(tmp_path / "out"))
    questions, images, kinds = val_questions(str(tmp_path / "data/colors"))
    decode, stop = get_tokenizer(meta)[1], answer_end(meta)
    right = accuracy(vlm, questions, images, kinds, stop, decode, "cpu")["all"]
    blank = accuracy(vlm, questions, images, kinds, stop, decode, "cpu", blank=True)["all"]
    shuffled = images[np.random.default_rng(1).permutation(len(images))]  # each question another picture
    permuted = accuracy(vlm, questions, shuffled, kinds, stop, decode, "cpu")["all"]
    assert right > 0.9 and blank < 0.5, (right, blank)
    assert permuted < 0.5 and abs(permuted - blank) < 0.25, (right, permuted, blank)
