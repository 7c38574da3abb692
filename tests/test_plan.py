"""plan.py: the checks that stop a run before it starts."""

import pytest

import plan
import train


@pytest.mark.parametrize("fmt, stopped", [(None, False), ("sft", True)])
def test_no_gpu_estimate_counts_instruction_examples_as_whole_blocks(tmp_path, monkeypatch, capsys, fmt, stopped):
    # 64 per step x 2300 steps at 124M: 147k tokens would be 25 minutes (it runs); 64 examples of
    # up to 512 tokens are ~200 hours (stopped up front)
    from dataloader import write_meta
    monkeypatch.chdir(tmp_path)
    write_meta("data/d", dict({"tokenizer": "gpt2"}, **({"format": fmt, "template": "alpaca"} if fmt else {})))
    cfg = dict(train.DEFAULTS, dataset="d", device="auto", n_layer=12, n_embd=768, block_size=512,
               batch_size=16, total_batch_size=64, max_iters=2300)
    if stopped:
        with pytest.raises(SystemExit):
            plan.check_gpu_recipe(cfg, "cpu")
        assert "hours" in capsys.readouterr().err
    else:
        plan.check_gpu_recipe(cfg, "cpu")  # returns
    plan.check_gpu_recipe(dict(cfg, device="cpu"), "cpu")  # asked for the CPU: always runs
