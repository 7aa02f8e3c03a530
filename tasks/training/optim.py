"""Optimizer, learning-rate schedule and weight EMA for the train stage.

The schedule is a pure function of the step, so a resumed run needs only the step count to
continue on exactly the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tasks.errors import DataError
from tasks.params import TrainParams

# train.lr is "per 512 images" (params.yaml): the peak learning rate scales linearly with the batch.
LR_REFERENCE_BATCH = 512
MIN_BATCH = 16  # images; below this BatchNorm's batch statistics are too noisy to train on


def peak_lr(p: TrainParams, batch_size: int) -> float:
    return p.lr * batch_size / LR_REFERENCE_BATCH


@dataclass(frozen=True)
class Schedule:
    """How train.batch_size and the schedule adapt to the dataset's size."""

    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float

    @classmethod
    def for_dataset(cls, p: TrainParams, n_train: int, world_size: int = 1) -> Schedule:
        """``batch_size`` is the global batch (all ranks together); the cap and the lr scale apply to it."""
        # Cap the batch so an epoch has at least min_steps_per_epoch steps: 1,500 images at batch 512
        # would be 2 steps an epoch, far too few updates for 10 epochs. The floor keeps BatchNorm's
        # batch statistics usable; the very smallest datasets then get fewer steps instead.
        if n_train < max(2, world_size):
            raise DataError(
                f"the train split has {n_train} images; training needs at least 2 and one per process ({world_size})"
            )
        floor = min(MIN_BATCH, p.batch_size, n_train)
        batch = max(floor, min(p.batch_size, n_train // p.min_steps_per_epoch))
        batch = max(world_size, batch - batch % world_size)  # equal shares for the ranks
        steps = n_train // batch
        return cls(
            batch_size=batch,
            steps_per_epoch=steps,
            total_steps=steps * p.epochs,
            warmup_steps=round(p.warmup_epochs * steps),
            peak_lr=peak_lr(p, batch),
        )


def build_optimizer(model: nn.Module, p: TrainParams, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over trainable parameters; no weight decay on norms and biases.

    Decaying BatchNorm scales and biases only fights the normalisation; every 1-d parameter is one.
    """
    decay = [t for t in model.parameters() if t.requires_grad and t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.requires_grad and t.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": p.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=p.momentum, nesterov=p.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=(p.momentum, 0.999))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Learning rate for ``step`` (0-based): linear warm-up to ``peak``, then down to 0.

    onecycle: linear decay (the triangular schedule of the CIFAR-10 speed records);
    cosine: half-cosine decay.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "onecycle":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule must be onecycle or cosine, got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers (BatchNorm statistics too).

    The decay is ramped up as ``min(decay, (1 + n) / (10 + n))`` so the average is not dominated
    by the random initial weights on short runs.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.detach(), 1.0 - d)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, object]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        updates = state["updates"]
        assert isinstance(updates, int)
        self.updates = updates
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        for key, value in shadow.items():
            self.shadow[key].copy_(value)
