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
import posixpath
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_write_bytes
from tasks.downloads import file_digest
from tasks.errors import RegistryError
from tasks.flock import LockTimeout, acquire_exclusive
from tasks.params import RegistryParams
from tasks.paths import Workspace

log = logging.getLogger(__name__)

CONFIG = "config.pbtxt"
LABELS = "labels.txt"
HISTORY = "history.jsonl"
LOCK = ".lock"
CARD = "card.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
VERSION_FILES = (MODEL_FILE, WEIGHTS_FILE, CARD)
STAGING_PREFIX = ".staging-"  # Triton ignores non-numeric subfolders of a model
_POLICY = re.compile(r"version_policy\s*:?\s*\{\s*specific\s*:?\s*\{\s*versions\s*:\s*\[?\s*(\d+)")
_LOCK_POLL_S = 0.2


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def config_pbtxt(model_name: str, max_batch_size: int, version: int, contract: Mapping[str, Any]) -> str:
    """Triton model configuration (protobuf text) pinning ``version``; ``contract`` is export.json."""
    inp, out = contract["input"], contract["output"]
    dims = ", ".join(str(d) for d in inp["shape"][1:])
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"version_policy: {{ specific: {{ versions: [{version}] }} }}\n"
        "input [\n"
        "  {\n"
        f'    name: "{inp["name"]}"\n'
        "    data_type: TYPE_UINT8\n"
        "    format: FORMAT_NCHW\n"
        f"    dims: [{dims}]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{out["name"]}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [{out['shape'][1]}]\n"
        f'    label_filename: "{LABELS}"\n'
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )


@dataclass(frozen=True)
class ProductionInfo:
    version: int
    model_path: str  # local path or fsspec URL of <N>/model.onnx
    card: dict[str, Any]


class _Store:
    """Files under the registry root, on a local disk or through fsspec."""

    def __init__(self, uri: str) -> None:
        import fsspec

        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            atomic_write_bytes(Path(path), data)
            Path(path).chmod(0o644)
        else:
            self.fs.pipe_file(path, data)  # one object PUT: readers see the old object or the new one

    def append_line(self, path: str, line: str) -> None:
        """Append one JSON line; the caller holds the lock, so appends never interleave."""
        data = (line.rstrip("\n") + "\n").encode()
        if self.local:
            with open(path, "a+b") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data  # end a line torn by a killed process; never glue onto it
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            old = self.read_bytes(path) if self.exists(path) else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            self.fs.pipe_file(path, old + data)

    def numeric_dirs(self, path: str) -> list[int]:
        if not self.exists(path):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        return sorted(int(n) for n in names if n.isdigit() and not n.startswith("0"))

    def fetch(self, path: str, dest: Path) -> Path:
        """A local file for ``path``: itself on a local disk, a cached download otherwise."""
        if self.local:
            return Path(path)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, self.read_bytes(path))
        return dest


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid{os.getuid()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """One model's repository; every change runs under `lock()`."""

    def __init__(self, uri: str, p: RegistryParams, cache: Path) -> None:
        self.store = _Store(uri)
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
        match = _POLICY.search(text)
        if match is None:
            raise RegistryError(
                f"{self.store.url(config)} has no version_policy {{ specific {{ versions: [N] }} }}: "
                "it was edited by hand; restore it with `visionops rollback --to N`"
            )
        return int(match.group(1))

    def card(self, version: int) -> dict[str, Any]:
        path = self._p(str(version), CARD)
        if not self.store.exists(path):
            raise RegistryError(f"{self.store.url(path)} is missing: version {version} is incomplete")
        return json.loads(self.store.read_bytes(path))

    def production(self) -> ProductionInfo | None:
        version = self.production_version()
        if version is None:
            return None
        return ProductionInfo(version, self.store.url(self._p(str(version), MODEL_FILE)), self.card(version))

    def production_card(self) -> dict[str, Any] | None:
        info = self.production()
        return info.card if info else None

    def local_file(self, version: int, name: str) -> Path:
        """A local path to one file of a version (downloaded and checked from a remote registry)."""
        path = self._p(str(version), name)
        if not self.store.exists(path):
            raise RegistryError(f"{self.store.url(path)} not found in the registry")
        local = self.store.fetch(path, self.cache / str(version) / name)
        expected = self.card(version).get("files", {}).get(name)
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

    def status(self, limit: int = 20) -> dict[str, Any]:
        """The `visionops status --json` shape: production (or None) and the recent history."""
        info = self.production()
        production = None
        if info is not None:
            card = info.card
            verification = card.get("verification", {})
            production = {
                "version": info.version,
                "model_path": info.model_path,
                "metrics": {
                    k: card["metrics"][k] for k in ("accuracy", "macro_f1", "n_test") if k in card.get("metrics", {})
                },
                "promoted_at": card.get("promoted_at"),
                "classes": card.get("classes"),
                "input": card.get("export", {}).get("input"),
                "provider_verified": verification.get("provider_active"),
                "cuda_verified": bool(verification.get("cuda_verified", False)),
                "gate": card.get("gate", {}).get("summary"),
                "git_rev": card.get("git_rev"),
                "data_md5": card.get("data", {}).get("md5"),
            }
        return {"registry": self.location, "production": production, "history": self.history()[-limit:]}

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
        entry = {"at": now(), "by": f"{_user()}@{socket.gethostname()}", **entry}
        self.store.append_line(self._p(HISTORY), json.dumps(entry, sort_keys=False))

    def _next_version(self) -> int:
        # Counts incomplete folders too, so a number is never reused for different bytes.
        existing = self.store.numeric_dirs(self._p())
        return (existing[-1] if existing else 0) + 1

    def _write_version(self, version: int, files: Mapping[str, Path], card: dict[str, Any]) -> None:
        card_bytes = (json.dumps(card, indent=2) + "\n").encode()
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
            _fsync_dir(staging)
            os.rename(staging, self._p(str(version)))  # atomic: the folder appears whole
            _fsync_dir(Path(self._p()))
        else:
            for name, src in files.items():
                self.store.fs.put_file(str(src), self._p(str(version), name))
            self.store.fs.pipe_file(self._p(str(version), CARD), card_bytes)

    def _activate(self, version: int, card: Mapping[str, Any]) -> None:
        """Point production at ``version``: labels first, then the pointer (config.pbtxt)."""
        self.store.write_atomic(self._p(LABELS), ("\n".join(card["classes"]) + "\n").encode())
        # The batch limit this version was verified at, not whatever params.yaml says today.
        max_batch = card.get("params", {}).get("registry", {}).get("max_batch_size", self.params.max_batch_size)
        text = config_pbtxt(self.model_name, int(max_batch), version, card["export"])
        self.store.write_atomic(self._p(CONFIG), text.encode())

    def publish(self, files: Mapping[str, Path], card: dict[str, Any], history: Mapping[str, Any]) -> int:
        """Add a new version holding ``files`` and ``card`` and make it production; its number."""
        self._require_lock()
        missing = [n for n in (MODEL_FILE,) if n not in files]
        if missing or set(files) - set(VERSION_FILES):
            raise AssertionError(f"publish needs {MODEL_FILE} (+ {WEIGHTS_FILE}), got {sorted(files)}")
        previous = self.production_version()
        version = self._next_version()
        card = {
            **card,
            "version": version,
            "model_name": self.model_name,
            "files": {name: file_digest(path) for name, path in files.items()},
        }
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
