"""params.yaml parsed once into typed, frozen parameters.

Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key; the command-line
entries turn it into exit code 2. Overrides follow DVC's ``-S key=value``: the value is YAML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tasks.errors import VisionopsError
from tasks.fs.atomic import atomic_write_text

PARAMS_FILE = "params.yaml"
T = TypeVar("T")


class ConfigError(VisionopsError, ValueError):
    """params.yaml (or an override) is wrong; the message names the key. Exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class SyntheticParams:
    classes: int
    train_per_class: int
    test_per_class: int


@dataclass(frozen=True)
class IngestParams:
    """Bounds on what ingest accepts, and the shape of data/ (units in params.yaml's comments)."""

    max_image_mb: float  # one encoded image file
    max_dataset_gb: float  # all image files together, uncompressed
    max_compression_ratio: float  # uncompressed / compressed bytes of an archive
    shard_mb: float  # encoded images per Parquet file in data/
    row_group_mb: float  # encoded images per Parquet row group

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1e6)

    @property
    def max_dataset_bytes(self) -> int:
        return int(self.max_dataset_gb * 1e9)

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1e6)

    @property
    def row_group_bytes(self) -> int:
        return int(self.row_group_mb * 1e6)


@dataclass(frozen=True)
class DataParams:
    source: str
    image_size: int
    channels: Literal[1, 3]
    test_fraction: float
    seed: int
    synthetic: SyntheticParams
    ingest: IngestParams


@dataclass(frozen=True)
class DriftParams:
    max_label_tv: float
    max_mean_shift: float
    max_std_shift: float


@dataclass(frozen=True)
class ValidateParams:
    min_per_class: int
    max_class_ratio: float
    max_corrupt: int
    max_duplicate_fraction: float
    max_degenerate: int
    min_pixel_std: float
    drift: DriftParams


@dataclass(frozen=True)
class ModelParams:
    arch: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_small"]
    stem: Literal["cifar", "imagenet"]
    weights: str  # none | imagenet | production | path to a state dict
    normalization: Literal["data", "imagenet"]  # the train split's own mean/std, or ImageNet's


@dataclass(frozen=True)
class AugmentParams:
    crop_padding: int
    flip: bool
    cutout: int
    random_resized_crop: bool
    crop_scale: tuple[float, ...]  # [min, max] share of the image's area
    crop_ratio: tuple[float, ...]  # [min, max] width / height
    eval_crop: float  # share of the side kept by the evaluation centre crop; 1.0 = no crop


@dataclass(frozen=True)
class TrainParams:
    device: Literal["auto", "cuda", "cpu"]
    epochs: int
    batch_size: int
    min_steps_per_epoch: int
    optimizer: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["onecycle", "cosine"]
    warmup_epochs: float
    label_smoothing: float
    ema_decay: float
    freeze: Literal["none", "backbone"]
    compile: bool
    seed: int
    data_on_device: Literal["auto", "always", "never"]
    device_budget_gb: float  # auto holds the data on the device up to this many GB of pixels
    prefetch_batches: int
    augment: AugmentParams


@dataclass(frozen=True)
class GateParams:
    min_accuracy: float
    min_class_recall: float
    max_regression: float
    confidence: float


@dataclass(frozen=True)
class ExportParams:
    opset: int
    fp16: bool


@dataclass(frozen=True)
class VerifyParams:
    provider: Literal["auto", "cuda", "cpu"]
    atol: float
    min_agreement: float
    odd_batch: int
    latency_runs: int
    throughput_runs: int
    fp16_atol: float


@dataclass(frozen=True)
class RegistryParams:
    uri: str
    model_name: str
    max_batch_size: int
    lock_timeout_s: float
    lease_s: float  # object stores: how long the lock lease lasts unless renewed
    require_conditional_writes: bool  # false: promote to a store that cannot lock, unlocked


@dataclass(frozen=True)
class PromoteParams:
    require_provider: Literal["cuda", "cpu", "any"]


@dataclass(frozen=True)
class ScheduleParams:
    cron: str
    timezone: str
    deployment: str
    lock_timeout_s: float  # a run waits this long for another run in the same workspace


@dataclass(frozen=True)
class Params:
    data: DataParams
    validate: ValidateParams
    model: ModelParams
    train: TrainParams
    gate: GateParams
    export: ExportParams
    verify: VerifyParams
    registry: RegistryParams
    promote: PromoteParams
    schedule: ScheduleParams

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Range checks that a type cannot express: (dotted key, predicate, what it must be).
_RANGES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("data.image_size", lambda v: 4 <= v <= 1024, "between 4 and 1024"),
    ("data.test_fraction", lambda v: 0.0 < v < 1.0, "strictly between 0 and 1"),
    ("data.synthetic.classes", lambda v: 2 <= v <= 10, "between 2 and 10"),
    ("data.ingest.max_image_mb", lambda v: v > 0, "positive"),
    ("data.ingest.max_dataset_gb", lambda v: v > 0, "positive"),
    ("data.ingest.max_compression_ratio", lambda v: v >= 1, "at least 1"),
    ("data.ingest.shard_mb", lambda v: v > 0, "positive"),
    ("data.ingest.row_group_mb", lambda v: v > 0, "positive"),
    ("validate.min_per_class", lambda v: v >= 0, "non-negative"),
    ("validate.max_class_ratio", lambda v: v >= 1, "at least 1"),
    ("validate.max_corrupt", lambda v: v >= 0, "non-negative"),
    ("validate.max_duplicate_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("validate.max_degenerate", lambda v: v >= 0, "non-negative"),
    ("validate.min_pixel_std", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("validate.drift.max_label_tv", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.synthetic.train_per_class", lambda v: v >= 1, "at least 1"),
    ("data.synthetic.test_per_class", lambda v: v >= 1, "at least 1"),
    ("train.epochs", lambda v: v >= 1, "at least 1"),
    ("train.batch_size", lambda v: v >= 1, "at least 1"),
    ("train.min_steps_per_epoch", lambda v: v >= 1, "at least 1"),
    ("train.lr", lambda v: v > 0, "positive"),
    ("train.weight_decay", lambda v: v >= 0, "non-negative"),
    ("train.warmup_epochs", lambda v: v >= 0, "non-negative"),
    ("train.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.augment.crop_padding", lambda v: v >= 0, "non-negative"),
    ("train.augment.cutout", lambda v: v >= 0, "non-negative"),
    ("train.augment.crop_scale", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[min, max], 0 < min <= max <= 1"),
    ("train.augment.crop_ratio", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max"),
    ("train.augment.eval_crop", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("train.device_budget_gb", lambda v: v >= 0, "non-negative"),
    ("train.prefetch_batches", lambda v: v >= 1, "at least 1"),
    ("gate.min_accuracy", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("gate.min_class_recall", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("gate.max_regression", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("gate.confidence", lambda v: 0 < v < 1, "strictly between 0 and 1"),
    ("export.opset", lambda v: 13 <= v <= 23, "between 13 and 23"),
    ("verify.atol", lambda v: v > 0, "positive"),
    ("verify.min_agreement", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("verify.odd_batch", lambda v: v >= 1, "at least 1"),
    ("verify.latency_runs", lambda v: v >= 1, "at least 1"),
    ("verify.throughput_runs", lambda v: v >= 1, "at least 1"),
    ("verify.fp16_atol", lambda v: v > 0, "positive"),
    ("registry.max_batch_size", lambda v: v >= 1, "at least 1"),
    ("registry.lock_timeout_s", lambda v: v > 0, "positive"),
    ("registry.lease_s", lambda v: 1 <= v <= 3600, "between 1 and 3600"),
    ("schedule.lock_timeout_s", lambda v: v >= 0, "non-negative"),
)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads "5e-4" as a string; accept ints and numeric strings with an exponent.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number: float | None = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML reads .inf and .nan as floats; no threshold means that
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    raise AssertionError(f"unsupported parameter type {tp!r} at {key}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} in {PARAMS_FILE}"
            f" (known keys here: {', '.join(prefix + n for n in names)})"
        )
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"missing key {prefix}{missing[0]} in {PARAMS_FILE}")
    return cls(**{n: _coerce(raw[n], hints[n], prefix + n) for n in names})


def sections(cls: type[T], params: Params) -> T:
    """A stage's slice of ``params``: the sections named by ``cls``'s fields (e.g. data, registry)."""
    return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def parse(raw: Any) -> Params:
    """Typed, range-checked parameters from the loaded YAML document."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{PARAMS_FILE} must be a mapping of sections, got {type(raw).__name__}")
    params: Params = _build(Params, raw, "")
    for key, ok, must in _RANGES:
        value = _lookup(params, key)
        if not ok(value):
            raise ConfigError(f"{key}: must be {must}, got {value!r}")
    augment = params.train.augment
    if augment.random_resized_crop and augment.crop_padding:
        raise ConfigError(
            "train.augment.crop_padding must be 0 when train.augment.random_resized_crop is true"
            f" (got {augment.crop_padding}): the random-resized crop replaces the padded crop"
        )
    return params


def read_raw(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: run visionops from a workspace that has {PARAMS_FILE}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return raw if raw is not None else {}


def load(path: Path | str = PARAMS_FILE) -> Params:
    """Parse params.yaml (relative to the current directory by default)."""
    return parse(read_raw(Path(path)))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` as DVC's ``-S`` reads it: the value is YAML (``1`` is an int, ``a`` a str)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {value!r} is not valid YAML: {exc}") from exc
    return key.strip(), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with dotted keys replaced. Keys must already exist (typos are errors)."""
    result = _deep_copy(raw)
    for dotted, value in overrides.items():
        node: Any = result
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])} in override {dotted}={value!r}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return result


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def write_overrides(path: Path, overrides: Mapping[str, Any]) -> Params:
    """Validate ``overrides`` against ``path`` and write them into it, keeping its comments.

    Nothing is written unless the result parses: a typo leaves params.yaml as it was.
    """
    params = parse(apply_overrides(read_raw(path), overrides))
    if not overrides:
        return params
    from ruamel.yaml import (
        YAML,  # round-trip YAML keeps the comments that document units
    )

    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    return params


__all__ = [
    "AugmentParams",
    "ConfigError",
    "DataParams",
    "DriftParams",
    "ExportParams",
    "GateParams",
    "IngestParams",
    "ModelParams",
    "Params",
    "PromoteParams",
    "RegistryParams",
    "ScheduleParams",
    "SyntheticParams",
    "TrainParams",
    "ValidateParams",
    "VerifyParams",
    "apply_overrides",
    "load",
    "parse",
    "parse_override",
    "sections",
    "write_overrides",
]
