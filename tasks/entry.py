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

from tasks.errors import user_error
from tasks.paths import Workspace


@dataclass(frozen=True)
class StageSpec:
    """What one dvc.yaml stage reads and writes, in the workspace and in params.yaml."""

    name: str
    params: tuple[str, ...]  # params.yaml keys it reads (sections or dotted keys), as dvc.yaml lists them
    reads: Callable[[Workspace], list[Path]]  # the data it depends on
    writes: Callable[[Workspace], list[Path]]  # its DVC outputs: outs, metrics and plots
    # Files it depends on only through some keys (DVC params from another file): a change elsewhere
    # in them does not re-run it.
    reads_keys: Callable[[Workspace], dict[Path, tuple[str, ...]]] = lambda ws: {}
    # Dependencies outside the workspace, as dvc.yaml writes them (DVC templates over params.yaml).
    external: tuple[str, ...] = ()


def configure_logging() -> None:
    level = os.environ.get("VISIONOPS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


ERROR_PREFIX = "visionops: error: "  # the one line a failed stage ends with (flows/prefect_tasks.py reads it)


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
    except Exception as exc:  # sorted by user_error; a bug is re-raised with its traceback
        error = user_error(exc, f"stage {name}")
        if error is None:
            raise
        print(f"{ERROR_PREFIX}{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    sys.exit(0)
