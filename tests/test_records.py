"""tasks/fs/records.py: typed JSON records that refuse a renamed, missing or mistyped field by name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tasks.errors import DataError
from tasks.fs.records import Record, RecordError


@dataclass(frozen=True)
class Inner(Record):
    name: str
    score: float


@dataclass(frozen=True)
class Outer(Record):
    version: int
    inner: Inner
    maybe: Inner | None
    either: int | str
    tags: tuple[str, ...]
    pair: tuple[int, str]
    per_class: dict[str, Inner]
    rows: list[Inner]
    kind: Literal["cpu", "cuda"]
    extra: dict[str, Any]
    note: str = "default"
    seen: list[int] = field(default_factory=list)


def _outer(**changes: Any) -> Outer:
    values: dict[str, Any] = {
        "version": 3,
        "inner": Inner("a", 0.5),
        "maybe": None,
        "either": "x",
        "tags": ("t1", "t2"),
        "pair": (7, "seven"),
        "per_class": {"cat": Inner("cat", 1.0)},
        "rows": [Inner("r", 0.25)],
        "kind": "cpu",
        "extra": {"nested": [1, {"k": None}]},
    }
    return Outer(**{**values, **changes})


@pytest.mark.parametrize(
    "record",
    [_outer(), _outer(maybe=Inner("m", 2.0), either=4, tags=(), kind="cuda", note="n", seen=[1, 2])],
    ids=["none-and-str", "value-and-int"],
)
def test_unions_optionals_nested_dataclasses_and_tuples_round_trip(record: Outer, tmp_path: Path) -> None:
    again = Outer.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    assert isinstance(again.inner, Inner) and isinstance(again.rows[0], Inner)
    assert isinstance(again.per_class["cat"], Inner) and isinstance(again.tags, tuple)
    assert type(again.either) is type(record.either)
    record.write(tmp_path / "outer.json")
    assert Outer.read(tmp_path / "outer.json", "evaluate") == record


def test_defaults_fill_fields_the_file_does_not_have() -> None:
    raw = _outer().to_json()
    del raw["note"], raw["seen"]
    assert Outer.from_json(raw) == _outer()


def test_an_int_is_read_as_a_float_but_a_bool_is_not_an_int() -> None:
    raw = _outer().to_json()
    raw["inner"] = {"name": "a", "score": 1}
    score = Outer.from_json(raw).inner.score
    assert score == 1.0 and isinstance(score, float)
    with pytest.raises(RecordError, match=r"Outer\.version: expected int, got True"):
        Outer.from_json({**_outer().to_json(), "version": True})


def test_a_renamed_field_fails_naming_the_file_and_the_field(tmp_path: Path) -> None:
    raw = _outer().to_json()
    raw["versions"] = raw.pop("version")
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RecordError, match="unknown field 'versions'") as info:
        Outer.read(path, "evaluate")
    message = str(info.value)
    assert message.startswith(str(path)) and "rerun evaluate" in message


def test_a_missing_field_fails_naming_the_file_and_the_field(tmp_path: Path) -> None:
    raw = _outer().to_json()
    del raw["inner"]["score"]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RecordError, match=rf"^{path}\.inner: missing field 'score' of Inner"):
        Outer.read(path, "evaluate")


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"rows": [{"name": "r", "score": "high"}]}, r"Outer\.rows\[0\]\.score: expected float"),
        ({"per_class": {"cat": {"name": 1, "score": 1.0}}}, r"Outer\.per_class\.cat\.name: expected str"),
        ({"either": 1.5}, r"Outer\.either: 1\.5 is not"),
        ({"kind": "tpu"}, r"Outer\.kind: expected .*got 'tpu'"),
        ({"tags": "t1"}, r"Outer\.tags: expected tuple"),
        ({"pair": [7, 8]}, r"Outer\.pair\[1\]: expected str, got 8"),
        ({"pair": [7]}, r"Outer\.pair: expected 2 items, got 1"),
        ({"maybe": 3}, r"Outer\.maybe: 3 is not"),
    ],
)
def test_a_mistyped_field_is_named_with_its_path(change: dict[str, Any], where: str) -> None:
    with pytest.raises(RecordError, match=where):
        Outer.from_json({**_outer().to_json(), **change})


def test_not_an_object_is_refused() -> None:
    with pytest.raises(RecordError, match=r"Outer: expected a JSON object, got list"):
        Outer.from_json([1, 2])


def test_read_names_the_stage_when_the_file_is_missing_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"verification\.json not found: run the pipeline through verify first"):
        Outer.read(tmp_path / "verification.json", "verify")
    (tmp_path / "verification.json").write_text("{half")
    with pytest.raises(DataError, match=r"verification\.json is not readable JSON .*; rerun verify"):
        Outer.read(tmp_path / "verification.json", "verify")
