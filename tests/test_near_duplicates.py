"""tasks/data/near_duplicates.py: copies found between and within splits, look-alikes left alone."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.data import near_duplicates
from tasks.data.imaging import encode_png, to_array
from tasks.data.phash import dct_hashes, to_hex
from tasks.data.sources import synthetic
from tasks.params import SyntheticParams

BITS, MIN_CORRELATION = 8, 0.985  # params.yaml's defaults


def _random_pairs(n_query: int, n_reference: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes, and queries made from references by flipping 1..14 bits (plus unrelated ones)."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 2**64, n_reference, dtype=np.uint64)
    source = rng.integers(0, n_reference, n_query)
    flips = np.zeros(n_query, np.uint64)
    for i, k in enumerate(rng.integers(1, 15, n_query)):
        for bit in rng.choice(64, k, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(int(bit))
    query = reference[source] ^ flips
    query[::3] = rng.integers(0, 2**64, len(query[::3]), dtype=np.uint64)
    return query, reference


def _brute_force(query: np.ndarray, reference: np.ndarray, bits: int, same: bool) -> set[tuple[int, int, int]]:
    return {
        (i, j, int(np.bitwise_count(q ^ r)))
        for i, q in enumerate(query.tolist())
        for j, r in enumerate(reference.tolist())
        if (j > i or not same) and int(np.bitwise_count(np.uint64(q) ^ np.uint64(r))) <= bits
    }


@pytest.mark.parametrize("bits", [4, 10, 12, 20])
@pytest.mark.parametrize("same", [False, True])
def test_candidate_pairs_are_exactly_the_pairs_within_the_distance(bits: int, same: bool, monkeypatch) -> None:
    query, reference = _random_pairs(150, 120, seed=bits)
    if same:
        query = reference = np.concatenate([reference, query])
    expected = _brute_force(query, reference, bits, same)
    monkeypatch.setattr(near_duplicates, "BLOCK_ELEMENTS", 1000)  # many scan blocks
    monkeypatch.setattr(near_duplicates, "QUERY_BLOCK", 37)  # many probe blocks
    for found in (near_duplicates._scan(query, reference, bits, same),
                  near_duplicates._indexed(query, reference, bits, same),
                  near_duplicates.candidate_pairs(query, reference, bits, same)):
        pairs = list(zip(*(a.tolist() for a in found), strict=True))
        assert len(pairs) == len(set(pairs)) and set(pairs) == expected
    assert len(expected) > 20


def test_thumbnail_correlation_ignores_brightness_and_contrast() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(20, 200, (1, 3, 16, 16)).astype(np.uint8)
    brighter = np.clip(image.astype(np.float64) * 1.2 + 10, 0, 255).astype(np.uint8)
    other = rng.integers(20, 200, (1, 3, 16, 16)).astype(np.uint8)
    thumbs = near_duplicates.thumbnails(np.concatenate([image, brighter, other, np.zeros_like(image)]))
    assert thumbs.shape == (4, 3 * 8 * 8)
    assert thumbs[0] @ thumbs[1] > 0.99 and abs(thumbs[0] @ thumbs[2]) < 0.5
    assert not thumbs[3].any()  # a blank image correlates with nothing


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _resized(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).resize((29, 29), Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _brightened(png: bytes) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    return encode_png(np.clip(pixels * 1.1, 0, 255).round().astype(np.uint8))


def _prepared(splits: dict[str, list[tuple[str, bytes]]]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A manifest and prepared arrays for (path, encoded image) lists, as prepare would write them (32x32 RGB)."""
    rows, images = [], {}
    for split, files in splits.items():
        pixels = np.stack([to_array(data, 32, 3) for _path, data in files])
        images[split] = pixels
        for i, ((path, _data), h) in enumerate(zip(files, to_hex(dct_hashes(pixels)), strict=True)):
            rows.append({"split": split, "index": i, "path": path, "decoded": True, "phash": h,
                         "content_hash": pixels[i].tobytes().hex()})
    return pd.DataFrame(rows), images


@pytest.fixture(scope="module")
def shapes() -> dict[str, list[tuple[str, bytes]]]:
    dataset = synthetic.generate(SyntheticParams(10, 60, 20), seed=0)
    splits: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    for split, img in dataset.images():
        splits[split].append((img.path, img.image))
    return splits


def test_transformed_test_images_in_train_are_found_and_named(shapes) -> None:
    test = shapes["test"]
    copies = [(f"train/leaked/{name}.png", transform(test[i][1]))
              for i, (name, transform) in zip((3, 77, 150), (("jpeg", _jpeg), ("resized", _resized),
                                                               ("brightened", _brightened)), strict=True)]
    exact = [("train/leaked/exact.png", test[42][1])]  # the exact leak check's job, not this one's
    brighter_train = [("train/again/bright.png", _brightened(shapes["train"][5][1]))]
    manifest, images = _prepared({"train": shapes["train"] + copies + exact + brighter_train, "test": test})
    found = near_duplicates.find(manifest, images, BITS, MIN_CORRELATION)

    leaks = {p.path: p for p in found.summary.pairs if p.kind == "leak"}
    assert found.summary.leaks == 3 and set(leaks) == {test[3][0], test[77][0], test[150][0]}
    assert leaks[test[3][0]].twin == "train/leaked/jpeg.png"
    assert leaks[test[150][0]].twin == "train/leaked/brightened.png"
    assert all(p.bits <= BITS and p.correlation >= MIN_CORRELATION for p in leaks.values())
    named = found.train_twin.dropna()
    assert named.loc[manifest.index[manifest["path"] == test[77][0]][0]].startswith("train/leaked/resized.png (")
    # Within train: each transformed copy pairs with nothing but its original's look-alikes; the brightened
    # train image and its original are reported as a pair, both ways.
    within = {p.path: p.twin for p in found.summary.pairs if p.kind == "within_train"}
    assert within["train/again/bright.png"] == shapes["train"][5][0]
    assert within[shapes["train"][5][0]] == "train/again/bright.png"
    assert "train/leaked/exact.png" not in within  # exact copies are counted by the exact checks
    assert found.within_split.notna().sum() == found.summary.within_split


def test_distinct_images_of_the_same_class_are_not_flagged(shapes) -> None:
    # 600 train and 200 test images of 10 shapes, in random colours and places: all distinct
    manifest, images = _prepared(shapes)
    found = near_duplicates.find(manifest, images, BITS, MIN_CORRELATION)
    assert (found.summary.leaks, found.summary.within_split) == (0, 0)
    # the hashes alone would flag many of them: the thumbnails are what tells copies from look-alikes
    hashes = {s: np.array([int(h, 16) for h in manifest[manifest["split"] == s]["phash"]], np.uint64) for s in images}
    flagged_by_hash = np.unique(near_duplicates.candidate_pairs(hashes["test"], hashes["train"], BITS)[0])
    assert len(flagged_by_hash) > 0.2 * len(hashes["test"])
