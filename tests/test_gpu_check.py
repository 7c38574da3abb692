"""gpu_check.py at toy sizes on the CPU (--quick): every part runs and passes, so that the check a
GPU session runs in one call is known to work before the GPU is there."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, needs_gpt2_bpe


@pytest.mark.slow
@needs_gpt2_bpe
def test_the_quick_check_passes_every_part_on_the_cpu(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--quick", "--device=cpu", "--steps=3",
                        "--batch_sizes=2", "--parts=1,2,4", "--report=report.md"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = (tmp_path / "report.md").read_text()
    assert p.returncode == 0 and "FAIL" not in report, report + p.stdout[-2000:] + p.stderr[-2000:]
    for mode in ("DDP + compile", "FSDP + compile", "Muon (eager)"):  # save, resume, equal losses; graphs
        assert f"| 1 | {mode}: resumed at step 3 against uninterrupted" in report
    assert report.count("dynamo graphs") == 2 and "| 2 | PPO: one iteration" in report and "toy step, B=2" in report


def test_refusals_are_one_line(tmp_path):
    for args, message in ((["--device=cpu"], "add --quick"), (["--quick", "--device=cpu", "--nanogpt_model=nope.py"],
                                                              "no such file")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
