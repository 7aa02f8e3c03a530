"""The pipeline's fixed cost: how much of a run is starting processes and importing, not doing work.

One run of this script:

1. times a bare ``python -c pass`` and ``python -c "import torch"`` (the unit: ratios survive a
   noisy machine, seconds do not), before and after the flow;
2. runs the quickstart flow end to end (``visionops quickstart -S train.epochs=1
   -S gate.min_accuracy=0``: the quickstart's small synthetic dataset, one epoch) in a fresh
   git+DVC workspace with its own Prefect home, every Python process of it recorded by
   ``benchmarks/tax_probe/sitecustomize.py``;
3. splits each step's time (as the flow reports it) into process start + imports (interpreter
   start-up and every import, lazy ones included), DVC's own work (its start, hashing, dvc.lock),
   the stage's work (the rest), and Prefect's share (the run's time outside its steps: the CLI's
   start-up and imports, Prefect's temporary server, task and artifact bookkeeping);
4. prints the fixed cost (everything but the stages' work) in seconds and in torch imports.

The bytecode of the venv is assumed compiled (any earlier run did it); ``--cold-bytecode`` also
times the heavy imports with no compiled bytecode, as a fresh install without it pays once.

    python benchmarks/pipeline_tax.py [--keep DIR] [--cold-bytecode]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "tax_probe"
VENV_BIN = Path(sys.executable).parent
FLOW_ARGS = ["quickstart", "-S", "train.epochs=1", "-S", "gate.min_accuracy=0"]
STEP_LINE = re.compile(r"pipeline took ([\d.]+) s: ([\d.]+) s in its steps \(([^)]*)\)")
HEAVY_IMPORTS = ("torch", "torchvision", "great_expectations", "onnxruntime", "prefect", "dvc.repo")
QUIET = {
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        sys.exit(f"pipeline_tax: `{' '.join(cmd)}` exited {proc.returncode}:\n{output}")
    return seconds, proc


def python_seconds(code: str, cwd: Path, env: dict[str, str]) -> float:
    return timed([sys.executable, "-c", code], cwd, env)[0]


def make_workspace(root: Path, env: dict[str, str]) -> Path:
    """A git+DVC repository laid out like this project, with a local DVC remote beside it."""
    ws = root / "ws"
    ws.mkdir()
    for name in ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, ws / name)
    shutil.copytree(ROOT / "tasks", ws / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "local", str(root / "dvc-remote")],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "workspace"],
    ):
        timed(cmd, ws, env)
    return ws


@dataclass
class Process:
    """One recorded Python process of the run (tax_probe's JSON line)."""

    argv: list[str]
    pid: int
    started: float
    site: float
    ended: float
    imports: list[tuple[float, float, str]]
    calls: list[tuple[str, float, float]]
    forked_from: int | None  # the parent's pid, for a forked child

    @property
    def wall(self) -> float:
        return self.ended - self.started

    def import_s(self, since: float = 0.0, until: float = float("inf")) -> float:
        """Seconds importing inside [since, until] (the union over threads: overlaps count once)."""
        spans = sorted((max(s, since), min(s + d, until)) for s, d, _ in self.imports if s < until and s + d > since)
        total, reach = 0.0, float("-inf")
        for start, end in spans:
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    @property
    def start_imports(self) -> float:
        """Interpreter start-up (kernel start to this probe) plus every import it made."""
        return (self.site - self.started) + self.import_s()

    def module_arg(self) -> str | None:
        return self.argv[self.argv.index("-m") + 1] if "-m" in self.argv[:-1] else None


def read_records(path: Path) -> list[Process]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        Process(r["argv"], r["pid"], r["started"], r["site"], r["ended"], r["imports"], r["calls"],
                forked_from=r.get("forked_from"))
        for r in rows
    ]  # fmt: skip


@dataclass
class Split:
    """One step's time: process start + imports, DVC's own work, the work."""

    total: float
    start_imports: float = 0.0
    dvc: float = 0.0
    details: list[str] = field(default_factory=list)

    @property
    def work(self) -> float:
        return max(self.total - self.start_imports - self.dvc, 0.0)


def split_steps(steps: dict[str, float], processes: list[Process]) -> tuple[dict[str, Split], Process]:
    """Each step of the flow's own report, split with the recorded processes."""
    cli = next(p for p in processes if any(Path(a).name == "visionops" for a in p.argv[:2]))
    stage_procs = {m.removeprefix("tasks."): p for p in processes if (m := p.module_arg() or "").startswith("tasks.")}
    servers = {p.pid for p in processes if p.module_arg() == "tasks.warm_stages"}
    warm_children = [p for p in processes if p.forked_from in servers]
    dvc_procs = [p for p in processes if p.module_arg() == "dvc"]
    windows = defaultdict(list)
    for name, start, end in cli.calls:
        windows[name].append((start, end))
    splits: dict[str, Split] = {}
    for step, total in steps.items():
        split = Split(total)
        if (proc := stage_procs.get(step)) is not None:
            # Everything of the step outside the stage's own process is DVC's (its start, hashing, lock).
            split.dvc = max(total - proc.wall, 0.0)
            child = next((c for c in warm_children if proc.started <= c.started <= proc.ended), None)
            if child is None:
                split.start_imports = proc.start_imports
            else:  # handed to the warm server: the stage process's own time, plus what its child imported
                child_wall = min(child.ended, proc.ended) - child.started  # it records its end after reporting
                split.start_imports = (proc.wall - child_wall) + child.import_s()
                split.details.append("warm")
        elif step in windows:  # an in-process step: imports it made, and the dvc processes it ran
            for start, end in windows[step]:
                split.start_imports += cli.import_s(start, end)
                inner = [p for p in dvc_procs if start <= p.started and p.ended <= end]
                split.dvc += sum(p.wall for p in inner)
                split.details += ["dvc " + " ".join(p.argv[p.argv.index("dvc") + 1 :][:1]) for p in inner]
        else:  # DVC found the stage up to date: no stage process ran
            split.dvc = total
        splits[step] = split
    return splits, cli


def bytecode_cold(tmp: Path, env: dict[str, str]) -> None:
    """Heavy imports with no compiled bytecode (a fresh install without compile-bytecode), then warm."""
    for module in HEAVY_IMPORTS:
        cold_env = {**env, "PYTHONPYCACHEPREFIX": str(tmp / f"pycache-{module}")}
        cold = python_seconds(f"import {module}", tmp, cold_env)
        warm = python_seconds(f"import {module}", tmp, env)
        print(f"import {module:<20} first run without bytecode {cold:6.2f} s, with it {warm:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it, with the probe's records")
    parser.add_argument("--cold-bytecode", action="store_true", help="also time heavy imports without bytecode")
    args = parser.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="pipeline-tax-"))
    tmp.mkdir(parents=True, exist_ok=True)
    records = tmp / "processes.jsonl"
    env = {
        **os.environ,
        **QUIET,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "GIT_AUTHOR_NAME": "pipeline-tax", "GIT_AUTHOR_EMAIL": "bench@visionops.invalid",
        "GIT_COMMITTER_NAME": "pipeline-tax", "GIT_COMMITTER_EMAIL": "bench@visionops.invalid",
    }  # fmt: skip
    env.pop("PREFECT_API_URL", None)  # the flow runs on Prefect's temporary server, as the quickstart does
    try:
        bare = python_seconds("pass", tmp, env)
        torch_s = [python_seconds("import torch", tmp, env)]
        ws = make_workspace(tmp, env)
        # Prefect's database exists on a machine that ran it before: create it outside the timed run.
        timed([str(VENV_BIN / "prefect"), "server", "database", "upgrade", "-y"], tmp, env)
        probe_env = {**env, "PYTHONPATH": str(PROBE), "PIPELINE_TAX_RECORDS": str(records)}
        wall, proc = timed([str(VENV_BIN / "visionops"), *FLOW_ARGS], ws, probe_env)
        (tmp / "flow.log").write_text(proc.stdout + proc.stderr)
        torch_s += [python_seconds("import torch", tmp, env) for _ in range(2)]
        noop, repro = timed([str(VENV_BIN / "dvc"), "repro"], ws, env)
        if args.cold_bytecode:
            bytecode_cold(tmp, env)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    match = STEP_LINE.search(proc.stdout + proc.stderr)
    if match is None:
        sys.exit("pipeline_tax: the flow's 'pipeline took ...' line is missing from its output")
    steps = {name: float(s) for name, s in (item.rsplit(" ", 1) for item in match.group(3).split(", "))}
    records_all = read_records(records)
    splits, cli = split_steps(steps, records_all)
    torch_import = statistics.median(torch_s)

    print(f"flow end to end: visionops {' '.join(FLOW_ARGS)}: {wall:.1f} s")
    print(f"{'step':<10} {'total':>7} {'start+imports':>14} {'dvc':>7} {'work':>7}   (seconds)")
    for step, s in splits.items():
        extra = f"   ({', '.join(s.details)})" if s.details else ""
        print(f"{step:<10} {s.total:7.1f} {s.start_imports:14.1f} {s.dvc:7.1f} {s.work:7.1f}{extra}")
    in_steps = sum(steps.values())
    prefect = wall - in_steps
    step_imports = sum(cli.import_s(a, b) for _, a, b in cli.calls)
    cli_start = (cli.site - cli.started) + cli.import_s() - step_imports
    print(f"outside the steps (Prefect's share) {prefect:.1f} s: CLI start-up and imports {cli_start:.1f} s,"
          f" Prefect's temporary server, task and artifact bookkeeping {prefect - cli_start:.1f} s")  # fmt: skip
    work = sum(s.work for s in splits.values())
    fixed = wall - work
    for server in (p for p in records_all if p.module_arg() == "tasks.warm_stages"):
        print(f"warm stage server: imported {server.import_s():.1f} s of libraries beside the run, once")
    print(f"bare python start: {bare:.2f} s; import torch: {torch_import:.2f} s (median of {len(torch_s)}: "
          + ", ".join(f"{t:.2f}" for t in torch_s) + ")")  # fmt: skip
    print(f"stages' work {work:.1f} s; fixed cost {fixed:.1f} s ({100 * fixed / wall:.0f}% of the run)"
          f" = {fixed / torch_import:.1f} torch imports")  # fmt: skip
    ran = [line for line in repro.stdout.splitlines() if line.startswith("Running stage")]
    print(f"dvc repro afterwards: {'nothing to do' if not ran else 'RAN ' + '; '.join(ran)} ({noop:.1f} s)")
    print(f"fixed cost: {fixed / torch_import:.1f} torch imports")


if __name__ == "__main__":
    main()
