"""train stage: fine-tune a torchvision classifier on prepared/ and write models/candidate.pt.

The data sits on the device as uint8 while it fits train.device_budget_gb, and streams from the
prepared files otherwise (tasks/training/splits.py); either way it is augmented and normalised on
the device per batch, and on the CPU both give the same weights. bf16 autocast on CUDA, fp32 on
the CPU. A checkpoint after every epoch lets a rerun after a crash resume; each epoch's randomness
is seeded from (seed, epoch), so on the CPU a resumed run ends with the same weights as an
uninterrupted one.
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
from typing import cast

import torch
from torch import nn

from tasks import params
from tasks.blessing.reports import TrainReport
from tasks.data.prepared import PreparedData
from tasks.entry import StageSpec, run_stage
from tasks.errors import TrainingDiverged
from tasks.fs.atomic import atomic_write_text
from tasks.params import ModelParams, RegistryParams, TrainParams
from tasks.paths import SPLITS, Workspace
from tasks.training.augment import channel_stats
from tasks.training.candidate import Candidate, save_candidate
from tasks.training.checkpoint import ResumeCheckpoint, run_key
from tasks.training.device import describe, select_device
from tasks.training.loop import EVAL_BATCH_FACTOR, test_accuracy, train_epoch
from tasks.training.models import build_model, freeze, imagenet_normalization
from tasks.training.optim import Schedule, WeightEMA, build_optimizer
from tasks.training.sampler import EpochSampler
from tasks.training.splits import Placement, Preprocess, TrainingSplit, open_split, placement
from tasks.training.weights import load_initial_weights

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "test_accuracy", "lr", "images_per_s")
_EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s draws from generator seed s * stride + e


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _diverged(epoch: int, lr: float, p: TrainParams, ws: Workspace, checkpoint: ResumeCheckpoint) -> TrainingDiverged:
    # Nothing from a diverged run may be promoted or resumed: no candidate, no checkpoint.
    ws.candidate.unlink(missing_ok=True)
    checkpoint.remove()
    return TrainingDiverged(
        f"the training loss became NaN or inf in epoch {epoch} (lr {lr:.4g});"
        f" no candidate was written. Lower train.lr (now {p.lr} per 512 images), raise"
        " train.warmup_epochs, or check the data for broken images"
    )


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


@dataclass(frozen=True)
class TrainSections:
    """The params.yaml sections train reads (registry only for model.weights: production)."""

    model: ModelParams
    train: TrainParams
    registry: RegistryParams


SPEC = StageSpec(
    "train",
    params=("model", "train", "registry.uri", "registry.model_name"),
    reads=lambda ws: [
        *(path for split in SPLITS for path in (ws.images(split), ws.labels(split))),
        ws.classes,
    ],
    writes=lambda ws: [ws.candidate, ws.train_summary, ws.train_history],
    # Only the verdict: the drift details in it change with production (a promotion re-runs
    # validate), and must not re-run training on the same data.
    reads_keys=lambda ws: {ws.validation: ("success",)},
)


@dataclass(frozen=True)
class _Run:
    """The model on the training device and everything that steps and scores it."""

    model: nn.Module
    step_model: nn.Module  # the model, or its torch.compile'd form
    eval_model: nn.Module  # the model, or a second one holding the EMA weights
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    criterion: nn.Module
    weights_source: str  # where the weights started from, for logs and the reports


def _build_run(p: TrainSections, ws: Workspace, data: PreparedData, schedule: Schedule, device: torch.device) -> _Run:
    m, t = p.model, p.train
    channels = data.train.images.shape[1]
    torch.manual_seed(t.seed)
    model = build_model(m.arch, m.stem, len(data.classes), channels)
    source = load_initial_weights(model, m, ws, p.registry)
    freeze(model, t.freeze)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = WeightEMA(model, t.ema_decay) if t.ema_decay > 0 else None
    eval_model = model
    if ema is not None:  # the average is evaluated in a second model, so training continues from the raw weights
        eval_model = build_model(m.arch, m.stem, len(data.classes), channels)
        eval_model = eval_model.to(device).to(memory_format=torch.channels_last)
    return _Run(
        model=model,
        step_model=cast(nn.Module, torch.compile(model)) if t.compile else model,  # an OptimizedModule
        eval_model=eval_model,
        optimizer=build_optimizer(model, t, schedule.peak_lr),
        ema=ema,
        criterion=nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        weights_source=source,
    )


def _resume(run: _Run, checkpoint: ResumeCheckpoint, epochs: int) -> tuple[list[dict[str, float]], int, float]:
    """(history, last complete epoch, training seconds so far) from this run's checkpoint, if any."""
    state = checkpoint.load()
    if state is None:
        return [], 0, 0.0
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    log.info("resuming from the checkpoint of epoch %d/%d (%s)", int(state["epoch"]), epochs, checkpoint.path)
    return state["history"], int(state["epoch"]), float(state["train_seconds"])


def _fit(
    run: _Run,
    train_split: TrainingSplit,
    test_split: TrainingSplit,
    schedule: Schedule,
    t: TrainParams,
    ws: Workspace,
    checkpoint: ResumeCheckpoint,
    history: list[dict[str, float]],
    start_epoch: int,
    train_seconds: float,
) -> float:
    """Train epochs ``start_epoch + 1 .. t.epochs``, appending to ``history`` and checkpointing each;
    returns the training seconds of all epochs (those before a resume included)."""
    device = train_split.device
    sampler = EpochSampler(len(train_split), schedule.batch_size)
    wall_start = time.perf_counter()
    for epoch in range(start_epoch + 1, t.epochs + 1):
        torch.manual_seed(t.seed * _EPOCH_SEED_STRIDE + epoch)  # dropout (mobilenet) draws from the global RNG
        generator = torch.Generator(device=device).manual_seed(t.seed * _EPOCH_SEED_STRIDE + epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_start = time.perf_counter()
        train_loss, lr = train_epoch(
            run.step_model, run.model, run.optimizer, run.ema, run.criterion, train_split, sampler, schedule, t, epoch,
            generator,
        )
        epoch_seconds = time.perf_counter() - epoch_start  # train_epoch ends with a sync (.item())
        if not math.isfinite(train_loss):
            raise _diverged(epoch, lr, t, ws, checkpoint)
        if run.ema is not None:
            run.eval_model.load_state_dict(run.ema.shadow)
        accuracy = test_accuracy(run.eval_model, test_split, EVAL_BATCH_FACTOR * schedule.batch_size)
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
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "ema": run.ema.state_dict() if run.ema is not None else None,
                "history": history,
                "train_seconds": train_seconds,
            }
        )
        done = epoch - start_epoch
        log.info(
            "epoch %d/%d  loss %.4f  test_acc %.4f  %.0f img/s  lr %.4g  ETA %s",
            epoch, t.epochs, train_loss, accuracy, images_per_s, lr,
            _eta((time.perf_counter() - wall_start) / done * (t.epochs - epoch)),
        )

    return train_seconds


def _normalization(m: ModelParams, data: PreparedData) -> tuple[list[float], list[float]]:
    """model.normalization: ImageNet's statistics, or the train split's own (one pass over it)."""
    if m.normalization == "imagenet":
        return imagenet_normalization(data.train.images.shape[1])
    return channel_stats(data.train.images)


def _open_splits(
    t: TrainParams, data: PreparedData, preprocess: Preprocess, device: torch.device
) -> tuple[Placement, TrainingSplit, TrainingSplit]:
    where = placement(t.data_on_device, t.device_budget_gb, data.nbytes)
    log.info(
        "data: %.2f GB of pixels (train + test), %s (train.data_on_device %s, device_budget_gb %g)",
        data.nbytes / 1e9, "held on the device" if where == "device" else "streamed from prepared/",
        t.data_on_device, t.device_budget_gb,
    )
    return (
        where,
        open_split(data.train, where, preprocess, device, t.prefetch_batches),
        open_split(data.test, where, preprocess, device, t.prefetch_batches),
    )


def train(p: TrainSections, ws: Workspace) -> TrainReport:
    """Train as params.yaml says on prepared/; write the candidate, train.json and train_history.csv."""
    t = p.train
    ws.candidate.unlink(missing_ok=True)  # a stale candidate must not outlive a failed run
    device = select_device(t.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = PreparedData.load(ws)
    schedule = Schedule.for_dataset(t, len(data.train.labels))
    run = _build_run(p, ws, data, schedule, device)
    mean, std = _normalization(p.model, data)
    preprocess = Preprocess.on(device, mean, std, t.augment.eval_crop)
    where, train_split, test_split = _open_splits(t, data, preprocess, device)
    resolved = {
        "model": dataclasses.asdict(p.model),
        "train": dataclasses.asdict(t),
        "schedule": dataclasses.asdict(schedule),
    }
    checkpoint = ResumeCheckpoint(ws.checkpoints, run_key({**resolved, "device": device.type}, data.digest))
    history, start_epoch, train_seconds = _resume(run, checkpoint, t.epochs)
    _, channels, image_size, _ = data.train.images.shape
    log.info(
        "training %s (%s stem) from %s on %s: %d train / %d test images of %dx%dx%d, %d classes;"
        " batch %d, %d steps/epoch, peak lr %.4g",
        p.model.arch, p.model.stem, run.weights_source, describe(device), len(train_split), len(test_split),
        channels, image_size, image_size, len(data.classes), schedule.batch_size, schedule.steps_per_epoch,
        schedule.peak_lr,
    )

    train_seconds = _fit(run, train_split, test_split, schedule, t, ws, checkpoint, history, start_epoch, train_seconds)
    final = history[-1]
    report = TrainReport(
        test_accuracy=final["test_accuracy"],
        train_loss=final["train_loss"],
        epochs=t.epochs,
        train_seconds=round(train_seconds, 3),
        images_per_s=round(schedule.steps_per_epoch * schedule.batch_size * t.epochs / train_seconds, 1),
        resumed_from_epoch=start_epoch,
        device=device.type,
        device_name=describe(device),
        batch_size=schedule.batch_size,
        steps_per_epoch=schedule.steps_per_epoch,
        peak_lr=schedule.peak_lr,
        weights=run.weights_source,
        data_placement=where,
    )
    save_candidate(
        ws.candidate,
        Candidate(
            state_dict=run.ema.shadow if run.ema is not None else run.model.state_dict(),
            arch=p.model.arch,
            stem=p.model.stem,
            num_classes=len(data.classes),
            in_channels=channels,
            image_size=image_size,
            classes=list(data.classes),
            normalization={"mean": mean, "std": std},
            eval_crop=t.augment.eval_crop,
            params=resolved,
            device=device.type,
            device_name=report.device_name,
            weights_source=run.weights_source,
            data_digest=data.digest,
            metrics={
                k: getattr(report, k)
                for k in ("test_accuracy", "train_loss", "epochs", "train_seconds", "images_per_s")
            },
        ),
    )
    report.write(ws.train_summary)
    write_history(ws.train_history, history)
    checkpoint.remove()
    log.info(
        "candidate %s: test accuracy %.4f after %d epochs (%.1f s of training)",
        ws.candidate, report.test_accuracy, t.epochs, train_seconds,
    )
    return report


def main() -> None:
    train(params.sections(TrainSections, params.load()), Workspace.here())


if __name__ == "__main__":
    run_stage(main)
