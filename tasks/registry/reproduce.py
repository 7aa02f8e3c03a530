"""`visionops reproduce N`: write back the params.yaml, dvc.lock and data.dvc that built version N.

The card keeps the three files byte for byte as they were at promotion (checked against the history
like every file of the version). Written back into a workspace at the code revision the card names,
`dvc pull && dvc repro` rebuilds version N; on the CPU, with the same weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import RegistryError
from tasks.fs.atomic import atomic_write_bytes
from tasks.params import RegistryParams
from tasks.paths import Workspace
from tasks.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reproduction:
    version: int
    written: list[Path]  # files written back
    removed: list[Path]  # files that did not exist when the version was built
    git_rev: str | None  # the code revision the card records (``-dirty``: uncommitted changes then)


def reproduce(p: RegistryParams, ws: Workspace, version: int) -> Reproduction:
    """Write version ``version``'s params.yaml, dvc.lock and data.dvc into ``ws``."""
    registry = Registry.open(ws, p)
    if version not in registry.versions():
        raise RegistryError(
            f"version {version} of {registry.location} was never production (versions that were:"
            f" {registry.versions() or 'none'})"
        )
    card = registry.card(version)  # verified against the history
    if card.built_from is None:
        raise RegistryError(
            f"the card of version {version} predates recording params.yaml, dvc.lock and data.dvc:"
            " it cannot be reproduced this way"
        )
    written, removed = [], []
    for name, text in card.built_from.texts().items():
        path = ws.root / name
        if text is None:
            if path.exists():
                path.unlink()
                removed.append(path)
            continue
        atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)
    log.info("wrote back %s of version %d", ", ".join(p.name for p in written), version)
    return Reproduction(version, written, removed, card.git_rev)
