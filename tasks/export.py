"""export: models/candidate.pt -> export/model.onnx (+ optional model.fp16.onnx) and export/export.json.

The exported graph is `Deployable`: uint8 NCHW images in, float32 softmax probabilities out, with
scaling and normalisation inside, so a consumer (Triton, `visionops predict`) needs no constants.
export.json records that input contract and the files' sha256, which verify and promote check.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import params
from tasks.blessing.reports import (
    ExportReport,
    Fp16Export,
    InputContract,
    Normalization,
    OutputContract,
)
from tasks.entry import StageSpec, run_stage
from tasks.errors import VisionopsError
from tasks.fs.hashing import file_digest
from tasks.params import ExportParams
from tasks.paths import Workspace

if TYPE_CHECKING:
    import onnx
    from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"


class ExportFailed(VisionopsError):
    """torch.onnx could not export the candidate, or onnx.checker rejected the result."""


def input_contract(channels: int, image_size: int) -> InputContract:
    """What a consumer must feed the model: the same fields go to config.pbtxt and the card."""
    return InputContract(
        name=INPUT_NAME,
        dtype="uint8",
        layout="NCHW",
        shape=[BATCH_DIM, channels, image_size, image_size],
        channels=channels,
        image_size=image_size,
        color="grayscale" if channels == 1 else "RGB",
        scale="raw 0..255 pixels; scaling and normalisation are inside the graph",
    )


def _half(classifier: nn.Module) -> nn.Module:
    """The classifier in float16 behind a float32 boundary, so the fp16 file keeps the same contract."""
    from torch import nn

    class HalfPrecision(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner.half()

        def forward(self, x):
            return self.inner(x.half())

    return HalfPrecision(classifier)


def _name_batch_axis(model: onnx.ModelProto) -> None:
    """torch.export names the dynamic axis ``s0``-like; consumers read ``batch`` more easily."""
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_param or not dim.HasField("dim_value"):
            dim.dim_param = BATCH_DIM


def export_onnx(module: nn.Module, example: Any, out: Path, opset: int) -> str:
    """Export ``module`` to ``out`` atomically and check it; returns the exporter that worked."""
    import onnx
    import torch

    for noisy in ("onnxscript", "onnx_ir"):  # per-pass INFO lines drown the stage's own log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                external_data=False,
                verbose=False,
            )
            assert program is not None  # dynamo=True always returns an ONNXProgram
            program.save(str(tmp))
            exporter = "dynamo"
        except Exception as exc:
            log.warning(
                "torch.onnx dynamo export failed (%s: %s); using the TorchScript exporter", type(exc).__name__, exc
            )
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
            )
            exporter = "torchscript"
        model = onnx.load(str(tmp))
        _name_batch_axis(model)
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportFailed(f"onnx.checker rejected the export of {out.name}: {exc}") from exc
        onnx.save(model, str(tmp))
        tmp.chmod(0o644)  # mkstemp creates 0600; the file is published to other readers
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return exporter


SPEC = StageSpec(
    "export",
    params=("export",),
    reads=lambda ws: [ws.candidate, ws.metrics],
    writes=lambda ws: [ws.exported],
)


def export(p: ExportParams, ws: Workspace) -> ExportReport:
    """Export the candidate (and its fp16 variant when ``export.fp16``) and write export.json."""
    import torch

    from tasks.training.candidate import Deployable, load_candidate

    candidate = load_candidate(ws.candidate)
    contract_in = input_contract(candidate.in_channels, candidate.image_size)
    c, s = contract_in.channels, contract_in.image_size
    # Batch 2: torch.export specialises a dimension seen as 0 or 1.
    example = torch.randint(0, 256, (2, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    log.info(
        "exporting %s (%s, %d classes, %dx%dx%d) at opset %d",
        ws.candidate, candidate.arch, candidate.num_classes, c, s, s, p.opset,
    )
    exporter = export_onnx(Deployable.of(candidate), example, ws.onnx_model, p.opset)
    fp16: Fp16Export | None = None
    if p.fp16:
        half = Deployable.of(candidate, _half(candidate.classifier()))
        fp16_exporter = export_onnx(half, example, ws.onnx_model_fp16, p.opset)
        fp16 = Fp16Export(path=ws.onnx_model_fp16.name, sha256=file_digest(ws.onnx_model_fp16), exporter=fp16_exporter)
    else:
        ws.onnx_model_fp16.unlink(missing_ok=True)  # a stale fp16 file must not outlive its setting
    norm = candidate.normalization
    report = ExportReport(
        model=ws.onnx_model.name,
        sha256=file_digest(ws.onnx_model),
        candidate_sha256=file_digest(ws.candidate),
        opset=p.opset,
        exporter=exporter,
        torch=torch.__version__,
        input=contract_in,
        output=OutputContract(
            name=OUTPUT_NAME,
            dtype="float32",
            shape=[BATCH_DIM, candidate.num_classes],
            meaning="softmax probabilities, index = class (classes)",
        ),
        classes=list(candidate.classes),
        normalization=Normalization(
            mean=list(norm["mean"]), std=list(norm["std"]), baked_in=True, eval_crop=candidate.eval_crop
        ),
        arch=candidate.arch,
        stem=candidate.stem,
        fp16=fp16,
    )
    report.write(ws.export_report)
    log.info("wrote %s (%s exporter, sha256 %s)", ws.onnx_model, exporter, report.sha256[:12])
    return report


def main() -> None:
    export(params.load().export, Workspace.here())


if __name__ == "__main__":
    run_stage(main)
