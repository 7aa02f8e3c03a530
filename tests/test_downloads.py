"""tasks/data/downloads.py: cached, checksum-verified downloads; transient failures retried then typed."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from tasks.data.downloads import TransientDownloadError, fetch
from tasks.errors import DataError, RuntimeUnavailable


def _closed_port_url() -> str:
    """A localhost URL nothing listens on: connection refused, like a network outage."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/archive.tar.gz"


def test_fetch_copies_and_verifies(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = fetch(src.as_uri(), tmp_path / "cache" / "a.bin", md5=hashlib.md5(b"payload").hexdigest())
    assert dest.read_bytes() == b"payload"
    assert not list((tmp_path / "cache").glob("*.part"))


def test_checksum_mismatch_is_a_data_error(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    with pytest.raises(DataError, match=r"checksum mismatch.*expected 0+"):
        fetch(src.as_uri(), tmp_path / "cache" / "a.bin", md5="0" * 32)
    assert not (tmp_path / "cache" / "a.bin").exists()


def test_stale_cached_copy_is_replaced(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"new")
    dest = tmp_path / "cache" / "a.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    fetch(src.as_uri(), dest, md5=hashlib.md5(b"new").hexdigest())
    assert dest.read_bytes() == b"new"


def test_missing_file_url_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot download"):
        fetch((tmp_path / "absent.bin").as_uri(), tmp_path / "cache" / "a.bin", backoff_s=0)


def test_network_failure_is_retried_then_transient(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TransientDownloadError, match="after 3 attempts") as info:
        fetch(_closed_port_url(), tmp_path / "cache" / "a.bin", attempts=3, backoff_s=0.01)
    assert isinstance(info.value, RuntimeUnavailable)
    assert sum("retrying" in r.message for r in caplog.records) == 2


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then the payload."""

    failures = 2
    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        if type(self).requests <= self.failures:
            self.send_error(503, "busy")
            return
        self.send_response(200)
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"payload")

    def log_message(self, *args: object) -> None:
        pass


def test_http_503_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        dest = fetch(url, tmp_path / "a.zip", md5=hashlib.md5(b"payload").hexdigest(), attempts=3, backoff_s=0.01)
    finally:
        server.shutdown()
    assert dest.read_bytes() == b"payload" and _FlakyHandler.requests == 3


class _UndeclaredHandler(http.server.BaseHTTPRequestHandler):
    """Streams 3 MB without a Content-Length, as a hostile or careless server may."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        for _ in range(3):
            self.wfile.write(bytes(1 << 20))

    def log_message(self, *args: object) -> None:
        pass


def test_a_download_larger_than_allowed_is_refused_and_deleted(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(2000))
    with pytest.raises(DataError, match=r"is 0\.0 GB, more than data\.ingest\.max_dataset_gb \(1e-06 GB\)"):
        fetch(src.as_uri(), tmp_path / "cache" / "a.bin", max_bytes=1000)  # refused on its declared length
    server = http.server.HTTPServer(("127.0.0.1", 0), _UndeclaredHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        with pytest.raises(DataError, match=r"is larger than data\.ingest\.max_dataset_gb"):
            fetch(url, tmp_path / "cache" / "b.zip", max_bytes=1 << 20)  # refused as the bytes arrive
    finally:
        server.shutdown()
        server.server_close()
    assert not list((tmp_path / "cache").iterdir())
