"""The production model repository, in the layout Triton Inference Server serves.

```
<uri>/<model>/config.pbtxt        the pointer: pins one version and names its labels file (one write switches both)
<uri>/<model>/labels-<N>.txt      class names of version N, immutable
<uri>/<model>/<N>/model.onnx      immutable once written
<uri>/<model>/<N>/weights.pt      the PyTorch weights behind it (model.weights: production)
<uri>/<model>/<N>/card.json       the evidence: data, params.yaml/dvc.lock/data.dvc, metrics, gate, verification
<uri>/<model>/history/<seq>.json  one immutable event each: promote (with every file's sha256), rollback, ...
<uri>/<model>/production.json     names the production version: a DVC dependency of validate (drift)
<uri>/<model>/.lock               the lock: flock on a local disk, a lease object on S3
```
``<uri>`` is a local folder or any fsspec URL. Publishing a version (under the lock): its files are
written under ``<N>/`` (locally through a staging folder renamed into place; on S3 each object
created only if absent) with ``labels-<N>.txt``, and every file's sha256 is checked after writing;
then the promote event records those hashes; only then does config.pbtxt move. Every read of a
version checks each file against that event. A version that was never activated by an event is
never production nor a rollback target, and the next locked operation removes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.blessing.evidence import Card
from tasks.errors import RegistryError
from tasks.fs.hashing import file_digest
from tasks.fs.records import RecordError, utc_now
from tasks.params import RegistryParams
from tasks.paths import Workspace
from tasks.registry.history import ACTIVATIONS, EventKind, Events, History, HistoryEvent
from tasks.registry.layout import (
    CARD,
    CONFIG,
    HISTORY,
    MARKER,
    MODEL_FILE,
    PROBE_PREFIX,
    STAGING_PREFIX,
    VERSION_FILES,
    WEIGHTS_FILE,
)
from tasks.registry.lease import Lease
from tasks.registry.locking import registry_lock, user
from tasks.registry.status import (
    ProductionMarker,
    ProductionStatus,
    RegistryAudit,
    RegistryStatus,
    VersionAudit,
    VersionState,
)
from tasks.registry.store import Conflict, Store, numbered
from tasks.registry.triton import Pin, config_pbtxt, labelled_versions, labels_bytes, labels_file, pinned
from tasks.registry.upload import write_version

log = logging.getLogger(__name__)


class IntegrityError(RegistryError):
    """A file of a registry version is missing or differs from the sha256 recorded when it was published."""


@dataclass(frozen=True)
class ProductionInfo:
    version: int
    model_path: str  # local path or fsspec URL of <N>/model.onnx
    card: Card
    files: dict[str, str]  # every file of the version (relative to the model folder) -> sha256, verified


class Registry:
    """One model's repository; every change runs under `lock()`."""

    def __init__(self, uri: str, p: RegistryParams, cache: Path) -> None:
        self.store = Store(uri)
        self.params = p
        self.model_name = p.model_name
        self.cache = cache / p.model_name
        self.history = History(self.store, self._p(HISTORY), self.cache / "history")
        self._locked = False
        self._lease: Lease | None = None
        # Cached while locked (nobody else writes then), dropped when this process writes:
        self._events: Events | None = None
        self._listing: dict[str, str | None] | None = None  # the model folder: name -> tag
        self._pinned: tuple[Pin | None, str | None] | None = None  # config.pbtxt's pin and tag (fencing)
        self._marker: bytes | None = None
        self._verified: dict[int, dict[str, Path]] = {}

    @classmethod
    def open(cls, ws: Workspace, p: RegistryParams) -> Registry:
        return cls(ws.registry_uri(p.uri), p, ws.registry_cache)

    def _p(self, *parts: str) -> str:
        return self.store.path(self.model_name, *parts)

    @property
    def location(self) -> str:
        return self.store.url(self._p())

    # reading
    def events(self) -> Events:
        if self._events is not None:
            return self._events
        events = self.history.read()
        if not events.events and "history.jsonl" in self._entries():
            raise RegistryError(
                f"{self.location} was written by an older visionops (history.jsonl, labels.txt):"
                " promote into a new registry.uri or registry.model_name"
            )
        if self._locked:
            self._events = events
        return events

    def _pin(self) -> tuple[Pin | None, str | None]:
        """What config.pbtxt pins, and its tag; (None, None) before the first promotion."""
        if self._pinned is not None:
            return self._pinned
        path = self._p(CONFIG)
        try:
            data, tag = self.store.read_tagged(path)
        except FileNotFoundError:
            data, tag = None, None
        if data is None:
            if self._locked:
                self._pinned = (None, None)
            return None, None
        pin = pinned(data.decode(errors="replace"))
        if pin is None:
            raise RegistryError(
                f"{self.store.url(path)} has no version_policy {{ specific {{ versions: [N] }} }}: "
                "it was edited by hand; restore it with `visionops rollback --to N`"
            )
        if self._locked:
            self._pinned = (pin, tag)
        return pin, tag

    def _entries(self) -> dict[str, str | None]:
        """The model folder's names and tags (one listing; cached while locked)."""
        if self._listing is not None:
            return self._listing
        listing = self.store.entries(self._p())
        if self._locked:
            self._listing = listing
        return listing

    def production_version(self) -> int | None:
        """The version config.pbtxt pins, or None before the first promotion (files not checked)."""
        pin, _ = self._pin()
        return None if pin is None else pin.version

    def verified_files(self, version: int) -> dict[str, Path]:
        """Local copies of every file of ``version``, each checked against the sha256 its promote
        event recorded at publish time; `IntegrityError` naming the version and the file."""
        if version in self._verified:
            return self._verified[version]
        record = self.events().published(version)
        if record is None:
            raise IntegrityError(
                f"version {version} of {self.location} has no promote event in its history: it was never"
                " activated, so its files cannot be verified"
            )
        # Two listings give every file's tag (ETag): labels-<N>.txt in the model folder, the rest in <N>/.
        in_version = self.store.entries(self._p(str(version)))
        tags = {**self._entries(), **{f"{version}/{name}": tag for name, tag in in_version.items()}}
        files = {}
        for name, expected in sorted(record.files.items()):
            path = self._p(name)
            try:
                if name not in tags:
                    raise FileNotFoundError(path)
                local = self.store.local_copy(path, self.cache / str(version), tags[name])
            except FileNotFoundError:
                raise IntegrityError(
                    f"version {version}: {self.store.url(path)} is missing (history event {record.seq} recorded"
                    f" it); restore it, or move production with `visionops rollback --to N`"
                ) from None
            actual = file_digest(local)
            if actual != expected:
                if not self.store.local:
                    local.unlink(missing_ok=True)
                raise IntegrityError(
                    f"version {version}: {self.store.url(path)} does not match the sha256 recorded when it was"
                    f" published (history event {record.seq}): {actual[:12]}... instead of {expected[:12]}...;"
                    " it was changed after promotion: restore it, or move production with `visionops rollback --to N`"
                )
            files[name] = local
        self._verified[version] = files
        return files

    def card(self, version: int) -> Card:
        local = self.verified_files(version).get(f"{version}/{CARD}")
        where = self.store.url(self._p(str(version), CARD))
        if local is None:
            raise IntegrityError(f"version {version} of {self.location} recorded no {CARD}")
        try:
            card = Card.from_json(json.loads(local.read_bytes()), where=where)
        except (ValueError, RecordError) as exc:
            raise RegistryError(f"{where} is not a readable card: {exc}") from exc
        if (card.version, card.model_name) != (version, self.model_name):
            raise IntegrityError(f"{where} describes version {card.version} of {card.model_name}")
        return card

    def production(self) -> ProductionInfo | None:
        """Production as config.pbtxt pins it, every file verified; None before the first promotion."""
        pin, _ = self._pin()
        if pin is None:
            return None
        if not pin.paired:
            raise RegistryError(
                f"{self.store.url(self._p(CONFIG))} pins version {pin.version} with labels {pin.labels!r},"
                f" not {labels_file(pin.version)!r}: an interrupted operation; the next promote or rollback repairs it"
            )
        card = self.card(pin.version)
        record = self.events().published(pin.version)
        assert record is not None  # card() verified against it
        model_path = self.store.url(self._p(str(pin.version), MODEL_FILE))
        return ProductionInfo(pin.version, model_path, card, dict(record.files))

    def production_card(self) -> Card | None:
        info = self.production()
        return info.card if info else None

    def local_file(self, version: int, name: str) -> Path:
        """A local path to one file of a version (downloaded from a remote registry), verified."""
        files = self.verified_files(version)
        key = f"{version}/{name}"
        if key not in files:
            raise RegistryError(f"version {version} of {self.location} has no {name}")
        return files[key]

    def production_model(self) -> Path | None:
        version = self.production_version()
        return None if version is None else self.local_file(version, MODEL_FILE)

    def production_weights(self) -> Path | None:
        info = self.production()
        if info is None or f"{info.version}/{WEIGHTS_FILE}" not in info.files:
            return None
        return self.local_file(info.version, WEIGHTS_FILE)

    def versions(self) -> list[int]:
        """Versions that were production at some point (the only rollback targets), oldest first."""
        return sorted(self.events().activated())

    def withdrawn_holding(self, hashes: Iterable[str]) -> list[int]:
        """Withdrawn versions whose model.onnx or weights.pt has one of ``hashes`` (sha256)."""
        events, wanted = self.events(), set(hashes)
        found = []
        for version in sorted(events.withdrawn()):
            record = events.published(version)
            recorded = record.files if record else {}
            if wanted & {recorded.get(f"{version}/{MODEL_FILE}"), recorded.get(f"{version}/{WEIGHTS_FILE}")}:
                found.append(version)
        return found

    def status(self, limit: int = 20) -> RegistryStatus:
        """The `visionops status --json` shape: production (verified) and the recent history."""
        info = self.production()
        events = self.events()
        production = None
        if info is not None:
            record = events.published(info.version)
            seq = record.seq if record else "?"
            integrity = f"{len(info.files)} files match the sha256 recorded in history event {seq}"
            production = ProductionStatus.of(info.card, info.model_path, integrity)
        return RegistryStatus(
            registry=self.location,
            production=production,
            history=events.last(limit),
            withdrawn=sorted(events.withdrawn()),
        )

    def audit(self) -> RegistryAudit:
        """Every version's files against the history, and the pointer against the history."""
        events = self.events()
        pin, _ = self._pin()
        problems = []
        if pin is not None and pin.version != events.production():
            problems.append(
                f"config.pbtxt pins version {pin.version} but the history's last activation is"
                f" {events.production()}: an interrupted operation; the next promote or rollback completes it"
            )
        if pin is not None and not pin.paired:
            problems.append(f"config.pbtxt names labels {pin.labels!r}, not {labels_file(pin.version)!r}")
        withdrawn = events.withdrawn()
        audits = []
        for version in sorted(self._versions_present() | events.activated()):
            if version not in events.activated():
                audits.append(VersionAudit(version, "never activated", True, "removed by the next promote or rollback"))
                continue
            state: VersionState = "activated"
            if pin is not None and pin.version == version:
                state = "production"
            elif version in withdrawn:
                state = "withdrawn"
            try:
                checked = len(self.verified_files(version))
                audits.append(VersionAudit(version, state, True, f"{checked} files match the history"))
            except IntegrityError as exc:
                audits.append(VersionAudit(version, state, False, str(exc)))
        return RegistryAudit(self.location, len(events.events), None if pin is None else pin.version, audits, problems)

    def _versions_present(self) -> set[int]:
        names = list(self._entries())
        return set(numbered(names)) | labelled_versions(names)

    # locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive: promotions and rollbacks elsewhere wait (registry.lock_timeout_s)."""
        if self._locked:
            raise AssertionError("registry lock is not re-entrant")
        with registry_lock(self.store, self._p(), self.params) as lease:
            self._locked, self._lease, self._verified = True, lease, {}
            self._forget()
            try:
                self._recover()
                yield
            finally:
                self._locked, self._lease = False, None
                self._forget()

    def _forget(self) -> None:
        """Drop what was cached about the store (after this process wrote to it, or left the lock)."""
        self._events, self._listing, self._pinned, self._marker = None, None, None, None

    def _require_lock(self) -> None:
        if not self._locked:
            raise AssertionError("registry writes must run inside `with registry.lock():`")

    def _fence(self) -> None:
        """Before a write that matters: prove the lease is still ours (a local flock always is)."""
        if self._lease is not None:
            self._lease.fence()

    # writing (under the lock)
    def _append(self, event: EventKind, version: int, previous: int | None, **fields: object) -> HistoryEvent:
        events = self.events()
        entry = HistoryEvent(
            seq=len(events.events) + 1,
            event=event,
            version=version,
            previous=previous,
            at=utc_now(),
            by=f"{user()}@{socket.gethostname()}",
            **fields,  # type: ignore[arg-type]
        )
        self._fence()
        self.history.append(entry)
        self._events = Events([*events.events, entry])
        return entry

    def _recover(self) -> None:
        """Under the lock: finish or clean up what a killed process left (staging, pointer, leftovers)."""
        if self.store.local:
            for stale in Path(self._p()).glob(STAGING_PREFIX + "*"):
                log.warning("removing %s left by an interrupted promotion", stale)
                shutil.rmtree(stale)
        for name in self._entries():
            if name.startswith(PROBE_PREFIX):
                self.store.delete(self._p(name))
        events = self.events()
        active = events.production()
        pin, _ = self._pin()
        if active is None and pin is not None:
            raise RegistryError(
                f"{self.store.url(self._p(CONFIG))} pins version {pin.version} but {self.history.location} records"
                " no promotion: config.pbtxt was written by hand or by an older visionops"
            )
        if active is not None and (pin is None or pin.version != active or not pin.paired):
            # Killed between the history event and the pointer write: the event is the decision; finish it.
            log.warning("config.pbtxt lags the history (version %d): completing the interrupted operation", active)
            self._point_at(active, self.card(active))
            self._append(
                "recover", active, None if pin is None else pin.version,
                note="an interrupted promote or rollback had recorded this version but not moved config.pbtxt",
            )
        self._discard_leftovers(events.activated(), active)
        if active is not None:
            self._write_marker(active)

    def _discard_leftovers(self, activated: set[int], production: int | None) -> None:
        """Remove versions that were uploaded but never activated (a killed or failed promotion)."""
        for version in sorted(self._versions_present() - activated):
            log.warning("removing version %d of %s: uploaded but never activated", version, self.location)
            self.store.remove_tree(self._p(str(version)))
            self.store.delete(self._p(labels_file(version)))
            self._listing = None
            self._append("discard", version, production, note="uploaded but never activated; its files were removed")

    def next_version(self) -> int:
        """The number the next published version gets (call under the lock)."""
        self._require_lock()
        # Counts leftovers and discarded numbers too: a number is never reused for different bytes.
        used = self._versions_present() | self.events().versions()
        return max(used, default=0) + 1

    def publish(self, files: Mapping[str, Path], card: Card, readmitted: Iterable[int] = ()) -> int:
        """Add a new version holding ``files`` and ``card`` and make it production; its number."""
        self._require_lock()
        if MODEL_FILE not in files or set(files) - set(VERSION_FILES) or CARD in files:
            raise AssertionError(f"publish needs {MODEL_FILE} (+ {WEIGHTS_FILE}), got {sorted(files)}")
        version = self.next_version()
        hashes = {name: file_digest(path) for name, path in files.items()}
        if (card.version, card.model_name, card.files) != (version, self.model_name, hashes):
            raise AssertionError(
                f"the card describes version {card.version} of {card.model_name} with {card.files};"
                f" publishing version {version} of {self.model_name} with {hashes}"
            )
        previous = self.events().production()
        card_bytes = (json.dumps(card.to_json(), indent=2) + "\n").encode()
        try:
            recorded = write_version(self.store, self._p(), version, files, card_bytes, labels_bytes(card.classes))
        except OSError as exc:  # a full disk, a lost connection: nothing points at the version yet
            if self.store.local:
                with contextlib.suppress(OSError, RegistryError):  # else the next locked operation does
                    self._discard_leftovers(self.events().activated(), previous)
            raise RegistryError(
                f"writing version {version} into {self.location} failed ({exc}); production is unchanged"
                " and the partial version is removed (on S3: by the next promote or rollback)"
            ) from exc
        finally:
            self._listing = None
        self._append(
            "promote", version, previous,
            files=recorded,
            readmitted=sorted(readmitted),
            decision=card.gate.summary,
            accuracy=card.gate.candidate_accuracy,
            production_accuracy=card.gate.production_accuracy,
            provider_verified=card.verification.provider_active,
        )
        self._point_at(version, card)
        log.info("production of %s is now version %d (%s)", self.model_name, version, self.location)
        return version

    def _point_at(self, version: int, card: Card) -> None:
        """Move config.pbtxt to ``version`` and its labels in one atomic write, fenced; then the marker."""
        # The batch limit this version was verified at, not whatever params.yaml says today.
        max_batch = card.params.get("registry", {}).get("max_batch_size", self.params.max_batch_size)
        text = config_pbtxt(self.model_name, int(max_batch), version, card.export)
        self._fence()
        try:
            tag = self.store.swap(self._p(CONFIG), text.encode(), self._pin()[1])
        except Conflict:
            raise RegistryError(
                f"{self.store.url(self._p(CONFIG))} changed while this process held the registry lease (it was"
                " taken over): production was not moved by this process; check `visionops status`"
            ) from None
        self._pinned = (pinned(text), tag)
        self._write_marker(version)

    def _write_marker(self, version: int | None) -> None:
        record = None if version is None else self.events().published(version)
        marker = ProductionMarker(version, None if record is None else record.files.get(f"{version}/{MODEL_FILE}"))
        data = (json.dumps(marker.to_json(), indent=2) + "\n").encode()
        path = self._p(MARKER)
        if self._marker is None:
            with contextlib.suppress(FileNotFoundError):
                self._marker = self.store.read_bytes(path)
        if self._marker != data:
            self.store.write(path, data)
            self._marker = data

    def ensure_marker(self) -> None:
        """Create production.json ("no production yet") if the registry has none: validate's DVC
        dependency must exist before the first promotion. Never overwrites."""
        marker = ProductionMarker(None, None)
        try:
            if self.store.local:
                Path(self._p()).mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(Conflict):
                self.store.create(self._p(MARKER), (json.dumps(marker.to_json(), indent=2) + "\n").encode())
        except OSError as exc:
            raise RegistryError(f"cannot write {self.store.url(self._p(MARKER))}: {exc}") from exc

    def rollback(self, to: int | None = None, readmit: bool = False) -> int:
        """Move production back to ``to`` (default: the newest earlier version that was production
        and is not withdrawn); the version it leaves is withdrawn."""
        if self.production_version() is None:  # checked before locking: the lock would create the folder
            raise RegistryError(f"{self.location} has no production version to roll back from")
        with self.lock():
            events = self.events()
            current = events.production()
            if current is None:
                raise RegistryError(f"{self.location} has no production version to roll back from")
            target = self._rollback_target(events, current, to, readmit)
            card = self.card(target)  # every file verified before it becomes production again
            self._append(
                "rollback", target, current,
                withdrawn=current,
                readmitted=[target] if target in events.withdrawn() else [],
            )
            self._point_at(target, card)
            log.info("rolled %s back from version %d to %d; version %d is withdrawn", self.model_name,
                     current, target, current)
            return target

    def _rollback_target(self, events: Events, current: int, to: int | None, readmit: bool) -> int:
        activated, withdrawn = events.activated(), events.withdrawn()
        if to is None:
            earlier = [v for v in sorted(activated) if v < current and v not in withdrawn]
            if not earlier:
                raise RegistryError(
                    f"version {current} is the oldest production of {self.location} that is not withdrawn"
                    f" (withdrawn: {sorted(withdrawn) or 'none'}): nothing to roll back to"
                )
            return earlier[-1]
        if to == current:
            raise RegistryError(f"version {to} is already production in {self.location}")
        if to not in activated:
            raise RegistryError(
                f"version {to} of {self.location} was never production (versions that were: {sorted(activated)}):"
                " only those are rollback targets"
            )
        if to in withdrawn and not readmit:
            raise RegistryError(
                f"version {to} was withdrawn by the rollback in history event {withdrawn[to].seq}; to make it"
                f" production again, re-admit it explicitly: `visionops rollback --to {to} --readmit`"
            )
        return to


__all__ = [
    "ACTIVATIONS",
    "CARD",
    "CONFIG",
    "HISTORY",
    "MARKER",
    "MODEL_FILE",
    "WEIGHTS_FILE",
    "IntegrityError",
    "ProductionInfo",
    "Registry",
]
