"""
Plot one or more training runs from their log.txt.

    python plot.py out-shakespeare-char-cpu                   # -> out-shakespeare-char-cpu/plot.png
    python plot.py out-rope out-norope --smooth=20            # overlay two runs -> plot.png
    python plot.py out-gpt2-124m --baseline_val_loss=3.29 --output=gpt2.png

train.py writes one event a line to out_dir/log.txt, "STEP STREAM VALUE":

    12 train 4.1234
    250 val 3.9000
    250 hella 0.2810

Each known stream gets a place in one panel: loss (train and val, log scale), HellaSwag
accuracy against GPT-2 and GPT-3 at the same size, learning rate, gradient norm, ms per step
and tokens per second. A panel whose streams appear in none of the runs is left out, so a run
without HellaSwag simply has one panel fewer. Streams this script does not know (an "epoch"
counter, say) are skipped, and mfu is not drawn: for one model it is tokens/s times a constant.

The file may still be growing: a last line without its newline is a line train.py is writing
right now, so if it does not parse it is dropped quietly. Any other line that does not parse
is named (file and line number) and skipped. matplotlib is only needed here, so it is an
optional dependency, imported when the picture is drawn.
"""

import os
import sys

from configurator import configure, die, exit_on_ctrl_c

if __name__ == "__main__":
    exit_on_ctrl_c()  # a Ctrl-C while numpy and matplotlib load ends in one line, not a traceback

import numpy as np


# -----------------------------------------------------------------------------
# settings (python plot.py OUT_DIR [OUT_DIR ...] --key=value)
DEFAULTS = dict(
    smooth=1,  # moving average over this many points for the noisy per-step streams; 1 = raw
    baseline_val_loss=0.0,  # draw a dashed line at this val loss (e.g. a reference run's); 0 = none
    output="",  # where to write the picture; "" = OUT_DIR/plot.png for one run, ./plot.png for several
)

# HellaSwag accuracy of the 124M models, the line a small run is racing toward: GPT-2 124M as
# measured by the HellaSwag eval of build-nanogpt / llm.c, GPT-3 Small (125M) from the GPT-3
# paper (Brown et al. 2020, table of zero-shot results).
HELLA_REFERENCES = [("GPT-2 124M", 0.2955), ("GPT-3 124M", 0.3357)]

# The panels, in order: (name, title, streams drawn in it, y on a log scale).
PANELS = [
    ("loss", "loss", ["train", "val"], True),
    ("hella", "HellaSwag accuracy", ["hella"], False),
    ("lr", "learning rate", ["lr"], False),
    ("norm", "gradient norm", ["norm"], False),
    ("dt_ms", "ms / step", ["dt_ms"], False),
    ("tok_per_s", "tokens / s", ["tok_per_s"], False),
]
KNOWN_STREAMS = {s for _, _, streams, _ in PANELS for s in streams}
# Streams logged every step are noisy and get --smooth; val and hella are few points already,
# and lr is a smooth schedule.
SMOOTHED = {"train", "norm", "dt_ms", "tok_per_s"}

PANEL_W, PANEL_H, DPI = 5.0, 3.5, 100  # each panel is 5 x 3.5 inches at 100 dpi (500 x 350 pixels)
MAX_WARNINGS = 5  # per file: a wrong file would otherwise print one warning per line


# -----------------------------------------------------------------------------
# reading a log

def read_log(path):
    """Read a log.txt into {stream: (steps, values)}, steps increasing, both numpy arrays.

    Returns (streams, warnings): warnings are "path:LINE: what is wrong" strings for the
    lines that were skipped. Unknown streams are kept (the caller ignores what it does not
    draw). If a stream's step goes backwards, the run was resumed from an earlier checkpoint
    (or restarted) and appended to the same file: the newer lines win, so everything the
    stream logged at or after that step before is dropped.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    # text ending in "\n" splits into [..., ""]: every line complete. Otherwise the last piece
    # is a line still being written.
    partial = lines.pop()
    points = {}  # stream -> list of (step, value), in file order after rewinds
    warnings = []
    numbered = [(i + 1, line, False) for i, line in enumerate(lines)]
    if partial.strip():
        numbered.append((len(lines) + 1, partial, True))
    for lineno, line, is_partial in numbered:
        if not line.strip():
            continue  # a blank line carries nothing and hurts nothing
        parts = line.split()
        try:
            if len(parts) != 3:
                raise ValueError
            step, stream, value = int(parts[0]), parts[1], float(parts[2])
        except ValueError:
            if not is_partial:
                warnings.append(f"{path}:{lineno}: expected 'STEP STREAM VALUE', got {line.strip()[:60]!r}")
            continue
        series = points.setdefault(stream, [])
        while series and series[-1][0] >= step:
            series.pop()  # a resumed run rewinds: drop what the abandoned timeline logged from here on
        series.append((step, value))
    streams = {}
    for stream, series in points.items():
        steps, values = zip(*series)
        values = np.array(values, dtype=np.float64)
        values[np.isinf(values)] = np.nan  # a diverged step: a gap in the line, not a broken log axis
        streams[stream] = (np.array(steps, dtype=np.int64), values)
    if len(warnings) > MAX_WARNINGS:
        warnings = warnings[:MAX_WARNINGS] + [f"{path}: ... and {len(warnings) - MAX_WARNINGS} more malformed lines"]
    return streams, warnings


def moving_average(values, n):
    """Trailing mean over the last n points (fewer at the start), skipping NaNs: (N,) -> (N,)."""
    if n <= 1:
        return values
    ok = np.isfinite(values)
    # window sums from cumulative sums: sum(v[i-n+1 : i+1]) = c[i+1] - c[i+1-n], with c[0] = 0
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    k = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(hi - n, 0)
    count = k[hi] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (c[hi] - c[lo]) / count, np.nan)


# -----------------------------------------------------------------------------
# drawing

def grid_shape(n):
    """Columns and rows for n panels: one row up to three, 2 x 2 for four, then rows of three."""
    ncols = {1: 1, 2: 2, 3: 3, 4: 2}.get(n, 3)
    return ncols, -(-n // ncols)


def make_figure(runs, smooth=1, baseline_val_loss=0.0):
    """Draw runs = [(label, streams), ...] into a new matplotlib Figure.

    Returns (fig, panel_names), the names from PANELS of the panels drawn, in order.
    Colour means run (C0, C1, ... in every panel); in the loss panel, val is dashed with dots.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.ticker import LogFormatter
    except ImportError:
        die("plot.py needs matplotlib: pip install matplotlib")

    present = set().union(*(streams for _, streams in runs)) if runs else set()
    panels = [p for p in PANELS if any(s in present for s in p[2])]
    if not panels:
        die("nothing to plot: the logs hold none of the streams " + ", ".join(sorted(KNOWN_STREAMS)))
    ncols, nrows = grid_shape(len(panels))
    # a bare Figure on the Agg canvas: no display needed, and no pyplot global state, so calling
    # this from a notebook or a test leaves their matplotlib setup alone
    fig = Figure(figsize=(ncols * PANEL_W, nrows * PANEL_H), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)  # the empty cells of the last row

    several = len(runs) > 1
    for ax, (name, title, stream_names, log_y) in zip(axes, panels):
        for i, (label, streams) in enumerate(runs):
            color = f"C{i}"
            for stream in stream_names:
                if stream not in streams:
                    continue
                steps, values = streams[stream]
                # the line's label: the run (if several, in the first panel only: colours say the
                # rest) and the stream (if the panel has several)
                parts = [label] if several and ax is axes[0] else []
                parts += [stream] if len(stream_names) > 1 else []
                line_label = " ".join(parts) or None
                if stream == "val" or stream == "hella":
                    # evaluated every few hundred steps: dots, so a single point still shows
                    ax.plot(steps, values, "o--" if stream == "val" else "o-", color=color,
                            markersize=3, label=line_label)
                elif stream in SMOOTHED and smooth > 1:
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)  # raw, faint
                    ax.plot(steps, moving_average(values, smooth), color=color, linewidth=1.2, label=line_label)
                else:
                    ax.plot(steps, values, color=color, linewidth=1.2, label=line_label)

        if name == "loss" and baseline_val_loss > 0:
            ax.axhline(baseline_val_loss, color="gray", linestyle="--", linewidth=1,
                       label=f"baseline val {baseline_val_loss:g}")
        if name == "hella":
            for (ref_label, acc), color in zip(HELLA_REFERENCES, ["black", "gray"]):  # dashed, told apart by shade
                ax.axhline(acc, color=color, linestyle="--", linewidth=1, label=f"{ref_label} ({acc:.4f})")
        if name == "dt_ms":
            # the first step (and the first after a resume) includes torch.compile and warm-up:
            # seconds that would flatten every other step, so the axis stops above the bulk
            values = np.concatenate([s[name][1] for _, s in runs if name in s])
            values = values[np.isfinite(values)]
            if len(values):
                top = 1.2 * np.percentile(values, 98)
                if values.max() > top:
                    ax.set_ylim(0, top)
        if log_y:
            ax.set_yscale("log")
            # plain numbers (3, 4, 5) rather than 3x10^0: a loss curve rarely spans a decade,
            # so the minor ticks are the ones worth reading
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
    return fig, [p[0] for p in panels]


# -----------------------------------------------------------------------------

def run_labels(out_dirs):
    """The legend name of each run: its folder's name, or the path as given when names clash."""
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    if len(set(names)) < len(names):
        return [os.path.normpath(d) for d in out_dirs]
    return names


def split_argv(argv):
    """Split the command line into the out_dirs and the --key=value / --key value settings."""
    out_dirs, flags = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            flags.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                flags.append(argv[i + 1])  # the --key value form: the next word is the value
                i += 1
        else:
            out_dirs.append(arg)
        i += 1
    return out_dirs, flags


def plot_runs(out_dirs, smooth=1, baseline_val_loss=0.0, output=""):
    """Read each out_dir/log.txt, draw them together and save the picture. Returns (path, panel_names)."""
    if not out_dirs:
        die("give at least one run folder: python plot.py OUT_DIR [OUT_DIR ...] [--smooth=N]")
    if smooth < 1:
        die(f"--smooth must be at least 1 (1 = no smoothing), got {smooth}")
    runs = []
    for out_dir, label in zip(out_dirs, run_labels(out_dirs)):
        log_path = os.path.join(out_dir, "log.txt")
        if not os.path.isfile(log_path):
            die(f"no log file {log_path}: give the out_dir of a train.py run (it writes log.txt there)")
        streams, warnings = read_log(log_path)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        runs.append((label, streams))

    fig, panels = make_figure(runs, smooth=smooth, baseline_val_loss=baseline_val_loss)
    path = output or (os.path.join(out_dirs[0], "plot.png") if len(out_dirs) == 1 else "plot.png")
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path)  # the format follows the extension: .png, .pdf, .svg ...
    except ValueError as e:  # an extension matplotlib cannot write
        die(f"cannot write {path}: {e}")
    except OSError as e:  # a missing or read-only folder, a file where a folder should be, a full disk
        die(f"cannot write {path}: {e.strerror or e}; check --output")
    return path, panels


def main():
    out_dirs, flags = split_argv(sys.argv[1:])
    if "-h" in out_dirs:
        flags.append("-h")
    cfg = configure(DEFAULTS, flags, usage="python plot.py OUT_DIR [OUT_DIR ...] [--key=value ...]")
    path, panels = plot_runs(out_dirs, **cfg)
    print(f"wrote {path} ({', '.join(panels)})")


if __name__ == "__main__":
    main()
