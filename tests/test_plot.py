"""plot.py: reading log.txt (malformed, partial and rewound lines) and the picture it draws."""

import math
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image

import plot
from conftest import ROOT, run_script

ALL_STREAMS = ["train", "val", "hella", "lr", "norm", "dt_ms", "tok_per_s"]


def write_log(folder, steps=40, streams=ALL_STREAMS, scale=1.0, tail=""):
    """A synthetic log.txt like train.py's; returns {stream: (steps, values)} as written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    lines = []
    for s in range(steps):
        row = {"train": scale * (4.0 * math.exp(-s / 10) + 1.5), "lr": 6e-4 * min(1.0, (s + 1) / 5),
               "norm": 1.0 + 0.1 * (s % 3), "dt_ms": 120.0 + s % 2, "tok_per_s": 4000.0 + s,
               "mfu": 0.31, "epoch": 0}  # mfu and epoch: known-but-not-drawn and unknown
        if s % 10 == 0:
            row["val"] = scale * (4.0 * math.exp(-s / 10) + 1.6)
            row["hella"] = 0.25 + s / 1000
        for name, value in row.items():
            if name in streams or name in ("mfu", "epoch"):
                lines.append(f"{s} {name} {value:.6g}")
                steps_, values = written.setdefault(name, ([], []))
                steps_.append(s)
                values.append(float(f"{value:.6g}"))
    (folder / "log.txt").write_text("\n".join(lines) + "\n" + tail)
    return written


def test_png_size_and_not_blank(tmp_path):
    write_log(tmp_path / "run")
    path, panels = plot.plot_runs([str(tmp_path / "run")])
    assert path == str(tmp_path / "run" / "plot.png")
    assert panels == ["loss", "hella", "lr", "norm", "dt_ms", "tok_per_s"]
    img = matplotlib.image.imread(path)  # (H, W, 4) floats in [0, 1]
    # six panels: 3 columns x 2 rows of PANEL_W x PANEL_H inches at DPI
    assert img.shape[:2] == (round(2 * plot.PANEL_H * plot.DPI), round(3 * plot.PANEL_W * plot.DPI))
    assert img[..., :3].std() > 0.05  # lines and text, not a white page
    assert (img[..., :3] < 0.5).mean() > 0.005  # some dark ink


def test_figure_holds_the_logged_values(tmp_path):
    written = write_log(tmp_path / "run")
    streams, warnings = plot.read_log(str(tmp_path / "run" / "log.txt"))
    assert warnings == []
    assert set(streams) == set(written)  # unknown streams are read, just not drawn
    fig, panels = plot.make_figure([("run", streams)])
    loss_ax, hella_ax = fig.axes[0], fig.axes[1]
    train_line, val_line = loss_ax.lines[0], loss_ax.lines[1]
    np.testing.assert_array_equal(train_line.get_xdata(), written["train"][0])
    np.testing.assert_allclose(train_line.get_ydata(), written["train"][1])
    np.testing.assert_allclose(val_line.get_ydata(), written["val"][1])
    assert loss_ax.get_yscale() == "log"
    # the two 124M references are horizontal lines in the HellaSwag panel
    refs = sorted(line.get_ydata()[0] for line in hella_ax.lines[1:])
    assert refs == [0.2955, 0.3357]


def test_missing_streams_leave_panels_out(tmp_path):
    write_log(tmp_path / "run", streams=["train", "val", "lr"])  # no hella, norm, timing
    path, panels = plot.plot_runs([str(tmp_path / "run")], output=str(tmp_path / "out" / "p.png"))
    assert panels == ["loss", "lr"]
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (round(plot.PANEL_H * plot.DPI), round(2 * plot.PANEL_W * plot.DPI))


def test_malformed_and_partial_lines(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.txt").write_text(
        "0 train 4.0\n"
        "1 train 3.5\n"
        "this is not a log line\n"      # line 3: too few fields... and not numbers
        "\n"                            # a blank line is fine
        "2 train not_a_number\n"        # line 5
        "3 train 3.0\n"
        "4 tra")                        # still being written: dropped without a warning
    streams, warnings = plot.read_log(str(folder / "log.txt"))
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{folder / 'log.txt'}:3:")
    assert warnings[1].startswith(f"{folder / 'log.txt'}:5:")
    assert streams["train"][0].tolist() == [0, 1, 3]
    assert streams["train"][1].tolist() == [4.0, 3.5, 3.0]
    # a wrong file does not flood the terminal: the first few lines, then a count
    (tmp_path / "junk.txt").write_text("junk\n" * 20)
    warnings = plot.read_log(str(tmp_path / "junk.txt"))[1]
    assert len(warnings) == plot.MAX_WARNINGS + 1 and "15 more" in warnings[-1]
    # through the command line: a warning line naming file and line, and still a picture
    p = run_script(["plot.py", str(folder)])
    assert "log.txt:3:" in p.stderr and "log.txt:5:" in p.stderr
    assert (folder / "plot.png").is_file() and "wrote" in p.stdout


def test_resumed_run_rewinds(tmp_path):
    # run to step 5, resume from a checkpoint at step 3 and append: the newer timeline wins
    folder = tmp_path / "run"
    folder.mkdir()
    old = [f"{s} train {10 + s}" for s in range(6)]
    new = [f"{s} train {20 + s}" for s in range(3, 5)]
    (folder / "log.txt").write_text("\n".join(old + new) + "\n")
    streams, _ = plot.read_log(str(folder / "log.txt"))
    assert streams["train"][0].tolist() == [0, 1, 2, 3, 4]
    assert streams["train"][1].tolist() == [10, 11, 12, 23, 24]


def test_moving_average_matches_direct_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50)
    values[7] = np.nan  # a diverged step is skipped, not spread over the window
    n = 5
    expected = [np.nanmean(values[max(0, i - n + 1):i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(plot.moving_average(values, n), expected)
    assert plot.moving_average(values, 1) is values


def test_two_runs_overlay(tmp_path):
    write_log(tmp_path / "rope", scale=1.0)
    write_log(tmp_path / "no_rope", scale=1.2)
    # from the command line, with --key value and --key=value; several runs go to ./plot.png
    p = run_script([os.path.join(ROOT, "plot.py"), str(tmp_path / "rope"), str(tmp_path / "no_rope"),
                    "--smooth", "4", "--baseline_val_loss=2.5"], cwd=str(tmp_path))
    assert (tmp_path / "plot.png").is_file() and "plot.png" in p.stdout
    assert "warning" not in p.stderr  # both logs are clean
    # the same in-process: both runs in each panel, named in the first panel's legend
    runs = [(name, plot.read_log(str(tmp_path / name / "log.txt"))[0]) for name in ["rope", "no_rope"]]
    fig, panels = plot.make_figure(runs, smooth=4, baseline_val_loss=2.5)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"rope train", "rope val", "no_rope train", "no_rope val", "baseline val 2.5"} <= set(labels)
    colors = {line.get_color() for line in fig.axes[panels.index("lr")].lines}
    assert len(colors) == 2  # one colour per run


def test_bad_input_is_one_line(tmp_path):
    p = run_script(["plot.py", str(tmp_path / "nowhere")], check=False)
    assert p.returncode == 2 and "log.txt" in p.stderr and "Traceback" not in p.stderr
    p = run_script(["plot.py"], check=False)
    assert p.returncode == 2 and "OUT_DIR" in p.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.txt").write_text("")
    p = run_script(["plot.py", str(tmp_path / "empty")], check=False)
    assert p.returncode == 2 and "nothing to plot" in p.stderr
    p = run_script(["plot.py", str(tmp_path / "empty"), "--smooth=0.5"], check=False)
    assert p.returncode == 2 and "--smooth" in p.stderr
