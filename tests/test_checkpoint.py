from __future__ import annotations

from pathlib import Path

import torch

from tasks.fs.hashing import files_digest
from tasks.training.checkpoint import ResumeCheckpoint, run_key


def test_checkpoint_round_trips_for_the_same_run_only(tmp_path: Path) -> None:
    ResumeCheckpoint(tmp_path, "run-a").save({"epoch": 3, "weights": torch.ones(2)})
    state = ResumeCheckpoint(tmp_path, "run-a").load()
    assert state is not None and state["epoch"] == 3 and torch.equal(state["weights"], torch.ones(2))
    assert ResumeCheckpoint(tmp_path, "run-b").load() is None


def test_unreadable_checkpoint_is_ignored_and_removal_is_idempotent(tmp_path: Path) -> None:
    checkpoint = ResumeCheckpoint(tmp_path, "run")
    checkpoint.path.write_bytes(b"not a torch file")
    assert checkpoint.load() is None
    checkpoint.remove()
    checkpoint.remove()
    assert not checkpoint.path.exists()


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    ResumeCheckpoint(tmp_path, "run").save({"epoch": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["train.pt"]


def test_run_key_changes_with_params_and_data(tmp_path: Path) -> None:
    data = tmp_path / "train_images.npy"
    data.write_bytes(b"abc")
    digest = files_digest([data])
    key = run_key({"train": {"lr": 0.4}}, digest)
    assert key == run_key({"train": {"lr": 0.4}}, digest)
    assert key != run_key({"train": {"lr": 0.5}}, digest)
    data.write_bytes(b"abd")
    assert key != run_key({"train": {"lr": 0.4}}, files_digest([data]))
