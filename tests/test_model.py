"""model.py against an independent reference (Hugging Face's GPT-2) and its own invariants."""

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, apply_rope, estimate_mfu, flops_per_token, preset, rope_tables
from optim import configure_optimizers


def tiny(**kw):
    args = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args)).eval()


def test_from_pretrained_matches_transformers(tiny_hf_folder):
    folder, hf = tiny_hf_folder
    model = GPT.from_pretrained(folder).eval()
    torch.manual_seed(1)
    x = torch.randint(0, 96, (3, 32))
    with torch.no_grad():
        ref = hf(x, labels=x)
        logits, loss = model(x[:, :-1], x[:, 1:])
        full_logits, _ = model(x)
    assert torch.allclose(full_logits, ref.logits, atol=1e-5, rtol=0)
    # HF shifts the labels inside; ours takes the shifted targets: the same mean loss
    assert abs(loss.item() - ref.loss.item()) < 1e-5
    assert model.config.gelu == "tanh" and model.config.vocab_size == 96


def test_from_pretrained_offline_name_is_one_clear_error():
    import pytest
    with pytest.raises(OSError, match="neither a local"):
        GPT.from_pretrained("not-a-model")


def test_parameter_count_and_tying():
    model = GPT(GPTConfig(vocab_size=50257))
    assert model.num_params() == 124_439_808  # what Hugging Face reports for gpt2
    assert model.lm_head.weight is model.transformer.wte.weight
    # the presets build the same shapes
    assert preset("gpt2-medium").n_embd == 1024 and preset("gpt2-1.3b").n_layer == 24


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=512, block_size=32))
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / 4) < 0.0007  # 1/sqrt(2 * 8) = 1/4


def test_causality():
    for rope in (False, True):
        model = tiny(rope=rope)
        x = torch.randint(0, 64, (2, 16))
        y = x.clone()
        y[:, 9:] = torch.randint(0, 64, (2, 7))
        with torch.no_grad():
            a, _ = model(x)
            b, _ = model(y)
        assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
        assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_ignored_targets():
    model = tiny()
    x = torch.randint(0, 64, (2, 16))
    t = torch.randint(0, 64, (2, 16))
    t_masked = t.clone()
    t_masked[0, :5] = -1
    t_masked[1, 10:] = -1
    with torch.no_grad():
        logits, loss = model(x, t_masked)
    keep = t_masked != -1
    expected = F.cross_entropy(logits[keep], t[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_kv_cache_equals_recompute_past_block_size():
    for rope in (False, True):
        model = tiny(rope=rope)
        prompt = torch.randint(0, 64, (2, 5))
        # 30 new tokens with block_size 16: the context is cropped from step 12 on
        a = model.generate(prompt, 30, temperature=0, use_cache=True)
        b = model.generate(prompt, 30, temperature=0, use_cache=False)
        assert a.shape == (2, 35)
        assert torch.equal(a, b), f"rope={rope}"


def assert_chunked_prefill_matches_full_forward(model):
    """A multi-token chunk after cached tokens (it needs the shifted causal mask) gives the
    logits of one full forward pass. `model`: 2 layers, block_size 16, vocabulary 64."""
    x = torch.randint(0, 64, (1, 12))
    cache = [{"size": 16} for _ in range(2)]
    with torch.no_grad():
        full, _ = model(x)
        first, _ = model(x[:, :7], kv_cache=cache, pos=0)
        second, _ = model(x[:, 7:], kv_cache=cache, pos=7)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


def test_kv_cache_chunked_prefill_matches_full_forward():
    for rope in (False, True):
        assert_chunked_prefill_matches_full_forward(tiny(rope=rope))


def test_generate_left_padded_prompts_equal_one_row_at_a_time():
    # pad: rows of 3, 7 and 5 prompt tokens in one batch, left-padded with junk tokens, greedy;
    # each row's new tokens equal generate on that prompt alone, whatever the padding holds. 12
    # new tokens after 7 columns cross block_size (16): the recompute branch crops the padding
    # first. With and without the cache, with and without RoPE (positions per row), and GQA.
    # Then with a stop token that the first row samples early on, and one inside the second
    # row's prompt (which ends nothing): every row as alone up to its own stop, then only stops.
    for kw in (dict(), dict(rope=True), dict(rope=True, n_kv_head=1)):
        model = tiny(**kw)
        torch.manual_seed(1)
        prompts = [torch.randint(0, 64, (n,)) for n in (3, 7, 5)]
        pad = torch.tensor([4, 0, 2])
        idx = torch.randint(0, 64, (3, 7))  # the padding: any tokens, never seen
        for i, p in enumerate(prompts):
            idx[i, pad[i]:] = p
        alone = [model.generate(p[None], 12, temperature=0)[0, len(p):] for p in prompts]
        for use_cache in (True, False):
            out = model.generate(idx, 12, temperature=0, pad=pad, use_cache=use_cache)
            assert out.shape == (3, 19) and torch.equal(out[:, :7], idx)
            for i in range(3):
                assert torch.equal(out[i, 7:], alone[i]), (kw, use_cache, i)
        for stop in (alone[0][2].item(), prompts[1][4].item()):
            stopped = model.generate(idx, 12, temperature=0, pad=pad, stop_token=stop)[:, 7:]
            for i in range(3):
                new = alone[i].tolist()
                n = min(new.index(stop) + 1 if stop in new else len(new), stopped.size(1))
                assert torch.equal(stopped[i, :n], alone[i][:n]), (kw, i, stop)
                assert set(stopped[i, n:].tolist()) <= {stop}, (kw, i, stop)
    # no padding at all is the plain path; padding that leaves a row no token, a negative one, or
    # not one count per row: refused
    assert torch.equal(model.generate(idx, 5, temperature=0, pad=torch.zeros(3, dtype=torch.long)),
                       model.generate(idx, 5, temperature=0))
    for bad in ([7, 0, 2], [-1, 0, 2], [1, 2]):
        with pytest.raises(ValueError, match="pad must hold one count per row"):
            model.generate(idx, 3, temperature=0, pad=torch.tensor(bad))


def test_generate_restores_mode_and_streams():
    model = tiny()
    model.train()
    seen = []
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=1.0, top_k=5, top_p=0.9,
                         on_token=lambda t: seen.append(t.item()))
    assert model.training
    assert seen == out[0, 1:].tolist()


def test_rope_depends_on_relative_position_only():
    hs = 16
    cos, sin = rope_tables(hs, 64, 10000.0)
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, hs)
    k = torch.randn(1, 1, 1, hs)

    def score(pq, pk):
        qr = apply_rope(q, cos[pq:pq + 1], sin[pq:pq + 1])
        kr = apply_rope(k, cos[pk:pk + 1], sin[pk:pk + 1])
        return (qr * kr).sum().item()

    assert abs(score(10, 3) - score(40, 33)) < 1e-4
    assert abs(score(10, 3) - score(10, 4)) > 1e-4  # but it does depend on the distance


def test_configure_optimizers_groups():
    model = tiny()
    [opt] = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()


def test_flops_per_token_formula():
    model = GPT(GPTConfig(vocab_size=50257))
    n = 124_439_808 - 1024 * 768  # without the position table
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024
    # 1000 tokens a second on a 1 TFLOP/s device: (6 * 123,653,376 + 113,246,208) * 1000 / 1e12, by hand
    assert estimate_mfu(model, 1000, 1.0, 1e12) == pytest.approx(0.855166464)
    assert estimate_mfu(model, 1000, 2.0, 1e12, seq_len=512) == pytest.approx((741_920_256 + 56_623_104) * 500 / 1e12)
