"""The registry's lock, by kind of store: an flock on a local disk, a lease on S3 (tasks/registry/lease.py),
and none on a store that cannot lock, only where params.yaml says so explicitly."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import RegistryError
from tasks.fs.flock import LockTimeout, acquire_exclusive
from tasks.params import ConfigError, RegistryParams
from tasks.registry.layout import LOCK, PROBE_PREFIX
from tasks.registry.lease import Lease, LeaseBody, probe_conditional_writes
from tasks.registry.store import Store

log = logging.getLogger(__name__)

_POLL_S = 0.2
_WAIT_LOG_EVERY_S = 30.0
_PROBED: dict[str, str | None] = {}  # folder URL -> why it cannot lock (None: it can), in this process


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid{os.getuid()}"


@contextlib.contextmanager
def registry_lock(store: Store, folder: str, p: RegistryParams) -> Iterator[Lease | None]:
    """Hold the lock of the model folder ``folder``; the lease to fence writes with (None: an flock,
    which a live process always holds, or no lock at all)."""
    if store.local:
        with _flock(store, folder, p):
            yield None
        return
    location = store.url(folder)
    if not store.conditional_writes:
        problem: str | None = f"fsspec's {store.fs.protocol} store has no conditional writes visionops can use"
    else:
        if location not in _PROBED:  # once per process: four requests
            _PROBED[location] = probe_conditional_writes(store, f"{folder}/{PROBE_PREFIX}{uuid.uuid4().hex}")
        problem = _PROBED[location]
    if problem is not None:
        _unlocked(location, problem, p)
        yield None
        return
    with _leased(store, folder, p) as lease:
        yield lease


@contextlib.contextmanager
def _flock(store: Store, folder: str, p: RegistryParams) -> Iterator[None]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = f"{folder}/{LOCK}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def report(waited: float) -> None:
        if waited < _POLL_S:
            log.info("waiting for another promotion or rollback to release %s", path)

    try:
        try:
            acquire_exclusive(fd, p.lock_timeout_s, _POLL_S, report)
        except LockTimeout as exc:
            raise RegistryError(
                f"registry {store.url(folder)} is locked by another promotion or rollback (waited"
                f" {exc.waited_s:.0f} s, registry.lock_timeout_s); retry when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _leased(store: Store, folder: str, p: RegistryParams) -> Iterator[Lease]:
    holder = f"{user()}@{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    lease = Lease(store, f"{folder}/{LOCK}", p.lease_s, holder)
    last_report = [-_WAIT_LOG_EVERY_S]

    def report(current: LeaseBody, waited: float) -> None:
        if waited - last_report[0] >= _WAIT_LOG_EVERY_S:
            last_report[0] = waited
            log.info("waiting for the registry lease %s held by %s", store.url(lease.path), current.holder)

    lease.acquire(p.lock_timeout_s, _POLL_S, report)
    try:
        yield lease
    finally:
        lease.release()


def _unlocked(location: str, why: str, p: RegistryParams) -> None:
    if p.require_conditional_writes:
        raise ConfigError(
            f"registry {location} cannot be locked ({why}), so two promotions at once could both"
            " change production: use a local folder or an S3 store with conditional writes, or set"
            " registry.require_conditional_writes: false to promote unlocked"
        )
    log.warning("registry %s is NOT locked (%s; registry.require_conditional_writes is false)", location, why)
