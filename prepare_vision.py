"""
Prepare an image-text (visual instruction) dataset: questions about images, with their answers.

    python prepare_vision.py --synthetic=4000 --out_dir=data/shapes --tokenizer=char --image_size=32
    python prepare_vision.py --input=pics/qa.jsonl --out_dir=data/mine            # your own
    python prepare_vision.py --input=pics/qa.jsonl --tower=google/siglip-base-patch16-224 --out_dir=data/mine_siglip
    python prepare_vision.py --hub=HuggingFaceM4/VQAv2 --hub_split=validation --out_dir=data/vqa  # (the network)

A record is one line of a JSONL file beside its images:

    {"image": "relative/path.png", "instruction": "What color is the circle?", "input": "", "output": "red"}

The image goes where the text says <image> (in the instruction or the input), else before the
instruction: a question may come before or after its image. The prompt is rendered in
--template (short: the text, then "Answer:"; alpaca or chat: prepare_alpaca.py's), and its
image placeholder becomes one token, id meta.json's "image_token" (one past the tokenizer's
ids: no text ever has it); the model puts the image's vectors there (vision.py).

--synthetic=N draws N images with Pillow (1-3 circles, squares and triangles of four colors,
two sizes, left or right) and asks questions whose answers need the image: how many shapes,
what color is the square, what shape is the red one, where is the blue circle (left or
right), which is bigger (red or blue). Answers are one word. It writes the
JSONL and PNGs into --source_dir (default: out_dir + "_source"; one that holds anything is
refused unless --overwrite), then prepares them like any input: the test and the laptop
recipe's task. --hub writes its rows there the same way, each distinct picture once.

Written to --out_dir: the SFT files (train.bin/val.bin, train_index.npy/val_index.npy,
prepare_alpaca.py's format), each split's images once, at the model's resolution, as
SPLIT_images.npy (n_images, H, W, 3) uint8, and SPLIT_image_index.npy (n_examples, 2): each
example's image row and question kind; meta.json adds "format": "image-sft", "image_size",
how the images were resized and are to be normalised ("image"), "image_token" and "kinds".
Images are resized as the vision tower's image processor resizes them (--tower), or squashed
to --image_size for a ViT trained from scratch. The val split is held out by image: every
question about a val image is in val.
"""

import hashlib
import json
import os

from configurator import UserError, configure, die, exit_on_ctrl_c, print_config

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import numpy as np
from tqdm import tqdm

from dataloader import describe_folder, publish_dataset, staging, vocab_size_of, write_meta, write_sft
from vision import PLACEHOLDER, answer_end, encode_example, image_settings, read_image, render_prompt

DEFAULTS = dict(
    input="",  # a JSONL of {"image", "instruction", "input", "output"}, the image paths relative to its folder
    synthetic=0,  # or draw this many images of shapes with questions about them (the laptop task)
    source_dir="",  # where --synthetic and --hub write their JSONL and PNGs (empty = out_dir + "_source")
    hub="",  # or a Hugging Face dataset with an image and a question and answer per row (datasets; the network)
    hub_split="train",  # its split to read
    hub_image="image",  # its column of images
    hub_question="question",  # its column of questions
    hub_answer="answer",  # its column of answers (a list: the first)
    hub_limit=0,  # read only its first N rows (0 = all)
    out_dir="data/shapes",  # where the token files, images, indexes and meta.json go
    tokenizer="gpt2",  # gpt2 | char (the characters of the data) | a Hugging Face model's folder or Hub name
    template="short",  # short: the question, then "Answer:" | alpaca | chat (prepare_alpaca.py's templates)
    tower="",  # resize as this SigLIP/CLIP's image processor does (a folder or Hub name); empty: --image_size
    image_size=32,  # the square side images are resized to, for a ViT trained from scratch
    val_fraction=0.1,  # this share of the images, drawn at random, is val, with all their questions
    max_len=256,  # prompts + answers longer than this many tokens (the placeholder counted as one) are dropped
    seed=1337,  # the split (and --synthetic's drawing) is seeded with this
    overwrite=False,  # replace another dataset in out_dir and what --source_dir holds (the same dataset is kept)
)

# -----------------------------------------------------------------------------
# the synthetic task: shapes, and questions only the image answers

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("count", "color", "shape", "where", "bigger")
NUMBERS = ("zero", "one", "two", "three")


def draw_shapes(rng, canvas=64):
    """A random picture: (PIL image, [(shape, color, size, x, y)]), 1-3 shapes that do not
    overlap, each small or large, its center in the left or the right third-and-a-bit."""
    from PIL import Image, ImageDraw
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(50):  # a free spot: away from the others and from the middle line
            size = ("small", "large")[int(rng.integers(2))]
            r = canvas // 8 if size == "small" else canvas // 5  # half the side: a shape is 2-3 patches wide at 32x32
            x, y = int(rng.integers(r + 1, canvas - r - 1)), int(rng.integers(r + 1, canvas - r - 1))
            clear = all(abs(x - ox) > r + orr + 2 or abs(y - oy) > r + orr + 2 for _, _, _, ox, oy, orr in shapes)
            if clear and abs(x - canvas / 2) > canvas / 10:
                break
        else:
            continue
        shapes.append((SHAPES[int(rng.integers(3))], list(COLORS)[int(rng.integers(4))], size, x, y, r))
    img = Image.new("RGB", (canvas, canvas), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    for shape, color, _, x, y, r in shapes:
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
    return img, [(s, c, size, x, y) for s, c, size, x, y, _ in shapes]


def questions_about(shapes, rng, canvas=64):
    """Every question the picture answers, as (kind, question, answer)."""
    out = [("count", "How many shapes?", NUMBERS[len(shapes)])]
    for s in SHAPES:
        these = [sh for sh in shapes if sh[0] == s]
        if len(these) == 1:
            out.append(("color", f"What color is the {s}?", these[0][1]))
    for c in COLORS:
        these = [sh for sh in shapes if sh[1] == c]
        if len(these) == 1:
            out.append(("shape", f"What shape is the {c} one?", these[0][0]))
    for s, c, _, x, _ in shapes:
        if sum(sh[0] == s and sh[1] == c for sh in shapes) == 1:
            out.append(("where", f"Where is the {c} {s}?", "left" if x < canvas / 2 else "right"))
    unique = [sh for sh in shapes if sum(o[1] == sh[1] for o in shapes) == 1]  # the only one of its color
    small, large = [sh for sh in unique if sh[2] == "small"], [sh for sh in unique if sh[2] == "large"]
    if small and large:
        a, b = small[int(rng.integers(len(small)))], large[int(rng.integers(len(large)))]
        first, second = (a, b) if rng.integers(2) else (b, a)
        out.append(("bigger", f"Which is bigger, {first[1]} or {second[1]}?", b[1]))
    return out


def make_synthetic(folder, n_images, seed, per_image=3):
    """Draw n_images pictures into folder/images/ and write folder/data.jsonl with up to per_image
    questions each (of different kinds; a quarter of them with the image after the question).
    Returns the JSONL's path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    for i in tqdm(range(n_images), desc="drawing", unit="img"):
        img, shapes = draw_shapes(rng)
        name = f"images/{i:06d}.png"
        img.save(os.path.join(folder, name))
        qs = questions_about(shapes, rng)
        for j in rng.permutation(len(qs))[:per_image]:
            kind, question, answer = qs[j]
            if rng.random() < 0.25:
                question = f"{question}\n{PLACEHOLDER}"  # the image after the question
            lines.append(json.dumps({"image": name, "instruction": question, "input": "", "output": answer,
                                     "kind": kind}))
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def from_hub(cfg, folder):
    """Write a Hugging Face dataset's rows as PNGs and a JSONL in folder (datasets; the network,
    or its cache). Returns the JSONL's path. Each distinct picture is one file, named by a hash of
    its pixels: a picture with several questions (VQA has a few each) is one image to the split,
    so its questions are all in train or all in val."""
    try:
        import datasets
    except ImportError:
        die("--hub needs datasets: pip install datasets")
    try:
        ds = datasets.load_dataset(cfg["hub"], split=cfg["hub_split"])
    except Exception as e:
        die(f"cannot load {cfg['hub']} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            "offline? give a local JSONL with --input")
    missing = [c for c in (cfg["hub_image"], cfg["hub_question"], cfg["hub_answer"]) if c not in ds.column_names]
    if missing:
        die(f"{cfg['hub']} has no column {missing[0]!r} (its columns: {', '.join(ds.column_names)}); "
            "name them with --hub_image, --hub_question, --hub_answer")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    n = min(len(ds), cfg["hub_limit"] or len(ds))
    for i in tqdm(range(n), desc="hub", unit="row"):
        row = ds[i]
        answer = row[cfg["hub_answer"]]
        answer = answer[0] if isinstance(answer, list) else answer
        answer = answer.get("answer", "") if isinstance(answer, dict) else str(answer)
        img = row[cfg["hub_image"]].convert("RGB")
        name = f"images/{hashlib.sha256(str(img.size).encode() + img.tobytes()).hexdigest()[:20]}.png"
        if not os.path.isfile(os.path.join(folder, name)):  # (an earlier row's picture: written already)
            img.save(os.path.join(folder, name))
        lines.append(json.dumps({"image": name, "instruction": str(row[cfg["hub_question"]]), "input": "",
                                 "output": answer}))
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# -----------------------------------------------------------------------------
# reading and checking the records and their images


def load_records(path):
    """[(image path, instruction, input, output, kind)] of a JSONL; a bad line or a bad image is
    an error naming the file and the line."""
    from prepare_alpaca import read_json_records
    records = []
    for item, loc in read_json_records(path):
        if not isinstance(item, dict):
            die(f"{loc}: expected an object with image, instruction, input and output, got {type(item).__name__}")
        image, instruction, inp, output = (item.get(k, "") for k in ("image", "instruction", "input", "output"))
        if not isinstance(image, str) or not image.strip():
            die(f"{loc}: 'image' is missing or not a path: every record needs its image (a path relative to "
                f"{os.path.dirname(os.path.abspath(path))})")
        if not all(isinstance(v, str) for v in (instruction, inp, output)) or not instruction.strip():
            die(f"{loc}: 'instruction' must be a non-empty string, 'input' and 'output' strings")
        if not output.strip():
            die(f"{loc}: 'output' is empty: there is no answer to learn")
        if (instruction + inp).count(PLACEHOLDER) > 1 or PLACEHOLDER in output:
            die(f"{loc}: {PLACEHOLDER} may appear once, in the instruction or the input (where the image goes)")
        kind = item.get("kind", "all")
        records.append((os.path.join(os.path.dirname(os.path.abspath(path)), image), instruction, inp, output,
                        str(kind), loc))
    if not records:
        die(f"{path} holds no records")
    return records


# -----------------------------------------------------------------------------
# preparing


def tokenizer_for(cfg, records):
    """(meta, encode): the char vocabulary of the records' text, or prepare_alpaca.py's tokenizers."""
    if cfg["tokenizer"] == "char":
        if cfg["template"] != "short":
            die("--tokenizer=char renders --template=short only (the long templates are for BPE models)")
        text = "".join(i + n + o for _, i, n, o, _, _ in records).replace(PLACEHOLDER, "")
        chars = sorted(set(text + "\nAnswer: "))
        stoi = {c: i for i, c in enumerate(chars)}
        return {"tokenizer": "char", "chars": chars}, (lambda s: [stoi[c] for c in s])
    from prepare_alpaca import instruction_tokenizer
    template = "auto" if cfg["template"] == "short" else cfg["template"]  # (short: the meta's is set after)
    meta, encode, _, _ = instruction_tokenizer(dict(cfg, template=template), "image-sft")
    return meta, encode


def check_folders(source, out_dir, overwrite):
    """Before --synthetic draws or --hub downloads anything: its source folder and out_dir must be
    empty (or new), unless --overwrite. (--input's out_dir is checked when the dataset is written:
    the same dataset prepared again is kept as it is.)"""
    if overwrite:
        return
    for folder, what in ((out_dir, "--out_dir"), (source, "--source_dir")):
        if os.path.isdir(folder) and os.listdir(folder):
            raise UserError(f"{folder} already holds {describe_folder(folder)}: choose another {what}, or replace "
                            f"what it holds with --overwrite")


def prepare(cfg):
    if sum(map(bool, (cfg["input"], cfg["synthetic"], cfg["hub"]))) != 1:
        die("give one source: --input=FILE.jsonl, --synthetic=N or --hub=NAME")
    if not 0 < cfg["val_fraction"] < 1 or cfg["image_size"] < 1 or cfg["synthetic"] < 0:
        die("--val_fraction must be between 0 and 1, --image_size and --synthetic positive")
    if cfg["template"] not in ("short", "alpaca", "chat"):
        die(f"--template must be short, alpaca or chat, got {cfg['template']!r}")
    source = cfg["source_dir"] or cfg["out_dir"].rstrip("/") + "_source"
    if cfg["synthetic"] or cfg["hub"]:
        check_folders(source, cfg["out_dir"], cfg["overwrite"])
    path = cfg["input"]
    if cfg["synthetic"]:
        path = make_synthetic(source, cfg["synthetic"], cfg["seed"])
    elif cfg["hub"]:
        path = from_hub(cfg, source)
    records = load_records(path)
    settings = image_settings(cfg["tower"], cfg["image_size"])
    meta, encode = tokenizer_for(cfg, records)
    image_token, end = vocab_size_of(meta), answer_end(meta)  # one past the ids of any text
    kinds = sorted(set(r[4] for r in records))

    # the split is by image: a seeded share of the distinct images, with every question about them
    paths = sorted(set(r[0] for r in records))
    if len(paths) < 2:
        die(f"{path}: {len(paths)} image(s) are too few to hold one out for val")
    order = np.random.default_rng(cfg["seed"]).permutation(len(paths))
    n_val = max(1, round(len(paths) * cfg["val_fraction"]))
    val_images = {paths[i] for i in order[:n_val]}
    splits = {}
    for split in ("train", "val"):
        rows, examples, image_index, dropped = {}, [], [], 0
        mine = [r for r in records if (r[0] in val_images) == (split == "val")]
        for image, instruction, inp, output, kind, loc in tqdm(mine, desc=split, unit="ex"):
            prompt = render_prompt(cfg["template"], meta, instruction, inp)
            prompt, answer = encode_example(meta, encode, prompt, output, image_token, end)
            if len(prompt) + len(answer) > cfg["max_len"] + 1:
                dropped += 1
                continue
            if image not in rows:
                rows[image] = (len(rows), read_image(image, settings, loc))
            examples.append((prompt, answer))
            image_index.append((rows[image][0], kinds.index(kind)))
        if not examples:
            die(f"no {split} example fits --max_len={cfg['max_len']} tokens; raise it")
        splits[split] = (examples, np.stack([img for _, img in rows.values()]), np.array(image_index), dropped)

    meta = {**meta, "format": "image-sft", "template": cfg["template"], "image_size": settings["size"],
            "image": settings, "tower": cfg["tower"], "image_token": image_token, "kinds": kinds}
    out_dir = cfg["out_dir"]
    with staging(out_dir) as tmp:  # written beside out_dir, then moved in: never over another dataset unasked
        for split, (examples, images, image_index, _) in splits.items():
            write_sft(tmp, split, examples)
            np.save(os.path.join(tmp, f"{split}_images.npy"), images, allow_pickle=False)
            np.save(os.path.join(tmp, f"{split}_image_index.npy"), image_index, allow_pickle=False)
        write_meta(tmp, meta)
        publish_dataset(tmp, out_dir, cfg["overwrite"])
    for split, (examples, images, _, dropped) in splits.items():
        size = f"{images.shape[1]}x{images.shape[2]}"
        print(f"{split}: {len(examples):,} questions about {len(images):,} images of {size}, "
              f"longest {max(len(p) + len(a) for p, a in examples)} tokens; {dropped:,} longer than max_len dropped")
    print(f"-> {out_dir}/")
    return out_dir


def main():
    cfg = configure(DEFAULTS)
    print_config(cfg)
    try:
        import PIL  # noqa: F401
    except ImportError:
        die("prepare_vision.py needs Pillow: pip install Pillow")
    try:
        prepare(cfg)
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
