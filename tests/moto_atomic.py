"""Test support for tests/s3_server.py: make moto's conditional S3 writes atomic, as they are on AWS.

moto 5.2.5 checks ``If-None-Match`` / ``If-Match`` and then writes, without a lock
(moto/s3/responses.py: ``S3Response.put_object`` checks ``if_match`` and ``if_none_match``
against ``backend.get_object`` before ``backend.put_object``; ``delete_object`` and
``complete_multipart_upload`` alike). Under concurrent requests two conditional PUTs of the same
key could both succeed (measured: 0.5-2% of contended rounds), which AWS S3 never allows and the
registry's lease lock relies on. `install` runs moto's object PUT/DELETE/POST handlers under one
lock, so each precondition check and its write are one step. Nothing of visionops is patched.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()
_HANDLERS = ("_key_response_put", "_key_response_delete", "_key_response_post")


def _serialised(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return handler(*args, **kwargs)

    run.__dict__["_visionops_atomic"] = True
    return run


def install() -> None:
    from moto.s3.responses import S3Response

    for name in _HANDLERS:
        handler = getattr(S3Response, name)
        if not getattr(handler, "_visionops_atomic", False):
            setattr(S3Response, name, _serialised(handler))
