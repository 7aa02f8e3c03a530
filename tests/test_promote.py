"""Promotion on real processes: the paired gate, refusals, concurrency, kill -9, and the card.

Models are hand-built ONNX pixel readers (tests/candidate_factory.py): each reads its answer from
its own image channel, so a test sets exactly which test images each model gets right.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tasks import params as params_mod
from tasks.blessing.decision import PromotionDecision, PromotionRejected
from tasks.blessing.evidence import Card
from tasks.blessing.reports import ExportReport
from tasks.errors import DataError
from tasks.export import input_contract
from tasks.paths import Workspace
from tasks.promote import ContractImages, images_for_contract, promote
from tasks.registry import IntegrityError, Registry

from candidate_factory import (
    CLASSES3,
    make_ws,
    nested_split,
    pixel_reader_candidate,
    pixel_reader_onnx,
    run_stage,
    stage_command,
    write_split,
)


def tree_bytes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def popen_promote(ws: Workspace) -> subprocess.Popen[str]:
    return subprocess.Popen(
        **stage_command("tasks.promote"), cwd=ws.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_first_floor_only_then_better_promoted_then_worse_rejected_byte_for_byte(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    ws = make_ws(tmp_path / "ws", registry_dir)
    nested_split(ws, right=(36, 54, 30))  # accuracies 0.6, 0.9, 0.5
    p = params_mod.load(ws.params_file)

    pixel_reader_candidate(ws, read_channel=0)
    first = promote(p, ws)
    assert first.promoted and first.first_model and first.version == 1 and first.comparison is None
    assert "floor only" in first.to_markdown() and first.candidate_accuracy == pytest.approx(0.6)

    again = promote(p, ws)  # the same model again: nothing to do, nothing written
    assert not again.promoted and "already production version 1" in again.summary

    pixel_reader_candidate(ws, read_channel=1)
    better = promote(p, ws)
    assert better.promoted and better.version == 2 and not better.first_model
    assert better.production_accuracy == pytest.approx(0.6) and better.candidate_accuracy == pytest.approx(0.9)
    assert better.comparison is not None
    assert better.comparison.improvements == 18 and better.comparison.regressions == 0
    assert "| exact McNemar p (candidate worse) |" in better.to_markdown()

    pixel_reader_candidate(ws, read_channel=2)
    before = tree_bytes(registry_dir)
    with pytest.raises(PromotionRejected, match="rejected against production version 2") as info:
        promote(p, ws)
    assert info.value.exit_code == 3
    assert tree_bytes(registry_dir) == before
    decision = PromotionDecision.read(ws.promotion_decision, "promote")
    assert not decision.promoted and decision.comparison is not None and decision.comparison.regressions == 24
    assert decision.comparison.p_value < 1e-6
    production = Registry.open(ws, p.registry).production()
    assert production is not None and production.version == 2


@pytest.mark.integration
def test_refuses_a_candidate_not_verified_on_the_required_provider(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    ws = make_ws(tmp_path / "ws", registry_dir, **{"promote.require_provider": "cuda"})
    nested_split(ws, right=(40, 40, 40))
    pixel_reader_candidate(ws, read_channel=0, provider="cpu")
    proc = run_stage(ws, "tasks.promote")
    assert proc.returncode == 3, proc.stderr
    assert "promote.require_provider is cuda but the model was verified on cpu" in proc.stderr
    assert not registry_dir.exists()


def test_refuses_a_candidate_that_failed_the_floor(tmp_path: Path) -> None:
    ws = make_ws(tmp_path / "ws", tmp_path / "registry")
    nested_split(ws, right=(40, 40, 40))
    pixel_reader_candidate(ws, read_channel=0, gate_passed=False)
    ws.verification.unlink()  # the pipeline stops at evaluate: export and verify never ran for it
    with pytest.raises(PromotionRejected) as info:
        promote(params_mod.load(ws.params_file), ws)
    assert info.value.exit_code == 3
    assert any("accuracy floor failed" in r for r in info.value.decision.reasons)
    assert not (tmp_path / "registry").exists()


def test_the_floor_is_reapplied_with_current_params(tmp_path: Path) -> None:
    ws = make_ws(tmp_path / "ws", tmp_path / "registry", **{"gate.min_accuracy": 0.95})
    nested_split(ws, right=(40, 40, 40))
    pixel_reader_candidate(ws, read_channel=0, accuracy=0.9)  # evaluate passed it under an older, lower floor
    with pytest.raises(PromotionRejected, match=r"accuracy 0\.9000 < gate\.min_accuracy 0\.9500"):
        promote(params_mod.load(ws.params_file), ws)


def test_stale_evidence_is_refused(tmp_path: Path) -> None:
    ws = make_ws(tmp_path / "ws", tmp_path / "registry")
    nested_split(ws, right=(40, 40, 40))
    pixel_reader_candidate(ws, read_channel=0)
    p = params_mod.load(ws.params_file)
    pixel_reader_onnx(ws.onnx_model, 3, 3, 4, read_channel=2)  # re-exported after verification
    with pytest.raises(DataError, match=r"verification\.json were written for another candidate"):
        promote(p, ws)
    ws.candidate.write_bytes(b"retrained since the reports were written")
    with pytest.raises(DataError, match=r"metrics\.json was written for another candidate"):
        promote(p, ws)


@pytest.mark.integration
def test_two_promotions_in_two_processes_serialise_and_the_second_rechecks(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    # production 30/60 right; candidate B 42/60 (beats production); candidate A 60/60 (beats both).
    right = (30, 60, 42)
    seed = make_ws(tmp_path / "seed", registry_dir)
    nested_split(seed, right)
    pixel_reader_candidate(seed, read_channel=0)
    promote(params_mod.load(seed.params_file), seed)
    a, b = make_ws(tmp_path / "a", registry_dir), make_ws(tmp_path / "b", registry_dir)
    for ws, channel in ((a, 1), (b, 2)):
        nested_split(ws, right)
        pixel_reader_candidate(ws, read_channel=channel)
    registry = Registry.open(seed, params_mod.load(seed.params_file).registry)
    with registry.lock():  # both start while the registry is busy, then race for it
        procs = {"a": popen_promote(a), "b": popen_promote(b)}
        time.sleep(4)
        assert all(p.poll() is None for p in procs.values()), "a promotion did not wait for the lock"
    results = {name: (p.wait(timeout=120), p.communicate()[1]) for name, p in procs.items()}
    assert results["a"][0] == 0, results["a"][1]
    history = [e for e in registry.events().events if e.event == "promote"]
    if results["b"][0] == 3:  # A won the race: B was re-checked against A and lost
        assert "rejected against production version 2" in results["b"][1]
        assert [e.version for e in history] == [1, 2]
    else:  # B won: A was compared with B (the new production), and still won
        assert results["b"][0] == 0, results["b"][1]
        assert [(e.version, e.previous) for e in history] == [(1, None), (2, 1), (3, 2)]
        assert history[-1].production_accuracy == pytest.approx(0.7)
    production = registry.production()
    assert production is not None
    assert production.card.export.sha256 == ExportReport.read(a.export_report, "export").sha256


@pytest.mark.integration
def test_kill_9_during_promotion_leaves_a_readable_registry(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    ws = make_ws(tmp_path / "ws", registry_dir)
    nested_split(ws, right=(30, 60, 60))
    pixel_reader_candidate(ws, read_channel=0)
    p = params_mod.load(ws.params_file)
    promote(p, ws)
    # 64 MiB of weights keep the promotion inside its staging copy long enough to be caught there.
    pixel_reader_candidate(ws, read_channel=1, weights_bytes=64 << 20)
    proc = popen_promote(ws)
    model_dir = registry_dir / "clf"
    deadline = time.monotonic() + 60
    # Kill as soon as the new version is being written: in its staging copy, or renamed into place
    # before the pointer moved.
    while (
        not list(model_dir.glob(".staging-*"))
        and not (model_dir / "2").exists()
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.001)
    killed_while_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed_while_running, "the promotion finished before it could be killed"

    registry = Registry.open(ws, p.registry)
    production = registry.production()
    assert production is not None and production.version in (1, 2)
    assert Path(production.model_path).is_file() and production.card.version == production.version
    import onnxruntime as ort

    ort.InferenceSession(production.model_path, providers=["CPUExecutionProvider"])
    # Version 2 is a rollback target only if its promote event was written before the kill.
    recorded = registry.events().published(2) is not None
    assert registry.versions() == ([1, 2] if recorded else [1])
    # The lock died with the process; the next promotion cleans up (or completes version 2) and proceeds.
    decision = promote(p, ws)
    assert decision.promoted or "already production" in decision.summary
    assert not list(model_dir.glob(".staging-*"))
    assert set(registry.store.numeric_dirs(str(model_dir))) == set(registry.versions())  # no leftovers
    assert registry.audit().ok
    after = registry.production()
    assert after is not None and after.card.export.sha256 == ExportReport.read(ws.export_report, "export").sha256


def _first_promotion(tmp_path: Path) -> tuple[Workspace, params_mod.Params, Path]:
    """Version 1 (reads channel 0, 30 of 60 right) in a registry under ``tmp_path``."""
    registry_dir = tmp_path / "registry"
    ws = make_ws(tmp_path / "ws", registry_dir)
    nested_split(ws, right=(30, 60, 30))
    p = params_mod.load(ws.params_file)
    pixel_reader_candidate(ws, read_channel=0)
    promote(p, ws)
    return ws, p, registry_dir


def test_a_rolled_back_model_is_refused_naming_its_version_until_readmitted(tmp_path: Path) -> None:
    ws, p, registry_dir = _first_promotion(tmp_path)
    pixel_reader_candidate(ws, read_channel=1)
    assert promote(p, ws).version == 2
    registry = Registry.open(ws, p.registry)
    assert registry.rollback() == 1
    # The next run trains the byte-identical model again: it must not come back as version 3.
    before = tree_bytes(registry_dir)
    with pytest.raises(PromotionRejected, match=r"it is withdrawn version 2: .* --readmit") as info:
        promote(p, ws)
    assert info.value.exit_code == 3 and tree_bytes(registry_dir) == before
    assert registry.status().withdrawn == [2]
    readmitted = promote(p, ws, readmit=True)
    assert readmitted.promoted and readmitted.version == 3
    assert any("re-admits withdrawn version 2" in r for r in readmitted.reasons)
    last = registry.events().events[-1]
    assert (last.event, last.version, last.readmitted) == ("promote", 3, [2])
    assert registry.status().withdrawn == []


def test_a_corrupt_production_model_stops_promotion_with_a_named_error(tmp_path: Path) -> None:
    ws, p, registry_dir = _first_promotion(tmp_path)
    model = registry_dir / "clf" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x10  # a flipped bit: a baseline that scores differently, or not at all
    model.write_bytes(bytes(data))
    pixel_reader_candidate(ws, read_channel=1)
    before = tree_bytes(registry_dir)
    with pytest.raises(IntegrityError, match=r"version 1: .*1/model.onnx does not match the sha256") as info:
        promote(p, ws)
    assert info.value.exit_code == 1
    assert tree_bytes(registry_dir) == before


@pytest.mark.integration
def test_card_holds_the_evidence(workspace: Workspace, tmp_path: Path) -> None:
    ws = make_ws(workspace.root, tmp_path / "registry")
    (ws.root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    (ws.root / "dvc.lock").write_text("schema: '2.0'\nstages: {}  # as dvc repro left it\n")
    nested_split(ws, right=(50, 50, 50))
    pixel_reader_candidate(ws, read_channel=0)
    decision = promote(params_mod.load(ws.params_file), ws)
    version_dir = tmp_path / "registry" / "clf" / str(decision.version)
    card = Card.read(version_dir / "card.json", "promote")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ws.root, text=True, capture_output=True, check=True
    ).stdout.strip()
    assert card.git_rev is not None and card.git_rev.startswith(head)
    assert card.data.md5 == "0123456789abcdef0123456789abcdef.dir"
    assert card.validation.data_profile.pixel_mean == 0.1
    assert card.params["registry"]["model_name"] == "clf"
    assert card.gate.first_model and card.gate.promoted and card.gate == decision
    assert card.verification.provider_active == "cpu" and card.verification.cuda_verified is False
    assert card.export.input.dtype == "uint8" and card.classes == CLASSES3
    assert (version_dir / "weights.pt").read_bytes() == ws.candidate.read_bytes()
    # Exact copies of what built it, uncommitted edits included (the git rev alone says "-dirty").
    assert card.built_from is not None
    assert {name: text.encode() if text else None for name, text in card.built_from.texts().items()} == {
        name: (ws.root / name).read_bytes() for name in ("params.yaml", "dvc.lock", "data.dvc")
    }


def test_images_are_converted_to_another_models_contract(tmp_path: Path) -> None:
    ws = make_ws(tmp_path / "ws", tmp_path / "registry")
    rgb = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    rgb[0, 0] = 255  # red
    rgb[1] = 200  # light grey
    write_split(ws, rgb, np.array([0, 1]), CLASSES3)
    from tasks.data.prepared import load_split

    split = load_split(ws, "test")
    same = split.images[:]
    assert images_for_contract(same, input_contract(3, 4)) is same
    view = ContractImages(split.images, input_contract(1, 8))
    assert view.shape == (2, 1, 8, 8) and len(view) == 2
    gray = np.concatenate([view[0:1], view[1:2]])  # converted batch by batch, as scoring reads it
    assert gray.shape == (2, 1, 8, 8)
    assert int(gray[1].min()) == int(gray[1].max()) == 200
    assert int(gray[0, 0, 0, 0]) == 76  # ITU-R 601 luma of pure red, as PIL converts
