"""configurator.py: config files, --key=value overrides, and the one-line errors."""

import pytest

from configurator import configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, device="auto", out_dir="out", top_k=None)


def test_config_file_then_overrides(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import math\nbatch_size = 32\n_helper = 3\nlearning_rate = 1e-3 * _helper\n")
    cfg = configure(DEFAULTS, [str(recipe), "--batch_size=64", "--device=cuda", "--compile=False",
                               "--learning_rate", "1", "--top_k=50"])
    assert cfg == dict(batch_size=64, learning_rate=1.0, compile=False, device="cuda", out_dir="out", top_k=50)
    assert isinstance(cfg["learning_rate"], float)  # an int is accepted for a float, as a float


def test_later_config_file_sees_earlier_values(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("batch_size = 20\n")
    b.write_text("batch_size = batch_size * 2\n")
    assert configure(DEFAULTS, [str(a), str(b)])["batch_size"] == 40


def test_strings_stay_strings():
    assert configure(DEFAULTS, ["--out_dir=123"])["out_dir"] == "123"
    assert configure(DEFAULTS, ["--out_dir='my run'"])["out_dir"] == "my run"


def expect_exit(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err


def test_errors(capsys, tmp_path):
    expect_exit(capsys, ["--batch_sise=3"], "batch_sise", "batch_size")  # names the valid keys
    expect_exit(capsys, ["--batch_size=1.5"], "batch_size", "int")
    expect_exit(capsys, ["--compile=1"], "compile", "bool")
    expect_exit(capsys, ["config/nope.py"], "config/nope.py", "not found")
    expect_exit(capsys, ["--batch_size"], "needs a value")
    bad = tmp_path / "typo.py"
    bad.write_text("learnin_rate = 1.0\n")
    expect_exit(capsys, [str(bad)], "learnin_rate")
    broken = tmp_path / "broken.py"
    broken.write_text("batch_size = (\n")
    expect_exit(capsys, [str(broken)], "broken.py", "SyntaxError")


def test_no_code_runs_from_overrides():
    # literal_eval refuses calls: the text stays a string instead of being executed
    cfg = configure(DEFAULTS, ["--out_dir=__import__('os').getcwd()"])
    assert cfg["out_dir"] == "__import__('os').getcwd()"


def test_every_recipe_in_config_is_valid_for_train_py():
    # a recipe with a misspelt key or a wrong type would stop a user's run at its first line
    import glob
    import os

    import plan
    import train
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (config/align_*.py are align.py's recipes: tests/test_align.py checks them; vision_*.py train_vision.py's)
    recipes = sorted(p for p in glob.glob(os.path.join(root, "config", "*.py"))
                     if not os.path.basename(p).startswith(("align_", "vision_")))
    assert len(recipes) >= 9
    out_dirs = [configure(train.DEFAULTS, [path])["out_dir"] for path in recipes]
    assert len(set(out_dirs)) == len(recipes), out_dirs  # no recipe writes over another's run
    for path in recipes:
        cfg = configure(train.DEFAULTS, [path])
        plan.check_settings(cfg, under_torchrun=False)  # exits (failing the test) on a setting train.py would refuse
        # batch arithmetic that train.py checks at start: a whole number of accumulation steps
        # on 1 and on 8 GPUs (tokens per step for pretraining; SFT steps count examples)
        sft = cfg["dataset"].startswith("alpaca")  # prepare_alpaca.py's instruction data: steps count examples
        per_gpu = cfg["batch_size"] * (1 if sft else cfg["block_size"])
        for gpus in (1, 8) if cfg["total_batch_size"] >= 8 * per_gpu else (1,):
            assert cfg["total_batch_size"] % (per_gpu * gpus) == 0 or cfg["total_batch_size"] == 0, (path, gpus)
        assert cfg["n_embd"] % cfg["n_head"] == 0, path
    import train_vision  # its recipes: every key one of its settings, of the right type
    for path in glob.glob(os.path.join(root, "config", "vision_*.py")):
        assert configure(train_vision.DEFAULTS, [path])["out_dir"] not in out_dirs


def test_bare_booleans_and_values():
    # a bare --flag sets a True/False setting to True, before other flags, before a config
    # file, or at the end; --key value keeps working for every other type
    cfg = configure(DEFAULTS, ["--compile=False", "--compile", "--batch_size", "64", "--device", "cuda"])
    assert cfg["compile"] is True and cfg["batch_size"] == 64 and cfg["device"] == "cuda"
    assert configure(dict(DEFAULTS, compile=False), ["--batch_size=3", "--compile"])["compile"] is True
    assert configure(DEFAULTS, ["--compile", "False", "--out_dir", "123"]) == dict(DEFAULTS, compile=False, out_dir="123")
    assert configure(dict(DEFAULTS, compile=False), ["--compile", "--learning_rate", "1e-3"]) == \
        dict(DEFAULTS, compile=True, learning_rate=1e-3)
    # an optional (None) setting can be a switch too: sample.py's --instruct
    opts = dict(instruct=None, start="\n")
    assert configure(opts, ["--instruct", "--start=Say hello."]) == dict(instruct=True, start="Say hello.")
    assert configure(opts, ["--start", "hi", "--instruct"]) == dict(instruct=True, start="hi")


def test_a_bare_flag_for_a_value_setting_is_one_line(capsys):
    expect_exit(capsys, ["--batch_size", "--compile"], "--batch_size")
    expect_exit(capsys, ["--out_dir"], "needs a value")
    # the next flag is never taken as the value: no run into a folder named --compile
    expect_exit(capsys, ["--out_dir", "--compile"], "--out_dir needs a value", "--compile is the next flag")
    assert configure(DEFAULTS, ["--learning_rate", "-1e-3"])["learning_rate"] == -1e-3  # a negative number is a value


def test_none_only_where_the_default_is_none(capsys, tmp_path):
    for key in ("batch_size", "learning_rate", "out_dir", "compile"):
        expect_exit(capsys, [f"--{key}=None"], f"--{key} cannot be None")
    assert configure(dict(instruct=None), ["--instruct=None"]) == dict(instruct=None)
    (tmp_path / "nones.py").write_text("batch_size = None\n")
    expect_exit(capsys, [str(tmp_path / "nones.py")], "nones.py sets batch_size = None")


def test_a_config_file_that_exits_is_refused(capsys, tmp_path):
    for body in ("import sys\nsys.exit(0)\n", "exit()\n"):
        (tmp_path / "quits.py").write_text(body)
        expect_exit(capsys, [str(tmp_path / "quits.py")], "quits.py", "sys.exit")


SCRIPTS = ["train", "sample", "hellaswag", "bench", "prepare_shakespeare", "prepare_fineweb", "prepare_alpaca",
           "export_hf", "checkpoint", "plot", "align", "prepare_preferences", "prepare_tokenizer", "export_gguf",
           "serve", "vision", "prepare_vision", "train_vision"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_setting_with_its_comment(name, capsys):
    import importlib
    import os
    import re
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        configure(module.DEFAULTS, ["--batch_size=oops", "-h"], source=module.__file__)
    assert e.value.code == 0  # -h wins over everything else, and is not an error
    out = capsys.readouterr().out
    assert out.startswith("usage:") and module.__doc__.strip().splitlines()[0] in out
    for key in module.DEFAULTS:
        assert f"--{key} " in out
    # the comments at the top of the file are the help text: every one of them is shown
    source = open(module.__file__).read()
    block = source[source.index("DEFAULTS = dict("):]
    block = block[:block.index("\n)\n")]
    comments = re.findall(r"^\s+\w+=.*?  # (.+)$", block, re.M)
    assert comments and all(c.strip() in out for c in comments), name
    if name == "train":
        for recipe in os.listdir(os.path.join(os.path.dirname(module.__file__), "config")):
            assert f"config/{recipe}" in out


def test_help_from_the_command_line():
    from conftest import run_script
    p = run_script(["plot.py", "-h"])  # plot.py takes run folders before its settings
    assert p.returncode == 0 and "--smooth" in p.stdout and "OUT_DIR" in p.stdout
    p = run_script(["train.py", "--help"])
    assert p.returncode == 0 and "--total_batch_size" in p.stdout and "tokens per optimizer step" in p.stdout
    # each recipe by its whole first sentence, never cut mid-way (wrapped lines joined back)
    recipes = " ".join(p.stdout.split("config files (recipes):")[1].split("settings (default")[0].split())
    assert "low-rank adapters on every linear of every block are trained (2.65M parameters, 2.1%)." in recipes
    assert "9,536 steps of 2^20 tokens." in recipes
    for script, wrong in (("hellaswag.py", "out_shakespeare_char"), ("plot.py", "3.28")):
        p = run_script([script, "-h"])
        assert p.returncode == 0 and wrong not in p.stdout  # the examples name what the README names


@pytest.mark.parametrize("capability, emulated, hip, expected", [
    ((9, 0), True, None, "bfloat16"),  # H100: native
    ((8, 0), True, None, "bfloat16"),  # A100: native
    ((7, 0), True, None, "float16"),  # V100: torch says bf16 is supported, but only emulated
    ((7, 5), False, None, "float16"),  # T4 on an older torch: no bf16 at all
    ((9, 4), True, "6.2", "bfloat16"),  # ROCm: torch's own answer
    ((9, 4), False, "6.2", "float16"),
])
def test_dtype_auto_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, emulated, hip, expected):
    import torch

    from configurator import resolve_dtype
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: emulated)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert resolve_dtype("auto", "cuda") == getattr(torch, expected)
    assert resolve_dtype("auto", "cpu") == torch.float32  # the CPU stays fp32 whatever the GPU
