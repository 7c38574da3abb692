"""
The configurator: how every script in this project takes its settings.

    python train.py config/shakespeare_char_cpu.py --batch_size=32 --compile=False

A script defines its defaults as plain variables at the top, each with a comment, then calls
`configure(defaults)`. The arguments are read left to right:

  - a path ending in .py is a config file: plain Python, exec'd into a namespace that starts
    from the script's defaults (so a recipe can read and build on them). Config files are code
    by design: only run recipes you trust.
  - `--key=value` (or `--key value`) overrides one default. The value goes through
    `ast.literal_eval`, never eval, so it cannot run code; a bare word that is not a Python
    literal stays a string (`--device=cuda`, `--init_from=gpt2`).

Every key must already exist among the defaults and keep its type (an int is accepted where a
float is expected). Anything wrong ends the run before any work, with one line and exit code 2.
"""

import ast
import os
import sys


def die(msg):
    """One line to stderr, exit code 2: the convention for every bad-input error here."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _check_type(key, value, default):
    """Return `value` converted to the default's type, or end the run with a clear line."""
    if default is None or value is None:
        return value  # None-defaults (optional paths, etc.) accept anything
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
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as cuda or gpt2-medium stays a string


def configure(defaults, argv=None):
    """Apply config files and --key=value overrides from `argv` to the dict `defaults`.

    Returns a new dict holding only the keys of `defaults` (helper names a config file
    defines, such as imports, are dropped).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = dict(defaults)
    valid = ", ".join(sorted(defaults))
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            # a config file
            if not arg.endswith(".py"):
                die(f"unexpected argument {arg!r}: give config files (config/NAME.py) and --key=value")
            if not os.path.isfile(arg):
                die(f"config file {arg} not found (the recipes are in config/)")
            namespace = dict(config)
            with open(arg) as f:
                source = f.read()
            try:
                exec(compile(source, arg, "exec"), namespace)
            except Exception as e:  # a broken recipe: say where, not a traceback
                die(f"config file {arg} failed: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue  # __builtins__, imports, helper functions, _private helper values
                if key not in defaults:  # most likely a typo of a real key: worth stopping for
                    die(f"config file {arg} sets unknown key {key!r} (prefix helper names with _); valid keys: {valid}")
                config[key] = _check_type(key, value, defaults[key])
        else:
            # --key=value or --key value
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                key = body
                if i >= len(argv):
                    die(f"--{key} needs a value: --{key}=VALUE")
                text = argv[i]
                i += 1
            key = key.replace("-", "_")
            if key not in defaults:
                die(f"unknown key --{key}; valid keys: {valid}")
            value = _parse_value(text)
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = text  # --start=123 for a string setting means the text "123"
            config[key] = _check_type(key, value, defaults[key])
    return config


def print_config(config, file=None):
    """Print the effective settings, one per line, so a log shows exactly what ran."""
    width = max(len(k) for k in config)
    for k, v in config.items():
        print(f"  {k:<{width}} = {v!r}", file=file)


# -----------------------------------------------------------------------------
# device and dtype: the two settings every script that runs a model resolves the same way
# (torch is imported inside, so the prepare scripts start without it)


def resolve_device(name):
    """auto -> cuda, then mps, then cpu; otherwise check that the asked device exists."""
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        die(f"unknown --device={name}; choose auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        die(f"--device={name} but torch sees no CUDA GPU; use --device=cpu (or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        die(f"--device={name} but there are only {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    if kind == "mps" and not has_mps:
        die("--device=mps but MPS is not available here; use --device=cpu (or auto)")
    return name


def resolve_dtype(name, device_type):
    """auto: bf16 on GPUs that have it, else fp16 (trained with a GradScaler); fp32 on CPU and
    MPS (CPUs without bf16 units run it slower than fp32)."""
    import torch

    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        die(f"unknown --dtype={name}; choose auto, float32, bfloat16 or float16")
    return choices[name]


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass: matmuls in dtype, reductions kept in fp32.
    fp32 needs no autocast at all."""
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
