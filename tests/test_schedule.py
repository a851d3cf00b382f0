import math

import pytest

from pretrain.config.schema import OptimConfig, ScheduleConfig
from pretrain.run.schedule import lr_at

OPT = OptimConfig(lr=1.0)


def lrs(kind, steps=100, **kw):
    sched = ScheduleConfig(kind=kind, warmup_steps=10, min_lr=0.1, **kw)
    return [lr_at(s, OPT, sched, steps) for s in range(steps)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_to_peak(kind):
    got = lrs(kind)
    assert got[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert got[10] == pytest.approx(1.0)


def test_cosine_and_linear_decay_to_the_floor():
    cos, lin = lrs("cosine"), lrs("linear")
    assert cos[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lin[55] == pytest.approx(1.0 - 0.9 * 0.5)
    for got in (cos, lin):
        assert all(a >= b for a, b in zip(got[10:], got[11:]))  # monotone after warmup
        assert got[-1] > 0.1 and lr_at(100, OPT, ScheduleConfig(kind="cosine", warmup_steps=10, min_lr=0.1),
                                       100) == pytest.approx(0.1)


def test_constant_stays_at_peak():
    assert set(lrs("constant")[10:]) == {1.0}


def test_wsd_is_stable_then_decays_over_the_last_fraction():
    got = lrs("wsd", wsd_decay_fraction=0.2)  # decay over the last 18 of 90 post-warmup steps
    assert set(got[10:83]) == {1.0}
    assert got[83] < 1.0 and got[-1] == pytest.approx(1.0 - 0.9 * (89 / 90 - 0.8) / 0.2)


def test_explicit_decay_steps_then_floor():
    sched = ScheduleConfig(kind="linear", warmup_steps=0, decay_steps=10, min_lr=0.2)
    assert lr_at(5, OPT, sched, 100) == pytest.approx(0.6)
    assert lr_at(50, OPT, sched, 100) == pytest.approx(0.2)
