"""onnxruntime sessions on a provider that is really active, and the versions of what ran them.

onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot load (no driver, wrong cuDNN)
and then silently runs on the CPU. `open_session` therefore asks the session which providers it
actually got and fails when the requested one is not among them.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tasks.blessing.reports import Versions
from tasks.data.prepared import Images, image_batches
from tasks.errors import RuntimeUnavailable

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

Provider = Literal["cuda", "cpu"]
ProviderRequest = Literal["auto", "cuda", "cpu"]

ORT_PROVIDER: dict[str, str] = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# TF32 off: parity with PyTorch fp32 is measured against full-precision matmuls and convolutions.
CUDA_OPTIONS: dict[str, str] = {"use_tf32": "0"}


@dataclass(frozen=True)
class Session:
    """An onnxruntime session and the provider that really runs it."""

    session: onnxruntime.InferenceSession
    requested: ProviderRequest
    active: Provider
    fallback_reason: str | None  # why `auto` ended on the CPU; None otherwise

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def output_name(self) -> str:
        return self.session.get_outputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) float32 for uint8 images (N, C, H, W)."""
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def probabilities(self, images: Images, batch_size: int) -> np.ndarray:
        """`run` over any number of images, read and scored ``batch_size`` at a time."""
        if len(images) == 0:
            raise ValueError("no images to score")
        what = f"scoring with onnxruntime ({self.active})"
        return np.concatenate([self.run(batch) for batch in image_batches(images, batch_size, what)])


_cuda_failure: list[str] = []  # why CUDA could not be had, once tried in this process


def _session(model: Path | bytes, providers: list[Any]) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a fallback is reported by `open_session` itself
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), sess_options=options, providers=providers
    )


def _try_cuda(model: Path | bytes) -> tuple[onnxruntime.InferenceSession | None, str | None]:
    """A session that asked for CUDA (it may have fallen back to the CPU), or None; and why no CUDA."""
    import onnxruntime as ort

    if ORT_PROVIDER["cuda"] not in ort.get_available_providers():
        return None, f"this onnxruntime build ({ort.__version__}) has no CUDAExecutionProvider"
    if _cuda_failure:  # it failed for an earlier model in this process; it will fail again
        return None, _cuda_failure[0]
    # onnxruntime prints its own error when the CUDA libraries cannot load; the caller reports it.
    ort.set_default_logger_severity(4)
    try:
        session = _session(model, [(ORT_PROVIDER["cuda"], CUDA_OPTIONS), ORT_PROVIDER["cpu"]])
    finally:
        ort.set_default_logger_severity(2)
    active = session.get_providers()
    if ORT_PROVIDER["cuda"] in active:
        return session, None
    _cuda_failure.append(
        f"onnxruntime {ort.__version__} lists CUDAExecutionProvider but the session fell back to {active}"
        " (no GPU, or the CUDA/cuDNN libraries onnxruntime needs are missing)"
    )
    return session, _cuda_failure[0]


def open_session(model: Path | bytes, provider: ProviderRequest) -> Session:
    """Load ``model`` on ``provider``: cuda and cpu are demands, auto is cuda when it really works."""
    if isinstance(model, Path) and not model.is_file():
        raise RuntimeUnavailable(f"ONNX model {model} not found: run the export stage first")
    if provider not in ("auto", "cuda", "cpu"):
        raise ValueError(f"provider must be auto, cuda or cpu, got {provider!r}")
    session, reason = None, None
    if provider in ("cuda", "auto"):
        session, reason = _try_cuda(model)
        if reason is None:
            return Session(session, provider, "cuda", None)
        if provider == "cuda":
            raise RuntimeUnavailable(
                f"CUDAExecutionProvider is not active: {reason}. Run on a CUDA machine, or set"
                " verify.provider: cpu (and promote.require_provider: cpu) to verify on the CPU"
            )
        if session is not None:  # said once per process, at the first fallback
            log.warning("provider auto: CUDA is not usable (%s); running on the CPU", reason)
    if session is None:
        session = _session(model, [ORT_PROVIDER["cpu"]])
    if session.get_providers() != [ORT_PROVIDER["cpu"]]:
        raise RuntimeUnavailable(f"expected only CPUExecutionProvider to be active, got {session.get_providers()}")
    return Session(session, provider, "cpu", reason)


def versions(active: Provider) -> Versions:
    """torch, onnxruntime, CUDA, cuDNN, driver and GPU name; CUDA fields are None when not used."""
    import onnxruntime as ort
    import torch

    cuda = active == "cuda" and torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if cuda else None
    return Versions(
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=ort.__version__,
        onnx_opset_max=_max_opset(),
        cpu=platform.processor() or platform.machine(),
        cuda=torch.version.cuda if cuda else None,
        cudnn=str(cudnn) if cudnn else None,
        driver=_nvidia_driver() if cuda else None,
        gpu=torch.cuda.get_device_name(0) if cuda else None,
    )


def _max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None when it cannot be asked."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s); driver version not recorded", exc)
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
