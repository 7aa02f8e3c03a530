"""`visionops quickstart`: the whole pipeline offline on the synthetic source, sized for a CPU.

It says plainly what it changed (CPU verification when there is no CUDA), which device trained,
which onnxruntime provider verified, and never claims a CUDA verification it did not do.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks.paths import Workspace

if TYPE_CHECKING:
    from flows.pipeline import RunSummary

# Synthetic data and epochs small enough for a 2-core CPU in a few minutes, still above the gate.
QUICKSTART_OVERRIDES: dict[str, Any] = {
    "data.source": "synthetic",
    "data.image_size": 16,  # px: a quarter of the 32 px compute; the synthetic classes stay apart
    "data.synthetic.train_per_class": 150,  # images
    "data.synthetic.test_per_class": 50,  # images
    "train.epochs": 6,  # 0.965 test accuracy measured with these settings (benchmarks/RESULTS.md)
}
# Without CUDA the default params.yaml (verify on CUDA, promote only CUDA-verified models) cannot
# promote anything; the quickstart verifies on CPU instead and says so.
CPU_ONLY_OVERRIDES: dict[str, Any] = {"promote.require_provider": "cpu", "verify.provider": "cpu"}


def cuda_present() -> bool:
    """A CUDA driver with at least one device, asked directly (importing torch costs seconds)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return libcuda.cuInit(0) == 0 and libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def quickstart_overrides(cuda: bool, extra: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The overrides of a quickstart run (``extra`` last, so it wins) and what to tell the user."""
    overrides = dict(QUICKSTART_OVERRIDES)
    notes = ["quickstart: " + " ".join(f"{k}={v}" for k, v in QUICKSTART_OVERRIDES.items())]
    if not cuda:
        overrides.update(CPU_ONLY_OVERRIDES)
        notes.append(
            "quickstart: no CUDA device found, so verifying on CPU: overriding "
            + " and ".join(f"{k}={v}" for k, v in CPU_ONLY_OVERRIDES.items())
        )
    overrides.update(extra)
    if extra:
        notes.append("quickstart: and " + " ".join(f"{k}={v}" for k, v in extra.items()))
    return overrides, notes


def closing_report(ws: Workspace, summary: RunSummary, wall_s: float) -> str:
    """What trained where, what was verified on which provider, what is in production, how long."""
    from tasks.blessing.reports import MetricsReport, TrainReport, VerificationReport

    train = TrainReport.read(ws.train_summary, "train")
    metrics = MetricsReport.read(ws.metrics, "evaluate")
    verification = VerificationReport.read(ws.verification, "verify")
    outside = max(wall_s - sum(summary.stage_seconds.values()), 0.0)
    lines = [
        f"test accuracy:  {metrics.accuracy:.4f} on {metrics.n_test} images (macro F1 {metrics.macro_f1:.4f});"
        f" the ONNX model: {verification.accuracy.onnx:.4f}",
        f"trained on:     {train.device_name}",
        f"verified with:  onnxruntime {verification.provider_active}",
    ]
    if not verification.cuda_verified:
        lines.append("CUDA was not verified: the model was verified on the CPU only")
    lines += [
        f"production:     version {summary.production_version}",
        f"model:          {summary.model_path}",
        f"wall time:      {wall_s:.0f} s, of which {outside:.0f} s ({100 * outside / wall_s:.0f}%) outside"
        " stage processes (Prefect server and imports, task bookkeeping)",
    ]
    return "\n".join(lines)
