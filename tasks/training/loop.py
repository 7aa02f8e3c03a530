"""The training loop's two halves: one epoch of optimiser steps, and the accuracy on the test split."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from tasks.fs.progress import track
from tasks.params import TrainParams
from tasks.training.models import set_train_mode
from tasks.training.optim import Schedule, WeightEMA, lr_at, set_lr
from tasks.training.sampler import EpochSampler
from tasks.training.splits import TrainingSplit

log = logging.getLogger(__name__)

EVAL_BATCH_FACTOR = 2  # evaluation batch = this x the training batch: inference keeps no activations
CHECK_FINITE_EVERY = 50  # steps between NaN checks (each one is a device sync on CUDA)


@torch.no_grad()
def test_accuracy(model: nn.Module, split: TrainingSplit, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (in its evaluation view), 0..1."""
    model.eval()
    device = split.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    batches = split.eval_batches(batch_size)
    for images, labels in track(batches, -(-len(split) // batch_size), "test accuracy", log):
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
    split: TrainingSplit,
    sampler: EpochSampler,
    schedule: Schedule,
    p: TrainParams,
    epoch: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One epoch of steps; (mean train loss, last lr). The loss is NaN/inf as soon as it diverged."""
    set_train_mode(model, p.freeze)
    loss_sum = torch.zeros((), dtype=torch.float32, device=split.device)
    step = (epoch - 1) * schedule.steps_per_epoch
    lr = schedule.peak_lr
    rows = sampler.batches(generator)  # drawn first: both placements then draw augmentation alike
    batches = split.train_batches(rows, p.augment, generator)
    for i, (images, labels) in enumerate(track(batches, len(rows), f"epoch {epoch}/{p.epochs}", log)):
        lr = lr_at(step + i, schedule.total_steps, schedule.warmup_steps, schedule.peak_lr, p.schedule)
        set_lr(optimizer, lr)
        with torch.autocast(split.device.type, dtype=torch.bfloat16, enabled=split.device.type == "cuda"):
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
