"""The stage contract: what a dvc.yaml stage declares (`StageSpec`), and its ``python -m`` entry.

Every stage is ``stage(p, ws) -> Result``: ``p`` holds only the params.yaml sections it reads,
``ws`` is the workspace. Its module declares ``SPEC``; tests/test_dvc_yaml.py holds dvc.yaml's
deps, outs and params to that declaration and to the stage's import closure.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import DataError, VisionopsError, storage_error
from tasks.paths import Workspace

log = logging.getLogger("visionops")


@dataclass(frozen=True)
class StageSpec:
    """What one dvc.yaml stage reads and writes, in the workspace and in params.yaml."""

    name: str
    params: tuple[str, ...]  # params.yaml keys it reads (sections or dotted keys), as dvc.yaml lists them
    reads: Callable[[Workspace], list[Path]]  # the data it depends on
    writes: Callable[[Workspace], list[Path]]  # its DVC outputs: outs, metrics and plots


def configure_logging() -> None:
    level = os.environ.get("VISIONOPS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


ERROR_PREFIX = "visionops: error: "  # the one line a failed stage ends with (flows/prefect_tasks.py reads it)


def _reported(exc: BaseException, stage: str) -> VisionopsError | None:
    """``exc`` as an error for people, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, VisionopsError):
        return exc
    if isinstance(exc, OSError):  # a full disk, a permission: say which file and what to do
        return storage_error(exc, f"the workspace of stage {stage}")
    arrow = sys.modules.get("pyarrow")
    if arrow is not None and isinstance(exc, arrow.ArrowException):  # a Parquet file no reader caught
        return DataError(f"stage {stage}: a Parquet file is unreadable ({exc}); run the stages before it again")
    return None


def run_stage(stage: Callable[[], object]) -> None:
    """Run ``stage`` and exit: 0 done, 2 config, 3 gate rejected, 1 anything else reported.

    A failure ends with one line ``visionops: error: <kind>: <what, where, what to do>`` (details,
    such as every failed expectation, on the lines after it), never a traceback.
    """
    configure_logging()
    module = sys.modules.get(getattr(stage, "__module__", ""))
    spec = getattr(module, "__spec__", None)  # under `python -m tasks.x`, __module__ is __main__
    name = (spec.name if spec is not None else getattr(stage, "__module__", "stage")).rsplit(".", 1)[-1]
    try:
        stage()
    except Exception as exc:  # sorted by _reported; a bug is re-raised with its traceback
        error = _reported(exc, name)
        if error is None:
            raise
        print(f"{ERROR_PREFIX}{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    sys.exit(0)
