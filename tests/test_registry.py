"""The Triton-layout model registry on a local disk: layout, Triton's schema, history, integrity,
recovery, leftovers, withdrawn versions, the lock, and stores that cannot lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tasks.errors import RegistryError
from tasks.fs.hashing import file_digest
from tasks.params import ConfigError, RegistryParams
from tasks.registry import CONFIG, HISTORY, MARKER, IntegrityError, Registry
from tasks.registry.lease import probe_conditional_writes
from tasks.registry.status import RegistryStatus
from tasks.registry.store import Store
from tasks.registry.triton import labels_file

from candidate_factory import (
    CLASSES3,
    export_contract,
    make_card,
    pixel_reader_onnx,
    publish_pixel_reader,
)

PROJECT = Path(__file__).resolve().parents[1]
PARAMS = RegistryParams(
    uri="registry", model_name="clf", max_batch_size=16, lock_timeout_s=30.0, lease_s=5.0,
    require_conditional_writes=True,
)


def _publish(registry: Registry, tmp_path: Path, tag: int, classes: list[str] = CLASSES3) -> int:
    return publish_pixel_reader(registry, tmp_path / f"candidate{tag}", tag % 3, classes, accuracy=0.5 + tag / 100)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"), PARAMS, tmp_path / "cache")


def model_dir(tmp_path: Path) -> Path:
    return tmp_path / "registry" / "clf"


def test_empty_registry_has_no_production_and_reading_creates_nothing(registry: Registry, tmp_path: Path) -> None:
    assert registry.production() is None and registry.production_weights() is None
    assert registry.status() == RegistryStatus(registry=registry.location, production=None, history=[])
    assert registry.audit().ok and registry.audit().versions == []
    with pytest.raises(RegistryError, match="no production version"):
        registry.rollback()
    assert not (tmp_path / "registry").exists()


def test_publish_writes_the_triton_layout_and_records_every_file_in_the_history(
    registry: Registry, tmp_path: Path
) -> None:
    version = _publish(registry, tmp_path, 1)
    folder = model_dir(tmp_path)
    assert version == 1
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["card.json", "model.onnx", "weights.pt"]
    assert (folder / "labels-1.txt").read_text() == "cat\ndog\neel\n"
    assert not (folder / "labels.txt").exists()
    info = registry.production()
    assert info is not None and info.version == 1 and Path(info.model_path) == folder / "1" / "model.onnx"
    weights = registry.production_weights()
    assert weights is not None and weights.read_bytes() == b"weights of candidate1"
    (event,) = [json.loads(p.read_text()) for p in sorted((folder / HISTORY).iterdir())]
    assert (event["seq"], event["event"], event["version"], event["previous"]) == (1, "promote", 1, None)
    assert event["files"] == {
        name: file_digest(folder / name) for name in ("1/model.onnx", "1/weights.pt", "1/card.json", "labels-1.txt")
    }
    assert json.loads((folder / MARKER).read_text()) == {"version": 1, "model_sha256": event["files"]["1/model.onnx"]}


def test_config_pbtxt_parses_under_tritons_schema_and_pins_production_with_its_labels(
    registry: Registry, tmp_path: Path
) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2, classes=["ant", "bee", "cow"])
    config = model_config_pb2.ModelConfig()
    text_format.Parse((model_dir(tmp_path) / CONFIG).read_text(), config)
    assert config.name == "clf" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert list(config.version_policy.specific.versions) == [2]
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", model_config_pb2.TYPE_UINT8, [3, 4, 4])
    assert inp.format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == (
        "probabilities",
        model_config_pb2.TYPE_FP32,
        [3],
        "labels-2.txt",
    )
    # The labels of the version Triton serves are the ones the pinned config.pbtxt names.
    assert (model_dir(tmp_path) / out.label_filename).read_text() == "ant\nbee\ncow\n"


def test_publish_outside_the_lock_is_a_bug(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "candidate"
    pixel_reader_onnx(src / "model.onnx", 3, 3, 4, read_channel=0)
    files = {"model.onnx": src / "model.onnx"}
    card = make_card(1, "clf", files, export_contract(src / "model.onnx", src / "model.onnx", CLASSES3, 3, 4), 0.5)
    with pytest.raises(AssertionError, match="lock"):
        registry.publish(files, card)


def test_rollback_withdraws_the_version_it_leaves_and_a_withdrawn_target_needs_readmit(
    registry: Registry, tmp_path: Path
) -> None:
    for tag in (1, 2):
        _publish(registry, tmp_path, tag)
    _publish(registry, tmp_path, 3, classes=["ant", "bee", "cow"])
    assert registry.rollback() == 2
    production = registry.production()
    assert production is not None and production.version == 2 and production.card.classes == CLASSES3
    with pytest.raises(RegistryError, match=r"version 3 was withdrawn .* --to 3 --readmit"):
        registry.rollback(to=3)
    assert registry.rollback(to=3, readmit=True) == 3  # 2 is withdrawn now
    assert registry.rollback() == 1  # the newest earlier version that is not withdrawn
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    with pytest.raises(RegistryError, match="was never production"):
        registry.rollback(to=9)
    events = [(e.event, e.version, e.previous, e.withdrawn, e.readmitted) for e in registry.events().events]
    assert events == [
        ("promote", 1, None, None, []),
        ("promote", 2, 1, None, []),
        ("promote", 3, 2, None, []),
        ("rollback", 2, 3, 3, []),
        ("rollback", 3, 2, 2, [3]),
        ("rollback", 1, 3, 3, []),
    ]
    assert registry.status().withdrawn == [2, 3]


def test_status_has_the_cli_shape_and_says_what_was_verified(registry: Registry, tmp_path: Path) -> None:
    _publish(registry, tmp_path, 1)
    status = json.loads(json.dumps(registry.status().to_json()))
    prod = status["production"]
    assert prod["version"] == 1 and prod["metrics"] == {"accuracy": 0.51, "macro_f1": 0.51, "n_test": 3}
    assert Path(prod["model_path"]).is_file() and prod["cuda_verified"] is False
    assert prod["integrity"] == "4 files match the sha256 recorded in history event 1"
    assert status["history"][-1]["event"] == "promote" and status["withdrawn"] == []


@pytest.mark.parametrize("name", ["1/model.onnx", "1/weights.pt", "1/card.json", "labels-1.txt"])
def test_a_flipped_byte_in_any_file_of_production_is_a_named_error_on_every_read(
    registry: Registry, tmp_path: Path, name: str
) -> None:
    _publish(registry, tmp_path, 1)
    path = model_dir(tmp_path) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = Registry(str(tmp_path / "registry"), PARAMS, tmp_path / "cache")
    reads: list[Callable[[], object]] = [
        fresh.production, fresh.status, fresh.production_weights, partial(fresh.card, 1)
    ]
    for read in reads:
        with pytest.raises(IntegrityError, match=rf"version 1: .*{name} does not match the sha256"):
            read()
    audit = fresh.audit()
    assert not audit.ok and [(v.version, v.ok) for v in audit.versions] == [(1, False)]


def test_an_edited_card_cannot_change_what_is_read_even_with_its_own_hashes_forged(
    registry: Registry, tmp_path: Path
) -> None:
    _publish(registry, tmp_path, 1)
    card_path = model_dir(tmp_path) / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["classes"] = ["eel", "dog", "cat"]  # would reorder predict's labels
    card["files"]["model.onnx"] = "0" * 64  # and would make every promotion's baseline check fail
    card_path.write_text(json.dumps(card))
    with pytest.raises(IntegrityError, match=r"card.json does not match the sha256 recorded when it was published"):
        registry.status()


def test_rollback_to_a_corrupt_version_is_refused_and_production_stays(registry: Registry, tmp_path: Path) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    (model_dir(tmp_path) / "1" / "model.onnx").write_bytes(b"not the model that was promoted")
    config = (model_dir(tmp_path) / CONFIG).read_bytes()
    with pytest.raises(IntegrityError, match=r"version 1: .*model.onnx does not match"):
        registry.rollback()
    assert (model_dir(tmp_path) / CONFIG).read_bytes() == config
    assert [e.event for e in registry.events().events] == ["promote", "promote"]


def test_a_gap_in_the_history_is_refused(registry: Registry, tmp_path: Path) -> None:
    for tag in (1, 2, 3):
        _publish(registry, tmp_path, tag)
    (model_dir(tmp_path) / HISTORY / "00000002.json").unlink()
    with pytest.raises(RegistryError, match="missing event 2"):
        registry.status()


def test_a_version_that_landed_but_was_never_activated_is_no_target_and_the_next_lock_removes_it(
    registry: Registry, tmp_path: Path
) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    folder = model_dir(tmp_path)
    # What a process killed after the version's rename, before its history event, leaves behind:
    shutil.copytree(folder / "2", folder / "3")
    shutil.copy(folder / "labels-2.txt", folder / "labels-3.txt")
    assert registry.versions() == [1, 2]
    audit = registry.audit()
    assert [(v.version, v.state) for v in audit.versions][-1] == (3, "never activated") and audit.ok
    with pytest.raises(RegistryError, match=r"version 3 .* was never production"):
        registry.rollback(to=3)  # refused, but under the lock: the leftover is gone now
    assert not (folder / "3").exists() and not (folder / "labels-3.txt").exists()
    assert registry.rollback() == 1
    assert [(e.event, e.version) for e in registry.events().events][-2:] == [("discard", 3), ("rollback", 1)]
    assert _publish(registry, tmp_path, 4) == 4  # the discarded number is not reused


def test_recovery_completes_a_pointer_that_lags_its_history_event(registry: Registry, tmp_path: Path) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    folder = model_dir(tmp_path)
    # Killed after the promote event of version 2, before config.pbtxt moved: the pointer names 1.
    (folder / CONFIG).write_text((folder / CONFIG).read_text().replace("[2]", "[1]").replace("labels-2", "labels-1"))
    production = registry.production()
    assert production is not None and production.version == 1  # readers follow the pointer, verified
    with registry.lock():
        pass
    production = registry.production()
    assert production is not None and production.version == 2
    last = registry.events().events[-1]
    assert (last.event, last.version, last.previous) == ("recover", 2, 1)


def test_a_pointer_whose_labels_are_not_its_versions_is_refused_then_repaired(
    registry: Registry, tmp_path: Path
) -> None:
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2, classes=["ant", "bee", "cow"])
    folder = model_dir(tmp_path)
    (folder / CONFIG).write_text((folder / CONFIG).read_text().replace("labels-2.txt", "labels-1.txt"))
    with pytest.raises(RegistryError, match=r"pins version 2 with labels 'labels-1.txt'"):
        registry.production()
    assert not registry.audit().ok
    with registry.lock():
        pass
    assert f'label_filename: "{labels_file(2)}"' in (folder / CONFIG).read_text()
    production = registry.production()
    assert production is not None and production.card.classes == ["ant", "bee", "cow"]


def test_the_production_marker_follows_production_and_is_created_only_on_request(
    registry: Registry, tmp_path: Path
) -> None:
    marker = model_dir(tmp_path) / MARKER
    registry.ensure_marker()
    assert json.loads(marker.read_text()) == {"version": None, "model_sha256": None}
    _publish(registry, tmp_path, 1)
    _publish(registry, tmp_path, 2)
    registry.ensure_marker()  # never overwrites
    assert json.loads(marker.read_text())["version"] == 2
    registry.rollback()
    assert json.loads(marker.read_text()) == {
        "version": 1, "model_sha256": file_digest(model_dir(tmp_path) / "1" / "model.onnx")
    }


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


def test_the_probe_finds_a_store_whose_compare_and_swap_does_not_hold(tmp_path: Path) -> None:
    store = Store(f"memory://visionops-{tmp_path.name}")
    # fsspec's memory store refuses a second create, but a swap against a wrong ETag goes through.
    assert probe_conditional_writes(store, store.path("probe")) == (
        "a compare-and-swap (If-Match) against a wrong ETag succeeded"
    )
    assert not store.exists(store.path("probe"))


def test_a_store_without_conditional_writes_is_refused_for_promotion_unless_opted_out(tmp_path: Path) -> None:
    uri = f"memory://visionops-{tmp_path.name}/registry"
    refused = Registry(uri, PARAMS, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"cannot be locked .* registry.require_conditional_writes: false"):
        _publish(refused, tmp_path, 1)
    assert refused.production() is None and refused.store.names(refused.store.path("clf")) == []
    unlocked = Registry(uri, RegistryParams("r", "clf", 16, 30.0, 5.0, False), tmp_path / "cache")
    _publish(unlocked, tmp_path, 1)
    _publish(unlocked, tmp_path, 2)
    info = unlocked.production()
    assert info is not None and info.version == 2 and info.model_path.startswith("memory://")
    local = unlocked.production_weights()
    assert local is not None
    assert local.read_bytes() == b"weights of candidate2" and local.is_relative_to(tmp_path / "cache")
    assert unlocked.rollback() == 1


def _tmpfs_namespace() -> list[str] | None:
    """How this machine lets a test mount a small tmpfs in a private mount namespace, or None."""
    for args in (["unshare", "--mount", "--map-root-user"], ["unshare", "--mount"]):
        probe = subprocess.run([*args, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return args
    return None


FULL_DISK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from candidate_factory import publish_pixel_reader
    from tasks.errors import RegistryError
    from tasks.params import RegistryParams
    from tasks.registry import Registry
    mnt, out = Path(os.environ["MNT"]), Path(os.environ["OUT"])
    registry = Registry(str(mnt / "registry"), RegistryParams("r", "clf", 16, 30.0, 5.0, True), out / "cache")
    publish_pixel_reader(registry, out / "c1", 0)
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    (mnt / "ballast").write_bytes(bytes(free - (256 << 10)))  # 256 KiB left
    result = {}
    try:
        publish_pixel_reader(registry, out / "c2", 1, weights_bytes=1 << 20)
    except RegistryError as exc:
        result["error"] = str(exc)
    result["left"] = sorted(p.name for p in (mnt / "registry" / "clf").iterdir())
    result["production"] = registry.production().version
    (mnt / "ballast").unlink()
    result["retry"] = publish_pixel_reader(registry, out / "c3", 1, weights_bytes=1 << 20)
    (out / "result.json").write_text(json.dumps(result))
""")


@pytest.mark.integration
def test_a_full_disk_while_publishing_leaves_production_and_no_partial_version(tmp_path: Path) -> None:
    namespace = _tmpfs_namespace()
    if namespace is None:
        pytest.skip("no way to mount a small tmpfs here (needs root or user namespaces): not tested")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = 'mount -t tmpfs -o size=2m tmpfs "$MNT" && exec "$PYTHON" -c "$CODE" "$TESTS"'
    env = {**os.environ, "MNT": str(mnt), "OUT": str(out), "PYTHON": sys.executable, "CODE": FULL_DISK,
           "TESTS": str(PROJECT / "tests")}
    proc = subprocess.run([*namespace, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert "No space left on device" in result["error"] and "production is unchanged" in result["error"]
    assert result["production"] == 1
    assert not [name for name in result["left"] if name.startswith(".staging-") or name in ("2", "labels-2.txt")]
    assert result["retry"] in (2, 3)  # the space the failed attempt took was given back
