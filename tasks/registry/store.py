"""The registry's storage: files under its root, on a local disk or any fsspec URL (object stores).

What the registry's guarantees rest on, per kind of store:
- a local disk: atomic rename, exclusive create (a hard link), and ``flock`` for the lock;
- S3 and S3-compatible stores (s3fs): conditional writes. ``create`` is a PutObject with
  ``If-None-Match: *`` (exactly one of two writers wins), ``swap`` a PutObject with
  ``If-Match: <ETag>`` (compare-and-swap), ``delete`` a conditional DeleteObject;
- any other fsspec store: plain writes only (``conditional_writes`` is False).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.fs.atomic import atomic_write_bytes, create_exclusive_bytes

S3_PROTOCOLS = ("s3", "s3a")


class Conflict(Exception):
    """A conditional write lost: the object already exists (create) or changed since it was read (swap)."""


def _precondition_failed(exc: OSError) -> bool:
    """Whether an s3fs error is S3's answer to a failed condition (412, or 409 for a concurrent one)."""
    if isinstance(exc, FileExistsError):
        return True
    response: dict[str, Any] = getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class Store:
    """Files under the registry root, on a local disk or through fsspec."""

    def __init__(self, uri: str) -> None:
        import fsspec
        from fsspec.utils import get_protocol

        protocol = get_protocol(uri)
        # Listing and instance caches would hide what other processes wrote since.
        options = {"skip_instance_cache": True, "use_listings_cache": False} if protocol in S3_PROTOCOLS else {}
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri, **options)
        self.local = protocol == "file"
        self.s3 = protocol in S3_PROTOCOLS
        # What the lock, the history and the pointer need: exclusive create and compare-and-swap.
        self.conditional_writes = self.local or self.s3

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    # reading
    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_tagged(self, path: str) -> tuple[bytes, str | None]:
        """The bytes and the ETag of one version of the object (one GET: the two always match)."""
        if not self.s3:
            return self.read_bytes(path), None
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        data, etag = sync(self.fs.loop, get)
        return data, etag

    def tag(self, path: str) -> str | None:
        """What changes whenever the object is rewritten: the ETag on S3 (None on a local disk)."""
        if self.local:
            return None
        return _tag_of(self.fs.info(path, refresh=True) if self.s3 else self.fs.info(path))

    def entries(self, path: str) -> dict[str, str | None]:
        """The names directly under ``path`` (files and folders) with their tags, in one listing;
        empty if it does not exist."""
        try:
            listing = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for info in listing:
            name = posixpath.basename(str(info["name"]).rstrip("/"))
            if name:
                out[name] = None if self.local or info.get("type") == "directory" else _tag_of(info)
        return dict(sorted(out.items()))

    def names(self, path: str) -> list[str]:
        return list(self.entries(path))

    def numeric_dirs(self, path: str) -> list[int]:
        return numbered(self.names(path))

    def local_copy(self, path: str, cache: Path, tag: str | None = None) -> Path:
        """A local file with the object's bytes: the file itself on a local disk, else a download
        cached under ``cache`` by the object's ETag (``tag`` if the caller listed it; a rewritten
        object is downloaded again)."""
        if self.local:
            return Path(path)
        key = hashlib.sha256(f"{path}\0{tag or self.tag(path)}".encode()).hexdigest()[:20]
        dest = cache / key / posixpath.basename(path)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                self.fs.get_file(path, str(tmp))
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    # writing
    @contextlib.contextmanager
    def _if_absent(self, path: str) -> Iterator[None]:
        """Turn the store's "it already exists" into `Conflict`."""
        try:
            yield
        except OSError as exc:
            if _precondition_failed(exc):
                raise Conflict(f"{self.url(path)} already exists") from exc
            raise

    def create(self, path: str, data: bytes) -> str | None:
        """Write ``path`` only if it does not exist (`Conflict` otherwise); its new tag."""
        with self._if_absent(path):
            if self.local:
                create_exclusive_bytes(Path(path), data)
                return None
            return _etag(self.fs.pipe_file(path, data, mode="create"))

    def upload_new(self, src: Path, path: str) -> None:
        """Upload the local file ``src`` to ``path`` only if nothing is there (`Conflict` otherwise)."""
        with self._if_absent(path):
            self.fs.put_file(str(src), path, mode="create")

    def swap(self, path: str, data: bytes, expected: str | None) -> str | None:
        """Replace ``path`` atomically; on S3 only if its ETag is still ``expected`` (None: only if
        it does not exist), so a writer whose lease expired cannot overwrite a newer one. A local
        disk is fenced by the flock instead. Returns the new tag; `Conflict` when the object changed."""
        if self.local:
            atomic_write_bytes(Path(path), data)
            Path(path).chmod(0o644)
            return None
        if not self.s3:
            self.fs.pipe_file(path, data)
            return self.tag(path)
        if expected is None:
            return self.create(path, data)
        try:
            out = self.fs.pipe_file(path, data, IfMatch=expected)
        except FileNotFoundError as exc:  # deleted since it was read: that is a change too
            raise Conflict(f"{self.url(path)} is gone") from exc
        except OSError as exc:
            if _precondition_failed(exc):
                raise Conflict(f"{self.url(path)} changed since it was read") from exc
            raise
        return _etag(out)

    def write(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically (readers see the old bytes or the new), unconditionally."""
        if self.local:
            atomic_write_bytes(Path(path), data)
            Path(path).chmod(0o644)
        else:
            self.fs.pipe_file(path, data)  # one PUT

    def delete(self, path: str, expected: str | None = None) -> bool:
        """Delete ``path`` (on S3 with ``expected``: only if its ETag still is that); whether it did."""
        try:
            if self.local:
                Path(path).unlink()
            elif self.s3 and expected is not None:
                bucket, key, _ = self.fs.split_path(path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
                self.fs.invalidate_cache(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def remove_tree(self, path: str) -> None:
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


def numbered(names: list[str]) -> list[int]:
    """The version numbers among folder names (``3``, not ``03`` or ``.staging-x``), sorted."""
    return sorted(int(n) for n in names if n.isdigit() and not n.startswith("0"))


def _tag_of(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return str(info.get("size"))


def _etag(out: Any) -> str | None:
    return out.get("ETag") if isinstance(out, dict) else None
