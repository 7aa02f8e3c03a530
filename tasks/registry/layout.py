"""Names in a model's folder of the registry (Triton's layout plus visionops' own records)."""

from __future__ import annotations

CONFIG = "config.pbtxt"  # the pointer (tasks/registry/triton.py)
HISTORY = "history"  # one event per object (tasks/registry/history.py)
MARKER = "production.json"  # names the production version: validate's DVC dependency
LOCK = ".lock"  # flock file on a local disk, lease object on S3 (tasks/registry/locking.py)
CARD = "card.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
VERSION_FILES = (MODEL_FILE, WEIGHTS_FILE, CARD)
STAGING_PREFIX = ".staging-"  # a version being assembled on a local disk; Triton ignores non-numeric folders
PROBE_PREFIX = ".probe-"  # the conditional-write probe's object
