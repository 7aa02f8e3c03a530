"""A class-folder dataset: a directory, ``.tar`` (any compression) or ``.zip``, by path or URL.

Layouts: ``<root>/<class>/<image>`` (split here: stratified, ``data.test_fraction``, ``data.seed``)
or ``<root>/train/<class>/...`` + ``<root>/test/<class>/...`` (used as given). A single wrapping
folder (``mydata/<class>/...``) is looked through; a single folder of images is one class, not a
wrapper. Images of any format, size and mode are carried as their original bytes: corrupt ones
are not an ingest error, prepare and validate report them.

Hostile sources are refused by name before anything is read: links that leave the dataset (and
every link inside an archive), devices and FIFOs, a file above ``data.ingest.max_image_mb``, a
dataset above ``data.ingest.max_dataset_gb`` or an archive that expands more than
``data.ingest.max_compression_ratio`` times. Files are then read one at a time, never more than
``max_image_mb`` + 1 MB of one of them, so memory does not depend on what the archive claims.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

import numpy as np

from tasks.data import downloads
from tasks.data.imaging import IMAGE_SUFFIXES
from tasks.data.raw import RawDataset, RawImage, check_classes
from tasks.errors import DataError
from tasks.fs.hashing import CHUNK, file_digest
from tasks.params import IngestParams
from tasks.paths import SPLITS

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)
MAX_REPORTED_IGNORED = 20  # ignored files named in source.json; the rest are only counted
RATIO_FLOOR_BYTES = 8 << 20  # a compression ratio means something only after this many expanded bytes
# What a damaged archive raises while it is decompressed (gzip, bz2 and xz inside tar; deflate in zip).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


@dataclass
class Listing:
    """What a source holds, before any file is read: relative path -> size in bytes, and folders."""

    files: dict[PurePosixPath, int] = field(default_factory=dict)
    folders: set[PurePosixPath] = field(default_factory=set)
    ignored: list[str] = field(default_factory=list)  # hidden files, links to folders inside the dataset
    total_bytes: int = 0


def _is_ignored(rel: PurePosixPath) -> bool:
    """Hidden files and macOS archive litter are not data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


class _Bounds:
    """Size checks shared by every kind of source, applied to declared sizes before reading."""

    def __init__(self, where: str, limits: IngestParams) -> None:
        self.where, self.limits = where, limits

    def file(self, listing: Listing, rel: PurePosixPath, size: int) -> None:
        if size > self.limits.max_image_bytes:
            raise DataError(
                f"{self.where}: {rel} is {size / 1e6:,.1f} MB, above data.ingest.max_image_mb"
                f" ({self.limits.max_image_mb:g} MB): refusing it (raise the limit if the file is genuine)"
            )
        listing.total_bytes += size
        if listing.total_bytes > self.limits.max_dataset_bytes:
            raise DataError(
                f"{self.where}: more than data.ingest.max_dataset_gb ({self.limits.max_dataset_gb:g} GB)"
                f" of image files (reached at {rel}): refusing it (raise the limit if the dataset is genuine)"
            )
        listing.files[rel] = size

    def ratio(self, expanded: int, compressed: int, at: str) -> None:
        if expanded >= RATIO_FLOOR_BYTES and expanded > self.limits.max_compression_ratio * max(compressed, 1):
            raise DataError(
                f"{self.where}: expands {expanded / max(compressed, 1):,.0f} times (at {at}), above"
                f" data.ingest.max_compression_ratio ({self.limits.max_compression_ratio:g}): refusing it as a"
                " decompression bomb"
            )


def _read_bounded(fh: IO[bytes], limit: int, where: str) -> bytes:
    """At most ``limit`` bytes of ``fh``; :class:`DataError` if there are more (a size that lied)."""
    parts: list[bytes] = []
    size = 0
    while chunk := fh.read(min(CHUNK, limit + 1 - size)):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise DataError(f"{where}: expands beyond data.ingest.max_image_mb ({limit / 1e6:g} MB): refusing it")
    return b"".join(parts)


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


class _Directory:
    """A folder on disk. Links are resolved: to a file inside the dataset, read; anything else, refused."""

    def __init__(self, root: Path, bounds: _Bounds) -> None:
        self.root, self.bounds = root, bounds
        self.real_root = os.path.realpath(root)
        self.targets: dict[PurePosixPath, str] = {}  # a link's path -> the file it names

    def _refuse_link(self, rel: PurePosixPath, target: str) -> DataError:
        return DataError(
            f"{self.root}: {rel} is a link to {target}, outside the dataset: refusing it"
            " (copy the file or folder into the dataset if it belongs there)"
        )

    def list(self) -> Listing:
        listing = Listing()
        todo = [PurePosixPath()]
        while todo:
            folder = todo.pop()
            with os.scandir(self.root / folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    rel = folder / entry.name
                    if _is_ignored(rel):
                        listing.ignored.append(str(rel))  # never read, so never followed
                    elif entry.is_symlink():
                        self._link(listing, rel, entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        listing.folders.add(rel)
                        todo.append(rel)
                    elif entry.is_file(follow_symlinks=False):
                        self.bounds.file(listing, rel, entry.stat(follow_symlinks=False).st_size)
                    else:
                        raise DataError(f"{self.root}: {rel} is not a regular file (a FIFO, socket or device)")
        return listing

    def _link(self, listing: Listing, rel: PurePosixPath, path: str) -> None:
        target = os.path.realpath(path)
        if not _inside(target, self.real_root):
            raise self._refuse_link(rel, target)
        if os.path.isdir(target):
            listing.ignored.append(f"{rel} (a link to a folder of the dataset: its images are read there)")
        elif os.path.isfile(target):
            self.bounds.file(listing, rel, os.stat(target).st_size)
            self.targets[rel] = target
        else:
            raise DataError(f"{self.root}: {rel} links to {target}, which is not a regular file")

    def read(self, wanted: set[PurePosixPath]) -> Iterator[tuple[PurePosixPath, bytes]]:
        limit = self.bounds.limits.max_image_bytes
        for rel in sorted(wanted):
            path = self.targets.get(rel, str(self.root / rel))
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # swapped for a link since listing: refused
            with os.fdopen(fd, "rb") as fh:
                # Check what was opened, not what the name says now: a folder may have become a link.
                opened = os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else path
                if not _inside(opened, self.real_root):
                    raise self._refuse_link(rel, opened)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise DataError(f"{self.root}: {rel} is no longer a regular file")
                yield rel, _read_bounded(fh, limit, f"{self.root}: {rel}")


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    """The member's relative path; :class:`DataError` for absolute or ``..`` paths (path traversal)."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or name.startswith(("/", "\\")) or (rel.parts and ":" in rel.parts[0]):
        raise DataError(f"{archive}: refusing archive member with an absolute path: {name!r}")
    if ".." in rel.parts:
        raise DataError(f"{archive}: refusing archive member with a '..' path: {name!r}")
    return PurePosixPath(*[p for p in rel.parts if p not in ("", ".")])


def _refuse_archive_link(archive: Path, name: str, target: str, relative_to: str) -> DataError:
    resolved = posixpath.normpath(posixpath.join(relative_to, target))
    outside = target.startswith("/") or resolved == ".." or resolved.startswith("../")
    where = "outside the dataset" if outside else "inside the archive"
    return DataError(
        f"{archive}: refusing archive member {name!r}: a link to {target!r} ({where});"
        " archives must hold the image files themselves"
    )


class _Tar:
    """A tar archive, any compression. Listed in one streaming pass, read in a second, in archive order."""

    def __init__(self, archive: Path, bounds: _Bounds) -> None:
        self.archive, self.bounds = archive, bounds

    def _members(self) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, IO[bytes]]]:
        try:
            with open(self.archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
                while (member := tar.next()) is not None:
                    cast(Any, tar).members.clear()  # tarfile keeps every header it has seen; we never look back
                    yield tar, member, raw
                self._check_end(tar, raw)
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{self.archive}: not a readable tar archive: {exc}") from exc

    def _check_end(self, tar: tarfile.TarFile, raw: IO[bytes]) -> None:
        """Read what follows the last header to the end of the stream.

        tarfile ends the archive silently at the first damaged header, and gzip, bz2 and xz check
        their checksums only at the end of the stream: a damaged archive would otherwise pass as a
        shorter dataset. After the end marker a tar holds only zero blocks.
        """
        stream = cast(IO[bytes], tar.fileobj)
        expanded = tar.offset
        while chunk := stream.read(CHUNK):
            expanded += len(chunk)
            if chunk.count(0) != len(chunk):
                raise DataError(
                    f"{self.archive}: damaged tar archive: data after what reads as its end"
                    f" (at byte {expanded - len(chunk):,} of the expanded stream); recreate the archive"
                )
            self.bounds.ratio(expanded, raw.tell(), "the end of the archive")

    def list(self) -> Listing:
        listing = Listing()
        for _tar, member, raw in self._members():
            rel = _safe_member(member.name, self.archive)
            if _is_ignored(rel):
                listing.ignored.append(str(rel))
            elif member.issym():
                raise _refuse_archive_link(self.archive, member.name, member.linkname, posixpath.dirname(str(rel)))
            elif member.islnk():
                raise _refuse_archive_link(self.archive, member.name, member.linkname, "")
            elif member.isdir():
                listing.folders.add(rel)
            elif member.isfile():
                self.bounds.file(listing, rel, member.size)
            else:
                raise DataError(f"{self.archive}: refusing archive member {member.name!r}: not a regular file")
            # Bytes expanded before this header against bytes read: one member cannot pass
            # max_image_mb anyway, and many members that expand too much are caught as they pass.
            self.bounds.ratio(member.offset, raw.tell(), member.name)
        return listing

    def read(self, wanted: set[PurePosixPath]) -> Iterator[tuple[PurePosixPath, bytes]]:
        limit = self.bounds.limits.max_image_bytes
        for tar, member, _raw in self._members():
            rel = _safe_member(member.name, self.archive)
            if rel not in wanted or not member.isfile():
                continue
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file always has a payload
            try:
                data = _read_bounded(handle, limit, f"{self.archive}: {member.name}")
            except ARCHIVE_ERRORS as exc:
                raise DataError(f"{self.archive}: member {member.name!r} is unreadable: {exc}") from exc
            yield rel, data


class _Zip:
    """A zip archive: its central directory is the listing; members are read in path order."""

    def __init__(self, archive: Path, bounds: _Bounds) -> None:
        self.archive, self.bounds = archive, bounds
        self.infos: dict[PurePosixPath, zipfile.ZipInfo] = {}

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.archive)
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{self.archive}: not a readable zip archive: {exc}") from exc

    def list(self) -> Listing:
        listing = Listing()
        compressed = 0
        with self._open() as zf:
            for info in zf.infolist():
                rel = _safe_member(info.filename, self.archive)
                mode = info.external_attr >> 16  # the Unix mode, when a Unix tool made the archive
                if _is_ignored(rel):
                    listing.ignored.append(str(rel))
                elif stat.S_ISLNK(mode):
                    with zf.open(info) as fh:  # a zip link's payload is its target
                        target = fh.read(4096).decode("utf-8", "replace")
                    raise _refuse_archive_link(self.archive, info.filename, target, posixpath.dirname(str(rel)))
                elif info.is_dir():
                    listing.folders.add(rel)
                elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type recorded (e.g. Windows tools)
                    raise DataError(f"{self.archive}: refusing archive member {info.filename!r}: not a regular file")
                else:
                    self.bounds.file(listing, rel, info.file_size)
                    self.infos[rel] = info
                    compressed += info.compress_size
                    self.bounds.ratio(info.file_size, info.compress_size, info.filename)
                    self.bounds.ratio(listing.total_bytes, compressed, info.filename)
        return listing

    def read(self, wanted: set[PurePosixPath]) -> Iterator[tuple[PurePosixPath, bytes]]:
        limit = self.bounds.limits.max_image_bytes
        with self._open() as zf:
            for rel in sorted(wanted):
                info = self.infos[rel]
                try:
                    with zf.open(info) as fh:
                        data = _read_bounded(fh, min(limit, info.file_size), f"{self.archive}: {info.filename}")
                except ARCHIVE_ERRORS as exc:
                    raise DataError(f"{self.archive}: member {info.filename!r} is unreadable: {exc}") from exc
                yield rel, data


def _local(source: str, cache_dir: Path, max_bytes: int) -> tuple[Path, dict[str, Any]]:
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
    path = downloads.fetch(source, cache_dir / "downloads" / f"{key}-{name}", max_bytes=max_bytes)
    return path, {"url": source}


def _reader(path: Path, limits: IngestParams) -> tuple[_Directory | _Tar | _Zip, dict[str, Any]]:
    name = path.name.lower()
    bounds = _Bounds(str(path), limits)
    if path.is_dir():
        return _Directory(path, bounds), {}
    if name.endswith(ZIP_SUFFIXES):
        return _Zip(path, bounds), {"archive_sha256": file_digest(path, "sha256")}
    if name.endswith(TAR_SUFFIXES):
        return _Tar(path, bounds), {"archive_sha256": file_digest(path, "sha256")}
    suffixes = "/".join(TAR_SUFFIXES + ZIP_SUFFIXES)
    raise DataError(f"{path}: unsupported data source: expected a directory or a {suffixes} archive")


def _children(listing: Listing, root: PurePosixPath) -> tuple[set[str], list[PurePosixPath]]:
    """The folder names directly under ``root``, and the files directly in it."""
    level = len(root.parts)
    below = [
        rel for rel in [*listing.files, *listing.folders] if len(rel.parts) > level and rel.parts[:level] == root.parts
    ]
    children = {rel.parts[level] for rel in below if len(rel.parts) > level + 1 or rel in listing.folders}
    loose = [rel for rel in below if len(rel.parts) == level + 1 and rel in listing.files]
    return children, loose


def _unwrap(listing: Listing) -> PurePosixPath:
    """The dataset root: descend through single wrapping folders, but not into a single class folder
    (a folder that holds images itself) or a split folder."""
    root = PurePosixPath()
    while True:
        children, loose = _children(listing, root)
        if len(children) != 1 or loose:
            return root
        (child,) = children
        _grandchildren, files = _children(listing, root / child)
        if child in SPLITS or any(rel.suffix.lower() in IMAGE_SUFFIXES for rel in files):
            return root
        root = root / child


def _classify(listing: Listing, base: PurePosixPath, where: str, ignored: list[str]) -> dict[str, list[PurePosixPath]]:
    """Class name -> image paths under ``base`` (``<base>/<class>/**/<image>``)."""
    depth = len(base.parts)
    by_class: dict[str, list[PurePosixPath]] = {
        rel.parts[depth]: []
        for rel in listing.folders
        if len(rel.parts) == depth + 1 and rel.parts[:depth] == base.parts
    }
    for rel in sorted(listing.files):
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


def _layout(
    listing: Listing, source: str, test_fraction: float, seed: int, details: dict[str, Any]
) -> dict[PurePosixPath, tuple[str, str]]:
    """Each image's (split, class), from the folder layout; records the split rule in ``details``."""
    ignored = list(listing.ignored)
    root = _unwrap(listing)
    top, _loose = _children(listing, root)
    if set(SPLITS) <= top:
        details["split"] = "given: train/ and test/ folders"
        ignored.extend(str(rel) for rel in listing.files if len(rel.parts) == len(root.parts) + 1)
        for extra in sorted(top - set(SPLITS)):
            prefix = (root / extra).parts
            ignored.extend(str(rel) for rel in listing.files if rel.parts[: len(prefix)] == prefix)
        splits = {split: _classify(listing, root / split, source, ignored) for split in SPLITS}
    else:
        if top & set(SPLITS):
            raise DataError(f"{source}: has {'/'.join(sorted(top & set(SPLITS)))}/ but not both train/ and test/")
        details["split"] = f"stratified: test_fraction={test_fraction}, seed={seed}"
        splits = stratified_split(_classify(listing, root, source, ignored), test_fraction, seed)
    check_classes(sorted({name for split in SPLITS for name in splits[split]}), source)
    if ignored:
        examples = ", ".join(sorted(ignored)[:3])
        log.warning("%s: ignored %d files that are not class images (e.g. %s)", source, len(ignored), examples)
    details["ignored_count"] = len(ignored)
    details["ignored"] = sorted(ignored)[:MAX_REPORTED_IGNORED]
    return {rel: (split, name) for split in SPLITS for name, paths in splits[split].items() for rel in paths}


def load(source: str, test_fraction: float, seed: int, limits: IngestParams, cache_dir: Path) -> RawDataset:
    """The dataset at ``source``, listed and checked; its images are read when streamed."""
    path, details = _local(source, cache_dir, limits.max_dataset_bytes)
    reader, read_details = _reader(path, limits)
    details = {**details, **read_details}
    listing = reader.list()
    placement = _layout(listing, source, test_fraction, seed, details)
    details["bytes"] = sum(listing.files[rel] for rel in placement)

    def images() -> Iterator[tuple[str, RawImage]]:
        for rel, data in reader.read(set(placement)):
            split, name = placement[rel]
            yield split, RawImage(path=str(rel), class_name=name, image=data)

    return RawDataset(source=source, images=images, total=len(placement), details=details)
