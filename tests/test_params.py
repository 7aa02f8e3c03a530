"""params.yaml parsing: typed, frozen, strict about keys and types; -S overrides keep comments."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tasks import params
from tasks.params import ConfigError

PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def raw() -> dict:
    return yaml.safe_load(PROJECT_PARAMS.read_text())


def test_project_params_parse_into_frozen_typed_sections() -> None:
    p = params.load(PROJECT_PARAMS)
    assert isinstance(p.train.epochs, int)
    assert isinstance(p.train.weight_decay, float)  # "5.0e-4" in YAML
    assert p.data.channels in (1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 99  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"train.epochs": "ten"}, "train.epochs"),
        ({"train.epochs": 2.5}, "train.epochs"),
        ({"train.augment.flip": "yes"}, "train.augment.flip"),
        ({"data.channels": 2}, "data.channels"),
        ({"model.arch": "resnet101"}, "model.arch"),
        ({"gate.min_accuracy": 1.5}, "gate.min_accuracy"),
        ({"data.test_fraction": 0}, "data.test_fraction"),
    ],
)
def test_wrong_type_or_range_names_the_key(override: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as info:
        params.parse(params.apply_overrides(raw(), override))
    assert info.value.exit_code == 2


def test_unknown_key_in_file_is_rejected_with_its_dotted_name() -> None:
    doc = raw()
    doc["train"]["augment"]["mixup"] = 0.2
    with pytest.raises(ConfigError, match=r"unknown key train\.augment\.mixup"):
        params.parse(doc)


def test_missing_key_is_rejected() -> None:
    doc = raw()
    del doc["gate"]["confidence"]
    with pytest.raises(ConfigError, match=r"missing key gate\.confidence"):
        params.parse(doc)


def test_override_of_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch\b"):
        params.apply_overrides(raw(), {"train.epoch": 3})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.epochs=3", ("train.epochs", 3)),
        ("train.lr=1e-2", ("train.lr", "1e-2")),  # YAML 1.1 reads this as a string; parse() takes it
        ("data.source=synthetic", ("data.source", "synthetic")),
        ("train.augment.flip=false", ("train.augment.flip", False)),
        ("data.source=/tmp/a=b", ("data.source", "/tmp/a=b")),
    ],
)
def test_parse_override_reads_the_value_as_yaml(text: str, expected: tuple) -> None:
    assert params.parse_override(text) == expected


def test_parse_override_without_equals_sign_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        params.parse_override("train.epochs")


def test_write_overrides_keeps_comments_and_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PROJECT_PARAMS.read_text())
    p = params.write_overrides(path, {"train.epochs": 3, "data.source": "/data/digits"})
    assert (p.train.epochs, p.data.source) == (3, "/data/digits")
    text = path.read_text()
    assert "# peak learning rate per 512 images" in text
    reread = params.load(path)
    assert reread.train.epochs == 3 and reread.data.source == "/data/digits"
    assert reread.gate == params.load(PROJECT_PARAMS).gate


def test_bad_override_leaves_params_yaml_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PROJECT_PARAMS.read_text())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        params.write_overrides(path, {"data.source": "x", "train.epochs": "many"})
    assert path.read_bytes() == before


def test_missing_params_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        params.load(tmp_path / "params.yaml")


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        params.load(path)


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted key of every float parameter of ``cls`` and its sections."""
    import typing

    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{name}.")  # type: ignore[arg-type]
        elif tp is float:
            keys.append(prefix + name)
    return keys


FLOAT_KEYS = _float_keys(params.Params)


def test_every_float_parameter_is_found() -> None:
    assert {"train.lr", "gate.confidence", "data.ingest.max_image_mb", "schedule.lock_timeout_s"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_infinite_and_nan_floats_are_rejected_naming_the_key(key: str, value: str) -> None:
    override = dict([params.parse_override(f"{key}={value}")])  # as `-S key=value` reads it
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: expected a finite number") as info:
        params.parse(params.apply_overrides(raw(), override))
    assert info.value.exit_code == 2


def test_yaml_inf_in_params_yaml_is_rejected(tmp_path: Path) -> None:
    text = PROJECT_PARAMS.read_text().replace("  lr: 0.4 ", "  lr: .inf ")
    assert "lr: .inf" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"train\.lr: expected a finite number, got inf"):
        params.load(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "override",
    [{"data.ingest.max_image_mb": 0}, {"data.ingest.max_compression_ratio": 0.5}, {"data.ingest.shard_mb": -1}],
)
def test_ingest_bounds_are_range_checked(override: dict) -> None:
    (key,) = override
    with pytest.raises(ConfigError, match=re.escape(key)):
        params.parse(params.apply_overrides(raw(), override))


def test_the_readme_fine_tuning_recipe_is_a_valid_set_of_overrides() -> None:
    """README's 224-px ImageNet recipe: every -S key exists and every value passes the checks."""
    readme = (PROJECT_PARAMS.parent / "README.md").read_text()
    block = next(b for b in readme.split("```") if "model.normalization=imagenet" in b)
    overrides = dict(params.parse_override(arg) for arg in re.findall(r"-S (\S+)", block))
    assert {"data.image_size", "model.weights", "train.freeze", "train.augment.random_resized_crop"} <= set(overrides)
    p = params.parse(params.apply_overrides(raw(), overrides))
    assert (p.data.image_size, p.model.stem, p.model.normalization) == (224, "imagenet", "imagenet")
    assert p.train.augment.random_resized_crop and p.train.augment.eval_crop == 0.875
