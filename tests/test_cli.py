"""The `visionops` command line: exit codes and messages, without running the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prefect.states import Completed, Crashed, Failed

from flows.cli import main, pipeline_exit_code
from flows.dvc_repro import StageFailed
from flows.prefect_tasks import REJECTED
from tasks.errors import VisionopsError
from tasks.params import load
from tasks.paths import Workspace
from tasks.registry import Registry

from candidate_factory import publish_pixel_reader
from conftest import PROJECT, run


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    shutil.copy2(PROJECT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _main(ws: Path, *args: str) -> int:
    return main(["--workspace", str(ws), *args])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown key train.epoch"),
        ("trian.epochs=3", "unknown key trian"),
        ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
        ("train.epochs=0", "train.epochs: must be at least 1"),
        ("verify.provider=tpu", "verify.provider: expected one of"),
        ("train.epochs", "must look like section.key=value"),
    ],
)
@pytest.mark.parametrize("command", ["run", "quickstart"])
def test_a_bad_override_exits_2_naming_the_key_and_changes_nothing(
    ws: Path, command: str, override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (ws / "params.yaml").read_bytes()
    assert _main(ws, command, "-S", override) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionops: error: ") and message in err and err.count("\n") == 1
    assert (ws / "params.yaml").read_bytes() == before
    assert not (ws / ".visionops").exists(), "the pipeline started before the override was checked"


def test_an_override_given_twice_exits_2(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(ws, "run", "-S", "train.epochs=1", "-S", "train.epochs=2") == 2
    assert "train.epochs given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["predict"], ["rollback", "--to", "two"], ["status", "--yaml"], ["run", "-S"]],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_a_workspace_without_params_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(tmp_path, "status") == 2
    assert "params.yaml not found" in capsys.readouterr().err


def test_a_file_system_error_is_one_line_not_a_traceback(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / ".visionops").write_text("a file where the state folder goes")
    assert _main(ws, "ingest") == 1
    err = capsys.readouterr().err
    expected = f"cannot read or write {ws / '.visionops'}: File exists; a file stands where a folder should be"
    assert err.startswith("visionops: error: ") and expected in err and err.count("\n") == 1


def test_status_before_any_promotion(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(ws, "status") == 0
    out = capsys.readouterr().out
    assert out.startswith("production: no production model yet") and "None" not in out
    assert _main(ws, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["production"] is None and status["history"] == []


def test_rollback_and_predict_without_production_exit_1_with_one_line(
    ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(ws, "rollback") == 1
    assert "no production version to roll back from" in capsys.readouterr().err
    assert _main(ws, "predict", str(ws / "params.yaml")) == 1
    err = capsys.readouterr().err
    assert "no production model" in err and err.count("\n") == 1


def test_pipeline_states_map_to_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline_exit_code(Completed()) == 0
    assert pipeline_exit_code(Completed(name=REJECTED, message="accuracy 0.5 < 0.9")) == 3
    assert "candidate rejected: accuracy 0.5 < 0.9" in capsys.readouterr().err
    with pytest.raises(StageFailed, match="stage 'train' failed"):
        pipeline_exit_code(Failed(data=StageFailed("train", "TrainingDiverged: loss is nan", "")))
    with pytest.raises(VisionopsError, match="pipeline run ended Crashed: worker died"):
        pipeline_exit_code(Crashed(message="worker died"))


def test_workspace_may_follow_the_command_and_wins_there(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--workspace", str(ws)]) == 0
    assert main(["--workspace", str(ws / "elsewhere"), "status", "--workspace", str(ws)]) == 0
    assert capsys.readouterr().out.count("production: no production model yet") == 2
    assert main(["status", "--workspace", str(ws / "elsewhere")]) == 2  # there is no params.yaml there


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"visionops {version('visionops')}\n"


@pytest.mark.integration
def test_a_reader_that_leaves_early_gets_no_broken_pipe_traceback(ws: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # like `visionops status | head` once head has read enough and exited
    try:
        cmd = ["visionops", "status", "--json"]
        proc = subprocess.run(cmd, cwd=ws, stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


@pytest.mark.integration
def test_the_console_script_is_installed_and_reports_usage_errors(tmp_path: Path) -> None:
    proc = run(["visionops", "--workspace", str(tmp_path), "run", "--nope"], tmp_path, check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --nope" in proc.stderr
    proc = run(["visionops", "--help"], tmp_path)
    for command in ("quickstart", "run", "ingest", "promote", "rollback", "status", "predict", "serve", "reproduce"):
        assert command in proc.stdout


@pytest.mark.integration
def test_ingest_from_a_class_folder_versions_it_and_records_the_source(workspace: Workspace, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "shapes"
    for label, shade in (("dark", 30), ("light", 220)):
        (folder / label).mkdir(parents=True)
        for i in range(15):
            Image.new("L", (12, 12), shade + i).save(folder / label / f"{i}.png")
    proc = run(["visionops", "ingest", "--source", str(folder)], workspace.root)
    assert f"params.yaml: data.source = {folder}" in proc.stdout and "a new version" in proc.stdout
    assert load(workspace.params_file).data.source == str(folder)
    assert (workspace.root / "data.dvc").is_file() and (workspace.data / "train-00000.parquet").is_file()
    again = run(["visionops", "ingest"], workspace.root)
    assert "unchanged" in again.stdout and "params.yaml" not in again.stdout


def _registry_with_versions(ws: Path, n: int) -> Registry:
    registry = Registry.open(Workspace(ws), load(ws / "params.yaml").registry)
    for tag in range(1, n + 1):
        publish_pixel_reader(registry, ws / f"candidate{tag}", tag % 3)
    return registry


def test_status_shows_integrity_and_check_audits_every_version(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = _registry_with_versions(ws, 2)
    assert _main(ws, "status") == 0
    assert "integrity: 4 files match the sha256 recorded in history event 2" in capsys.readouterr().out
    assert _main(ws, "status", "--check") == 0
    assert capsys.readouterr().out.rstrip().endswith("integrity: ok")
    weights = Path(registry.location) / "1" / "weights.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert _main(ws, "status") == 0  # production (version 2) is intact
    capsys.readouterr()
    assert _main(ws, "status", "--check") == 1
    out = capsys.readouterr().out
    assert "version    1  activated       FAILED  version 1: " in out and "1/weights.pt does not match" in out
    assert "version    2  production      ok" in out and out.rstrip().endswith("integrity: FAILED")
    assert _main(ws, "status", "--check", "--json") == 1
    audit = json.loads(capsys.readouterr().out)
    assert audit["ok"] is False and [v["ok"] for v in audit["versions"]] == [False, True]
    model = Path(registry.location) / "2" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1])
    assert _main(ws, "status") == 1
    err = capsys.readouterr().err
    assert err.startswith("visionops: error: version 2: ") and "2/model.onnx does not match" in err
    assert err.count("\n") == 1


def test_rollback_names_the_withdrawn_version(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _registry_with_versions(ws, 2)
    assert _main(ws, "rollback") == 0
    assert "production is now version 1; version 2 is withdrawn" in capsys.readouterr().out
    assert _main(ws, "rollback", "--to", "2") == 1
    assert "--to 2 --readmit" in capsys.readouterr().err
    assert _main(ws, "rollback", "--to", "2", "--readmit") == 0


def test_reproduce_of_a_version_that_was_never_production_exits_1_and_writes_nothing(
    ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _registry_with_versions(ws, 1)
    before = (ws / "params.yaml").read_bytes()
    assert _main(ws, "reproduce", "7") == 1
    assert "version 7 of" in capsys.readouterr().err
    assert (ws / "params.yaml").read_bytes() == before and not (ws / "dvc.lock").exists()
