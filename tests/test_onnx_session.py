"""onnxruntime sessions: the requested provider must be the one really active."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.blessing.onnx_session import open_session, versions
from tasks.errors import RuntimeUnavailable

from candidate_factory import pixel_reader_onnx


def _cuda_really_works() -> bool:
    import torch  # an independent witness: onnxruntime-gpu lists CUDA even where it cannot run

    return torch.cuda.is_available()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    pixel_reader_onnx(tmp_path / "m.onnx", k=3, channels=3, size=4, read_channel=0)
    return tmp_path / "m.onnx"


def test_cpu_session_runs_and_batches(model: Path) -> None:
    session = open_session(model, "cpu")
    assert session.active == "cpu" and session.session.get_providers() == ["CPUExecutionProvider"]
    images = np.zeros((5, 3, 4, 4), dtype=np.uint8)
    images[np.arange(5), 0, 0, [0, 1, 2, 0, 1]] = 255
    probs = session.probabilities(images, batch_size=2)
    assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1.0)
    assert probs.argmax(1).tolist() == [0, 1, 2, 0, 1]


def test_cuda_is_demanded_not_assumed(model: Path) -> None:
    if _cuda_really_works():
        session = open_session(model, "cuda")
        assert session.active == "cuda" and "CUDAExecutionProvider" in session.session.get_providers()
    else:
        with pytest.raises(RuntimeUnavailable, match="CUDAExecutionProvider is not active"):
            open_session(model, "cuda")


def test_auto_reports_what_it_fell_back_to(model: Path) -> None:
    session = open_session(model, "auto")
    assert session.active == ("cuda" if _cuda_really_works() else "cpu")
    assert (session.fallback_reason is None) == (session.active == "cuda")
    info = versions(session.active)
    assert info.onnxruntime and info.torch
    assert (info.gpu is None) == (session.active == "cpu")


def test_missing_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="run the export stage"):
        open_session(tmp_path / "absent.onnx", "cpu")
