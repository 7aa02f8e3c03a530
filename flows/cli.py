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
from tasks.entry import ERROR_PREFIX
from tasks.errors import GateRejected, VisionopsError, user_error
from tasks.paths import Workspace

if TYPE_CHECKING:
    from prefect.states import State

    from tasks.registry.history import HistoryEvent
    from tasks.registry.status import RegistryAudit, RegistryStatus

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
    from tasks.registry import Registry

    ws = _workspace(args)
    params = _params(ws)
    with _locked(ws, params, "ingest"):
        result = ingest(params.data, ws, args.source)
        Registry.open(ws, params.registry).ensure_marker()  # validate's DVC dependency, before `dvc repro`
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
            decision = promote(params, ws, readmit=args.readmit)
        except GateRejected as exc:
            if (rejected := getattr(exc, "decision", None)) is not None:
                print(rejected.to_markdown())
            raise
    print(decision.to_markdown())
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.registry import Registry

    ws = _workspace(args)
    registry = Registry.open(ws, _params(ws).registry)
    previous = registry.production_version()
    version = registry.rollback(args.to, readmit=args.readmit)
    print(f"production is now version {version}; version {previous} is withdrawn"
          " (a byte-identical candidate is refused unless promoted with --readmit)")
    return EXIT_OK


def _event_line(event: HistoryEvent) -> str:
    fields = {k: v for k, v in event.to_json().items() if v not in (None, [], {}) and k not in ("files", "seq")}
    return f"  #{event.seq} " + json.dumps(fields, sort_keys=False)


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
    if status.withdrawn:
        lines.append(f"withdrawn (rolled back): {', '.join(str(v) for v in status.withdrawn)}")
    history = status.history
    if history:
        lines.append(f"history (last {min(len(history), HISTORY_SHOWN)}):")
        lines += [_event_line(event) for event in history[-HISTORY_SHOWN:]]
    return "\n".join(lines)


def format_audit(audit: RegistryAudit) -> str:
    lines = [f"registry: {audit.registry} ({audit.events} history events, production: {audit.production})"]
    lines += [
        f"  version {v.version:>4}  {v.state:<15} {'ok' if v.ok else 'FAILED'}  {v.detail}" for v in audit.versions
    ]
    lines += [f"  problem: {problem}" for problem in audit.problems]
    lines.append("integrity: ok" if audit.ok else "integrity: FAILED")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from tasks.registry import Registry

    ws = _workspace(args)
    registry = Registry.open(ws, _params(ws).registry)
    if args.check:
        audit = registry.audit()
        print(json.dumps({**audit.to_json(), "ok": audit.ok}, indent=2) if args.json else format_audit(audit))
        return EXIT_OK if audit.ok else EXIT_FAILED
    status = registry.status()
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status))
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from tasks.registry import Registry
    from tasks.registry.reproduce import reproduce

    ws = _workspace(args)
    params = _params(ws)
    with _locked(ws, params, "reproduce"):
        result = reproduce(params.registry, ws, args.version)
        Registry.open(ws, params_module.load(ws.params_file).registry).ensure_marker()
    for path in result.written:
        print(f"wrote {path.name} as it was when version {result.version} was built")
    for path in result.removed:
        print(f"removed {path.name}: it did not exist when version {result.version} was built")
    rev = result.git_rev or "unknown"
    print(f"code: git revision {rev} (`git checkout {rev.removesuffix('-dirty')} -- tasks` for its code)")
    print("now: dvc pull data.dvc && dvc repro")
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
    readmit_help = "re-admit a withdrawn (rolled-back) version explicitly"
    promotion = command(
        "promote", cmd_promote, "promote the verified candidate if it passes the gate against production"
    )
    promotion.add_argument("--readmit", action="store_true", help=readmit_help)
    rollback = command("rollback", cmd_rollback, "move production back; the version it leaves is withdrawn")
    rollback.add_argument("--to", type=int, metavar="N", help="the version to restore (default: the previous one)")
    rollback.add_argument("--readmit", action="store_true", help=readmit_help)
    status = command("status", cmd_status, "production version, its metrics and evidence, recent history")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--check", action="store_true", help="audit every version's files against the history")
    reproduce = command("reproduce", cmd_reproduce, "write back the params.yaml, dvc.lock and data.dvc of version N")
    reproduce.add_argument("version", type=int, metavar="N")
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
    except Exception as exc:  # ours, a full disk, a permission, a broken Parquet file: one line; a bug: its traceback
        error = user_error(exc, f"visionops {args.command}")
        if error is None:
            raise
        _say(f"{ERROR_PREFIX}{_one_line(str(error))}")
        return error.exit_code
    except KeyboardInterrupt:
        _say("visionops: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
