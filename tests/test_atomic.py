"""tasks/fs/atomic.py: renames made durable, work folders owned by a live process, cleaned up after a kill."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.fs import atomic
from tasks.fs.atomic import Staging, atomic_write_text, discard, durable_replace, sweep


def test_a_rename_is_followed_by_an_fsync_of_both_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    durable_replace(tmp_path / "a" / "f", tmp_path / "b" / "f")
    folders = {(p.stat().st_dev, p.stat().st_ino) for p in (tmp_path / "a", tmp_path / "b")}
    assert folders <= set(synced) and (tmp_path / "b" / "f").read_text() == "x"


def test_atomic_writes_read_like_any_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "report.json", "{}\n")
    mode = stat.S_IMODE((tmp_path / "report.json").stat().st_mode)
    assert mode == 0o666 & ~atomic._umask() and mode & stat.S_IROTH
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_staging_folder_is_removed_on_failure_and_kept_while_its_owner_lives(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Staging(tmp_path, "work-") as staging:
        (staging.path / "half").write_text("...")
        assert sweep(tmp_path, "work-") == [], "a live owner's folder is not swept"
        raise RuntimeError("the work failed")
    assert not list(tmp_path.iterdir())


@pytest.mark.integration  # kills a real process
def test_sweep_removes_what_a_killed_owner_left_and_nothing_else(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from tasks.fs.atomic import Staging;"
        "s = Staging(Path(sys.argv[1]), 'work-'); (s.path / 'half').write_text('...');"
        "os.kill(os.getpid(), 9)"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).resolve().parents[1])
    assert killed.returncode == -9
    (left,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    with Staging(tmp_path, "work-") as alive:
        (tmp_path / "work-unrelated.txt").write_text("not a work folder of ours")
        assert sweep(tmp_path, "work-") == [left]
        assert alive.path.is_dir() and (tmp_path / "work-unrelated.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work-unrelated.txt"]


def test_discard_leaves_nothing_under_the_old_name(tmp_path: Path) -> None:
    (tmp_path / "prepared" / "sub").mkdir(parents=True)
    (tmp_path / "prepared" / "sub" / "x.npy").write_bytes(b"x")
    discard(tmp_path / "prepared")
    assert list(tmp_path.iterdir()) == []
