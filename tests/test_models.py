from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tasks.errors import DataError
from tasks.models import ARCHS, Deployable, build_model, head, load_candidate

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_arch_takes_small_images_of_either_channel_count_and_sizes_the_head(arch: str, in_channels: int) -> None:
    model = build_model(arch, "cifar", num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, 16, 16))
    assert logits.shape == (2, 7)
    assert head(model).out_features == 7


def test_cifar_stem_keeps_resolution_and_imagenet_stem_downsamples_4x() -> None:
    seen: dict[str, tuple[int, ...]] = {}
    for stem in ("cifar", "imagenet"):
        model = build_model("resnet18", stem, 10, 3).eval()
        model.layer1.register_forward_hook(lambda _m, _i, out, stem=stem: seen.__setitem__(stem, tuple(out.shape)))
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert seen["cifar"][2:] == (32, 32)
    assert seen["imagenet"][2:] == (8, 8)
    cifar = build_model("resnet18", "cifar", 10, 3)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)


def test_mobilenet_cifar_stem_has_stride_one() -> None:
    model = build_model("mobilenet_v3_small", "cifar", 4, 1)
    assert model.features[0][0].stride == (1, 1) and model.features[0][0].in_channels == 1


@pytest.mark.parametrize(
    ("arch", "stem", "classes", "channels"),
    [("vgg11", "cifar", 10, 3), ("resnet18", "tiny", 10, 3), ("resnet18", "cifar", 1, 3), ("resnet18", "cifar", 10, 2)],
)
def test_build_model_rejects_what_it_cannot_build(arch: str, stem: str, classes: int, channels: int) -> None:
    with pytest.raises(ValueError):
        build_model(arch, stem, classes, channels)


def _candidate(tmp_path: Path, model: nn.Module, **overrides: object) -> Path:
    checkpoint = {
        "state_dict": model.state_dict(),
        "arch": "resnet18",
        "stem": "cifar",
        "num_classes": 3,
        "in_channels": 1,
        "image_size": 8,
        "classes": ["a", "b", "c"],
        "normalization": {"mean": [0.25], "std": [0.5]},
        "params": {},
        "device": "cpu",
        "metrics": {"test_accuracy": 0.5},
        **overrides,
    }
    path = tmp_path / "candidate.pt"
    torch.save(checkpoint, path)
    return path


def test_load_candidate_restores_weights_in_eval_mode_and_returns_metadata(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("resnet18", "cifar", 3, 1).eval()
    path = _candidate(tmp_path, model)
    loaded, meta = load_candidate(path)
    assert not loaded.training
    assert "state_dict" not in meta and meta["classes"] == ["a", "b", "c"]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_candidate_names_the_file_when_keys_are_missing(tmp_path: Path) -> None:
    path = tmp_path / "candidate.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(DataError, match=r"candidate\.pt lacks arch"):
        load_candidate(path)
    with pytest.raises(DataError, match="not found"):
        load_candidate(tmp_path / "absent.pt")


def test_deployable_normalises_uint8_like_training_and_returns_probabilities(tmp_path: Path) -> None:
    torch.manual_seed(2)
    classifier = build_model("resnet18", "cifar", 3, 1).eval()
    deployable = Deployable.from_candidate(_candidate(tmp_path, classifier))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        probabilities = deployable(images)
        expected = torch.softmax(classifier((images.float() / 255 - 0.25) / 0.5), dim=1)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (5, 3)
    torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5))
