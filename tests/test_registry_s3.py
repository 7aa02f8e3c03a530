"""The registry on a real S3 API server (tests/s3_server.py): promote, status, predict and rollback
through the command line, Triton's layout in the bucket, the lease lock under contention between
two processes, a lock holder killed with -9, and a version upload killed midway."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tasks import params as params_mod
from tasks.data.imaging import encode_png
from tasks.errors import RegistryError
from tasks.params import RegistryParams
from tasks.paths import Workspace
from tasks.promote import promote
from tasks.registry import Registry
from tasks.registry.lease import probe_conditional_writes
from tasks.registry.store import Store

from candidate_factory import (
    CLASSES3,
    make_ws,
    nested_split,
    pixel_reader_candidate,
    publish_pixel_reader,
    stage_command,
)
from conftest import PROJECT, S3_CLIENT, S3Bucket, run

pytestmark = pytest.mark.integration
TESTS = Path(__file__).resolve().parent
LEASE_S = 2.0  # short leases keep the takeover tests short; params.yaml's default is 30 s


def test_the_s3_server_passes_the_conditional_write_probe(s3_bucket: S3Bucket) -> None:
    store = Store(s3_bucket.url())
    assert probe_conditional_writes(store, store.path("probe")) is None
    assert s3_bucket.objects("") == {}


def visionops(ws: Workspace, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["visionops", "--workspace", str(ws.root), *args], ws.root, check=check)


def test_promote_status_predict_rollback_on_s3_and_tritons_layout_in_the_bucket(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    ws = make_ws(tmp_path / "ws", s3_bucket.url("models"))
    nested_split(ws, right=(30, 60, 30))
    pixel_reader_candidate(ws, read_channel=0)
    assert "promoted as version 1" in visionops(ws, "promote").stdout
    pixel_reader_candidate(ws, read_channel=1)
    assert "promoted as version 2" in visionops(ws, "promote").stdout

    status = json.loads(visionops(ws, "status", "--json").stdout)
    assert status["production"]["version"] == 2
    assert status["production"]["model_path"] == s3_bucket.url("models", "clf", "2", "model.onnx")
    assert status["production"]["integrity"] == "4 files match the sha256 recorded in history event 2"
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[0, 2, 1] = 255  # version 2 reads channel 1, row 0: this image says "eel"
    (tmp_path / "eel.png").write_bytes(encode_png(pixels))
    assert visionops(ws, "predict", str(tmp_path / "eel.png")).stdout.split("\t")[1] == "eel"

    # Triton's layout, as it stands in the bucket (read with boto3)
    objects = s3_bucket.objects("models/clf/")
    assert set(objects) == {
        *(f"{v}/{name}" for v in (1, 2) for name in ("model.onnx", "weights.pt", "card.json")),
        "labels-1.txt", "labels-2.txt", "config.pbtxt", "production.json",
        *(f"history/0000000{seq}.json" for seq in (1, 2)),
    }  # no lock object and no probe left behind
    config = model_config_pb2.ModelConfig()
    text_format.Parse(objects["config.pbtxt"].decode(), config)
    assert list(config.version_policy.specific.versions) == [2] and config.platform == "onnxruntime_onnx"
    assert objects[config.output[0].label_filename] == ("\n".join(CLASSES3) + "\n").encode()

    assert "production is now version 1; version 2 is withdrawn" in visionops(ws, "rollback").stdout
    config = model_config_pb2.ModelConfig()
    text_format.Parse(s3_bucket.objects("models/clf/")["config.pbtxt"].decode(), config)
    assert list(config.version_policy.specific.versions) == [1] and config.output[0].label_filename == "labels-1.txt"
    assert json.loads(visionops(ws, "status", "--json").stdout)["production"]["version"] == 1
    assert visionops(ws, "status", "--check").stdout.rstrip().endswith("integrity: ok")
    refused = visionops(ws, "promote", check=False)  # version 2's model again: withdrawn
    assert refused.returncode == 3 and "it is withdrawn version 2" in refused.stdout + refused.stderr
    assert "promoted as version 3" in visionops(ws, "promote", "--readmit").stdout


@pytest.mark.slow
def test_two_processes_promoting_to_one_s3_registry_never_hold_the_lock_together(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    rounds = 30  # per process: 60 lock acquisitions, nearly all of them contended
    go, contenders = tmp_path / "go", []
    for name in ("a", "b"):
        lease = {"registry.lease_s": 5, "registry.lock_timeout_s": 300}
        ws = make_ws(tmp_path / name, s3_bucket.url("models"), **lease)
        nested_split(ws, right=(40, 40, 40))
        out = tmp_path / f"{name}.json"
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "promotion_race.py"), str(ws.root), str(rounds), str(go), str(out)],
            stderr=subprocess.PIPE, text=True,
        )
        contenders.append((proc, out))
    time.sleep(3)  # both import and wait for the go file
    started = time.monotonic()
    go.touch()
    for proc, _ in contenders:
        assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    seconds = time.monotonic() - started
    results = [json.loads(out.read_text()) for _, out in contenders]

    holds = sorted((got, end, who) for who, r in enumerate(results) for _, got, end, _ in r["acquisitions"])
    assert len(holds) == 2 * rounds and all(end > got for got, end, _ in holds)
    overlaps = [(a, b) for a, b in itertools.pairwise(holds) if b[0] < a[1]]
    assert not overlaps, f"two holders at once: {overlaps[:3]}"
    # Contended: it found the lease held, or the other process was trying for it at the same moment.
    trying = [[(since, got) for since, got, _, _ in r["acquisitions"]] for r in results]
    contended = sum(
        waited or any(since <= got <= other_got for since, other_got in trying[1 - who])
        for who, r in enumerate(results)
        for _, got, _, waited in r["acquisitions"]
    )
    assert contended >= 50, f"only {contended} of {2 * rounds} acquisitions were contended"
    assert sum(r["takeovers"] for r in results) == 0  # both were alive: no lease may be taken over

    registry = Registry(s3_bucket.url("models"), params_mod.load(tmp_path / "a" / "params.yaml").registry, tmp_path)
    events = registry.events().events
    promotions = [e for e in events if e.event == "promote"]
    decided = {d["version"]: d["onnx_sha256"] for r in results for d in r["decisions"]}
    assert len(decided) == 2 * rounds  # every promotion got its own version
    assert {e.version: e.files[f"{e.version}/model.onnx"] for e in promotions} == decided  # each decision recorded
    assert [e.previous for e in promotions] == [None, *[e.version for e in promotions[:-1]]]  # one after another
    production = registry.production()  # every file checked against the history
    assert production is not None and production.version == promotions[-1].version
    held = sum(end - got for got, end, _ in holds)
    waits = [got - since for r in results for since, got, _, waited in r["acquisitions"] if waited]
    print(
        f"contended lock: {len(holds)} acquisitions by 2 processes, {contended} contended"
        f" ({len(waits)} found it held and waited, {sum(waits):.1f} s in all), 0 overlaps,"
        f" {len(events)} history events; {seconds:.1f} s wall, lock held {held:.1f} s"
        f" ({held / len(holds) * 1000:.0f} ms per promotion)"
    )


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.params import RegistryParams
    from tasks.registry import Registry
    registry = Registry(sys.argv[1], RegistryParams("r", "clf", 16, 60.0, float(sys.argv[2]), True), Path(sys.argv[3]))
    with registry.lock():
        print("locked", flush=True)
        time.sleep(600)
""")


class LockWatcher(threading.Thread):
    """Reads the lock object with boto3 every 20 ms: when each ETag was first and last seen."""

    def __init__(self, bucket: S3Bucket, key: str) -> None:
        super().__init__(daemon=True)
        import boto3

        self.client = boto3.client("s3", endpoint_url=bucket.endpoint, **S3_CLIENT)
        self.bucket, self.key = bucket.name, key
        self.seen: dict[str, tuple[float, float, str]] = {}  # ETag -> (first seen, last seen, holder)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except self.client.exceptions.NoSuchKey:
                continue
            now, holder = time.monotonic(), json.loads(got["Body"].read())["holder"]
            first = self.seen.get(got["ETag"], (now, now, holder))[0]
            self.seen[got["ETag"]] = (first, now, holder)


def test_a_killed_lock_holder_blocks_promotion_only_until_its_lease_expires(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    uri = s3_bucket.url("models")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, str(LEASE_S), str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True
    )
    watcher = LockWatcher(s3_bucket, "models/clf/.lock")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        watcher.start()
        ws = make_ws(tmp_path / "ws", uri, **{"registry.lease_s": LEASE_S, "registry.lock_timeout_s": 120})
        nested_split(ws, right=(40, 40, 40))
        pixel_reader_candidate(ws, read_channel=0)
        promoter = subprocess.Popen(["visionops", "--workspace", str(ws.root), "promote"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4 * LEASE_S)  # four leases: the holder renews its lease, so the promotion must wait
        assert promoter.poll() is None, "the promotion took the lock from a holder that was alive"
        os.kill(holder.pid, signal.SIGKILL)
        out, err = promoter.communicate(timeout=120)
    finally:
        watcher.stop.set()
        holder.kill()
        holder.wait()
    watcher.join()
    assert promoter.returncode == 0, err
    assert "promoted as version 1" in out and "took over from" in err
    # Not before the dead holder's lease had expired: its last renewal was written after the watcher
    # last saw the renewal before it, so the takeover (seen no earlier than it happened) must come a
    # whole lease after that sighting.
    timeline = sorted(watcher.seen.values())
    dead = [t for t in timeline if t[2] == timeline[0][2]]
    taken_seen = min(t[0] for t in timeline if t[2] != timeline[0][2])
    assert len(dead) >= 3, f"the holder renewed its lease too seldom to judge: {timeline}"
    assert taken_seen >= dead[-2][1] + LEASE_S, timeline
    production = Registry(uri, params_mod.load(ws.params_file).registry, tmp_path).production()
    assert production is not None and production.version == 1


def test_a_version_upload_killed_midway_is_never_production_nor_a_rollback_target(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    ws = make_ws(tmp_path / "ws", s3_bucket.url("models"), **{"registry.lease_s": LEASE_S})
    nested_split(ws, right=(30, 60, 30))
    p = params_mod.load(ws.params_file)
    pixel_reader_candidate(ws, read_channel=0)
    promote(p, ws)
    pixel_reader_candidate(ws, read_channel=1, weights_bytes=64 << 20)  # a long upload to kill
    proc = subprocess.Popen(**stage_command("tasks.promote"), cwd=ws.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while "2/model.onnx" not in s3_bucket.keys("models/clf/") and proc.poll() is None:  # listed, not read: quick
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.02)
    assert proc.poll() is None, "the promotion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = s3_bucket.objects("models/clf/")
    assert "2/model.onnx" in left and "2/card.json" not in left  # killed with version 2 half uploaded

    registry = Registry.open(ws, p.registry)
    production = registry.production()
    assert production is not None and production.version == 1 and registry.versions() == [1]
    assert [(v.version, v.state) for v in registry.audit().versions] == [(1, "production"), (2, "never activated")]
    with pytest.raises(RegistryError, match=r"version 2 .* was never production"):
        registry.rollback(to=2)  # after the dead holder's lease expired: the leftover is removed now
    assert not [key for key in s3_bucket.objects("models/clf/") if key.startswith(("2/", "labels-2"))]
    assert [(e.event, e.version) for e in registry.events().events] == [("promote", 1), ("discard", 2)]
    decision = promote(p, ws)
    assert decision.promoted and decision.version == 3


def test_dvc_sees_a_promotion_on_s3_through_validates_dependency_on_production(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    validate = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["validate"]
    (dependency,) = [d for d in validate["deps"] if "${registry.uri}" in d]
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    uri = s3_bucket.url("models")
    (repo / "params.yaml").write_text(yaml.safe_dump({"registry": {"uri": uri, "model_name": "clf"}}))
    stage = {"cmd": "date > checked.txt", "deps": [dependency], "params": ["registry.uri", "registry.model_name"],
             "outs": ["checked.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"drift": stage}}))
    registry = Registry(uri, RegistryParams(uri, "clf", 16, 30.0, 5.0, True), tmp_path)
    registry.ensure_marker()  # as `visionops ingest` and the flow do before the first `dvc repro`
    assert "Running stage 'drift'" in run(["dvc", "repro"], repo).stdout
    assert "up to date" in run(["dvc", "status"], repo).stdout
    publish_pixel_reader(registry, tmp_path / "candidate", read_channel=0)
    changed = run(["dvc", "status"], repo).stdout
    assert f"modified:           {uri}/clf/production.json" in changed, changed
    assert "Running stage 'drift'" in run(["dvc", "repro"], repo).stdout
