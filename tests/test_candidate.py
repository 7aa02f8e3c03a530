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
