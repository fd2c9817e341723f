"""Packing, the resumable dp-sharded sampler, eval batches and build_data."""
import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import BatchSampler, DataError, EvalSet, TokenDataset, build_data


def stream(n):
    return np.arange(n, dtype=np.uint16)


def test_windows_shift_by_one_and_cover_every_target():
    ds = TokenDataset(stream(21), seq_len=4)
    assert len(ds) == 5  # (21 - 1) // 4
    x, y = ds.batch([0, 1, 4])
    assert x.dtype == torch.int64 and x.shape == y.shape == (3, 4)
    assert x[0].tolist() == [0, 1, 2, 3] and y[0].tolist() == [1, 2, 3, 4]
    assert x[1].tolist() == [4, 5, 6, 7] and y[2].tolist() == [17, 18, 19, 20]
    targets = torch.cat([ds.batch([i])[1][0] for i in range(len(ds))])
    assert targets.tolist() == list(range(1, 21))  # each token after the first is a target once


def test_documents_packed_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    cfg = DataConfig(dataset=str(tmp_path), cache_dir=str(tmp_path / "cache"), val_fraction=0.4)
    data = build_data(cfg, seq_len=2, seed=0, micro_batch_size=1)
    # stream a b c 0 d e 0 (7 tokens): train = first 4, validation = last 3
    assert data.token_file.tokens.tolist() == [97, 98, 99, 0, 100, 101, 0]
    x, y = TokenDataset(data.token_file.tokens, seq_len=2).batch([0, 1, 2])
    assert x.tolist() == [[97, 98], [99, 0], [100, 101]]
    assert y.tolist() == [[98, 99], [0, 100], [101, 0]]  # eos is predicted, then the next document
    assert data.train.next_batch()[0].tolist() == [[97, 98]]
    assert data.eval_batches(1)[0][1].tolist() == [[101, 0]]


def sampler(rank=0, world=1, micro=4, seed=3, n=401):
    return BatchSampler(TokenDataset(stream(n), seq_len=4), micro, seed, rank, world)


def take(s, steps):
    return [s.next_batch() for _ in range(steps)]


def test_sampler_is_deterministic_and_covers_epoch():
    a, b = take(sampler(), 30), take(sampler(), 30)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    s = sampler()
    assert s.steps_per_epoch == 25  # 100 windows / 4
    firsts = sorted(int(x[i, 0]) // 4 for x, _ in take(s, 25) for i in range(4))
    assert firsts == list(range(100))  # one epoch = every window once
    assert not torch.equal(take(s, 1)[0][0], take(sampler(), 1)[0][0])  # epoch 1 reshuffles
    assert not torch.equal(take(sampler(seed=4), 1)[0][0], take(sampler(), 1)[0][0])


def test_resume_gives_identical_batches():
    full = take(sampler(), 40)  # crosses an epoch boundary (25 steps)
    s = sampler()
    take(s, 17)
    state = s.state_dict()
    resumed = sampler()
    resumed.load_state_dict(state)
    rest = take(resumed, 23)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(full[17:], rest))


def test_resume_refuses_changed_data_or_seed():
    state = sampler().state_dict()
    with pytest.raises(DataError, match="dataset, tokenizer, seq_len or val_fraction changed"):
        sampler(n=801).load_state_dict(state)
    with pytest.raises(DataError, match="train.seed=3"):
        sampler(seed=9).load_state_dict(state)


def test_dp_ranks_split_the_same_global_batch():
    one = take(sampler(micro=4), 30)
    ranks = [take(sampler(rank=r, world=2, micro=2), 30) for r in range(2)]
    for step in range(30):
        x = torch.cat([ranks[0][step][0], ranks[1][step][0]])
        y = torch.cat([ranks[0][step][1], ranks[1][step][1]])
        assert torch.equal(x, one[step][0]) and torch.equal(y, one[step][1])
    # dp=2 state resumes a dp=1 run (same global batch): position counts windows.
    s2 = sampler(rank=1, world=2, micro=2)
    take(s2, 11)
    s1 = sampler(micro=4)
    s1.load_state_dict(s2.state_dict())
    assert torch.equal(take(s1, 1)[0][0], one[11][0])


def test_sampler_too_little_data():
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        sampler(micro=4, world=2, n=20)


def test_eval_batches_fixed_and_sharded():
    ds = TokenDataset(stream(41), seq_len=4)  # 10 windows
    one = EvalSet(ds).eval_batches(3, 4)
    assert [int(x[0, 0]) for x, _ in one] == [0, 16, 32]  # windows 0, 4, 8 in order
    assert one[2][0][:, 0].tolist() == [32, 36, 0, 4]  # wraps around past the end
    again = EvalSet(ds).eval_batches(3, 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    halves = [EvalSet(ds, r, 2).eval_batches(3, 2) for r in range(2)]
    for j in range(3):
        assert torch.equal(torch.cat([halves[0][j][0], halves[1][j][0]]), one[j][0])


def test_build_data_builtin(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    data = build_data(cfg, seq_len=64, seed=1, rank=1, world=2, micro_batch_size=4)
    assert data.vocab_size == 256 and data.tokenizer.eos_id == 0
    x, y = data.train.next_batch()
    assert x.shape == y.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert len(data.eval_batches(2)) == 2 and data.eval_batches(1)[0][0].shape == (4, 64)
    assert 2.0 < data.unigram_entropy() < 5.0
    assert build_data(cfg, seq_len=64, seed=1).token_file.reused


def test_build_data_tiny_validation_split(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 200)
    cfg = DataConfig(dataset=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"), val_fraction=0.01)
    with pytest.raises(DataError, match="validation split has no window"):
        build_data(cfg, seq_len=8, seed=0, micro_batch_size=1)
