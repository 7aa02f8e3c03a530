"""A lease lock on an object store with conditional writes (S3): promotions on two machines take turns.

- **acquire**: create the lock object only if absent (``If-None-Match: *``): of two processes
  exactly one wins.
- **hold**: a thread renews the lease every ``lease_s / 3`` by compare-and-swap on its ETag
  (``If-Match``); each renewal changes the ETag.
- **take over**: a waiter that has seen the same ETag for a whole lease (measured on its own
  monotonic clock, so the machines' clocks need not agree) concludes the holder is gone and
  swaps in its own lease against that ETag; of two waiters only one can.
- **fence**: before every write that matters the holder renews synchronously; a lease that was
  taken over raises `LeaseLost` instead of writing.
- **release**: a conditional delete (``If-Match``), which never deletes someone else's lease.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tasks.errors import RegistryError
from tasks.fs.records import Record, RecordError, utc_now
from tasks.registry.store import Conflict, Store

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 3  # renew this often within one lease: two renewals may fail before it lapses


class LeaseLost(RegistryError):
    """This process no longer holds the registry's lease (another process took it over)."""


@dataclass(frozen=True)
class LeaseBody(Record):
    """The lock object's content: who holds it and for how long each renewal is good."""

    holder: str
    lease_s: float
    renewed_at: str  # UTC, for people; expiry is judged by ETag age, not by clocks


class Lease:
    """One process's claim on ``path``; `acquire`, then `fence` before writes, then `release`."""

    def __init__(self, store: Store, path: str, lease_s: float, holder: str) -> None:
        self.store = store
        self.path = path
        self.lease_s = lease_s
        self.holder = holder
        self._etag: str | None = None
        self._valid_until = 0.0  # monotonic
        self._lost: str | None = None
        self._mutex = threading.Lock()  # the renewal thread and fence() both swap the object
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(LeaseBody(self.holder, self.lease_s, utc_now()).to_json()).encode()

    def _read(self) -> tuple[LeaseBody | None, str | None]:
        """The current lease and its ETag (None, None when there is none)."""
        try:
            data, etag = self.store.read_tagged(self.path)
        except FileNotFoundError:
            return None, None
        try:
            return LeaseBody.from_json(json.loads(data), where=self.store.url(self.path)), etag
        except (ValueError, RecordError):
            return LeaseBody(holder="(unreadable lock object)", lease_s=self.lease_s, renewed_at="?"), etag

    def acquire(self, timeout_s: float, poll_s: float, on_wait: Callable[[LeaseBody, float], None]) -> None:
        """Hold the lease, waiting up to ``timeout_s``; ``on_wait(current, waited_s)`` while another holds it."""
        log.debug("registry lease %s: %s is trying to acquire it", self.store.url(self.path), self.holder)
        started = time.monotonic()
        seen: tuple[str | None, float] | None = None  # (ETag, first seen at) of the other holder's lease
        current: LeaseBody | None = None
        while True:
            if current is None:  # free, or not looked at yet: try to take it
                sent = time.monotonic()
                try:
                    self._held(self.store.create(self.path, self._body()), sent)
                    return
                except Conflict:
                    pass
            current, etag = self._read()  # while it is held, one GET per poll
            if current is None:
                continue  # released meanwhile
            now = time.monotonic()
            if seen is None or seen[0] != etag:
                seen = (etag, now)
            elif now - seen[1] > max(current.lease_s, self.lease_s):
                # Unchanged for a whole lease: its holder stopped renewing (killed, or cut off).
                try:
                    self._held(self.store.swap(self.path, self._body(), etag), time.monotonic())
                except Conflict:
                    seen = None  # renewed, released or taken by another waiter meanwhile
                    continue
                log.warning("registry lease %s: took over from %s, whose lease expired",
                            self.store.url(self.path), current.holder)
                return
            waited = now - started
            if waited >= timeout_s:
                raise RegistryError(
                    f"registry {self.store.url(self.path)} is locked by {current.holder} (waited {waited:.0f} s,"
                    " registry.lock_timeout_s); retry when it has finished. A lease that is not renewed"
                    f" is taken over after registry.lease_s ({current.lease_s:g} s)"
                )
            on_wait(current, waited)
            time.sleep(poll_s)

    def _held(self, etag: str | None, sent: float) -> None:
        self._etag, self._valid_until, self._lost = etag, sent + self.lease_s, None
        log.info("registry lease %s acquired by %s", self.store.url(self.path), self.holder)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="registry-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        """Compare-and-swap a fresh lease over ours (caller holds ``_mutex``); `LeaseLost` if it is gone."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        sent = time.monotonic()
        try:
            self._etag = self.store.swap(self.path, self._body(), self._etag)
        except Conflict:
            current, _ = self._read()
            self._lost = (
                f"the registry lease {self.store.url(self.path)} was taken over by"
                f" {current.holder if current else 'another process'} (this process did not renew it within"
                f" registry.lease_s = {self.lease_s:g} s); nothing more was written"
            )
            raise LeaseLost(self._lost) from None
        self._valid_until = sent + self.lease_s

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            with self._mutex:
                try:
                    self._renew()
                except LeaseLost:
                    return
                except OSError as exc:  # the store is unreachable: retry until the lease would lapse
                    if time.monotonic() >= self._valid_until:
                        self._lost = f"could not renew the registry lease {self.store.url(self.path)}: {exc}"
                        return
                    log.warning("renewing the registry lease failed (%s); retrying", exc)

    def fence(self) -> None:
        """Renew now, so the next write happens under a lease this process provably still holds."""
        with self._mutex:
            try:
                self._renew()
            except OSError as exc:
                raise RegistryError(f"could not renew the registry lease {self.store.url(self.path)}: {exc}") from exc

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._mutex:
            log.info("registry lease %s released by %s", self.store.url(self.path), self.holder)
            if self._lost is None and not self.store.delete(self.path, expected=self._etag):
                log.warning("registry lease %s was no longer ours at release", self.store.url(self.path))


def probe_conditional_writes(store: Store, path: str) -> str | None:
    """Why the store at ``path`` cannot serve as a lock (None when it can): an S3-compatible server
    that ignores ``If-None-Match`` or ``If-Match`` would let two promotions hold the lease at once."""
    try:
        store.create(path, b"1")
        try:
            store.create(path, b"2")
            return "a second create-if-absent (If-None-Match: *) of the same object succeeded"
        except Conflict:
            pass
        try:
            store.swap(path, b"3", '"0123456789abcdef0123456789abcdef"')
            return "a compare-and-swap (If-Match) against a wrong ETag succeeded"
        except Conflict:
            return None
    except OSError as exc:
        return f"conditional writes failed: {exc}"
    finally:
        try:
            store.delete(path)
        except OSError:
            log.warning("could not remove the probe object %s", store.url(path))
