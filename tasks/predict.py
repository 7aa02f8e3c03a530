"""predict: classify image files with the production ONNX model (CUDA when it really works, else CPU).

Each file is converted by `tasks.imaging.to_array` under the input contract recorded in the
production card, so served pixels are exactly the pixels the model was trained and verified on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import DataError, RegistryError
from tasks.params import Params
from tasks.paths import Workspace
from tasks.registry import MODEL_FILE, Registry
from tasks.runtime import open_session

log = logging.getLogger(__name__)


def load_images(paths: list[Path], image_size: int, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) for the files; `DataError` naming every file that cannot be read or decoded."""
    from tasks.imaging import to_array

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


def predict(ws: Workspace, params: Params, images: list[Path]) -> list[dict[str, Any]]:
    """``[{"path", "label", "probability"}]`` per image, in order, from the production model."""
    if not images:
        raise DataError("no image files given: pass one or more paths")
    registry = Registry.open(ws, params.registry)
    production = registry.production()
    if production is None:
        raise RegistryError(
            f"{registry.location} has no production model: run `visionops quickstart` or `visionops promote`"
        )
    contract = production.card["export"]["input"]
    classes = production.card["classes"]
    batch = load_images(images, int(contract["image_size"]), int(contract["channels"]))
    session = open_session(registry.local_file(production.version, MODEL_FILE), "auto")
    log.info("production version %d on %s", production.version, session.active)
    probabilities = session.probabilities(batch, params.registry.max_batch_size)
    top = probabilities.argmax(axis=1)
    return [
        {"path": str(path), "label": classes[int(k)], "probability": float(probabilities[i, k])}
        for i, (path, k) in enumerate(zip(images, top, strict=True))
    ]
