"""Which device trains: CUDA when present (train.device: auto), else the CPU, said plainly."""

from __future__ import annotations

import torch

from tasks.errors import RuntimeUnavailable


def select_device(requested: str) -> torch.device:
    """``auto`` | ``cuda`` | ``cpu`` -> a torch device; ``cuda`` without CUDA is an error, not a fallback."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise RuntimeUnavailable(
            "train.device is cuda but torch sees no CUDA device"
            f" (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'});"
            " set train.device=auto or cpu, or run on a machine with an NVIDIA GPU"
        )
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    """``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``: for logs, train.json and the card."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
