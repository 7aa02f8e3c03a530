"""A class-folder dataset: a directory, ``.tar`` (any compression) or ``.zip``, by path or URL.

Layouts: ``<root>/<class>/<image>`` (split here: stratified, ``data.test_fraction``, ``data.seed``)
or ``<root>/train/<class>/...`` + ``<root>/test/<class>/...`` (used as given). A single wrapping
folder (``mydata/...``) is looked through. Images of any format, size and mode are carried as
their original bytes: corrupt ones are not an ingest error, prepare and validate report them.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tasks.data import downloads
from tasks.data.imaging import IMAGE_SUFFIXES
from tasks.data.raw import RawDataset, RawImage
from tasks.errors import DataError
from tasks.fs.hashing import file_digest
from tasks.paths import SPLITS

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
MAX_REPORTED_IGNORED = 20  # ignored files named in source.json; the rest are only counted


@dataclass(frozen=True)
class _Tree:
    """A source's files (relative POSIX path -> bytes) and its folders (to find empty classes)."""

    files: dict[PurePosixPath, bytes]
    folders: set[PurePosixPath]


def _is_ignored(rel: PurePosixPath) -> bool:
    """Hidden files and macOS archive litter are not data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def _read_directory(root: Path) -> _Tree:
    files: dict[PurePosixPath, bytes] = {}
    folders: set[PurePosixPath] = set()
    for path in sorted(root.rglob("*")):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if path.is_dir():
            folders.add(rel)
        elif path.is_file():
            files[rel] = path.read_bytes()
    return _Tree(files, folders)


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    """The member's relative path; :class:`DataError` for absolute or ``..`` paths (path traversal)."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or name.startswith(("/", "\\")) or (rel.parts and ":" in rel.parts[0]):
        raise DataError(f"{archive}: refusing archive member with an absolute path: {name!r}")
    if ".." in rel.parts:
        raise DataError(f"{archive}: refusing archive member with a '..' path: {name!r}")
    return PurePosixPath(*[p for p in rel.parts if p not in ("", ".")])


def _read_tar(archive: Path) -> _Tree:
    files: dict[PurePosixPath, bytes] = {}
    folders: set[PurePosixPath] = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                rel = _safe_member(member.name, archive)
                if member.isdir():
                    folders.add(rel)
                elif member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular file always has a payload
                    files[rel] = handle.read()
                else:
                    raise DataError(
                        f"{archive}: refusing archive member {member.name!r}: not a regular file (link or device)"
                    )
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: not a readable tar archive: {exc}") from exc
    return _Tree(files, folders)


def _read_zip(archive: Path) -> _Tree:
    files: dict[PurePosixPath, bytes] = {}
    folders: set[PurePosixPath] = set()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _safe_member(info.filename, archive)
                if info.is_dir():
                    folders.add(rel)
                else:
                    files[rel] = zf.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: not a readable zip archive: {exc}") from exc
    return _Tree(files, folders)


def _local(source: str, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A local path for ``source``, downloading URLs into the cache; plus provenance details."""
    if "://" not in source:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"data source {source} not found: give a class-folder directory, a .tar/.zip archive,"
                " a URL, 'synthetic' or 'cifar10'"
            )
        return path, {}
    name = PurePosixPath(source.split("?", 1)[0]).name or "archive"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = downloads.fetch(source, cache_dir / "downloads" / f"{key}-{name}")
    return path, {"url": source}


def _read(path: Path) -> tuple[_Tree, dict[str, Any]]:
    name = path.name.lower()
    if path.is_dir():
        return _read_directory(path), {}
    if name.endswith(TAR_SUFFIXES) or name.endswith(ZIP_SUFFIXES):
        tree = _read_zip(path) if name.endswith(ZIP_SUFFIXES) else _read_tar(path)
        return tree, {"archive_sha256": file_digest(path, "sha256")}
    suffixes = "/".join(TAR_SUFFIXES + ZIP_SUFFIXES)
    raise DataError(f"{path}: unsupported data source: expected a directory or a {suffixes} archive")


def _unwrap(tree: _Tree) -> PurePosixPath:
    """The dataset root inside ``tree``: descend through single wrapping folders."""
    root = PurePosixPath()
    while True:
        level = len(root.parts)
        children = {rel.parts[level] for rel in tree.files if len(rel.parts) > level + 1} | {
            rel.parts[level] for rel in tree.folders if len(rel.parts) > level and rel.parts[:level] == root.parts
        }
        loose = [rel for rel in tree.files if len(rel.parts) == level + 1]
        if len(children) != 1 or loose or next(iter(children)) in SPLITS:
            return root
        root = root / next(iter(children))


def _classify(
    tree: _Tree, base: PurePosixPath, where: str, ignored: list[str]
) -> dict[str, list[PurePosixPath]]:
    """Class name -> image paths under ``base`` (``<base>/<class>/**/<image>``)."""
    depth = len(base.parts)
    by_class: dict[str, list[PurePosixPath]] = {
        rel.parts[depth]: [] for rel in tree.folders if len(rel.parts) == depth + 1 and rel.parts[:depth] == base.parts
    }
    for rel in sorted(tree.files):
        if rel.parts[:depth] != base.parts:
            continue
        if len(rel.parts) == depth + 1:
            if rel.suffix.lower() in IMAGE_SUFFIXES:
                raise DataError(f"{where}: image {rel} is not inside a class folder: move it into <class>/")
            ignored.append(str(rel))
            continue
        if rel.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{where}: unsupported file {rel}: class folders may only hold images"
                f" ({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or give it an image suffix"
            )
        by_class.setdefault(rel.parts[depth], []).append(rel)
    for name, images in sorted(by_class.items()):
        if not images:
            raise DataError(f"{where}: class folder {base / name} has no images")
    if not by_class:
        raise DataError(f"{where}: no images found under {base or '.'}: expected <class>/<image> folders")
    return by_class


def stratified_split(
    by_class: dict[str, list[PurePosixPath]], test_fraction: float, seed: int
) -> dict[str, dict[str, list[PurePosixPath]]]:
    """Per class, a seeded shuffle of the sorted paths; ``round(n * test_fraction)`` go to test.

    A class of n >= 2 images keeps at least one in each split. Depends only on the paths, the
    fraction and the seed, so the same folder always splits the same way.
    """
    result: dict[str, dict[str, list[PurePosixPath]]] = {split: {} for split in SPLITS}
    for name, paths in sorted(by_class.items()):
        ordered = sorted(paths)
        class_seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
        order = np.random.default_rng([seed, class_seed]).permutation(len(ordered))
        n_test = min(max(round(len(ordered) * test_fraction), 1), len(ordered) - 1) if len(ordered) >= 2 else 0
        test_idx = set(order[:n_test].tolist())
        result["test"][name] = [p for i, p in enumerate(ordered) if i in test_idx]
        result["train"][name] = [p for i, p in enumerate(ordered) if i not in test_idx]
    return result


def _images(tree: _Tree, by_class: dict[str, list[PurePosixPath]]) -> Iterator[RawImage]:
    for name, paths in sorted(by_class.items()):
        for rel in sorted(paths):
            yield RawImage(path=str(rel), class_name=name, image=tree.files[rel])


def load(source: str, test_fraction: float, seed: int, cache_dir: Path) -> RawDataset:
    path, details = _local(source, cache_dir)
    tree, read_details = _read(path)
    details = {**details, **read_details}
    ignored = [str(rel) for rel in tree.files if _is_ignored(rel)]
    tree = _Tree(
        {rel: data for rel, data in tree.files.items() if not _is_ignored(rel)},
        {rel for rel in tree.folders if not _is_ignored(rel)},
    )
    root = _unwrap(tree)
    top = {rel.parts[len(root.parts)] for rel in tree.files if len(rel.parts) > len(root.parts) + 1}
    if set(SPLITS) <= top:
        details["split"] = "given: train/ and test/ folders"
        ignored.extend(str(rel) for rel in tree.files if len(rel.parts) == len(root.parts) + 1)
        for extra in sorted(top - set(SPLITS)):
            ignored.extend(str(rel) for rel in tree.files if rel.parts[: len(root.parts) + 1] == (root / extra).parts)
        splits = {split: _classify(tree, root / split, source, ignored) for split in SPLITS}
    else:
        if top & set(SPLITS):
            raise DataError(f"{source}: has {'/'.join(sorted(top & set(SPLITS)))}/ but not both train/ and test/")
        details["split"] = f"stratified: test_fraction={test_fraction}, seed={seed}"
        splits = stratified_split(_classify(tree, root, source, ignored), test_fraction, seed)
    if ignored:
        log.warning(
            "%s: ignored %d files that are not class images (e.g. %s)",
            source,
            len(ignored),
            ", ".join(sorted(ignored)[:3]),
        )
    details["ignored_count"] = len(ignored)
    details["ignored"] = sorted(ignored)[:MAX_REPORTED_IGNORED]
    return RawDataset(
        source=source,
        splits={split: list(_images(tree, splits[split])) for split in SPLITS},
        details=details,
    )
