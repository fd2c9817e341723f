import torch

from moe_dist.model.moe.capacity import capacity, capacity_keep, slot_positions


def test_capacity_formula():
    assert capacity(1.0, 8, 2, 4) == 4  # ceil(1.0 * 8 * 2 / 4)
    assert capacity(1.25, 10, 1, 4) == 4  # ceil(3.125)
    assert capacity(1.25, 8, 2, 4) == 5  # exactly 5.0: no extra slot from float noise
    assert capacity(0.5, 4, 1, 8, min_capacity=3) == 3  # min_capacity wins over ceil(0.25) = 1
    assert capacity(None, 8, 2, 4) is None
    assert capacity(0.0, 8, 2, 4) is None
    assert capacity(-1.0, 8, 2, 4) is None


def test_probs_policy_keeps_highest_scores():
    # expert 0 gets assignments 0, 1, 3, 5 with scores .1 .9 .3 .8 -> C=2 keeps .9 and .8
    expert = torch.tensor([0, 0, 1, 0, 1, 0])
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8])
    group = torch.zeros(6, dtype=torch.long)
    keep = capacity_keep(group, expert, score, 1, 2, cap=2)
    assert keep.tolist() == [False, True, True, False, True, True]


def test_position_policy_keeps_earliest():
    expert = torch.tensor([0, 0, 1, 0, 1, 0])
    group = torch.zeros(6, dtype=torch.long)
    keep = capacity_keep(group, expert, None, 1, 2, cap=2)
    assert keep.tolist() == [True, True, True, False, True, False]


def test_capacity_is_per_group():
    # two groups of three assignments, all to expert 1; each (group, expert) pair has its own C=1 slot
    expert = torch.tensor([1, 1, 1, 1, 1, 1])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    score = torch.tensor([0.2, 0.7, 0.1, 0.9, 0.3, 0.4])
    assert capacity_keep(group, expert, score, 2, 2, cap=1).tolist() == [False, True, False, True, False, False]
    assert capacity_keep(group, expert, None, 2, 2, cap=1).tolist() == [True, False, False, True, False, False]


def test_slot_positions_ties_resolve_by_order():
    bucket = torch.tensor([2, 0, 2, 2, 0])
    score = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.1])
    assert slot_positions(bucket, score, 3).tolist() == [1, 0, 2, 0, 1]
    assert slot_positions(bucket, None, 3).tolist() == [0, 0, 1, 2, 1]
