"""dvc.yaml is the single definition of the stages: hold it to each stage's declaration and imports.

For every stage, dvc.yaml must list exactly the params, data deps and outputs that the stage's
``SPEC`` declares, and its code deps must cover the stage's whole import closure inside tasks/
(lazy imports included), with no dep that covers nothing. An edit to any module a stage runs
then re-runs that stage, in ``dvc repro`` and in the flow alike.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest
import yaml

from tasks import params
from tasks.entry import StageSpec
from tasks.paths import Workspace

PROJECT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = DVC["stages"]
EXPECTED_ORDER = ["prepare", "validate", "train", "evaluate", "export", "verify"]


def _names(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _module_file(module: str) -> Path | None:
    """The file of a ``tasks`` module or package, or None for anything outside tasks/."""
    if module != "tasks" and not module.startswith("tasks."):
        return None
    base = PROJECT / Path(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None  # a name imported from a module (``from tasks.x import y``), not a module


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs, at the top or inside functions (not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    guarded = [node for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)]
    skip = {id(n) for node in guarded for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from tasks.data import raw`` imports the submodule tasks.data.raw
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _with_packages(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _has_code(path: Path) -> bool:
    """A package __init__ with only a docstring cannot change what a stage does."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def import_closure(module: str) -> set[str]:
    """Files under tasks/ (relative, POSIX) that running ``python -m <module>`` may execute."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for part in _with_packages(name):
            path = _module_file(part)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(m for m in _imported_modules(path) if _module_file(m) is not None)
    return {p.relative_to(PROJECT).as_posix() for p in seen if p.name != "__init__.py" or _has_code(p)}


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def _spec(stage: str) -> StageSpec:
    spec = importlib.import_module(f"tasks.{stage}").SPEC
    assert isinstance(spec, StageSpec) and spec.name == stage
    return spec


def _relative(paths: list[Path]) -> set[str]:
    return {p.relative_to("/ws").as_posix() for p in paths}


WS = Workspace(Path("/ws"))


def test_stages_are_the_documented_chain_in_order() -> None:
    assert list(STAGES) == EXPECTED_ORDER


@pytest.mark.parametrize("stage", EXPECTED_ORDER)
def test_code_deps_cover_the_import_closure_and_nothing_else(stage: str) -> None:
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m tasks.{stage}"
    code = [d for d in spec["deps"] if d.startswith("tasks/")]
    closure = import_closure(f"tasks.{stage}")
    assert f"tasks/{stage}.py" in code
    uncovered = sorted(f for f in closure if not any(_covers(d, f) for d in code))
    assert not uncovered, f"{stage} runs {uncovered}, which dvc.yaml does not list as deps"
    idle = sorted(d for d in code if not any(_covers(d, f) for f in closure))
    assert not idle, f"{stage} lists {idle} as deps but never imports them"


def test_no_stage_imports_prefect_or_the_flows() -> None:
    for stage in EXPECTED_ORDER:
        for file in import_closure(f"tasks.{stage}"):
            imported = _imported_modules(PROJECT / file)
            upward = [m for m in imported if m.split(".")[0] in ("flows", "prefect")]
            assert not upward, f"{file} imports {upward}"


def test_the_closure_follows_lazy_imports() -> None:
    # model.weights: production reads the registry inside a function: an edit there must re-run train.
    assert "tasks/registry/__init__.py" in import_closure("tasks.train")
    assert "tasks/blessing/scoring.py" in import_closure("tasks.verify")


@pytest.mark.parametrize("stage", EXPECTED_ORDER)
def test_data_deps_and_outputs_are_what_the_stage_declares(stage: str) -> None:
    spec, declared = STAGES[stage], _spec(stage)
    data_deps = {d for d in spec["deps"] if not d.startswith("tasks/")}
    assert data_deps == _relative(declared.reads(WS)) | set(declared.external)
    outputs = {path for kind in ("outs", "metrics", "plots") for path in _names(spec.get(kind, []))}
    assert outputs == _relative(declared.writes(WS))


def _render(template: str, p: params.Params) -> str:
    """A dvc.yaml template (``${section.key}``) with params.yaml's values, as DVC renders it."""
    def value(match: re.Match[str]) -> str:
        node: object = p
        for part in match.group(1).split("."):
            node = getattr(node, part)
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, template)


def test_validate_depends_on_the_file_where_the_registry_names_production() -> None:
    from tasks.registry import MARKER, Registry

    p = params.load(PROJECT / "params.yaml")
    (template,) = _spec("validate").external
    registry = Registry.open(WS, p.registry)
    assert Path(_render(template, p)) == Path(registry.store.path(p.registry.model_name, MARKER)).relative_to("/ws")
    # the template reads exactly the params validate declares, so a change of them re-renders it
    assert set(re.findall(r"\$\{([\w.]+)\}", template)) <= set(_spec("validate").params)


@pytest.mark.parametrize("stage", EXPECTED_ORDER)
def test_params_are_what_the_stage_declares_and_reads(stage: str) -> None:
    declared = _spec(stage)
    listed = STAGES[stage].get("params", [])
    assert [key for key in listed if isinstance(key, str)] == list(declared.params)
    from_files = {path: tuple(keys) for entry in listed if isinstance(entry, dict) for path, keys in entry.items()}
    assert from_files == {p.relative_to("/ws").as_posix(): keys for p, keys in declared.reads_keys(WS).items()}
    p = params.load(PROJECT / "params.yaml")
    for key in declared.params:
        node = p
        for part in key.split("."):
            assert dataclasses.is_dataclass(node) and hasattr(node, part), f"{stage}: unknown param {key}"
            node = getattr(node, part)
    # The stage function receives exactly the sections its declared keys come from.
    function = getattr(importlib.import_module(f"tasks.{stage}"), stage)
    annotation = typing.get_type_hints(function)[next(iter(inspect.signature(function).parameters))]
    sections = {name: tp for name, tp in typing.get_type_hints(params.Params).items()}
    if annotation in sections.values():
        received = {name for name, tp in sections.items() if tp is annotation}
    else:
        received = {f.name for f in dataclasses.fields(annotation)}
    assert received == {key.split(".")[0] for key in declared.params}


def test_dvc_metrics_are_the_headline_files_only_and_no_key_repeats() -> None:
    from tasks.blessing.reports import EvaluationMetrics, VerificationMetrics

    declared = {path: stage for stage, spec in STAGES.items() for path in _names(spec.get("metrics", []))}
    assert declared == {"metrics/evaluate.json": "evaluate", "metrics/verify.json": "verify"}
    assert {WS.evaluation_metrics, WS.verification_metrics} == {WS.root / path for path in declared}
    evaluate_keys = {f.name for f in dataclasses.fields(EvaluationMetrics)}
    verify_keys = {f.name for f in dataclasses.fields(VerificationMetrics)}
    assert not evaluate_keys & verify_keys, "a metric key in two files collides in `dvc metrics show`"
