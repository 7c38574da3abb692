"""
Images in, text out: a vision tower, a projector into the LM's width, and the LM reading the
image's vectors where its prompt holds the image placeholder.

    python prepare_vision.py --synthetic=4000 --tokenizer=char --out_dir=data/shapes   # a task that needs the image
    python train_vision.py config/vision_shapes_cpu.py                     # a laptop CPU
    python vision.py --out_dir=out-vision-shapes                           # exact-match accuracy on val
    python sample.py --out_dir=out-vision-shapes --image=pic.png --start "How many shapes?"

The model (LLaVA's and nanoVLM's shape):

    image (H, W, 3) uint8 --normalise--> tower --> (N, D) patch features
          --pixel shuffle + Linear--> (N / r^2, C) image tokens
    prompt tokens with one placeholder --wte--> (T, C); the placeholder's row replaced by the
          N / r^2 image tokens --> the GPT's blocks, ln_f, lm_head, as for text

The tower is either ViT, a small vision transformer in model.py's pieces (patches -> Linear ->
positions -> Blocks that see every patch -> a norm), trained from scratch; or a pretrained
SigLIP or CLIP vision model from the Hub or a folder (transformers), whose patch features are
its last hidden state (CLIP's class token left out). Both read pixels normalised as the
tower's image processor does (HFTower: its preprocessor_config.json; ViT: to [-1, 1]).

The projector is nanoVLM's: pixel shuffle gathers each r x r square of neighbouring patches
into one vector (r^2 D wide), so the LM reads r^2 times fewer image tokens (SigLIP's 196 ->
49 at r=2), then one Linear maps it to the LM's width. (LLaVA's 2-layer MLP keeps every patch:
4x the image tokens, the cost that matters on a CPU.)

The parts live on the GPT itself, as gpt.vision and gpt.projector (as align.py's reward_head):
one state dict, so train_vision.py saves and resumes it with checkpoint.py's functions, and
the optimizer's parameter groups (GPT.param_groups) take them as they take the LM's.
VisionLM is the module training calls (and DDP wraps): forward(x, y, images).

Also here: the prepared data's reader (ImageSFTLoader: SFT batches plus each example's image)
and the exact-match evaluation, with the real images and with a blank one (what the LM answers
from the question alone), by question kind.
"""

import json
import math
import os
import sys

from configurator import UserError, configure, die, exit_on_ctrl_c, print_config, read_lines

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from dataloader import SFTLoader, encode_pair, get_tokenizer, read_meta, with_bos
from model import GPT, Block, GPTConfig, make_norm, sample_next

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, what SigLIP's and CLIP's processors use


# -----------------------------------------------------------------------------
# pixels: resized once at preparation (uint8), normalised as the tower expects at every step


def image_settings(tower="", image_size=32):
    """How images are resized and normalised for a tower: {size: (H, W) of the tower's input,
    shortest_edge: resize so the shorter side is this (CLIP), else squash to size (SigLIP, ViT),
    crop: center-crop to size after a shortest_edge resize, resample (PIL's code), mean, std}.
    tower: "" (our ViT: image_size square, normalised to [-1, 1]) or a Hugging Face folder or
    name, whose image processor says."""
    if not tower:
        return dict(size=[image_size, image_size], shortest_edge=0, crop=False, resample=BICUBIC,
                    mean=[0.5] * 3, std=[0.5] * 3, rescale=1 / 255)
    try:
        from transformers import AutoImageProcessor
    except ImportError:
        raise UserError("a pretrained vision tower needs transformers: pip install transformers") from None
    try:
        proc = AutoImageProcessor.from_pretrained(tower, local_files_only=os.path.isdir(tower))
    except Exception as e:
        raise UserError(f"cannot read the image processor of {tower} ({type(e).__name__}); it needs a "
                        "preprocessor_config.json (a SigLIP or CLIP folder, or a Hub name seen online once)") from None
    size = dict(proc.size)
    crop = bool(getattr(proc, "do_center_crop", False))
    if crop:
        out = [proc.crop_size["height"], proc.crop_size["width"]]
    elif "height" in size:
        out = [size["height"], size["width"]]
    else:
        raise UserError(f"{tower}: an image processor of size {size} without a center crop is not supported")
    return dict(size=out, shortest_edge=size.get("shortest_edge") or 0, crop=crop, resample=int(proc.resample),
                mean=list(proc.image_mean), std=list(proc.image_std), rescale=float(proc.rescale_factor))


def resize_image(img, settings):
    """A PIL image -> (H, W, 3) uint8 at the tower's input size, resized as transformers' image
    processor resizes it (PIL, the same resample; CLIP: the shorter side first, then the center)."""
    img = img.convert("RGB")
    if settings["shortest_edge"]:
        s, (w, h) = settings["shortest_edge"], img.size
        # the shorter side becomes s, the longer keeps the aspect ratio (rounded down)
        h, w = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        img = img.resize((w, h), resample=settings["resample"])
    else:
        h, w = settings["size"]
        img = img.resize((w, h), resample=settings["resample"])
    if settings["crop"]:
        ch, cw = settings["size"]
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img.crop((left, top, left + cw, top + ch))
    return np.array(img, dtype=np.uint8)  # (a writable copy: torch.from_numpy takes it as it is)


def normalize(images, mean, std, rescale=1 / 255):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float: scaled to [0, 1], then (x - mean) / std per channel."""
    x = images.permute(0, 3, 1, 2).float() * rescale  # (B, 3, H, W)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def read_image(path, settings, where=""):
    """The picture file at path, resized for the tower: (H, W, 3) uint8. Missing, empty or not an
    image: a UserError naming it (where: the record that names it, for prepare_vision.py)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("images need Pillow: pip install Pillow") from None
    where = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise UserError(f"{where}image {path} not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"{where}image {path} is an empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # decode it all now: a truncated file fails here, not mid-training
            return resize_image(img, settings)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{where}image {path} cannot be read ({type(e).__name__}: {str(e)[:80]}); is it an image "
                        "file (PNG, JPEG, ...)?") from None


# -----------------------------------------------------------------------------
# prompts: the text around the image placeholder

PLACEHOLDER = "<image>"  # where the image goes in a record's text (else before the instruction)


def render_prompt(template, meta, instruction, inp=""):
    """The prompt text in template (short: the text, then "Answer:"; alpaca or chat: prepare_alpaca.py's),
    with PLACEHOLDER where the image goes: where the text puts it, else before the instruction."""
    if PLACEHOLDER not in instruction + inp:
        instruction = f"{PLACEHOLDER}\n{instruction}"
    if template == "short":
        return instruction + (f"\n{inp}" if inp else "") + "\nAnswer:"
    from prepare_alpaca import instruction_prompt
    return instruction_prompt(dict(meta, template=template), instruction, inp)


def encode_example(meta, encode, prompt, output, image_token, end):
    """(prompt ids with the placeholder's one id, answer ids ending with end). The text before
    the image and the text after it are encoded apart, on purpose: the image is not text, and
    nothing merges across it. The answer, " " + output, is encoded with the text after the image
    (encode_pair: the tokens it has in running text; the prompt's own are those it has alone,
    as sample.py encodes a question)."""
    before, after = prompt.split(PLACEHOLDER)
    head, answer = encode_pair(encode, after, " " + output)
    return with_bos(meta, encode(before)) + [image_token] + head, answer + [end]


# -----------------------------------------------------------------------------
# the towers


class ViT(nn.Module):
    """A vision transformer in model.py's pieces: each p x p patch's pixels -> Linear -> plus a
    learned position (GPT-2's wpe) -> pre-norm Blocks in which every patch sees every other (an
    all-True mask: no causal order in an image) -> a final norm. (B, 3, H, W) -> (B, N, C)."""

    def __init__(self, config, image_size, patch_size):
        super().__init__()
        self.config, self.patch_size = config, patch_size
        self.grid = image_size // patch_size  # patches per side
        self.c_patch = nn.Linear(3 * patch_size ** 2, config.n_embd, bias=config.bias)  # = a conv, stride p
        self.wpe = nn.Embedding(self.grid ** 2, config.n_embd)  # (N, C)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.apply(lambda m: GPT._init_weights(self, m))  # GPT-2's init, by the same rules
        # but the positions start at the scale of a patch's embedding (3p^2 pixels of about unit size
        # through weights of std 0.02), not at GPT-2's 0.02 for a table beside token embeddings of
        # 0.02: about seven times smaller, they left where a shape is unseen for hundreds of steps (docs/vision.md)
        nn.init.normal_(self.wpe.weight, std=0.02 * math.sqrt(3 * patch_size ** 2))

    def forward(self, pixels):
        B, _, H, W = pixels.shape
        p, g = self.patch_size, self.grid
        x = pixels.view(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)  # (B, N, 3pp)
        x = self.c_patch(x) + self.wpe.weight  # (B, N, C)
        everything = torch.ones(g * g, g * g, dtype=torch.bool, device=x.device)  # (N, N): not causal
        for block in self.h:
            x = block(x, mask=everything)
        return self.ln_f(x)


class HFTower(nn.Module):
    """A pretrained SigLIP or CLIP vision model (transformers): (B, 3, H, W) -> its last hidden
    state's patch features (B, N, D); CLIP's class token (the first) is left out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.skip = 1 if "clip" in model.config.model_type else 0  # CLIP puts a class token first

    def forward(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, self.skip:]


def hf_vision_class(model_type):
    from transformers import CLIPVisionModel, SiglipVisionModel
    if model_type.startswith("siglip"):
        return SiglipVisionModel
    if model_type.startswith("clip"):
        return CLIPVisionModel
    raise UserError(f"a vision tower of model type {model_type!r}: SigLIP and CLIP are supported")


def load_hf_tower(name_or_path):
    """(HFTower, its vision config as a dict) from a Hugging Face folder or Hub name: a vision
    model's, or a whole SigLIP/CLIP model's (its vision half is taken)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UserError("a pretrained vision tower needs transformers: pip install transformers") from None
    local = os.path.isdir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local)
        config = getattr(config, "vision_config", config)  # a whole SigLIP/CLIP: its vision half
        model = hf_vision_class(config.model_type).from_pretrained(name_or_path, config=config, local_files_only=local)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load the vision tower {name_or_path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return HFTower(model), json.loads(config.to_json_string())


def hf_tower_from_config(config_dict):
    """An HFTower of random weights, shaped as config_dict says (a checkpoint's weights go in next)."""
    cls = hf_vision_class(config_dict["model_type"])
    return HFTower(cls(cls.config_class.from_dict(config_dict)))


# -----------------------------------------------------------------------------
# the projector and the model


class Projector(nn.Module):
    """Pixel shuffle (nanoVLM, from Idefics3): each r x r square of neighbouring patch features
    becomes one vector of r^2 D channels, then one Linear to the LM's width C.
    (B, N, D) -> (B, N / r^2, C)."""

    def __init__(self, in_dim, out_dim, shuffle):
        super().__init__()
        self.r = shuffle
        self.c_proj = nn.Linear(in_dim * shuffle ** 2, out_dim, bias=False)
        nn.init.normal_(self.c_proj.weight, std=0.02)

    def forward(self, x):
        B, N, D = x.shape
        g, r = int(round(N ** 0.5)), self.r  # the patches' grid, g x g
        x = x.view(B, g // r, r, g // r, r, D).permute(0, 1, 3, 2, 4, 5)  # (B, g/r, g/r, r, r, D)
        return self.c_proj(x.reshape(B, (g // r) ** 2, r * r * D))  # (B, N / r^2, C)


def image_tokens(vision_cfg):
    """How many vectors the LM reads for one image."""
    return vision_cfg["n_patches"] // vision_cfg["shuffle"] ** 2


def attach_vision(gpt, vision_cfg, tower_config=None, tower=None):
    """Give the GPT its vision parts, gpt.vision (the tower) and gpt.projector, built from
    vision_cfg (train_vision.py's vision settings): a new ViT, the HFTower given, or an HFTower
    of random weights shaped by tower_config (a checkpoint's weights go in next)."""
    c = vision_cfg
    if c["tower"]:
        tower = tower or hf_tower_from_config(tower_config)
        width = tower.model.config.hidden_size
    else:
        vit = GPTConfig(n_layer=c["vit_layers"], n_head=c["vit_heads"], n_embd=c["vit_embd"],
                        dropout=gpt.config.dropout, bias=gpt.config.bias)
        tower, width = ViT(vit, c["image_size"], c["patch_size"]), c["vit_embd"]
    gpt.vision = tower
    gpt.projector = Projector(width, gpt.config.n_embd, c["shuffle"])
    settings = c["image"]  # the image processor's mean and std, as buffers (not saved: in the config)
    gpt.vision.register_buffer("mean", torch.tensor(settings["mean"]), persistent=False)
    gpt.vision.register_buffer("std", torch.tensor(settings["std"]), persistent=False)
    gpt.vision.rescale = settings["rescale"]
    return gpt


class VisionLM(nn.Module):
    """What training calls (and DDP wraps): the GPT, with its vision parts, reading images.
    image_token: the placeholder id in the prompts (meta.json's), one per example."""

    def __init__(self, gpt, image_token):
        super().__init__()
        self.gpt, self.image_token = gpt, image_token

    def image_embeds(self, images):
        """(B, H, W, 3) uint8 -> (B, n_img, C): the vectors the LM reads for each image."""
        v = self.gpt.vision
        return self.gpt.projector(v(normalize(images, v.mean, v.std, v.rescale)))

    def embed(self, idx, img):
        """idx (B, L) token ids, each row with one placeholder, img (B, n_img, C) image vectors ->
        (B, L + n_img - 1, C): the tokens' embeddings with each placeholder replaced by its image's
        vectors; and each row's placeholder column."""
        is_img = idx == self.image_token  # (B, L)
        if not bool((is_img.sum(1) == 1).all()):
            raise UserError("every prompt needs exactly one image placeholder")
        tok = self.gpt.transformer.wte(idx.masked_fill(is_img, 0))  # (B, L, C): the placeholder is no real token
        where = is_img.int().argmax(dim=1).tolist()  # (B,) the placeholder's column in each row
        return torch.stack([torch.cat([tok[b, :p], img[b], tok[b, p + 1:]]) for b, p in enumerate(where)]), where

    def forward(self, x, y, images):
        """x, y (B, L) as SFT batches (y -1 on prompts and padding), images (B, H, W, 3) uint8 ->
        the mean loss over the answers' tokens. The image's positions predict nothing (-1), and
        the last of them predicts what followed the placeholder."""
        emb, where = self.embed(x, self.image_embeds(images))  # (B, L + n - 1, C)
        n = emb.size(1) - x.size(1)  # n_img - 1 extra positions
        skip = y.new_full((n,), -1)
        y = torch.stack([torch.cat([y[b, :p], skip, y[b, p:]]) for b, p in enumerate(where)])  # (B, L + n)
        h = self.gpt.hidden_states(None, embeds=emb)  # (B, L + n, C)
        scored = y != -1
        logits = self.gpt.lm_head(h[scored])  # (n_targets, V): only the answers' positions
        return F.cross_entropy(logits.float(), y[scored])

    @torch.no_grad()
    def answer(self, prompts, images, max_new_tokens, stop_token, temperature=0.0, top_k=None, top_p=None):
        """Answers: prompts, a list of token lists (each with its placeholder), images (B, H, W, 3)
        uint8 -> a list of token lists, each ended before stop_token; greedy unless a temperature is
        given (then sampled as GPT.generate samples). One batch: the prompts left-padded to end
        together (GPT.generate's pad), each then one token a step from the KV cache."""
        gpt, device = self.gpt, images.device
        img = self.image_embeds(images)  # (B, n_img, C)
        rows = [self.embed(torch.tensor([p], device=device), img[i:i + 1])[0][0] for i, p in enumerate(prompts)]
        P = max(len(r) for r in rows)
        max_new_tokens = max(1, min(max_new_tokens, gpt.config.block_size - P))
        emb = rows[0].new_zeros(len(rows), P, rows[0].size(-1))  # (B, P, C), padding on the left
        for i, r in enumerate(rows):
            emb[i, P - len(r):] = r
        pad = torch.tensor([P - len(r) for r in rows], device=device)
        pad = pad if pad.any() else None
        cache = [{"size": P + max_new_tokens} for _ in gpt.transformer.h]
        h = gpt.hidden_states(None, kv_cache=cache, pad=pad, embeds=emb)
        out, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            nxt = sample_next(gpt.lm_head(h[:, -1]).float(), temperature, top_k, top_p)[:, 0]  # (B,)
            out.append(nxt)
            done |= nxt == stop_token
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            h = gpt.hidden_states(nxt[:, None], kv_cache=cache, pos=P + i, pad=pad)
        tokens = torch.stack(out, dim=1).tolist()  # (B, steps)
        return [t[:t.index(stop_token)] if stop_token in t else t for t in tokens]


def load_vision_model(out_dir, device="cpu"):
    """(VisionLM, meta, the run's settings) from a train_vision.py run's out_dir (or .pt file)."""
    from checkpoint import checkpoint_path, load_checkpoint
    path = checkpoint_path(out_dir)
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    if "vision" not in cfg:
        raise UserError(f"{path} is not a vision run (train_vision.py's): it reads no images")
    try:
        tower_config = cfg["vision"].get("tower_config")
        if "lora" in ckpt:  # the LM is a base with adapters; the tower and projector are in ckpt["parts"]
            from checkpoint import load_lora_run
            gpt = load_lora_run(ckpt, out_dir, dropout=ckpt["model_args"].get("dropout", 0.0))  # (a resume's)
            attach_vision(gpt, cfg["vision"], tower_config=tower_config)
            missing, unexpected = gpt.load_state_dict(ckpt.get("parts") or {}, strict=False)
            lost = [k for k in missing if k.startswith(("vision.", "projector."))]
            if lost or unexpected:
                raise KeyError(f"the tower and projector weights do not fit: {(lost + unexpected)[0]}")
        else:
            gpt = attach_vision(GPT(GPTConfig(**ckpt["model_args"])), cfg["vision"], tower_config=tower_config)
            gpt.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"{path} does not fit a vision model ({type(e).__name__}: {first})") from None
    return VisionLM(gpt.to(device).eval(), ckpt["meta"]["image_token"]), ckpt["meta"], cfg


def answer_end(meta):
    """The id that ends an answer: the tokenizer's end of text, or for characters the newline."""
    from dataloader import eot_of
    eot = eot_of(meta)
    return eot if eot is not None else meta["chars"].index("\n")


def sample(cfg, device, autocast):
    """sample.py --image=PATH: a vision run (--out_dir) answers the question in --start about the
    picture, num_samples times (greedy at temperature 0). With --chat, every line on stdin is a
    question about the same picture, each answered on its own (a vision run learned one question
    per image, never a conversation); /exit or the end of stdin ends it."""
    if not cfg["out_dir"]:
        raise UserError("--image needs --out_dir=RUN, a vision run (train_vision.py)")
    vlm, meta, run = load_vision_model(cfg["out_dir"], device)
    image = torch.from_numpy(read_image(cfg["image"], run["vision"]["image"]))[None].to(device)  # (1, H, W, 3)
    encode, decode = get_tokenizer(meta)
    end = answer_end(meta)
    n_img, block_size = image_tokens(run["vision"]), vlm.gpt.config.block_size

    def prompt_of(question, what="--start"):
        if question.count(PLACEHOLDER) > 1:
            raise UserError(f"{what} holds {PLACEHOLDER} {question.count(PLACEHOLDER)} times: a vision run reads one "
                            f"image; write {PLACEHOLDER} once where it goes, or leave it out (the image goes first)")
        prompt, _ = encode_example(meta, encode, render_prompt(meta["template"], meta, question), "",
                                   meta["image_token"], end)
        if len(prompt) - 1 + n_img > block_size:  # the placeholder's one position becomes the image's n_img
            raise UserError(f"{what} is too long: the prompt's {len(prompt) - 1} text tokens and the image's {n_img} "
                            f"exceed the model's block_size of {block_size}; shorten the question so that the prompt "
                            f"(its template included) fits in {block_size - n_img} tokens")
        return prompt

    def say(prompt):
        with autocast:
            ids = vlm.answer([prompt], image, cfg["max_new_tokens"], end, temperature=cfg["temperature"],
                             top_k=cfg["top_k"] or None, top_p=cfg["top_p"])[0]
        print(decode(ids).strip(), flush=True)

    torch.manual_seed(cfg["seed"])
    if not cfg["chat"]:
        prompt = prompt_of(cfg["start"].strip())
        for _ in range(cfg["num_samples"]):
            say(prompt)
        return
    for line in read_lines():
        if line == "/reset":  # (text chat's: here every question stands alone already)
            print("(each question is answered on its own: there is nothing to forget)", file=sys.stderr)
            continue
        try:
            say(prompt_of(line, "the question"))
        except UserError as e:  # one question too long: say so, and take the next
            print(f"error: {e}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# the prepared data: SPLIT.bin and SPLIT_index.npy (SFT), SPLIT_images.npy (n_images, H, W, 3)
# uint8, and SPLIT_image_index.npy (n_examples, 2): each example's image row and question kind


def read_images(data_dir, split, n_examples):
    """(images (n, H, W, 3) uint8 memmap, image_index (n_examples, 2) int64) of one split, checked."""
    paths = [os.path.join(data_dir, f"{split}_{name}.npy") for name in ("images", "image_index")]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: an image-text dataset needs it; re-run prepare_vision.py")
    try:
        images = np.load(paths[0], mmap_mode="r", allow_pickle=False)
        index = np.load(paths[1], allow_pickle=False).astype(np.int64)
    except ValueError as e:
        raise UserError(f"{data_dir}/{split}: the image files could not be read ({e}); re-run prepare_vision.py") \
            from None
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise UserError(f"{paths[0]}: expected (n, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    if index.shape != (n_examples, 2) or (index[:, 0] < 0).any() or (index[:, 0] >= len(images)).any():
        raise UserError(f"{paths[1]} does not fit {split}.bin's {n_examples} examples and {len(images)} images; "
                        "re-run prepare_vision.py")
    return images, index


class ImageSFTLoader(SFTLoader):
    """SFTLoader's batches (x, y and the step's weights, dealt to the ranks the same way, its
    position saved the same way) plus each example's image, (B, H, W, 3) uint8."""

    def __init__(self, data_dir, split, batch_size, block_size, **kwargs):
        super().__init__(data_dir, split, batch_size, block_size, **kwargs)
        self.images, self.image_index = read_images(data_dir, split, len(self.index))

    def _rows(self, units):  # SFTLoader calls this with the examples of every batch it makes: noted
        self._seen.append(units)
        return super()._rows(units)

    def batch_images(self, units):
        return torch.from_numpy(np.stack([self.images[i] for i in self.image_index[units, 0]]))

    def next_batch_images(self):
        """(x, y, images) of this rank's next micro-batch (evaluation's)."""
        self._seen = []
        x, y = self.next_batch()
        return x, y, self.batch_images(self._seen[0])

    def next_step(self, device="cpu"):
        """SFTLoader.next_step's micro-batches, each (x, y, weight, images), and the step's text tokens."""
        self._seen = []  # SFTLoader.next_step makes grad_accum batches, then reads the whole step's rows
        batches, n_tokens = super().next_step(device)
        batches = [(x, y, w, self.batch_images(units).to(device)) for (x, y, w), units in zip(batches, self._seen)]
        return batches, n_tokens


# -----------------------------------------------------------------------------
# exact-match accuracy, with the images and with a blank one (vision.py: and with another picture)


def val_questions(data_dir, split="val", limit=0):
    """[(prompt ids, answer text, image row, kind)] of a split (the first limit; 0 = all), the
    images, and the kinds' names."""
    from dataloader import read_sft
    meta = read_meta(data_dir)
    tokens, index = read_sft(data_dir, split)
    images, image_index = read_images(data_dir, split, len(index))
    decode, end = get_tokenizer(meta)[1], answer_end(meta)
    out = []
    for (start, p, n), (row, kind) in zip(index.tolist()[:limit or None], image_index.tolist()):
        answer = [t for t in tokens[start + p:start + n].tolist() if t != end]
        out.append((tokens[start:start + p].tolist(), decode(answer).strip(), row, kind))
    return out, images, meta.get("kinds") or ["all"]


def accuracy(vlm, questions, images, kinds, stop_token, decode, device, blank=False, batch_size=64):
    """Exact-match accuracy of the greedy answers: {"all": share right, kind: share right, ...}.
    blank=True: every image replaced by a uniform grey one (the answer from the question alone)."""
    right, seen = {}, {}
    was_training = vlm.training
    vlm.eval()
    for i in range(0, len(questions), batch_size):
        batch = questions[i:i + batch_size]
        imgs = torch.from_numpy(np.stack([images[row] for _, _, row, _ in batch])).to(device)
        if blank:
            imgs = torch.full_like(imgs, 128)
        longest = max(len(a) for _, a, _, _ in batch)
        answers = vlm.answer([q for q, _, _, _ in batch], imgs, max_new_tokens=longest + 8, stop_token=stop_token)
        for (_, want, _, kind), got in zip(batch, answers):
            for key in ("all", kinds[kind]):
                seen[key] = seen.get(key, 0) + 1
                right[key] = right.get(key, 0) + (decode(got).strip() == want)
    vlm.train(was_training)
    return {k: right[k] / seen[k] for k in seen}


# -----------------------------------------------------------------------------
# python vision.py --out_dir=RUN: the accuracy of a run on its val split

DEFAULTS = dict(
    out_dir="out-vision-shapes",  # a train_vision.py run (or one of its .pt files)
    dataset="",  # data/<dataset>/ to evaluate on; empty = the run's own
    split="val",  # val | train
    limit=0,  # the first N questions (0 = all)
    batch_size=64,  # questions answered at once
    device="auto",  # auto | cpu | cuda | cuda:N | mps
)


def check_same_images(meta, run, data_meta, out_dir, dataset):
    """The data must be the run's kind: the same tokenizer, and images prepared as the run reads
    them (the same size, resizing and normalisation: prepare_vision.py's --image_size or --tower)."""
    from checkpoint import check_same_tokenizer
    check_same_tokenizer(meta, data_meta, out_dir, dataset)
    ours, theirs = run["vision"]["image"], data_meta.get("image")
    if ours != theirs:
        what = lambda m, i: (f"{'x'.join(map(str, i['size']))} images for {m.get('tower') or 'a new ViT'}"
                             if isinstance(i, dict) and "size" in i else "no images")
        raise UserError(f"data/{dataset} holds {what(data_meta, theirs)}, but {out_dir} reads {what(meta, ours)}: "
                        "prepare it with the run's settings (prepare_vision.py --image_size or --tower)")


def main():
    cfg = configure(DEFAULTS)
    print_config(cfg)
    from configurator import resolve_device
    device, _ = resolve_device(cfg["device"])
    try:
        vlm, meta, run = load_vision_model(cfg["out_dir"], device)
        data_dir = os.path.join("data", cfg["dataset"] or run["dataset"])
        check_same_images(meta, run, read_meta(data_dir), cfg["out_dir"], cfg["dataset"] or run["dataset"])
        questions, images, kinds = val_questions(data_dir, cfg["split"], cfg["limit"])
        decode, stop = get_tokenizer(meta)[1], answer_end(meta)
        with_image = accuracy(vlm, questions, images, kinds, stop, decode, device, batch_size=cfg["batch_size"])
        blank = accuracy(vlm, questions, images, kinds, stop, decode, device, blank=True, batch_size=cfg["batch_size"])
        # every question asked about another picture of the split: a "text alone" floor made of
        # pictures the model knows (a blank one it never saw can draw answers that are no answer)
        others = images[np.random.default_rng(0).permutation(len(images))]
        permuted = accuracy(vlm, questions, others, kinds, stop, decode, device, batch_size=cfg["batch_size"])
    except UserError as e:
        die(str(e))
    print(f"{len(questions)} {cfg['split']} questions of {data_dir}: exact-match accuracy")
    print(f"  {'kind':<12} {'image':>7} {'blank':>7} {'another':>8}")
    for k in with_image:
        print(f"  {k:<12} {with_image[k]:>7.1%} {blank[k]:>7.1%} {permuted[k]:>8.1%}")


if __name__ == "__main__":
    main()
