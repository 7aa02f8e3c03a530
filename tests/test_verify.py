"""verify: parity, whole-split accuracy, latency/throughput, and honest provider reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tasks import params
from tasks.blessing.reports import ExportReport, VerificationMetrics, VerificationReport
from tasks.errors import DataError
from tasks.export import export
from tasks.params import ExportParams, Params
from tasks.paths import Workspace
from tasks.verify import VerificationFailed, VerifySections, batch_of, verify

from candidate_factory import run_stage, tiny_candidate, write_params


def _params(ws: Workspace, **overrides: object) -> VerifySections:
    return _sections(write_params(
        ws,
        {
            "verify.provider": "cpu",
            "verify.odd_batch": 5,
            "verify.latency_runs": 5,
            "verify.throughput_runs": 2,
            "registry.max_batch_size": 16,
            **overrides,
        },
    ))


def _sections(p: Params) -> VerifySections:
    return params.sections(VerifySections, p)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """An export with the ImageNet-style evaluation view (resize 18, centre-crop 16) inside the graph."""
    ws = Workspace(tmp_path_factory.mktemp("verify"))
    tiny_candidate(ws, seed=5, n_test=12, size=16, eval_crop=0.875)
    export(ExportParams(opset=18, fp16=False), ws)
    return ws


def test_batch_of_repeats_a_small_split() -> None:
    images = np.arange(3)[:, None]
    batch, repeated = batch_of(images, 7)
    assert repeated and batch[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert batch_of(images, 2)[1] is False


@pytest.mark.integration
def test_verify_on_cpu_passes_and_says_cuda_was_not_verified(exported: Workspace) -> None:
    report = verify(_params(exported), exported)
    assert report == VerificationReport.read(exported.verification, "verify")
    assert ExportReport.read(exported.export_report, "export").normalization.eval_crop == 0.875
    assert "Resize" in {node.op_type for node in onnx.load(str(exported.onnx_model)).graph.node}
    assert report.passed and report.provider_requested == "cpu" and report.provider_active == "cpu"
    assert report.cuda_verified is False
    headline = VerificationMetrics.read(exported.verification_metrics, "verify")  # the DVC metrics
    assert headline.latency_p50_ms == report.latency_ms.p50
    assert headline.onnx_diff_of_atol == max(p.max_abs_diff for p in report.parity) / report.atol < 1
    assert [p.batch for p in report.parity] == [1, 5, 16]
    assert report.parity[-1].images_repeated is True
    assert all(p.max_abs_diff <= 1e-3 and p.top1_agreement == 1.0 for p in report.parity)
    assert report.accuracy.onnx == report.accuracy.torch and report.accuracy.n_test == 12
    assert 0 < report.latency_ms.p50 <= report.latency_ms.p95
    assert report.throughput.batch == 16 and report.throughput.io_binding is False
    assert report.versions.torch == torch.__version__ and report.versions.gpu is None


@pytest.mark.integration
def test_failed_parity_is_named_and_still_reported(exported: Workspace) -> None:
    with pytest.raises(VerificationFailed, match=r"parity_batch_1.*parity_batch_5.*parity_batch_16"):
        verify(_params(exported, **{"verify.atol": 1e-15}), exported)
    report = VerificationReport.read(exported.verification, "verify")
    assert report.passed is False and "parity_batch_16" in report.failures


@pytest.mark.integration
def test_verifying_a_stale_export_is_refused(exported: Workspace, tmp_path: Path) -> None:
    stale = Workspace(tmp_path)
    for path in (exported.export_report, exported.onnx_model):
        target = stale.root / path.relative_to(exported.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    tiny_candidate(stale, seed=6, n_test=12)  # retrained since the export
    with pytest.raises(DataError, match="exported from another"):
        verify(_params(stale), stale)


@pytest.mark.integration
def test_requesting_cuda_fails_clearly_where_cuda_is_not_active(exported: Workspace) -> None:
    _params(exported, **{"verify.provider": "cuda"})
    proc = run_stage(exported, "tasks.verify")
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr
        assert VerificationReport.read(exported.verification, "verify").cuda_verified is True
    else:
        assert proc.returncode == 1
        assert "RuntimeUnavailable: CUDAExecutionProvider is not active" in proc.stderr
        assert "verify.provider: cpu" in proc.stderr
