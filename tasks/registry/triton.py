"""Triton Inference Server's model configuration (config.pbtxt): the production pointer."""

from __future__ import annotations

import re

from tasks.blessing.reports import ExportReport

LABELS = "labels.txt"
_POLICY = re.compile(r"version_policy\s*:?\s*\{\s*specific\s*:?\s*\{\s*versions\s*:\s*\[?\s*(\d+)")


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
        f'    label_filename: "{LABELS}"\n'
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )


def pinned_version(config: str) -> int | None:
    """The version a config.pbtxt's ``version_policy { specific { versions: [N] } }`` pins, or None."""
    match = _POLICY.search(config)
    return None if match is None else int(match.group(1))
