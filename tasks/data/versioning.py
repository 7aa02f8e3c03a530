"""Versioning of data/ with DVC: ``dvc add`` (updates data.dvc), ``dvc push`` to the default remote,
and a check that both really hold every file of the version.

The real ``dvc`` command of this interpreter's environment is run, so the result is exactly what a
user typing the commands would get. Its exit status is not trusted: on a full disk ``dvc add`` can
leave a truncated object under its final name (or exit 0), and ``dvc push``/``dvc status -c``
assume a folder's files are on the remote once its ``.dir`` object is. :func:`verify` reads the
version's ``.dir`` manifest and checks each file's object, by name and size, through DVC's own
file systems (local folders, S3 and the rest alike).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tasks.errors import DataError, RuntimeUnavailable
from tasks.fs.hashing import file_digest
from tasks.paths import Workspace

log = logging.getLogger(__name__)


def run_dvc(ws: Workspace, *args: str) -> str:
    """``dvc <args>`` in the workspace; its stdout. :class:`DataError` with DVC's message on failure."""
    if not (ws.root / ".dvc").is_dir():
        raise DataError(f"{ws.root} is not a DVC repository: run `git init && dvc init` there first")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ws.root, env=env, text=True, capture_output=True, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DataError(f"`dvc {' '.join(args)}` failed in {ws.root} (exit {proc.returncode}): {' | '.join(detail)}")
    return proc.stdout


def tracked_md5(dvc_file: Path) -> str | None:
    """The md5 a ``.dvc`` file records for its output, or None when there is no such file."""
    if not dvc_file.is_file():
        return None
    doc = yaml.safe_load(dvc_file.read_text()) or {}
    outs = doc.get("outs") or [{}]
    return outs[0].get("md5")


def add(ws: Workspace, target: Path) -> Path:
    """``dvc add <target>``: caches it and writes ``<target>.dvc``; returns that file."""
    rel = target.relative_to(ws.root).as_posix()
    run_dvc(ws, "add", "--quiet", rel)
    return target.with_name(target.name + ".dvc")


def push(ws: Workspace, dvc_file: Path) -> None:
    """``dvc push <dvc_file>`` to the default remote; :class:`RuntimeUnavailable` if it cannot."""
    rel = dvc_file.relative_to(ws.root).as_posix()
    try:
        run_dvc(ws, "push", "--quiet", rel)
    except DataError as exc:
        raise RuntimeUnavailable(f"{exc}; check `dvc remote list` and that the remote is reachable") from exc


class VersionIncomplete(DataError):
    """DVC reported success, but its cache or remote lacks files of the version (missing or truncated)."""


@dataclass(frozen=True)
class VersionFile:
    relpath: str  # inside data/
    md5: str
    size: int  # bytes, as data/ holds it


def _manifest(cache: Any, md5: str, data: Path) -> list[VersionFile]:
    """The files of version ``md5`` (a ``.dir`` hash), from the ``.dir`` object in the cache."""
    try:
        entries = json.loads(Path(cache.oid_to_path(md5)).read_text())
    except (OSError, ValueError) as exc:
        raise VersionIncomplete(
            f"the DVC cache has no readable manifest of data version {md5} ({exc}): the cache write failed;"
            " free space on the disk of the DVC cache and run `visionops ingest` again"
        ) from exc
    return [VersionFile(e["relpath"], e["md5"], (data / e["relpath"]).stat().st_size) for e in entries]


def _problems(odb: Any, files: list[VersionFile], md5: str) -> list[tuple[VersionFile | None, str, str]]:
    """(file, object path, what is wrong) for every object of the version the ``odb`` lacks."""
    paths = [odb.oid_to_path(f.md5) for f in files] + [odb.oid_to_path(md5)]
    infos = odb.fs.info(paths, return_exceptions=True)
    problems: list[tuple[VersionFile | None, str, str]] = []
    for file, path, info in zip([*files, None], paths, infos, strict=True):
        if isinstance(info, Exception):
            problems.append((file, path, "missing" if isinstance(info, FileNotFoundError) else str(info)))
        elif file is not None and info.get("size") != file.size:
            problems.append((file, path, f"truncated: {info.get('size')} of {file.size} bytes"))
    return problems


def _drop_corrupt(problems: list[tuple[VersionFile | None, str, str]]) -> None:
    """Delete the cache objects among ``problems`` whose bytes do not hash to their md5 name. A size
    that differs from data/ alone proves nothing: data/ may hold another version than the one named."""
    for file, path, _what in problems:
        if file is not None and Path(path).is_file() and file_digest(Path(path), "md5") != file.md5:
            Path(path).unlink()


def verify(ws: Workspace, dvc_file: Path, where: Literal["cache", "remote"]) -> int:
    """Check that the DVC cache (or the default remote) holds every file of the version ``dvc_file``
    names, by object name and size; the number of files checked, or :class:`VersionIncomplete`.

    Objects in the local cache whose bytes do not hash to their name (what a full disk leaves) are
    deleted, so that the next ``dvc add`` writes them again instead of trusting their names.
    """
    md5 = tracked_md5(dvc_file)
    if md5 is None or not md5.endswith(".dir"):
        raise VersionIncomplete(f"{dvc_file} names no data folder version ({md5!r}): `dvc add` failed")
    from dvc.repo import Repo  # type: ignore[import-untyped]  # DVC's own view of its cache and remotes

    with Repo(str(ws.root)) as repo:
        cache = repo.cache.local
        files = _manifest(cache, md5, ws.data)
        odb = cache if where == "cache" else repo.cloud.get_remote_odb(None, "push")
        problems = _problems(odb, files, md5)
        location = odb.path
        if where == "cache":
            _drop_corrupt(problems)
    if problems:
        file, path, what = problems[0]
        name = f"data/{file.relpath}" if file is not None else "the version's .dir manifest"
        advice = (
            "free space on the disk of the DVC cache and run `visionops ingest` again"
            if where == "cache"
            else f"DVC trusts a .dir object it finds on the remote: delete {odb.oid_to_path(md5)} there and"
            " run `visionops ingest` again, so that every file is uploaded"
        )
        raise VersionIncomplete(
            f"DVC reported success, but the {where} ({location}) lacks {len(problems)} of {len(files) + 1}"
            f" objects of data version {md5}: {name} (object {path}) is {what}; {advice}"
        )
    log.info("data version %s: all %d files are in the %s (%s)", md5, len(files), where, location)
    return len(files)


def drop_truncated(ws: Workspace, dvc_file: Path) -> None:
    """After a failed ``dvc add``: delete the cache objects of the version ``dvc_file`` names that are
    truncated, so that a retry writes them again. Best effort: the failure being handled matters more."""
    try:
        verify(ws, dvc_file, "cache")
    except Exception as exc:  # a full disk can break DVC itself in any way here
        log.debug("cache check after a failed ingest: %s", exc)
