"""tasks/data/sources: synthetic and class-folder sources (directories, .tar, .zip, URLs)."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tasks.data import sources
from tasks.data.imaging import to_array
from tasks.data.sources import folder, synthetic
from tasks.errors import DataError
from tasks.params import DataParams, SyntheticParams

from conftest import write_class_folders


def _params(source: str = "synthetic", classes: int = 3, per_class: int = 4) -> DataParams:
    return DataParams(source, 32, 3, 0.25, 0, SyntheticParams(classes, per_class, 2))


# synthetic


def test_synthetic_is_byte_reproducible_and_seeded() -> None:
    a = synthetic.generate(SyntheticParams(3, 4, 2), seed=0)
    b = synthetic.generate(SyntheticParams(3, 4, 2), seed=0)
    c = synthetic.generate(SyntheticParams(3, 4, 2), seed=1)
    assert [i.image for i in a.splits["train"]] == [i.image for i in b.splits["train"]]
    assert [i.image for i in a.splits["train"]] != [i.image for i in c.splits["train"]]


def test_synthetic_counts_and_classes() -> None:
    data = synthetic.generate(SyntheticParams(4, 5, 3), seed=0)
    assert data.counts() == {
        "train": {"disk": 5, "plus": 5, "square": 5, "triangle": 5},
        "test": {"disk": 3, "plus": 3, "square": 3, "triangle": 3},
    }
    paths = [i.path for s in data.splits.values() for i in s]
    assert len(set(paths)) == len(paths)


def test_synthetic_colour_does_not_give_the_class_away() -> None:
    """Mean colour per class overlaps: a model must learn shape, not a constant colour per class."""
    data = synthetic.generate(SyntheticParams(2, 40, 1), seed=0)
    means: dict[str, list[np.ndarray]] = {}
    for img in data.splits["train"]:
        means.setdefault(img.class_name, []).append(to_array(img.image, 32, 3).reshape(3, -1).mean(axis=1))
    spread = {k: np.std(v, axis=0).mean() for k, v in means.items()}
    assert all(s > 30 for s in spread.values()), spread  # colours vary widely within a class


# class folders: layouts


def test_flat_folder_is_split_stratified_and_deterministically(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"cat": 8, "dog": 4})
    a = folder.load(str(tmp_path / "ds"), test_fraction=0.25, seed=0, cache_dir=tmp_path / "cache")
    b = folder.load(str(tmp_path / "ds"), test_fraction=0.25, seed=0, cache_dir=tmp_path / "cache")
    assert a.counts() == {"train": {"cat": 6, "dog": 3}, "test": {"cat": 2, "dog": 1}}
    assert [i.path for i in a.splits["test"]] == [i.path for i in b.splits["test"]]
    c = folder.load(str(tmp_path / "ds"), test_fraction=0.25, seed=7, cache_dir=tmp_path / "cache")
    assert {i.path for i in c.splits["test"]} != {i.path for i in a.splits["test"]}
    assert not {i.path for i in a.splits["test"]} & {i.path for i in a.splits["train"]}


def test_train_and_test_folders_are_used_as_given(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds" / "train", {"a": 3, "b": 2})
    write_class_folders(tmp_path / "ds" / "test", {"a": 1, "b": 1}, seed=1)
    (tmp_path / "ds" / "README.md").write_text("about this dataset")
    data = folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")
    assert data.counts() == {"train": {"a": 3, "b": 2}, "test": {"a": 1, "b": 1}}
    assert data.splits["test"][0].path == "test/a/000.png"
    assert data.details["ignored"] == ["README.md"]


def test_a_single_wrapping_folder_is_looked_through(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds" / "mydata", {"a": 2, "b": 2})
    data = folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")
    assert data.class_names() == ["a", "b"]
    assert data.splits["train"][0].path.startswith("mydata/")


def test_corrupt_images_are_carried_not_refused(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "a" / "broken.png").write_text("not a png")
    data = folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")
    assert b"not a png" in [i.image for s in data.splits.values() for i in s]


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
    from_dir = folder.load(str(tmp_path / "ds"), 0.34, 0, tmp_path / "cache")
    from_archive = folder.load(str(archive), 0.34, 0, tmp_path / "cache")
    assert from_archive.counts() == from_dir.counts()
    assert [i.image for i in from_archive.splits["test"]] == [i.image for i in from_dir.splits["test"]]
    assert "archive_sha256" in from_archive.details


def test_archive_by_url_is_downloaded_into_the_cache(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    archive = _zip(tmp_path / "ds", tmp_path / "ds.zip")
    data = folder.load(archive.as_uri(), 0.5, 0, tmp_path / "cache")
    assert data.class_names() == ["a", "b"]
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
        folder.load(str(archive), 0.5, 0, tmp_path / "cache")


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png"])
def test_zip_members_escaping_the_archive_are_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"abc")
    with pytest.raises(DataError, match=r"refusing archive member .*evil\.png"):
        folder.load(str(archive), 0.5, 0, tmp_path / "cache")


def test_tar_symlinks_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("a/x.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="not a regular file"):
        folder.load(str(archive), 0.5, 0, tmp_path / "cache")


# class folders: bad inputs, each named


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere not found"):
        folder.load(str(tmp_path / "nowhere"), 0.5, 0, tmp_path / "cache")


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2})
    (tmp_path / "ds" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder empty has no images"):
        folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")


def test_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="no images found"):
        folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")


def test_unsupported_file_in_a_class_is_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    (tmp_path / "ds" / "b" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file b/notes\.txt"):
        folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")


def test_image_outside_a_class_folder_is_named(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    shutil.copy(tmp_path / "ds" / "a" / "000.png", tmp_path / "ds" / "stray.png")
    with pytest.raises(DataError, match=r"stray\.png is not inside a class folder"):
        folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")


def test_train_without_test_is_refused(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds" / "train", {"a": 2})
    write_class_folders(tmp_path / "ds" / "other", {"a": 2})
    with pytest.raises(DataError, match="not both train/ and test/"):
        folder.load(str(tmp_path / "ds"), 0.5, 0, tmp_path / "cache")


def test_unknown_file_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data source"):
        folder.load(str(tmp_path / "data.csv"), 0.5, 0, tmp_path / "cache")


def test_load_dispatches_by_source_name(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "ds", {"x": 2, "y": 2})
    assert sources.load(str(tmp_path / "ds"), _params(), tmp_path).class_names() == ["x", "y"]
    assert sources.load("synthetic", _params(classes=2), tmp_path).class_names() == ["disk", "square"]
