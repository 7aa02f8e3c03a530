"""predict: classify image files with the production ONNX model (CUDA when it really works, else CPU).

Each file is converted by `tasks.data.imaging.to_array` under the input contract recorded in the
production card, so served pixels are exactly the pixels the model was trained and verified on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.blessing.onnx_session import open_session
from tasks.errors import DataError, RegistryError
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


def load_images(paths: list[Path], image_size: int, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) for the files; `DataError` naming every file that cannot be read or decoded."""
    from tasks.data.imaging import to_array

    arrays, problems = [], []
    for path in paths:
        try:
            arrays.append(to_array(Path(path).read_bytes(), image_size, channels))
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror or exc})")
        except DataError as exc:
            problems.append(f"{path}: {exc}")
    if problems:
        raise DataError(f"{len(problems)} of {len(paths)} image(s) unusable: " + "; ".join(problems))
    return np.stack(arrays)


def predict(p: RegistryParams, ws: Workspace, images: list[Path]) -> list[Prediction]:
    """``[{"path", "label", "probability"}]`` per image, in order, from the production model."""
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
    batch = load_images(images, contract.image_size, contract.channels)
    session = open_session(registry.local_file(production.version, MODEL_FILE), "auto")
    log.info("production version %d on %s", production.version, session.active)
    probabilities = session.probabilities(batch, p.max_batch_size)
    top = probabilities.argmax(axis=1)
    return [
        Prediction(path=str(path), label=classes[int(k)], probability=float(probabilities[i, k]))
        for i, (path, k) in enumerate(zip(images, top, strict=True))
    ]
