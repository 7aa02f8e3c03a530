"""The quickstart's overrides and its closing report: honest about CPU-only verification."""

from __future__ import annotations

import json
from pathlib import Path

from flows.overrides import check_overrides
from flows.pipeline import RunSummary
from flows.quickstart import (
    CPU_ONLY_OVERRIDES,
    closing_report,
    cuda_present,
    quickstart_overrides,
)
from tasks.paths import Workspace

from candidate_factory import export_contract, metrics_report, train_report, verification_report
from conftest import PROJECT

SUMMARY = RunSummary(1, "/ws/registry/m/1/model.onnx", stage_seconds={"train": 60.0, "verify": 20.0}, flow_seconds=90.0)


def test_without_cuda_the_quickstart_verifies_on_cpu_and_says_so() -> None:
    overrides, notes = quickstart_overrides(cuda=False, extra={})
    assert overrides["promote.require_provider"] == "cpu" and overrides["verify.provider"] == "cpu"
    assert overrides["data.source"] == "synthetic"
    needles = ("no CUDA device found", "promote.require_provider=cpu", "verify.provider=cpu")
    assert any(all(needle in n for needle in needles) for n in notes)


def test_with_cuda_the_defaults_stay_and_extra_overrides_win() -> None:
    overrides, notes = quickstart_overrides(cuda=True, extra={"train.epochs": 1})
    assert not set(CPU_ONLY_OVERRIDES) & set(overrides)
    assert overrides["train.epochs"] == 1 and notes[-1] == "quickstart: and train.epochs=1"


def test_the_quickstart_overrides_are_valid_params() -> None:
    for cuda in (True, False):
        params = check_overrides(Workspace(PROJECT), quickstart_overrides(cuda, {})[0])
        assert params.data.source == "synthetic"


def test_cuda_presence_matches_torch() -> None:
    import torch

    assert cuda_present() == torch.cuda.is_available()


def _reports(root: Path, provider: str) -> Workspace:
    ws = Workspace(root)
    train_report().write(ws.train_summary)
    (ws.root / "model.onnx").write_bytes(b"onnx")
    export = export_contract(ws.root / "model.onnx", ws.root / "model.onnx", ["a", "b"], 3, 4)
    verification_report(export, provider).write(ws.verification)
    metrics_report(0.875, export.candidate_sha256, ["a", "b"]).write(ws.metrics)
    return ws


def test_the_closing_report_says_cuda_was_not_verified(tmp_path: Path) -> None:
    text = closing_report(_reports(tmp_path, "cpu"), SUMMARY, wall_s=100.0)
    verification = json.loads((tmp_path / "reports" / "verification.json").read_text())
    onnx = verification["accuracy"]["onnx"]
    assert f"test accuracy:  0.8750 on 2 images (macro F1 0.8750); the ONNX model: {onnx:.4f}" in text
    assert "trained on:     cpu (2 threads)" in text
    assert "verified with:  onnxruntime cpu" in text
    assert "CUDA was not verified" in text
    assert "production:     version 1" in text and "/ws/registry/m/1/model.onnx" in text
    assert "wall time:      100 s, of which 20 s (20%) outside stage processes" in text


def test_the_closing_report_does_not_deny_a_real_cuda_verification(tmp_path: Path) -> None:
    text = closing_report(_reports(tmp_path, "cuda"), SUMMARY, wall_s=100.0)
    assert "CUDA was not verified" not in text and "onnxruntime cuda" in text
