"""The registry's history: one immutable JSON object per event (``history/00000042.json``).

Each event is created with create-if-absent at the next sequence number, so of two writers only
one can write event 42, and no event is rewritten (an object store appends without losing lines).
It is the record that every read of a version is checked against: a promote event holds the
sha256 of each of the version's files, written before the pointer names the version, and a card
cannot overwrite it. Readers get the events in order and refuse a gap in the sequence.

Activations (promote, rollback, recover) move production; the last one names it. A rollback also
withdraws the version it took out of production; a promote or rollback that names a withdrawn
version in ``readmitted`` puts it back. A discard removes the files of a version that was uploaded
but never activated.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tasks.errors import RegistryError
from tasks.fs.atomic import atomic_write_bytes
from tasks.fs.records import Record, RecordError
from tasks.registry.store import Conflict, Store

EventKind = Literal["promote", "rollback", "recover", "discard"]
ACTIVATIONS: tuple[EventKind, ...] = ("promote", "rollback", "recover")
_DIGITS = 8  # history/00000042.json: names sort in sequence order


@dataclass(frozen=True)
class HistoryEvent(Record):
    """One event. ``files`` (promote only): each file of the version, relative to the model folder -> sha256."""

    seq: int
    event: EventKind
    version: int
    previous: int | None  # production before this event
    at: str
    by: str  # user@host
    files: dict[str, str] = field(default_factory=dict)
    withdrawn: int | None = None  # rollback: the version it took out of production
    readmitted: list[int] = field(default_factory=list)  # withdrawn versions explicitly brought back
    decision: str | None = None  # promote: the gate's summary
    accuracy: float | None = None  # promote: the candidate's ONNX accuracy on the test split
    production_accuracy: float | None = None  # promote: production's, on the same images
    provider_verified: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Events:
    """The history in order, and what it says about each version."""

    events: list[HistoryEvent]

    def production(self) -> int | None:
        """The version the last activation made production (None before the first promotion)."""
        for event in reversed(self.events):
            if event.event in ACTIVATIONS:
                return event.version
        return None

    def activated(self) -> set[int]:
        return {e.version for e in self.events if e.event in ACTIVATIONS}

    def withdrawn(self) -> dict[int, HistoryEvent]:
        """Withdrawn versions (not re-admitted since) and the rollback that withdrew each."""
        out: dict[int, HistoryEvent] = {}
        for event in self.events:
            for version in event.readmitted:
                out.pop(version, None)
            if event.withdrawn is not None:
                out[event.withdrawn] = event
        return out

    def published(self, version: int) -> HistoryEvent | None:
        """The promote event that recorded ``version``'s files, if it was ever promoted."""
        return next((e for e in self.events if e.event == "promote" and e.version == version), None)

    def versions(self) -> set[int]:
        """Every version number the history mentions (never reused for other bytes)."""
        return {e.version for e in self.events}

    def last(self, n: int) -> list[HistoryEvent]:
        return self.events[-n:] if n > 0 else []


class History:
    """``<model>/history/``: read in order, append with create-if-absent.

    On an object store, events already read are kept under ``cache`` by their ETag (the listing
    gives it), so a read fetches only new or rewritten events.
    """

    def __init__(self, store: Store, folder: str, cache: Path | None = None) -> None:
        self.store = store
        self.folder = folder
        self.cache = cache

    @property
    def location(self) -> str:
        return self.store.url(self.folder)

    def _cached(self, name: str, tag: str | None) -> Path | None:
        if self.cache is None or tag is None or self.store.local:
            return None
        return self.cache / f"{name}.{hashlib.sha256(tag.encode()).hexdigest()[:16]}"

    def _raw(self) -> dict[str, bytes]:
        """Each event's bytes by object name, fetching only what is not cached."""
        listing = self.store.entries(self.folder)
        names = [n for n in listing if n.endswith(".json") and not n.startswith(".")]
        raw: dict[str, bytes] = {}
        for name in names:
            cached = self._cached(name, listing[name])
            if cached is not None and cached.is_file():
                raw[name] = cached.read_bytes()
        missing = [posixpath.join(self.folder, n) for n in names if n not in raw]
        fetched = self.store.fs.cat(missing) if missing else {}  # s3fs fetches them concurrently
        for path in missing:
            name = posixpath.basename(path)
            data = fetched.get(path) if isinstance(fetched, dict) else None
            raw[name] = data if data is not None else self.store.read_bytes(path)
            if (cached := self._cached(name, listing[name])) is not None:
                atomic_write_bytes(cached, raw[name])
        return raw

    def read(self) -> Events:
        events = []
        for name, raw in sorted(self._raw().items()):
            where = self.store.url(posixpath.join(self.folder, name))
            try:
                event = HistoryEvent.from_json(json.loads(raw), where=where)
            except (ValueError, RecordError) as exc:
                raise RegistryError(f"history event {where} is unreadable ({exc}): restore it from a backup") from exc
            if name != _name(event.seq):
                raise RegistryError(f"history event {where} says it is event {event.seq}: it was renamed or copied")
            events.append(event)
        events.sort(key=lambda e: e.seq)
        for expected, event in enumerate(events, 1):
            if event.seq != expected:
                raise RegistryError(
                    f"history {self.location} is missing event {expected} (next is {event.seq}):"
                    " an event was deleted; the registry cannot be verified without it"
                )
        return Events(events)

    def append(self, event: HistoryEvent) -> HistoryEvent:
        """Write ``event`` as the next one; `RegistryError` if another writer took its number."""
        try:
            self.store.create(posixpath.join(self.folder, _name(event.seq)), _encode(event))
        except Conflict:
            raise RegistryError(
                f"history event {event.seq} of {self.location} was written by another process while this one"
                " held the registry lock: its lease expired or was taken over; retry"
            ) from None
        return event


def _name(seq: int) -> str:
    return f"{seq:0{_DIGITS}d}.json"


def _encode(event: HistoryEvent) -> bytes:
    return (json.dumps(event.to_json(), indent=2) + "\n").encode()

