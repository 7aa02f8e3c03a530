"""One contender in test_registry_s3's contended-lock test: promote fresh candidates into one registry.

    python tests/promotion_race.py WORKSPACE ROUNDS GO_FILE OUT_JSON

Before GO_FILE appears (so both contenders start together) it builds a candidate per round (the
same answers, new bytes); each round then copies one in and promotes it, so little happens outside
the lock and the two processes contend for it. When this process waited for and held the
registry's lease comes from the lease's own log lines; those times and every decision go to OUT_JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from tasks import params
from tasks.fs.hashing import file_digest
from tasks.paths import Workspace
from tasks.promote import promote

from candidate_factory import pixel_reader_candidate  # tests/ is sys.path[0] when run as a script


class LeaseLog(logging.Handler):
    """Per acquisition, from the lease's log records (wall clock): [trying since, acquired, released,
    whether it found the lease held and had to wait]."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.acquisitions: list[list[float | bool]] = []
        self.takeovers = 0
        self._trying_since = 0.0
        self._waited = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " is trying to acquire it" in message:
            self._trying_since, self._waited = record.created, False
        elif message.startswith("waiting for the registry lease"):
            self._waited = True
        elif " acquired by " in message:
            self.acquisitions.append([self._trying_since, record.created, -1.0, self._waited])
        elif " released by " in message:
            self.acquisitions[-1][2] = record.created
        elif "took over" in message:
            self.takeovers += 1


def main(root: str, rounds: int, go: str, out: str) -> None:
    ws = Workspace(Path(root))
    p = params.load(ws.params_file)
    lease_log = LeaseLog()
    registry_log = logging.getLogger("tasks.registry")
    registry_log.setLevel(logging.DEBUG)
    registry_log.addHandler(lease_log)
    candidates = []
    for i in range(rounds):
        candidate = Workspace(ws.root / "rounds" / str(i))
        shutil.copytree(ws.prepared, candidate.prepared)
        pixel_reader_candidate(candidate, read_channel=0, salt=f"{ws.root.name}-{i}")
        candidates.append(candidate)
    while not Path(go).exists():
        time.sleep(0.01)
    decisions = []
    for candidate in candidates:
        for name in ("candidate", "onnx_model", "export_report", "metrics", "verification", "validation"):
            target = getattr(ws, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(getattr(candidate, name), target)
        decision = promote(p, ws)
        decisions.append({"version": decision.version, "summary": decision.summary,
                          "onnx_sha256": file_digest(ws.onnx_model)})
    Path(out).write_text(json.dumps(
        {"acquisitions": lease_log.acquisitions, "takeovers": lease_log.takeovers, "decisions": decisions}
    ))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
