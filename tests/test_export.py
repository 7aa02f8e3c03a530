"""export: a checked ONNX file with a dynamic batch axis, preprocessing inside, and its contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tasks.blessing.reports import ExportReport
from tasks.export import export
from tasks.fs.hashing import file_digest
from tasks.params import ExportParams
from tasks.paths import Workspace

from candidate_factory import tiny_candidate

pytestmark = pytest.mark.integration  # torch.onnx export: seconds per model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("export"))
    tiny_candidate(ws, seed=3)
    export(ExportParams(opset=18, fp16=True), ws)
    return ws


def _by_hand(ws: Workspace, images: np.ndarray) -> np.ndarray:
    """The candidate's classifier fed by normalisation written out here, not by tasks.training.models."""
    from tasks.training.candidate import load_candidate

    candidate = load_candidate(ws.candidate)
    mean = torch.tensor(candidate.normalization["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(candidate.normalization["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        x = (torch.from_numpy(images).float() / 255.0 - mean) / std
        return torch.softmax(candidate.classifier()(x), dim=1).numpy()


def test_graph_has_the_documented_contract(exported: Workspace) -> None:
    model = onnx.load(str(exported.onnx_model))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    in_type, out_type = inp.type.tensor_type, out.type.tensor_type
    assert (inp.name, in_type.elem_type) == ("image", onnx.TensorProto.UINT8)
    assert [d.dim_param or d.dim_value for d in in_type.shape.dim] == ["batch", 3, 8, 8]
    assert (out.name, out_type.elem_type) == ("probabilities", onnx.TensorProto.FLOAT)
    assert [d.dim_param or d.dim_value for d in out_type.shape.dim] == ["batch", 3]
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in model.opset_import)


@pytest.mark.parametrize("batch", [1, 5])
def test_any_batch_gives_probabilities_with_preprocessing_baked_in(exported: Workspace, batch: int) -> None:
    images = np.random.default_rng(batch).integers(0, 256, (batch, 3, 8, 8), dtype=np.uint8)
    session = ort.InferenceSession(str(exported.onnx_model), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"image": images})[0]
    assert probs.shape == (batch, 3) and probs.dtype == np.float32 and np.isfinite(probs).all()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, _by_hand(exported, images), atol=1e-5)


def test_export_json_records_contract_and_hashes(exported: Workspace) -> None:
    report = ExportReport.read(exported.export_report, "export")
    assert report.sha256 == file_digest(exported.onnx_model)
    assert report.candidate_sha256 == file_digest(exported.candidate)
    i = report.input
    assert (i.dtype, i.layout, i.image_size, i.channels, i.shape) == ("uint8", "NCHW", 8, 3, ["batch", 3, 8, 8])
    assert report.output.shape == ["batch", 3] and report.classes == ["cat", "dog", "eel"]
    assert report.opset == 18 and report.exporter in ("dynamo", "torchscript")
    assert report.fp16 is not None and report.fp16.sha256 == file_digest(exported.onnx_model_fp16)


def test_fp16_variant_keeps_the_contract_and_stays_close(exported: Workspace) -> None:
    model = onnx.load(str(exported.onnx_model_fp16))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    probs = ort.InferenceSession(str(exported.onnx_model_fp16), providers=["CPUExecutionProvider"]).run(
        None, {"image": images}
    )[0]
    np.testing.assert_allclose(probs, _by_hand(exported, images), atol=1e-2)
