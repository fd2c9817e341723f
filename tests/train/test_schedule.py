import math

import pytest

from moe_dist.train.schedule import lr_at


def test_warmup_is_linear_from_the_first_step():
    assert lr_at(0, 1.0, 0.1, warmup_steps=4, total_steps=100) == pytest.approx(0.25)
    assert lr_at(1, 1.0, 0.1, 4, 100) == pytest.approx(0.5)
    assert lr_at(3, 1.0, 0.1, 4, 100) == pytest.approx(1.0)


def test_cosine_from_peak_to_min():
    lr, mn, w, T = 1.0, 0.1, 10, 110
    assert lr_at(w, lr, mn, w, T) == pytest.approx(1.0)
    assert lr_at(60, lr, mn, w, T) == pytest.approx(0.55)  # halfway: (lr + min) / 2
    assert lr_at(35, lr, mn, w, T) == pytest.approx(mn + 0.5 * (1 + math.cos(math.pi * 0.25)) * (lr - mn))
    assert lr_at(T, lr, mn, w, T) == pytest.approx(mn)
    assert lr_at(T + 50, lr, mn, w, T) == pytest.approx(mn)


def test_no_warmup_and_monotone_decay():
    values = [lr_at(s, 3e-3, 3e-4, 0, 50) for s in range(51)]
    assert values[0] == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(3e-4)


def test_pure_function():
    assert [lr_at(s, 1.0, 0.0, 3, 10) for s in range(12)] == [lr_at(s, 1.0, 0.0, 3, 10) for s in range(12)]
