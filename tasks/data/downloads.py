"""Retrying, checksum-verified downloads into a local cache.

Transient network failures are retried with exponential backoff and then surface as
:class:`TransientDownloadError`, so a caller (a Prefect task with retries) can tell them from a
permanent failure: a 404, or a file whose checksum does not match (:class:`DataError`).
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.errors import DataError, RuntimeUnavailable
from tasks.fs.hashing import CHUNK, file_digest

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # per socket operation, not per download
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class TransientDownloadError(RuntimeUnavailable):
    """The network failed in a way that may pass (timeout, reset, 5xx); retrying later may work."""


def cache_dir() -> Path:
    """``$VISIONOPS_CACHE`` or ``~/.cache/visionops``: downloaded archives are kept here."""
    return Path(os.environ.get("VISIONOPS_CACHE", Path.home() / ".cache" / "visionops")).expanduser()


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRYABLE_HTTP
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, FileNotFoundError | PermissionError):
        return False  # a file:// URL that does not exist will not appear by retrying
    return isinstance(exc, urllib.error.URLError | TimeoutError | ConnectionError)


def _too_large(url: str, size: str, max_bytes: int) -> DataError:
    return DataError(
        f"{url} is {size} than data.ingest.max_dataset_gb ({max_bytes / 1e9:g} GB) allows: refusing it"
    )


def _stream(url: str, part: Path, max_bytes: int | None) -> None:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
        declared = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        if max_bytes is not None and declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(url, f"{int(declared) / 1e9:.1f} GB, more", max_bytes)
        size = 0
        while chunk := response.read(CHUNK):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:  # the server may not say, or may lie
                raise _too_large(url, "larger", max_bytes)
            out.write(chunk)


def fetch(
    url: str,
    dest: Path,
    md5: str | None = None,
    attempts: int = 4,
    backoff_s: float = 2.0,
    max_bytes: int | None = None,
) -> Path:
    """``dest`` holding the bytes at ``url``; reused when already cached and its md5 matches
    (without an ``md5`` nothing says the cached copy is current, so it is downloaded again).

    Raises :class:`TransientDownloadError` after ``attempts`` transient failures (waiting
    ``backoff_s``, then twice that, ...), and :class:`DataError` for a permanent failure, a
    checksum mismatch or more than ``max_bytes`` (the bad download is deleted).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if md5 is not None and dest.is_file() and file_digest(dest, "md5") == md5:
        log.info("using cached %s", dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            log.info("downloading %s (attempt %d of %d)", url, attempt, attempts)
            _stream(url, part, max_bytes)
            break
        except DataError:  # too large: not something a retry changes
            part.unlink(missing_ok=True)
            raise
        except (OSError, ValueError) as exc:
            part.unlink(missing_ok=True)
            if not _is_transient(exc):
                raise DataError(f"cannot download {url}: {exc}") from exc
            if attempt == attempts:
                raise TransientDownloadError(
                    f"cannot download {url} after {attempts} attempts: {exc}; check the network and retry"
                ) from exc
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retrying in %.1f s", url, exc, wait)
            time.sleep(wait)
    if md5 is not None:
        actual = file_digest(part, "md5")
        if actual != md5:
            part.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {url}: md5 {actual}, expected {md5}; the download was deleted"
                " (a corrupted transfer or a changed file at the source)"
            )
    os.replace(part, dest)
    return dest
