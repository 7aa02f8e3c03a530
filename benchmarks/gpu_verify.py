"""Export and verify on CUDA, then compare onnxruntime (CUDA EP, IO binding) with PyTorch eager.

    python benchmarks/gpu_verify.py [--workspace DIR] [--runs 50]

Uses DIR's models/candidate.pt and prepared test split when given (a workspace after
`visionops quickstart` or `dvc repro train`); otherwise an untrained ResNet-18 (CIFAR stem,
32x32, 10 classes) on random images, which is enough for parity and speed, not accuracy.
CUDA only: without a working CUDA device for both PyTorch and onnxruntime it exits 2 and
measures nothing. Prints parity and throughput at batch 1 and 256 and writes
benchmarks/out/gpu_verify.json. Record the figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from tasks import params as params_mod  # noqa: E402
from tasks.errors import RuntimeUnavailable  # noqa: E402
from tasks.paths import Workspace  # noqa: E402

BATCHES = (1, 256)


def untrained_candidate(ws: Workspace, n_test: int = 512) -> None:
    """A real ResNet-18 candidate.pt in the documented format plus random test images."""
    import torch

    from tasks.training.candidate import Candidate, save_candidate
    from tasks.training.models import build_model

    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(10)]
    save_candidate(
        ws.candidate,
        Candidate(
            state_dict=build_model("resnet18", "cifar", 10, 3).state_dict(),
            arch="resnet18",
            stem="cifar",
            num_classes=10,
            in_channels=3,
            image_size=32,
            classes=classes,
            normalization={"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
            params={},
            device="cuda",
            device_name="untrained",
            weights_source="random initialisation",
            data_digest="none",
            metrics={},
        ),
    )
    rng = np.random.default_rng(0)
    ws.prepared.mkdir(parents=True, exist_ok=True)
    np.save(ws.images("test"), rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8))
    np.save(ws.labels("test"), rng.integers(0, 10, n_test).astype(np.int64))
    ws.classes.write_text(json.dumps(classes))


def torch_images_per_s(model: Callable[[Any], object], images: np.ndarray, runs: int) -> float:
    """PyTorch eager fp32 (TF32 off) on CUDA, input already on the device."""
    import torch

    x = torch.from_numpy(images).cuda()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
        torch.cuda.synchronize()
    return len(images) * runs / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, help="a visionops workspace with models/candidate.pt")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per batch size")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_verify needs a CUDA GPU: torch.cuda.is_available() is False. Nothing was measured.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from tasks.blessing.onnx_session import open_session
    from tasks.blessing.reports import VerificationReport
    from tasks.export import export
    from tasks.training.candidate import Deployable
    from tasks.verify import VerificationFailed, VerifySections, batch_of, throughput, verify

    tmp = tempfile.TemporaryDirectory(prefix="gpu_verify-")
    ws = Workspace(Path(tmp.name))  # a scratch copy: the source workspace's DVC outputs stay as they are
    if args.workspace:
        source = Workspace(args.workspace.resolve())
        for path in (source.candidate, source.images("test"), source.labels("test"), source.classes):
            target = ws.root / path.relative_to(source.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        base = params_mod.read_raw(source.params_file)
    else:
        untrained_candidate(ws)
        base = params_mod.read_raw(PROJECT / "params.yaml")
    p = params_mod.parse(
        params_mod.apply_overrides(
            base, {"verify.provider": "cuda", "registry.max_batch_size": max(BATCHES), "export.fp16": True}
        )
    )
    try:
        export(p.export, ws)
        try:
            report = verify(params_mod.sections(VerifySections, p), ws)
        except VerificationFailed as exc:  # still print the numbers that failed
            print(f"gpu_verify: {exc}", file=sys.stderr)
            report = VerificationReport.read(ws.verification, "verify")
        session = open_session(ws.onnx_model, "cuda")
    except RuntimeUnavailable as exc:
        print(f"gpu_verify: onnxruntime cannot run on CUDA here: {exc}. Nothing was measured.", file=sys.stderr)
        return 2
    model = Deployable.from_candidate(ws.candidate).cuda().eval()
    speed = {}
    for batch in BATCHES:
        images, _ = batch_of(np.load(ws.images("test")), batch)
        ort = throughput(session, images, args.runs).images_per_s
        eager = torch_images_per_s(model, images, args.runs)
        speed[batch] = {"onnxruntime_images_per_s": ort, "torch_eager_images_per_s": eager, "ratio": ort / eager}

    v = report.versions
    print(
        f"device: {v.gpu} (driver {v.driver}, CUDA {v.cuda}, cuDNN {v.cudnn});"
        f" torch {v.torch}, onnxruntime {v.onnxruntime}; provider active: {report.provider_active}"
    )
    for entry in report.parity:
        print(
            f"parity fp32 batch {entry.batch:>3}: max abs diff {entry.max_abs_diff:.2e},"
            f" top-1 agreement {entry.top1_agreement:.4f}"
        )
    if report.fp16 is not None:
        for entry in report.fp16.parity:
            print(
                f"parity fp16 batch {entry.batch:>3}: max abs diff {entry.max_abs_diff:.2e},"
                f" top-1 agreement {entry.top1_agreement:.4f}"
            )
    print(f"latency batch 1: p50 {report.latency_ms.p50:.3f} ms, p95 {report.latency_ms.p95:.3f} ms")
    for batch, s in speed.items():
        print(
            f"throughput batch {batch:>3}: onnxruntime {s['onnxruntime_images_per_s']:,.0f} images/s,"
            f" PyTorch eager {s['torch_eager_images_per_s']:,.0f} images/s, ratio {s['ratio']:.2f}x"
        )
    out = PROJECT / "benchmarks" / "out" / "gpu_verify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"verification": report.to_json(), "throughput": speed}, indent=2) + "\n")
    print(f"passed: {report.passed}; full report in {out}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
