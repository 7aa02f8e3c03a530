from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tasks import params
from tasks.errors import DataError, RegistryError, RuntimeUnavailable
from tasks.params import ModelParams
from tasks.paths import Workspace
from tasks.training.models import build_model
from tasks.training.weights import imagenet_cache_file, load_initial_weights, transfer

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROJECT = Path(__file__).resolve().parents[1]


def test_a_candidate_file_with_other_classes_loads_all_but_the_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model("resnet18", "cifar", 10, 3)
    torch.save({"state_dict": source.state_dict(), "arch": "resnet18"}, tmp_path / "earlier.pt")
    model = build_model("resnet18", "cifar", 4, 3)
    described = load_initial_weights(model, ModelParams("resnet18", "cifar", "earlier.pt", "data"), Workspace(tmp_path))
    assert described == str(tmp_path / "earlier.pt")
    loaded, expected = model.state_dict(), source.state_dict()
    assert torch.equal(loaded["layer4.1.conv2.weight"], expected["layer4.1.conv2.weight"])
    assert torch.equal(loaded["conv1.weight"], expected["conv1.weight"])
    assert loaded["fc.weight"].shape == (4, 512)


def test_rgb_stem_weights_are_summed_for_grayscale_input() -> None:
    rgb = build_model("resnet18", "cifar", 10, 3)
    gray = build_model("resnet18", "cifar", 10, 1)
    fresh = transfer(gray, rgb.state_dict(), "test")
    assert fresh == []
    torch.testing.assert_close(gray.state_dict()["conv1.weight"], rgb.state_dict()["conv1.weight"].sum(1, keepdim=True))


def test_weights_of_another_architecture_are_refused_by_name(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "arch": "resnet34"}, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"holds a resnet34 but model\.arch is resnet18"):
        model = build_model("resnet18", "cifar", 4, 3)
        load_initial_weights(model, ModelParams("resnet18", "cifar", "other.pt", "data"), Workspace(tmp_path))
    wrong = build_model("mobilenet_v3_small", "cifar", 4, 3).state_dict()
    with pytest.raises(DataError, match="does not fit the model"):
        transfer(build_model("resnet18", "cifar", 4, 3), wrong, "mobilenet.pt")


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    imagenet = build_model("resnet18", "imagenet", 1000, 3).state_dict()
    cached = imagenet_cache_file("resnet18")
    assert cached.is_relative_to(tmp_path / "torch")
    cached.parent.mkdir(parents=True)
    torch.save(imagenet, cached)
    model = build_model("resnet18", "cifar", 10, 3)
    load_initial_weights(model, ModelParams("resnet18", "cifar", "imagenet", "data"), Workspace(tmp_path))
    assert torch.equal(model.state_dict()["layer2.0.conv1.weight"], imagenet["layer2.0.conv1.weight"])
    conv1 = model.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.weight.shape == (64, 3, 3, 3), "the 7x7 ImageNet stem does not fit the cifar stem"


def test_imagenet_weights_offline_name_the_file_they_expected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # A proxy on a closed local port: the download fails at once, as it does on an offline machine.
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    expected = str(imagenet_cache_file("resnet18"))
    with pytest.raises(RuntimeUnavailable, match=f"put that file at {expected}"):
        model = build_model("resnet18", "cifar", 10, 3)
        load_initial_weights(model, ModelParams("resnet18", "cifar", "imagenet", "data"), Workspace(tmp_path))


def test_production_weights_without_a_production_version_is_a_clear_error(tmp_path: Path) -> None:
    registry = params.load(PROJECT / "params.yaml").registry
    with pytest.raises(RegistryError, match="has no production version"):
        model = build_model("resnet18", "cifar", 4, 3)
        production = ModelParams("resnet18", "cifar", "production", "data")
        load_initial_weights(model, production, Workspace(tmp_path), registry)
