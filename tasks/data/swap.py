"""Which data/ is current: swapping a new version in, rolling it back, and the version kept until
validate accepts the new one.

data/ and data.dvc change together or not at all. Before anything moves, a rollback record (a
work folder under ``.visionops/data/``) saves data.dvc's bytes; data/ is then renamed into it and
the new folder renamed into place. Until the ingest commits, a failure (or, after a kill, the next
ingest's :func:`recover`) puts both back. Renames only: no copy of the data is ever made.

A committed new version is *pending*: the version it replaced stays in ``.visionops/data/accepted``
until the validate stage has run on the new one. Validate passing discards it
(:func:`settle` with ``passed=True``); validate failing puts it back, so that a rejected dataset
never stays the current version, in a flow run and under ``dvc repro`` alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tasks.fs.atomic import Staging, atomic_write_text, discard, durable_replace, orphans, sweep
from tasks.fs.records import Record
from tasks.paths import Workspace

log = logging.getLogger(__name__)

ROLLBACK_PREFIX = "rollback-"
RECORD = "version.json"
ACCEPTED = "accepted"


@dataclass(frozen=True)
class DataVersion(Record):
    """data/ and data.dvc as they were: what a rollback or a rejection puts back."""

    had_data: bool  # False: there was no data/ (the first ingest); putting it back removes data/
    dvc_file: str | None  # data.dvc's text; None: there was none
    pending_content: str = ""  # content_sha256 of the version that replaced it (while pending)


def _state(ws: Workspace) -> Path:
    return ws.state / "data"


def _put_back(ws: Workspace, folder: Path) -> None:
    """Make data/ and data.dvc what ``folder``'s record says they were. Safe to repeat after a kill."""
    version = DataVersion.read(folder / RECORD, "ingest")
    saved = folder / "data"
    if saved.exists() or not version.had_data:
        discard(ws.data)  # the newer data/, or a half-moved one
    if saved.exists():
        durable_replace(saved, ws.data)
    dvc_file = ws.data_dvc
    if version.dvc_file is None:
        dvc_file.unlink(missing_ok=True)
    elif not dvc_file.is_file() or dvc_file.read_text() != version.dvc_file:
        atomic_write_text(dvc_file, version.dvc_file)


class DataSwap:
    """One ingest's change of data/ and data.dvc: ``put_in_place``, then ``commit`` or ``rollback``."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.staging = Staging(_state(ws), ROLLBACK_PREFIX)
        self.folder = self.staging.path
        dvc_file = ws.data_dvc
        self.version = DataVersion(
            had_data=ws.data.exists(), dvc_file=dvc_file.read_text() if dvc_file.is_file() else None
        )
        self.version.write(self.folder / RECORD)  # durable before anything moves

    def put_in_place(self, new: Path) -> None:
        """Make ``new`` the data/ folder, keeping the current one in the rollback folder."""
        if self.ws.data.exists():
            durable_replace(self.ws.data, self.folder / "data")
        durable_replace(new, self.ws.data)

    def rollback(self) -> None:
        _put_back(self.ws, self.folder)
        self.staging.close()

    def commit(self, pending_content: str | None) -> None:
        """The new version stands. ``pending_content`` (its content hash) when it still has to pass
        validate: the version it replaced is kept as the accepted one, unless one is kept already."""
        accepted = _state(self.ws) / ACCEPTED
        if pending_content is not None and not accepted.exists():
            record = DataVersion(self.version.had_data, self.version.dvc_file, pending_content)
            record.write(self.folder / RECORD)
            durable_replace(self.folder, accepted)
        elif pending_content is not None:
            # The version kept is still the last accepted one; the pending one this replaced is dropped.
            kept = DataVersion.read(accepted / RECORD, "ingest")
            DataVersion(kept.had_data, kept.dvc_file, pending_content).write(accepted / RECORD)
        self.staging.close()  # removes the rollback folder unless it became the accepted one


def recover(ws: Workspace) -> int:
    """Undo the swaps of ingests that were killed (rollback folders without a live owner); how many."""
    undone = 0
    for folder in orphans(_state(ws), ROLLBACK_PREFIX):
        if (folder / RECORD).is_file():
            _put_back(ws, folder)
            log.warning("an earlier ingest was interrupted: data/ and data.dvc are back as they were before it")
            undone += 1
    sweep(_state(ws), ROLLBACK_PREFIX)
    return undone


def settle(ws: Workspace, passed: bool, validated_content: str) -> str | None:
    """After validate ran on the data with content hash ``validated_content``: accept the pending
    version (``passed``) or put the accepted one back. A message saying what was put back, or None."""
    accepted = _state(ws) / ACCEPTED
    if not (accepted / RECORD).is_file():
        return None
    version = DataVersion.read(accepted / RECORD, "ingest")
    if version.pending_content != validated_content:
        return None  # validate ran on other data than the pending version (a stale prepared/)
    if passed:
        discard(accepted)
        return None
    _put_back(ws, accepted)
    discard(accepted)
    if not version.had_data:
        return "data/ and data.dvc are removed: there was no earlier data version to go back to"
    return "data/ and data.dvc are back at the last version that passed validation"
