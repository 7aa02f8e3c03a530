from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from torch import nn

from tasks import params
from tasks.params import TrainParams
from tasks.training.optim import WeightEMA, build_optimizer, lr_at, peak_lr


def _train_params(**changes: Any) -> TrainParams:
    return dataclasses.replace(params.load().train, **changes)


def test_peak_lr_is_per_512_images() -> None:
    p = _train_params(lr=0.4)
    assert peak_lr(p, 512) == pytest.approx(0.4)
    assert peak_lr(p, 64) == pytest.approx(0.05)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedule_warms_up_linearly_peaks_and_anneals_to_zero(schedule: str) -> None:
    lrs = [lr_at(step, 100, 10, 1.0, schedule) for step in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lr_at(100, 100, 10, 1.0, schedule) == pytest.approx(0.0)
    # onecycle falls linearly; cosine stays higher early and lower late than the line
    halfway = lr_at(55, 100, 10, 1.0, schedule)
    assert halfway == pytest.approx(0.5)
    if schedule == "cosine":
        assert lr_at(30, 100, 10, 1.0, schedule) > 1 - 20 / 90


def test_no_weight_decay_on_norm_and_bias_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    optimizer = build_optimizer(model, _train_params(weight_decay=0.1, optimizer="sgd"), lr=0.1)
    decayed = {id(t) for g in optimizer.param_groups if g["weight_decay"] > 0 for t in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert optimizer.param_groups[0]["nesterov"]


def test_adamw_is_available_and_frozen_parameters_are_left_out() -> None:
    model = nn.Linear(3, 2)
    model.weight.requires_grad_(False)
    optimizer = build_optimizer(model, _train_params(optimizer="adamw"), lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [t for g in optimizer.param_groups for t in g["params"]] == [model.bias]


def test_ema_tracks_weights_with_a_ramped_decay_and_round_trips() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # ramped decay min(0.9, 2/11): mostly the new weight
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    restored = WeightEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
