"""Tiny candidates, test splits, ONNX models and evidence files for the blessing tests.

Two kinds of model:
- `tiny_candidate`: a real torchvision ResNet-18 candidate.pt (8x8 images) for evaluate/export/verify;
- `pixel_reader_onnx`: a hand-built ONNX classifier whose answer is written into the images
  (channel ``read_channel``, row 0, columns 0..K-1), so a test decides exactly which images each
  model gets right. Promotion and registry tests use it: no torch, no export, milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks import params as params_mod
from tasks.downloads import file_digest
from tasks.params import Params
from tasks.paths import Workspace

PROJECT = Path(__file__).resolve().parents[1]

CLASSES3 = ["cat", "dog", "eel"]


def write_params(ws: Workspace, overrides: dict[str, Any]) -> Params:
    """The project's params.yaml with ``overrides`` (DVC -S meaning), written into ``ws``."""
    raw = params_mod.apply_overrides(params_mod.read_raw(PROJECT / "params.yaml"), overrides)
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.params_file.write_text(yaml.safe_dump(raw))
    return params_mod.parse(raw)


def stage_command(module: str) -> dict[str, Any]:
    """``python -m <module>`` in a workspace, importing this checkout's tasks/ (a real process)."""
    return {"args": [sys.executable, "-m", module], "env": {**os.environ, "PYTHONPATH": str(PROJECT)}, "text": True}


def run_stage(ws: Workspace, module: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # Exit codes are what the tests assert on, so no check=True.
    return subprocess.run(**stage_command(module), cwd=ws.root, capture_output=True, timeout=timeout, check=False)


def write_split(ws: Workspace, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    ws.prepared.mkdir(parents=True, exist_ok=True)
    np.save(ws.images("test"), images.astype(np.uint8))
    np.save(ws.labels("test"), labels.astype(np.int64))
    ws.classes.write_text(json.dumps(classes))


def tiny_candidate(ws: Workspace, seed: int = 0, k: int = 3, size: int = 8, n_test: int = 24) -> None:
    """A real (untrained) ResNet-18 candidate.pt in the documented format, plus a random test split."""
    import torch

    from tasks.models import build_model

    torch.manual_seed(seed)
    model = build_model("resnet18", "cifar", k, 3)
    ws.models.mkdir(parents=True, exist_ok=True)
    classes = CLASSES3[:k] if k <= 3 else [f"class{i}" for i in range(k)]
    torch.save(
        {
            "state_dict": model.state_dict(),
            "arch": "resnet18",
            "stem": "cifar",
            "num_classes": k,
            "in_channels": 3,
            "image_size": size,
            "classes": classes,
            "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]},
            "params": {},
            "device": "cpu",
            "metrics": {"test_accuracy": 0.0},
        },
        ws.candidate_weights,
    )
    rng = np.random.default_rng(seed)
    write_split(ws, rng.integers(0, 256, (n_test, 3, size, size), dtype=np.uint8), rng.integers(0, k, n_test), classes)


def pixel_reader_onnx(path: Path, k: int, channels: int, size: int, read_channel: int) -> None:
    """ONNX: uint8 (N, C, S, S) -> softmax of pixels [read_channel, 0, 0:k] (scaled) as (N, k)."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["f", "starts", "ends", "axes"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Softmax", ["m"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "pixel_reader",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k])],
        initializer=[
            const("starts", [read_channel, 0, 0]),
            const("ends", [read_channel + 1, 1, k]),
            const("axes", [1, 2, 3]),
            const("shape", [-1, k]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def answers_images(answers: list[np.ndarray], k: int, size: int = 4) -> np.ndarray:
    """Images whose channel c tells a pixel reader of channel c to answer ``answers[c]``."""
    n = len(answers[0])
    images = np.zeros((n, len(answers), size, size), dtype=np.uint8)
    for c, ans in enumerate(answers):
        images[np.arange(n), c, 0, np.asarray(ans)] = 255
    return images


def answers_for(labels: np.ndarray, correct: np.ndarray, k: int) -> np.ndarray:
    """Predictions that are right exactly where ``correct`` is True."""
    return np.where(correct, labels, (labels + 1) % k)


def export_contract(onnx_path: Path, weights: Path, classes: list[str], channels: int, size: int) -> dict[str, Any]:
    return {
        "model": onnx_path.name,
        "sha256": file_digest(onnx_path),
        "candidate_sha256": file_digest(weights),
        "opset": 18,
        "exporter": "hand-built",
        "input": {
            "name": "image",
            "dtype": "uint8",
            "layout": "NCHW",
            "shape": ["batch", channels, size, size],
            "channels": channels,
            "image_size": size,
        },
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["batch", len(classes)]},
        "classes": classes,
        "fp16": None,
    }


def pixel_reader_candidate(
    ws: Workspace,
    read_channel: int,
    accuracy: float = 0.9,
    provider: str = "cpu",
    gate_passed: bool = True,
    weights_bytes: int = 1024,
) -> None:
    """A complete, consistent candidate: candidate.pt (opaque bytes), model.onnx and every report.

    The test split (write it first with `write_split`) decides what the ONNX model answers.
    """
    split_channels = int(np.load(ws.images("test"), mmap_mode="r").shape[1])
    size = int(np.load(ws.images("test"), mmap_mode="r").shape[2])
    classes = json.loads(ws.classes.read_text())
    ws.models.mkdir(parents=True, exist_ok=True)
    ws.candidate_weights.write_bytes(np.random.default_rng(read_channel).bytes(weights_bytes))
    pixel_reader_onnx(ws.onnx_model, len(classes), split_channels, size, read_channel)
    contract = export_contract(ws.onnx_model, ws.candidate_weights, classes, split_channels, size)
    ws.export_report.write_text(json.dumps(contract))
    ws.reports.mkdir(parents=True, exist_ok=True)
    ws.metrics.write_text(
        json.dumps(
            {
                "accuracy": accuracy,
                "macro_f1": accuracy,
                "n_test": 1,
                "gate": {
                    "passed": gate_passed,
                    "min_accuracy": 0.5,
                    "failures": [] if gate_passed else ["accuracy too low"],
                },
                "candidate_sha256": contract["candidate_sha256"],
            }
        )
    )
    ws.verification.write_text(
        json.dumps(
            {
                "passed": True,
                "failures": [],
                "provider_requested": provider,
                "provider_active": provider,
                "cuda_verified": provider == "cuda",
                "onnx_sha256": contract["sha256"],
                "candidate_sha256": contract["candidate_sha256"],
            }
        )
    )
    ws.validation.write_text(json.dumps({"success": True, "checks": [], "data_profile": {"pixel_mean": 0.1}}))
