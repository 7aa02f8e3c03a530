"""The reports of train, evaluate, export and verify: the evidence a promotion reads, typed once.

Each stage writes its report with ``Report.write``; promotion, the Prefect artifacts, the
quickstart and the tests read it back with ``Report.read``, so a renamed field fails where it is
read. The card (tasks/blessing/evidence.py) embeds them as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.blessing.gate import FloorCheck
from tasks.fs.records import Record


@dataclass(frozen=True)
class TrainReport(Record):
    """reports/train.json."""

    test_accuracy: float  # in-training accuracy of the final weights, PyTorch, on the test split
    train_loss: float
    epochs: int
    train_seconds: float  # training steps only, summed over epochs (also those before a resume)
    images_per_s: float
    resumed_from_epoch: int  # 0 = trained from scratch
    device: str  # cuda | cpu
    device_name: str  # e.g. "cpu (2 threads)"
    batch_size: int
    steps_per_epoch: int
    peak_lr: float
    weights: str  # where training started from
    data_placement: str = "device"  # device (whole splits held there) | streamed (from prepared/)
    # Data-parallel training: batch_size is the global batch, images_per_s the whole job's.
    world_size: int = 1  # training processes, all nodes together
    nnodes: int = 1
    backend: str = "none"  # nccl | gloo | none (one process)
    per_rank_batch_size: int = 0  # batch_size / world_size; 0 in reports written before it existed


@dataclass(frozen=True)
class ClassScores(Record):
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class MetricsReport(Record):
    """reports/metrics.json: every score of evaluate, per class included (its headline: EvaluationMetrics)."""

    accuracy: float
    macro_f1: float
    n_test: int
    per_class: dict[str, ClassScores]
    gate: FloorCheck
    classes: list[str]
    confusion_matrix: list[list[int]]  # [actual][predicted]
    device: str
    candidate_sha256: str  # of models/candidate.pt, so a report cannot vouch for another candidate


@dataclass(frozen=True)
class GateVerdict(Record):
    passed: bool
    reasons: str  # every floor the candidate missed, "; "-joined; empty when it passed


@dataclass(frozen=True)
class EvaluationMetrics(Record):
    """metrics/evaluate.json, DVC metrics: the headline of reports/metrics.json, a few columns wide
    so that `dvc metrics show` and `dvc exp show` can put experiments side by side."""

    accuracy: float
    macro_f1: float
    gate: GateVerdict  # the floor's verdict: a failing candidate is recorded, not crashed on

    @classmethod
    def of(cls, report: MetricsReport) -> EvaluationMetrics:
        return cls(report.accuracy, report.macro_f1, GateVerdict(report.gate.passed, "; ".join(report.gate.failures)))


@dataclass(frozen=True)
class InputContract(Record):
    """What a consumer feeds the exported model; the same fields go to config.pbtxt and the card."""

    name: str
    dtype: str
    layout: str
    shape: list[str | int]  # ["batch", C, H, W]
    channels: int
    image_size: int
    color: str
    scale: str


@dataclass(frozen=True)
class OutputContract(Record):
    name: str
    dtype: str
    shape: list[str | int]  # ["batch", classes]
    meaning: str


@dataclass(frozen=True)
class Normalization(Record):
    mean: list[float]  # per channel, 0..1 scale
    std: list[float]
    baked_in: bool  # inside the ONNX graph: consumers feed raw pixels
    eval_crop: float = 1.0  # inside the graph too: resize to size / eval_crop, keep the centre; 1.0 = none


@dataclass(frozen=True)
class Fp16Export(Record):
    path: str  # file name in export/
    sha256: str
    exporter: str


@dataclass(frozen=True)
class ExportReport(Record):
    """export/export.json: the exported files, their hashes and their input/output contract."""

    model: str  # file name in export/
    sha256: str
    candidate_sha256: str
    opset: int
    exporter: str  # dynamo | torchscript
    torch: str
    input: InputContract
    output: OutputContract
    classes: list[str]
    normalization: Normalization
    arch: str
    stem: str
    fp16: Fp16Export | None


@dataclass(frozen=True)
class Parity(Record):
    batch: int
    max_abs_diff: float
    top1_agreement: float
    finite: bool
    images_repeated: bool  # the split was smaller than the batch
    passed: bool


@dataclass(frozen=True)
class AccuracyMatch(Record):
    onnx: float
    torch: float
    difference: float
    tolerance: float
    top1_agreement: float
    max_abs_diff: float
    n_test: int


@dataclass(frozen=True)
class Latency(Record):
    p50: float  # ms
    p95: float
    runs: int


@dataclass(frozen=True)
class Throughput(Record):
    batch: int
    runs: int
    images_per_s: float
    io_binding: bool


@dataclass(frozen=True)
class Fp16Verification(Record):
    parity: list[Parity]
    accuracy: AccuracyMatch
    latency_ms: Latency
    sha256: str


@dataclass(frozen=True)
class Check(Record):
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Versions(Record):
    """What ran the verification; CUDA fields are None when CUDA was not used."""

    python: str
    torch: str
    onnxruntime: str
    onnx_opset_max: int
    cpu: str
    cuda: str | None
    cudnn: str | None
    driver: str | None
    gpu: str | None


@dataclass(frozen=True)
class VerificationReport(Record):
    """reports/verification.json: every check of verify (its headline: VerificationMetrics)."""

    passed: bool
    failures: list[str]  # names of failed checks
    provider_requested: str  # auto | cuda | cpu
    provider_active: str  # cuda | cpu: what really ran
    cuda_verified: bool
    fallback_reason: str | None
    onnx_sha256: str
    candidate_sha256: str
    atol: float
    min_agreement: float
    parity: list[Parity]
    accuracy: AccuracyMatch
    latency_ms: Latency
    throughput: Throughput
    fp16: Fp16Verification | None
    checks: list[Check]
    versions: Versions


@dataclass(frozen=True)
class VerificationMetrics(Record):
    """metrics/verify.json, DVC metrics: the headline of reports/verification.json."""

    # The worst |ONNX - PyTorch fp32| over the checked batches as a share of verify.atol (below 1
    # passes): the raw difference (~1e-7) would show as 0.0 at `dvc metrics show`'s 5 decimals.
    onnx_diff_of_atol: float
    latency_p50_ms: float  # batch 1, on the active provider

    @classmethod
    def of(cls, report: VerificationReport) -> VerificationMetrics:
        return cls(max(p.max_abs_diff for p in report.parity) / report.atol, report.latency_ms.p50)
