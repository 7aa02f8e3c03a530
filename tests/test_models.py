from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.training.models import ARCHS, build_model, head

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
        model.get_submodule("layer1").register_forward_hook(
            lambda _m, _i, out, stem=stem: seen.__setitem__(stem, tuple(out.shape))
        )
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    assert seen["cifar"][2:] == (32, 32)
    assert seen["imagenet"][2:] == (8, 8)
    cifar = build_model("resnet18", "cifar", 10, 3)
    conv1 = cifar.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(cifar.get_submodule("maxpool"), nn.Identity)


def test_mobilenet_cifar_stem_has_stride_one() -> None:
    model = build_model("mobilenet_v3_small", "cifar", 4, 1)
    first = model.get_submodule("features.0.0")
    assert isinstance(first, nn.Conv2d) and first.stride == (1, 1) and first.in_channels == 1


@pytest.mark.parametrize(
    ("arch", "stem", "classes", "channels"),
    [("vgg11", "cifar", 10, 3), ("resnet18", "tiny", 10, 3), ("resnet18", "cifar", 1, 3), ("resnet18", "cifar", 10, 2)],
)
def test_build_model_rejects_what_it_cannot_build(arch: str, stem: str, classes: int, channels: int) -> None:
    with pytest.raises(ValueError):
        build_model(arch, stem, classes, channels)
