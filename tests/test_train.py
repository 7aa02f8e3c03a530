from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks import params
from tasks.blessing.reports import TrainReport
from tasks.errors import TrainingDiverged
from tasks.params import ModelParams, TrainParams
from tasks.paths import Workspace
from tasks.train import HISTORY_COLUMNS, TrainSections, train, write_history
from tasks.training.candidate import load_candidate
from tasks.training.checkpoint import ResumeCheckpoint
from tasks.training.models import build_model
from tasks.training.optim import Schedule

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ["top", "bottom", "row", "column"]


def write_prepared(ws: Workspace, n_train: int = 48, n_test: int = 16, size: int = 8, channels: int = 1) -> None:
    """Tiny learnable data: each class is a bright band (top, bottom, middle row or column) on noise;
    all four are mirror-symmetric, so the default horizontal flip keeps them apart."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(CLASSES)
        images = rng.integers(0, 80, (n, channels, size, size))
        band = size // 3
        middle = slice(band, 2 * band)
        images[labels == 0, :, :band, :] += 150
        images[labels == 1, :, -band:, :] += 150
        images[labels == 2, :, middle, :] += 150
        images[labels == 3, :, :, middle] += 150
        ws.prepared.mkdir(parents=True, exist_ok=True)
        np.save(ws.images(split), images.astype(np.uint8))
        np.save(ws.labels(split), labels.astype(np.int64))
    ws.classes.write_text(json.dumps(CLASSES))


def tiny(**changes: Any) -> TrainParams:
    """The defaults of params.yaml, sized for a few dozen 8x8 images on a CPU."""
    defaults = params.load(PROJECT / "params.yaml").train
    augment = dataclasses.replace(defaults.augment, crop_padding=2)
    tiny_defaults = {"device": "cpu", "epochs": 2, "min_steps_per_epoch": 3, "augment": augment}
    return dataclasses.replace(defaults, **{**tiny_defaults, **changes})


MODEL = ModelParams(arch="resnet18", stem="cifar", weights="none", normalization="data")
REGISTRY = params.load(PROJECT / "params.yaml").registry


def run(t: TrainParams, ws: Workspace, model: ModelParams = MODEL) -> TrainReport:
    return train(TrainSections(model=model, train=t, registry=REGISTRY), ws)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace(tmp_path / "ws")
    write_prepared(workspace)
    return workspace


def test_train_writes_the_candidate_contract_summary_and_history(ws: Workspace) -> None:
    result = run(tiny(epochs=4), ws)

    candidate = load_candidate(ws.candidate)
    assert candidate.classes == CLASSES and candidate.in_channels == 1 and candidate.image_size == 8
    assert candidate.device == "cpu" and candidate.num_classes == 4
    assert len(candidate.normalization["mean"]) == 1 and candidate.normalization["std"][0] > 0
    assert candidate.params["train"]["epochs"] == 4
    assert result.test_accuracy >= 0.75, "the bands are easy; a working loop learns them in 4 epochs"

    summary = TrainReport.read(ws.train_summary, "train")
    assert summary == result and summary.test_accuracy == candidate.metrics["test_accuracy"]
    assert summary.batch_size == 16 and summary.steps_per_epoch == 3

    with ws.train_history.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # annealed
    assert not ResumeCheckpoint(ws.checkpoints, "").path.exists(), "a finished run removes its checkpoint"
    assert candidate.classifier()(torch.zeros(1, 1, 8, 8)).shape == (1, 4)


def test_same_seed_gives_identical_weights_on_cpu(tmp_path: Path) -> None:
    states = []
    for name in ("a", "b"):
        workspace = Workspace(tmp_path / name)
        write_prepared(workspace)
        run(tiny(epochs=1, ema_decay=0.9, augment=dataclasses.replace(tiny().augment, cutout=3)), workspace)
        states.append(torch.load(workspace.candidate, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_on_device_and_streamed_training_give_identical_weights_on_cpu(tmp_path: Path) -> None:
    """train.data_on_device always vs never: same seed -> same batches, same augmentation, same weights."""
    reports, states, histories = [], [], []
    for choice in ("always", "never"):
        workspace = Workspace(tmp_path / choice)
        write_prepared(workspace)
        a = dataclasses.replace(tiny().augment, cutout=3)
        t = tiny(epochs=2, ema_decay=0.9, data_on_device=choice, prefetch_batches=2, augment=a)
        reports.append(run(t, workspace))
        states.append(load_candidate(workspace.candidate).state_dict)
        with workspace.train_history.open() as fh:
            histories.append([(r["train_loss"], r["test_accuracy"]) for r in csv.DictReader(fh)])
    assert [r.data_placement for r in reports] == ["device", "streamed"]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), "weights differ between placements"
    assert histories[0] == histories[1]


def test_auto_streams_only_when_the_pixels_exceed_the_device_budget(tmp_path: Path) -> None:
    nbytes = (48 + 16) * 8 * 8  # write_prepared: 64 grayscale 8x8 images
    placements = []
    for name, budget_gb in (("fits", nbytes / 1e9), ("exceeds", (nbytes - 1) / 1e9)):
        workspace = Workspace(tmp_path / name)
        write_prepared(workspace)
        report = run(tiny(epochs=1, data_on_device="auto", device_budget_gb=budget_gb), workspace)
        placements.append(report.data_placement)
    assert placements == ["device", "streamed"]


def test_the_imagenet_recipe_records_its_normalisation_and_evaluation_view(ws: Workspace) -> None:
    """model.normalization imagenet + random-resized crop + eval_crop, from a local .pt, head only."""
    from tasks.evaluate import score_candidate
    from tasks.training.models import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(5)
    torch.save(build_model("mobilenet_v3_small", "imagenet", 1000, 3).state_dict(), ws.root / "imagenet.pt")
    recipe = ModelParams(arch="mobilenet_v3_small", stem="imagenet", weights="imagenet.pt", normalization="imagenet")
    a = dataclasses.replace(tiny().augment, crop_padding=0, random_resized_crop=True, eval_crop=0.875)
    result = run(tiny(epochs=1, freeze="backbone", augment=a, data_on_device="never"), ws, recipe)

    candidate = load_candidate(ws.candidate)
    gray = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # write_prepared's images are grayscale
    assert candidate.normalization == {"mean": [gray[0]], "std": [gray[1]]}
    assert candidate.eval_crop == 0.875 and candidate.weights_source.endswith("imagenet.pt")
    # evaluate scores through Deployable, which applies the same view: it agrees with training's last evaluation
    assert score_candidate(ws).scores.accuracy == result.test_accuracy


def test_divergence_stops_with_a_clear_error_and_leaves_no_candidate(ws: Workspace) -> None:
    ws.models.mkdir(parents=True)
    ws.candidate.write_bytes(b"stale candidate of an earlier run")
    with pytest.raises(TrainingDiverged, match=r"NaN or inf .* no candidate was written"):
        run(tiny(epochs=2, lr=1e30, warmup_epochs=0.0), ws)
    assert not ws.candidate.exists()
    assert not any(ws.checkpoints.glob("*")) if ws.checkpoints.exists() else True


def test_small_datasets_get_smaller_batches_and_a_proportional_lr() -> None:
    p = tiny(batch_size=512, min_steps_per_epoch=20, lr=0.4, epochs=10, warmup_epochs=1.0)
    small = Schedule.for_dataset(p, 1440)
    assert (small.batch_size, small.steps_per_epoch, small.total_steps, small.warmup_steps) == (72, 20, 200, 20)
    assert small.peak_lr == pytest.approx(0.4 * 72 / 512)
    assert Schedule.for_dataset(p, 200).batch_size == 16, "no batch below 16 for BatchNorm"
    assert Schedule.for_dataset(p, 10).batch_size == 10
    large = Schedule.for_dataset(p, 50_000)
    assert (large.batch_size, large.steps_per_epoch, large.peak_lr) == (512, 97, pytest.approx(0.4))


def test_frozen_backbone_trains_only_the_head_from_a_weights_file(ws: Workspace) -> None:
    torch.manual_seed(5)
    start = build_model("resnet18", "cifar", 4, 1).state_dict()
    torch.save(start, ws.root / "start.pt")
    run(tiny(freeze="backbone"), ws, dataclasses.replace(MODEL, weights="start.pt"))
    trained = torch.load(ws.candidate, weights_only=True)["state_dict"]
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed == {"fc.weight", "fc.bias"}, "backbone weights and BatchNorm statistics stay as loaded"


def test_a_checkpoint_of_other_parameters_is_not_resumed(ws: Workspace) -> None:
    ResumeCheckpoint(ws.checkpoints, "another run").save({"epoch": 1, "model": {}, "optimizer": {}, "history": []})
    assert run(tiny(epochs=1), ws).resumed_from_epoch == 0


# The killed child runs the real stage code and SIGKILLs itself in the middle of epoch 3 (step 7,
# 3 steps an epoch), after the epoch-2 checkpoint; no Python cleanup runs, as with kill -9.
_KILLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {project!r})
    torch.set_num_threads({threads})
    import tasks.training.loop as loop
    from tests.test_train import run, tiny
    from pathlib import Path
    from tasks.paths import Workspace

    real_lr_at = loop.lr_at
    def lr_at(step, *args):
        if step == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_lr_at(step, *args)
    loop.lr_at = lr_at
    run(tiny(epochs=4), Workspace(Path({root!r})))
    """
)


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_and_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    reference_ws = Workspace(tmp_path / "reference")
    write_prepared(reference_ws)
    run(tiny(epochs=4), reference_ws)

    ws = Workspace(tmp_path / "killed")
    write_prepared(ws)
    child = _KILLED_CHILD.format(project=str(PROJECT), threads=torch.get_num_threads(), root=str(ws.root))
    proc = subprocess.run([sys.executable, "-c", child], cwd=PROJECT, capture_output=True, text=True, env=os.environ)
    assert proc.returncode == -9, proc.stderr
    assert not ws.candidate.exists()
    assert (ws.checkpoints / "train.pt").exists()

    resumed = run(tiny(epochs=4), ws)
    assert resumed.resumed_from_epoch == 2
    expected = load_candidate(reference_ws.candidate).state_dict
    actual = load_candidate(ws.candidate).state_dict
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    with ws.train_history.open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]


@pytest.mark.integration
def test_dvc_plots_show_renders_the_training_curves(workspace: Workspace) -> None:
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "test_accuracy": 0.2 * e, "lr": 0.1 / e, "images_per_s": 100.0 + e}
        for e in (1, 2, 3)
    ]
    write_history(workspace.train_history, history)
    proc = subprocess.run(["dvc", "plots", "show", "--json"], cwd=workspace.root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plots = json.loads(proc.stdout)["data"]
    curves = {
        "train_loss": "train_loss",
        "test_accuracy": "test_accuracy",
        "learning_rate": "lr",
        "throughput": "images_per_s",
    }
    for plot_id, column in curves.items():
        content = plots[plot_id][0]["content"]
        rows = content["data"]["values"]
        assert [row["epoch"] for row in rows] == ["1", "2", "3"], plot_id
        assert column in json.dumps(content["layer"]), f"{plot_id} does not plot {column}"
