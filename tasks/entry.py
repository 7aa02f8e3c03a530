"""The thin ``python -m tasks.<stage>`` entry shared by every stage: logging and exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from tasks.errors import VisionopsError

log = logging.getLogger("visionops")


def configure_logging() -> None:
    level = os.environ.get("VISIONOPS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def run_stage(stage: Callable[[], object]) -> None:
    """Run ``stage`` and exit: 0 done, 2 config, 3 gate rejected, 1 anything else reported."""
    configure_logging()
    try:
        stage()
    except VisionopsError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(exc.exit_code)
    sys.exit(0)
