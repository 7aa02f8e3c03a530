"""End to end: `visionops quickstart` in a fresh git+DVC repo on Prefect's test harness, then the
promoted model in onnxruntime, `dvc repro` re-checking drift only, a gate rejection that changes nothing, the
HTML reports in a headless browser with no network, and `dvc exp run` comparing a weak and a good
setting while the flow and `visionops promote` refuse the weak one."""

from __future__ import annotations

import configparser
import contextlib
import csv
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
from prefect.testing.utilities import prefect_test_harness

from flows.artifacts import (
    GATE_KEY,
    METRICS_KEY,
    PRODUCTION_KEY,
    VALIDATION_KEY,
    VERIFICATION_KEY,
)
from flows.cli import main
from tasks import params as params_module
from tasks.paths import Workspace
from tasks.registry import Registry

from conftest import PROJECT, copy_workspace, file_tree, run
from prefect_queries import artifact_keys, task_runs

pytestmark = pytest.mark.slow

# On top of the quickstart's own overrides: a pipeline small enough for a test on 2 cores.
TINY = [
    "data.synthetic.classes=4",
    "data.synthetic.train_per_class=40",
    "data.synthetic.test_per_class=12",
    "data.image_size=16",
    "train.epochs=1",
    "gate.min_accuracy=0.0",
    "validate.drift.min_estimated_accuracy=0.0",  # below the floor, as params.yaml says: a 1-epoch production
    "verify.latency_runs=5",
    "registry.max_batch_size=16",
]
STAGES = ("prepare", "validate", "train", "evaluate", "export", "verify")


@dataclass(frozen=True)
class Quickstart:
    ws: Workspace
    exit_code: int
    output: str
    seconds: float


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def quickstart(harness: None, workspace_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Quickstart:
    root = tmp_path_factory.mktemp("e2e")
    ws = copy_workspace(workspace_template, root / "ws", root / "dvc-remote")
    out = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out):
        code = main(["--workspace", str(ws.root), "quickstart", *(arg for kv in TINY for arg in ("-S", kv))])
    return Quickstart(ws, code, out.getvalue(), time.monotonic() - started)


def _status(ws: Workspace) -> dict:
    return json.loads(run(["visionops", "--workspace", str(ws.root), "status", "--json"], ws.root).stdout)


def test_quickstart_promotes_and_says_where_it_trained_and_verified(quickstart: Quickstart) -> None:
    assert quickstart.exit_code == 0, quickstart.output
    out = quickstart.output
    assert "quickstart: data.source=synthetic" in out
    assert "trained on:" in out and "verified with:  onnxruntime" in out
    assert "production:     version 1" in out and "wall time:" in out
    accuracy = json.loads(quickstart.ws.evaluation_metrics.read_text())["accuracy"]
    assert f"test accuracy:  {accuracy:.4f} on 48 images" in out
    verification = json.loads(quickstart.ws.verification.read_text())
    assert ("CUDA was not verified" in out) == (not verification["cuda_verified"])
    if not verification["cuda_verified"]:
        assert "no CUDA device found" in out and "promote.require_provider=cpu" in out


def test_the_production_model_gives_one_score_per_class_for_any_batch(quickstart: Quickstart) -> None:
    production = _status(quickstart.ws)["production"]
    assert production["version"] == 1
    session = ort.InferenceSession(production["model_path"], providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    channels, size = model_input.shape[1], model_input.shape[2]
    classes = production["classes"]
    assert len(classes) == 4
    rng = np.random.default_rng(0)
    for batch in (1, 7, 32):
        images = rng.integers(0, 256, size=(batch, channels, size, size), dtype=np.uint8)
        (probabilities,) = session.run(None, {model_input.name: images})
        assert probabilities.shape == (batch, len(classes))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_dvc_repro_after_the_flow_rechecks_drift_against_the_new_production_and_retrains_nothing(
    quickstart: Quickstart,
) -> None:
    lock = quickstart.ws.root / "dvc.lock"
    before = yaml.safe_load(lock.read_text())["stages"]
    assert not json.loads(quickstart.ws.validation.read_text())["drift"]["checked"]  # no production then
    # The flow promoted version 1 after validate ran: production (validate's drift baseline) changed.
    proc = run(["dvc", "repro"], quickstart.ws.root)
    assert "Running stage 'validate'" in proc.stdout, proc.stdout
    for stage in STAGES[2:]:
        assert f"Stage '{stage}' didn't change, skipping" in proc.stdout, proc.stdout
    after = yaml.safe_load(lock.read_text())["stages"]
    assert {s: after[s] for s in STAGES if s != "validate"} == {s: before[s] for s in STAGES if s != "validate"}
    assert json.loads(quickstart.ws.validation.read_text())["drift"]["checked"]
    started = time.monotonic()
    again = run(["dvc", "repro"], quickstart.ws.root)
    assert "Data and pipelines are up to date." in again.stdout, again.stdout
    assert time.monotonic() - started < 30
    dag = run(["dvc", "dag"], quickstart.ws.root).stdout
    for node in ("data.dvc", *STAGES):
        assert f"| {node} |" in dag, dag


def test_the_run_published_its_artifacts(quickstart: Quickstart) -> None:
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_ASC)
        keys = artifact_keys(client, flow_run.id)
        names = {t.name.rsplit("-", 1)[0] for t in task_runs(client, flow_run.id)}
    assert {VALIDATION_KEY, METRICS_KEY, GATE_KEY, VERIFICATION_KEY, PRODUCTION_KEY} <= keys
    assert names == {"ingest", *STAGES, "promote"}


def test_a_rejected_candidate_exits_3_leaves_production_byte_for_byte_and_dvc_repro_nothing_to_do(
    quickstart: Quickstart,
) -> None:
    registry = quickstart.ws.root / "registry"
    before = file_tree(registry)
    # The candidate was verified on onnxruntime's CPU provider; demanding CUDA must refuse it.
    overrides = ["-S", "verify.provider=cpu", "-S", "promote.require_provider=cuda"]
    code = main(["--workspace", str(quickstart.ws.root), "run", *overrides])
    assert code == 3
    assert file_tree(registry) == before
    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)
    state = latest.state
    assert state is not None and state.type.value == "COMPLETED" and state.name == "Rejected"
    assert "cuda" in (state.message or "").lower()
    # Nothing was promoted, so validate's drift baseline is as it was: `dvc repro` has nothing to do.
    again = run(["dvc", "repro"], quickstart.ws.root)
    assert "Data and pipelines are up to date." in again.stdout, again.stdout


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic",
    # no network at all: no name resolves, and anything else goes to a closed port
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
]  # fmt: skip
REMOTE_ASSET = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["']?https?://""", re.IGNORECASE)


def _rendered_dom(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a real headless Chromium that cannot reach any network."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is needed for this check: `apt-get install chromium` (as .ci/run does)")
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom"]
    return run([*cmd, page.as_uri()], page.parent, timeout=120).stdout


def _offline_plots_config(ws: Workspace) -> None:
    """This project's `dvc plots` page template and the .dvc/config line that names it, in ``ws``."""
    config = configparser.ConfigParser()
    config.read(PROJECT / ".dvc" / "config")
    template = config["plots"]["html_template"]
    shutil.copy2(PROJECT / ".dvc" / template, ws.root / ".dvc" / template)
    run(["dvc", "config", "plots.html_template", template], ws.root)


def test_dvc_plots_and_the_data_docs_render_with_no_network(quickstart: Quickstart, tmp_path: Path) -> None:
    ws = quickstart.ws
    (ws.root / ".dvc" / "plots").mkdir(exist_ok=True)
    _offline_plots_config(ws)
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], ws.root)
    page = tmp_path / "plots" / "index.html"
    assert not REMOTE_ASSET.search(page.read_text()), "the dvc plots page loads something from the network"
    dom = _rendered_dom(page, tmp_path / "chromium-plots")
    # train_loss, test_accuracy, learning_rate, throughput and the confusion matrix: drawn, once each
    drawn = re.findall(r'<(?:canvas|svg)\b[^>]*\bclass="marks"', dom)
    assert len(drawn) == 5, dom[-3000:]
    docs = ws.data_docs / "index.html"
    for html in ws.data_docs.rglob("*.html"):
        assert not REMOTE_ASSET.search(html.read_text()), f"{html} loads something from the network"
    dom = _rendered_dom(docs, tmp_path / "chromium-docs")
    suites = {p.stem for p in (ws.data_docs / "expectations").glob("*.html")}
    rows = re.findall(r"<tr>\s*<td>\s*<a href=\"validations/", dom)
    assert len(rows) == len(suites) >= 3, dom[-2000:]
    assert all(suite in dom for suite in suites)


def _table_width(text: str) -> int:
    return max(len(line.rstrip()) for line in text.splitlines())


def _dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    """params.yaml's keys as `dvc exp show` names its columns (data.synthetic.train_per_class)."""
    keys: set[str] = set()
    for key, value in tree.items():
        keys |= _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def test_dvc_exp_compares_a_weak_and_a_good_setting_and_nothing_unblessed_gets_promoted(
    quickstart: Quickstart, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = quickstart.ws
    registry = ws.root / "registry"
    before = file_tree(registry)
    run(["dvc", "repro"], ws.root)  # after a promoting run: validate re-checks drift (a no-op if done already)
    run(["git", "add", "-A"], ws.root)  # the baseline, committed as a DVC user commits a run's params and lock
    run(["git", "commit", "-qm", "quickstart"], ws.root)
    # A floor the one-epoch candidate cannot reach: DVC finishes every stage and records the verdict.
    run(["dvc", "exp", "run", "-n", "weak", "-S", "gate.min_accuracy=0.999"], ws.root)
    verdict = json.loads(ws.evaluation_metrics.read_text())["gate"]
    assert verdict["passed"] is False and "gate.min_accuracy 0.9990" in verdict["reasons"]
    assert json.loads(ws.verification_metrics.read_text())["onnx_diff_of_atol"] < 1, "verify did not run"
    # The flow and promote refuse the candidate evaluate recorded as failing (exit 3), production unchanged.
    assert main(["--workspace", str(ws.root), "run"]) == 3
    assert "evaluate: candidate fails the accuracy floor" in capsys.readouterr().err
    assert main(["--workspace", str(ws.root), "promote"]) == 3
    assert file_tree(registry) == before
    run(["dvc", "exp", "run", "-n", "good", "-S", "gate.min_accuracy=0.0"], ws.root)
    shown = run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--csv"], ws.root).stdout
    rows = {row["Experiment"]: row for row in csv.DictReader(shown.splitlines()) if row["Experiment"]}
    assert rows["weak"]["gate.passed"] == "False" and rows["good"]["gate.passed"] == "True", shown
    assert rows["weak"]["gate.min_accuracy"] == "0.999" and rows["good"]["gate.min_accuracy"] == "0.0", shown
    # Narrow enough to read in a terminal: headline metrics only, no per-class columns, no repeated key.
    metrics = run(["dvc", "metrics", "show"], ws.root).stdout
    assert _table_width(metrics) <= 120, metrics
    table = run(["dvc", "exp", "show", "--no-pager", "--only-changed"], ws.root, env={**os.environ, "COLUMNS": "400"})
    assert _table_width(table.stdout) <= 160, table.stdout
    columns = next(csv.reader(run(["dvc", "exp", "show", "--no-pager", "--csv"], ws.root).stdout.splitlines()))
    metric_columns = [c for c in columns if c not in _dotted_keys(yaml.safe_load(ws.params_file.read_text()))]
    assert metric_columns.count("accuracy") == 1, metric_columns
    assert not [c for c in metric_columns if "per_class" in c or "confusion" in c], metric_columns


def test_reproduce_in_a_fresh_clone_rebuilds_version_1_with_the_same_weights(
    quickstart: Quickstart, tmp_path: Path
) -> None:
    from tasks.training.candidate import load_candidate

    ws = quickstart.ws
    # The workspace moves on: other settings, a new data version, and the registry named by an
    # absolute path, as a registry shared between clones is; all of it committed.
    params = params_module.write_overrides(ws.params_file, {
        "train.seed": 7, "data.seed": 3, "registry.uri": str(ws.root / "registry"),
    })
    assert main(["--workspace", str(ws.root), "ingest"]) == 0  # a second data version, pushed
    run(["git", "add", "-A"], ws.root)
    run(["git", "commit", "-qm", "other settings and data"], ws.root)
    card = Registry.open(ws, params.registry).card(1)
    assert card.built_from is not None
    built = {name: text.encode() for name, text in card.built_from.texts().items() if text is not None}
    assert set(built) == {"params.yaml", "dvc.lock", "data.dvc"}
    assert all((ws.root / name).read_bytes() != data for name, data in built.items())

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(ws.root), str(clone)], tmp_path)
    out = run(["visionops", "--workspace", str(clone), "reproduce", "1"], clone).stdout
    assert "now: dvc pull data.dvc && dvc repro" in out
    assert {name: (clone / name).read_bytes() for name in built} == built
    run(["dvc", "pull", "data.dvc"], clone)
    rebuild = run(["dvc", "repro", "train"], clone).stdout  # through train: the weights are the claim
    assert "Running stage 'train'" in rebuild  # trained again: a fresh clone has no cached candidate

    registry_weights = ws.root / "registry" / "visionops-classifier" / "1" / "weights.pt"
    rebuilt = load_candidate(clone / "models" / "candidate.pt").state_dict
    promoted = load_candidate(registry_weights).state_dict
    assert rebuilt.keys() == promoted.keys()
    assert all(bool((rebuilt[k] == promoted[k]).all()) for k in promoted), "version 1 rebuilt with other weights"
