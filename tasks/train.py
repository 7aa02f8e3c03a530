"""train stage: fine-tune a torchvision classifier on prepared/ and write models/candidate.pt.

The whole split sits on the device as uint8 and is augmented there per batch (tasks/augment.py).
bf16 autocast on CUDA, fp32 on the CPU. A checkpoint after every epoch lets a rerun after a
crash resume; each epoch's randomness is seeded from (seed, epoch), so on the CPU a resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from tasks.augment import DeviceSplit, channel_stats
from tasks.checkpoint import ResumeCheckpoint, files_digest, run_key
from tasks.device import describe, select_device
from tasks.errors import DataError, TrainingDiverged
from tasks.models import build_model, head
from tasks.optim import WeightEMA, build_optimizer, lr_at, peak_lr, set_lr
from tasks.params import ModelParams, RegistryParams, TrainParams
from tasks.paths import Workspace
from tasks.prepared import load_split
from tasks.weights import load_initial_weights

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "test_accuracy", "lr", "images_per_s")
EVAL_BATCH = 1024  # images per evaluation step; inference needs no gradients, so larger than training's
MIN_BATCH = 16  # images; below this BatchNorm's batch statistics are too noisy to train on
CHECK_FINITE_EVERY = 50  # steps between NaN checks (each one is a device sync on CUDA)
_EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s draws from generator seed s * stride + e


@dataclass(frozen=True)
class TrainResult:
    candidate: Path
    test_accuracy: float
    train_loss: float
    epochs: int
    resumed_from_epoch: int  # 0 = trained from scratch
    device: str
    batch_size: int
    peak_lr: float
    train_seconds: float  # training steps only, summed over epochs (also those before a resume)
    images_per_s: float


@dataclass(frozen=True)
class Schedule:
    """How train.batch_size and the schedule adapt to the dataset's size."""

    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float

    @classmethod
    def for_dataset(cls, p: TrainParams, n_train: int) -> Schedule:
        # Cap the batch so an epoch has at least min_steps_per_epoch steps: 1,500 images at batch 512
        # would be 2 steps an epoch, far too few updates for 10 epochs. The floor keeps BatchNorm's
        # batch statistics usable; the very smallest datasets then get fewer steps instead.
        if n_train < 2:
            raise DataError(f"the train split has {n_train} images; training needs at least 2")
        floor = min(MIN_BATCH, p.batch_size, n_train)
        batch = max(floor, min(p.batch_size, n_train // p.min_steps_per_epoch))
        steps = n_train // batch
        return cls(
            batch_size=batch,
            steps_per_epoch=steps,
            total_steps=steps * p.epochs,
            warmup_steps=round(p.warmup_epochs * steps),
            peak_lr=peak_lr(p, batch),
        )


@dataclass(frozen=True)
class PreparedData:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    digest: str

    @classmethod
    def load(cls, ws: Workspace) -> PreparedData:
        train, test = load_split(ws, "train"), load_split(ws, "test")
        if train.images.shape[1:] != test.images.shape[1:]:
            shapes = f"{train.images.shape[1:]} vs {test.images.shape[1:]}"
            raise DataError(f"train and test images differ in shape ({shapes}): rerun the prepare stage")
        files = [ws.images("train"), ws.labels("train"), ws.images("test"), ws.labels("test"), ws.classes]
        return cls(train.images, train.labels, test.images, test.labels, train.classes, files_digest(files))


def _set_train_mode(model: nn.Module, freeze: str) -> None:
    """Train mode, except that a frozen backbone keeps its BatchNorm statistics (eval mode)."""
    model.train()
    if freeze == "backbone":
        classifier_head = head(model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module is not classifier_head:
                module.eval()


def _freeze(model: nn.Module, freeze: str) -> None:
    if freeze == "backbone":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in head(model).parameters():
            parameter.requires_grad_(True)


@torch.no_grad()
def evaluate(model: nn.Module, split: DeviceSplit, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` on ``split``, 0..1."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in split.eval_batches(EVAL_BATCH):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        correct += (logits.argmax(dim=1) == labels).sum()
    return int(correct.item()) / len(split)


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _diverged(epoch: int, lr: float, p: TrainParams, ws: Workspace, checkpoint: ResumeCheckpoint) -> TrainingDiverged:
    # Nothing from a diverged run may be promoted or resumed: no candidate, no checkpoint.
    ws.candidate_weights.unlink(missing_ok=True)
    checkpoint.remove()
    return TrainingDiverged(
        f"the training loss became NaN or inf in epoch {epoch} (lr {lr:.4g});"
        f" no candidate was written. Lower train.lr (now {p.lr} per 512 images), raise"
        " train.warmup_epochs, or check the data for broken images"
    )


def _torch_save_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def _train_epoch(
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
    _set_train_mode(model, p.freeze)
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


def train(p: TrainParams, m: ModelParams, ws: Workspace, registry: RegistryParams | None = None) -> TrainResult:
    """Train as params.yaml says on prepared/; write the candidate, train.json and train_history.csv."""
    ws.candidate_weights.unlink(missing_ok=True)  # a stale candidate must not outlive a failed run
    device = select_device(p.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = PreparedData.load(ws)
    schedule = Schedule.for_dataset(p, len(data.train_labels))
    _, channels, image_size, _ = data.train_images.shape

    torch.manual_seed(p.seed)
    model = build_model(m.arch, m.stem, len(data.classes), channels)
    source = load_initial_weights(model, m, ws, registry)
    _freeze(model, p.freeze)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, p, schedule.peak_lr)
    ema = WeightEMA(model, p.ema_decay) if p.ema_decay > 0 else None
    eval_model = model
    if ema is not None:  # the average is evaluated in a second model, so training continues from the raw weights
        eval_model = build_model(m.arch, m.stem, len(data.classes), channels).to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if p.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)

    mean, std = channel_stats(torch.from_numpy(data.train_images))
    train_split = DeviceSplit.from_arrays(data.train_images, data.train_labels, mean, std, device)
    test_split = DeviceSplit.from_arrays(data.test_images, data.test_labels, mean, std, device)

    resolved = {
        "model": dataclasses.asdict(m),
        "train": dataclasses.asdict(p),
        "schedule": dataclasses.asdict(schedule),
    }
    checkpoint = ResumeCheckpoint(ws.checkpoints, run_key({**resolved, "device": device.type}, data.digest))
    state = checkpoint.load()
    history: list[dict[str, float]] = []
    start_epoch, train_seconds = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, start_epoch, train_seconds = state["history"], int(state["epoch"]), float(state["train_seconds"])
        log.info("resuming from the checkpoint of epoch %d/%d (%s)", start_epoch, p.epochs, checkpoint.path)
    log.info(
        "training %s (%s stem) from %s on %s: %d train / %d test images of %dx%dx%d, %d classes;"
        " batch %d, %d steps/epoch, peak lr %.4g",
        m.arch, m.stem, source, describe(device), len(train_split), len(test_split), channels, image_size,
        image_size, len(data.classes), schedule.batch_size, schedule.steps_per_epoch, schedule.peak_lr,
    )

    wall_start = time.perf_counter()
    for epoch in range(start_epoch + 1, p.epochs + 1):
        torch.manual_seed(p.seed * _EPOCH_SEED_STRIDE + epoch)  # dropout (mobilenet) draws from the global RNG
        generator = torch.Generator(device=device).manual_seed(p.seed * _EPOCH_SEED_STRIDE + epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_start = time.perf_counter()
        train_loss, lr = _train_epoch(
            step_model, model, optimizer, ema, criterion, train_split, schedule, p, epoch, generator
        )
        epoch_seconds = time.perf_counter() - epoch_start  # _train_epoch ends with a sync (.item())
        if not math.isfinite(train_loss):
            raise _diverged(epoch, lr, p, ws, checkpoint)
        if ema is not None:
            eval_model.load_state_dict(ema.shadow)
        accuracy = evaluate(eval_model, test_split, device)
        train_seconds += epoch_seconds
        images_per_s = schedule.steps_per_epoch * schedule.batch_size / epoch_seconds
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(train_loss, 6),
                "test_accuracy": round(accuracy, 6),
                "lr": lr,
                "images_per_s": round(images_per_s, 1),
            }
        )
        checkpoint.save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "history": history,
                "train_seconds": train_seconds,
            }
        )
        elapsed = time.perf_counter() - wall_start
        done = epoch - start_epoch
        log.info(
            "epoch %d/%d  loss %.4f  test_acc %.4f  %.0f img/s  lr %.4g  ETA %s",
            epoch, p.epochs, train_loss, accuracy, images_per_s, lr, _eta(elapsed / done * (p.epochs - epoch)),
        )

    final_state = ema.shadow if ema is not None else model.state_dict()
    final = history[-1]
    images_per_s = schedule.steps_per_epoch * schedule.batch_size * p.epochs / train_seconds
    metrics = {
        "test_accuracy": final["test_accuracy"],
        "train_loss": final["train_loss"],
        "epochs": p.epochs,
        "train_seconds": round(train_seconds, 3),
        "images_per_s": round(images_per_s, 1),
    }
    candidate = {
        "state_dict": {
            k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
            for k, v in final_state.items()
        },
        "arch": m.arch,
        "stem": m.stem,
        "num_classes": len(data.classes),
        "in_channels": channels,
        "image_size": image_size,
        "classes": list(data.classes),
        "normalization": {"mean": mean, "std": std},
        "params": resolved,
        "device": device.type,
        "device_name": describe(device),
        "weights_source": source,
        "data_digest": data.digest,
        "metrics": metrics,
    }
    atomic_write_bytes(ws.candidate_weights, _torch_save_bytes(candidate))
    summary = {
        **metrics,
        "resumed_from_epoch": start_epoch,
        "device": device.type,
        "device_name": describe(device),
        "batch_size": schedule.batch_size,
        "steps_per_epoch": schedule.steps_per_epoch,
        "peak_lr": schedule.peak_lr,
        "weights": source,
    }
    atomic_write_json(ws.train_summary, summary)
    write_history(ws.train_history, history)
    checkpoint.remove()
    log.info(
        "candidate %s: test accuracy %.4f after %d epochs (%.1f s of training)",
        ws.candidate_weights, final["test_accuracy"], p.epochs, train_seconds,
    )
    return TrainResult(
        candidate=ws.candidate_weights,
        test_accuracy=final["test_accuracy"],
        train_loss=final["train_loss"],
        epochs=p.epochs,
        resumed_from_epoch=start_epoch,
        device=device.type,
        batch_size=schedule.batch_size,
        peak_lr=schedule.peak_lr,
        train_seconds=train_seconds,
        images_per_s=images_per_s,
    )


def main() -> None:
    from tasks import params

    loaded = params.load()
    train(loaded.train, loaded.model, Workspace.here(), loaded.registry)


if __name__ == "__main__":
    from tasks.entry import run_stage

    run_stage(main)
