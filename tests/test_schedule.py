import math

import pytest

from rwkvray.train.schedule import learning_rate


@pytest.mark.parametrize("schedule", ["cos_decay", "wsd"])
def test_schedule_warms_up_and_ends_at_lr_final(schedule):
    total, warmup = 100, 10
    lrs = [learning_rate(s, total, 1e-2, 1e-4, warmup, schedule) for s in range(total)]
    assert lrs[0] == pytest.approx(1e-4 + (1e-2 - 1e-4) / 10)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[warmup - 1] == pytest.approx(1e-2)
    assert lrs[warmup] == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_cos_decay_midpoint_and_wsd_plateau():
    assert learning_rate(50, 101, 1.0, 0.0 + 1e-9, 0, "cos_decay") == pytest.approx(0.5, abs=1e-6)
    assert learning_rate(70, 101, 1e-2, 1e-4, 0, "wsd") == 1e-2
    assert learning_rate(90, 101, 1e-2, 1e-4, 0, "wsd") == pytest.approx(1e-2 * (1e-2) ** 0.5)
    assert math.isclose(learning_rate(0, 1, 3e-3, 1e-4, 0, "cos_decay"), 3e-3)
