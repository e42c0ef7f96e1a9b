"""utils/ema.py: the decay warm-up and the weight average against hand computations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.ema import WeightEMA, ema_decay_at


def test_decay_warms_up_then_caps():
    assert ema_decay_at(0.95, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay_at(0.95, 8) == pytest.approx(0.5)  # 9 / 18
    assert ema_decay_at(0.95, 170) == pytest.approx(171 / 180)  # 0.95 exactly: the cap is reached here
    assert ema_decay_at(0.95, 1000) == 0.95
    assert ema_decay_at(0.5, 20) == 0.5


def test_average_follows_the_recursion_by_hand():
    lin = nn.Linear(1, 1, bias=False)
    bn = nn.BatchNorm1d(1)  # a float buffer (running_mean) and an integer one (num_batches_tracked)
    model = nn.Sequential(lin, bn)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightEMA(model, decay=0.5)
    assert not any(p.requires_grad for p in ema.module.parameters())
    expected = 1.0
    for n, w in enumerate([3.0, -1.0, 5.0, 2.0]):
        with torch.no_grad():
            lin.weight.fill_(w)
            bn.running_mean.fill_(10.0 * w)
        bn.num_batches_tracked.fill_(n + 7)
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 2/11, 0.25, 0.3077 ... never reaches 0.5 here
        expected = d * expected + (1 - d) * w
        assert float(ema.module[0].weight) == pytest.approx(expected)
        assert int(ema.module[1].num_batches_tracked) == n + 7  # copied, not averaged
    assert ema.num_updates == 4
    # the average never moved the source, and a restored average continues the same way
    assert float(lin.weight.detach()) == 2.0
    again = WeightEMA(model, decay=0.5)
    again.load_state_dict(ema.state_dict())
    ema.update(model)
    again.update(model)
    assert torch.equal(ema.module[0].weight, again.module[0].weight)


def test_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(nn.Linear(1, 1), 1.0)
