"""predict: image files through the production ONNX model, under its recorded input contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.data.imaging import encode_png
from tasks.errors import DataError, RegistryError
from tasks.params import Params
from tasks.paths import Workspace
from tasks.predict import predict
from tasks.registry import IntegrityError, Registry

from candidate_factory import publish_pixel_reader, write_params


def _setup(tmp_path: Path, channels: int, max_batch: int = 256) -> tuple[Workspace, Params]:
    ws = Workspace(tmp_path / "ws")
    overrides = {"registry.uri": str(tmp_path / "registry"), "registry.model_name": "clf"}
    p = write_params(ws, {**overrides, "registry.max_batch_size": max_batch})
    publish_pixel_reader(Registry.open(ws, p.registry), tmp_path / "src", read_channel=0, channels=channels)
    return ws, p


def _png(path: Path, answer: int, size: int = 4) -> Path:
    """An RGB image that tells the pixel reader (channel 0 / grey, row 0) to answer ``answer``."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[0, answer] = 255  # white: 255 in R and in grey alike
    path.write_bytes(encode_png(pixels))
    return path


@pytest.mark.parametrize("channels", [3, 1])
def test_labels_and_probabilities_follow_the_contract(tmp_path: Path, channels: int) -> None:
    ws, p = _setup(tmp_path, channels)
    files = [_png(tmp_path / f"img{k}.png", k) for k in (2, 0, 1)]
    result = predict(p.registry, ws, files)
    assert [r.label for r in result] == ["eel", "cat", "dog"]
    assert [r.path for r in result] == [str(f) for f in files]
    expected = np.exp(12.75) / (np.exp(12.75) + 2)  # softmax of (255 * 0.05, 0, 0)
    assert all(r.probability == pytest.approx(expected, rel=1e-5) for r in result)


def test_unreadable_files_are_all_named(tmp_path: Path) -> None:
    ws, p = _setup(tmp_path, 3)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError) as info:
        predict(p.registry, ws, [_png(tmp_path / "ok.png", 0), text, tmp_path / "absent.png"])
    message = str(info.value)
    assert "2 of 3" in message and "notes.png" in message and "absent.png" in message


def test_without_production_says_what_to_do(tmp_path: Path) -> None:
    p = write_params(Workspace(tmp_path), {"registry.uri": str(tmp_path / "r")})
    with pytest.raises(RegistryError, match="no production model"):
        predict(p.registry, Workspace(tmp_path), [_png(tmp_path / "x.png", 0)])


def test_files_are_scored_in_batches_of_max_batch_size_in_order(tmp_path: Path) -> None:
    ws, p = _setup(tmp_path, 3, max_batch=2)
    answers = [2, 0, 1, 1, 2]
    files = [_png(tmp_path / f"img{i}.png", k) for i, k in enumerate(answers)]  # 3 batches: 2 + 2 + 1
    result = predict(p.registry, ws, files)
    assert [r.label for r in result] == [["cat", "dog", "eel"][k] for k in answers]
    assert [r.path for r in result] == [str(f) for f in files]


def test_an_unusable_file_in_a_later_batch_fails_the_call_naming_it(tmp_path: Path) -> None:
    ws, p = _setup(tmp_path, 3, max_batch=2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    files = [_png(tmp_path / f"ok{i}.png", 0) for i in range(3)] + [broken, tmp_path / "absent.png"]
    with pytest.raises(DataError, match=r"2 of 5 image\(s\) unusable: .*broken\.png.*absent\.png"):
        predict(p.registry, ws, files)


def test_a_flipped_byte_in_the_production_model_is_not_served(tmp_path: Path) -> None:
    ws, p = _setup(tmp_path, 3)
    model = tmp_path / "registry" / "clf" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"version 1: .*1/model.onnx does not match the sha256"):
        predict(p.registry, ws, [_png(tmp_path / "x.png", 0)])


def test_classes_reordered_in_the_card_are_not_used(tmp_path: Path) -> None:
    ws, p = _setup(tmp_path, 3)
    card = tmp_path / "registry" / "clf" / "1" / "card.json"
    raw = json.loads(card.read_text())
    raw["classes"] = list(reversed(raw["classes"]))
    card.write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match=r"version 1: .*1/card.json does not match"):
        predict(p.registry, ws, [_png(tmp_path / "x.png", 0)])
