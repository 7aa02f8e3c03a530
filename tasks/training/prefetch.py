"""Reading ahead: host batches from a background thread, and their copy to the GPU on a side stream.

`read_ahead` runs the reads (``pread`` releases the GIL) while the training step computes; at
most ``depth`` finished batches wait in its queue, so memory is bounded by the depth, not the
data. `to_device` copies each batch from pinned memory with ``non_blocking=True`` on a copy
stream, one batch ahead, so the copy of batch i+1 overlaps the compute of batch i. On the CPU it
hands the batches through untouched.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

J = TypeVar("J")
B = TypeVar("B")

_JOIN_TIMEOUT_S = 30.0  # s to wait for the reader thread to finish its current read on close


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()


def read_ahead(read: Callable[[J], B], jobs: Iterable[J], depth: int) -> Iterator[B]:
    """``read(job)`` for every job, in order, computed up to ``depth`` ahead in a background thread.

    An error in a read is raised here, at the batch it belongs to. Leaving the loop early (break,
    an exception in the consumer) stops the thread.
    """
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for job in jobs:
                if not put(read(job)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="visionops-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(_JOIN_TIMEOUT_S)


def to_device(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> Iterator[
    tuple[torch.Tensor, torch.Tensor]
]:
    """Host (images, labels) batches on ``device``; on CUDA copied one ahead on a side stream."""
    if device.type != "cuda":
        yield from batches
        return
    copy_stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def copy(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.cuda.stream(copy_stream):
            return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    source = iter(batches)
    first = next(source, None)
    pending = copy(first) if first is not None else None
    while pending is not None:
        compute.wait_stream(copy_stream)  # the pending copy has landed before compute reads it
        images, labels = pending
        # Tensors made on the copy stream but used on the compute stream: tell the allocator, so
        # their memory is not reused while compute may still read it.
        images.record_stream(compute)
        labels.record_stream(compute)
        following = next(source, None)
        pending = copy(following) if following is not None else None  # overlaps this batch's compute
        yield images, labels
