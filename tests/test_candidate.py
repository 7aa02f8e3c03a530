"""tasks/training/candidate.py: the candidate file round trip and the deployable (uint8 in, probabilities out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.errors import DataError
from tasks.training.candidate import Deployable, load_candidate, save_candidate
from tasks.training.models import build_model

from candidate_factory import candidate_of

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _saved(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = tmp_path / "candidate.pt"
    save_candidate(path, candidate_of(model, "resnet18", "cifar", ["a", "b", "c"], 1, 8))
    return path


def test_a_saved_candidate_loads_with_its_weights_and_metadata(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("resnet18", "cifar", 3, 1).eval()
    loaded = load_candidate(_saved(tmp_path, model))
    assert (loaded.classes, loaded.in_channels, loaded.image_size) == (["a", "b", "c"], 1, 8)
    classifier = loaded.classifier()
    assert not classifier.training
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(classifier(x), model(x))


def test_load_candidate_names_the_file_when_fields_are_missing(tmp_path: Path) -> None:
    path = tmp_path / "candidate.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(DataError, match=r"candidate\.pt lacks arch"):
        load_candidate(path)
    with pytest.raises(DataError, match="not found"):
        load_candidate(tmp_path / "absent.pt")
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="not a readable candidate"):
        load_candidate(path)


def test_deployable_normalises_uint8_like_training_and_returns_probabilities(tmp_path: Path) -> None:
    torch.manual_seed(2)
    classifier = build_model("resnet18", "cifar", 3, 1).eval()
    deployable = Deployable.from_candidate(_saved(tmp_path, classifier))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        probabilities = deployable(images)
        expected = torch.softmax(classifier((images.float() / 255 - 0.5) / 0.25), dim=1)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (5, 3)
    torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5))


def test_deployable_applies_the_evaluation_resize_and_centre_crop_as_torchvision_does(tmp_path: Path) -> None:
    from torchvision.transforms import functional as tvf

    torch.manual_seed(3)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3)).eval()  # pixel-sensitive
    deployable = Deployable(classifier, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], eval_crop=0.875)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    # "resize 18, center-crop 16": the ImageNet evaluation transform at 16 px (16 / 0.875 = 18.3 -> 18)
    view = tvf.center_crop(tvf.resize(images.float(), [18, 18], antialias=False), [16, 16])
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(classifier((view / 255 - mean) / std), dim=1)
        torch.testing.assert_close(deployable(images), expected)
        assert not torch.allclose(Deployable(classifier, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])(images), expected)


def test_a_candidate_written_before_eval_crop_existed_loads_without_a_crop(tmp_path: Path) -> None:
    path = _saved(tmp_path, build_model("resnet18", "cifar", 3, 1))
    raw = torch.load(path, weights_only=True)
    del raw["eval_crop"]
    torch.save(raw, path)
    assert load_candidate(path).eval_crop == 1.0
