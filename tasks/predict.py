"""predict: classify image files with the production ONNX model (CUDA when it really works, else CPU).

Each file is converted by `tasks.data.imaging.to_array` under the input contract recorded in the
production card, so served pixels are exactly the pixels the model was trained and verified on.
Files are decoded and scored ``registry.max_batch_size`` at a time, so memory holds one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.blessing.onnx_session import open_session
from tasks.errors import DataError, RegistryError
from tasks.fs.progress import track
from tasks.fs.records import Record
from tasks.params import RegistryParams
from tasks.paths import Workspace
from tasks.registry import MODEL_FILE, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction(Record):
    path: str
    label: str  # the production model's top class
    probability: float


def load_images(paths: list[Path], image_size: int, channels: int) -> tuple[np.ndarray, list[str]]:
    """uint8 (n, C, H, W) for the files that decode, and a line for each file that cannot be read or decoded."""
    from tasks.data.imaging import to_array

    arrays, problems = [], []
    for path in paths:
        try:
            arrays.append(to_array(Path(path).read_bytes(), image_size, channels))
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror or exc})")
        except DataError as exc:
            problems.append(f"{path}: {exc}")
    empty = np.empty((0, channels, image_size, image_size), dtype=np.uint8)
    return (np.stack(arrays) if arrays else empty), problems


def predict(p: RegistryParams, ws: Workspace, images: list[Path]) -> list[Prediction]:
    """``[{"path", "label", "probability"}]`` per image, in order, from the production model.

    An unusable file fails the whole call, naming every unusable file (all are decoded to find them).
    """
    if not images:
        raise DataError("no image files given: pass one or more paths")
    registry = Registry.open(ws, p)
    production = registry.production()
    if production is None:
        raise RegistryError(
            f"{registry.location} has no production model: run `visionops quickstart` or `visionops promote`"
        )
    contract = production.card.export.input
    classes = production.card.classes
    session = open_session(registry.local_file(production.version, MODEL_FILE), "auto")
    log.info("production version %d on %s", production.version, session.active)
    predictions: list[Prediction] = []
    problems: list[str] = []
    starts = range(0, len(images), p.max_batch_size)
    for start in track(starts, len(starts), "predicting", log):
        paths = images[start : start + p.max_batch_size]
        batch, unusable = load_images(paths, contract.image_size, contract.channels)
        problems += unusable
        if problems:
            continue  # nothing will be returned; keep decoding only to name every unusable file
        probabilities = session.run(batch)
        top = probabilities.argmax(axis=1)
        predictions += [
            Prediction(path=str(path), label=classes[int(k)], probability=float(probabilities[i, k]))
            for i, (path, k) in enumerate(zip(paths, top, strict=True))
        ]
    if problems:
        raise DataError(f"{len(problems)} of {len(images)} image(s) unusable: " + "; ".join(problems))
    return predictions
