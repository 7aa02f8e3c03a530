"""The errors visionops reports to people, each with its exit code (DESIGN.md, "Exit codes")."""

from __future__ import annotations


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
