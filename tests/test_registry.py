"""The Triton-layout model registry: layout, Triton's schema, lock, rollback, history, fsspec URLs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tasks.errors import RegistryError
from tasks.fs.hashing import file_digest
from tasks.params import RegistryParams
from tasks.registry import CONFIG, HISTORY, LABELS, Registry
from tasks.registry.status import RegistryStatus

from candidate_factory import (
    CLASSES3,
    export_contract,
    make_card,
    pixel_reader_onnx,
    publish_pixel_reader,
)

PROJECT = Path(__file__).resolve().parents[1]
PARAMS = RegistryParams(
    uri="registry", model_name="clf", max_batch_size=16, lock_timeout_s=30.0, lease_s=5.0, require_conditional_writes=True
)


def _publish(registry: Registry, tmp_path: Path, tag: int, classes: list[str] = CLASSES3) -> int:
    return publish_pixel_reader(registry, tmp_path / f"candidate{tag}", tag % 3, classes, accuracy=0.5 + tag / 100)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"), PARAMS, tmp_path / "cache")


def test_empty_registry_has_no_production_and_reading_creates_nothing(registry: Registry, tmp_path: Path) -> None:
    assert registry.production() is None and registry.production_weights() is None
    assert registry.status() == RegistryStatus(registry=registry.location, production=None, history=[])
    with pytest.raises(RegistryError, match="no production version"):
        registry.rollback()
    assert not (tmp_path / "registry").exists()


def test_publish_writes_the_triton_layout(registry: Registry, tmp_path: Path) -> None:
    version = _publish(registry, tmp_path, 1)
    model_dir = tmp_path / "registry" / "clf"
    assert version == 1
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["card.json", "model.onnx", "weights.pt"]
    assert (model_dir / LABELS).read_text() == "cat\ndog\neel\n"
    info = registry.production()
    assert info is not None and info.version == 1 and Path(info.model_path) == model_dir / "1" / "model.onnx"
    assert info.card.version == 1 and info.card.files["weights.pt"] == file_digest(model_dir / "1" / "weights.pt")
    weights = registry.production_weights()
    assert weights is not None and weights.read_bytes() == b"weights of candidate1"
    assert [e["event"] for e in registry.history()] == ["promote"]


def test_config_pbtxt_parses_under_tritons_schema_and_pins_production(registry: Registry, tmp_path: Path) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    config = model_config_pb2.ModelConfig()
    text_format.Parse((tmp_path / "registry" / "clf" / CONFIG).read_text(), config)
    assert config.name == "clf" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert list(config.version_policy.specific.versions) == [2]
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", model_config_pb2.TYPE_UINT8, [3, 4, 4])
    assert inp.format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == (
        "probabilities",
        model_config_pb2.TYPE_FP32,
        [3],
        LABELS,
    )


def test_publish_outside_the_lock_is_a_bug(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "candidate"
    pixel_reader_onnx(src / "model.onnx", 3, 3, 4, read_channel=0)
    files = {"model.onnx": src / "model.onnx"}
    card = make_card(1, "clf", files, export_contract(src / "model.onnx", src / "model.onnx", CLASSES3, 3, 4), 0.5)
    with pytest.raises(AssertionError, match="lock"):
        registry.publish(files, card, history={})


def test_rollback_to_previous_and_to_a_named_version(registry: Registry, tmp_path: Path) -> None:
    for tag in (1, 2):
        _publish(registry, tmp_path, tag)
    _publish(registry, tmp_path, 3, classes=["ant", "bee", "cow"])
    assert registry.rollback() == 2
    production = registry.production()
    assert production is not None and production.version == 2
    assert (tmp_path / "registry" / "clf" / LABELS).read_text() == "cat\ndog\neel\n"
    assert registry.rollback(to=3) == 3
    assert (tmp_path / "registry" / "clf" / LABELS).read_text() == "ant\nbee\ncow\n"
    assert registry.rollback(to=1) == 1
    with pytest.raises(RegistryError, match="oldest"):
        registry.rollback()
    with pytest.raises(RegistryError, match="not a complete version"):
        registry.rollback(to=9)
    events = [(e["event"], e["version"], e["previous"]) for e in registry.history()]
    assert events == [
        ("promote", 1, None),
        ("promote", 2, 1),
        ("promote", 3, 2),
        ("rollback", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 1, 3),
    ]


def test_status_has_the_cli_shape(registry: Registry, tmp_path: Path) -> None:
    _publish(registry, tmp_path, 1)
    status = json.loads(json.dumps(registry.status().to_json()))
    prod = status["production"]
    assert prod["version"] == 1 and prod["metrics"] == {"accuracy": 0.51, "macro_f1": 0.51, "n_test": 3}
    assert Path(prod["model_path"]).is_file() and prod["cuda_verified"] is False
    assert status["history"][-1]["event"] == "promote"


def test_history_skips_a_torn_last_line_and_recovers_a_missing_entry(registry: Registry, tmp_path: Path) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    model_dir = tmp_path / "registry" / "clf"
    # A process killed between the pointer switch and its history line, mid-append:
    config = (model_dir / CONFIG).read_text().replace("versions: [2]", "versions: [1]")
    (model_dir / CONFIG).write_text(config)
    with (model_dir / HISTORY).open("a") as fh:
        fh.write('{"event": "rollb')
    assert len(registry.history()) == 2
    with registry.lock():
        pass
    last = registry.history()[-1]
    assert (last["event"], last["version"]) == ("recover", 1)


@pytest.mark.integration
def test_lock_serialises_processes(registry: Registry, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(PROJECT)!r})
            from pathlib import Path
            from tasks.params import RegistryParams
            from tasks.registry import Registry
            params = RegistryParams("r", "clf", 16, 30.0, 5.0, True)
            reg = Registry({str(tmp_path / "registry")!r}, params, Path({str(tmp_path)!r}))
            with reg.lock():
                print("locked", flush=True)
                time.sleep(3)
                releasing_at = time.time()
            print(releasing_at, flush=True)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        impatient = Registry(str(tmp_path / "registry"), RegistryParams("r", "clf", 16, 0.5, 5.0, True), tmp_path)
        start = time.monotonic()
        with pytest.raises(RegistryError, match="locked by another promotion"), impatient.lock():
            pass
        assert time.monotonic() - start >= 0.5
        patient = Registry(str(tmp_path / "registry"), PARAMS, tmp_path)
        with patient.lock():
            acquired_at = time.time()
        assert acquired_at >= float(holder.stdout.readline()), "got the lock while another process held it"
    finally:
        holder.wait(timeout=30)


def test_fsspec_url_registry_publishes_reads_and_rolls_back(tmp_path: Path) -> None:
    registry = Registry("memory://visionops-test/registry", PARAMS, tmp_path / "cache")
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    info = registry.production()
    assert info is not None and info.version == 2 and info.model_path.startswith("memory://")
    with fsspec.open(info.model_path, "rb") as fh:  # a URL any fsspec client opens
        assert fh.read() == (tmp_path / "candidate2" / "model.onnx").read_bytes()
    local = registry.production_weights()
    assert local is not None
    assert local.read_bytes() == b"weights of candidate2" and local.is_relative_to(tmp_path / "cache")
    assert registry.rollback() == 1
    assert not registry.store.exists(registry.store.path("clf", ".lock"))
    assert [e["event"] for e in registry.history()] == ["promote", "promote", "rollback"]
    config = model_config_pb2.ModelConfig()
    text_format.Parse(registry.store.read_bytes(registry.store.path("clf", CONFIG)).decode(), config)
    assert list(config.version_policy.specific.versions) == [1]
