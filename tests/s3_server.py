"""A real S3 API server for the tests: moto's standalone server (moto[server]) on 127.0.0.1.

It runs in a child process on a port the kernel picks, speaks S3's HTTP protocol, and needs no
network. Clients (s3fs, boto3, DVC, visionops in child processes) reach it through the endpoint
URL and dummy credentials in the environment (`client_env`). Run as a script, it is the server:
``python tests/s3_server.py`` (moto's ``moto_server`` with `moto_atomic` installed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials or a region
}
S3_CLIENT = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
_STARTUP_S = 60.0  # a cold start on a busy 2-core machine


class S3Server:
    """moto's S3 server in a child process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""

    def start(self) -> str:
        env = {**os.environ, **DUMMY_CREDENTIALS, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + _STARTUP_S
        for line in self.proc.stdout:  # werkzeug: " * Running on http://127.0.0.1:PORT"
            match = re.search(r"Running on (http://127\.0\.0\.1:(\d+))", line)
            if match and match.group(2) != "0":
                self.endpoint = match.group(1)
                break
            if time.monotonic() > deadline:
                break
        if not self.endpoint:
            self.stop()
            raise RuntimeError("moto's S3 server did not report its port")
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()  # never block on a full pipe
        self._wait_ready(deadline)
        return self.endpoint

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client_env(self, config_dir: Path) -> dict[str, str]:
        """Environment for clients: the endpoint, dummy credentials, and empty AWS config files
        (so nothing from ~/.aws leaks in; dvc-s3 wants regular files, not /dev/null)."""
        config_dir.mkdir(parents=True, exist_ok=True)
        for name in ("aws-config", "aws-credentials"):
            (config_dir / name).write_text("")
        return {
            **DUMMY_CREDENTIALS,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_CONFIG_FILE": str(config_dir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "aws-credentials"),
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **S3_CLIENT).create_bucket(Bucket=name)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import moto_atomic

    moto_atomic.install()
    from moto.server import main

    main()
