"""Bad input, one row each: every script answers with one `error:` line (exit 2, no traceback)
that names the problem, and no file that existed before the command is changed (but for lines
appended to a log) or removed.

    python tests/test_bad_input.py [ROOT]     # the catalogue as a table, against ROOT's scripts
"""

import json
import os
import pickle
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from conftest import ROOT, run_python  # noqa: E402

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--device=cpu",
        "--dtype=float32", "--eval_iters=1", "--eval_interval=0", "--max_iters=2", "--warmup_iters=1"]
TRAIN = ["train.py", "--dataset=tiny"] + TINY
SAMPLE = ["sample.py", "--device=cpu", "--max_new_tokens=5", "--num_samples=1"]

# (name, command: script then arguments, words the error line must hold)
CASES = [
    # train.py: runs and out_dirs
    ("resume on another tokenizer's data", TRAIN + ["--init_from=resume", "--out_dir=run", "--dataset=bpe"], ["tokenizer"]),
    ("scratch run into an existing run", TRAIN + ["--out_dir=run"], ["already holds a run", "--init_from=resume"]),
    ("a new run into a folder with only ckpt_best.pt", TRAIN + ["--out_dir=bestonly"], ["ckpt_best.pt", "--overwrite"]),
    ("a new run into a folder with only a log", TRAIN + ["--out_dir=logonly"], ["log.txt", "--overwrite"]),
    ("serve: a reward model", ["serve.py", "--out_dir=rewardrun", "--port=0"], ["is a reward model", "policy"]),
    ("sample: a vision run without --image", SAMPLE + ["--out_dir=visionrun"], ["is a vision run", "--image="]),
    ("train: a negative thread count", TRAIN + ["--cpu_threads=-1", "--out_dir=o_thr"],
     ["--cpu_threads must not be negative"]),
    ("train_vision: a negative thread count", ["train_vision.py", "--cpu_threads=-2", "--out_dir=o_thr"],
     ["--cpu_threads must not be negative"]),
    ("train_vision: LoRA on a new LM", ["train_vision.py", "--lora_rank=4", "--out_dir=o_vl"], ["--init_from"]),
    ("train: resume an align.py run", TRAIN + ["--init_from=resume", "--out_dir=dporun"], ["align.py run", "align.py"]),
    ("plan: a negative plan_world", TRAIN + ["--plan", "--plan_world=-1"], ["--plan_world"]),
    ("plan: resume a checkpoint without model_args", TRAIN + ["--plan", "--init_from=resume", "--out_dir=nomodelargs"],
     ["not a checkpoint"]),
    ("plan: resume random bytes", TRAIN + ["--plan", "--init_from=resume", "--out_dir=randombytes"], ["not a checkpoint"]),
    ("plan: a broken meta.json", TRAIN + ["--plan", "--dataset=badjson"], ["meta.json"]),
    ("train: a preference dataset", TRAIN + ["--dataset=prefs", "--out_dir=o13"], ["preference pairs", "align.py"]),
    ("hellaswag: a preference set's val loss", ["hellaswag.py", "--out_dir=run", "--val_dataset=prefs"],
     ["preference pairs"]),
    ("export: a reward model", ["export_hf.py", "--out_dir=rewardrun", "--hf_dir=hf"], ["reward model"]),
    ("out_dir is a file", TRAIN + ["--out_dir=afile"], ["afile", "file"]),
    ("a GPU recipe where there is no GPU", ["train.py", os.path.join(ROOT, "config", "shakespeare_char.py")],
     ["GPU", "--device=cpu --compile=False"]),
    ("a GPU-sized run without compile, no GPU", ["train.py", os.path.join(ROOT, "config", "gpt2_124m.py"),
                                                 "--compile=False"], ["GPU", "hours", "--device=cpu"]),
    ("resume from a merged checkpoint", TRAIN + ["--init_from=resume", "--out_dir=merged"], ["no training state"]),
    ("resume with another model shape", TRAIN + ["--init_from=resume", "--out_dir=run", "--n_layer=3"], ["n_layer"]),
    ("total_batch_size not a multiple", TRAIN + ["--total_batch_size=100"], ["not a multiple"]),
    ("a negative total_batch_size", TRAIN + ["--total_batch_size=-128"], ["must not be negative"]),
    ("log_interval 0", TRAIN + ["--log_interval=0"], ["--log_interval must be at least 1"]),
    ("n_embd not a multiple of n_head", TRAIN + ["--n_embd=100", "--n_head=3"], ["multiple of n_head"]),
    ("a missing dataset", TRAIN + ["--dataset=missing"], ["data/missing"]),
    ("resume with no checkpoint", TRAIN + ["--init_from=resume", "--out_dir=nowhere"], ["no checkpoint"]),
    # meta.json and shards
    ("meta.json: too few chars for the tokens", TRAIN + ["--dataset=fewchars", "--out_dir=o1"], ["token id", "train.bin"]),
    ("meta.json: not JSON", TRAIN + ["--dataset=badjson", "--out_dir=o2"], ["meta.json", "JSON"]),
    ("meta.json: no chars", TRAIN + ["--dataset=nochars", "--out_dir=o3"], ["meta.json", "chars"]),
    ("meta.json: a list", TRAIN + ["--dataset=alist", "--out_dir=o4"], ["meta.json", "tokenizer"]),
    ("meta.json: unknown tokenizer", TRAIN + ["--dataset=unknowntok", "--out_dir=o5"], ["meta.json", "tokenizer"]),
    # checkpoints of the wrong structure
    ("train: resume a dict without model_args", TRAIN + ["--init_from=resume", "--out_dir=nomodelargs"], ["not a checkpoint"]),
    ("train: resume a bare tensor", TRAIN + ["--init_from=resume", "--out_dir=baretensor"], ["not a checkpoint"]),
    ("train: resume wrong tensor shapes", TRAIN + ["--init_from=resume", "--out_dir=badshapes"], ["does not fit"]),
    ("sample: a dict without model_args", SAMPLE + ["--out_dir=nomodelargs"], ["not a checkpoint"]),
    ("sample: a bare tensor", SAMPLE + ["--out_dir=baretensor"], ["not a checkpoint"]),
    ("sample: wrong tensor shapes", SAMPLE + ["--out_dir=badshapes"], ["does not fit"]),
    ("export: a bare tensor", ["export_hf.py", "--out_dir=baretensor", "--hf_dir=hf"], ["not a checkpoint"]),
    ("export: wrong tensor shapes", ["export_hf.py", "--out_dir=badshapes", "--hf_dir=hf"], ["does not fit"]),
    # settings that parse but cannot work
    ("train: negative learning rate", TRAIN + ["--learning_rate=-1.0"], ["learning_rate"]),
    ("train: dropout 1.5", TRAIN + ["--dropout=1.5"], ["dropout"]),
    ("train: RoPE with an odd head size", TRAIN + ["--rope=True", "--n_embd=30", "--n_head=2"], ["even head size"]),
    ("train: negative keep_interval", TRAIN + ["--keep_interval=-2"], ["keep_interval"]),
    ("train: an unknown optimizer", TRAIN + ["--optimizer=sgd"], ["adamw or muon"]),
    ("sample: top_k -5", SAMPLE + ["--out_dir=run", "--top_k=-5"], ["top_k"]),
    ("sample: top_p 0", SAMPLE + ["--out_dir=run", "--top_p=0.0"], ["top_p"]),
    ("sample: top_p 1.5", SAMPLE + ["--out_dir=run", "--top_p=1.5"], ["top_p"]),
    ("sample: negative temperature", SAMPLE + ["--out_dir=run", "--temperature=-1.0"], ["temperature"]),
    ("sample: max_new_tokens -1", SAMPLE + ["--out_dir=run", "--max_new_tokens=-1"], ["max_new_tokens"]),
    ("sample: num_samples -1", SAMPLE + ["--out_dir=run", "--num_samples=-1"], ["num_samples"]),
    ("sample: instruct on a char model", SAMPLE + ["--out_dir=run", "--instruct"], ["BPE"]),
    ("sample: --chat with --start", SAMPLE + ["--out_dir=run", "--chat", "--start=Hi"], ["--chat", "drop --start"]),
    ("hellaswag: negative eval_iters", ["hellaswag.py", "--out_dir=run", "--val_dataset=tiny", "--eval_iters=-3"], ["eval_iters"]),
    # files
    ("prepare_shakespeare: non-UTF-8 input", ["prepare_shakespeare.py", "--input=latin1.txt", "--out_dir=data/x1"], ["UTF-8"]),
    ("prepare_shakespeare: empty input", ["prepare_shakespeare.py", "--input=empty.txt", "--out_dir=data/x2"], ["too few"]),
    ("prepare_shakespeare: val_fraction 0", ["prepare_shakespeare.py", "--input=text.txt", "--val_fraction=0"], ["val_fraction"]),
    ("prepare_shakespeare: val_fraction 1.5", ["prepare_shakespeare.py", "--input=text.txt", "--val_fraction=1.5"], ["val_fraction"]),
    ("prepare_shakespeare: val_fraction -0.1", ["prepare_shakespeare.py", "--input=text.txt", "--val_fraction=-0.1"], ["val_fraction"]),
    ("prepare_alpaca: non-UTF-8 input", ["prepare_alpaca.py", "--input=latin1.txt", "--out_dir=data/x3"], ["UTF-8"]),
    ("prepare_shakespeare over another dataset", ["prepare_shakespeare.py", "--input=text.txt", "--out_dir=data/bpe"],
     ["data/bpe", "tokenizer gpt2", "--overwrite"]),
    ("prepare_fineweb over another dataset", ["prepare_fineweb.py", "--data_files=docs.jsonl", "--out_dir=data/tiny",
                                              "--num_proc=1"], ["data/tiny", "tokenizer char", "--overwrite"]),
    ("prepare_fineweb: a non-UTF-8 .jsonl", ["prepare_fineweb.py", "--data_files=latin1.jsonl", "--out_dir=data/x5",
                                             "--num_proc=1"], ["not UTF-8"]),
    ("prepare_fineweb: a damaged resume record", ["prepare_fineweb.py", "--data_files=docs.jsonl",
                                                  "--out_dir=data/badprogress", "--num_proc=1"], ["damaged", "--overwrite"]),
    ("sample: non-UTF-8 prompt file", SAMPLE + ["--out_dir=run", "--start=FILE:latin1.txt"], ["UTF-8"]),
    ("merge: merged_dir is a file", ["checkpoint.py", "--out_dir=run", "--merged_dir=afile"], ["afile"]),
    ("plot: output under a file", ["plot.py", "run", "--output=afile/plot.png"], ["afile"]),
    # round 3: nothing wrong loaded silently, no explicit setting ignored silently
    ("train: an HF folder of another architecture", TRAIN + ["--init_from=hf_bert", "--out_dir=o6"], ["bert", "only GPT-2"]),
    ("train: a Llama folder with long-context RoPE", TRAIN + ["--init_from=hf_llama3", "--out_dir=o6b"], ["rope_scaling 'llama3'"]),
    ("train: a Llama config.json without its sizes", TRAIN + ["--init_from=hf_llama_partial", "--out_dir=o6c"],
     ["config.json", "num_attention_heads"]),
    ("train: an HF folder without weights", TRAIN + ["--init_from=hf_noweights", "--out_dir=o7"], ["no weights"]),
    ("train: an HF folder with broken config.json", TRAIN + ["--init_from=hf_badjson", "--out_dir=o8"], ["config.json", "JSON"]),
    ("train: an HF folder with config.json {}", TRAIN + ["--init_from=hf_emptyconfig", "--out_dir=o9"], ["only GPT-2"]),
    ("train: an HF folder with n_inner != 4 n_embd", TRAIN + ["--init_from=hf_ninner", "--out_dir=o10"], ["n_inner"]),
    ("train: an HF folder with corrupt safetensors", TRAIN + ["--init_from=hf_corrupt", "--out_dir=o11"], ["could not read"]),
    ("train: an HF folder with a malicious .bin", TRAIN + ["--init_from=hf_malicious", "--out_dir=o12"], ["could not read"]),
    ("sample: an HF folder of another architecture", SAMPLE + ["--init_from=hf_bert"], ["bert"]),
    ("plan: an HF folder whose config.json is a list", TRAIN + ["--plan", "--init_from=hf_list"], ["config.json", "list"]),
    ("plan: a Qwen2 folder", TRAIN + ["--plan", "--init_from=hf_qwen"], ["model_type 'qwen2'"]),
    ("plan: a Llama config with no heads", TRAIN + ["--plan", "--init_from=hf_noheads"], ["num_attention_heads=0"]),
    ("sample: a Llama config with no heads", SAMPLE + ["--init_from=hf_noheads"], ["num_attention_heads=0"]),
    ("sample: an HF folder with corrupt safetensors", SAMPLE + ["--init_from=hf_corrupt"], ["could not read"]),
    ("sample: an HF folder with a malicious .bin", SAMPLE + ["--init_from=hf_malicious"], ["could not read"]),
    ("sample: out_dir and init_from both", SAMPLE + ["--out_dir=run", "--init_from=gpt2"], ["not both"]),
    ("train: batch_size None", TRAIN + ["--batch_size=None"], ["--batch_size cannot be None"]),
    ("train: learning_rate None", TRAIN + ["--learning_rate=None"], ["--learning_rate cannot be None"]),
    ("train: out_dir None", TRAIN + ["--out_dir=None"], ["--out_dir cannot be None"]),
    ("train: compile None", TRAIN + ["--compile=None"], ["--compile cannot be None"]),
    ("sample: temperature None", SAMPLE + ["--out_dir=run", "--temperature=None"], ["--temperature cannot be None"]),
    ("train: a flag taken as out_dir", TRAIN + ["--out_dir", "--rope"], ["--out_dir needs a value", "--rope"]),
    ("sample: a flag taken as the prompt", SAMPLE + ["--out_dir=run", "--start", "--temperature=0.5"], ["--start needs a value"]),
    ("train: muon_momentum 1.0", TRAIN + ["--optimizer=muon", "--muon_momentum=1.0"], ["muon_momentum must be below 1"]),
    ("train: muon_momentum 1.5", TRAIN + ["--optimizer=muon", "--muon_momentum=1.5"], ["muon_momentum must be below 1"]),
    ("train: beta2 1.0", TRAIN + ["--beta2=1.0"], ["beta2"]),
    ("train: lora_targets with an empty name", TRAIN + ["--init_from=run", "--lora_rank=2", "--lora_targets=q,,v", "--out_dir=o13"],
     ["empty name"]),
    ("train: a config file that exits", TRAIN + ["exits.py"], ["exits.py", "sys.exit"]),
    ("train: negative seed", TRAIN + ["--seed=-1", "--out_dir=o14"], ["--seed"]),
    ("sample: negative seed", SAMPLE + ["--out_dir=run", "--seed=-1"], ["--seed"]),
    ("train: group_by_length on token data", TRAIN + ["--group_by_length", "--out_dir=o15"], ["group_by_length", "token"]),
    ("train: resume a LoRA run with another rank", TRAIN + ["--init_from=resume", "--out_dir=lorarun", "--lora_rank=8"],
     ["lora_rank=2", "resume it with the same"]),
    ("train: resume a LoRA run with other targets", TRAIN + ["--init_from=resume", "--out_dir=lorarun", "--lora_rank=2",
                                                             "--lora_targets=q,k,v"], ["lora_targets", "resume it with the same"]),
    ("train: resume a full run with LoRA", TRAIN + ["--init_from=resume", "--out_dir=run", "--lora_rank=4"], ["lora_rank=0"]),
    ("merge: into the LoRA run itself", ["checkpoint.py", "--out_dir=lorarun", "--merged_dir=lorarun"], ["reads from"]),
    ("merge: over an existing checkpoint", ["checkpoint.py", "--out_dir=lorarun", "--merged_dir=merged"], ["--overwrite"]),
    ("prepare_alpaca: nothing but empty outputs", ["prepare_alpaca.py", "--input=empty_outputs.jsonl", "--out_dir=data/x5"],
     ["no records to train on"]),
    ("prepare_fineweb: a text field of numbers", ["prepare_fineweb.py", "--data_files=numbers.jsonl", "--out_dir=data/x6",
                                                  "--num_proc=1"], ["text field"]),
    ("hellaswag: a truncated val file", ["hellaswag.py", "--out_dir=run", "--val_dataset=truncated"], ["truncated"]),
    ("hellaswag: an empty ending", ["hellaswag.py", "--out_dir=bperun", "--data_file=empty_ending.jsonl"], ["none empty"]),
    ("export: the disk fills", ["export_hf.py", "--out_dir=bperun", "--hf_dir=hf"], ["cannot write hf"]),
    # a full disk (see FILE_SIZE_LIMIT): the last good checkpoint stays, no temp file is left
    ("train: the disk fills while saving", TRAIN + ["--init_from=resume", "--out_dir=run", "--max_iters=4"],
     ["could not write run/ckpt.pt"]),
    ("prepare_shakespeare: the disk fills", ["prepare_shakespeare.py", "--input=text.txt", "--out_dir=data/x4"],
     ["could not write data/x4/train.bin"]),
]

# Rows run with a file-size limit (RLIMIT_FSIZE, as `ulimit -f` sets it): a write past it fails
# as on a full disk (EFBIG instead of ENOSPC; Python ignores the SIGXFSZ that would kill it), no
# root or special file system needed. Bytes: more than log.txt grows to, less than ckpt.pt.
FILE_SIZE_LIMIT = {"train: the disk fills while saving": 50_000, "prepare_shakespeare: the disk fills": 2_000,
                   "export: the disk fills": 50_000}


def make_workdir(w):
    """Datasets (good and broken), a trained run, and checkpoints of the wrong structure."""
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    from dataloader import write_tokens
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghij \n"), 3000))
    (w / "text.txt").write_text(text)
    (w / "latin1.txt").write_bytes("café, naïve, Ångström\n".encode("latin-1") * 20)
    (w / "empty.txt").write_text("")
    (w / "afile").write_text("a file, not a folder\n")
    (w / "latin1.jsonl").write_bytes('{"text": "caf\xe9 au lait"}\n'.encode("latin-1") * 3)
    os.makedirs(w / "data" / "badprogress")
    (w / "data" / "badprogress" / "prepare_progress.json").write_text('{"shards": [')
    (w / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + text[:200]}) + "\n" for i in range(5)))
    chars = sorted(set(text))
    ids = [chars.index(c) for c in text]
    metas = {"tiny": {"tokenizer": "char", "chars": chars}, "fewchars": {"tokenizer": "char", "chars": chars[:5]},
             "nochars": {"tokenizer": "char"}, "alist": ["char"], "unknowntok": {"tokenizer": "sentencepiece"},
             "bpe": {"tokenizer": "gpt2"}}
    for name, meta in metas.items():
        d = w / "data" / name
        write_tokens(str(d / "train.bin"), ids if name != "bpe" else rng.integers(0, 50257, 3000))
        write_tokens(str(d / "val.bin"), ids[:1000] if name != "bpe" else rng.integers(0, 50257, 1000))
        (d / "meta.json").write_text(json.dumps(meta))
    os.makedirs(w / "data" / "badjson")
    for f in ("train.bin", "val.bin"):
        (w / "data" / "badjson" / f).write_bytes((w / "data" / "tiny" / f).read_bytes())
    (w / "data" / "badjson" / "meta.json").write_text('{"tokenizer": "char", "chars": [')
    code, _, err = run_python([os.path.join(ROOT, "train.py"), "--out_dir=run"] + TRAIN[1:], w,
                              dict(os.environ, OMP_NUM_THREADS="1"), 300)
    assert code == 0, err
    os.makedirs(w / "bestonly")
    (w / "bestonly" / "ckpt_best.pt").write_bytes((w / "run" / "ckpt.pt").read_bytes())
    dpo = torch.load(w / "run" / "ckpt.pt", weights_only=True)  # a run of align.py --method=dpo, as train.py finds it
    dpo["config"]["method"] = "dpo"
    os.makedirs(w / "dporun")
    torch.save(dpo, w / "dporun" / "ckpt.pt")
    dpo["config"] = dict(dpo["config"], vision={})  # as a train_vision.py run's config marks it
    os.makedirs(w / "visionrun")
    torch.save(dpo, w / "visionrun" / "ckpt.pt")
    os.makedirs(w / "logonly")
    (w / "logonly" / "log.txt").write_text("0 train 4.2\n")
    code, _, err = run_python([os.path.join(ROOT, "train.py"), "--out_dir=lorarun", "--init_from=run", "--lora_rank=2"]
                              + TRAIN[1:], w, dict(os.environ, OMP_NUM_THREADS="1"), 300)
    assert code == 0, err
    from checkpoint import make_checkpoint, save_checkpoint  # a small GPT-2 BPE model (1.6 MB): exportable
    from model import GPT, GPTConfig
    bpe = GPT(GPTConfig(vocab_size=50304, n_layer=1, n_head=2, n_embd=8, block_size=16))
    save_checkpoint(make_checkpoint(bpe, {"tokenizer": "gpt2"}, {}, step=0), str(w / "bperun" / "ckpt.pt"))
    good = torch.load(w / "run" / "ckpt.pt", weights_only=True)
    bad = {"nomodelargs": {k: v for k, v in good.items() if k != "model_args"}, "baretensor": torch.zeros(3),
           "badshapes": dict(good, model_args=dict(good["model_args"], n_embd=64, n_head=4)),
           "merged": {k: good[k] for k in ("model", "model_args", "meta", "config", "step")}}
    for name, obj in bad.items():
        os.makedirs(w / name)
        torch.save(obj, w / name / "ckpt.pt")
    os.makedirs(w / "data" / "prefs")  # a preference dataset, as far as its meta.json says
    (w / "data" / "prefs" / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": chars,
                                                                "format": "preference"}))
    reward = torch.load(w / "bperun" / "ckpt.pt", weights_only=True)
    reward["config"] = {"method": "reward"}
    os.makedirs(w / "rewardrun")
    torch.save(reward, w / "rewardrun" / "ckpt.pt")
    os.makedirs(w / "randombytes")
    (w / "randombytes" / "ckpt.pt").write_bytes(bytes(range(256)) * 40)
    # Hugging Face folders that are not a GPT-2 we can load
    gpt2 = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=12)
    llama = dict(model_type="llama", hidden_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=12,
                 intermediate_size=48)
    configs = {"hf_bert": dict(model_type="bert", hidden_size=32), "hf_noweights": gpt2, "hf_emptyconfig": {},
               "hf_llama3": dict(llama, rope_scaling={"rope_type": "llama3", "factor": 32.0}),
               "hf_llama_partial": dict(model_type="llama", hidden_size=32),
               "hf_ninner": dict(gpt2, n_inner=100), "hf_corrupt": gpt2, "hf_malicious": gpt2,
               "hf_list": [gpt2], "hf_qwen": dict(llama, model_type="qwen2"),
               "hf_noheads": dict(llama, num_attention_heads=0)}
    for name, config in configs.items():
        os.makedirs(w / name)
        (w / name / "config.json").write_text(json.dumps(config))
    os.makedirs(w / "hf_badjson")
    (w / "hf_badjson" / "config.json").write_text('{"model_type": "gpt2", ')
    for name in ("hf_bert", "hf_llama3", "hf_llama_partial", "hf_noheads"):
        (w / name / "model.safetensors").write_bytes(b"\0" * 64)
    (w / "hf_corrupt" / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not a header}" + b"\0" * 64)
    (w / "hf_malicious" / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    (w / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (w / "numbers.jsonl").write_text('{"text": "a document"}\n' * 50 + '{"text": 3}\n')  # fails mid-way, past the bar's start
    (w / "empty_outputs.jsonl").write_text('{"instruction": "Say nothing.", "output": ""}\n' * 3)
    (w / "empty_ending.jsonl").write_text(json.dumps({"ctx": "A man", "endings": ["a", "", "c", "d"], "label": 0}) + "\n")
    os.makedirs(w / "data" / "truncated")
    (w / "data" / "truncated" / "meta.json").write_text(json.dumps(metas["tiny"]))
    (w / "data" / "truncated" / "train.bin").write_bytes((w / "data" / "tiny" / "train.bin").read_bytes())
    (w / "data" / "truncated" / "val.bin").write_bytes((w / "data" / "tiny" / "val.bin").read_bytes()[:-10])


class Boom:
    """A pickle that would run a command when loaded: every loader must refuse it."""
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def snapshot(w):
    """{path: its bytes} for every file under w but the lock files."""
    out = {}
    for folder, _, files in os.walk(w):
        for f in files:
            path = os.path.join(folder, f)
            if not f.endswith(".lock"):
                out[path] = open(path, "rb").read()
    return out


def kept(path, old, new):
    """Whether a file is undamaged: still there, the same bytes (a run's log.txt may have had
    lines appended)."""
    if os.path.basename(path) == "log.txt":
        return new is not None and new[:len(old)] == old
    return new == old


def run_case(w, root, command, file_size_limit=None):
    """Run one row; return (exit code, stderr, the files that existed and were changed or removed)."""
    before = snapshot(w)
    # CPU only, also where a GPU is: the no-GPU rows test what device=auto does without one
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    code, _, err = run_python([os.path.join(root, command[0])] + command[1:], w, env, 300, file_size_limit or 0)
    after = snapshot(w)
    damaged = sorted(path for path, data in before.items() if not kept(path, data, after.get(path)))
    damaged += sorted(path for path in after if path.endswith(".tmp") and path not in before)  # left-over temp files
    damaged += [path for path in after if os.path.basename(path) == "PWNED"]  # a pickle that ran (see Boom)
    return code, err, damaged


def run_all(base, root, workers=2):
    """{name: run_case's result} for every row, each in its own copy of the folder `base`, two
    at a time (each row is mostly a Python and torch start-up)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        w = base.parent / f"{base.name}_{i}"
        shutil.copytree(base, w)
        return run_case(w, root, CASES[i][1], FILE_SIZE_LIMIT.get(CASES[i][0]))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip([c[0] for c in CASES], pool.map(one, range(len(CASES)))))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    make_workdir(base)
    return run_all(base, ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("name, command, words", CASES, ids=[c[0] for c in CASES])
def test_one_clear_line_and_nothing_damaged(results, name, command, words):
    code, err, damaged = results[name]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err[-2000:]
    assert not damaged, damaged


# Runs `script` as __main__ after planting an import hook that sends this process a SIGINT the
# moment numpy or torch starts to load: a Ctrl-C that lands while a script starts up.
CTRL_C_WHILE_IMPORTING = """
import os, runpy, signal, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "torch"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
SCRIPTS = ["train.py", "sample.py", "hellaswag.py", "export_hf.py", "checkpoint.py", "bench.py",
           "prepare_shakespeare.py", "prepare_fineweb.py", "prepare_alpaca.py", "plot.py", "align.py", "serve.py",
           "export_gguf.py", "train_vision.py", "prepare_vision.py", "vision.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_starting_is_one_line(script, tmp_path):
    p = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_IMPORTING, os.path.join(ROOT, script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr.strip() == "interrupted (Ctrl-C)", p.stderr[-2000:]


def main():
    """Print the catalogue as a table for the scripts in ROOT (default: this checkout): per row the
    exit code, whether a traceback came, and the files damaged; then the counts."""
    import pathlib
    import tempfile
    root = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    w = pathlib.Path(tempfile.mkdtemp()) / "base"
    os.makedirs(w)
    print(f"running {len(CASES)} bad inputs against {root}, two at a time (a minute or two)...", flush=True)
    make_workdir(w)
    results = run_all(w, root)
    print(f"{'case':<45} {'exit':<6} {'traceback':<9} damaged files")
    tracebacks = accepted = damaged_rows = 0
    for name, command, words in CASES:
        code, err, damaged = results[name]
        tb = "Traceback" in err
        tracebacks += tb
        accepted += code == 0
        damaged_rows += bool(damaged)
        print(f"{name:<45} rc={code:<3} {'traceback' if tb else '':<9} {'damaged ' + str(len(damaged)) if damaged else ''}")
    print(f"{len(CASES)} cases: {tracebacks} tracebacks, {accepted} accepted (exit 0), {damaged_rows} damaged files")


if __name__ == "__main__":
    main()
