"""Where raw images come from. Every source yields the same thing: a :class:`RawDataset`.

``resolve`` picks the source from the ``data.source`` string (or ``visionops ingest --source``):
``synthetic``, ``cifar10``, or a class-folder directory / ``.tar`` / ``.zip`` by path or URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.params import DataParams
from tasks.paths import SPLITS


@dataclass(frozen=True)
class RawImage:
    path: str  # source-relative, POSIX separators; unique within the dataset
    class_name: str
    image: bytes  # the encoded file exactly as the source holds it


@dataclass(frozen=True)
class RawDataset:
    source: str
    splits: dict[str, list[RawImage]]
    details: dict[str, Any] = field(default_factory=dict)  # archive checksum, split rule, ignored files

    def class_names(self) -> list[str]:
        return sorted({img.class_name for images in self.splits.values() for img in images})

    def counts(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            per_class: dict[str, int] = {}
            for img in self.splits[split]:
                per_class[img.class_name] = per_class.get(img.class_name, 0) + 1
            result[split] = dict(sorted(per_class.items()))
        return result


def load(source: str, p: DataParams, cache_dir: Path) -> RawDataset:
    """The dataset named by ``source``; archives downloaded from a URL are cached in ``cache_dir``."""
    if source == "synthetic":
        from tasks.sources import synthetic

        return synthetic.generate(p.synthetic, p.seed)
    if source == "cifar10":
        from tasks.sources import cifar10

        return cifar10.load(cache_dir)
    from tasks.sources import folder

    return folder.load(source, p.test_fraction, p.seed, cache_dir)
