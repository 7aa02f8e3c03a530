"""tasks/data/sources: synthetic and class-folder sources (directories, .tar, .zip, URLs)."""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from tasks.data import sources
from tasks.data.imaging import to_array
from tasks.data.raw import RawDataset
from tasks.data.sources import folder, synthetic
from tasks.errors import DataError
from tasks.params import DataParams, SyntheticParams

from conftest import collect, ingest_bounds, write_class_folders

BOUNDS = ingest_bounds()


def _params(source: str = "synthetic", classes: int = 3, per_class: int = 4) -> DataParams:
    return DataParams(source, 32, 3, 0.25, 0, SyntheticParams(classes, per_class, 2), BOUNDS)


def _load(source: Path | str, test_fraction: float = 0.5, seed: int = 0, **bounds: float) -> RawDataset:
    return folder.load(str(source), test_fraction, seed, ingest_bounds(**bounds), Path("/nonexistent-cache"))


def _counts(dataset: RawDataset) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split, images in collect(dataset).items():
        per_class: dict[str, int] = {}
        for image in images:
            per_class[image.class_name] = per_class.get(image.class_name, 0) + 1
        counts[split] = dict(sorted(per_class.items()))
    return counts


def _classes(dataset: RawDataset) -> list[str]:
    return sorted({image.class_name for images in collect(dataset).values() for image in images})


# synthetic


def test_synthetic_is_byte_reproducible_and_seeded() -> None:
    a, b, c = (collect(synthetic.generate(SyntheticParams(3, 4, 2), seed=s)) for s in (0, 0, 1))
    assert [i.image for i in a["train"]] == [i.image for i in b["train"]]
    assert [i.image for i in a["train"]] != [i.image for i in c["train"]]


def test_synthetic_counts_and_classes() -> None:
    data = synthetic.generate(SyntheticParams(4, 5, 3), seed=0)
    assert data.total == 32
    assert _counts(data) == {
        "train": {"disk": 5, "plus": 5, "square": 5, "triangle": 5},
        "test": {"disk": 3, "plus": 3, "square": 3, "triangle": 3},
    }
    paths = [i.path for s in collect(data).values() for i in s]
    assert len(set(paths)) == len(paths)


def test_synthetic_colour_does_not_give_the_class_away() -> None:
    """Mean colour per class overlaps: a model must learn shape, not a constant colour per class."""
    data = synthetic.generate(SyntheticParams(2, 40, 1), seed=0)
    means: dict[str, list[np.ndarray]] = {}
    for img in collect(data)["train"]:
        means.setdefault(img.class_name, []).append(to_array(img.image, 32, 3).reshape(3, -1).mean(axis=1))
    spread = {k: np.std(v, axis=0).mean() for k, v in means.items()}
    assert all(s > 30 for s in spread.values()), spread  # colours vary widely within a class


# class folders: layouts


def test_flat_folder_is_split_stratified_and_deterministically(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"cat": 8, "dog": 4})
    a, b, c = (collect(_load(tmp_path / "ds", 0.25, seed)) for seed in (0, 0, 7))
    assert _counts(_load(tmp_path / "ds", 0.25)) == {"train": {"cat": 6, "dog": 3}, "test": {"cat": 2, "dog": 1}}
    assert [i.path for i in a["test"]] == [i.path for i in b["test"]]
    assert {i.path for i in c["test"]} != {i.path for i in a["test"]}
    assert not {i.path for i in a["test"]} & {i.path for i in a["train"]}


def test_train_and_test_folders_are_used_as_given(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds" / "train", {"a": 3, "b": 2})
    write_class_folders(tmp_path / "ds" / "test", {"a": 1, "b": 1}, seed=1)
    (tmp_path / "ds" / "README.md").write_text("about this dataset")
    data = _load(tmp_path / "ds")
    assert _counts(data) == {"train": {"a": 3, "b": 2}, "test": {"a": 1, "b": 1}}
    assert collect(data)["test"][0].path == "test/a/000.png"
    assert data.details["ignored"] == ["README.md"]


def test_a_single_wrapping_folder_is_looked_through(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds" / "mydata", {"a": 2, "b": 2})
    (tmp_path / "ds" / "mydata" / "LICENSE.txt").write_text("CC-BY")
    data = _load(tmp_path / "ds")
    assert _classes(data) == ["a", "b"]
    assert collect(data)["train"][0].path.startswith("mydata/")


def test_corrupt_images_are_carried_not_refused(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "a" / "broken.png").write_text("not a png")
    assert b"not a png" in [i.image for s in collect(_load(tmp_path / "ds")).values() for i in s]


# class folders: archives and URLs


def _tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return dest


def _zip(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())
    return dest


@pytest.mark.parametrize("pack", [_tar, _zip], ids=["tar.gz", "zip"])
def test_archives_hold_the_same_dataset_as_the_folder(tmp_path: Path, pack) -> None:
    write_class_folders(tmp_path / "ds", {"a": 3, "b": 3}, mode="L", size=(40, 30))
    archive = pack(tmp_path / "ds", tmp_path / ("ds.tar.gz" if pack is _tar else "ds.zip"))
    from_dir, from_archive = _load(tmp_path / "ds", 0.34), _load(archive, 0.34)
    assert [i.image for i in collect(from_archive)["test"]] == [i.image for i in collect(from_dir)["test"]]
    assert _counts(from_archive) == _counts(from_dir)
    assert "archive_sha256" in from_archive.details


def test_archive_by_url_is_downloaded_into_the_cache(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    archive = _zip(tmp_path / "ds", tmp_path / "ds.zip")
    data = folder.load(archive.as_uri(), 0.5, 0, BOUNDS, tmp_path / "cache")
    assert _classes(data) == ["a", "b"]
    assert data.details["url"] == archive.as_uri()
    assert list((tmp_path / "cache" / "downloads").glob("*-ds.zip"))


def _tar_with_member(dest: Path, name: str) -> Path:
    with tarfile.open(dest, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return dest


@pytest.mark.parametrize("member", ["../evil.png", "/etc/evil.png", "a/../../evil.png"])
def test_tar_members_escaping_the_archive_are_refused(tmp_path: Path, member: str) -> None:
    archive = _tar_with_member(tmp_path / "bad.tar", member)
    with pytest.raises(DataError, match=r"refusing archive member .*evil\.png"):
        _load(archive)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png"])
def test_zip_members_escaping_the_archive_are_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"abc")
    with pytest.raises(DataError, match=r"refusing archive member .*evil\.png"):
        _load(archive)


def _two_classes(tar: tarfile.TarFile) -> None:
    """a/0.png and b/0.png, three bytes each."""
    for name in ("a/0.png", "b/0.png"):
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))


@pytest.mark.parametrize(
    ("kind", "target", "where"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "outside the dataset"),
        (tarfile.SYMTYPE, "../../../etc/passwd", "outside the dataset"),
        (tarfile.SYMTYPE, "../b", "inside the archive"),  # a link to a folder, read as a folder by extractors
        (tarfile.LNKTYPE, "a/0.png", "inside the archive"),
    ],
)
def test_tar_links_are_refused_and_named(tmp_path: Path, kind: bytes, target: str, where: str) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        _two_classes(tar)
        link = tarfile.TarInfo("a/x.png")
        link.type, link.linkname = kind, target
        tar.addfile(link)
    with pytest.raises(DataError, match=rf"'a/x\.png': a link to '{re.escape(target)}' \({where}\)"):
        _load(archive)


# class folders: bad inputs, each named


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere not found"):
        _load(tmp_path / "nowhere")


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder empty has no images"):
        _load(tmp_path / "ds")


def test_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="no images found"):
        _load(tmp_path / "ds")


def test_unsupported_file_in_a_class_is_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "b" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file b/notes\.txt"):
        _load(tmp_path / "ds")


def test_image_outside_a_class_folder_is_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    shutil.copy(tmp_path / "ds" / "a" / "000.png", tmp_path / "ds" / "stray.png")
    with pytest.raises(DataError, match=r"stray\.png is not inside a class folder"):
        _load(tmp_path / "ds")


def test_train_without_test_is_refused(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds" / "train", {"a": 2})
    write_class_folders(tmp_path / "ds" / "other", {"a": 2})
    with pytest.raises(DataError, match="not both train/ and test/"):
        _load(tmp_path / "ds")


def test_unknown_file_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data source"):
        _load(tmp_path / "data.csv")


def test_load_dispatches_by_source_name(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"x": 2, "y": 2})
    assert _classes(sources.load(str(tmp_path / "ds"), _params(), tmp_path)) == ["x", "y"]
    assert _classes(sources.load("synthetic", _params(classes=2), tmp_path)) == ["disk", "square"]


# class folders: hostile sources (issue 10, items 2, 3 and 10)


def test_a_link_to_a_file_outside_the_dataset_is_refused_and_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private")
    (tmp_path / "ds" / "a" / "leak.png").symlink_to(secret)
    with pytest.raises(DataError, match=rf"a/leak\.png is a link to {re.escape(str(secret))}, outside the dataset"):
        _load(tmp_path / "ds")


def test_a_link_to_a_folder_outside_the_dataset_is_refused_and_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "elsewhere", {"c": 2})
    (tmp_path / "ds" / "c").symlink_to(tmp_path / "elsewhere" / "c", target_is_directory=True)
    with pytest.raises(DataError, match=r": c is a link to .*elsewhere/c, outside the dataset"):
        _load(tmp_path / "ds")


def test_links_inside_the_dataset_are_read_once(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "b" / "alias.png").symlink_to(tmp_path / "ds" / "a" / "000.png")
    (tmp_path / "ds" / "a" / "again").symlink_to(tmp_path / "ds" / "b", target_is_directory=True)
    data = _load(tmp_path / "ds")
    images = {i.path: i.image for s in collect(data).values() for i in s}
    assert images["b/alias.png"] == (tmp_path / "ds" / "a" / "000.png").read_bytes()
    assert not any(path.startswith("a/again") for path in images)  # the folder link is not walked twice
    assert any("a/again" in entry for entry in data.details["ignored"])


def test_a_fifo_in_a_class_folder_is_refused_not_read(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    os.mkfifo(tmp_path / "ds" / "a" / "pipe.png")  # reading it would block forever
    with pytest.raises(DataError, match=r"a/pipe\.png is not a regular file"):
        _load(tmp_path / "ds")


def test_zip_links_are_refused_and_named(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/0.png", b"abc")
        zf.writestr("b/0.png", b"abc")
        link = zipfile.ZipInfo("a/x.png")
        link.external_attr = (0o120777 << 16)  # S_IFLNK: unzip would make it a link to its payload
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DataError, match=r"'a/x\.png': a link to '/etc/passwd' \(outside the dataset\)"):
        _load(archive)


def test_an_image_above_max_image_mb_is_refused_before_reading(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "b" / "huge.png").write_bytes(b"\0" * 30_000)
    with pytest.raises(DataError, match=r"b/huge\.png is 0\.0 MB, above data\.ingest\.max_image_mb \(0\.02 MB\)"):
        _load(tmp_path / "ds", max_image_mb=0.02)


def test_a_dataset_above_max_dataset_gb_is_refused_before_reading(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 20, "b": 20})  # about 40 x 400 bytes
    with pytest.raises(DataError, match=r"more than data\.ingest\.max_dataset_gb \(1e-05 GB\)"):
        _load(tmp_path / "ds", max_dataset_gb=1e-5)


def _zip_of_zeros(path: Path, sizes: dict[str, int]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, size in sizes.items():
            with zf.open(name, "w", force_zip64=True) as fh:
                for _ in range(size // (1 << 20)):
                    fh.write(bytes(1 << 20))
                fh.write(bytes(size % (1 << 20)))
    return path


def test_a_zip_member_declaring_more_than_max_image_mb_is_refused(tmp_path: Path) -> None:
    archive = _zip_of_zeros(tmp_path / "bomb.zip", {"a/0.png": 100, "b/0.png": 100, "b/bomb.png": 20 << 20})
    with pytest.raises(DataError, match=r"b/bomb\.png is 21\.0 MB, above data\.ingest\.max_image_mb"):
        _load(archive, max_image_mb=10)


def test_a_zip_that_expands_too_much_is_refused_as_a_bomb(tmp_path: Path) -> None:
    archive = _zip_of_zeros(tmp_path / "bomb.zip", {"a/0.png": 100, "b/0.png": 100, "b/flat.bmp": 9 << 20})
    with pytest.raises(DataError, match=r"expands [\d,]+ times \(at b/flat\.bmp\).*decompression bomb"):
        _load(archive)


def test_a_zip_member_larger_than_it_declares_is_not_read_past_its_size(tmp_path: Path) -> None:
    archive = _zip_of_zeros(tmp_path / "forged.zip", {"a/0.png": 100, "b/0.png": 2 << 20})
    raw = bytearray(archive.read_bytes())
    forged = (2 << 20).to_bytes(4, "little"), (1000).to_bytes(4, "little")
    assert raw.count(forged[0]) >= 1
    archive.write_bytes(bytes(raw).replace(forged[0], forged[1]))  # both headers now claim 1,000 bytes
    with pytest.raises(DataError, match=r"b/0\.png' is unreadable: Bad CRC-32"):
        collect(_load(archive))


def test_a_tar_member_declaring_a_gigabyte_is_refused_at_its_header(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _two_classes(tar)
        header = tarfile.TarInfo("b/bomb.png")
        header.size = 1 << 30
        tar.fileobj.write(header.tobuf())  # the header only: never read further
    with pytest.raises(DataError, match=r"b/bomb\.png is 1,073\.7 MB, above data\.ingest\.max_image_mb"):
        _load(archive)


def test_a_tar_gz_of_many_members_that_expand_too_much_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(12):
            info = tarfile.TarInfo(f"{'ab'[i % 2]}/{i}.bmp")
            info.size = 1 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(DataError, match=r"expands [\d,]+ times .*above data\.ingest\.max_compression_ratio"):
        _load(archive)


def test_one_class_is_refused_and_a_single_class_folder_is_not_a_wrapper(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"cat": 4})
    with pytest.raises(DataError, match=r"only one class \(cat\): a classifier needs at least two"):
        _load(tmp_path / "ds")


@pytest.mark.parametrize("name", ["two\nlines", "back\\slash", "tab\there"])
def test_class_names_with_separators_or_control_characters_are_refused(tmp_path: Path, name: str) -> None:
    write_class_folders(tmp_path / "ds", {"ok": 2, name: 2})
    with pytest.raises(DataError, match=rf"class name {re.escape(repr(name))} contains a path separator"):
        _load(tmp_path / "ds")


def _damaged(data: bytes, damage: str) -> bytes:
    middle = len(data) // 2
    if damage == "truncated":
        return data[:middle]
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


TAR_WRITE_MODES: dict[str, Literal["w:gz", "w:bz2", "w:xz"]] = {"tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
@pytest.mark.parametrize("suffix", sorted(TAR_WRITE_MODES))
def test_a_damaged_compressed_tar_is_named_not_a_traceback_or_a_shorter_dataset(
    tmp_path: Path, suffix: str, damage: str
) -> None:
    # tarfile ends an archive silently at a damaged header; the codec's checksum must still be read.
    write_class_folders(tmp_path / "ds", {"a": 20, "b": 20}, size=(32, 32))
    archive = tmp_path / f"ds.{suffix}"
    with tarfile.open(archive, TAR_WRITE_MODES[suffix]) as tar:
        tar.add(tmp_path / "ds", arcname="ds")
    archive.write_bytes(_damaged(archive.read_bytes(), damage))
    with pytest.raises(DataError, match=rf"ds\.{suffix.replace('.', '[.]')}: (not a readable|damaged) tar archive"):
        collect(_load(archive))


def test_a_tar_ends_cleanly_after_its_zero_blocks(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 3, "b": 3}, size=(16, 16))
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "ds", arcname="ds")
    counts = _counts(_load(archive))
    assert counts == _counts(_load(tmp_path / "ds"))
    assert sum(n for per_class in counts.values() for n in per_class.values()) == 6
