"""
The configurator: how every script here takes its settings, plus the few small things that
all of them share (the one-line error, atomic writes, the device and dtype, lines from stdin).

    python train.py config/shakespeare_char_cpu.py --batch_size=32 --compile=False
    python train.py -h                                     # every setting, with its comment

A script defines its settings as a dict of defaults at its top, each with a comment, and
calls `configure(DEFAULTS)`. The arguments are read left to right:

  - a path ending in .py is a config file: plain Python, exec'd into a namespace that starts
    from the current settings (so a recipe can build on them). Config files are code by
    design: only run recipes you trust.
  - `--key=value` or `--key value` overrides one setting. The value goes through
    `ast.literal_eval`, never eval, so it cannot run code; a bare word that is not a Python
    literal stays a string (`--device=cuda`, `--init_from=gpt2`).
  - `--key` alone, for a True/False setting, means True (`--compile`); `--key=False` turns
    one off.

Every key must exist among the defaults and keep its type (an int is fine for a float).
Anything wrong ends the run before any work: one line on stderr, exit code 2.
"""

import ast
import glob
import os
import signal
import sys
import textwrap
import tokenize
import weakref
from contextlib import contextmanager


class UserError(Exception):
    """Something the user can fix: bad data, a missing checkpoint, a setting that cannot work.
    Scripts print it as one line with die(), never as a traceback."""


def die(msg):
    """One line to stderr, exit code 2: how every script here reports a UserError."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def exit_on_ctrl_c():
    """From here on a Ctrl-C ends the process with one line and exit code 130 (128 + SIGINT)
    instead of a KeyboardInterrupt traceback, wherever it lands. Scripts call it before they
    import torch, which takes seconds. It raises SystemExit, so `finally` blocks and atomic_write's
    clean-up still run; a second Ctrl-C kills at once. Worker processes forked from this one
    (datasets' and multiprocessing's) get the same Ctrl-C from the terminal: they end silently
    and leave the one line to this process. (train.py installs its own handler for training.)"""
    parent = os.getpid()

    def handler(signum, frame):
        if os.getpid() != parent:
            os._exit(130)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, handler)


def read_lines(prompt="> "):
    """The lines typed on stdin (or piped to it), stripped, empty ones skipped, until /exit or
    the end of input: sample.py's --chat. On a terminal, prompt is shown (on stderr) before each."""
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip():
            yield line.strip()


@contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """Open a temp file beside `path` for writing; when the block ends without error it
    replaces `path` in one step (os.replace), else it is deleted. A reader (or a resumed run)
    sees the old file or the new one, never half of one; the temp name holds the process id,
    so two writers never share one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as e:  # also Ctrl-C and sys.exit
        if os.path.isfile(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk, a read-only folder, a file where a folder should be
            reason = e.strerror or "the disk is full or read-only?"
            raise UserError(f"could not write {path}: {reason} (nothing was replaced; free space or choose "
                            "another folder)") from None
        raise


def lock_folder(folder, busy):
    """Lock the --out_dir `folder` for this process (the lock file stays open until the process
    ends, however it ends: the OS then drops the lock), or raise UserError(busy) if another
    process holds it. Then delete the *.tmp files that a killed writer left there: with the lock
    held, none of them is being written. When the lock is let go of (its holder returns, or the
    process exits), the lock file goes, and so does the folder if it was made here and nothing else
    was written into it (a start that failed).
    (Windows has no fcntl: no lock there.)"""
    new = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "w")
    except OSError as e:
        raise UserError(f"cannot write into --out_dir={folder}: {e.strerror}") from None
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except BlockingIOError:  # held by another process
        raise UserError(busy) from None
    except OSError as e:  # a file system without locks (some network ones)
        raise UserError(f"cannot lock --out_dir={folder}: {e.strerror}; choose a folder on a local disk") from None
    for stale in glob.glob(os.path.join(folder, "*.tmp")):
        print(f"removing {stale}, an unfinished write of a process that was killed")
        os.remove(stale)
    weakref.finalize(lock, _unlock_folder, folder, lock.name, new, os.getpid())
    return lock


def _unlock_folder(folder, path, new, pid):
    if os.getpid() != pid:  # a forked worker exiting: the lock is still its parent's
        return
    try:
        os.remove(path)
        if new and not os.listdir(folder):
            os.rmdir(folder)
    except OSError:
        pass


def quiet_offline_hub(host="huggingface.co"):
    """If the Hugging Face Hub cannot be reached, tell its libraries so (HF_HUB_OFFLINE=1): they
    then use their cache at once, or fail at once, instead of retrying for half a minute."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


# -----------------------------------------------------------------------------
# settings


def _check_type(key, value, default, source=None):
    """Return `value` converted to the default's type, or end the run with a clear line.
    source: the config file that set it (None: the command line)."""
    if default is None:
        return value  # a None default (an "auto" switch) accepts anything
    if value is None:  # --out_dir=None: no folder named None
        what = f"config file {source} sets {key} = None" if source else f"--{key} cannot be None"
        die(f"{what}: give a {type(default).__name__} (like {default!r})")
    if isinstance(default, bool):  # bool before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, type(default)):
        return value
    die(f"--{key} must be {type(default).__name__} (like {default!r}), got {value!r}")


def _parse_value(text):
    if text in ("true", "false"):  # what YAML, JSON and most command lines call the booleans
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as cuda or gpt2-medium stays a string


def configure(defaults, argv=None, source=None, usage=None):
    """Apply config files and --key=value overrides from `argv` (default: sys.argv[1:]) to
    `defaults`; return the new dict (only the keys of `defaults`). -h/--help prints `usage`,
    the settings as commented in `source` (default: the running script) and exits 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help(defaults, source or getattr(sys.modules["__main__"], "__file__", None), usage)
        sys.exit(0)
    config = dict(defaults)
    valid = ", ".join(sorted(defaults))
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):  # a config file
            if not arg.endswith(".py"):
                die(f"unexpected argument {arg!r}: give config files (config/NAME.py) and --key=value")
            if not os.path.isfile(arg):
                here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
                recipes = ", ".join(sorted(n for n in os.listdir(here) if n.endswith(".py"))) if os.path.isdir(here) else ""
                die(f"config file {arg} not found; the recipes in config/: {recipes}")
            namespace = dict(config)
            with open(arg, encoding="utf-8") as f:
                source_text = f.read()
            try:
                exec(compile(source_text, arg, "exec"), namespace)
            except Exception as e:  # a broken recipe: say where, not a traceback
                die(f"config file {arg} failed: {type(e).__name__}: {e}")
            except SystemExit:  # a recipe sets values; ending the run (with exit 0) before any work is no recipe
                die(f"config file {arg} called sys.exit() or exit(): a config file may only set values")
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue  # __builtins__, imports, helper functions, _private helper values
                if key not in defaults:  # most likely a typo of a real key: worth stopping for
                    die(f"config file {arg} sets unknown key {key!r} (prefix helper names with _); valid keys: {valid}")
                config[key] = _check_type(key, value, defaults[key], source=arg)
            continue
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in defaults:
            die(f"unknown key --{key}; valid keys: {valid}")
        if not has_value:
            nxt = argv[i] if i < len(argv) else None
            if isinstance(defaults[key], bool):
                bare = nxt not in ("True", "False", "true", "false")  # --compile config/x.py, --compile --rope, at the end
            else:  # None: an optional setting (sample.py's instruct) may be a switch too
                bare = defaults[key] is None and (nxt is None or nxt.startswith("--"))
            if bare:
                config[key] = True
                continue
            if nxt is None:
                die(f"--{key} needs a value: --{key}=VALUE")
            if nxt.startswith("--"):  # `--out_dir --rope`: a forgotten value, not a folder named --rope
                die(f"--{key} needs a value, and {nxt} is the next flag: write --{key}=VALUE")
            text = nxt
            i += 1
        value = _parse_value(text)
        if isinstance(defaults[key], str) and value is not None and not isinstance(value, str):
            value = text  # --start=123 for a string setting means the text "123"
        config[key] = _check_type(key, value, defaults[key])
    return config


def print_config(config, file=None):
    """Print the effective settings, one per line, so a log shows exactly what ran."""
    width = max(len(k) for k in config)
    for k, v in config.items():
        print(f"  {k:<{width}} = {v!r}", file=file)


def setting_comments(defaults, source):
    """{key: comment} and {key: section heading above it}, read from the `dict(...)` in
    `source` (a .py path) that defines `defaults`: the comments are the documentation."""
    with open(source, encoding="utf-8") as f:
        text = f.read()
    comments = {}  # line number -> the comment on it
    for tok in tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict"
                and {kw.arg for kw in node.keywords} == set(defaults)):
            break
    else:
        return {}, {}
    said, sections, line_before = {}, {}, node.lineno
    for kw in node.keywords:
        end = kw.value.end_lineno
        said[kw.arg] = comments.get(end, ("", False))[0]
        # whole-line comments between the previous setting and this one head a group
        heads = [comments[n][0] for n in range(line_before + 1, kw.value.lineno) if comments.get(n, ("", False))[1]]
        if heads:
            sections[kw.arg] = " ".join(heads)
        line_before = end
    return said, sections


def recipe_summary(path):
    """The first sentence of a recipe's opening comment: what the recipe is."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip().lstrip("#").strip()
            if not line.startswith("#") or not text or text.split()[0] in ("python", "torchrun", "First:", "then"):
                break  # the comment's commands, or its end
            lines.append(text)
    words = " ".join(lines)
    end = words.find(". ")
    return words if end < 0 else words[:end + 1]


def print_help(defaults, source, usage=None):
    """-h: a usage line, the script's docstring (its examples), the training recipes in
    config/ (for train.py), then each setting with its default and its comment."""
    name = os.path.basename(source) if source else "SCRIPT.py"
    print(f"usage: {usage or f'python {name} [config/FILE.py ...] [--key=value | --key value | --flag ...]'}\n")
    said, sections = {}, {}
    if source and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        if doc:
            print(doc.strip() + "\n")
        said, sections = setting_comments(defaults, source)
        if name == "train.py":  # the recipes are training runs
            print("config files (recipes):")
            for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(source)), "config", "*.py"))):
                name = f"config/{os.path.basename(path)}"
                wrapped = textwrap.fill(recipe_summary(path), 120, initial_indent=" " * 40, subsequent_indent=" " * 40)
                print(f"  {name:<37} {wrapped[40:]}")
            print()
    print("settings (default, then what it does):")
    width = max(len(k) for k in defaults) + 2
    for key, value in defaults.items():
        if key in sections:
            print(f"  # {sections[key]}")
        print(f"  --{key:<{width}} {value!r:<18} {said.get(key, '')}".rstrip())
    print("\n--key alone sets a True/False setting to True; --key=False turns it off.")


# -----------------------------------------------------------------------------
# device and dtype: the two settings every script that runs a model resolves the same way
# (torch is imported inside, so the prepare scripts start without it)


def resolve_device(name):
    """Return (device, device_type): auto -> cuda, then mps, then cpu; a named device is
    checked to exist. device_type (cuda, mps or cpu) is what torch.autocast takes."""
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        die(f"unknown --device={name}; choose auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        die(f"--device={name} but torch sees no CUDA GPU; use --device=cpu (or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        die(f"--device={name} but there are only {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    if kind == "mps" and not has_mps:
        die("--device=mps but MPS is not available here; use --device=cpu (or auto)")
    return name, kind


def resolve_dtype(name, device_type):
    """auto: bf16 on GPUs that have it in hardware, else fp16 (trained with a GradScaler); fp32 on
    CPU and MPS (CPUs without bf16 units run it slower than fp32)."""
    import torch

    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if native_bf16_gpu() else torch.float16
        return torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        die(f"unknown --dtype={name}; choose auto, float32, bfloat16 or float16")
    return choices[name]


def native_bf16_gpu():
    """Whether the current CUDA GPU computes bf16 in hardware: NVIDIA from Ampere on (compute
    capability 8.0). torch.cuda.is_bf16_supported() is also True on older GPUs (V100, T4) that
    only emulate it, slowly; fp16 with a GradScaler is the fast choice there."""
    import torch

    if torch.version.hip:  # AMD: torch's answer is the hardware's
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability()[0] >= 8


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass: matmuls in dtype, reductions kept in fp32.
    fp32 needs no autocast at all."""
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
