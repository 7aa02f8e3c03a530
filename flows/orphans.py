"""No orphans: child processes (servers, DVC) that the kernel stops when the process that started them dies.

A run killed with SIGKILL runs no cleanup, so what it started must be told by the kernel:
``PR_SET_PDEATHSIG`` sends the child SIGTERM when its parent thread ends. Linux only; elsewhere a
child outlives a killed parent, as it always did.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets SIGTERM when this process dies.

    Call it in the thread that starts the child and outlives it (the kernel watches that thread).
    """
    parent = os.getpid()

    def arrange() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # it died before prctl took effect
                os._exit(1)

    return arrange
