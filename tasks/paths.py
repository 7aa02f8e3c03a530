"""Every path of a visionops workspace, derived in one place.

A workspace is a git+DVC repository holding params.yaml, dvc.yaml and data.dvc. dvc.yaml names
the same relative paths as literals; tests/test_dvc_yaml.py keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS: tuple[str, str] = ("train", "test")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def here(cls) -> Workspace:
        return cls(Path.cwd())

    # inputs
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    # ingest: raw data, versioned by data.dvc
    @property
    def data(self) -> Path:
        """Parquet shards of encoded images per split (their names: tasks/data/raw.py) and source.json."""
        return self.root / "data"

    @property
    def data_dvc(self) -> Path:
        """DVC's record of the current data/ version (``dvc add data``)."""
        return self.root / "data.dvc"

    @property
    def data_source(self) -> Path:
        """Where the raw data came from: source, checksum, counts (JSON)."""
        return self.data / "source.json"

    # prepare
    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def images(self, split: str) -> Path:
        """uint8 array of shape (N, C, H, W)."""
        return self.prepared / f"{split}_images.npy"

    def labels(self, split: str) -> Path:
        """int64 array of shape (N,)."""
        return self.prepared / f"{split}_labels.npy"

    @property
    def manifest(self) -> Path:
        return self.prepared / "manifest.parquet"

    @property
    def classes(self) -> Path:
        """JSON list of class names; index = label."""
        return self.prepared / "classes.json"

    @property
    def prepare_report(self) -> Path:
        """JSON: counts, corrupt files by path."""
        return self.prepared / "prepare_report.json"

    # validate
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation(self) -> Path:
        return self.reports / "validation.json"

    @property
    def data_docs(self) -> Path:
        return self.reports / "data_docs"

    # train
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def candidate(self) -> Path:
        """torch checkpoint: state_dict, arch, stem, classes, resolved params."""
        return self.models / "candidate.pt"

    @property
    def train_summary(self) -> Path:
        return self.reports / "train.json"

    @property
    def train_history(self) -> Path:
        """CSV, one row per epoch: epoch, train_loss, test_accuracy, lr, images_per_s."""
        return self.reports / "train_history.csv"

    @property
    def checkpoints(self) -> Path:
        """Per-epoch resume checkpoints, outside DVC's outputs so a rerun can resume."""
        return self.state / "checkpoints"

    # evaluate
    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def evaluation_metrics(self) -> Path:
        """DVC metrics of evaluate: accuracy, macro F1 and the floor's verdict (per-class scores stay in metrics)."""
        return self.root / "metrics" / "evaluate.json"

    @property
    def confusion(self) -> Path:
        """CSV of (actual, predicted) class names, one row per test image, for `dvc plots`."""
        return self.reports / "confusion.csv"

    # export
    @property
    def exported(self) -> Path:
        return self.root / "export"

    @property
    def onnx_model(self) -> Path:
        return self.exported / "model.onnx"

    @property
    def onnx_model_fp16(self) -> Path:
        return self.exported / "model.fp16.onnx"

    @property
    def export_report(self) -> Path:
        return self.exported / "export.json"

    # verify
    @property
    def verification(self) -> Path:
        return self.reports / "verification.json"

    @property
    def verification_metrics(self) -> Path:
        """DVC metrics of verify: ONNX parity and latency."""
        return self.root / "metrics" / "verify.json"

    # runtime state, git-ignored
    @property
    def state(self) -> Path:
        return self.root / ".visionops"

    @property
    def registry_cache(self) -> Path:
        """Local copies of files from a remote (fsspec URL) registry."""
        return self.state / "registry-cache"

    @property
    def promotion_decision(self) -> Path:
        """JSON of the last promotion decision, promoted or rejected (a rejection writes no registry file)."""
        return self.state / "promotion.json"

    @property
    def staging(self) -> Path:
        """Work folders of ingest and prepare, renamed into place when complete (same disk as data/)."""
        return self.state / "staging"

    @property
    def pipeline_lock(self) -> Path:
        return self.state / "pipeline.lock"

    def registry_uri(self, uri: str) -> str:
        """registry.uri from params.yaml: a URL as is, a relative local path under the workspace."""
        if "://" in uri or Path(uri).is_absolute():
            return uri
        return str(self.root / uri)
