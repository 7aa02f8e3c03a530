"""Where raw images come from. Every source yields the same thing: a :class:`RawDataset`, streamed
image by image.

``load`` picks the source from the ``data.source`` string (or ``visionops ingest --source``):
``synthetic``, ``cifar10``, or a class-folder directory / ``.tar`` / ``.zip`` by path or URL.
"""

from __future__ import annotations

from pathlib import Path

from tasks.data.raw import RawDataset
from tasks.params import DataParams


def load(source: str, p: DataParams, cache_dir: Path) -> RawDataset:
    """The dataset named by ``source``; archives downloaded from a URL are cached in ``cache_dir``."""
    if source == "synthetic":
        from tasks.data.sources import synthetic

        return synthetic.generate(p.synthetic, p.seed)
    if source == "cifar10":
        from tasks.data.sources import cifar10

        return cifar10.load(cache_dir)
    from tasks.data.sources import folder

    return folder.load(source, p.test_fraction, p.seed, p.ingest, cache_dir)
