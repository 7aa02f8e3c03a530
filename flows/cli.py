"""The `visionops` command line (DESIGN.md, "Command line").

Exit codes: 0 done, 2 bad usage or configuration, 3 a gate rejected the candidate (production
unchanged), 1 any other failure. Heavy libraries (Prefect, torch, onnxruntime) are imported only
by the command that needs them, so `visionops status` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import params as params_module
from tasks.errors import GateRejected, VisionopsError
from tasks.paths import Workspace

if TYPE_CHECKING:
    from prefect.states import State

    from tasks.registry.status import RegistryStatus

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
HISTORY_SHOWN = 5  # history entries `visionops status` prints


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace(Path(args.workspace).resolve())


def _params(ws: Workspace) -> params_module.Params:
    return params_module.load(ws.params_file)


def _locked(ws: Workspace, params: params_module.Params, what: str) -> Any:
    from flows.workspace_lock import workspace_lock

    return workspace_lock(ws, f"visionops {what}", params.schedule.lock_timeout_s, on_wait=_say)


def pipeline_exit_code(state: State[Any]) -> int:
    """0 completed, 3 rejected by a gate; a failure re-raises its error (or one naming the state)."""
    from flows.pipeline import REJECTED

    if state.name == REJECTED:
        _say(f"visionops: candidate rejected: {_one_line(state.message or '')}")
        return EXIT_REJECTED
    if state.is_completed():
        return EXIT_OK
    error = state.result(raise_on_failure=False)
    if isinstance(error, VisionopsError):
        raise error
    raise VisionopsError(f"pipeline run ended {state.name}: {state.message}")


def _run_pipeline(ws: Workspace, overrides: dict[str, Any]) -> State[Any]:
    from flows import temporary_server

    # Without a configured Prefect API the flow runs on a temporary local server: started before
    # Prefect is imported (it boots meanwhile), gone when this process ends, however it ends.
    temporary_server.start_unless_configured()
    from flows.pipeline import training_pipeline

    with temporary_server.prefect_api(on_start=lambda line: _say(f"visionops: {line}")):
        return training_pipeline(overrides=overrides, workspace=str(ws.root), return_state=True)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.overrides import check_overrides, parse_overrides

    ws = _workspace(args)
    overrides = parse_overrides(args.set)
    check_overrides(ws, overrides)  # a typo exits 2 before Prefect starts
    return pipeline_exit_code(_run_pipeline(ws, overrides))


def cmd_quickstart(args: argparse.Namespace) -> int:
    from flows.overrides import check_overrides, parse_overrides
    from flows.quickstart import closing_report, cuda_present, quickstart_overrides

    ws = _workspace(args)
    overrides, notes = quickstart_overrides(cuda_present(), parse_overrides(args.set))
    check_overrides(ws, overrides)
    for note in notes:
        print(note, flush=True)
    state = _run_pipeline(ws, overrides)
    code = pipeline_exit_code(state)
    if code == EXIT_OK:
        print(closing_report(ws, state.result(), time.monotonic() - args.started), flush=True)
    return code


def cmd_ingest(args: argparse.Namespace) -> int:
    from tasks.ingest import ingest

    ws = _workspace(args)
    params = _params(ws)
    with _locked(ws, params, "ingest"):
        result = ingest(params.data, ws, args.source)
        if args.source is not None and args.source != params.data.source:
            # data.source records where data/ came from, so the next pipeline run ingests the same.
            params_module.write_overrides(ws.params_file, {"data.source": args.source})
            print(f"params.yaml: data.source = {args.source}")
    state = "a new version" if result.changed else "unchanged"
    print(f"data/ from {result.source}: {state} (dvc md5 {result.md5}), pushed to the DVC remote")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    from tasks.promote import promote

    ws = _workspace(args)
    params = _params(ws)
    with _locked(ws, params, "promote"):
        try:
            decision = promote(params, ws)
        except GateRejected as exc:
            if (rejected := getattr(exc, "decision", None)) is not None:
                print(rejected.to_markdown())
            raise
    print(decision.to_markdown())
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.registry import Registry

    ws = _workspace(args)
    version = Registry.open(ws, _params(ws).registry).rollback(args.to)
    print(f"production is now version {version}")
    return EXIT_OK


def format_status(status: RegistryStatus) -> str:
    production = status.production
    if production is None:
        lines = ["production: no production model yet (run `visionops quickstart` or `visionops run`)"]
    else:
        fields = production.to_json()
        lines = [f"production: version {production.version}", f"  model: {production.model_path}"]
        lines += [f"  {name}: {value}" for name, value in fields["metrics"].items()]
        lines += [
            f"  {key}: {value}"
            for key, value in fields.items()
            if key not in ("version", "model_path", "metrics") and not isinstance(value, dict | list)
        ]
    history = status.history
    if history:
        lines.append(f"history (last {min(len(history), HISTORY_SHOWN)}):")
        lines += [f"  {json.dumps(entry, sort_keys=True)}" for entry in history[-HISTORY_SHOWN:]]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from tasks.registry import Registry

    ws = _workspace(args)
    status = Registry.open(ws, _params(ws).registry).status()
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from tasks.predict import predict

    ws = _workspace(args)
    results = predict(_params(ws).registry, ws, [Path(p) for p in args.images])
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.path}\t{r.label}\t{r.probability:.4f}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    ws = _workspace(args)
    serve(ws, _params(ws))
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("visionops")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionops",
        description="From an image dataset to a proven production ONNX model (DVC + Prefect).",
        epilog="exit codes: 0 done, 2 usage or config, 3 gate rejected (production unchanged), 1 other failure",
    )
    workspace_help = "the git+DVC workspace (default: .)"
    parser.add_argument("--workspace", default=".", metavar="DIR", help=workspace_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        # also after the command (`visionops status --workspace DIR`); absent there, the global one holds
        sub.add_argument("--workspace", default=argparse.SUPPRESS, metavar="DIR", help=workspace_help)
        return sub

    set_help = "override a params.yaml key, as `dvc exp run -S` (repeatable; written into params.yaml)"
    quick = command(
        "quickstart", cmd_quickstart, "offline demo: synthetic data, CPU-sized settings, whole flow, promotion"
    )
    quick.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    run = command("run", cmd_run, "run the training pipeline flow")
    run.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    ingest = command("ingest", cmd_ingest, "ingest a new data version into data/ (dvc add + push)")
    ingest.add_argument(
        "--source", help="synthetic | cifar10 | class-folder dir, .tar or .zip (path or URL); default data.source"
    )
    command("promote", cmd_promote, "promote the verified candidate if it passes the gate against production")
    rollback = command("rollback", cmd_rollback, "move production back")
    rollback.add_argument("--to", type=int, metavar="N", help="the version to restore (default: the previous one)")
    status = command("status", cmd_status, "production version, its metrics and evidence, recent history")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    predict = command("predict", cmd_predict, "classify images with the production ONNX model")
    predict.add_argument("--json", action="store_true", help="a JSON list of {path, label, probability}")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    command("serve", cmd_serve, "serve the scheduled deployment (cron from params.yaml) until stopped")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    args.started = started
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (`visionops status | head`) is handled below
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_FAILED
    except VisionopsError as exc:
        _say(f"visionops: error: {_one_line(str(exc))}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("visionops: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
