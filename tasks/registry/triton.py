"""Triton Inference Server's model configuration (config.pbtxt): the production pointer.

config.pbtxt pins one version and names that version's own labels file (``labels-<N>.txt``,
immutable once written), so one atomic write of config.pbtxt switches the model and its class
names together: Triton never labels one model's outputs with another's classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.blessing.reports import ExportReport

_POLICY = re.compile(r"version_policy\s*:?\s*\{\s*specific\s*:?\s*\{\s*versions\s*:\s*\[?\s*(\d+)")
_LABELS = re.compile(r'label_filename\s*:\s*"([^"]*)"')
_LABELS_PREFIX, _LABELS_SUFFIX = "labels-", ".txt"


def labels_file(version: int) -> str:
    """The name of version ``version``'s labels file, next to config.pbtxt."""
    return f"{_LABELS_PREFIX}{version}{_LABELS_SUFFIX}"


def labelled_versions(names: Iterable[str]) -> set[int]:
    """The versions that have a labels file among ``names`` (a listing of the model folder)."""
    out = set()
    for name in names:
        middle = name.removeprefix(_LABELS_PREFIX).removesuffix(_LABELS_SUFFIX)
        if middle.isdigit() and name == labels_file(int(middle)):  # labels-03.txt is not version 3's
            out.add(int(middle))
    return out


def labels_bytes(classes: list[str]) -> bytes:
    return ("\n".join(classes) + "\n").encode()


def config_pbtxt(model_name: str, max_batch_size: int, version: int, contract: ExportReport) -> str:
    """Triton model configuration (protobuf text) pinning ``version``; ``contract`` is export.json."""
    inp, out = contract.input, contract.output
    dims = ", ".join(str(d) for d in inp.shape[1:])
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"version_policy: {{ specific: {{ versions: [{version}] }} }}\n"
        "input [\n"
        "  {\n"
        f'    name: "{inp.name}"\n'
        "    data_type: TYPE_UINT8\n"
        "    format: FORMAT_NCHW\n"
        f"    dims: [{dims}]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{out.name}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [{out.shape[1]}]\n"
        f'    label_filename: "{labels_file(version)}"\n'
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )


@dataclass(frozen=True)
class Pin:
    """What a config.pbtxt points at: the version and the labels file."""

    version: int
    labels: str | None

    @property
    def paired(self) -> bool:
        """Whether the labels file is the pinned version's own."""
        return self.labels == labels_file(self.version)


def pinned(config: str) -> Pin | None:
    """The version a config.pbtxt's ``version_policy { specific { versions: [N] } }`` pins, or None."""
    match = _POLICY.search(config)
    if match is None:
        return None
    labels = _LABELS.search(config)
    return Pin(int(match.group(1)), labels.group(1) if labels else None)
