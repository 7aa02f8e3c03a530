"""``-S key=value`` overrides: parsed and checked against params.yaml before anything runs, then
in force for one run: kept when the run completes, put back when it fails (as ``dvc exp run -S``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tasks import params
from tasks.fs.atomic import atomic_write_bytes
from tasks.params import ConfigError, Params
from tasks.paths import Workspace


def parse_overrides(texts: Iterable[str]) -> dict[str, Any]:
    """``["train.epochs=1", ...]`` as ``{"train.epochs": 1}``; a key given twice is an error."""
    overrides: dict[str, Any] = {}
    for text in texts:
        key, value = params.parse_override(text)
        if key in overrides:
            raise ConfigError(f"override {key} given twice ({overrides[key]!r} and {value!r})")
        overrides[key] = value
    return overrides


def check_overrides(ws: Workspace, overrides: Mapping[str, Any]) -> Params:
    """The parameters ``overrides`` would give, without writing anything: a typo fails here."""
    return params.parse(params.apply_overrides(params.read_raw(ws.params_file), overrides))


@contextmanager
def overrides_in_force(ws: Workspace, overrides: Mapping[str, Any]) -> Iterator[Params]:
    """params.yaml with ``overrides`` written in (comments kept) while the block runs.

    They stay when the block completes, so ``dvc repro`` afterwards agrees with the run. When it
    raises (a failed, cancelled or interrupted run), params.yaml is put back byte for byte: a
    ``train.device: cuda`` that failed on a CPU machine must not fail every later scheduled run.
    """
    before = ws.params_file.read_bytes()
    in_force = params.write_overrides(ws.params_file, overrides)
    try:
        yield in_force
    except BaseException:
        if overrides:
            atomic_write_bytes(ws.params_file, before)
        raise
