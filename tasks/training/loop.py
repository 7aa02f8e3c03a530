"""The training loop's two halves: one epoch of optimiser steps, and the accuracy on the test split."""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.params import TrainParams
from tasks.training.augment import DeviceSplit
from tasks.training.models import set_train_mode
from tasks.training.optim import Schedule, WeightEMA, lr_at, set_lr

EVAL_BATCH = 1024  # images per evaluation step; inference needs no gradients, so larger than training's
CHECK_FINITE_EVERY = 50  # steps between NaN checks (each one is a device sync on CUDA)


@torch.no_grad()
def test_accuracy(model: nn.Module, split: DeviceSplit, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``split``, 0..1."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in split.eval_batches(EVAL_BATCH):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        correct += (logits.argmax(dim=1) == labels).sum()
    return int(correct.item()) / len(split)


def train_epoch(
    step_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: WeightEMA | None,
    criterion: nn.Module,
    split: DeviceSplit,
    schedule: Schedule,
    p: TrainParams,
    epoch: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One epoch of steps; (mean train loss, last lr). The loss is NaN/inf as soon as it diverged."""
    set_train_mode(model, p.freeze)
    device = split.images.device
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    step = (epoch - 1) * schedule.steps_per_epoch
    lr = schedule.peak_lr
    for i, (images, labels) in enumerate(split.train_batches(schedule.batch_size, p.augment, generator)):
        lr = lr_at(step + i, schedule.total_steps, schedule.warmup_steps, schedule.peak_lr, p.schedule)
        set_lr(optimizer, lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = step_model(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach()
        if (i + 1) % CHECK_FINITE_EVERY == 0 and not torch.isfinite(loss_sum):
            return math.nan, lr
    return float(loss_sum.item()) / schedule.steps_per_epoch, lr
