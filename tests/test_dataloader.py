"""dataloader.py: the token-file format, tokenizers, and the batch loader's guarantees."""

import os

import numpy as np
import pytest
import torch

from conftest import needs_gpt2_bpe
from configurator import UserError
from dataloader import (DataLoader, MAGIC, get_tokenizer, list_shards, read_tokens, write_meta,
                        write_tokens)


def test_round_trip_and_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "x_train.bin")
    write_tokens(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == MAGIC and header[1] == 1 and header[2] == 5 and not header[3:].any()
    assert (tmp_path / "x_train.bin").stat().st_size == 1024 + 2 * 5
    assert read_tokens(path).tolist() == tokens.tolist()


def test_bad_files_are_named(tmp_path):
    path = str(tmp_path / "train.bin")
    write_tokens(path, np.arange(100))
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(raw[:-10])  # truncated
    with pytest.raises(UserError, match="train.bin.*truncated"):
        read_tokens(path)
    raw[0:4] = np.int32(123).tobytes()
    open(path, "wb").write(raw)
    with pytest.raises(UserError, match="train.bin.*magic"):
        read_tokens(path)
    with pytest.raises(UserError, match="0..2"):
        write_tokens(path, [-1])
    raw[0:4] = np.int32(MAGIC).tobytes()
    raw[4:8] = np.int32(3).tobytes()
    open(path, "wb").write(raw)
    with pytest.raises(UserError, match="unsupported version 3"):
        read_tokens(path)


def test_ids_past_uint16_take_version_2_and_small_ones_stay_version_1(tmp_path):
    # a vocabulary of more than 65,536 ids (Llama 3's 128K): uint32 tokens under version 2; a file
    # whose ids fit keeps the llm.c format (version 1, uint16) byte for byte
    big = np.array([0, 65535, 65536, 128255, 7])
    path = str(tmp_path / "big_train.bin")
    write_tokens(path, big)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[1] == 2 and header[2] == 5 and os.path.getsize(path) == 1024 + 4 * 5
    assert read_tokens(path).dtype == np.uint32 and read_tokens(path).tolist() == big.tolist()
    write_tokens(path, big[:2])
    assert np.fromfile(path, dtype=np.int32, count=2)[1] == 1 and read_tokens(path).dtype == np.uint16
    write_tokens(path, big)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-2])  # half a uint32 short
    with pytest.raises(UserError, match="truncated"):
        read_tokens(path)


def make_dataset(tmp_path, n_shards=3, n_tokens=2000):
    d = tmp_path / "ds"
    for i in range(n_shards):
        # token value = its position in the whole corpus (mod 60000): every row is traceable
        write_tokens(str(d / f"ds_train_{i:06d}.bin"), (np.arange(n_tokens) + i * n_tokens) % 60000)
    write_tokens(str(d / "ds_val_000000.bin"), np.arange(n_tokens) + 50000)
    write_meta(str(d), {"tokenizer": "gpt2"})
    return str(d)


def test_shards_are_listed_by_split(tmp_path):
    d = make_dataset(tmp_path)
    assert [f.rsplit("/", 1)[1] for f in list_shards(d, "train")] == [f"ds_train_{i:06d}.bin" for i in range(3)]
    assert len(list_shards(d, "val")) == 1


def test_targets_are_inputs_shifted(tmp_path):
    loader = DataLoader(make_dataset(tmp_path), "train", 4, 16)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive corpus positions


def test_train_and_eval_batches_have_one_layout(tmp_path):
    # torch.compile guards on strides: training's (x, y) and an evaluation's must be laid out
    # alike, or the training graph is recompiled (with a symbolic stride) after the first
    # evaluation. Both are dense (B, T), whatever copy brought them to the device
    d = make_dataset(tmp_path)
    x, y, _ = DataLoader(d, "train", batch_size=4, block_size=16, grad_accum=2).next_step()[0][0]
    ex, ey = DataLoader(d, "val", batch_size=4, block_size=16, shuffle=False).next_batch()
    for t in (x, y, ex, ey):
        assert t.shape == (4, 16) and t.is_contiguous() and t.stride() == (16, 1)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(ex[:, 1:], ey[:, :-1])  # still shifted by one


def test_ranks_are_disjoint_and_cover_the_single_process_batches(tmp_path):
    d = make_dataset(tmp_path)
    single = DataLoader(d, "train", 4, 16, grad_accum=2)
    ranks = [DataLoader(d, "train", 4, 16, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):  # several epochs' worth of shard changes
        a0, _ = single.next_batch()
        a1, _ = single.next_batch()
        b0, _ = ranks[0].next_batch()
        b1, _ = ranks[1].next_batch()
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
        assert not set(b0[:, 0].tolist()) & set(b1[:, 0].tolist())


def test_next_step_gives_the_micro_batches_with_their_weights(tmp_path):
    # next_step() is next_batch() grad_accum times, each micro-batch weighing 1/grad_accum of
    # the step (every token a target), and the step's tokens counted over every rank
    d = make_dataset(tmp_path)
    stepper = DataLoader(d, "train", 4, 16, rank=1, world_size=2, grad_accum=3)
    batcher = DataLoader(d, "train", 4, 16, rank=1, world_size=2, grad_accum=3)
    for _ in range(10):
        batches, n_tokens = stepper.next_step()
        assert n_tokens == 4 * 16 * 2 * 3 and len(batches) == 3
        for x, y, weight in batches:
            bx, by = batcher.next_batch()
            assert torch.equal(x, bx) and torch.equal(y, by) and weight == 1 / 3
    assert stepper.state_dict() == batcher.state_dict()


def test_epochs_reshuffle_and_state_restores_exactly(tmp_path):
    d = make_dataset(tmp_path)
    loader = DataLoader(d, "train", 4, 16, seed=7)
    n_per_epoch = 3 * ((2000 - 16) // 16 // 4)  # about: batches per epoch
    first_epoch = [loader.next_batch()[0] for _ in range(n_per_epoch)]
    assert loader.epoch >= 1 or loader.shard_pos == 2
    while loader.epoch < 1:
        loader.next_batch()
    second_epoch_first = loader.next_batch()[0]
    assert not any(torch.equal(second_epoch_first, b) for b in first_epoch)  # a new order each epoch
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(20)]
    fresh = DataLoader(d, "train", 4, 16, seed=7)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, fresh.next_batch()[0]) for a in expected)
    other_seed = DataLoader(d, "train", 4, 16, seed=8)
    assert not torch.equal(other_seed.next_batch()[0], DataLoader(d, "train", 4, 16, seed=7).next_batch()[0])


def test_val_loader_is_repeatable(tmp_path):
    loader = DataLoader(make_dataset(tmp_path), "val", 4, 16, shuffle=False)
    a = [loader.next_batch()[0] for _ in range(3)]
    loader.reset()
    b = [loader.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0][0, 0].item() == 50000  # from the start, in order


def test_too_small_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="fewer than one step"):
        DataLoader(make_dataset(tmp_path), "train", 64, 64)


def test_a_shard_barely_larger_than_a_step_gives_one_step_every_epoch(tmp_path):
    # 40 tokens, steps of 2 x 16 (+1): the random offset must stay below 8, or an epoch would
    # find no whole step in the file and be skipped without a word
    write_tokens(str(tmp_path / "train.bin"), np.arange(40))
    write_meta(tmp_path, {"tokenizer": "gpt2"})
    loader = DataLoader(str(tmp_path), "train", 2, 16)
    epochs = []
    for _ in range(20):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1]) and x.max() < 40
        epochs.append(loader.epoch)
    assert epochs == list(range(20))


def test_char_tokenizer_round_trip_and_unknown_chars():
    encode, decode = get_tokenizer({"tokenizer": "char", "chars": list("\n abc")})
    assert decode(encode("abc cab\n")) == "abc cab\n"
    with pytest.raises(UserError, match="'z'"):
        encode("abz")


@needs_gpt2_bpe
def test_gpt2_tokenizer_knows_endoftext():
    encode, decode = get_tokenizer({"tokenizer": "gpt2"})
    ids = encode("Hello<|endoftext|>")
    assert ids[-1] == 50256 and decode(ids) == "Hello<|endoftext|>"


def test_llmc_and_modded_nanogpt_folders_without_meta(tmp_path):
    """Their FineWeb scripts write fineweb_val_000000.bin, fineweb_train_000001.bin, ... with the
    header [20240520, 1, n_tokens] and no meta.json: such a folder is read as GPT-2 BPE."""
    from dataloader import read_meta
    d = tmp_path / "fineweb10B"
    d.mkdir()
    for name, start in (("fineweb_val_000000.bin", 0), ("fineweb_train_000001.bin", 1000),
                        ("fineweb_train_000002.bin", 2000)):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = [20240520, 1, 1000]  # the published layout, written here by hand
        with open(d / name, "wb") as f:
            f.write(header.tobytes())
            f.write((np.arange(1000) + start).astype(np.uint16).tobytes())
    assert read_meta(str(d)) == {"tokenizer": "gpt2"}
    loader = DataLoader(str(d), "train", 2, 100, shuffle=False)
    seen = set()
    for _ in range(9):  # 9 sequences of 100 per shard fit (999 targets), 4 full steps of 2 rows
        x, _ = loader.next_batch()
        seen.update(x[:, 0].tolist())
    assert min(seen) >= 1000 and any(s >= 2000 for s in seen)  # both train shards, never val
