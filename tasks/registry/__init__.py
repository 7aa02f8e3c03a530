"""The production model repository, in the layout Triton Inference Server serves.

```
<uri>/<model>/config.pbtxt      the production pointer: version_policy pins exactly one version
<uri>/<model>/labels.txt        class names of the production version, one per line
<uri>/<model>/<N>/model.onnx    immutable once written
<uri>/<model>/<N>/weights.pt    the PyTorch weights behind it (model.weights: production)
<uri>/<model>/<N>/card.json     the evidence: data, params, git rev, metrics, gate, verification
<uri>/<model>/history.jsonl     append-only: promotions, rollbacks, recoveries
<uri>/<model>/.lock             exclusive lock of promotions and rollbacks (empty file)
```
``<uri>`` is a local folder or any fsspec URL. A reader never sees a half-written version: on a
local disk a version is assembled in a hidden staging folder and renamed into place; on an object
store its files are uploaded before the pointer names it. Every pointer write is atomic (rename
locally, one object PUT remotely), and config.pbtxt is written last, so it only ever names a
complete version.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.blessing.evidence import Card
from tasks.errors import RegistryError
from tasks.fs.flock import LockTimeout, acquire_exclusive
from tasks.fs.hashing import file_digest
from tasks.fs.records import RecordError, utc_now
from tasks.params import RegistryParams
from tasks.paths import Workspace
from tasks.registry.status import ProductionStatus, RegistryStatus
from tasks.registry.store import Store, fsync_dir
from tasks.registry.triton import LABELS, config_pbtxt, pinned_version

log = logging.getLogger(__name__)

CONFIG = "config.pbtxt"
HISTORY = "history.jsonl"
LOCK = ".lock"
CARD = "card.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
VERSION_FILES = (MODEL_FILE, WEIGHTS_FILE, CARD)
STAGING_PREFIX = ".staging-"  # Triton ignores non-numeric subfolders of a model
_LOCK_POLL_S = 0.2


@dataclass(frozen=True)
class ProductionInfo:
    version: int
    model_path: str  # local path or fsspec URL of <N>/model.onnx
    card: Card


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid{os.getuid()}"


class Registry:
    """One model's repository; every change runs under `lock()`."""

    def __init__(self, uri: str, p: RegistryParams, cache: Path) -> None:
        self.store = Store(uri)
        self.params = p
        self.model_name = p.model_name
        self.cache = cache / p.model_name
        self._locked = False

    @classmethod
    def open(cls, ws: Workspace, p: RegistryParams) -> Registry:
        return cls(ws.registry_uri(p.uri), p, ws.registry_cache)

    def _p(self, *parts: str) -> str:
        return self.store.path(self.model_name, *parts)

    @property
    def location(self) -> str:
        return self.store.url(self._p())

    # reading
    def production_version(self) -> int | None:
        """The version config.pbtxt pins, or None before the first promotion."""
        config = self._p(CONFIG)
        if not self.store.exists(config):
            return None
        text = self.store.read_bytes(config).decode()
        version = pinned_version(text)
        if version is None:
            raise RegistryError(
                f"{self.store.url(config)} has no version_policy {{ specific {{ versions: [N] }} }}: "
                "it was edited by hand; restore it with `visionops rollback --to N`"
            )
        return version

    def card(self, version: int) -> Card:
        path = self._p(str(version), CARD)
        if not self.store.exists(path):
            raise RegistryError(f"{self.store.url(path)} is missing: version {version} is incomplete")
        try:
            return Card.from_json(json.loads(self.store.read_bytes(path)), where=self.store.url(path))
        except (ValueError, RecordError) as exc:
            raise RegistryError(f"{self.store.url(path)} is not a readable card: {exc}") from exc

    def production(self) -> ProductionInfo | None:
        version = self.production_version()
        if version is None:
            return None
        return ProductionInfo(version, self.store.url(self._p(str(version), MODEL_FILE)), self.card(version))

    def production_card(self) -> Card | None:
        info = self.production()
        return info.card if info else None

    def local_file(self, version: int, name: str) -> Path:
        """A local path to one file of a version (downloaded and checked from a remote registry)."""
        path = self._p(str(version), name)
        if not self.store.exists(path):
            raise RegistryError(f"{self.store.url(path)} not found in the registry")
        local = self.store.fetch(path, self.cache / str(version) / name)
        expected = self.card(version).files.get(name)
        if expected and not self.store.local and file_digest(local) != expected:
            local.unlink()
            raise RegistryError(f"download of {self.store.url(path)} does not match its card's sha256; retry")
        return local

    def production_model(self) -> Path | None:
        version = self.production_version()
        return None if version is None else self.local_file(version, MODEL_FILE)

    def production_weights(self) -> Path | None:
        version = self.production_version()
        if version is None or not self.store.exists(self._p(str(version), WEIGHTS_FILE)):
            return None
        return self.local_file(version, WEIGHTS_FILE)

    def versions(self) -> list[int]:
        """Complete versions (all files present), oldest first."""
        return [v for v in self.store.numeric_dirs(self._p()) if self._complete(v)]

    def _complete(self, version: int) -> bool:
        return all(self.store.exists(self._p(str(version), f)) for f in (MODEL_FILE, CARD))

    def history(self) -> list[dict[str, Any]]:
        """Entries of history.jsonl; lines torn by a killed process are skipped, counted and logged."""
        path = self._p(HISTORY)
        if not self.store.exists(path):
            return []
        entries, torn = [], []
        for number, line in enumerate(self.store.read_bytes(path).decode(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                torn.append(number)
        if torn:
            log.warning("skipped %d torn line(s) of %s (lines %s)", len(torn), self.store.url(path), torn[:10])
        return entries

    def status(self, limit: int = 20) -> RegistryStatus:
        """The `visionops status --json` shape: production (or None) and the recent history."""
        info = self.production()
        production = None if info is None else ProductionStatus.of(info.card, info.model_path)
        return RegistryStatus(registry=self.location, production=production, history=self.history()[-limit:])

    # writing (under the lock)
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive: promotions and rollbacks in other processes wait (registry.lock_timeout_s)."""
        if self._locked:
            raise AssertionError("registry lock is not re-entrant")
        acquire = self._lock_local if self.store.local else self._lock_remote
        with acquire():
            self._locked = True
            try:
                self._recover()
                yield
            finally:
                self._locked = False

    def _wait_message(self, waited: float) -> str:
        return (
            f"registry {self.location} is locked by another promotion or rollback (waited {waited:.0f} s,"
            " registry.lock_timeout_s); retry when it has finished"
        )

    @contextlib.contextmanager
    def _lock_local(self) -> Iterator[None]:
        Path(self._p()).mkdir(parents=True, exist_ok=True)
        fd = os.open(self._p(LOCK), os.O_RDWR | os.O_CREAT, 0o644)

        def report(waited: float) -> None:
            if waited < _LOCK_POLL_S:
                log.info("waiting for another promotion or rollback to release %s", self._p(LOCK))

        try:
            try:
                acquire_exclusive(fd, self.params.lock_timeout_s, _LOCK_POLL_S, report)
            except LockTimeout as exc:
                raise RegistryError(self._wait_message(exc.waited_s)) from None
            yield
        finally:
            os.close(fd)  # closing releases the flock

    @contextlib.contextmanager
    def _lock_remote(self) -> Iterator[None]:
        """Object stores have no flock: a lock object carrying a unique token, checked after writing."""
        path = self._p(LOCK)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}".encode()
        start = time.monotonic()
        while True:
            if not self.store.exists(path):
                self.store.fs.pipe_file(path, token)
                if self.store.read_bytes(path) == token:
                    break
            waited = time.monotonic() - start
            if waited > self.params.lock_timeout_s:
                raise RegistryError(
                    self._wait_message(waited) + f"; if no promotion is running, delete {self.store.url(path)}"
                )
            time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            self.store.fs.rm_file(path)

    def _recover(self) -> None:
        """Clean up after a process killed mid-operation (under the lock)."""
        if self.store.local:
            for stale in Path(self._p()).glob(STAGING_PREFIX + "*"):
                log.warning("removing %s left by an interrupted promotion", stale)
                shutil.rmtree(stale)
        version = self.production_version()
        entries = [e for e in self.history() if e.get("event") in ("promote", "rollback", "recover")]
        if version is not None and (not entries or entries[-1].get("version") != version):
            # The pointer moved but the process died before its history line: say so, don't hide it.
            self._append_history(
                {
                    "event": "recover",
                    "version": version,
                    "note": "an interrupted operation had switched production; history entry restored",
                }
            )

    def _require_lock(self) -> None:
        if not self._locked:
            raise AssertionError("registry writes must run inside `with registry.lock():`")

    def _append_history(self, entry: dict[str, Any]) -> None:
        entry = {"at": utc_now(), "by": f"{_user()}@{socket.gethostname()}", **entry}
        self.store.append_line(self._p(HISTORY), json.dumps(entry, sort_keys=False))

    def _write_version(self, version: int, files: Mapping[str, Path], card: Card) -> None:
        card_bytes = (json.dumps(card.to_json(), indent=2) + "\n").encode()
        if self.store.local:
            staging = Path(self._p(f"{STAGING_PREFIX}{uuid.uuid4().hex}"))
            staging.mkdir(parents=True)
            for name, src in files.items():
                shutil.copyfile(src, staging / name)
            (staging / CARD).write_bytes(card_bytes)
            for f in staging.iterdir():
                f.chmod(0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            staging.chmod(0o755)
            fsync_dir(staging)
            os.rename(staging, self._p(str(version)))  # atomic: the folder appears whole
            fsync_dir(Path(self._p()))
        else:
            for name, src in files.items():
                self.store.fs.put_file(str(src), self._p(str(version), name))
            self.store.fs.pipe_file(self._p(str(version), CARD), card_bytes)

    def _activate(self, version: int, card: Card) -> None:
        """Point production at ``version``: labels first, then the pointer (config.pbtxt)."""
        self.store.write_atomic(self._p(LABELS), ("\n".join(card.classes) + "\n").encode())
        # The batch limit this version was verified at, not whatever params.yaml says today.
        max_batch = card.params.get("registry", {}).get("max_batch_size", self.params.max_batch_size)
        text = config_pbtxt(self.model_name, int(max_batch), version, card.export)
        self.store.write_atomic(self._p(CONFIG), text.encode())

    def next_version(self) -> int:
        """The number the next published version gets (call under the lock)."""
        self._require_lock()
        # Counts incomplete folders too, so a number is never reused for different bytes.
        existing = self.store.numeric_dirs(self._p())
        return (existing[-1] if existing else 0) + 1

    def publish(self, files: Mapping[str, Path], card: Card, history: Mapping[str, Any]) -> int:
        """Add a new version holding ``files`` and ``card`` and make it production; its number."""
        self._require_lock()
        missing = [n for n in (MODEL_FILE,) if n not in files]
        if missing or set(files) - set(VERSION_FILES):
            raise AssertionError(f"publish needs {MODEL_FILE} (+ {WEIGHTS_FILE}), got {sorted(files)}")
        version = self.next_version()
        hashes = {name: file_digest(path) for name, path in files.items()}
        if (card.version, card.model_name, card.files) != (version, self.model_name, hashes):
            raise AssertionError(
                f"the card describes version {card.version} of {card.model_name} with {card.files};"
                f" publishing version {version} of {self.model_name} with {hashes}"
            )
        previous = self.production_version()
        self._write_version(version, files, card)
        self._activate(version, card)
        self._append_history({"event": "promote", "version": version, "previous": previous, **history})
        log.info("production of %s is now version %d (%s)", self.model_name, version, self.location)
        return version

    def rollback(self, to: int | None = None) -> int:
        """Move production back to ``to`` (default: the newest complete version before it)."""
        if self.production_version() is None:  # checked before locking: the lock would create the folder
            raise RegistryError(f"{self.location} has no production version to roll back from")
        with self.lock():
            current = self.production_version()
            if current is None:
                raise RegistryError(f"{self.location} has no production version to roll back from")
            complete = self.versions()
            if to is None:
                earlier = [v for v in complete if v < current]
                if not earlier:
                    raise RegistryError(f"version {current} is the oldest in {self.location}: nothing to roll back to")
                to = earlier[-1]
            if to not in complete:
                raise RegistryError(f"version {to} is not a complete version of {self.location} (have {complete})")
            if to == current:
                raise RegistryError(f"version {to} is already production in {self.location}")
            card = self.card(to)
            self._activate(to, card)
            self._append_history({"event": "rollback", "version": to, "previous": current})
            log.info("rolled %s back from version %d to %d", self.model_name, current, to)
            return to
