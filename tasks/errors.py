"""The errors visionops reports to people, each with its exit code (DESIGN.md, "Exit codes")."""

from __future__ import annotations

import errno
import os
import re
import sys


class VisionopsError(Exception):
    """A failure with a message meant for the user. Exit code 1."""

    exit_code = 1


class DataError(VisionopsError):
    """Input data is missing, corrupt or malformed; the message names the file."""


class ValidationFailed(DataError):
    """The data contract (Great Expectations suite) failed; the message lists every failure."""


class RuntimeUnavailable(VisionopsError):
    """A required runtime (CUDA, an onnxruntime provider, a network resource) is not available."""


class TrainingDiverged(VisionopsError):
    """The loss became NaN or inf; nothing from the run may be promoted."""


class GateRejected(VisionopsError):
    """A gate rejected the candidate; production is unchanged. Exit code 3."""

    exit_code = 3


class RegistryError(VisionopsError):
    """The model registry is unreadable, locked, or refuses the operation."""


class StorageError(VisionopsError):
    """A file could not be written or read (a full disk, permissions, an I/O error); names the file."""


_STORAGE_ADVICE = {
    errno.ENOSPC: "free space on that disk (`df -h`) and run it again",
    errno.EDQUOT: "the disk quota is used up: free space and run it again",
    errno.EROFS: "that file system is read-only",
    errno.EFBIG: "a file grew past this process's file size limit (`ulimit -f`) or the file system's",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EEXIST: "a file stands where a folder should be: move it away",
    errno.ENOTDIR: "a file stands where a folder should be: move it away",
    errno.EISDIR: "a folder stands where a file should be: move it away",
}


def user_error(exc: BaseException, where: str) -> VisionopsError | None:
    """``exc`` as an error for people (``where``: the stage or command), or None for a bug, which
    keeps its traceback. A full disk, a permission, the network or an unreadable Parquet file is not
    a bug: it gets one line that says what and where."""
    if isinstance(exc, VisionopsError):
        return exc
    if isinstance(exc, ConnectionError | TimeoutError):
        return RuntimeUnavailable(f"{where}: {exc}; check the network and run it again")
    if isinstance(exc, OSError):
        return storage_error(exc, f"the workspace of {where}")
    arrow = sys.modules.get("pyarrow")  # only loaded if the failing code used it
    if arrow is not None and isinstance(exc, arrow.ArrowException):
        return DataError(f"{where}: a Parquet file is unreadable ({' '.join(str(exc).split())}); run the step"
                         " that writes it again")
    return None


_ARROW_ERRNO = re.compile(r"\[errno (\d+)\]")


def os_error_code(exc: OSError) -> int | None:
    """The errno of ``exc``; Arrow's I/O errors carry it only in their message ("[errno 28] ...")."""
    if exc.errno is not None:
        return exc.errno
    found = _ARROW_ERRNO.search(str(exc))
    return int(found.group(1)) if found else None


def storage_error(exc: OSError, path: object) -> StorageError:
    """A :class:`StorageError` for ``exc``, naming the file it names, else ``path`` (where it was working)."""
    where = exc.filename if exc.filename is not None else path
    code = os_error_code(exc)
    doing = "write" if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) else "read or write"
    advice = _STORAGE_ADVICE.get(code or 0, "check that disk and run it again")
    reason = exc.strerror or (os.strerror(code) if code is not None else str(exc))
    return StorageError(f"cannot {doing} {where}: {reason}; {advice}")
