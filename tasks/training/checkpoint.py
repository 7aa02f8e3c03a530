"""Per-epoch resume checkpoints of the train stage, keyed to the run's inputs.

The checkpoint lives under ``.visionops/checkpoints`` (not a DVC output, which DVC would delete
before rerunning the stage). It records a key made of the resolved parameters and the digest of
the prepared data; a checkpoint whose key differs is from another run and is never resumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tasks.fs.atomic import atomic_write_bytes
from tasks.training.models import TORCH_LOAD_ERRORS

log = logging.getLogger(__name__)

def run_key(params: Mapping[str, Any], data_digest: str) -> str:
    """What makes two runs the same run: every parameter that shapes training, and the data."""
    text = json.dumps({"params": params, "data": data_digest, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class ResumeCheckpoint:
    """The last complete epoch's state of one run (``key``), written atomically."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = Path(folder) / "train.pt"
        self.key = key

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None when there is none or it belongs to another run."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as exc:
            log.warning("ignoring unreadable checkpoint %s (%s); training from scratch", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.info("checkpoint %s is from other parameters or data; training from scratch", self.path)
            return None
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
