"""``-S key=value`` overrides: parsed and checked against params.yaml before anything runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tasks import params
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
