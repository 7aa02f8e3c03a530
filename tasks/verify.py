"""verify: prove export/model.onnx on its target onnxruntime provider -> reports/verification.json.

Checks (each named in the report and, when failed, in the error):
- the requested provider is the one really active (onnxruntime falls back to CPU silently);
- parity with PyTorch fp32 (TF32 off on both sides) on real test images at batch 1,
  verify.odd_batch and registry.max_batch_size: max abs diff <= verify.atol, top-1 agreement;
- the ONNX model's accuracy on the whole test split matches PyTorch's;
- the optional fp16 variant, on its own tolerance.
It also measures latency at batch 1 and throughput at registry.max_batch_size (IO binding on CUDA).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks import params
from tasks.blessing.onnx_session import Session, open_session, versions
from tasks.blessing.reports import (
    AccuracyMatch,
    Check,
    ExportReport,
    Fp16Verification,
    Latency,
    Parity,
    Throughput,
    VerificationMetrics,
    VerificationReport,
)
from tasks.blessing.scoring import torch_probabilities
from tasks.data.prepared import Images, PreparedSplit, load_split
from tasks.entry import StageSpec, run_stage
from tasks.errors import DataError, VisionopsError
from tasks.fs.hashing import file_digest
from tasks.params import RegistryParams, VerifyParams
from tasks.paths import Workspace

log = logging.getLogger(__name__)

WARMUP_RUNS = 3  # untimed runs before latency and throughput (allocator, kernel selection)


class VerificationFailed(VisionopsError):
    """The ONNX model failed a verification check; the message names each failed check."""


def read_export_report(ws: Workspace) -> ExportReport:
    """export/export.json, checked against the files it describes (no stale evidence)."""
    if not ws.export_report.is_file() or not ws.onnx_model.is_file():
        raise DataError(f"{ws.export_report} or {ws.onnx_model} missing: run the export stage first")
    report = ExportReport.read(ws.export_report, "export")
    if file_digest(ws.onnx_model) != report.sha256:
        raise DataError(f"{ws.onnx_model} does not match the sha256 in {ws.export_report}: rerun the export stage")
    return report


def batch_of(images: Images, size: int) -> tuple[np.ndarray, bool]:
    """The first ``size`` test images, repeated when the split is smaller; True when repeated."""
    if len(images) >= size:
        return np.ascontiguousarray(images[:size]), False
    reps = -(-size // len(images))
    return np.ascontiguousarray(np.concatenate([images[:]] * reps)[:size]), True


def parity(
    session: Session, model: Any, images: Images, batch: int, atol: float, min_agreement: float, device: Any
) -> Parity:
    """ONNX vs PyTorch on one batch of exactly ``batch`` images."""
    x, repeated = batch_of(images, batch)
    ort_out = session.run(x)
    torch_out = torch_probabilities(model, x, device)
    diff = float(np.max(np.abs(ort_out.astype(np.float64) - torch_out)))
    agreement = float(np.mean(ort_out.argmax(1) == torch_out.argmax(1)))
    finite = bool(np.isfinite(ort_out).all())
    return Parity(
        batch=batch,
        max_abs_diff=diff,
        top1_agreement=agreement,
        finite=finite,
        images_repeated=repeated,
        passed=finite and diff <= atol and agreement >= min_agreement,
    )


def latency_ms(session: Session, image: np.ndarray, runs: int) -> Latency:
    """p50/p95 wall latency of single-image requests (host arrays in and out, as a client sees it)."""
    for _ in range(WARMUP_RUNS):
        session.run(image)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(image)
        samples.append((time.perf_counter() - start) * 1000.0)
    return Latency(p50=float(np.percentile(samples, 50)), p95=float(np.percentile(samples, 95)), runs=runs)


def throughput(session: Session, images: np.ndarray, runs: int) -> Throughput:
    """Images per second at one large batch; on CUDA the input and output stay on the device."""
    io_binding = session.active == "cuda"
    if io_binding:
        import onnxruntime as ort

        binding = session.session.io_binding()
        binding.bind_ortvalue_input(session.input_name, ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
        binding.bind_output(session.output_name, "cuda")

        def step() -> None:
            session.session.run_with_iobinding(binding)

    else:

        def step() -> None:
            session.run(images)

    for _ in range(WARMUP_RUNS):
        step()
    start = time.perf_counter()
    for _ in range(runs):
        step()
    elapsed = time.perf_counter() - start
    return Throughput(batch=len(images), runs=runs, images_per_s=len(images) * runs / elapsed, io_binding=io_binding)


@dataclass(frozen=True)
class ModelVerification:
    """Parity at each batch size and whole-split accuracy of one ONNX model, with its checks."""

    parity: list[Parity]
    accuracy: AccuracyMatch
    checks: list[Check]


def _verify_model(
    session: Session, split: PreparedSplit, model: Any, p: VerifyParams, max_batch: int, atol: float, label: str
) -> ModelVerification:
    """Parity at each batch size and whole-split accuracy for one ONNX model."""
    import torch

    device = torch.device("cuda" if session.active == "cuda" else "cpu")
    checks: list[Check] = []
    parities = []
    for batch in sorted({1, p.odd_batch, max_batch}):
        result = parity(session, model, split.images, batch, atol, p.min_agreement, device)
        parities.append(result)
        checks.append(
            Check(
                f"{label}parity_batch_{batch}",
                result.passed,
                f"max abs diff {result.max_abs_diff:.3g} (atol {atol:g}), top-1 agreement"
                f" {result.top1_agreement:.4f} (min {p.min_agreement})"
                f"{'' if result.finite else ', NON-FINITE outputs'}",
            )
        )
    ort_probs = session.probabilities(split.images, max_batch)
    torch_probs = torch_probabilities(model, split.images, device)
    ort_acc = float(np.mean(ort_probs.argmax(1) == split.labels))
    torch_acc = float(np.mean(torch_probs.argmax(1) == split.labels))
    agreement = float(np.mean(ort_probs.argmax(1) == torch_probs.argmax(1)))
    # Accuracy may differ only through disagreeing images, so the same tolerance bounds both.
    tolerance = 1.0 - p.min_agreement
    accuracy = AccuracyMatch(
        onnx=ort_acc,
        torch=torch_acc,
        difference=ort_acc - torch_acc,
        tolerance=tolerance,
        top1_agreement=agreement,
        max_abs_diff=float(np.max(np.abs(ort_probs.astype(np.float64) - torch_probs))),
        n_test=len(split.labels),
    )
    checks.append(
        Check(
            f"{label}accuracy_matches_torch",
            abs(ort_acc - torch_acc) <= tolerance + 1e-12 and agreement >= p.min_agreement,
            f"ONNX {ort_acc:.4f} vs PyTorch {torch_acc:.4f} on {len(split.labels)} test images,"
            f" top-1 agreement {agreement:.4f}",
        )
    )
    return ModelVerification(parities, accuracy, checks)


@dataclass(frozen=True)
class VerifySections:
    """The params.yaml sections verify reads."""

    verify: VerifyParams
    registry: RegistryParams


SPEC = StageSpec(
    "verify",
    params=("verify", "registry.max_batch_size"),
    reads=lambda ws: [ws.exported, ws.candidate, ws.images("test"), ws.labels("test"), ws.classes],
    writes=lambda ws: [ws.verification, ws.verification_metrics],
)


def verify(sections: VerifySections, ws: Workspace) -> VerificationReport:
    """Verify the exported model (and its fp16 variant); write the report; raise if a check failed."""
    p = sections.verify
    max_batch = sections.registry.max_batch_size
    export_report = read_export_report(ws)
    if file_digest(ws.candidate) != export_report.candidate_sha256:
        raise DataError(f"{ws.onnx_model} was exported from another {ws.candidate}: rerun the export stage")
    session = open_session(ws.onnx_model, p.provider)  # first: a missing provider fails before any work
    from tasks.training.candidate import (
        Deployable,  # torch: once the provider is known to be there
    )

    split = load_split(ws, "test")
    model = Deployable.from_candidate(ws.candidate)
    fp32 = _verify_model(session, split, model, p, max_batch, p.atol, "")
    checks = list(fp32.checks)
    checks.insert(
        0,
        Check(
            "provider_active",
            True,
            f"requested {p.provider}, active {session.active}"
            + (f" (auto fell back: {session.fallback_reason})" if session.fallback_reason else ""),
        ),
    )
    log.info("provider requested %s, active %s", p.provider, session.active)
    lat = latency_ms(session, split.images[:1], p.latency_runs)
    big, _ = batch_of(split.images, max_batch)
    thr = throughput(session, big, p.throughput_runs)
    log.info(
        "latency p50 %.2f ms p95 %.2f ms; throughput %.0f images/s at batch %d",
        lat.p50,
        lat.p95,
        thr.images_per_s,
        max_batch,
    )
    fp16 = None
    if export_report.fp16 is not None:
        fp16_path = ws.exported / export_report.fp16.path
        if file_digest(fp16_path) != export_report.fp16.sha256:
            raise DataError(f"{fp16_path} does not match {ws.export_report}: rerun the export stage")
        fp16_session = open_session(fp16_path, p.provider)
        half = _verify_model(fp16_session, split, model, p, max_batch, p.fp16_atol, "fp16_")
        fp16 = Fp16Verification(
            parity=half.parity,
            accuracy=half.accuracy,
            latency_ms=latency_ms(fp16_session, split.images[:1], p.latency_runs),
            sha256=export_report.fp16.sha256,
        )
        checks.extend(half.checks)
    failures = [c.name for c in checks if not c.passed]
    report = VerificationReport(
        passed=not failures,
        failures=failures,
        provider_requested=p.provider,
        provider_active=session.active,
        cuda_verified=session.active == "cuda",
        fallback_reason=session.fallback_reason,
        onnx_sha256=export_report.sha256,
        candidate_sha256=export_report.candidate_sha256,
        atol=p.atol,
        min_agreement=p.min_agreement,
        parity=fp32.parity,
        accuracy=fp32.accuracy,
        latency_ms=lat,
        throughput=thr,
        fp16=fp16,
        checks=checks,
        versions=versions(session.active),
    )
    report.write(ws.verification)
    VerificationMetrics.of(report).write(ws.verification_metrics)
    if session.active != "cuda":
        log.warning("verified on the CPU: CUDA was NOT verified (cuda_verified: false in %s)", ws.verification)
    if failures:
        details = "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.passed)
        raise VerificationFailed(
            f"verification of {ws.onnx_model} failed {', '.join(failures)} ({details}); see {ws.verification}"
        )
    return report


def main() -> None:
    verify(params.sections(VerifySections, params.load()), Workspace.here())


if __name__ == "__main__":
    run_stage(main)
