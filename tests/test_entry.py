"""tasks/entry.py: a stage's failure is one `visionops: error:` line and its exit code, never a traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.entry import run_stage
from tasks.errors import GateRejected


def _exit(stage, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        run_stage(stage)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(info.value.code or 0), [line for line in err.splitlines() if line.startswith("visionops: error: ")]


def test_a_full_disk_names_the_file_and_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    def stage() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/ws/prepared/train_images.npy")

    code, errors = _exit(stage, capsys)
    assert code == 1 and errors == [
        "visionops: error: StorageError: cannot write /ws/prepared/train_images.npy: No space left on device;"
        " free space on that disk (`df -h`) and run it again"
    ]


def test_a_parquet_file_no_reader_caught_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "manifest.parquet"
    broken.write_bytes(b"PAR1 not really")

    def stage() -> None:
        pq.read_table(broken)

    code, errors = _exit(stage, capsys)
    assert code == 1 and len(errors) == 1 and "a Parquet file is unreadable" in errors[0]


def test_the_exit_code_is_the_errors(capsys: pytest.CaptureFixture[str]) -> None:
    def stage() -> None:
        raise GateRejected("accuracy 0.1 < 0.9")

    assert _exit(stage, capsys) == (3, ["visionops: error: GateRejected: accuracy 0.1 < 0.9"])


def test_a_bug_keeps_its_traceback() -> None:
    def stage() -> None:
        raise KeyError("a bug, not a condition to report")

    with pytest.raises(KeyError):
        run_stage(stage)


def test_a_network_failure_is_named_as_one(capsys: pytest.CaptureFixture[str]) -> None:
    def stage() -> None:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    code, errors = _exit(stage, capsys)
    assert code == 1 and errors[0].startswith("visionops: error: RuntimeUnavailable: stage test_entry:")
    assert "check the network" in errors[0]
